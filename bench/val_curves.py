"""Greedy val CIDEr by epoch of several training runs (their CSV logs), side by side as JSON:
the record of runs compared epoch by epoch, stopped ones included (bench/recipe.py writes the
scores of the runs it finishes).

python bench/val_curves.py --run baseline=<stage dir> --run variant=<stage dir> [--meta k=v]
    --out bench/results/<name>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flickr8k import val_history  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", action="append", required=True, help="label=<run dir with csv/>")
    ap.add_argument("--meta", action="append", default=[], help="key=value recorded as given")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep or not label:
            ap.error(f"--run takes label=<run dir>, got {spec!r}")
        curve = val_history(Path(path))
        if not curve:
            ap.error(f"{path}: no csv/metrics.csv with val/CIDEr (a run's stage directory?)")
        runs[label] = {"dir": path, "val_greedy_cider_by_epoch": curve}
    meta = dict(m.partition("=")[::2] for m in args.meta)
    result = {"metric": "val/CIDEr (greedy, x1)", **meta, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for label, r in runs.items():
        print(label, [round(100 * v, 2) for v in r["val_greedy_cider_by_epoch"].values()])
    return result


if __name__ == "__main__":
    main()
