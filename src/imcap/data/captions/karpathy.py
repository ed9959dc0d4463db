"""Karpathy & Fei-Fei's split files (dataset_{flickr8k,flickr30k,coco}.json, from
caption_datasets.zip): the captions and the standard captioning split in one JSON.

Images are keyed by `cocoid` where an entry has one (COCO), else by file name (Flickr)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imcap.data.captions import register_reader
from imcap.data.captions.base import Captions, Context, Parsed, Reader, image_key
from imcap.data.records import SPLITS
from imcap.errors import UserError

log = logging.getLogger("imcap.data.captions")

EXPECTED = "images[].filename (COCO: cocoid, filepath)/split/sentences[].raw"
SPLIT_VALUES = (*SPLITS, "restval")  # restval: folded into train or dropped (data.source.restval)


@register_reader("karpathy")
class Karpathy(Reader):
    describe = f"Karpathy's split JSON: {EXPECTED}"
    files = ("dataset_*.json",)
    options = ("karpathy_json",)  # the file, shared with the Karpathy split source

    def candidates(self, ctx: Context, files: Sequence[str] | None) -> list[str]:
        """The config's files, else data.source.karpathy_json, else any dataset_*.json."""
        if files:
            return [str(f) for f in files]
        configured = ctx.options.get("karpathy_json")
        return [str(configured)] if configured else list(self.files)

    def sniff(self, path: Path, first_line: str) -> bool:
        return path.suffix.lower() == ".json"

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        path = paths[0]
        images = load_images(path, ctx)
        parsed = Parsed(captions={})
        files: dict[str, tuple[str, ...]] = {}
        official: dict[str, str] = {}  # COCO entries: train/val by the 2014 folder they name
        for i, im in enumerate(images):
            try:
                image_id = entry_id(im)
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
            if not caps:
                continue
            parsed.captions[image_id] = caps
            files[image_id] = _image_files(im, image_id)
            if "filepath" in im:
                official[image_id] = (
                    "val" if str(im["filepath"] or "").startswith("val") else "train"
                )
        captions = parsed.check(path, ctx, EXPECTED)
        splits = {"karpathy": karpathy_splits(images, path)}
        if official:
            splits["official"] = official
        return Captions(path, self.name, captions, files, splits)


def read_splits(path: Path, ctx: Context) -> dict[str, str]:
    """image id -> train/val/test/restval from a Karpathy file (the split source, whatever
    file the captions came from)."""
    return karpathy_splits(load_images(path, ctx), path)


def load_images(path: Path, ctx: Context) -> list[dict[str, Any]]:
    """The `images` list of a Karpathy split file."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise UserError(f"cannot read Karpathy split file {path}: {e.strerror}") from e
    except ValueError as e:
        raise UserError(
            f"Karpathy split file {path} is not valid JSON ({e}); "
            f"fix: re-download caption_datasets.zip ({ctx.fix})"
        ) from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise UserError(
            f"Karpathy split file {path} has no `images` list (expected {EXPECTED}); "
            f"fix: re-download caption_datasets.zip ({ctx.fix})"
        )
    return images


def entry_id(im: dict[str, Any]) -> str:
    """An entry's image id: its COCO id, else its file name (KeyError/TypeError when neither)."""
    return str(im["cocoid"]) if "cocoid" in im else image_key(im["filename"])


def karpathy_splits(images: list[dict[str, Any]], path: Path) -> dict[str, str]:
    """image id -> split as the file records it (restval kept: the split source folds it)."""
    splits: dict[str, str] = {}
    odd = 0
    for im in images:
        try:
            image_id, split = entry_id(im), im["split"]
        except (KeyError, TypeError, AttributeError):
            odd += 1
            continue
        if split not in SPLIT_VALUES:
            odd += 1
            continue
        splits[image_id] = split
    if odd:
        log.warning("%s: ignored %d image(s) without a train/val/test/restval split", path, odd)
    return splits


def _image_files(im: dict[str, Any], image_id: str) -> tuple[str, ...]:
    """Flickr: the file name. COCO: <filepath>/<filename> (2014 names), else the same image by
    id in train2017/ or val2017/ (renamed `<12-digit id>.jpg`); a non-numeric id names no 2017
    file (`../x` or `1e3` is left out as missing, never turned into a path)."""
    if "filepath" not in im:
        return (image_id,)
    filepath, filename = str(im.get("filepath") or ""), str(im.get("filename") or "")
    first = f"{filepath}/{filename}" if filepath else filename
    if not (image_id.isascii() and image_id.isdigit()):
        return (first,)
    name12 = f"{int(image_id):012d}.jpg"
    return (first, f"train2017/{name12}", f"val2017/{name12}")


def _sentence_text(s: Any) -> str:
    """A Karpathy sentence's raw text, else its tokens joined; "" when it has neither."""
    if not isinstance(s, dict):
        return ""
    raw = s.get("raw")
    if not isinstance(raw, str):
        raw = " ".join(s.get("tokens") or [])
    return raw.strip()
