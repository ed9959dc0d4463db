"""Val scores of one checkpoint under several settings of one decoding option, scored the same way.

A decoding option (n-gram blocking, length penalty, beam size) changes no weight, so it can be
measured on a finished checkpoint: each value is `imcap-eval` end to end (raw images through the
checkpoint's encoder, beam search, COCO toolkit with Java), same images, same machine, same run.

python bench/decode_grid.py --ckpt best.ckpt --option model.no_repeat_ngram_size --values 0,3 \
    [--data-root ../shared/data/flickr8k] [--beam 3] [--out bench/results/ngram_block_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("IMCAP_ROOT", str(ROOT))

import torch  # noqa: E402
from flickr8k import KEYS, eval_scores  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True)
    ap.add_argument(
        "--option", required=True, help="an eval.py key, e.g. model.no_repeat_ngram_size"
    )
    ap.add_argument("--values", required=True, help="comma-separated values of --option")
    ap.add_argument("--data", default="flickr8k", help="the data= group; '' = the checkpoint's")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_grid_cpu.json"))
    ap.add_argument("overrides", nargs="*", help="more eval.py overrides")
    args = ap.parse_args()
    if not Path(args.ckpt).is_file():
        sys.exit(f"checkpoint not found: {args.ckpt} (give the .ckpt file of a trained run)")
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    if not values:
        sys.exit("--values: give at least one value, e.g. --values 0,3")
    torch.manual_seed(0)
    overrides = [f"split={args.split}", f"model.beam_size={args.beam}"]
    if args.data:
        overrides += [f"data={args.data}", f"data.root={args.data_root}"]
    overrides += args.overrides

    work = Path(tempfile.mkdtemp(prefix="decode_grid_"))
    runs = []
    for i, value in enumerate(values):
        scores, seconds = eval_scores(
            [args.ckpt], [*overrides, f"{args.option}={value}"], work / str(i)
        )
        scores = {k: float(v) for k, v in scores.items() if k in (*KEYS, "num_images")}
        runs.append({args.option: value, "scores": scores, "wall_seconds": round(seconds, 1)})
        print(
            f"{args.option}={value}: "
            + "  ".join(f"{k} {scores[k] * 100:.2f}" for k in KEYS if k in scores)
        )
    beam = (
        "" if args.option == "model.beam_size" else f", beam {args.beam}"
    )  # the grid's (last wins)
    result = {
        "bench": f"eval.py on {args.data or 'the checkpoints dataset'} {args.split}{beam}, "
        f"one checkpoint under each value of {args.option} (joint mode: raw images)",
        "checkpoint": args.ckpt,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "overrides": overrides,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
