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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from imcap.errors import UserError
from imcap.model.decoders.base import CaptionDecoder
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


def check_members(lead: Any, others: Sequence[Any], names: Sequence[str] = ()) -> None:
    """Members decode together only if they pick words from one list and, reading raw images,
    see them through one transform; otherwise a UserError naming the member and the fix."""
    from imcap.data.images import TRANSFORM_KEYS

    names = list(names) or [f"member {i + 1}" for i in range(len(others) + 1)]
    for other, name in zip(others, names[1:], strict=True):
        if list(other.vocab.tokens) != list(lead.vocab.tokens):
            raise UserError(
                f"{name}: its vocabulary ({len(other.vocab)} words) differs from that of "
                f"{names[0]} ({len(lead.vocab)} words); an ensemble picks words from one "
                "list, so its members must be trained on the same captions with the same "
                "data.vocab settings"
            )
        a_cfg, b_cfg = lead.encoder.data_config, other.encoder.data_config
        differ = {
            k: (a_cfg.get(k), b_cfg.get(k)) for k in TRANSFORM_KEYS if a_cfg.get(k) != b_cfg.get(k)
        }
        if differ:
            said = "; ".join(
                f"{k} {b!r} where {names[0]} has {a!r}" for k, (a, b) in differ.items()
            )
            raise UserError(
                f"{name} reads images with {said}: members of an ensemble share one image "
                "transform (encoder input size, resizing and normalisation)"
            )
