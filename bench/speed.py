"""make bench: speed of every hot path, in one process (JSON in bench/results/ + a table).

- decoder train step, ceiling: a bare PyTorch loop (same decoder, shapes, optimizer, gather
  from on-device cached features) -> captions/s
- the real Lightning training loop on cached features (CaptionDataModule two-step path) -> captions/s,
  and its ratio to the ceiling
- encoder feature extraction from JPEG files -> images/s
- beam-3 decoding -> captions/s
- COCO-toolkit metric evaluation -> seconds per 1,000 images (with and without METEOR)

    python bench/speed.py [--device cuda] [--precision bf16-mixed] [--compile] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("IMCAP_ROOT", str(ROOT))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from imcap.config import group_section, model_sections  # noqa: E402
from imcap.data.records import ImageRecord  # noqa: E402
from imcap.data.text import Vocab, tokenize  # noqa: E402
from imcap.errors import UserError  # noqa: E402
from imcap.model.decoding import beam_search  # noqa: E402
from imcap.model.encoder import Encoder, Features  # noqa: E402
from imcap.model.module import Captioner  # noqa: E402
from imcap.pipeline.datamodule import CaptionDataModule  # noqa: E402
from imcap.pipeline.features import CachedFeatures  # noqa: E402

# conf/encoder/efficientnet_lite0 as an untrained model at timm's input size
LITE0 = group_section("encoder", "efficientnet_lite0", pretrained=False, img_size=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fake_records(n_images: int, vocab_words: int, rng: random.Random) -> list[ImageRecord]:
    """Flickr-shaped captions: 5 per image, 8-16 words from a Zipf-ish vocabulary."""
    words = [f"w{i}" for i in range(vocab_words)]
    weights = [1 / (i + 1) for i in range(vocab_words)]
    recs = []
    for i in range(n_images):
        caps = [" ".join(rng.choices(words, weights, k=rng.randint(8, 16))) for _ in range(5)]
        recs.append(
            ImageRecord(
                f"img{i}",
                Path(f"/nonexistent/img{i}.jpg"),
                caps,
                "train" if i < n_images - 100 else "val",
            )
        )
    return recs


class CachedBench(CaptionDataModule):
    """The real two-step datamodule, its feature cache filled with random numbers."""

    def fill(
        self, records: list[ImageRecord], feature_dim: int, tmp: Path, regions: int = 0
    ) -> None:
        self.records = {
            "train": [r for r in records if r.split == "train"],
            "val": [r for r in records if r.split == "val"],
            "test": [],
        }
        n = len(records)
        pooled = np.memmap(tmp / "pooled.f16", dtype=np.float16, mode="w+", shape=(n, feature_dim))
        pooled[:] = np.random.default_rng(0).standard_normal((n, feature_dim)).astype(np.float16)
        grid = None
        if regions:  # spatial maps for attention decoders, as float16 like a real cache
            grid = np.memmap(
                tmp / "grid.f16", dtype=np.float16, mode="w+", shape=(n, regions, feature_dim)
            )
            for i in range(0, n, 256):
                grid[i : i + 256] = (
                    np.random.default_rng(i).standard_normal(grid[i : i + 256].shape) * 0.5
                ).astype(np.float16)
        self.cache = CachedFeatures(tmp, {"bad_rows": []}, pooled, grid)


def bench_training(args, device: torch.device, tmp: Path) -> dict:
    rng = random.Random(0)
    recs = fake_records(args.images, args.vocab, rng)
    topdown = args.decoder == "topdown"
    captions = (tokenize(c) for r in recs if r.split == "train" for c in r.captions)
    vocab = Vocab.build(captions, min_count=1, max_len=20)
    size = {"rnn": args.rnn, "embed_dim": args.hidden, "hidden_dim": args.hidden}
    if topdown:  # conf/decoder/topdown.yaml
        dec_cfg = group_section("decoder", "topdown", **size, attention_dim=args.hidden)
    else:
        dec_cfg = group_section("decoder", "lstm", **size)
    sections = model_sections(scheduler=None)
    model = Captioner(vocab.to_dict(), LITE0, dec_cfg, **sections)
    from flickr8k import compose_train  # the whole data section, as a run composes it
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(compose_train(["data=synthetic"]).data, resolve=True)
    data = {**base, "name": "bench", "root": str(tmp), "batch_size": args.batch_size}
    data["num_workers"] = 0
    dm = CachedBench.for_model(data, model, "two_step")
    dm.fill(recs, 1280, tmp, regions=args.regions if topdown else 0)
    dm.setup("fit")
    B, steps, warm = args.batch_size, args.steps, args.warmup

    # -- ceiling: bare PyTorch, same decoder, shapes, optimizer and on-device gather ----------
    dec = Captioner(vocab.to_dict(), LITE0, dec_cfg, **sections)
    dec = dec.decoder.to(device)
    if args.compile:
        dec.compile()
    opt = torch.optim.AdamW(dec.parameters(), lr=4e-4, foreach=True)  # as Captioner
    bank = dm.bank["pooled"].to(device).float()  # float32 on the device, whatever the cache stores
    grid_bank = dm.bank["grid"].to(device) if topdown else None
    tokens, rows, lengths = dm.train_tokens.to(device), dm.train_rows.to(device), dm.train_lengths
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    perm = torch.randperm(len(rows))
    t0 = None
    for i in range(steps + warm):
        if i == warm:
            sync(device)
            t0 = time.perf_counter()
        idx_cpu = perm[(i * B) % (len(perm) - B) :][:B]
        T = int(lengths[idx_cpu].max())
        idx = idx_cpu.to(device, non_blocking=True)
        tok = tokens[idx, :T]
        r = rows[idx]
        feats = Features(bank[r], grid_bank[r].float() if topdown else None)
        targets = tok[:, 1:]
        keep = targets != 0  # as Captioner.caption_loss: on a CPU, logits only at targets
        packed = device.type == "cpu"
        with amp:
            out = dec(feats, tok[:, :-1], keep=keep if packed else None)
            loss = F.cross_entropy(
                out.logits.reshape(-1, out.logits.size(-1)).float(),
                targets[keep] if packed else targets.reshape(-1),
                ignore_index=0,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 5.0)
        opt.step()
    sync(device)
    ceiling = steps * B / (time.perf_counter() - t0)

    # -- the real Lightning loop -----------------------------------------------------------------
    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # global_step, not batch_idx: batch_idx restarts every epoch
            if trainer.global_step == warm and not hasattr(self, "t0"):
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            sync(device)
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    if args.compile:
        model.decoder.compile()
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_steps=steps + warm,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=5.0,
        callbacks=[clock],
    )
    trainer.fit(model, datamodule=dm)
    loop = steps * B / clock.seconds
    return {
        "shapes": {
            "batch": B,
            "vocab": len(vocab),
            "hidden": args.hidden,
            "rnn": args.rnn,
            "decoder": args.decoder,
            "regions": args.regions if topdown else None,
            "feature_dim": 1280,
            "train_captions": len(rows),
        },
        "ceiling_captions_per_s": round(ceiling, 1),
        "loop_captions_per_s": round(loop, 1),
        "loop_over_ceiling": round(loop / ceiling, 3),
        "model": model.to(device).eval(),
    }


def bench_extraction(args, device: torch.device, tmp: Path) -> dict:
    """Encoder images/s from JPEG files on disk (decode + transform + forward), cold cache."""
    from imcap.data.synthetic import make_example, render
    from imcap.pipeline.features import ensure_features

    img_dir = tmp / "jpegs"
    img_dir.mkdir()
    paths = []
    for i in range(args.extract_images):
        scene, _ = make_example(0, "bench", i % 200, 224)
        p = img_dir / f"{i:05d}.jpg"
        render(scene, 224).save(p, quality=85)
        paths.append(p)
    enc = Encoder(**{**LITE0, "name": args.encoder})
    start = time.perf_counter()
    cache = ensure_features(
        enc,
        paths,
        tmp / "cache",
        "bench",
        batch_size=args.extract_batch,
        num_workers=args.workers,
        device=device,
        precision=args.extract_precision,
    )
    seconds = time.perf_counter() - start
    return {
        "images": len(paths),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(paths) / seconds, 1),
        "encoder": enc.name,
        "input": f"224 px JPEG -> {enc.data_config['input_size'][-1]} px",
        "precision": cache.manifest["precision"],
        "workers": args.workers,
        "rows": int(cache.pooled.shape[0]),
    }


@torch.no_grad()
def bench_beam(model: Captioner, device: torch.device, args) -> dict:
    v = model.vocab
    B, C = args.decode_batch, model.encoder.feature_dim
    grid = torch.randn(B, args.regions, C, device=device) if model.decoder.uses_grid else None
    feats = Features(torch.randn(B, C, device=device), grid)
    beam_search(model.decoder, feats, v.bos_id, v.eos_id, 20, 3)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.decode_rounds):
        beam_search(model.decoder, feats, v.bos_id, v.eos_id, 20, 3)
    sync(device)
    n = args.decode_rounds * args.decode_batch
    return {"beam": 3, "captions": n, "captions_per_s": round(n / (time.perf_counter() - start), 1)}


def bench_metrics(args) -> dict:
    from imcap.eval.metrics import CaptionScorer

    rng = random.Random(1)
    recs = fake_records(args.metric_images, 3000, rng)
    refs = {r.image_id: r.captions for r in recs}
    preds = {r.image_id: r.captions[0] for r in recs}
    out = {"images": len(refs)}
    java = shutil.which("java") is not None
    if java:
        try:
            CaptionScorer(java=True, meteor=False)(
                dict(list(preds.items())[:2]), dict(list(refs.items())[:2])
            )
        except UserError as e:  # e.g. pycocoevalcap installed without its jars
            out["java_error"] = str(e)[:200]
            java = False
    for meteor in (False, True):
        if meteor and not java:
            continue
        with CaptionScorer(java=java, meteor=meteor) as scorer:
            scorer(dict(list(preds.items())[:10]), dict(list(refs.items())[:10]))  # start the JVMs
            start = time.perf_counter()
            scorer(preds, refs)
            seconds = time.perf_counter() - start
        out["with_meteor" if meteor else "without_meteor"] = round(seconds * 1000 / len(refs), 2)
    out["unit"] = "seconds per 1,000 images (warm JVM)"
    out["java"] = java
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="32-true", help="32-true | bf16-mixed (GPU)")
    ap.add_argument("--compile", action="store_true", help="in-place decoder.compile()")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rnn", default="lstm")
    ap.add_argument("--decoder", default="showtell", choices=["showtell", "topdown"])
    ap.add_argument("--regions", type=int, default=81, help="topdown: grid regions (Lite2: 9x9)")
    ap.add_argument("--encoder", default="tf_efficientnet_lite0", help="extraction bench")
    ap.add_argument("--extract-precision", default="auto", help="auto | float32 | bfloat16")
    ap.add_argument(
        "--vocab", type=int, default=2600, help="distinct words (Flickr8k at min count 5: ~2,600)"
    )
    ap.add_argument("--images", type=int, default=6100)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--extract-images", type=int, default=200)
    ap.add_argument("--extract-batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--decode-batch", type=int, default=100)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--metric-images", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no timing value (tests)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the JSON name, e.g. topdown_bf16")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.steps, args.warmup, args.vocab, args.hidden = 200, 3, 1, 50, 32
        (
            args.extract_images,
            args.workers,
            args.decode_batch,
            args.decode_rounds,
            args.metric_images,
        ) = 8, 0, 4, 1, 20
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="imcap-bench-"))
    try:
        training = bench_training(args, device, tmp)
        model = training.pop("model")
        print("training:", json.dumps(training), flush=True)
        result = {
            "bench": "speed",
            "smoke": args.smoke,
            "machine": {
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or "cpu",
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": sys.version.split()[0],
            },
            "precision": args.precision,
            "compile": args.compile,
            "training": training,
            "extraction": bench_extraction(args, device, tmp),
            "beam_decoding": bench_beam(model, device, args),
            "metrics": bench_metrics(args),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else device.type
    if args.tag:
        tag = f"{tag}_{args.tag}"
    path = out / f"speed_{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    t, e, b, m = (
        result["training"],
        result["extraction"],
        result["beam_decoding"],
        result["metrics"],
    )
    print(
        f"\nspeed on {result['machine']['device']} ({args.precision}{', compiled' if args.compile else ''})"
    )
    print(
        f"  decoder train step, bare PyTorch ceiling : {t['ceiling_captions_per_s']:>9.1f} captions/s"
    )
    print(
        f"  Lightning loop on cached features        : {t['loop_captions_per_s']:>9.1f} captions/s  ({100 * t['loop_over_ceiling']:.0f}% of ceiling)"
    )
    print(
        f"  feature extraction from JPEG             : {e['images_per_s']:>9.1f} images/s ({e['encoder']})"
    )
    print(f"  beam-3 decoding                          : {b['captions_per_s']:>9.1f} captions/s")
    for k in ("without_meteor", "with_meteor"):
        if k in m:
            print(f"  COCO metrics {k.replace('_', ' '):15s}     : {m[k]:>9.2f} s per 1,000 images")
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
