"""Caption datasets on disk (Flickr8k, Flickr30k, MS-COCO, and any layout a config describes).

`load_records` joins a *caption source* read by one of the registered caption readers
(`imcap.data.captions`: the original releases, Kaggle re-uploads, Karpathy's JSON, COCO's
annotation files) with a *split source* (`imcap.data.splits`: official lists, Karpathy's splits,
a deterministic hash split), and finds each image's file. Everything about a dataset's layout
(its readers in detection order and their files, image folders, split order, how a user gets
the files) is its config's `data.source` (conf/data/<name>.yaml, every key documented there):
this module has no table of datasets. The result is one `ImageRecord` per image with an
existing image file, captions raw (as in the file, stripped), sorted by split then image id so
every run sees the same order.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from imcap.data.captions import Captions, Context, Reader, get_reader
from imcap.data.records import SPLITS, ImageRecord
from imcap.data.splits import RESTVAL, SPLIT_SOURCES, choose_splits
from imcap.errors import UserError

log = logging.getLogger(__name__)

# data.source keys of every caption dataset; the readers and split sources add their own
SOURCE_KEYS = (
    "title",  # the dataset's name in messages
    "fix",  # how a user gets the files (every "not found" message says it)
    "readers",  # format -> {reader, files}: what format=auto tries, in order
    "format",  # auto | a key of readers
    "captions_file",  # optional: a caption file to read instead (format auto: sniffed)
    "image_dirs",  # the image folders looked for under root, in order
    "image_dir",  # optional: the image folder, instead of image_dirs
    "split_source",  # auto | a split source
    "split_order",  # the split sources split_source=auto tries, in order
    "group_by",  # optional: a record attribute (nocaps: domain) eval.py also scores per value of
    "evaluation_only",  # optional: an evaluation-only dataset's advice on what to train on
)


def load_records(
    name: str, root: str | Path, bad_images: str = "skip", **source: Any
) -> list[ImageRecord]:
    """All image records of dataset `name` under `root`, train then val then test, by image id.

    `source` is the dataset's data.source (its layout: conf/data/<name>.yaml as Hydra composes
    it). An image file named by the annotations but missing is left out with a warning, or with
    `bad_images="error"` (data.bad_images) stops the load naming it."""
    ctx = _context(name, root, source)
    if root is None or str(root) in ("", "???"):
        raise UserError(f"data.root is not set for {name}; fix: set data.root=/path/to/{name}")
    if not ctx.root.is_dir():
        raise UserError(
            f"{ctx.title} data folder not found: {ctx.root} (expected {describe_layout(ctx)}); "
            f"fix: {ctx.fix}, or set data.root to the folder that holds the data"
        )
    with _gc_paused():
        src = read_captions(ctx)
        splits, split_desc = choose_splits(src, ctx)
        return _assemble(src, splits, split_desc, ctx, bad_images)


def detect_year(name: str, root: str | Path, **source: Any) -> str | None:
    """The release year `load_records` would read under root (data.source.year, else the one on
    disk; None when no reader of the dataset reads years, or no file is there)."""
    ctx = _context(name, root, source)
    years = (reader.year(ctx, files) for reader, files in ctx.readers.values())
    return next((y for y in years if y is not None), None)


def available_splits(records: Iterable[ImageRecord]) -> list[str]:
    """The splits that have at least one record, in train/val/test order."""
    present = {r.split for r in records}
    return [s for s in SPLITS if s in present]


def training_refusal(name: str, root: str | Path, source: Mapping[str, Any]) -> str:
    """Why a dataset has nothing to train on, and the fix: an evaluation-only one
    (data.source.evaluation_only, e.g. nocaps) says what to train on instead."""
    advice = source.get("evaluation_only")
    if advice:
        title = source.get("title") or name
        return f"{title} is for evaluation only: it has no training split; fix: {advice}"
    return f"dataset '{name}' at {root} has no training images"


# COCO's image file names carry the image id: COCO_val2014_000000391895.jpg, 000000391895.jpg
_ID_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d*_)?0*(\d+)\.[A-Za-z]+$")


def folder_records(root: str | Path, images: Any = None, name: str = "images") -> list[ImageRecord]:
    """Images without captions (a folder, glob or list: `images`, else `root`) as a `test`
    split, so eval.py `images=<folder>` captions them the way it captions a dataset's split. A
    file named the way COCO names its images carries that id (`attributes["id"]`), so the
    results file of COCO's test2014 folder is in the caption server's format."""
    from imcap.data.images import list_images  # (torch and PIL: only when a folder is read)

    paths = list_images(images if images not in (None, "") else str(root))
    unique = len({p.name for p in paths}) == len(paths)  # else two cat.jpg: ids are paths
    records = []
    for p in paths:
        m = _ID_NAME.match(p.name)
        records.append(
            ImageRecord(
                image_id=p.name if unique else str(p),
                path=p,
                split="test",
                attributes={"id": str(int(m.group(1)))} if m else {},
            )
        )
    log.info("%s: %d images without captions from %s", name, len(records), images or root)
    return records


def describe_layout(ctx: Context) -> str:
    """One line naming the files a dataset is read from (for error messages)."""
    caps = "; or ".join(
        f"{' or '.join(reader.candidates(ctx, files))} ({reader.describe})"
        for reader, files in ctx.readers.values()
    )
    dirs = " or ".join(str(d).rstrip("/") + "/" for d in ctx.option("image_dirs"))
    return f"captions in {caps}; images under {dirs}"


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: parsing COCO's JSON makes millions of objects, and CPython's GC
    rescanning them makes json.loads ~5x slower (14 s -> 2.5 s for dataset_coco.json)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ----------------------------------------------------------------------------- options


def _context(name: str, root: str | Path | None, source: Mapping[str, Any]) -> Context:
    """data.source checked: its readers registered, no unknown key, choices valid."""
    if "readers" not in source:
        raise UserError(
            f"data.source.readers is not set for {name}: a dataset's config names its caption "
            f"readers and files (conf/data/<name>.yaml); fix: pass data={name} (a checkpoint "
            "written before its data layout was recorded needs it too)"
        )
    readers = _readers(source["readers"])
    split_keys = {k for s in SPLIT_SOURCES.values() for k in s.options}
    valid = set(SOURCE_KEYS) | split_keys | {k for r, _ in readers.values() for k in r.options}
    unknown = sorted(set(source) - valid)
    if unknown:
        raise UserError(
            f"unknown data.source key(s) {unknown} for {name}; valid keys: {sorted(valid)} "
            f"(documented in conf/data/{name}.yaml)"
        )
    ctx = Context(name, Path(str(root or ".")).expanduser(), dict(source), readers)
    choices = {
        "format": ("auto", *readers),
        "split_source": ("auto", *SPLIT_SOURCES),
        "restval": RESTVAL,
    }
    for key, allowed in choices.items():
        if key in source and str(source[key]) not in allowed:
            raise UserError(
                f"data.source.{key}={str(source[key])!r} is not valid for {name}: expected one "
                f"of {list(allowed)} (see conf/data/{name}.yaml)"
            )
    bad = [s for s in source.get("split_order") or () if s not in SPLIT_SOURCES]
    if bad:
        raise UserError(
            f"data.source.split_order names unknown split source(s) {bad} for {name}: expected "
            f"some of {list(SPLIT_SOURCES)} (see conf/data/{name}.yaml)"
        )
    return ctx


def _readers(spec: Any) -> dict[str, tuple[Reader, list[str] | None]]:
    """data.source.readers: format -> {reader: <registered name>, files: [...] | null}."""
    if not isinstance(spec, Mapping) or not spec:
        raise UserError(
            f"data.source.readers must map each format to {{reader: <name>, files: [...]}}, got "
            f"{spec!r}"
        )
    out: dict[str, tuple[Reader, list[str] | None]] = {}
    for fmt, entry in spec.items():
        if (
            not isinstance(entry, Mapping)
            or "reader" not in entry
            or set(entry) - {"reader", "files"}
        ):
            raise UserError(
                f"data.source.readers.{fmt} must be {{reader: <name>, files: [...]}} (files "
                f"optional), got {entry!r}"
            )
        files = entry.get("files")
        if isinstance(files, str):
            files = [files]
        out[str(fmt)] = (get_reader(entry["reader"]), None if files is None else list(files))
    return out


# ----------------------------------------------------------------------------- captions


def read_captions(ctx: Context) -> Captions:
    """The configured caption file, or the first of the readers' files that exists."""
    fmt = str(ctx.option("format"))
    forced = ctx.resolve(ctx.options.get("captions_file"))
    if forced is not None:
        if not forced.is_file():
            raise UserError(
                f"data.source.captions_file {forced} does not exist; fix: point it at the caption "
                f"file or set it to null to detect {describe_layout(ctx)}"
            )
        if fmt == "auto":
            fmt = _sniff(forced, ctx)
        return ctx.readers[fmt][0].read([forced], ctx)
    for f in ctx.readers if fmt == "auto" else (fmt,):
        reader, files = ctx.readers[f]
        paths = reader.find(ctx, files)
        if paths:
            return reader.read(paths, ctx)
        if fmt != "auto":
            names = " or ".join(str(ctx.resolve(n)) for n in reader.candidates(ctx, files))
            raise UserError(
                f"data.source.format={fmt} but {names} does not exist; fix: {ctx.fix}, or set "
                "data.source.format=auto"
            )
    raise UserError(
        f"no {ctx.title} caption file in {ctx.root} (expected {describe_layout(ctx)}); "
        f"fix: {ctx.fix}, or set data.root to the folder that holds the data"
    )


def _sniff(path: Path, ctx: Context) -> str:
    """The format of an explicitly given caption file: the first reader that recognises it."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        first = f.readline()
    found = next((f for f, (r, _) in ctx.readers.items() if r.sniff(path, first)), None)
    if found is None:
        raise UserError(
            f"cannot tell the format of data.source.captions_file {path}; fix: set "
            f"data.source.format to one of {list(ctx.readers)}"
        )
    return found


# ----------------------------------------------------------------------------- assembling


def _assemble(
    src: Captions, splits: dict[str, str], split_desc: str, ctx: Context, bad_images: str
) -> list[ImageRecord]:
    """Join captions and splits, find each image's file, drop images whose file is missing."""
    no_split = [i for i in src.captions if i not in splits]
    no_caps = sorted(i for i in splits if i not in src.captions)
    if no_split:
        log.info("%s: %d image(s) with captions are in no split; left out", src.path, len(no_split))
    if no_caps:
        log.warning(
            "%s: %d image(s) named by the split source have no captions in %s (e.g. %s); left out",
            ctx.title,
            len(no_caps),
            src.path,
            ", ".join(no_caps[:3]),
        )
    bases = ctx.image_bases
    if not bases:
        where = ctx.options.get("image_dir") or " or ".join(
            str(d).rstrip("/") + "/" for d in ctx.option("image_dirs")
        )
        raise UserError(
            f"no {ctx.title} image folder in {ctx.root} (expected {where}); fix: {ctx.fix}, "
            "or set data.source.image_dir"
        )
    wanted = [i for i in splits if i in src.captions]
    _refuse_escapes(src, ctx, wanted, bases[0])
    records: list[ImageRecord] = []
    missing: list[Path] = []
    for image_id in wanted:
        path, there = _locate(src.images.get(image_id, (image_id,)), bases, ctx)
        if there:
            records.append(
                ImageRecord(
                    image_id=image_id,
                    path=path,
                    captions=src.captions[image_id],
                    split=splits[image_id],
                    attributes=dict(src.attributes.get(image_id, {})),
                )
            )
        else:
            missing.append(path)
    if missing and not records:
        folders = sorted({str(p.parent) for p in missing})
        raise UserError(
            f"none of the {len(missing)} images named in {src.path} exist (looked in "
            f"{', '.join(folders[:3])}; e.g. {missing[0].name}); fix: {ctx.fix}, "
            "or set data.source.image_dir to the image folder"
        )
    if missing and bad_images == "error":
        raise UserError(
            f"{len(missing)} image file(s) named in {src.path} are missing (e.g. "
            f"{', '.join(str(p) for p in missing[:3])}); restore them, or set "
            "data.bad_images=skip to train without them"
        )
    if missing:
        log.warning(
            "%s: %d image file(s) named in %s are missing and were left out (e.g. %s)",
            ctx.title,
            len(missing),
            src.path.name,
            ", ".join(str(p) for p in missing[:3]),
        )
    order = {s: i for i, s in enumerate(SPLITS)}
    records.sort(key=lambda r: (order[r.split], r.image_id))
    counts = {s: sum(r.split == s for r in records) for s in SPLITS}
    log.info(
        "%s: %s images (%d captions) from %s (%s), splits from %s",
        ctx.title,
        " / ".join(f"{n} {s}" for s, n in counts.items() if n),
        sum(len(r.captions) for r in records),
        src.path,
        src.format,
        split_desc,
    )
    return records


def _locate(files: tuple[str, ...], bases: list[Path], ctx: Context) -> tuple[Path, bool]:
    """The first of an image's files found in an image folder; else its first, as missing."""
    for rel in files:
        for base in bases:
            path = base / rel
            if ctx.index.exists(path):
                return path, True
    return bases[0] / files[0], False


def _refuse_escapes(src: Captions, ctx: Context, ids: list[str], base: Path) -> None:
    """Image names from an annotation file must stay inside their image folder: a `../` or
    absolute `filename` would read any file on the machine. Checked on the names as written
    (no symlink resolution, so a dataset folder may be a link)."""

    def escapes(rel: str) -> bool:
        norm = os.path.normpath(rel)
        return os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep)

    escaped = [str(base / f) for i in ids for f in src.images.get(i, (i,)) if escapes(f)]
    if escaped:
        raise UserError(
            f"{len(escaped)} image path(s) named in {src.path} point outside {ctx.root} "
            f"(e.g. {', '.join(escaped[:3])}): refusing to read them; fix the annotation file, "
            "or set data.source.image_dir if the images really live elsewhere"
        )
