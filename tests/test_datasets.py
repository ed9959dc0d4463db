"""Dataset loaders: every layout users have, split sources and their precedence, clear errors.

Fixtures are tiny copies of each real format written here (a few 8x8 images). The real data in
../shared/data is checked too when it exists (skipped otherwise).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from conftest import compose_train, data_config, data_source, tiny_overrides
from omegaconf import OmegaConf
from PIL import Image

from imcap.data.captions import Captions, Context, Parsed, Reader, get_reader, register_reader
from imcap.data.datasets import _context, available_splits, load_records
from imcap.data.records import ImageRecord
from imcap.data.splits import hash_splits
from imcap.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = ("flickr8k", "flickr30k", "coco")


def load(name: str, root: Path, bad_images: str = "skip", **changes: object) -> list[ImageRecord]:
    """`load_records` given the dataset's data.source as Hydra composes it (with `changes`)."""
    return load_records(name, root, bad_images, **data_source(name, **changes))


# ----------------------------------------------------------------------------- fixture writers


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, "PNG" if path.suffix == ".png" else "JPEG")
    return path


def caps(img: str, k: int = 5) -> list[str]:
    return [f"caption {n} of {img} ." for n in range(k)]


def write_token_file(path: Path, images: list[str], stray: str | None = None) -> None:
    """Flickr `<image>#<n>\\t<caption>`; the stray image's #0 is written with the `.1` id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for img in images:
        for n, c in enumerate(caps(img)):
            key = f"{img}.1" if img == stray and n == 0 else img
            lines.append(f"{key}#{n}\t{c}")
    path.write_text("\n".join(lines) + "\n")


def write_lists(folder: Path, splits: dict[str, list[str]], names: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, imgs in splits.items():
        (folder / names[split]).write_text("\n".join(imgs) + "\n")


F8K_LISTS = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def write_karpathy(path: Path, splits: dict[str, str], coco: bool = False) -> None:
    images = []
    for i, (img, split) in enumerate(splits.items()):
        entry = {
            "filename": img,
            "imgid": i,
            "split": split,
            "sentences": [{"raw": c, "tokens": c.split()} for c in caps(img)],
        }
        if coco:
            cocoid = int(img)
            folder = "val2014" if split in ("val", "test", "restval") else "train2014"
            entry |= {"cocoid": cocoid, "filepath": folder}
            entry["filename"] = f"COCO_{folder}_{cocoid:012d}.jpg"
            entry["sentences"] = [{"raw": c + " \n", "tokens": c.split()} for c in caps(img)]
        images.append(entry)
    path.write_text(json.dumps({"images": images, "dataset": "x"}))


def by_split(records: list[ImageRecord]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(r.split, set()).add(r.image_id)
    return out


def flickr8k_original(root: Path, with_test: bool = True, image_dir: str = "Flicker8k_Dataset"):
    """The original release: 7 images, stray id on img c, 1 image in no split."""
    imgs = [f"{n}_x.jpg" for n in "abcdefg"]
    for i, img in enumerate(imgs):
        image(root / image_dir / img, (i * 30, 0, 0))
    write_token_file(root / "Flickr8k_text/Flickr8k.token.txt", imgs, stray="c_x.jpg")
    splits = {"train": ["a_x.jpg", "b_x.jpg", "c_x.jpg"], "val": ["d_x.jpg", "e_x.jpg"]}
    if with_test:
        splits["test"] = ["f_x.jpg"]
    write_lists(root / "Flickr8k_text", splits, F8K_LISTS)
    return splits


# ----------------------------------------------------------------------------- Flickr8k


def test_flickr8k_original_release(tmp_path: Path) -> None:
    splits = flickr8k_original(tmp_path)
    recs = load("flickr8k", tmp_path)
    assert by_split(recs) == {k: set(v) for k, v in splits.items()}  # g_x.jpg is in no split
    c = next(r for r in recs if r.image_id == "c_x.jpg")
    assert c.captions == caps("c_x.jpg")  # the stray `c_x.jpg.1#0` caption joined its image
    assert c.path == tmp_path / "Flicker8k_Dataset" / "c_x.jpg"
    assert not any(r.image_id.endswith(".1") for r in recs)
    assert all(r.path.is_file() and len(r.captions) == 5 for r in recs)
    # deterministic order: train, val, test; by image id within each split
    assert [(r.split, r.image_id) for r in recs] == sorted(
        ((r.split, r.image_id) for r in recs),
        key=lambda t: (("train", "val", "test").index(t[0]), t[1]),
    )
    assert available_splits(recs) == ["train", "val", "test"]


def test_flickr8k_images_folder_and_missing_test_split(tmp_path: Path) -> None:
    flickr8k_original(tmp_path, with_test=False, image_dir="Images")
    recs = load("flickr8k", tmp_path)
    assert available_splits(recs) == ["train", "val"]
    assert by_split(recs) == {
        "train": {"a_x.jpg", "b_x.jpg", "c_x.jpg"},
        "val": {"d_x.jpg", "e_x.jpg"},
    }
    assert recs[0].path.parent.name == "Images"


def test_kaggle_csv_with_commas_and_quotes(tmp_path: Path) -> None:
    for n in "abc":
        image(tmp_path / "Images" / f"{n}.jpg")
    tricky = 'He said "hi" , then left , smiling .'
    (tmp_path / "captions.txt").write_text(
        "image,caption\n"
        "a.jpg,A dog runs .\n"
        f'a.jpg,"{tricky.replace(chr(34), chr(34) * 2)}"\n'
        'b.jpg,"A man , a plan , a canal ."\n'
        "b.jpg,  \n"  # empty caption: dropped with a count
        "c.jpg,One more .\n"
    )
    write_lists(tmp_path, {"train": ["a.jpg", "b.jpg"], "val": ["c.jpg"]}, F8K_LISTS)
    recs = {r.image_id: r for r in load("flickr8k", tmp_path)}
    assert recs["a.jpg"].captions == ["A dog runs .", tricky]
    assert recs["b.jpg"].captions == ["A man , a plan , a canal ."]
    assert (recs["a.jpg"].split, recs["c.jpg"].split) == ("train", "val")  # lists found in root


def test_three_flickr8k_formats_agree(tmp_path: Path) -> None:
    splits = flickr8k_original(tmp_path)
    imgs = [f"{n}_x.jpg" for n in "abcdefg"]
    rows = ["image,caption"] + [f"{i},{c}" for i in imgs for c in caps(i)]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    write_karpathy(tmp_path / "dataset_flickr8k.json", {i: s for s, v in splits.items() for i in v})
    out = {
        fmt: [
            (r.split, r.image_id, tuple(r.captions)) for r in load("flickr8k", tmp_path, format=fmt)
        ]
        for fmt in ("official", "kaggle", "karpathy")
    }
    assert out["official"] == out["kaggle"] == out["karpathy"]
    assert len(out["official"]) == 6


def test_kaggle_without_split_file_uses_hash_split_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    imgs = [f"{n:03d}.jpg" for n in range(20)]
    for i in imgs:
        image(tmp_path / "Images" / i)
    rows = [f"{i},{c}" for i in imgs for c in caps(i, 2)]
    (tmp_path / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    hs = {"val": 3, "test": 4, "seed": 0}
    with caplog.at_level(logging.WARNING):
        recs = load("flickr8k", tmp_path, hash_split=hs)
    assert "hash split" in caplog.text and "NOT the standard split" in caplog.text
    sizes = {s: len(v) for s, v in by_split(recs).items()}
    assert sizes == {"train": 13, "val": 3, "test": 4}
    # deterministic and independent of row order; another seed gives another split
    (tmp_path / "captions.txt").write_text("image,caption\n" + "\n".join(rows[::-1]) + "\n")
    assert by_split(load("flickr8k", tmp_path, hash_split=hs)) == by_split(recs)
    other = load("flickr8k", tmp_path, hash_split={**hs, "seed": 1})
    assert by_split(other) != by_split(recs)


def test_hash_split_sizes() -> None:
    ids = [str(i) for i in range(100)]
    s = hash_splits(ids, val=0.1, test=0.2, seed=0)
    assert sorted(s.values()).count("val") == 10 and list(s.values()).count("test") == 20
    with pytest.raises(UserError, match="hash_split"):
        hash_splits(ids[:5], val=3, test=2, seed=0)


def test_karpathy_restval_folding(tmp_path: Path) -> None:
    splits = {"a.jpg": "train", "b.jpg": "restval", "c.jpg": "val", "d.jpg": "test"}
    for i in splits:
        image(tmp_path / "Images" / i)
    write_karpathy(tmp_path / "dataset_flickr8k.json", splits)
    recs = load("flickr8k", tmp_path)
    assert by_split(recs) == {"train": {"a.jpg", "b.jpg"}, "val": {"c.jpg"}, "test": {"d.jpg"}}
    assert recs[0].captions == caps("a.jpg")
    dropped = load("flickr8k", tmp_path, restval="drop")
    assert by_split(dropped)["train"] == {"a.jpg"}


def test_split_source_precedence(tmp_path: Path) -> None:
    """Flickr8k auto: official lists over Karpathy; Flickr30k auto: Karpathy over lists."""
    imgs = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    for i in imgs:
        image(tmp_path / "Images" / i)
    karpathy = {"a.jpg": "train", "b.jpg": "train", "c.jpg": "val", "d.jpg": "test"}
    lists = {"train": ["a.jpg", "c.jpg"], "val": ["b.jpg"], "test": ["d.jpg"]}
    write_token_file(tmp_path / "Flickr8k_text/Flickr8k.token.txt", imgs)
    write_lists(tmp_path / "Flickr8k_text", lists, F8K_LISTS)
    write_karpathy(tmp_path / "dataset_flickr8k.json", karpathy)
    from_lists = {k: set(v) for k, v in lists.items()}
    from_karpathy = {"train": {"a.jpg", "b.jpg"}, "val": {"c.jpg"}, "test": {"d.jpg"}}
    assert by_split(load("flickr8k", tmp_path)) == from_lists
    assert by_split(load("flickr8k", tmp_path, split_source="karpathy")) == from_karpathy
    assert by_split(load("flickr8k", tmp_path, split_source="official")) == from_lists
    hashed = load("flickr8k", tmp_path, split_source="hash", hash_split={"val": 1, "test": 1})
    assert {s: len(v) for s, v in by_split(hashed).items()} == {"train": 2, "val": 1, "test": 1}

    f30 = tmp_path / "f30"
    for i in imgs:
        image(f30 / "flickr30k-images" / i)
    write_token_file(f30 / "results_20130124.token", imgs)
    write_lists(f30, lists, {"train": "train.txt", "val": "val.txt", "test": "test.txt"})
    write_karpathy(f30 / "dataset_flickr30k.json", karpathy)
    assert by_split(load("flickr30k", f30)) == from_karpathy
    assert by_split(load("flickr30k", f30, split_source="official")) == from_lists


def test_forced_split_source_that_is_absent_is_an_error(tmp_path: Path) -> None:
    flickr8k_original(tmp_path)
    with pytest.raises(UserError, match=r"split_source=karpathy.*dataset_flickr8k\.json"):
        load("flickr8k", tmp_path, split_source="karpathy")


def test_flickr30k_kaggle_results_csv_with_malformed_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "flickr30k_images"  # the Kaggle zip's folder, images one level down
    imgs = ["1000092795.jpg", "2199200615.jpg", "3000.jpg"]
    for i in imgs:
        image(root / "flickr30k_images" / i)
    (root / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two friends enjoy time spent together .\n"
        "2199200615.jpg| 3| A black dog runs .\n"
        "2199200615.jpg| 4   A dog runs across the grass .\n"  # number fused into the comment
        "2199200615.jpg| | A dog with no comment number .\n"
        "garbled line without separators\n"
        "3000.jpg| 0| A pipe | inside .\n"
        "3000.jpg| 1|  \n"  # empty comment: dropped
    )
    with caplog.at_level(logging.WARNING):
        recs = {r.image_id: r for r in load("flickr30k", root, hash_split={"val": 1, "test": 1})}
    assert recs["2199200615.jpg"].captions == [
        "A black dog runs .",
        "A dog runs across the grass .",
        "A dog with no comment number .",
    ]
    assert recs["3000.jpg"].captions == ["A pipe | inside ."]
    assert len(recs["1000092795.jpg"].captions) == 2
    assert recs["3000.jpg"].path == root / "flickr30k_images" / "3000.jpg"
    assert re.search(r"skipped 1 malformed line\(s\) \(lines 7", caplog.text)
    assert "dropped 1 empty caption" in caplog.text


def test_flickr30k_original_with_entities_lists(tmp_path: Path) -> None:
    imgs = ["1.jpg", "2.jpg", "3.jpg"]
    for i in imgs:
        image(tmp_path / "flickr30k-images" / i)
    write_token_file(tmp_path / "results_20130124.token", imgs)
    # Flickr30k Entities lists name images without the extension
    write_lists(
        tmp_path, {"train": ["1", "2"], "test": ["3"]}, {"train": "train.txt", "test": "test.txt"}
    )
    recs = load("flickr30k", tmp_path)
    assert by_split(recs) == {"train": {"1.jpg", "2.jpg"}, "test": {"3.jpg"}}
    assert available_splits(recs) == ["train", "test"]


def test_flickr30k_kaggle_captions_txt(tmp_path: Path) -> None:
    image(tmp_path / "Images" / "1.jpg")
    image(tmp_path / "Images" / "2.jpg")
    (tmp_path / "captions.txt").write_text('image,caption\n1.jpg,One .\n2.jpg,"Two , too ."\n')
    write_karpathy(tmp_path / "dataset_flickr30k.json", {"1.jpg": "train", "2.jpg": "val"})
    recs = load("flickr30k", tmp_path)
    assert [(r.image_id, r.split, r.captions) for r in recs] == [
        ("1.jpg", "train", ["One ."]),
        ("2.jpg", "val", ["Two , too ."]),
    ]


# ----------------------------------------------------------------------------- COCO


def write_coco(root: Path, year: int, train: dict[int, int], val: dict[int, int]) -> None:
    """annotations/captions_{train,val}<year>.json + image folders; {coco id: n captions}."""
    for split, ids in (("train", train), ("val", val)):
        folder = f"{split}{year}"
        images, anns = [], []
        for cid, n in ids.items():
            name = f"COCO_{folder}_{cid:012d}.jpg" if year == 2014 else f"{cid:012d}.jpg"
            image(root / folder / name)
            images.append({"id": cid, "file_name": name, "height": 8, "width": 8})
            anns += [
                {"image_id": cid, "id": cid * 10 + k, "caption": f" c{k} of {cid}. "}
                for k in range(n)
            ]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}{year}.json").write_text(
            json.dumps({"info": {}, "images": images, "annotations": anns})
        )


@pytest.mark.parametrize("year", [2014, 2017])
def test_coco_official(tmp_path: Path, year: int) -> None:
    write_coco(tmp_path, year, train={9: 5, 25: 6}, val={42: 5})
    recs = load("coco", tmp_path)
    assert [(r.split, r.image_id) for r in recs] == [("train", "25"), ("train", "9"), ("val", "42")]
    r25 = recs[0]
    assert r25.captions == [f"c{k} of 25." for k in range(6)]  # stripped, all of them
    assert r25.path.parent.name == f"train{year}" and r25.path.is_file()
    assert available_splits(recs) == ["train", "val"]
    assert by_split(load("coco", tmp_path, year=year)) == by_split(recs)


def test_coco_year_choice(tmp_path: Path) -> None:
    write_coco(tmp_path, 2014, train={1: 5}, val={2: 5})
    write_coco(tmp_path, 2017, train={3: 5}, val={4: 5})
    assert {r.image_id for r in load("coco", tmp_path)} == {"1", "2"}  # auto: 2014
    assert {r.image_id for r in load("coco", tmp_path, year=2017)} == {"3", "4"}


def test_coco_karpathy_splits_over_official(tmp_path: Path) -> None:
    write_coco(tmp_path, 2014, train={1: 5, 2: 5}, val={3: 5, 4: 5, 5: 5})
    write_karpathy(
        tmp_path / "dataset_coco.json",
        {"1": "train", "2": "train", "3": "restval", "4": "val", "5": "test"},
        coco=True,
    )
    recs = load("coco", tmp_path)  # captions from annotations, split from Karpathy
    assert by_split(recs) == {"train": {"1", "2", "3"}, "val": {"4"}, "test": {"5"}}
    assert recs[0].captions[0] == "c0 of 1."
    official = load("coco", tmp_path, split_source="official")
    assert by_split(official) == {"train": {"1", "2"}, "val": {"3", "4", "5"}}
    karpathy = load("coco", tmp_path, format="karpathy")  # captions from the JSON
    assert by_split(karpathy) == by_split(recs)
    assert karpathy[0].captions[0] == caps("1")[0]


def test_coco_karpathy_json_with_2017_image_folders(tmp_path: Path) -> None:
    """Karpathy names 2014 files; the same images in train2017/val2017 are found by COCO id."""
    for cid, folder in ((1, "train2017"), (2, "train2017"), (3, "val2017")):
        image(tmp_path / folder / f"{cid:012d}.jpg")
    write_karpathy(
        tmp_path / "dataset_coco.json", {"1": "train", "2": "restval", "3": "test"}, coco=True
    )
    recs = load("coco", tmp_path)
    assert by_split(recs) == {"train": {"1", "2"}, "test": {"3"}}
    assert {r.path.parent.name for r in recs} == {"train2017", "val2017"}
    assert recs[0].captions == caps("1")  # raw text, trailing whitespace stripped


# ----------------------------------------------------------------------------- bad input


def test_missing_image_files_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flickr8k_original(tmp_path)
    (tmp_path / "Flicker8k_Dataset" / "b_x.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        recs = load("flickr8k", tmp_path)
    assert "b_x.jpg" not in {r.image_id for r in recs} and len(recs) == 5
    assert "1 image file(s)" in caplog.text and "b_x.jpg" in caplog.text


def test_missing_root_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as e:
        load("flickr8k", missing)
    msg = str(e.value)
    assert str(missing) in msg and "python src/prepare.py data=flickr8k" in msg
    assert "Flickr8k.token.txt" in msg and "\n" not in msg


def test_unknown_layout_names_path_and_layouts(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("not a dataset")
    for name, expected in (
        ("flickr8k", "captions.txt"),
        ("flickr30k", "results.csv"),
        ("coco", "captions_"),
    ):
        with pytest.raises(UserError) as e:
            load(name, tmp_path)
        assert str(tmp_path) in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize(
    ("file", "content", "match"),
    [
        ("captions.txt", "", "is empty"),
        ("captions.txt", "image,caption\n", "is empty"),
        ("captions.txt", "foo;bar\nx;y\n", "unknown header"),
        ("Flickr8k_text/Flickr8k.token.txt", "\n\n", "is empty"),
        (
            "Flickr8k_text/Flickr8k.token.txt",
            "garbage without tabs or hashes\nmore\n",
            "no valid line",
        ),
        ("dataset_flickr8k.json", "{not json", "not valid JSON"),
        ("dataset_flickr8k.json", '{"images": []}', "no `images` list"),
    ],
)
def test_empty_or_garbled_caption_file(tmp_path: Path, file: str, content: str, match: str) -> None:
    image(tmp_path / "Images" / "a.jpg")
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(content)
    with pytest.raises(UserError, match=match) as e:
        load("flickr8k", tmp_path)
    assert str(tmp_path / file) in str(e.value)


def test_images_referenced_but_missing(tmp_path: Path) -> None:
    flickr8k_original(tmp_path)
    for p in (tmp_path / "Flicker8k_Dataset").iterdir():
        p.unlink()
    with pytest.raises(UserError, match=r"none of the 6 images named in .*Flickr8k\.token\.txt"):
        load("flickr8k", tmp_path)
    (tmp_path / "Flicker8k_Dataset").rmdir()
    with pytest.raises(
        UserError, match=r"no Flickr8k image folder in .*Images/ or Flicker8k_Dataset/"
    ):
        load("flickr8k", tmp_path)


def test_coco_image_folder_missing(tmp_path: Path) -> None:
    write_coco(tmp_path, 2017, train={1: 5}, val={2: 5})
    for p in (tmp_path / "val2017").iterdir():
        p.unlink()
    (tmp_path / "val2017").rmdir()
    with pytest.raises(UserError, match=r"val2017/ not found in .*data\.source\.year=2017"):
        load("coco", tmp_path)


def test_bad_config_values(tmp_path: Path) -> None:
    flickr8k_original(tmp_path)
    with pytest.raises(UserError, match=r"unknown data.source key\(s\) \['year'\] for flickr8k"):
        load("flickr8k", tmp_path, year=2014)
    with pytest.raises(UserError, match="data.source.format='csv'"):
        load("flickr8k", tmp_path, format="csv")
    with pytest.raises(
        UserError, match=r"data\.source\.readers is not set for flickr9k.*data=flickr9k"
    ):
        load_records("flickr9k", tmp_path)  # no layout: a checkpoint from before readers, say
    with pytest.raises(UserError, match=r"format=kaggle but .*captions\.txt does not exist"):
        load("flickr8k", tmp_path, format="kaggle")


def test_image_in_two_split_lists_is_an_error(tmp_path: Path) -> None:
    flickr8k_original(tmp_path)
    (tmp_path / "Flickr8k_text" / F8K_LISTS["test"]).write_text("a_x.jpg\n")
    with pytest.raises(UserError, match="a_x.jpg is in both the train and the test split lists"):
        load("flickr8k", tmp_path)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", DATASETS)
def test_data_yaml_documents_the_loader_keys(name: str) -> None:
    """conf/data/<name>.yaml is the whole layout of a dataset (the loader has no table of its
    own), each key commented; the loader takes exactly those keys and refuses others."""
    path = REPO / "conf" / "data" / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert cfg["name"] == name and cfg["root"] == f"${{paths.data_dir}}/{name}"
    assert cfg["defaults"] == ["_base", "_self_"]
    source = data_config(name)["source"]
    assert source == cfg["source"]  # composed: the dataset file's own section, whole
    ctx = _context(name, REPO, source)  # every key known, every reader registered
    assert list(ctx.readers) == list(source["readers"])  # format=auto's order is the file's
    with pytest.raises(UserError, match=r"unknown data\.source key\(s\) \['formt'\]"):
        _context(name, REPO, {**source, "formt": "auto"})
    lines = path.read_text().splitlines()
    for key in source:
        i = next(n for n, ln in enumerate(lines) if ln.startswith(f"  {key}:"))
        assert lines[i - 1].lstrip().startswith("#"), f"{name}.yaml: source.{key} has no comment"


def test_no_dataset_name_in_the_library() -> None:
    """Datasets differ by config only: no code of the data layer or the pipeline asks which
    dataset it reads."""
    pkg = REPO / "src" / "imcap"
    pattern = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](coco|flickr8k|flickr30k)["']""")
    files = [*(pkg / "data").rglob("*.py"), *(pkg / "pipeline").rglob("*.py")]
    found = [f"{p.name}: {ln.strip()}" for p in files for ln in p.read_text().splitlines()
             if pattern.search(ln)]  # fmt: skip
    assert len(files) > 10 and found == []


# ----------------------------------------------------------------------------- readers


def test_unknown_reader_names_the_known_ones(tmp_path: Path) -> None:
    flickr8k_original(tmp_path)
    bad = {"official": {"reader": "flickr_tokens"}}
    with pytest.raises(UserError, match=r"unknown caption reader 'flickr_tokens'.*flickr_token, "):
        load("flickr8k", tmp_path, readers=bad)
    assert get_reader("kaggle").name == "kaggle"
    with pytest.raises(ValueError, match="already"):  # a name is taken once
        register_reader("kaggle")(type("OtherKaggle", (Reader,), {}))


def test_forced_caption_file_format_is_sniffed(tmp_path: Path) -> None:
    """data.source.captions_file: the first reader that recognises the file reads it."""
    flickr8k_original(tmp_path)
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    mine = tmp_path / "my_captions.txt"
    token.rename(mine)
    recs = load("flickr8k", tmp_path, captions_file=mine.name)
    assert len(recs) == 6 and recs[0].captions == caps(recs[0].image_id)
    mine.write_text("no header I know\n")
    with pytest.raises(UserError, match=r"cannot tell the format .*my_captions\.txt"):
        load("flickr8k", tmp_path, captions_file=str(mine))


@register_reader("test_tsv")
class TsvCaptions(Reader):
    """`<image><TAB><caption>` lines: the README's example of a format of your own."""

    describe = "`<image><TAB><caption>` lines"
    files = ("captions.tsv",)

    def read(self, paths: list[Path], ctx: Context) -> Captions:
        parsed = Parsed()
        for line in paths[0].read_text().splitlines():
            image, _, caption = line.partition("\t")
            parsed.add(image, caption)
        return Captions(paths[0], self.name, parsed.check(paths[0], ctx, self.describe))


def test_a_reader_of_your_own_loads_through_config_only(tmp_path: Path) -> None:
    """A format is a registered reader plus a config line: this module's `test_tsv` reads a
    dataset by data.source alone (the Flickr8k yaml with one more format, forced)."""
    from imcap.pipeline.datamodule import CaptionDataModule

    imgs = [f"{n}.jpg" for n in "abcdef"]
    for i in imgs:
        image(tmp_path / "Images" / i)
    (tmp_path / "captions.tsv").write_text("".join(f"{i}\tA photo of {i} .\n" for i in imgs))
    data = data_config(
        "flickr8k",
        f"data.root={tmp_path}",
        "+data.source.readers.tsv={reader:test_tsv}",
        "data.source.format=tsv",
        "data.source.split_source=hash",
        "data.source.hash_split.val=1",
        "data.source.hash_split.test=1",
    )
    records = CaptionDataModule.records_of(data)
    assert {s: len(v) for s, v in records.items()} == {"train": 4, "val": 1, "test": 1}
    r = records["val"][0]
    assert (
        r.captions == [f"A photo of {r.image_id} ."] and r.path == tmp_path / "Images" / r.image_id
    )
    (tmp_path / "captions.tsv").unlink()
    with pytest.raises(UserError, match=r"format=tsv but .*captions\.tsv does not exist"):
        CaptionDataModule.records_of(data)


# ----------------------------------------------------------------------------- the data module


def test_a_run_reads_its_annotations_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py takes the vocabulary from the data module it then trains with: the dataset's
    loader runs once per run, not once for the vocabulary and again for training."""
    import functools

    import imcap.data.synthetic as synthetic
    from imcap.pipeline.datamodule import CaptionDataModule
    from imcap.pipeline.run import build_model, plain

    calls: list[str] = []
    real = synthetic.load_synthetic

    @functools.wraps(real)
    def counted(*args: object, **kwargs: object) -> list[ImageRecord]:
        calls.append("load")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "load_synthetic", counted)
    small = ("data.source.n_train=40", "data.source.n_val=8", "data.source.n_test=8")
    cfg = compose_train(tiny_overrides(tmp_path, *small))
    dm = CaptionDataModule.from_config(plain(cfg.data))
    model = build_model(cfg, dm)
    dm.attach(model, "joint")
    dm.setup("fit")
    assert calls == ["load"] and dm.vocab.tokens == model.vocab.tokens
    assert len(dm.train_rows) == 5 * 40  # every training caption, from the one read


def test_data_options_are_the_config_or_the_checkpoint_record() -> None:
    """The data module reads no config file: every data.* key comes from the composed config
    (or a checkpoint's record of it); a missing one is named, a run-scoped one may be absent."""
    from imcap.pipeline.datamodule import MACHINE, PER_RUN, data_options, recorded_data
    from imcap.pipeline.run import recorded

    data = data_config("flickr8k")
    assert data_options(data)["batch_size"] == data["batch_size"]
    record = recorded_data(data)  # what build_model saves in the checkpoint
    assert set(record).isdisjoint(PER_RUN) and set(record).isdisjoint(MACHINE)
    assert record["source"] == data["source"]
    # eval.py on a checkpoint, no data=: the record, completed with how this machine loads
    opts = data_options(recorded(record, "/tmp/cache"), {"split": "val"})
    assert opts["split"] == "val" and opts["max_eval_images"] is None
    assert opts["cache_dir"] == "/tmp/cache" and opts["num_workers"] == data["num_workers"]
    with pytest.raises(UserError, match=r"data lacks .*data\.eval_batch_size.*data=flickr8k"):
        data_options(record)


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED / "flickr8k").is_dir(), reason="no ../shared/data/flickr8k")
def test_real_flickr8k_all_formats() -> None:
    out = {}
    for fmt in ("official", "kaggle", "karpathy"):
        recs = load("flickr8k", SHARED / "flickr8k", format=fmt)
        sizes = {s: len(v) for s, v in by_split(recs).items()}
        assert sizes == {"train": 6000, "val": 1000}, fmt  # the test list is withheld
        assert all(len(r.captions) == 5 for r in recs)
        out[fmt] = [(r.split, r.image_id, r.captions) for r in recs]
    assert out["official"] == out["kaggle"] == out["karpathy"]


@pytest.mark.skipif(not (SHARED / "coco_mini").is_dir(), reason="no ../shared/data/coco_mini")
def test_real_coco_mini() -> None:
    recs = load("coco", SHARED / "coco_mini")
    assert {s: len(v) for s, v in by_split(recs).items()} == {"train": 80, "val": 79}
    assert all(len(r.captions) >= 5 and r.path.is_file() for r in recs)
    assert all(r.path.parent.name == f"{r.split}2017" for r in recs)
