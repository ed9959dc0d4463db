"""Every config composes: each encoder x decoder, every experiment, every entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
ENCODERS = sorted(p.stem for p in (CONF / "encoder").glob("*.yaml"))
DECODERS = sorted(p.stem for p in (CONF / "decoder").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_cfg(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def resolve(cfg) -> dict:
    """Resolve every interpolation, as a run would (output_dir set, the hydra node left out)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/imcap-test-out"
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True)


def test_groups_exist() -> None:
    assert {
        "vgg16",
        "resnet18",
        "resnet50",
        "resnet101",
        "inception_v3",
        "efficientnet_lite0",
    } <= set(ENCODERS)
    assert {"lstm", "gru"} <= set(DECODERS)
    for group in (
        "data",
        "model",
        "trainer",
        "callbacks",
        "logger",
        "paths",
        "hydra",
        "experiment",
        "debug",
    ):
        assert any((CONF / group).glob("*.yaml")), group
    assert {"default", "cpu", "gpu", "ddp"} <= {p.stem for p in (CONF / "trainer").glob("*.yaml")}
    assert {"csv", "tensorboard", "wandb"} <= {p.stem for p in (CONF / "logger").glob("*.yaml")}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_encoder_decoder_compose(encoder: str, decoder: str) -> None:
    cfg = resolve(compose_cfg("train", [f"encoder={encoder}", f"decoder={decoder}"]))
    assert cfg["encoder"]["name"]
    assert cfg["decoder"]["_target_"].startswith("imcap.model.decoders.")
    assert cfg["trainer"]["_target_"].endswith("Trainer")
    assert cfg["callbacks"]["model_checkpoint"]["monitor"] == "val/CIDEr"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_files_compose_and_document_their_command(experiment: str) -> None:
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    comments = [
        line for line in text.splitlines() if line.startswith("#") and "@package" not in line
    ]
    assert comments and f"experiment={experiment}" in comments[0], (
        "first comment must be the command"
    )
    cfg = resolve(compose_cfg("train", [f"experiment={experiment}"]))
    assert cfg["mode"] in ("two_step", "joint")


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many"])
def test_trainer_and_logger_compose(trainer: str, logger: str) -> None:
    cfg = resolve(compose_cfg("train", [f"trainer={trainer}", f"logger={logger}"]))
    assert cfg["trainer"]["_target_"].endswith("Trainer")


def test_eval_and_caption_compose() -> None:
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", "data=synthetic", "model.beam_size=3"])
    assert cfg.model.beam_size == 3 and cfg.data.name == "synthetic"
    cfg = compose_cfg("caption", ["ckpt_path=x.ckpt", "images=a.jpg"])
    assert cfg.images == "a.jpg"


def test_serve_composes_and_is_local_by_default() -> None:
    cfg = compose_cfg("serve", [])
    assert cfg.host == "127.0.0.1" and cfg.ckpt_path is None and not cfg.trust_checkpoint
    assert cfg.max_upload_mb > 0 and cfg.model.beam_size is None
    cfg = compose_cfg("serve", ["ckpt_path=x.ckpt", "port=9000", "model.beam_size=3"])
    assert cfg.port == 9000 and cfg.model.beam_size == 3


def test_runtime_values_are_missing_until_filled() -> None:
    base = OmegaConf.load(CONF / "data" / "_base.yaml")
    assert OmegaConf.is_missing(base, "name") and OmegaConf.is_missing(base, "root")


def test_debug_fast_shrinks_the_run() -> None:
    """`debug=fast` must reach the global keys (its `# @package _global_` header has to be the
    first line, or Hydra nests everything under `debug.` and the run stays full size)."""
    full = resolve(compose_cfg("train", []))
    fast = resolve(compose_cfg("train", ["debug=fast"]))
    assert "debug" not in fast
    assert fast["trainer"]["max_epochs"] == 1 < full["trainer"]["max_epochs"]
    assert fast["trainer"]["limit_train_batches"] == 4
    assert fast["data"]["max_train_images"] == 64 and full["data"]["max_train_images"] is None
    assert fast["data"]["max_eval_images"] == 16


def test_debug_fast_run_is_quick_and_logs_lines_not_bar_redraws(tmp_path: Path) -> None:
    from conftest import cli

    res = cli(
        "train.py",
        "debug=fast",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    log = res.stdout + res.stderr  # not a terminal: no progress-bar redraws
    assert len(log.encode()) < 50_000 and "\r" not in log
    # the model summary, once, without Lightning's column of zero FLOPs (no example input)
    assert log.count("Total params") == 1 and "Total Flops" not in log and "FLOPs" not in log
    assert (tmp_path / "run" / "metrics.json").exists()
