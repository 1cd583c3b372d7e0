"""Shared pieces of the poolings (and the latent bottlenecks built on them): head splitting, input checks of the functional ops, and the float64
building blocks of the references (written from the formulas, independent of the fast paths)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.validate import check_attention_mask, check_tensor


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(batch, n, heads·d) -> (batch, heads, n, d)."""
    b, n, width = t.shape
    return t.reshape(b, n, heads, width // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(batch, heads, n, d) -> (batch, n, heads·d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def check_pooling_qkv(q: object, k: object, v: object, attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """q (batch, heads, m, d), k (batch, heads, n, d), v (batch, heads, n, d_v), one floating dtype; mask (batch, n)."""
    q, k, v = check_tensor("q", q), check_tensor("k", k), check_tensor("v", v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected a tensor (batch, heads, tokens, head_dim) of rank 4, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ShapeError(f"k, v: expected the same (batch, heads, n), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q, k: expected the same batch, heads and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_attention_mask(attention_mask, k.shape[0], k.shape[2])
    return q, k, v


def padded_logits(logits: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Logits (batch, heads, m, n) with the padded tokens (attention_mask False) at -inf."""
    if attention_mask is None:
        return logits
    return logits.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))


# float64 references: plain formulas, no torch.nn.functional


def linear64(x: Tensor, layer: nn.Linear) -> Tensor:
    """x Wᵀ + b in float64."""
    y = x.double() @ layer.weight.double().T
    return y if layer.bias is None else y + layer.bias.double()


def layer_norm64(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """(x − mean) / sqrt(var + eps) · w + b over the last axis, in float64 (biased variance)."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight.double() + norm.bias.double()
    return y


def gelu64(x: Tensor) -> Tensor:
    """x · Φ(x), the exact GELU."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def softmax64(logits: list[Tensor]) -> list[Tensor]:
    """Softmax over a list of scalar logits (float64), the largest subtracted; an empty list stays empty."""
    if not logits:
        return []
    top = torch.stack(logits).max()
    e = [torch.exp(z - top) for z in logits]
    total = torch.stack(e).sum()
    return [w / total for w in e]
