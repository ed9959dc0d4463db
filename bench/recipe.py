"""make recipe: the whole best Flickr8k recipe end to end, with wall times (JSON + table).

1. experiment=best_flickr8k       feature extraction (cold or warm cache) + cross-entropy
2. experiment=best_scst_flickr8k  self-critical stage from the best cross-entropy checkpoint
3. beam-3 val scores of both checkpoints (COCO toolkit, Java), length penalties re-scored

python bench/recipe.py [--data-root ../shared/data/flickr8k] [--out outputs/recipe]
                       [--ce-ckpt <skip stage 1>] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("IMCAP_ROOT", str(ROOT))

import torch  # noqa: E402
from flickr8k import KEYS, beam_scores, compose_train, run  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "recipe"))
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument(
        "--length-penalties", default="0.5,1,1.5,2", help="extra GNMT alphas to re-score"
    )
    ap.add_argument("--ce-ckpt", default=None, help="skip stage 1: start SCST from this checkpoint")
    ap.add_argument("--smoke", action="store_true", help="a few images, one epoch per stage")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both stages")
    args = ap.parse_args()
    out = Path(args.out)
    common = [f"data.root={args.data_root}", "+trainer.enable_progress_bar=false", *args.overrides]
    if args.smoke:
        common += [
            "data.max_train_images=64",
            "data.max_eval_images=32",
            "trainer.max_epochs=1",
            "data.num_workers=0",
            "metrics.meteor=false",
            "decoder.attributes=16",  # 64 images' captions hold ~90 content words, not 1,000
        ]
    alphas = tuple(float(a) for a in args.length_penalties.split(",") if a.strip())
    started = time.perf_counter()
    rows = []
    ce_ckpt = args.ce_ckpt
    if ce_ckpt is None:  # bench/flickr8k.py's run: train, then greedy/beam/length-penalty scores
        rows.append(run("ce", ["experiment=best_flickr8k", *common], out, args.beam, alphas))
        ce_ckpt = rows[-1]["best_checkpoint"]
    else:  # stage 1 ran elsewhere: score its checkpoint the same way
        cfg = compose_train(["experiment=best_flickr8k", *common])
        rows.append(
            {
                "name": "ce",
                "best_checkpoint": ce_ckpt,
                "wall_seconds": 0.0,
                "val_greedy": beam_scores(ce_ckpt, cfg, 1),
                "val_beam": beam_scores(ce_ckpt, cfg, args.beam),
                "val_beam_by_length_penalty": {
                    str(a): beam_scores(ce_ckpt, cfg, args.beam, a) for a in alphas
                },
            }
        )
    scst = ["experiment=best_scst_flickr8k", f"init_from={ce_ckpt}", *common]
    rows.append(run("scst", scst, out, args.beam, alphas))
    result = {
        "recipe": "best_flickr8k + best_scst_flickr8k",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "data_root": args.data_root,
        "smoke": args.smoke,
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "stages": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"\nJSON: {out / 'recipe.json'}")


def print_table(result: dict) -> None:
    print(f"\nFlickr8k val (x100), {result['machine']['cpus']} CPUs / {result['machine']['cuda']}")
    print(f"{'stage':6s} {'decode':12s} " + " ".join(f"{k:>7s}" for k in KEYS) + "   wall s")
    for r in result["stages"]:
        lines = [("greedy", r["val_greedy"]), ("beam", r["val_beam"])]
        lines += [(f"beam lp{a}", s) for a, s in r["val_beam_by_length_penalty"].items()]
        for label, s in lines:
            vals = " ".join(f"{100 * s[k]:7.2f}" if k in s else f"{'-':>7s}" for k in KEYS)
            print(f"{r['name']:6s} {label:12s} {vals}   {r['wall_seconds']:.0f}")
    print(f"total wall time (both stages + beam scoring): {result['total_wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
