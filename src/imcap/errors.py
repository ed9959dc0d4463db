"""User-facing errors: one clear line that names the file and the fix, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input or environment the user can fix. Entry points print it as one line and exit 2."""


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point so a UserError (even one Hydra wraps) prints as `error: ...`, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - unwrap to find a UserError anywhere in the chain
            err: BaseException | None = e
            while err is not None and not isinstance(err, UserError):
                err = err.__cause__ or err.__context__
            if err is None:
                raise
            msg = str(err)
            if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the message
                msg = msg.strip().splitlines()[-1].split("UserError: ", 1)[-1]
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper
