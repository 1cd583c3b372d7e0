"""Transformer attention bottleneck, TAB (Rahmanzadehgervi et al., "TAB: Transformer Attention
Bottlenecks enable User Intervention and Debugging in Vision-Language Models", 2024): one head of
co-attention whose total attention over the patches lies in [0, 1], and which a user may overwrite.

With a query vector c (in TAB the [CLS] token of the OTHER image: co-attention between an image
pair), the patch tokens x_1..x_N of this image and the slot token s (this image's [CLS] token),
after one layer norm u = LN(·):

    q = W_q u_c,   k_s = W_k u_s,   k_i = W_k u_i,   v_i = W_v u_i
    (a_s, a_1..a_N) = softmax(q [k_s; k_1..k_N]ᵀ / √d)        one head, d = dim
    out = W_o Σ_i a_i v_i + b_o                                 the slot's value is not used

so the patch mass Σ_i a_i = 1 − a_s lies in [0, 1]: the slot absorbs the rest (a sink). There is
no skip connection around the layer (the paper removes it), so with patch mass 0 no information
of the image passes: out = b_o whatever the patches are (the VLM then answers "no change").
`materialize` gives the N patch weights (batch, 1, 1, N), rows summing to 1 − a_s (the entry
registers normalized=False).

Intervention: `forward(x, weights=w)` replaces the patch weights by the user's w (batch, N) (or
(batch, 1, 1, N) as `materialize` returns, or (batch, *grid)), w ≥ 0 with Σ_i w_i ≤ 1 and no weight
on padding; the output is then W_o Σ_i w_i v_i + b_o exactly (the paper's CorrectAttention sets w
to a ground-truth map, ZeroAttention to 0). `forward(x, weights=module.materialize(x))` equals
`forward(x)`.

Query and slot. Pass `context` (batch, dim), the vector whose query attends (the other image's
[CLS] token), and `slot` (batch, dim), this image's [CLS] token, as TAB does; when left out, a
learned query token and a learned slot token take their place (initialised N(0, 0.02²)), which
makes the layer a stand-alone pooling over the patch tokens.

What the sources say and what is approximate. The paper's abstract fixes the contract (one head,
patch mass in [0, 1], mass 0 → image-independent output, editable weights); PAPERS.md gives the
[CLS]/null slot whose mass is gated away. The authors' code (TAB4IDC, built on CLIP4IDC) runs the
layer as `TABAttention(LN(x), LN(y), LN(y))` with one head and no residual, then x + MLP(LN x); the
gating function itself was not available to read. A secondary summary writes the gate as
A' = A · Σ_i a_i (the whole row, slot included, scaled by the patch mass), under which the slot's
value would pass too, scaled; here the slot's value is dropped as the PAPERS.md row specifies.
Both agree on the tested contract (mass 0 → image-independent). The MLP after the layer acts on
the pooled vector alone and is left to the user. W_q, W_k, W_v have biases (CLIP's
nn.MultiheadAttention), the layer norm eps 1e-5 (CLIP's).

Padding: padded patches are no keys (the slot always is); a sample with no real patch has all its
mass on the slot and pools to b_o.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.memory import check_memory
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_finite, check_tensor
from .base import AttentionPooling, Impl
from .common import check_pooling_qkv, layer_norm64, linear64, padded_logits, softmax64

TAB = Paper(
    "P085",
    "TAB: Transformer Attention Bottlenecks enable User Intervention and Debugging in Vision-Language Models",
    2024,
    "2412.18675",
)
TOKEN_STD = 0.02
MASS_TOL = 1e-6  # slack on Σ w ≤ 1 for user weights (rounding of a normalised map)


def _check_slot_key(slot_key: object, q: Tensor) -> Tensor:
    slot_key = check_tensor("slot_key", slot_key)
    want = (*q.shape[:2], 1, q.shape[-1])
    if tuple(slot_key.shape) != want:
        raise ShapeError(f"slot_key: expected shape {want} (batch, heads, 1, head_dim), got {tuple(slot_key.shape)}")
    return slot_key


def check_weights(weights: object, batch: int, n: int, keep: Tensor | None, name: str = "weights") -> Tensor:
    """User patch weights as (batch, 1, 1, n): (batch, n), (batch, 1, 1, n) or (batch, *grid) with prod(grid) = n,
    finite, ≥ 0, Σ ≤ 1 per sample, zero on padded tokens."""
    w = check_tensor(name, weights)
    if not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {w.dtype}")
    if w.dim() < 2 or w.shape[0] != batch or math.prod(w.shape[1:]) != n:
        raise ShapeError(f"{name}: expected (batch, n) = {(batch, n)} or (batch, 1, 1, n) or (batch, *grid), got {tuple(w.shape)}")
    w = w.reshape(batch, 1, 1, n)
    check_finite(name, w)
    if bool((w < 0).any()):
        raise ValueError(f"{name}: expected weights >= 0, got a minimum of {w.min().item():.3g}")
    total = w.sum(-1)
    if bool((total > 1 + MASS_TOL).any()):
        raise ValueError(f"{name}: expected a total patch mass <= 1 per sample, got {total.max().item():.6g}")
    if keep is not None and bool((w[:, 0, 0][~keep] != 0).any()):
        raise ValueError(f"{name}: expected zero weight on padded tokens, got nonzero weights there")
    return w


def bottleneck_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    slot_key: Tensor,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Σ_i a_i v_i with (a_s, a_1..a_n) = softmax(q [k_s; K]ᵀ/√d) over the slot and the real tokens; the slot's value
    is not used, so Σ_i a_i ≤ 1. q (batch, heads, m, d), k, v (batch, heads, n, d), `slot_key` (batch, heads, 1, d);
    `weights` (broadcastable to (batch, heads, m, n)) replaces a_1..a_n (the intervention)."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    if weights is not None:
        return weights.to(v.dtype) @ v
    slot_key = _check_slot_key(slot_key, q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = padded_logits(q @ k.transpose(-2, -1) * scale, attention_mask)
    a = masked_softmax(torch.cat([q @ slot_key.transpose(-2, -1) * scale, logits], -1))
    return a[..., 1:] @ v


def bottleneck_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    slot_key: Tensor,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, patch weights (batch, heads, m, n)) of `bottleneck_attention` in float64, query by query."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    slot_key = _check_slot_key(slot_key, q)
    b, h, m, d = q.shape
    n = k.shape[2]
    q64, k64, v64, s64 = q.double(), k.double(), v.double(), slot_key.double()
    out = torch.zeros(b, h, m, v.shape[-1], dtype=torch.float64, device=q.device)
    patch = torch.zeros(b, h, m, n, dtype=torch.float64, device=q.device)
    given = None if weights is None else weights.double().expand(b, h, m, n)
    for bi in range(b):
        real = [j for j in range(n) if attention_mask is None or bool(attention_mask[bi, j])]
        for hi in range(h):
            for i in range(m):
                if given is None:
                    slot = (q64[bi, hi, i] * s64[bi, hi, 0]).sum() / math.sqrt(d)
                    a = softmax64([slot, *[(q64[bi, hi, i] * k64[bi, hi, j]).sum() / math.sqrt(d) for j in real]])[1:]
                else:
                    a = [given[bi, hi, i, j] for j in real]
                for j, w in zip(real, a):
                    patch[bi, hi, i, j] = w
                    out[bi, hi, i] = out[bi, hi, i] + w * v64[bi, hi, j]
    return out.to(q.dtype), patch.to(q.dtype)


def bottleneck_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs, batch 1: W_k, W_v over the n patches (4·n·d²), logits and pooling (4·n·d), W_q, the slot's
    key and W_o (6·d²)."""
    d = heads * head_dim
    return 4.0 * n * d * d + 4.0 * n * d + 6.0 * d * d


@register(
    name="attention-bottleneck",
    kind="pooling",
    paper=TAB,
    family="C",
    cost="O(N d²)",
    exponent=1.0,
    supports=Supports(key_padding=True, order_invariant=True),
    params=(Param("qkv_bias", bool, True, "bias in W_q, W_k, W_v (CLIP's attention: True)"),),
    summary="TAB attention bottleneck: one-head co-attention, patch mass in [0, 1] (a slot takes the rest), editable weights",
    normalized=False,
    flops=bottleneck_flops,
    functional=("bottleneck_attention", "bottleneck_attention_reference"),
)
class AttentionBottleneck(AttentionPooling):
    """out = W_o Σ_i a_i W_v LN(x_i) + b_o, a = softmax over [slot; patches] of one query, the slot's value unused;
    `forward(..., weights=)` overwrites the patch weights; `context`, `slot` give the query and slot tokens."""

    def __init__(self, dim: int, *, qkv_bias: bool = True) -> None:
        super().__init__(dim, 1)
        self.query_token = nn.Parameter(torch.randn(dim) * TOKEN_STD)
        self.slot_token = nn.Parameter(torch.randn(dim) * TOKEN_STD)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @property
    def queries(self) -> int:
        return 1

    def _token(self, name: str, given: Tensor | None, learned: Tensor, x: Tensor) -> Tensor:
        """(batch, 1, dim): the given (batch, dim) vectors, or the learned token for every sample."""
        if given is None:
            return learned.expand(x.shape[0], 1, self.dim)
        given = check_tensor(name, given)
        if tuple(given.shape) != (x.shape[0], self.dim):
            raise ShapeError(f"{name}: expected shape (batch, dim) = {(x.shape[0], self.dim)}, got {tuple(given.shape)}")
        if given.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (that of x), got {given.dtype}")
        check_finite(name, given)
        return given.unsqueeze(1)

    def _fast(self, x: Tensor, keep: Tensor | None, c: Tensor, s: Tensor, w: Tensor | None) -> Tensor:
        u_x = self.norm(x)
        q, slot_key = self.q(self.norm(c)).unsqueeze(1), self.k(self.norm(s)).unsqueeze(1)
        k, v = self.k(u_x).unsqueeze(1), self.v(u_x).unsqueeze(1)
        a = bottleneck_attention(q, k, v, slot_key=slot_key, attention_mask=keep, weights=w)
        return self.proj(a[:, 0])

    def _reference(self, x: Tensor, keep: Tensor | None, c: Tensor, s: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
        u_x = layer_norm64(x, self.norm)
        q = linear64(layer_norm64(c, self.norm), self.q).unsqueeze(1)
        slot_key = linear64(layer_norm64(s, self.norm), self.k).unsqueeze(1)
        k, v = linear64(u_x, self.k).unsqueeze(1), linear64(u_x, self.v).unsqueeze(1)
        a, patch = bottleneck_attention_reference(q, k, v, slot_key=slot_key, attention_mask=keep, weights=w)
        return linear64(a[:, 0], self.proj).to(x.dtype), patch.to(x.dtype)

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self._fast(x, keep, self._token("context", None, self.query_token, x), self._token("slot", None, self.slot_token, x), None)

    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        c, s = self._token("context", None, self.query_token, x), self._token("slot", None, self.slot_token, x)
        return self._reference(x, keep, c, s, None)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        slot: Tensor | None = None,
        weights: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """Patch tokens (batch, *positions, dim) -> (batch, 1, dim). `context` (batch, dim): the query's source (the
        other image's [CLS]); `slot` (batch, dim): the slot token (this image's [CLS]); `weights`: overwrite the
        patch weights (the intervention, see the module docstring)."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        c = self._token("context", context, self.query_token, flat)
        s = self._token("slot", slot, self.slot_token, flat)
        w = None if weights is None else check_weights(weights, flat.shape[0], flat.shape[1], keep)
        if w is not None and w.dtype != flat.dtype:
            raise TypeError(f"weights: expected dtype {flat.dtype} (that of x), got {w.dtype}")
        if impl == "fast":
            return self._fast(flat, keep, c, s, w)
        check_memory("impl='reference'", (flat.shape[0], 1, 1, flat.shape[1]), 8)
        return self._reference(flat, keep, c, s, w)[0]

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        slot: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """The patch weights (batch, 1, 1, n), summing to 1 − the slot's weight."""
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        c = self._token("context", context, self.query_token, flat)
        s = self._token("slot", slot, self.slot_token, flat)
        check_memory("materialize", (flat.shape[0], 1, 1, flat.shape[1]), 8)
        return self._reference(flat, keep, c, s, None)[1]
