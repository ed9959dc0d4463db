"""Multi-node DDP through Lightning's cluster environments, on one CPU machine: two torchrun
"nodes" on 127.0.0.1 (one process each), and a simulated SLURM job (its requeue signal, a fake
`scontrol`). The callbacks below are test helpers the training subprocesses load with
`+callbacks.x._target_=test_multinode.<Name>` (PYTHONPATH=tests)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import ROOT, cli
from test_scale import FAST, paths

from imcap.pipeline.callbacks import Checkpoint
from imcap.pipeline.training import requeued_checkpoint, slurm_job_id, srun_task

CLUSTER_VARS = ("SLURM_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")
# test_scale's tiny synthetic run, scored without Java (no JVM start per validation)
TINY = [a for a in FAST if not a.startswith("metrics.java")] + ["metrics.java=false"]


class RecordTrainingRows(L.Callback):
    """Each rank writes the training caption indices its batches held (<path>/rank<r>.json)."""

    def __init__(self, path: str) -> None:
        self.path, self.seen, self._patched = Path(path), [], False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._patched:
            return
        dm, self._patched = trainer.datamodule, True
        original = dm.on_before_batch_transfer
        pair: dict[tuple[int, tuple[int, ...]], int] = {}  # joint: (row, tokens) -> caption

        def recording(batch: Any, dataloader_idx: int) -> Any:
            if isinstance(batch, dict) and "captions" in batch:  # two-step training batch
                self.seen.extend(batch["captions"].tolist())
            elif isinstance(batch, dict) and "tokens" in batch:  # joint: (row, padded tokens)
                if not pair:
                    rows, toks = dm.train_rows.tolist(), dm._token_lists
                    pair.update(
                        {(r, tuple(t)): i for i, (r, t) in enumerate(zip(rows, toks, strict=True))}
                    )
                for r, t in zip(batch["rows"].tolist(), batch["tokens"].tolist(), strict=True):
                    while t and t[-1] == 0:  # <pad> (id 0) only ever trails a caption
                        t.pop()
                    self.seen.append(pair[(r, tuple(t))])
            return original(batch, dataloader_idx)

        dm.on_before_batch_transfer = recording

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        row = {
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "num_captions": len(trainer.datamodule.train_rows),
            "captions": self.seen,
        }
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))


class SendSignal(L.Callback):
    """The training process sends itself a real signal after batch `batch` of epoch `epoch` (a
    known step, so the test is deterministic), unless SLURM_RESTART_COUNT says the job is
    back after its requeue."""

    def __init__(self, name: str = "SIGUSR1", epoch: int = 1, batch: int = 1) -> None:
        self.signum, self.epoch, self.batch = getattr(signal, name), epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        here = (trainer.current_epoch, batch_idx) == (self.epoch, self.batch)
        if here and not os.environ.get("SLURM_RESTART_COUNT"):
            os.kill(os.getpid(), self.signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any cluster's variables (the test sets its own)."""
    drop = (*CLUSTER_VARS, "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    tests = str(ROOT / "tests")
    return {
        **env,
        "IMCAP_ROOT": str(ROOT),
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def synthetic_data(tmp: Path) -> None:
    """Generate the data before the processes start (as prepare.py would on a cluster): two
    processes generating it at once would each install their own copy."""
    from imcap.data.synthetic import load_synthetic

    given = (a.split("=", 1) for a in TINY)
    source = {k.rsplit(".", 1)[1]: int(v) for k, v in given if k.startswith("data.source.")}
    load_synthetic(tmp / "data" / "synthetic", **source)


@pytest.mark.parametrize("mode", ["two_step", "joint"])
def test_two_torchrun_nodes_split_the_data_and_score_like_one_process(
    tmp_path: Path, mode: str
) -> None:
    """torchrun --nnodes 2 (one process per "node", 127.0.0.1), trainer=ddp_cpu: each rank
    trains on its own half of the captions, every val image is scored once (the scores equal
    a single-process eval.py of the same checkpoint), rank 0 alone writes the run's files, into
    the one run directory both were given, and both exit 0."""
    synthetic_data(tmp_path)
    run, rows = tmp_path / "run", tmp_path / "rows"
    args = [
        "trainer=ddp_cpu",
        "trainer.num_nodes=2",
        "trainer.max_epochs=1",
        f"mode={mode}",
        "encoder.pretrained=false",
        "test=false",
        *TINY,
        *paths(tmp_path),
        f"hydra.run.dir={run}",
        "+callbacks.rows._target_=test_multinode.RecordTrainingRows",
        f"+callbacks.rows.path={rows}",
    ]
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(ROOT / "src" / "train.py"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
            cwd=tmp_path,
        )
        for node in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(t[-3000:] for t in logs)

    # disjoint shards: DistributedSampler's halves (padded by repeats when the count is odd)
    a, b = (json.loads((rows / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (a["world_size"], a["node_rank"], b["node_rank"]) == (2, 0, 1)
    n = a["num_captions"]
    seen_a, seen_b = set(a["captions"]), set(b["captions"])
    assert len(a["captions"]) == len(b["captions"]) == -(-n // 2)
    assert seen_a | seen_b == set(range(n))
    assert len(seen_a & seen_b) == 2 * -(-n // 2) - n  # only the padding repeats

    # one set of outputs, written by rank 0 into the directory both were given
    assert not (tmp_path / "logs").exists()  # no ${now} run directory from either process
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_000.ckpt",
        "last.ckpt",
    ]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "val_best.json",
        "val_epoch_000.json",
    ]
    assert not list(run.rglob("hpc_ckpt*")) and not list(run.rglob("*ddp_process*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["num_images"] == 21
    if mode == "two_step":
        assert metrics["features"]["num_images"] == 101  # one cache of every image
        manifest = Path(metrics["features"]["directory"]) / "manifest.json"
        assert json.loads(manifest.read_text())["processes"] == 2  # a shard by each rank

    # the same checkpoint scored by one process (two-step: from the same cache): the same scores
    best = metrics["best_checkpoint"]
    assert Path(best).parent == run / "checkpoints"
    res = cli(
        "eval.py",
        f"ckpt_path={best}",
        "split=val",
        f"mode={mode}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        *[a for a in TINY if a.startswith("metrics.")],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    single = json.loads((tmp_path / "eval" / "metrics_val.json").read_text())["scores"]
    assert single == metrics["val"]
    captions = json.loads((run / "captions_val.json").read_text())
    assert captions == json.loads((tmp_path / "eval" / "captions_val.json").read_text())


def slurm_env(tmp: Path, job: str, **extra: str) -> dict[str, str]:
    """What srun gives one task of a one-node, one-task batch job; `scontrol` is a fake that
    appends its arguments to <tmp>/scontrol.log."""
    bin_dir = tmp / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        fake = bin_dir / "scontrol"
        fake.write_text(f'#!/bin/sh\necho "$@" >> "{tmp / "scontrol.log"}"\n')
        fake.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "imcap-train",  # not bash/interactive: a batch job
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    return clean_env(**slurm, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra)


def test_slurm_requeue_signal_saves_requeues_and_the_job_comes_back(tmp_path: Path) -> None:
    """SIGUSR1 (sbatch --signal=SIGUSR1@90) in the middle of epoch 1: last.ckpt is saved at
    that step, `scontrol requeue <job>` runs once, the process exits 143. The requeued job
    runs the same command line again: it continues in the same run directory from last.ckpt
    and finishes, every epoch logged once."""
    job, run = "4242", tmp_path / "slurm-4242"
    args = [
        "trainer.max_epochs=3",
        "+trainer.limit_train_batches=3",
        "encoder.pretrained=false",
        "test=false",
        *TINY,
        *paths(tmp_path),
        f"hydra.run.dir={run}",  # what the sbatch script passes: .../slurm-$SLURM_JOB_ID
        "+callbacks.signal._target_=test_multinode.SendSignal",
    ]
    train = [sys.executable, str(ROOT / "src" / "train.py"), *args]
    first = subprocess.run(
        train, capture_output=True, text=True, env=slurm_env(tmp_path, job), timeout=600
    )
    assert first.returncode == 143, first.stderr[-3000:]
    assert f"SLURM job {job} is requeued" in first.stderr
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {job}\n"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (1, 3 + 2)  # saved at that very step
    assert not list(tmp_path.rglob("hpc_ckpt*"))  # Lightning's own handler did not run

    back = subprocess.run(  # the requeued job: the same script, SLURM_RESTART_COUNT set
        train,
        capture_output=True,
        text=True,
        env=slurm_env(tmp_path, job, SLURM_RESTART_COUNT="1"),
        timeout=600,
    )
    assert back.returncode == 0, back.stderr[-3000:]
    assert "continuing the run from it" in back.stdout + back.stderr
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {job}\n"  # not again
    assert not (tmp_path / "logs").exists()  # no new run directory
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 3 * 3)  # epoch 1 redone, then 2
    curves = next(v for k, v in state["callbacks"].items() if k == "Curves")
    assert [r["epoch"] for r in curves["history"]] == [0, 1, 2]
    with (run / "csv" / "metrics.csv").open() as fh:
        val_epochs = [int(r["epoch"]) for r in csv.DictReader(fh) if r.get("val/CIDEr")]
    assert val_epochs == [0, 1, 2]  # every epoch once, the interrupted one not twice


# -- the fast tier: the decisions, without processes ---------------------------------------------
def test_cluster_detection_follows_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(CLUSTER_VARS):
            monkeypatch.delenv(k)
    assert not srun_task() and slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc / srun --pty bash
    assert not srun_task() and slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert srun_task() and slurm_job_id() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "70_3"  # what scontrol requeue takes for an array task
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun inside the allocation
    monkeypatch.setattr(torch.distributed, "is_torchelastic_launched", lambda: True)
    assert not srun_task() and slurm_job_id() == "70_3"  # ranks from torchrun; job still SLURM's


def test_only_a_slurm_job_continues_its_run_directory_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omegaconf import OmegaConf

    for k in list(os.environ):
        if k.startswith(CLUSTER_VARS):
            monkeypatch.delenv(k)
    ckpt = Checkpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)
    cfg = OmegaConf.create({"ckpt_path": None})
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert requeued_checkpoint(cfg, [ckpt]) is None  # not under SLURM: a new run, as ever
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert requeued_checkpoint(cfg, [ckpt]) == tmp_path / "checkpoints" / "last.ckpt"
    assert requeued_checkpoint(OmegaConf.create({"ckpt_path": "x.ckpt"}), [ckpt]) is None
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    assert requeued_checkpoint(cfg, [ckpt]) is None  # the job's first start


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3"}, 3),  # torchrun
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "8"}, 2),  # srun, one task per GPU
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 0),  # a one-task batch job (a sweep trial)
        ({"SLURM_PROCID": "5"}, 0),  # no task count: not a multi-task srun
    ],
)
def test_the_launch_rank_is_read_before_lightning_starts(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: int
) -> None:
    """Only rank 0 writes `.hydra/` and keeps the `before_resume_<n>` copies; the others would
    race on the same files of the shared run directory."""
    from imcap.cli import launch_rank

    for k in list(os.environ):
        if k.startswith(CLUSTER_VARS):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch_rank() == rank


def test_processes_probing_one_run_directory_do_not_trip_each_other(tmp_path: Path) -> None:
    """Every process of a multi-node run checks the shared run directory is writable at once;
    one process's probe file must never be removed under another."""
    from concurrent.futures import ThreadPoolExecutor

    from omegaconf import OmegaConf

    from imcap.pipeline.runtime import output_dir

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")}})
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: output_dir(cfg), range(400)))
    assert set(outs) == {tmp_path / "run"}
    assert list((tmp_path / "run").iterdir()) == []  # no probe left behind
