"""Decoders and decoding: shapes, <eos> handling, beam 1 = greedy, padding never matters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, encoder_args

from imcap.config import group_section
from imcap.model.decoders.show_tell import ShowTellDecoder
from imcap.model.decoding import beam_search, greedy, sample
from imcap.model.encoder import Features

SHOW_TELL = {k: v for k, v in group_section("decoder", "lstm").items() if k != "_target_"}

V, C, B = 30, 16, 4
BOS, EOS = 1, 2


def make(rnn: str, **kw) -> ShowTellDecoder:
    torch.manual_seed(0)
    args = {**SHOW_TELL, "rnn": rnn, "embed_dim": 8, "hidden_dim": 12, "dropout": 0.0, **kw}
    return ShowTellDecoder(V, C, **args).eval()


def feats(b: int = B) -> Features:
    torch.manual_seed(1)
    return Features(torch.randn(b, C))


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_teacher_forced_shapes_and_step_agree(rnn: str, layers: int) -> None:
    dec = make(rnn, num_layers=layers)
    tokens = torch.randint(3, V, (B, 7))
    tokens[:, 0] = BOS
    logits = dec(feats(), tokens).logits
    assert logits.shape == (B, 7, V)
    # the cuDNN fast path and the step-by-step path compute the same thing
    stepped = super(ShowTellDecoder, dec).forward(feats(), tokens).logits
    torch.testing.assert_close(logits, stepped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_loss_ignores_what_sits_in_padding(rnn: str) -> None:
    dec = make(rnn)
    tokens = torch.randint(3, V, (B, 9))
    tokens[:, 0] = BOS
    lengths = torch.tensor([9, 5, 3, 7])
    mask = torch.arange(9)[None] < lengths[:, None]
    tokens[~mask] = 0
    junk = tokens.clone()
    junk[~mask] = torch.randint(3, V, (int((~mask).sum()),))

    def loss(t):
        logits = dec(feats(), t[:, :-1]).logits
        target = tokens[:, 1:]  # the real targets: pad positions are ignored
        return F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=0)

    assert torch.allclose(loss(tokens), loss(junk))
    # and the check can fail: corrupting a real position changes the loss
    bad = tokens.clone()
    bad[0, 2] = (bad[0, 2] + 1) % V
    assert not torch.allclose(loss(tokens), loss(bad))


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_beam_one_equals_greedy(rnn: str) -> None:
    dec = make(rnn)
    g = greedy(dec, feats(), BOS, EOS, max_len=12)
    b = beam_search(dec, feats(), BOS, EOS, max_len=12, beam_size=1)
    width = max(g.tokens.size(1), b.tokens.size(1))
    pad = lambda t: F.pad(t, (0, width - t.size(1)))  # noqa: E731
    assert torch.equal(pad(g.tokens), pad(b.tokens))
    torch.testing.assert_close(g.scores, b.scores)


def test_beam_finds_higher_scoring_captions_than_greedy() -> None:
    dec = make("lstm")
    f = Features(torch.randn(16, C))
    g = greedy(dec, f, BOS, EOS, max_len=10)
    b = beam_search(dec, f, BOS, EOS, max_len=10, beam_size=5)
    assert (b.scores >= g.scores - 1e-5).all()  # sum of log-probs, alpha = 0
    assert (b.scores > g.scores + 1e-4).any()


def test_beam_score_is_sum_of_log_probs() -> None:
    dec = make("gru")
    f = feats()
    b = beam_search(dec, f, BOS, EOS, max_len=8, beam_size=3)
    # rescore the returned captions with teacher forcing: the scores must match
    for i in range(B):
        seq = b.tokens[i]
        n = int((seq != 0).sum())
        inp = torch.cat([torch.tensor([BOS]), seq[: n - 1]])[None]
        logits = dec(Features(f.pooled[i : i + 1]), inp).logits[0]
        logits[:, [0, BOS, 3]] = float("-inf")  # decoding never emits <pad>, <bos> or <unk>
        logp = F.log_softmax(logits, -1)
        total = logp.gather(1, seq[:n, None]).sum()
        torch.testing.assert_close(total, b.scores[i], atol=1e-4, rtol=1e-4)


def test_all_final_beams_come_best_first_with_their_log_probs() -> None:
    """The n-best list (the web demo's beams): the first is the caption decoding returns, the
    rest are distinct and ranked by score, and each log-prob is its words' teacher-forced sum."""
    dec = make("lstm")
    f = feats()
    b = beam_search(dec, f, BOS, EOS, max_len=8, beam_size=4, alpha=0.7)
    assert b.beams.shape[:2] == (B, 4) and b.beam_scores.shape == b.beam_logprobs.shape == (B, 4)
    torch.testing.assert_close(b.beams[:, 0], b.tokens)
    torch.testing.assert_close(b.beam_scores[:, 0], b.scores)
    assert (b.beam_scores[:, :-1] >= b.beam_scores[:, 1:]).all()
    for i in range(B):
        assert len({tuple(t.tolist()) for t in b.beams[i]}) == 4
        for k in range(4):
            seq = b.beams[i, k]
            n = int((seq != 0).sum())
            inp = torch.cat([torch.tensor([BOS]), seq[: n - 1]])[None]
            logits = dec(Features(f.pooled[i : i + 1]), inp).logits[0]
            logits[:, [0, BOS, 3]] = float("-inf")
            total = F.log_softmax(logits, -1).gather(1, seq[:n, None]).sum()
            torch.testing.assert_close(total, b.beam_logprobs[i, k], atol=1e-4, rtol=1e-4)
    g = greedy(dec, f, BOS, EOS, max_len=8)
    torch.testing.assert_close(g.beams[:, 0], g.tokens)
    torch.testing.assert_close(g.beam_logprobs[:, 0], g.scores)


def test_decoding_stops_at_eos_and_pads_after() -> None:
    dec = make("lstm")
    with torch.no_grad():  # make <eos> overwhelmingly likely after the first word
        dec.head.bias.zero_()
        dec.head.bias[EOS] = 5.0
    for out in (greedy(dec, feats(), BOS, EOS, 10), beam_search(dec, feats(), BOS, EOS, 10, 3)):
        for row in out.tokens.tolist():
            assert EOS in row
            after = row[row.index(EOS) + 1 :]
            assert all(t == 0 for t in after)
        assert out.tokens.size(1) < 10


def test_max_len_forces_eos() -> None:
    dec = make("lstm")
    with torch.no_grad():
        dec.head.bias[EOS] = -50.0  # never chooses <eos> on its own
    for out in (greedy(dec, feats(), BOS, EOS, 6), beam_search(dec, feats(), BOS, EOS, 6, 2)):
        assert out.tokens.size(1) == 7
        assert (out.tokens[:, -1] == EOS).all()


def test_length_penalty_prefers_longer_captions() -> None:
    dec = make("lstm")
    f = Features(torch.randn(32, C))
    short = beam_search(dec, f, BOS, EOS, 15, 4, alpha=0.0)
    long = beam_search(dec, f, BOS, EOS, 15, 4, alpha=2.0)
    n = lambda t: (t != 0).sum()  # noqa: E731
    assert n(long.tokens) >= n(short.tokens)


def test_sample_log_probs_have_grad_and_zero_after_eos() -> None:
    dec = make("lstm").train()
    tokens, logp = sample(dec, feats(), BOS, EOS, max_len=8, n=3)
    assert tokens.shape[0] == B * 3 and logp.shape == tokens.shape
    assert logp.requires_grad
    assert (logp[tokens == 0] == 0).all()
    logp.sum().backward()
    assert dec.head.weight.grad is not None


def test_scheduled_sampling_feeds_the_models_own_words() -> None:
    dec = make("lstm")
    tokens = torch.randint(3, V, (B, 8))
    tokens[:, 0] = BOS
    torch.manual_seed(0)
    teacher = dec(feats(), tokens).logits
    torch.manual_seed(0)
    none = super(ShowTellDecoder, dec).forward(feats(), tokens, ss_prob=1e-9).logits
    torch.testing.assert_close(teacher, none, atol=1e-5, rtol=1e-5)  # ~0: still teacher forcing
    own = super(ShowTellDecoder, dec).forward(feats(), tokens, ss_prob=1.0).logits
    torch.testing.assert_close(own[:, 0], teacher[:, 0])  # the first step always sees <bos>
    assert not torch.allclose(own[:, 1:], teacher[:, 1:])  # later steps saw sampled words


def test_scheduled_sampling_ramp() -> None:
    from imcap.config import group_section, model_sections
    from imcap.data.text import Vocab
    from imcap.model.module import Captioner

    m = Captioner(
        Vocab(list(Vocab.SPECIALS) + ["a"]).to_dict(),
        encoder_args("resnet18"),
        group_section("decoder", "lstm", hidden_dim=8, embed_dim=8),
        **model_sections(loss={"ss_prob": 0.4, "ss_ramp_epochs": 4}),
    )
    probs = []
    for epoch in range(6):
        probs.append(m.ss_prob(epoch))
    assert probs == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_no_repeat_ngram_guard_blocks_repeats_and_is_off_by_default() -> None:
    """A decoder that always prefers "a red square a red square ..." (a loop of 3 words)."""
    from imcap.model.decoding import beam_search, greedy, ngram_block

    hist = torch.tensor([[5, 6, 7, 5, 6]])
    assert ngram_block(hist, 3, 10)[0].nonzero().flatten().tolist() == [7]  # "5 6" -> not 7
    assert ngram_block(hist, 2, 10)[0].nonzero().flatten().tolist() == [7]  # "6" -> not 7
    assert not ngram_block(hist, 0, 10).any()

    class Loop(torch.nn.Module):
        uses_grid = False

        def init_state(self, feats):
            return torch.zeros(feats.pooled.size(0), dtype=torch.long)

        def reorder_state(self, state, idx):
            return state[idx]

        def step(self, prev, state):
            logits = torch.full((prev.size(0), 10), -5.0)
            nxt = torch.where(prev == 7, 5, torch.where(prev == 5, 6, 7))  # 5 -> 6 -> 7 -> 5
            logits[torch.arange(prev.size(0)), nxt] = 5.0
            logits[:, 8] = 0.0  # a second choice
            logits[:, 2] = -1.0  # <eos> is possible but unlikely
            return logits, state + 1, None

    feats = Features(torch.zeros(2, 4))
    plain = greedy(Loop(), feats, bos=1, eos=2, max_len=9).tokens[0].tolist()
    assert plain[:6] == [7, 5, 6, 7, 5, 6]  # off by default: the loop repeats
    for decode in (greedy, lambda *a, **k: beam_search(*a, beam_size=3, **k)):
        toks = decode(Loop(), feats, 1, 2, 9, no_repeat_ngram=3).tokens[0].tolist()
        words = [w for w in toks if w not in (0, 2)]
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        assert len(trigrams) == len(set(trigrams)) and len(words) >= 6  # kept going, no repeat


def test_decode_grid_bench_scores_each_value_of_one_option(trained: dict, tmp_path: Path) -> None:
    """bench/decode_grid.py: one checkpoint, one eval per value of a decoding option, one JSON;
    the values really reach the decoder (a 1-gram block forbids any repeated word, so its
    captions differ from unblocked ones); a missing checkpoint is refused by name."""
    out = tmp_path / "grid.json"
    bench = [sys.executable, str(ROOT / "bench" / "decode_grid.py")]
    args = ["--data", "", "--beam", "2", "--out", str(out), "metrics.meteor=false"]
    option = ["--option", "model.no_repeat_ngram_size", "--values", "0,1"]
    r = subprocess.run(
        [*bench, "--ckpt", str(trained["ckpt"]), *option, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [run["model.no_repeat_ngram_size"] for run in runs] == ["0", "1"]
    assert all(run["scores"]["num_images"] == 80 for run in runs)
    assert runs[0]["scores"] != runs[1]["scores"]

    missing = tmp_path / "nowhere.ckpt"
    r = subprocess.run(
        [*bench, "--ckpt", str(missing), *option, *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and str(missing) in r.stderr
