"""Callbacks: checkpoints that survive kills, sample captions and figures for people to read,
staged CNN fine-tuning, progress lines for log files."""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from timm.models import group_parameters

from imcap.data.images import file_in, unique_stems
from imcap.errors import UserError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place: a kill or a full disk
    mid-write leaves the previous file intact, never a truncated one under the final name.

    `preloaded` {path: checkpoint}: files already read (as data) and checked by the caller; the
    resume of a fit takes them from memory, once, instead of reading them a second time."""

    def __init__(self, preloaded: dict[Path, dict] | None = None) -> None:
        super().__init__()
        self._preloaded = {Path(p).expanduser().resolve(): c for p, c in (preloaded or {}).items()}

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None):
        key = Path(path).expanduser().resolve()
        ckpt = self._preloaded.pop(key, None) if self._preloaded else None
        if ckpt is not None:
            return ckpt
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class Requeue(SIGTERMException):
    """The fit stopped at a batch boundary because SLURM announced the end of the job's time
    (its requeue signal, `sbatch --signal=SIGUSR1@90`): last.ckpt is saved, the job requeued."""


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is the latest epoch, always.

    Lightning writes `last.ckpt` only when a top-k checkpoint was saved in the same step, so
    after the best epoch it stops moving and a resume after kill -9 would lose every epoch since
    the last improvement. Here it is rewritten after every validation, and also when the run is
    stopped by SIGTERM (preemption, scancel), Ctrl-C or SLURM's requeue signal
    (`watch_requeue`), so a resume loses at most the epoch in progress."""

    requeue_job: str | None = None  # the SLURM job to requeue on the signal (watch_requeue)
    requeued: bool = False  # scontrol requeue succeeded
    _requeue_asked = False

    def watch_requeue(self, signum: int, job_id: str) -> None:
        """SLURM's requeue signal (`--signal=SIGUSR1@90`: 90 s before the time limit) only
        marks the request; at the next training batch boundary every rank agrees on it, the fit
        stops, last.ckpt is saved and rank 0 runs `scontrol requeue <job>`. The job then runs its
        script again, which continues from last.ckpt in the same run directory
        (`training.requeued_checkpoint`). Lightning's own handler, switched off for this
        (`SLURMEnvironment(auto_requeue=False)`), saves `hpc_ckpt_*.ckpt` inside the signal
        handler, which may run in the middle of a step or of a collective (Lightning #21406)."""
        self.requeue_job = job_id
        signal.signal(signum, self._on_requeue_signal)

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self._requeue_asked = True  # acted on at a batch boundary, never inside the handler

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.requeue_job is None:
            return
        # every rank reaches this point once per batch: the decision is the same everywhere
        if trainer.strategy.reduce_boolean_decision(self._requeue_asked, all=False):
            self._requeue_asked = False
            raise Requeue()

    # Lightning saves in on_train_epoch_end when validation runs once per epoch, else in
    # on_validation_end; after whichever it used, last.ckpt is written if it was not just now.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._last_too(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._last_too(trainer)

    def _last_too(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            return
        if self.save_last and trainer.state.fn == "fit" and self.dirpath is not None:
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path)  # mid-epoch state: the resume restarts that epoch
            self.last_model_path = str(path)
            log.warning("stopped (%s): saved %s", type(exception).__name__, path)
        if isinstance(exception, Requeue) and trainer.is_global_zero:
            self.requeued = requeue_slurm_job(str(self.requeue_job))  # after the save


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue <job>`: SLURM stops the job and queues it again (its script then
    runs from the start). False, with a line saying how to go on, when that fails."""
    try:
        rc = subprocess.call(["scontrol", "requeue", job_id])
    except OSError as e:
        rc = e.strerror or e
    if rc == 0:
        log.warning("requeued SLURM job %s", job_id)
        return True
    log.error(
        "could not requeue SLURM job %s (scontrol requeue: %s); continue the run in a new job "
        "with resume=<its run directory> (last.ckpt is saved)",
        job_id,
        rc,
    )
    return False


class ModelSummary(LightningModelSummary):
    """Lightning's model summary without the FLOPs column and its "0 Total Flops" line:
    Lightning counts FLOPs only by running `example_input_array`, which a captioner (images and
    captions, or cached features) does not have, so every count it prints is 0."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, 0, *columns
        )
        lines = [ln for ln in table.splitlines() if not ln.endswith("Total Flops")]
        log.info("\n" + "\n".join(lines))


class SampleCaptions(L.Callback):
    """After every validation: a fixed set of val images with their generated caption and
    references, written as JSON and sent to the loggers that can show it (TensorBoard text,
    W&B table with the images)."""

    def __init__(self, num_samples: int = 8, dirpath: str | None = None) -> None:
        self.num_samples, self.dirpath = num_samples, dirpath
        self.latest: Path | None = None

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, which is where this epoch's captions are scored, so they would show the last one.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preds = getattr(pl_module, "predictions", {}).get("val")
        if trainer.sanity_checking or not preds or not trainer.is_global_zero:
            return
        link = pl_module.data_link
        refs = link.references("val")
        ids = sorted(preds)[: self.num_samples]
        rows = [
            {
                "image_id": i,
                "image": str(link.image_path(i)),
                "caption": preds[i],
                "references": refs.get(i, []),
            }
            for i in ids
        ]
        if self.dirpath:
            out = Path(self.dirpath)
            out.mkdir(parents=True, exist_ok=True)
            name = (
                f"val_epoch_{trainer.current_epoch:03d}"
                if trainer.state.fn == "fit"
                else "val_best"
            )
            self.latest = out / f"{name}.json"
            self.latest.write_text(json.dumps(rows, indent=1))
        for logger in trainer.loggers:
            self._send(logger, rows, trainer.current_epoch, trainer.global_step)

    @staticmethod
    def _send(logger: Any, rows: list[dict], epoch: int, step: int) -> None:
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            text = "\n\n".join(
                f"**{r['image_id']}**: {r['caption']}  \n_refs_: {' | '.join(r['references'])}"
                for r in rows
            )
            logger.experiment.add_text("val/samples", text, global_step=step)
        elif name == "WandbLogger":
            import wandb

            data = [
                [
                    wandb.Image(r["image"]) if r["image"] else None,
                    r["caption"],
                    " | ".join(r["references"]),
                ]
                for r in rows
            ]
            logger.log_table(
                key="val/samples", columns=["image", "caption", "references"], data=data, step=step
            )


class EncoderFinetuning(BaseFinetuning):
    """Unfreeze the CNN (all of it, or its last N parameter groups in timm's coarse grouping)
    at epoch `start_epoch`, with its own learning rate. BatchNorm statistics stay frozen."""

    def __init__(
        self, start_epoch: int | None = None, last_n_blocks: int | None = None, lr: float = 1e-5
    ) -> None:
        super().__init__()
        self.start_epoch, self.last_n_blocks, self.lr = start_epoch, last_n_blocks, lr

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        link = getattr(pl_module, "data_link", None)
        if self.start_epoch is not None and link is not None and link.mode == "two_step":
            raise UserError(
                "callbacks.finetune.start_epoch needs mode=joint (two-step trains on frozen features)"
            )
        super().on_fit_start(trainer, pl_module)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.start_epoch is not None and not pl_module.encoder.trainable:
            self.freeze(pl_module.encoder.model, train_bn=False)

    def _blocks(self, pl_module: L.LightningModule) -> list:
        model = pl_module.encoder.model
        groups = group_parameters(model, model.group_matcher(coarse=True))
        names = [names for _, names in sorted(groups.items())]
        if self.last_n_blocks:
            names = names[-int(self.last_n_blocks) :]
        params = dict(model.named_parameters())
        return [params[n] for group in names for n in group if n in params]

    def finetune_function(
        self, pl_module: L.LightningModule, current_epoch: int, optimizer: Any
    ) -> None:
        if (
            self.start_epoch is None
            or current_epoch != self.start_epoch
            or pl_module.encoder.trainable
        ):
            return
        params = [p for p in self._blocks(pl_module) if not p.requires_grad]
        for p in params:
            p.requires_grad_(True)
        optimizer.add_param_group({"params": params, "lr": self.lr, "initial_lr": self.lr})
        # a per-group scheduler (LambdaLR) must learn about the new group, or its next step fails;
        # the encoder then follows the same warmup/cosine factor as the decoder
        for config in pl_module.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if getattr(sched, "optimizer", None) is optimizer and hasattr(sched, "lr_lambdas"):
                sched.lr_lambdas.append(sched.lr_lambdas[0])
                sched.base_lrs.append(self.lr)
        log.info(
            "epoch %d: fine-tuning %d encoder tensors at lr %g", current_epoch, len(params), self.lr
        )


class ContinueMetrics(L.Callback):
    """A run resumed in its own directory keeps one metrics.csv: the rows of the epochs before
    the resume point are written back once fitting restarts (Lightning's CSVLogger deletes the
    file it finds). Rows of epochs the resume repeats, and the final val_best/test rows of an
    earlier finish, are dropped, so every epoch appears once."""

    FINAL = ("val_best/", "test/")

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows

    @staticmethod
    def take(loggers: list[Any]) -> list[dict[str, str]]:
        """The CSV logger's existing rows, with its files moved out of Lightning's way (before
        the logger first writes: it would warn and delete them)."""
        from lightning.pytorch.loggers import CSVLogger

        rows: list[dict[str, str]] = []
        for lg in loggers:
            if isinstance(lg, CSVLogger):
                path = Path(lg.log_dir) / "metrics.csv"
                if path.is_file():
                    with path.open(newline="") as fh:
                        rows = list(csv.DictReader(fh))
                    path.unlink()
                (Path(lg.log_dir) / "hparams.yaml").unlink(missing_ok=True)  # rewritten
        return rows

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.loggers import CSVLogger

        # restored from the checkpoint: the first epoch and step to run
        start, step = trainer.current_epoch, trainer.global_step

        def before(r: dict[str, str]) -> bool:  # rows without an epoch (learning rate): by step
            if r.get("epoch"):
                return int(float(r["epoch"])) < start
            return bool(r.get("step")) and int(float(r["step"])) < step

        keep = [
            r
            for r in self.rows
            if before(r) and not any(k.startswith(self.FINAL) and v != "" for k, v in r.items())
        ]
        if not keep or not trainer.is_global_zero:
            return
        keys = sorted({k for r in keep for k in r})
        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                writer = lg.experiment
                with open(writer.metrics_file_path, "w", newline="") as fh:
                    out = csv.DictWriter(fh, fieldnames=keys)
                    out.writeheader()
                    out.writerows(keep)
                writer.metrics_keys = list(keys)
        log.info("continued metrics.csv: %d rows of epochs 0-%d kept", len(keep), start - 1)


class Curves(L.Callback):
    """Per-epoch training loss and validation scores, drawn to `curves.png` after every epoch
    (so an interrupted run still has its curves) and sent to image-capable loggers. The history
    is part of the checkpoint, so a resumed run draws every epoch."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.history: list[dict[str, float]] = []
        self.epoch_seconds: list[float] = []
        self._loss_sum, self._loss_n = 0.0, 0
        self._t0 = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.epoch_seconds = list(state_dict.get("epoch_seconds", []))

    def on_train_start(self, trainer, pl_module) -> None:
        # a mid-epoch checkpoint restarts its epoch: keep only the epochs before it
        start = trainer.current_epoch
        self.history = [r for r in self.history if r["epoch"] < start]
        self.epoch_seconds = self.epoch_seconds[:start]  # one entry per trained epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_seconds.append(
            round(time.perf_counter() - self._t0, 2)
        )  # training only, no validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss.detach())
            self._loss_n += 1

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, which is where this epoch's captions are scored, so they would show the last one.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        if self._loss_n:
            row["train/loss"] = self._loss_sum / self._loss_n
        self._loss_sum, self._loss_n = 0.0, 0
        for k, v in getattr(pl_module, "scores", {}).get("val", {}).items():
            row[f"val/{k}"] = v
        self.history.append(row)
        if self.path:
            from imcap.eval.viz import curves_figure

            fig = curves_figure(self.history, self.path)
            for logger in trainer.loggers:
                if type(logger).__name__ == "WandbLogger":
                    logger.log_image(key="curves", images=[str(fig)], step=trainer.global_step)


class AttentionMaps(L.Callback):
    """For attention decoders: after every validation, draw where the model looked for each
    word on a fixed set of val images; PNGs under `dirpath`, also sent to TensorBoard / W&B."""

    def __init__(self, num_images: int = 4, dirpath: str | None = None) -> None:
        self.num_images, self.dirpath = num_images, dirpath

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, which is where this epoch's captions are scored, so they would show the last one.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.dirpath:
            return
        if not getattr(pl_module.decoder, "uses_grid", False):
            return
        from imcap.eval.viz import attention_figure, attention_words

        link = pl_module.data_link
        preds = getattr(pl_module, "predictions", {}).get("val") or link.references("val")
        ids = sorted(preds)[: self.num_images]
        batch = link.eval_batch(ids, pl_module.device)
        with torch.no_grad():
            out = pl_module.generate(pl_module.features(batch), beam_size=1, return_attn=True)
        if out.alphas is None:  # a decoder may read the grid without attending (no maps to draw)
            return
        tag = f"epoch_{trainer.current_epoch:03d}" if trainer.state.fn == "fit" else "best"
        # ids come from annotation files: `../x` or `a/b` must not leave or nest in the folder
        names = unique_stems([str(i) for i in ids])
        figures = []
        for j, image_id in enumerate(ids):
            caption = pl_module.vocab.decode(out.tokens[j].tolist())
            words = attention_words(caption, int(pl_module.decoding["max_len"]))
            target = file_in(Path(self.dirpath) / tag, names[str(image_id)], ".png")
            figures.append(
                attention_figure(
                    link.image_path(image_id), words, out.alphas[j].float().cpu(), target
                )
            )
        for logger in trainer.loggers:
            name = type(logger).__name__
            if name == "TensorBoardLogger":
                import numpy as np
                from PIL import Image

                for f in figures:
                    img = np.asarray(Image.open(f).convert("RGB"))
                    logger.experiment.add_image(
                        f"attention/{f.stem}", img, trainer.global_step, dataformats="HWC"
                    )
            elif name == "WandbLogger":
                logger.log_image(
                    key="val/attention", images=[str(f) for f in figures], step=trainer.global_step
                )


class OverflowGuard(L.Callback):
    """A learning rate so large that the optimizer's update does not fit the weights' float type
    (model.optimizer.lr=1e38 with Adam: lr / (1 - beta1) > 3.4e38) fails inside torch's
    `optimizer.step` with "value cannot be converted to type float without overflow", a
    traceback from deep in Lightning. Here that failure, and only it, becomes one line naming
    the learning-rate setting; an error of the forward/backward closure passes through."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for opt in trainer.optimizers:
            if not getattr(opt.step, "_overflow_guard", False):
                opt.step = self._guarded(opt.step, trainer, pl_module)

    @staticmethod
    def _guarded(step: Any, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        @functools.wraps(step)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            closure = kwargs.get("closure", args[0] if args else None)
            done = [closure is None]  # an error before the closure returns is not the update's
            if closure is not None:

                def tracked() -> Any:
                    out = closure()
                    done[0] = True
                    return out

                args, kwargs = ((), {**kwargs, "closure": tracked})
            try:
                return step(*args, **kwargs)
            except RuntimeError as e:
                if not done[0] or "without overflow" not in str(e):
                    raise
                raise UserError(OverflowGuard.message(e, trainer, pl_module)) from None

        guarded._overflow_guard = True  # type: ignore[attr-defined]
        return guarded

    @staticmethod
    def message(e: Exception, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        hp = getattr(pl_module, "hparams", {}) or {}
        rates = {"model.optimizer.lr": (hp.get("optimizer") or {}).get("lr")}
        if any(len(o.param_groups) > 1 for o in trainer.optimizers):  # the encoder trains too
            rates["model.encoder_lr"] = hp.get("encoder_lr")
        key, lr = max(
            ((k, v) for k, v in rates.items() if isinstance(v, int | float)),
            key=lambda kv: kv[1],
            default=("model.optimizer.lr", None),
        )
        value = f"={lr:g}" if lr is not None else ""
        first = str(e).strip().splitlines()[0]
        return (
            f"training stopped at step {trainer.global_step}: the optimizer's update overflowed "
            f"({first}); {key}{value} is far too large; fix: lower {key} (typical values are "
            "1e-4 to 1e-3)"
        )


class ProgressLog(L.Callback):
    """Progress as plain log lines when output is not a terminal (nohup, SLURM, CI): a line
    every `every_seconds` with the epoch, step, loss and speed, instead of progress-bar
    redraws that fill a log file with hundreds of KB of carriage returns."""

    def __init__(self, every_seconds: float) -> None:
        self.every = float(every_seconds)
        self._last = 0.0
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if now - self._last < self.every or not trainer.is_global_zero:
            return
        self._last = now
        total = trainer.num_training_batches
        done = batch_idx + 1
        rate = done / max(now - self._epoch_start, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        eta = (total - done) / rate if isinstance(total, int) else float("nan")
        log.info(
            "epoch %d  step %d/%s  loss %s  %.2f it/s  epoch ETA %.0f s",
            trainer.current_epoch,
            done,
            total,
            f"{float(loss):.3f}" if loss is not None else "-",
            rate,
            eta,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info(
                "epoch %d done in %.0f s",
                trainer.current_epoch,
                time.perf_counter() - self._epoch_start,
            )


class EMA(L.Callback):
    """Exponential moving average of the weights (Polyak averaging), `callbacks.ema.decay`.

    Validation, checkpoint selection, sample captions, attention maps and the saved weights all
    use the average; the raw weights keep training. On a small data set the average is less
    tied to the last noisy steps. A checkpoint's `state_dict` holds the average (so eval.py,
    caption.py, exports and `init_from` use it) and `ema_raw_state_dict` the raw weights, so a
    resumed fit continues both. Tracked: the trainable parameters and the floating-point
    buffers (BatchNorm statistics); frozen weights do not move. The first updates average over
    fewer steps (decay min(decay, (1 + n) / (10 + n)) at update n), so an early checkpoint is
    not dominated by the initial weights. `decay: null` turns it off."""

    RAW_KEY = "ema_raw_state_dict"

    def __init__(self, decay: float | None = None) -> None:
        if decay is not None and not 0.0 < float(decay) < 1.0:
            raise UserError(f"callbacks.ema.decay must be in (0, 1), or null for off; got {decay}")
        self.decay = None if decay is None else float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None  # name -> averaged (or, swapped, raw)
        self.updates = 0
        self.swapped = False  # True while the module holds the average (validation)
        self._live: dict[str, torch.Tensor] = {}  # name -> the module's tensor, found once per fit
        self._last_step = -1

    @staticmethod
    def tracked(pl_module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """name -> tensor of what training moves: trainable parameters, and the floating-point
        buffers (BatchNorm statistics) of the modules that own one."""
        out: dict[str, torch.Tensor] = {}
        for prefix, mod in pl_module.named_modules():
            params = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            pre = f"{prefix}." if prefix else ""
            out.update({pre + n: p for n, p in params})
            bufs = mod.named_buffers(recurse=False)
            out.update({pre + n: b for n, b in bufs if b is not None and b.is_floating_point()})
        return out

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.decay is None:
            return
        self._live = self.tracked(pl_module)
        if self.shadow is None:  # (a resumed fit has it from the checkpoint already)
            # float32 whatever the weights are (an average kept in bf16 would stop moving)
            self.shadow = {
                k: v.detach().to(torch.float32, copy=True) for k, v in self._live.items()
            }

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.shadow is None or trainer.global_step == self._last_step:
            return  # off, or no optimizer step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, avg in self.shadow.items():
            avg.lerp_(self._live[k].detach().float(), 1.0 - d)

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        current = self._live or self.tracked(pl_module)
        for k, avg in self.shadow.items():
            tmp = current[k].detach().to(torch.float32, copy=True)
            current[k].data.copy_(avg)
            avg.copy_(tmp)
        self.swapped = not self.swapped

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow is not None and not self.swapped:
            self._swap(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the figures (listed before this callback) and before the checkpoint callbacks,
        # which Lightning runs last: the module trains on its raw weights again
        if self.shadow is not None and self.swapped:
            self._swap(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.shadow is None:
            return
        weights = checkpoint["state_dict"]
        if self.swapped:  # saved mid-validation: the module holds the average, `shadow` the raw
            raw = {k: v.to(weights[k].dtype, copy=True) for k, v in self.shadow.items()}
        else:
            raw = {k: weights[k].detach().clone() for k in self.shadow}
            weights.update({k: v.to(weights[k].dtype, copy=True) for k, v in self.shadow.items()})
        checkpoint[self.RAW_KEY] = raw

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))

    @torch.no_grad()
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Resuming a fit: the module was loaded with the average; it goes on from its raw
        weights and the average from where it was."""
        raw = checkpoint.get(self.RAW_KEY)
        if self.decay is None or raw is None:
            return
        current = self.tracked(pl_module)
        if set(raw) != set(current):
            odd = sorted(set(raw) ^ set(current))[:3]
            raise UserError(
                f"the checkpoint's weight average does not fit this model (e.g. {odd}): resume "
                "with the settings it was trained with (encoder.tune_stages, decoder), or "
                "callbacks.ema.decay=null to continue from its averaged weights alone"
            )
        self._live = current
        self.shadow = {k: current[k].detach().to(torch.float32, copy=True) for k in raw}
        for k, v in raw.items():
            current[k].data.copy_(v)
        self.swapped = False
