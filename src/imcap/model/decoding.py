"""Free-running caption generation: greedy, batched beam search, and sampling (for SCST).

All three drive any `CaptionDecoder` through `init_state` / `step`, so every decoder gets
every strategy. Outputs are (B, T) word ids with <eos> included and <pad> (0) after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imcap.model.decoders.base import CaptionDecoder
from imcap.model.encoder import Features

PAD, UNK = 0, 3  # imcap.data.text.Vocab's fixed ids


def word_log_probs(logits: torch.Tensor, bos: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax over words a caption may contain: never <pad>, <bos> or <unk> (an "<unk>" in
    a caption is no word to a reader, and the toolkit's tokenizer would split it into pieces)."""
    banned = torch.tensor([PAD, bos, UNK], device=logits.device)
    return F.log_softmax(logits.float().index_fill(1, banned, float("-inf")) / temperature, -1)


def ngram_block(history: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(N, t) words so far -> (N, V) True where the next word would repeat an n-gram already in
    that row (the "no repeat n-gram" guard: "a man in a red shirt and a red shirt" with n=3)."""
    N, t = history.shape
    banned = torch.zeros(N, vocab_size, dtype=torch.bool)
    if n <= 0 or t < n - 1:
        return banned.to(history.device)
    rows = history.tolist()
    for i, seq in enumerate(rows):
        prefix = tuple(seq[t - n + 1 :]) if n > 1 else ()
        for j in range(t - n + 1):
            if tuple(seq[j : j + n - 1]) == prefix:
                banned[i, seq[j + n - 1]] = True
    banned[:, PAD] = False  # finished rows extend with <pad>, never "repeat" it
    return banned.to(history.device)


@dataclass
class Decoded:
    tokens: torch.Tensor  # (B, T) ids, <eos> included, <pad> after
    scores: torch.Tensor  # (B,) sum of log-probabilities (beam: after the length penalty)
    alphas: torch.Tensor | None = None  # (B, T, N) attention over regions per emitted word
    # every final beam, best first (greedy: the one caption), for n-best lists such as the demo's
    beams: torch.Tensor | None = None  # (B, K, T)
    beam_scores: torch.Tensor | None = None  # (B, K) ranking scores (after the length penalty)
    beam_logprobs: torch.Tensor | None = None  # (B, K) sums of word log-probabilities


@torch.no_grad()
def greedy(
    dec: CaptionDecoder,
    feats: Features,
    bos: int,
    eos: int,
    max_len: int,
    return_attn: bool = False,
    no_repeat_ngram: int = 0,
) -> Decoded:
    """Arg-max word at every step until <eos> or `max_len` words (then <eos> is forced)."""
    state = dec.init_state(feats)
    B, device = feats.pooled.size(0), feats.pooled.device
    prev = torch.full((B,), bos, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    score = torch.zeros(B, device=device)
    out, alphas = [], []
    for t in range(max_len + 1):
        logits, state, alpha = dec.step(prev, state)  # (B, V)
        logp = word_log_probs(logits, bos)  # (B, V)
        if no_repeat_ngram and out:
            blocked = ngram_block(torch.stack(out, 1), no_repeat_ngram, logp.size(-1))
            logp = logp.masked_fill(blocked, float("-inf"))
        word = logp.argmax(-1) if t < max_len else torch.full_like(prev, eos)  # (B,)
        score += torch.where(done, 0.0, logp.gather(1, word[:, None]).squeeze(1))
        word = torch.where(done, PAD, word)
        out.append(word)
        if return_attn and alpha is not None:
            alphas.append(alpha)
        done |= word == eos
        prev = word
        if bool(done.all()):
            break
    tokens = torch.stack(out, 1)  # (B, T)
    return Decoded(
        tokens,
        score,
        torch.stack(alphas, 1) if alphas else None,
        tokens[:, None],
        score[:, None],
        score[:, None],
    )


def length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length normalisation ((5 + len) / 6) ** alpha; alpha = 0 ranks by raw log-prob sum."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    dec: CaptionDecoder,
    feats: Features,
    bos: int,
    eos: int,
    max_len: int,
    beam_size: int = 3,
    alpha: float = 0.0,
    return_attn: bool = False,
    no_repeat_ngram: int = 0,
) -> Decoded:
    """Batched beam search: B images x K beams advance together in one (B*K) batch.

    Beam scores are sums of word log-probabilities; a finished beam keeps its score and only
    extends with <pad> at no cost, so it competes with live beams until the end, where the
    length penalty picks the winner. Beam size 1 is exactly greedy decoding.
    """
    K = beam_size
    B, device = feats.pooled.size(0), feats.pooled.device
    state = dec.init_state(feats)
    state = dec.reorder_state(
        state, torch.arange(B, device=device).repeat_interleave(K)
    )  # (B*K, ...)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    prev = torch.full((B * K,), bos, dtype=torch.long, device=device)
    seqs = torch.empty(B, K, 0, dtype=torch.long, device=device)
    attn = None
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    batch_offset = (torch.arange(B, device=device) * K)[:, None]  # (B, 1)
    for t in range(max_len + 1):
        logits, state, alpha_t = dec.step(prev, state)  # (B*K, V)
        V = logits.size(-1)
        logp = word_log_probs(logits, bos)  # (B*K, V)
        if no_repeat_ngram and seqs.size(-1):
            blocked = ngram_block(seqs.view(B * K, -1), no_repeat_ngram, V)
            logp = logp.masked_fill(blocked, float("-inf"))
        logp = logp.view(B, K, V)  # (B, K, V)
        if t == max_len:  # out of room: every live beam must end now
            forced = torch.full_like(logp, float("-inf"))
            forced[..., eos] = logp[..., eos]
            logp = forced
        pad_only = torch.full((V,), float("-inf"), device=device)
        pad_only[PAD] = 0.0
        logp = torch.where(finished[..., None], pad_only, logp)
        cand = scores[..., None] + logp  # (B, K, V)
        scores, flat_idx = cand.view(B, K * V).topk(K, dim=-1)  # (B, K)
        beam, word = flat_idx // V, flat_idx % V  # (B, K) each
        rows = (batch_offset + beam).view(-1)  # (B*K,) source beam of each new beam
        state = dec.reorder_state(state, rows)
        seqs = torch.cat(
            [seqs.gather(1, beam[..., None].expand(-1, -1, seqs.size(-1))), word[..., None]], -1
        )
        if return_attn and alpha_t is not None:
            a = alpha_t.view(B, K, 1, -1)  # (B, K, 1, N)
            attn = a if attn is None else torch.cat([attn, a], 2)
            attn = attn.gather(1, beam[..., None, None].expand(-1, -1, attn.size(2), attn.size(3)))
        finished = finished.gather(1, beam) | (word == eos)
        prev = word.view(-1)
        if bool(finished.all()):
            break
    lengths = ((seqs != PAD) & (seqs != eos)).sum(-1) + 1  # words + <eos>, (B, K)
    final = scores / length_penalty(lengths, alpha)  # (B, K)
    best = final.argmax(-1)  # (B,)
    pick = torch.arange(B, device=device)
    order = final.argsort(dim=-1, descending=True, stable=True)  # (B, K) best first
    return Decoded(
        seqs[pick, best],
        final[pick, best],
        attn[pick, best] if attn is not None else None,
        seqs.gather(1, order[..., None].expand(-1, -1, seqs.size(-1))),
        final.gather(1, order),
        scores.gather(1, order),
    )


def sample(
    dec: CaptionDecoder,
    feats: Features,
    bos: int,
    eos: int,
    max_len: int,
    n: int = 1,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `n` captions per image with gradients (self-critical training).

    Returns tokens (B*n, T) — image-major, so rows i*n .. i*n+n-1 belong to image i — and the
    log-probability of each drawn word (B*n, T), zero after <eos>.
    """
    B, device = feats.pooled.size(0), feats.pooled.device
    state = dec.init_state(feats)
    if n > 1:
        state = dec.reorder_state(state, torch.arange(B, device=device).repeat_interleave(n))
    prev = torch.full((B * n,), bos, dtype=torch.long, device=device)
    done = torch.zeros(B * n, dtype=torch.bool, device=device)
    words, logps = [], []
    for t in range(max_len + 1):
        logits, state, _ = dec.step(prev, state)  # (B*n, V)
        logp = word_log_probs(logits, bos, temperature)  # (B*n, V)
        word = (
            torch.multinomial(logp.detach().exp(), 1).squeeze(1)
            if t < max_len
            else torch.full_like(prev, eos)
        )
        lp = logp.gather(1, word[:, None]).squeeze(1)  # (B*n,)
        words.append(torch.where(done, PAD, word))
        logps.append(torch.where(done, torch.zeros_like(lp), lp))
        done = done | (word == eos)
        prev = words[-1]
        if bool(done.all()):
            break
    return torch.stack(words, 1), torch.stack(logps, 1)
