"""Top-Down attention decoder: shapes, attention, the packed fast path equals step-by-step."""

from __future__ import annotations

import pytest
import torch

from imcap.model.decoders.topdown import TopDownDecoder
from imcap.model.decoding import beam_search, greedy
from imcap.model.encoder import Features

V, C, R = 30, 24, 9


def make(rnn: str, attributes: int = 0) -> TopDownDecoder:
    torch.manual_seed(0)
    return TopDownDecoder(
        V,
        C,
        rnn=rnn,
        embed_dim=12,
        hidden_dim=16,
        attention_dim=10,
        dropout=0.0,
        attributes=attributes,
        feature_dropout=0.0,
        feature_norm="batch",
    ).eval()


def feats(B: int = 4, attributes: int = 0) -> Features:
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(B, R, C, generator=g)
    attrs = torch.rand(B, attributes, generator=g) if attributes else None
    return Features(grid.mean(1), grid, attrs)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("attributes", [0, 7])
def test_packed_teacher_forcing_equals_step_by_step(rnn: str, attributes: int) -> None:
    dec, f = make(rnn, attributes), feats(4, attributes)
    T = 6
    tokens = torch.randint(4, V, (4, T), generator=torch.Generator().manual_seed(2))
    keep = torch.arange(T)[None] < torch.tensor([6, 2, 4, 1])[:, None]  # ragged, unsorted
    out = dec(f, tokens, keep=keep)
    assert out.logits.shape == (int(keep.sum()), V)
    state, ref, alphas = dec.init_state(f), [], []
    for t in range(T):
        logits, state, alpha = dec.step(tokens[:, t], state)
        ref.append(logits)
        alphas.append(alpha)
    torch.testing.assert_close(out.logits, torch.stack(ref, 1)[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.alphas[keep], torch.stack(alphas, 1)[keep], atol=1e-6, rtol=0)
    assert (out.alphas[~keep] == 0).all()


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_attention_sums_to_one_over_regions(rnn: str) -> None:
    dec, f = make(rnn), feats()
    out = dec(f, torch.randint(4, V, (4, 5)))
    assert out.logits.shape == (4, 5, V) and out.alphas.shape == (4, 5, R)
    torch.testing.assert_close(out.alphas.sum(-1), torch.ones(4, 5))
    assert (out.alphas >= 0).all()


def test_gradients_reach_every_parameter() -> None:
    dec, f = make("lstm", 5), feats(3, 5)
    dec.train()
    tokens = torch.randint(4, V, (3, 5))
    keep = torch.arange(5)[None] < torch.tensor([5, 3, 4])[:, None]
    dec(f, tokens, keep=keep).logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == [], missing


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_beam_one_is_greedy_and_beams_score_higher(rnn: str) -> None:
    dec, f = make(rnn), feats(5)
    g = greedy(dec, f, bos=1, eos=2, max_len=8, return_attn=True)
    b1 = beam_search(dec, f, bos=1, eos=2, max_len=8, beam_size=1)
    assert torch.equal(g.tokens, b1.tokens[:, : g.tokens.size(1)])
    torch.testing.assert_close(g.scores, b1.scores)
    b3 = beam_search(dec, f, bos=1, eos=2, max_len=8, beam_size=3, return_attn=True)
    assert (b3.scores >= g.scores - 1e-5).all()  # summed log-probs: a wider beam never loses
    assert b3.alphas.shape[-1] == R
