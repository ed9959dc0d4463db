"""The sweeper: ask Optuna for a trial, launch it as a Hydra job, tell Optuna its return value."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import config as _registers_config  # noqa: F401  (hydra/sweeper=optuna)

log = logging.getLogger(__name__)


def distribution(override: Override) -> optuna.distributions.BaseDistribution | None:
    """Hydra sweep syntax -> an Optuna distribution (None for a plain, fixed value)."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        step = int(value.step) if value.step else 1
        return optuna.distributions.IntDistribution(
            int(value.start), int(value.stop) - 1, step=step
        )
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(
            float(value.start), float(value.end), log=log_scale
        )
    if override.is_sweep_override():
        raise ValueError(f"unsupported sweep for Optuna: {override.input_line}")
    return None


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        direction: str = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        study_name: str | None = None,
        storage: str | None = None,
        sampler: Any = None,
        params: dict | None = None,
    ) -> None:
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, max(1, n_jobs)
        self.study_name, self.storage = study_name, storage
        self.sampler_cfg = sampler
        self.params = dict(params or {})

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        parser = OverridesParser.create()
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)  # CLI wins
        space: dict[str, optuna.distributions.BaseDistribution] = {}
        fixed: dict[str, str] = {}
        for ov in parser.parse_overrides(lines):
            key = ov.get_key_element()
            dist = distribution(ov)
            if dist is None:
                fixed[key] = ov.get_value_element_as_str()
                space.pop(key, None)
            else:
                space[key] = dist
                fixed.pop(key, None)
        sampler = self.sampler_cfg  # Hydra instantiates the nested `_target_` recursively
        if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
            sampler = instantiate(sampler)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=sampler,
            direction=self.direction,
            load_if_exists=bool(self.storage),
        )
        log.info(
            "Optuna study %s: %d trials over %s", study.study_name, self.n_trials, sorted(space)
        )
        done = 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [
                tuple(f"{k}={v}" for k, v in fixed.items())
                + tuple(f"{k}={t.params[k]}" for k in space)
                for t in trials
            ]
            # n_jobs trials at once: one launch, which submitit runs as one job array
            results = self.launcher.launch(batch, initial_job_idx=done)
            for i, (trial, ret) in enumerate(zip(trials, results, strict=True)):
                self._tell(study, trial, ret, job=done + i)
            done += len(trials)
        self._write_results(study)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: Any, job: int) -> None:
        """Record one trial's result; a failed trial is marked FAIL with its reason and the
        study goes on (imcap's trial_guard returns a TrialFailure instead of raising)."""
        from imcap.pipeline.hydra_callbacks import TrialFailure

        trial.set_user_attr("job", job)
        try:
            value = ret.return_value  # re-raises the job's exception (a task without the guard)
        except Exception as e:  # noqa: BLE001 - a failed trial must not end the study
            value = TrialFailure(tuple(ret.overrides or ()), f"{type(e).__name__}: {e}")
        if value is None:
            value = TrialFailure((), "the run returned no value for the optimized metric")
        if isinstance(value, TrialFailure):
            log.warning("trial %d (job %d) failed: %s", trial.number, job, value.error)
            trial.set_user_attr("error", value.error)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, float(value))

    def _write_results(self, study: optuna.Study) -> None:
        out = Path(self.config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        result: dict[str, Any] = {
            "name": "optuna",
            "direction": self.direction,
            "n_trials": len(study.trials),
        }
        if completed:
            result |= {"best_params": study.best_params, "best_value": study.best_value}
        result["trials"] = [  # every trial: its job folder, values and state (FAIL: why)
            {
                "number": t.number,
                "job": t.user_attrs.get("job"),
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
            }
            for t in study.trials
        ]
        OmegaConf.save(OmegaConf.create(result), out / "optimization_results.yaml")
        failed = sum(t["state"] == "FAIL" for t in result["trials"])
        best = {k: v for k, v in result.items() if k.startswith("best")}
        log.info("best: %s (%d failed trial(s); every trial in %s)", best, failed, out)
