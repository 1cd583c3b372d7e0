"""The module side shared by the convolutional image mixers (LKA, ULSAM, PSA): tokens on a 2-D grid
(batch, H, W, dim), no mask (a convolution over an image has no key to pad), no cross-attention.
A subclass computes `mix_fast(x)` and `mix_reference(x) -> (out, weights)` with weights the
(batch, heads, N, N) matrix its docstring defines; `materialize` returns those weights and
`attention_path(x, weights)` the part of the output linear in them (for `capture(grads=True)`).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ...core.memory import check_memory
from ...core.module import Impl
from ...core.registry import Spec
from ...core.validate import check_finite, check_int, check_module_dtype, check_tokens
from ...kernels.grid import refuse_masks


class ImageMixer(nn.Module):
    """A token mixer over images x (batch, H, W, dim) -> (batch, H, W, dim); masks and context refused by name.

    `heads` is the number of maps `materialize` returns (batch, heads, H·W, H·W), raster order.
    """

    spec: ClassVar[Spec]
    mask_note: ClassVar[str]  # why the mixer takes no mask, for the refusal's message
    heads: int

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)

    def checked(
        self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None, key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """x checked: (batch, H, W, dim), finite, in the module's dtype; any mask or context refused."""
        refuse_masks(self.spec.name, attention_mask, attn_mask, self.mask_note, key_padding_mask)
        if context is not None:
            raise ValueError(f"context: {self.spec.name} does not support cross-attention (it mixes one image)")
        check_tokens("x", x, self.dim, grid_rank=2)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        return x

    def mix_fast(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        raise NotImplementedError

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """The part of the output linear in `weights` (batch, heads, N, N), x detached: (batch, H, W, dim)."""
        return self.path(x.detach().to(weights.dtype), weights)

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

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
        """x (batch, H, W, dim) -> (batch, H, W, dim); impl "fast" or "reference" (float64, cast back)."""
        x = self.checked(x, context, attention_mask, key_padding_mask, attn_mask)
        if impl == "fast":
            return self.mix_fast(x)
        if impl == "reference":
            check_memory("impl='reference'", self.dense_shape(x), 8)
            return self.mix_reference(x)[0]
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The (batch, heads, N, N) token matrices of the module's docstring, N = H·W in raster order."""
        x = self.checked(x, context, attention_mask, key_padding_mask, attn_mask)
        check_memory("materialize", self.dense_shape(x), 8)
        return self.mix_reference(x)[1]

    def dense_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        """(batch, heads, N, N): the float64 matrices the reference and materialize build for x (batch, H, W, dim)."""
        n = x.shape[1] * x.shape[2]
        return (x.shape[0], self.heads, n, n)


def mix_channels(weights: Tensor, x: Tensor, group_of: Tensor) -> Tensor:
    """out[b, n, c] = Σ_m weights[b, group_of[c], n, m] · x[b, m, c], for x (batch, H, W, C) and weights
    (batch, heads, N, N): each channel mixed by its group's matrix; (batch, H, W, C)."""
    b, h, w, c = x.shape
    per_channel = weights[:, group_of]  # (batch, C, N, N)
    return torch.einsum("bcnm,bmc->bnc", per_channel, x.reshape(b, h * w, c)).reshape(x.shape)
