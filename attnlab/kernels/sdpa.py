"""Softmax attention through torch's `scaled_dot_product_attention`, in its fastest applicable causal form."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..core.masks import add_bias, causal_mask, restrict


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None = None,
    scale: float | None = None,
    *,
    causal: bool = False,
) -> Tensor:
    """SDPA over a mask (True = attend, or additive), an optional score bias and causality; fully masked rows give 0.

    Causality (bottom-right aligned) takes SDPA's fastest form when nothing else is masked:
    `is_causal=True` for n_q == n_k, no mask for n_q == 1 (the last query sees every key),
    torch's lower-right `CausalBias` for n_q < n_k. A mask is materialised only when `mask`,
    `bias` or n_q > n_k (rows that see no key) requires one.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if causal and mask is None and bias is None and n_q <= n_k:
        if n_q == n_k:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if n_q == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        # imported here: the module pulls in torch._dynamo (~1 s)
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n_q, n_k), scale=scale)
    if causal:
        mask = restrict(mask, causal_mask(n_q, n_k, q.device))
    if bias is not None:
        mask = add_bias(mask, bias.to(q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
