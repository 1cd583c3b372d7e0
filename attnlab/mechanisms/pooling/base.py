"""The pooling base: m queries attend over the tokens of each sample.

A pooling module maps tokens x (batch, *positions, dim) to m pooled vectors (batch, m, dim), with
the attention weights A (batch, heads, m, n) over the n = prod(positions) tokens. A subclass supplies

* `queries`                      -> m, the number of pooled vectors (a property);
* `pool_fast(x, keep)`           -> out (batch, m, dim)                       (the fast path)
* `pool_reference(x, keep)`      -> (out, A (batch, heads, m, n))            (the plain path)

where x is the flat (batch, n, dim) tokens and `keep` the key padding keep-mask (batch, n), True =
real token, or None. The base checks the inputs and the padding arguments once (as `Attention`
does: `attention_mask` True/1 = attend, or PyTorch's `key_padding_mask` True = padding) and
offers `forward(x, ..., impl=)` and `materialize(x, ...)` -> A. The contract every pooling keeps
(`attnlab.testing_pooling`): padded tokens change nothing, a sample's result depends on that sample
alone, a sample with no real token gives zero weights and a result that does not depend on its
tokens, and fast == reference.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.memory import check_memory
from ...core.validate import check_finite, check_module_dtype, check_tensor

if TYPE_CHECKING:
    from ...core.registry import Spec

Impl = Literal["fast", "reference"]


def check_pooling_tokens(x: object, dim: int) -> Tensor:
    """x (batch, *positions, dim) with at least one position axis, none empty, floating, finite: the flat (batch, n, dim)."""
    x = check_tensor("x", x)
    if x.dim() < 3:
        raise ShapeError(f"x: expected a tensor (batch, *positions, dim) of rank >= 3, got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ShapeError(f"x: expected last dimension dim={dim}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if 0 in x.shape[:-1]:
        raise ShapeError(f"x: expected at least one batch element and one position on every axis, got shape {tuple(x.shape)}")
    check_finite("x", x)
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), dim)


class AttentionPooling(nn.Module, ABC):
    """m queries over the tokens: (batch, *positions, dim) -> (batch, m, dim); weights (batch, heads, m, n)."""

    spec: ClassVar[Spec]

    def __init__(self, dim: int, heads: int = 1) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ParameterError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads

    @property
    @abstractmethod
    def queries(self) -> int:
        """m, the number of pooled vectors."""

    @abstractmethod
    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """x (batch, n, dim), keep (batch, n) or None -> (batch, m, dim)."""

    @abstractmethod
    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (batch, n, dim), keep (batch, n) or None -> (out (batch, m, dim), weights (batch, heads, m, n))."""

    def prepare(
        self, x: Tensor, attention_mask: Tensor | None, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The checked flat tokens (batch, n, dim) and keep-mask (batch, n) of a call (masks may be (batch, *grid))."""
        grid = tuple(check_tensor("x", x).shape[1:-1])
        flat = check_pooling_tokens(x, self.dim)
        check_module_dtype("x", flat, self)
        keep = module_keep_mask(attention_mask, key_padding_mask, flat.shape[0], flat.shape[1], grid)
        return flat, keep

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """Tokens (batch, *positions, dim) -> pooled (batch, m, dim); padding as in `Attention.forward`."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        if impl == "fast":
            return self.pool_fast(flat, keep)
        check_memory("impl='reference'", (flat.shape[0], self.heads, self.queries, flat.shape[1]), 8)
        return self.pool_reference(flat, keep)[0]

    def materialize(
        self, x: Tensor, *, attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """The attention weights (batch, heads, m, n) of the m queries over the n tokens."""
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        check_memory("materialize", (flat.shape[0], self.heads, self.queries, flat.shape[1]), 8)
        return self.pool_reference(flat, keep)[1]
