"""Val scores of an ensemble against each of its members alone, scored the same way in one run.

An ensemble only pays when its members are comparably good (README, Ensembles), so every member is
scored again here beside the ensemble: same images, same decoding, same machine, same session.
Each score is `imcap-eval` end to end (raw images through each checkpoint's encoder, beam search,
COCO toolkit with Java); wall times include reading the images.

python bench/ensemble.py --ckpt a.ckpt --ckpt b.ckpt [--ckpt c.ckpt] \
    [--data-root ../shared/data/flickr8k] [--beam 3] [--length-penalty 2.0] \
    [--skip-members] [--out bench/results/ensemble_seeds_cpu.json]
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
    ap.add_argument("--ckpt", action="append", required=True, help="a member (give 2 or more)")
    ap.add_argument("--data", default="flickr8k", help="the data= group; '' = the checkpoint's")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument(
        "--length-penalty", type=float, default=None, help="default: the first member's"
    )
    ap.add_argument("--skip-members", action="store_true", help="score the ensemble only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ensemble_seeds_cpu.json"))
    ap.add_argument(
        "overrides", nargs="*", help="more eval.py overrides, e.g. metrics.meteor=false"
    )
    args = ap.parse_args()
    if len(args.ckpt) < 2:
        sys.exit("an ensemble needs at least two --ckpt")
    missing = [c for c in args.ckpt if not Path(c).is_file()]
    if missing:
        sys.exit(
            f"checkpoint not found: {', '.join(missing)} (give the .ckpt files of trained runs)"
        )
    torch.manual_seed(0)
    overrides = [f"split={args.split}", f"model.beam_size={args.beam}"]
    if args.data:
        overrides += [f"data={args.data}", f"data.root={args.data_root}"]
    if args.length_penalty is not None:
        overrides.append(f"model.length_penalty={args.length_penalty}")
    overrides += args.overrides

    work = Path(tempfile.mkdtemp(prefix="ensemble_"))
    runs = []
    members = [] if args.skip_members else [[c] for c in args.ckpt]
    for i, ckpts in enumerate([*members, args.ckpt]):
        scores, seconds = eval_scores(ckpts, overrides, work / str(i))
        scores = {k: float(v) for k, v in scores.items() if k in (*KEYS, "num_images")}
        runs.append(
            {
                "what": "member alone" if len(ckpts) == 1 else f"ensemble of {len(ckpts)}",
                "checkpoint": ckpts[0] if len(ckpts) == 1 else ckpts,
                "scores": scores,
                "wall_seconds": round(seconds, 1),
            }
        )
        print(
            f"{runs[-1]['what']:>16}: "
            + "  ".join(f"{k} {scores[k] * 100:.2f}" for k in KEYS if k in scores)
        )
    lp = (
        "as saved in the (first) checkpoint" if args.length_penalty is None else args.length_penalty
    )
    alone = [r["scores"]["CIDEr"] for r in runs if r["what"] == "member alone"]
    result = {
        "bench": f"eval.py on {args.data or 'the checkpoints dataset'} {args.split}, "
        f"beam {args.beam}, length penalty {lp}, joint mode (raw images through each checkpoint's encoder)",
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "overrides": overrides,
        "runs": runs,
    }
    if alone:
        result["cider_gain_over_best_member_x100"] = round(
            (runs[-1]["scores"]["CIDEr"] - max(alone)) * 100, 2
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
