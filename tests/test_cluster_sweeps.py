"""Sweeps on a cluster: trials as separate jobs through Hydra's submitit launcher.

hydra/launcher=local runs each trial as its own process through submitit, the same code path as
hydra/launcher=slurm (which only writes an sbatch script instead): it stands in for a cluster
here, and the slurm config is checked down to the sbatch script it would submit."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, cli
from omegaconf import OmegaConf
from test_scale import FAST, paths, sweep_dir

HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
needs_submitit = pytest.mark.skipif(
    not HAS_SUBMITIT, reason='hydra-submitit-launcher not installed: pip install -e ".[cluster]"'
)
# a short trial, no test split: the sweep machinery is under test, not the model. Without
# decoder.hidden_dim and trainer.max_epochs: the tests sweep them (a later override would win)
TRIAL = [
    *(o for o in FAST if not o.startswith("decoder.hidden_dim=")),
    "encoder.pretrained=false",
    "test=false",
]


def compose_hydra(*overrides: str) -> Any:
    """The train config with its `hydra` section, as `python src/train.py -m ...` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def summary_rows(d: Path) -> dict[str, dict[str, str]]:
    with open(d / "summary.csv", newline="") as fh:
        return {r["job"]: r for r in csv.DictReader(fh)}


def val_cider(job_dir: Path) -> float:
    return json.loads((job_dir / "metrics.json").read_text())["val"]["CIDEr"]


def submitit_jobs(d: Path) -> dict[str, str]:
    """submitit's folder per job (<sweep dir>/.submitit/<job id>/) -> the job's stdout log."""
    logs = {}
    for folder in (d / ".submitit").iterdir():
        if folder.is_dir() and folder.name != "%j":  # %j: submitit's job-independent folder
            (out,) = folder.glob(f"{folder.name}_0_log.out")
            logs[folder.name] = out.read_text()
    return logs


# -- the configs -------------------------------------------------------------------------------
@needs_submitit
@pytest.mark.parametrize(
    "name,launcher",
    [
        ("slurm", "SlurmLauncher"),
        ("submitit_slurm", "SlurmLauncher"),
        ("local", "LocalLauncher"),
        ("submitit_local", "LocalLauncher"),
    ],
)
def test_launcher_options_compose(name: str, launcher: str) -> None:
    """Ours extend upstream's (every upstream key still there), and upstream's names still work."""
    cfg = compose_hydra(f"hydra/launcher={name}", "hydra.launcher.timeout_min=7")
    lc = OmegaConf.to_container(cfg.hydra.launcher)  # unresolved: as the launcher gets it
    assert lc["_target_"] == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{launcher}"
    assert lc["timeout_min"] == 7 and lc["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    if name == "slurm":  # our defaults: one single-GPU trial per job; upstream's keys kept
        assert (lc["gpus_per_node"], lc["tasks_per_node"], lc["mem_gb"]) == (1, 1, 32)
        assert lc["array_parallelism"] == 16 and lc["max_num_timeout"] == 0 and lc["setup"] == []
        assert {"qos", "exclude", "gres", "signal_delay_s", "additional_parameters"} <= set(lc)
    if name == "local":
        assert lc["tasks_per_node"] == 1 and lc["gpus_per_node"] == 0


@needs_submitit
def test_slurm_option_writes_the_sbatch_script_users_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hydra/launcher=slurm + the keys users set -> upstream's launcher -> submitit's sbatch
    script, with sbatch/srun faked: 16 trials are one array of 16, at most 4 at once, with the
    partition, GPU, CPU, memory, time limit, early signal and setup lines given."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks srun is there
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    submitted: list[str] = []

    def sbatch(self: Any, *args: Any, **kwargs: Any) -> str:
        assert self.command[0] == "sbatch", self.command
        submitted.append(Path(self.command[-1]).read_text())
        return "Submitted batch job 4242\n"

    monkeypatch.setattr(submitit.core.utils.CommandFunction, "__call__", sbatch)
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda job: [job.job_id])

    cfg = compose_hydra(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.array_parallelism=4",
        "hydra.launcher.cpus_per_task=6",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.setup=[module load cuda/12.4,'export IMCAP_DATA_DIR=/scratch/data']",
        "+hydra.launcher.additional_parameters.constraint=a100",
        f"paths.log_dir={tmp_path / 'logs'}",
        "hydra.job.name=train",
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    jobs = launcher.launch([[f"seed={i}"] for i in range(16)], initial_job_idx=0)
    assert jobs == [f"4242_{i}" for i in range(16)]  # one array, one job per trial
    (script,) = submitted
    for line in (
        "#SBATCH --array=0-15%4",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --constraint=a100",
        "module load cuda/12.4\nexport IMCAP_DATA_DIR=/scratch/data\n",
    ):
        assert line in script, f"{line!r} not in\n{script}"
    sweep = Path(str(cfg.hydra.sweep.dir))  # per-trial logs: .submitit/<array>_<index>/
    assert f"--output={sweep}/.submitit/%A_%a/%A_%a_0_log.out" in script


def test_missing_extra_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from imcap import cli as imcap_cli

    imcap_cli.check_launcher(["-m", "hydra/launcher=basic"])  # not submitit: nothing to check
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    imcap_cli.check_launcher(["-m", "seed=1,2"])  # no launcher chosen: nothing to check
    with pytest.raises(SystemExit) as exc:
        imcap_cli.check_launcher(["-m", "hydra/launcher=slurm", "seed=1,2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hydra/launcher=slurm" in err and ".[cluster]" in err


# -- real sweeps, each trial a separate process ------------------------------------------------
@needs_submitit
def test_submitit_trials_run_as_jobs_and_a_failed_one_is_reported(tmp_path: Path) -> None:
    """3 trials through submitit (one bad: decoder.hidden_dim=-1): each runs as its own job with
    its own submitit log; the good ones write their run dirs and metrics; the summary, written
    by the launching process, ranks them by val/CIDEr and names the failed one and its error;
    the exit code says a trial failed."""
    r = cli(
        "train.py",
        "-m",
        "hydra/launcher=local",
        "decoder.hidden_dim=32,-1,48",
        "trainer.max_epochs=1",
        *TRIAL,
        *paths(tmp_path),
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: 1 trial(s) failed: 1 (decoder.hidden_dim=-1)" in r.stderr, r.stderr[-3000:]
    d = sweep_dir(tmp_path)
    for job in ("0", "2"):
        assert (d / job / "metrics.json").is_file() and (d / job / "checkpoints").is_dir()
    assert not (d / "1" / "metrics.json").exists()
    failed = json.loads((d / "1" / "failed.json").read_text())
    assert "decoder.hidden_dim=-1" in failed["overrides"]
    assert failed["error"].startswith("RuntimeError") and "Traceback" in failed["traceback"]

    logs = submitit_jobs(d)  # one submitit job (its own process: a job id each) per trial
    assert len(logs) == 3
    for job in ("0", "1", "2"):  # each trial's output went to exactly one job's log
        owners = [i for i, text in logs.items() if f"multiruns/{d.name}/{job}" in text]
        assert len(owners) == 1, (job, owners)
    assert any("trial 1 failed" in text for text in logs.values())

    rows = summary_rows(d)
    assert [rows[j]["status"] for j in "012"] == ["ok", "failed", "ok"]
    for job in ("0", "2"):
        assert float(rows[job]["val/CIDEr"]) == round(100 * val_cider(d / job), 2)
    assert rows["1"]["overrides"] == "decoder.hidden_dim=-1"
    assert rows["1"]["error"] == failed["error"] and rows["1"]["val/CIDEr"] == ""
    md = (d / "summary.md").read_text()
    assert "| failed |" in md and md.count("| ok |") == 2


def test_basic_launcher_runs_the_trials_after_failed_ones(tmp_path: Path) -> None:
    """Hydra's basic launcher: a trial's UserError used to exit the whole sweep at once (exit 2
    from the entry point's handler) and any other error was re-raised after its batch, dropping
    the later batches and the summary. Now 3 failing trials of 4, one per batch, are each
    reported with their error, and the last batch still trains."""
    r = cli(
        "train.py",
        "-m",
        "decoder.hidden_dim=-1,32",
        "trainer.max_epochs=0,1",  # 0: a UserError before any work; hidden -1: a RuntimeError
        "hydra.sweeper.max_batch_size=1",  # one trial per batch: the good one comes last
        *TRIAL,
        *paths(tmp_path),
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: 3 trial(s) failed: 0 (" in r.stderr, r.stderr[-3000:]
    d = sweep_dir(tmp_path)
    rows = summary_rows(d)
    assert [rows[j]["status"] for j in "0123"] == ["failed", "failed", "failed", "ok"]
    # a UserError's own message (it names the key and the fix); others: the type and message
    assert rows["0"]["error"].startswith("trainer.max_epochs must be a whole number")
    assert rows["1"]["error"].startswith("RuntimeError")
    assert rows["1"]["overrides"] == "decoder.hidden_dim=-1 trainer.max_epochs=1"
    assert float(rows["3"]["val/CIDEr"]) == round(100 * val_cider(d / "3"), 2)


def test_a_failing_single_run_still_raises(tmp_path: Path) -> None:
    """The guard is for multiruns only: a single run's error ends it as before (exit != 0)."""
    r = cli("train.py", "decoder.hidden_dim=-1", "trainer.max_epochs=1", *TRIAL, *paths(tmp_path))
    assert r.returncode not in (0, None) and "negative dimension" in r.stderr, r.stderr[-2000:]
    (run,) = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert not (run / "failed.json").exists()


# -- Optuna with trials in parallel ------------------------------------------------------------
def intervals(d: Path, jobs: range) -> list[tuple[float, float]]:
    """(start, end) of each trial: its config is saved as the job starts (in the job's process),
    its metrics.json as the run ends."""
    return [
        ((d / str(j) / ".hydra" / "overrides.yaml").stat().st_mtime, (d / str(j) / "metrics.json").stat().st_mtime)
        for j in jobs
    ]  # fmt: skip


@needs_submitit
def test_optuna_trials_run_in_parallel_through_submitit(tmp_path: Path) -> None:
    """hparams_search, 4 trials with n_jobs=2 through submitit: each batch of 2 trials runs at
    once (their runs overlap in time; the next batch starts after both end) and the study
    records every trial's value: the val/CIDEr its run dir holds."""
    n_trials = 4
    r = cli(
        "train.py",
        "-m",
        "hparams_search=synthetic_optuna",
        "hydra/launcher=local",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.n_jobs=2",
        "decoder.hidden_dim=32",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        *TRIAL,
        *paths(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = sweep_dir(tmp_path)
    assert len(submitit_jobs(d)) == n_trials
    result = yaml.safe_load((d / "optimization_results.yaml").read_text())
    trials = result["trials"]
    assert [t["job"] for t in trials] == list(range(n_trials))
    assert all(t["state"] == "COMPLETE" for t in trials)
    for t in trials:
        assert t["value"] == pytest.approx(val_cider(d / str(t["job"])))
    assert result["best_value"] == max(t["value"] for t in trials)
    rows = summary_rows(d)
    assert sorted(rows) == [str(j) for j in range(n_trials)]

    for batch in range(0, n_trials, 2):
        (s0, e0), (s1, e1) = intervals(d, range(batch, batch + 2))
        assert max(s0, s1) < min(e0, e1), "the 2 trials of a batch did not overlap"
        if batch:
            assert min(s0, s1) > max(e for _, e in intervals(d, range(batch - 2, batch)))


def test_optuna_sweeper_keeps_every_trial_when_one_fails(tmp_path: Path) -> None:
    """A trial that returns a TrialFailure (imcap's guard) or raises (a task without it) is a
    FAIL with its reason in optimization_results.yaml; the study goes on and the best value is
    the best of the trials that finished."""
    from omegaconf import OmegaConf

    from hydra_plugins.imcap_optuna_sweeper.sweeper import OptunaSweeper
    from imcap.pipeline.hydra_callbacks import TrialFailure

    class Ret:
        def __init__(self, overrides: list[str], value: Any) -> None:
            self.overrides, self._value = overrides, value

        @property
        def return_value(self) -> Any:
            if isinstance(self._value, Exception):
                raise self._value
            return self._value

    launched: list[tuple[int, int]] = []

    class Launcher:
        def launch(self, batch: list[tuple[str, ...]], initial_job_idx: int) -> list[Ret]:
            launched.append((initial_job_idx, len(batch)))
            rets = []
            for i, overrides in enumerate(batch, start=initial_job_idx):
                x = float(dict(o.split("=") for o in overrides)["x"])
                value = {1: TrialFailure(overrides, "UserError: bad x"), 2: RuntimeError("boom")}
                rets.append(Ret(list(overrides), value.get(i, x)))
            return rets

    sweeper = OptunaSweeper(
        n_trials=4,
        n_jobs=2,
        sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0},
        params={"x": "interval(0, 1)"},
    )
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweeper.launcher = Launcher()
    sweeper.sweep([])
    assert launched == [(0, 2), (2, 2)]  # n_jobs trials per launch
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    states = [(t["job"], t["state"], t.get("error")) for t in result["trials"]]
    assert states == [
        (0, "COMPLETE", None),
        (1, "FAIL", "UserError: bad x"),
        (2, "FAIL", "RuntimeError: boom"),
        (3, "COMPLETE", None),
    ]
    done = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    for t in done:
        assert t["value"] == pytest.approx(t["params"]["x"])
    assert result["best_value"] == max(t["value"] for t in done)


def test_summary_of_a_sweep_folder_after_the_fact(tmp_path: Path) -> None:
    """`python -m imcap.pipeline.hydra_callbacks <sweep dir>` (when the launching process never
    wrote the summary): finished trials ranked on the sweep's optimized_metric, a trial's own
    error from failed.json, a killed trial (no files) named as stopped, exit 1."""
    import subprocess
    import sys

    from imcap.pipeline.hydra_callbacks import NO_RESULT

    (tmp_path / "multirun.yaml").write_text("optimized_metric: val/BLEU-1\n")
    scores = {"0": {"CIDEr": 0.5, "BLEU-1": 0.9}, "1": {"CIDEr": 0.7, "BLEU-1": 0.2}}
    for job in "0123":
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n- lr=1\n")
        if job in scores:
            result = {"val": scores[job], "total_seconds": 3.0}
            (tmp_path / job / "metrics.json").write_text(json.dumps(result))
    (tmp_path / "2" / "failed.json").write_text(json.dumps({"error": "UserError: bad | value"}))
    r = subprocess.run(
        [sys.executable, "-m", "imcap.pipeline.hydra_callbacks", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "2 trial(s) failed: 2, 3" in r.stderr, r.stderr[-2000:]
    rows = summary_rows(tmp_path)
    assert rows["2"]["error"] == "UserError: bad | value" and rows["3"]["error"] == NO_RESULT
    assert rows["0"]["overrides"] == "seed=0"  # only what differs between trials
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "Scores x100, best val/BLEU-1 first"
    order = [line.split(" | ")[0].strip("| ") for line in md[4:]]
    assert order[:2] == ["0", "1"] and "UserError: bad / value" in md[-2] + md[-1]


def test_eval_and_caption_sweeps_are_not_reported_failed(tmp_path: Path) -> None:
    """eval.py writes metrics_<split>.json, caption.py no scores at all: neither is a trial
    "stopped" for want of train.py's metrics.json; a training trial without one still is."""
    from imcap.pipeline.hydra_callbacks import NO_RESULT, collect

    def job(n: str, task: str) -> Path:
        (tmp_path / n / ".hydra").mkdir(parents=True)
        (tmp_path / n / ".hydra" / "overrides.yaml").write_text(f"- model.beam_size={n}\n")
        (tmp_path / n / ".hydra" / "hydra.yaml").write_text(
            f"hydra:\n  job:\n    config_name: {task}\n"
        )
        return tmp_path / n

    scores = {"split": "val", "scores": {"CIDEr": 0.61, "BLEU-4": 0.2}}
    (job("1", "eval") / "metrics_val.json").write_text(json.dumps(scores))
    job("2", "caption")
    job("3", "eval")  # an eval trial that wrote nothing: stopped
    job("4", "train")
    rows = {r["job"]: r for r in collect(tmp_path)}
    assert rows["1"]["status"] == "ok" and rows["1"]["val/CIDEr"] == 61.0
    assert rows["2"]["status"] == "ok"
    assert rows["3"]["error"] == NO_RESULT and rows["4"]["error"] == NO_RESULT


def test_a_trial_run_again_is_judged_by_its_new_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed trial continued in its own run dir (resume=) that now succeeds must not keep
    the old failed.json: the summary would still call it failed."""
    from hydra.core.hydra_config import HydraConfig

    from imcap.pipeline import hydra_callbacks as hc

    hydra_cfg = OmegaConf.create(
        {
            "runtime": {"output_dir": str(tmp_path)},
            "overrides": {"task": ["x=1"]},
            "job": {"num": 0},
        }
    )
    monkeypatch.setattr(hc, "in_multirun", lambda: True)
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg))

    def boom(cfg: Any) -> float:
        raise RuntimeError("boom")

    failure = hc.trial_guard(boom)(OmegaConf.create({}))
    assert isinstance(failure, hc.TrialFailure) and (tmp_path / hc.FAILED).exists()
    assert hc.trial_guard(lambda cfg: 0.5)(OmegaConf.create({})) == 0.5
    assert not (tmp_path / hc.FAILED).exists()
