"""A common frame for token mixers over sequences that are not q-k-v attention cores (convolutions, fixed maps).

A subclass supplies `mix(x, keep, impl)` -> (batch, n, dim) on checked batch-major tokens with the padding
keep-mask (batch, n) (True = real token) or None, and `mixing(x, keep)` -> the (batch, heads, n, n) matrix of
its `materialize` (each subclass's docstring says exactly what that matrix is). The frame checks the tokens,
the padding arguments, refuses context and attn_mask by name, and handles batch_first.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.masks import module_keep_mask
from ...core.memory import check_memory
from ...core.module import Impl
from ...core.registry import Spec
from ...core.validate import check_finite, check_int, check_module_dtype, check_tokens


class SequenceMixer(nn.Module):
    """forward(x, *, attention_mask=None, key_padding_mask=None, impl) over (batch, n, dim) and materialize(x, ...)
    (batch, heads, n, n), for mixers whose cores are not `attnlab.core.module.Attention` cores."""

    spec: ClassVar[Spec]

    def __init__(self, dim: int, heads: int, *, causal: bool = False, batch_first: bool = True) -> None:
        super().__init__()
        for name, flag in (("batch_first", batch_first), ("causal", causal)):
            if not isinstance(flag, bool):
                raise ParameterError(f"{name}: expected a bool, got {flag!r}")
        self.dim = check_int("dim", dim)
        self.heads = check_int("heads", heads)
        self.causal = causal
        self.batch_first = batch_first  # False: x and the output are (n, batch, dim), as in nn.MultiheadAttention

    @abstractmethod
    def mix(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        """The mixer on checked tokens (batch, n, dim) with the keep-mask (batch, n) or None -> (batch, n, dim)."""

    @abstractmethod
    def mixing(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """The token-mixing matrix (batch, heads, n, n) of `materialize` on checked tokens."""

    def tokens(
        self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None, key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """x batch-major and checked, and the keep-mask (batch, n) of the padding arguments."""
        check_tokens("x", x, self.dim)
        if not self.batch_first:
            x = x.transpose(0, 1)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            raise ValueError(f"context: {self.spec.name} does not support cross-attention (it mixes one sequence)")
        if attn_mask is not None:
            raise ValueError(f"attn_mask: {self.spec.name} does not support an arbitrary attention mask "
                             "(its mixing pattern is fixed by the kernel)")
        return x, module_keep_mask(attention_mask, key_padding_mask, x.shape[0], x.shape[1])

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, n, dim) -> (batch, n, dim); padding as `Attention.forward` (padded tokens are no inputs)."""
        xb, keep = self.tokens(x, context, attention_mask, key_padding_mask, attn_mask)
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        if impl == "reference":  # the references build the (n, n) matrix in float64
            check_memory("impl='reference'", (xb.shape[0], self.heads, xb.shape[1], xb.shape[1]), 8)
        out = self.mix(xb, keep, impl)
        return out if self.batch_first else out.transpose(0, 1)

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The token-mixing matrix (batch, heads, n, n) (the subclass's docstring says what it is)."""
        xb, keep = self.tokens(x, context, attention_mask, key_padding_mask, attn_mask)
        check_memory("materialize", (xb.shape[0], self.heads, xb.shape[1], xb.shape[1]), 8)
        return self.mixing(xb, keep)

    def batch_major(self, x: Tensor) -> Tensor:
        """x as (batch, n, dim): transposed from (n, batch, dim) when batch_first is False."""
        return x if self.batch_first else x.transpose(0, 1)


def drop_padding(v: Tensor, keep: Tensor | None) -> Tensor:
    """v (batch, heads, n, d) with the padded tokens zeroed: they are no inputs of the mixer."""
    return v if keep is None else v * keep[:, None, :, None].to(v.dtype)
