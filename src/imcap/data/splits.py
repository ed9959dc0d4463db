"""Which image is in which split: the split sources a dataset's config chooses from.

data.source.split_source names one (`auto`: the first of data.source.split_order that is
there). Each source reads what the caption file itself records (COCO's train/val files,
Karpathy's split) before looking for its own files:

- official: the caption file's own split, else one-name-per-line lists (data.source.split_lists)
- karpathy: Karpathy's split (data.source.karpathy_json), restval folded by data.source.restval
- hash:     a deterministic split by sha1(seed:image id) (data.source.hash_split)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from imcap.data.captions import Captions, Context
from imcap.data.captions.base import image_key
from imcap.data.captions.karpathy import read_splits
from imcap.data.records import SPLITS
from imcap.errors import UserError

log = logging.getLogger(__name__)

RESTVAL = ("train", "drop")  # Karpathy's restval images: folded into train, or left out


class Missing(Exception):  # noqa: N818 - a split source that is not there (not an error yet)
    """The split source's files are not there; the message says what was looked for."""


@dataclass(frozen=True)
class SplitSource:
    read: Callable[[Captions, Context], tuple[dict[str, str], str]]  # (image id -> split, what)
    options: tuple[str, ...]  # the data.source keys it reads


def _official(src: Captions, ctx: Context) -> tuple[dict[str, str], str]:
    own = src.splits.get("official")
    if own is not None:
        return own, f"the split recorded in {src.path.name}"
    lists = ctx.options.get("split_lists") or {}
    found = read_split_lists(ctx.root, lists)
    if found is None:
        named = ", ".join(str(v) for v in lists.values() if v) or "none set"
        raise Missing(f"the split lists (data.source.split_lists: {named})")
    splits, used = found
    return splits, ", ".join(p.name for p in used)


def _karpathy(src: Captions, ctx: Context) -> tuple[dict[str, str], str]:
    restval = ctx.option("restval")
    own = src.splits.get("karpathy")
    if own is not None:
        return fold_restval(own, restval), f"Karpathy splits in {src.path.name}"
    path = ctx.resolve(ctx.option("karpathy_json"))
    if path is None or not path.is_file():
        raise Missing(f"the Karpathy split file {path}")
    return fold_restval(read_splits(path, ctx), restval), path.name


def _hash(src: Captions, ctx: Context) -> tuple[dict[str, str], str]:
    h = ctx.option("hash_split")
    splits = hash_splits(src.captions, h["val"], h["test"], int(h["seed"]))
    return splits, (
        f"a deterministic hash split (seed {h['seed']}: {h['val']} val, {h['test']} test, "
        "rest train)"
    )


SPLIT_SOURCES: dict[str, SplitSource] = {
    "official": SplitSource(_official, ("split_lists",)),
    "karpathy": SplitSource(_karpathy, ("karpathy_json", "restval")),
    "hash": SplitSource(_hash, ("hash_split",)),
}


def choose_splits(src: Captions, ctx: Context) -> tuple[dict[str, str], str]:
    """image id -> split from the configured split source (auto: the first that is there)."""
    choice = str(ctx.option("split_source"))
    order = list(ctx.option("split_order")) if choice == "auto" else [choice]
    tried: list[str] = []
    for how in order:
        try:
            splits, what = SPLIT_SOURCES[how].read(src, ctx)
        except Missing as e:
            if choice != "auto":
                raise UserError(
                    f"data.source.split_source={choice} but {e} is not there; fix: add it, or "
                    f"set data.source.split_source=auto ({ctx.fix})"
                ) from None
            tried.append(str(e))
            continue
        if how == "hash" and choice == "auto" and tried:
            log.warning(
                "%s: %s has no split and no split file was found under %s (tried %s); using %s. "
                "It is NOT the standard split, so scores are not comparable to papers; add one "
                "of those for the standard split",
                ctx.title,
                src.path.name,
                ctx.root,
                "; ".join(tried),
                what,
            )
        return splits, what
    raise UserError(
        f"{ctx.title}: no split source found under {ctx.root} (tried {'; '.join(tried)}); fix: "
        "add one, or add hash to data.source.split_order for a deterministic split"
    )


def fold_restval(splits: Mapping[str, str], restval: str) -> dict[str, str]:
    """Karpathy's restval images into train (the standard), or left out (`drop`)."""
    if restval == "train":
        return {i: "train" if s == "restval" else s for i, s in splits.items()}
    return {i: s for i, s in splits.items() if s != "restval"}


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
        if rel is None or str(rel) == "":
            continue
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else root / path
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
            image = image_key(line)
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
