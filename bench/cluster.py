"""Sweep launchers: wall time of the same N-trial sweep run by Hydra's basic launcher (one trial
after another, in the sweep's own process) and by submitit (hydra/launcher=local: each trial its
own process, P at once), on the built-in synthetic set. JSON in bench/results/cluster_<tag>.json.

    python bench/cluster.py [--trials 4] [--parallel 2] [--epochs 2] [--smoke]

Both sweeps share one data folder and feature cache, filled by an untimed run first, so each
trial does the same work: build the vocabulary, train, score val. Trials differ by seed only.
What parallel trials gain depends on free cores: the machine's load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace, tmp: Path) -> list[str]:
    """One small trial: the synthetic set at `--images` training images, a small decoder."""
    return [
        f"paths.data_dir={tmp / 'data'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.log_dir={tmp / 'logs'}",
        f"data.source.n_train={args.images}",
        f"data.source.n_val={max(20, args.images // 5)}",
        f"data.source.image_size={args.size}",
        f"data.img_size={args.size}",
        "data.num_workers=0",
        "encoder.pretrained=false",
        "decoder.embed_dim=64",
        "decoder.hidden_dim=128",
        f"trainer.max_epochs={args.epochs}",
        "+trainer.enable_progress_bar=false",
        "metrics.meteor=false",
        f"metrics.java={str(shutil.which('java') is not None).lower()}",
        "test=false",
    ]


def cpu_seconds() -> float:
    """User + system CPU time of this process's finished children (and theirs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def train(*argv: str) -> tuple[float, float]:
    """Run `python src/train.py argv`: its wall time and the CPU time of its process tree (less
    sensitive to other jobs on a shared machine than the wall time, though torch's threads
    waiting on a busy machine still count)."""
    env = {**os.environ, "IMCAP_ROOT": str(ROOT), "PYTHONWARNINGS": "ignore"}
    started, cpu = time.perf_counter(), cpu_seconds()
    r = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        raise SystemExit(f"train.py {' '.join(argv[:4])} ... failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - started, cpu_seconds() - cpu


def sweep(args: argparse.Namespace, tmp: Path, launcher: list[str]) -> dict[str, Any]:
    """One multirun of `--trials` seeds; its wall time and what each trial reported."""
    log_dir = tmp / "logs" / "train" / "multiruns"
    before = set(log_dir.iterdir()) if log_dir.is_dir() else set()
    seeds = ",".join(str(s) for s in range(args.trials))
    load = os.getloadavg()[0]
    wall, cpu = train("-m", f"seed={seeds}", *launcher, *overrides(args, tmp))
    (d,) = set(log_dir.iterdir()) - before
    trials = [json.loads((d / str(j) / "metrics.json").read_text()) for j in range(args.trials)]
    seconds = [t["total_seconds"] for t in trials]
    return {
        "overrides": launcher,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),  # every process of the sweep: starts, imports, trials
        "trial_run_s": seconds,  # train() itself, without the process start and imports
        "sum_trial_run_s": round(sum(seconds), 1),
        "val_CIDEr": [round(100 * t["val"]["CIDEr"], 2) for t in trials],
        "load_avg_1min_at_start": round(load, 2),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2, help="trials at once under submitit")
    ap.add_argument("--images", type=int, default=200, help="synthetic training images")
    ap.add_argument("--size", type=int, default=64, help="image side, px")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no timing value (tests)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="cpu", help="the JSON is cluster_<tag>.json")
    args = ap.parse_args()
    if args.smoke:
        args.trials, args.images, args.size, args.epochs, args.tag = 2, 40, 48, 1, "smoke"
    tmp = Path(tempfile.mkdtemp(prefix="imcap-bench-cluster-"))
    try:
        warm, _ = train("seed=0", *overrides(args, tmp))  # data and feature cache: not compared
        print(f"warm-up run (data + feature cache): {warm:.1f} s", flush=True)
        basic = sweep(args, tmp, [])
        print(f"basic launcher: {basic['wall_s']} s", flush=True)
        local = sweep(
            args,
            tmp,
            ["hydra/launcher=local", f"hydra.sweeper.max_batch_size={args.parallel}"],
        )
        print(f"submitit_local, {args.parallel} at once: {local['wall_s']} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import torch

    result = {
        "bench": "cluster",
        "smoke": args.smoke,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads_per_trial": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "shared": "other jobs may run on the machine: see load_avg_1min_at_start",
        },
        "sweep": {
            "trials": args.trials,
            "parallel": args.parallel,
            "train_images": args.images,
            "image_px": args.size,
            "epochs": args.epochs,
            "decoder": "lstm, hidden 128",
            "encoder": "efficientnet_lite0 (random init), frozen; two-step on a warm cache",
        },
        "warmup_s": round(warm, 1),
        "basic": basic,
        "submitit_local": local,
        "speedup": round(basic["wall_s"] / local["wall_s"], 2),
        "cpu_overhead": round(local["cpu_s"] / basic["cpu_s"], 2),
        "nice": os.nice(0),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cluster_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(
        f"\n{args.trials} trials: basic {basic['wall_s']} s, submitit_local x{args.parallel} "
        f"{local['wall_s']} s (speedup {result['speedup']}); CPU time {basic['cpu_s']} s vs "
        f"{local['cpu_s']} s; {path}"
    )


if __name__ == "__main__":
    main()
