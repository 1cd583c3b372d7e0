"""Class-attention pooling (Touvron et al., PatchConvNet, "Augmenting Convolutional networks with
attention-based aggregation", 2021): a learned class token replaces global average pooling.

With the learned class token c ∈ R^d and the tokens X = (x_1..x_N), u = LN₁([c; X]) (one layer norm),
per head h (d_h = d / heads):

    q = W_q u_c,   k_j = W_k u_j,   v_j = W_v u_j                    j ∈ {c, 1..N}
    a = softmax_j(q k_jᵀ / √d_h)           over the class slot c and the N tokens
    c'  = c + γ₁ ⊙ W_o concat_h(Σ_j a_j v_j)
    c'' = c' + γ₂ ⊙ FFN(LN₂(c'))          FFN: Linear(d, r·d) → GELU → Linear(r·d, d)

and the pooled vector is c'' (m = 1). The weights over the N tokens are the patch map the paper
shows (`materialize`, (batch, heads, 1, N)).

The class token among the keys. In the paper and in its code (facebookresearch/deit,
`Layer_scale_init_Block_only_token` + `Learned_Aggregation_Layer`) the layer runs on the
concatenation [c; X]: the query is the class token's and the keys and values are those of the class
token AND the patches, so part of the mass a_c stays on the class token itself and the patch map
sums to 1 − a_c. That is the default here (`cls_in_keys=True`); `materialize` gives the N patch
weights only, the class slot's weight being 1 − their sum. `cls_in_keys=False` drops the class slot:
one class query over the tokens alone, the patch map then sums to 1 (a sample with no real token
then attends to nothing: its attention term is W_o·0). The entry registers normalized=False
because the default's patch rows sum to less than 1.

Defaults follow the paper's models (S60/B60/L60): one head, biases in W_q, W_k, W_v, FFN ratio
r = 3 (`mlp_ratio`; 0 leaves the FFN out, c'' = c'), layer scale γ₁, γ₂ initialised at 1e-4
(`layer_scale`), layer norms with eps 1e-6, the class token drawn from a truncated normal of std
0.02. The linear layers keep PyTorch's initialisation (the code draws them trunc-normal, std 0.02).
Dropout and drop-path are left out (training details, not the operator). The final layer norm of
the network after the pooling is not part of the pooling.

Padding: padded tokens are no keys (the class slot always is, when present); LN, W_k, W_v act per
token, so padding equals removal. Permuting the tokens changes nothing (no positions).
"""
from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from .base import AttentionPooling
from .common import (
    check_pooling_qkv,
    gelu64,
    layer_norm64,
    linear64,
    merge_heads,
    padded_logits,
    softmax64,
    split_heads,
)

PATCHCONVNET = Paper("P097", "Augmenting Convolutional networks with attention-based aggregation", 2021, "2112.13692")
LN_EPS = 1e-6


def _check_slot(cls_key: Tensor | None, cls_value: Tensor | None, q: Tensor, v: Tensor) -> None:
    if (cls_key is None) != (cls_value is None):
        raise ValueError("cls_key, cls_value: expected both or neither, got one of them")
    if cls_key is not None and cls_value is not None:
        want_k, want_v = (*q.shape[:2], 1, q.shape[-1]), (*v.shape[:2], 1, v.shape[-1])
        if tuple(cls_key.shape) != want_k or tuple(cls_value.shape) != want_v:
            raise ValueError(
                f"cls_key, cls_value: expected shapes {want_k} and {want_v}, "
                f"got {tuple(cls_key.shape)} and {tuple(cls_value.shape)}"
            )


def class_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cls_key: Tensor | None = None,
    cls_value: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Σ_j a_j v_j, a = softmax(q [k_c; K]ᵀ/√d_h) over the class slot (when `cls_key`/`cls_value`
    (batch, heads, 1, d) are given) and the real tokens. q (batch, heads, m, d), k, v (batch, heads, n, d);
    `attention_mask` (batch, n) bool, True = real token. A query with no key at all gives 0."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    _check_slot(cls_key, cls_value, q, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = padded_logits(q @ k.transpose(-2, -1) * scale, attention_mask)
    if cls_key is None or cls_value is None:
        return masked_softmax(logits) @ v
    slot = q @ cls_key.transpose(-2, -1) * scale  # (batch, heads, m, 1)
    a = masked_softmax(torch.cat([slot, logits], -1))
    return a[..., :1] * cls_value + a[..., 1:] @ v


def class_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cls_key: Tensor | None = None,
    cls_value: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights over the n tokens (batch, heads, m, n)) of `class_attention`, float64, query by query."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    _check_slot(cls_key, cls_value, q, v)
    b, h, m, d = q.shape
    n = k.shape[2]
    q64, k64, v64 = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(d)
    out = torch.zeros(b, h, m, v.shape[-1], dtype=torch.float64, device=q.device)
    weights = torch.zeros(b, h, m, n, dtype=torch.float64, device=q.device)
    for bi in range(b):
        real = [j for j in range(n) if attention_mask is None or bool(attention_mask[bi, j])]
        for hi in range(h):
            for i in range(m):
                logits = [(q64[bi, hi, i] * k64[bi, hi, j]).sum() * scale for j in real]
                if cls_key is not None and cls_value is not None:
                    slot = (q64[bi, hi, i] * cls_key[bi, hi, 0].double()).sum() * scale
                    a = softmax64([slot, *logits])
                    out[bi, hi, i] = out[bi, hi, i] + a[0] * cls_value[bi, hi, 0].double()
                    a = a[1:]
                else:
                    a = softmax64(logits)
                for j, w in zip(real, a):
                    weights[bi, hi, i, j] = w
                    out[bi, hi, i] = out[bi, hi, i] + w * v64[bi, hi, j]
    return out.to(q.dtype), weights.to(q.dtype)


def class_attention_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the defaults (class slot, FFN ratio 3), batch 1: W_k, W_v over the n tokens (4·n·d²),
    logits and weighted sum (4·n·d), and the class token's W_q, W_k, W_v, W_o and FFN (8·d² + 12·d²)."""
    d = heads * head_dim
    return 4.0 * n * d * d + 4.0 * (n + 1) * d + 20.0 * d * d


@register(
    name="class-attention",
    kind="pooling",
    paper=PATCHCONVNET,
    family="C",
    cost="O(N d²)",
    exponent=1.0,
    supports=Supports(key_padding=True, order_invariant=True),
    params=(
        Param("heads", int, 1, "number of heads (the paper uses 1)", low=1),
        Param("qkv_bias", bool, True, "bias in W_q, W_k, W_v (the paper's models: True)"),
        Param("cls_in_keys", bool, True, "the class token is a key/value too, as in the paper and its code"),
        Param("mlp_ratio", float, 3.0, "hidden width of the FFN after the attention, × dim; 0 = no FFN", low=0.0),
        Param("layer_scale", float, 1e-4, "initial value of the layer-scale vectors γ₁, γ₂"),
    ),
    summary="class-attention pooling: a learned class token attends over [itself; tokens], then an FFN (PatchConvNet)",
    normalized=False,
    test_params={"layer_scale": 1.0},
    flops=class_attention_flops,
    functional=("class_attention", "class_attention_reference"),
)
class ClassAttentionPooling(AttentionPooling):
    """c'' = c' + γ₂·FFN(LN₂ c'), c' = c + γ₁·W_o·attention(query of LN₁ c over LN₁ [c; X]); m = 1."""

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        *,
        qkv_bias: bool = True,
        cls_in_keys: bool = True,
        mlp_ratio: float = 3.0,
        layer_scale: float = 1e-4,
    ) -> None:
        super().__init__(dim, heads)
        if not mlp_ratio >= 0:
            raise ParameterError(f"mlp_ratio: expected a float >= 0, got {mlp_ratio!r}")
        self.cls_in_keys = cls_in_keys
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.02))
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        hidden = round(mlp_ratio * dim)
        if mlp_ratio > 0 and hidden == 0:
            raise ParameterError(f"mlp_ratio: expected 0 or a ratio giving >= 1 hidden unit at dim={dim}, got {mlp_ratio!r}")
        self.ffn: nn.Sequential | None = None
        if hidden > 0:
            self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
            self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    @property
    def queries(self) -> int:
        return 1

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        c = self.cls_token.expand(x.shape[0], 1, self.dim)
        u_c, u_x = self.norm1(c), self.norm1(x)
        q = split_heads(self.q(u_c), self.heads)
        k, v = split_heads(self.k(u_x), self.heads), split_heads(self.v(u_x), self.heads)
        slot_k = split_heads(self.k(u_c), self.heads) if self.cls_in_keys else None
        slot_v = split_heads(self.v(u_c), self.heads) if self.cls_in_keys else None
        a = class_attention(q, k, v, cls_key=slot_k, cls_value=slot_v, attention_mask=keep)
        c1 = c + self.gamma1 * self.proj(merge_heads(a))
        if self.ffn is None:
            return c1
        return c1 + self.gamma2 * self.ffn(self.norm2(c1))

    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        b, n, d = x.shape
        h, dh = self.heads, self.head_dim
        c = self.cls_token.double().expand(b, 1, d)
        u_c, u_x = layer_norm64(c, self.norm1), layer_norm64(x, self.norm1)
        q = linear64(u_c, self.q).reshape(b, 1, h, dh).permute(0, 2, 1, 3)
        k = linear64(u_x, self.k).reshape(b, n, h, dh).permute(0, 2, 1, 3)
        v = linear64(u_x, self.v).reshape(b, n, h, dh).permute(0, 2, 1, 3)
        slot_k = linear64(u_c, self.k).reshape(b, 1, h, dh).permute(0, 2, 1, 3) if self.cls_in_keys else None
        slot_v = linear64(u_c, self.v).reshape(b, 1, h, dh).permute(0, 2, 1, 3) if self.cls_in_keys else None
        a, weights = class_attention_reference(q, k, v, cls_key=slot_k, cls_value=slot_v, attention_mask=keep)
        c1 = c + self.gamma1.double() * linear64(a.permute(0, 2, 1, 3).reshape(b, 1, d), self.proj)
        if self.ffn is not None:
            ffn_in, ffn_out = cast(nn.Linear, self.ffn[0]), cast(nn.Linear, self.ffn[2])
            hidden = gelu64(linear64(layer_norm64(c1, self.norm2), ffn_in))
            c1 = c1 + self.gamma2.double() * linear64(hidden, ffn_out)
        return c1.to(x.dtype), weights.to(x.dtype)
