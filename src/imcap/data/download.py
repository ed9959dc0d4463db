"""Fetch and unpack dataset archives: resumable HTTP download, size/checksum checks, atomic unpack.

Standard library (urllib) plus tqdm only, so `src/prepare.py` works on a bare install. A download
goes to `<file>.part` and is renamed only after its size and checksums pass, so a final archive is
never a corrupt one; a dropped connection resumes with an HTTP Range request. Unpacking goes into
a temporary folder under the target and each top-level entry is then renamed into place, so an
interrupted unpack never leaves a half-filled image folder that would look "already there".
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tqdm import tqdm

from imcap.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
JUNK = ("__MACOSX", ".DS_Store")  # macOS zip litter, never part of a layout
USER_AGENT = "imcap-prepare/0.1"


@dataclass(frozen=True)
class Archive:
    """One public archive of a dataset (an entry of `download.archives` in conf/data/<name>.yaml)."""

    name: str  # short key, used by `+urls.<name>=` overrides and in messages
    file: str | None  # archive file name (downloads are saved under it; local archives match on it)
    url: str | None = None  # None: no public direct URL (see `note`)
    size: int | None = None  # exact bytes when published
    sha256: str | None = None  # only checksums that are published; never guessed
    md5: str | None = None
    into: str = ""  # folder under data.root the archive's content goes into ("" = data.root)
    members: tuple[str, ...] = ()  # glob patterns of the members to extract (empty: all)
    flatten: bool = False  # place matched files directly in `into`, dropping their folders
    provides: tuple[str, ...] = ()  # paths under data.root; any one present = "already there"
    required: bool = True  # False: a failed download only warns (e.g. the Karpathy splits)
    year: int | None = None  # COCO: which data.source.year the archive belongs to
    note: str = ""  # where the files come from when there is no URL

    @classmethod
    def from_cfg(cls, d: Mapping[str, Any]) -> Archive:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"download.archives entry {d.get('name')!r} has unknown key(s) {unknown}; "
                f"valid keys: {sorted(known)}"
            )
        kw = dict(d)
        for key in ("members", "provides"):
            kw[key] = tuple(kw.get(key) or ())
        return cls(**kw)

    def present(self, root: Path) -> bool:
        return any((root / p).exists() for p in self.provides)


# ----------------------------------------------------------------------------- download


class _Interrupted(Exception):
    """The connection ended before the whole file arrived (resumable)."""


# Worth a resumed retry: dropped/refused connections, timeouts, DNS hiccups (URLError).
_RETRYABLE = (
    _Interrupted,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    urllib.error.URLError,
)


def fetch(
    url: str,
    dest: str | Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 5,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), check size/checksums, return `dest`.

    A `dest` that already passes the checks is kept as is (unless `force`). A failed check
    deletes the partial file and raises a UserError; the final file only ever appears complete
    and verified.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if force:
        dest.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    if dest.is_file():
        try:
            verify(dest, size=size, sha256=sha256, md5=md5, source=str(dest), progress=progress)
            log.info("%s already downloaded; kept", dest)
            return dest
        except UserError as e:
            log.warning("%s; downloading it again", e)
            dest.unlink()
    attempt = 0
    while True:
        try:
            _download_once(url, part, size=size, timeout=timeout, progress=progress)
            break
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429) and e.code < 500:
                raise UserError(
                    f"download of {url} failed: HTTP {e.code} {e.reason}; fix: check the URL "
                    f"(override with +urls.<name>=...) or download {dest.name} by hand and pass "
                    f"archives=[/path/to/{dest.name}]"
                ) from e
            err: Exception = e
        except _RETRYABLE as e:  # dropped connection, timeout, refused
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
                raise UserError(
                    f"cannot reach {urllib.parse.urlsplit(url).hostname} to download {dest.name} "
                    f"({e.reason}; offline?); fix: download {url} elsewhere and pass "
                    f"archives=[/path/to/{dest.name}]"
                ) from e
            err = e
        attempt += 1
        if attempt > retries:
            kept = (
                f"; the partial file {part} is kept, run again to resume" if part.exists() else ""
            )
            raise UserError(
                f"download of {url} failed after {retries} retries ({err}){kept}; fix: check the "
                f"network, or download {dest.name} by hand and pass archives=[/path/to/{dest.name}]"
            ) from err
        wait = retry_wait * attempt
        log.warning("download of %s interrupted (%s); resuming in %.0fs", url, err, wait)
        time.sleep(wait)
    try:
        verify(
            part, size=size, sha256=sha256, md5=md5, source=url, progress=progress, name=dest.name
        )
    except UserError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _download_once(
    url: str, part: Path, *, size: int | None, timeout: float, progress: bool
) -> None:
    """One request: append to `part` from where it stops (Range), or start over on a 200."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left after `have`: complete, or the part is bogus
            total = _range_total(e.headers.get("Content-Range"))
            if total == have or (total is None and size == have):
                return
            part.unlink()
            raise _Interrupted("server refused to resume; starting over") from e
        raise
    with resp:
        total: int | None
        if have and resp.status == 206:
            start = _range_start(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Interrupted(f"server resumed at byte {start}, not {have}; starting over")
            total = _range_total(resp.headers.get("Content-Range"))
            mode = "ab"
        else:  # a plain 200: the server ignores Range (or this is the first request)
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else size
        if size is not None and total is not None and total != size:
            raise UserError(
                f"{url} is {total} bytes but {size} are expected; fix: check the URL, or "
                "download the archive by hand and pass archives=[...]"
            )
        with (
            part.open(mode) as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    if total is not None and have < total:
        raise _Interrupted(f"connection closed after {have} of {total} bytes")


def _range_start(header: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/", header or "")
    return int(m.group(1)) if m else None


def _range_total(header: str | None) -> int | None:
    m = re.search(r"/(\d+)\s*$", header or "")
    return int(m.group(1)) if m else None


def verify(
    path: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    source: str = "",
    progress: bool = False,
    name: str | None = None,
) -> None:
    """Raise a UserError naming the file when its size or a given checksum does not match."""
    actual = path.stat().st_size
    name = name or path.name
    fix = "fix: run again to download it afresh, or get the archive by hand and pass archives=[...]"
    if size is not None and actual != size:
        raise UserError(f"{name} from {source} is {actual} bytes, expected {size}; {fix}")
    wanted = {k: v.lower() for k, v in (("sha256", sha256), ("md5", md5)) if v}
    if not wanted:
        return
    hashes = {k: hashlib.new(k) for k in wanted}
    with (
        path.open("rb") as f,
        tqdm(
            total=actual,
            unit="B",
            unit_scale=True,
            desc=f"checking {name}",
            disable=not progress,
        ) as bar,
    ):
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
            bar.update(len(chunk))
    for k, h in hashes.items():
        if h.hexdigest() != wanted[k]:
            raise UserError(
                f"{k} mismatch for {name} from {source}: expected {wanted[k]}, got "
                f"{h.hexdigest()} (corrupt or different file; not used); {fix}"
            )


# ----------------------------------------------------------------------------- unpack


def _is_junk(parts: Iterable[str]) -> bool:
    return any(p in JUNK or p.startswith("._") for p in parts)


def _target(name: str, members: tuple[str, ...], flatten: bool) -> PurePosixPath | None:
    """Relative path a member goes to, or None to skip it; refuses paths leaving the folder."""
    rel = PurePosixPath(name.replace("\\", "/"))
    parts = [p for p in rel.parts if p not in ("", ".", "/")]
    if not parts or _is_junk(parts):
        return None
    if rel.is_absolute() or ".." in parts:
        raise UserError(f"archive member {name!r} points outside the target folder; not unpacked")
    if members and not any(
        fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(parts[-1], pat) for pat in members
    ):
        return None
    return PurePosixPath(parts[-1]) if flatten else PurePosixPath(*parts)


def _entries(archive: Path) -> Iterator[tuple[str, bool, Any]]:
    """(name, is_dir, opener) for each member of a zip or tar(.gz/.bz2/.xz) archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                yield info.filename, info.is_dir(), (lambda i=info: zf.open(i))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                if m.isdir():
                    yield m.name, True, None
                elif m.isfile():
                    yield m.name, False, (lambda m=m: tf.extractfile(m))
                # links and devices are never part of a dataset layout: skipped
    else:
        raise UserError(
            f"{archive} is not a zip or tar archive (expected .zip, .tar, .tar.gz, .tgz); "
            "fix: pass the archive as downloaded"
        )


def unpack(
    archive: str | Path,
    root: str | Path,
    *,
    into: str = "",
    members: Iterable[str] = (),
    flatten: bool = False,
    force: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Extract `archive` into `root/into` via a temporary folder; return the paths placed.

    Existing files and folders are kept (merged into, for folders) unless `force`.
    """
    archive, root = Path(archive), Path(root)
    members = tuple(members)
    if not archive.is_file():
        raise UserError(f"archive {archive} does not exist; fix: check the path in archives=[...]")
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".unpack-{archive.name}-"
    for stale in root.glob(prefix + "*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        n = 0
        try:
            with tqdm(desc=f"unpacking {archive.name}", unit=" files", disable=not progress) as bar:
                for name, is_dir, opener in _entries(archive):
                    rel = _target(name, members, flatten)
                    if rel is None or (is_dir and flatten):
                        continue
                    out = tmp.joinpath(rel)
                    if is_dir:
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src: IO[bytes]
                    with opener() as src, out.open("wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    n += 1
                    bar.update()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
            raise UserError(
                f"archive {archive} is corrupt or truncated ({e}); fix: delete it and run again"
            ) from e
        if members and n == 0:
            raise UserError(
                f"archive {archive} has no member matching {list(members)}; fix: check that it is "
                "the right archive"
            )
        target = root / into if into else root
        top = [p for p in tmp.iterdir()]
        if into and len(top) == 1 and top[0].is_dir() and top[0].name == Path(into).name:
            top = list(top[0].iterdir())  # the archive already has the `into` folder
        target.mkdir(parents=True, exist_ok=True)
        placed = [_move(p, target / p.name, force) for p in top]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacked %s (%d files) into %s", archive.name, n, target)
    return [p for p in placed if p is not None]


def _move(src: Path, dst: Path, force: bool) -> Path | None:
    """Rename src to dst (atomic on one filesystem); merge folders; keep what exists unless force."""
    if dst.is_dir() and src.is_dir() and not force:
        for child in src.iterdir():
            _move(child, dst / child.name, force)
        return dst
    if dst.exists() or dst.is_symlink():
        if not force:
            log.info("kept existing %s", dst)
            return None
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    os.replace(src, dst)
    return dst


# ----------------------------------------------------------------------------- prepare


def select_archives(download: Mapping[str, Any], year: Any = None) -> list[Archive]:
    """The archives of a `download:` section, keeping only COCO's chosen year."""
    specs = [Archive.from_cfg(a) for a in download.get("archives") or []]
    if year in (None, "auto"):
        year = download.get("default_year")
    return [a for a in specs if a.year is None or year is None or str(a.year) == str(year)]


def prepare_archives(
    specs: list[Archive],
    root: str | Path,
    *,
    local: Iterable[str | Path] | None = None,
    urls: Mapping[str, str] | None = None,
    download_dir: str | Path,
    force: bool = False,
    keep_archives: bool = True,
    checksums: bool = True,
    retries: int = 5,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
    dataset: str = "",
) -> None:
    """Bring `root` into the layout: unpack local archives (offline), or fetch what is missing.

    With `local`, nothing is downloaded: archives whose file name matches a spec are verified
    and unpacked as that spec says, any other archive is unpacked into `root` as it is.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hint = f"python src/prepare.py data={dataset}" if dataset else "python src/prepare.py"
    if local:
        paths = [Path(p).expanduser() for p in local]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(
                f"archive(s) not found: {', '.join(missing)}; fix: give existing files, e.g. "
                f"{hint} archives=[/path/to/archive.zip]"
            )
        by_file = {a.file: a for a in specs if a.file}
        for p in paths:
            spec = by_file.get(p.name)
            if spec is None:
                unpack(p, root, force=force, progress=progress)
                continue
            if checksums:
                verify(p, size=spec.size, sha256=spec.sha256, md5=spec.md5, source=str(p))
            _unpack_spec(p, root, spec, force, progress)
        return
    urls = dict(urls or {})
    unknown = sorted(set(urls) - {a.name for a in specs})
    if unknown:
        raise UserError(
            f"urls has unknown archive name(s) {unknown}; valid: {[a.name for a in specs]}"
        )
    todo = [a for a in specs if force or not a.present(root)]
    for spec in todo:  # fail before any long download when something cannot be downloaded
        if spec.required and not (urls.get(spec.name) or spec.url):
            raise UserError(
                f"{spec.file or spec.name} is needed in {root} (as {' or '.join(spec.provides)}) "
                f"but has no public download URL: {spec.note or 'see conf/data/' + dataset + '.yaml'}"
            )
    for spec in specs:
        if spec not in todo:
            log.info("%s: already there (%s); skipped", spec.name, " or ".join(spec.provides))
            continue
        url = urls.get(spec.name) or spec.url
        if not url:
            log.info("%s: no download URL; skipped (optional)", spec.name)
            continue
        dest = Path(download_dir) / (spec.file or Path(url).name)
        try:
            archive = fetch(
                url,
                dest,
                size=spec.size,
                sha256=spec.sha256 if checksums else None,
                md5=spec.md5 if checksums else None,
                retries=retries,
                retry_wait=retry_wait,
                timeout=timeout,
                progress=progress,
                force=force,
            )
        except UserError as e:
            if spec.required:
                raise
            log.warning("optional archive %s not downloaded: %s", spec.name, e)
            continue
        _unpack_spec(archive, root, spec, force, progress)
        if not keep_archives:
            with contextlib.suppress(OSError):
                archive.unlink()


def _unpack_spec(archive: Path, root: Path, spec: Archive, force: bool, progress: bool) -> None:
    unpack(
        archive,
        root,
        into=spec.into,
        members=spec.members,
        flatten=spec.flatten,
        force=force,
        progress=progress,
    )
