"""Ensembles of checkpoints: K captioners write one caption together.

At every step each member turns its own features and its own state into a word distribution;
the ensemble's distribution is their mean, log(1/K sum_k p_k) (Vinyals et al. 2015 ensembled
their Show and Tell models this way). `EnsembleDecoder` has the decoder contract (`init_state`,
`step`, `reorder_state`), so greedy, beam search and every option of theirs work unchanged.
Members must share the vocabulary (one word list to pick from) and, when they read raw images
(eval.py's joint mode, caption.py), the image transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from imcap.model.decoder import CaptionDecoder
from imcap.model.decoding import word_log_probs
from imcap.model.encoder import Features

State = tuple


@dataclass
class EnsembleFeatures(Features):
    """One `Features` per member (`pooled` is the first member's, for the batch size)."""

    parts: list[Features] = field(default_factory=list)


class EnsembleDecoder(nn.Module):
    """The members' decoders stepping in lock-step; their word distributions averaged."""

    def __init__(self, decoders: list[CaptionDecoder], bos: int) -> None:
        """Each member's distribution is taken over the words a caption may hold
        (`decoding.word_log_probs`: no <pad>, <bos>, <unk>) before the mean, so the ensemble
        averages what each member alone would decode from."""
        super().__init__()
        self.members = nn.ModuleList(decoders)
        self.bos = bos

    def init_state(self, feats: EnsembleFeatures) -> State:
        if len(feats.parts) != len(self.members):
            raise ValueError(f"{len(feats.parts)} feature sets for {len(self.members)} members")
        return tuple(d.init_state(f) for d, f in zip(self.members, feats.parts, strict=True))

    def step(
        self, tokens: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """(B,) previous words -> (B, V) log of the mean word probability; the first member's
        attention (the attention maps drawn for an ensemble are its first checkpoint's)."""
        logps, states, alphas = [], [], []
        for dec, s in zip(self.members, state, strict=True):
            logits, s, alpha = dec.step(tokens, s)  # (B, V)
            logps.append(word_log_probs(logits, self.bos))
            states.append(s)
            alphas.append(alpha)
        mean = torch.stack(logps).logsumexp(0) - math.log(len(logps))  # (B, V), -inf if banned
        return mean, tuple(states), alphas[0]

    def reorder_state(self, state: State, index: torch.Tensor) -> State:
        return tuple(d.reorder_state(s, index) for d, s in zip(self.members, state, strict=True))
