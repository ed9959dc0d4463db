"""Semantic attributes: the detector's targets are the caption words of each image, and a
Top-Down captioner with attributes trains end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train, run_dir, tiny_overrides

from imcap.errors import UserError
from imcap.model.attributes import STOPWORDS, attribute_targets, attribute_words
from imcap.model.checkpoint import load_captioner
from imcap.pipeline.run import train

REFS = {
    0: [["a", "dog", "runs", "on", "grass"], ["the", "dog", "is", "running"]],
    1: [["a", "red", "ball", "on", "grass"]],
    2: [["two", "dogs", "play"], ["dogs", "on", "a", "beach"]],
}
INDEX = {
    w: i
    for i, w in enumerate(
        [
            "<pad>",
            "<bos>",
            "<eos>",
            "<unk>",
            *sorted({w for caps in REFS.values() for c in caps for w in c}),
        ]
    )
}


def test_attribute_words_are_frequent_content_words() -> None:
    ids = attribute_words(REFS, INDEX, 3)
    words = [w for w, i in INDEX.items() if i in ids]
    assert not set(words) & STOPWORDS
    # "grass" (2 images), "dog" (1 image, 2 captions), "dogs" (1 image): document frequency
    assert ids[0] == INDEX["grass"]


def test_more_attributes_than_the_captions_hold_is_a_named_error() -> None:
    """A small training set (bench/recipe.py --smoke: 64 images) against decoder.attributes=1000."""
    n = len({w for caps in REFS.values() for c in caps for w in c} - STOPWORDS)
    with pytest.raises(UserError, match=f"hold only {n} content words.*decoder.attributes={n}"):
        attribute_words(REFS, INDEX, 1000)


def test_detector_targets_are_the_caption_words_of_each_image() -> None:
    ids = attribute_words(REFS, INDEX, 6)
    targets = attribute_targets(REFS, ids, INDEX, 4)
    assert targets.shape == (4, 6)
    inverse = {i: w for w, i in INDEX.items()}
    for row in range(3):
        expected = {w for cap in REFS[row] for w in cap} & {inverse[i] for i in ids}
        got = {inverse[ids[j]] for j in torch.nonzero(targets[row]).flatten().tolist()}
        assert got == expected
    assert targets[3].sum() == 0  # a row with no captions (e.g. a bad image) has no positives


def test_topdown_with_attributes_trains_and_its_checkpoint_reloads(shared: Path) -> None:
    overrides = tiny_overrides(
        shared,
        "decoder=topdown",
        "decoder.attributes=20",
        "decoder.attention_dim=64",
        "trainer.max_epochs=2",
        "test=false",
        *run_dir(shared, "attrs"),
    )
    val = train(compose_train(overrides))
    assert val is not None and val > 0
    log = (shared / "attrs" / "csv" / "metrics.csv").read_text().splitlines()
    col = log[0].split(",").index("train/attributes")
    bce = [float(r.split(",")[col]) for r in log[1:] if r.split(",")[col]]
    assert bce[-1] < bce[0]  # the detector learns its targets
    ckpt = next((shared / "attrs" / "checkpoints").glob("epoch_*.ckpt"))
    model = load_captioner(ckpt)
    assert model.attributes is not None and model.attributes.ready
    images = torch.randn(2, 3, 96, 96)
    assert len(model.caption(images)) == 2
