"""Caption text: PTB-style tokenization (as the COCO toolkit scores) and the vocabulary.

Training targets are tokenized the way pycocoevalcap's Stanford PTBTokenizer tokenizes
references (lower case, punctuation split off and dropped, clitics such as "'s" and "n't"
split), so the model learns exactly the tokens it is scored on.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imcap.errors import UserError

# Tokens pycocoevalcap's PTBTokenizer removes after tokenizing.
PUNCTUATION = {
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", "-lrb-", "-rrb-", "-lcb-", "-rcb-",
    ".", "?", "!", ",", ":", "-", "--", "...", ";",
}  # fmt: skip

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00b4": "'"})
_CLITIC = re.compile(r"(?i)(n't|'s|'re|'ll|'ve|'m|'d)$")
# A token: a number with inner , or . ; a word with inner - ' & / . ; or one other symbol.
_TOKEN = re.compile(
    r"\d+(?:[.,]\d+)+"  # 1,000  3.5
    r"|[^\W_](?:[\w&/'-]*[^\W_])?"  # words, t-shirt, don't, o'clock
    r"|\.\.\.|--|\S",
    re.UNICODE,
)


def tokenize(caption: str) -> list[str]:
    """Lower-case PTB-style tokens with punctuation removed, e.g. "A dog's ball." -> a dog 's ball."""
    text = unicodedata.normalize("NFKC", caption).translate(_QUOTES).lower()
    tokens: list[str] = []
    for tok in _TOKEN.findall(text):
        m = _CLITIC.search(tok)
        if m and m.start() > 0:
            tokens += [tok[: m.start()], tok[m.start() :]]
        elif tok.endswith("'") and len(tok) > 1:  # plural possessive: dogs'
            tokens += [tok[:-1], "'"]
        else:
            tokens.append(tok)
    return [t for t in tokens if t not in PUNCTUATION and not _is_symbol(t)]


def _is_symbol(tok: str) -> bool:
    return len(tok) == 1 and unicodedata.category(tok)[0] in "PZC"


def clean(caption: str) -> str:
    """The caption as the scorer sees it: tokens joined by single spaces."""
    return " ".join(tokenize(caption))


@dataclass
class Vocab:
    """Token <-> id map built from training captions. Saved inside every checkpoint."""

    tokens: list[str]
    max_len: int = 20  # longest caption (in words) used for training and decoding
    index: dict[str, int] = field(init=False, repr=False)

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)

    def __post_init__(self) -> None:
        if list(self.tokens[:4]) != list(self.SPECIALS):
            raise UserError(f"vocabulary must start with {self.SPECIALS}, got {self.tokens[:4]}")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 1, max_len: int = 20) -> Vocab:
        """Words seen at least `min_count` times in tokenized training captions, most frequent first."""
        counts = Counter(tok for cap in captions for tok in cap)
        if not counts:
            raise UserError("cannot build a vocabulary: the training split has no captions")
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + words, max_len=max_len)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Word ids (unknown -> <unk>), truncated to max_len, without <bos>/<eos>."""
        return [self.index.get(t, self.unk_id) for t in tokens[: self.max_len]]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> caption text; stops at <eos>, skips <pad>/<bos>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.tokens[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(list(d["tokens"]), max_len=int(d["max_len"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read vocabulary {path}: {e}") from e
