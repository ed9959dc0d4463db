"""Kaggle re-uploads: CSV `image,caption` (Flickr8k captions.txt) or `image_name| comment_number|
comment` rows (Flickr30k results.csv, where some rows have the number fused into the comment)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from imcap.data.captions import register_reader
from imcap.data.captions.base import (
    Captions,
    Context,
    Parsed,
    Reader,
    image_key,
    read_text,
)
from imcap.errors import UserError

_NUMBERED = re.compile(r"^\s*(\d+)\s+(.*)$", re.DOTALL)  # results.csv row "4   A dog runs ..."
CSV = "a CSV with header `image,caption`"
PIPES = "`image_name| comment_number| comment` rows"


@register_reader("kaggle")
class Kaggle(Reader):
    describe = f"Kaggle: {CSV} or {PIPES}"
    files = ("captions.txt", "results.csv")

    def sniff(self, path: Path, first_line: str) -> bool:
        header = first_line.replace(" ", "").lower()
        return header.startswith("image,caption") or "|" in first_line

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        path = paths[0]
        text = read_text(path, ctx)
        lines = text.splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip()), None)
        header = lines[start] if start is not None else ""
        parsed = Parsed()
        if "|" in header:
            expected = PIPES
            for lineno, line in enumerate(lines[start + 1 :], start + 2):
                if not line.strip():
                    continue
                image, *rest = line.split("|")
                image = image_key(image)
                if not image or not rest:
                    parsed.bad_lines.append(lineno)
                    continue
                if len(rest) == 1:  # "img| 4   A dog runs ..." : number and comment fused
                    m = _NUMBERED.match(rest[0])
                    caption = m.group(2) if m else rest[0]
                else:
                    caption = "|".join(rest[1:])
                parsed.add(image, caption)
        elif header.replace(" ", "").lower().startswith("image,caption"):
            expected = CSV
            reader = csv.reader(io.StringIO(text))
            next(reader)
            for row in reader:
                if not row or not any(f.strip() for f in row):
                    continue
                image = image_key(row[0])
                if len(row) < 2 or not image:
                    parsed.bad_lines.append(reader.line_num)
                    continue
                parsed.add(image, ",".join(row[1:]))  # unquoted commas: keep the whole caption
        elif not text.strip():
            expected = CSV  # nothing at all: `check` says the file is empty
        else:
            raise UserError(
                f"caption file {path} has an unknown header {header[:60]!r} (expected "
                f"`image,caption` for Kaggle captions.txt or `image_name| comment_number| "
                f"comment` for results.csv); fix: re-download it ({ctx.fix})"
            )
        captions = parsed.check(path, ctx, expected)
        return Captions(path, self.name, captions)  # image id = file name
