"""Show, Attend and Tell: soft attention over the grid at every word."""

from __future__ import annotations

import torch
from torch import nn

from imcap.model.decoders.base import CELLS, CaptionDecoder, State
from imcap.model.encoder import Features


class AttentionDecoder(CaptionDecoder):
    """Show, Attend and Tell (Xu et al. 2015): soft additive attention over the spatial map.

    At every word the decoder attends over the R regions of the encoder's grid (7x7 for
    ResNet/VGG/EfficientNet, 8x8 for Inception, tokens for ViTs), gates the context vector
    with a learned scalar beta = sigmoid(f(h)), and feeds [word embedding; context] to the cell.
    The initial state comes from the mean region feature.
    """

    uses_grid = True

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        *,
        rnn: str,
        embed_dim: int,
        hidden_dim: int,
        attention_dim: int,
        dropout: float,
        gate: bool,
        feature_dropout: float,
        feature_norm: str,
    ) -> None:
        super().__init__()
        self._recurrence(rnn, CELLS, hidden_dim)
        self._image_input(feature_dim, feature_norm, feature_dropout)  # per channel, all regions
        n_states = 2 if rnn == "lstm" else 1
        self.init_proj = nn.Linear(feature_dim, n_states * hidden_dim)  # mean feature -> h0 (, c0)
        self.key_proj = nn.Linear(
            feature_dim, attention_dim
        )  # regions -> attention space, once per image
        self.query_proj = nn.Linear(hidden_dim, attention_dim)  # hidden state -> attention space
        self.score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim) if gate else None
        self._word_input(vocab_size, embed_dim)
        self.cell = CELLS[rnn](embed_dim + feature_dim, hidden_dim)
        self._word_output(hidden_dim, vocab_size, dropout)

    def init_state(self, feats: Features) -> State:
        grid = self._grid(feats)  # (B, R, C)
        init = torch.tanh(self.init_proj(grid.mean(1)))  # (B, S*H)
        keys = self.key_proj(grid)  # (B, R, A)
        return (*init.split(self.hidden_dim, dim=-1), grid, keys)  # h (, c), grid, keys

    def attend(
        self, h: torch.Tensor, grid: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.score(torch.tanh(keys + self.query_proj(h).unsqueeze(1))).squeeze(-1)  # (B, R)
        alpha = e.softmax(-1)  # (B, R), sums to 1 over regions
        context = torch.bmm(alpha.unsqueeze(1), grid).squeeze(1)  # (B, C)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h)) * context  # (B, C)
        return context, alpha

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        *hc, grid, keys = state
        context, alpha = self.attend(hc[0], grid, keys)  # (B, C), (B, R)
        x = torch.cat([self.drop(self.embed(tokens)), context], -1)  # (B, E + C)
        if self.rnn_type == "lstm":
            hc = list(self.cell(x, (hc[0], hc[1])))  # (B, H) each
        else:
            hc = [self.cell(x, hc[0])]
        return self.head(self.drop(hc[0])), (*hc, grid, keys), alpha  # (B, V)
