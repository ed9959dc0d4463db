"""Optimizer and scheduler from config data: `model.optimizer` and `model.scheduler` are Hydra
partials, so any torch optimizer or scheduler swaps in by config (README: Swapping the optimizer)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from hydra.utils import instantiate
from torch import nn

from imcap.errors import UserError


def configure(
    heads: list[nn.Parameter],
    encoder: list[nn.Parameter],
    hp: Any,
    total_steps: Callable[[], int],
) -> Any:
    """Lightning's `configure_optimizers` value: `hp.optimizer` over the decoder/attribute
    parameters, plus the encoder's at `hp.encoder_lr` when it trains; `hp.scheduler` stepped
    every step (`total_steps` is asked for only when the scheduler takes it)."""
    groups = [{"params": [p for p in heads if p.requires_grad]}]
    enc = [p for p in encoder if p.requires_grad]
    if enc:
        groups.append({"params": enc, "lr": hp.encoder_lr})
    opt = build("model.optimizer", hp.optimizer, groups)
    if not hp.scheduler:
        return opt
    sched = build("model.scheduler", hp.scheduler, opt, total_steps=total_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def build(where: str, spec: dict, *args: Any, **maybe: Callable[[], Any]) -> Any:
    """Instantiate a partial spec and call it with `args` and those of the `maybe` keywords it
    takes (values are thunks, evaluated only then: a StepLR never needs `total_steps`); a bad
    argument is one line naming the config key."""

    def config_error(e: Exception) -> UserError:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return UserError(f"{where} ({spec.get('_target_')}): {first}")

    try:
        factory = instantiate(dict(spec))
        params = inspect.signature(factory.func if hasattr(factory, "func") else factory).parameters
    except Exception as e:  # noqa: BLE001 - an unknown class or a bad spec
        raise config_error(e) from None
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {k: thunk() for k, thunk in maybe.items() if takes_any or k in params}
    try:
        return factory(*args, **extra)
    except (TypeError, ValueError) as e:  # an argument the class does not take, a bad value
        raise config_error(e) from None
