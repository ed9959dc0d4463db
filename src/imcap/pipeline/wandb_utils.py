"""W&B logger setup: online with an API key, otherwise offline with the sync command printed."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def has_api_key() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(lcfg: DictConfig, cfg: DictConfig):
    """Instantiate the WandbLogger, switching to offline mode when no key is configured."""
    overrides = {}
    if not lcfg.get("offline") and not has_api_key() and os.environ.get("WANDB_MODE") != "online":
        overrides["offline"] = True
        run_dir = Path(lcfg.save_dir) / "wandb"
        log.warning(
            "no W&B API key: logging offline. Upload later with: wandb sync %s/offline-run-*",
            run_dir,
        )
        print(f"W&B: offline run; upload later with `wandb sync {run_dir}/offline-run-*`")
    group = sweep_group()
    if group and not lcfg.get("group"):
        overrides["group"] = group  # one W&B group per sweep
    Path(lcfg.save_dir).mkdir(parents=True, exist_ok=True)
    return instantiate(lcfg, **overrides)


def sweep_group() -> str | None:
    """`sweep-<sweep dir name>` inside a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(hc.sweep.dir).name}"
