"""Show and Tell: the pooled image as the initial state of an LSTM/GRU."""

from __future__ import annotations

import torch
from torch import nn

from imcap.model.decoders.base import RNNS, CaptionDecoder, DecoderOutput, State
from imcap.model.encoder import Features


class ShowTellDecoder(CaptionDecoder):
    """Show and Tell (Vinyals et al. 2015) with the image as the initial state.

    The pooled image vector goes through a learned projection to the initial hidden state
    (and cell state, for an LSTM) of every layer; words are then fed one at a time.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        *,
        rnn: str,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        dropout: float,
        feature_dropout: float,
        feature_norm: str,
    ) -> None:
        super().__init__()
        self._recurrence(rnn, RNNS, hidden_dim)
        self.num_layers = num_layers
        n_states = 2 if rnn == "lstm" else 1
        self._image_input(feature_dim, feature_norm, feature_dropout)
        self.init_proj = nn.Linear(feature_dim, n_states * num_layers * hidden_dim)  # h0 (, c0)
        self._word_input(vocab_size, embed_dim)
        self.rnn = RNNS[rnn](
            embed_dim,
            hidden_dim,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self._word_output(hidden_dim, vocab_size, dropout)

    def init_state(self, feats: Features) -> State:
        B = feats.pooled.size(0)
        init = torch.tanh(
            self.init_proj(self.feat_drop(self.feat_norm(feats.pooled)))
        )  # (B, S*L*H)
        init = init.view(B, -1, self.num_layers, self.hidden_dim)  # (B, S, L, H)
        return tuple(init.unbind(1))  # S tensors of (B, L, H)

    def _rnn_state(self, state: State):
        hx = tuple(s.transpose(0, 1).contiguous() for s in state)  # (L, B, H) each
        return hx if self.rnn_type == "lstm" else hx[0]

    def _batch_state(self, hx) -> State:
        hx = hx if isinstance(hx, tuple) else (hx,)
        return tuple(s.transpose(0, 1) for s in hx)  # (B, L, H) each

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, None]:
        x = self.drop(self.embed(tokens)).unsqueeze(1)  # (B, 1, E)
        out, hx = self.rnn(x, self._rnn_state(state))  # (B, 1, H)
        return self.head(self.drop(out.squeeze(1))), self._batch_state(hx), None  # (B, V)

    def forward(
        self,
        feats: Features,
        tokens: torch.Tensor,
        ss_prob: float = 0.0,
        keep: torch.Tensor | None = None,
    ) -> DecoderOutput:
        if ss_prob > 0:
            return super().forward(feats, tokens, ss_prob, keep)
        # Fast path: one cuDNN call over the padded batch. The RNN runs left to right, so what
        # sits after a caption's end never reaches its real positions; the loss ignores <pad>.
        x = self.drop(self.embed(tokens))  # (B, T, E)
        out, _ = self.rnn(x, self._rnn_state(self.init_state(feats)))  # (B, T, H)
        if keep is not None:
            out = out[keep]  # (N, H): the vocabulary projection only where there is a target
        return DecoderOutput(self.head(self.drop(out)))  # (B, T, V) | (N, V)
