"""Run an ONNX export (`python src/export.py format=onnx`) with onnxruntime and numpy only.

No torch, timm or imcap import: this file can be copied next to an export and used alone
(`pip install onnxruntime numpy pillow`).

    from imcap.deploy import OnnxCaptioner
    cap = OnnxCaptioner("outputs/export/runs/<run>/captioner.json")
    print(cap.caption_files(["dog.jpg", "beach.jpg"]))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def preprocess(path: str | Path, pre: dict[str, Any]) -> np.ndarray:
    """One image file -> (3, H, W) float32 as the sidecar's `preprocess` says (the timm eval
    transform imcap trains with: resize the shorter side, centre crop, scale, normalise)."""
    from PIL import Image

    if pre.get("crop_mode", "center") != "center":
        raise ValueError(f"crop_mode {pre['crop_mode']!r}: this driver implements 'center' only")
    resample = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
        "lanczos": Image.Resampling.LANCZOS,
    }[pre["interpolation"]]
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    short = pre["resize_shorter_side"]
    if isinstance(short, list):  # non-square target: both sides given
        size = (short[1], short[0])
    elif w <= h:  # torchvision's Resize(int): shorter side to `short`, aspect kept (floor)
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    if size != (w, h):
        im = im.resize(size, resample)
    ch, cw = pre["center_crop"]
    left = int(round((im.width - cw) / 2.0))
    top = int(round((im.height - ch) / 2.0))
    im = im.crop((left, top, left + cw, top + ch))
    x = np.asarray(im, dtype=np.float32) * np.float32(pre["scale"])  # (H, W, 3)
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return x.transpose(2, 0, 1).copy()  # (3, H, W)


def greedy_ids(encode: Any, step: Any, images: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Greedy decoding with two onnxruntime sessions: images (B, 3, H, W) -> ids (B, T), <eos>
    included, <pad> after; exactly imcap.model.decoding.greedy (step's log-probs carry the ban)."""
    v, max_len = meta["vocab"], int(meta["decoding"]["max_len"])
    names = meta["state"]["inputs"]
    state = encode.run(None, {"images": images.astype(np.float32)})
    B = images.shape[0]
    prev = np.full(B, v["bos_id"], np.int64)  # (B,)
    done = np.zeros(B, bool)  # (B,)
    out = []
    for t in range(max_len + 1):
        logp, *state = step.run(None, {"tokens": prev, **dict(zip(names, state, strict=True))})
        word = logp.argmax(-1) if t < max_len else np.full(B, v["eos_id"], np.int64)  # (B,)
        word = np.where(done, v["pad_id"], word).astype(np.int64)
        out.append(word)
        done |= word == v["eos_id"]
        prev = word
        if done.all():
            break
    return np.stack(out, 1)  # (B, T)


def decode(ids: Sequence[int], vocab: dict[str, Any]) -> str:
    """Word ids -> caption text: stops at <eos>, skips <pad>/<bos> (as imcap's Vocab.decode)."""
    words = []
    for i in ids:
        if i == vocab["eos_id"]:
            break
        if i not in (vocab["pad_id"], vocab["bos_id"]):
            words.append(vocab["itos"][i])
    return " ".join(words)


class OnnxCaptioner:
    """An ONNX export loaded from its sidecar JSON (the files sit beside it)."""

    def __init__(self, sidecar: str | Path, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(sidecar)
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != "onnx":
            raise ValueError(f"{path} describes a {self.meta.get('format')} export, not onnx")
        providers = list(providers or ["CPUExecutionProvider"])
        files = self.meta["files"]
        self.encode = ort.InferenceSession(str(path.parent / files["encode"]), providers=providers)
        self.step = ort.InferenceSession(str(path.parent / files["step"]), providers=providers)

    def ids(self, images: np.ndarray) -> np.ndarray:
        return greedy_ids(self.encode, self.step, images, self.meta)  # (B, T)

    def captions(self, images: np.ndarray) -> list[str]:
        """Captions of preprocessed images (B, 3, H, W) float32."""
        return [decode(row.tolist(), self.meta["vocab"]) for row in self.ids(images)]

    def caption_files(self, paths: Sequence[str | Path], batch_size: int = 16) -> list[str]:
        pre, out = self.meta["preprocess"], []
        for i in range(0, len(paths), batch_size):
            batch = np.stack([preprocess(p, pre) for p in paths[i : i + batch_size]])
            out += self.captions(batch)
        return out
