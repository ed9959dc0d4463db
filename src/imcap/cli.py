"""Command-line entry points, one per task, each a Hydra app over conf/<task>.yaml.

    python src/train.py key=value ...      (the checkout's scripts)
    imcap-train key=value ...              (installed by pip: imcap-eval, imcap-caption, imcap-prepare, imcap-serve)
    python -m imcap train key=value ...

Heavy libraries (torch, Lightning, timm) are imported only once the task runs, so `--help` and a
misspelt key answer at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from imcap.config import CONF_DIR, preflight, set_project_root
from imcap.errors import cli_errors

TASKS = {  # command -> (config name, function of the composed config)
    "train": ("train", "imcap.pipeline.run:train"),
    "eval": ("eval", "imcap.pipeline.run:evaluate"),
    "caption": ("caption", "imcap.pipeline.run:caption"),
    "prepare": ("prepare", "imcap.pipeline.prepare:prepare"),
    "serve": ("serve", "imcap.serve.app:serve"),
}


def run_task(task: str) -> Any:
    """Check the command line, then hand it to Hydra, which composes and calls the task."""
    import hydra

    config_name, target = TASKS[task]
    module, name = target.split(":")
    set_project_root()

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @cli_errors  # inside hydra.main: Hydra would otherwise print a UserError as a traceback
    def main(cfg: Any) -> Any:
        return getattr(importlib.import_module(module), name)(cfg)

    preflight(config_name)  # a misspelt key: one line naming it and the valid ones
    return main()


def _entry(task: str) -> Callable[[], Any]:
    def entry() -> Any:
        return run_task(task)

    entry.__name__ = task
    entry.__doc__ = f"imcap-{task}: see conf/{TASKS[task][0]}.yaml"
    return entry


train, evaluate, caption, prepare, serve = (
    _entry(t) for t in ("train", "eval", "caption", "prepare", "serve")
)


def main() -> None:
    """python -m imcap <task> [key=value ...]"""
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(
            f"usage: python -m imcap {{{','.join(TASKS)}}} [key=value ...] [--help]",
            file=sys.stderr,
        )
        sys.exit(2)
    task = sys.argv.pop(1)
    sys.argv[0] = f"imcap-{task}"
    run_task(task)
