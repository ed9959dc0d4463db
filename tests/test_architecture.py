"""The package's shape: layers import only downward, config mistakes are one line naming the key,
the optimizer and scheduler swap by config, and older checkpoints' hyperparameters still load."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_train, encoder_args, tiny_overrides
from omegaconf import OmegaConf

from imcap.config import group_section, model_sections, preflight
from imcap.data.text import Vocab
from imcap.errors import UserError
from imcap.model.checkpoint import upgrade_hparams
from imcap.model.module import Captioner
from imcap.pipeline.datamodule import data_options
from imcap.pipeline.run import build_model

PKG = ROOT / "src" / "imcap"
LAYERS = ["data", "eval", "model", "pipeline", "serve"]  # each may import only those before it
BASE = {"errors", "config"}  # imported by every layer, import no layer


def imcap_imports(path: Path) -> set[str]:
    """The imcap modules a file imports (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imcap."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("imcap.")}
    return found


def test_layers_import_only_downward() -> None:
    seen = 0
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for mod in imcap_imports(path):
            target = mod.split(".")[1]
            seen += 1
            if layer in BASE:
                assert target in BASE, f"{rel} imports {mod}: the base modules import no layer"
            elif layer in LAYERS and target in LAYERS:
                assert LAYERS.index(target) <= LAYERS.index(layer), f"{rel} imports {mod} (upward)"
    assert seen > 30  # the walk really saw the package's imports


def test_misspelt_key_on_the_command_line_is_one_line_naming_the_valid_keys(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        preflight("train", ["data.bach_size=8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "'data.bach_size'" in err and "batch_size" in err and "eval_batch_size" in err
    with pytest.raises(SystemExit):
        preflight("train", ["encoder=resnet5"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "encoder/resnet5" in err and "resnet50" in err
    preflight("train", ["data.batch_size=8", "decoder=gru"])  # a valid line passes silently
    assert capsys.readouterr().err == ""


def test_added_unknown_keys_are_refused_by_the_code() -> None:
    """`+data.bach_size=8` gets past Hydra; the data module and the model refuse it by name."""
    with pytest.raises(UserError, match=r"data\.bach_size.*valid keys under data: .*batch_size"):
        data_options({"name": "x", "root": "/tmp", "bach_size": 8})
    with pytest.raises(UserError, match=r"data\.vocab\.min_cont"):
        data_options({"name": "x", "root": "/tmp", "vocab": {"min_cont": 2}})
    vocab = Vocab.build([["a", "b"]], min_count=1, max_len=5).to_dict()
    with pytest.raises(UserError, match=r"model\.loss\.label_smothing"):
        Captioner(vocab, encoder_args("resnet18"), group_section("decoder", "lstm", hidden_dim=8, embed_dim=8),
                  **{**model_sections(), "loss": {"label_smothing": 0.1}})  # fmt: skip
    with pytest.raises(UserError, match=r"model\.loss lacks model\.loss\.ss_prob.*model_sections"):
        sections = model_sections()
        del sections["loss"]["ss_prob"]
        Captioner(
            vocab,
            encoder_args("resnet18"),
            group_section("decoder", "lstm", hidden_dim=8, embed_dim=8),
            **sections,
        )


def test_defaults_come_from_the_configs(tmp_path: Path) -> None:
    """A model built without a run gets conf/model/default.yaml's values (composed by Hydra,
    the one reader of config files), and they are saved."""
    vocab = Vocab.build([["a", "b"]], min_count=1, max_len=5).to_dict()
    m = Captioner(vocab, encoder_args("resnet18"), group_section("decoder", "lstm", hidden_dim=8, embed_dim=8),
                  **model_sections(loss={"label_smoothing": 0.2}))  # fmt: skip
    conf = compose_train([])
    assert m.hparams.optimizer == OmegaConf.to_container(conf.model.optimizer)
    assert m.hparams.loss == {**OmegaConf.to_container(conf.model.loss), "label_smoothing": 0.2}
    assert m.decoding == OmegaConf.to_container(conf.model.decoding, resolve=True)
    assert m.hparams.encoder_lr == conf.model.encoder_lr


def test_optimizer_and_scheduler_swap_by_config(tmp_path: Path) -> None:
    cfg = compose_train(
        tiny_overrides(
            tmp_path,
            "model.optimizer._target_=torch.optim.SGD",
            "+model.optimizer.momentum=0.9",
            "~model.optimizer.foreach",
            "model.scheduler._target_=torch.optim.lr_scheduler.StepLR",
            "~model.scheduler.warmup_steps",
            "+model.scheduler.step_size=7",
        )
    )
    model = build_model(cfg)
    out = model.configure_optimizers()  # StepLR takes no total_steps: no trainer needed
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert opt.defaults["lr"] == pytest.approx(3e-3)  # tiny_overrides' model.optimizer.lr
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and sched.step_size == 7
    model.hparams.scheduler = None  # model.scheduler=null: a constant rate
    assert isinstance(model.configure_optimizers(), torch.optim.SGD)
    model.hparams.optimizer = {**model.hparams.optimizer, "nesterov_typo": True}
    with pytest.raises(UserError, match=r"model\.optimizer \(torch\.optim\.SGD\).*nesterov_typo"):
        model.configure_optimizers()


def test_checkpoints_written_before_the_layout_change_still_load() -> None:
    old = {
        "vocab": Vocab.build([["a", "b"]], min_count=1, max_len=5).to_dict(),
        "encoder": {"name": "resnet18", "pretrained": False},  # 0.1 wrote what it was given
        "decoder": {  # imcap 0.1 wrote every key of its conf/decoder/lstm.yaml
            "_target_": "imcap.decoder.ShowTellDecoder",
            **{"rnn": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1, "dropout": 0.5},
        },
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "encoder_lr": 2e-5, "scheduler": "none"},
        "loss": {"label_smoothing": 0.1},
        "decoding": {"beam_size": 1, "max_len": 5, "length_penalty": 0.0},
        "data": {"name": "flickr8k", "loader": "imcap.datasets.load_records"},
    }
    hp = upgrade_hparams(old)
    assert hp["decoder"]["_target_"] == "imcap.model.decoders.show_tell.ShowTellDecoder"
    assert hp["data"]["loader"] == "imcap.data.datasets.load_records"
    assert hp["scheduler"] is None and hp["encoder_lr"] == 2e-5 and "optim" not in hp
    m = Captioner(**hp)
    assert m.hparams.optimizer["lr"] == 1e-3 and m.hparams.scheduler is None


def test_console_entry_points_and_python_m_imcap() -> None:
    """`make install` puts imcap-train/-eval/-caption/-export/-prepare/-serve on PATH; `python -m imcap <task>`
    works too; both answer --help without importing torch (fast) and check keys first."""
    import subprocess
    import sys

    bindir = Path(sys.executable).parent
    for name in (
        "imcap-train",
        "imcap-eval",
        "imcap-caption",
        "imcap-export",
        "imcap-prepare",
        "imcap-serve",
    ):
        assert (bindir / name).is_file(), f"{name} is not installed: run make install"
    res = subprocess.run(
        [str(bindir / "imcap-caption"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "images=FILE|DIR" in res.stdout, res.stderr[-500:]
    res = subprocess.run(
        [sys.executable, "-m", "imcap", "train", "data.bach_size=8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "data.bach_size" in res.stderr


CONFIG_READERS = {"cli.py", "config.py", "pipeline/hydra_callbacks.py"}  # the CLI layer
_READS_CONFIG = {"load", "safe_load", "full_load", "initialize_config_dir", "compose"}


def config_reads(path: Path) -> list[str]:
    """Calls in a file that read config files (OmegaConf/yaml loads, Hydra composition) and
    uses of the shipped config folder."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            if name in _READS_CONFIG and (owner in {"OmegaConf", "yaml"} or name != "load"):
                found.append(f"{name}() line {node.lineno}")
        elif isinstance(node, ast.Name) and node.id == "CONF_DIR":
            found.append(f"CONF_DIR line {node.lineno}")
    return found


def test_only_the_cli_layer_reads_config_files() -> None:
    """Defaults live once, in conf/, composed by Hydra; library code gets them as arguments."""
    readers = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if found := config_reads(path):
            readers[rel] = found
    assert set(readers) <= CONFIG_READERS, {
        k: v for k, v in readers.items() if k not in CONFIG_READERS
    }
    assert "config.py" in readers  # the scan sees the real reader


@pytest.mark.parametrize(
    "old,new",
    [
        ("imcap.model.decoder.TopDownDecoder", "imcap.model.decoders.topdown.TopDownDecoder"),
        ("imcap.model.decoder.AttentionDecoder", "imcap.model.decoders.attention.AttentionDecoder"),
        ("imcap.decoder.ShowTellDecoder", "imcap.model.decoders.show_tell.ShowTellDecoder"),
    ],
)
def test_decoder_class_paths_from_before_the_family_split_are_redirected(
    tmp_path: Path, old: str, new: str
) -> None:
    """Checkpoints name `imcap.model.decoder.X` (one module, before `imcap.model.decoders`):
    they load as data (no trust needed) into the class's new home, weights intact."""
    from imcap.model.checkpoint import load_captioner

    vocab = Vocab.build([["a", "b"]], min_count=1, max_len=5).to_dict()
    family = {"ShowTell": "lstm", "Attention": "lstm_attention", "TopDown": "topdown"}
    option = next(v for k, v in family.items() if k in new)
    small = {"hidden_dim": 8, "embed_dim": 8}
    dec = group_section(
        "decoder", option, **small, **({} if option == "lstm" else {"attention_dim": 8})
    )
    torch.manual_seed(0)
    m = Captioner(vocab, encoder_args("resnet18", img_size=64), dec, **model_sections())
    hp = {**m.hparams, "decoder": {**dec, "_target_": old}}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hp, "state_dict": m.state_dict()}, path)
    loaded = load_captioner(path)
    assert f"{type(loaded.decoder).__module__}.{type(loaded.decoder).__name__}" == new
    assert loaded.hparams.decoder["_target_"] == new
    torch.testing.assert_close(loaded.state_dict(), m.state_dict())


def test_a_checkpoint_recording_its_dataset_by_name_only_gets_that_datasets_config() -> None:
    """Checkpoints written before they recorded the whole data section (name, root, loader and
    source only) are still evaluated without data=: the dataset's config fills the rest, what
    the checkpoint recorded wins, keys the config no longer has are dropped."""
    from imcap.pipeline.datamodule import data_options
    from imcap.pipeline.run import recorded

    old = {
        "name": "flickr8k",
        "root": "/data/f8k",
        "loader": "imcap.data.datasets.load_records",
        "source": {"split_source": "hash", "layout_v0": "gone"},
    }
    data = recorded(old)
    assert data["root"] == "/data/f8k" and data["source"]["split_source"] == "hash"
    assert "layout_v0" not in data["source"] and "readers" in data["source"]
    assert data_options(data)["batch_size"] == data["batch_size"]  # a whole, valid section
    import imcap.config

    asked: list[str] = []
    real = imcap.config.data_section
    try:  # a checkpoint's dataset name never reaches Hydra's override grammar or a path
        imcap.config.data_section = lambda name, *a: asked.append(name) or real("_base")
        for hostile in ("../../etc/x", "flickr8k,coco", "${oc.env:HOME}", "x hydra.run.dir=/"):
            assert recorded({"name": hostile, "root": "/x"})["root"] == "/x"
    finally:
        imcap.config.data_section = real
    assert asked == ["_base"] * 4, asked
    mine = recorded({"name": "my_set", "root": "/x", "loader": "mypkg.load", "source": {"k": 1}})
    assert mine["loader"] == "mypkg.load" and mine["source"] == {"k": 1}  # a dataset of your own
    assert data_options(mine)["eval_batch_size"] >= 1  # _base fills the rest
    # how a machine loads is never the checkpoint's: a record asking for 100,000 workers gets ours
    hostile = recorded({**data, "num_workers": 100_000, "eval_batch_size": 10**9})
    assert hostile["num_workers"] == data["num_workers"] < 100
    assert hostile["eval_batch_size"] == data["eval_batch_size"] < 10**9


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_a_checkpoint_from_before_feature_norm_loads_with_what_its_weights_hold(
    tmp_path: Path, norm: str
) -> None:
    """Decoders gained feature_norm (default batch) after checkpoints without it were written;
    such a checkpoint has no normalisation weights, and one saved later from Python without the
    key has them: the weights say which, and both load (the first used to fail)."""
    from imcap.model.checkpoint import load_captioner

    vocab = Vocab.build([["a", "b"]], min_count=1, max_len=5).to_dict()
    dec = group_section("decoder", "lstm", hidden_dim=8, embed_dim=8, feature_norm=norm)
    m = Captioner(vocab, encoder_args("resnet18", img_size=64), dec, **model_sections())
    hp = {**m.hparams, "decoder": {k: v for k, v in dec.items() if k != "feature_norm"}}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hp, "state_dict": m.state_dict()}, path)
    loaded = load_captioner(path)
    assert loaded.hparams.decoder["feature_norm"] == norm
    torch.testing.assert_close(loaded.state_dict(), m.state_dict())


@pytest.mark.parametrize("era", ["0.1", "0.2"])
def test_checkpoints_built_from_python_by_older_releases_still_load(tmp_path: Path, era: str):
    """Older releases saved the constructor arguments as given: sections left out were None
    (their defaults applied). Such a file loads, with those defaults, weights intact."""
    from imcap.model.checkpoint import load_captioner

    vocab = Vocab.build([["a", "b"]], min_count=1, max_len=5).to_dict()
    dec = group_section("decoder", "lstm", hidden_dim=8, embed_dim=8, dropout=0.5)
    m = Captioner(vocab, encoder_args("resnet18"), dec, **model_sections())
    hp = {
        "vocab": vocab,
        "encoder": {"name": "resnet18"},
        "decoder": {"hidden_dim": 8, "embed_dim": 8},
    }
    hp |= {"loss": None, "decoding": None, "data": None}
    hp |= {"optim": None} if era == "0.1" else {"optimizer": None, "scst": None}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hp, "state_dict": m.state_dict()}, path)
    loaded = load_captioner(path)
    torch.testing.assert_close(loaded.state_dict(), m.state_dict())
    assert loaded.hparams.optimizer["lr"] == 4.0e-4 and loaded.scst["enabled"] is False
    assert loaded.decoding["beam_size"] == 1 and loaded.hparams.encoder["pretrained"] is False
