"""Attention on a grid of tokens, the functional side: q, k, v (batch, heads, *grid, head_dim) checks,
the key padding mask in raster order, the masked float64 reference over all N × N pairs."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.errors import ShapeError
from ..core.reference import masked_softmax
from ..core.validate import check_attention_mask, check_qkv, check_tensor, either


def check_grid_qkv(q: Tensor, k: Tensor, v: Tensor, ranks: Sequence[int] = (2,)) -> tuple[int, ...]:
    """q, k, v (batch, heads, *grid, head_dim) on one grid of len(grid) in `ranks` axes: the grid."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if q.dim() - 3 not in ranks:
        want = ("(batch, heads, H, W, head_dim), a 2-D grid" if tuple(ranks) == (2,)
                else f"(batch, heads, *grid, head_dim) with a grid of {either(ranks)} axes")
        raise ShapeError(f"q: expected {want}, got shape {tuple(q.shape)}")
    check_qkv(q, k, v, positions=q.dim() - 3, same_length=True)
    return tuple(q.shape[2:-1])


def grid_padding(attention_mask: Tensor | None, batch: int, grid: Sequence[int]) -> Tensor | None:
    """attention_mask as bool (batch, N) in raster order, from (batch, N) or (batch, *grid), checked."""
    if attention_mask is None:
        return None
    check_tensor("attention_mask", attention_mask)
    n = math.prod(grid)
    if tuple(attention_mask.shape) == (batch, *grid):
        attention_mask = attention_mask.reshape(batch, n)
    check_attention_mask(attention_mask, batch, n)
    return attention_mask


def masked_grid_reference(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor, attention_mask: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, N, N)) in float64, cast back to q's dtype: softmax(q kᵀ·scale) of
    q, k, v (batch, heads, *grid, head_dim) over all N × N pairs in raster order where `keep`, bool
    (N, N) or (heads, N, N), and the key padding mask (batch, N) or None allow it."""
    b, h, grid = q.shape[0], q.shape[1], tuple(q.shape[2:-1])
    n = math.prod(grid)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    keep = keep.reshape(1, -1, n, n)
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :]
    weights = masked_softmax(torch.einsum("bhid,bhjd->bhij", q64, k64) * scale, keep)
    out = (weights @ v64).reshape(b, h, *grid, v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


def refuse_masks(
    name: str, attention_mask: Tensor | None, attn_mask: Tensor | None, why: str, key_padding_mask: Tensor | None = None
) -> None:
    """ValueError naming the mask given to a mechanism `name` that takes none (`why`: the reason)."""
    given = {"attention_mask": attention_mask, "key_padding_mask": key_padding_mask, "attn_mask": attn_mask}
    which = [k for k, m in given.items() if m is not None]
    if which:
        raise ValueError(f"{which[0]}: {name} takes no mask ({why})")
