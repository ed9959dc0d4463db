"""nocaps: the official annotation files read through config alone, evaluation only, each domain
scored as its own corpus (as the nocaps leaderboard scores them) and checked against
pycocoevalcap run directly on that domain's images, and the EvalAI submission file."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as _toolkit_ptb
import pytest
from conftest import ROOT, compose_train, data_config, data_source, demo_checkpoint, needs_java
from omegaconf import OmegaConf
from PIL import Image

from imcap.data.datasets import _context, load_records
from imcap.errors import UserError

DOMAINS = ("in-domain", "near-domain", "out-domain")
VAL_FILE, TEST_FILE = "nocaps_val_4500_captions.json", "nocaps_test_image_info.json"
# words the untrained demo checkpoint says ("a square on the the ..."), and others
WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "on", "the", "right", "dog", "mat"]
# how often a domain's references start "A square on the": the domains' document frequencies
# differ, so a domain scored inside the whole corpus gets other CIDEr values than on its own
SQUARE = {"in-domain": 0.9, "near-domain": 0.5, "out-domain": 0.1}


def _image(path: Path, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    Image.new("RGB", (40, 30), color).save(path, "JPEG")


def _sentence(rng: random.Random, domain: str) -> str:
    start = "A square on the" if rng.random() < SQUARE[domain] else "The"
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 7)))
    return f"{start} {words}."


def write_nocaps(root: Path, per_domain: int = 2, n_test: int = 3, seed: int = 0) -> Path:
    """The two official files in their exact layout (COCO's plus images[].domain, the test file
    without annotations; 10 references per val image) and their images: val under images/val/
    (one under images/validation/, as Open Images' archive unpacks), test under test/. Test
    ids start at 0 like val's: the two files number their images independently."""
    rng = random.Random(seed)
    images, anns = [], []
    for domain in DOMAINS:
        for _ in range(per_domain):
            n = len(images)
            oid = f"{0x0013EA2087020901 + n:016x}"
            folder = "validation" if n == 1 else "val"
            _image(root / "images" / folder / f"{oid}.jpg", rng)
            images.append(
                {
                    "id": n,
                    "open_images_id": oid,
                    "height": 30,
                    "width": 40,
                    "coco_url": f"https://s3.amazonaws.com/nocaps/val/{oid}.jpg",
                    "file_name": f"{oid}.jpg",
                    "license": 0,
                    "date_captured": "2018-11-06 11:04:33",
                    "domain": domain,
                }
            )
            anns += [
                {"image_id": n, "id": 10 * n + k, "caption": _sentence(rng, domain)}
                for k in range(10)
            ]
    info = {"url": "http://nocaps.org", "version": "0.1", "year": 2018}
    (root / VAL_FILE).write_text(
        json.dumps({"licenses": [], "info": info, "images": images, "annotations": anns})
    )
    test = []
    for n in range(n_test):
        oid = f"{0x00F0000000000000 + n:016x}"
        _image(root / "test" / f"{oid}.jpg", rng)
        test.append({"id": n, "open_images_id": oid, "file_name": f"{oid}.jpg", "license": 0})
    (root / TEST_FILE).write_text(json.dumps({"licenses": [], "info": info, "images": test}))
    return root


def load(root: Path, **changes: object):
    return load_records("nocaps", root, "skip", **data_source("nocaps", **changes))


def compose_eval(out: Path, *overrides: str):
    """eval.py's config as `python src/eval.py <overrides>` composes it (run dir: `out`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[f"paths.output_dir={out}", "data.num_workers=0", *overrides],
        )


@pytest.fixture(scope="module")
def nocaps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("nocaps")
    ckpt = demo_checkpoint(tmp / "demo.ckpt", attention=False)
    return {"root": write_nocaps(tmp / "nocaps"), "ckpt": ckpt, "tmp": tmp}


def _run_eval(nocaps: dict[str, Path], out: Path, *overrides: str) -> dict[str, float]:
    from imcap.pipeline.run import evaluate

    return evaluate(
        compose_eval(
            out,
            f"ckpt_path={nocaps['ckpt']}",
            "data=nocaps",
            f"data.root={nocaps['root']}",
            f"metrics.java={str(shutil.which('java') is not None).lower()}",
            "model.max_len=6",  # captions as long as the references: CIDEr-D's length penalty
            *overrides,
        )
    )


# ----------------------------------------------------------------------------- reading


def test_official_files_read_through_config(nocaps: dict[str, Path]) -> None:
    recs = load(nocaps["root"])
    val = [r for r in recs if r.split == "val"]
    test = [r for r in recs if r.split == "test"]
    assert len(val) == 6 and len(test) == 3 and not [r for r in recs if r.split == "train"]
    assert all(len(r.captions) == 10 for r in val) and all(r.captions == [] for r in test)
    # the id EvalAI knows and the domain are attributes; the image id is the Open Images id
    assert sorted(int(r.attributes["id"]) for r in val) == list(range(6))
    assert sorted(int(r.attributes["id"]) for r in test) == [0, 1, 2]  # numbered apart from val
    assert {r.attributes["domain"] for r in val} == set(DOMAINS)
    assert all(r.path.name == f"{r.image_id}.jpg" and r.path.is_file() for r in recs)
    assert {r.path.parent.name for r in val} == {"val", "validation"}
    assert {r.path.parent for r in test} == {nocaps["root"] / "test"}


def test_nocaps_yaml_documents_every_key(nocaps: dict[str, Path]) -> None:
    path = ROOT / "conf" / "data" / "nocaps.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert cfg["root"] == "${paths.data_dir}/nocaps" and cfg["defaults"] == ["_base", "_self_"]
    source = data_config("nocaps")["source"]
    _context("nocaps", nocaps["root"], source)  # every key known, every reader registered
    lines = path.read_text().splitlines()
    for key in source:
        i = next(n for n, ln in enumerate(lines) if ln.startswith(f"  {key}:"))
        assert lines[i - 1].lstrip().startswith("#"), f"source.{key} has no comment"


def test_missing_files_name_the_file_and_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nocaps data folder not found"):
        load(tmp_path / "absent")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(
        UserError, match=rf"no nocaps caption file .*{VAL_FILE}.*nocaps\.s3\.amazonaws\.com"
    ):
        load(tmp_path / "empty")
    root = write_nocaps(tmp_path / "n")
    (root / TEST_FILE).unlink()
    with pytest.raises(UserError) as err:
        load(root)
    msg = str(err.value)
    assert f"nocaps test annotation file not found (looked for {root / TEST_FILE}" in msg
    assert f"https://s3.amazonaws.com/nocaps/{TEST_FILE}" in msg
    assert "data.source.annotations.test=null" in msg and "\n" not in msg
    assert {r.split for r in load(root, annotations={"test": None})} == {"val"}
    shutil.rmtree(root / "images")
    with pytest.raises(UserError) as err:
        load(root, annotations={"test": None})
    msg = str(err.value)
    assert f"none of the 6 images named in {root / VAL_FILE} exist" in msg
    assert "coco_url" in msg and "images/val/" in msg


def test_garbled_annotation_file_names_it(tmp_path: Path) -> None:
    root = write_nocaps(tmp_path)
    (root / VAL_FILE).write_text('{"images": [{"file_name": "x.jpg"}]}')
    with pytest.raises(UserError, match=rf"nocaps annotation file {root / VAL_FILE} is not valid"):
        load(root)


# ----------------------------------------------------------------------------- evaluation only


def test_training_on_nocaps_is_refused_with_the_fix(nocaps: dict[str, Path]) -> None:
    from imcap.pipeline.checks import check_train_config
    from imcap.pipeline.datamodule import CaptionDataModule

    fix = r"nocaps is for evaluation only: it has no training split; fix: train on COCO"
    cfg = compose_train(["data=nocaps", f"data.root={nocaps['root']}", "metrics.java=false"])
    with pytest.raises(UserError, match=fix) as err:
        check_train_config(cfg)  # train.py's first step: before anything is read
    assert "python src/eval.py ckpt_path=<checkpoint> data=nocaps split=val" in str(err.value)
    # the data module says the same to code that skips the start-up check
    dm = CaptionDataModule.from_config(data_config("nocaps", f"data.root={nocaps['root']}"))
    with pytest.raises(UserError, match=fix):
        dm.build_vocab()


# ----------------------------------------------------------------------------- scores


def _toolkit(gts: dict, res: dict) -> dict[str, float]:
    """pycocoevalcap itself on one corpus: its PTB tokenizer, then Bleu, Rouge and Cider."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    return {
        "BLEU-1": bleu[0],
        "BLEU-4": bleu[3],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": cider,
        "per_image": dict(zip(gts, per_image, strict=True)),
    }


PTB_WRITABLE = os.access(Path(_toolkit_ptb.__file__).parent, os.W_OK)


@needs_java
@pytest.mark.skipif(not PTB_WRITABLE, reason="pycocoevalcap's tokenizer writes into its folder")
def test_val_scores_each_domain_as_its_own_corpus(
    nocaps: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scores = _run_eval(nocaps, tmp_path, "split=val", "metrics.meteor=false")
    rows = json.loads((tmp_path / "captions_val.json").read_text())
    ann = json.loads((nocaps["root"] / VAL_FILE).read_text())
    refs: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    domain = {im["id"]: im["domain"] for im in ann["images"]}
    preds = {int(r["id"]): r["caption"] for r in rows}
    assert sorted(preds) == list(range(6)) and {r["domain"] for r in rows} == set(DOMAINS)

    everything = _toolkit({i: refs[i] for i in preds}, {i: [c] for i, c in preds.items()})
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert scores[name] == pytest.approx(everything[name], abs=1e-12), name
    shared_df = {}
    for d in DOMAINS:
        ids = [i for i in preds if domain[i] == d]
        alone = _toolkit({i: refs[i] for i in ids}, {i: [preds[i]] for i in ids})
        for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
            assert scores[f"{d}/{name}"] == pytest.approx(alone[name], abs=1e-12), (d, name)
        assert scores[f"{d}/num_images"] == 2
        shared_df[d] = sum(everything["per_image"][i] for i in ids) / len(ids)
    # the check has teeth: the captions overlap the references, and a domain scored inside the
    # whole corpus (its document frequencies) would give other values
    assert max(scores[f"{d}/CIDEr"] for d in DOMAINS) > 0.05
    assert max(abs(scores[f"{d}/CIDEr"] - shared_df[d]) for d in DOMAINS) > 1e-3

    result = json.loads((tmp_path / "metrics_val.json").read_text())
    assert result["group_by"] == "domain" and result["scores"]["CIDEr"] == scores["CIDEr"]
    assert result["metrics"]["val/CIDEr"] == scores["CIDEr"]
    assert result["metrics"]["val/out-domain/CIDEr"] == scores["out-domain/CIDEr"]
    # the EvalAI submission: every val image once, by its nocaps id, sorted
    sub = json.loads((tmp_path / "captions_val_imcap_results.json").read_text())
    assert sub == [{"image_id": i, "caption": preds[i]} for i in range(6)]
    # the printed table: a row per domain and one overall, x100
    out = capsys.readouterr().out
    table = out[out.index("\ndomain ") + 1 :].splitlines()
    assert [ln.split()[0] for ln in table[:5]] == ["domain", *DOMAINS, "overall"]
    assert f"{100 * scores['near-domain/CIDEr']:.2f}" in table[2]
    assert table[4].split()[1] == "6"


def test_test_split_writes_captions_and_the_submission_only(
    nocaps: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scores = _run_eval(nocaps, tmp_path, "split=test")
    assert scores == {"num_images": 3.0}
    result = json.loads((tmp_path / "metrics_test.json").read_text())
    assert result["scores"] == {"num_images": 3.0}
    assert result["note"] == (
        "no scores: no reference captions for nocaps test "
        "(a caption server scores captions_test_imcap_results.json)"
    )
    sub = json.loads((tmp_path / "captions_test_imcap_results.json").read_text())
    assert [s["image_id"] for s in sub] == [0, 1, 2] and all(s["caption"] for s in sub)
    rows = json.loads((tmp_path / "captions_test.json").read_text())
    assert {r["id"]: r["caption"] for r in rows} == {str(s["image_id"]): s["caption"] for s in sub}
    assert all(r["references"] == [] for r in rows)
    out = capsys.readouterr().out
    assert "no scores: no reference captions for nocaps test" in out and "CIDEr" not in out


@pytest.mark.slow
@needs_java
def test_val_meteor_per_domain_equals_the_toolkit(nocaps: dict[str, Path], tmp_path: Path) -> None:
    """METEOR per domain (one warm JVM for all): the toolkit's Meteor on each domain's images."""
    from pycocoevalcap.meteor.meteor import Meteor

    from imcap.eval.metrics import ptb_tokenize

    scores = _run_eval(nocaps, tmp_path, "split=val", "metrics.meteor=true")
    rows = json.loads((tmp_path / "captions_val.json").read_text())
    toolkit = Meteor()
    for d in DOMAINS:
        mine = [r for r in rows if r["domain"] == d]
        refs, hyps = ptb_tokenize(
            [c for r in mine for c in r["references"]], [r["caption"] for r in mine]
        )
        gts = {k: refs[10 * k : 10 * k + 10] for k in range(len(mine))}
        expected, _ = toolkit.compute_score(gts, {k: [h] for k, h in enumerate(hyps)})
        assert scores[f"{d}/METEOR"] == pytest.approx(expected, abs=1e-12), d


def test_prepare_checks_nocaps_files_and_names_where_to_get_them(
    nocaps: dict[str, Path], tmp_path: Path
) -> None:
    """nocaps has no archive prepare.py could fetch (an image per URL): without the files it
    says where they come from; with them it checks they load (it used to crash on the missing
    download section)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from imcap.errors import UserError
    from imcap.pipeline.prepare import prepare

    def cfg(root: Path):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="prepare", overrides=["data=nocaps", f"data.root={root}"])

    with pytest.raises(UserError, match=r"nothing to download for nocaps .*nocaps\.org/download"):
        prepare(cfg(tmp_path / "absent"))
    records = prepare(cfg(nocaps["root"]))
    assert {r.split for r in records} == {"val", "test"} and len(records) == len(
        load(nocaps["root"])
    )
