"""Where the configs live, and the checks that make a config mistake one line naming the key.

Defaults live only in `conf/` (the Hydra groups). Code that runs without Hydra (a checkpoint
loaded in a notebook, a test) reads the same files through `conf_defaults`, so a default is
written once.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imcap.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # src/imcap/config.py -> the checkout
CONF_DIR = PROJECT_ROOT / "conf"


def set_project_root() -> None:
    """Entry points call this so configs can find the project root from any working directory."""
    os.environ.setdefault("IMCAP_ROOT", str(PROJECT_ROOT))


def conf_defaults(name: str, section: str | None = None) -> dict[str, Any]:
    """The defaults of `conf/<name>.yaml` (or one section of it) as plain, resolved values."""
    from omegaconf import OmegaConf

    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"config file {path} is missing; run from a full checkout of the project")
    # resolve what the groups interpolate (paths.*, data.vocab.max_len) against their defaults
    root = OmegaConf.create(
        {
            "paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml"),
            "data": OmegaConf.load(CONF_DIR / "data" / "_base.yaml"),
            "x": OmegaConf.load(path),
        }
    )
    node = root.x if section is None else root.x[section]
    return OmegaConf.to_container(node, resolve=True)


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


# -- start-up check of the command line ---------------------------------------------------------
_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def _overrides(argv: Sequence[str]) -> list[str] | None:
    """The key=value overrides of a plain run; None when Hydra must see the line itself."""
    if any(a.startswith("-") for a in argv):  # --multirun, --help, --cfg, -c ...: Hydra's job
        return None
    return [a for a in argv if not a.lstrip("+~").startswith("hydra")]


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
