"""CIDEr-D in process (no Java): the self-critical training reward, one score per caption."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class CiderD:
    """CIDEr-D of tokenized candidates against a fixed training corpus, in process (no Java), for
    self-critical training rewards: one score per candidate on the toolkit's scale (x10).

    This is pycocoevalcap's Cider, which is CIDEr-D (tf-idf n-gram vectors, counts clipped to the
    reference's, Gaussian length penalty with sigma 6), except that document frequencies come once
    from `refs` (the training corpus) instead of from each scored batch. Scoring the whole corpus
    with one candidate per image gives exactly Cider().compute_score's numbers.

    N-grams are word ids packed in uint64 keys. The references become a sorted table with one row
    per distinct (order, image, n-gram) holding the n-gram's count in each reference of the image,
    plus per-reference norms, so a batch is a few numpy passes and one binary search per n-gram,
    all of a candidate's searches landing in a few small stretches of the table.
    """

    _BASE = np.uint64(1 << 16)  # an n-gram's key: its word ids as base-2^16 digits (n <= 4)

    def __init__(
        self, refs: Mapping[Any, Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0
    ) -> None:
        if not 1 <= n <= 4:
            raise ValueError(f"CiderD supports n-grams up to 4 (64-bit keys), got n={n}")
        if not refs:
            raise ValueError("CiderD needs reference captions")
        self.n, self.sigma = n, float(sigma)
        self.image_index = {k: i for i, k in enumerate(refs)}
        vocab: dict[str, int] = {}  # word -> id >= 1
        words: list[int] = []
        lengths: list[int] = []
        n_refs: list[int] = []
        for k, caps in refs.items():
            if isinstance(caps, str) or not caps:
                raise ValueError(f"image {k!r}: needs a non-empty list of tokenized references")
            n_refs.append(len(caps))
            for cap in caps:
                toks = _words(cap)
                lengths.append(len(toks))
                words.extend([vocab.setdefault(t, len(vocab) + 1) for t in toks])
        if len(vocab) >= (1 << 16) - 1024:
            raise ValueError(
                f"CiderD packs word ids in 16 bits; the references have {len(vocab)} words"
            )
        self.vocab = vocab
        n_images, n_ref_total = len(n_refs), len(lengths)
        self._log_n = math.log(float(n_images))  # the toolkit's "ref_len": log(number of images)
        self._n_refs = np.asarray(n_refs, np.int64)  # per image
        self._img_ptr = np.concatenate([[0], np.cumsum(self._n_refs)])  # image -> its references
        n_words = np.asarray(lengths, np.int64)
        self._ref_len = np.maximum(n_words - 1, 0)  # the toolkit's "length" counts bigrams
        image_of_ref = np.repeat(np.arange(n_images), self._n_refs)
        slot_of_ref = np.arange(n_ref_total) - self._img_ptr[image_of_ref]
        tf_type = np.uint8 if max(lengths, default=0) < 256 else np.uint16

        # one n-gram order at a time, to bound memory on MS-COCO's 600k references
        keys, idfs, table_keys, table_tfs = [], [], [], []
        norm2 = np.zeros((n_ref_total, n))
        self._kid0 = np.zeros(n, np.int64)  # global id of each order's first n-gram
        self._row0 = np.zeros(n, np.int64)  # table key where each order's rows start
        for order, (ngram, ref_of) in enumerate(
            self._ngrams(np.asarray(words, np.uint64), n_words)
        ):
            uniq = _unique(ngram)
            pair, tf = _unique(ref_of * len(uniq) + np.searchsorted(uniq, ngram), counts=True)
            ref_of, kid = pair // max(len(uniq), 1), pair % max(len(uniq), 1)
            row_key = image_of_ref[ref_of] * len(uniq) + kid  # (image, n-gram)
            by_key = np.argsort(row_key, kind="stable")
            row_key = row_key[by_key]
            first = np.ones(len(row_key), bool)
            first[1:] = row_key[1:] != row_key[:-1]
            table_tf = np.zeros((int(first.sum()), int(self._n_refs.max())), tf_type)
            table_tf[np.cumsum(first) - 1, slot_of_ref[ref_of[by_key]]] = tf[by_key]
            df = np.bincount(row_key[first] % len(uniq), minlength=len(uniq))  # images with it
            idf = self._log_n - np.log(np.maximum(df, 1).astype(np.float64))
            norm2[:, order] = np.bincount(
                ref_of, weights=(tf * idf[kid]) ** 2, minlength=n_ref_total
            )
            keys.append(uniq)
            idfs.append(idf)
            table_keys.append(row_key[first] + self._row0[order])
            table_tfs.append(table_tf)
            if order + 1 < n:
                self._kid0[order + 1] = self._kid0[order] + len(uniq)
                self._row0[order + 1] = self._row0[order] + n_images * len(uniq)
        self._n_keys = np.diff(np.append(self._kid0, self._kid0[-1] + len(keys[-1])))  # per order
        self._keys = np.concatenate(keys)  # sorted: higher orders have larger keys
        self._idf = np.concatenate(idfs)
        self._table_key = np.concatenate(table_keys)  # sorted by (order, image, n-gram)
        self._table_tf = np.concatenate(table_tfs)
        self._ref_norm = np.sqrt(norm2)

    def __call__(self, candidates: Sequence[Sequence[str]], image_ids: Sequence[Any]) -> np.ndarray:
        """CIDEr-D of each candidate (a token list) against the references of its image."""
        if len(candidates) != len(image_ids):
            raise ValueError(f"{len(candidates)} candidates but {len(image_ids)} image ids")
        n_cand, n = len(candidates), self.n
        try:
            img = np.fromiter((self.image_index[i] for i in image_ids), np.int64, n_cand)
        except KeyError as e:
            raise ValueError(f"image {e.args[0]!r} has no references in this CiderD") from None
        words, lengths = self._encode(candidates)
        per_order = list(self._ngrams(words, lengths))
        keys = np.concatenate([k for k, _ in per_order])
        if len(keys) == 0 or len(self._keys) == 0:
            return np.zeros(n_cand)
        cand_of = np.concatenate([c for _, c in per_order])

        # term frequency of each (candidate, n-gram); idf from the corpus (unseen: df 0 -> 1)
        batch_keys, inv = np.unique(keys, return_inverse=True)
        pair, tf = _unique(cand_of * len(batch_keys) + inv, counts=True)
        cand_of, u = pair // len(batch_keys), pair % len(batch_keys)
        pos = np.minimum(np.searchsorted(self._keys, batch_keys), len(self._keys) - 1)
        known = (self._keys[pos] == batch_keys)[u]
        kid = pos[u]
        idf = np.where(known, self._idf[kid], self._log_n)
        order = _key_order(batch_keys)[u]
        norm = np.bincount(cand_of * n + order, weights=(tf * idf) ** 2, minlength=n_cand * n)
        norm = np.sqrt(norm).reshape(n_cand, n)

        # each n-gram that occurs in the corpus, against the references of its candidate's image:
        # sum of min(tf, tf_ref) * tf_ref * idf^2 per (candidate, reference slot, order)
        cand_of, kid, tf, order = cand_of[known], kid[known], tf[known], order[known]
        idf2 = idf[known] ** 2
        m = self._n_refs[img]  # references per candidate
        slots = int(m.max())
        query = self._row0[order] + img[cand_of] * self._n_keys[order] + kid - self._kid0[order]
        by_query = np.argsort(query)  # sorted needles: a much faster searchsorted
        row = np.empty_like(by_query)
        row[by_query] = np.searchsorted(self._table_key, query[by_query])
        row = np.minimum(row, len(self._table_key) - 1)
        tf_ref = self._table_tf[row, :slots] * (self._table_key[row] == query)[:, None]  # (Q, S)
        clipped = np.minimum(tf[:, None], tf_ref) * tf_ref * idf2[:, None]
        flat = ((cand_of * slots)[:, None] + np.arange(slots)) * n + order[:, None]
        val = np.bincount(flat.ravel(), weights=clipped.ravel(), minlength=n_cand * slots * n)
        val = val.reshape(n_cand, slots, n)

        valid = np.arange(slots) < m[:, None]  # (C, S)
        refs = np.where(valid, self._img_ptr[img][:, None] + np.arange(slots), 0)
        denom = norm[:, None, :] * self._ref_norm[refs]  # cosine similarity per order
        val = np.divide(val, denom, out=val, where=denom != 0)
        delta = (np.maximum(lengths - 1, 0)[:, None] - self._ref_len[refs]).astype(np.float64)
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2)) * valid  # (C, S)
        return (val * penalty[:, :, None]).sum(axis=1).mean(axis=1) / m * 10.0

    def _encode(self, candidates: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Word ids laid end to end, and lengths. A word outside the corpus vocabulary gets an id
        above it, distinct per word within its candidate (it can only count in the norm)."""
        get = self.vocab.get
        rows = [[get(t, 0) for t in _words(c)] for c in candidates]
        unknown0 = len(self.vocab) + 1
        for c, row in enumerate(rows):
            if 0 in row:
                local: dict[str, int] = {}
                toks = _words(candidates[c])
                rows[c] = [
                    i or local.setdefault(t, unknown0 + len(local))
                    for i, t in zip(row, toks, strict=True)
                ]
                if unknown0 + len(local) > 1 << 16:
                    raise ValueError(
                        f"candidate {c}: too many distinct unknown words for 16-bit ids"
                    )
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        words = np.fromiter(itertools.chain.from_iterable(rows), np.uint64, int(lengths.sum()))
        return words, lengths

    def _ngrams(
        self, words: np.ndarray, lengths: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """For orders 1..n: the key and sequence index of every n-gram of the sequences laid end
        to end in `words`."""
        seq = np.repeat(np.arange(len(lengths)), lengths)
        left = lengths[seq] - (
            np.arange(len(words)) - (np.cumsum(lengths) - lengths)[seq]
        )  # words from here
        key = np.zeros(len(words), np.uint64)
        for k in range(self.n):
            at = np.flatnonzero(left > k)
            key[at] = key[at] * self._BASE + words[at + k]
            yield key[at], seq[at]


def _words(caption: Sequence[str] | str) -> list[str]:
    """Tokens as the toolkit's CIDEr sees them: it splits the joined caption on any whitespace."""
    return caption.split() if isinstance(caption, str) else " ".join(caption).split()


def _unique(a: np.ndarray, counts: bool = False) -> Any:
    """np.unique by sorting (numpy's hash-based unique crawls on packed n-gram keys)."""
    a = np.sort(a)
    first = np.ones(len(a), bool)
    first[1:] = a[1:] != a[:-1]
    if not counts:
        return a[first]
    starts = np.flatnonzero(first)
    return a[starts], np.diff(np.append(starts, len(a)))


def _key_order(keys: np.ndarray) -> np.ndarray:
    """0-based n-gram order of packed keys: the number of base-2^16 digits, minus one."""
    order = np.zeros(len(keys), np.int64)
    for k in (1, 2, 3):
        order += keys >= np.uint64(1 << (16 * k))
    return order
