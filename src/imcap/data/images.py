"""Image loading shared by feature extraction, joint training, evaluation and captioning.

A corrupt, truncated or missing image never kills a long job: with `bad_images=skip` it is
reported by file name and dropped from its batch; with `bad_images=error` it stops the job
with a message naming the file.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import timm.data
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from imcap.errors import UserError

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("skip", "error")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def make_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Eval-style transform from a timm data config (no augmentation: captions describe layout)."""
    return timm.data.create_transform(
        **{k: data_config[k] for k in TRANSFORM_KEYS if k in data_config}, is_training=False
    )


MAX_PIXELS = 8192 * 8192  # larger images are refused before decoding (decompression bombs)


class ImageTooLarge(ValueError):
    """An image whose header declares more than MAX_PIXELS pixels (a bad image, not a crash)."""


# what a corrupt, truncated, oversized or non-image file raises: a bad image under the policy
BAD_IMAGE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


def load_image(path: str | Path | IO[bytes]) -> Image.Image:
    """Open and fully decode an image as RGB; raises one of BAD_IMAGE_ERRORS when bad.

    The pixel count is checked from the header, before any decoding, so a tiny file that
    declares a gigapixel image costs nothing (Pillow's own guard only warns below 2x its limit)."""
    with Image.open(path) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ImageTooLarge(f"{w}x{h} pixels is over the {MAX_PIXELS:,}-pixel limit")
        im.load()  # force decoding now, so truncated files fail here
        return im.convert("RGB")


def check_policy(policy: str, key: str = "data.bad_images") -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise UserError(f"{key} must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    return policy


class ImageFiles(Dataset):
    """Images by path -> (index, tensor); a bad file yields (index, None) under `skip`.

    `key` is the config key of the policy in messages (caption.py's is plain `bad_images`)."""

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable,
        bad_images: str = "skip",
        key: str = "data.bad_images",
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.bad_images, self.key = check_policy(bad_images, key), key

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        try:
            return i, self.transform(load_image(self.paths[i]))
        except BAD_IMAGE_ERRORS as e:
            if self.bad_images == "error":
                raise UserError(
                    f"cannot read image {self.paths[i]}: {e}. Fix or remove the file, or set "
                    f"{self.key}=skip to skip unreadable images"
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


URL_MAX_BYTES = 20 * 1024 * 1024  # an image URL larger than this is refused
URL_TIMEOUT = 20.0  # seconds to connect and to wait for each read


def list_images(
    spec: str | Path | Sequence[str | Path], download_dir: str | Path | None = None
) -> list[Path]:
    """Image paths from: a file, a folder (its images, sorted), a glob (`photos/*.jpg`), an
    http(s) URL (downloaded into `download_dir`), `-` (one of these per line on stdin), or a
    list of any of them."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for s in specs:
        text = str(s).strip()
        if text == "-":
            lines = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
            if not lines:
                raise UserError("images=- read no paths from standard input (one per line)")
            out += list_images(lines, download_dir)
            continue
        if text.startswith(("http://", "https://")):
            out.append(download_image(text, Path(download_dir or tempfile.mkdtemp())))
            continue
        p = Path(text).expanduser()
        if any(c in text for c in "*?[") and not p.exists():
            found = sorted(
                Path(f) for f in glob.glob(str(p), recursive=True)
                if Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(f).is_file()
            )  # fmt: skip
            if not found:
                raise UserError(f"no images match {text}")
            out += found
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"image not found: {p}. Give an image file, a folder, a glob or a URL")
    return out


def download_image(url: str, folder: Path) -> Path:
    """Fetch one image URL (size and time limited) into `folder`; errors name the URL."""
    import urllib.error
    import urllib.parse
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlparse(url).path).name or "image"
    target = folder / f"{hashlib.sha1(url.encode()).hexdigest()[:10]}_{name}"
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as resp:  # noqa: S310 - http(s) only
            size = int(resp.headers.get("Content-Length") or 0)
            if size > URL_MAX_BYTES:
                raise UserError(f"{url} is {size:,} bytes, over the {URL_MAX_BYTES:,}-byte limit")
            data = resp.read(URL_MAX_BYTES + 1)
    except UserError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"cannot download {url}: {reason}. Offline? Download it and pass the file instead"
        ) from None
    if len(data) > URL_MAX_BYTES:
        raise UserError(f"{url} is over the {URL_MAX_BYTES:,}-byte limit")
    target.write_bytes(data)
    return target


class ImageBytes(ImageFiles):
    """Joint training with `data.gpu_decode`: items are the raw file bytes; JPEGs are decoded
    on the GPU (nvJPEG) in the main process by `decode_batch`, not by CPU workers."""

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        try:
            return i, torchvision.io.read_file(str(self.paths[i]))  # (nbytes,) uint8
        except (OSError, RuntimeError) as e:
            if self.bad_images == "error":
                raise UserError(f"cannot read image {self.paths[i]}: {e}") from None
            log.warning("skipping unreadable image %s (%s)", self.paths[i], e)
            return i, None


def decode_batch(
    blobs: Sequence[torch.Tensor], device: torch.device, data_config: dict[str, Any]
) -> tuple[torch.Tensor, list[int]]:
    """Decode (on `device`), resize the short side, centre-crop and normalise like the timm
    eval transform; returns (B, 3, H, W) and the positions of blobs that failed to decode."""
    size = int(data_config["input_size"][-1])
    scale_size = int(size / float(data_config.get("crop_pct", 1.0) or 1.0))
    mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1)
    try:
        images = torchvision.io.decode_jpeg(
            list(blobs), mode=torchvision.io.ImageReadMode.RGB, device=device
        )
        bad: list[int] = []
    except RuntimeError:  # a non-JPEG or corrupt file in the batch: one at a time
        images, bad = [], []
        for k, b in enumerate(blobs):
            try:
                images.append(
                    torchvision.io.decode_image(b, mode=torchvision.io.ImageReadMode.RGB).to(device)
                )
            except RuntimeError:
                bad.append(k)
    out = []
    for im in images:
        x = im.unsqueeze(0).float()  # (1, 3, h, w)
        h, w = x.shape[-2:]
        r = scale_size / min(h, w)
        x = F.interpolate(
            x,
            size=(max(size, round(h * r)), max(size, round(w * r))),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        out.append(x[..., top : top + size, left : left + size])
    batch = (
        torch.cat(out).clamp_(0, 255).div_(255.0)
        if out
        else torch.empty(0, 3, size, size, device=device)
    )
    return (batch - mean) / std, bad
