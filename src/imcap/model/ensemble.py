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
import torch.nn.functional as F

from imcap.model.decoder import CaptionDecoder
from imcap.model.encoder import Features

State = tuple


@dataclass
class EnsembleFeatures(Features):
    """One `Features` per member (`pooled` is the first member's, for the batch size)."""

    parts: list[Features] = field(default_factory=list)


class EnsembleDecoder(nn.Module):
    """The members' decoders stepping in lock-step; their word distributions averaged."""

    def __init__(self, decoders: list[CaptionDecoder], banned: tuple[int, ...] = ()) -> None:
        """`banned`: word ids no caption may hold (<pad>, <bos>, <unk>); each member's
        distribution is renormalised without them before the mean, so the ensemble averages
        what each member alone would decode from."""
        super().__init__()
        self.members = nn.ModuleList(decoders)
        self.uses_grid = any(d.uses_grid for d in decoders)
        self.banned = list(banned)

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
            logits = logits.float()
            if self.banned:
                logits = logits.index_fill(1, logits.new_tensor(self.banned).long(), float("-inf"))
            logps.append(F.log_softmax(logits, -1))
            states.append(s)
            alphas.append(alpha)
        mean = torch.stack(logps).logsumexp(0) - math.log(len(logps))  # (B, V), -inf if banned
        return mean, tuple(states), alphas[0]

    def reorder_state(self, state: State, index: torch.Tensor) -> State:
        return tuple(d.reorder_state(s, index) for d, s in zip(self.members, state, strict=True))
