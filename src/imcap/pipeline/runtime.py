"""Run-time helpers every entry point shares (train, eval, caption, export, the demo): quiet
logs, plain config values, the run directory, checkpoints loaded alone or as an ensemble, and
decoding options from the command line."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from imcap.errors import UserError
from imcap.model.checkpoint import load_captioner
from imcap.model.module import Captioner, check_decoding

log = logging.getLogger(__name__)


# Known and harmless, printed by every run (so people stop reading warnings): silenced here.
_HARMLESS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a torch API it will update
    r"Found \d+ module\(s\) in eval mode.*",  # the frozen encoder stays in eval mode on purpose
    r"Precision .* is not supported by the model summary.*",  # the size column is approximate
    r"Detected pickle protocol \d+ in the checkpoint.*",  # Lightning writes protocol 4; loads fine
    # DDP: caption scores are computed once from every rank's gathered captions and broadcast
    # (Captioner._score), so each rank logs the same global value; nothing to all-reduce
    r"It is recommended to use `self.log\('(val|val_best|test)/[^']+', \.\.\., sync_dist=True\)`.*",
    # DDP validate/test: the sampler pads with repeated images; _score keeps each image once
    r"Using `DistributedSampler` with the dataloaders\. During `trainer\.(validate|test)\(\)`.*",
)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.lstrip().startswith("💡") or "litlogger" in msg or "litmodels" in msg)


def quiet_known_noise() -> None:
    """Silence warnings a user cannot act on; everything else still prints."""
    for pattern in _HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())


def plain(cfg: Any) -> Any:
    """OmegaConf -> plain Python containers (what checkpoints and constructors get)."""
    return (
        OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, DictConfig | ListConfig)
        else cfg
    )


def output_dir(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a name of its own: under torchrun/srun every process probes the shared run dir at once
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write_test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"cannot write the run directory {out}: {e.strerror}; choose another with "
            "hydra.run.dir=<dir> (or paths.log_dir=<dir>), or free space there"
        ) from None
    return out


def load_models(ckpt_path: Any, map_location: str = "cpu", trust: bool = False) -> Captioner:
    """`ckpt_path`: one checkpoint, or a list of them decoded as an ensemble (the mean of their
    word distributions at every step; the first one's decoding settings)."""
    ckpt_path = plain(ckpt_path)
    if not isinstance(ckpt_path, list | tuple):
        return load_captioner(str(ckpt_path), map_location=map_location, trust=trust)
    paths = [str(p) for p in ckpt_path]
    if not paths:
        raise UserError("ckpt_path=[] names no checkpoint: give one path, or a list of them")
    models = [load_captioner(p, map_location=map_location, trust=trust) for p in paths]
    models[0].join(models[1:], paths)
    log.info("ensemble of %d checkpoints: %s", len(paths), ", ".join(paths))
    return models[0]


def apply_decoding_overrides(model: Captioner, cfg: DictConfig) -> None:
    for key, value in (plain(cfg.get("model")) or {}).items():
        if value is None:
            continue
        if key not in model.decoding:
            raise UserError(f"unknown decoding option model.{key}; known: {sorted(model.decoding)}")
        try:
            model.decoding[key] = type(model.decoding[key])(value)
        except (TypeError, ValueError):
            raise UserError(f"model.{key}={value!r} is not a number") from None
    check_decoding(model.decoding)
