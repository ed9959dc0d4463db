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


class TopDownDecoder(CaptionDecoder):
    """Bottom-Up and Top-Down attention (Anderson et al. 2018), over the CNN grid.

    Two cells per word: the *attention* cell reads [language h; mean image; word] and asks
    where to look; the *language* cell reads [attended context; attention h] and predicts the
    word. Regions are projected to the hidden width once per image (not 1,280 channels every
    step), so a step costs two small matmuls plus the attention.

    Training (`forward`) is built for CPUs as much as GPUs: every input-side product that does
    not depend on the recurrence (word embeddings, the mean image) is one matmul over the
    whole caption; sequences are sorted by length so each step only computes captions that
    are still running; the vocabulary projection runs once, after the loop, on real targets.
    `step` gives exactly the same numbers one word at a time (tested), for decoding.

    `attributes` > 0: a vector of that many word probabilities per image (`Features.attrs`,
    from imcap.model.attributes) enters the attention cell beside the mean image (LSTM-A, Yao 2017).
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
        feature_dropout: float = 0.0,
        feature_norm: str = "batch",
        attributes: int = 0,
    ) -> None:
        super().__init__()
        if rnn not in CELLS:
            raise ValueError(f"decoder.rnn must be one of {sorted(CELLS)}, got {rnn!r}")
        self.rnn_type, self.hidden_dim, self.n_attrs = rnn, hidden_dim, int(attributes)
        H, E, A = hidden_dim, embed_dim, attention_dim
        g = 4 if rnn == "lstm" else 3
        # composition order: regions -> (attention cell, attention) -> language cell -> head
        self._image_input(feature_dim, feature_norm, feature_dropout)
        self.region_embed = nn.Sequential(nn.Linear(feature_dim, H), nn.ReLU(), nn.Dropout(dropout))
        self.key_proj = nn.Linear(H, A)  # regions -> attention space, once per image
        self.embed = nn.Embedding(vocab_size, E, padding_idx=0)
        self.attr_proj = nn.Linear(self.n_attrs, H) if self.n_attrs else None
        # attention cell input [h_lang (H); mean region (H); attributes (H)?; word (E)]
        self.att_w_static, self.att_b = _cell_params(H * (2 if self.n_attrs else 1) + E, H, g)
        if rnn == "lstm":
            self.att_w_rec, _ = _cell_params(2 * H, H, g)  # [h_lang; h_att] -> gates
        else:  # a GRU keeps input and hidden products apart (the reset gate)
            self.att_w_rec, _ = _cell_params(H, H, g)  # h_lang -> input gates
            self.att_w_hh, self.att_b_hh = _cell_params(H, H, g)  # h_att -> hidden gates
        self.query_proj = nn.Linear(H, A)
        self.score = nn.Linear(A, 1)
        # language cell input [context (H); h_att (H)], hidden h_lang
        self.lang_w, self.lang_b = _cell_params(2 * H + (H if rnn == "lstm" else 0), H, g)
        if rnn == "gru":
            self.lang_w_hh, self.lang_b_hh = _cell_params(H, H, g)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(H, vocab_size)

    # -- per image ----------------------------------------------------------------------------
    def _regions(self, feats: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = feats.grid  # (B, R, C)
        if grid is None:
            raise ValueError("the top-down decoder needs the encoder's spatial map (Features.grid)")
        B, R, C = grid.shape
        grid = self.feat_drop(self.feat_norm(grid.reshape(B * R, C)).view(B, R, C))
        v = self.region_embed(grid)  # (B, R, H)
        keys = self.key_proj(v)  # (B, R, A)
        static = v.mean(1)  # (B, H): the mean region, the attention cell's view of the image
        if self.attr_proj is not None:
            attrs = feats.attrs
            if attrs is None:
                raise ValueError(
                    "decoder.attributes > 0 needs attribute probabilities (Features.attrs)"
                )
            static = torch.cat([static, torch.relu(self.attr_proj(attrs))], -1)  # (B, 2H)
        W = self.att_w_static
        img_gates = static @ W[:, : static.size(-1)].t() + self.att_b  # (B, G*H)
        return v, keys, img_gates

    def init_state(self, feats: Features) -> State:
        v, keys, img_gates = self._regions(feats)
        B, H = v.size(0), self.hidden_dim
        zero = v.new_zeros(B, H)
        hc = (zero, zero, zero, zero) if self.rnn_type == "lstm" else (zero, zero)
        return (*hc, v, keys, img_gates)  # h_att (, c_att), h_lang (, c_lang), regions...

    # -- one word -----------------------------------------------------------------------------
    def _attend(self, h_att, v, keys):
        n, m = h_att.size(0), v.size(0)  # teacher forcing may pass m > n rows of regions
        q = self.query_proj(h_att)  # (n, A)
        if m > n:
            q = torch.cat([q, q.new_zeros(m - n, q.size(1))])  # (m, A)
        e = self.score(torch.tanh(keys + q.unsqueeze(1))).squeeze(-1)[:n]  # (n, R)
        alpha = e.softmax(-1)  # (n, R)
        a = torch.cat([alpha, alpha.new_zeros(m - n, alpha.size(1))]) if m > n else alpha
        return torch.bmm(a.unsqueeze(1), v).squeeze(1)[:n], alpha  # (n, H), (n, R)

    def _cells(self, x_gates, h_att, c_att, h_lang, c_lang, v, keys):
        """One step from the precomputed input gates of the attention cell."""
        if self.rnn_type == "lstm":
            g = x_gates + torch.cat([h_lang, h_att], -1) @ self.att_w_rec.t()  # (B, 4H)
            h_att, c_att = _lstm(g, c_att)
            ctx, alpha = self._attend(h_att, v, keys)
            g = torch.cat([ctx, h_att, h_lang], -1) @ self.lang_w.t() + self.lang_b  # (B, 4H)
            h_lang, c_lang = _lstm(g, c_lang)
        else:
            gx = x_gates + h_lang @ self.att_w_rec.t()
            h_att = _gru(gx, h_att @ self.att_w_hh.t() + self.att_b_hh, h_att)
            ctx, alpha = self._attend(h_att, v, keys)
            gx = torch.cat([ctx, h_att], -1) @ self.lang_w.t() + self.lang_b
            h_lang = _gru(gx, h_lang @ self.lang_w_hh.t() + self.lang_b_hh, h_lang)
        return h_att, c_att, h_lang, c_lang, alpha

    def _word_gates(self, tokens: torch.Tensor) -> torch.Tensor:
        E = self.embed.embedding_dim
        return self.drop(self.embed(tokens)) @ self.att_w_static[:, -E:].t()  # (..., G*H)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        lstm = self.rnn_type == "lstm"
        if lstm:
            h_att, c_att, h_lang, c_lang, v, keys, img_gates = state
        else:
            h_att, h_lang, v, keys, img_gates = state
            c_att = c_lang = None
        x_gates = img_gates + self._word_gates(tokens)  # (B, G*H)
        h_att, c_att, h_lang, c_lang, alpha = self._cells(
            x_gates, h_att, c_att, h_lang, c_lang, v, keys
        )
        hc = (h_att, c_att, h_lang, c_lang) if lstm else (h_att, h_lang)
        return self.head(self.drop(h_lang)), (*hc, v, keys, img_gates), alpha  # (B, V)

    # -- teacher forcing ----------------------------------------------------------------------
    def forward(
        self,
        feats: Features,
        tokens: torch.Tensor,
        ss_prob: float = 0.0,
        keep: torch.Tensor | None = None,
    ) -> DecoderOutput:
        if ss_prob > 0:
            return super().forward(feats, tokens, ss_prob, keep)
        B, T = tokens.shape
        keep_ = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep
        lengths = keep_.sum(1)  # (B,) positions with a target, a prefix of each row
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,)
        lengths_sorted = lengths[order]
        active = (
            lengths_sorted.unsqueeze(0) > torch.arange(T, device=tokens.device).unsqueeze(1)
        ).sum(1)  # (T,)
        n_active = active.tolist()
        attrs = feats.attrs[order] if feats.attrs is not None else None
        v, keys, img_gates = self._regions(Features(feats.pooled[order], feats.grid[order], attrs))
        x_gates = self._word_gates(tokens[order]) + img_gates.unsqueeze(1)  # (B, T, G*H)
        H = self.hidden_dim
        h_att = v.new_zeros(B, H)
        h_lang = v.new_zeros(B, H)
        c_att = c_lang = v.new_zeros(B, H) if self.rnn_type == "lstm" else None
        outs, alphas = [], []
        m = B  # rows of the region tensors: re-sliced only when a quarter of them are done, as
        # the backward of every slice of (B, R, H) writes a zero tensor of that size
        for t in range(T):
            n = n_active[t]
            if n == 0:
                break
            if n < 0.75 * m:
                m, v, keys = n, v[:n], keys[:n]
            h_att, h_lang = h_att[:n], h_lang[:n]
            if c_att is not None:
                c_att, c_lang = c_att[:n], c_lang[:n]
            h_att, c_att, h_lang, c_lang, alpha = self._cells(
                x_gates[:n, t], h_att, c_att, h_lang, c_lang, v, keys
            )
            outs.append(h_lang)  # (n, H)
            alphas.append(alpha)  # (n, R)
        # outputs are time-major over the sorted rows: (t, s) for s < n_t, which is the order
        # in which nonzero() lists the sorted mask's transpose; map back to the caller's (b, t)
        t_idx, s_idx = keep_[order].t().nonzero().unbind(1)  # (N,) each
        flat = order[s_idx] * T + t_idx  # (N,) caller's flat (b, t) position

        def by_position(x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (B*T, D), zero elsewhere
            return x.new_zeros(B * T, x.size(-1)).index_copy(0, flat, x)

        out = by_position(torch.cat(outs))  # (B*T, H)
        alpha_bt = by_position(torch.cat(alphas)).view(B, T, -1)  # (B, T, R), zero off-target
        if keep is None:
            return DecoderOutput(self.head(self.drop(out)).view(B, T, -1), alpha_bt)  # (B, T, V)
        logits = self.head(self.drop(out[keep.reshape(-1)]))  # (N, V) in keep order
        return DecoderOutput(logits, alpha_bt)
