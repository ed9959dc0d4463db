"""nocaps (Agrawal et al. 2019), novel object captioning on Open Images: the official annotation
files, COCO's layout plus a domain per image.

- nocaps_val_4500_captions.json: images[].id/file_name/open_images_id/domain and
  annotations[].image_id/caption (10 per image);
- nocaps_test_image_info.json: images[] only (the test captions are private: EvalAI scores them).

Which file is which split is data.source.annotations. An image's id is its Open Images id (its
file's stem: unique across val and test, whose nocaps ids both start at 0); the nocaps id, which
the EvalAI submission uses, and the domain are its attributes (`id`, `domain`). Its file is
<image folder>/<split dir>/<file_name>, the split dirs from data.source.split_dirs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imcap.data.captions import register_reader
from imcap.data.captions.base import Captions, Context, Parsed, Reader
from imcap.errors import UserError

log = logging.getLogger(__name__)

EXPECTED = "images[].id/file_name (domain, open_images_id) and annotations[].image_id/caption"


@register_reader("nocaps")
class Nocaps(Reader):
    describe = f"nocaps annotation files: {EXPECTED}"
    options = ("annotations", "split_dirs")

    def candidates(self, ctx: Context, files: Sequence[str] | None) -> list[str]:
        if files:
            raise UserError(
                "the nocaps caption reader reads the files of data.source.annotations (split -> "
                "file): set those, not data.source.readers.<format>.files"
            )
        return [c for cands in self._annotations(ctx).values() for c in cands]

    def find(self, ctx: Context, files: Sequence[str] | None) -> list[Path]:
        """Each configured split's file, when any of them is there (else: not this format)."""
        self.candidates(ctx, files)
        found = [p for p, _ in self._files(ctx).values() if p is not None]
        return found

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        files = self._files(ctx)
        missing = {s: cands for s, (p, cands) in files.items() if p is None}
        if missing:
            split, cands = next(iter(missing.items()))
            looked = " or ".join(str(ctx.resolve(c)) for c in cands)
            raise UserError(
                f"nocaps {split} annotation file not found (looked for {looked}); fix: "
                f"{ctx.fix}; or set data.source.annotations.{split}=null to go without that split"
            )
        dirs = self._split_dirs(ctx)
        captions: dict[str, list[str]] = {}
        images: dict[str, tuple[str, ...]] = {}
        attributes: dict[str, dict[str, str]] = {}
        official: dict[str, str] = {}
        for split, (path, _) in files.items():
            assert path is not None
            entries, anns = _load(path, ctx)
            parsed = Parsed()
            for n, a in enumerate(anns):
                try:
                    parsed.add(str(a["image_id"]), a["caption"])
                except (KeyError, TypeError, AttributeError):
                    parsed.bad_lines.append(n)
            by_id = parsed.check(path, ctx, EXPECTED) if anns else {}
            if not anns:
                log.info(
                    "%s has no captions: its %d %s images are captioned, not scored",
                    path.name,
                    len(entries),
                    split,
                )
            for im in entries:
                key, file_name = _image_key(im, path, ctx)
                if key in captions:
                    raise UserError(
                        f"{path}: image {file_name} is also in the {official[key]} file; fix: "
                        f"re-download the nocaps annotation files ({ctx.fix})"
                    )
                captions[key] = by_id.get(str(im["id"]), [])
                images[key] = (*(f"{d}/{file_name}" for d in dirs.get(split, ())), file_name)
                attributes[key] = {"id": str(im["id"])}
                if im.get("domain"):
                    attributes[key]["domain"] = str(im["domain"])
                official[key] = split
        return Captions(paths[0], self.name, captions, images, {"official": official}, attributes)

    def _annotations(self, ctx: Context) -> dict[str, list[str]]:
        """data.source.annotations: split -> candidate files (a name or a list; null: none)."""
        spec = ctx.option("annotations")
        if not isinstance(spec, Mapping) or set(spec) - {"train", "val", "test"}:
            raise UserError(
                f"data.source.annotations must map val and/or test to their annotation files, "
                f"got {spec!r} (see conf/data/{ctx.name}.yaml)"
            )
        out: dict[str, list[str]] = {}
        for split, files in spec.items():
            if files is None or files == "":
                continue
            out[str(split)] = [str(files)] if isinstance(files, str) else [str(f) for f in files]
        return out

    def _files(self, ctx: Context) -> dict[str, tuple[Path | None, list[str]]]:
        """split -> (the first of its candidate files that exists, or None; the candidates)."""
        out: dict[str, tuple[Path | None, list[str]]] = {}
        for split, cands in self._annotations(ctx).items():
            found = next((p for c in cands for p in ctx.glob(c)), None)
            out[split] = (found, cands)
        return out

    def _split_dirs(self, ctx: Context) -> dict[str, list[str]]:
        spec = ctx.options.get("split_dirs") or {}
        if not isinstance(spec, Mapping):
            raise UserError(
                f"data.source.split_dirs must map each split to its image folders, got {spec!r}"
            )
        return {str(s): [str(d)] if isinstance(d, str) else list(d or ()) for s, d in spec.items()}


def _load(path: Path, ctx: Context) -> tuple[list[dict[str, Any]], list[Any]]:
    """The file's images and annotations (none: a split without public captions)."""
    try:
        data = json.loads(path.read_bytes())
        entries = data["images"]
        anns = data.get("annotations") or []
        if not isinstance(entries, list) or not isinstance(anns, list):
            raise TypeError("images and annotations must be lists")
        for im in entries:
            im["id"], im["file_name"]  # noqa: B018 - every image has both
    except OSError as e:
        raise UserError(f"cannot read nocaps annotation file {path}: {e.strerror}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"nocaps annotation file {path} is not valid (expected {EXPECTED}: {e!r}); "
            f"fix: re-download it ({ctx.fix})"
        ) from e
    return entries, anns


def _image_key(im: dict[str, Any], path: Path, ctx: Context) -> tuple[str, str]:
    """An image's id (its Open Images id, else its file's stem) and its file name."""
    file_name = str(im["file_name"])
    key = str(im.get("open_images_id") or Path(file_name).stem)
    if not key:
        raise UserError(f"{path}: image {im['id']} has an empty file_name; fix: re-download it")
    return key, file_name
