"""Out of domain, measured: a Flickr8k model on real COCO photos (the nocaps question, here).

nocaps asks how a captioner does on images outside its training domain. Its files cannot be
downloaded here, so this measures the same drop with what is on disk: the shipped Flickr8k
model (or any checkpoint) on Flickr8k val (in domain) and on the real MS-COCO images of
`coco_mini` (out of Flickr8k's domain: kitchens, streets, vehicles, food, animals other than dogs;
original resolution and aspect, not Flickr8k's 224x224 re-encodes).

CIDEr depends on the corpus (its IDF weights come from the references of the images scored), so
the in-domain reference point is also scored on random Flickr8k val subsets of the COCO set's
size: the drop is read against those, not only against the 1,000-image figure.

python bench/ood.py [--ckpt flickr8k-topdown-lite2] [--flickr8k ../shared/data/flickr8k]
                    [--coco ../shared/data/coco_mini] [--out bench/results/ood_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("IMCAP_ROOT", str(ROOT))


def records(name: str, root: str, splits: tuple[str, ...]) -> list:
    from imcap.config import data_section
    from imcap.pipeline.datamodule import CaptionDataModule

    dm = CaptionDataModule.from_config(data_section(name, [f"data.root={root}"]))
    recs = dm.load_records()
    return [r for s in splits for r in recs.get(s, [])]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", default="flickr8k-topdown-lite2")
    ap.add_argument("--flickr8k", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--coco", default=str(ROOT.parent / "shared" / "data" / "coco_mini"))
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--draws", type=int, default=50, help="random Flickr8k subsets")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ood_cpu.json"))
    args = ap.parse_args()

    import torch

    from imcap.eval.metrics import CaptionScorer
    from imcap.model.module import Captioner

    torch.manual_seed(0)
    model = Captioner.load_from_checkpoint(args.ckpt).eval()
    sets = {
        "flickr8k_val": records("flickr8k", args.flickr8k, ("val",)),
        "coco_mini": records("coco", args.coco, ("train", "val")),  # all 159 captioned photos
    }
    preds, refs, seconds = {}, {}, {}
    for name, recs in sets.items():
        t0 = time.perf_counter()
        caps = model.caption_files([r.path for r in recs], beam_size=args.beam)
        seconds[name] = round(time.perf_counter() - t0, 1)
        preds[name] = {r.image_id: c for r, c in zip(recs, caps, strict=True)}
        refs[name] = {r.image_id: list(r.captions) for r in recs}

    result: dict = {
        "what": "bench/ood.py: in-domain (Flickr8k val) vs out-of-domain (COCO photos) scores",
        "checkpoint": args.ckpt,
        "beam_size": args.beam,
        "length_penalty": float(model.decoding.get("length_penalty", 0.0)),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "caption_seconds": seconds,
        "scores": {},
    }
    with CaptionScorer(java=True, meteor=True) as scorer:
        for name in sets:
            s = scorer(preds[name], refs[name])
            result["scores"][name] = {"images": len(preds[name])} | {
                k: round(v, 4) for k, v in s.items()
            }
    # in-domain corpora of the out-of-domain set's size (METEOR left out: a JVM per draw)
    n, ids, rng = len(sets["coco_mini"]), sorted(preds["flickr8k_val"]), random.Random(0)
    quick, draws = CaptionScorer(java=True, meteor=False), []
    for _ in range(args.draws):
        pick = rng.sample(ids, n)
        draws.append(
            quick(
                {i: preds["flickr8k_val"][i] for i in pick},
                {i: refs["flickr8k_val"][i] for i in pick},
            )
        )
    sub: dict = {"images": n, "draws": args.draws}
    for key in ("BLEU-4", "ROUGE-L", "CIDEr"):
        vals = [d[key] for d in draws]
        sub[key], sub[f"{key}_sd"] = (
            round(statistics.mean(vals), 4),
            round(statistics.stdev(vals), 4),
        )
    result["scores"][f"flickr8k_val_{n}_image_subsets"] = sub
    ood = result["scores"]["coco_mini"]
    result["drop_CIDEr_vs_same_size_subsets"] = round(sub["CIDEr"] - ood["CIDEr"], 4)
    result["examples"] = [
        {"image": k, "caption": preds["coco_mini"][k], "reference": refs["coco_mini"][k][0]}
        for k in sorted(preds["coco_mini"])[:12]
    ]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["scores"], indent=1))


if __name__ == "__main__":
    main()
