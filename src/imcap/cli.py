"""Command-line entry points, one per task, each a Hydra app over conf/<task>.yaml.

    python src/train.py key=value ...      (the checkout's scripts)
    imcap-train key=value ...              (installed by pip: imcap-eval, imcap-caption, imcap-export,
                                            imcap-prepare, imcap-serve)
    python -m imcap train key=value ...

Heavy libraries (torch, Lightning, timm) are imported only once the task runs, so `--help` and a
misspelt key answer at once.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imcap.config import (
    CONF_DIR,
    preflight,
    resume_overrides,
    set_project_root,
    user_config_dirs,
    without_config_dirs,
)
from imcap.errors import UserError, cli_errors

TASKS = {  # command -> (config name, function of the composed config)
    "train": ("train", "imcap.pipeline.run:train"),
    "eval": ("eval", "imcap.pipeline.run:evaluate"),
    "caption": ("caption", "imcap.pipeline.run:caption"),
    "export": ("export", "imcap.pipeline.export:export"),
    "prepare": ("prepare", "imcap.pipeline.prepare:prepare"),
    "serve": ("serve", "imcap.serve.app:serve"),
}


def run_task(task: str) -> Any:
    """Check the command line, then hand it to Hydra, which composes and calls the task."""
    import hydra

    from imcap.pipeline.hydra_callbacks import FAILED_TRIALS, trial_guard

    config_name, target = TASKS[task]
    module, name = target.split(":")
    set_project_root()

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @cli_errors  # inside hydra.main: Hydra would otherwise print a UserError as a traceback
    @trial_guard  # a multirun's failing trial is recorded; the other trials go on
    def main(cfg: Any) -> Any:
        return getattr(importlib.import_module(module), name)(cfg)

    if task == "train" and not any(a.startswith("-") for a in without_config_dirs(sys.argv[1:])):
        continue_in_place()
    if launch_rank() != 0 and not any(a.startswith("hydra.output_subdir=") for a in sys.argv[1:]):
        sys.argv.append("hydra.output_subdir=null")  # rank 0 alone writes the run's .hydra/
    check_launcher(sys.argv[1:])
    preflight(config_name)  # a misspelt key: one line naming it and the valid ones
    result = main()
    if FAILED_TRIALS:  # a sweep that lost trials must not look like a success to a script
        jobs = ", ".join(
            f"{r['job']} ({r['overrides'] or 'no swept value'})" for r in FAILED_TRIALS
        )
        summary = Path(FAILED_TRIALS[0]["sweep_dir"]) / "summary.md"
        print(
            f"error: {len(FAILED_TRIALS)} trial(s) failed: {jobs}; see {summary}", file=sys.stderr
        )
        sys.exit(1)
    return result


SUBMITIT_LAUNCHERS = ("slurm", "local", "submitit_slurm", "submitit_local")


def check_launcher(argv: list[str]) -> None:
    """`hydra/launcher=slurm|local` without hydra-submitit-launcher installed: one line naming
    the extra to install (Hydra would say only that `submitit_slurm` is not found)."""
    import importlib.util

    chosen = [a.split("=", 1)[1] for a in argv if a.lstrip("+~").startswith("hydra/launcher=")]
    if not any(c in SUBMITIT_LAUNCHERS for c in chosen):
        return
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        print(
            f"error: hydra/launcher={chosen[-1]} needs hydra-submitit-launcher: "
            'pip install -e ".[cluster]" (or: pip install "imcap[cluster]")',
            file=sys.stderr,
        )
        sys.exit(2)


def launch_rank() -> int:
    """Global rank as torchrun (RANK) or a multi-task srun (SLURM_PROCID) set it; 0 otherwise.
    Known before Lightning starts, so only one process of a multi-node run writes `.hydra/`."""
    rank = os.environ.get("RANK", "")
    if rank.isdigit():
        return int(rank)
    procid = os.environ.get("SLURM_PROCID", "")
    if procid.isdigit() and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(procid)
    return 0


def continue_in_place() -> None:
    """`resume=<run dir>|auto`: rewrite the command line to continue that run in its own
    directory (its overrides, last.ckpt, output folder), keeping its previous Hydra config."""
    given = without_config_dirs(sys.argv[1:])
    try:
        argv = resume_overrides(given)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if argv == given:
        return
    argv += [f"--config-dir={d}" for d in user_config_dirs(sys.argv[1:])]
    run = Path(next(a for a in argv if a.startswith("resume=")).split("=", 1)[1])
    saved = run / ".hydra"
    if (
        saved.is_dir() and launch_rank() == 0
    ):  # Hydra rewrites config.yaml & co. in place: keep the previous ones
        n = 1 + len(list(saved.glob("before_resume_*")))
        keep = saved / f"before_resume_{n}"
        keep.mkdir()
        for f in saved.glob("*.yaml"):
            shutil.copy2(f, keep / f.name)
    print(f"resuming {run} from checkpoints/last.ckpt", file=sys.stderr)
    sys.argv[1:] = argv


def _entry(task: str) -> Callable[[], Any]:
    def entry() -> Any:
        return run_task(task)

    entry.__name__ = task
    entry.__doc__ = f"imcap-{task}: see conf/{TASKS[task][0]}.yaml"
    return entry


train, evaluate, caption, export, prepare, serve = (
    _entry(t) for t in ("train", "eval", "caption", "export", "prepare", "serve")
)


def models() -> None:
    """imcap models: the shipped models, their val scores, size and recipe."""
    from imcap.eval.metrics import metric_names
    from imcap.model import zoo

    entries = zoo.index()
    if not entries:
        print("this installation ships no model")
        return
    for name, e in entries.items():
        card = e.get("card") or {}
        s = card.get("val_scores") or {}
        scores = "  ".join(f"{k} {100 * s[k]:.1f}" for k in metric_names(headline=True) if k in s)
        default = "  (default)" if name == zoo.DEFAULT_MODEL else ""
        print(f"{name}{default}")
        print(f"  {card.get('summary', '')}")
        print(f"  {card.get('dataset', '')} val, beam 3 (x100): {scores}")
        print(f"  {e.get('bytes', 0) / 2**20:.1f} MB, sha256 {e.get('sha256', '')[:16]}...")
        print(f"  recipe: {card.get('recipe', '')}")
        print(f"  use: imcap-caption ckpt_path={name} images=<photo>")


def main() -> None:
    """python -m imcap <task> [key=value ...]  (also `imcap <task> ...`, `imcap models`)"""
    if len(sys.argv) >= 2 and sys.argv[1] == "models":
        models()
        return
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(
            f"usage: python -m imcap {{{','.join([*TASKS, 'models'])}}} [key=value ...] [--help]",
            file=sys.stderr,
        )
        sys.exit(2)
    task = sys.argv.pop(1)
    sys.argv[0] = f"imcap-{task}"
    run_task(task)
