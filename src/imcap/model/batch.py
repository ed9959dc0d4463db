"""The one batch type the model sees, in both data modes and every stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch


@dataclass
class Batch:
    """Images, or their cached features, with the rows and ids of those images.

    Joint mode fills `images` (the encoder runs every step); two-step mode fills `pooled` and,
    for attention decoders, `grid`. Training batches also carry `tokens`, one caption per item
    (an image appears once per sampled caption). Lightning moves the tensors to the device.
    """

    rows: torch.Tensor  # (B,) image rows of the data module's table (SCST references, targets)
    image_ids: list[str] = field(default_factory=list)  # B ids: scoring, samples, figures
    tokens: torch.Tensor | None = None  # (B, T+2) <bos> w1..wn <eos> <pad>..; training only
    images: torch.Tensor | None = None  # (B, 3, H, W) transformed images (joint mode)
    pooled: torch.Tensor | None = None  # (B, C) cached pooled features (two-step mode)
    grid: torch.Tensor | None = None  # (B, R, C') cached feature map (two-step, attention)
    # (B,) bool: items whose image is seen mirrored left-right (data.hflip; training only): their
    # features/images are the mirror's and their tokens already say right for left
    flipped: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.rows.numel())

    def with_(self, **changes) -> Batch:
        """A copy with some fields replaced (batches are built in steps by the data module)."""
        return replace(self, **changes)


@dataclass
class DataLink:
    """What the model (and its callbacks) need from the data, handed over by the data module's
    `setup` (`Captioner.connect`): nothing is read through `trainer.datamodule`."""

    mode: str  # two_step | joint
    eval_split: str  # the split `trainer.test` scores
    train_references: Callable[[], dict[int, list[list[str]]]]  # row -> tokenized captions
    references: Callable[[str], dict[str, list[str]]]  # split -> image id -> raw captions
    image_path: Callable[[str], Path]  # image id -> file (figures, sample tables)
    eval_batch: Callable[[list[str], torch.device], Batch]  # chosen images as one batch
    bad_counts: Mapping[str, int]  # unreadable images skipped so far, by stage
