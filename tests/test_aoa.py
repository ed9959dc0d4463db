"""Attention-on-attention decoder: the Top-Down contract holds (packed teacher forcing equals
step by step, beams), the refiner runs once per distinct image with the same numbers, every
parameter learns."""

from __future__ import annotations

import pytest
import torch

from imcap.config import group_section
from imcap.model.decoders.aoa import AoADecoder
from imcap.model.decoding import beam_search, greedy
from imcap.model.encoder import Features

V, C, R = 30, 24, 9


def make(rnn: str = "lstm", attributes: int = 0, layers: int = 1) -> AoADecoder:
    torch.manual_seed(0)
    return AoADecoder(
        V,
        C,
        rnn=rnn,
        embed_dim=12,
        hidden_dim=16,
        attention_dim=10,
        dropout=0.0,
        attributes=attributes,
        refiner_layers=layers,
        refiner_heads=4,
        refiner_dropout=0.0,
        feature_dropout=0.0,
        feature_norm="batch",
    ).eval()


def feats(B: int = 4, attributes: int = 0) -> Features:
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(B, R, C, generator=g)
    attrs = torch.rand(B, attributes, generator=g) if attributes else None
    return Features(grid.mean(1), grid, attrs)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("attributes,layers", [(0, 1), (7, 2), (0, 0)])
def test_packed_teacher_forcing_equals_step_by_step(rnn: str, attributes: int, layers: int) -> None:
    dec, f = make(rnn, attributes, layers), feats(4, attributes)
    T = 6
    tokens = torch.randint(4, V, (4, T), generator=torch.Generator().manual_seed(2))
    keep = torch.arange(T)[None] < torch.tensor([6, 2, 4, 1])[:, None]  # ragged, unsorted
    out = dec(f, tokens, keep=keep)
    state, ref = dec.init_state(f), []
    for t in range(T):
        logits, state, _ = dec.step(tokens[:, t], state)
        ref.append(logits)
    torch.testing.assert_close(out.logits, torch.stack(ref, 1)[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.alphas.sum(-1)[keep], torch.ones(int(keep.sum())))


def test_refiner_makes_regions_depend_on_each_other() -> None:
    dec, f = make(), feats(2)
    v = dec._regions(f)[0]  # (B, R, H)
    g = f.grid.clone()
    g[:, 0] += 1.0  # change one region only
    v2 = dec._regions(Features(f.pooled, g))[0]
    assert (v2[:, 1:] - v[:, 1:]).abs().amax() > 1e-4  # the others saw it through self-attention


def test_training_runs_per_image_work_once_per_distinct_image() -> None:
    """Captions of one image side by side (group_by_image): same loss and gradients as
    computing each row on its own (no dropout, so the two paths must agree)."""
    dec, base = make("lstm", 5), feats(3, 5)
    rows = torch.tensor([0, 0, 1, 2, 2, 2])  # 6 captions of 3 images
    f = Features(base.pooled[rows], base.grid[rows], base.attrs[rows])
    tokens = torch.randint(4, V, (6, 5), generator=torch.Generator().manual_seed(3))
    calls = []
    hook = dec.refiner.register_forward_hook(lambda m, i, o: calls.append(i[0].size(0)))
    dec.train()  # no dropout in `make`; batch norm uses batch statistics in both paths...
    dec.feat_norm.eval()  # ...so fix them: the deduplicated batch has other statistics
    out = dec(f, tokens)
    assert calls == [3]  # the refiner saw 3 maps, not 6
    grads = torch.autograd.grad(out.logits.logsumexp(-1).sum(), list(dec.parameters()))
    dec.eval()
    ref = dec(f, tokens)
    assert calls == [3, 6]
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    ref_grads = torch.autograd.grad(ref.logits.logsumexp(-1).sum(), list(dec.parameters()))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    hook.remove()


def test_gradients_reach_every_parameter() -> None:
    dec, f = make("lstm", 5, 2), feats(3, 5)
    dec.train()
    tokens = torch.randint(4, V, (3, 5))
    keep = torch.arange(5)[None] < torch.tensor([5, 3, 4])[:, None]
    dec(f, tokens, keep=keep).logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == [], missing


def test_beam_one_is_greedy_and_beams_score_higher() -> None:
    dec, f = make(), feats(5)
    g = greedy(dec, f, bos=1, eos=2, max_len=8)
    b1 = beam_search(dec, f, bos=1, eos=2, max_len=8, beam_size=1)
    assert torch.equal(g.tokens, b1.tokens[:, : g.tokens.size(1)])
    b3 = beam_search(dec, f, bos=1, eos=2, max_len=8, beam_size=3)
    assert (b3.scores >= g.scores - 1e-5).all()


def test_hidden_width_must_split_into_heads() -> None:
    with pytest.raises(ValueError, match="refiner_heads"):
        args = {k: v for k, v in group_section("decoder", "aoa").items() if k != "_target_"}
        AoADecoder(V, C, **{**args, "hidden_dim": 18, "refiner_heads": 4})
