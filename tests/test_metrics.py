"""Caption metrics: the COCO toolkit's numbers, its Java failure modes turned into clear errors,
and the in-process CIDEr-D used for self-critical rewards."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

import imcap.eval.metrics as metrics
from imcap.errors import UserError
from imcap.eval.cider import CiderD
from imcap.eval.metrics import CaptionScorer, check_java, ptb_tokenize

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(
    JAVA is None, reason="java not installed: pycocoevalcap's tokenizer/METEOR need it"
)
needs_bash = pytest.mark.skipif(sys.platform == "win32", reason="fake java is a shell script")

# Six images, five distinct references each: plain lower-case words, no punctuation, so the Java
# and Python tokenizers agree by construction.
SUBJECTS = ["a dog", "a small girl", "two men", "an old woman", "a black cat", "three kids"]
ACTIONS = ["runs across", "sits on", "jumps over", "walks along", "plays near"]
PLACES = ["the green grass", "a wooden bench", "a muddy puddle", "the sandy beach", "a busy street"]
REFS = {
    f"img{i}": [f"{s} {ACTIONS[(i + j) % 5]} {PLACES[(2 * i + j) % 5]}" for j in range(5)]
    for i, s in enumerate(SUBJECTS)
}
SCORE_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}


def _shuffled(refs: dict[str, list[str]]) -> dict[str, str]:
    keys = list(refs)
    return {k: refs[keys[(i + 1) % len(keys)]][0] for i, k in enumerate(keys)}


# -- the toolkit's numbers -------------------------------------------------------------------------
@pytest.mark.parametrize("java", [pytest.param(True, marks=needs_java), False])
def test_perfect_predictions_score_top_and_shuffled_ones_low(java: bool) -> None:
    scorer = CaptionScorer(java=java, meteor=False)
    perfect = scorer({k: v[2] for k, v in REFS.items()}, REFS)  # one of five references
    assert set(perfect) == SCORE_KEYS
    assert perfect["BLEU-4"] >= 0.999 and perfect["BLEU-1"] >= 0.999
    assert perfect["CIDEr"] > 1.0
    shuffled = scorer(_shuffled(REFS), REFS)  # right sentences, wrong images
    assert shuffled["BLEU-4"] < 0.5 * perfect["BLEU-4"]
    assert shuffled["CIDEr"] < 0.3 * perfect["CIDEr"]
    assert shuffled["ROUGE-L"] < perfect["ROUGE-L"]


def test_prediction_equal_to_all_references_gets_cider_ten() -> None:
    refs = {k: [v[0]] * 5 for k, v in REFS.items()}
    scores = CaptionScorer(java=False, meteor=False)({k: v[0] for k, v in refs.items()}, refs)
    assert scores["BLEU-4"] >= 0.999
    assert scores["CIDEr"] == pytest.approx(10.0)  # cosine 1 for every n, no length penalty, x10


def test_bleu_is_corpus_level_not_a_mean_of_sentence_scores() -> None:
    refs = {
        "long": ["a man in a red shirt is riding a blue bike down the hill"],
        "short": ["a cat"],
    }
    preds = {"long": "a man in a red shirt is riding a blue bike down the hill", "short": "dog"}
    scores = CaptionScorer(java=False, meteor=False)(preds, refs)
    gts, res = {k: v for k, v in refs.items()}, {k: [v] for k, v in preds.items()}
    corpus, per_sentence = Bleu(4).compute_score(gts, res, verbose=0)
    assert scores["BLEU-4"] == pytest.approx(corpus[3])
    assert abs(scores["BLEU-4"] - float(np.mean(per_sentence[3]))) > 0.1  # (1.0 + ~0) / 2 vs ~0.94


@needs_java
def test_java_and_python_tokenizers_give_the_same_scores_on_plain_captions() -> None:
    preds = {k: f"{v[0]} today" for k, v in REFS.items()}
    with_java = CaptionScorer(java=True, meteor=False)(preds, REFS)
    without = CaptionScorer(java=False, meteor=False)(preds, REFS)
    assert set(with_java) == set(without) == SCORE_KEYS
    for name in SCORE_KEYS:
        assert with_java[name] == pytest.approx(without[name], abs=1e-12), name


@needs_java
def test_java_path_tokenizes_like_the_toolkit() -> None:
    """Raw captions (capitals, punctuation, clitics, a line break) are PTB-tokenized first."""
    refs = {"1": ["A dog's running.", "The DOG runs!"], "2": ["A cat\r\nsleeps (soundly)."]}
    preds = {"1": "a dog 's running", "2": "a cat sleeps -lrb- soundly -rrb-"}
    scores = CaptionScorer(java=True, meteor=False)(preds, refs)
    assert scores["BLEU-4"] >= 0.999  # every prediction equals a tokenized reference
    assert ptb_tokenize(["A cat\r\nsleeps\u2028now.", "next"]) == [["a cat sleeps now", "next"]]


# -- bad input ------------------------------------------------------------------------------------
def test_input_validation() -> None:
    scorer = CaptionScorer(java=False, meteor=False)
    with pytest.raises(ValueError, match="same images"):
        scorer({"img0": "a dog"}, {"img0": ["a dog"], "img1": ["a cat"]})
    with pytest.raises(ValueError, match="same images"):
        scorer({"img0": "a dog", "x": "a cat"}, {"img0": ["a dog"]})
    with pytest.raises(ValueError, match="non-empty list"):
        scorer({"img0": "a dog"}, {"img0": []})
    with pytest.raises(ValueError, match="non-empty list"):
        scorer({"img0": "a dog"}, {"img0": "a dog"})
    with pytest.raises(ValueError, match="must be a string"):
        scorer({"img0": 3}, {"img0": ["a dog"]})
    with pytest.raises(ValueError, match="no images"):
        scorer({}, {})


@pytest.mark.parametrize("java", [pytest.param(True, marks=needs_java), False])
def test_empty_predictions_and_references_are_scored_not_crashed(java: bool) -> None:
    scorer = CaptionScorer(java=java, meteor=False)
    refs = {"a": ["a dog runs", "a dog is running"], "b": ["a cat", ""]}
    some = scorer({"a": "a dog runs", "b": ""}, refs)
    assert some["BLEU-1"] > 0.3 and some["CIDEr"] > 0
    nothing = scorer({"a": "", "b": None}, refs)
    assert nothing["BLEU-1"] == pytest.approx(0.0, abs=1e-6) and nothing["CIDEr"] == 0.0
    blank = scorer(
        {"a": "x"}, {"a": [""]}
    )  # no reference words anywhere: the toolkit's Cider asserts
    assert blank["CIDEr"] == 0.0


def test_missing_java_is_a_user_error_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args, **kwargs):
        raise AssertionError("spawned a process")

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    start = time.perf_counter()
    for make in (check_java, CaptionScorer, lambda: CaptionScorer(meteor=False)):
        with pytest.raises(UserError, match="metrics.java=false") as err:
            make()
        assert "apt install default-jre" in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 1.0
    assert CaptionScorer(java=False)({"a": "a dog"}, {"a": ["a dog"]})["BLEU-1"] > 0.99


# -- Java that misbehaves: a fake `java` on PATH, no JVM needed -------------------------------------
FAKE_JAVA = """#!/bin/sh
case " $* " in
  *" -stdio "*)  # METEOR
    case "$FAKE_METEOR" in
      die) read line; echo "Error occurred during initialization of VM" >&2; exit 1 ;;
      hang) exec sleep 600 ;;
      garble) while read line; do echo "not a number"; done ;;
    esac ;;
  *" -subset "*)  # SPICE: two per-image F-scores into the file after -out
    prev=""
    for a in "$@"; do [ "$prev" = "-out" ] && out="$a"; prev="$a"; done
    echo '[{"image_id": 0, "scores": {"All": {"f": 0.25}}},
           {"image_id": 1, "scores": {"All": {"f": 0.75}}}]' > "$out" ;;
  *)  # PTB tokenizer: echo the file back (last argument), or fail
    if [ -n "$FAKE_PTB_FAIL" ]; then echo "Exception in thread main" >&2; exit 3; fi
    for last in "$@"; do :; done
    cat "$last" ;;
esac
"""


@pytest.fixture
def fake_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text(FAKE_JAVA)
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{java.parent}{os.pathsep}{os.environ['PATH']}")
    return java


@needs_bash
@pytest.mark.parametrize(
    ("mode", "message"),
    [("die", "initialization of VM"), ("hang", "no answer within 2 s"), ("garble", "not a number")],
)
def test_failing_meteor_gives_a_clear_error_not_a_hang(
    fake_java: Path, monkeypatch: pytest.MonkeyPatch, mode: str, message: str
) -> None:
    monkeypatch.setenv("FAKE_METEOR", mode)
    scorer = CaptionScorer(java=True, meteor=True, timeout=2)
    assert scorer.java == str(fake_java)
    preds, refs = {"a": "a dog\nruns"}, {"a": ["a dog runs", "a dog"]}
    for _ in range(2):  # a failed call leaves no stuck lock or half-read pipe behind
        start = time.perf_counter()
        with pytest.raises(UserError, match="metrics.meteor=false") as err:
            scorer(preds, refs)
        assert message in str(err.value)
        assert time.perf_counter() - start < 15
    scorer.close()


@needs_bash
def test_failing_tokenizer_gives_a_clear_error(
    fake_java: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_PTB_FAIL", "1")
    with pytest.raises(UserError, match="PTB tokenizer failed.*Exception in thread main"):
        CaptionScorer(java=True, meteor=False)({"a": "a dog"}, {"a": ["a dog"]})


# -- CIDEr-D for rewards --------------------------------------------------------------------------
def _toy_corpus(seed: int = 0) -> tuple[dict[str, list[list[str]]], list[list[str]], list[str]]:
    rng = random.Random(seed)
    words = [
        "a",
        "the",
        "dog",
        "cat",
        "man",
        "woman",
        "runs",
        "sits",
        "on",
        "in",
        "red",
        "blue",
        "ball",
        "grass",
        "park",
        "street",
    ]
    refs = {
        f"im{i}": [
            [rng.choice(words) for _ in range(rng.randint(0, 10))] for _ in range(rng.randint(1, 6))
        ]
        for i in range(20)
    }
    ids = list(refs)
    cands = [
        [rng.choice([*words, "zebra", "unicorn"]) for _ in range(rng.randint(0, 12))] for _ in ids
    ]
    cands[0], cands[1], cands[2] = (
        [],
        ["dog"],
        ["zebra", "zebra", "dog", "zebra"],
    )  # empty, 1 word, unknowns
    cands[3] = list(refs[ids[3]][0])  # a reference itself
    return refs, cands, ids


def test_cider_d_equals_toolkit_cider_on_a_toy_corpus() -> None:
    refs, cands, ids = _toy_corpus()
    ours = CiderD(refs)(cands, ids)
    mean, per_image = Cider().compute_score(
        {k: [" ".join(r) for r in v] for k, v in refs.items()},
        {k: [" ".join(c)] for k, c in zip(ids, cands, strict=True)},
    )
    assert ours.shape == (len(ids),)
    assert ours.mean() == pytest.approx(mean, abs=1e-6)
    np.testing.assert_allclose(ours, per_image, atol=1e-6)
    assert ours[3] > ours.mean()  # sanity: a reference scores well against its own image


def test_cider_d_scores_do_not_depend_on_the_batch() -> None:
    """Document frequencies are the corpus's: any batch (repeats, any order) scores the same."""
    refs, cands, ids = _toy_corpus(seed=1)
    cider = CiderD(refs)
    full = cider(cands, ids)
    pick = [5, 5, 0, 17, 3, 5]
    np.testing.assert_allclose(
        cider([cands[i] for i in pick], [ids[i] for i in pick]), full[pick], rtol=1e-12
    )
    assert cider([], []).shape == (0,)


def test_cider_d_bad_input() -> None:
    refs, cands, ids = _toy_corpus()
    cider = CiderD(refs)
    with pytest.raises(ValueError, match="no references"):
        cider([["a", "dog"]], ["not-an-image"])
    with pytest.raises(ValueError, match="2 image ids"):
        cider([["a"]], ids[:2])
    with pytest.raises(ValueError, match="non-empty list"):
        CiderD({"x": []})


# -- the real METEOR JVM (about 20 s to start) ----------------------------------------------------
@pytest.mark.slow
@needs_java
def test_meteor_matches_the_toolkit_and_survives_a_dead_jvm() -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    preds = _shuffled(REFS) | {"img0": REFS["img0"][1], "img1": ""}
    with CaptionScorer(java=True, meteor=True) as scorer:
        first = scorer(preds, REFS)
        assert set(first) == SCORE_KEYS | {"METEOR"}
        assert scorer(preds, REFS)["METEOR"] == first["METEOR"]  # the JVM is reused
        scorer._meteor._proc.kill()  # a JVM that died between calls is restarted
        scorer._meteor._proc.wait()
        assert scorer(preds, REFS)["METEOR"] == first["METEOR"]
    toolkit = Meteor()
    expected, _ = toolkit.compute_score(
        {k: v for k, v in REFS.items()}, {k: [v] for k, v in preds.items()}
    )
    assert first["METEOR"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < first["METEOR"] < 1.0


@needs_bash
def test_spice_without_its_models_or_java_is_a_user_error(
    fake_java: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        metrics, "_SPICE_DIR", fake_java.parent
    )  # no lib/stanford-corenlp-3.6.0*.jar there
    with pytest.raises(UserError, match="metrics.spice=false"):
        CaptionScorer(java=True, spice=True)
    with pytest.raises(UserError, match="metrics.spice=false"):
        CaptionScorer(java=False, spice=True)


def _fake_spice_dir(tmp: Path, *jars: str) -> Path:
    """A copy of pycocoevalcap's spice/ folder layout holding only the named CoreNLP jars."""
    (tmp / "spice" / "lib").mkdir(parents=True)
    for jar in jars:
        (tmp / "spice" / "lib" / jar).write_bytes(b"")
    return tmp / "spice"


def test_spice_without_corenlp_fails_at_start_up_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, pycocoevalcap never got its CoreNLP jars: train/eval stop before anything runs,
    naming the missing file, the download step and `metrics.spice=false`."""
    from conftest import compose_train

    from imcap.pipeline.checks import check_metrics_env

    def no_subprocess(*args, **kwargs):
        raise AssertionError("spawned a process")

    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/opt/jre/bin/java")
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    spice = _fake_spice_dir(tmp_path, "stanford-corenlp-3.6.0.jar")  # the models jar is missing
    monkeypatch.setattr(metrics, "_SPICE_DIR", spice)
    check_metrics_env(compose_train(["metrics.java=true"]))  # SPICE off by default: no check
    with pytest.raises(UserError) as err:
        check_metrics_env(compose_train(["metrics.java=true", "metrics.spice=true"]))
    msg = str(err.value)
    assert "\n" not in msg and "`metrics.spice=false`" in msg
    assert str(spice / "lib" / "stanford-corenlp-3.6.0-models.jar") in msg
    assert "stanford-corenlp-3.6.0.jar," not in msg  # only what is missing
    assert "get_stanford_models" in msg
    with pytest.raises(UserError, match="SPICE runs on Java.*metrics.spice=false"):
        check_metrics_env(compose_train(["metrics.java=false", "metrics.spice=true"]))


@needs_bash
def test_metrics_spice_true_composes_and_reaches_the_scores(
    fake_java: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import compose_train

    from imcap.pipeline.checks import check_metrics_env
    from imcap.pipeline.runtime import plain

    monkeypatch.setattr(metrics, "_SPICE_DIR", _fake_spice_dir(tmp_path, *metrics._SPICE_MODELS))
    assert compose_train([]).metrics.spice is False
    cfg = compose_train(["metrics.java=true", "metrics.meteor=false", "metrics.spice=true"])
    check_metrics_env(cfg)
    final = CaptionScorer.from_config(plain(cfg.metrics))
    assert final.spice and set(final.metrics) == SCORE_KEYS | {"SPICE"}
    scores = final({"a": "a dog runs", "b": "a cat"}, {"a": ["a dog runs"], "b": ["a black cat"]})
    assert set(scores) == set(final.metrics) and scores["SPICE"] == pytest.approx(0.5)
    # validation during training leaves the slow JVM metrics out
    assert "SPICE" not in CaptionScorer.from_config(plain(cfg.metrics), final=False).metrics
    # a run config from before `metrics.spice` existed has no SPICE
    assert CaptionScorer.from_config({"java": True, "meteor": False}).metrics == final.metrics[:-1]


# -- one list of metrics -------------------------------------------------------------------------
def test_every_metric_listing_reads_the_one_declaration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A metric added to `metrics.SPECS` shows up in the run summary, eval.py's names and the
    sweep table (headline ones only where a headline is shown), with nothing else to edit."""
    from imcap.pipeline import hydra_callbacks, run

    specs = (*metrics.SPECS, metrics.MetricSpec("FAKE", headline=True), metrics.MetricSpec("FINE"))
    monkeypatch.setattr(metrics, "SPECS", specs)
    scores = {"BLEU-1": 0.6, "CIDEr": 0.9, "FAKE": 0.5, "FINE": 0.25}
    assert metrics.metric_names()[-2:] == ("FAKE", "FINE")
    assert "FAKE" in metrics.metric_names(headline=True)
    assert "FINE" not in metrics.metric_names(headline=True)

    run.summary(tmp_path, None, {"val": scores, "total_seconds": 1.0}, None)
    out = capsys.readouterr().out
    assert "CIDEr 90.0  FAKE 50.0" in out and "FINE" not in out

    for job, fake in (("0", 0.5), ("1", 0.7)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        result = {"val": {**scores, "FAKE": fake}, "total_seconds": 2.0}
        (tmp_path / job / "metrics.json").write_text(json.dumps(result))
    rows = hydra_callbacks.collect(tmp_path)
    assert rows[0]["val/FAKE"] == 50.0 and "val/FINE" not in rows[0]
    monkeypatch.setattr(metrics, "OBJECTIVE", "val/FAKE")  # the default ranking, declared once
    md = hydra_callbacks.write_summary(tmp_path, rows).read_text()
    assert md.startswith("Scores x100, best val/FAKE first")
    assert md.index("| 1 | ok |") < md.index("| 0 | ok |")


def test_no_module_retypes_the_metric_list() -> None:
    """Three or more metric names written out together outside eval/metrics.py is a second
    copy of the list that a new metric would miss: read `metrics.SPECS` instead."""
    import ast

    names = set(metrics.metric_names())
    src = Path(metrics.__file__).parents[1]
    copies = []
    for path in src.rglob("*.py"):
        if path == Path(metrics.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                found = [
                    e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names
                ]
                if len(found) >= 3:
                    copies.append(f"{path.relative_to(src)}:{node.lineno} {found}")
    assert not copies, copies
