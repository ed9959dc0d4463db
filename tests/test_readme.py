"""Every command in README's shell blocks runs as written: each `python src/<task>.py ...` line
composes (the keys and groups exist), a train line's encoder can get the weights it names,
`--help` answers, and the `make` targets it names exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from imcap.config import CONF_DIR
from imcap.model.encoder import PYPI_WEIGHTS

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(?:bash|sh)\n(.*?)^```", README, re.S | re.M)
LINES = [ln.split("  #")[0].strip() for b in BLOCKS for ln in b.splitlines() if ln.strip()]
COMMANDS = [ln for ln in LINES if ln.startswith("python src/")]
TASK_CONFIG = {t: t for t in ("train", "eval", "caption", "export", "prepare", "serve")}


def overrides(line: str) -> tuple[str, list[str]]:
    """`python src/eval.py ckpt_path=<ckpt> [split=val]` -> ("eval", [ckpt_path=x.ckpt, split=val])."""
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("<", "").replace(">", ""))
    task = words[1].removeprefix("src/").removesuffix(".py")
    args = [w for w in words[2:] if not w.startswith("-")]
    return task, args


def first_trial(words: list[str]) -> list[str]:
    """A sweep's command line -> its first trial's overrides (the first value of every sweep),
    which `compose` accepts; Hydra's own parser reads the sweep syntax."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([w for w in words if not w.startswith("-")])
    out = []
    for ov in parsed:
        if ov.is_sweep_override():
            if ov.value_type is not None and "interval" in str(ov.value_type).lower():
                out.append(f"{ov.get_key_element()}={ov.value().start}")  # type: ignore[union-attr]
                continue
            value = next(iter(ov.sweep_string_iterator()))
            out.append(f"{ov.get_key_element()}={value}")
        else:
            out.append(ov.input_line)
    return out


def test_readme_has_the_commands_this_test_checks() -> None:
    assert len(COMMANDS) >= 8 and any("eval.py" in c for c in COMMANDS)


@pytest.mark.parametrize("line", [c for c in COMMANDS if "--help" not in c])
def test_readme_command_composes(line: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    task, args = overrides(line)
    if task == "prepare" or "='[" in line:  # a Hydra list (archives=[a,b]): keep the brackets
        args = shlex.split(line)[2:]
    multirun = "-m" in shlex.split(line) or "--multirun" in shlex.split(line)
    if multirun:
        args = first_trial(shlex.split(line)[2:])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=TASK_CONFIG[task], overrides=args, return_hydra_config=multirun)
    if task == "train" and cfg.encoder.pretrained == "pypi":
        assert cfg.encoder.name in PYPI_WEIGHTS, f"{line}: no PyPI weights for {cfg.encoder.name}"


@pytest.mark.parametrize("line", [c for c in COMMANDS if "--help" in c])
def test_readme_help_command_runs(line: str) -> None:
    res = subprocess.run(
        [sys.executable, *shlex.split(line)[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0 and "Most used" in res.stdout, res.stderr[-500:]


def test_readme_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = {ln.split()[1] for ln in LINES if ln.startswith("make ")}
    assert targets >= {"train", "test", "recipe"}
    for t in targets:
        assert re.search(rf"^{re.escape(t)}:", makefile, re.M), f"README names `make {t}`"
