"""Normalized attention without the probability cage (Richter & Wattenhofer, 2020): NAP and NON.

Softmax keeps every attention row on the probability simplex, so a token's output is a
convex combination of the values. The paper replaces the softmax by a normalisation of the
logits. Per head h, with s_ij = q_i·k_j over the keys j row i may see (its "real" keys):

    NAP:  a_ij = g_h · (s_ij − μ_i) / (σ_i + ε) + b_h       μ_i, σ_i: mean and population std of s_i· over
                                                             the real keys; gain g_h (init 1), shift b_h (init 0)
    NON:  a_ij = s_ij / (√d_h · √n_i)                         no normalisation, n_i the number of real keys
    out_i = Σ_j a_ij v_j,      a_ij = 0 at every masked key

The weights can be negative and need not sum to 1 (`normalized=False` in the catalogue). The
paper's baselines are pooling without attention, offered as the variants

    sum:   a_ij = 1          (sum pooling over the real keys)
    mean:  a_ij = 1 / n_i    (mean pooling)

applied to the projected values (the paper pools the tokens themselves; through the value and
output projections that is the same up to a linear map). Max pooling, the paper's other baseline,
is not a weighted sum of the values (it takes a maximum per channel) and is not offered.

The attention block. After the weighted sum the paper's layer normalises and applies a
non-linearity before the output projection (the non-linearity matters once the weights are
no longer convex):

    y_i = W_o · GELU(LayerNorm(concat_h out_i^h))

`hidden_norm` and `activation` switch the LayerNorm and the GELU off. In the authors' code
(OliverRichter/normalized-attention, TensorFlow) the NON model drops the LayerNorm, the √n
division taking its place, and the pooling baselines have neither (build them with
hidden_norm=False, activation=False for those forms); here both default to on for every variant.

Details, from the authors' code: NAP does not divide the logits by √d_h (the normalisation
removes any scale); ε = 1e-3 is added to the std, not under the square root; μ, σ and n are over
the real keys only, so padding changes nothing. Masks: a query's real keys are those the
combined mask (padding, causality, attn_mask) lets it see; a finite additive attn_mask is added
to the logits before the normalisation (NAP, NON) and has no effect on the pooling variants. A
row with no real key gives zeros; a row with one real key has σ = 0 and NAP gives it the
shift b_h. Causal use (the statistics over the visible prefix) and cross-attention follow from
the masks; the paper uses the encoder form.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import combine_masks
from ...core.module import Attention, Impl, KVCache
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice, check_qkv

NAP_PAPER = Paper("P122", "Normalized Attention Without Probability Cage", 2020, "2005.09561")
VARIANTS: tuple[str, ...] = ("nap", "non", "sum", "mean")
EPS = 1e-3  # added to the std of the logits (authors' code)

PerHead = float | Tensor


def normalized_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q kᵀ and A v (4·h·n²·d) and the row statistics (about 6·h·n²)."""
    return heads * n * n * (4.0 * head_dim + 6.0) * (0.5 if causal else 1.0)


def _per_head(name: str, value: PerHead, heads: int, like: Tensor) -> Tensor:
    """A float or a (heads,) tensor as a (1, heads, 1, 1) tensor of like's dtype, keeping its graph."""
    if isinstance(value, Tensor):
        if value.numel() not in (1, heads):
            raise ShapeError(f"{name}: expected a float or {heads} values (one per head), got shape {tuple(value.shape)}")
        return value.to(like.dtype).reshape(1, -1, 1, 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError(f"{name}: expected a finite float or a tensor of per-head values, got {value!r}")
    return torch.full((1, 1, 1, 1), float(value), dtype=like.dtype, device=like.device)


def _check_variant_eps(variant: object, eps: object) -> None:
    check_choice("variant", variant, VARIANTS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ParameterError(f"eps: expected a finite float >= 0, got {eps!r}")


def _weights(q: Tensor, k: Tensor, mask: Tensor | None, variant: str, gain: Tensor, shift: Tensor, eps: float) -> Tensor:
    """The weights a (batch, heads, n_q, n_k) under a combined mask (None, bool True = attend, or additive)."""
    b, h, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if mask is None:
        allowed = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=q.device)
        bias = None
    elif mask.dtype == torch.bool:
        allowed, bias = mask, None
    else:
        allowed = mask > -math.inf
        bias = mask.to(q.dtype).masked_fill(~allowed, 0.0)
    allowed = allowed.expand(b, h, n_q, n_k)
    count = allowed.sum(-1, keepdim=True).clamp_min(1).to(q.dtype)
    if variant == "sum":
        return allowed.to(q.dtype)
    if variant == "mean":
        return allowed.to(q.dtype) / count
    scores = q @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    if variant == "non":
        return scores.masked_fill(~allowed, 0.0) / (math.sqrt(q.shape[-1]) * count.sqrt())
    mean = scores.masked_fill(~allowed, 0.0).sum(-1, keepdim=True) / count
    centered = (scores - mean).masked_fill(~allowed, 0.0)
    std = (centered.square().sum(-1, keepdim=True) / count).clamp_min(torch.finfo(q.dtype).tiny).sqrt()
    return (gain * (centered / (std + eps)) + shift).masked_fill(~allowed, 0.0)


def normalized_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str = "nap",
    gain: PerHead = 1.0,
    shift: PerHead = 0.0,
    eps: float = EPS,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Σ_j a_ij v_j over (batch, heads, n, head_dim) with the variant's weights (module docstring): NAP's
    g·(s − μ)/(σ + ε) + b over the real keys, NON's s/(√d √n), or sum / mean pooling.

    gain, shift: a float or one value per head (NAP only); masks as `softmax_attention`.
    """
    check_qkv(q, k, v)
    _check_variant_eps(variant, eps)
    heads = q.shape[1]
    mask = combine_masks(batch=q.shape[0], heads=heads, n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device)
    a = _weights(q, k, mask, variant, _per_head("gain", gain, heads, q), _per_head("shift", shift, heads, q), eps)
    return a @ v


def normalized_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str = "nap",
    gain: PerHead = 1.0,
    shift: PerHead = 0.0,
    eps: float = EPS,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, a) of `normalized_attention` in float64, row statistics taken as weighted means over the real keys."""
    check_qkv(q, k, v)
    _check_variant_eps(variant, eps)
    heads = q.shape[1]
    mask = combine_masks(batch=q.shape[0], heads=heads, n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=torch.float64, device=q.device)
    return _reference(q, k, v, mask, variant, gain, shift, eps)


def _reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, variant: str, gain: PerHead, shift: PerHead, eps: float
) -> tuple[Tensor, Tensor]:
    """The float64 computation of `normalized_attention_reference` under a combined mask."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    b, h, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    logits = torch.einsum("bhid,bhjd->bhij", q64, k64)
    real = torch.ones(b, h, n_q, n_k, dtype=torch.float64, device=q.device)  # 1 at a real key, 0 elsewhere
    if mask is not None:
        additive = mask.double() if mask.dtype != torch.bool else torch.where(mask, 0.0, -math.inf).double()
        real = real * (additive > -math.inf).double()
        logits = logits + torch.where(additive > -math.inf, additive, torch.zeros_like(additive))
    n = real.sum(-1, keepdim=True)
    share = real / torch.where(n > 0, n, torch.ones_like(n))  # 1/n_i at the real keys
    if variant == "sum":
        a = real
    elif variant == "mean":
        a = share
    elif variant == "non":
        a = real * logits / math.sqrt(q.shape[-1]) / torch.where(n > 0, n, torch.ones_like(n)).sqrt()
    else:
        g = gain.double().reshape(1, -1, 1, 1) if isinstance(gain, Tensor) else float(gain)
        s = shift.double().reshape(1, -1, 1, 1) if isinstance(shift, Tensor) else float(shift)
        mu = (share * logits).sum(-1, keepdim=True)
        var = (share * (logits - mu) ** 2).sum(-1, keepdim=True)
        sigma = torch.where(var > 0, var, torch.full_like(var, torch.finfo(torch.float64).tiny)).sqrt()
        a = real * (g * (logits - mu) / (sigma + eps) + s)
    out = torch.einsum("bhij,bhjd->bhid", a, v64)
    return out.to(q.dtype), a.to(q.dtype)


@register(
    name="normalized-attention",
    paper=NAP_PAPER,
    family="A",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True, cross=True, decode=True),
    params=(
        Param("variant", str, "nap", "'nap' (standardised logits, gain and shift per head), 'non' (logits / "
              "(√d √n), no normalisation), 'sum' or 'mean' (pooling baselines)", choices=VARIANTS),
        Param("eps", float, EPS, "added to the std of a row's logits (NAP)", low=0.0),
        Param("hidden_norm", bool, True, "LayerNorm over the concatenated heads before the activation"),
        Param("activation", bool, True, "GELU before the output projection"),
    ),
    summary="Normalized attention (NAP): per-row standardised logits with a gain and shift per head instead of "
            "softmax; NON and sum/mean pooling variants.",
    normalized=False,
    flops=normalized_flops,
)
class NormalizedAttention(Attention):
    """Attention without the probability cage: a_ij = g_h·(s_ij − μ_i)/(σ_i + ε) + b_h over the real keys (NAP),
    or NON / sum / mean weights; then LayerNorm and GELU on the merged heads, and the output projection."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        variant: str = "nap",
        eps: float = EPS,
        hidden_norm: bool = True,
        activation: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        _check_variant_eps(variant, eps)
        for name, flag in (("hidden_norm", hidden_norm), ("activation", activation)):
            if not isinstance(flag, bool):
                raise ParameterError(f"{name}: expected a bool, got {flag!r}")
        self.variant, self.eps = variant, float(eps)
        self.gain = nn.Parameter(torch.ones(heads))
        self.shift = nn.Parameter(torch.zeros(heads))
        inner = heads * self.head_dim
        self.hidden_norm: nn.Module = nn.LayerNorm(inner) if hidden_norm else nn.Identity()
        self.activation: nn.Module = nn.GELU() if activation else nn.Identity()

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        gain, shift = self.gain.to(q.dtype).reshape(1, -1, 1, 1), self.shift.to(q.dtype).reshape(1, -1, 1, 1)
        return _weights(q, k, mask, self.variant, gain, shift, self.eps) @ v

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return _reference(q, k, v, mask, self.variant, self.gain, self.shift, self.eps)

    def hidden(self, merged: Tensor) -> Tensor:
        """The block between the weighted sum and the output projection: GELU(LayerNorm(·)) on (batch, n, inner)."""
        return self.activation(self.hidden_norm(merged))

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, n, dim) -> out_proj(GELU(LayerNorm(merge_heads(A v)))); arguments as `Attention.forward`."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(x, context)
        core = self.attend(q, k, v, attention_mask=keep, attn_mask=attn_mask, impl=impl)
        out = self.out_proj(self.hidden(self.merge_heads(core)))
        return out if self.batch_first else out.transpose(0, 1)

    def decode(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        """The KV-cache recurrence of `Attention.decode`, with the hidden block before the output projection."""
        q, k, v = self.cached_qkv(x_t, state)
        return self.out_proj(self.hidden(self.merge_heads(self.attend(q, k, v)))), KVCache(k, v)

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """The output as a function of the weights: out_proj's matrix applied to GELU(LayerNorm(merge_heads(weights ·
        v))), without the output bias (`Attention.attention_path`; not linear in the weights here)."""
        x, context = self.batch_major(x, context)
        with torch.no_grad():
            v = self.project(x.reshape(x.shape[0], -1, x.shape[-1]), context)[2]
        merged = self.merge_heads(weights.to(v.dtype) @ v)
        out = F.linear(self.hidden(merged), self.out_proj.weight)
        return out if self.batch_first else out.transpose(0, 1)
