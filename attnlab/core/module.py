"""The common attention module: projections, heads, masks and the two paths.

A mechanism subclasses `Attention` and supplies

* `attend_fast(q, k, v, mask)`          -> out            (the fast path)
* `attend_reference(q, k, v, mask)`     -> (out, weights) (the plain reference)

where q, k, v are (batch, heads, n, head_dim) and `mask` is the combined mask of
`core.masks.combine_masks` (None, bool with True = attend, or additive float),
broadcastable to (batch, heads, n_q, n_k). A mechanism whose kernel applies causality
itself (`causal_in_kernel = True`, e.g. SDPA's `is_causal`) gets on its fast path a
mask without the causal part and reads `self.causal`; the reference path always gets
the full combined mask. Everything else — projections, validation, cross-attention,
`materialize`, the KV cache for decoding — lives here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from .errors import ParameterError, ShapeError
from .masks import combine_masks
from .validate import check_finite, check_qkv, check_tokens

if TYPE_CHECKING:
    from .registry import Spec

Impl = Literal["fast", "reference"]


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, (batch, heads, n, head_dim)."""

    k: Tensor
    v: Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module, ABC):
    """Multi-head attention over tokens (batch, n, dim) with a pluggable core."""

    spec: ClassVar[Spec]
    causal_in_kernel: ClassVar[bool] = False  # True: attend_fast applies self.causal itself, mask holds the rest

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
            head_dim = dim // heads
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, dim)

    # -- the two paths a mechanism supplies -------------------------------------------
    @abstractmethod
    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The fast path: (batch, heads, n_q, head_dim)."""

    @abstractmethod
    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The plain path: (out, weights (batch, heads, n_q, n_k))."""

    # -- shared machinery ---------------------------------------------------------------
    def split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q from x, k and v from context (or x): each (batch, heads, n, head_dim)."""
        src = x if context is None else context
        return self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(src)), self.split_heads(self.v_proj(src))

    def combined_mask(
        self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None
    ) -> Tensor | None:
        """The mask of padding, attn_mask and causality (self.causal) for q, k."""
        return self._combine(q, k, key_padding_mask, attn_mask, self.causal)

    def _combine(
        self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, causal: bool
    ) -> Tensor | None:
        supports = self.spec.supports
        assert supports is not None
        if key_padding_mask is not None and not supports.key_padding:
            raise ValueError(f"key_padding_mask: {self.spec.name} does not support a key padding mask")
        if attn_mask is not None and not supports.attn_mask:
            raise ValueError(f"attn_mask: {self.spec.name} does not support an arbitrary attention mask")
        return combine_masks(
            batch=q.shape[0],
            heads=q.shape[1],
            n_q=q.shape[2],
            n_k=k.shape[2],
            causal=causal,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            dtype=q.dtype,
            device=q.device,
        )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """The attention core on projected heads (batch, heads, n, head_dim) -> (batch, heads, n_q, head_dim)."""
        check_qkv(q, k, v)
        if q.shape[1] != self.heads:
            raise ShapeError(f"q: expected {self.heads} heads at dim 1, got {q.shape[1]} in shape {tuple(q.shape)}")
        if impl == "fast" and self.causal_in_kernel:
            return self.attend_fast(q, k, v, self._combine(q, k, key_padding_mask, attn_mask, False))
        if impl == "fast":
            return self.attend_fast(q, k, v, self.combined_mask(q, k, key_padding_mask, attn_mask))
        if impl == "reference":
            return self.attend_reference(q, k, v, self.combined_mask(q, k, key_padding_mask, attn_mask))[0]
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")

    def _check_inputs(self, x: Tensor, context: Tensor | None) -> None:
        check_tokens("x", x, self.dim)
        check_finite("x", x)
        if context is not None:
            if not self.spec.supports or not self.spec.supports.cross:
                raise ValueError(f"context: {self.spec.name} does not support cross-attention")
            check_tokens("context", context, self.dim)
            check_finite("context", context)
            if context.shape[0] != x.shape[0]:
                raise ShapeError(f"context: expected batch {x.shape[0]} (as x), got {context.shape[0]}")
            if context.dtype != x.dtype:
                raise TypeError(f"context: expected dtype {x.dtype} (as x), got {context.dtype}")

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, n, dim) [attending to context (batch, m, dim)] -> (batch, n, dim)."""
        self._check_inputs(x, context)
        q, k, v = self.project(x, context)
        out = self.attend(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, impl=impl)
        return self.out_proj(self.merge_heads(out))

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention matrix (batch, heads, n_q, n_k) this module applies to x."""
        self._check_inputs(x, context)
        q, k, v = self.project(x, context)
        check_qkv(q, k, v)
        mask = self.combined_mask(q, k, key_padding_mask, attn_mask)
        return self.attend_reference(q, k, v, mask)[1]

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """out_proj's matrix applied to merge_heads(weights · v), without bias: (batch, n_q, dim).

        The part of the output that is linear in the attention matrix, as if out = A v; analysis
        (`capture(model, grads=True)`) adds path(A) − path(stop_grad(A)), which is zero, to route
        d loss / dA to a recorded A.
        """
        with torch.no_grad():
            v = self.project(x.reshape(x.shape[0], -1, x.shape[-1]), context)[2]
        return nn.functional.linear(self.merge_heads(weights @ v.to(weights.dtype)), self.out_proj.weight.to(weights.dtype))

    def step(self, x_t: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """Decode one position: x_t (batch, 1, dim) -> (y_t, state), equal to the causal forward."""
        if not self.spec.supports or not self.spec.supports.decode:
            raise ValueError(f"step: {self.spec.name} does not support incremental decoding")
        if not self.causal:
            raise ValueError("step: decoding needs a causal module (build it with causal=True)")
        check_tokens("x_t", x_t, self.dim)
        if x_t.shape[1] != 1:
            raise ShapeError(f"x_t: expected one position (batch, 1, dim), got shape {tuple(x_t.shape)}")
        q, k, v = self.project(x_t)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        out = self.attend(q, k, v)
        return self.out_proj(self.merge_heads(out)), KVCache(k, v)
