"""Figures people look at: per-word attention maps and training curves."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from imcap.data.images import load_image  # noqa: E402


def region_grid(alphas: torch.Tensor) -> torch.Tensor:
    """(T, R) attention -> (T, h, w) maps; a leading class token (ViT: R = 1 + h*w) is dropped."""
    T, R = alphas.shape
    side = math.isqrt(R)
    if side * side != R and math.isqrt(R - 1) ** 2 == R - 1:
        alphas, side = alphas[:, 1:], math.isqrt(R - 1)
    if side * side != alphas.shape[1]:
        raise ValueError(f"cannot lay out {R} attention regions as a square map")
    return alphas.reshape(T, side, side)


def attention_words(caption: str, max_len: int) -> list[str]:
    """The words that have an attention step: the caption's, plus `<eos>` only when decoding
    chose to stop (a caption cut at max_len has no end step to show)."""
    words = caption.split()
    return words + ["<eos>"] if len(words) < max_len else words


def attention_figure(
    image: str | Path,
    words: Sequence[str],
    alphas: torch.Tensor,
    target: str | Path,
    size: int = 224,
) -> Path:
    """One panel per word: the image with the region it attended to highlighted."""
    img = np.asarray(load_image(image).resize((size, size)), dtype=np.float32) / 255.0  # (H, W, 3)
    n = min(len(words), alphas.shape[0])
    maps = region_grid(alphas[:n].float())  # (n, h, w)
    up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ]  # (n, H, W)
    cols = min(5, n + 1)
    rows = math.ceil((n + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(img)
    caption = " ".join(w for w in words[:n] if w != "<eos>")
    # the whole caption above the panels, wrapped to the figure's width (~12 characters an inch)
    fig.suptitle(textwrap.fill(caption, width=max(20, int(11 * 2.0 * cols))), fontsize=10)
    for i in range(n):
        a = up[i].numpy()
        a = (a - a.min()) / (a.max() - a.min() + 1e-8)
        ax = axes.flat[i + 1]
        ax.imshow(img)
        ax.imshow(a, cmap="jet", alpha=0.5)
        ax.set_title(words[i], fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.2 * rows + 0.4)))  # room for the caption
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=72)
    plt.close(fig)
    return target


def curves_figure(history: list[dict[str, float]], target: str | Path) -> Path:
    """Training loss and validation scores per epoch."""
    epochs = [h["epoch"] for h in history]
    keys = [
        k
        for k in ("train/loss", "val/CIDEr", "val/BLEU-4", "val/METEOR")
        if any(k in h for h in history)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        ax.plot(
            [e for e, h in zip(epochs, history, strict=True) if k in h],
            [h[k] for h in history if k in h],
            marker="o",
        )
        ax.set_title(k)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target
