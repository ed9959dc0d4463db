"""A checkpoint is data all the way down: crafted hyperparameters never pick the code that runs.

Each case builds a checkpoint whose hyperparameters name a callable (or an option that reaches
one), with a marker that the attack would create; every loader refuses it in one line and the
marker never appears.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import cli, demo_checkpoint

from imcap.config import resume_overrides
from imcap.errors import UserError
from imcap.model.checkpoint import RefusedCheckpoint, load_captioner
from imcap.pipeline.checks import check_callback_paths
from imcap.pipeline.runtime import load_models

Attack = Callable[[dict, Path], None]


def _data_loader(hp: dict, marker: Path) -> None:  # the reproduction
    hp["data"] = {
        "name": "synthetic",
        "root": str(marker.parent),
        "loader": "hydra.utils.instantiate",
        "source": {"_target_": "os.makedirs", "name": str(marker)},
    }


def _decoder_module(hp: dict, marker: Path) -> None:  # importing the module would run it
    hp["decoder"]["_target_"] = "imcap_evil_module.Decoder"


def _optimizer(hp: dict, marker: Path) -> None:
    hp["optimizer"] = {"_target_": "os.makedirs", "_partial_": True, "name": str(marker)}


def _scheduler(hp: dict, marker: Path) -> None:
    hp["scheduler"] = {"_target_": "os.makedirs", "_partial_": True, "name": str(marker)}


def _nested_target(hp: dict, marker: Path) -> None:
    hp["loss"] = {"label_smoothing": {"_target_": "os.makedirs", "name": str(marker)}}


def _timm_kwarg(hp: dict, marker: Path) -> None:  # timm would read this file
    hp["encoder"]["checkpoint_path"] = str(marker)


def _hub_encoder(hp: dict, marker: Path) -> None:  # timm would fetch a config from the network
    hp["encoder"]["name"] = "hf-hub:attacker/model"


def _huge_image(hp: dict, marker: Path) -> None:  # gigabytes per image
    hp["encoder"]["img_size"] = 100_000


def _huge_beam(hp: dict, marker: Path) -> None:
    hp["decoding"]["beam_size"] = 10**6


ATTACKS: dict[str, Attack] = {
    "data.loader": _data_loader,
    "decoder._target_": _decoder_module,
    "optimizer": _optimizer,
    "scheduler": _scheduler,
    "nested _target_": _nested_target,
    "encoder timm kwarg": _timm_kwarg,
    "encoder hub name": _hub_encoder,
    "encoder.img_size": _huge_image,
    "decoding.beam_size": _huge_beam,
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return demo_checkpoint(tmp_path_factory.mktemp("good") / "good.ckpt", attention=False)


@pytest.fixture
def evil_module(tmp_path, monkeypatch) -> Path:
    """An importable module whose import creates the marker (on sys.path, and PYTHONPATH for
    the CLI runs): if anything imports a name the checkpoint gives, the marker appears."""
    marker = tmp_path / "PWNED"
    (tmp_path / "imcap_evil_module.py").write_text(
        f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\nDecoder = object\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return marker


def crafted(good: Path, folder: Path, attack: Attack, marker: Path) -> Path:
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"] = copy.deepcopy(ckpt["hyper_parameters"])
    attack(ckpt["hyper_parameters"], marker)
    path = folder / "crafted.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_loader_refuses_a_checkpoint_naming_code(name, good, tmp_path, evil_module):
    from imcap.serve.engine import Engine

    marker = evil_module
    path = crafted(good, tmp_path, ATTACKS[name], marker)
    loaders = {
        "load_captioner": lambda: load_captioner(path),
        "ensemble": lambda: load_models([str(good), str(path)]),
        "serve": lambda: Engine(path),
        "Captioner.load_from_checkpoint": lambda: __import__(
            "imcap.model.module", fromlist=["Captioner"]
        ).Captioner.load_from_checkpoint(path),
    }
    for where, load in loaders.items():
        with pytest.raises(RefusedCheckpoint) as e:
            load()
        assert str(path) in str(e.value) and "\n" not in str(e.value), where
        assert not marker.exists(), where


CLI_CASES = [  # (script, its arguments, the attack): every entry point a checkpoint reaches
    ("eval.py", ["split=val"], _data_loader),  # no data=: the checkpoint's own data settings
    ("caption.py", ["images={image}"], _decoder_module),
    ("export.py", ["format=torchscript", "output={out}"], _scheduler),
    ("train.py", ["init_from={ckpt}", "debug=fast"], _optimizer),
]


@pytest.mark.parametrize("script,args,attack", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_entry_points_refuse_in_one_line(script, args, attack, good, tmp_path, evil_module):
    marker = evil_module
    path = crafted(good, tmp_path, attack, marker)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    fill = {"image": image, "out": tmp_path / "export", "ckpt": path}
    args = [a.format(**fill) for a in args]
    if script != "train.py":
        args.append(f"ckpt_path={path}")
    r = cli(script, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and "refusing checkpoint" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint(good, tmp_path, evil_module):
    """Resuming reads the checkpoint's hyperparameters too (vocabulary and shape checks)."""
    from imcap.pipeline.checks import check_resume_vocab

    path = crafted(good, tmp_path, _optimizer, evil_module)
    with pytest.raises(RefusedCheckpoint):
        check_resume_vocab(str(path), vocab=None)
    assert not evil_module.exists()


def test_resume_refuses_callback_state_naming_files_elsewhere(good, tmp_path):
    """Lightning deletes files that fall out of the top k: the state may name only its folder."""
    victim = tmp_path / "elsewhere" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    run = tmp_path / "run" / "checkpoints"
    ckpt = torch.load(good, weights_only=True)
    ckpt["callbacks"] = {
        "ModelCheckpoint{'monitor': 'val/CIDEr'}": {
            "dirpath": str(run),
            "best_model_path": str(run / "epoch_001.ckpt"),
            "best_k_models": {str(run / "epoch_001.ckpt"): 0.5, str(victim): 0.1},
        }
    }
    with pytest.raises(UserError, match="outside its folder"):
        check_callback_paths(ckpt, run / "last.ckpt")
    ckpt["callbacks"]["ModelCheckpoint{'monitor': 'val/CIDEr'}"]["best_k_models"] = {
        str(run / "epoch_001.ckpt"): 0.5
    }
    check_callback_paths(ckpt, run / "last.ckpt")  # train.py's own state passes
    assert victim.read_text() == "keep me"


def test_resume_never_reapplies_trust_checkpoint_from_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(
        json.dumps(["trust_checkpoint=true", "trainer.max_epochs=3"])
    )
    argv = resume_overrides([f"resume={run}"])
    assert "trainer.max_epochs=3" in argv
    assert not any(a.startswith("trust_checkpoint") for a in argv)
    assert "not re-applied" in capsys.readouterr().err
    argv = resume_overrides([f"resume={run}", "trust_checkpoint=true"])  # this line may
    assert "trust_checkpoint=true" in argv


def test_trust_checkpoint_is_the_only_way_past(good, tmp_path, evil_module):
    """trust_checkpoint=true loads what the file names (here: imports the module it names)."""
    path = crafted(good, tmp_path, _decoder_module, evil_module)
    with pytest.raises(UserError):  # `object` is no decoder, but the import happened
        load_captioner(path, trust=True)
    assert evil_module.exists()
