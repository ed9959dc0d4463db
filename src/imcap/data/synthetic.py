"""The built-in procedural captioning dataset: coloured shapes on varied backgrounds.

Why it exists: a new user runs `python src/train.py` with no download and sees a CNN→LSTM
learn to caption in a few CPU minutes. The task needs the image: every caption names the
colours, shapes, sizes, counts, positions and background tone actually drawn, while the
wording varies (five different templates and synonyms per image), so a caption-only model
scores far below one that looks.

Scene: 1-3 objects, each a shape (circle, square, triangle, star, cross) in one of seven
named colours, small or large, placed in a distinct cell of a 3x3 grid (small jitter, so
"left of" / "above" / "in the top left corner" are always visually true and objects never
touch), on a dark, gray or light background that is plain, a gradient or smooth noise.
Objects stay >= 9.7% inside every border, so a 6% centre crop never cuts them.

Layout on disk (generated on first use, then only read):
    root/manifest.json    {"version", "seed", "counts": {split: n}, "image_size"}
    root/captions.json    [{"image_id", "file_name", "split", "captions", "scene"}, ...]
    root/images/syn_<split>_<index:06d>.jpg   (image_size x image_size RGB, JPEG quality 95)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from imcap.data.records import SPLITS, ImageRecord
from imcap.data.text import tokenize
from imcap.errors import UserError

log = logging.getLogger(__name__)

# Bump when generation changes, so stale caches regenerate.
VERSION = 1
N_CAPTIONS = 5
MAX_WORDS = 16  # tokens per caption after imcap.data.text.tokenize
SUPERSAMPLE = 4  # draw shapes at 4x and box-filter down: anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 60),
    "blue": (35, 85, 225),
    "purple": (135, 55, 185),
    "pink": (245, 120, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.062, "large": 0.1}  # object radius as a fraction of image size
# Background tone -> (low, high) grey level every background pixel stays within.
TONES: dict[str, tuple[int, int]] = {"dark": (12, 70), "gray": (100, 156), "light": (190, 250)}
STYLES = ("plain", "gradient", "noise")
# Cell centres as fractions of the image size (rows and columns) and the largest offset from
# one. With shapes reaching <= 1.13 r this leaves >= 9.7% to every border and >= 3.5% between
# neighbours.
GRID = (0.225, 0.5, 0.775)
JITTER = 0.015
N_OBJECTS_P = {1: 0.3, 2: 0.4, 3: 0.3}

# Caption vocabulary: (singular, plural) synonyms per shape, synonyms per size and tone.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"),),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
TONE_WORDS = {"dark": ("dark", "black"), "gray": ("gray", "grey"), "light": ("light", "white")}
THING_WORDS = (("shape", "shapes"), ("object", "objects"))
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_WORDS: dict[tuple[int, int], tuple[str, ...]] = {  # (row, col) -> phrases
    (0, 0): ("in the top left corner", "at the top left"),
    (0, 1): ("at the top", "near the top"),
    (0, 2): ("in the top right corner", "at the top right"),
    (1, 0): ("on the left", "at the left"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the right"),
    (2, 0): ("in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "near the bottom"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}
RELATION_WORDS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}


# ---------------------------------------------------------------------------------------
# Scene: the hidden ground truth every caption is derived from.


@dataclass
class Obj:
    shape: str
    colour: str
    size: str  # small | large
    row: int  # grid cell, 0 = top
    col: int  # grid cell, 0 = left
    cx: float  # centre in pixels of the saved image
    cy: float
    r: float  # outer radius in pixels
    rgb: tuple[int, int, int]  # the named colour with a little jitter
    angle: float = 0.0  # rotation in degrees (small, so a square stays a square)


@dataclass
class Background:
    tone: str  # dark | gray | light
    style: str  # plain | gradient | noise
    rgb: tuple[int, int, int]  # mean colour (near-neutral grey of the tone)
    amp: float  # gradient / noise amplitude in grey levels
    angle: float  # gradient direction in degrees
    noise_seed: int  # seed of the smooth-noise field


@dataclass
class Scene:
    background: Background
    objects: list[Obj] = field(default_factory=list)  # in reading order (row, then col)


def make_scene(rng: random.Random, image_size: int) -> Scene:
    """Sample one scene: background, then 1-3 objects in distinct grid cells."""
    tone = rng.choice(list(TONES))
    lo, hi = TONES[tone]
    amp = rng.uniform(8, 16)
    grey = rng.uniform(lo + amp, hi - amp)
    # Near-neutral tint: a background is never mistaken for one of the object colours.
    # Each channel +- amp stays inside the tone's band.
    bg_rgb = tuple(round(min(max(grey + rng.randint(-5, 5), lo + amp), hi - amp)) for _ in range(3))
    background = Background(
        tone=tone,
        style=rng.choice(STYLES),
        rgb=bg_rgb,  # type: ignore[arg-type]
        amp=round(amp, 2),
        angle=round(rng.uniform(0, 360), 2),
        noise_seed=rng.getrandbits(31),
    )
    n = rng.choices(list(N_OBJECTS_P), weights=list(N_OBJECTS_P.values()))[0]
    objects: list[Obj] = []
    for cell in sorted(rng.sample(range(9), n)):  # reading order
        row, col = divmod(cell, 3)
        if objects and rng.random() < 0.3:  # sometimes repeat the previous kind: "two red stars"
            shape, colour = objects[-1].shape, objects[-1].colour
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        size = rng.choice(list(SIZES))
        rgb = tuple(min(max(c + rng.randint(-10, 10), 0), 255) for c in COLOURS[colour])
        objects.append(
            Obj(
                shape=shape,
                colour=colour,
                size=size,
                row=row,
                col=col,
                cx=round((GRID[col] + rng.uniform(-JITTER, JITTER)) * image_size, 2),
                cy=round((GRID[row] + rng.uniform(-JITTER, JITTER)) * image_size, 2),
                r=round(SIZES[size] * image_size, 2),
                rgb=rgb,  # type: ignore[arg-type]
                angle=round(rng.uniform(-12, 12), 2) if shape != "circle" else 0.0,
            )
        )
    return Scene(background, objects)


# ---------------------------------------------------------------------------------------
# Rendering.


def _outline(o: Obj) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape, in image pixels."""
    cx, cy, r = o.cx, o.cy, o.r
    if o.shape == "square":  # half-side 0.8r: about the same area as the circle
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif o.shape == "triangle":  # equilateral, pointing up, centroid at (cx, cy)
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif o.shape == "star":  # five points, inner radius 0.45r
        pts = [
            (rad * math.cos(a), rad * math.sin(a))
            for i in range(10)
            for rad, a in [(1.0 if i % 2 == 0 else 0.45, math.radians(-90 + 36 * i))]
        ]
    elif o.shape == "cross":  # plus sign, arm half-width 0.3r
        w = 0.3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]  # fmt: skip
    else:
        raise ValueError(f"unknown shape {o.shape!r}")
    c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(bg: Background, size: int) -> Image.Image:
    """Background image (RGB, size x size), every grey level inside its tone's band."""
    if bg.style == "plain":
        return Image.new("RGB", (size, size), tuple(bg.rgb))
    if bg.style == "gradient":  # linear ramp from -amp to +amp along `angle`
        t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5  # (W,) in [-0.5, 0.5]
        a = math.radians(bg.angle)
        field_ = 2 * bg.amp * (t[None, :] * math.cos(a) + t[:, None] * math.sin(a))  # (H, W)
    elif bg.style == "noise":  # smooth blobs: a 5x5 random grid upsampled bicubically
        grid = np.random.default_rng(bg.noise_seed).uniform(-1, 1, (5, 5)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        field_ = np.asarray(up) * bg.amp  # (H, W)
    else:
        raise ValueError(f"unknown background style {bg.style!r}")
    field_ = np.clip(field_, -bg.amp, bg.amp) + 0.5  # +0.5: round, not floor, below
    # Stacking 2-D planes is several times faster than a broadcast over a last axis of 3.
    return Image.fromarray(
        np.stack([field_ + c for c in bg.rgb], axis=-1).astype(np.uint8), mode="RGB"
    )


def render(scene: Scene, image_size: int) -> Image.Image:
    """The scene as an RGB image (a pure function of the scene: same scene, same pixels)."""
    img = _background(scene.background, image_size)
    ss = SUPERSAMPLE
    for o in scene.objects:
        # Coverage of the object in a patch around it, drawn at ss x and box-filtered down
        # (anti-aliased edges); the object colour is then blended in through that mask.
        ext = 1.2 * o.r + 2  # a rotated square reaches 1.13 r
        x0, y0 = max(int(o.cx - ext), 0), max(int(o.cy - ext), 0)
        x1, y1 = min(int(o.cx + ext) + 1, image_size), min(int(o.cy + ext) + 1, image_size)
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss))
        draw = ImageDraw.Draw(mask)
        if o.shape == "circle":
            cx, cy, r = (o.cx - x0) * ss, (o.cy - y0) * ss, o.r * ss
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon([((x - x0) * ss, (y - y0) * ss) for x, y in _outline(o)], fill=255)
        img.paste(tuple(o.rgb), (x0, y0, x1, y1), mask.reduce(ss))
    return img


# ---------------------------------------------------------------------------------------
# Captions: several templates, each true of the scene; synonyms picked per caption.


@dataclass
class _Lex:
    """Word choices for one caption, so a caption uses one synonym consistently."""

    shape: dict[str, tuple[str, str]]
    size: dict[str, str]
    tone: str
    thing: tuple[str, str]


def _lex(rng: random.Random) -> _Lex:
    return _Lex(
        shape={s: rng.choice(w) for s, w in SHAPE_WORDS.items()},
        size={s: rng.choice(w) for s, w in SIZE_WORDS.items()},
        tone="",  # filled per scene
        thing=rng.choice(THING_WORDS),
    )


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _groups(objs: Sequence[Obj]) -> list[list[Obj]]:
    """Objects grouped by (colour, shape), in order of first appearance: "two red stars"."""
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in objs:
        groups.setdefault((o.colour, o.shape), []).append(o)
    return list(groups.values())


def _np(group: Sequence[Obj], lex: _Lex, sizes: bool) -> str:
    """Noun phrase for one group: "a large red circle", "two small blue boxes", "two red stars"."""
    o = group[0]
    same_size = all(m.size == o.size for m in group)
    adj = f"{lex.size[o.size]} " if sizes and same_size else ""
    if len(group) == 1:
        return _a(f"{adj}{o.colour} {lex.shape[o.shape][0]}")
    return f"{NUMBERS[len(group)]} {adj}{o.colour} {lex.shape[o.shape][1]}"


def _list(objs: Sequence[Obj], lex: _Lex, sizes: bool) -> str:
    return _join([_np(g, lex, sizes) for g in _groups(objs)])


def _bg(lex: _Lex) -> str:
    return f"{_a(lex.tone)} background"


def _relation(a: Obj, b: Obj, rng: random.Random) -> str:
    """Where a is relative to b, by grid cells (the dominant axis; both on an exact diagonal)."""
    dr, dc = a.row - b.row, a.col - b.col
    vert = rng.choice(RELATION_WORDS["above" if dr < 0 else "below"]) if dr else ""
    horiz = rng.choice(RELATION_WORDS["left" if dc < 0 else "right"]) if dc else ""
    if abs(dr) > abs(dc):
        return vert
    if abs(dc) > abs(dr):
        return horiz
    return (
        f"{'above' if dr < 0 else 'below'} and {'to the left of' if dc < 0 else 'to the right of'}"
    )


Template = Callable[[Scene, _Lex, random.Random, bool], str | None]


def _t_list_on_bg(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str:
    return f"{_list(s.objects, lex, sizes)} on {_bg(lex)}"


def _t_bg_with(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str:
    return f"{_bg(lex)} with {_list(s.objects, lex, sizes)}"


def _t_there(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str:
    verb = "is" if len(_groups(s.objects)[0]) == 1 else "are"
    tail = f" on the {lex.tone} background" if rng.random() < 0.5 else ""
    return f"there {verb} {_list(s.objects, lex, sizes)}{tail}"


def _t_count(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str:
    n, things = len(s.objects), lex.thing[1]
    if n == 1:
        o = s.objects[0]
        adj = f"{lex.size[o.size]} " if sizes else ""
        return f"a single {adj}{o.colour} {lex.shape[o.shape][0]} on {_bg(lex)}"
    if len(_groups(s.objects)) == 1 or rng.random() < 0.5:  # not "two shapes: two red stars"
        return f"{NUMBERS[n]} {things} on {_bg(lex)}"
    return f"{NUMBERS[n]} {things}: {_list(s.objects, lex, sizes)}"


def _t_colours(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str:
    colours = list(dict.fromkeys(o.colour for o in s.objects))
    thing, things = lex.thing
    if len(s.objects) == 1:
        return f"{_a(colours[0])} {thing} on {_bg(lex)}"
    if len(colours) == 1:
        return f"{NUMBERS[len(s.objects)]} {colours[0]} {things} on {_bg(lex)}"
    return f"{_join(colours)} {things} on {_bg(lex)}"


def _t_shapes(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str:
    """Shapes without colours: "two circles and a small box on a grey background"."""
    by_shape: dict[str, list[Obj]] = {}
    for o in s.objects:
        by_shape.setdefault(o.shape, []).append(o)
    parts = []
    for shape, group in by_shape.items():
        if len(group) == 1:
            adj = f"{lex.size[group[0].size]} " if sizes else ""
            parts.append(_a(f"{adj}{lex.shape[shape][0]}"))
        else:
            parts.append(f"{NUMBERS[len(group)]} {lex.shape[shape][1]}")
    return f"{_join(parts)} on {_bg(lex)}"


def _t_relation(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str | None:
    """Two objects of different kinds and where one is relative to the other."""
    pairs = [
        (a, b) for a in s.objects for b in s.objects if (a.colour, a.shape) != (b.colour, b.shape)
    ]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    verb = "is " if rng.random() < 0.4 else ""
    text = f"{_np([a], lex, sizes)} {verb}{_relation(a, b, rng)} {_np([b], lex, sizes)}"
    return text + f" on {_bg(lex)}" if rng.random() < 0.3 else text


def _t_position(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str:
    """Absolute positions: "a red circle in the top left corner and a blue star on the right"."""
    objs = s.objects
    if len(objs) <= 2:
        return " and ".join(
            f"{_np([o], lex, sizes)} {rng.choice(POSITION_WORDS[o.row, o.col])}" for o in objs
        )
    o = rng.choice(objs)
    return f"{_np([o], lex, sizes)} {rng.choice(POSITION_WORDS[o.row, o.col])} with two other {lex.thing[1]}"


def _t_between(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str | None:
    """Three objects in one row or column: "a blue star between two red circles"."""
    objs = s.objects
    if len(objs) != 3:
        return None
    if len({o.row for o in objs}) == 1:
        ordered = sorted(objs, key=lambda o: o.col)
    elif len({o.col for o in objs}) == 1:
        ordered = sorted(objs, key=lambda o: o.row)
    else:
        return None
    mid, ends = ordered[1], [ordered[0], ordered[2]]
    if (mid.colour, mid.shape) in {(e.colour, e.shape) for e in ends}:
        return None
    return f"{_np([mid], lex, sizes)} between {_list(ends, lex, sizes)}"


def _t_line(s: Scene, lex: _Lex, rng: random.Random, sizes: bool) -> str | None:
    """Objects sharing a row or a column: "a red circle and a green box side by side"."""
    objs = s.objects
    if len(objs) < 2:
        return None
    if len({o.row for o in objs}) == 1:
        return f"{_list(objs, lex, sizes)} {rng.choice(('in a row', 'side by side'))}"
    if len({o.col for o in objs}) == 1:
        tail = "one above the other" if len(objs) == 2 else "in a column"
        return f"{_list(objs, lex, sizes)} {tail}"
    return None


TEMPLATES: tuple[Template, ...] = (
    _t_list_on_bg,
    _t_bg_with,
    _t_there,
    _t_count,
    _t_colours,
    _t_shapes,
    _t_relation,
    _t_position,
    _t_between,
    _t_line,
)


def describe(scene: Scene, rng: random.Random, n: int = N_CAPTIONS) -> list[str]:
    """`n` different captions, each true of the scene, from different templates where possible."""
    captions: list[str] = []

    def attempt(template: Template) -> None:
        lex = _lex(rng)
        lex.tone = rng.choice(TONE_WORDS[scene.background.tone])
        for sizes in (rng.random() < 0.7, False):  # with sizes if it fits, else without
            text = template(scene, lex, rng, sizes)
            if text is not None and len(tokenize(text)) <= MAX_WORDS:
                if text not in captions:
                    captions.append(text)
                return

    for template in rng.sample(TEMPLATES, len(TEMPLATES)):  # one caption per template first
        attempt(template)
        if len(captions) == n:
            return captions
    for _ in range(200):  # then other wordings of any template
        attempt(rng.choice(TEMPLATES))
        if len(captions) == n:
            return captions
    raise RuntimeError(f"could not write {n} different captions for {scene}")  # never seen


# ---------------------------------------------------------------------------------------
# Generation and the on-disk cache.


def _rng(seed: int, split: str, index: int) -> random.Random:
    """One stream per image: splits never share a stream, and n_train can grow (a prefix stays).

    A string seed is hashed with SHA-512 by `random`, so it is the same in every process.
    """
    return random.Random(f"imcap-synthetic:{seed}:{split}:{index}")


def make_example(seed: int, split: str, index: int, image_size: int) -> tuple[Scene, list[str]]:
    """The scene and captions of one image, without touching disk (tests and notebooks)."""
    rng = _rng(seed, split, index)
    scene = make_scene(rng, image_size)
    return scene, describe(scene, rng)


def _manifest(seed: int, counts: dict[str, int], image_size: int) -> dict[str, Any]:
    return {"version": VERSION, "seed": seed, "counts": counts, "image_size": image_size}


def _scene_dict(scene: Scene) -> dict[str, Any]:
    """The scene as JSON-ready data (dataclasses.asdict deep-copies: 5x slower)."""
    return {
        "background": dict(vars(scene.background)),
        "objects": [dict(vars(o)) for o in scene.objects],
    }


def _write_example(out: Path, seed: int, split: str, index: int, size: int) -> dict[str, Any]:
    scene, captions = make_example(seed, split, index, size)
    image_id = f"syn_{split}_{index:06d}"
    file_name = f"images/{image_id}.jpg"
    # High-quality JPEG without chroma subsampling: edges of small shapes keep their colour,
    # and it encodes ~8x faster than PNG (generation time is dominated by encoding).
    render(scene, size).save(out / file_name, quality=95, subsampling=0)
    return {
        "image_id": image_id,
        "file_name": file_name,
        "split": split,
        "captions": captions,
        "scene": _scene_dict(scene),  # the hidden ground truth, for analysis and tests
    }


def _generate(out: Path, manifest: dict[str, Any]) -> None:
    """Write images/, captions.json and (last, so it marks completion) manifest.json into out."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    seed, size = manifest["seed"], manifest["image_size"]
    entries = [
        _write_example(out, seed, split, i, size)
        for split, count in manifest["counts"].items()
        for i in range(count)
    ]
    # One image per line: small, and still readable with `less`.
    (out / "captions.json").write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _is_current(root: Path, manifest: dict[str, Any]) -> bool:
    """Same parameters and nothing missing (listing 2,500 names takes ~1 ms)."""
    try:
        return (
            json.loads((root / "manifest.json").read_text()) == manifest
            and (root / "captions.json").is_file()
            and len(os.listdir(root / "images")) == sum(manifest["counts"].values())
        )
    except (OSError, ValueError):
        return False


def _remove_stale_temps(root: Path, max_age_s: float = 86400.0) -> None:
    """Delete temp/old dirs beside root left by a killed run (a young one may be in use)."""
    for p in root.parent.glob(f".{root.name}.*-*"):
        try:
            if p.is_dir() and time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _install(tmp: Path, root: Path, manifest: dict[str, Any]) -> None:
    """Atomically move a finished tmp dir to root; a stale root is moved aside and deleted.

    Two processes may race (e.g. DDP ranks): whoever renames first wins, the loser sees a
    current root and discards its copy.
    """
    for _ in range(5):
        try:
            os.replace(tmp, root)  # atomic; succeeds when root is absent or an empty dir
            return
        except OSError:
            if _is_current(root, manifest):
                return  # another process won the race with the same parameters
            old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(root, old)
            except FileNotFoundError:
                continue  # someone else moved it first
            shutil.rmtree(old, ignore_errors=True)
    raise UserError(
        f"could not install the synthetic dataset at {root}; delete that directory and retry"
    )


def load_synthetic(
    root: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 250,
    n_test: int = 250,
    image_size: int = 128,
) -> list[ImageRecord]:
    """Generate on first use (cached under root), then just read."""
    root = Path(root).expanduser().absolute()
    counts = dict(zip(SPLITS, (int(n_train), int(n_val), int(n_test)), strict=True))
    if min(counts.values()) < 0 or image_size < 32:
        raise UserError(
            f"synthetic data: counts must be >= 0 and image_size >= 32, got {counts}, image_size={image_size}"
        )
    manifest = _manifest(int(seed), counts, int(image_size))

    if not _is_current(root, manifest):
        if root.exists() and not (
            root.is_dir() and (not any(root.iterdir()) or (root / "manifest.json").exists())
        ):
            raise UserError(
                f"{root} exists but is not a synthetic dataset (no manifest.json); point data.root at a new or empty directory"
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root)
        total = sum(counts.values())
        log.info("generating the synthetic dataset (%d images) in %s", total, root)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            _generate(tmp, manifest)
            _install(tmp, root, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("generated %d images in %.1f s", total, time.perf_counter() - start)

    try:
        entries = json.loads((root / "captions.json").read_text())
        return [
            ImageRecord(e["image_id"], root / e["file_name"], list(e["captions"]), e["split"])
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"cannot read {root / 'captions.json'} ({e}); delete {root} to regenerate it"
        ) from e
