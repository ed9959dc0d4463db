"""Uploaded bytes -> a decoded RGB image, or a `BadUpload` that names the problem and the fix.

A server must survive whatever people drop on it: an empty file, a text file, a truncated photo,
a PNG that calls itself .jpg, a tiny file declaring a gigapixel image. Each is refused with a
4xx status and one sentence before any expensive work; the format is decided by the content
(magic bytes), never by the name alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image

from imcap.data.images import BAD_IMAGE_ERRORS, MAX_PIXELS, ImageTooLarge, load_image

ACCEPTED = "a JPEG, PNG or WebP image"
EXTENSION = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
MEDIA_TYPE = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
SUFFIX_FORMAT = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
}
MEDIA_FORMAT = {
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
}


class BadUpload(Exception):
    """An upload the server refuses: an HTTP status (4xx) and a message for the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def sniff(data: bytes) -> str | None:
    """The image format the bytes are (JPEG, PNG, WEBP), or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def looks_like(data: bytes) -> str:
    """What a non-image upload probably is, for the message."""
    head = data[:16]
    known = {
        b"GIF8": "a GIF image",
        b"%PDF": "a PDF document",
        b"PK\x03\x04": "a ZIP archive (or an Office document)",
        b"BM": "a BMP image",
        b"II*\x00": "a TIFF image",
        b"MM\x00*": "a TIFF image",
    }
    for magic, name in known.items():
        if head.startswith(magic):
            return name
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "an HEIC/AVIF image or a video"
    sample = data[:2048]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return "binary data of an unknown kind"


def decode_upload(
    data: bytes, name: str = "", media_type: str | None = None, max_bytes: int = 20 << 20
) -> Image.Image:
    """Check and decode one upload; raises BadUpload (400 bad, 413 too big, 415 not an image)."""
    label = f"'{name}'" if name else "the upload"
    if not data:
        raise BadUpload(400, f"{label} is empty (0 bytes): choose {ACCEPTED}")
    if len(data) > max_bytes:
        raise BadUpload(
            413,
            f"{label} is {len(data) / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB upload "
            "limit: send a smaller image (or start the server with a larger max_upload_mb=)",
        )
    fmt = sniff(data)
    if fmt is None:
        raise BadUpload(415, f"{label} is not {ACCEPTED} (it looks like {looks_like(data)})")
    suffix = Path(name).suffix.lower() if name else ""
    claimed = SUFFIX_FORMAT.get(suffix)
    if claimed and claimed != fmt:
        raise BadUpload(
            415,
            f"{label} is a {fmt} file but its name says {claimed} ({suffix}): rename it to "
            f"{Path(name).stem}{EXTENSION[fmt]} and upload it again (a file whose name and "
            "content disagree is refused rather than guessed)",
        )
    declared = MEDIA_FORMAT.get((media_type or "").split(";")[0].strip().lower())
    if claimed is None and declared and declared != fmt:
        raise BadUpload(
            415,
            f"{label} is a {fmt} file but was sent as {media_type}: send it as "
            f"{MEDIA_TYPE[fmt]} (a file whose declared type and content disagree is refused)",
        )
    try:
        return load_image(io.BytesIO(data))  # header pixel-count check before any decoding
    except (ImageTooLarge, Image.DecompressionBombError) as e:
        # ours names WxH; Pillow's own (at open, for the hugest) names the pixel count
        m = re.search(r"(\d+x\d+) pixels|\((\d+) pixels\)", str(e))
        size = (m.group(1) or f"{int(m.group(2)):,}") if m else "more"
        raise BadUpload(
            413,
            f"{label} declares {size} pixels, over the {MAX_PIXELS:,}-pixel limit (a "
            "decompression-bomb guard: it was not decoded): downscale it and upload again",
        ) from None
    except BAD_IMAGE_ERRORS as e:
        raise BadUpload(
            400,
            f"{label} cannot be decoded as a {fmt} image ({str(e)[:120]}): the file is truncated "
            "or corrupt; re-export or re-download it",
        ) from None


def from_base64(text: str) -> tuple[bytes, str | None]:
    """Base64 or a data URL (`data:image/png;base64,...`) -> (bytes, the media type it declares)."""
    media = None
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        media = head[5:].split(";")[0] or None
        if ";base64" not in head:
            raise BadUpload(400, "a data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(text.split()), validate=True), media
    except (binascii.Error, ValueError):
        raise BadUpload(
            400,
            "the image is not valid base64: send the file's bytes base64-encoded "
            "(e.g. `base64 -w0 photo.jpg`) or as a data URL",
        ) from None
