"""Shared pieces of the latent bottlenecks: pre-norm multi-head cross-attention (queries of one width over a
context of another) and the feed-forward layers, each with a fast forward and a float64 reference written from
the formula (einsums and an explicit exp/sum softmax; no call into the fast path)."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.reference import masked_softmax
from ..pooling.common import gelu64, layer_norm64, linear64, merge_heads, split_heads

Feedforward = Literal["gelu", "geglu"]


def check_positive_int(name: str, value: object, low: int = 1) -> int:
    """An int >= low (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParameterError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def softmax64(logits: Tensor, keep: Tensor | None) -> Tensor:
    """exp(l − max) / Σ exp over the last axis, in float64, the entries with keep False (broadcast) excluded;
    a row with nothing kept is 0."""
    logits = logits.double()
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def cross_attention_core(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """softmax(q kᵀ/√d) v per head: q (batch, heads, m, d), k, v (batch, heads, n, d), keep (batch, n) True = key;
    the largest intermediate is the (batch, heads, m, n) logits; a row with no key is 0."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return masked_softmax(logits, None if keep is None else keep.bool()[:, None, None, :]) @ v


class CrossAttention(nn.Module):
    """out = W_o concat_h(softmax(q_h k_hᵀ/√d) v_h), q = W_q LN(queries), k, v = W_k, W_v LN'(context);
    with `context_dim=None` a self-attention (k, v from the same normalised queries). Weights (batch, heads, m, n)."""

    def __init__(
        self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, *, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.self_attention = context_dim is None
        width = query_dim if context_dim is None else context_dim
        self.norm = nn.LayerNorm(query_dim)
        self.norm_context = None if context_dim is None else nn.LayerNorm(context_dim)
        self.q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.k = nn.Linear(width, inner, bias=qkv_bias)
        self.v = nn.Linear(width, inner, bias=qkv_bias)
        self.out = nn.Linear(inner, query_dim)

    def forward(self, queries: Tensor, context: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """queries (batch, m, query_dim), context (batch, n, context_dim), keep (batch, n) -> (batch, m, query_dim);
        the largest intermediate is the (batch, heads, m, n) logits."""
        h = self.norm(queries)
        c = h if self.norm_context is None or context is None else self.norm_context(context)
        q, k, v = split_heads(self.q(h), self.heads), split_heads(self.k(c), self.heads), split_heads(self.v(c), self.heads)
        return self.out(merge_heads(cross_attention_core(q, k, v, keep)))

    def reference(self, queries: Tensor, context: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, m, n)) in float64 from the formula."""
        h = layer_norm64(queries, self.norm)
        c = h if self.norm_context is None or context is None else layer_norm64(context, self.norm_context)
        b, m, n, d = h.shape[0], h.shape[1], c.shape[1], self.head_dim
        q = linear64(h, self.q).reshape(b, m, self.heads, d)
        k = linear64(c, self.k).reshape(b, n, self.heads, d)
        v = linear64(c, self.v).reshape(b, n, self.heads, d)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
        weights = softmax64(logits, None if keep is None else keep.bool()[:, None, None, :])
        mixed = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(b, m, self.heads * d)
        return linear64(mixed, self.out), weights


class FeedForward(nn.Module):
    """Pre-norm MLP: W_2 GELU(W_1 LN x) ("gelu"), or W_2 (a ⊙ GELU(g)) with [a | g] = W_1 LN x ("geglu",
    perceiver-pytorch's form)."""

    def __init__(self, dim: int, hidden: int, kind: Feedforward = "gelu") -> None:
        super().__init__()
        if kind not in ("gelu", "geglu"):
            raise ParameterError(f"feedforward: expected 'gelu' or 'geglu', got {kind!r}")
        self.kind = kind
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden if kind == "geglu" else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(self.norm(x))
        if self.kind == "geglu":
            a, g = h.chunk(2, dim=-1)
            return self.fc2(a * F.gelu(g))
        return self.fc2(F.gelu(h))

    def reference(self, x: Tensor) -> Tensor:
        h = linear64(layer_norm64(x, self.norm), self.fc1)
        if self.kind == "geglu":
            half = h.shape[-1] // 2
            h = h[..., :half] * gelu64(h[..., half:])
        else:
            h = gelu64(h)
        return linear64(h, self.fc2)


class LatentLayer(nn.Module):
    """A pre-norm transformer layer on the latents: Z ← Z + MHSA(LN Z); Z ← Z + MLP(LN Z)."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, feedforward: Feedforward = "gelu", *, qkv_bias: bool = False) -> None:
        super().__init__()
        self.attn = CrossAttention(dim, None, heads, head_dim, qkv_bias=qkv_bias)
        self.ff = FeedForward(dim, hidden, feedforward)

    def forward(self, z: Tensor) -> Tensor:
        z = z + self.attn(z)
        return z + self.ff(z)

    def reference(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(Z after the layer, the self-attention weights (batch, heads, M, M)) in float64."""
        out, weights = self.attn.reference(z)
        z = z.double() + out
        return z + self.ff.reference(z), weights
