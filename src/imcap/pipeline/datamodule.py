"""One LightningDataModule for every dataset, in two modes.

- joint:    batches carry images; the encoder runs every step (needed to fine-tune the CNN).
- two_step: the frozen encoder runs once over every image (`imcap.pipeline.features`), and training
            batches are gathered from the cached features held on the training device: the
            DataLoader yields only index tensors, so the hot loop does no per-item Python work.

Build it with `CaptionDataModule.for_model(data_cfg, model, mode)`: the model fixes the
vocabulary, the encoder (transform or cached features) and whether a grid is needed; in
`setup` the module hands the model what it needs from the data (`Captioner.connect`). A new
model's vocabulary comes from the data first: `from_config(data_cfg)`, `build_vocab()`, then
`attach(model, mode)` on the same instance, so the annotations are parsed once per run.
Every batch is an `imcap.model.batch.Batch`: training batches are (image, caption) pairs
padded to the longest caption; val/test batches hold each image once, and the references
come from `references(split)`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import pydoc
import random
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from imcap.data.datasets import training_refusal
from imcap.data.images import (
    ImageBytes,
    ImageFiles,
    check_policy,
    collate_images,
    decode_batch,
    load_image,
    make_transform,
)
from imcap.data.records import SPLITS, ImageRecord
from imcap.data.text import Vocab, tokenize
from imcap.errors import UserError
from imcap.model.batch import Batch, DataLink
from imcap.model.encoder import Encoder
from imcap.pipeline.features import CachedFeatures, ensure_features, process_group

log = logging.getLogger(__name__)

MODES = ("two_step", "joint")
# data.* keys read by others: the encoder's input size (an interpolation) and prepare.py's archives
NOT_FOR_DATAMODULE = ("img_size", "download")
VOCAB_KEYS = ("min_count", "max_len")
# What limits one run rather than describing the data: a checkpoint does not record these, and
# absent means no limit (eval.py scores a checkpoint's whole split) and no feature cache (where
# this machine keeps one is never a checkpoint's to choose). The only data.* values written in
# Python; every other one comes from the composed config or the checkpoint's record.
PER_RUN: dict[str, Any] = {"max_train_images": None, "max_eval_images": None, "cache_dir": None}
# How this machine loads the data, not what the data is: not recorded either (eval.py of a
# checkpoint from a 64-core GPU box on a laptop uses the laptop's settings, and a checkpoint
# cannot ask for 100,000 workers).
MACHINE = ("num_workers", "batch_size", "eval_batch_size", "pin_memory", "gpu_decode")
# How training augments the data: not recorded either (scoring a checkpoint never augments, and
# an SCST stage started from it chooses its own), and off when absent (older configs).
AUGMENT: dict[str, Any] = {"hflip": 0.0}


def data_options(data: Mapping[str, Any], changes: Mapping[str, Any] | None = None) -> dict:
    """The data module's options: data.* (the composed config, where conf/data/_base.yaml gives
    every key, or what a checkpoint recorded) with single keys changed. An unknown key (a typo
    such as data.bach_size), a bad value or a missing key is a one-line error naming it."""
    given = {k: v for k, v in {**data, **(changes or {})}.items() if k not in NOT_FOR_DATAMODULE}
    keys = tuple(inspect.signature(CaptionDataModule.__init__).parameters)[1:]  # after self
    _known("data", given, keys)
    vocab = given.get("vocab")
    if isinstance(vocab, Mapping):
        _known("data.vocab", vocab, VOCAB_KEYS)
    for key in ("name", "root"):
        if given.get(key) in (None, "???"):
            raise UserError(f"data.{key} is not set: choose a dataset, e.g. data=flickr8k")
    positive = {k: given[k] for k in ("batch_size", "eval_batch_size") if k in given}
    if isinstance(vocab, Mapping):
        positive |= {f"vocab.{k}": vocab[k] for k in ("max_len", "min_count") if k in vocab}
    for key in ("max_train_images", "max_eval_images", "captions_per_image"):
        if given.get(key) is not None:
            positive[key] = given[key]
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"data.{key} must be a whole number >= 1, got {value!r}")
    workers = given.get("num_workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise UserError(f"data.num_workers must be a whole number >= 0, got {workers!r}")
    hflip = given.get("hflip", 0.0)
    if isinstance(hflip, bool) or not isinstance(hflip, int | float) or not 0 <= hflip <= 1:
        raise UserError(
            f"data.hflip must be a probability in [0, 1] (0: no mirrored images), got {hflip!r}"
        )
    missing = [
        f"data.{k}" for k in keys if k not in given and k not in PER_RUN and k not in AUGMENT
    ]
    if isinstance(vocab, Mapping):
        missing += [f"data.vocab.{k}" for k in VOCAB_KEYS if k not in vocab]
    if missing:
        name = given["name"]
        raise UserError(
            f"data lacks {', '.join(missing)}: give the whole data section (conf/data/{name}.yaml "
            f"as Hydra composes it); a checkpoint written before imcap recorded its data options "
            f"is scored with data={name} data.root=<the dataset folder>"
        )
    return {**PER_RUN, **AUGMENT, **given}


def recorded_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of its data.*, so eval.py rebuilds the data without a config:
    every data module option but the PER_RUN, MACHINE and AUGMENT ones."""
    opts = data_options(data)
    return {k: v for k, v in opts.items() if k not in (*PER_RUN, *MACHINE, *AUGMENT)}


def _known(where: str, given: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise UserError(
            f"unknown config key {', '.join(f'{where}.{k}' for k in unknown)}; valid keys under "
            f"{where}: {', '.join(keys)}"
        )


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving Python's, NumPy's or torch's (CPU and CUDA) random state."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


@contextlib.contextmanager
def cache_write_errors(cache_dir: str) -> Iterator[None]:
    """A feature cache that cannot be written (read-only, disk full) is one line, not a trace."""
    try:
        yield
    except OSError as e:
        raise UserError(
            f"cannot write the feature cache under {cache_dir}: {e.strerror or e}; set "
            "paths.cache_dir=<a writable folder with space> (or IMCAP_CACHE_DIR)"
        ) from None


def encode_caption(vocab: Vocab, caption: str) -> list[int]:
    """<bos> w1 .. wn <eos> ids of a raw caption."""
    return [vocab.bos_id, *vocab.encode(tokenize(caption)), vocab.eos_id]


def pad_tokens(seqs: list[list[int]], pad: int = 0, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s[:length])
    return out


class IndexBatches(Dataset):
    """Indices only: `__getitems__` turns a sampled batch of indices into one tensor, under
    `key` ("captions": training pairs, "rows": images to caption)."""

    def __init__(self, n: int, key: str) -> None:
        self.n, self.key = n, key

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return {self.key: torch.tensor(idx, dtype=torch.long)}


class CaptionsPerImage(Sampler[int]):
    """Each epoch, `k` random captions of every image (without replacement), shuffled; with
    `grouped`, the images are shuffled and each one's captions come out side by side.

    An "epoch" then means one pass over the images, not over all ~5x as many captions: the
    usual choice on a CPU, and every caption is still seen across epochs.
    """

    def __init__(self, rows: torch.Tensor, k: int, seed: int = 0, grouped: bool = False) -> None:
        self.k, self.grouped = k, grouped
        order = torch.argsort(rows, stable=True)  # caption indices grouped by image
        _, counts = torch.unique_consecutive(rows[order], return_counts=True)
        self.groups = torch.split(order, counts.tolist())
        self.generator = torch.Generator().manual_seed(seed)
        self.n = sum(min(k, len(g)) for g in self.groups)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = self.generator
        picks = [grp[torch.randperm(len(grp), generator=g)[: self.k]] for grp in self.groups]
        if self.grouped:
            order = torch.randperm(len(picks), generator=g).tolist()
            return iter(torch.cat([picks[i] for i in order]).tolist())
        chosen = torch.cat(picks)
        return iter(chosen[torch.randperm(len(chosen), generator=g)].tolist())


def _identity(batch: Any) -> Any:
    return batch


class PairImages(Dataset):
    """Joint training: one item per (image, caption) pair -> (image, token ids, image row).

    The image is a transformed (3, H, W) tensor, or the file's raw bytes with `gpu_decode`."""

    def __init__(self, files: ImageFiles, pairs: np.ndarray, tokens: list[list[int]]) -> None:
        self.files, self.pairs, self.tokens = files, pairs, tokens  # pairs: (P, 2) [row, caption]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        row, cap = self.pairs[i]
        _, image = self.files[int(row)]
        return image, self.tokens[int(cap)], int(row)


def collate_pairs(items: list) -> dict[str, Any]:
    """Pairs -> a training batch; unreadable images are dropped and counted in `bad`.

    Raw JPEG bytes (gpu_decode) differ in length per file, so they stay a list for
    `decode_batch`; decoded images are stacked."""
    good = [it for it in items if it[0] is not None]
    if not good:
        return {
            "images": torch.empty(0),
            "tokens": torch.empty(0, 0, dtype=torch.long),
            "rows": torch.empty(0, dtype=torch.long),
            "bad": len(items),
        }
    images = [x for x, _, _ in good]
    raw = images[0].dtype == torch.uint8 and images[0].ndim == 1
    return {
        "images": images if raw else torch.stack(images),  # list of (nbytes,) | (B, 3, H, W)
        "tokens": pad_tokens([t for _, t, _ in good]),  # (B, T+2)
        "rows": torch.tensor([r for _, _, r in good]),  # (B,)
        "bad": len(items) - len(good),
    }


class CaptionDataModule(L.LightningDataModule):
    """Records -> vocabulary -> (cached features | images) -> batches."""

    # False: only scores a trained model (eval.py), so a dataset without a training split
    # (nocaps, a folder of images) is fine; training needs one, and says so naming the fix
    needs_train: bool = True

    def __init__(
        self,
        *,
        name: str,
        root: str,
        loader: str,
        source: dict,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        pin_memory: bool | None,
        vocab: dict,
        bad_images: str,
        cache_dir: str | None,
        max_train_images: int | None,
        max_eval_images: int | None,
        split: str,
        blind: bool,
        captions_per_image: int | None,
        group_by_image: bool,
        seed: int,
        gpu_decode: bool,
        extract_precision: str,
        hflip: float,
    ) -> None:
        """Every option is required: `data_options` checks them (the values are the composed
        config's, conf/data/_base.yaml and the dataset's yaml, or a checkpoint's record)."""
        super().__init__()
        self.name, self.root = name, str(root)
        self.loader, self.source = loader, dict(source or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.vocab_cfg = dict(vocab)
        self.bad_images = check_policy(bad_images)
        self.cache_dir = cache_dir
        self.max_train_images, self.max_eval_images = max_train_images, max_eval_images
        self.split = split
        self.blind = blind  # ablation: every image becomes the same blank input
        self.captions_per_image, self.seed = captions_per_image, seed
        self.group_by_image = bool(group_by_image)
        self.gpu_decode = gpu_decode  # joint mode: JPEG bytes to the GPU, decoded there (nvJPEG)
        self.extract_precision = extract_precision
        # probability that a training image is seen mirrored left-right (its captions' left and
        # right swapped): augmentation; two-step mode caches the mirrored train images once
        self.hflip = float(hflip)
        self._flip_rng = torch.Generator()  # seeded in setup: apart from the sampler's, per rank
        self.records: dict[str, list[ImageRecord]] | None = None
        self.vocab: Vocab | None = None
        self.encoder: Encoder | None = None
        self.mode = "joint"
        self.grid = False
        self.model: Any = None  # the Captioner this data feeds (for_model): gets a DataLink
        self.cache: CachedFeatures | None = None
        self.flip_cache: CachedFeatures | None = None  # the train images mirrored (data.hflip)
        self.bad_counts: dict[str, int] = defaultdict(int)

    # -- the seam with the model ---------------------------------------------------------------
    @classmethod
    def from_config(cls, data: Mapping[str, Any], **changes: Any) -> CaptionDataModule:
        """The data module of a data.* config (see `data_options`), not yet tied to a model:
        a new model takes its vocabulary from it (`build_vocab`), then `attach`es to it."""
        return cls(**data_options(data, changes))

    @classmethod
    def for_model(
        cls, data: Mapping[str, Any], model: Any, mode: str = "two_step", **changes: Any
    ) -> CaptionDataModule:
        """The data module for `model` (see `attach`). `data` is the data.* config, or what a
        checkpoint recorded (see `data_options`); `changes` override single keys (e.g.
        split="val")."""
        return cls.from_config(data, **changes).attach(model, mode)

    def attach(self, model: Any, mode: str = "two_step") -> CaptionDataModule:
        """Serve `model`: its vocabulary, its encoder's transform or cached features (mode), a
        grid when its decoder attends."""
        self.vocab = model.vocab
        # a grid when the decoder attends, or the trunk's map for the tuned stages to take
        grid = model.decoder.uses_grid or model.encoder.tune_stages > 0
        self._attach(model.encoder, mode, grid=grid)
        self.model = model
        return self

    @classmethod
    def records_of(cls, data: Mapping[str, Any]) -> dict[str, list[ImageRecord]]:
        """A dataset's records by split (sizes, listings), without a model."""
        return cls.from_config(data).load_records()

    def link(self) -> DataLink:
        """What the model needs from this data (handed over in `setup`)."""
        records = {r.image_id: r for r in self._all_records()}
        return DataLink(
            mode=self.mode,
            eval_split=self.split,
            train_references=self.train_references_tokens,
            references=self.references,
            image_path=lambda image_id: Path(records[image_id].path),
            eval_batch=self.eval_batch,
            bad_counts=self.bad_counts,
        )

    # -- records and vocabulary ---------------------------------------------------------------
    def load_records(self) -> dict[str, list[ImageRecord]]:
        """All splits' records, read once and kept: the vocabulary, the feature cache and every
        loader of a run share them."""
        if self.records is None:
            fn = pydoc.locate(self.loader)
            if not callable(fn):
                raise UserError(f"data.loader '{self.loader}' is not an importable function")
            kwargs = dict(self.source)
            takes = inspect.signature(fn).parameters
            if "name" in takes:
                kwargs["name"] = self.name
            if "bad_images" in takes:  # a missing image file: skipped, or an error
                kwargs["bad_images"] = self.bad_images
            records = fn(root=self.root, **kwargs)
            by_split: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
            for r in records:
                by_split.setdefault(r.split, []).append(r)
            if self.max_train_images:
                by_split["train"] = by_split["train"][: self.max_train_images]
            if self.max_eval_images:
                for s in ("val", "test"):
                    by_split[s] = by_split[s][: self.max_eval_images]
            if not by_split["train"] and self.needs_train:
                raise UserError(training_refusal(self.name, self.root, self.source))
            self.records = by_split
            sizes = ", ".join(f"{s} {len(v)}" for s, v in by_split.items())
            log.info("dataset %s (%s): %s images", self.name, self.root, sizes)
        return self.records

    def has_split(self, split: str) -> bool:
        return bool(self.load_records().get(split))

    def require_split(self, split: str) -> list[ImageRecord]:
        recs = self.load_records().get(split)
        if not recs:
            present = [s for s, v in self.load_records().items() if v]
            raise UserError(
                f"dataset '{self.name}' at {self.root} has no '{split}' split (it has {present}). "
                f"Score another split, e.g. data.split={'val' if 'val' in present else present[0]}"
            )
        return recs

    def build_vocab(self, vocab: Vocab | None = None) -> Vocab:
        """Vocabulary from the train split, or the given one (e.g. a checkpoint's)."""
        if vocab is None:
            caps = (tokenize(c) for r in self.load_records()["train"] for c in r.captions)
            vocab = Vocab.build(caps, **self.vocab_cfg)
        self.vocab = vocab
        return vocab

    def references(self, split: str) -> dict[str, list[str]]:
        return {r.image_id: list(r.captions) for r in self.require_split(split)}

    def train_references_tokens(self) -> dict[int, list[list[str]]]:
        """Tokenized training references keyed by image row (the SCST reward's corpus)."""
        return {
            self.row_of[r.image_id]: [tokenize(c) for c in r.captions]
            for r in self.load_records()["train"]
            if self.row_of[r.image_id] in self.train_row_set
        }

    # -- encoder hookup -----------------------------------------------------------------------
    def _attach(self, encoder: Encoder, mode: str = "two_step", grid: bool = False) -> None:
        """Use this encoder's transform (joint) or cached features (two_step)."""
        if mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {mode!r}")
        self.encoder, self.mode, self.grid = encoder, mode, grid

    def _splits_in_use(self) -> list[str]:
        return [s for s in SPLITS if self.load_records().get(s)]

    def _all_records(self) -> list[ImageRecord]:
        return [r for s in self._splits_in_use() for r in self.load_records()[s]]

    def prepare_data(self) -> None:
        """Two-step: extract features once. Under DDP Lightning calls this on one process per
        node, where no collective can run, so the extraction waits for `setup`: there every
        process encodes its share of the images (`_ensure_cache`)."""
        if self.mode == "two_step" and process_group() is None:
            self._ensure_cache()

    def _ensure_cache(self) -> CachedFeatures:
        if self.cache is None:
            if self.encoder is None:
                raise RuntimeError(
                    "build the data module with CaptionDataModule.for_model(data, model)"
                )
            if self.cache_dir is None:  # a checkpoint's record: the cache folder is ours to say
                raise UserError(
                    f"mode=two_step needs a feature cache folder and data.cache_dir is not set "
                    f"(a checkpoint does not record it); fix: pass data={self.name} "
                    "data.root=<the dataset folder>, or use mode=joint"
                )
            paths = [r.path for r in self._all_records()]
            # Extraction draws random numbers (a DataLoader seeds its workers from torch's
            # generator) only when the cache is cold: keep them out of the run's streams, so
            # a seed gives the same run with a cold or a warm cache.
            self.cache = self._features(paths)
            if self.cache.bad and self.bad_images == "error":  # also when the cache is warm
                paths = [str(self._all_records()[i].path) for i in sorted(self.cache.bad)[:3]]
                raise UserError(
                    f"{len(self.cache.bad)} image(s) could not be read when the feature cache "
                    f"{self.cache.directory} was built (e.g. {', '.join(paths)}); fix or remove "
                    "them and delete that cache folder, or set data.bad_images=skip"
                )
            if self.cache.bad:
                self.bad_counts["extraction"] = len(self.cache.bad)
        train = self.load_records()["train"]
        if (
            self.hflip > 0
            and self.needs_train
            and not self.blind
            and self.flip_cache is None
            and train
        ):
            # The train images mirrored, once (the val/test ones are never flipped): row i is
            # train record i, which is row i of the whole table too (train comes first).
            self.flip_cache = self._features([r.path for r in train], hflip=True)
        return self.cache

    def _features(self, paths: list[Path], hflip: bool = False) -> CachedFeatures:
        """The feature cache of these images (extracted when cold), random state untouched."""
        with preserved_rng(), cache_write_errors(self.cache_dir):
            return ensure_features(
                self.encoder,
                paths,
                self.cache_dir,
                self.name,
                grid=self.grid,
                batch_size=self.eval_batch_size,
                num_workers=self.num_workers,
                bad_images=self.bad_images,
                precision=self.extract_precision,
                group=process_group(),  # DDP: every process extracts a shard (from setup)
                hflip=hflip,
            )

    # -- datasets -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.vocab is None or self.encoder is None:
            raise RuntimeError(
                "build the data module with CaptionDataModule.for_model(data, model)"
            )
        records = self._all_records()
        self.image_ids = [r.image_id for r in records]  # row -> id, read by every batch
        self.row_of = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.bank: dict[str, torch.Tensor] = {}  # cached features: pooled (N, C), grid (N, R, C')
        bad: set[int] = set()
        if self.mode == "two_step":
            cache = self._ensure_cache()
            bad = cache.bad
            # Both arrays stay memory-mapped float16 on the host: a batch gathers its rows (the
            # OS pages them in and may drop them again), so a cache larger than RAM trains
            # without being loaded; float32 only per batch. See `_gather`.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only memmap: we never write
                self.bank["pooled"] = torch.from_numpy(cache.pooled)
                if self.grid:
                    self.bank["grid"] = torch.from_numpy(cache.grid)
                if self.flip_cache is not None:  # data.hflip: rows 0..n_train-1, mirrored
                    self.bank["pooled_flip"] = torch.from_numpy(self.flip_cache.pooled)
                    if self.grid:
                        self.bank["grid_flip"] = torch.from_numpy(self.flip_cache.grid)
                    bad |= self.flip_cache.bad
        # Training captions, pre-encoded once: (P, L) ids, their lengths and image rows.
        tokens, rows = [], []
        for r in self.load_records()["train"]:
            row = self.row_of[r.image_id]
            if row in bad:
                continue
            for c in r.captions:
                tokens.append(encode_caption(self.vocab, c))
                rows.append(row)
        if not tokens and self.needs_train:
            raise UserError(f"dataset '{self.name}' at {self.root}: no usable training captions")
        self.train_tokens = pad_tokens(tokens, self.vocab.pad_id, self.vocab.max_len + 2)  # (P, L)
        self.train_lengths = torch.tensor([len(t) for t in tokens])  # (P,)
        self.train_rows = torch.tensor(rows)  # (P,)
        self.train_row_set = set(rows)
        n_train = len(self.load_records()["train"])
        if self.flip_cache is not None and rows and max(rows) >= n_train:  # ids shared by splits
            shared = sorted({self.image_ids[r] for r in rows if r >= n_train})
            raise UserError(
                f"data.hflip: {len(shared)} training image id(s) also belong to another split "
                f"(e.g. {', '.join(shared[:3])}), so the mirrored cache cannot be matched to them; "
                "fix the split lists, or set data.hflip=0"
            )
        self._mirror = torch.tensor(self.vocab.mirror_ids())  # (V,) id -> its mirror's id
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._flip_rng.manual_seed(self.seed + 1 + rank)  # each process its own draws
        self._token_lists = tokens
        self.eval_rows = {
            s: [
                self.row_of[r.image_id]
                for r in self.load_records()[s]
                if self.row_of[r.image_id] not in bad
            ]
            for s in self._splits_in_use()
        }
        self._device_bank: dict[str, torch.Tensor] = {}
        if self.model is not None:
            self.model.connect(self.link())

    def _files(self, records: list[ImageRecord], raw: bool = False) -> ImageFiles:
        cls = ImageBytes if raw else ImageFiles  # raw: JPEG bytes for on-device decoding
        return cls(
            [r.path for r in records], make_transform(self.encoder.data_config), self.bad_images
        )

    def _pin(self) -> bool:
        return torch.cuda.is_available() if self.pin_memory is None else bool(self.pin_memory)

    def _train_sampler(self) -> dict[str, Any]:
        if self.captions_per_image or self.group_by_image:
            k = int(self.captions_per_image or len(self.train_rows))
            return {"sampler": CaptionsPerImage(self.train_rows, k, self.seed, self.group_by_image)}
        return {"shuffle": True}

    def train_dataloader(self) -> DataLoader:
        if self.mode == "two_step":
            return DataLoader(
                IndexBatches(len(self.train_rows), "captions"),
                batch_size=self.batch_size,
                collate_fn=_identity,
                drop_last=False,
                **self._train_sampler(),
            )
        records = self._all_records()
        pairs = np.stack([self.train_rows.numpy(), np.arange(len(self.train_rows))], 1)
        return DataLoader(
            PairImages(self._files(records, raw=self.gpu_decode), pairs, self._token_lists),
            batch_size=self.batch_size,
            **self._train_sampler(),
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            pin_memory=self._pin(),
            persistent_workers=self.num_workers > 0,
        )

    def _eval_dataloader(self, split: str) -> DataLoader:
        rows = self.eval_rows.get(split) or []
        if not rows:
            self.require_split(split)
        if self.mode == "two_step":
            ds: Dataset = _Subset(IndexBatches(len(self.row_of), "rows"), rows)
            return DataLoader(
                ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=_identity
            )
        records = self._all_records()
        ds = _Subset(self._files(records), rows)
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            pin_memory=self._pin(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader(self.split)  # "test" in training; eval.py may pick another

    def eval_dataloader(self, split: str) -> DataLoader:
        return self._eval_dataloader(split)

    # -- batch assembly: loader output -> Batch --------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        """Loader output -> a `Batch` (still on the CPU; features are gathered after transfer)."""
        if "captions" in batch:  # two-step training: caption indices
            idx = batch["captions"]  # (B,)
            T = int(self.train_lengths[idx].max())  # trim padding to this batch's longest
            rows = self.train_rows[idx]  # (B,)
            tokens = self.train_tokens[idx, :T]  # (B, T+2)
            return self._mirrored(Batch(rows=rows, image_ids=self._ids(rows), tokens=tokens))
        if "tokens" in batch:  # joint training: (image, caption) pairs
            if isinstance(batch["images"], list):  # gpu_decode: decode straight onto the device
                batch = self._decode(batch)
            self.bad_counts["train"] += int(batch["bad"])
            out = Batch(
                rows=batch["rows"],
                image_ids=self._ids(batch["rows"]),
                tokens=batch["tokens"],
                images=batch["images"],
            )
        elif "index" not in batch:  # two-step evaluation: image rows
            return Batch(rows=batch["rows"], image_ids=self._ids(batch["rows"]))
        else:  # joint evaluation: `index` are rows of the image table
            if batch["bad"].numel():
                self.bad_counts["eval"] += int(batch["bad"].numel())
            rows = batch["index"]
            out = Batch(rows=rows, image_ids=self._ids(rows), images=batch["images"])
        if self.blind and out.images is not None:
            out.images = torch.zeros_like(out.images)
        return self._mirrored(out) if out.tokens is not None else out

    def _mirrored(self, batch: Batch) -> Batch:
        """data.hflip: choose the training images seen mirrored in this batch (one draw per
        image, so its captions side by side share it) and swap left/right in their captions;
        their features (or pixels) are swapped in after the transfer."""
        if self.hflip <= 0 or len(batch) == 0:
            return batch
        uniq, inverse = torch.unique(batch.rows, return_inverse=True)  # (U,), (B,)
        flipped = (torch.rand(len(uniq), generator=self._flip_rng) < self.hflip)[inverse]  # (B,)
        tokens = torch.where(flipped[:, None], self._mirror[batch.tokens], batch.tokens)
        return batch.with_(tokens=tokens, flipped=flipped)

    def _decode(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )
        images, failed = decode_batch(batch["images"], device, self.encoder.data_config)
        if failed:  # undecodable bytes: drop those pairs like any other bad image
            keep = [k for k in range(len(batch["images"])) if k not in set(failed)]
            batch = {
                **batch,
                "tokens": batch["tokens"][keep],
                "rows": batch["rows"][keep],
                "bad": batch["bad"] + len(failed),
            }
        return {**batch, "images": images}

    def _ids(self, rows: torch.Tensor) -> list[str]:
        return [self.image_ids[i] for i in rows.tolist()]

    def _gather(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """The bank rows of a batch, float32 on the rows' device. On an accelerator the whole
        bank is copied there once when it fits (`bank_fits`); otherwise each batch's rows are
        gathered on the host and only they move."""
        device = rows.device
        if device.type == "cpu":
            return self.bank[key][rows].float()
        if key not in self._device_bank:
            host = self.bank[key]
            nbytes = host.numel() * host.element_size()
            # a bank and its mirrored twin (data.hflip) share the device's budget
            twin = key.removesuffix("_flip") if key.endswith("_flip") else f"{key}_flip"
            if twin in self.bank and twin not in self._device_bank:
                nbytes += self.bank[twin].numel() * self.bank[twin].element_size()
            fits = bank_fits(nbytes, device)
            self._device_bank[key] = host.to(device) if fits else None
            if not fits:
                log.info(
                    "feature %s (%.1f GiB) does not fit beside training on %s: gathering each "
                    "batch on the host",
                    key,
                    host.numel() * host.element_size() / 2**30,
                    device,
                )
        bank = self._device_bank[key]
        if bank is None:
            picked = self.bank[key][rows.cpu()]
            if device.type == "cuda":  # pinned: the copy overlaps; other accelerators copy plainly
                return picked.pin_memory().to(device, non_blocking=True).float()
            return picked.to(device).float()
        return bank[rows].float()

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Two-step: gather the cached features of the batch's images on the device."""
        if self.mode != "two_step" or batch.images is not None:
            if batch.flipped is not None and batch.images is not None:  # joint: mirror pixels
                f = batch.flipped.to(batch.images.device)[:, None, None, None]  # (B, 1, 1, 1)
                batch = batch.with_(images=torch.where(f, batch.images.flip(-1), batch.images))
            return batch
        rows = batch.rows
        pooled = self._gather("pooled", rows)  # (B, C)
        grid = self._gather("grid", rows) if self.grid else None  # (B, R, C')
        if batch.flipped is not None:  # (no .any(): a host sync per step)
            f = batch.flipped.to(rows.device)  # (B,) bool
            pooled[f] = self._gather("pooled_flip", rows[f])
            if grid is not None:
                grid[f] = self._gather("grid_flip", rows[f])
        if self.blind:
            pooled = torch.zeros_like(pooled)
            grid = torch.zeros_like(grid) if grid is not None else None
        return batch.with_(pooled=pooled, grid=grid)

    def eval_batch(self, image_ids: list[str], device: torch.device) -> Batch:
        """A batch (as the model sees it) for chosen images, e.g. the fixed attention-map set."""
        rows = torch.tensor([self.row_of[i] for i in image_ids])
        batch = Batch(rows=rows.to(device), image_ids=list(image_ids))
        if self.mode == "two_step":
            return self.on_after_batch_transfer(batch, 0)
        records = self._all_records()
        images = torch.stack([self.load_image(records[r].path) for r in rows.tolist()])
        return batch.with_(images=images.to(device))

    def load_image(self, path: str | Path) -> torch.Tensor:
        return make_transform(self.encoder.data_config)(load_image(path))


DEVICE_BANK_SHARE = 0.5  # of the accelerator's free memory: the rest is for training itself


def bank_fits(nbytes: int, device: torch.device, free: int | None = None) -> bool:
    """Whether a feature bank of `nbytes` should live on `device` (copied once) rather than
    be gathered on the host per batch: when it takes at most half the free device memory."""
    if free is None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return nbytes <= DEVICE_BANK_SHARE * free


class _Subset(Dataset):
    """Rows of a dataset (keeps `__getitems__`, unlike torch's Subset for our index tensors)."""

    def __init__(self, ds: Dataset, rows: list[int]) -> None:
        self.ds, self.rows = ds, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.ds[self.rows[i]]

    def __getitems__(self, idx: list[int]):
        if hasattr(self.ds, "__getitems__"):
            return self.ds.__getitems__([self.rows[i] for i in idx])
        return [self.ds[self.rows[i]] for i in idx]
