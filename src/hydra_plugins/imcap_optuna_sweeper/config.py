"""Structured config registered as `hydra/sweeper: optuna`.

(No `from __future__ import annotations` here: Hydra imports plugin modules in a way that
breaks dataclasses with string annotations, and OmegaConf needs real types.)
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf structured-config types

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.imcap_optuna_sweeper.sweeper.OptunaSweeper"
    direction: str = "maximize"  # or minimize
    n_trials: int = 20
    # trials launched together per batch: in parallel with hydra/launcher=local or slurm (one
    # submitit job array per batch); one after another with the basic launcher
    n_jobs: int = 1
    study_name: Optional[str] = None  # noqa: UP045
    storage: Optional[str] = None  # noqa: UP045 - e.g. sqlite:///optuna.db to resume or share a study
    sampler: Dict[str, Any] = field(  # noqa: UP006
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0}
    )
    # search space, in Hydra's sweep syntax: interval(1e-4, 1e-2), tag(log, interval(...)),
    # choice(lstm, gru), range(1, 4) -> float / log-float / categorical / int parameters
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="imcap"
)
