"""Self-critical sequence training (Rennie et al. 2017): REINFORCE with CIDEr-D as the reward.

A second training stage from a cross-entropy checkpoint (`model.scst.enabled`). For each image K
captions are sampled; each one's advantage is its CIDEr-D against the training references minus
a baseline: the model's own greedy caption (self-critical) or the mean reward of the other
K-1 samples (Luo 2020).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from imcap.data.text import Vocab
from imcap.errors import UserError
from imcap.model.decoders.base import CaptionDecoder
from imcap.model.decoding import greedy, sample
from imcap.model.encoder import Features

EOS_WORD = "<eos>"  # the end of a caption as a word of the CIDEr-D reward (scst.eos_reward)
BASELINES = ("greedy", "mean")


def check_scst(cfg: dict[str, Any]) -> None:
    if cfg["baseline"] not in BASELINES:
        raise UserError(f"model.scst.baseline must be one of {BASELINES}, got {cfg['baseline']!r}")


class SelfCritical:
    """The SCST loss of one batch; owns the CIDEr-D reward built from the training references."""

    def __init__(self, cfg: dict[str, Any], vocab: Vocab, decoding: dict[str, Any]) -> None:
        check_scst(cfg)
        self.cfg, self.vocab, self.decoding = cfg, vocab, decoding  # decoding: read at each use
        self.cider: Callable[[list[list[str]], list[int]], Any] | None = None
        self.mirror = torch.tensor(vocab.mirror_ids())  # (V,) id -> its mirror word's id

    @property
    def max_len(self) -> int:
        return int(self.decoding["max_len"])

    def prepare(self, refs: dict[int, list[list[str]]]) -> None:
        """Build the reward over the training references (once: they do not change)."""
        if self.cider is None:
            self.cider = scst_reward(refs, self.cfg["eos_reward"])

    def loss(
        self,
        decoder: CaptionDecoder,
        feats: Features,
        rows: torch.Tensor,
        flipped: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss over K samples of each image of the batch; rows (B,) key the references, and
        `flipped` (B,) marks images seen mirrored (data.hflip): a caption of a mirrored image
        earns what its mirror caption (left <-> right) earns on the image itself."""
        B, K, v = rows.size(0), int(self.cfg["num_samples"]), self.vocab
        tokens, logp = sample(
            decoder, feats, v.bos_id, v.eos_id, self.max_len, K, float(self.cfg["temperature"])
        )  # (B*K, T) each
        flips = None if flipped is None else flipped.repeat_interleave(K)  # (B*K,)
        reward = self.reward(tokens, rows.repeat_interleave(K).tolist(), flips)  # (B*K,)
        greedy_reward = None
        if self.cfg["baseline"] == "greedy":
            was_training = decoder.training
            decoder.eval()
            with torch.no_grad():
                g = greedy(decoder, feats, v.bos_id, v.eos_id, self.max_len).tokens
            decoder.train(was_training)
            greedy_reward = self.reward(g, rows.tolist(), flipped)  # (B,)
        advantage, base = scst_advantages(reward.view(B, K), greedy_reward)  # (B*K,) each
        mask = (tokens != v.pad_id).float()  # (B*K, T): words and <eos>
        loss = -(advantage.unsqueeze(1) * logp * mask).sum() / mask.sum()
        return loss, {"reward": reward.mean(), "baseline": base.mean()}

    def reward(
        self, tokens: torch.Tensor, ids: list[int], flipped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CIDEr-D of each caption. With `eos_reward` a caption that ended by choosing <eos>
        (not cut at max_len) carries it as a last word, and so do the references: n-grams such
        as "the grass <eos>" reward proper endings and punish captions that stop mid-phrase
        ("a dog runs on the <eos>"), as in Rennie et al.'s and Luo's implementations. Captions
        of `flipped` (mirrored) images are scored as their mirror captions."""
        if self.cider is None:
            raise RuntimeError("SelfCritical.prepare(training references) first")
        if flipped is not None:
            mirrored = self.mirror.to(tokens.device)[tokens]  # (N, T)
            tokens = torch.where(flipped.to(tokens.device)[:, None], mirrored, tokens)
        words = [self.vocab.decode(t).split() for t in tokens.tolist()]
        if self.cfg["eos_reward"]:
            words = [w + [EOS_WORD] if len(w) < self.max_len else w for w in words]
        return torch.as_tensor(self.cider(words, ids), dtype=torch.float32, device=tokens.device)


def scst_advantages(
    reward: torch.Tensor, greedy_reward: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of K samples per image, reward (B, K) -> (B*K,), and the baseline used.

    With the greedy caption's reward (B,): self-critical (Rennie et al. 2017). Without: the mean
    reward of the *other* K-1 samples of the same image (Luo 2020), so each image's advantages
    sum to zero and no extra decoding pass is needed.
    """
    B, K = reward.shape
    if greedy_reward is not None:
        base = greedy_reward.unsqueeze(1).expand(B, K)  # (B, K)
    else:
        base = (reward.sum(1, keepdim=True) - reward) / max(K - 1, 1)  # (B, K) leave-one-out
    return (reward - base).reshape(-1), base.reshape(-1)


def scst_reward(refs: dict[int, list[list[str]]], eos: bool):
    """The in-process CIDEr-D reward over the training references (with <eos> as a word)."""
    from imcap.eval.cider import CiderD

    if eos:
        refs = {k: [[*r, EOS_WORD] for r in caps] for k, caps in refs.items()}
    return CiderD(refs)
