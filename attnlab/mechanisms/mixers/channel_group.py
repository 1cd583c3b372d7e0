"""Channel group attention (Ding et al., "DaViT: Dual Attention Vision Transformers", 2022).

The C channels are split into G groups (the heads, C_g = C / G channels each); per group, with
Q, K, V ∈ R^{N×C_g} the group's projections of the N tokens,

    A = softmax(Qᵀ K / √C_g) ∈ R^{C_g×C_g}      (softmax over the key channel j of each row i)
    out = (A Vᵀ)ᵀ = V Aᵀ,   i.e. out_n = A v_n

Every channel attends to all channels of its group, the logits being sums over all tokens,
so each output channel is a global mix. Cost O(N·C_g²) per group, O(N·C·C_g) in all: linear
in N. Unlike XCiT's cross-covariance attention there is no L2 normalisation of the channels
and no learnable temperature: the scale is 1/√C_g.

The paper writes softmax(Qᵀ K / √C_g) Vᵀ; the official code computes softmax(Kᵀ V·scale)
applied to Q, which is the same operator with the three projections renamed (they are learned
linear maps of the same tokens). Here the paper's naming holds.

Key padding: padded tokens are set to zero in q, k and v, so they enter no logit and their
outputs are zero; an element with no real token has A = 0.

There is no causal mode (A pools over all tokens) and no cross-attention. There is no N×N
token matrix: token n's output mixes only its own value channels, so `materialize` raises
and `channel_attention(x)` gives the (batch, heads, C_g, C_g) matrices, rows summing to 1.
Analysis tools that follow information between tokens should treat the layer as the
identity on tokens (block diagonal, token n to token n, with the data-dependent map A).
DaViT's spatial window attention, the other half of its dual block, is window attention as
in `twins-lsa` (local/twins.py); the dual block itself (window and channel layers, each with
its own norm, projections and MLP) is a network block, not one attention operator.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...core.reference import masked_softmax
from ...core.registry import Paper, Supports, register
from ._channel import ChannelAttention, any_real, check_channel_qkv, drop_padding

DAVIT = Paper("P096", "DaViT: Dual Attention Vision Transformers", 2022, "2204.03645")


def channel_group_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of Qᵀ K and V Aᵀ: 2·N·C_g² each, per group."""
    return 4.0 * heads * n * head_dim * head_dim


def channel_group_attention(
    q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Channel group attention over (batch, groups, n, C_g): out = V Aᵀ, A = softmax(Qᵀ K·scale).

    scale defaults to 1/√C_g; attention_mask (batch, n), True = real token. Two batched
    matmuls of O(N·C_g²) per group, no N×N tensor.
    """
    check_channel_qkv(q, k, v, attention_mask, f"C_g = {k.shape[-1]} channels")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (drop_padding(t, attention_mask) for t in (q, k, v))
    a = torch.softmax((q.transpose(-2, -1) @ k) * scale, dim=-1)
    return v @ any_real(a, attention_mask).transpose(-2, -1)


def channel_group_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """(out, A) of `channel_group_attention` in float64: A (batch, groups, C_g, C_g), out_n = A v_n token by token."""
    check_channel_qkv(q, k, v, attention_mask, f"C_g = {k.shape[-1]} channels")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = (drop_padding(t.double(), attention_mask) for t in (q, k, v))
    logits = torch.einsum("bhni,bhnj->bhij", q64, k64) * scale
    a = any_real(masked_softmax(logits), attention_mask)
    out = torch.einsum("bhij,bhnj->bhni", a, v64)
    return out.to(q.dtype), a.to(q.dtype)


@register(
    name="channel-group",
    paper=DAVIT,
    family="A",
    cost="O(N·C·C_g)",
    exponent=1.0,
    supports=Supports(key_padding=True, materialize=False),
    summary="DaViT channel group attention: per head, a C_g×C_g softmax over channels (logits summed over all tokens) mixes each token's value channels.",
    normalized=False,
    flops=channel_group_flops,
)
class ChannelGroupAttention(ChannelAttention):
    """DaViT channel group attention: the heads are the G channel groups; per group A = softmax(Qᵀ K / √C_g), out = V Aᵀ.

    `materialize` raises (there is no token×token matrix); `channel_attention(x)` gives the
    (batch, heads, C_g, C_g) matrices, rows summing to 1.
    """

    channel_axes = "C_g, C_g"

    def __init__(self, dim: int, heads: int = 8, *, head_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return channel_group_attention(q, k, v, attention_mask=mask)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return channel_group_attention_reference(q, k, v, attention_mask=mask)
