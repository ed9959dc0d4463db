"""bench/val_curves.py: per-epoch greedy val CIDEr of runs, read from their CSV logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def csv_log(run: Path, rows: list[dict[str, str]]) -> Path:
    (run / "csv").mkdir(parents=True)
    keys = ["epoch", "step", "train/loss", "val/CIDEr"]
    lines = [",".join(keys)] + [",".join(r.get(k, "") for k in keys) for r in rows]
    (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def test_val_curves_reads_each_runs_val_rows_and_refuses_a_dir_without_them(tmp_path) -> None:
    a = csv_log(
        tmp_path / "a",
        [  # training rows (no val/CIDEr) interleave with the val rows
            {"epoch": "0", "step": "10", "train/loss": "2.5"},
            {"epoch": "0", "step": "20", "val/CIDEr": "0.5392"},
            {"epoch": "1", "step": "30", "train/loss": "2.1"},
            {"epoch": "1", "step": "40", "val/CIDEr": "0.5534"},
        ],
    )
    b = csv_log(tmp_path / "b", [{"epoch": "0", "step": "20", "val/CIDEr": "0.5656"}])
    out = tmp_path / "curves.json"
    cmd = [sys.executable, str(ROOT / "bench" / "val_curves.py"), "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--run", f"off={a}", "--run", f"on={b}", "--meta", "ckpt=x.ckpt"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["ckpt"] == "x.ckpt"
    assert result["runs"]["off"]["val_greedy_cider_by_epoch"] == {"0": 0.5392, "1": 0.5534}
    assert result["runs"]["on"]["val_greedy_cider_by_epoch"] == {"0": 0.5656}
    bad = subprocess.run(
        [*cmd, "--run", f"x={tmp_path / 'nothing'}"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "nothing" in bad.stderr and "metrics.csv" in bad.stderr
