"""export.py: a checkpoint as TorchScript or ONNX graphs that run without imcap (see
imcap.model.export for what is exported and imcap.deploy for the onnxruntime driver)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig

from imcap.errors import UserError
from imcap.model.checkpoint import load_captioner
from imcap.model.export import FORMATS, export_model, reference_ids
from imcap.model.module import Captioner
from imcap.pipeline.runtime import output_dir, quiet_known_noise

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    """Export `ckpt_path` in `format`; returns the sidecar JSON's path."""
    fmt = str(cfg.get("format")).lower()
    if fmt not in FORMATS:  # before loading anything: a typo answers at once
        raise UserError(
            f"format={cfg.get('format')!r} is not an export format; use one of: {', '.join(FORMATS)}"
        )
    quiet_known_noise()
    model = load_captioner(cfg.ckpt_path, trust=bool(cfg.get("trust_checkpoint")))
    out = Path(str(cfg.output)).expanduser() if cfg.get("output") else output_dir(cfg)
    meta_path = export_model(model, out, fmt, source=str(cfg.ckpt_path))
    meta = json.loads(meta_path.read_text())
    for name in meta["files"].values():
        f = out / name
        print(f"{fmt}: {f} ({f.stat().st_size / 1e6:.1f} MB)")
    print(f"sidecar: {meta_path}  (vocabulary, preprocessing, decoding)")
    n = int(cfg.get("verify_images") or 0)
    if n > 0:
        same = verify(model, meta_path, n)
        if same is None:
            log.warning("not verified: `pip install onnxruntime` to run the ONNX export")
        elif same == n:
            print(f"verified: the export's greedy captions equal the checkpoint's on {n} images")
        else:
            log.warning(
                "%d of %d test images decode differently from the checkpoint (float rounding "
                "between runtimes can flip a near-tied word)",
                n - same,
                n,
            )
    return meta_path


def verify(model: Captioner, meta_path: Path, n: int, seed: int = 0) -> int | None:
    """How many of `n` random images the export captions exactly as the checkpoint (greedy);
    None when the runtime (onnxruntime) is not installed."""
    meta = json.loads(meta_path.read_text())
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *meta["preprocess"]["input_size"], generator=g) * 2 - 1  # (n, 3, H, W)
    expected = [model.vocab.decode(t) for t in reference_ids(model, images).tolist()]
    got = run_export(meta_path, images)
    if got is None:
        return None
    return sum(a == b for a, b in zip(expected, got, strict=True))


def run_export(meta_path: Path, images: torch.Tensor) -> list[str] | None:
    """Captions of preprocessed images by an export, run the way a user without imcap would."""
    meta = json.loads(meta_path.read_text())
    files = {k: meta_path.parent / v for k, v in meta["files"].items()}
    if meta["format"] == "torchscript":
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": what this format is
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(files["model"]), map_location="cpu")
        return list(module.captions(images))
    try:
        from imcap.deploy import OnnxCaptioner

        cap = OnnxCaptioner(meta_path)
    except ImportError:
        return None
    return cap.captions(images.numpy())
