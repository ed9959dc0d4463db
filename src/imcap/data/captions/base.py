"""What every caption reader shares: the one shape it returns (`Captions`), what it knows of the
dataset it reads (`Context`: data.root and data.source), and the checks that turn a bad
annotation file into one line naming the file and the fix."""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from imcap.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger("imcap.data.captions")

_STRAY_ID = re.compile(r"^(.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)  # 2258277193_586949ec62.jpg.1
_GLOB = re.compile(r"[*?\[]")


@dataclass
class Captions:
    """A reader's result, the one shape split assembly consumes."""

    path: Path  # the annotation file (the first, when a format has several), named in messages
    format: str  # what was read, for the log line ("kaggle", "coco 2014")
    captions: dict[str, list[str]]  # image id -> raw captions (stripped, none empty); an image
    # of a split without public captions (nocaps test) has an empty list
    images: dict[str, tuple[str, ...]] = field(default_factory=dict)  # image id -> its file
    # relative to an image folder, later ones fallbacks (COCO 2017 folders name the Karpathy
    # 2014 images by id); an id not here is its own file name (Flickr)
    splits: dict[str, dict[str, str]] = field(default_factory=dict)  # split source -> image id
    # -> split, as the file itself records it ("official": COCO's train/val files; "karpathy":
    # Karpathy's train/val/test/restval, restval folded later by data.source.restval)
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)  # image id -> what the
    # file says of it besides captions ({"domain": "in-domain", "id": "17"}: ImageRecord.attributes)


class DirIndex:
    """Membership tests for image files: one listdir per folder instead of a stat per image."""

    def __init__(self) -> None:
        self._dirs: dict[str, set[str]] = {}

    def names(self, folder: str | Path) -> set[str]:
        folder = str(folder)
        if folder not in self._dirs:
            try:
                self._dirs[folder] = set(os.listdir(folder))
            except OSError:
                self._dirs[folder] = set()
        return self._dirs[folder]

    def exists(self, path: str | Path) -> bool:
        folder, name = os.path.split(path)  # str ops: 10x cheaper than Path.parent / .name
        return name in self.names(folder)


@dataclass
class Context:
    """What a reader knows of the dataset it reads: its root, its data.source options (the
    composed config's, checked by `imcap.data.datasets`) and where its images are."""

    name: str  # the dataset (data.name), for messages naming its config
    root: Path
    options: Mapping[str, Any]
    readers: dict[str, tuple[Reader, list[str] | None]] = field(default_factory=dict)
    index: DirIndex = field(default_factory=DirIndex)

    def option(self, key: str) -> Any:
        """data.source.<key>; not set is a one-line error (the config names every key)."""
        if key not in self.options:
            raise UserError(
                f"data.source.{key} is not set for {self.name}; fix: set it (conf/data/"
                f"{self.name}.yaml documents every key), or pass data={self.name}"
            )
        return self.options[key]

    @property
    def title(self) -> str:
        return str(self.option("title"))

    @property
    def fix(self) -> str:
        return str(self.option("fix"))

    def resolve(self, rel: str | os.PathLike[str] | None) -> Path | None:
        """`rel` under root (or absolute); None when not configured."""
        if rel is None or str(rel) == "":
            return None
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.root / p

    def glob(self, pattern: str) -> Iterator[Path]:
        """Files matching a candidate name under root: the name itself, or its glob matches."""
        if not _GLOB.search(pattern):
            p = self.resolve(pattern)
            if p is not None and p.is_file():
                yield p
            return
        p = Path(pattern).expanduser()
        full = str(p) if p.is_absolute() else os.path.join(glob.escape(str(self.root)), pattern)
        yield from (Path(m) for m in sorted(glob.glob(full)) if os.path.isfile(m))

    @functools.cached_property
    def image_bases(self) -> list[Path]:
        """The image folders that exist: data.source.image_dir, else those of image_dirs."""
        forced = self.resolve(self.options.get("image_dir"))
        if forced is not None:
            return [forced] if forced.is_dir() else []
        return [self.root / d for d in self.option("image_dirs") if (self.root / d).is_dir()]

    def image_folder(self, rel: str) -> Path | None:
        """The first image folder holding the folder `rel` (COCO's train2014/ ...), or None."""
        return next((b / rel for b in self.image_bases if (b / rel).is_dir()), None)


class Reader:
    """A caption format: what it looks for under data.root and how it parses it. Subclass, set
    the class attributes, implement `read`, and register it with
    `@imcap.data.captions.register_reader("<name>")`; a dataset's config names it in
    data.source.readers."""

    name: ClassVar[str] = ""  # set by register_reader
    describe: ClassVar[str] = ""  # one line: what the format looks like (for error messages)
    files: ClassVar[tuple[str, ...]] = ()  # the files it reads when the config lists none
    options: ClassVar[tuple[str, ...]] = ()  # the data.source keys it reads (others are refused)

    def candidates(self, ctx: Context, files: Sequence[str] | None) -> list[str]:
        """The files to look for under root, in order: the config's list, else the reader's."""
        return [str(f) for f in (files or self.files)]

    def find(self, ctx: Context, files: Sequence[str] | None) -> list[Path]:
        """The annotation files to read (empty: this format is not there): the first candidate
        that exists (a candidate may be a glob pattern)."""
        for rel in self.candidates(ctx, files):
            found = next(ctx.glob(rel), None)
            if found is not None:
                return [found]
        return []

    def sniff(self, path: Path, first_line: str) -> bool:
        """Whether a file given as data.source.captions_file is in this format."""
        return False

    def year(self, ctx: Context, files: Sequence[str] | None) -> str | None:
        """The release year of the files found (a dataset whose archives differ by year)."""
        return None

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        raise NotImplementedError


# -- parsing helpers -------------------------------------------------------------------------------
@dataclass
class Parsed:
    """Captions as a parser collects them, with what it had to skip (reported by `check`)."""

    captions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    bad_lines: list[int] = field(default_factory=list)
    empty: int = 0

    def add(self, image: str, caption: str) -> None:
        caption = caption.strip()
        if caption:
            self.captions[image].append(caption)
        else:
            self.empty += 1

    def check(self, path: Path, ctx: Context, expected: str) -> dict[str, list[str]]:
        """Refuse a file with no usable caption; warn about skipped lines and empty captions."""
        if not self.captions:
            what = "is empty" if not self.bad_lines and not self.empty else "has no valid line"
            raise UserError(
                f"caption file {path} {what} (expected {expected}); "
                f"fix: re-download it ({ctx.fix}) or point data.root at a complete copy"
            )
        if self.bad_lines:
            first = ", ".join(map(str, self.bad_lines[:5]))
            log.warning(
                "%s: skipped %d malformed line(s) (lines %s%s; expected %s)",
                path,
                len(self.bad_lines),
                first,
                ", ..." if len(self.bad_lines) > 5 else "",
                expected,
            )
        if self.empty:
            log.warning("%s: dropped %d empty caption(s)", path, self.empty)
        return dict(self.captions)


def read_text(path: Path, ctx: Context) -> str:
    """A caption file as text; not UTF-8 or unreadable is one line naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
            f"fix: re-download it ({ctx.fix})"
        ) from e
    except OSError as e:
        raise UserError(f"cannot read caption file {path}: {e.strerror}") from e


def image_key(raw: str) -> str:
    """Image file name from a caption file's id column, mapping the release's stray `x.jpg.1`."""
    key = raw.strip()
    m = _STRAY_ID.match(key)
    return m.group(1) if m else key
