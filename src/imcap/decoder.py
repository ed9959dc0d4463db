"""The RNN half: word decoders conditioned on image features.

Every decoder exposes the same three calls, so decoding (greedy, beam, sampling) and training
code never need to know which one they drive:

    state = dec.init_state(feats)                  # image -> initial recurrent state
    logits, state, attn = dec.step(tokens, state)  # one word for every sequence in the batch
    out = dec(feats, tokens)                       # teacher-forced logits for a whole caption

States are tuples of batch-first tensors, so beams are reordered with one `index_select(0, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imcap.encoder import Features

State = tuple[torch.Tensor, ...]
RNNS = {"lstm": nn.LSTM, "gru": nn.GRU}
CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}
FEATURE_NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": lambda dim: nn.Identity()}


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, V), or (N, V) at the `keep` positions only
    alphas: torch.Tensor | None = None  # (B, T, N) attention weights, attention decoders only


class CaptionDecoder(nn.Module):
    """Shared plumbing: step-by-step teacher forcing with optional scheduled sampling."""

    uses_grid = False  # needs the spatial feature map (attention) rather than the pooled vector

    def _image_input(self, feature_dim: int, norm: str, dropout: float) -> None:
        """CNN features are far from centred (ReLU6 outputs: mean ~0.24, a third zeros), so each
        channel is standardised (batch statistics while training, running ones at eval) before
        it enters the decoder; optional dropout on top."""
        if norm not in FEATURE_NORMS:
            raise ValueError(
                f"decoder.feature_norm must be one of {sorted(FEATURE_NORMS)}, got {norm!r}"
            )
        self.feat_norm = FEATURE_NORMS[norm](feature_dim)
        self.feat_drop = nn.Dropout(dropout)

    def init_state(self, feats: Features) -> State:
        raise NotImplementedError

    def step(
        self, tokens: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        raise NotImplementedError

    @staticmethod
    def reorder_state(state: State, index: torch.Tensor) -> State:
        return tuple(s.index_select(0, index) for s in state)

    def forward(
        self,
        feats: Features,
        tokens: torch.Tensor,
        ss_prob: float = 0.0,
        keep: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Teacher forcing over `tokens` = <bos> w1 .. wn (padded); logits predict w1 .. <eos>.

        `keep` (B, T) bool: return logits only at these positions, as (N, V) (the loss needs no
        logits at padding). With `ss_prob` > 0 (scheduled sampling, Bengio et al. 2015) each input word is, with that
        probability, replaced by the model's own sample from the previous step.
        """
        state = self.init_state(feats)
        logits, alphas = [], []
        prev = tokens[:, 0]  # (B,)
        for t in range(tokens.size(1)):
            if t > 0:
                prev = tokens[:, t]
                if ss_prob > 0:
                    use_own = torch.rand_like(prev, dtype=torch.float) < ss_prob  # (B,)
                    own = torch.multinomial(logits[-1].detach().softmax(-1), 1).squeeze(1)
                    prev = torch.where(use_own, own, prev)
            step_logits, state, alpha = self.step(prev, state)  # (B, V)
            logits.append(step_logits)
            if alpha is not None:
                alphas.append(alpha)
        stacked = torch.stack(logits, 1)  # (B, T, V)
        return DecoderOutput(
            stacked if keep is None else stacked[keep],  # (B, T, V) | (N, V)
            torch.stack(alphas, 1) if alphas else None,  # (B, T, N)
        )


class ShowTellDecoder(CaptionDecoder):
    """Show and Tell (Vinyals et al. 2015) with the image as the initial state.

    The pooled image vector goes through a learned projection to the initial hidden state
    (and cell state, for an LSTM) of every layer; words are then fed one at a time.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        rnn: str = "lstm",
        embed_dim: int = 512,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
        feature_dropout: float = 0.0,
        feature_norm: str = "batch",
    ) -> None:
        super().__init__()
        if rnn not in RNNS:
            raise ValueError(f"decoder.rnn must be one of {sorted(RNNS)}, got {rnn!r}")
        self.rnn_type, self.num_layers, self.hidden_dim = rnn, num_layers, hidden_dim
        n_states = 2 if rnn == "lstm" else 1
        self._image_input(feature_dim, feature_norm, feature_dropout)
        self.init_proj = nn.Linear(feature_dim, n_states * num_layers * hidden_dim)  # h0 (, c0)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = RNNS[rnn](
            embed_dim,
            hidden_dim,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

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
        rnn: str = "lstm",
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        gate: bool = True,
        feature_dropout: float = 0.0,
        feature_norm: str = "batch",
    ) -> None:
        super().__init__()
        if rnn not in CELLS:
            raise ValueError(f"decoder.rnn must be one of {sorted(CELLS)}, got {rnn!r}")
        self._image_input(
            feature_dim, feature_norm, feature_dropout
        )  # per channel, over all regions
        self.rnn_type, self.hidden_dim = rnn, hidden_dim
        n_states = 2 if rnn == "lstm" else 1
        self.init_proj = nn.Linear(feature_dim, n_states * hidden_dim)  # mean feature -> h0 (, c0)
        self.key_proj = nn.Linear(
            feature_dim, attention_dim
        )  # regions -> attention space, once per image
        self.query_proj = nn.Linear(hidden_dim, attention_dim)  # hidden state -> attention space
        self.score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim) if gate else None
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.cell = CELLS[rnn](embed_dim + feature_dim, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, feats: Features) -> State:
        grid = feats.grid  # (B, R, C)
        if grid is None:
            raise ValueError("attention decoders need the encoder's spatial map (Features.grid)")
        B, R, C = grid.shape
        grid = self.feat_drop(self.feat_norm(grid.reshape(B * R, C)).view(B, R, C))  # (B, R, C)
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
