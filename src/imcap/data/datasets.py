"""Caption-dataset loaders: Flickr8k, Flickr30k and MS-COCO in the layouts users actually have.

A loader joins two things found under `root`: a *caption source* (the original release, a Kaggle
re-upload, Karpathy's JSON or COCO's annotation files) and a *split source* (the official split
lists, Karpathy's splits, or a deterministic hash split). Both are detected from the files present
(`format: auto`, `split_source: auto`) and can be forced from `data.source` in
`conf/data/<name>.yaml`, where every key and the detection order are documented. The result is
one `ImageRecord` per image with existing image file, captions raw (as in the file, stripped),
sorted by split then image id so every run sees the same order.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imcap.config import conf_defaults
from imcap.data.records import SPLITS, ImageRecord
from imcap.errors import UserError

log = logging.getLogger(__name__)

SPLIT_SOURCES = ("auto", "official", "karpathy", "hash")
RESTVAL = ("train", "drop")


@dataclass(frozen=True)
class Layout:
    """Where one dataset's files live in each layout we read (candidates tried in order)."""

    title: str
    captions: dict[str, tuple[str, ...]]  # format -> candidate files; key order = auto order
    image_dirs: tuple[str, ...]  # candidate image folders (Flickr); COCO derives them from the year
    split_order: tuple[str, ...]  # what split_source=auto tries, in order
    fix: str  # how a user gets the files

    def formats(self) -> tuple[str, ...]:
        return ("auto", *self.captions)


LAYOUTS: dict[str, Layout] = {
    "flickr8k": Layout(
        title="Flickr8k",
        captions={
            "official": ("Flickr8k_text/Flickr8k.token.txt", "Flickr8k.token.txt"),
            "kaggle": ("captions.txt",),
            "karpathy": (),  # = data.source.karpathy_json
        },
        image_dirs=("Images", "Flicker8k_Dataset", "Flickr8k_Dataset"),
        split_order=("official", "karpathy", "hash"),
        fix="run `python src/prepare.py data=flickr8k`",
    ),
    "flickr30k": Layout(
        title="Flickr30k",
        captions={
            "official": (
                "results_20130124.token",
                "flickr30k/results_20130124.token",
                "results.token",
            ),
            "kaggle": ("results.csv", "flickr30k_images/results.csv", "captions.txt"),
            "karpathy": (),
        },
        image_dirs=(
            "flickr30k-images",
            "Images",
            "flickr30k_images/flickr30k_images",
            "flickr30k_images",
        ),
        split_order=("karpathy", "official", "hash"),
        fix=(
            "Flickr30k has no public direct download: get the archives (Illinois form or Kaggle) "
            "and run `python src/prepare.py data=flickr30k archives=[/path/to/archive,...]`"
        ),
    ),
    "coco": Layout(
        title="MS-COCO",
        captions={
            "official": ("annotations/captions_{train,val}<year>.json",),
            "karpathy": (),
        },
        image_dirs=(".", "images"),  # folders holding train<year>/ and val<year>/
        split_order=("karpathy", "official", "hash"),
        fix="run `python src/prepare.py data=coco`",
    ),
}

_STRAY_ID = re.compile(r"^(.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)  # 2258277193_586949ec62.jpg.1
_NUMBERED = re.compile(r"^\s*(\d+)\s+(.*)$", re.DOTALL)  # results.csv row "4   A dog runs ..."


def load_records(
    name: str, root: str | Path, bad_images: str = "skip", **source: Any
) -> list[ImageRecord]:
    """All image records of dataset `name` under `root`, train then val then test, by image id.

    An image file named by the annotations but missing is left out with a warning, or with
    `bad_images="error"` (data.bad_images) stops the load naming it."""
    if name not in LAYOUTS:
        raise UserError(f"unknown dataset {name!r}: expected one of {sorted(LAYOUTS)} (data=...)")
    opts = {**_options(name, source), "bad_images": bad_images}
    if root is None or str(root) in ("", "???"):
        raise UserError(f"data.root is not set for {name}; fix: set data.root=/path/to/{name}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"{LAYOUTS[name].title} data folder not found: {root} (expected {describe_layouts(name)}); "
            f"fix: {LAYOUTS[name].fix}, or set data.root to the folder that holds the data"
        )
    loader = _load_coco if name == "coco" else _load_flickr
    with _gc_paused():
        return loader(name, root, opts)


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


def available_splits(records: Iterable[ImageRecord]) -> list[str]:
    """The splits that have at least one record, in train/val/test order."""
    present = {r.split for r in records}
    return [s for s in SPLITS if s in present]


def describe_layouts(name: str) -> str:
    """One line naming the layouts `name` is read from (for error messages)."""
    lay = LAYOUTS[name]
    karpathy = conf_defaults(f"data/{name}", "source")["karpathy_json"]
    if name == "coco":
        return (
            "annotations/captions_{train,val}{2014,2017}.json with train2014/ val2014/ "
            f"(or train2017/ val2017/) image folders, or {karpathy} (Karpathy) with the image folders"
        )
    parts = {
        "official": " or ".join(lay.captions["official"][:2]) + " (original release)",
        "kaggle": " or ".join(lay.captions["kaggle"]) + " (Kaggle)",
        "karpathy": f"{karpathy} (Karpathy)",
    }
    dirs = " or ".join(d + "/" for d in lay.image_dirs)
    return f"an image folder {dirs} plus captions in {', '.join(parts.values())}"


# ----------------------------------------------------------------------------- options


def _options(name: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """data.source merged over the defaults of conf/data/<name>.yaml (the one place they are
    written), validated: unknown keys and values are user errors."""
    defaults = conf_defaults(f"data/{name}", "source")
    unknown = sorted(set(source) - set(defaults))
    if unknown:
        raise UserError(
            f"unknown data.source key(s) {unknown} for {name}; valid keys: {sorted(defaults)} "
            f"(documented in conf/data/{name}.yaml)"
        )
    opts = dict(defaults)
    for key, value in source.items():
        if isinstance(defaults[key], dict):
            opts[key] = {**defaults[key], **dict(value or {})}
        else:
            opts[key] = value
    choices = {
        "format": LAYOUTS[name].formats(),
        "split_source": SPLIT_SOURCES,
        "restval": RESTVAL,
        "year": ("auto", "2014", "2017"),
    }
    for key, allowed in choices.items():
        if key in opts:
            opts[key] = str(opts[key])
            if opts[key] not in allowed:
                raise UserError(
                    f"data.source.{key}={opts[key]!r} is not valid for {name}: expected one of "
                    f"{list(allowed)} (see conf/data/{name}.yaml)"
                )
    return opts


def _resolve(root: Path, rel: str | os.PathLike[str] | None) -> Path | None:
    """`rel` under root (or absolute); None when not configured."""
    if rel is None or str(rel) == "":
        return None
    p = Path(rel).expanduser()
    return p if p.is_absolute() else root / p


# ----------------------------------------------------------------------------- file readers


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
            f"fix: re-download it ({LAYOUTS[name].fix})"
        ) from e
    except OSError as e:
        raise UserError(f"cannot read caption file {path}: {e.strerror}") from e


@dataclass
class _Parsed:
    captions: dict[str, list[str]]
    bad_lines: list[int]
    empty: int


def _check_parsed(parsed: _Parsed, path: Path, name: str, expected: str) -> dict[str, list[str]]:
    """Refuse a file with no usable caption; warn about skipped lines and empty captions."""
    if not parsed.captions:
        what = "is empty" if not parsed.bad_lines and not parsed.empty else "has no valid line"
        raise UserError(
            f"caption file {path} {what} (expected {expected}); "
            f"fix: re-download it ({LAYOUTS[name].fix}) or point data.root at a complete copy"
        )
    if parsed.bad_lines:
        first = ", ".join(map(str, parsed.bad_lines[:5]))
        log.warning(
            "%s: skipped %d malformed line(s) (lines %s%s; expected %s)",
            path,
            len(parsed.bad_lines),
            first,
            ", ..." if len(parsed.bad_lines) > 5 else "",
            expected,
        )
    if parsed.empty:
        log.warning("%s: dropped %d empty caption(s)", path, parsed.empty)
    return parsed.captions


def _image_key(raw: str) -> str:
    """Image file name from a caption file's id column, mapping the release's stray `x.jpg.1`."""
    key = raw.strip()
    m = _STRAY_ID.match(key)
    return m.group(1) if m else key


def read_token_file(path: Path, name: str = "flickr8k") -> dict[str, list[str]]:
    """`<image>#<n><TAB><caption>` lines (Flickr8k.token.txt, results_20130124.token)."""
    parsed = _Parsed(defaultdict(list), [], 0)
    for lineno, line in enumerate(_read_text(path, name).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:  # some copies have the tab turned into spaces
            key, _, caption = line.strip().partition(" ")
        image, hash_, _n = key.rpartition("#")
        image = _image_key(image)
        if not hash_ or not image:
            parsed.bad_lines.append(lineno)
            continue
        caption = caption.strip()
        if caption:
            parsed.captions[image].append(caption)
        else:
            parsed.empty += 1
    return _check_parsed(parsed, path, name, "`<image>#<n><TAB><caption>` lines")


def read_kaggle(path: Path, name: str = "flickr8k") -> dict[str, list[str]]:
    """Kaggle captions: CSV `image,caption` (captions.txt) or `image_name| comment_number| comment`
    (Flickr30k results.csv, which has rows with the comment number fused into the comment)."""
    text = _read_text(path, name)
    header = next((ln for ln in text.splitlines() if ln.strip()), "")
    parsed = _Parsed(defaultdict(list), [], 0)
    if "|" in header:
        expected = "`image_name| comment_number| comment` rows"
        lines = text.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.strip()) + 1
        for lineno, line in enumerate(lines[start:], start + 1):
            if not line.strip():
                continue
            image, *rest = line.split("|")
            image = _image_key(image)
            if not image or not rest:
                parsed.bad_lines.append(lineno)
                continue
            if len(rest) == 1:  # "img| 4   A dog runs ..." : number and comment fused
                m = _NUMBERED.match(rest[0])
                caption = m.group(2) if m else rest[0]
            else:
                caption = "|".join(rest[1:])
            _add(parsed, image, caption)
    elif header.replace(" ", "").lower().startswith("image,caption"):
        expected = "a CSV with header `image,caption`"
        reader = csv.reader(io.StringIO(text))
        next(reader)
        for row in reader:
            if not row or not any(f.strip() for f in row):
                continue
            image = _image_key(row[0])
            if len(row) < 2 or not image:
                parsed.bad_lines.append(reader.line_num)
                continue
            _add(parsed, image, ",".join(row[1:]))  # unquoted commas: keep the whole caption
    else:
        if not text.strip():
            return _check_parsed(parsed, path, name, "a CSV with header `image,caption`")
        raise UserError(
            f"caption file {path} has an unknown header {header[:60]!r} (expected `image,caption` "
            f"for Kaggle captions.txt or `image_name| comment_number| comment` for results.csv); "
            f"fix: re-download it ({LAYOUTS[name].fix})"
        )
    return _check_parsed(parsed, path, name, expected)


def _add(parsed: _Parsed, image: str, caption: str) -> None:
    caption = caption.strip()
    if caption:
        parsed.captions[image].append(caption)
    else:
        parsed.empty += 1


def read_karpathy(path: Path, name: str) -> list[dict[str, Any]]:
    """The `images` list of a Karpathy split file (dataset_{flickr8k,flickr30k,coco}.json)."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise UserError(f"cannot read Karpathy split file {path}: {e.strerror}") from e
    except ValueError as e:
        raise UserError(
            f"Karpathy split file {path} is not valid JSON ({e}); "
            f"fix: re-download caption_datasets.zip ({LAYOUTS[name].fix})"
        ) from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise UserError(
            f"Karpathy split file {path} has no `images` list (expected "
            f"images[].filename/split/sentences[].raw); fix: re-download caption_datasets.zip "
            f"({LAYOUTS[name].fix})"
        )
    return images


def _karpathy_captions(images: list[dict[str, Any]], key: str) -> tuple[dict, _Parsed]:
    """(image id -> entry, parsed captions) from Karpathy `images`, keyed by filename or cocoid."""
    parsed = _Parsed({}, [], 0)
    entries: dict[str, dict[str, Any]] = {}
    for i, im in enumerate(images):
        try:
            image_id = str(im[key]) if key == "cocoid" else _image_key(im[key])
            sentences = im.get("sentences") or []
        except (KeyError, TypeError, AttributeError):
            parsed.bad_lines.append(i)
            continue
        try:  # fast path: every sentence has its raw text
            caps = [s["raw"].strip() for s in sentences]
        except (KeyError, TypeError, AttributeError):
            caps = [_sentence_text(s) for s in sentences]
        n = len(caps)
        caps = [c for c in caps if c]
        parsed.empty += n - len(caps)
        if caps:
            parsed.captions[image_id] = caps
            entries[image_id] = im
    return entries, parsed


def _sentence_text(s: Any) -> str:
    """A Karpathy sentence's raw text, else its tokens joined; "" when it has neither."""
    if not isinstance(s, dict):
        return ""
    raw = s.get("raw")
    if not isinstance(raw, str):
        raw = " ".join(s.get("tokens") or [])
    return raw.strip()


def karpathy_splits(
    images: list[dict[str, Any]], key: str, restval: str, path: Path
) -> dict[str, str]:
    """image id -> split from a Karpathy file; `restval` is folded into train or dropped."""
    splits: dict[str, str] = {}
    odd = 0
    for im in images:
        try:
            image_id = str(im[key]) if key == "cocoid" else _image_key(im[key])
            split = im["split"]
        except (KeyError, TypeError):
            odd += 1
            continue
        if split == "restval":
            if restval == "drop":
                continue
            split = "train"
        if split not in SPLITS:
            odd += 1
            continue
        splits[image_id] = split
    if odd:
        log.warning("%s: ignored %d image(s) without a train/val/test/restval split", path, odd)
    return splits


def read_split_lists(
    root: Path, lists: Mapping[str, str | None]
) -> tuple[dict[str, str], list[Path]] | None:
    """image name -> split from one-name-per-line lists (Flickr8k official, Flickr30k Entities).

    A list is looked up at its configured path, then by its bare file name in root. Names without
    an extension (Flickr30k Entities `1000092795`) get `.jpg`. None when no list file exists.
    """
    splits: dict[str, str] = {}
    used: list[Path] = []
    for split, rel in lists.items():
        if split not in SPLITS:
            raise UserError(
                f"data.source.split_lists has a key {split!r}: expected train, val and/or test"
            )
        path = _resolve(root, rel)
        if path is None:
            continue
        if not path.is_file() and (root / path.name).is_file():
            path = root / path.name
        if not path.is_file():
            continue
        used.append(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(
                f"split list {path} is not UTF-8 text ({e.reason} at byte {e.start}); fix: "
                "re-download it, or set data.source.split_lists.<split>=null to ignore it"
            ) from None
        except OSError as e:
            raise UserError(f"cannot read split list {path}: {e.strerror}") from None
        for line in text.split():
            image = _image_key(line)
            if "." not in image:
                image += ".jpg"
            other = splits.get(image)
            if other is not None and other != split:
                raise UserError(
                    f"image {image} is in both the {other} and the {split} split lists ({path}); "
                    "fix: remove it from one of them"
                )
            splits[image] = split
    return (splits, used) if used else None


def hash_splits(ids: Iterable[str], val: float, test: float, seed: int) -> dict[str, str]:
    """Deterministic split by sha1(seed:image_id): the first `test` ids are test, next `val` are
    val, the rest train. Sizes are counts, or fractions of all images when below 1."""
    ranked = sorted(ids, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).digest())
    n = len(ranked)
    n_test, n_val = (round(x * n) if 0 < x < 1 else int(x) for x in (test, val))
    if n_test + n_val >= n:
        raise UserError(
            f"hash split of {n} images cannot hold {n_val} val + {n_test} test images; "
            "fix: set smaller data.source.hash_split.val/test (counts, or fractions below 1)"
        )
    out = dict.fromkeys(ranked[:n_test], "test")
    out.update(dict.fromkeys(ranked[n_test : n_test + n_val], "val"))
    out.update(dict.fromkeys(ranked[n_test + n_val :], "train"))
    return out


class _DirIndex:
    """Membership tests for image files: one listdir per folder instead of a stat per image."""

    def __init__(self) -> None:
        self._dirs: dict[str, set[str]] = {}

    def names(self, folder: str) -> set[str]:
        if folder not in self._dirs:
            try:
                self._dirs[folder] = set(os.listdir(folder))
            except OSError:
                self._dirs[folder] = set()
        return self._dirs[folder]

    def exists(self, path: Path) -> bool:
        folder, name = os.path.split(path)  # str ops: 10x cheaper than Path.parent / .name
        return name in self.names(folder)


# ----------------------------------------------------------------------------- assembling


@dataclass
class _Source:
    """Captions from one caption source, with the image path of each id."""

    name: str
    path: Path  # the caption file (for messages)
    format: str
    captions: dict[str, list[str]]
    paths: dict[str, Path]
    own_official: dict[str, str] | None = None  # COCO: train/val by annotation file
    own_karpathy: dict[str, str] | None = None  # the caption file is the Karpathy JSON


def _choose_splits(src: _Source, root: Path, opts: dict[str, Any]) -> tuple[dict[str, str], str]:
    """image id -> split from the configured split source (auto: first available, see yaml)."""
    name, choice = src.name, opts["split_source"]
    order = LAYOUTS[name].split_order if choice == "auto" else (choice,)
    key = "cocoid" if name == "coco" else "filename"
    for how in order:
        if how == "karpathy":
            if src.own_karpathy is not None:
                return src.own_karpathy, f"Karpathy splits in {src.path.name}"
            path = _resolve(root, opts["karpathy_json"])
            if path is not None and path.is_file():
                images = read_karpathy(path, name)
                return karpathy_splits(images, key, opts["restval"], path), f"{path.name}"
            missing = f"the Karpathy split file {path}"
        elif how == "official":
            if name == "coco":
                return src.own_official or {}, "the COCO train/val folders"
            found = read_split_lists(root, opts["split_lists"])
            if found is not None:
                splits, used = found
                return splits, ", ".join(p.name for p in used)
            missing = "the split lists " + ", ".join(
                str(v) for v in opts["split_lists"].values() if v
            )
        else:  # hash
            h = opts["hash_split"]
            splits = hash_splits(src.captions, h["val"], h["test"], int(h["seed"]))
            msg = (
                f"a deterministic hash split (seed {h['seed']}: {h['val']} val, {h['test']} test, "
                "rest train)"
            )
            if choice == "auto":
                log.warning(
                    "%s: %s has no split and no split file was found under %s (tried: %s); using "
                    "%s. It is NOT the standard split, so scores are not comparable to papers; "
                    "add %s for the standard split",
                    LAYOUTS[name].title,
                    src.path.name,
                    root,
                    ", ".join(o for o in order if o != "hash"),
                    msg,
                    opts["karpathy_json"],
                )
            return splits, msg
        if choice != "auto":
            raise UserError(
                f"data.source.split_source={choice} but {missing} is not there; fix: add it, or "
                f"set data.source.split_source=auto ({LAYOUTS[name].fix})"
            )
    raise AssertionError("split_order ends with hash")  # pragma: no cover


def _assemble(
    src: _Source, root: Path, opts: dict[str, Any], index: _DirIndex | None = None
) -> list[ImageRecord]:
    """Join captions and splits, drop images whose file is missing, sort."""
    splits, split_desc = _choose_splits(src, root, opts)
    no_split = [i for i in src.captions if i not in splits]
    no_caps = sorted(i for i in splits if i not in src.captions)
    if no_split:
        log.info("%s: %d image(s) with captions are in no split; left out", src.path, len(no_split))
    if no_caps:
        log.warning(
            "%s: %d image(s) named by the split source have no captions in %s (e.g. %s); left out",
            LAYOUTS[src.name].title,
            len(no_caps),
            src.path,
            ", ".join(no_caps[:3]),
        )
    _refuse_escapes(src, root, opts, splits)
    index = index or _DirIndex()
    records: list[ImageRecord] = []
    missing: list[Path] = []
    for image_id, split in splits.items():
        caps = src.captions.get(image_id)
        if caps is None:
            continue
        path = src.paths[image_id]
        if index.exists(path):
            records.append(ImageRecord(image_id=image_id, path=path, captions=caps, split=split))
        else:
            missing.append(path)
    if missing and not records:
        folders = sorted({str(p.parent) for p in missing})
        raise UserError(
            f"none of the {len(missing)} images named in {src.path} exist (looked in "
            f"{', '.join(folders[:3])}; e.g. {missing[0].name}); fix: {LAYOUTS[src.name].fix}, "
            "or set data.source.image_dir to the image folder"
        )
    if missing and opts.get("bad_images") == "error":
        raise UserError(
            f"{len(missing)} image file(s) named in {src.path} are missing (e.g. "
            f"{', '.join(str(p) for p in missing[:3])}); restore them, or set "
            "data.bad_images=skip to train without them"
        )
    if missing:
        log.warning(
            "%s: %d image file(s) named in %s are missing and were left out (e.g. %s)",
            LAYOUTS[src.name].title,
            len(missing),
            src.path.name,
            ", ".join(str(p) for p in missing[:3]),
        )
    order = {s: i for i, s in enumerate(SPLITS)}
    records.sort(key=lambda r: (order[r.split], r.image_id))
    counts = {s: sum(r.split == s for r in records) for s in SPLITS}
    log.info(
        "%s: %s images (%d captions) from %s (%s), splits from %s",
        LAYOUTS[src.name].title,
        " / ".join(f"{n} {s}" for s, n in counts.items() if n),
        sum(len(r.captions) for r in records),
        src.path,
        src.format,
        split_desc,
    )
    return records


def _refuse_escapes(src: _Source, root: Path, opts: dict[str, Any], splits: Mapping) -> None:
    """Image names from an annotation file must stay inside data.root (or the configured
    image_dir): a `../` or absolute `filename` would read any file on the machine. Checked on
    the names as written (no symlink resolution, so a dataset folder may be a link)."""
    bases = [os.path.normpath(root)]
    image_dir = _resolve(root, opts.get("image_dir"))
    if image_dir is not None:
        bases.append(os.path.normpath(image_dir))

    def inside(p: Path) -> bool:
        q = os.path.normpath(p)
        return any(q == b or q.startswith(b.rstrip(os.sep) + os.sep) for b in bases)

    escaped = [str(src.paths[i]) for i in splits if i in src.paths and not inside(src.paths[i])]
    if escaped:
        raise UserError(
            f"{len(escaped)} image path(s) named in {src.path} point outside {root} "
            f"(e.g. {', '.join(escaped[:3])}): refusing to read them; fix the annotation file, "
            "or set data.source.image_dir if the images really live elsewhere"
        )


def _unknown_layout(name: str, root: Path, what: str) -> UserError:
    return UserError(
        f"no {LAYOUTS[name].title} {what} in {root} (expected {describe_layouts(name)}); "
        f"fix: {LAYOUTS[name].fix}, or set data.root to the folder that holds the data"
    )


def _sniff_format(path: Path) -> str:
    """Format of an explicitly given caption file, from its name and first line."""
    if path.suffix.lower() == ".json":
        return "karpathy"
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        first = f.readline()
    return "official" if "\t" in first or "#" in first.split(",")[0] else "kaggle"


def _find_captions(name: str, root: Path, opts: dict[str, Any]) -> tuple[str, Path]:
    """(format, caption file) for a Flickr dataset: the configured file or the first found."""
    fmt = opts["format"]
    lay = LAYOUTS[name]
    forced = _resolve(root, opts["captions_file"])
    if forced is not None:
        if not forced.is_file():
            raise UserError(
                f"data.source.captions_file {forced} does not exist; fix: point it at the caption "
                f"file or set it to null to detect {describe_layouts(name)}"
            )
        return (fmt if fmt != "auto" else _sniff_format(forced)), forced
    for f in lay.captions if fmt == "auto" else (fmt,):
        names = (opts["karpathy_json"],) if f == "karpathy" else lay.captions[f]
        for rel in names:
            path = _resolve(root, rel)
            if path is not None and path.is_file():
                return f, path
        if fmt != "auto":
            raise UserError(
                f"data.source.format={fmt} but {' or '.join(str(root / n) for n in names)} does "
                f"not exist; fix: {lay.fix}, or set data.source.format=auto"
            )
    raise _unknown_layout(name, root, "caption file")


def _find_dir(root: Path, configured: Any, candidates: Iterable[str]) -> Path | None:
    forced = _resolve(root, configured)
    if forced is not None:
        return forced if forced.is_dir() else None
    return next((root / c for c in candidates if (root / c).is_dir()), None)


def _load_flickr(name: str, root: Path, opts: dict[str, Any]) -> list[ImageRecord]:
    lay = LAYOUTS[name]
    fmt, cap_path = _find_captions(name, root, opts)
    own_karpathy = None
    if fmt == "karpathy":
        images = read_karpathy(cap_path, name)
        _, parsed = _karpathy_captions(images, "filename")
        captions = _check_parsed(parsed, cap_path, name, "images[].filename/sentences[].raw")
        own_karpathy = karpathy_splits(images, "filename", opts["restval"], cap_path)
    elif fmt == "official":
        captions = read_token_file(cap_path, name)
    else:
        captions = read_kaggle(cap_path, name)
    image_dir = _find_dir(root, opts["image_dir"], lay.image_dirs)
    if image_dir is None:
        where = opts["image_dir"] or " or ".join(d + "/" for d in lay.image_dirs)
        raise UserError(
            f"no {lay.title} image folder in {root} (expected {where}); fix: {lay.fix}, "
            "or set data.source.image_dir"
        )
    src = _Source(
        name=name,
        path=cap_path,
        format=fmt,
        captions=captions,
        paths={i: image_dir / i for i in captions},
        own_karpathy=own_karpathy,
    )
    return _assemble(src, root, opts)


def detect_coco_year(root: str | Path, **source: Any) -> str | None:
    """The COCO year `load_records` would read under root (None when no caption file is there)."""
    opts = _options("coco", source)
    return _coco_year(_resolve(Path(root), opts["annotations_dir"]) or Path(root), opts["year"])


def _coco_year(ann_dir: Path, year: str) -> str | None:
    if year != "auto":
        return year
    for y in ("2014", "2017"):
        if any((ann_dir / f"captions_{s}{y}.json").is_file() for s in ("train", "val")):
            return y
    return None


def _load_coco(name: str, root: Path, opts: dict[str, Any]) -> list[ImageRecord]:
    ann_dir = _resolve(root, opts["annotations_dir"]) or root
    year = _coco_year(ann_dir, opts["year"])
    karpathy = _resolve(root, opts["karpathy_json"])
    has_official = year is not None and any(
        (ann_dir / f"captions_{s}{year}.json").is_file() for s in ("train", "val")
    )
    fmt = opts["format"]
    if fmt == "auto":
        if has_official:
            fmt = "official"
        elif karpathy is not None and karpathy.is_file():
            fmt = "karpathy"
        else:
            raise _unknown_layout(name, root, "caption files")
    if opts["image_dir"] is not None:
        bases = [_resolve(root, opts["image_dir"])]
    else:
        bases = [root / d for d in LAYOUTS[name].image_dirs]
    index = _DirIndex()

    def folder(split_dir: str) -> Path | None:
        return next((b / split_dir for b in bases if b and (b / split_dir).is_dir()), None)

    if fmt == "official":
        src = _coco_official(root, ann_dir, year or "2014", folder)
    else:
        if karpathy is None or not karpathy.is_file():
            raise UserError(
                f"data.source.format=karpathy but {karpathy} does not exist; "
                f"fix: {LAYOUTS[name].fix}, or set data.source.format=auto"
            )
        src = _coco_karpathy(karpathy, opts["restval"], folder, index)
    return _assemble(src, root, opts, index)


def _coco_official(root: Path, ann_dir: Path, year: str, folder: Any) -> _Source:
    """COCO captions_{train,val}<year>.json: image id = str(COCO id), split = which file."""
    captions: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    own: dict[str, str] = {}
    used: list[Path] = []
    for split in ("train", "val"):
        path = ann_dir / f"captions_{split}{year}.json"
        if not path.is_file():
            continue
        used.append(path)
        try:
            data = json.loads(path.read_bytes())
            files = {str(im["id"]): im["file_name"] for im in data["images"]}
            anns = data["annotations"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"COCO annotation file {path} is not valid (expected images[].id/file_name and "
                f"annotations[].image_id/caption: {e!r}); fix: re-download "
                f"annotations_trainval{year}.zip (python src/prepare.py data=coco)"
            ) from e
        img_dir = folder(f"{split}{year}")
        if img_dir is None:
            raise UserError(
                f"COCO image folder {split}{year}/ not found in {root} (needed by {path.name}); "
                f"fix: run `python src/prepare.py data=coco data.source.year={year}`, or set "
                "data.source.image_dir to the folder that holds it"
            )
        parsed = _Parsed(defaultdict(list), [], 0)
        for n, a in enumerate(anns):
            try:
                _add(parsed, str(a["image_id"]), a["caption"])
            except (KeyError, TypeError, AttributeError):
                parsed.bad_lines.append(n)
        caps = _check_parsed(parsed, path, "coco", "annotations[].image_id/caption")
        for image_id, cs in caps.items():
            if image_id in files:
                captions[image_id] = cs
                paths[image_id] = img_dir / files[image_id]
                own[image_id] = split
    if not used:
        raise UserError(
            f"no COCO {year} caption files in {ann_dir} (expected captions_train{year}.json and "
            f"captions_val{year}.json); fix: run `python src/prepare.py data=coco "
            f"data.source.year={year}`"
        )
    return _Source("coco", used[0], f"official {year}", captions, paths, own_official=own)


def _coco_karpathy(path: Path, restval: str, folder: Any, index: _DirIndex) -> _Source:
    """dataset_coco.json: image id = str(cocoid); images in <filepath>/<filename> (2014 names),
    else found by id in train2017/ or val2017/ (same images, renamed `<12-digit id>.jpg`)."""
    images = read_karpathy(path, "coco")
    entries, parsed = _karpathy_captions(images, "cocoid")
    captions = _check_parsed(parsed, path, "coco", "images[].cocoid/filepath/filename/sentences")
    folders_2017 = [f for f in (folder("train2017"), folder("val2017")) if f is not None]
    listed_2017 = [(f, index.names(str(f))) for f in folders_2017]
    folders: dict[str, tuple[Path | None, set[str]]] = {}  # filepath -> (folder, its files)
    paths: dict[str, Path] = {}
    official: dict[str, str] = {}
    for image_id, im in entries.items():
        filepath = str(im.get("filepath") or "")
        filename = str(im.get("filename") or "")
        official[image_id] = "val" if filepath.startswith("val") else "train"
        if filepath not in folders:
            d = folder(filepath) if filepath else None
            folders[filepath] = (d, index.names(str(d)) if d is not None else set())
        d, names = folders[filepath]
        if filename in names:
            paths[image_id] = d / filename
            continue
        # a 2017 file name only from a numeric id: `../x` or `1e3` names no file (left out)
        name12 = f"{int(image_id):012d}.jpg" if image_id.isascii() and image_id.isdigit() else ""
        f2017 = next((f for f, names in listed_2017 if name12 and name12 in names), None)
        if f2017 is not None:
            paths[image_id] = f2017 / name12
        else:  # missing: reported (and dropped) with the others
            paths[image_id] = (d or path.parent / filepath) / filename
    return _Source(
        "coco",
        path,
        "karpathy",
        captions,
        paths,
        own_official=official,
        own_karpathy=karpathy_splits(images, "cocoid", restval, path),
    )
