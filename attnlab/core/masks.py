"""Masks. One rule across attnlab: in a bool mask True means *attend* (the key is visible).

The padding of a module call comes either as `attention_mask` (batch, n_k), True/1 = real token
(transformers' convention, the form every functional op and mask helper takes), or as
`key_padding_mask` (batch, n_k), True = padding (PyTorch's nn.MultiheadAttention convention);
`module_keep_mask` turns the module arguments into the one keep-mask once.

Additive masks are float tensors added to the logits (0 = attend, -inf = blocked).
Causal masks are bottom-right aligned: with n_q < n_k (queries are the last n_q
positions, as with a KV cache) query i sees keys j <= i + (n_k - n_q).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import DTypeError, MaskError
from .validate import check_attention_mask, check_attn_mask, check_key_padding_mask, check_tensor


def query_offset(n_q: int, n_k: int) -> int:
    """Position of query 0 among the keys under bottom-right alignment."""
    return n_k - n_q


def relative_positions(n_q: int, n_k: int, device: torch.device | None = None) -> Tensor:
    """(n_q, n_k) integer tensor of i - j, with queries bottom-right aligned to keys."""
    i = torch.arange(n_q, device=device) + query_offset(n_q, n_k)
    j = torch.arange(n_k, device=device)
    return i[:, None] - j[None, :]


def causal_mask(n_q: int, n_k: int, device: torch.device | None = None) -> Tensor:
    """bool (n_q, n_k): True where key j is not in the future of query i."""
    return relative_positions(n_q, n_k, device) >= 0


def band_mask(n_q: int, n_k: int, window: int, device: torch.device | None = None, *, causal: bool = False) -> Tensor:
    """bool (n_q, n_k): True where |i - j| <= window (and j <= i when causal)."""
    rel = relative_positions(n_q, n_k, device)
    keep = rel.abs() <= window
    return keep & (rel >= 0) if causal else keep


def module_keep_mask(
    attention_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    n_k: int,
    grid: Sequence[int] | None = None,
) -> Tensor | None:
    """The keep-mask (batch, n_k), True = attend, of a module call's padding arguments, or None.

    `attention_mask`: bool, or integers 0/1 as transformers' tokenizers give (1 = attend);
    `key_padding_mask`: bool with True = padding, as in PyTorch. Giving both is an error. With
    `grid` (the key grid, n_k = its product) either may also come as (batch, *grid), raster order.
    """
    if grid is not None and len(grid) > 1:
        attention_mask, key_padding_mask = (
            m.reshape(batch, n_k) if isinstance(m, Tensor) and tuple(m.shape) == (batch, *grid) else m
            for m in (attention_mask, key_padding_mask)
        )
    if attention_mask is not None and key_padding_mask is not None:
        raise MaskError(
            "attention_mask, key_padding_mask: expected one of them (attention_mask: True/1 = attend; "
            "key_padding_mask: True = padding, as in PyTorch), got both"
        )
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, batch, n_k)
        return ~key_padding_mask
    if attention_mask is not None and check_tensor("attention_mask", attention_mask).dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise DTypeError(
                f"attention_mask: expected dtype torch.bool or integer 0/1 (1 = attend), got {attention_mask.dtype}"
            )
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise MaskError(f"attention_mask: expected 0/1 values (1 = attend), got {attention_mask.unique().tolist()[:6]}")
        attention_mask = attention_mask != 0
    check_attention_mask(attention_mask, batch, n_k)
    return attention_mask


def padding_to_mask(attention_mask: Tensor) -> Tensor:
    """(batch, n_k) bool -> (batch, 1, 1, n_k) bool, broadcastable over heads and queries."""
    return attention_mask[:, None, None, :]


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> additive float mask (0 / -inf); float masks are cast."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def combine_masks(
    *,
    batch: int,
    heads: int,
    n_q: int,
    n_k: int,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor | None:
    """Merge causal, key padding and attn_mask into one mask broadcastable to (batch, heads, n_q, n_k).

    Returns None when nothing is masked, a bool mask (True = attend) when every part is
    bool, and an additive float mask of `dtype` when attn_mask is additive.
    """
    check_attention_mask(attention_mask, batch, n_k)
    check_attn_mask(attn_mask, batch, heads, n_q, n_k)
    keep: Tensor | None = None
    if causal:
        keep = causal_mask(n_q, n_k, device)[None, None]
    if attention_mask is not None:
        pad = padding_to_mask(attention_mask)
        keep = pad if keep is None else keep & pad
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask[None, None]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
        attn_mask = None
    if attn_mask is None:
        return keep
    additive = attn_mask.to(dtype)
    return additive if keep is None else additive + to_additive(keep, dtype)


def restrict(mask: Tensor | None, keep: Tensor) -> Tensor:
    """A combined mask (None, bool or additive) further limited to `keep` (bool, True = attend), broadcast."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask + to_additive(keep, mask.dtype)


def add_bias(mask: Tensor | None, bias: Tensor) -> Tensor:
    """Add a score bias (broadcastable to (batch, heads, n_q, n_k)) to a combined mask."""
    if mask is None:
        return bias
    return bias + to_additive(mask, bias.dtype)


def keep_of(mask: Tensor | None) -> Tensor | None:
    """Bool view (True = attend) of a combined mask."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > float("-inf")
