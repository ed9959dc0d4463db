"""Where the configs live, and the checks that make a config mistake one line naming the key.

Defaults live only in the package's `conf/` (the Hydra groups, `imcap/conf`, shipped inside the
wheel; the checkout's top-level `conf` links to it), and only this module and the entry points
read them (Hydra composition): library code receives whole config sections as arguments. Code
that builds a model without a run (a notebook, a test) composes them with `model_sections()`.
Nothing here reads a file relative to the checkout: an installed copy works from any directory.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imcap.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"  # shipped inside the package (pyproject's package-data)


def checkout_root() -> Path | None:
    """The project checkout this package runs from (src/imcap -> the checkout), or None when it
    is an installed copy (site-packages)."""
    root = PACKAGE_DIR.parents[1]
    is_checkout = (root / "pyproject.toml").is_file() and (root / "src" / "imcap").is_dir()
    return root if is_checkout else None


def set_project_root() -> None:
    """Where runs keep data/, .cache/ and outputs/ (paths.root_dir): the checkout when run from
    one (`python src/train.py` anywhere), else the working directory, as Hydra apps do.
    IMCAP_ROOT, when set, wins."""
    os.environ.setdefault("IMCAP_ROOT", str(checkout_root() or Path.cwd()))


def checked(where: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict:
    """`given` over `defaults`; a key the defaults do not have is a UserError naming it."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        keys = ", ".join(f"{where}.{k}" for k in unknown)
        raise UserError(
            f"unknown config key {keys}; valid keys under {where}: {', '.join(defaults)}"
        )
    out = {**defaults, **given}
    for key, default in defaults.items():  # nested sections with known keys (data.vocab ...)
        if isinstance(default, Mapping) and default and isinstance(given.get(key), Mapping):
            out[key] = checked(f"{where}.{key}", given[key], default)
    return out


def complete(where: str, given: Mapping[str, Any] | None, keys: Sequence[str]) -> dict:
    """A config section that must be given whole (its values live once, in conf/): an unknown
    or a missing key is a UserError naming it."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise UserError(
            f"unknown config key {', '.join(f'{where}.{k}' for k in unknown)}; valid keys under "
            f"{where}: {', '.join(keys)}"
        )
    missing = [k for k in keys if k not in given]
    if missing:
        raise UserError(
            f"{where} lacks {', '.join(f'{where}.{k}' for k in missing)}: give the whole section "
            "(imcap.config.model_sections() composes conf/model/default.yaml's)"
        )
    return given


MODEL_SECTIONS = ("optimizer", "scheduler", "encoder_lr", "loss", "decoding", "scst")


def model_sections(overrides: Sequence[str] = (), **given: Any) -> dict[str, Any]:
    """Captioner's keyword arguments for code that builds a model without a run (a notebook, a
    test): conf/model/default.yaml composed as train.py would with `overrides`, and `given`
    (partial sections) on top. An optimizer/scheduler naming another `_target_` replaces the
    default's arguments instead of joining them."""
    out = copy.deepcopy(_model_defaults(tuple(overrides)))
    for k, v in given.items():
        if k not in out:
            raise UserError(f"unknown model section {k!r}; the sections: {', '.join(out)}")
        base = out[k]
        if isinstance(v, Mapping) and isinstance(base, Mapping):
            if "_target_" in base and v.get("_target_", base["_target_"]) != base["_target_"]:
                out[k] = {"_partial_": True, **v}
            else:
                out[k] = checked(f"model.{k}", v, base)
        else:
            out[k] = v
    return out


def group_section(group: str, name: str, **given: Any) -> dict[str, Any]:
    """One option of a config group (`decoder`, `encoder`: conf/<group>/<name>.yaml) composed as
    train.py would, with `given` keys on top (an unknown key is a UserError): the constructor
    arguments of that component for code that builds one without a run."""
    return checked(group, given, copy.deepcopy(_group_defaults(group, name)))


@functools.lru_cache(maxsize=32)
def _group_defaults(group: str, name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = _compose("train", [f"{group}={name}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def data_section(name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """conf/data/<name>.yaml as train.py composes it, plain values: the whole data section of
    a dataset known only by name (a checkpoint written before checkpoints recorded it)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(
        _compose("train", [f"data={name}", *overrides]).data, resolve=True
    )


@functools.lru_cache(maxsize=8)
def _model_defaults(overrides: tuple[str, ...]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(_compose("train", list(overrides)).model, resolve=True)
    return {k: cfg[k] for k in MODEL_SECTIONS}


# -- start-up check of the command line ---------------------------------------------------------
_OVERRIDE = re.compile(r"Could not override '([^']+)'")


CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def user_config_dirs(argv: Sequence[str]) -> list[str]:
    """The folders given with Hydra's `--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`): the
    user's own config groups (experiment/*.yaml, encoder/*.yaml ...) beside the shipped ones."""
    dirs, args = [], list(argv)
    for i, a in enumerate(args):
        if a in CONFIG_DIR_FLAGS and i + 1 < len(args):
            dirs.append(args[i + 1])
        elif a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
    return dirs


def without_config_dirs(argv: Sequence[str]) -> list[str]:
    """The command line without its `--config-dir DIR` flags (they are not overrides)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in CONFIG_DIR_FLAGS:
            skip = True
        elif not a.startswith("--config-dir="):
            out.append(a)
    return out


def _overrides(argv: Sequence[str]) -> list[str] | None:
    """The key=value overrides of a plain run (with `--config-dir` folders as a
    hydra.searchpath override); None when Hydra must see the line itself."""
    args, dirs = without_config_dirs(argv), user_config_dirs(argv)
    if any(a.startswith("-") for a in args):  # --multirun, --help, --cfg, -c ...: Hydra's job
        return None
    out = [a for a in args if not a.lstrip("+~").startswith("hydra") or _is_searchpath(a)]
    if dirs:
        paths = ",".join(f"file://{Path(d).expanduser().resolve()}" for d in dirs)
        out.append(f"hydra.searchpath=[{paths}]")
    return out


def _is_searchpath(override: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == "hydra.searchpath"


def preflight(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Compose the config once before Hydra does; a mistake prints one line and exits 2.

    Hydra reports a misspelt key (`data.bach_size=8`) in six lines without the valid keys."""
    overrides = _overrides(sys.argv[1:] if argv is None else argv)
    if not overrides:
        return
    try:
        _compose(config_name, overrides)
    except Exception as e:  # noqa: BLE001 - any composition error becomes one line
        print(f"error: {describe_error(config_name, overrides, e)}", file=sys.stderr)
        sys.exit(2)


def _compose(config_name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path (conf/
        return compose(config_name, overrides=overrides)  # and any --config-dir) is ours
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def describe_error(config_name: str, overrides: list[str], err: BaseException) -> str:
    chain, e = [], err
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    msg, m = chain[0], _OVERRIDE.search(chain[0])
    if m and any("not in struct" in c for c in chain):
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), "...")
        valid = ""
        try:
            cfg = _compose(config_name, [o for o in overrides if o.split("=", 1)[0] != key])
            from omegaconf import OmegaConf

            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is not None and hasattr(node, "keys"):
                valid = f"; valid keys under {parent or 'the top level'}: {', '.join(node.keys())}"
        except Exception:  # noqa: BLE001 - the list is a courtesy
            pass
        hint = f"; a Trainer argument not in the config is added with +{key}={value}"
        return f"unknown config key '{key}'{valid}" + (hint if key.startswith("trainer.") else "")
    msg = msg.split("Config search path", 1)[0]  # Hydra's search-path dump says nothing useful
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines) or type(err).__name__


# -- resume=<run dir>|auto: continue a run in its own directory ---------------------------------
LAST_CKPT = Path("checkpoints") / "last.ckpt"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(argv: Sequence[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in argv if "=" in a and _key(a) == key]
    return found[-1] if found else None


def newest_run(log_dir: Path) -> Path | None:
    """The train run under `log_dir` whose last.ckpt was written last (None: there is none)."""
    lasts = list((log_dir / "train" / "runs").glob(f"*/{LAST_CKPT.as_posix()}"))
    return max(lasts, key=lambda p: p.stat().st_mtime).parents[1] if lasts else None


def _saved_overrides(saved: Path, tries: int = 20) -> list[str]:
    """A run's `.hydra/overrides.yaml`. Under torchrun/srun, rank 0's Hydra may be rewriting it
    (truncate, write) while another rank reads it: an empty or torn read is retried, never taken
    for "no overrides" (that rank would compose another model)."""
    import time

    from omegaconf import OmegaConf

    for attempt in range(tries):
        text = saved.read_text()
        try:
            value = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else None
        except Exception:  # noqa: BLE001 - a torn write: read it again
            value = None
        if isinstance(value, list):
            return [str(o) for o in value]
        if attempt < tries - 1:
            time.sleep(0.25)
    raise UserError(
        f"{saved} holds no list of overrides (empty or damaged); continue with ckpt_path="
        f"{saved.parent.parent / LAST_CKPT} and the run's overrides given on the command line"
    )


def resume_overrides(argv: Sequence[str]) -> list[str]:
    """`resume=<run dir>|auto` as the overrides that continue that run in place: the run's own
    overrides (its .hydra/overrides.yaml), this command line's on top (`trainer.max_epochs=N`),
    its directory as the output directory and its checkpoints/last.ckpt as ckpt_path. Without
    `resume` the line is returned unchanged."""
    argv = list(argv)
    resume = _value(argv, "resume")
    if resume in (None, "", "null", "None"):
        return argv
    ckpt = _value(argv, "ckpt_path")
    if ckpt not in (None, "", "null", "None"):
        run = Path(os.path.abspath(os.path.expanduser(resume)))
        if Path(ckpt) == run / LAST_CKPT and _value(argv, "paths.output_dir") == str(run):
            return argv  # resolved already: a DDP worker re-running the resolved command line
        raise UserError(
            "give resume=<run dir> (continue in that directory) or ckpt_path=<.ckpt> (a new "
            "directory), not both"
        )
    for key in ("paths.output_dir", "hydra.run.dir"):
        if _value(argv, key) is not None:
            raise UserError(f"resume= continues in the run's own directory: drop {key}=")
    given = [a for a in argv if _key(a) != "resume"]
    if resume == "auto":
        log_dir = Path(str(_compose("train", _overrides(given) or []).paths.log_dir))
        run = newest_run(log_dir)
        if run is None:
            raise UserError(
                f"resume=auto: no run under {log_dir / 'train' / 'runs'} has {LAST_CKPT}; start "
                "one with python src/train.py, or name a run with resume=<run dir>"
            )
    else:
        run = Path(os.path.abspath(os.path.expanduser(resume)))
        if run.is_file():
            raise UserError(
                f"resume={resume} is a file: resume takes a run directory (the folder holding "
                f"{LAST_CKPT}); to start a new directory from a checkpoint use ckpt_path={resume}"
            )
        if not run.is_dir():
            raise UserError(f"resume={resume}: no such run directory")
    if not (run / LAST_CKPT).is_file():
        raise UserError(
            f"resume={resume}: {run / LAST_CKPT} is missing (the run saved no checkpoint); "
            "start a new run, or resume another checkpoint with ckpt_path=<.ckpt>"
        )
    merged: dict[str, str] = {}
    saved = run / ".hydra" / "overrides.yaml"
    if saved.is_file():
        for o in _saved_overrides(saved):
            if _key(o) in ("resume", "ckpt_path", "paths.output_dir") or o.startswith("hydra"):
                continue
            if _key(o) == "trust_checkpoint":  # an opt-in of that command line, not of the run
                print(
                    f"note: {saved} gave {o}; not re-applied (give it on this command line)",
                    file=sys.stderr,
                )
                continue
            merged[_key(o)] = str(o)
    else:
        print(f"note: {saved} not found: only this command line's overrides apply", file=sys.stderr)
    for o in given:
        old = merged.get(_key(o), "")
        prefix = old[: len(old) - len(old.lstrip("+"))] if not o.startswith(("+", "~")) else ""
        merged[_key(o)] = prefix + o  # `+trainer.x=1` then `trainer.x=2`: still an addition
    return [
        *merged.values(),
        f"resume={run}",
        f"ckpt_path={run / LAST_CKPT}",
        f"paths.output_dir={run}",
        f"hydra.run.dir={run}",
    ]
