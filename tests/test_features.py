"""Two-step training's feature cache, joint/two-step agreement, bad images, batch assembly."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import data_config, data_source, encoder_args
from PIL import Image

from imcap.data.images import ImageFiles, make_transform
from imcap.data.records import ImageRecord
from imcap.data.text import Vocab, tokenize
from imcap.errors import UserError
from imcap.model.batch import Batch
from imcap.model.encoder import Encoder
from imcap.pipeline.datamodule import CaptionDataModule, CaptionsPerImage
from imcap.pipeline.features import ensure_features


def make_images(folder: Path, n: int, size: int = 48) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def tiny_encoder(**kw) -> Encoder:
    torch.manual_seed(0)
    return Encoder(**encoder_args("resnet18", img_size=64, **kw))


def test_cache_round_trip_and_hit_runs_no_encoder(tmp_path: Path, monkeypatch) -> None:
    paths = make_images(tmp_path / "img", 6)
    enc = tiny_encoder()
    a = ensure_features(
        enc, paths, tmp_path / "cache", "toy", grid=True, batch_size=4, num_workers=0
    )
    assert a.pooled.shape == (6, 512) and a.grid.shape == (6, 4, 512)
    assert a.pooled.dtype == np.float16 and isinstance(a.pooled, np.memmap)
    manifest = json.loads((a.directory / "manifest.json").read_text())
    assert (
        manifest["encoder"] == "resnet18"
        and manifest["num_images"] == 6
        and manifest["transform"]["input_size"] == [3, 64, 64]
    )
    assert (a.directory / "images.txt").read_text().splitlines() == [str(p) for p in paths]

    def boom(*args, **kwargs):
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(enc, "forward", boom)
    b = ensure_features(
        enc, paths, tmp_path / "cache", "toy", grid=True, batch_size=4, num_workers=0
    )
    assert b.directory == a.directory and np.array_equal(a.pooled, b.pooled)


def test_cache_invalidates_when_inputs_change(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    base = ensure_features(tiny_encoder(), paths, cache, "toy", num_workers=0).directory
    other_weights = tiny_encoder()
    torch.nn.init.normal_(other_weights.model.conv1.weight)
    changed = [
        ensure_features(
            Encoder(**encoder_args("resnet10t", img_size=64)), paths, cache, "toy", num_workers=0
        ),  # encoder
        ensure_features(other_weights, paths, cache, "toy", num_workers=0),  # weights
        ensure_features(
            Encoder(**encoder_args("resnet18", img_size=96)), paths, cache, "toy", num_workers=0
        ),  # transform
        ensure_features(tiny_encoder(), paths[:3], cache, "toy", num_workers=0),  # image list
        ensure_features(tiny_encoder(), paths, cache, "toy", grid=True, num_workers=0),  # grid
        ensure_features(tiny_encoder(), paths, cache, "other", num_workers=0),  # dataset
    ]
    dirs = {c.directory for c in changed}
    assert base not in dirs and len(dirs) == len(changed)


def test_a_recopied_or_touched_data_folder_reuses_the_cache_and_changed_bytes_do_not(
    tmp_path: Path, monkeypatch
) -> None:
    import os
    import shutil

    paths = make_images(tmp_path / "img", 5)
    paths[2].write_bytes(b"not an image")  # an unreadable row travels with the cache
    cache = tmp_path / "cache"
    enc = tiny_encoder()
    a = ensure_features(enc, paths, cache, "toy", grid=True, batch_size=4, num_workers=0)
    assert a.bad == {2} and a.manifest["content_sha1"]
    shutil.copytree(tmp_path / "img", tmp_path / "copy")  # the data folder copied elsewhere
    copies = [tmp_path / "copy" / p.name for p in paths]
    os.utime(paths[0], ns=(10**18, 10**18))  # and the original touched

    calls = []
    real_forward = enc.forward
    monkeypatch.setattr(
        enc, "forward", lambda x, **kw: calls.append(len(x)) or real_forward(x, **kw)
    )
    moved = ensure_features(enc, copies, cache, "toy", grid=True, batch_size=4, num_workers=0)
    touched = ensure_features(enc, paths, cache, "toy", grid=True, batch_size=4, num_workers=0)
    assert calls == []  # neither ran the encoder
    assert moved.manifest["adopted_from"] == a.directory.name
    assert touched.manifest["adopted_from"] in {a.directory.name, moved.directory.name}
    assert len({a.directory, moved.directory, touched.directory}) == 3
    for c in (moved, touched):
        assert np.array_equal(c.pooled, a.pooled) and np.array_equal(c.grid, a.grid)
        assert c.bad == {2}
    assert moved.manifest["bad_files"] == [str(copies[2])]
    assert (moved.directory / "images.txt").read_text().splitlines() == [str(p) for p in copies]

    # one image's bytes changed: extracted afresh, not adopted from a cache of other bytes
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(copies[1], format="PNG")
    changed = ensure_features(enc, copies, cache, "toy", grid=True, batch_size=4, num_workers=0)
    assert calls and "adopted_from" not in changed.manifest
    assert not np.array_equal(changed.pooled[1], a.pooled[1])
    assert np.allclose(changed.pooled[3].astype(np.float32), a.pooled[3].astype(np.float32))
    # same bytes, other inputs (no grid): never adopted from the grid cache
    calls.clear()
    pooled_only = ensure_features(enc, copies[:1] + paths[1:], cache, "toy", num_workers=0)
    assert calls and "adopted_from" not in pooled_only.manifest


def test_cache_reuse_needs_the_same_identity_order_and_a_source_that_is_still_there(
    tmp_path: Path, monkeypatch
) -> None:
    """Byte-identical images are not enough: a mirrored cache, another image order, a damaged
    manifest or a source removed mid-way never give a plain run its features (it extracts)."""
    import os

    import imcap.pipeline.features as features_mod

    paths = make_images(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    enc = tiny_encoder()
    flipped = ensure_features(enc, paths, cache, "toy", hflip=True, num_workers=0)
    (cache / "toy" / "0123456789abcdef").mkdir()
    (cache / "toy" / "0123456789abcdef" / "manifest.json").write_text("{not json")
    calls = []
    real_forward = enc.forward
    monkeypatch.setattr(
        enc, "forward", lambda x, **kw: calls.append(len(x)) or real_forward(x, **kw)
    )

    def fresh(image_paths: list[Path]):
        calls.clear()
        c = ensure_features(enc, image_paths, cache, "toy", num_workers=0)
        assert calls and "adopted_from" not in c.manifest, c.manifest.get("adopted_from")
        return c

    plain = fresh(paths)  # same bytes, mirrored cache: not adopted
    assert not np.allclose(plain.pooled.astype(np.float32), flipped.pooled.astype(np.float32))
    fresh(paths[::-1])  # the same images in another order: rows would be wrong
    os.utime(paths[0], ns=(10**18, 10**18))

    def vanished(src, dst):
        raise FileNotFoundError(src)

    monkeypatch.setattr(features_mod.os, "link", vanished)  # the source removed meanwhile
    fresh(paths)
    leftovers = [p.name for p in (cache / "toy").iterdir() if ".tmp" in p.name]
    assert leftovers == []


def _extract_in_process(args) -> str:
    paths, cache = args
    return str(ensure_features(tiny_encoder(), paths, cache, "toy", num_workers=0).directory)


def test_two_runs_starting_at_once_share_one_cache(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "img", 8)
    with mp.get_context("spawn").Pool(2) as pool:
        dirs = pool.map(_extract_in_process, [(paths, tmp_path / "cache")] * 2)
    assert dirs[0] == dirs[1]
    entries = sorted(
        p.name for p in (tmp_path / "cache" / "toy").iterdir() if not p.name.endswith(".lock")
    )
    assert entries == [Path(dirs[0]).name]  # one finished cache, no half-written leftovers


def test_bad_images_are_reported_and_skipped(tmp_path: Path, caplog) -> None:
    paths = make_images(tmp_path / "img", 5)
    paths[1].write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt
    paths[3].unlink()  # missing
    c = ensure_features(tiny_encoder(), paths, tmp_path / "cache", "toy", num_workers=0)
    assert c.bad == {1, 3}
    assert c.manifest["bad_files"] == [str(paths[1]), str(paths[3])]
    assert str(paths[1]) in caplog.text and str(paths[3]) in caplog.text
    assert np.abs(c.pooled[[0, 2, 4]].astype(np.float32)).sum() > 0
    with pytest.raises(UserError, match=str(paths[1]).replace(".", r"\.")):
        ensure_features(
            tiny_encoder(), paths, tmp_path / "cache2", "toy", num_workers=0, bad_images="error"
        )


def records(tmp_path: Path, n_train: int = 6, n_val: int = 3) -> list[ImageRecord]:
    paths = make_images(tmp_path / "img", n_train + n_val)
    caps = ["a red square", "a blue circle on the left", "two small stars", "a big green box"]
    return [
        ImageRecord(
            f"im{i}", p, [caps[i % 4], caps[(i + 1) % 4]], "train" if i < n_train else "val"
        )
        for i, p in enumerate(paths)
    ]


def datamodule(tmp_path: Path, recs: list[ImageRecord], mode: str, **kw) -> CaptionDataModule:
    """The data module for a stand-in model (vocabulary, tiny encoder, a grid-reading decoder)."""
    captions = (tokenize(c) for r in recs if r.split == "train" for c in r.captions)
    model = SimpleNamespace(
        vocab=Vocab.build(captions, min_count=1, max_len=20),
        encoder=tiny_encoder(),
        decoder=SimpleNamespace(uses_grid=True),
        connect=lambda link: None,
    )
    data = {
        **data_config("synthetic"),  # the whole data section, as a run composes it
        "name": "toy",
        "root": str(tmp_path),
        "batch_size": 4,
        "eval_batch_size": 4,
        "num_workers": 0,
        "cache_dir": str(tmp_path / "cache"),
        **kw,
    }
    dm = CaptionDataModule.for_model(data, model, mode)
    dm.records = {
        "train": [r for r in recs if r.split == "train"],
        "val": [r for r in recs if r.split == "val"],
        "test": [],
    }
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_two_step_and_joint_give_the_same_features(tmp_path: Path) -> None:
    recs = records(tmp_path)
    two = datamodule(tmp_path, recs, "two_step")
    joint = datamodule(tmp_path, recs, "joint")
    enc = joint.encoder.eval()
    batch = next(iter(joint.val_dataloader()))
    batch = joint.on_before_batch_transfer(batch, 0)
    with torch.no_grad():
        f = enc(batch.images, grid=True)
    cached = two.on_after_batch_transfer(
        two.on_before_batch_transfer(next(iter(two.val_dataloader())), 0), 0
    )
    assert cached.image_ids == batch.image_ids == ["im6", "im7", "im8"]
    torch.testing.assert_close(cached.pooled, f.pooled, atol=2e-2, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(cached.grid, f.grid, atol=2e-2, rtol=2e-3)


def test_two_step_training_batches_are_gathered_from_the_cache(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, records(tmp_path), "two_step")
    loader = dm.train_dataloader()
    raw = next(iter(loader))
    idx = raw["captions"]
    assert idx.dtype == torch.long and list(raw) == ["captions"]  # the loader yields indices only
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
    assert isinstance(batch, Batch) and len(batch) == len(idx)
    assert batch.pooled.shape == (len(idx), 512) and batch.grid.shape == (len(idx), 4, 512)
    assert (batch.tokens[:, 0] == dm.vocab.bos_id).all()
    rows = dm.train_rows[idx]
    assert torch.equal(batch.rows, rows) and batch.image_ids == [f"im{r}" for r in rows.tolist()]
    torch.testing.assert_close(batch.pooled, dm.bank["pooled"][rows].float())
    torch.testing.assert_close(batch.grid, dm.bank["grid"][rows].float())


def test_the_feature_bank_stays_memory_mapped_on_the_host(tmp_path: Path) -> None:
    """A cache larger than RAM must train from the file: the bank shares the memmap's pages
    (no copy), and a device bank that does not fit is gathered per batch on the host."""
    from imcap.pipeline.datamodule import bank_fits

    dm = datamodule(tmp_path, records(tmp_path), "two_step")
    dm.setup("fit")
    for key, arr in (("pooled", dm.cache.pooled), ("grid", dm.cache.grid)):
        assert isinstance(arr, np.memmap)
        assert dm.bank[key].dtype == torch.float16
        assert np.shares_memory(dm.bank[key].numpy(), arr)  # a view of the file, not a copy
    gib = 2**30
    assert bank_fits(gib, torch.device("cuda"), free=4 * gib)
    assert not bank_fits(3 * gib, torch.device("cuda"), free=4 * gib)


def test_captions_per_image_sampler() -> None:
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    s = CaptionsPerImage(rows, k=1, seed=0)
    epoch1 = list(s)
    assert len(epoch1) == len(s) == 3
    assert sorted(rows[epoch1].tolist()) == [0, 1, 2]  # one caption of each image
    seen = {i for _ in range(30) for i in s}
    assert seen == set(range(9))  # every caption gets its turn across epochs
    assert len(CaptionsPerImage(rows, k=2)) == 6


def test_grouped_sampler_puts_an_images_captions_side_by_side() -> None:
    rows = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 2])
    s = CaptionsPerImage(rows, k=len(rows), seed=0, grouped=True)
    epochs = [list(s) for _ in range(6)]
    for order in epochs:
        assert sorted(order) == list(range(9))  # every caption once per epoch
        images = rows[order].tolist()
        runs = [images[0]] + [b for a, b in zip(images, images[1:], strict=False) if a != b]
        assert sorted(runs) == [0, 1, 2]  # each image's captions form one contiguous run
    assert len({tuple(rows[o].tolist()) for o in epochs}) > 1  # image order reshuffled


def test_joint_epoch_survives_a_corrupt_image(tmp_path: Path) -> None:
    recs = records(tmp_path)
    recs[2].path.write_bytes(b"garbage")
    dm = datamodule(tmp_path, recs, "joint")
    total = 0
    for raw in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(raw, 0)
        total += batch.images.shape[0]
    assert total == 6 * 2 - 2  # the corrupt image's two captions were skipped
    assert dm.bad_counts["train"] == 2


def test_image_files_error_policy_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("nope")
    files = ImageFiles([bad], make_transform(tiny_encoder().data_config), bad_images="error")
    with pytest.raises(UserError, match="x.jpg"):
        files[0]
    with pytest.raises(UserError, match="bad_images"):
        ImageFiles([bad], lambda x: x, bad_images="ignore")


def test_gpu_decode_path_decodes_jpeg_bytes_like_the_cpu_transform(tmp_path: Path) -> None:
    """data.gpu_decode: the loader yields raw JPEG bytes (different lengths per file), decoded
    by torchvision (nvJPEG on a GPU; here on the CPU) into the same images as the PIL path."""
    recs = records(tmp_path)
    yy, xx = np.mgrid[0:40, 0:64] / 40.0
    for i, r in enumerate(recs):  # smooth JPEGs of different sizes (byte strings differ in length)
        w = 48 + 8 * (i % 3)
        rgb = np.stack([np.sin(xx * (1 + i % 4) + c) * np.cos(yy * 2 + c) for c in (0, 1, 2)], -1)
        jpg = r.path.with_suffix(".jpg")
        Image.fromarray(((rgb[:, :w] + 1) * 127.5).astype(np.uint8)).save(jpg, quality=95)
        r.path = jpg
    recs[3].path.write_bytes(b"\xff\xd8 not really a jpeg")
    raw_dm = datamodule(tmp_path, recs, "joint", gpu_decode=True)
    pil_dm = datamodule(tmp_path, recs, "joint")
    raw_dm.trainer = pil_dm.trainer = None
    torch.manual_seed(0)
    raw_batches = [raw_dm.on_before_batch_transfer(b, 0) for b in raw_dm.train_dataloader()]
    torch.manual_seed(0)
    pil_batches = [pil_dm.on_before_batch_transfer(b, 0) for b in pil_dm.train_dataloader()]
    assert sum(len(b.tokens) for b in raw_batches) == 12 - 2  # the corrupt image's 2 captions
    assert raw_dm.bad_counts["train"] == 2
    for a, b in zip(raw_batches, pil_batches, strict=True):
        assert a.images.shape == b.images.shape and a.images.shape[1:] == (3, 64, 64)
        assert torch.equal(a.rows, b.rows) and torch.equal(a.tokens, b.tokens)
        assert a.image_ids == b.image_ids
        # bicubic on tensors vs PIL: close, not bit-equal (normalised units, range ~[-2, 2.6])
        assert (a.images - b.images).abs().mean() < 0.05


def test_bad_images_error_policy_holds_with_a_warm_cache_and_fixed_files_come_back(
    tmp_path: Path,
) -> None:
    recs = records(tmp_path)
    recs[2].path.write_bytes(b"garbage")
    skip = datamodule(tmp_path, recs, "two_step")  # builds the cache, row 2 marked unreadable
    assert skip.cache.bad == {2}
    with pytest.raises(UserError, match=r"1 image\(s\) could not be read .*img002"):
        datamodule(tmp_path, recs, "two_step", bad_images="error")  # same (warm) cache
    Image.new("RGB", (48, 48), "blue").save(recs[2].path, format="PNG")  # fixed in place
    fixed = datamodule(tmp_path, recs, "two_step", bad_images="error")
    assert fixed.cache.bad == set() and fixed.cache.directory != skip.cache.directory


def test_a_missing_image_file_stops_an_error_run_and_is_skipped_otherwise(tmp_path: Path) -> None:
    from imcap.data.datasets import load_records

    root = tmp_path / "flickr8k"
    (root / "Images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8), "red").save(root / "Images" / name)
    names = (("a.jpg", "train"), ("b.jpg", "val"), ("c.jpg", "train"), ("gone.jpg", "train"))
    images = [
        {"filename": f, "split": s, "sentences": [{"raw": "a red square .", "tokens": []}]}
        for f, s in names
    ]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images}))
    source = data_source("flickr8k")
    assert len(load_records("flickr8k", root, **source)) == 3  # skip (default): left out, warned
    with pytest.raises(UserError, match=r"1 image file\(s\) named in .* are missing .*gone.jpg"):
        load_records("flickr8k", root, bad_images="error", **source)


# -- sharded extraction (DDP): every process encodes a share, rank 0 assembles one cache ---------
def test_shards_are_contiguous_runs_of_whole_batches() -> None:
    from imcap.pipeline.features import shard_rows

    for n, bs, world in ((10, 4, 2), (10, 4, 3), (3, 4, 2), (0, 4, 2), (64, 8, 8), (7, 1, 3)):
        shards = [shard_rows(n, bs, r, world) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))  # every image once, in order
        assert all(s.start % bs == 0 for s in shards if len(s))  # batch boundaries kept
    assert len(shard_rows(3, 4, 0, 2)) == 0 and len(shard_rows(3, 4, 1, 2)) == 3  # 1 batch


SHARD_KW = {"grid": True, "batch_size": 4, "num_workers": 0}


def _sharded_worker(rank: int, world: int, port: int, tmp: str) -> None:
    """One DDP process: the scenarios of the sharded-extraction tests, in order, each rank's
    outcome written to <tmp>/<scenario>_rank<r>.json."""
    import torch.distributed as dist

    from imcap.pipeline import features

    features.SHARED_WAIT_S = 1.0  # the unshared scenario waits this long for rank 0's folder
    torch.set_num_threads(1)  # as the single-process reference
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    paths = [Path(p) for p in (Path(tmp) / "paths.txt").read_text().splitlines()]
    scenarios = {
        "sharded": {"cache_dir": f"{tmp}/sharded"},
        "error": {"cache_dir": f"{tmp}/error", "bad_images": "error"},
        # rank 1's cache folder is not rank 0's (node-local disks): each extracts alone
        "unshared": {"cache_dir": f"{tmp}/unshared{rank}"},
        # the same, but rank 0's folder already holds the cache: rank 1 must not fail alone
        "warm_local": {"cache_dir": f"{tmp}/warm{rank}"},
    }
    for name, kw in scenarios.items():
        if name == "warm_local" and rank == 0:  # only rank 0's node-local disk holds the cache
            ensure_features(tiny_encoder(), paths, dataset="toy", **kw, **SHARD_KW)
        dist.barrier()
        try:
            group = features.process_group()
            c = ensure_features(tiny_encoder(), paths, dataset="toy", group=group, **kw, **SHARD_KW)
            out = {"directory": str(c.directory)}
        except Exception as e:  # noqa: BLE001 - the test reads what each rank saw
            out = {"error": f"{type(e).__name__}: {e}"}
        (Path(tmp) / f"{name}_rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Two gloo processes (spawned) running the scenarios of `_sharded_worker`; 10 images in
    batches of 4 (rank 0: images 0-3, rank 1: 4-9), image 6 corrupt."""
    import socket

    tmp = tmp_path_factory.mktemp("sharded")
    paths = make_images(tmp / "img", 10)
    paths[6].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp / "paths.txt").write_text("\n".join(map(str, paths)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sharded_worker, args=(2, port, str(tmp)), nprocs=2, join=True)
    return tmp


def _outcome(tmp: Path, name: str) -> list[dict]:
    return [json.loads((tmp / f"{name}_rank{r}.json").read_text()) for r in range(2)]


def test_sharded_extraction_writes_the_single_process_cache(sharded: Path) -> None:
    paths = [Path(p) for p in (sharded / "paths.txt").read_text().splitlines()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = ensure_features(tiny_encoder(), paths, sharded / "single", "toy", **SHARD_KW)
    finally:
        torch.set_num_threads(threads)
    a, b = _outcome(sharded, "sharded")
    assert a == b and "error" not in a, (a, b)
    two = Path(a["directory"])
    assert two.name == one.directory.name  # the same key
    for name in ("pooled.f16", "grid.f16", "images.txt"):  # bitwise
        assert (two / name).read_bytes() == (one.directory / name).read_bytes(), name
    timing = ("seconds", "images_per_second", "processes")
    m1 = json.loads((one.directory / "manifest.json").read_text())
    m2 = json.loads((two / "manifest.json").read_text())
    assert m2["processes"] == 2 and m2["bad_rows"] == [6] == m1["bad_rows"]  # rank 1's, merged
    assert {k: v for k, v in m2.items() if k not in timing} == {
        k: v for k, v in m1.items() if k not in timing
    }
    left = sorted(p.name for p in two.parent.iterdir() if not p.name.endswith(".lock"))
    assert left == [two.name]  # no shard or temporary folder left behind


def test_an_error_on_one_rank_stops_every_rank_and_writes_no_cache(sharded: Path) -> None:
    a, b = _outcome(sharded, "error")
    # rank 1 read the corrupt image: its own error; rank 0 names rank 1 and that error
    assert b["error"].startswith("UserError: cannot read image") and "img006" in b["error"]
    assert a["error"].startswith("UserError: feature extraction failed on rank 1 of 2")
    assert "img006" in a["error"] and "\n" not in a["error"]
    folder = sharded / "error" / "toy"
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []


def test_ranks_that_do_not_share_the_cache_folder_each_extract_alone(sharded: Path) -> None:
    a, b = _outcome(sharded, "unshared")
    assert "error" not in a and "error" not in b, (a, b)
    assert Path(a["directory"]).parent.parent == sharded / "unshared0"
    assert Path(b["directory"]).parent.parent == sharded / "unshared1"
    m = json.loads((Path(b["directory"]) / "manifest.json").read_text())
    assert "processes" not in m and m["bad_rows"] == [6]  # a whole single-process cache


def test_a_cache_only_rank_0_holds_is_built_by_the_others_not_awaited(sharded: Path) -> None:
    """Node-local disks, rank 0's warm: rank 1 waited for rank 0's files, then failed alone
    while rank 0 went on into training (a hang until the collective timeout)."""
    a, b = _outcome(sharded, "warm_local")
    assert "error" not in a and "error" not in b, (a, b)
    assert Path(a["directory"]).parent.parent == sharded / "warm0"
    assert Path(b["directory"]).parent.parent == sharded / "warm1"
    ref = Path(a["directory"]) / "pooled.f16"
    assert (Path(b["directory"]) / "pooled.f16").read_bytes() == ref.read_bytes()


# -- data.hflip: mirrored training images, left and right swapped in their captions ----------------
def mirror_records(tmp_path: Path) -> list[ImageRecord]:
    paths = make_images(tmp_path / "img", 8)
    caps = ["a dog on the left", "a cat to the right of a box"]
    return [
        ImageRecord(f"im{i}", p, list(caps), "train" if i < 6 else "val")
        for i, p in enumerate(paths)
    ]


def words(dm: CaptionDataModule, tokens: torch.Tensor) -> list[str]:
    return [dm.vocab.decode(t.tolist()[1:]) for t in tokens]


def test_vocab_mirror_swaps_left_and_right_only_when_both_are_known() -> None:
    v = Vocab.build([["a", "dog", "on", "the", "left"], ["right", "of", "it"]])
    m = v.mirror_ids()
    assert m[v.index["left"]] == v.index["right"] and m[v.index["right"]] == v.index["left"]
    assert [m[i] for i in range(len(v)) if v.tokens[i] not in ("left", "right")] == [
        i for i in range(len(v)) if v.tokens[i] not in ("left", "right")
    ]
    only_left = Vocab.build([["a", "dog", "on", "the", "left"]])
    assert only_left.mirror_ids() == list(range(len(only_left)))  # no partner: unchanged


@pytest.mark.parametrize("mode", ["two_step", "joint"])
def test_hflip_batches_hold_the_mirror_image_and_swapped_words(tmp_path: Path, mode: str) -> None:
    recs = mirror_records(tmp_path)
    plain_dm = datamodule(tmp_path, recs, mode)
    dm = datamodule(tmp_path, recs, mode, hflip=1.0)
    raw = next(iter(plain_dm.train_dataloader()))
    base = plain_dm.on_after_batch_transfer(plain_dm.on_before_batch_transfer(raw, 0), 0)
    flip = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
    assert base.flipped is None and bool(flip.flipped.all())
    swap = {"left": "right", "right": "left"}
    for a, b in zip(words(plain_dm, base.tokens), words(dm, flip.tokens), strict=True):
        assert b == " ".join(swap.get(w, w) for w in a.split()) and a != b
    enc = dm.encoder.eval()
    if mode == "joint":
        torch.testing.assert_close(flip.images, base.images.flip(-1))
        return
    # the mirrored cache holds the encoder's features of the mirrored images
    files = ImageFiles([recs[r].path for r in flip.rows.tolist()], make_transform(enc.data_config))
    images = torch.stack([files[i][1] for i in range(len(files))]).flip(-1)  # (B, 3, H, W)
    with torch.no_grad():
        want = enc(images, grid=True)
    torch.testing.assert_close(flip.grid, want.grid, atol=2e-2, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(flip.pooled, want.pooled, atol=2e-2, rtol=2e-3)
    assert not torch.allclose(flip.grid, base.grid, atol=1e-2)  # not the unmirrored features
    assert dm.flip_cache.directory != dm.cache.directory  # a cache of its own
    assert dm.flip_cache.manifest["num_images"] == 6  # the train images only


def test_hflip_with_an_image_id_in_two_splits_is_a_named_error(tmp_path: Path) -> None:
    recs = mirror_records(tmp_path)
    recs[6] = ImageRecord("im1", recs[6].path, recs[6].captions, "val")  # train's im1 again
    with pytest.raises(UserError, match=r"1 training image id\(s\) also belong.*im1"):
        datamodule(tmp_path, recs, "two_step", hflip=0.5)


def test_joint_hflip_mirrors_exactly_the_drawn_items(tmp_path: Path) -> None:
    recs = mirror_records(tmp_path)
    plain_dm = datamodule(tmp_path, recs, "joint", batch_size=12)
    dm = datamodule(tmp_path, recs, "joint", hflip=0.5, batch_size=12)
    raw = next(iter(plain_dm.train_dataloader()))
    base = plain_dm.on_after_batch_transfer(plain_dm.on_before_batch_transfer(raw, 0), 0)
    for _ in range(4):  # until a batch holds both kinds
        flip = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
        if 0 < int(flip.flipped.sum()) < len(flip):
            break
    f = flip.flipped
    assert 0 < int(f.sum()) < len(flip)
    torch.testing.assert_close(flip.images[f], base.images[f].flip(-1))
    torch.testing.assert_close(flip.images[~f], base.images[~f])
    assert torch.equal(flip.tokens[~f], base.tokens[~f])


def test_hflip_draws_once_per_image_and_leaves_eval_batches_alone(tmp_path: Path) -> None:
    recs = mirror_records(tmp_path)
    dm = datamodule(tmp_path, recs, "two_step", hflip=0.5, batch_size=12)
    shares = []
    for _ in range(20):
        for raw in dm.train_dataloader():
            b = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
            for row in b.rows.unique():
                same = b.flipped[b.rows == row]
                assert bool((same == same[0]).all())  # an image's captions share its draw
            shares.append(b.flipped.float().mean().item())
            # every item holds the features of the input it claims
            for key, flag in (("grid", False), ("grid_flip", True)):
                sel = b.flipped == flag
                torch.testing.assert_close(b.grid[sel], dm.bank[key][b.rows[sel]].float())
    assert 0.3 < sum(shares) / len(shares) < 0.7
    val = dm.on_after_batch_transfer(
        dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0), 0
    )
    assert val.flipped is None  # evaluation never mirrors
    torch.testing.assert_close(val.grid, dm.bank["grid"][val.rows].float())


@pytest.mark.parametrize("bad", [1.5, -0.1, True, "half"])
def test_hflip_outside_zero_to_one_is_a_named_error(tmp_path: Path, bad: object) -> None:
    with pytest.raises(UserError, match=r"data.hflip must be a probability in \[0, 1\]"):
        datamodule(tmp_path, mirror_records(tmp_path), "two_step", hflip=bad)
