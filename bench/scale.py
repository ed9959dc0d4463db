"""COCO-scale rehearsal: the framework's own costs on a data set of Karpathy COCO's size.

Karpathy COCO is 113,287 train / 5,000 val / 5,000 test images with ~5 captions each; it cannot
be downloaded here, so this script writes one of the same shape (COCO 2014 file names, a
Karpathy `dataset_coco.json`, small JPEGs drawn by the built-in synthetic generator, captions
with a long tail of rare words so the vocabulary grows with the data as COCO's does) and runs
the real pipeline on growing slices of it (prefixes: 10k, 40k, 123k images by default):

  parse     annotation parsing + vocabulary, in this process (the data module's own calls)
  train     `src/train.py data=coco` in a subprocess, two-step mode, 1 epoch: feature
            extraction (a small encoder at low resolution), the training epoch, validation
            (greedy, every val image), the best checkpoint's val re-score; its peak memory
            (anonymous = the process's own; file = pages of the memory-mapped cache) is
            sampled from /proc every 0.2 s over the whole process tree
  scoring   the COCO toolkit (PTB tokenizer + BLEU + METEOR + ROUGE-L + CIDEr, Java) on the
            run's val captions, timed alone, and on 5,000 images (the full val split)

With --memory-limit the largest slice also trains inside a memory cgroup (v1) whose limit
is below what the cached grid plus the process need, to show training reads the grid from
the memory-mapped file instead of loading it.

python bench/scale.py [--work /tmp/imcap-scale] [--slices 10000,40000,123287] [--out ...]
Writes bench/results/scale_cpu.json (and a table on stdout). CPU seconds are reported beside
wall seconds: on a shared machine they are the fairer measure of work.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("IMCAP_ROOT", str(ROOT))

SPLITS = {"train": 113_287, "val": 5_000, "test": 5_000}  # Karpathy COCO (restval folded in)
RARE_WORDS = 40_000  # pseudo-words of a Zipf tail: ~10k seen >= 5 times at the full size (COCO)


# -- 1. the data set ---------------------------------------------------------------------------
def _image(args: tuple[str, int, int, int, str]) -> dict:
    """One image and its captions (a worker process)."""
    from imcap.data.synthetic import make_example, render

    split, index, cocoid, size, out = args
    scene, captions = make_example(0, split, index, size)
    folder = "train2014" if split == "train" else "val2014"
    name = f"COCO_{folder}_{cocoid:012d}.jpg"
    path = Path(out) / folder / name
    if not path.exists():
        render(scene, size).save(path, quality=90)
    rng = random.Random(cocoid)
    sentences = []
    for c in captions:  # + one word of frequency ~ 1/rank (log-uniform rank): COCO's long tail
        rank = int(math.exp(rng.random() * math.log(RARE_WORDS)))
        c = f"{c} near a w{rank}x"
        sentences.append({"raw": c, "tokens": c.split()})
    return {
        "filepath": folder,
        "filename": name,
        "cocoid": cocoid,
        "split": split,
        "sentences": sentences,
    }


def generate(full: Path, size: int) -> tuple[list[dict], float]:
    """The full-size set under `full` (images written once; the JSON entries rebuilt)."""
    t0 = time.perf_counter()
    for folder in ("train2014", "val2014"):
        (full / folder).mkdir(parents=True, exist_ok=True)
    jobs, cocoid = [], 1
    for split, n in SPLITS.items():
        for i in range(n):
            jobs.append((split, i, cocoid, size, str(full)))
            cocoid += 1
    with mp.Pool(os.cpu_count() or 1) as pool:
        entries = pool.map(_image, jobs, chunksize=512)
    return entries, time.perf_counter() - t0


def write_slice(full: Path, entries: list[dict], n_images: int, root: Path) -> dict[str, int]:
    """A prefix of every split, in proportion (val/test reach 5,000 at the full size)."""
    total = sum(SPLITS.values())
    counts = {s: round(n * n_images / total) for s, n in SPLITS.items()}
    chosen, seen = [], dict.fromkeys(SPLITS, 0)
    for e in entries:
        if seen[e["split"]] < counts[e["split"]]:
            seen[e["split"]] += 1
            chosen.append(e)
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("train2014", "val2014"):
        link = root / folder
        if not link.exists():
            link.symlink_to(full / folder, target_is_directory=True)
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": chosen}))
    return counts


# -- 2. measuring ------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    """pid and its descendants (DataLoader workers, the Java scorer)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _rss(pids: list[int]) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes summed over `pids`."""
    anon = file = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file += int(line.split()[1]) * 1024
        except OSError:
            continue
    return anon, file


def run_measured(cmd: list[str], log: Path, cgroup: Path | None = None) -> dict:
    """Run `cmd`, sampling its process tree's memory; wall and CPU seconds, peaks, exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(proc.pid))
        peak = {"anon": 0, "file": 0, "main_anon": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                anon, file = _rss(_tree(proc.pid))
                peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
                peak["main_anon"] = max(peak["main_anon"], _rss([proc.pid])[0])
                stop.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "exit_code": rc,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(cpu, 1),
        "peak_rss_anon_mb": round(peak["anon"] / 2**20),  # with DataLoader workers and Java
        "peak_rss_anon_main_mb": round(peak["main_anon"] / 2**20),  # the training process
        "peak_rss_file_mb": round(peak["file"] / 2**20),
        "log": str(log),
    }


def parse_cost(root: Path) -> dict:
    """Annotation parsing, vocabulary and caption encoding as the data module does them."""
    from imcap.config import data_section
    from imcap.data.text import Vocab
    from imcap.pipeline.datamodule import CaptionDataModule, encode_caption

    data = data_section("coco", [f"data.root={root}", "data.vocab.min_count=5"])
    t0, c0 = time.perf_counter(), time.process_time()
    dm = CaptionDataModule.from_config(data)
    records = dm.load_records()
    t1 = time.perf_counter()
    vocab = dm.build_vocab()
    t2 = time.perf_counter()
    n = 0
    for r in records["train"]:
        for c in r.captions:
            encode_caption(vocab, c)
            n += 1
    t3 = time.perf_counter()
    assert isinstance(vocab, Vocab)
    return {
        "images": {s: len(v) for s, v in records.items()},
        "train_captions": n,
        "vocab_size": len(vocab),
        "parse_seconds": round(t1 - t0, 2),
        "vocab_seconds": round(t2 - t1, 2),
        "encode_seconds": round(t3 - t2, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
    }


def scoring_cost(captions_file: Path, n: int | None = None) -> dict:
    """The COCO toolkit alone (Java PTB tokenizer + BLEU + METEOR + ROUGE-L + CIDEr)."""
    from imcap.eval.metrics import CaptionScorer

    rows = json.loads(captions_file.read_text())
    if n is not None:  # the full 5,000: tile the slice's captions over the split's references
        rows = [rows[i % len(rows)] for i in range(n)]
        preds = {str(i): r["caption"] for i, r in enumerate(rows)}
        refs = {str(i): r["references"] for i, r in enumerate(rows)}
    else:
        preds = {r["image_id"]: r["caption"] for r in rows}
        refs = {r["image_id"]: r["references"] for r in rows}
    t0 = time.perf_counter()
    with CaptionScorer(java=True, meteor=True) as scorer:
        scores = scorer(preds, refs)
    return {
        "images": len(preds),
        "seconds": round(time.perf_counter() - t0, 1),
        "CIDEr": round(scores["CIDEr"], 4),
        "METEOR": round(scores["METEOR"], 4),
    }


def make_cgroup(limit_gb: float) -> Path:
    """A memory cgroup (v1) with this limit; page cache counts toward it and is reclaimed."""
    base = Path("/sys/fs/cgroup/memory")
    own = base / Path("/proc/self/cgroup").read_text().split("memory:")[1].split()[0].lstrip("/")
    group = own / f"imcap_scale_{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 2**30)))
    return group


# -- 3. the slices -----------------------------------------------------------------------------
def train_cmd(root: Path, work: Path, name: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "src/train.py",
        "data=coco",
        f"data.root={root}",
        f"encoder={args.encoder}",
        f"data.img_size={args.img_size}",
        "decoder=topdown",
        "decoder.embed_dim=64",
        "decoder.hidden_dim=128",
        "decoder.attention_dim=64",
        "data.vocab.min_count=5",
        "data.batch_size=256",
        "data.eval_batch_size=500",
        "data.num_workers=1",
        "trainer.max_epochs=1",
        "+trainer.enable_progress_bar=false",
        "metrics.meteor=true",
        "callbacks.attention_maps=null",
        f"paths.cache_dir={work / 'cache'}",
        f"paths.log_dir={work / 'logs'}",
        f"hydra.run.dir={work / 'runs' / name}",
        *args.overrides,
    ]


def slice_row(n: int, full: Path, entries: list[dict], work: Path, args) -> dict:
    root = work / f"coco_{n}"
    counts = write_slice(full, entries, n, root)
    row: dict = {"images": n, "split_images": counts}
    row["parse"] = parse_cost(root)
    run_dir = work / "runs" / f"slice_{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    row["train"] = run_measured(train_cmd(root, work, f"slice_{n}", args), work / f"train_{n}.log")
    if row["train"]["exit_code"] != 0:
        raise SystemExit(f"training on the {n}-image slice failed: see {row['train']['log']}")
    facts = json.loads((run_dir / "metrics.json").read_text())
    feats = facts["features"]
    cache = Path(feats["directory"])
    captions = row["parse"]["train_captions"]
    epoch = facts["epoch_seconds"][0]
    row["extraction"] = {
        "seconds": feats["seconds"],
        "images_per_second": feats["images_per_second"],
        "cache_mb": {f.name: round(f.stat().st_size / 2**20) for f in cache.glob("*.f16")},
    }
    row["epoch"] = {
        "seconds": epoch,
        "captions": captions,
        "seconds_per_100k_captions": round(epoch / captions * 1e5, 1),
    }
    row["val"] = {k: round(v, 4) for k, v in facts["val"].items()}
    row["fit_seconds"] = facts["fit_seconds"]
    row["total_seconds"] = facts["total_seconds"]
    row["scoring"] = scoring_cost(run_dir / "captions_val.json")
    return row


def train_rate(log: Path) -> float:
    """The last training rate the run's progress lines printed (steps/s; validation apart)."""
    rates = re.findall(r" ([0-9.]+) it/s", log.read_text())
    if not rates:
        raise SystemExit(f"no progress line with a rate in {log}")
    return float(rates[-1])


def vocab_check(work: Path, sizes: list[int], steps: int, args: argparse.Namespace) -> list[dict]:
    """Is training's cost per caption the data's size or the vocabulary's? The largest slice
    trained `steps` steps at its own vocabulary and at min_count values that shrink it to the
    smaller slices' sizes, and the smallest slice at its own, one after another on one machine."""
    rows = []
    runs = [(sizes[-1], m) for m in args.vocab_min_counts] + [(sizes[0], 5)]
    for n, min_count in runs:
        name = f"slice_{n}_vocab{min_count}"
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        cmd = train_cmd(work / f"coco_{n}", work, name, args) + [
            f"data.vocab.min_count={min_count}",
            f"+trainer.limit_train_batches={steps}",
            "data.max_eval_images=500",
            "metrics.meteor=false",
            "callbacks.progress_log.every_seconds=5",  # a rate to read even in a short run
        ]
        log = work / f"train_{name}.log"
        row = run_measured(cmd, log)
        if row["exit_code"] != 0:
            raise SystemExit(f"the vocabulary check failed: see {log}")
        vocab = json.loads((work / "runs" / name / "vocab.json").read_text())
        words = vocab["tokens"]  # specials included, as the output layer sees them
        rate = train_rate(log)
        rows.append(
            {
                "images": n,
                "min_count": min_count,
                "vocab_size": len(words),
                "steps": steps,
                "steps_per_second": rate,
                "seconds_per_100k_captions": round(1e5 / (rate * 256), 1),
                "wall_seconds": row["wall_seconds"],
            }
        )
        print(f"[scale] vocab check: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", default="/tmp/imcap-scale", help="data, caches and runs (GBs)")
    ap.add_argument("--slices", default="10000,40000,123287")
    ap.add_argument("--image-size", type=int, default=64, help="size of the generated JPEGs")
    ap.add_argument("--img-size", type=int, default=64, help="the encoder's input size")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument(
        "--memory-limit",
        default="auto",
        help="also train the largest slice in a memory cgroup of this many GiB; auto: the "
        "first run's peak anonymous memory + a third of the grid file (less than both need); "
        "0: skip",
    )
    ap.add_argument(
        "--limited-batches",
        type=int,
        default=600,
        help="training steps of the memory-limited run (600 x 256 captions touch ~70%% of the "
        "grid's rows at the full size)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_cpu.json"))
    ap.add_argument("--resume", action="store_true", help="keep the slices already in --out")
    ap.add_argument(
        "--vocab-check-steps",
        type=int,
        default=150,
        help="train the largest slice this many steps at smaller vocabularies (0: skip)",
    )
    ap.add_argument(
        "--vocab-min-counts",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[5, 20, 62],
        help="min_count values of the vocabulary check (5: the slice's own vocabulary)",
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the training runs")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    full = work / "full"
    started = time.perf_counter()
    entries, gen_seconds = generate(full, args.image_size)
    result: dict = {
        "what": "COCO-scale rehearsal (bench/scale.py): the framework's costs per slice",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "encoder": args.encoder,
            "img_size": args.img_size,
            "decoder": "topdown (embed 64, hidden 128, attention 64)",
            "epochs": 1,
            "overrides": args.overrides,
        },
        "generate_seconds": round(gen_seconds, 1),
        "slices": [],
    }
    out = Path(args.out)
    before = json.loads(out.read_text()) if args.resume and out.exists() else {}
    done = before.get("slices", [])
    result["slices"] = [r for r in done if str(r["images"]) in args.slices.split(",")]
    for key in ("memory_limited", "vocab_check"):  # finished parts a resumed run does not redo
        if key in before:
            result[key] = before[key]
    for n in (int(s) for s in args.slices.split(",")):
        if any(r["images"] == n for r in result["slices"]):
            continue
        print(f"[scale] slice {n} images ...", flush=True)
        result["slices"].append(slice_row(n, full, entries, work, args))
        out.write_text(json.dumps(result, indent=1))  # finished work kept as it comes
    last = result["slices"][-1]
    full_val = work / "runs" / f"slice_{last['images']}" / "captions_val.json"
    result["scoring_5000"] = scoring_cost(full_val, n=SPLITS["val"])
    grid_mb = last["extraction"]["cache_mb"].get("grid.f16", 0)
    limit = (
        (last["train"]["peak_rss_anon_main_mb"] + grid_mb / 3) / 1024
        if args.memory_limit == "auto"
        else float(args.memory_limit)
    )
    if limit > 0 and grid_mb and result.get("memory_limited", {}).get("exit_code") != 0:
        group = make_cgroup(limit)
        n = last["images"]
        name = f"slice_{n}_limited"
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        cmd = train_cmd(work / f"coco_{n}", work, name, args) + [
            f"+trainer.limit_train_batches={args.limited_batches}",
            "data.max_eval_images=500",
            "data.num_workers=0",  # one process in the group: the training process alone
            "metrics.meteor=false",  # no METEOR JVM in the group
        ]
        Path("/proc/sys/vm/drop_caches").write_text("1")  # the grid's pages: none resident
        row = run_measured(cmd, work / f"train_{n}_limited.log", cgroup=group)
        row["memory_limit_gb"] = round(limit, 2)
        row["grid_cache_mb"] = grid_mb
        row["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())  # limit reached
        row["cgroup_max_usage_mb"] = round(
            int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        )
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
        row["cgroup_major_faults"] = int(stat.get("total_pgmajfault", stat.get("pgmajfault", 0)))
        if row["exit_code"] == 0:
            facts = json.loads((work / "runs" / name / "metrics.json").read_text())
            row["train_steps"] = args.limited_batches
            row["epoch_seconds"] = facts["epoch_seconds"][0]
            row["val_CIDEr"] = round(facts["val"]["CIDEr"], 4)
        result["memory_limited"] = row
        group.rmdir()
    if args.vocab_check_steps > 0 and "vocab_check" not in result:
        sizes = [r["images"] for r in result["slices"]]
        result["vocab_check"] = vocab_check(work, sizes, args.vocab_check_steps, args)
        out.write_text(json.dumps(result, indent=1))
    result["total_wall_seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))


def table(result: dict) -> str:
    head = (
        "| images | parse + vocab s | vocab | extraction img/s | cache MB | train s / 100k "
        "captions | peak RSS anon (training process) / file MB | val images | scoring s | "
        "run wall s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in result["slices"]:
        p, t = r["parse"], r["train"]
        lines.append(
            f"| {r['images']:,} | {p['parse_seconds'] + p['vocab_seconds']:.1f} | "
            f"{p['vocab_size']:,} | {r['extraction']['images_per_second']:.0f} | "
            f"{sum(r['extraction']['cache_mb'].values()):,} | "
            f"{r['epoch']['seconds_per_100k_captions']:.0f} | "
            f"{t['peak_rss_anon_main_mb']:,} / {t['peak_rss_file_mb']:,} | "
            f"{r['scoring']['images']:,} | {r['scoring']['seconds']:.0f} | {t['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
