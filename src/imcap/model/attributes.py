"""Semantic attributes (LSTM-A, Yao et al. 2017): which content words an image's captions use.

A small multi-label detector reads the pooled image vector and predicts, for K attribute words
(the K content words found in the most training images), the probability that a caption of
this image uses the word. The decoder receives these probabilities beside the image, a
high-level summary ("dog", "grass", "running") the CNN grid only implies.

The detector trains with the captioner (binary cross-entropy, `model.loss.attributes`); its
targets are the caption words of each training image, computed once per fit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from imcap.errors import UserError

# function words that say nothing about the picture (never attributes)
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "in",
        "on",
        "at",
        "to",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "with",
        "its",
        "it",
        "his",
        "her",
        "their",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "some",
        "one",
        "two",
        "three",
        "other",
        "another",
        "while",
        "as",
        "by",
        "for",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "up",
        "down",
        "out",
        "off",
        "near",
        "next",
        "front",
        "behind",
        "top",
        "side",
        "each",
        "has",
        "have",
        "does",
        "do",
        "who",
        "what",
        "which",
        "very",
    ]
)


def attribute_words(
    refs: Mapping[object, Sequence[Sequence[str]]], vocab_index: Mapping[str, int], k: int
) -> list[int]:
    """Vocabulary ids of the k content words used by the most training images."""
    df: Counter[str] = Counter()
    for caps in refs.values():
        df.update({w for cap in caps for w in cap})
    words = [w for w, _ in df.most_common() if w in vocab_index and w not in STOPWORDS]
    if len(words) < k:
        raise UserError(
            f"decoder.attributes={k}, but the training captions hold only {len(words)} content "
            f"words in the vocabulary: use decoder.attributes={len(words)} or fewer (0: no "
            "attribute detector), or train on more images"
        )
    return [vocab_index[w] for w in words[:k]]


def attribute_targets(
    refs: Mapping[int, Sequence[Sequence[str]]],
    word_ids: Sequence[int],
    vocab_index: Mapping[str, int],
    n_rows: int,
) -> torch.Tensor:
    """(n_rows, K) multi-hot: 1 where any caption of the image in that row uses the word."""
    column = {w: j for j, w in enumerate(word_ids)}
    out = torch.zeros(n_rows, len(word_ids))
    for row, caps in refs.items():
        cols = {column[vocab_index[w]] for cap in caps for w in cap if vocab_index.get(w) in column}
        if cols:
            out[int(row), sorted(cols)] = 1.0
    return out


class AttributeDetector(nn.Module):
    """Pooled image vector (B, C) -> attribute logits (B, K)."""

    def __init__(self, feature_dim: int, k: int, hidden: int = 512, dropout: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm1d(feature_dim),  # the same standardisation the decoders apply
            nn.Linear(feature_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, k),
        )
        # vocabulary ids of the K words, filled from the training captions at the first fit
        # (a buffer, so checkpoints carry it)
        self.register_buffer("word_ids", torch.full((k,), -1, dtype=torch.long))

    @property
    def ready(self) -> bool:
        return bool((self.word_ids >= 0).all())

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)  # (B, K)
