"""Hostile inputs: each test builds its own and checks the failure is safe and explained."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import cli

from imcap.errors import UserError
from imcap.module import load_captioner


class _Payload:
    """Unpickling this calls os.system: what a booby-trapped checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(trained_ckpt: str, tmp_path: Path) -> tuple[Path, Path]:
    """A real imcap checkpoint with a code-running object added (it captions normally if
    loaded unsafely), and the file its payload would create."""
    marker = tmp_path / "payload_ran"
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    ckpt["extra"] = _Payload(marker)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump(ckpt, fh)  # torch.load reads plain pickles too
    return path, marker


def test_loading_a_crafted_checkpoint_refuses_and_runs_nothing(trained: dict, tmp_path: Path):
    path, marker = crafted_checkpoint(trained["ckpt"], tmp_path)
    with pytest.raises(UserError, match="refusing to load .*evil.ckpt"):
        load_captioner(path)
    assert not marker.exists()


def test_caption_cli_refuses_a_crafted_checkpoint(trained: dict, tmp_path: Path):
    path, marker = crafted_checkpoint(trained["ckpt"], tmp_path)
    img = next((trained["out"]).parent.glob("data/synthetic/images/*.jpg"), None)
    res = cli("caption.py", f"ckpt_path={path}", f"images={img}", f"hydra.run.dir={tmp_path / 'o'}")
    assert res.returncode != 0 and "refusing to load" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    assert not marker.exists()


def test_truncated_checkpoint_is_one_clear_error(trained: dict, tmp_path: Path):
    data = Path(trained["ckpt"]).read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="cannot read checkpoint .*cut.ckpt"):
        load_captioner(path)


def test_a_diverging_run_fails_and_saves_no_checkpoint(shared: Path, tmp_path: Path) -> None:
    from conftest import compose_train, tiny_overrides

    from imcap.run import train

    out = tmp_path / "nan"
    cfg = compose_train(
        tiny_overrides(shared, "model.optim.lr=1e20", f"paths.output_dir={out}", "test=false")
    )
    with pytest.raises(UserError, match="training diverged: the loss is nan"):
        train(cfg)
    assert not list(out.glob("checkpoints/*.ckpt"))
    assert not (out / "metrics.json").exists()  # nothing reported as a result
