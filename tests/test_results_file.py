"""eval.py writes the caption servers' results file (`[{"image_id": int, "caption": str}]`,
COCO ids, one per image, sorted) beside the scores: pycocotools' COCO/loadRes and
pycocoevalcap's COCOEvalCap read it back and give eval.py's own scores. Datasets with file-name
ids (Flickr) keep them in captions_<split>.json only; a folder of images without references
gets captions and the results file, no scores, and a note saying why."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as _toolkit_ptb
import pytest
from conftest import ROOT, demo_checkpoint, needs_java
from PIL import Image

from imcap.errors import UserError
from imcap.pipeline.run import results_rows

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "on", "the", "right", "dog", "mat"]
JAVA = str(shutil.which("java") is not None).lower()
PTB_WRITABLE = os.access(Path(_toolkit_ptb.__file__).parent, os.W_OK)
# Karpathy's split of the fixture's COCO ids (val2014 images but 9 and 25)
KARPATHY = {9: "train", 25: "train", 42: "val", 73: "val", 74: "test", 133: "test", 136: "test"}
KARPATHY |= {139: "restval"}


def _image(path: Path, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    Image.new("RGB", (40, 30), color).save(path, "JPEG")


def _sentence(rng: random.Random) -> str:
    start = "A square on the" if rng.random() < 0.5 else "The"
    return f"{start} {' '.join(rng.choice(WORDS) for _ in range(rng.randrange(2, 6)))}."


def write_coco(root: Path, seed: int = 0) -> Path:
    """COCO 2014's layout: annotations/captions_{train,val}2014.json (5 captions per image),
    train2014/ and val2014/ with COCO's file names, and Karpathy's dataset_coco.json."""
    rng = random.Random(seed)
    karpathy = []
    for part in ("train", "val"):
        folder = f"{part}2014"
        images, anns = [], []
        for cid, split in KARPATHY.items():
            if (split == "train") != (part == "train"):
                continue
            name = f"COCO_{folder}_{cid:012d}.jpg"
            _image(root / folder / name, rng)
            images.append({"id": cid, "file_name": name, "height": 30, "width": 40, "license": 1})
            caps = [_sentence(rng) for _ in range(5)]
            anns += [
                {"image_id": cid, "id": 10 * cid + k, "caption": c} for k, c in enumerate(caps)
            ]
            sents = [{"raw": c, "tokens": c.lower().split(), "imgid": cid} for c in caps]
            karpathy.append(
                {"cocoid": cid, "filepath": folder, "filename": name, "split": split,
                 "sentences": sents}
            )  # fmt: skip
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{folder}.json").write_text(
            json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns})
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    return root


def compose_eval(out: Path, *overrides: str):
    """eval.py's config as `python src/eval.py <overrides>` composes it (run dir: `out`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"paths.output_dir={out}", *overrides])


def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict[str, float]:
    from imcap.pipeline.run import evaluate

    # captions as long as the references (CIDEr-D's length penalty), no JVM for METEOR
    common = (f"ckpt_path={ckpt}", f"metrics.java={JAVA}", "metrics.meteor=false")
    return evaluate(compose_eval(out, *common, "model.max_len=6", *overrides))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained checkpoint (deterministic word salad over a small vocabulary)."""
    return demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo.ckpt", attention=False)


@needs_java
@pytest.mark.skipif(not PTB_WRITABLE, reason="pycocoevalcap's tokenizer writes into its folder")
def test_coco_results_file_is_what_the_toolkit_reads(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pycocoevalcap import eval as toolkit
    from pycocotools.coco import COCO

    root = write_coco(tmp_path / "coco")
    out = tmp_path / "out"
    scores = run_eval(ckpt, out, "data=coco", f"data.root={root}", "data.num_workers=0")
    assert scores["num_images"] == 3 and scores["CIDEr"] > 0.05  # the check below has teeth
    path = out / "captions_test_imcap_results.json"
    rows = json.loads(path.read_text())
    test_ids = sorted(i for i, s in KARPATHY.items() if s == "test")
    assert [r["image_id"] for r in rows] == test_ids  # COCO ids, ints, one each, sorted
    assert all(type(r["image_id"]) is int and set(r) == {"image_id", "caption"} for r in rows)
    captions = json.loads((out / "captions_test.json").read_text())
    assert {int(c["image_id"]): c["caption"] for c in captions} == {
        r["image_id"]: r["caption"] for r in rows
    }
    result = json.loads((out / "metrics_test.json").read_text())
    assert result["results_file"] == str(path) and "note" not in result

    # pycocotools and pycocoevalcap, as the COCO server runs them (METEOR and SPICE aside:
    # METEOR is off in this eval, and SPICE needs CoreNLP models fetched online)
    class Off:
        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            return 0.0, [0.0] * len(gts)

        def method(self) -> str:
            return "off"

    monkeypatch.setattr(toolkit, "Meteor", Off)
    monkeypatch.setattr(toolkit, "Spice", Off)
    coco = COCO(str(root / "annotations" / "captions_val2014.json"))
    results = coco.loadRes(str(path))  # asserts every id is an annotated image
    evaluation = toolkit.COCOEvalCap(coco, results)
    evaluation.params["image_id"] = results.getImgIds()
    evaluation.evaluate()
    for theirs, ours in (("CIDEr", "CIDEr"), ("Bleu_4", "BLEU-4"), ("ROUGE_L", "ROUGE-L")):
        assert evaluation.eval[theirs] == pytest.approx(scores[ours], abs=1e-12), ours
    printed = capsys.readouterr().out
    assert f"CIDEr {100 * evaluation.eval['CIDEr']:.2f}" in printed
    assert f"results : {path} (the caption servers' format)" in printed


def test_file_name_ids_keep_their_own_captions_file(ckpt: Path, tmp_path: Path) -> None:
    """Flickr8k's ids are file names: no server reads them, so no results file is written and
    captions_<split>.json (string ids) is the file with every caption."""
    rng = random.Random(1)
    root = tmp_path / "flickr8k"
    names = [f"{1000268201 + n}_693b08cb0e.jpg" for n in range(6)]
    lines = ["image,caption"]
    for name in names:
        _image(root / "Images" / name, rng)
        lines += [f"{name},{_sentence(rng)}" for _ in range(5)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    split = ("data.source.split_source=hash", "data.source.hash_split.val=2")
    scores = run_eval(
        ckpt, out, "data=flickr8k", f"data.root={root}", "data.num_workers=0", "split=val",
        *split, "data.source.hash_split.test=2",
    )  # fmt: skip
    assert scores["num_images"] == 2 and "CIDEr" in scores
    assert not list(out.glob("*_results.json"))
    rows = json.loads((out / "captions_val.json").read_text())
    assert {r["image_id"] for r in rows} <= set(names)
    assert json.loads((out / "metrics_val.json").read_text())["results_file"] is None


def test_a_folder_without_references_is_captioned_not_scored(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """COCO's test2014 folder: captions and the server's results file (ids from COCO's file
    names), no scores, and one line saying why."""
    rng = random.Random(2)
    folder = tmp_path / "test2014"
    ids = [1, 14, 202]
    for i in ids:
        _image(folder / f"COCO_test2014_{i:012d}.jpg", rng)
    out = tmp_path / "out"
    scores = run_eval(ckpt, out, f"images={folder}")
    assert scores == {"num_images": 3.0}
    path = out / "captions_test2014_imcap_results.json"  # the COCO server's file name
    rows = json.loads(path.read_text())
    assert [r["image_id"] for r in rows] == ids and all(r["caption"] for r in rows)
    result = json.loads((out / "metrics_test2014.json").read_text())
    note = (
        f"no scores: no reference captions for the images in {folder} (a caption server "
        "scores captions_test2014_imcap_results.json)"
    )
    assert result["note"] == note and result["scores"] == {"num_images": 3.0}
    captions = json.loads((out / "captions_test2014.json").read_text())
    assert [c["image_id"] for c in captions] == [f"COCO_test2014_{i:012d}.jpg" for i in ids]
    assert note in capsys.readouterr().out
    # names that carry no id: captions only; split= names the files
    other = tmp_path / "photos"
    _image(other / "beach.jpg", rng)
    run_eval(ckpt, out, f"images={other}", "split=holiday")
    assert (out / "captions_holiday.json").is_file()
    assert not (out / "captions_holiday_imcap_results.json").exists()
    with pytest.raises(UserError, match="give data=<name> .* or images=<folder> .* not both"):
        run_eval(ckpt, out, f"images={other}", "data=coco")


def test_results_rows() -> None:
    preds = {"391895": "a man", "42": "a dog"}
    assert results_rows(preds, {}) == [
        {"image_id": 42, "caption": "a dog"},
        {"image_id": 391895, "caption": "a man"},
    ]
    # nocaps: the image id is the Open Images id, the server's id an attribute
    assert results_rows({"0013ea": "a cat"}, {"0013ea": "7"}) == [
        {"image_id": 7, "caption": "a cat"}
    ]
    assert results_rows({"dog.jpg": "a dog"}, {}) is None  # file names: no results file
    assert results_rows({"a": "x", "b": "y"}, {"a": "1", "b": "01"}) is None  # one id twice
