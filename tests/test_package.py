"""The package works wherever it is installed: a wheel built from this checkout, run from an
unrelated directory with the wheel's files first on the path (not the checkout's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, demo_checkpoint


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the checkout's sources (the build leaves no trace in it)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "src",
        src / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = dist.glob("imcap-*.whl")
    return whl


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel's files, unpacked as pip would put them in site-packages."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_holds_everything_the_library_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_conf = {
        f"imcap/conf/{p.relative_to(ROOT / 'src/imcap/conf').as_posix()}"
        for p in (ROOT / "src/imcap/conf").rglob("*.yaml")
    }
    assert "imcap/conf/train.yaml" in shipped_conf and len(shipped_conf) > 40
    assert shipped_conf <= names, sorted(shipped_conf - names)[:5]
    assert "imcap/serve/static/index.html" in names
    for p in (ROOT / "src/imcap/zoo").glob("*"):  # the shipped models and their index
        assert f"imcap/zoo/{p.name}" in names
    assert "hydra_plugins/imcap_optuna_sweeper/sweeper.py" in names
    assert not any(n.startswith(("conf/", "tests/", "bench/")) for n in names)


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMCAP_")}
    env |= {"PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_installed_copy_loads_a_checkpoint_and_captions_from_anywhere(site, tmp_path):
    ckpt = demo_checkpoint(tmp_path / "model.ckpt")
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"""
import imcap, imcap.config
from imcap.model.module import Captioner
assert imcap.__file__.startswith({str(site)!r}), imcap.__file__
assert str(imcap.config.CONF_DIR).startswith({str(site)!r})
m = Captioner.load_from_checkpoint({str(ckpt)!r})
print("CAPTION", m.caption_files([{str(image)!r}])[0])
"""
    r = run_installed(site, elsewhere, "-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CAPTION " in r.stdout and r.stdout.split("CAPTION ", 1)[1].strip()
    # the CLI as installed: python -m imcap caption; the run folder lands in the working dir
    r = run_installed(
        site, elsewhere, "-m", "imcap", "caption", f"ckpt_path={ckpt}", f"images={image}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{image}: " in r.stdout
    assert list((elsewhere / "outputs" / "caption" / "runs").glob("*/captions.json"))


def test_installed_copy_composes_a_user_config_dir(site, tmp_path):
    """A user's own experiment/ and encoder/ files (--config-dir) compose with the shipped ones."""
    user = tmp_path / "my_configs"
    (user / "experiment").mkdir(parents=True)
    (user / "encoder").mkdir()
    (user / "encoder" / "tiny_resnet.yaml").write_text(
        "defaults:\n  - resnet18\n  - _self_\nimg_size: 64\n"
    )
    (user / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /encoder: tiny_resnet\n"
        "  - override /decoder: gru\ndata:\n  batch_size: 7\ntags: [mine]\n"
    )
    train = ["-m", "imcap", "train", "--config-dir", str(user), "experiment=mine"]
    r = run_installed(site, tmp_path, *train, "--cfg", "job")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch_size: 7" in r.stdout and "img_size: 64" in r.stdout
    assert "name: resnet18" in r.stdout and "- mine" in r.stdout
    # a misspelt key in a run with a user config dir is still one line naming it
    r = run_installed(site, tmp_path, *train, "data.bach_size=3")
    assert r.returncode == 2 and "data.bach_size" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(
    not (ROOT / "src/imcap/zoo/index.json").is_file(), reason="no shipped model in this checkout"
)
def test_installed_copy_captions_with_the_shipped_model_by_default(site, tmp_path):
    """No ckpt_path, no checkout, no dataset: the wheel's own model captions a photo."""
    from PIL import Image, ImageDraw

    image = tmp_path / "photo.jpg"
    im = Image.new("RGB", (320, 240), (90, 150, 220))  # sky over grass, a dark figure
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 150, 320, 240), fill=(60, 160, 60))
    draw.ellipse((140, 90, 180, 170), fill=(30, 30, 30))
    im.save(image)
    r = run_installed(site, tmp_path, "-m", "imcap", "caption", f"images={image}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "using the shipped model flickr8k-topdown-lite2" in r.stdout
    caption = r.stdout.split(f"{image}: ", 1)[1].splitlines()[0]
    assert len(caption.split()) >= 3, caption


def test_installed_copy_trains_evaluates_and_exports_from_anywhere(site, tmp_path):
    """imcap train (built-in data, debug=fast), eval and export as installed, in a folder that
    is not a checkout: data, caches and run folders land under the working directory."""
    import json

    small = ["data.source.n_train=64", "data.source.n_val=16", "data.source.n_test=16"]
    r = run_installed(site, tmp_path, "-m", "imcap", "train", "debug=fast", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics,) = (tmp_path / "outputs" / "train" / "runs").glob("*/metrics.json")
    ckpt = json.loads(metrics.read_text())["best_checkpoint"]
    assert Path(ckpt).is_relative_to(tmp_path) and (tmp_path / "data" / "synthetic").is_dir()
    r = run_installed(site, tmp_path, "-m", "imcap", "eval", f"ckpt_path={ckpt}", "split=val",
                      "metrics.meteor=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "outputs" / "eval" / "runs").glob("*/metrics_val.json"))
    out = tmp_path / "exported"
    r = run_installed(site, tmp_path, "-m", "imcap", "export", f"ckpt_path={ckpt}",
                      "format=torchscript", f"output={out}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "captioner.pt").is_file()
