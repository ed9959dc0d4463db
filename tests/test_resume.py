"""resume=<run dir>|auto continues a run in its own directory: its overrides, its last.ckpt, one
metrics.csv and one curve history with every epoch once; bad resumes are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import cli, compose_train, tiny_overrides

from imcap.config import resume_overrides
from imcap.errors import UserError


def val_epochs(run: Path) -> list[int]:
    with (run / "csv" / "metrics.csv").open() as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh) if r.get("val/CIDEr")]


@pytest.fixture(scope="module")
def first_run(shared: Path, tmp_path_factory) -> Path:
    """A finished 2-epoch run written where resume=auto looks (<log_dir>/train/runs/<run>)."""
    logs = tmp_path_factory.mktemp("logs")
    run = logs / "train" / "runs" / "first"
    args = [a for a in tiny_overrides(shared) if not a.startswith("paths.output_dir=")]
    short = ("+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1", "test=false")
    res = cli("train.py", *args, *short, "trainer.max_epochs=2", f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert val_epochs(run) == [0, 1]
    return run


def test_resume_auto_continues_in_the_same_directory(first_run: Path) -> None:
    logs = first_run.parents[2]
    # only the new length on the command line: the run's own overrides (data, sizes) come back
    res = cli("train.py", "resume=auto", f"paths.log_dir={logs}", "trainer.max_epochs=3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [p.name for p in (logs / "train" / "runs").iterdir()] == ["first"]  # no new run dir
    assert val_epochs(first_run) == [0, 1, 2]  # metrics.csv: every epoch once, none repeated
    with (first_run / "csv" / "metrics.csv").open() as fh:
        lr_steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("lr-AdamW")]
    assert len(lr_steps) == 3 == len(set(lr_steps))  # step-only rows (learning rate) kept too
    state = torch.load(first_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2
    curves = next(v for k, v in state["callbacks"].items() if k == "Curves")
    assert [r["epoch"] for r in curves["history"]] == [0, 1, 2]  # curves.png draws all three
    metrics = json.loads((first_run / "metrics.json").read_text())
    assert len(metrics["epoch_seconds"]) == 3
    assert {p.name for p in (first_run / "samples").glob("val_epoch_*")} == {
        f"val_epoch_00{i}.json" for i in range(3)
    }
    kept = first_run / ".hydra" / "before_resume_1" / "overrides.yaml"
    assert "trainer.max_epochs=2" in kept.read_text()  # the first config is kept, not overwritten


def test_overrides_that_change_the_model_are_refused(first_run: Path) -> None:
    from imcap.pipeline.run import train

    overrides = resume_overrides([f"resume={first_run}", "decoder.hidden_dim=64"])
    assert f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}" in overrides
    with pytest.raises(UserError) as e:
        train(compose_train([o for o in overrides if not o.startswith("hydra.")]))
    assert "\n" not in str(e.value) and "decoder.hidden_dim=256 (here 64)" in str(e.value)


def test_bad_resumes_are_one_line(first_run: Path, tmp_path: Path) -> None:
    def error(*argv: str) -> str:
        with pytest.raises(UserError) as e:
            resume_overrides(list(argv))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "resume=auto: no run under" in error("resume=auto", f"paths.log_dir={tmp_path}")
    empty = tmp_path / "train" / "runs" / "crashed"
    empty.mkdir(parents=True)
    assert "last.ckpt is missing" in error(f"resume={empty}")
    assert "no such run directory" in error(f"resume={tmp_path / 'nope'}")
    ckpt = first_run / "checkpoints" / "last.ckpt"
    assert f"ckpt_path={ckpt}" in error(f"resume={ckpt}")  # a file: says what to use instead
    assert "not both" in error(f"resume={first_run}", f"ckpt_path={ckpt}")
    assert resume_overrides(["trainer.max_epochs=3"]) == ["trainer.max_epochs=3"]  # no resume
    resolved = resume_overrides([f"resume={first_run}"])
    assert resume_overrides(resolved) == resolved  # a DDP worker re-runs the resolved line
    res = cli("train.py", "resume=auto", f"paths.log_dir={tmp_path / 'none'}")  # the entry point
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "resume=auto" in res.stderr


def test_a_resume_reads_its_checkpoint_once(
    first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks (vocabulary, model shape, callback paths) and the fit share one read of
    ckpt_path: the file is unpickled once, not once to check it and again to restore it."""
    import shutil

    from imcap.pipeline.run import train

    run = tmp_path / "copy"
    shutil.copytree(first_run, run)
    ckpt = (run / "checkpoints" / "last.ckpt").resolve()
    reads: list[Path] = []
    real = torch.load

    def counting(f, *a, **k):
        if isinstance(f, str | Path) and Path(f).resolve() == ckpt:
            reads.append(Path(f))
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", counting)
    done = len(val_epochs(run))  # 2, or 3 after the resume=auto test extended the run
    overrides = resume_overrides([f"resume={run}", f"trainer.max_epochs={done + 1}"])
    train(compose_train([o for o in overrides if not o.startswith("hydra.")]))
    assert len(reads) == 1, reads
    assert val_epochs(run)[-1] == done  # it did resume: one more epoch, in the same folder


def test_a_torn_overrides_file_is_read_again_not_taken_for_none(tmp_path: Path) -> None:
    """Under torchrun another rank may read `.hydra/overrides.yaml` while rank 0's Hydra is
    rewriting it: an empty read must not silently drop the run's overrides."""
    import threading
    import time

    from imcap.config import _saved_overrides
    from imcap.errors import UserError

    saved = tmp_path / "overrides.yaml"
    saved.write_text("")  # truncated, not yet written
    threading.Timer(0.3, lambda: saved.write_text("- decoder=gru\n- seed=3\n")).start()
    t = time.monotonic()
    assert _saved_overrides(saved) == ["decoder=gru", "seed=3"]
    assert time.monotonic() - t < 4.0
    saved.write_text("[]\n")  # a run without overrides
    assert _saved_overrides(saved) == []
    saved.write_text("")
    with pytest.raises(UserError, match="holds no list of overrides"):
        _saved_overrides(saved, tries=2)
