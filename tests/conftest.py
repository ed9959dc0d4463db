"""Shared fixtures: tiny models and a tiny trained checkpoint, built once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("IMCAP_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(
    not HAS_JAVA, reason="java not installed (pycocoevalcap's tokenizer/METEOR need it)"
)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def compose_train(overrides: list[str]):
    """The train config as `python src/train.py <overrides>` would compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_overrides(tmp: Path, *extra: str) -> list[str]:
    """A CPU-sized run on a small synthetic set (shared cache and data across a session)."""
    return [
        f"paths.data_dir={tmp / 'data'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.output_dir={tmp / 'run'}",
        "data.source.n_train=400",
        "data.source.n_val=80",
        "data.source.n_test=80",
        "data.source.image_size=96",
        "data.img_size=96",
        "data.num_workers=0",
        "data.batch_size=32",
        "decoder.embed_dim=128",
        "decoder.hidden_dim=256",
        "decoder.dropout=0.2",
        "model.optimizer.lr=3e-3",
        "trainer.max_epochs=4",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"metrics.java={str(HAS_JAVA).lower()}",
        "metrics.meteor=false",
        "logger=csv",
        *extra,
    ]


LEARN = ("data.source.n_train=800", "trainer.max_epochs=8")


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """Data and feature caches shared by every run of the session."""
    return tmp_path_factory.mktemp("shared")


def run_dir(shared: Path, name: str) -> list[str]:
    return [f"paths.output_dir={shared / name}"]


@pytest.fixture(scope="session")
def trained(shared: Path) -> dict:
    from imcap.pipeline.run import train

    overrides = tiny_overrides(shared, *LEARN, *run_dir(shared, "trained"))
    train(compose_train(overrides))
    metrics = json.loads((shared / "trained" / "metrics.json").read_text())
    return {"metrics": metrics, "ckpt": metrics["best_checkpoint"], "out": shared / "trained"}


def cli(
    script: str, *args: str, cwd: Path = ROOT, warnings: bool = False
) -> subprocess.CompletedProcess:
    """Run src/<script>; Python warnings are off unless `warnings` (a test that asserts on them)."""
    env = {**os.environ, "IMCAP_ROOT": str(ROOT), "PYTHONWARNINGS": "ignore"}
    if warnings:
        env.pop("PYTHONWARNINGS")
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
