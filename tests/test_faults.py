"""Hostile inputs: each test builds its own and checks the failure is safe and explained."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_popen, encoder_args, png_header, tiny_overrides

from imcap.errors import UserError
from imcap.model.checkpoint import load_captioner


class _Payload:
    """Unpickling this calls os.system: what a booby-trapped checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(trained_ckpt: str, tmp_path: Path) -> tuple[Path, Path]:
    """A real imcap checkpoint with a code-running object added (it captions normally if
    loaded unsafely), and the file its payload would create."""
    marker = tmp_path / "payload_ran"
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    ckpt["extra"] = _Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)  # the payload pickles as a call to os.system
    return path, marker


def test_loading_a_crafted_checkpoint_refuses_and_runs_nothing(trained: dict, tmp_path: Path):
    path, marker = crafted_checkpoint(trained["ckpt"], tmp_path)
    with pytest.raises(UserError, match="refusing to load .*evil.ckpt"):
        load_captioner(path)
    assert not marker.exists()


def test_trust_checkpoint_is_an_explicit_opt_in(trained: dict, tmp_path: Path):
    """The refusal names the opt-in; with it (a file you trust) the whole pickle is loaded."""
    path, marker = crafted_checkpoint(trained["ckpt"], tmp_path)
    with pytest.raises(UserError, match="trust_checkpoint=true"):
        load_captioner(path)
    model = load_captioner(path, trust=True)  # what trust means: the payload runs
    assert marker.exists() and model.vocab is not None


def test_caption_cli_refuses_a_crafted_checkpoint(trained: dict, tmp_path: Path):
    path, marker = crafted_checkpoint(trained["ckpt"], tmp_path)
    img = next((trained["out"]).parent.glob("data/synthetic/images/*.jpg"), None)
    res = cli("caption.py", f"ckpt_path={path}", f"images={img}", f"hydra.run.dir={tmp_path / 'o'}")
    assert res.returncode != 0 and "refusing to load" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    assert not marker.exists()


def test_truncated_checkpoint_is_one_clear_error(trained: dict, tmp_path: Path):
    data = Path(trained["ckpt"]).read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="cannot read checkpoint .*cut.ckpt"):
        load_captioner(path)


def test_a_diverging_run_fails_and_saves_no_checkpoint(shared: Path, tmp_path: Path) -> None:
    from conftest import compose_train, tiny_overrides

    from imcap.pipeline.run import train

    out = tmp_path / "nan"
    cfg = compose_train(
        tiny_overrides(shared, "model.optimizer.lr=1e20", f"paths.output_dir={out}", "test=false")
    )
    with pytest.raises(UserError, match="training diverged: the loss is nan"):
        train(cfg)
    assert not list(out.glob("checkpoints/*.ckpt"))
    assert not (out / "metrics.json").exists()  # nothing reported as a result


# -- kills: a resume loses at most the epoch in progress -----------------------------------------
def start_training(shared: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A real training subprocess on the session's tiny synthetic set (cached features)."""
    args = tiny_overrides(
        shared, f"paths.output_dir={out}", "test=false", "trainer.max_epochs=40", *extra
    )
    return cli_popen("train.py", *args)


def completed_epochs(out: Path) -> int:
    """Epochs whose validation finished, from the run's metrics.csv."""
    path = out / "csv" / "metrics.csv"
    if not path.is_file():
        return 0
    with path.open() as fh:
        return len({r["epoch"] for r in csv.DictReader(fh) if r.get("val/CIDEr")})


def load_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - being replaced right now: look again
        return -1


def wait_for_epochs(proc: subprocess.Popen, out: Path, n: int, timeout: float = 300) -> None:
    """Until `n` epochs are validated and last.ckpt holds the latest of them."""
    deadline = time.monotonic() + timeout
    last = out / "checkpoints" / "last.ckpt"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        done = completed_epochs(out)
        if done >= n and last.is_file() and load_epoch(last) >= n - 1:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {n} validated epochs within {timeout} s")


def resume(shared: Path, out: Path, ckpt: Path, epochs: int) -> dict:
    run = cli(
        "train.py",
        *tiny_overrides(
            shared,
            f"paths.output_dir={out}",
            "test=false",
            f"trainer.max_epochs={epochs}",
            f"ckpt_path={ckpt}",
        ),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads((out / "metrics.json").read_text())


def test_sigterm_saves_a_resumable_checkpoint_and_exits_nonzero(shared: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = start_training(shared, out)
    wait_for_epochs(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM: schedulers requeue on it
    last = out / "checkpoints" / "last.ckpt"
    assert f"python src/train.py resume={out}" in err and "Traceback" not in err
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] >= 1  # at least the two validated epochs are kept
    metrics = resume(shared, tmp_path / "resumed", last, state["epoch"] + 2)
    assert metrics["val"]["CIDEr"] >= 0 and Path(metrics["best_checkpoint"]).is_file()


def test_kill_9_loses_at_most_the_epoch_in_progress(shared: Path, tmp_path: Path) -> None:
    """last.ckpt follows every epoch, not only improvements (lr 0: val CIDEr never improves
    after epoch 0, so Lightning's own last.ckpt would stay there), and is written atomically."""
    out = tmp_path / "run"
    proc = start_training(shared, out, "model.optimizer.lr=0")
    wait_for_epochs(proc, out, 3)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    done = completed_epochs(out)
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] >= done - 1  # the last validated epoch is in last.ckpt (or the kill
    # landed between the validation and the save: then the one before it)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # no half-written file left
    metrics = resume(shared, tmp_path / "resumed", last, state["epoch"] + 2)
    assert Path(metrics["best_checkpoint"]).is_file()


# -- decompression bombs are bad images, not crashes ----------------------------------------------
def test_decompression_bombs_are_skipped_or_named_never_decoded(tmp_path: Path) -> None:
    from PIL import Image

    from imcap.data.images import ImageFiles, load_image

    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    over_ours = png_header(tmp_path / "big.png", 9000, 9000)  # under Pillow's limit, over ours
    over_pillows = png_header(tmp_path / "huge.png", 100_000, 100_000)  # Pillow refuses at open
    with pytest.raises(ValueError, match="pixel limit"):
        load_image(over_ours)
    files = ImageFiles([over_ours, over_pillows, good], lambda im: im.size, bad_images="skip")
    assert [files[i][1] for i in range(3)] == [None, None, (16, 16)]
    strict = ImageFiles([over_pillows], lambda im: im.size, bad_images="error")
    with pytest.raises(UserError, match="huge.png"):
        strict[0]


# -- reproducibility ---------------------------------------------------------------------------------
def test_same_seed_same_run_with_a_cold_or_a_warm_feature_cache(tmp_path: Path) -> None:
    """The first run extracts features (cold cache), the second reads them (warm): the same."""
    from conftest import compose_train

    from imcap.pipeline.run import train

    scores = []
    for name in ("cold", "warm"):
        out = tmp_path / name
        train(compose_train(tiny_overrides(tmp_path, "trainer.max_epochs=2", "test=false",
                                           f"paths.output_dir={out}")))  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())
        scores.append((metrics["val"]["CIDEr"], metrics["val"]["BLEU-4"]))
    assert scores[0] == scores[1]


# -- values a run would accept and then misbehave on ------------------------------------------------
@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"batch_size": 0}, r"data\.batch_size must be a whole number >= 1, got 0"),
        ({"eval_batch_size": -4}, r"data\.eval_batch_size"),
        ({"vocab": {"max_len": 0}}, r"data\.vocab\.max_len"),
        ({"num_workers": -1}, r"data\.num_workers"),
        ({"max_train_images": 0}, r"data\.max_train_images"),
    ],
)
def test_bad_data_values_are_one_line(data: dict, match: str, tmp_path: Path) -> None:
    from imcap.pipeline.datamodule import data_options

    with pytest.raises(UserError, match=match):
        data_options({"name": "x", "root": str(tmp_path), **data})


@pytest.mark.parametrize(
    ("decoding", "match"),
    [
        ({"beam_size": 0}, r"model\.decoding\.beam_size must be a whole number >= 1, got 0"),
        ({"max_len": 0}, r"model\.decoding\.max_len"),
        ({"length_penalty": -1.0}, r"model\.decoding\.length_penalty"),
    ],
)
def test_bad_decoding_values_are_one_line(decoding: dict, match: str) -> None:
    from imcap.config import group_section, model_sections
    from imcap.data.text import Vocab
    from imcap.model.module import Captioner

    vocab = Vocab.build([["a", "b"]], min_count=1, max_len=5).to_dict()
    with pytest.raises(UserError, match=match):
        sections = model_sections(decoding=decoding)
        Captioner(
            vocab,
            encoder_args("resnet18"),
            group_section("decoder", "lstm", hidden_dim=8, embed_dim=8),
            **sections,
        )


def test_zero_epochs_is_refused_before_any_work(tmp_path: Path) -> None:
    from conftest import compose_train

    from imcap.pipeline.run import train

    with pytest.raises(UserError, match=r"trainer\.max_epochs must be"):
        train(compose_train(tiny_overrides(tmp_path, "trainer.max_epochs=0")))
    assert not (tmp_path / "cache").exists()  # refused before extraction


# -- annotation files cannot point outside the dataset -----------------------------------------------
@pytest.mark.parametrize("name", ["../outside.jpg", "ABS"])
def test_image_paths_escaping_the_root_are_refused(name: str, tmp_path: Path) -> None:
    """A Karpathy JSON naming `../x.jpg` or an absolute path would read any file on the machine
    (here: a real JPEG next to the dataset, which would otherwise train silently)."""
    from conftest import data_source
    from PIL import Image

    from imcap.data.datasets import load_records

    root = tmp_path / "flickr8k"
    (root / "Images").mkdir(parents=True)
    outside = tmp_path / "Images_outside" / "outside.jpg"
    outside.parent.mkdir()
    for p in (root / "Images" / "a.jpg", root / "Images" / "b.jpg", outside):
        Image.new("RGB", (8, 8), "red").save(p)
    bad = str(outside) if name == "ABS" else f"../../Images_outside/{Path(name).name}"
    images = [
        {"filename": f, "split": s, "sentences": [{"raw": "a red square .", "tokens": []}]}
        for f, s in (("a.jpg", "train"), ("b.jpg", "val"), (bad, "train"))
    ]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(UserError, match=r"1 image path\(s\) named in .* point outside"):
        load_records("flickr8k", root, **data_source("flickr8k"))


def test_bad_image_messages_name_the_key_of_the_command_that_runs(tmp_path: Path) -> None:
    """caption.py's policy key is `bad_images`, the data module's `data.bad_images`."""
    from imcap.data.images import ImageFiles

    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    with pytest.raises(UserError, match=r"x\.jpg.* set bad_images=skip"):
        ImageFiles([bad], lambda im: im, "error", key="bad_images")[0]
    with pytest.raises(UserError, match=r"set data\.bad_images=skip"):
        ImageFiles([bad], lambda im: im, "error")[0]
    with pytest.raises(UserError, match=r"^bad_images must be one of"):
        ImageFiles([bad], lambda im: im, "ignore", key="bad_images")


# -- places that cannot be written, files that cannot be read ------------------------------------------
def test_unwritable_cache_and_run_dirs_are_one_line(tmp_path: Path) -> None:
    """A path under a regular file cannot be created, even by root (CI may run as root, where
    permission bits do not stop writes)."""
    from conftest import compose_train

    from imcap.pipeline.run import train

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = compose_train(tiny_overrides(tmp_path, f"paths.cache_dir={blocker / 'cache'}"))
    with pytest.raises(UserError, match=r"cannot write the feature cache under .*a_file"):
        train(cfg)
    cfg = compose_train(tiny_overrides(tmp_path, f"paths.output_dir={blocker / 'run'}"))
    with pytest.raises(UserError, match=r"cannot write the run directory .*a_file/run"):
        train(cfg)


def test_non_utf8_split_list_names_the_file(tmp_path: Path) -> None:
    from conftest import data_source
    from PIL import Image

    from imcap.data.datasets import load_records

    root = tmp_path / "flickr8k"
    (root / "Images").mkdir(parents=True)
    (root / "Flickr8k_text").mkdir()
    for n in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), "red").save(root / "Images" / n)
    lines = [f"{n}#{k}\tA red square ." for n in ("a.jpg", "b.jpg") for k in range(2)]
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").write_bytes(b"a.jpg\n\xff\xfe\xfa\n")
    with pytest.raises(UserError, match=r"split list .*Flickr_8k\.trainImages\.txt is not UTF-8"):
        load_records("flickr8k", root, **data_source("flickr8k"))
