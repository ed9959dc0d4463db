"""Vocabulary: built from train captions, round-trips through JSON and checkpoints."""

from __future__ import annotations

import pytest

from imcap.data.text import Vocab, tokenize
from imcap.errors import UserError

CAPS = ["A dog runs.", "A dog jumps!", "The cat sleeps", "a dog's ball"]


def test_build_counts_and_specials() -> None:
    v = Vocab.build((tokenize(c) for c in CAPS), min_count=2, max_len=5)
    assert v.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert v.tokens[4:] == ["a", "dog"]  # the only words seen twice, most frequent first
    assert v.encode(["a", "cat"]) == [4, v.unk_id]


def test_round_trip(tmp_path) -> None:
    v = Vocab.build((tokenize(c) for c in CAPS), min_count=1, max_len=7)
    path = tmp_path / "vocab.json"
    v.save(path)
    w = Vocab.load(path)
    assert w.tokens == v.tokens and w.max_len == 7
    ids = w.encode(tokenize("the dog sleeps"))
    assert w.decode([w.bos_id, *ids, w.eos_id, 0, 0]) == "the dog sleeps"


def test_decode_stops_at_eos_and_truncates_on_encode() -> None:
    v = Vocab.build([["a", "b", "c", "d"]], max_len=2)
    assert v.encode(["a", "b", "c"]) == [v.index["a"], v.index["b"]]
    assert v.decode([v.index["a"], v.eos_id, v.index["b"]]) == "a"


def test_errors() -> None:
    with pytest.raises(UserError, match="no captions"):
        Vocab.build([])
    with pytest.raises(UserError, match="must start with"):
        Vocab(["a", "b"])
