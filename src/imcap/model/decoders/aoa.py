"""Attention on Attention (Huang et al. 2019, AoANet) on the Top-Down decoder.

Two additions to Top-Down (imcap.model.decoders.topdown.TopDownDecoder), both from AoANet:

- a *refiner*: self-attention layers over the image regions, each followed by an AoA gate, a
  residual and LayerNorm, so every region is described in the context of the others. It runs
  once per image (while training, once per distinct image of the batch, however many of its
  captions the batch holds), never per word.
- an *AoA step* on the attended context: [context; query] -> information * sigmoid(gate)
  (a GLU), so the decoder can discard a context vector that does not answer its query, before
  the language cell reads it.

Same state layout and step contract as Top-Down, so greedy/beam/sampling, SCST, ensembles,
export and the demo need nothing new.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imcap.model.decoders.topdown import TopDownDecoder
from imcap.model.encoder import Features


class RefinerLayer(nn.Module):
    """Multi-head self-attention over regions + AoA gate + residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(
                f"decoder.hidden_dim ({dim}) must be divisible by refiner_heads ({heads})"
            )
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.aoa = nn.Linear(2 * dim, 2 * dim)  # [attended; query] -> [information; gate]
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, R, D = x.shape
        q, k, v = self.qkv(x).view(B, R, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2) / math.sqrt(D // self.heads)).softmax(-1)  # (B, h, R, R)
        f = (w @ v).transpose(1, 2).reshape(B, R, D)  # (B, R, D)
        g = F.glu(self.aoa(torch.cat([f, x.to(f.dtype)], -1)), -1)  # (B, R, D)
        return self.norm(x + self.drop(g))  # (B, R, D)


class AoADecoder(TopDownDecoder):
    """Top-Down with an AoA refiner over the regions and an AoA step on the attended context.

    `refiner_layers` = 0 keeps only the decoder-side AoA step.
    """

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
        refiner_layers: int,
        refiner_heads: int,
        refiner_dropout: float,
    ) -> None:
        super().__init__(
            vocab_size,
            feature_dim,
            rnn=rnn,
            embed_dim=embed_dim,
            hidden_dim=hidden_dim,
            attention_dim=attention_dim,
            dropout=dropout,
            feature_dropout=feature_dropout,
            feature_norm=feature_norm,
            attributes=attributes,
        )
        H = hidden_dim
        self.refiner = nn.Sequential(
            *(RefinerLayer(H, refiner_heads, refiner_dropout) for _ in range(refiner_layers))
        )
        self.ctx_aoa = nn.Linear(2 * H, 2 * H)  # [context; h_att] -> [information; gate]

    def describe(self) -> dict:
        return {**super().describe(), "refiner_layers": len(self.refiner)}

    # -- per image ----------------------------------------------------------------------------
    def _embed_regions(self, grid: torch.Tensor) -> torch.Tensor:
        """Refine before the region dropout: LayerNorm on dropped-out vectors would see another
        scale in training than at evaluation (the variance shift of dropout before a norm)."""
        linear, relu, drop = self.region_embed
        return drop(self.refiner(relu(linear(grid))))  # (B, R, H)

    def _regions(self, feats: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.training or feats.grid is None:
            return super()._regions(feats)
        # teacher forcing: a batch grouped by image repeats each image's map once per caption;
        # run the per-image work (refiner included) once per distinct map, then spread it back
        grid = feats.grid
        uniq, inverse = torch.unique(grid.flatten(1), dim=0, return_inverse=True)  # (U, R*C), (B,)
        if len(uniq) == grid.size(0):
            return super()._regions(feats)
        first = torch.zeros(len(uniq), dtype=torch.long, device=grid.device).scatter_(
            0, inverse, torch.arange(grid.size(0), device=grid.device)
        )  # (U,) a batch row of each distinct map
        attrs = feats.attrs[first] if feats.attrs is not None else None
        v, keys, img_gates = super()._regions(Features(feats.pooled[first], grid[first], attrs))
        return v[inverse], keys[inverse], img_gates[inverse]  # (B, R, H), (B, R, A), (B, G*H)

    # -- one word -----------------------------------------------------------------------------
    def _attend(self, h_att, v, keys):
        ctx, alpha = super()._attend(h_att, v, keys)  # (n, H), (n, R)
        x = torch.cat([ctx, h_att.to(ctx.dtype)], -1)  # (n, 2H)
        return F.glu(self.ctx_aoa(x), -1), alpha  # (n, H): information * sigmoid(gate)
