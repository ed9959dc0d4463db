"""The Lightning side of `train()`: loggers and callbacks from the config, the Trainer, a fit
whose every way of stopping says what was kept and how to go on, and the final scoring of the
best checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from imcap.errors import UserError
from imcap.pipeline.callbacks import (
    AtomicCheckpointIO,
    Checkpoint,
    ContinueMetrics,
    ModelSummary,
    OverflowGuard,
    ProgressLog,
    Requeue,
)
from imcap.pipeline.runtime import plain

log = logging.getLogger(__name__)


def make_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if lcfg._target_.endswith("WandbLogger"):
            from imcap.pipeline.wandb_utils import wandb_logger

            loggers.append(wandb_logger(lcfg, cfg))
        else:
            loggers.append(instantiate(lcfg))
        log.info("logger %s: %s", name, lcfg._target_)
    return loggers


def make_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """conf/callbacks/*: every entry with a `_target_` (null or `~callbacks.x` removes one).
    Lightning's own model summary and progress bar yield to ours when the config says so."""
    callbacks = [
        instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and "_target_" in c
    ]
    if not cfg.trainer.get("enable_model_summary", True):
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    return callbacks


def srun_task() -> bool:
    """Whether Lightning sees this process as a SLURM task (started by srun in a batch job;
    torchrun inside an allocation takes precedence, as in Lightning's own detection order)."""
    return SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()


def slurm_job_id() -> str | None:
    """This batch job's id (`<array job>_<task>` for an array task); None outside SLURM and in
    an interactive allocation (job name bash/interactive), where runs must not share state."""
    if SLURMEnvironment.job_id() is None:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeued_checkpoint(cfg: DictConfig, callbacks: list[L.Callback]) -> Path | None:
    """A requeued (or preempted and requeued) SLURM job runs its script again with the same
    command line, hence the same run directory (`hydra.run.dir=.../slurm-$SLURM_JOB_ID`): when
    that directory already holds last.ckpt and no ckpt_path is given, the run continues from it
    in place. Lightning applies the same rule to its own `hpc_ckpt_*.ckpt`, which imcap does
    not write (see Checkpoint.watch_requeue)."""
    if cfg.get("ckpt_path") or slurm_job_id() is None:
        return None
    ckpt = next((c for c in callbacks if isinstance(c, Checkpoint) and c.save_last), None)
    if ckpt is None or ckpt.dirpath is None:
        return None
    last = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
    return last if last.is_file() else None


def _in_place(cfg: DictConfig, out: Path) -> bool:
    """Whether ckpt_path is this run directory's own (checkpoints/<file>): continue in place."""
    if not cfg.get("ckpt_path"):
        return False
    parents = Path(str(cfg.ckpt_path)).expanduser().resolve().parents
    return len(parents) > 1 and parents[1] == out.resolve()


def make_trainer(cfg: DictConfig, out: Path, resume: dict | None = None) -> L.Trainer:
    """The Trainer of `cfg.trainer` with the run's callbacks and loggers. `resume`: the
    checkpoint `ckpt_path` names, already read (the fit takes it from memory, not the disk);
    when it lives in this run's folder the run continues in place (metrics appended).

    Multi-node: Lightning's cluster environments (torchrun's TorchElastic, SLURM's srun) give
    every process its rank; under srun the SLURM environment comes with its requeue signal
    handled at a batch boundary (Checkpoint.watch_requeue), and a requeued job continues from
    its run directory's last.ckpt (`requeued_checkpoint`)."""
    callbacks, loggers = make_callbacks(cfg), make_loggers(cfg)
    if not any(isinstance(c, OverflowGuard) for c in callbacks):
        callbacks.append(OverflowGuard())  # a safety check, on whatever callbacks= says
    extra: dict[str, Any] = {"enable_model_summary": False}  # ModelSummary (ours) replaces it
    lines = any(isinstance(c, ProgressLog) for c in callbacks)
    if sys.stderr.isatty():  # a terminal: progress bars, not log lines
        callbacks = [c for c in callbacks if not isinstance(c, ProgressLog)]
    elif lines and "enable_progress_bar" not in cfg.trainer:  # a log file: lines, not redraws
        extra["enable_progress_bar"] = False
    requeued = requeued_checkpoint(cfg, callbacks)
    if requeued is not None:
        cfg.ckpt_path = str(requeued)  # the fit restores it (read as data, weights_only)
        log.warning(
            "SLURM job %s: %s exists, so this is the job coming back (requeued or preempted); "
            "continuing the run from it",
            slurm_job_id(),
            requeued,
        )
    watch = False
    if "plugins" not in cfg.trainer:  # checkpoints written to a temp file, then renamed
        ckpt = Path(str(cfg.ckpt_path)).expanduser() if resume is not None else None
        extra["plugins"] = [AtomicCheckpointIO(preloaded={ckpt: resume} if ckpt else None)]
        if srun_task():  # Lightning's SLURM environment, its requeue handled by Checkpoint
            extra["plugins"].append(SLURMEnvironment(auto_requeue=False))
            watch = slurm_job_id() is not None
    if watch:
        for c in callbacks:
            if isinstance(c, Checkpoint) and c.save_last:
                c.watch_requeue(signal.SIGUSR1, str(slurm_job_id()))
            elif isinstance(c, Checkpoint):  # a requeued job would start over, again and again
                log.warning(
                    "SLURM job %s: callbacks.model_checkpoint.save_last is off, so the requeue "
                    "signal is not acted on (a requeued job would have no last.ckpt to continue "
                    "from); set it to true to continue preempted jobs",
                    slurm_job_id(),
                )
    if _in_place(cfg, out):
        rows = ContinueMetrics.take(loggers) if rank_zero_only.rank == 0 else []
        callbacks.append(ContinueMetrics(rows))
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
        log.info("resuming in place: %s (from %s)", out, cfg.ckpt_path)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
    for lg in trainer.loggers:
        lg.log_hyperparams(plain(cfg))
    return trainer


def stopped_message(trainer: L.Trainer, why: str) -> str:
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    if last and Path(last).is_file():
        return (
            f"training stopped ({why}) in epoch {trainer.current_epoch}; resumable checkpoint "
            f"{last}: continue in the same run directory with `python src/train.py "
            f"resume={Path(last).parents[1]}` (its overrides are reapplied; add e.g. "
            "trainer.max_epochs=N to change them)"
        )
    return f"training stopped ({why}) in epoch {trainer.current_epoch}; no checkpoint was saved"


def fit(trainer: L.Trainer, model: Any, dm: Any, cfg: DictConfig) -> None:
    """trainer.fit, with every way a run stops turned into what was kept and how to go on."""
    trust = bool(cfg.get("trust_checkpoint"))  # unpickle checkpoints in full (opt-in)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=not trust)
    except Requeue:  # SLURM's requeue signal: last.ckpt saved, the job requeued (by rank 0)
        ckpt = next((c for c in trainer.callbacks if isinstance(c, Checkpoint)), None)
        # no rank exits before rank 0 has requeued: with KillOnBadExit=1 srun would kill rank 0
        # at the first non-zero exit, and the job would end without being requeued
        trainer.strategy.barrier("requeued")
        if not trainer.is_global_zero:
            sys.exit(143)  # rank 0 says what happened, once
        if ckpt is not None and ckpt.requeued:
            print(
                f"error: training stopped (SLURM requeue signal) in epoch "
                f"{trainer.current_epoch}; saved {ckpt.last_model_path}; SLURM job "
                f"{ckpt.requeue_job} is requeued: it runs the job script again and continues "
                "from there in the same run directory",
                file=sys.stderr,
            )
        else:  # scontrol failed (logged): how to go on by hand
            print(f"error: {stopped_message(trainer, 'SLURM requeue signal')}", file=sys.stderr)
        sys.exit(143)
    except SIGTERMException:  # preemption / scancel: last.ckpt saved, exit 143 for a requeue
        print(f"error: {stopped_message(trainer, 'SIGTERM')}", file=sys.stderr)
        sys.exit(143)
    except OSError as e:  # a full disk or a vanished folder while writing a checkpoint or log
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(
            f"training stopped: {e.strerror or e}{where}. Checkpoints already written are "
            "complete (each is written to a temporary file, then renamed); free space or point "
            f"the run elsewhere, then resume. {stopped_message(trainer, 'I/O error')}"
        ) from None
    except SystemExit:  # Lightning turns Ctrl-C into exit(1) after saving last.ckpt
        if not trainer.interrupted:
            raise
        print(f"error: {stopped_message(trainer, 'Ctrl-C')}", file=sys.stderr)
        sys.exit(130)
    if trainer.interrupted:
        raise UserError(stopped_message(trainer, "interrupted"))


FEATURE_FACTS = ("encoder", "weights", "num_images", "seconds", "images_per_second", "device")


def run_facts(trainer: L.Trainer, dm: Any) -> dict[str, Any]:
    """What the run did besides its scores: the best checkpoint, epoch times, the feature cache."""
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    facts: dict[str, Any] = {"best_checkpoint": best}
    curves = next((c for c in trainer.callbacks if hasattr(c, "epoch_seconds")), None)
    if curves is not None:
        facts["epoch_seconds"] = curves.epoch_seconds
    if dm.cache is not None:
        m = dm.cache.manifest
        facts["features"] = {
            "directory": str(dm.cache.directory),
            **{k: m.get(k) for k in (*FEATURE_FACTS, "bad_files")},
        }
    return facts
