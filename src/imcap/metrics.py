"""Caption metrics exactly as the COCO caption toolkit (pycocoevalcap 1.2) computes them, and an
in-process CIDEr-D for self-critical training rewards.

BLEU, ROUGE-L and CIDEr are the toolkit's own Python classes. Its two Java wrappers are replaced
by ones that run the same jars with the same arguments and line protocol, because as shipped:
- PTBTokenizer writes its temp file next to its jar inside site-packages (PermissionError when that
  is read-only, files left behind when killed) and replaces only "\\n" in captions, so a "\\r" or
  U+2028 inside one caption shifts every later caption onto the wrong image without an error;
- Meteor never reads its stderr pipe, keeps its lock when anything fails (then hangs for ever in
  `__del__`, i.e. at interpreter exit), turns a dead JVM into a BrokenPipeError or
  "could not convert string to float", and desyncs its line protocol on a newline or a "|||".
Here the tokenizer runs on a private temp file and the METEOR JVM (about 20 s to start: it loads a
60 MB paraphrase table) is reused across calls with a lock that is always released, a timeout
that kills it, and one-line errors naming the fix.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pycocoevalcap.meteor.meteor as _toolkit_meteor
import pycocoevalcap.spice.spice as _toolkit_spice
import pycocoevalcap.tokenizer.ptbtokenizer as _toolkit_ptb
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from imcap.errors import UserError
from imcap.text import tokenize

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

_JAVA_FIX = (
    "install a JRE (e.g. `apt install default-jre`), or set `metrics.java=false` to skip METEOR "
    "and use the pure-Python PTB-style tokenizer"
)
_PTB_DIR = Path(_toolkit_ptb.__file__).parent
_PTB_ARGS = [  # pycocoevalcap's command; the file is UTF-8 whatever the locale
    "-cp",
    str(_PTB_DIR / _toolkit_ptb.STANFORD_CORENLP_3_4_1_JAR),
    "edu.stanford.nlp.process.PTBTokenizer",
    "-preserveLines",
    "-lowerCase",
    "-encoding",
    "utf-8",
]
_PTB_PUNCTUATION = frozenset(_toolkit_ptb.PUNCTUATIONS)
_METEOR_DIR = Path(_toolkit_meteor.__file__).parent
_METEOR_ARGS = [
    "-jar",
    "-Xmx2G",
    _toolkit_meteor.METEOR_JAR,
    "-",
    "-",
    "-stdio",
    "-l",
    "en",
    "-norm",
]
_SPICE_DIR = Path(_toolkit_spice.__file__).parent
# Line breaks for Java's PTBLexer (and METEOR's line protocol): inside a caption they become spaces.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x85\u2028\u2029]")


def check_java() -> str:
    """Path of `java`, or a UserError naming the fix. Spawns nothing."""
    java = shutil.which("java")
    if java is None:
        raise UserError(
            f"`java` is not on PATH; the COCO caption toolkit needs it for its PTB tokenizer and METEOR: {_JAVA_FIX}"
        )
    return java


def _tail(data: bytes | str, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (" | ".join(lines[-3:]) or "(nothing on stderr)")[-limit:]


def ptb_tokenize(*batches: Sequence[str], java: str | None = None) -> list[list[str]]:
    """Each batch of captions as pycocoevalcap's PTBTokenizer returns it: lower-case tokens joined
    by spaces, its punctuation list removed. Same jar and flags, but the input is a file in a
    private temp dir, batches run in parallel (one JVM each, as the toolkit tokenizes references
    and predictions in separate runs), and failures raise a UserError instead of misaligning."""
    java = java or check_java()
    results: list[list[str]] = [[] for _ in batches]
    todo = [i for i, b in enumerate(batches) if len(b)]
    timeout = 120.0 + sum(len(batches[i]) for i in todo) / 500.0
    with tempfile.TemporaryDirectory(prefix="imcap-ptb-") as tmp:
        procs: list[tuple[int, subprocess.Popen]] = []
        try:
            for i in todo:
                src = Path(tmp, f"captions{i}.txt")
                src.write_text(
                    "\n".join(_LINE_BREAKS.sub(" ", c) for c in batches[i]), encoding="utf-8"
                )
                with (
                    open(Path(tmp, f"out{i}"), "wb") as out,
                    open(Path(tmp, f"err{i}"), "wb") as err,
                ):
                    cmd = [java, *_PTB_ARGS, str(src)]
                    procs.append(
                        (i, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err))
                    )
            for i, proc in procs:
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise UserError(
                        f"Java's PTB tokenizer ran over {timeout:.0f} s; {_JAVA_FIX}"
                    ) from None
                lines = Path(tmp, f"out{i}").read_bytes().decode("utf-8", "replace").split("\n")
                if code != 0 or len(lines) != len(batches[i]):
                    raise UserError(
                        f"Java's PTB tokenizer failed (exit {code}, {len(lines)} lines for "
                        f"{len(batches[i])} captions): {_tail(Path(tmp, f'err{i}').read_bytes())}; {_JAVA_FIX}"
                    )
                results[i] = [
                    " ".join(w for w in ln.rstrip().split(" ") if w not in _PTB_PUNCTUATION)
                    for ln in lines
                ]
        except OSError as e:
            raise UserError(f"cannot run {java} for the PTB tokenizer: {e}; {_JAVA_FIX}") from None
        finally:
            for _, proc in procs:
                _kill(proc)
    return results


def _kill(proc: subprocess.Popen) -> None:
    """Stop a child for good, without ever blocking for long."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class _Meteor:
    """pycocoevalcap's METEOR 1.5 JVM and line protocol (SCORE lines -> stats, EVAL -> score),
    kept alive between calls. A call that fails or times out kills the JVM (the next call starts a
    fresh one) and raises a UserError with what Java printed."""

    def __init__(self, java: str, timeout: float) -> None:
        self.java, self.timeout = java, timeout
        self._proc: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None
        self._lock = threading.Lock()

    def score(self, refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> float:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            proc = self._proc
            assert proc is not None
            timed_out = threading.Event()

            def expire() -> None:  # a killed JVM ends the blocked read with EOF
                timed_out.set()
                proc.kill()

            timer = threading.Timer(self.timeout, expire)
            timer.daemon = True
            timer.start()
            done = False
            try:
                score = self._exchange(proc, refs, hyps)
                done = True
                return score
            except (OSError, ValueError) as e:  # BrokenPipeError, EOF, a garbled line
                why = f"no answer within {self.timeout:.0f} s" if timed_out.is_set() else str(e)
                raise UserError(
                    f"METEOR (java -jar {_toolkit_meteor.METEOR_JAR}) failed: {why}; java said: "
                    f"{self._stderr_tail()}; set `metrics.meteor=false` to skip METEOR"
                ) from None
            finally:
                timer.cancel()
                if not done:  # out of step with the protocol (or interrupted): never reuse it
                    self._close()

    def _start(self) -> None:
        self._close()
        # stderr goes to a file, never to a pipe nobody reads (the toolkit's possible deadlock)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _close()
        try:
            self._proc = subprocess.Popen(
                [self.java, *_METEOR_ARGS],
                cwd=_METEOR_DIR,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except OSError as e:
            raise UserError(f"cannot start METEOR with {self.java}: {e}; {_JAVA_FIX}") from None
        weakref.finalize(self, _kill, self._proc)

    @staticmethod
    def _exchange(
        proc: subprocess.Popen, refs: Sequence[Sequence[str]], hyps: Sequence[str]
    ) -> float:
        assert proc.stdin is not None and proc.stdout is not None
        # The toolkit's lines: "SCORE ||| ref 1 ||| ... ||| ref n ||| hypothesis"; it strips "|||"
        # from the hypothesis only, and nothing may contain a line break.
        lines = []
        for rs, hyp in zip(refs, hyps, strict=True):
            rs = [_LINE_BREAKS.sub(" ", r).replace("|||", "") for r in rs]
            hyp = _LINE_BREAKS.sub(" ", hyp).replace("|||", "").replace("  ", " ")
            lines.append(" ||| ".join(("SCORE", " ||| ".join(rs), hyp)) + "\n")
        errors: list[OSError] = []

        def write() -> None:  # in a thread: the JVM answers while we still write
            try:
                proc.stdin.write("".join(lines).encode())
                proc.stdin.flush()
            except OSError as e:
                errors.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()

        def readline() -> str:
            line = proc.stdout.readline()
            if not line:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                raise ValueError(f"the JVM exited (code {proc.returncode})")
            return line.decode().strip()

        stats = [readline() for _ in lines]
        writer.join()
        if errors:
            raise errors[0]
        proc.stdin.write(("EVAL" + "".join(f" ||| {s}" for s in stats) + "\n").encode())
        proc.stdin.flush()
        for _ in lines:  # per-image scores
            float(readline())
        return float(readline())

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return "(nothing on stderr)"
        self._stderr.seek(0)
        return _tail(self._stderr.read())

    def _close(self) -> None:
        if self._proc is not None:
            _kill(self._proc)
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        with self._lock:
            self._close()


class CaptionScorer:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr (and SPICE if asked) exactly as
    pycocoevalcap's COCOEvalCap computes them: PTB-tokenize references and predictions, then
    Bleu(4)'s corpus score (not a mean of sentence scores), Meteor, Rouge, Cider with all references.

    java=False tokenizes with `imcap.text.tokenize` (a regex emulation of the Java tokenizer) and
    drops METEOR. A METEOR JVM, once started, is reused by later calls until `close()`.
    """

    def __init__(
        self, java: bool = True, meteor: bool = True, spice: bool = False, timeout: float = 600.0
    ):
        self.java = check_java() if java else None
        self.spice = spice
        if spice:
            _check_spice(self.java)
        self._meteor = _Meteor(self.java, timeout) if meteor and self.java else None
        self.timeout = timeout

    @property
    def metrics(self) -> tuple[str, ...]:
        names = tuple(m for m in METRICS if m != "METEOR" or self._meteor is not None)
        return names + (("SPICE",) if self.spice else ())

    def __call__(
        self, preds: Mapping[Any, str], refs: Mapping[Any, Sequence[str]]
    ) -> dict[str, float]:
        """Scores keyed like METRICS. `preds`: image id -> caption ("" allowed); `refs`: the same ids
        -> non-empty list of reference captions."""
        ids = _check_inputs(preds, refs)
        ref_lists = [list(refs[i]) for i in ids]
        hyps = [preds[i] or "" for i in ids]
        if self.java:
            flat, hyps = ptb_tokenize([r for rs in ref_lists for r in rs], hyps, java=self.java)
        else:
            flat = [" ".join(tokenize(r)) for rs in ref_lists for r in rs]
            hyps = [" ".join(tokenize(h)) for h in hyps]
        gts, res, start = {}, {}, 0
        for k, rs in enumerate(ref_lists):  # the toolkit's dicts, keyed 0..N-1 in `refs` order
            gts[k], res[k] = flat[start : start + len(rs)], [hyps[k]]
            start += len(rs)

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, 1)}
        if self._meteor is not None:
            scores["METEOR"] = self._meteor.score([gts[k] for k in gts], hyps)
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        # Cider asserts on a corpus whose references have no words at all; every vector is zero then.
        has_words = any(r.split() for rs in gts.values() for r in rs)
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0]) if has_words else 0.0
        if self.spice:
            scores["SPICE"] = _spice(self.java, gts, hyps, self.timeout)
        return scores

    def close(self) -> None:
        """Stop the METEOR JVM (a later call starts a new one)."""
        if self._meteor is not None:
            self._meteor.close()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_inputs(preds: Mapping[Any, str], refs: Mapping[Any, Sequence[str]]) -> list:
    """Image ids in `refs` order, after checking the two cover the same images with usable text."""
    if not isinstance(preds, Mapping) or not isinstance(refs, Mapping):
        raise TypeError("preds and refs must be dicts keyed by image id")
    if not refs:
        raise ValueError("nothing to score: no images")
    missing, extra = refs.keys() - preds.keys(), preds.keys() - refs.keys()
    if missing or extra:
        raise ValueError(
            f"predictions and references must cover the same images: {len(missing)} without a "
            f"prediction (e.g. {sorted(map(str, missing))[:3]}), {len(extra)} without references "
            f"(e.g. {sorted(map(str, extra))[:3]})"
        )
    for k, rs in refs.items():
        if isinstance(rs, str) or not isinstance(rs, Sequence) or not rs:
            raise ValueError(
                f"image {k!r}: references must be a non-empty list of strings, got {rs!r:.80}"
            )
        if not all(isinstance(r, str) for r in rs):
            raise ValueError(f"image {k!r}: every reference must be a string")
        if preds[k] is not None and not isinstance(preds[k], str):
            raise ValueError(
                f"image {k!r}: the prediction must be a string, got {type(preds[k]).__name__}"
            )
    return list(refs)


_SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _check_spice(java: str | None) -> None:
    if java is None:
        raise UserError(
            "SPICE runs on Java: set `metrics.java=true` (with a JRE installed) or `metrics.spice=false`"
        )
    if not all((_SPICE_DIR / "lib" / m).exists() for m in _SPICE_MODELS):
        raise UserError(
            f"SPICE needs Stanford CoreNLP 3.6.0 in {_SPICE_DIR / 'lib'}: fetch it once online with "
            "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'`, "
            "or set `metrics.spice=false`"
        )


def _spice(java: str | None, gts: dict[int, list[str]], hyps: list[str], timeout: float) -> float:
    """pycocoevalcap's Spice (same jar and flags, mean of per-image 'All' F-scores), with its
    input and output files in a private temp dir instead of site-packages (and no shared cache)."""
    with tempfile.TemporaryDirectory(prefix="imcap-spice-") as tmp:
        src, out = Path(tmp, "in.json"), Path(tmp, "out.json")
        src.write_text(
            json.dumps(
                [{"image_id": k, "test": h, "refs": gts[k]} for k, h in zip(gts, hyps, strict=True)]
            )
        )
        cmd = [
            str(java),
            "-jar",
            "-Xmx8G",
            "spice-1.0.jar",
            str(src),
            "-out",
            str(out),
            "-subset",
            "-silent",
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=_SPICE_DIR, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise UserError(
                f"SPICE ran over {timeout:.0f} s; set `metrics.spice=false` to skip it"
            ) from None
        if proc.returncode != 0 or not out.exists():
            raise UserError(
                f"SPICE failed (exit {proc.returncode}): {_tail(proc.stderr)}; set `metrics.spice=false`"
            )
        results = json.loads(out.read_text())

    def f(item: dict) -> float:
        try:
            return float(item["scores"]["All"]["f"])
        except (TypeError, ValueError):
            return math.nan

    return float(np.mean([f(item) for item in results]))


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
