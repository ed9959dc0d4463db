"""Hydra callbacks: a summary table of every trial when a multirun (sweep) ends."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
# imcap.eval.metrics (the columns, the default ranking) is imported where used: every task loads
# this callback, and the toolkit's import takes seconds that caption/serve do not need


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
        metrics_file = job / "metrics.json"
        if metrics_file.exists():
            m = json.loads(metrics_file.read_text())
            for split in ("val", "test"):
                for k in columns:
                    if k in m.get(split, {}):
                        row[f"{split}/{k}"] = round(100 * m[split][k], 2)
            row["seconds"] = m.get("total_seconds")
            row["status"] = "ok"
        else:
            row["status"] = "failed"
        rows.append(row)
    return rows


def swept_only(rows: list[dict[str, Any]]) -> None:
    """Keep in `overrides` only what differs between trials (the swept values)."""
    split = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    varying = {k for d in split for k in d if len({s.get(k) for s in split}) > 1}
    for r, d in zip(rows, split, strict=True):
        r["overrides"] = " ".join(f"{k}={v}" for k, v in d.items() if k in varying)


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], sort_key: str | None = None) -> Path:
    """summary.csv and summary.md, best first on `sort_key` (default: metrics.OBJECTIVE)."""
    if sort_key is None:
        from imcap.eval.metrics import OBJECTIVE

        sort_key = OBJECTIVE
    cols = [
        "job",
        "status",
        *sorted({k for r in rows for k in r if "/" in k}),
        "seconds",
        "overrides",
    ]
    ranked = sorted(rows, key=lambda r: -(r.get(sort_key) or float("-inf")))
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(ranked)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in ranked]
    md = sweep_dir / "summary.md"
    md.write_text(f"Scores x100, best {sort_key} first\n\n" + "\n".join(lines) + "\n")
    return md


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        if len(rows) > 1:
            swept_only(rows)
        if rows:
            md = write_summary(sweep_dir, rows, config.get("optimized_metric"))
            print(f"\nsweep summary ({len(rows)} trials): {md}\n{md.read_text()}")
