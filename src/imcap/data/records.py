"""The one record type every dataset loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image with all of its reference captions (raw text, as in the annotation file)."""

    image_id: str  # unique within the dataset (file name for Flickr, numeric id for COCO)
    path: Path
    captions: list[str] = field(default_factory=list)
    split: str = "train"  # train | val | test
    # what the annotation file says of the image besides its captions, e.g. nocaps' `domain`
    # (data.source.group_by names one: eval.py scores each of its values as a corpus too) and
    # `id`, the integer id a caption server knows it by when image_id is something else
    attributes: dict[str, str] = field(default_factory=dict)
