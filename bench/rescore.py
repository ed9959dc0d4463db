"""Re-score caption files with the Java COCO toolkit (e.g. those bench/gpu.sh brought back).

    python bench/rescore.py DIR [DIR ...]   -> a table, and DIR/rescored.json

Every `captions_*.json` below DIR (rows of image_id, caption, references, as eval.py and
train.py write them) is scored by imcap.eval.metrics.CaptionScorer with Java's PTB tokenizer and
METEOR: exactly the numbers train.py/eval.py report on a machine with Java.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from imcap.eval.metrics import CaptionScorer

KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def main() -> None:
    results = {}
    with CaptionScorer(java=True, meteor=True) as scorer:
        for d in map(Path, sys.argv[1:]):
            for f in sorted(d.rglob("captions_*.json")):
                rows = json.loads(f.read_text())
                preds = {r["image_id"]: r["caption"] for r in rows}
                refs = {r["image_id"]: r["references"] for r in rows}
                results[str(f.relative_to(d))] = {**scorer(preds, refs), "num_images": len(rows)}
            (d / "rescored.json").write_text(json.dumps(results, indent=1))
    print(f"{'file':45s} " + " ".join(f"{k:>7s}" for k in KEYS))
    for name, s in results.items():
        print(f"{name:45s} " + " ".join(f"{100 * s[k]:7.2f}" for k in KEYS))


if __name__ == "__main__":
    main()
