"""Choose the SCST learning rate by measurement: short self-critical runs from one
cross-entropy checkpoint, one per learning rate, each scored on the whole val split (greedy).

    python bench/scst_lr.py --ckpt <best CE .ckpt> [--lrs 5e-5,1e-4,2e-4] [--steps 60]
                            [--data-root ../shared/data/flickr8k] [overrides ...]
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

from flickr8k import compose_train  # noqa: E402

from imcap.pipeline.run import train  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--lrs", default="5e-5,1e-4,2e-4")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--experiment", default="best_scst_flickr8k")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "scst_lr"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for lr in args.lrs.split(","):
        started = time.perf_counter()
        cfg = compose_train(
            [
                f"experiment={args.experiment}",
                f"init_from={args.ckpt}",
                f"data.root={args.data_root}",
                f"model.optimizer.lr={lr}",
                "trainer.max_epochs=1",
                f"+trainer.limit_train_batches={args.steps}",
                "+trainer.enable_progress_bar=false",
                "metrics.meteor=false",
                f"paths.output_dir={out / f'lr{lr}'}",
                *args.overrides,
            ]
        )
        val = train(cfg)
        rows.append(
            {
                "lr": float(lr),
                "steps": args.steps,
                "val_CIDEr_greedy": val,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scst_lr.json").write_text(json.dumps({"ckpt": args.ckpt, "runs": rows}, indent=1))
    for r in rows:
        print(
            f"lr {r['lr']:.0e}: val CIDEr (greedy) {100 * r['val_CIDEr_greedy']:.2f} after {r['steps']} steps"
        )


if __name__ == "__main__":
    main()
