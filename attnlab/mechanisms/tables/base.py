"""The table base: attention over a table of datapoints (rows) × attributes (columns).

A table module maps an embedded table x (batch, rows, attributes, dim) — each of the `rows`
datapoints has the same `attributes` cells, each cell embedded in `dim` channels — to a table of
the same shape. Two kinds of attention act on it:

* attention between datapoints (rows): each row, its cells flattened to one vector of
  attributes·dim channels, attends to the rows of its table; the weights are
  (batch, heads, rows, rows) (`materialize`);
* attention between attributes: the cells of one row attend to each other; the weights are
  (batch, rows, heads, attributes, attributes) (`materialize_attributes`).

Masks. `row_mask` (batch, rows), True (or 1) = a real row, False (0) = padding. Padded rows are no
key of the attention between rows, change nothing at the real rows, and come out as zeros (the base
zeroes them); a table with no real row gives zeros and zero weights, never NaN. The number of
attributes is fixed by the module (its projections between rows have attributes·dim inputs), so
there is no attribute mask; there is no causal mode either: a table has no order (row attention is
equivariant to the order of the rows). Masked cells of masked reconstruction (NPT) are a feature of
the input embedding, not an attention mask.

A subclass supplies

* `table_fast(x, keep)`        -> out (batch, rows, attributes, dim)              (the fast path)
* `table_reference(x, keep)`   -> TableWeights(out, rows=(per row layer (batch, heads, rows, rows), …),
                                               attributes=(per attribute layer (batch, rows, heads, f, f), …))
                                                                                   (the plain float64 path)

where `keep` is the checked row keep-mask (batch, rows) or None. The contract every table module keeps is
checked by `attnlab.testing_tables`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ...core.errors import DTypeError, MaskError, ParameterError, ShapeError
from ...core.memory import check_memory
from ...core.validate import check_finite, check_floating, check_int, check_module_dtype, check_tensor

if TYPE_CHECKING:
    from ...core.registry import Spec

Impl = Literal["fast", "reference"]


class TableWeights(NamedTuple):
    """The reference's result: the output and the weights of every row and attribute attention layer, in order."""

    out: Tensor
    rows: tuple[Tensor, ...]
    attributes: tuple[Tensor, ...]


def check_table(x: object, attributes: int, dim: int) -> Tensor:
    """x (batch, rows, attributes, dim), floating and finite, with the module's attributes and dim."""
    x = check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected a 4-D tensor (batch, rows, attributes, dim), got shape {tuple(x.shape)}")
    if x.shape[2] != attributes:
        raise ShapeError(f"x: expected attributes={attributes} (axis 2), got shape {tuple(x.shape)}")
    if x.shape[3] != dim:
        raise ShapeError(f"x: expected last dimension dim={dim}, got shape {tuple(x.shape)}")
    check_floating("x", x)
    check_finite("x", x)
    return x


def check_row_mask(row_mask: object, batch: int, rows: int) -> Tensor | None:
    """The keep-mask (batch, rows), True = real row, of `row_mask` (bool, or integers 0/1), or None."""
    if row_mask is None:
        return None
    mask = check_tensor("row_mask", row_mask)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise DTypeError(f"row_mask: expected dtype torch.bool or integer 0/1 (1 = real row), got {mask.dtype}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise MaskError(f"row_mask: expected 0/1 values (1 = real row), got {mask.unique().tolist()[:6]}")
        mask = mask != 0
    if tuple(mask.shape) != (batch, rows):
        raise MaskError(f"row_mask: expected shape (batch, rows) = {(batch, rows)}, got {tuple(mask.shape)}")
    return mask


class TableAttention(nn.Module, ABC):
    """Attention over a table: (batch, rows, attributes, dim) -> the same shape, row_mask (batch, rows)."""

    spec: ClassVar[Spec]

    def __init__(self, dim: int, heads: int = 1, *, attributes: int) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("attributes", attributes)
        if check_int("heads", heads) and dim % heads:
            raise ParameterError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.dim, self.heads, self.head_dim, self.attributes = dim, heads, dim // heads, attributes

    @abstractmethod
    def table_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """x (batch, rows, attributes, dim), keep (batch, rows) or None -> (batch, rows, attributes, dim)."""

    @abstractmethod
    def table_reference(self, x: Tensor, keep: Tensor | None) -> TableWeights:
        """x, keep as `table_fast` -> the output and the weights of every attention layer."""

    def prepare(self, x: Tensor, row_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The checked table and row keep-mask of a call."""
        x = check_table(x, self.attributes, self.dim)
        check_module_dtype("x", x, self)
        keep = check_row_mask(row_mask, x.shape[0], x.shape[1])
        return x, None if keep is None else keep.to(x.device)

    def _reference(self, x: Tensor, keep: Tensor | None, what: str) -> TableWeights:
        batch, rows = x.shape[:2]
        check_memory(what, (batch, self.heads, rows, rows), 8)
        return self.table_reference(x, keep)

    def forward(self, x: Tensor, *, row_mask: Tensor | None = None, impl: Impl = "fast") -> Tensor:
        """Table (batch, rows, attributes, dim) -> the same shape; padded rows (row_mask False) come out as 0."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        x, keep = self.prepare(x, row_mask)
        out = self.table_fast(x, keep) if impl == "fast" else self._reference(x, keep, "impl='reference'").out
        return out if keep is None else out.masked_fill(~keep[:, :, None, None], 0.0)

    def materialize(self, x: Tensor, *, row_mask: Tensor | None = None, layer: int = 0) -> Tensor:
        """The weights (batch, heads, rows, rows) of row attention layer `layer` (0 = the first, -1 = the last):
        entry [b, h, i, j] is the weight row i puts on row j; zero on padded rows (as queries and as keys)."""
        x, keep = self.prepare(x, row_mask)
        return _pick("layer", self._reference(x, keep, "materialize").rows, layer)

    def materialize_attributes(self, x: Tensor, *, row_mask: Tensor | None = None, layer: int = 0) -> Tensor:
        """The weights (batch, rows, heads, attributes, attributes) of attribute attention layer `layer`:
        entry [b, r, h, a, c] is the weight cell (r, a) puts on cell (r, c) of its own row; zero on padded rows."""
        x, keep = self.prepare(x, row_mask)
        return _pick("layer", self._reference(x, keep, "materialize_attributes").attributes, layer)

    def bench_inputs(
        self, batch: int, n: int, dtype: torch.dtype, generator: torch.Generator
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """A random table of n rows × the module's attributes for the speed harness, no padding."""
        x = torch.randn(batch, n, self.attributes, self.dim, generator=generator, dtype=torch.float32).to(dtype)
        return [x], {}


def _pick(name: str, layers: tuple[Tensor, ...], index: int) -> Tensor:
    if isinstance(index, bool) or not isinstance(index, int) or not -len(layers) <= index < len(layers):
        raise ParameterError(f"{name}: expected an int in [{-len(layers)}, {len(layers)}), got {index!r}")
    return layers[index]


def flat_rows(x: Tensor) -> Tensor:
    """(batch, rows, attributes, dim) -> (batch, rows, attributes·dim): each row one vector, attribute-major."""
    return x.reshape(*x.shape[:2], math.prod(x.shape[2:]))
