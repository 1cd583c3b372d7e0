"""Softmax attention (Vaswani et al., 2017), the dense baseline.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d + B + M) V

B is an optional score bias (positional terms), M the combined mask. The fast path is
torch's `scaled_dot_product_attention` in its fastest applicable causal form (`attnlab.kernels.sdpa`):
`is_causal=True`, torch's lower-right `CausalBias` or no mask at all, and a materialised
mask only when padding, an attn_mask or a score bias needs one; fully masked rows give zeros.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ...core.masks import combine_masks
from ...core.module import Attention
from ...core.reference import softmax_attention_reference as _reference
from ...core.registry import Paper, Supports, register
from ...core.validate import check_qkv
from ...kernels.sdpa import sdpa

VASWANI = Paper(None, "Attention Is All You Need", 2017, "1706.03762")
DENSE_SUPPORTS = Supports(causal=True, key_padding=True, attn_mask=True, cross=True, decode=True)


def dense_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q kᵀ and A v for one sequence: 4·h·n²·d, half of it when causal."""
    return 4.0 * heads * n * n * head_dim * (0.5 if causal else 1.0)


def _mask(
    q: Tensor, k: Tensor, causal: bool, attention_mask: Tensor | None, attn_mask: Tensor | None
) -> Tensor | None:
    return combine_masks(
        batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
        attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device,
    )


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q kᵀ·scale + bias + mask) v over (batch, heads, n, head_dim); scale defaults to 1/√head_dim."""
    check_qkv(q, k, v)
    return sdpa(q, k, v, _mask(q, k, False, attention_mask, attn_mask), bias, scale, causal=causal)


def softmax_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `softmax_attention`, computed in float64 with the weights materialised."""
    check_qkv(q, k, v)
    return _reference(q, k, v, mask=_mask(q, k, causal, attention_mask, attn_mask), bias=bias, scale=scale)


def register_dense(
    *, name: str, paper: Paper, family: str, summary: str, sharding: tuple[str, ...] = (), **entry: Any
) -> Callable[[type], type]:
    """`register` for exact (dense) softmax attention: cost O(N²d), exponent 2, `DENSE_SUPPORTS` (causal,
    every mask, cross-attention, decoding) with `sharding` (its attnlab.distributed strategies); `entry` holds
    the rest (params, test_params, flops)."""
    supports = replace(DENSE_SUPPORTS, sharding=tuple(sharding))
    return register(
        name=name, paper=paper, family=family, cost="O(N²d)", exponent=2.0, supports=supports, summary=summary,
        **entry,
    )


class ScoreTerm(nn.Module, ABC):
    """An additive term b(i, j) per head on the attention logits, like attention-gym's score_mod.

    `forward(n_q, n_k)` returns (heads, n_q, n_k), queries bottom-right aligned to keys.
    """

    @abstractmethod
    def forward(self, n_q: int, n_k: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The bias (heads, n_q, n_k)."""


@register_dense(
    name="softmax",
    sharding=("ring", "tree"),
    paper=VASWANI,
    family="A",
    summary="Scaled dot-product softmax attention (SDPA fast path).",
    flops=dense_flops,
)
class SoftmaxAttention(Attention):
    """Multi-head softmax attention; positional schemes plug in as score terms or a q/k rotation."""

    causal_in_kernel = True  # attend_fast hands causality to SDPA (is_causal / lower-right bias)

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        score_terms: Sequence[ScoreTerm] = (),
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.score_terms = nn.ModuleList(score_terms)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def score_bias(self, q: Tensor, k: Tensor) -> Tensor | None:
        """Sum of the score terms, (heads, n_q, n_k), or None."""
        bias = None
        for term in self.score_terms:
            b = term(q.shape[2], k.shape[2], device=q.device, dtype=q.dtype)
            bias = b if bias is None else bias + b
        return bias

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return sdpa(q, k, v, mask, self.score_bias(q, k), self.scale, causal=self.causal)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return _reference(q, k, v, mask=mask, bias=self.score_bias(q, k), scale=self.scale)
