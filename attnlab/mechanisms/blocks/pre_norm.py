"""The pre-norm transformer block (Xiong et al., 2020), around any registered mechanism.

    h = x + Mixer(LN₁(x))
    y = h + W₂ GELU(W₁ LN₂(h))          W₁: dim → mlp_ratio·dim, W₂ back

The layer norm sits before each residual branch (pre-LN), the form every modern transformer uses
and which trains without warm-up (the paper's claim). With `mixer` any registered mechanism, this
block is the common ground on which mechanisms are compared inside a model (recall, repro).
Padded tokens: the mixer ignores them as keys; the per-token layers leave other tokens alone.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...core.registry import Paper, Param, Supports, register
from .base import Block, Impl

PRE_LN = Paper(None, "On Layer Normalization in the Transformer Architecture", 2020, "2002.04745")


@register(
    name="pre-norm-block",
    kind="block",
    paper=PRE_LN,
    family="C",
    cost="O(mixer + N d²)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, materialize=False),
    params=(Param("mlp_ratio", float, 4.0, "hidden width of the MLP as a multiple of dim", low=0.25),),
    summary="pre-LN transformer block x + Mixer(LN x), then + MLP(LN ·), around any registered mechanism",
)
class PreNormBlock(Block):
    """x + Mixer(LN x), then + MLP(LN ·) with a GELU MLP of width mlp_ratio·dim."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        mixer: str = "softmax",
        mixer_params: dict[str, Any] | None = None,
        causal: bool = False,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(dim, heads, mixer=mixer, mixer_params=mixer_params, causal=causal)
        hidden = max(1, round(mlp_ratio * dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def block(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        h = x + self.mix(self.norm1(x), keep, impl)
        return h + self.mlp(self.norm2(h))
