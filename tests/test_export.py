"""export.py: TorchScript and ONNX exports caption exactly as the checkpoint (greedy), run without
imcap's model code (torch.jit.load / onnxruntime + numpy), and describe themselves in a sidecar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli, encoder_args
from PIL import Image

from imcap.config import group_section, model_sections
from imcap.data.images import make_transform
from imcap.data.synthetic import make_example, render
from imcap.data.text import Vocab, tokenize
from imcap.errors import UserError
from imcap.model.attributes import attribute_words
from imcap.model.checkpoint import load_captioner
from imcap.model.module import Captioner
from imcap.pipeline.export import run_export

ort = pytest.importorskip("onnxruntime", reason="pip install -e .[export] (make install does)")

SIZE = 64
STEPS, LR, N_TRAIN = 100, 3e-3, 32  # enough for >= 5 distinct captions on 6 images
ENCODER = "test_efficientnet"  # timm's tiny test net: the EfficientNet blocks at a fraction of the trace time
DECODERS = {  # decoder type -> (conf/decoder option, tiny changes)
    "show_tell_lstm": ("lstm", {}),
    "show_tell_gru_2layers": ("gru", {"num_layers": 2}),
    "sat_gru": ("gru_attention", {}),
    "topdown_attributes": ("topdown", {"attributes": 6}),
    "aoa_attributes": ("aoa", {"attributes": 6, "refiner_heads": 4}),
}


def images_and_refs(split: str, n: int) -> tuple[list[Image.Image], dict[int, list[list[str]]]]:
    examples = [make_example(0, split, i, SIZE) for i in range(n)]
    images = [render(scene, SIZE) for scene, _ in examples]
    return images, {i: [tokenize(c) for c in caps] for i, (_, caps) in enumerate(examples)}


def tiny_checkpoint(path: Path, decoder: tuple[str, dict]) -> Path:
    """A Captioner trained for a few steps on 32 synthetic images, saved as train.py does."""
    torch.manual_seed(0)
    pics, refs = images_and_refs("train", N_TRAIN)
    vocab = Vocab.build([c for caps in refs.values() for c in caps], max_len=12)
    option, given = decoder
    dec = group_section("decoder", option, **given, embed_dim=32, hidden_dim=48, dropout=0.0)
    if "attention_dim" in dec:
        dec["attention_dim"] = 32
    model = Captioner(
        vocab.to_dict(),
        encoder_args(ENCODER, img_size=SIZE, pretrained=False),
        dec,
        **model_sections(decoding={"max_len": 12}),
    )
    if model.attributes is not None:
        ids = attribute_words(refs, vocab.index, model.attributes.word_ids.numel())
        model.attributes.word_ids.copy_(torch.tensor(ids))
    transform = make_transform(model.encoder.data_config)
    images = torch.stack([transform(p) for p in pics])  # (N, 3, 64, 64)
    with torch.no_grad():
        feats = model.encoder(images, grid=model.decoder.uses_grid)
    shortest = {i: min(caps, key=len) for i, caps in refs.items()}
    width = max(len(c) for c in shortest.values()) + 2
    tokens = torch.zeros(N_TRAIN, width, dtype=torch.long)  # (N, T): <bos> words <eos> <pad>...
    for i, cap in shortest.items():
        ids = [vocab.bos_id, *vocab.encode(cap), vocab.eos_id]
        tokens[i, : len(ids)] = torch.tensor(ids)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for _ in range(STEPS):
        feats.attrs = None  # re-run the attribute head with gradients every step
        loss = model.caption_loss(model.with_attributes(feats), tokens)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: a second thread only adds synchronisation (and stalls for seconds
    per step when another process holds the other core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Callable[[str], Path]:
    """The tiny checkpoint of a DECODERS entry, built on first use."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = tiny_checkpoint(
                tmp_path_factory.mktemp(name) / "model.ckpt", DECODERS[name]
            )
        return made[name]

    return get


def held_out(model: Captioner) -> torch.Tensor:
    pics, _ = images_and_refs("val", 6)
    transform = make_transform(model.encoder.data_config)
    return torch.stack([transform(p) for p in pics])  # (6, 3, 64, 64)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_export_captions_exactly_as_the_checkpoint(ckpt, decoder: str, fmt: str, tmp_path: Path):
    from imcap.model.export import export_model

    model = load_captioner(ckpt(decoder))
    meta_path = export_model(model, tmp_path, fmt)
    images = held_out(model)
    expected = model.caption(images, beam_size=1)
    assert len(set(expected)) > 1, expected  # the tiny model tells images apart: a real check
    assert run_export(meta_path, images) == expected
    meta = json.loads(meta_path.read_text())
    assert meta["vocab"]["itos"] == model.vocab.tokens and meta["format"] == fmt
    assert meta["preprocess"]["mean"] == list(model.encoder.data_config["mean"])
    assert all((tmp_path / f).is_file() for f in meta["files"].values())
    if fmt == "onnx":  # ids too, <eos> and <pad> included, on a batch size not traced (2)
        from imcap.deploy import OnnxCaptioner
        from imcap.model.export import reference_ids

        ids = OnnxCaptioner(meta_path).ids(images[:5].numpy())
        assert ids.tolist() == reference_ids(model, images[:5]).tolist()


def test_torchscript_export_runs_without_imcap(ckpt, tmp_path: Path) -> None:
    """A fresh interpreter with imcap and timm hidden: the file loads and captions by itself."""
    import subprocess
    import sys

    from imcap.model.export import export_model

    model = load_captioner(ckpt("show_tell_lstm"))
    export_model(model, tmp_path, "torchscript")
    images = held_out(model)
    torch.save(images, tmp_path / "images.pt")
    code = (
        "import sys, json, torch; sys.modules['imcap'] = None; sys.modules['timm'] = None\n"
        f"m = torch.jit.load({str(tmp_path / 'captioner.pt')!r})\n"
        f"print(json.dumps(m.captions(torch.load({str(tmp_path / 'images.pt')!r}))))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1500:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == model.caption(images, beam_size=1)


def test_numpy_preprocessing_matches_the_training_transform(tmp_path: Path) -> None:
    """imcap.deploy.preprocess (PIL + numpy) == make_transform, on a non-square file."""
    from imcap.deploy import preprocess
    from imcap.model.encoder import Encoder
    from imcap.model.export import preprocessing

    scene, _ = make_example(0, "val", 0, 96)
    path = tmp_path / "wide.png"
    render(scene, 96).resize((120, 90)).save(path)
    for enc in (
        Encoder(**encoder_args("tf_efficientnet_lite0", img_size=SIZE)),
        Encoder(**encoder_args("resnet18", img_size=80)),
    ):
        ref = make_transform(enc.data_config)(Image.open(path).convert("RGB")).numpy()
        got = preprocess(path, preprocessing(enc.data_config))
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_export_command_writes_files_and_verifies(ckpt, tmp_path: Path) -> None:
    path = ckpt("sat_gru")
    res = cli("export.py", f"ckpt_path={path}", "format=onnx", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "verified: the export's greedy captions equal the checkpoint's on 4 images" in res.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"encode.onnx", "step.onnx", "captioner.json"}


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from imcap.pipeline.export import export

    def run(*overrides: str) -> str:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("export", overrides=[*overrides, f"output={tmp_path}"])
        with pytest.raises(UserError) as e:
            export(cfg)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = run(f"ckpt_path={tmp_path / 'missing.ckpt'}")
    assert "checkpoint not found" in msg and "missing.ckpt" in msg
    msg = run(f"ckpt_path={tmp_path / 'missing.ckpt'}", "format=tflite")
    assert "format='tflite'" in msg and "onnx, torchscript" in msg
    from types import SimpleNamespace

    from imcap.model.export import check_exportable

    with pytest.raises(UserError, match="cannot export decoder Linear: it declares exportable = F"):
        check_exportable(SimpleNamespace(decoder=torch.nn.Linear(2, 2)))  # not a CaptionDecoder
    res = cli("export.py", "ckpt_path=x.ckpt", "format=coreml")  # and through the entry point
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "onnx, torchscript" in res.stderr
