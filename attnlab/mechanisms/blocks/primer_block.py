"""The Primer layer (So et al., 2021): a pre-norm block with multi-dconv-head attention and the squared-ReLU FFN.

    h = x + MDHA(LN₁(x))
    y = h + W₂ relu(W₁ LN₂(h) + b₁)² + b₂          W₁: dim → mlp_ratio·dim, W₂ back

Primer's two changes to the Transformer layer, together: the token mixer is multi-dconv-head
attention (`primer`, attnlab/mechanisms/dense/primer.py: a causal depthwise convolution of width 3
per head and channel after the Q, K, V projections, then softmax attention) and the feed-forward
activation is relu(x)² (`SquaredReLUFeedForward` of the same file). Everything else is the
pre-norm block (`pre-norm-block`): one LayerNorm before each residual branch.

Choices:

* The mixer defaults to `primer` and is any registered mechanism (`mixer`, `mixer_params`), so
  the squared-ReLU FFN alone (mixer "softmax") and MDHA alone (`pre-norm-block` with mixer
  "primer") are the paper's ablations.
* The paper's layers are decoder layers (causal LM); `causal=False` is offered for encoders (the
  MDHA convolution stays causal then, see primer.py).
* Normalisation: LayerNorm with bias (the paper's baselines are T5-style Transformers whose norms
  vary by codebase; the two changes do not depend on it). Hidden width 4·dim as in the paper.
* Padded tokens: the mixer ignores them as keys and reads them as zeros in its convolution windows;
  the per-token layers leave other tokens alone.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...core.registry import Param, Supports, register
from ..dense.primer import PRIMER, SquaredReLUFeedForward
from .base import Block, Impl


@register(
    name="primer-block",
    kind="block",
    paper=PRIMER,
    family="A",
    cost="O(mixer + N d²)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, materialize=False),
    params=(Param("mlp_ratio", float, 4.0, "hidden width of the squared-ReLU FFN as a multiple of dim", low=0.25),),
    summary="Primer layer: x + MDHA(LN x), then + W₂ relu(W₁ LN ·)²; the mixer (default primer) any registered mechanism",
)
class PrimerBlock(Block):
    """x + Mixer(LN x) (default mixer: Primer's multi-dconv-head attention), then + W₂ relu(W₁ LN ·)²."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        mixer: str = "primer",
        mixer_params: dict[str, Any] | None = None,
        causal: bool = False,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(dim, heads, mixer=mixer, mixer_params=mixer_params, causal=causal)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = SquaredReLUFeedForward(dim, max(1, round(mlp_ratio * dim)))

    def block(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        h = x + self.mix(self.norm1(x), keep, impl)
        return h + self.ffn(self.norm2(h))
