"""Selective self-attention, SSA: softmax attention with query and value temperatures (Zhang et al., 2024).

Each query gets an inverse temperature τ_i that multiplies its logits, and each value a scale:

    out_i = Σ_j softmax_j(τ_i · q_iᵀk_j / √d_h + M_ij) · ṽ_j
    τ_i    = τ_pos(i) + τ_tok(q_i)
    τ_pos(i) = 1 + σ(α_h) · log n_i            (position temperature, per head)
    τ_tok(q_i) = tanh(u_hᵀ q_i + b_h)           (token temperature, per head)
    ṽ_j    = τ_v(v_j) · v_j,  τ_v(v_j) = 1 + tanh(w_hᵀ v_j + c_h)     (value temperature, per head)

n_i is the number of keys query i sees: i (1-based) for a causal sequence, as in the paper's log i
and the official code. A larger context gives a larger τ_pos, which sharpens the softmax and
counters the dilution of attention over long contexts; τ_tok lets a query pick its own sparsity;
τ_v ∈ (0, 2) lets a token's value be suppressed.

Choices (the row of this paper gives the parametrization as approximate; these are ours):

* n_i counts the keys the masks leave to query i (causality, padding and attn_mask), not the raw
  position: padding is removal (a left-padded sequence gives its real tokens the outputs of the
  unpadded one), the non-causal mode uses the visible context size, decoding with a KV cache is
  the causal forward. A row with no visible key (n_i = 0) gives zeros.
* Position gate: σ(α_h), one per head. The official code (umich-sota/selective_attention, which
  releases the position term only) multiplies the causal logits by 1 + exp(−exp(β))·log i with one
  β per layer, β = 1.5 at start (gpt_2_PTS.py): the same range (0, 1) under another
  parametrization. `position_init` is the starting gate, exp(−exp(1.5)) ≈ 0.0113 by default, as
  the code's.
* Weight sharing (the paper's "<0.5% new parameters"): τ_tok reads the head's query q_i = W_q x_i
  and τ_v the head's value v_j = W_v x_j, so each adds d_h + 1 parameters per head (u_h, b_h and
  w_h, c_h), plus α_h: h·(2·d_h + 3) in all. Initialised as nn.Linear(d_h, 1) per head. The value
  temperature is written 1 + tanh so that a zero map is the identity, as τ_pos + τ_tok is 1 at
  σ(α) = 0 and a zero token map.
* `position`, `token`, `value` switch each term off (the paper's ablations); all off with the
  token map at zero is softmax attention.

Fast path: the logits are (τ_i q_i)ᵀ k_j: SDPA on the queries scaled by τ_i (`kernels.sdpa`, with its
causal form), no bias and no materialised logits. The module scales the values by τ_v in `project`
(so `materialize`'s A explains the output as A ṽ) and the queries in the core, where the masks give
n_i. The float64 reference computes τ, the logits and the weights from the formula.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import causal_mask, combine_masks, keep_of, query_offset
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param
from ...core.validate import check_qkv, check_scale, check_tensor
from ...kernels.sdpa import sdpa
from .softmax import SoftmaxAttention, dense_flops, register_dense

SSA = Paper("P098", "Selective Attention: Enhancing Transformer through Principled Context Control", 2024, "2411.12892")
POSITION_INIT = math.exp(-math.exp(1.5))  # the official code's start: exp(−exp(β)), β = 1.5

LinearMap = tuple[Tensor, Tensor]  # (weight (heads, head_dim), bias (heads,)) of a per-head map d_h -> 1


def _check_map(name: str, value: LinearMap | None, heads: int, head_dim: int) -> None:
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected (weight (heads, head_dim), bias (heads,)) or None, got {type(value).__name__}")
    weight, bias = check_tensor(f"{name} weight", value[0]), check_tensor(f"{name} bias", value[1])
    if tuple(weight.shape) != (heads, head_dim) or tuple(bias.shape) != (heads,):
        raise ShapeError(
            f"{name}: expected weight (heads, head_dim) = {(heads, head_dim)} and bias ({heads},), got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )


def _gate(position_gate: float | Tensor | None, heads: int, like: Tensor) -> Tensor | None:
    """The position gate σ(α) as (heads,) in [0, 1) of like's dtype, or None."""
    if position_gate is None:
        return None
    if isinstance(position_gate, Tensor):
        if position_gate.numel() not in (1, heads):
            raise ShapeError(f"position_gate: expected a float or {heads} values (one per head), got shape {tuple(position_gate.shape)}")
        gate = position_gate.to(like.dtype).reshape(-1).expand(heads)
    elif isinstance(position_gate, (int, float)) and not isinstance(position_gate, bool):
        gate = torch.full((heads,), float(position_gate), dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"position_gate: expected a float, a (heads,) tensor or None, got {type(position_gate).__name__}")
    vals = gate.detach()
    if not bool(((vals >= 0) & (vals < 1)).all()):
        raise ParameterError(f"position_gate: expected values in [0, 1) (σ(α)), got {vals.tolist()}")
    return gate


def visible_keys(mask: Tensor | None, n_q: int, n_k: int, *, causal: bool, device: torch.device | None = None) -> Tensor:
    """n_i, the number of keys each query sees, broadcastable to (batch, heads, n_q): `mask` a combined mask (None,
    bool True = attend, or additive) broadcastable to (batch, heads, n_q, n_k), `causal` (bottom-right aligned)
    applied on top. O(n_q + n_k) when the mask is None or a key padding mask, O(n_q·n_k) otherwise."""
    offset = query_offset(n_q, n_k)
    if mask is None:
        if causal:
            return (torch.arange(n_q, device=device) + offset + 1).clamp(0, n_k)[None, None]
        return torch.full((1, 1, n_q), n_k, device=device)
    keep = keep_of(mask)
    assert keep is not None
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    if keep.shape[-2] == 1:  # a key padding mask: a cumulative count for causality
        if not causal:
            return keep.sum(-1)
        prefix = keep.long().cumsum(-1)[..., 0, :]  # (b, h, n_k)
        last = (torch.arange(n_q, device=keep.device) + offset).clamp(-1, n_k - 1)
        counts = prefix[..., last.clamp_min(0)]
        return torch.where(last >= 0, counts, torch.zeros_like(counts))
    if causal:
        keep = keep & causal_mask(n_q, n_k, keep.device)
    return keep.sum(-1)


def _query_temperature(q: Tensor, counts: Tensor | None, gate: Tensor | None, token: LinearMap | None) -> Tensor:
    """τ_i (batch|1, heads, n_q, 1) = 1 + σ(α) log n_i + tanh(u·q_i + b), the terms that are given (`counts`: n_i
    broadcastable to (batch, heads, n_q), needed with a gate)."""
    tau = torch.ones((1, 1, 1, 1), dtype=q.dtype, device=q.device)
    if gate is not None:
        assert counts is not None
        wide = torch.promote_types(q.dtype, torch.float32)  # log n_i of large counts in at least float32
        tau = tau + gate[None, :, None, None] * counts.to(wide).clamp_min(1).log().to(q.dtype)[..., None]
    if token is not None:
        weight, bias = token
        tau = tau + torch.tanh(torch.einsum("bhnd,hd->bhn", q, weight.to(q.dtype)) + bias.to(q.dtype)[None, :, None])[..., None]
    return tau


def _value_scale(v: Tensor, value: LinearMap) -> Tensor:
    """ṽ_j = (1 + tanh(w·v_j + c)) v_j over v (batch, heads, n, head_dim)."""
    weight, bias = value
    z = torch.einsum("bhnd,hd->bhn", v, weight.to(v.dtype)) + bias.to(v.dtype)[None, :, None]
    return (1 + torch.tanh(z))[..., None] * v


def selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    position_gate: float | Tensor | None = None,
    token: LinearMap | None = None,
    value: LinearMap | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """SSA over (batch, heads, n, head_dim): softmax(τ_i q_iᵀk_j·scale + mask) (τ_v ⊙ v), on SDPA.

    position_gate: σ(α) in [0, 1), a float or one per head (None: no position term, τ_pos = 1);
    token, value: (weight (heads, head_dim), bias (heads,)) of the per-head maps of τ_tok and τ_v, or None.
    """
    check_qkv(q, k, v)
    heads, head_dim = q.shape[1], q.shape[-1]
    _check_map("token", token, heads, head_dim)
    _check_map("value", value, heads, v.shape[-1])
    gate = _gate(position_gate, heads, q)
    scale = check_scale(scale, head_dim)
    mask = combine_masks(batch=q.shape[0], heads=heads, n_q=q.shape[2], n_k=k.shape[2], attention_mask=attention_mask,
                         attn_mask=attn_mask, dtype=q.dtype, device=q.device)
    counts = visible_keys(mask, q.shape[2], k.shape[2], causal=causal, device=q.device)
    tau = _query_temperature(q, counts, gate, token)
    return sdpa(tau * q, k, v if value is None else _value_scale(v, value), mask, None, scale, causal=causal)


def selective_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    position_gate: float | Tensor | None = None,
    token: LinearMap | None = None,
    value: LinearMap | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `selective_attention` in float64, from the formula, the weights materialised."""
    check_qkv(q, k, v)
    heads, head_dim = q.shape[1], q.shape[-1]
    _check_map("token", token, heads, head_dim)
    _check_map("value", value, heads, v.shape[-1])
    gate = _gate(position_gate, heads, q.double())
    mask = combine_masks(batch=q.shape[0], heads=heads, n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=torch.float64, device=q.device)
    return _reference(q, k, v, mask, gate, token, value, check_scale(scale, head_dim))


def _reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, gate: Tensor | None, token: LinearMap | None,
    value: LinearMap | None, scale: float,
) -> tuple[Tensor, Tensor]:
    """The float64 formula on a combined mask with causality included."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    b, h, n_q, _ = q64.shape
    visible = torch.ones(b, h, n_q, k.shape[2], dtype=torch.bool, device=q.device)
    if mask is not None:
        visible = visible & (mask if mask.dtype == torch.bool else mask > float("-inf"))
    n_i = visible.sum(-1).double()  # (b, h, n_q)
    tau = torch.ones(b, h, n_q, dtype=torch.float64, device=q.device)
    if gate is not None:
        tau = tau + gate.double()[None, :, None] * torch.log(torch.where(n_i > 0, n_i, torch.ones_like(n_i)))
    if token is not None:
        u, c = token[0].double(), token[1].double()
        tau = tau + torch.tanh((q64 * u[None, :, None, :]).sum(-1) + c[None, :, None])
    if value is not None:
        w, c = value[0].double(), value[1].double()
        v64 = (1 + torch.tanh((v64 * w[None, :, None, :]).sum(-1) + c[None, :, None]))[..., None] * v64
    logits = tau[..., None] * torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    weights = masked_softmax(logits, None if mask is None else mask if mask.dtype == torch.bool else mask.double())
    out = torch.einsum("bhij,bhjd->bhid", weights, v64)
    return out.to(q.dtype), weights.to(q.dtype)


def selective_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Softmax attention's 4·h·n²·d (half when causal) plus the temperatures, O(h·n·d)."""
    return dense_flops(n, heads, head_dim, causal) + 6.0 * heads * n * head_dim


@register_dense(
    name="selective",
    paper=SSA,
    family="A",
    params=(
        Param("position", bool, True, "position temperature τ_pos = 1 + σ(α) log n_i (n_i: keys the query sees)"),
        Param("token", bool, True, "token temperature τ_tok = tanh(u·q_i + b) added to τ_pos"),
        Param("value", bool, True, "value temperature ṽ_j = (1 + tanh(w·v_j + c)) v_j"),
        Param("position_init", float, POSITION_INIT, "starting gate σ(α) of every head, in (0, 1) (default: the "
              "official code's exp(−exp(1.5)))", low=0.0, high=1.0),
    ),
    summary="Selective self-attention: per-query temperature 1 + σ(α) log n_i + tanh(u·q_i), value temperature.",
    test_params={"position_init": 0.5},
    flops=selective_flops,
)
class SelectiveAttention(SoftmaxAttention):
    """SSA: softmax attention with a per-query inverse temperature (context size and token) and a value temperature;
    h·(2·d_h + 3) parameters beyond softmax attention."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        position: bool = True,
        token: bool = True,
        value: bool = True,
        position_init: float = POSITION_INIT,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        if not 0.0 < position_init < 1.0:
            raise ParameterError(f"position_init: expected a gate in (0, 1), got {position_init!r}")
        self.position, self.token, self.value = position, token, value
        if position:
            self.alpha = nn.Parameter(torch.full((heads,), math.log(position_init / (1 - position_init))))
        bound = 1.0 / math.sqrt(self.head_dim)  # nn.Linear(d_h, 1)'s default range
        for name, on in (("token", token), ("value", value)):
            if on:
                self.register_parameter(f"{name}_weight", nn.Parameter(torch.empty(heads, self.head_dim).uniform_(-bound, bound)))
                self.register_parameter(f"{name}_bias", nn.Parameter(torch.empty(heads).uniform_(-bound, bound)))

    @property
    def position_gate(self) -> Tensor | None:
        """σ(α), (heads,), or None without the position term."""
        return torch.sigmoid(self.alpha) if self.position else None

    @property
    def token_map(self) -> LinearMap | None:
        return (self.token_weight, self.token_bias) if self.token else None

    @property
    def value_map(self) -> LinearMap | None:
        return (self.value_weight, self.value_bias) if self.value else None

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and the temperature-scaled values ṽ = τ_v ⊙ v, (batch, heads, n, head_dim) each."""
        q, k, v = super().project(x, context)
        value = self.value_map
        return q, k, v if value is None else _value_scale(v, value)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        gate = self.position_gate
        counts = None if gate is None else visible_keys(mask, q.shape[2], k.shape[2], causal=self.causal, device=q.device)
        tau = _query_temperature(q, counts, None if gate is None else gate.to(q.dtype), self.token_map)
        return sdpa(tau * q, k, v, mask, None, self.scale, causal=self.causal)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return _reference(q, k, v, mask, self.position_gate, self.token_map, None, self.scale)

    def extra_repr(self) -> str:
        return f"position={self.position}, token={self.token}, value={self.value}, causal={self.causal}"
