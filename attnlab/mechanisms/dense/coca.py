"""CoCA, collinear constrained attention (Zhu et al., 2023): RoPE with each key collinear to its query.

RoPE splits a head into d/2 planes m (half-split: channels (m, m + d/2)) turned by
angles pθ_m, θ_m = base^(−2m/d). CoCA replaces the key projection by a magnitude
projection T and builds, for every pair (i, j), a key that points along the query in
each plane:

    t_j^(m) = ReLU(((T x_j)_m + (T x_j)_{m+d/2}) / 2) ≥ 0        (halve, keep non-negative)
    k_ij^(m) = t_j^(m) q_i^(m)                                     (collinear with q_i^(m))
    s_ij = Σ_m (R(iθ_m) q_i^(m))ᵀ R(jθ_m) k_ij^(m) = Σ_m |q_i^(m)|² t_j^(m) cos((i − j)θ_m)

so every plane contributes ≥ 0 while |i − j|θ_m ≤ π/2 — the score no longer dips for
nearby tokens (the "headache" of RoPE). Fast path without per-pair keys: with
cos((i−j)θ) = cos iθ cos jθ + sin iθ sin jθ,

    s_ij = a_iᵀ b_j,   a_i = [|q_i^(m)|² cos iθ_m ; |q_i^(m)|² sin iθ_m],   b_j = [t_j^(m) cos jθ_m ; t_j^(m) sin jθ_m]

two d-vectors per token, fed to SDPA with scale 1/√d. Positions: keys at 0..n_k−1,
queries bottom-right aligned, so KV-cache decoding equals the causal forward.

The official code (codefuse-ai/Collinear-Constrained-Attention) contracts
q ⊙ R(jθ)t ⊙ R(iθ)q channel by channel, which is not equal to the equation above
(it differs already at i = j); attnlab follows the paper's equation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.masks import combine_masks
from ...core.reference import masked_softmax
from ...core.registry import Paper
from ...core.validate import check_qkv
from ...kernels.sdpa import sdpa
from .rope import BASE_PARAM, RotaryAttention, apply_rope, check_base, check_even_head_dim, rope_angles, rope_positions
from .softmax import dense_flops, register_dense

COCA = Paper(
    "P023",
    "CoCA: Fusing Position Embedding with Collinear Constrained Attention in Transformers for Long Context Window Extending",
    2023,
    "2309.08646",
)


def coca_magnitudes(t: Tensor) -> Tensor:
    """t_j^(m) = ReLU((t_m + t_{m+d/2}) / 2): (..., n, d) projections -> (..., n, d/2) non-negative magnitudes."""
    half = t.shape[-1] // 2
    return F.relu((t[..., :half] + t[..., half:]) / 2)


def _check(q: Tensor, t: Tensor, v: Tensor) -> None:
    check_qkv(q, t, v)
    check_even_head_dim("q", q)


def coca_factors(q: Tensor, t: Tensor, *, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(a, b) with a_iᵀ b_j = Σ_m |q_i^(m)|² t_j^(m) cos((i − j)θ_m); each (batch, heads, n, d)."""
    pos_q, pos_k = rope_positions(q.shape[2], t.shape[2], q.device)
    half = q.shape[-1] // 2
    norm2 = q[..., :half].square() + q[..., half:].square()
    cos_q, sin_q = rope_angles(pos_q, q.shape[-1], base, q.dtype)
    cos_k, sin_k = rope_angles(pos_k, q.shape[-1], base, q.dtype)
    mag = coca_magnitudes(t)
    return torch.cat((norm2 * cos_q, norm2 * sin_q), dim=-1), torch.cat((mag * cos_k, mag * sin_k), dim=-1)


def coca_scores_reference(q: Tensor, t: Tensor, *, base: float = 10000.0) -> Tensor:
    """Unscaled scores (batch, heads, n_q, n_k) in float64, with every per-pair key k_ij built explicitly."""
    q64 = q.double()
    mag = coca_magnitudes(t.double())
    pos_q, pos_k = rope_positions(q.shape[2], t.shape[2], q.device)
    keys = q64[:, :, :, None, :] * torch.cat((mag, mag), dim=-1)[:, :, None, :, :]  # k_ij: (b, h, n_q, n_k, d)
    q_rot = apply_rope(q64, pos_q, base=base)
    k_rot = apply_rope(keys, pos_k, base=base)  # rotates key j of every row i by jθ
    return torch.einsum("bhid,bhijd->bhij", q_rot, k_rot)


def _mask(q: Tensor, t: Tensor, causal: bool, attention_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    return combine_masks(
        batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=t.shape[2], causal=causal,
        attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device,
    )


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _attend_reference(
    q: Tensor, t: Tensor, v: Tensor, mask: Tensor | None, base: float, scale: float
) -> tuple[Tensor, Tensor]:
    scores = coca_scores_reference(q, t, base=base) * scale
    weights = masked_softmax(scores, mask if mask is None or mask.dtype == torch.bool else mask.double())
    out = torch.einsum("bhij,bhjd->bhid", weights, v.double())
    return out.to(q.dtype), weights.to(q.dtype)


def coca_attention(
    q: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    base: float = 10000.0,
    scale: float | None = None,
) -> Tensor:
    """softmax(s·scale + mask) v with the CoCA score s; t is the magnitude projection (it takes the key's place).

    q, t, v are (batch, heads, n, head_dim), head_dim even; scale defaults to 1/√head_dim.
    """
    _check(q, t, v)
    check_base(base)
    a, b = coca_factors(q, t, base=base)
    return sdpa(a, b, v, _mask(q, t, False, attention_mask, attn_mask), scale=_scale(q, scale), causal=causal)


def coca_attention_reference(
    q: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    base: float = 10000.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `coca_attention` in float64, the keys k_ij and the weights materialised.

    Memory is O(batch·heads·n_q·n_k·head_dim): meant for tests and `materialize` on short inputs.
    """
    _check(q, t, v)
    check_base(base)
    return _attend_reference(q, t, v, _mask(q, t, causal, attention_mask, attn_mask), base, _scale(q, scale))


@register_dense(
    name="coca",
    sharding=("ring", "tree"),
    paper=COCA,
    family="C",
    params=(BASE_PARAM,),
    flops=dense_flops,
    summary="RoPE attention whose keys are constrained collinear with the query in every rotary plane.",
)
class CoCAAttention(RotaryAttention):
    """Collinear constrained attention (CoCA); head_dim must be even.

    The key projection `k_proj` plays the role of the paper's T projection: its output
    is halved into d/2 non-negative magnitudes t_j. The KV cache of `step` stores these
    projections unrotated. Cross-attention places the context at 0..m−1 and the queries
    bottom-right aligned to it, as RoPE does.
    """

    rotary_scheme = "CoCA"
    causal_in_kernel = True  # attend_fast hands causality to SDPA

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        a, b = coca_factors(q, k, base=self.base)
        return sdpa(a, b, v, mask, scale=self.scale, causal=self.causal)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return _attend_reference(q, k, v, mask, self.base, self.scale)
