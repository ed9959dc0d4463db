"""The original Flickr8k/Flickr30k release: `<image>#<n><TAB><caption>` lines
(Flickr8k.token.txt, results_20130124.token)."""

from __future__ import annotations

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

EXPECTED = "`<image>#<n><TAB><caption>` lines"


@register_reader("flickr_token")
class FlickrToken(Reader):
    describe = f"{EXPECTED}, the original release"
    files = ("*.token.txt", "*.token")

    def sniff(self, path: Path, first_line: str) -> bool:
        return path.suffix.lower() != ".json" and (
            "\t" in first_line or "#" in first_line.split(",")[0]
        )

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        path = paths[0]
        parsed = Parsed()
        for lineno, line in enumerate(read_text(path, ctx).splitlines(), 1):
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            if not tab:  # some copies have the tab turned into spaces
                key, _, caption = line.strip().partition(" ")
            image, hash_, _n = key.rpartition("#")
            image = image_key(image)
            if not hash_ or not image:
                parsed.bad_lines.append(lineno)
                continue
            parsed.add(image, caption)
        captions = parsed.check(path, ctx, EXPECTED)
        return Captions(path, self.name, captions)  # image id = file name
