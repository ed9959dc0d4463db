"""Captioner: encoder -> decoder, trained with cross-entropy, scored on free-running captions.

Checkpoints describe themselves: the vocabulary and every constructor argument are plain
Python values in `hparams`, so `Captioner.load_from_checkpoint(path)` rebuilds the model with
no Hydra config and produces the same captions.
"""

from __future__ import annotations

import inspect
import logging
import math
import pickle
import pydoc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from imcap.config import checked, conf_defaults
from imcap.data.text import Vocab
from imcap.errors import UserError
from imcap.model.attributes import AttributeDetector, attribute_targets, attribute_words
from imcap.model.batch import Batch, DataLink
from imcap.model.decoder import CaptionDecoder
from imcap.model.decoding import Decoded, beam_search, greedy, sample
from imcap.model.encoder import Encoder, Features
from imcap.model.ensemble import EnsembleDecoder, EnsembleFeatures

log = logging.getLogger(__name__)

FROM_CONF: Any = "conf/model/default.yaml"  # an argument not given: the config's default
EOS_WORD = "<eos>"  # the end of a caption as a word of the CIDEr-D reward (scst.eos_reward)
SCST_BASELINES = ("greedy", "mean")


def build_decoder(spec: dict[str, Any], vocab_size: int, encoder: Encoder) -> CaptionDecoder:
    """Instantiate the decoder class named by `spec["_target_"]` with the rest as arguments."""
    spec = dict(spec)
    target = spec.pop("_target_", "imcap.model.decoder.ShowTellDecoder")
    cls = pydoc.locate(target)
    if not (isinstance(cls, type) and issubclass(cls, CaptionDecoder)):
        raise UserError(f"decoder._target_ '{target}' is not an importable CaptionDecoder subclass")
    width = encoder.grid_dim if cls.uses_grid else encoder.feature_dim
    try:
        return cls(vocab_size=vocab_size, feature_dim=width, **spec)
    except (TypeError, ValueError) as e:  # an unknown or bad decoder.* option
        raise UserError(f"decoder config {spec} for {target}: {e}") from None


class Captioner(L.LightningModule):
    def __init__(
        self,
        vocab: dict,
        encoder: dict,
        decoder: dict,
        optimizer: dict | None = None,
        scheduler: dict | None = FROM_CONF,
        encoder_lr: float | None = None,
        loss: dict | None = None,
        decoding: dict | None = None,
        scst: dict | None = None,
        data: dict | None = None,
    ) -> None:
        """Plain dicts, saved in the checkpoint with every default filled in from
        conf/model/default.yaml (a section given in part keeps the rest of the defaults; an
        unknown key is an error). `scheduler=None` means a constant learning rate. `data` only
        records which dataset trained the model, so eval.py can default to it."""
        super().__init__()
        conf = conf_defaults("model/default")
        hp = {
            "vocab": vocab,
            "encoder": encoder,
            "decoder": decoder,
            "optimizer": _partial_spec(optimizer, conf["optimizer"]),
            "scheduler": None
            if scheduler is None
            else _partial_spec(None if scheduler is FROM_CONF else scheduler, conf["scheduler"]),
            "encoder_lr": float(conf["encoder_lr"] if encoder_lr is None else encoder_lr),
            "loss": checked("model.loss", loss, conf["loss"]),
            "decoding": checked("model.decoding", decoding, conf["decoding"]),
            "scst": checked("model.scst", scst, conf["scst"]),
            "data": data,
        }
        self.save_hyperparameters(hp)
        self.vocab = Vocab.from_dict(vocab)
        self.encoder = Encoder(**encoder)
        self.decoder = build_decoder(decoder, len(self.vocab), self.encoder)
        n_attrs = int(decoder.get("attributes") or 0)
        self.attributes = (
            AttributeDetector(self.encoder.feature_dim, n_attrs) if n_attrs > 0 else None
        )
        self._attr_targets: torch.Tensor | None = None  # (rows, K), built at fit start
        self._attr_logits: torch.Tensor | None = None  # (B, K) of the last batch, for the loss
        self.loss_cfg, self.decoding, self.scst = hp["loss"], hp["decoding"], hp["scst"]
        check_decoding(self.decoding)
        if self.scst["baseline"] not in SCST_BASELINES:
            raise UserError(
                f"model.scst.baseline must be one of {SCST_BASELINES}, got {self.scst['baseline']!r}"
            )
        self.data_link: DataLink | None = None  # handed over by the data module's setup
        self._cider = None  # in-process CIDEr-D reward (SCST), built from the training references
        self.metrics_cfg: dict[str, Any] = {
            "java": True,
            "meteor": True,
            "meteor_every_epoch": False,
        }
        self._preds: list[tuple[str, str]] = []
        self.predictions: dict[str, dict[str, str]] = {}  # split -> image_id -> caption
        self.scores: dict[str, dict[str, float]] = {}  # split -> metric -> value
        self._scorer = None

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
        from imcap.data.images import TRANSFORM_KEYS

        names = list(names) or [f"member {i + 1}" for i in range(len(others) + 1)]
        for other, name in zip(others, names[1:], strict=True):
            if list(other.vocab.tokens) != list(self.vocab.tokens):
                raise UserError(
                    f"{name}: its vocabulary ({len(other.vocab)} words) differs from that of "
                    f"{names[0]} ({len(self.vocab)} words); an ensemble picks words from one "
                    "list, so its members must be trained on the same captions with the same "
                    "data.vocab settings"
                )
            differ = {
                k: (self.encoder.data_config.get(k), other.encoder.data_config.get(k))
                for k in TRANSFORM_KEYS
                if self.encoder.data_config.get(k) != other.encoder.data_config.get(k)
            }
            if differ:
                said = "; ".join(
                    f"{k} {b!r} where {names[0]} has {a!r}" for k, (a, b) in differ.items()
                )
                raise UserError(
                    f"{name} reads images with {said}: members of an ensemble share one image "
                    "transform (encoder input size, resizing and normalisation)"
                )
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
        return self.with_attributes(self.tuned_features(batch.grid, batch.rows))

    def tuned_features(self, trunk: torch.Tensor, rows: torch.Tensor) -> Features:
        """encoder.tune_stages: run the tuned stages on cached trunk maps (B, h*w, C_t), once per
        distinct image of the batch (captions of one image share its features)."""
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

    # -- self-critical sequence training (Rennie et al. 2017) ----------------------------------
    def on_fit_start(self) -> None:
        if self.attributes is not None:
            self.setup_attributes(self._link().train_references())
        if self.scst["enabled"] and self._cider is None:
            self._cider = scst_reward(self._link().train_references(), self.scst["eos_reward"])

    def scst_step(self, batch: Batch) -> torch.Tensor:
        """REINFORCE with CIDEr-D as the reward and a baseline: the model's own greedy caption
        (self-critical) or the mean reward of the other samples of the same image."""
        feats = self.features(batch)
        rows = batch.rows  # (B,) image rows: keys of the training references
        B, K, v = rows.size(0), int(self.scst["num_samples"]), self.vocab
        max_len = int(self.decoding["max_len"])
        tokens, logp = sample(
            self.decoder, feats, v.bos_id, v.eos_id, max_len, K, float(self.scst["temperature"])
        )
        ids = rows.repeat_interleave(K).tolist()
        reward = self._reward(tokens, ids)  # (B*K,)
        greedy_reward = None
        if self.scst["baseline"] == "greedy":
            self.decoder.eval()
            with torch.no_grad():
                g = greedy(self.decoder, feats, v.bos_id, v.eos_id, max_len).tokens
            self.decoder.train()
            greedy_reward = self._reward(g, rows.tolist())  # (B,)
        advantage, base = scst_advantages(reward.view(B, K), greedy_reward)  # (B*K,) each
        mask = (tokens != v.pad_id).float()  # (B*K, T): words and <eos>
        loss = -(advantage.unsqueeze(1) * logp * mask).sum() / mask.sum()
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/reward", reward.mean(), prog_bar=True, batch_size=B)
        self.log("train/baseline", base.mean(), batch_size=B)
        return loss

    def _reward(self, tokens: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """CIDEr-D of each caption. With `eos_reward` a caption that ended by choosing <eos>
        (not cut at max_len) carries it as a last word, and so do the references: n-grams such
        as "the grass <eos>" reward proper endings and punish captions that stop mid-phrase
        ("a dog runs on the <eos>"), as in Rennie et al.'s and Luo's implementations."""
        max_len = int(self.decoding["max_len"])
        words = [self.vocab.decode(t).split() for t in tokens.tolist()]
        if self.scst["eos_reward"]:
            words = [w + [EOS_WORD] if len(w) < max_len else w for w in words]
        return torch.as_tensor(self._cider(words, ids), dtype=torch.float32, device=tokens.device)

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
        if self.trainer.is_global_zero:
            log.info("%s: gathered %d captions for %d images", split, len(gathered), len(preds))
        scores: dict[str, float] | None = None
        if self.trainer.is_global_zero:
            refs = self._link().references(split)
            missing = set(refs) - set(preds)
            if missing:
                log.warning(
                    "%d %s images have no caption (bad images?); scoring the rest",
                    len(missing),
                    split,
                )
                refs = {k: v for k, v in refs.items() if k in preds}
            final = self.trainer.state.fn != "fit"  # validate/test after training, eval.py
            scores = self.scorer(meteor=final or self.metrics_cfg.get("meteor_every_epoch", False))(
                preds, refs
            )
            scores["num_images"] = float(len(preds))
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
        if self._scorer is not None:
            self._scorer.close()  # stop the METEOR JVM
            self._scorer = None

    def scorer(self, meteor: bool = True):
        """The COCO toolkit scorer; METEOR (a JVM that takes ~15 s to start) only when asked."""
        from imcap.eval.metrics import CaptionScorer

        meteor = meteor and self.metrics_cfg["meteor"]
        if self._scorer is None or (meteor and "METEOR" not in self._scorer.metrics):
            if self._scorer is not None:
                self._scorer.close()
            if meteor:  # say what the pause is: the JVM loads a 60 MB paraphrase table
                log.info("scoring with METEOR: starting its Java VM (~15-20 s the first time)")
            self._scorer = CaptionScorer(java=self.metrics_cfg["java"], meteor=meteor)
        return self._scorer

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        """model.optimizer (a partial) over the decoder and attribute parameters, plus the
        encoder's at model.encoder_lr when it trains; model.scheduler stepped every step."""
        heads = [*self.decoder.parameters()]
        if self.attributes is not None:
            heads += [*self.attributes.parameters()]
        groups = [{"params": [p for p in heads if p.requires_grad]}]
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        if enc:
            groups.append({"params": enc, "lr": self.hparams.encoder_lr})
        opt = _build("model.optimizer", self.hparams.optimizer, groups)
        spec = self.hparams.scheduler
        if not spec:
            return opt

        def total() -> int:  # Lightning's estimate needs the data: asked only when wanted
            return max(1, int(self.trainer.estimated_stepping_batches))

        sched = _build("model.scheduler", spec, opt, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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


def _partial_spec(given: dict | None, default: dict) -> dict:
    """A Hydra partial (optimizer, scheduler): the default's arguments under the given ones
    when the target is the same, the given spec alone when it names another class."""
    given = dict(given or {})
    if given.get("_target_", default["_target_"]) != default["_target_"]:
        return {"_partial_": True, **given}
    return {**default, **given}


def _build(where: str, spec: dict, *args: Any, **maybe: Any) -> Any:
    """Instantiate a partial spec and call it with `args` and those of the `maybe` keywords it
    takes (values are thunks, evaluated only then: a StepLR never needs `total_steps`); a bad
    argument is one line naming the config key."""

    def config_error(e: Exception) -> UserError:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return UserError(f"{where} ({spec.get('_target_')}): {first}")

    try:
        factory = instantiate(dict(spec))
        params = inspect.signature(factory.func if hasattr(factory, "func") else factory).parameters
    except Exception as e:  # noqa: BLE001 - an unknown class or a bad spec
        raise config_error(e) from None
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {k: thunk() for k, thunk in maybe.items() if takes_any or k in params}
    try:
        return factory(*args, **extra)
    except (TypeError, ValueError) as e:  # an argument the class does not take, a bad value
        raise config_error(e) from None


def scst_advantages(
    reward: torch.Tensor, greedy_reward: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of K samples per image, reward (B, K) -> (B*K,), and the baseline used.

    With the greedy caption's reward (B,): self-critical (Rennie et al. 2017). Without: the mean
    reward of the *other* K-1 samples of the same image (Luo 2020), so each image's advantages
    sum to zero and no extra decoding pass is needed.
    """
    B, K = reward.shape
    if greedy_reward is not None:
        base = greedy_reward.unsqueeze(1).expand(B, K)  # (B, K)
    else:
        base = (reward.sum(1, keepdim=True) - reward) / max(K - 1, 1)  # (B, K) leave-one-out
    return (reward - base).reshape(-1), base.reshape(-1)


def scst_reward(refs: dict[int, list[list[str]]], eos: bool):
    """The in-process CIDEr-D reward over the training references (with <eos> as a word)."""
    from imcap.eval.cider import CiderD

    if eos:
        refs = {k: [[*r, EOS_WORD] for r in caps] for k, caps in refs.items()}
    return CiderD(refs)


def gather_predictions(strategy: Any, local: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """All ranks' (image_id, caption) pairs, duplicates included (the caller keys by image id)."""
    world = getattr(strategy, "world_size", 1)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, list(local))
        merged = [p for part in parts for p in part]
    else:
        merged = list(local)
    return merged


_MOVED = {  # class paths of imcap 0.1 checkpoints -> where the classes live now
    "imcap.decoder.": "imcap.model.decoder.",
    "imcap.datasets.": "imcap.data.datasets.",
    "imcap.synthetic.": "imcap.data.synthetic.",
}


def upgrade_hparams(hp: dict) -> dict:
    """Hyperparameters of a checkpoint written before the package layout and the optimizer
    config changed, in today's form (so older checkpoints keep loading)."""
    hp = dict(hp)

    def moved(path: Any) -> Any:
        for old, new in _MOVED.items():
            if isinstance(path, str) and path.startswith(old):
                return new + path[len(old) :]
        return path

    if isinstance(hp.get("decoder"), dict) and "_target_" in hp["decoder"]:
        hp["decoder"] = {**hp["decoder"], "_target_": moved(hp["decoder"]["_target_"])}
    if isinstance(hp.get("encoder"), dict) and hp["encoder"].get("tune_stages") is False:
        hp["encoder"] = {**hp["encoder"], "tune_stages": 0}  # once cast, now refused when given
    if isinstance(hp.get("data"), dict) and "loader" in hp["data"]:
        hp["data"] = {**hp["data"], "loader": moved(hp["data"]["loader"])}
    optim = hp.pop("optim", None)
    if isinstance(optim, dict):  # {lr, weight_decay, encoder_lr, scheduler, warmup_steps}
        hp["optimizer"] = {"lr": optim.get("lr"), "weight_decay": optim.get("weight_decay", 0.0)}
        hp["encoder_lr"] = optim.get("encoder_lr")
        cosine = optim.get("scheduler", "cosine") == "cosine"
        hp["scheduler"] = {"warmup_steps": optim.get("warmup_steps", 0)} if cosine else None
    return hp


def read_checkpoint(p: Path, trust: bool = False) -> dict:
    """A checkpoint as data: `weights_only=True` unpickles tensors and plain containers only,
    so a file carrying code (a pickled callable) is refused instead of run.

    `trust=True` (trust_checkpoint=true) unpickles everything: only for a file from a source
    you trust that an older tool wrote with other objects inside."""
    if trust:
        log.warning("trust_checkpoint=true: %s is unpickled in full (it can run code)", p)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"refusing to load {p}: it holds objects other than tensors and plain values, which "
            f"could run code when unpickled ({first[:160]}). imcap checkpoints never do; "
            "use a checkpoint written by imcap's train.py, or, only for a file from a source you "
            "trust, trust_checkpoint=true"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated, empty or not a checkpoint at all
        raise UserError(f"cannot read checkpoint {p}: {str(e)[:200]}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{p} is not an imcap checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def load_captioner(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    trust: bool = False,
    **overrides: Any,
) -> Captioner:
    """Load a checkpoint, or a shipped model by name (imcap.model.zoo), with errors a user can
    act on (as data unless `trust`)."""
    from imcap.model import zoo

    p = zoo.resolve(path)
    if not p.is_file():
        names = ", ".join(zoo.index()) or "none"
        raise UserError(
            f"checkpoint not found: {p}. Give ckpt_path=<a .ckpt written by train.py> or a "
            f"shipped model name ({names}; `imcap models` lists them)"
        )
    return captioner_from(read_checkpoint(p, trust), p, map_location, trust=trust, **overrides)


def captioner_from(
    ckpt: dict,
    p: Path,
    map_location: str | torch.device = "cpu",
    trust: bool = False,
    **overrides: Any,
) -> Captioner:
    """The model inside a checkpoint already read (`read_checkpoint`), so a caller that also
    wants its other entries (epoch, callback state: the demo's model card) reads it once.
    A packed checkpoint (a shipped model) gets its frozen weights from their declared source.
    Unless `trust`, every component the hyperparameters name must be imcap's own
    (imcap.model.checkpoint): a checkpoint is data, it never picks the code that runs."""
    from imcap.model import zoo
    from imcap.model.checkpoint import check_hparams

    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "vocab" not in hp:
        raise UserError(
            f"{p} is not an imcap checkpoint (no vocabulary inside); train one with src/train.py"
        )
    hp = upgrade_hparams(hp)
    if not trust:
        check_hparams(hp, p)
    hp = {**hp, **overrides}
    # the weights come from the checkpoint; encoder.pretrained stays as the record of where they
    # came from before training (the Encoder loads nothing unless load_pretrained() is called)
    model = Captioner(**hp)
    try:
        if ckpt.get(zoo.PACKED):
            zoo.fill_provided(model, ckpt, p)
        else:
            model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise UserError(
            f"checkpoint {p} does not match its own hyperparameters: {str(e)[:300]}"
        ) from None
    return model.to(map_location).eval()
