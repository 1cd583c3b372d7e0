"""Rotary position embedding, RoPE (Su et al., RoFormer, 2021).

Each head splits its d channels into d/2 planes; plane m of a vector at position p is
rotated by the angle p·θ_m, θ_m = base^(−2m/d):

    f(x, p)^(m) = R(p θ_m) x^(m),      score_ij = f(q_i, i)ᵀ f(k_j, j) = q_iᵀ R((j − i)θ) k_j

so the logits depend on positions only through i − j. Pairing convention: half-split
(plane m = channels (m, m + d/2), as in GPT-NeoX and LLaMA), not RoFormer's interleaved
(2m, 2m+1); the two differ by a fixed permutation of channels, which the projections absorb.
Positions: keys sit at 0..n_k−1 and queries are bottom-right aligned (query i at
i + n_k − n_q), so decoding with a KV cache of unrotated keys equals the causal forward.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ...core.errors import ParameterError, ShapeError
from ...core.masks import query_offset
from ...core.module import Attention
from ...core.registry import Paper, Param
from ...core.validate import check_qkv, is_int
from .softmax import SoftmaxAttention, dense_flops, register_dense, softmax_attention, softmax_attention_reference

ROFORMER = Paper(None, "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021, "2104.09864")


def check_base(base: float) -> None:
    """The RoPE base must be a positive number."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
        raise ParameterError(f"base: expected a positive number, got {base!r}")


def check_rotary_module(scheme: str, head_dim: int, dim: int, heads: int, base: float) -> None:
    """A rotary module's head_dim must be even (pairs of channels are rotated) and its base positive."""
    if head_dim % 2:
        raise ParameterError(
            f"head_dim: {scheme} rotates pairs of channels, expected an even head_dim, got {head_dim} "
            f"(dim={dim}, heads={heads})"
        )
    check_base(base)


def check_even_head_dim(name: str, t: Tensor) -> None:
    """Rotary schemes rotate pairs of channels: the last axis of `t` must be even."""
    if t.shape[-1] % 2:
        raise ShapeError(
            f"{name}: rotary position embedding rotates pairs of channels, expected an even head_dim, "
            f"got {t.shape[-1]} in shape {tuple(t.shape)}"
        )


def rope_frequencies(head_dim: int, base: float = 10000.0, *, device: torch.device | None = None) -> Tensor:
    """θ_m = base^(−2m/head_dim) for m = 0..head_dim/2 − 1, float64, shape (head_dim/2,)."""
    if not is_int(head_dim) or head_dim < 2 or head_dim % 2:
        raise ParameterError(f"head_dim: expected an even integer >= 2, got {head_dim!r}")
    check_base(base)
    m = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    return float(base) ** (-2.0 * m / head_dim)


def rope_angles(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of p·θ_m, each (n, head_dim/2), computed in float64 then cast to `dtype`."""
    theta = rope_frequencies(head_dim, base, device=positions.device)
    angles = positions.to(torch.float64)[:, None] * theta[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, positions: Tensor, *, base: float = 10000.0) -> Tensor:
    """Rotate x (..., n, d) at `positions` (n,): plane m = channels (m, m + d/2) turns by positions·θ_m."""
    check_even_head_dim("x", x)
    if positions.dim() != 1 or positions.shape[0] != x.shape[-2]:
        raise ShapeError(
            f"positions: expected a 1-D tensor of length n = {x.shape[-2]} (axis -2 of x), got shape {tuple(positions.shape)}"
        )
    half = x.shape[-1] // 2
    cos, sin = rope_angles(positions, x.shape[-1], base, x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_positions(n_q: int, n_k: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Positions of queries and keys: keys 0..n_k−1, query i at i + n_k − n_q (bottom-right aligned)."""
    return torch.arange(n_q, device=device) + query_offset(n_q, n_k), torch.arange(n_k, device=device)


def _rotate(q: Tensor, k: Tensor, base: float) -> tuple[Tensor, Tensor]:
    check_qkv(q, k, k)
    check_even_head_dim("q", q)
    pos_q, pos_k = rope_positions(q.shape[2], k.shape[2], q.device)
    return apply_rope(q, pos_q, base=base), apply_rope(k, pos_k, base=base)


BASE_PARAM = Param("base", float, 10000.0, "RoPE base: θ_m = base^(−2m/head_dim)", low=1.0)


class RotaryAttention(Attention):
    """The constructor shared by the rotary modules (RoPE, CoCA): the common arguments and the RoPE
    `base`, checked by `check_rotary_module` under the name `rotary_scheme`."""

    rotary_scheme: ClassVar[str]

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        base: float = 10000.0,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        check_rotary_module(self.rotary_scheme, self.head_dim, dim, heads, base)
        self.base = float(base)


def rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    base: float = 10000.0,
    scale: float | None = None,
) -> Tensor:
    """softmax(f(q)f(k)ᵀ·scale + mask) v with RoPE f; q, k, v (batch, heads, n, head_dim), head_dim even."""
    qr, kr = _rotate(q, k, base)
    return softmax_attention(
        qr, kr, v, causal=causal, attention_mask=attention_mask, attn_mask=attn_mask, scale=scale
    )


def rope_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    base: float = 10000.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `rope_attention`; the rotation and the softmax run in float64."""
    qr, kr = _rotate(q.double(), k.double(), base)
    out, weights = softmax_attention_reference(
        qr, kr, v.double(), causal=causal, attention_mask=attention_mask, attn_mask=attn_mask, scale=scale
    )
    return out.to(q.dtype), weights.to(q.dtype)


@register_dense(
    name="rope",
    sharding=("ring", "tree"),
    paper=ROFORMER,
    family="C",
    params=(BASE_PARAM,),
    flops=dense_flops,
    summary="Softmax attention with rotary position embedding on q and k (half-split pairs).",
)
class RoPEAttention(RotaryAttention, SoftmaxAttention):
    """Multi-head softmax attention with rotary position embedding (RoFormer); head_dim must be even.

    The KV cache of `step` holds unrotated keys; every call rotates keys at 0..n_k−1 and
    queries at their bottom-right aligned positions, so decoding equals the causal forward.
    """

    rotary_scheme = "RoPE"

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        qr, kr = _rotate(q, k, self.base)
        return super().attend_fast(qr, kr, v, mask)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        qr, kr = _rotate(q.double(), k.double(), self.base)
        out, weights = super().attend_reference(qr, kr, v.double(), mask)
        return out.to(q.dtype), weights.to(q.dtype)
