"""The decoder contract and the parts every decoder family shares.

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

from imcap.model.encoder import Features

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
    exportable = True  # init_state/step trace to ONNX/TorchScript (imcap.model.export)
    rnn_type: str | None = None  # set by `_recurrence`; None on the card when a family does not
    hidden_dim: int | None = None
    num_layers = 1

    def _recurrence(self, rnn: str, table: dict, hidden_dim: int) -> None:
        """The RNN choice (decoder.rnn), checked against the cells this family supports."""
        if rnn not in table:
            raise ValueError(f"decoder.rnn must be one of {sorted(table)}, got {rnn!r}")
        self.rnn_type, self.hidden_dim = rnn, hidden_dim

    def _word_input(self, vocab_size: int, embed_dim: int) -> None:
        """The word embedding (<pad> = 0 stays a zero vector)."""
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)

    def _word_output(self, hidden_dim: int, vocab_size: int, dropout: float) -> None:
        """Dropout (on words in and on the state out) and the vocabulary head."""
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def _grid(self, feats: Features) -> torch.Tensor:
        """The spatial map (B, R, C), each channel standardised over all regions (+ dropout)."""
        grid = feats.grid
        if grid is None:
            raise ValueError(
                f"{type(self).__name__} needs the encoder's spatial map (Features.grid)"
            )
        B, R, C = grid.shape
        return self.feat_drop(self.feat_norm(grid.reshape(B * R, C)).view(B, R, C))

    def describe(self) -> dict:
        """What the model card says about this decoder (the demo's /api/model, imcap models)."""
        return {
            "type": type(self).__name__,
            "rnn": self.rnn_type,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "attention": bool(self.uses_grid),
        }

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


def _cell_params(n_in: int, hidden: int, gates: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Weights of a hand-rolled recurrent cell: (gates*H, n_in) and a bias (gates*H,)."""
    w = nn.Parameter(torch.empty(gates * hidden, n_in))
    b = nn.Parameter(torch.zeros(gates * hidden))
    bound = 1.0 / hidden**0.5  # PyTorch's LSTMCell/GRUCell initialisation
    nn.init.uniform_(w, -bound, bound)
    return w, b


def _lstm(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM update from pre-activations (B, 4H) in PyTorch's gate order i, f, g, o."""
    i, f, g, o = gates.float().chunk(4, -1)  # float32 state under bf16 autocast
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru(gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """GRU update from input (B, 3H) and hidden (B, 3H) pre-activations, gate order r, z, n."""
    xr, xz, xn = gx.float().chunk(3, -1)  # float32 state under bf16 autocast
    hr, hz, hn = gh.float().chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h  # (B, H)
