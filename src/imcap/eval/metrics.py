"""Caption metrics exactly as the COCO caption toolkit (pycocoevalcap 1.2) computes them (the
in-process CIDEr-D reward of self-critical training is `imcap.eval.cider`).

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
import json
import math
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pycocoevalcap.meteor.meteor as _toolkit_meteor
import pycocoevalcap.spice.spice as _toolkit_spice
import pycocoevalcap.tokenizer.ptbtokenizer as _toolkit_ptb
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from imcap.data.text import tokenize
from imcap.errors import UserError


@dataclass(frozen=True)
class MetricSpec:
    """One score the scorer can give. Everything that lists scores (the scorer's names, the run
    and eval.py summaries, the sweep table) reads `SPECS`, so a metric is added in one place."""

    name: str  # the key in score dicts and in logged names (`val/<name>`)
    flag: str | None = None  # the `metrics.<flag>` that turns it on; None: always on
    java: bool = False  # runs on a JVM, so needs `metrics.java=true`
    headline: bool = False  # shown in the one-line summaries (end of a run, sweep table)


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("BLEU-1", headline=True),
    MetricSpec("BLEU-2"),
    MetricSpec("BLEU-3"),
    MetricSpec("BLEU-4", headline=True),
    MetricSpec("METEOR", flag="meteor", java=True, headline=True),
    MetricSpec("ROUGE-L", headline=True),
    MetricSpec("CIDEr", headline=True),
    MetricSpec("SPICE", flag="spice", java=True, headline=True),
)
# what checkpoints are selected on and sweeps ranked by, unless `optimized_metric` says otherwise
OBJECTIVE = "val/CIDEr"


def metric_names(headline: bool = False) -> tuple[str, ...]:
    """Every metric's name in `SPECS` order (only the headline ones if asked), read at call time."""
    return tuple(s.name for s in SPECS if s.headline or not headline)


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

    java=False tokenizes with `imcap.data.text.tokenize` (a regex emulation of the Java tokenizer) and
    drops METEOR. A METEOR JVM, once started, is reused by later calls until `close()`. Building
    one checks Java and SPICE's jars and spawns nothing, so it doubles as a start-up check.
    """

    def __init__(
        self, java: bool = True, meteor: bool = True, spice: bool = False, timeout: float = 600.0
    ):
        self.java = check_java() if java else None
        self.spice = spice
        if spice:
            check_spice(self.java)
        self._meteor = _Meteor(self.java, timeout) if meteor and self.java else None
        self.timeout = timeout

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], final: bool = True, timeout: float = 600.0
    ) -> CaptionScorer:
        """The scorer the `metrics` config asks for. `final=False` (validation during training)
        leaves out the slow JVM metrics: METEOR unless `meteor_every_epoch`, SPICE always."""
        on = {s.flag: bool(cfg.get(s.flag, False)) for s in SPECS if s.flag}
        if not final:
            on["meteor"] = on["meteor"] and bool(cfg.get("meteor_every_epoch", False))
            on["spice"] = False
        return cls(java=bool(cfg.get("java", True)), timeout=timeout, **on)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The names this scorer's results have, in `SPECS` order."""
        on = {"meteor": self._meteor is not None, "spice": self.spice}
        return tuple(
            s.name
            for s in SPECS
            if (s.flag is None or on.get(s.flag, False)) and (self.java or not s.java)
        )

    def __call__(
        self,
        preds: Mapping[Any, str],
        refs: Mapping[Any, Sequence[str]],
        groups: Mapping[Any, str] | None = None,
    ) -> dict[str, float]:
        """Scores keyed by `self.metrics`. `preds`: image id -> caption ("" allowed); `refs`: the
        same ids -> non-empty list of reference captions.

        `groups` (image id -> group name, e.g. nocaps' domain; ids absent: in no group) adds
        each group's scores as `<group>/<metric>`, the group scored as a corpus of its own
        (CIDEr's document frequencies, BLEU's counts over that group's images only), exactly as
        the toolkit scores that subset; captions are tokenized once for all."""
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
        spice = _spice(self.java, gts, hyps, self.timeout) if self.spice else None
        scores = self._corpus(gts, res, list(gts), spice)
        members: dict[str, list[int]] = {}
        for k, i in enumerate(ids):
            group = (groups or {}).get(i)
            if group is not None:
                members.setdefault(str(group), []).append(k)
        for group, keys in sorted(members.items()):
            sub = self._corpus({k: gts[k] for k in keys}, {k: res[k] for k in keys}, keys, spice)
            scores |= {f"{group}/{name}": value for name, value in sub.items()}
        return scores

    def _corpus(
        self,
        gts: dict[int, list[str]],
        res: dict[int, list[str]],
        keys: list[int],
        spice: list[float] | None,
    ) -> dict[str, float]:
        """The toolkit's scores of one corpus of tokenized captions (SPICE: the mean of the
        images' own scores, computed once for every image)."""
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, 1)}
        if self._meteor is not None:
            scores["METEOR"] = self._meteor.score([gts[k] for k in keys], [res[k][0] for k in keys])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        # Cider asserts on a corpus whose references have no words at all; every vector is zero then.
        has_words = any(r.split() for rs in gts.values() for r in rs)
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0]) if has_words else 0.0
        if spice is not None:
            scores["SPICE"] = float(np.mean([spice[k] for k in keys]))
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


# spice-1.0.jar's manifest class path; pycocoevalcap's get_stanford_models() downloads them on
# first use (from nlp.stanford.edu, into site-packages), so an offline install has neither
_SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_GET_SPICE_MODELS = (
    "python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'"
)


def check_spice(java: str | None) -> None:
    """A one-line UserError, before anything runs, when SPICE could only fail at the end:
    no Java, or no Stanford CoreNLP jars (fetched online on first use)."""
    if java is None:
        raise UserError(
            "SPICE runs on Java: set `metrics.java=true` (with a JRE installed) or `metrics.spice=false`"
        )
    lib = _SPICE_DIR / "lib"
    missing = [str(lib / m) for m in _SPICE_MODELS if not (lib / m).is_file()]
    if missing:
        raise UserError(
            f"SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use and "
            f"this install lacks (missing {', '.join(missing)}): set `metrics.spice=false`, or "
            f"fetch it once, online and with write access to {lib}, with `{_GET_SPICE_MODELS}`"
        )


def _spice(
    java: str | None, gts: dict[int, list[str]], hyps: list[str], timeout: float
) -> list[float]:
    """pycocoevalcap's Spice (same jar and flags; its score is the mean of these per-image 'All'
    F-scores, in `gts` order), with its input and output files in a private temp dir instead of
    site-packages, and without `-cache`: its LMDB cache is shared state, and its FST serializer
    fails on Java 17+."""
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

    by_id = {item.get("image_id"): f(item) for item in results}
    return [by_id.get(k, math.nan) for k in gts]
