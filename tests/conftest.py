"""Shared fixtures: tiny models and a tiny trained checkpoint, built once per session."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def data_config(name: str, *overrides: str) -> dict:
    """conf/data/<name>.yaml as train.py composes it, as plain values: the whole data section
    the data module and the dataset loader are given (they read no config file themselves)."""
    return copy.deepcopy(_composed_data(name, overrides))


@functools.lru_cache(maxsize=32)
def _composed_data(name: str, overrides: tuple[str, ...]) -> dict:
    from omegaconf import OmegaConf

    cfg = compose_train([f"data={name}", *overrides])
    return OmegaConf.to_container(cfg.data, resolve=True)


def data_source(name: str, **changes: Any) -> dict:
    """data.source of `name` with `changes` merged in as command-line overrides would be (a
    nested key given keeps its siblings): what `load_records(name, root, **source)` takes."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(data_config(name)["source"], changes)
    return OmegaConf.to_container(merged)


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


def cli_popen(script: str, *args: str, **popen: Any) -> subprocess.Popen:
    """`python src/<script> args` started in the background (text pipes; `popen` overrides)."""
    env = {**os.environ, "IMCAP_ROOT": str(ROOT), "PYTHONWARNINGS": "ignore"}
    opts = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    cmd = [sys.executable, str(ROOT / "src" / script), *args]
    return subprocess.Popen(cmd, **{**opts, **popen})


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


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height pixels in a few bytes (no pixel data at all)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# -- the web demo: a tiny checkpoint and a real server ------------------------------------------
DEMO_WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "on", "the", "right"]


def encoder_args(name: str, **given: Any) -> dict[str, Any]:
    """Encoder keyword arguments for timm model `name`: conf/encoder's keys, with a plain
    untrained model at timm's own input size unless `given` says otherwise."""
    from imcap.config import group_section

    base = group_section("encoder", "resnet18")
    return {**base, "name": name, "pretrained": False, "img_size": None, **given}


def demo_checkpoint(path: Path, attention: bool = True, seed: int = 0, **extra) -> Path:
    """A small untrained checkpoint in train.py's format (hyperparameters, weights, epoch, the
    checkpoint callback's state): resnet18 at 96 px, a 3x3 grid for attention. Captions are
    word salad, but deterministic, which is all the demo's tests need."""
    from imcap.config import group_section, model_sections
    from imcap.data.text import Vocab
    from imcap.model.module import Captioner

    torch.manual_seed(seed)
    vocab = Vocab(list(Vocab.SPECIALS) + DEMO_WORDS, max_len=8).to_dict()
    small = {"embed_dim": 16, "hidden_dim": 32, "dropout": 0.0}
    if attention:
        dec = group_section("decoder", "lstm_attention", **small, attention_dim=16)
    else:
        dec = group_section("decoder", "lstm", **small)
    data = {"name": "synthetic", "root": None, "source": {"seed": 0, "image_size": 96}}
    enc = encoder_args("resnet18", img_size=96)
    model = Captioner(vocab, enc, dec, data=data, **model_sections()).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "epoch": 2,
            "global_step": 30,
            "pytorch-lightning_version": "2.6.6",
            "hyper_parameters": dict(model.hparams),
            "state_dict": model.state_dict(),
            **extra,
        },
        path,
    )
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, config: Any = None) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread (or under `config`, a
    uvicorn.Config of its own: its port is read from it); yields its base URL."""
    import threading
    import time

    import uvicorn

    if config is None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="off"
        )
    port = config.port
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
