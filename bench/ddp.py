"""Single process against 2-process DDP on CPU (gloo), tiny synthetic data: feature extraction
(one process vs a shard each), epoch time and val scores; and one checkpoint scored both ways
(its DDP run's final validation against eval.py in one process), which must agree exactly.

    python bench/ddp.py [--epochs 8] [--n-train 400] [--out bench/results] [--smoke]

Three runs, each from a cold feature cache: one process with 1 math thread, one with 2 (all
cores), and 2 DDP processes with 1 thread each (all cores; torchrun --standalone, the same
TorchElastic path as a multi-node launch, trainer=ddp_cpu). Wall times on a shared machine move
with its load (recorded); `cpu_seconds` (the whole process tree's user + system time) much less.
The DDP run's val scores differ from the single runs' by design (see `WHY`); the same
checkpoint's scores may not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WHY = (
    "Training is not the same computation: each DDP process takes its own batch of 64 from its "
    "half of the captions (DistributedSampler, its own shuffle), and the gradients are averaged "
    "over the two, so an epoch is half as many optimizer steps on batches of 128, in another "
    "order; at the same learning rate and epochs that trains less. With data.batch_size=32 per "
    "process (the single run's 64 per step, as many steps) the scores come close but not equal: "
    "the captions still meet in other batches and another order. Scoring is the same "
    "computation: the same checkpoint and cached features give the same captions, each val "
    "image scored once (the sampler's padding repeats dropped)."
)


def run(cmd: list[str], threads: int, log: Path) -> tuple[float, float]:
    """Run a command (its output to `log`); its wall time and the CPU time of its whole process
    tree (user + system); stop on failure."""
    env = {**os.environ, "IMCAP_ROOT": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {rc}); see {log}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return round(wall, 1), round(cpu, 1)


def train(
    tmp: Path, name: str, trainer: str, args: list[str], threads: int, processes: int = 1
) -> dict:
    """One training run from a cold feature cache; what it measured. With `processes` > 1:
    torchrun on this node (it waits for its workers, so their CPU time is counted)."""
    out = tmp / name
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        args = [*args, f"trainer.devices={processes}"]
    cmd = [
        *launch,
        str(ROOT / "src" / "train.py"),
        f"trainer={trainer}",
        *args,
        f"paths.cache_dir={tmp / f'cache_{name}'}",  # a cold cache each: extraction measured
        f"hydra.run.dir={out}",
    ]
    load = os.getloadavg()[0]
    wall, cpu = run(cmd, threads, tmp / f"{name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    cache = Path(metrics["features"]["directory"])
    manifest = json.loads((cache / "manifest.json").read_text())
    return {
        "trainer": trainer,
        "processes": processes,
        "threads_per_process": threads,
        "load_average_1min_at_start": round(load, 2),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "fit_seconds": metrics["fit_seconds"],
        "epoch_seconds": metrics["epoch_seconds"],
        "extraction": {
            "processes": manifest.get("processes", 1),
            "seconds": manifest["seconds"],
            "images": manifest["num_images"],
        },
        "val": metrics["val"],
        "best_checkpoint": metrics["best_checkpoint"],
        "cache": str(cache),
    }


def same_bytes(a: Path, b: Path) -> bool:
    names = ("pooled.f16", "grid.f16", "images.txt")
    return (
        all((a / n).read_bytes() == (b / n).read_bytes() for n in names if (a / n).exists())
        and a.name == b.name
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-val", type=int, default=81)  # odd: the sampler pads, scoring must not
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--smoke", action="store_true", help="seconds-long sizes (CI)")
    a = ap.parse_args()
    if a.smoke:
        a.epochs, a.n_train, a.n_val = 1, 40, 11
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="imcap-ddp-") as t:
        tmp = Path(t)
        args = [
            f"data.source.n_train={a.n_train}",
            f"data.source.n_val={a.n_val}",
            "data.source.n_test=20",
            "data.source.image_size=64",
            "data.img_size=64",
            "data.num_workers=0",
            "encoder.pretrained=false",
            "decoder.embed_dim=128",
            "decoder.hidden_dim=256",
            f"trainer.max_epochs={a.epochs}",
            "+trainer.enable_progress_bar=false",
            "metrics.java=false",
            "metrics.meteor=false",
            "test=false",
            "logger=csv",
            f"paths.data_dir={tmp / 'data'}",
            f"paths.log_dir={tmp / 'logs'}",
        ]
        # the data first, in one process (two generating it at once would race)
        from imcap.data.synthetic import load_synthetic

        load_synthetic(
            tmp / "data" / "synthetic", n_train=a.n_train, n_val=a.n_val, n_test=20, image_size=64
        )
        runs = {
            "single_process_1_thread": train(tmp, "single1", "cpu", args, threads=1),
            "single_process_2_threads": train(tmp, "single2", "cpu", args, threads=2),
            "ddp_2_processes": train(tmp, "ddp", "ddp_cpu", args, threads=1, processes=2),
            # the single run's effective batch (2 x 32) and number of optimizer steps
            "ddp_2_processes_batch_32": train(
                tmp, "ddp32", "ddp_cpu", [*args, "data.batch_size=32"], threads=1, processes=2
            ),
        }
        ddp, single = runs["ddp_2_processes"], runs["single_process_2_threads"]
        # the DDP run's best checkpoint, scored by one process from the same cached features
        ev = tmp / "eval"
        wall, _ = run(
            [
                sys.executable,
                str(ROOT / "src" / "eval.py"),
                f"ckpt_path={ddp['best_checkpoint']}",
                "split=val",
                "mode=two_step",
                f"paths.cache_dir={tmp / 'cache_ddp'}",
                "metrics.java=false",
                "metrics.meteor=false",
                f"hydra.run.dir={ev}",
            ],
            2,
            tmp / "eval.log",
        )
        one = json.loads((ev / "metrics_val.json").read_text())["scores"]
        identical = same_bytes(Path(single["cache"]), Path(ddp["cache"]))
    for r in runs.values():
        r["best_checkpoint"] = Path(r["best_checkpoint"]).name
        r.pop("cache")
    single1 = runs["single_process_1_thread"]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "data": {"n_train": a.n_train, "n_val": a.n_val, "image_size": 64, "epochs": a.epochs},
        **runs,
        "feature_caches_bitwise_identical": identical,
        "same_checkpoint_scored_both_ways": {
            "checkpoint": f"ddp_2_processes/{ddp['best_checkpoint']}",
            "ddp_2_processes": ddp["val"],
            "single_process_eval": one,
            "eval_wall_seconds": wall,
            "equal": one == ddp["val"],
        },
        "val_scores_equal": {
            "single_1_thread_vs_2_threads": single1["val"] == single["val"],
            "single_vs_ddp": single["val"] == ddp["val"],
            "single_vs_ddp_batch_32": single["val"] == runs["ddp_2_processes_batch_32"]["val"],
        },
        "why_ddp_training_scores_differ": WHY,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / ("ddp_smoke.json" if a.smoke else "ddp_cpu.json")
    path.write_text(json.dumps(result, indent=1))
    for name, r in runs.items():
        print(
            f"{name}: extraction {r['extraction']['seconds']} s, epochs {r['epoch_seconds']} s, "
            f"cpu {r['cpu_seconds']} s, val CIDEr {100 * r['val']['CIDEr']:.2f}"
        )
    print(f"same checkpoint both ways equal: {one == ddp['val']}; caches identical: {identical}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
