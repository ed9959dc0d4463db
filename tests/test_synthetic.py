"""The built-in synthetic dataset: deterministic, cached, race-safe, and captions true of images.

Every test uses small counts under tmp_path, so the file runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imcap.data.synthetic as syn
from imcap.data.records import ImageRecord
from imcap.data.text import tokenize
from imcap.errors import UserError

SMALL = {"n_train": 24, "n_val": 8, "n_test": 8, "image_size": 96}
SHAPE_TOKENS = {w: s for s, words in syn.SHAPE_WORDS.items() for pair in words for w in pair}
TONE_TOKENS = {w: t for t, words in syn.TONE_WORDS.items() for w in words}
NUMBER_TOKENS = {"two": 2, "three": 3, "four": 4}
# What "dark", "gray" and "light" must look like (mean grey level), with gaps between them.
VISIBLE_TONES = {"dark": (0, 80), "gray": (95, 165), "light": (180, 255)}


def entries(root: Path) -> list[dict]:
    """The raw captions.json entries, with the hidden scene of every image."""
    return json.loads((root / "captions.json").read_text())


def file_digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "images").iterdir()}


# ----------------------------------------------------------------------------- API and layout


def test_records_api_and_layout(tmp_path: Path) -> None:
    data = tmp_path / "syn"
    recs = syn.load_synthetic(data, seed=3, **SMALL)
    assert all(isinstance(r, ImageRecord) for r in recs)
    by_split = {s: [r for r in recs if r.split == s] for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 24, "val": 8, "test": 8}
    assert [r.image_id for r in by_split["val"]] == [f"syn_val_{i:06d}" for i in range(8)]
    assert all(r.path.is_file() and r.path.parent == data.absolute() / "images" for r in recs)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest == {
        "version": syn.VERSION,
        "seed": 3,
        "counts": {"train": 24, "val": 8, "test": 8},
        "image_size": 96,
    }
    assert not [p for p in tmp_path.iterdir() if p.name != "syn"], "temp dirs left behind"


def test_bad_parameters_raise_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="counts"):
        syn.load_synthetic(tmp_path / "a", n_train=-1)
    with pytest.raises(UserError, match="image_size"):
        syn.load_synthetic(tmp_path / "b", image_size=8)


# ----------------------------------------------------------------------------- determinism, splits


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    syn.load_synthetic(tmp_path / "a", seed=7, **SMALL)
    syn.load_synthetic(tmp_path / "b", seed=7, **SMALL)
    assert (tmp_path / "a/captions.json").read_bytes() == (
        tmp_path / "b/captions.json"
    ).read_bytes()
    digests = file_digests(tmp_path / "a")
    assert len(digests) == 40
    assert digests == file_digests(tmp_path / "b")


def test_different_seed_differs(tmp_path: Path) -> None:
    a = syn.load_synthetic(tmp_path / "a", seed=0, **SMALL)
    b = syn.load_synthetic(tmp_path / "b", seed=1, **SMALL)
    assert sum(x.captions == y.captions for x, y in zip(a, b, strict=True)) < 4
    da, db = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert not set(da.values()) & set(db.values())


def test_splits_are_disjoint(tmp_path: Path) -> None:
    recs = syn.load_synthetic(
        tmp_path / "d", seed=0, n_train=60, n_val=30, n_test=30, image_size=64
    )
    ids = {s: {r.image_id for r in recs if r.split == s} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    pixels = {
        s: {hashlib.sha256(r.path.read_bytes()).hexdigest() for r in recs if r.split == s}
        for s in ids
    }
    assert len(pixels["train"]) == 60  # no two images alike even within a split
    assert not (pixels["train"] & pixels["val"] or pixels["train"] & pixels["test"])
    assert not pixels["val"] & pixels["test"]
    # Image i of val is not image i of train (splits use different sub-seeds).
    train0, _ = syn.make_example(0, "train", 0, 64)
    val0, _ = syn.make_example(0, "val", 0, 64)
    assert train0 != val0


def test_growing_a_split_keeps_its_prefix(tmp_path: Path) -> None:
    """Per-image streams: n_train=10 is the first 10 images of n_train=20."""
    small = syn.load_synthetic(tmp_path / "a", n_train=10, n_val=0, n_test=0, image_size=64)
    big = syn.load_synthetic(tmp_path / "b", n_train=20, n_val=0, n_test=0, image_size=64)
    assert [r.captions for r in small] == [r.captions for r in big[:10]]


# ----------------------------------------------------------------------------- cache


def test_cache_hit_only_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "syn"
    first = syn.load_synthetic(data, **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in data.rglob("*")}

    def fail(*args: object) -> None:
        raise AssertionError("regenerated on a cache hit")

    monkeypatch.setattr(syn, "_generate", fail)
    second = syn.load_synthetic(str(data), **SMALL)  # a str root works too
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == mtimes


@pytest.mark.parametrize(
    "change", [{"seed": 1}, {"n_val": 9}, {"image_size": 64}, {"version": True}]
)
def test_changed_parameters_regenerate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict
) -> None:
    data = tmp_path / "syn"
    params = dict(SMALL, seed=0)
    old = syn.load_synthetic(data, **params)
    change = dict(change)
    if change.pop("version", False):
        monkeypatch.setattr(syn, "VERSION", syn.VERSION + 1)
    params.update(change)
    new = syn.load_synthetic(data, **params)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["version"] == syn.VERSION
    assert manifest["seed"] == params["seed"] and manifest["image_size"] == params["image_size"]
    assert len(new) == params["n_train"] + params["n_val"] + params["n_test"]
    assert len(list((data / "images").iterdir())) == len(new)
    with Image.open(new[0].path) as im:
        assert im.size == (params["image_size"],) * 2
    if "seed" in change:
        assert [r.captions for r in new] != [r.captions for r in old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"], "stale copies left behind"


def test_missing_files_regenerate(tmp_path: Path) -> None:
    data = tmp_path / "syn"
    recs = syn.load_synthetic(data, **SMALL)
    recs[5].path.unlink()
    again = syn.load_synthetic(data, **SMALL)
    assert again[5].path.is_file()
    (data / "captions.json").unlink()
    assert syn.load_synthetic(data, **SMALL) == recs


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    data = tmp_path / "mine"
    data.mkdir()
    (data / "thesis.txt").write_text("precious")
    with pytest.raises(UserError, match="not a synthetic dataset"):
        syn.load_synthetic(data, **SMALL)
    assert (data / "thesis.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(syn.load_synthetic(empty, **SMALL)) == 40  # an empty dir is fine


def test_losing_the_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process installs the same dataset while we generate: we discard our copy."""
    data = tmp_path / "syn"
    real = syn._generate

    def racing(out: Path, manifest: dict) -> None:
        real(out, manifest)
        winner = tmp_path / "winner"
        real(winner, manifest)
        (winner / "images" / "winner-mark").write_text("")  # tells the two copies apart
        (winner / "images" / sorted(os.listdir(winner / "images"))[0]).unlink()  # count stays
        os.replace(winner, data)

    monkeypatch.setattr(syn, "_generate", racing)
    recs = syn.load_synthetic(data, **SMALL)
    assert (data / "images" / "winner-mark").exists()
    assert len(recs) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"], "loser's temp dir left behind"


def test_concurrent_processes(tmp_path: Path) -> None:
    """Two processes (e.g. DDP ranks) generate the same dataset at once: both get the same records."""
    data = tmp_path / "syn"
    code = (
        "import sys, json; from imcap.data.synthetic import load_synthetic as L;"
        "r = L(sys.argv[1], n_train=200, n_val=10, n_test=10, image_size=64);"
        "print(json.dumps([[x.image_id, str(x.path), x.captions] for x in r]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(data)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    assert len(json.loads(outs[0])) == 220
    assert len(list((data / "images").iterdir())) == 220
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


# ----------------------------------------------------------------------------- images


def test_images_show_the_scene(tmp_path: Path) -> None:
    """Right size, not blank; each object's centre has its named colour, corners the background."""
    data = tmp_path / "syn"
    syn.load_synthetic(data, seed=0, n_train=40, n_val=0, n_test=0, image_size=96)
    palette = {name: np.array(rgb) for name, rgb in syn.COLOURS.items()}
    for e in entries(data):
        with Image.open(data / e["file_name"]) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
            px = np.asarray(im, np.int16)  # (H, W, 3)
        scene = e["scene"]
        assert len(np.unique(px.reshape(-1, 3), axis=0)) > 10  # background + objects + edges
        for o in scene["objects"]:
            centre = px[int(o["cy"]), int(o["cx"])]
            nearest = min(palette, key=lambda n: np.abs(palette[n] - centre).sum())
            assert nearest == o["colour"], (e["image_id"], o, centre)
            assert np.abs(centre - np.array(o["rgb"])).max() <= 12
        lo, hi = VISIBLE_TONES[scene["background"]["tone"]]
        for y, x in [(1, 1), (1, 94), (94, 1), (94, 94)]:  # no object reaches a corner
            assert px[y, x].max() - px[y, x].min() <= 16  # near-neutral grey
            assert lo <= px[y, x].mean() <= hi, (e["image_id"], scene["background"], px[y, x])


def extent(o: syn.Obj) -> float:
    """Radius of the smallest centred circle holding the drawn shape."""
    if o.shape == "circle":
        return o.r
    return max(np.hypot(x - o.cx, y - o.cy) for x, y in syn._outline(o))


def test_objects_stay_inside_a_centre_crop_and_apart() -> None:
    """A 6% centre crop never cuts an object (>= 8% margin), and objects never touch."""
    size = 128
    n_objects = set()
    for i in range(500):
        objs = syn.make_scene(random.Random(i), size).objects
        n_objects.add(len(objs))
        for o in objs:
            ext = extent(o)
            assert 0.08 * size < min(o.cx - ext, o.cy - ext)
            assert max(o.cx + ext, o.cy + ext) < 0.92 * size
        for a in objs:
            for b in objs:
                if a is not b:
                    assert np.hypot(a.cx - b.cx, a.cy - b.cy) > extent(a) + extent(b) + 2
    assert n_objects == {1, 2, 3}


@pytest.mark.parametrize(
    ("shape", "area"),  # area in units of r^2
    [
        ("circle", np.pi),
        ("square", 1.6**2),
        ("triangle", 3 * np.sqrt(3) / 4),
        ("star", 5 * 0.45 * np.sin(np.radians(36))),
        ("cross", 2 * 2 * 0.6 - 0.6**2),
    ],
)
def test_shapes_are_drawn_with_their_outline(shape: str, area: float) -> None:
    """The drawn area matches the shape's geometry (a blank or wrong shape fails)."""
    bg = syn.Background("gray", "plain", (128, 128, 128), 10.0, 0.0, 0)
    r = 30.0
    o = syn.Obj(shape, "red", "large", 1, 1, 64.0, 64.0, r, (215, 35, 35))
    px = np.asarray(syn.render(syn.Scene(bg, [o]), 128), np.int16)  # (H, W, 3)
    covered = (px[:, :, 0] - px[:, :, 1]) / (215 - 35)  # 0 on the background, 1 inside
    assert covered.sum() == pytest.approx(area * r**2, rel=0.02)


# ----------------------------------------------------------------------------- captions


def test_five_distinct_short_captions(tmp_path: Path) -> None:
    recs = syn.load_synthetic(
        tmp_path / "syn", seed=0, n_train=150, n_val=0, n_test=0, image_size=64
    )
    for r in recs:
        assert len(r.captions) >= 5
        assert len({" ".join(tokenize(c)) for c in r.captions}) == len(r.captions), r.captions
        assert all(1 <= len(tokenize(c)) <= 16 for c in r.captions), r.captions
    all_caps = [c for r in recs for c in r.captions]
    assert len(set(all_caps)) > 0.6 * len(all_caps)  # varied wording, not one template


def test_captions_name_what_is_drawn(tmp_path: Path) -> None:
    data = tmp_path / "syn"
    syn.load_synthetic(data, seed=5, n_train=200, n_val=0, n_test=0, image_size=64)
    for e in entries(data):
        scene, caps = e["scene"], e["captions"]
        colours = {o["colour"] for o in scene["objects"]}
        shapes = {o["shape"] for o in scene["objects"]}
        mentioned_colours: set[str] = set()
        for c in caps:
            toks = tokenize(c)
            said_colours = {t for t in toks if t in syn.COLOURS}
            said_shapes = {SHAPE_TOKENS[t] for t in toks if t in SHAPE_TOKENS}
            said_tones = {TONE_TOKENS[t] for t in toks if t in TONE_TOKENS}
            assert said_colours <= colours, (c, scene)
            assert said_shapes <= shapes, (c, scene)
            assert said_tones <= {scene["background"]["tone"]}, (c, scene)
            for t in toks:  # "three shapes" / "two red stars": never more than there are
                if t in NUMBER_TOKENS:
                    assert NUMBER_TOKENS[t] <= len(scene["objects"]), (c, scene)
            if "single" in toks:
                assert len(scene["objects"]) == 1, (c, scene)
            mentioned_colours |= said_colours
        assert mentioned_colours == colours, (caps, scene)  # every colour is named somewhere


def two_objects(a_cell: tuple[int, int], b_cell: tuple[int, int]) -> syn.Scene:
    def obj(colour: str, shape: str, cell: tuple[int, int]) -> syn.Obj:
        row, col = cell
        xy = [syn.GRID[col] * 128, syn.GRID[row] * 128]
        return syn.Obj(shape, colour, "large", row, col, xy[0], xy[1], 13.0, syn.COLOURS[colour])

    bg = syn.Background("dark", "plain", (30, 30, 30), 10.0, 0.0, 0)
    return syn.Scene(bg, [obj("red", "circle", a_cell), obj("blue", "star", b_cell)])


@pytest.mark.parametrize(
    ("red_cell", "blue_cell", "red_is", "never"),
    [
        ((1, 0), (1, 2), "left", {"above", "over", "below", "under", "beneath"}),
        ((1, 2), (1, 0), "right", {"above", "over", "below", "under", "beneath"}),
        ((0, 1), (2, 1), "above", {"left", "right"}),
        ((2, 1), (0, 1), "below", {"left", "right"}),
    ],
)
def test_relations_are_true(
    red_cell: tuple[int, int], blue_cell: tuple[int, int], red_is: str, never: set[str]
) -> None:
    """Whichever object a relation caption starts with, the relation is the true one."""
    relation = re.compile(
        r"\b(to the left of|left of|to the right of|right of|above|over|below|under|beneath)\b"
    )
    meaning = {"left of": "left", "right of": "right", "above": "above", "over": "above"}
    meaning |= {"below": "below", "under": "below", "beneath": "below"}
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    seen = 0
    for i in range(150):
        for c in syn.describe(two_objects(red_cell, blue_cell), random.Random(i)):
            assert not set(tokenize(c)) & never, c
            m = relation.search(c)
            if m is None or "one above the other" in c:
                continue
            subject = "red" if "red" in c[: m.start()] else "blue"
            assert "red" in c and "blue" in c, c
            said = meaning[m.group(1).removeprefix("to the ")]
            assert said == (red_is if subject == "red" else opposite[red_is]), c
            seen += 1
    assert seen > 20  # relation captions do get written


def test_positions_are_true() -> None:
    bg = syn.Background("light", "plain", (220, 220, 220), 10.0, 0.0, 0)
    o = syn.Obj("square", "green", "small", 0, 2, 0.76 * 128, 0.24 * 128, 8.0, (40, 165, 60))
    found = 0
    for i in range(100):
        for c in syn.describe(syn.Scene(bg, [o]), random.Random(i)):
            toks = set(tokenize(c))
            assert not toks & {"left", "bottom", "center", "middle"}, c
            found += bool(toks & {"top", "right"})
    assert found > 10


def test_counts_group_repeated_objects() -> None:
    bg = syn.Background("gray", "plain", (128, 128, 128), 10.0, 0.0, 0)
    objs = [
        syn.Obj("star", "red", "small", 0, c, syn.GRID[c] * 128, 30.0, 8.0, (215, 35, 35))
        for c in range(3)
    ]
    caps = [c for i in range(50) for c in syn.describe(syn.Scene(bg, objs), random.Random(i))]
    assert any("three red stars" in c for c in caps)
    assert any(c.startswith("three shapes") or c.startswith("three objects") for c in caps)
    assert not any(re.search(r"\b(one|two|four) (small |little )?red stars?\b", c) for c in caps)
    assert not any(re.search(r"red stars? and", c) for c in caps)  # one group, not a list
