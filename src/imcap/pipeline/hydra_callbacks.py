"""Hydra callbacks and the multirun guard: a sweep's trials, failed ones included, end in one
summary table (summary.md/.csv); the launching process's exit code says whether any failed."""

from __future__ import annotations

import csv
import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
# imcap.eval.metrics (the columns, the default ranking) is imported where used: every task loads
# this callback, and the toolkit's import takes seconds that caption/serve do not need

FAILED = "failed.json"  # in a failed trial's run dir: its overrides and the error
NO_RESULT = (
    "no metrics file and no failed.json: the trial was stopped (time limit, out of memory?); "
    "see its log"
)
# the failed trials of the last multirun of this process (SweepSummary fills it; imcap.cli exits 1)
FAILED_TRIALS: list[dict[str, Any]] = []


@dataclass(frozen=True)
class TrialFailure:
    """What a failing trial returns in a multirun instead of raising: Hydra's basic sweeper
    re-raises a trial's exception after its batch, which drops the later batches and the
    summary. Returned values travel back to the sweeper (pickled, under submitit), so the
    Optuna sweeper can mark the trial FAIL with this message."""

    overrides: tuple[str, ...]
    error: str


def error_line(err: BaseException) -> str:
    """One line for a table: a UserError anywhere in the chain (its message names the fix),
    else the exception's type and first line."""
    from imcap.errors import UserError

    e: BaseException | None = err
    while e is not None:
        if isinstance(e, UserError):
            msg = str(e).strip()
            if "Original Traceback" in msg:  # re-raised from a DataLoader worker: its last line
                msg = msg.splitlines()[-1].split("UserError: ", 1)[-1]
            return " ".join(msg.split())
        e = e.__cause__ or e.__context__
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:500]


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def trial_guard(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a task function: in a multirun, an exception becomes `failed.json` in the trial's
    run dir, the traceback goes to its log, and the trial returns a TrialFailure so the other
    trials run and the summary is written. A single run raises as before."""

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> Any:
        if not in_multirun():
            return task(cfg)
        from hydra.core.hydra_config import HydraConfig

        # a trial run again in its own dir (resume=) is judged by this run, not the last one
        (Path(HydraConfig.get().runtime.output_dir) / FAILED).unlink(missing_ok=True)
        try:
            return task(cfg)
        except Exception as e:  # noqa: BLE001 - one trial's error must not end the sweep
            return record_failure(e)

    return guarded


def record_failure(err: BaseException) -> TrialFailure:
    """Log the trial's error with its traceback and write it to `<run dir>/failed.json`."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    overrides = tuple(str(o) for o in hc.overrides.task)
    failure = TrialFailure(overrides, error_line(err))
    log.error(
        "trial %s failed (%s): %s; run dir %s",
        hc.job.num,
        " ".join(overrides),
        failure.error,
        hc.runtime.output_dir,
        exc_info=err,
    )
    record = {
        "job": str(hc.job.num),
        "overrides": list(overrides),
        "error": failure.error,
        "traceback": "".join(traceback.format_exception(err)),
    }
    (Path(hc.runtime.output_dir) / FAILED).write_text(json.dumps(record, indent=1))
    return failure


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: its overrides, headline val/test scores, or why it has none."""
    from imcap.eval.metrics import metric_names

    columns = metric_names(headline=True)
    rows = []
    jobs = [
        p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").exists()
    ]
    for job in sorted(jobs, key=lambda p: int(p.name) if p.name.isdigit() else p.name):
        overrides = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(str(o) for o in overrides)}
        metrics_file, failed_file = job / "metrics.json", job / FAILED
        evaluated = sorted(job.glob("metrics_*.json"))  # eval.py: metrics_<split>.json
        if failed_file.exists():
            row["status"] = "failed"
            row["error"] = json.loads(failed_file.read_text()).get("error", "")
        elif metrics_file.exists():
            m = json.loads(metrics_file.read_text())
            for split in ("val", "test"):
                for k in columns:
                    if k in m.get(split, {}):
                        row[f"{split}/{k}"] = round(100 * m[split][k], 2)
            row["seconds"] = m.get("total_seconds")
            row["status"] = "ok"
        elif evaluated:
            for f in evaluated:
                m = json.loads(f.read_text())
                split = m.get("split") or f.stem.removeprefix("metrics_")
                for k in columns:
                    if k in m.get("scores", {}):
                        row[f"{split}/{k}"] = round(100 * m["scores"][k], 2)
            row["status"] = "ok"
        elif task_of(job) in ("caption", "export", "prepare", "serve"):  # no scores to collect
            row["status"] = "ok"
        else:
            row["status"] = "failed"
            row["error"] = NO_RESULT
        rows.append(row)
    return rows


def task_of(job: Path) -> str | None:
    """The config a trial ran (`train`, `eval`, ...), from its `.hydra/hydra.yaml`."""
    try:
        return str(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.config_name)
    except Exception:  # noqa: BLE001 - an unreadable file: treated as a training trial
        return None


def swept_only(rows: list[dict[str, Any]]) -> None:
    """Keep in `overrides` only what differs between trials (the swept values)."""
    split = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    varying = {k for d in split for k in d if len({s.get(k) for s in split}) > 1}
    for r, d in zip(rows, split, strict=True):
        r["overrides"] = " ".join(f"{k}={v}" for k, v in d.items() if k in varying)


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], sort_key: str | None = None) -> Path:
    """summary.csv and summary.md, best first on `sort_key` (default: metrics.OBJECTIVE);
    failed trials last, with their error."""
    if sort_key is None:
        from imcap.eval.metrics import OBJECTIVE

        sort_key = OBJECTIVE
    cols = [
        "job",
        "status",
        *sorted({k for r in rows for k in r if "/" in k}),
        "seconds",
        "overrides",
        *(["error"] if any("error" in r for r in rows) else []),
    ]
    ranked = sorted(rows, key=lambda r: -(r.get(sort_key) or float("-inf")))
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(ranked)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cell = lambda v: str(v).replace("|", "/")  # noqa: E731 - an error's `|` would split its cell
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in ranked]
    md = sweep_dir / "summary.md"
    md.write_text(f"Scores x100, best {sort_key} first\n\n" + "\n".join(lines) + "\n")
    return md


def summarize(sweep_dir: Path, sort_key: str | None = None) -> list[dict[str, Any]]:
    """Write the summary of a sweep folder; returns its rows (also after a launcher crash:
    `python -m imcap.pipeline.hydra_callbacks <sweep dir>`)."""
    rows = collect(sweep_dir)
    if len(rows) > 1:
        swept_only(rows)
    if rows:
        md = write_summary(sweep_dir, rows, sort_key)
        print(f"\nsweep summary ({len(rows)} trials): {md}\n{md.read_text()}")
    return rows


class SweepSummary(Callback):
    """At the end of a multirun (in the launching process, whatever the launcher): the table
    of every trial, read from the trials' run dirs (shared with submitit's jobs), and one
    line per failed trial naming its overrides and error."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        FAILED_TRIALS.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize(sweep_dir, config.get("optimized_metric"))
        failed = [r for r in rows if r["status"] != "ok"]
        for r in failed:
            log.error(
                "trial %s failed (%s): %s; run dir: %s",
                r["job"],
                r["overrides"] or "no swept value",
                r.get("error", ""),
                sweep_dir / r["job"],
            )
        FAILED_TRIALS[:] = [{**r, "sweep_dir": str(sweep_dir)} for r in failed]


def main(argv: list[str]) -> int:
    """`python -m imcap.pipeline.hydra_callbacks <sweep dir>`: the summary of a sweep whose
    launching process did not write it (it was stopped, or a launcher gave up on a killed job);
    exit 1 when a trial failed, like the sweep itself."""
    if len(argv) != 1 or not (Path(argv[0]) / "multirun.yaml").is_file():
        print(
            "usage: python -m imcap.pipeline.hydra_callbacks <sweep dir> "
            "(the folder holding multirun.yaml, e.g. outputs/train/multiruns/<date>)",
            file=sys.stderr,
        )
        return 2
    sweep_dir = Path(argv[0])
    objective = OmegaConf.load(sweep_dir / "multirun.yaml").get("optimized_metric")
    rows = summarize(sweep_dir, objective)
    failed = [r["job"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"error: {len(failed)} trial(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
