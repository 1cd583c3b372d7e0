"""The reference softmax attention: the oracle of the conformance suite.

    A = softmax(q kᵀ · scale + bias + mask),   out = A v

computed in float64 with the weights materialised; a fully masked row has A = 0 and
out = 0. Results are cast back to the dtype of q.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks import to_additive


def masked_softmax(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax over the last axis; `mask` bool (True = attend) or additive; blocked rows give 0."""
    if mask is not None:
        scores = scores + to_additive(mask, scores.dtype)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def softmax_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of softmax attention over (batch, heads, n, head_dim) inputs, in float64."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    if bias is not None:
        scores = scores + bias.double()
    weights = masked_softmax(scores, mask if mask is None or mask.dtype == torch.bool else mask.double())
    out = torch.einsum("bhij,bhjd->bhid", weights, v64)
    return out.to(q.dtype), weights.to(q.dtype)
