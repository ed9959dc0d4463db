"""Caption readers: one module per annotation format, registered by name.

A dataset's config names the readers to try (data.source.readers, in detection order, each with
the files it reads), so a new format is one module with a `Reader` subclass, one
`@register_reader("<name>")`, and one line in the dataset's yaml. Names, not import paths: a
checkpoint's recorded data.source can only pick among the readers registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from imcap.data.captions.base import Captions, Context, DirIndex, Parsed, Reader
from imcap.errors import UserError

__all__ = [
    "READERS",
    "Captions",
    "Context",
    "DirIndex",
    "Parsed",
    "Reader",
    "get_reader",
    "register_reader",
]

R = TypeVar("R", bound=type[Reader])

READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[R], R]:
    """Class decorator: make a `Reader` subclass available to configs as `name`."""

    def add(cls: R) -> R:
        old = READERS.get(name)
        if old is not None and _where(type(old)) != _where(cls):
            raise ValueError(
                f"caption reader {name!r} is already {_where(type(old))}; pick another name"
            )
        cls.name = name
        READERS[name] = cls()
        return cls

    return add


def get_reader(name: str) -> Reader:
    """The reader registered as `name`; an unknown name is a one-line error naming the known."""
    reader = READERS.get(str(name))
    if reader is None:
        raise UserError(
            f"unknown caption reader {name!r} in data.source.readers; known readers: "
            f"{', '.join(sorted(READERS))} (one of your own is registered with "
            "@imcap.data.captions.register_reader, imported before the data is loaded)"
        )
    return reader


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# the built-in formats register themselves on import
from imcap.data.captions import coco, flickr_token, kaggle, karpathy, nocaps  # noqa: E402, F401
