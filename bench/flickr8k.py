"""make bench-data: Flickr8k two-step benchmark on this machine (JSON + printed table).

Runs, in one process:
  1. Show and Tell (LSTM 512) two-step: feature extraction (cold cache) + training + val scores
     with greedy and beam-3 decoding: the whole run is timed.
  2. The same with a GRU (the feature cache is reused: a cache hit).
  3. Joint mode: seconds per epoch with images through the frozen encoder, measured on a
     slice of an epoch and extrapolated.

    python bench/flickr8k.py [--data-root ../shared/data/flickr8k] [--epochs N] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("IMCAP_ROOT", str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from imcap.model.checkpoint import load_captioner  # noqa: E402
from imcap.pipeline.datamodule import CaptionDataModule  # noqa: E402
from imcap.pipeline.run import evaluate, plain, train  # noqa: E402

KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def eval_scores(ckpts: list[str], overrides: list[str], out: Path) -> tuple[dict, float]:
    """(scores, seconds) of `imcap-eval ckpt_path=<one or [several]> <overrides>`, end to end from
    the raw images (joint mode); its captions and metrics files are written under `out`."""
    GlobalHydra.instance().clear()
    ckpt = ckpts[0] if len(ckpts) == 1 else "[" + ",".join(ckpts) + "]"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", [f"ckpt_path={ckpt}", *overrides, f"paths.output_dir={out}"])
    t = time.perf_counter()
    scores = evaluate(cfg)
    return scores, time.perf_counter() - t


def beam_scores(ckpt: str, cfg, beam: int, length_penalty: float | None = None) -> dict[str, float]:
    """Val scores of a checkpoint with beam search, on the cached features (same as images);
    length_penalty None keeps the checkpoint's own."""
    model = load_captioner(ckpt)
    model.decoding["beam_size"] = beam
    if length_penalty is not None:
        model.decoding["length_penalty"] = length_penalty
    model.metrics_cfg = plain(cfg.metrics)
    dm = CaptionDataModule.for_model(plain(cfg.data), model, "two_step", split="val")
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        model, datamodule=dm, verbose=False
    )
    return model.scores["val"]


def val_history(run_dir: Path) -> dict[str, float]:
    """Greedy val CIDEr after each epoch (the run's CSV log), to compare runs epoch by epoch."""
    import csv

    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as fh:
        return {
            r["epoch"]: round(float(r["val/CIDEr"]), 4)
            for r in csv.DictReader(fh)
            if r.get("val/CIDEr")
        }


def run(
    name: str, overrides: list[str], out: Path, beam: int, alphas: tuple[float, ...] = ()
) -> dict:
    started = time.perf_counter()
    cfg = compose_train([*overrides, f"paths.output_dir={out / name}"])
    train(cfg)
    metrics = json.loads((out / name / "metrics.json").read_text())
    wall = time.perf_counter() - started
    row = {
        "name": name,
        "overrides": overrides,
        "wall_seconds": round(wall, 1),
        "best_checkpoint": metrics["best_checkpoint"],
        "features": metrics.get("features"),
        "epoch_seconds": metrics.get("epoch_seconds"),
        "val_greedy": metrics["val"],
        "val_greedy_cider_by_epoch": val_history(out / name),
    }
    if beam > 1:
        t = time.perf_counter()
        row["val_beam"] = beam_scores(metrics["best_checkpoint"], cfg, beam)
        row["beam_size"] = beam
        row["beam_eval_seconds"] = round(time.perf_counter() - t, 1)
        # the whole run as a user sees it: extraction + training + greedy and beam val scoring
        row["wall_seconds_with_beam"] = round(time.perf_counter() - started, 1)
        # the same checkpoint re-scored with other GNMT length penalties (chosen on val: there
        # is no test split here, so say so when quoting the best of these)
        row["val_beam_by_length_penalty"] = {
            str(a): beam_scores(metrics["best_checkpoint"], cfg, beam, a) for a in alphas
        }
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--epochs", type=int, default=None, help="default: the experiment file's")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument(
        "--joint-batches",
        type=int,
        default=15,
        help="batches timed for the joint-mode epoch estimate",
    )
    ap.add_argument(
        "--length-penalties",
        default="0,0.5,1",
        help="also re-score each checkpoint's beam with these GNMT alphas ('' for none)",
    )
    ap.add_argument("--smoke", action="store_true", help="a few images and one epoch (tests)")
    ap.add_argument(
        "--keep-cache",
        action="store_true",
        help="reuse an existing feature cache (no cold extraction)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    out = Path(args.out)
    runs_dir = out / ("flickr8k_smoke_runs" if args.smoke else "flickr8k_runs")
    cache = runs_dir / "cache"
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)  # a cold start: extraction is part of the bench
    common = [
        f"data.root={args.data_root}",
        f"paths.cache_dir={cache}",
        *([f"trainer.max_epochs={args.epochs}"] if args.epochs else []),
        "+trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    if args.smoke:
        common += [
            "data.max_train_images=64",
            *([] if args.epochs else ["trainer.max_epochs=1"]),
            "data.max_eval_images=32",
            "data.num_workers=0",
            "metrics.meteor=false",
        ]
    alphas = tuple(float(a) for a in args.length_penalties.split(",") if a.strip())
    lstm = run(
        "show_tell_lstm", ["experiment=show_tell_flickr8k", *common], runs_dir, args.beam, alphas
    )
    gru = run(
        "show_tell_gru", ["experiment=show_tell_gru_flickr8k", *common], runs_dir, args.beam, alphas
    )

    joint_cfg = [
        "experiment=show_tell_flickr8k",
        *common,
        "mode=joint",
        "trainer.max_epochs=1",
        f"+trainer.limit_train_batches={args.joint_batches}",
        "+trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.early_stopping=null",
        "test=false",
    ]
    cfg = compose_train([*joint_cfg, f"paths.output_dir={runs_dir / 'joint'}"])
    n_train = len(CaptionDataModule.records_of(plain(cfg.data))["train"])
    n_batches = -(-n_train * (cfg.data.captions_per_image or 5) // cfg.data.batch_size)
    train(cfg)
    timed = json.loads((runs_dir / "joint" / "metrics.json").read_text())["epoch_seconds"][0]
    n_timed = min(args.joint_batches, n_batches)
    joint = {
        "batches_timed": n_timed,
        "seconds_timed": timed,
        "batches_per_epoch": n_batches,
        "seconds_per_epoch_estimate": round(timed / n_timed * n_batches, 1),
    }

    result = {
        "bench": "flickr8k",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "data_root": args.data_root,
        "epochs": len(lstm["epoch_seconds"] or []),
        "smoke": args.smoke,
        "runs": [lstm, gru],
        "joint": joint,
    }
    name = "flickr8k_smoke.json" if args.smoke else "flickr8k.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"\nJSON: {out / name}")


def print_table(result: dict) -> None:
    print(f"\nFlickr8k val (x100), {result['epochs']} epochs, {result['machine']['cpus']} CPUs")
    print(f"{'run':16s} {'decode':7s} " + " ".join(f"{k:>7s}" for k in KEYS) + "   wall s")
    for r in result["runs"]:
        for label, key in (("greedy", "val_greedy"), (f"beam{r.get('beam_size', '')}", "val_beam")):
            if key in r:
                scores = " ".join(f"{100 * r[key].get(k, float('nan')):7.2f}" for k in KEYS)
                print(f"{r['name']:16s} {label:7s} {scores}   {r['wall_seconds']:.0f}")
        for alpha, sc in (r.get("val_beam_by_length_penalty") or {}).items():
            scores = " ".join(f"{100 * sc.get(k, float('nan')):7.2f}" for k in KEYS)
            print(f"{r['name']:16s} {'lp' + alpha:7s} {scores}")
    lstm = result["runs"][0]
    f = lstm.get("features") or {}
    print(
        f"\nfeature extraction: {f.get('num_images')} images, {f.get('seconds')} s, {f.get('images_per_second')} images/s"
    )
    for r in result["runs"]:
        es = r.get("epoch_seconds") or []
        if es:
            print(f"{r['name']}: {sum(es) / len(es):.1f} s per training epoch (two-step)")
    j = result["joint"]
    print(
        f"joint mode: ~{j['seconds_per_epoch_estimate']} s per epoch ({j['batches_timed']} of {j['batches_per_epoch']} batches timed)"
    )


if __name__ == "__main__":
    main()
