"""Captioner: encoder -> decoder, trained with cross-entropy, scored on free-running captions.

Checkpoints describe themselves: the vocabulary and every constructor argument are plain
Python values in `hparams`, so `Captioner.load_from_checkpoint(path)` rebuilds the model with
no Hydra config and produces the same captions.
"""

from __future__ import annotations

import logging
import math
import pydoc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from imcap.config import complete
from imcap.data.text import Vocab
from imcap.errors import UserError
from imcap.eval.evaluator import Evaluator, gather_predictions
from imcap.model import ensemble, optim
from imcap.model.attributes import AttributeDetector, attribute_targets, attribute_words
from imcap.model.batch import Batch, DataLink
from imcap.model.checkpoint import (  # noqa: F401
    DEFAULT_DECODER,
    captioner_from,
    load_captioner,
    read_checkpoint,
    upgrade_hparams,
)
from imcap.model.decoders.base import CaptionDecoder
from imcap.model.decoding import Decoded, beam_search, greedy
from imcap.model.encoder import Encoder, Features
from imcap.model.ensemble import EnsembleDecoder, EnsembleFeatures
from imcap.model.scst import BASELINES as SCST_BASELINES  # noqa: F401
from imcap.model.scst import EOS_WORD, SelfCritical, scst_advantages, scst_reward  # noqa: F401

log = logging.getLogger(__name__)
# Also importable from here, as before imcap.model.checkpoint and imcap.model.scst held them:
# load_captioner, read_checkpoint, captioner_from, upgrade_hparams, scst_advantages,
# scst_reward, EOS_WORD, SCST_BASELINES.

# the keys of each section of conf/model/default.yaml (the one home of their values): a
# section must be given whole (imcap.config.model_sections() composes them without a run)
SECTIONS = {
    "loss": ("label_smoothing", "attention_reg", "ss_prob", "ss_ramp_epochs", "attributes"),
    "decoding": ("beam_size", "max_len", "length_penalty", "no_repeat_ngram_size"),
    "scst": ("enabled", "num_samples", "baseline", "temperature", "eos_reward", "dropout"),
}


def build_decoder(spec: dict[str, Any], vocab_size: int, encoder: Encoder) -> CaptionDecoder:
    """Instantiate the decoder class named by `spec["_target_"]` with the rest as arguments."""
    spec = dict(spec)
    target = spec.pop("_target_", DEFAULT_DECODER)
    cls = pydoc.locate(target)
    if not (isinstance(cls, type) and issubclass(cls, CaptionDecoder)):
        raise UserError(f"decoder._target_ '{target}' is not an importable CaptionDecoder subclass")
    width = encoder.grid_dim if cls.uses_grid else encoder.feature_dim
    try:
        return cls(vocab_size=vocab_size, feature_dim=width, **spec)
    except (TypeError, ValueError) as e:  # an unknown or bad decoder.* option
        raise UserError(f"decoder config {spec} for {target}: {e}") from None


class Captioner(L.LightningModule):
    """Encoder -> (attribute detector) -> decoder, with the Lightning hooks of training by
    cross-entropy or self-critical sequence training and of scoring free-running captions."""

    def __init__(
        self,
        vocab: dict,
        encoder: dict,
        decoder: dict,
        optimizer: dict,
        scheduler: dict | None,
        encoder_lr: float,
        loss: dict,
        decoding: dict,
        scst: dict,
        data: dict | None = None,
    ) -> None:
        """Plain dicts (conf/model/default.yaml's sections, whole), saved in the checkpoint.
        `scheduler=None` means a constant learning rate. `data` only records which dataset
        trained the model, so eval.py can default to it."""
        super().__init__()
        hp = {
            "vocab": vocab,
            "encoder": encoder,
            "decoder": decoder,
            "optimizer": dict(optimizer),
            "scheduler": None if scheduler is None else dict(scheduler),
            "encoder_lr": float(encoder_lr),
            **{k: complete(f"model.{k}", v, SECTIONS[k]) for k, v in
               (("loss", loss), ("decoding", decoding), ("scst", scst))},
            "data": data,
        }  # fmt: skip
        self.save_hyperparameters(hp)
        self.vocab = Vocab.from_dict(vocab)
        self.encoder = Encoder(**encoder)
        self.decoder = build_decoder(decoder, len(self.vocab), self.encoder)
        n_attrs = int(decoder.get("attributes") or 0)  # the detector reads the pooled vector
        self.attributes = (
            AttributeDetector(self.encoder.feature_dim, n_attrs) if n_attrs > 0 else None
        )
        self._attr_targets: torch.Tensor | None = None  # (rows, K), built at fit start
        self._attr_mirror: torch.Tensor | None = None  # (K,) column of each word's mirror word
        self._attr_logits: torch.Tensor | None = None  # (B, K) of the last batch, for the loss
        self.loss_cfg, self.decoding, self.scst = hp["loss"], hp["decoding"], hp["scst"]
        check_decoding(self.decoding)
        self.self_critical = SelfCritical(self.scst, self.vocab, self.decoding)
        self.data_link: DataLink | None = None  # handed over by the data module's setup
        self.evaluator = Evaluator()
        self._preds: list[tuple[str, str]] = []
        self.predictions: dict[str, dict[str, str]] = {}  # split -> image_id -> caption
        self.scores: dict[str, dict[str, float]] = {}  # split -> metric -> value

    @property
    def metrics_cfg(self) -> dict[str, Any]:
        """The `metrics` config section the evaluator scores with."""
        return self.evaluator.cfg

    @metrics_cfg.setter
    def metrics_cfg(self, cfg: dict[str, Any]) -> None:
        self.evaluator.configure(cfg)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = "cpu", **overrides: Any
    ) -> Captioner:
        """A checkpoint file or a shipped model name, read as data (`weights_only`), older
        layouts upgraded, packed files completed: Lightning's loader does none of these."""
        return load_captioner(checkpoint_path, map_location=map_location or "cpu", **overrides)

    # -- forward ------------------------------------------------------------------------------
    def connect(self, link: DataLink) -> None:
        """The data module's `setup` hands over what training and scoring need from the data."""
        self.data_link = link

    def _link(self) -> DataLink:
        if self.data_link is None:
            raise RuntimeError(
                "no data connected: build the data with CaptionDataModule.for_model(data, model)"
            )
        return self.data_link

    def join(self, others: Sequence[Captioner], names: Sequence[str] = ()) -> None:
        """Decode as an ensemble with `others` (checkpoints of the same vocabulary and image
        transform): every caption is then written from the mean of all members' word
        distributions (imcap.model.ensemble). This model's decoding settings apply.

        For decoding only (eval.py, caption.py): a joined model is not saved or trained."""
        ensemble.check_members(self, others, names)
        self.partners = torch.nn.ModuleList(o.to(self.device).eval() for o in others)

    def members(self) -> list[Captioner]:
        """The other checkpoints this one decodes with (`join`); empty for a single model."""
        partners = self._modules.get("partners")
        return list(partners) if partners is not None else []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.members():
            raise UserError("an ensemble (Captioner.join) decodes only: save its members apart")

    def encode(self, images: torch.Tensor) -> Features:
        """Transformed images (B, 3, H, W) -> the features `generate` takes (each member's own,
        for an ensemble)."""
        images = images.to(self.device)
        own = self.with_attributes(self.encoder(images, grid=self.decoder.uses_grid))
        if not self.members():
            return own
        parts = [own, *(m.encode(images) for m in self.members())]
        return EnsembleFeatures(own.pooled, parts=parts)

    def features(self, batch: Batch) -> Features:
        """Cached features when the batch has them (two-step), else run the encoder (joint)."""
        if batch.pooled is None:
            return self.encode(batch.images)
        if self.members():
            raise UserError("an ensemble reads raw images: evaluate it with mode=joint")
        if not self.encoder.tune_stages:
            return self.with_attributes(Features(batch.pooled, batch.grid))
        rows = batch.rows
        if batch.flipped is not None:  # an image and its mirror are two distinct inputs
            rows = rows * 2 + batch.flipped.to(rows.device).long()  # (B,)
        return self.with_attributes(self.tuned_features(batch.grid, rows))

    def tuned_features(self, trunk: torch.Tensor, rows: torch.Tensor) -> Features:
        """encoder.tune_stages: run the tuned stages on cached trunk maps (B, h*w, C_t), once per
        distinct image of the batch (captions of one image share its features; `rows` says
        which items show the same input)."""
        uniq, inverse = torch.unique(rows, return_inverse=True)  # (U,), (B,)
        first = torch.zeros_like(uniq).scatter_(
            0, inverse, torch.arange(len(rows), device=rows.device)
        )  # (U,) a batch position of each distinct image
        maps = trunk[first]  # (U, h*w, C_t)
        side = math.isqrt(maps.size(1))
        if side * side != maps.size(1):
            raise RuntimeError(f"cached trunk map of {maps.size(1)} regions is not square")
        fmap = maps.view(len(uniq), side, side, -1).permute(0, 3, 1, 2)  # (U, C_t, h, w)
        feats = self.encoder.head(fmap, grid=self.decoder.uses_grid)
        return Features(
            feats.pooled[inverse],  # (B, C)
            feats.grid[inverse] if feats.grid is not None else None,  # (B, R, C)
        )

    def with_attributes(self, feats: Features) -> Features:
        """Attach the attribute detector's word probabilities (decoder.attributes > 0)."""
        if self.attributes is None or feats.attrs is not None:
            return feats
        self._attr_logits = self.attributes(feats.pooled)  # (B, K), kept for the loss
        feats.attrs = torch.sigmoid(self._attr_logits.float()).detach()  # (B, K)
        return feats

    def generate(
        self,
        feats: Features,
        beam_size: int | None = None,
        return_attn: bool = False,
        length_penalty: float | None = None,
    ) -> Decoded:
        """Free-running decoding with the configured (or given) beam size and length penalty."""
        v, max_len = self.vocab, int(self.decoding["max_len"])
        dec: Any = self.decoder
        if isinstance(feats, EnsembleFeatures):
            decoders = [self.decoder, *(m.decoder for m in self.members())]
            dec = EnsembleDecoder(decoders, v.bos_id)
        elif self.members():
            raise ValueError("an ensemble decodes from Captioner.encode's features (all members')")
        else:
            feats = self.with_attributes(feats)
        k = int(beam_size or self.decoding["beam_size"])
        ngram = int(self.decoding["no_repeat_ngram_size"])
        if k <= 1:
            return greedy(dec, feats, v.bos_id, v.eos_id, max_len, return_attn, ngram)
        lp = self.decoding["length_penalty"] if length_penalty is None else length_penalty
        alpha = float(lp)
        return beam_search(dec, feats, v.bos_id, v.eos_id, max_len, k, alpha, return_attn, ngram)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, beam_size: int | None = None) -> list[str]:
        """Captions for a batch of transformed images (B, 3, H, W)."""
        feats = self.encode(images)
        return [self.vocab.decode(t) for t in self.generate(feats, beam_size).tokens.tolist()]

    @torch.no_grad()
    def caption_files(
        self, paths: Sequence[str | Path], beam_size: int | None = None, batch_size: int = 16
    ) -> list[str]:
        """Captions for image files, read and transformed as the encoder expects."""
        from imcap.data.images import BAD_IMAGE_ERRORS, load_image, make_transform

        transform = make_transform(self.encoder.data_config)
        was_training, captions = self.training, []
        self.eval()
        for i in range(0, len(paths), batch_size):
            images = []
            for p in paths[i : i + batch_size]:
                try:
                    images.append(transform(load_image(p)))
                except BAD_IMAGE_ERRORS as e:
                    raise UserError(f"cannot read image {p}: {e}") from None
            captions += self.caption(torch.stack(images), beam_size)
        self.train(was_training)
        return captions

    # -- training -----------------------------------------------------------------------------
    def ss_prob(self, epoch: int | None = None) -> float:
        """Scheduled-sampling probability, ramped linearly over `ss_ramp_epochs`."""
        p, ramp = float(self.loss_cfg["ss_prob"]), int(self.loss_cfg["ss_ramp_epochs"])
        epoch = self.current_epoch if epoch is None else epoch
        if p <= 0:
            return 0.0
        return p * min(1.0, (epoch + 1) / ramp) if ramp > 0 else p

    def caption_loss(
        self, feats: Features, tokens: torch.Tensor, ss_prob: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy over non-pad target words (+ attention regularisation)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T)
        keep = targets != self.vocab.pad_id  # (B, T): real target words and <eos>
        # On a CPU, project to the vocabulary only where there is a target (~1/3 of the FLOPs
        # sit in padding); on a GPU boolean indexing would sync every step, so mask instead.
        packed = tokens.device.type == "cpu"
        out = self.decoder(feats, inputs, ss_prob=ss_prob, keep=keep if packed else None)
        ce = F.cross_entropy(
            out.logits.reshape(-1, out.logits.size(-1)).float(),  # (N, V) or (B*T, V)
            targets[keep] if packed else targets.reshape(-1),
            ignore_index=self.vocab.pad_id,
            label_smoothing=float(self.loss_cfg["label_smoothing"]),
        )
        losses = {"ce": ce, "loss": ce}
        if out.alphas is not None and self.loss_cfg["attention_reg"] > 0:
            # Doubly stochastic attention (Xu et al. 2015): every region should receive about
            # one unit of attention over the caption, (1 - sum_t alpha_ti)^2, averaged over
            # regions and images (summed over 49 regions it would dwarf the cross-entropy).
            mask = keep.unsqueeze(-1).float()  # (B, T, 1)
            coverage = (out.alphas * mask).sum(1)  # (B, N)
            reg = ((1.0 - coverage) ** 2).mean()
            losses["attention_reg"] = reg
            losses["loss"] = ce + float(self.loss_cfg["attention_reg"]) * reg
        return losses

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if len(batch) == 0:  # every image of the batch was unreadable (bad_images=skip)
            return None
        if self.scst["enabled"]:
            return self.scst_step(batch)
        feats = self.features(batch)
        losses = self.caption_loss(feats, batch.tokens, self.ss_prob())
        if self.attributes is not None and float(self.loss_cfg["attributes"]) > 0:
            targets = self._attr_targets.to(feats.pooled.device)[batch.rows]  # (B, K)
            if batch.flipped is not None:  # a mirrored image's words: right for left
                mirrored = targets[:, self._attr_mirror.to(targets.device)]  # (B, K)
                targets = torch.where(batch.flipped.to(targets.device)[:, None], mirrored, targets)
            bce = F.binary_cross_entropy_with_logits(self._attr_logits.float(), targets)
            losses["attributes"] = bce
            losses["loss"] = losses["loss"] + float(self.loss_cfg["attributes"]) * bce
        self._check_finite(losses["loss"])
        B = len(batch)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=B)
        for extra in ("attention_reg", "attributes"):
            if extra in losses:
                self.log(f"train/{extra}", losses[extra], batch_size=B)
        return losses["loss"]

    def setup_attributes(self, refs: dict[int, list[list[str]]]) -> None:
        """Choose the attribute words (first fit only: a checkpoint keeps its own) and build
        each training image's targets: the words its captions use."""
        det, index = self.attributes, self.vocab.index
        if not det.ready:
            ids = attribute_words(refs, index, det.word_ids.numel())
            det.word_ids.copy_(torch.tensor(ids))
        n_rows = max(refs) + 1 if refs else 0
        self._attr_targets = attribute_targets(refs, det.word_ids.tolist(), index, n_rows)
        # column -> the column of its mirror word (data.hflip), itself when it has none among K
        column = {int(w): j for j, w in enumerate(det.word_ids.tolist())}
        mirror = self.vocab.mirror_ids()
        self._attr_mirror = torch.tensor(
            [column.get(mirror[w] if w >= 0 else w, j) for j, w in enumerate(det.word_ids.tolist())]
        )  # (K,)

    def _check_finite(self, loss: torch.Tensor) -> None:
        """A diverged run is a failure, not a result: stop at the first non-finite loss, before
        the optimizer writes NaN into the weights (and before any checkpoint could hold them)."""
        if not bool(torch.isfinite(loss)):
            step = self.trainer.global_step if self._trainer is not None else 0
            raise UserError(
                f"training diverged: the loss is {float(loss.detach())} at epoch {self.current_epoch}, "
                f"step {step}. Checkpoints saved before this point are kept and no new one is "
                "written. Lower model.optimizer.lr, keep trainer.gradient_clip_val on, or try "
                "trainer.precision=32-true"
            )

    # -- self-critical sequence training (imcap.model.scst) -------------------------------------
    def on_fit_start(self) -> None:
        if self.attributes is not None:
            self.setup_attributes(self._link().train_references())
        if self.scst["enabled"]:
            self.self_critical.prepare(self._link().train_references())

    def scst_step(self, batch: Batch) -> torch.Tensor:
        """With `scst.dropout: false` the captions are sampled and learnt from in eval mode (no
        dropout, BatchNorm statistics fixed): the policy improved is the one decoded at test
        time, not a dropped-out variant of it. Gradients flow either way."""
        eval_policy = not self.scst["dropout"]
        if eval_policy:
            self.eval()
        try:
            loss, logs = self.self_critical.loss(
                self.decoder, self.features(batch), batch.rows, batch.flipped
            )
        finally:
            if eval_policy:
                self.train()
        self._check_finite(loss)
        B = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/reward", logs["reward"], prog_bar=True, batch_size=B)
        self.log("train/baseline", logs["baseline"], batch_size=B)
        return loss

    def on_train_epoch_end(self) -> None:
        """Unreadable images skipped so far. `extraction` is the shared feature cache's count,
        the same on every process (all-reduced as a mean: unchanged); `train` and `eval` are
        counted by each process over its own shard, so they are summed across processes, and
        with more than one process every process logs both (zeros too): the collectives match."""
        if self.data_link is None:
            return
        counts, many = self.data_link.bad_counts, self.trainer.world_size > 1
        if counts.get("extraction"):
            self.log("data/bad_images_extraction", float(counts["extraction"]), sync_dist=many)
        for k in ("train", "eval"):
            if many or counts.get(k):
                v = float(counts.get(k, 0))
                self.log(f"data/bad_images_{k}", v, sync_dist=many, reduce_fx="sum")

    # -- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: Batch) -> None:
        if not batch.image_ids:
            return
        feats = self.features(batch)
        tokens = self.generate(feats).tokens.tolist()
        self._preds += [
            (i, self.vocab.decode(t)) for i, t in zip(batch.image_ids, tokens, strict=True)
        ]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._score("val")
        self._preds = []

    def on_test_epoch_end(self) -> None:
        self._score(self._link().eval_split)
        self._preds = []

    def _score(self, split: str) -> None:
        """Gather every rank's captions, de-duplicate by image id, score once, share the result."""
        gathered = gather_predictions(self.trainer.strategy, self._preds)
        preds = dict(gathered)  # a DistributedSampler pads by repeating images: keep each once
        scores: dict[str, float] | None = None
        if self.trainer.is_global_zero:
            log.info("%s: gathered %d captions for %d images", split, len(gathered), len(preds))
            final = self.trainer.state.fn != "fit"  # validate/test after training, eval.py
            scores = self.evaluator.score(preds, self._link().references(split), split, final)
        scores = self.trainer.strategy.broadcast(scores, src=0)
        self.predictions[split] = preds
        self.scores[split] = scores
        # train.py re-validates the best checkpoint after fitting: its row in metrics.csv carries
        # the last epoch's number, so its metrics are named apart (val_best/CIDEr)
        prefix = f"{split}_best" if self.trainer.state.fn == "validate" else split
        for name, value in scores.items():
            self.log(
                f"{prefix}/{name}", value, prog_bar=name in ("CIDEr", "BLEU-4"), sync_dist=False
            )

    def teardown(self, stage: str) -> None:
        self.evaluator.close()  # stop the METEOR JVM

    # -- optimisation (imcap.model.optim) ------------------------------------------------------
    def configure_optimizers(self):
        heads = [*self.decoder.parameters()]
        if self.attributes is not None:
            heads += [*self.attributes.parameters()]

        def total() -> int:  # Lightning's estimate needs the data: asked only when wanted
            return max(1, int(self.trainer.estimated_stepping_batches))

        return optim.configure(heads, [*self.encoder.parameters()], self.hparams, total)


def check_decoding(d: dict) -> None:
    """Decoding settings a run would otherwise accept and then misbehave on, as one line."""
    for key in ("beam_size", "max_len"):
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"model.decoding.{key} must be a whole number >= 1, got {v!r}")
    n = d["no_repeat_ngram_size"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise UserError(f"model.decoding.no_repeat_ngram_size must be 0 (off) or >= 1, got {n!r}")
    if not isinstance(d["length_penalty"], int | float) or d["length_penalty"] < 0:
        raise UserError(f"model.decoding.length_penalty must be >= 0, got {d['length_penalty']!r}")
