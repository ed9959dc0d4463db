"""MS-COCO caption annotations: <annotations_dir>/captions_{train,val}<year>.json
(images[].id/file_name, annotations[].image_id/caption). Image id = str(COCO id); the images
are in the <split><year>/ folder of an image folder; the file an image is in is its split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from imcap.data.captions import register_reader
from imcap.data.captions.base import Captions, Context, Parsed, Reader
from imcap.errors import UserError

EXPECTED = "images[].id/file_name and annotations[].image_id/caption"
PATTERN = "{annotations_dir}/captions_{split}{year}.json"
YEARS = ("2014", "2017")  # what data.source.year=auto tries, in order
PARTS = ("train", "val")  # the captioned files (COCO's test set has no public captions)


@register_reader("coco")
class Coco(Reader):
    describe = f"COCO caption annotations: {EXPECTED}"
    options = ("year", "annotations_dir")

    def candidates(self, ctx: Context, files: Sequence[str] | None) -> list[str]:
        if files:
            raise UserError(
                "the coco caption reader finds its files from data.source.annotations_dir and "
                "data.source.year: set those, not data.source.readers.<format>.files"
            )
        year = self._year_option(ctx)
        shown = "{" + ",".join(YEARS) + "}" if year == "auto" else year
        return [self._name(ctx, "{train,val}", shown)]

    def year(self, ctx: Context, files: Sequence[str] | None = None) -> str | None:
        """The configured year, else the first of YEARS whose caption files exist."""
        year = self._year_option(ctx)
        if year != "auto":
            return year
        return next((y for y in YEARS if any(self._files(ctx, y).values())), None)

    def find(self, ctx: Context, files: Sequence[str] | None) -> list[Path]:
        self.candidates(ctx, files)  # refuses configured files
        year = self.year(ctx)
        if year is None:
            return []
        return [p for p, there in self._files(ctx, year).items() if there]

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        year = self.year(ctx) or YEARS[0]
        split_of = {p: s for s, p in zip(PARTS, self._files(ctx, year), strict=True)}
        captions: dict[str, list[str]] = {}
        images: dict[str, tuple[str, ...]] = {}
        official: dict[str, str] = {}
        for path in paths:
            split = split_of[path]
            try:
                data = json.loads(path.read_bytes())
                files = {str(im["id"]): im["file_name"] for im in data["images"]}
                anns = data["annotations"]
            except OSError as e:
                raise UserError(f"cannot read COCO annotation file {path}: {e.strerror}") from e
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(
                    f"COCO annotation file {path} is not valid (expected {EXPECTED}: {e!r}); "
                    f"fix: re-download annotations_trainval{year}.zip ({ctx.fix})"
                ) from e
            folder = f"{split}{year}"
            if ctx.image_folder(folder) is None:
                raise UserError(
                    f"COCO image folder {folder}/ not found in {ctx.root} (needed by "
                    f"{path.name}); fix: {ctx.fix} with data.source.year={year}, or set "
                    "data.source.image_dir to the folder that holds it"
                )
            parsed = Parsed()
            for n, a in enumerate(anns):
                try:
                    parsed.add(str(a["image_id"]), a["caption"])
                except (KeyError, TypeError, AttributeError):
                    parsed.bad_lines.append(n)
            for image_id, cs in parsed.check(path, ctx, EXPECTED).items():
                if image_id in files:
                    captions[image_id] = cs
                    images[image_id] = (f"{folder}/{files[image_id]}",)
                    official[image_id] = split
        return Captions(paths[0], f"{self.name} {year}", captions, images, {"official": official})

    def _year_option(self, ctx: Context) -> str:
        year = str(ctx.option("year"))
        if year != "auto" and not (year.isdigit() and len(year) == 4):
            raise UserError(
                f"data.source.year={year!r} is not valid for {ctx.name}: expected auto or a "
                f"year such as {' or '.join(YEARS)} (see conf/data/{ctx.name}.yaml)"
            )
        return year

    def _name(self, ctx: Context, split: str, year: str) -> str:
        ann = str(ctx.option("annotations_dir") or ".")
        return PATTERN.format(annotations_dir=ann, split=split, year=year)

    def _files(self, ctx: Context, year: str) -> dict[Path, bool]:
        """The train and val caption files of `year` (in PARTS order), and whether each exists."""
        paths = [ctx.resolve(self._name(ctx, s, year)) for s in PARTS]
        return {p: p.is_file() for p in paths if p is not None}
