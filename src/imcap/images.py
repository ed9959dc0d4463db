"""Image loading shared by feature extraction, joint training, evaluation and captioning.

A corrupt, truncated or missing image never kills a long job: with `bad_images=skip` it is
reported by file name and dropped from its batch; with `bad_images=error` it stops the job
with a message naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm.data
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from imcap.errors import UserError

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("skip", "error")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def make_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Eval-style transform from a timm data config (no augmentation: captions describe layout)."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return timm.data.create_transform(
        **{k: data_config[k] for k in keys if k in data_config}, is_training=False
    )


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; raises OSError/UnidentifiedImageError when bad."""
    with Image.open(path) as im:
        im.load()  # force decoding now, so truncated files fail here
        return im.convert("RGB")


def check_policy(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise UserError(f"data.bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    return policy


class ImageFiles(Dataset):
    """Images by path -> (index, tensor); a bad file yields (index, None) under `skip`."""

    def __init__(
        self, paths: Sequence[Path], transform: Callable, bad_images: str = "skip"
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.bad_images = check_policy(bad_images)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        try:
            return i, self.transform(load_image(self.paths[i]))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            if self.bad_images == "error":
                raise UserError(
                    f"cannot read image {self.paths[i]}: {e}. Fix or remove the file, or set "
                    "data.bad_images=skip to skip unreadable images"
                ) from None
            log.warning("skipping unreadable image %s (%s)", self.paths[i], e)
            return i, None


def collate_images(items: list[tuple[int, torch.Tensor | None]]) -> dict[str, Any]:
    """Stack the good images; report the indices of good and bad ones."""
    good = [(i, x) for i, x in items if x is not None]
    bad = [i for i, x in items if x is None]
    return {
        "index": torch.tensor([i for i, _ in good], dtype=torch.long),
        "images": torch.stack([x for _, x in good]) if good else torch.empty(0),
        "bad": torch.tensor(bad, dtype=torch.long),
    }


def list_images(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """A file, a folder (its images, sorted) or a list of files -> image paths."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for s in specs:
        p = Path(str(s)).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"image not found: {p}. Give an image file or a folder of images")
    return out
