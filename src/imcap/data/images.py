"""Image loading shared by feature extraction, joint training, evaluation and captioning.

A corrupt, truncated or missing image never kills a long job: with `bad_images=skip` it is
reported by file name and dropped from its batch; with `bad_images=error` it stops the job
with a message naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import logging
import re
import socket
import ssl
import sys
import tempfile
import threading
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
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
URL_DEADLINE = 20.0  # seconds for the whole download of one URL: connect, headers, body
URL_MAX_REDIRECTS = 5  # redirects followed per URL (http and https only)
URL_SCHEMES = ("http", "https")


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
        if text.lower().startswith(("http://", "https://")):
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
    """Fetch one image URL into `folder` within URL_DEADLINE seconds in all (a server that
    trickles a byte at a time cannot hold the run), at most URL_MAX_BYTES, following at most
    URL_MAX_REDIRECTS redirects and only to http(s); every error is one line naming the URL."""
    folder.mkdir(parents=True, exist_ok=True)
    name = safe_stem(Path(urllib.parse.urlsplit(url).path).name or "image", max_bytes=80)
    target = folder / f"{hashlib.sha1(url.encode()).hexdigest()[:10]}_{name}"
    data = _fetch_within(url, URL_DEADLINE)
    target.write_bytes(data)
    return target


class _Watch:
    """The sockets of one download, shut down when its deadline passes: that wakes a read
    blocked in the download thread, so a stalled server keeps no thread or connection alive."""

    def __init__(self) -> None:
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def track(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._socks.append(sock)
            late = self.expired
        if late:
            self._shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for sock in socks:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the plain socket's: no TLS state touched from here
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def connection(self, base: type[http.client.HTTPConnection]) -> type:
        """`base` with its socket tracked once connected."""
        watch = self

        class Tracked(base):  # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                watch.track(self.sock)

        return Tracked


def _opener(url: str, watch: _Watch) -> urllib.request.OpenerDirector:
    """urllib with http(s) only (no file:, ftp:, data:), tracked sockets, and checked redirects."""

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(watch.connection(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(
                watch.connection(http.client.HTTPSConnection),
                req,
                context=ssl.create_default_context(),
            )

    class Redirects(urllib.request.HTTPRedirectHandler):
        # urllib's own limits (4 visits of one URL, 10 in all) stay above ours
        max_repeats = max_redirections = URL_MAX_REDIRECTS + 2
        hops = 0

        def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001, ANN201 - urllib's
            location = headers.get("location") or headers.get("uri")
            if location:
                new = urllib.parse.urljoin(req.full_url, location.strip())
                scheme = urllib.parse.urlsplit(new).scheme.lower()
                if scheme not in URL_SCHEMES:
                    fp.close()
                    raise UserError(
                        f"cannot download {url}: it redirects to {new}, which is not an http(s) "
                        "URL (refused); fix: download the image yourself and pass the file"
                    )
                self.hops += 1
                if self.hops > URL_MAX_REDIRECTS:
                    fp.close()
                    raise UserError(
                        f"cannot download {url}: more than {URL_MAX_REDIRECTS} redirects (a "
                        "redirect loop?); fix: pass the final image URL, or download the image "
                        "yourself and pass the file"
                    )
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        HTTP(),
        HTTPS(),
        Redirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _fetch(url: str, watch: _Watch, seconds: float) -> bytes:
    """The body of `url` (runs in the download thread; `_fetch_within` enforces the deadline)."""
    try:
        with _opener(url, watch).open(url, timeout=seconds) as resp:
            size = int(resp.headers.get("Content-Length") or 0)
            if size > URL_MAX_BYTES:
                raise UserError(f"{url} is {size:,} bytes, over the {URL_MAX_BYTES:,}-byte limit")
            data = resp.read(URL_MAX_BYTES + 1)
    except UserError:
        raise
    except urllib.error.HTTPError as e:
        raise UserError(
            f"cannot download {url}: HTTP {e.code} {e.reason}; fix: check the URL, or download "
            "the image yourself and pass the file"
        ) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e or type(e).__name__
        raise UserError(
            f"cannot download {url}: {reason}. Offline? Download it and pass the file instead"
        ) from None
    if len(data) > URL_MAX_BYTES:
        raise UserError(f"{url} is over the {URL_MAX_BYTES:,}-byte limit")
    return data


def _fetch_within(url: str, seconds: float) -> bytes:
    """`_fetch` in a thread, given `seconds` in all: a per-read socket timeout alone lets a
    server that sends a byte every few seconds (or a slow DNS lookup) hold the caller forever."""
    watch = _Watch()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["data"] = _fetch(url, watch, seconds)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=work, name="imcap-download", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        watch.expire()  # wakes the blocked read; the thread then ends on its own
        raise UserError(
            f"cannot download {url}: not finished after {seconds:g} s (the server is too slow or "
            "stalls); fix: download the image yourself and pass the file"
        )
    if "error" in result:
        raise result["error"]
    return result["data"]


# -- file names from image names and dataset ids -------------------------------------------------
_UNSAFE = re.compile(r"[^\w.+=@,-]+")  # path separators, spaces, control characters, ...
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(10))}


def safe_stem(text: str, max_bytes: int = 100) -> str:
    """A file-name stem from an image name or dataset id that cannot leave its folder: no path
    separators, no `..`, no control characters, no leading dot, at most `max_bytes` UTF-8 bytes
    (a long name keeps a hash of the whole, so two long names stay distinct)."""
    text = unicodedata.normalize("NFC", str(text))
    stem = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", text)).strip("._-") or "image"
    if stem.split(".")[0].upper() in _RESERVED:  # names Windows will not create
        stem = f"_{stem}"
    if len(stem.encode()) > max_bytes:
        tag = "_" + hashlib.sha1(text.encode()).hexdigest()[:8]
        cut = stem.encode()[: max_bytes - len(tag)].decode(errors="ignore")
        stem = cut.rstrip("._-") + tag
    return stem


def unique_stems(
    keys: Sequence[str], stem_of: Callable[[str], str] = str, max_bytes: int = 100
) -> dict[str, str]:
    """Each key's `safe_stem(stem_of(key))`, distinct within `keys`, also on case-insensitive
    file systems: keys that would share a stem (paths `a/cat.jpg` and `b/cat.jpg` by their
    `Path.stem`; ids `x/y` and `x_y`) get a short hash of the whole key, so a name does not
    depend on the order of the set; a counter settles any clash left."""
    keys = list(dict.fromkeys(str(k) for k in keys))
    base = {k: safe_stem(stem_of(k), max_bytes - 9) for k in keys}
    count: dict[str, int] = {}
    for stem in base.values():
        count[stem.casefold()] = count.get(stem.casefold(), 0) + 1
    out: dict[str, str] = {}
    taken: set[str] = set()
    for k in keys:
        stem = base[k]
        if count[stem.casefold()] > 1:
            stem = f"{stem}_{hashlib.sha1(k.encode()).hexdigest()[:8]}"
        name, n = stem, 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.casefold())
        out[k] = name
    return out


def file_in(folder: str | Path, stem: str, suffix: str) -> Path:
    """`folder/stem+suffix` for a stem from `safe_stem`/`unique_stems`, checked to be directly
    inside `folder` (a last guard: a bug upstream must not write elsewhere)."""
    folder = Path(folder)
    target = folder / f"{stem}{suffix}"
    if target.parent != folder or stem in ("", ".", "..") or "/" in stem or "\\" in stem:
        raise ValueError(f"unsafe file name {stem!r} for {folder}")
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
