"""The set base: attention over points that carry coordinates, equivariant to the order of the points.

A set module maps point features x (batch, n, dim) and point coordinates pos (batch, n, d_pos) to
(batch, n, dim). The points of a sample are a set: permuting them permutes the output alike. A subclass
supplies

* `set_fast(x, pos, keep)`       -> out (batch, n, dim)                              (the fast path)
* `set_reference(x, pos, keep)`  -> (out, A (batch, heads, n, n) or None)            (the plain path)

where `keep` is the key padding keep-mask (batch, n), True = real point, or None. The base checks the
inputs and the padding arguments once (as `attnlab.core.module.Attention` does: `attention_mask`
True/1 = real point, or PyTorch's `key_padding_mask` True = padding; never both) and offers
`forward(x, pos, ..., impl=)`, `materialize(x, pos, ...)` -> A (where the method has per-pair weights;
A[b, h, i, j] is the weight point j gets in point i's output, zero for j not among i's neighbours and in the
rows and columns of padded points) and
`bench_inputs` for the speed harness.

Padding contract (checked by `attnlab.testing_sets`): a padded point is never a neighbour of any point,
so padded points change nothing at the real points, and a padded sample gives what its real points
give alone; the output at a padded point is zero (the base zeroes it), as is a sample with no real point.

A subclass whose output depends on the coordinates only through differences p_i − p_j sets the class
attribute `translation_invariant = True`; the suite then checks out(x, pos + t) == out(x, pos).
(`Supports` has no such field; the attribute is the declaration.)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from ...core.errors import DTypeError, ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.memory import check_memory
from ...core.validate import check_finite, check_floating, check_module_dtype, check_rank, check_tensor, check_tokens

if TYPE_CHECKING:
    from ...core.registry import Spec

Impl = Literal["fast", "reference"]


def check_points(x: object, pos: object, dim: int, pos_dim: int) -> tuple[Tensor, Tensor]:
    """x (batch, n, dim) and pos (batch, n, pos_dim): floating, finite, one dtype and device."""
    x = check_tensor("x", x)
    check_tokens("x", x, dim)
    check_finite("x", x)
    pos = check_tensor("pos", pos)
    check_rank("pos", pos, 3, "(batch, n, d_pos) of point coordinates")
    check_floating("pos", pos)
    if tuple(pos.shape) != (*x.shape[:2], pos_dim):
        raise ShapeError(f"pos: expected shape (batch, n, d_pos) = {(*x.shape[:2], pos_dim)} (as x), got {tuple(pos.shape)}")
    if pos.dtype != x.dtype:
        raise DTypeError(f"pos: expected dtype {x.dtype} (as x), got {pos.dtype}")
    if pos.device != x.device:
        raise ValueError(f"pos: expected device {x.device} (as x), got {pos.device}")
    check_finite("pos", pos)
    return x, pos


class SetAttention(nn.Module, ABC):
    """Points (batch, n, dim) with coordinates (batch, n, d_pos) -> (batch, n, dim); weights (batch, heads, n, n)."""

    spec: ClassVar[Spec]
    translation_invariant: ClassVar[bool] = False  # the output depends on pos only through p_i − p_j

    def __init__(self, dim: int, heads: int = 1, pos_dim: int = 3) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ParameterError(f"heads: expected a divisor of dim={dim}, got {heads}")
        if pos_dim < 1:
            raise ParameterError(f"pos_dim: expected >= 1, got {pos_dim}")
        self.dim, self.heads, self.pos_dim = dim, heads, pos_dim

    @abstractmethod
    def set_fast(self, x: Tensor, pos: Tensor, keep: Tensor | None) -> Tensor:
        """x (batch, n, dim), pos (batch, n, d_pos), keep (batch, n) or None -> (batch, n, dim)."""

    @abstractmethod
    def set_reference(self, x: Tensor, pos: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x, pos, keep -> (out (batch, n, dim), weights (batch, heads, n, n) or None when the method has none)."""

    def prepare(
        self, x: Tensor, pos: Tensor, attention_mask: Tensor | None, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The checked points, coordinates and keep-mask (batch, n) of a call."""
        x, pos = check_points(x, pos, self.dim, self.pos_dim)
        check_module_dtype("x", x, self)
        keep = module_keep_mask(attention_mask, key_padding_mask, x.shape[0], x.shape[1])
        return x, pos, keep

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """Points (batch, n, dim), coordinates (batch, n, d_pos) -> (batch, n, dim); zero at padded points."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        x, pos, keep = self.prepare(x, pos, attention_mask, key_padding_mask)
        if impl == "fast":
            out = self.set_fast(x, pos, keep)
        else:
            check_memory("impl='reference'", (x.shape[0], self.heads, x.shape[1], x.shape[1]), 8)
            out = self.set_reference(x, pos, keep)[0]
        return out if keep is None else out * keep[..., None].to(out.dtype)

    def materialize(
        self, x: Tensor, pos: Tensor, *, attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """The weights (batch, heads, n, n): A[b, h, i, j] = the weight of point j in point i's output."""
        x, pos, keep = self.prepare(x, pos, attention_mask, key_padding_mask)
        check_memory("materialize", (x.shape[0], self.heads, x.shape[1], x.shape[1]), 8)
        weights = self.set_reference(x, pos, keep)[1]
        if weights is None:
            raise NotImplementedError(f"{type(self).__name__}: the method has no per-pair weights to materialize")
        return weights if keep is None else weights * keep[:, None, :, None].to(weights.dtype)

    def bench_inputs(
        self, batch: int, n: int, dtype: torch.dtype, generator: torch.Generator
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Inputs of a timed call: x (batch, n, dim) normal, pos (batch, n, d_pos) uniform in the unit cube."""
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        x = torch.randn(batch, n, self.dim, generator=generator, dtype=torch.float32).to(device, dtype)
        pos = torch.rand(batch, n, self.pos_dim, generator=generator, dtype=torch.float32).to(device, dtype)
        return [x, pos], {}
