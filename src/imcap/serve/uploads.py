"""Uploaded bytes -> a decoded RGB image, or a `BadUpload` that names the problem and the fix.

A server must survive whatever people drop on it: an empty file, a text file, a truncated photo,
a PNG that calls itself .jpg, a tiny file declaring a gigapixel image. Each is refused with a
4xx status and one sentence before any expensive work; the format is decided by the content
(magic bytes), never by the name alone. `check_upload` reads only the header, so a request's
images can be budgeted together (`check_request_pixels`) before any of them is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from imcap.data.images import BAD_IMAGE_ERRORS, MAX_PIXELS

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


@dataclass(frozen=True)
class Header:
    """What an upload's header declares: enough to budget a request before decoding anything."""

    label: str  # how messages name it ('photo.jpg' or "the upload")
    fmt: str  # JPEG, PNG or WEBP, from the content
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _too_large(label: str, size: str, limit: int) -> BadUpload:
    return BadUpload(
        413,
        f"{label} declares {size} pixels, over the {limit:,}-pixel limit per image (a "
        "decompression-bomb guard: it was not decoded): downscale it and upload again",
    )


def _undecodable(label: str, fmt: str, e: Exception) -> BadUpload:
    return BadUpload(
        400,
        f"{label} cannot be decoded as a {fmt} image ({str(e)[:120]}): the file is truncated "
        "or corrupt; re-export or re-download it",
    )


def check_upload(
    data: bytes,
    name: str = "",
    media_type: str | None = None,
    max_bytes: int = 20 << 20,
    max_pixels: int = MAX_PIXELS,
) -> Header:
    """Everything about one upload that is known without decoding it (size, format, name and
    declared type, the pixel count in its header); raises BadUpload (400, 413 or 415)."""
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
    limit = min(max_pixels, MAX_PIXELS)
    try:  # Image.open reads the header only; the sniffed format's reader, no other
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:  # Pillow's own, at open, for the hugest
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(label, f"{int(m.group(1)):,}" if m else "more", limit) from None
    except BAD_IMAGE_ERRORS as e:
        raise _undecodable(label, fmt, e) from None
    if width * height > limit:
        raise _too_large(label, f"{width}x{height}", limit)
    return Header(label, fmt, width, height)


def check_request_pixels(headers: Sequence[Header], budget: int) -> None:
    """Refuse (413) a request whose images together declare more than `budget` pixels: what
    decoding them costs in memory and time is known from the headers, before any is decoded."""
    total = sum(h.pixels for h in headers)
    if total > budget:
        sizes = ", ".join(f"{h.width}x{h.height}" for h in headers[:4])
        more = f" and {len(headers) - 4} more" if len(headers) > 4 else ""
        raise BadUpload(
            413,
            f"the {len(headers)} image(s) of this request declare {total:,} pixels together "
            f"({sizes}{more}), over this server's budget of {budget:,} pixels per request "
            "(max_request_pixels; none was decoded): send fewer or smaller images",
        )


def decode_checked(data: bytes, header: Header) -> Image.Image:
    """Decode an upload `check_upload` passed, as RGB. An RGB file is not copied (a conversion
    would double the peak memory of a large image)."""
    try:
        with Image.open(io.BytesIO(data), formats=[header.fmt]) as im:
            if im.size != (header.width, header.height):  # the same bytes: cannot happen
                raise BadUpload(400, f"{header.label} changed size between reads")
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")
    except BAD_IMAGE_ERRORS as e:
        raise _undecodable(header.label, header.fmt, e) from None


def decode_upload(
    data: bytes,
    name: str = "",
    media_type: str | None = None,
    max_bytes: int = 20 << 20,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Check and decode one upload; raises BadUpload (400 bad, 413 too big, 415 not an image)."""
    return decode_checked(data, check_upload(data, name, media_type, max_bytes, max_pixels))


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
