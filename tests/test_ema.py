"""The weight-average callback (callbacks.ema): its arithmetic, what validation and checkpoints
see, resuming, and a real fit whose checkpoint holds the average."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import compose_train, run_dir, tiny_overrides

from imcap.errors import UserError
from imcap.pipeline.callbacks import EMA


def toy() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    m[0].bias.requires_grad_(False)  # frozen: never moves, so not tracked
    return m


def step(ema: EMA, m: torch.nn.Module, trainer: SimpleNamespace, value: float) -> None:
    """One optimizer step that sets the weight to `value`, then the callback's update."""
    trainer.global_step += 1
    m[0].weight.data.fill_(value)
    m[1].running_mean.fill_(value)
    ema.on_train_batch_end(trainer, m, None, None, 0)


def test_ema_averages_swaps_for_validation_and_saves_the_average() -> None:
    m, ema, trainer = toy(), EMA(decay=0.5), SimpleNamespace(global_step=0)
    ema.on_fit_start(trainer, m)
    assert set(ema.shadow) == {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    expected, mean = m[0].weight.detach().clone(), torch.zeros(2)
    for n, value in enumerate([1.0, 3.0, -2.0], start=1):
        step(ema, m, trainer, value)
        d = min(0.5, (1 + n) / (10 + n))  # warm-up: early updates weigh the new weights more
        expected, mean = d * expected + (1 - d) * value, d * mean + (1 - d) * value
    ema.on_train_batch_end(trainer, m, None, None, 1)  # same global step (accumulation): no update
    assert torch.allclose(ema.shadow["0.weight"], expected)
    assert torch.allclose(ema.shadow["1.running_mean"], mean)

    ema.on_validation_epoch_start(trainer, m)  # validation sees the average...
    assert torch.allclose(m[0].weight, expected)
    saved = {"state_dict": m.state_dict()}  # ...and a save in the middle of it stays right
    ema.on_save_checkpoint(trainer, m, saved)
    assert torch.allclose(saved["state_dict"]["0.weight"], expected)
    assert torch.all(saved[EMA.RAW_KEY]["0.weight"] == -2.0)
    ema.on_validation_end(trainer, m)  # training goes on from the raw weights
    assert torch.all(m[0].weight == -2.0)

    ckpt = {"state_dict": {k: v.clone() for k, v in m.state_dict().items()}}
    ema.on_save_checkpoint(trainer, m, ckpt)
    assert torch.allclose(ckpt["state_dict"]["0.weight"], expected)
    assert torch.all(ckpt[EMA.RAW_KEY]["0.weight"] == -2.0)
    assert "0.bias" not in ckpt[EMA.RAW_KEY] and "1.num_batches_tracked" not in ckpt[EMA.RAW_KEY]

    # resume: Lightning loads state_dict (the average) into the module, then the callbacks
    m2, ema2 = toy(), EMA(decay=0.5)
    m2.load_state_dict(ckpt["state_dict"])
    ema2.load_state_dict(ema.state_dict())
    ema2.on_load_checkpoint(trainer, m2, ckpt)
    ema2.on_fit_start(trainer, m2)  # after the restore: keeps the restored average
    assert torch.all(m2[0].weight == -2.0)
    assert torch.allclose(ema2.shadow["0.weight"], expected) and ema2.updates == 3

    # an average of other weights (another model's, or a file edited by hand) is refused by name
    odd = {**ckpt, EMA.RAW_KEY: {**ckpt[EMA.RAW_KEY], "9.weight": torch.zeros(2)}}
    with pytest.raises(UserError, match=r"9\.weight.*callbacks.ema.decay=null"):
        EMA(decay=0.5).on_load_checkpoint(trainer, toy(), odd)


def test_ema_of_bf16_weights_is_kept_in_float32() -> None:
    """With bf16 weights the average is kept in float32: small steps still move it."""
    m, ema, trainer = toy().to(torch.bfloat16), EMA(decay=0.999), SimpleNamespace(global_step=0)
    m[0].weight.data.fill_(1.0)
    ema.on_fit_start(trainer, m)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    ema.updates = 10_000  # past the warm-up: decay 0.999, each step moves the average by 1e-3
    for _ in range(3):
        step(ema, m, trainer, 1.5)
    assert ema.shadow["0.weight"][0, 0].item() == pytest.approx(
        1.0 + 0.5 * (1 - 0.999**3), rel=1e-4
    )
    ema.on_validation_epoch_start(trainer, m)
    assert m[0].weight.dtype == torch.bfloat16
    ema.on_validation_end(trainer, m)
    assert torch.all(m[0].weight == 1.5)


def test_ema_off_changes_nothing_and_a_bad_decay_is_refused() -> None:
    m, ema, trainer = toy(), EMA(decay=None), SimpleNamespace(global_step=0)
    ema.on_fit_start(trainer, m)
    step(ema, m, trainer, 1.0)
    ema.on_validation_epoch_start(trainer, m)
    ckpt = {"state_dict": m.state_dict()}
    ema.on_save_checkpoint(trainer, m, ckpt)
    assert ema.shadow is None and EMA.RAW_KEY not in ckpt and torch.all(m[0].weight == 1.0)
    for bad in (1.0, 0.0, -0.5, 1.5):
        with pytest.raises(UserError, match="callbacks.ema.decay"):
            EMA(decay=bad)


def test_fit_with_ema_saves_the_average_and_loads_anywhere(shared) -> None:
    from imcap.model.checkpoint import load_captioner, read_checkpoint
    from imcap.pipeline.run import train

    out = shared / "ema"
    overrides = tiny_overrides(shared, "trainer.max_epochs=2", "callbacks.ema.decay=0.9")
    train(compose_train([*overrides, *run_dir(shared, "ema")]))
    ckpt = read_checkpoint(str(out / "checkpoints" / "last.ckpt"))
    raw, avg = ckpt[EMA.RAW_KEY], ckpt["state_dict"]
    head = "decoder.head.weight"
    assert head in raw and not torch.allclose(raw[head], avg[head])
    assert not any(k.startswith("encoder.") for k in raw)  # the frozen CNN does not move
    model = load_captioner(str(out / "checkpoints" / "last.ckpt"))
    assert torch.equal(model.state_dict()[head], avg[head])

    # a resumed fit continues the average (its update count goes on from the checkpoint's)
    more = tiny_overrides(shared, "trainer.max_epochs=3", "callbacks.ema.decay=0.9")
    last = out / "checkpoints" / "last.ckpt"
    train(compose_train([*more, *run_dir(shared, "ema_resumed"), f"ckpt_path={last}"]))
    resumed = read_checkpoint(str(shared / "ema_resumed" / "checkpoints" / "last.ckpt"))
    n0, n1 = (c["callbacks"]["EMA"]["updates"] for c in (ckpt, resumed))
    assert n1 > n0 > 0 and resumed["epoch"] == 2
