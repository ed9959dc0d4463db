"""Bottom-Up and Top-Down attention: an attention cell and a language cell per word."""

from __future__ import annotations

import torch
from torch import nn

from imcap.model.decoders.base import (
    CELLS,
    CaptionDecoder,
    DecoderOutput,
    State,
    _cell_params,
    _gru,
    _lstm,
)
from imcap.model.encoder import Features


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
        *,
        rnn: str,
        embed_dim: int,
        hidden_dim: int,
        attention_dim: int,
        dropout: float,
        feature_dropout: float,
        feature_norm: str,
        attributes: int,
    ) -> None:
        super().__init__()
        self._recurrence(rnn, CELLS, hidden_dim)
        self.n_attrs = int(attributes)
        H, E, A = hidden_dim, embed_dim, attention_dim
        g = 4 if rnn == "lstm" else 3
        # composition order: regions -> (attention cell, attention) -> language cell -> head
        self._image_input(feature_dim, feature_norm, feature_dropout)
        self.region_embed = nn.Sequential(nn.Linear(feature_dim, H), nn.ReLU(), nn.Dropout(dropout))
        self.key_proj = nn.Linear(H, A)  # regions -> attention space, once per image
        self._word_input(vocab_size, E)
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
        self._word_output(H, vocab_size, dropout)

    # -- per image ----------------------------------------------------------------------------
    def _embed_regions(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, R, C) normalised map -> (B, R, H) region vectors (a subclass may refine them)."""
        return self.region_embed(grid)

    def _regions(self, feats: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = self._grid(feats)  # (B, R, C)
        v = self._embed_regions(grid)  # (B, R, H)
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
