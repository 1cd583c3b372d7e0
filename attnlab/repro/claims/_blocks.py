"""The pre-norm transformer block the trained claims' small models are made of."""
from __future__ import annotations

from torch import Tensor, nn

from ...core.registry import build as build_module


class PreNormBlock(nn.Module):
    """h + Attn(LN₁ h), then + MLP(LN₂ ·) (GELU, hidden width 2·dim), with attnlab softmax attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = build_module("softmax", dim=dim, heads=heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))

    def forward_with_map(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(the block's output, the attention weights (batch, heads, n, n) it applied)."""
        normed = self.norm1(h)
        h = h + self.attn(normed)
        return h + self.mlp(self.norm2(h)), self.attn.materialize(normed)
