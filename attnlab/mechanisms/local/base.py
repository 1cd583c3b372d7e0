"""The module bases of attention on a grid of tokens whose keys are the tokens (halo,
circular window, Twins LSA, aggregated, axial, proxy-token, …).

Tokens come as (batch, *grid, dim); the projected heads as (batch, heads, *grid, head_dim),
or flat (batch, heads, N, head_dim) with `grid=(H, W, …)` or the module's fixed `grid_shape`.
The only mask is a key padding mask, bool (batch, N) in raster order or (batch, *grid), handed
to `attend_fast` / `attend_reference` as (batch, N) (no N × N mask is ever built for them).
`SummaryKeyAttention` is the base of the modules whose keys are summaries of the tokens.
The functional side (checks, padding, the masked reference) is `attnlab.kernels.grid`.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ShapeError
from ...core.module import Attention, Impl
from ...core.registry import Param
from ...core.validate import (
    check_finite,
    check_grid_shape,
    check_module_dtype,
    check_qkv,
    check_tensor,
    check_tokens,
    either,
)
from ...kernels.grid import grid_padding


def grid_shape_param(axes: str = "(H, W)") -> Param:
    """The registry entry of a `grid_shape` option; `axes` names the grid, e.g. "(H, W) or (D, H, W)"."""
    return Param(
        "grid_shape", tuple, None, f"fixed grid {axes} every input must have, also the grid of flat (batch, heads, N, "
        "head_dim) inputs to attend; None: read from the input", low=1, optional=True,
    )


class GridAttention(Attention):
    """Multi-head attention on a grid of `grid_ranks` axes; subclasses give the two paths on
    (batch, heads, *grid, head_dim) with a key padding mask (batch, N) or None (`mask_form = "grid"`;
    `attend` takes flat (batch, heads, N, head_dim) with `grid=` too).

    `grid_ranks` (class default, or per module through `__init__`) are the grid ranks accepted;
    a flat (batch, heads, N, head_dim) input without `grid` is a sequence when 1 is among them,
    otherwise it takes the module's `grid_shape`.
    """

    grid_ranks: tuple[int, ...] = (2,)
    mask_form = "grid"  # the key padding keep-mask (batch, N) in raster order

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        grid_shape: Sequence[int] | None = None,
        grid_ranks: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal)
        if grid_ranks is not None:
            self.grid_ranks = tuple(grid_ranks)
        self.grid_shape: tuple[int, ...] | None = (
            None if grid_shape is None else check_grid_shape("grid_shape", grid_shape, self.grid_ranks)
        )

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def _check_grid(self, name: str, grid: tuple[int, ...]) -> None:
        if self.grid_shape is not None and grid != self.grid_shape:
            raise ShapeError(f"{name}: expected the grid {self.grid_shape} this module was built with, got {grid}")

    def core_view(self, q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int] | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (batch, heads, *grid, head_dim), checked (heads included): the layout of the cores."""
        check_tensor("q", q)
        if grid is None and q.dim() - 3 in self.grid_ranks:
            self._check_grid("q", tuple(q.shape[2:-1]))
        else:
            want = (
                f"q: expected (batch, heads, *grid, head_dim) with {either(self.grid_ranks)} grid axes, or flat "
                f"(batch, heads, N, head_dim) with grid=(…) (or a module built with grid_shape), got shape {tuple(q.shape)}"
            )
            if q.dim() != 4:
                raise ShapeError(want)
            check_qkv(q, k, v, same_length=True)
            grid = self.grid_shape if grid is None else tuple(int(g) for g in grid)
            if grid is None:
                raise ShapeError(want)
            if len(grid) not in self.grid_ranks:
                raise ShapeError(f"grid: expected {either(self.grid_ranks)} axes, got {grid}")
            self._check_grid("grid", grid)
            if q.shape[2] != math.prod(grid):
                raise ShapeError(
                    f"grid: {grid} holds {math.prod(grid)} positions, but q, k, v have {q.shape[2]} (at dim 2)"
                )
            q, k, v = (t.reshape(*t.shape[:2], *grid, t.shape[-1]) for t in (q, k, v))
        check_qkv(q, k, v, positions=q.dim() - 3, same_length=True)
        if q.shape[1] != self.heads:
            raise ShapeError(f"q: expected {self.heads} heads at dim 1, got {q.shape[1]} in shape {tuple(q.shape)}")
        return q, k, v

    def _heads(
        self, x: Tensor, context: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (batch, heads, *grid, head_dim) of the tokens x (batch, *grid, dim), checked."""
        if context is not None:
            raise ValueError(f"context: {self.spec.name} does not support cross-attention")
        if attn_mask is not None:
            raise ValueError(f"attn_mask: {self.spec.name} takes no attention mask (only attention_mask)")
        check_tensor("x", x)
        ranks = self.grid_ranks
        rank = x.dim() - 2 if x.dim() - 2 in ranks else min(max(x.dim() - 2, min(ranks)), max(ranks))
        check_tokens("x", x, self.dim, grid_rank=rank)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        self._check_grid("x", tuple(x.shape[1:-1]))
        return tuple(  # type: ignore[return-value]
            proj(x).unflatten(-1, (self.heads, self.head_dim)).movedim(-2, 1)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )

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
        """x (batch, *grid, dim) -> the same shape; padding as attention_mask (True = attend) or key_padding_mask
        (True = padding), each (batch, N)."""
        q, k, v = self._heads(x, context, attn_mask)
        keep = self.keep_mask(x, None, attention_mask, key_padding_mask)
        out = self.attend(q, k, v, attention_mask=keep, impl=impl)
        return self.out_proj(out.movedim(1, -2).flatten(-2))

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention matrix (batch, heads, N, N), positions in raster order."""
        q, k, v = self._heads(x, context, attn_mask)
        keep = self.keep_mask(x, None, attention_mask, key_padding_mask)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, grid_padding(keep, x.shape[0], x.shape[1:-1]))[1]


class SummaryKeyAttention(Attention):
    """Base of the modules whose keys and values are m summaries of the tokens (pooled, convolved),
    registered with `Supports(summary_keys=True)`. A subclass gives

    * `key_count(grid)` -> m, the number of keys the core attends to for an input on `grid`;
    * `key_values(x)` -> (k, v), each (batch, heads, m, head_dim): those keys and values, in the
      order of the columns of `materialize`;
    * `materialize(x)` -> the exact weights A (batch, heads, N, m), so that the core output is A v
      (and the module's output out_proj(merge_heads(A v)));
    * `attend(q, k, v)` taking k, v of m rows, as `key_values` gives them.

    `attention_path` (the part of the output linear in A, for `capture(grads=True)`) applies A to
    the values of `key_values`, not to the tokens' own values.
    """

    @abstractmethod
    def key_count(self, grid: Sequence[int]) -> int:
        """m, the number of keys of an input on `grid`."""

    @abstractmethod
    def key_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(k, v), each (batch, heads, m, head_dim): the keys and values the core attends to."""

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """out_proj's matrix applied to merge_heads(weights · v), v the values of `key_values(x)`: (batch, N, dim)."""
        with torch.no_grad():
            v = self.key_values(x)[1]
        return F.linear(self.merge_heads(weights @ v.to(weights.dtype)), self.out_proj.weight.to(weights.dtype))
