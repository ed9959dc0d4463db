"""Beam-search val scores of a checkpoint at several length penalties, as JSON (the rows of the
README's results tables for a checkpoint whose run was cut short or ran elsewhere).

python bench/score_val.py --ckpt <best .ckpt> [--data-root ../shared/data/flickr8k]
                          [--beam 3] [--length-penalties 0,1,2] [--out result.json] [overrides...]

Overrides compose the data and feature-cache settings the checkpoint trained with (e.g.
experiment=best_flickr8k decoder=aoa); the scores use the cached features like train.py's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("IMCAP_ROOT", str(ROOT))

from flickr8k import beam_scores, compose_train  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--length-penalties", default="0,1,2")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = compose_train([f"data.root={args.data_root}", *args.overrides])
    rows, started = {}, time.perf_counter()
    for a in (float(x) for x in args.length_penalties.split(",") if x.strip()):
        rows[str(a)] = beam_scores(args.ckpt, cfg, args.beam, a)
        print(
            f"beam {args.beam} lp {a}: "
            + "  ".join(f"{k} {100 * v:.2f}" for k, v in rows[str(a)].items() if k != "num_images")
        )
    result = {
        "checkpoint": args.ckpt,
        "beam_size": args.beam,
        "val_beam_by_length_penalty": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
