"""Axial attention (Ho et al., "Axial Attention in Multidimensional Transformers", 2019) on 2-D
and 3-D grids of tokens.

Axial attention along axis a lets the token at coordinates c attend to the tokens that share
every coordinate but the a-th, i.e. to its own line along a:

    out_c = Σ_{c' : c'_b = c_b for b ≠ a} softmax_{c'}(q_c·k_{c'}·scale) v_{c'}

On a (H, W) grid, axis 1 is the paper's row attention (along W) and axis 0 its column
attention (along H). Cost O(N·L_a·d) per head, so O(N·(H + W)·d) for both axes, which is
O(N^1.5·d) on a square 2-D grid (O(N^{4/3}·d) on a cubic 3-D grid) instead of O(N²·d).

Causal (the paper's masked row / masked column attention): on its axis a query sees only
c'_a <= c_a. A key on the query's line with c'_a <= c_a comes no later in raster order, so
the masked layer leaks no future token. The paper's semi-parallel decoder also uses
*unmasked* row attention over a context shifted down by one row; that shift is a property of
the network, not of one attention layer, and is left to the model that stacks these layers.

Choice, against the paper: the paper stacks separate row and column layers (each its own
projections, with residuals and MLPs in between). Two stacked layers inside one `attend`
would not be linear in v (the second layer's q, k come from the first layer's output), so
out = A v would hold for no A. Here one module is one axial layer: with `axis` = None the
heads are split between the axes, head h attending along axis h mod r (in 2-D: even heads
column attention, odd heads row attention), so each head still has one (N, N) matrix and
stacking two such modules gives every token the full receptive field, as in the paper; with
`axis` = a every head attends along axis a, exactly the paper's single row (a = r − 1) or
column (a = r − 2) layer.

The fast path is SDPA over the lines of each axis (the grid reshaped to (lines, L_a)); the
reference materialises the masked (N, N) matrix per head in float64, positions in raster
order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_int
from ...kernels.grid import check_grid_qkv, grid_padding, masked_grid_reference
from ...kernels.sdpa import sdpa
from .base import GridAttention, grid_shape_param

AXIAL = Paper("P070", "Axial Attention in Multidimensional Transformers", 2019, "1912.12180")


def axial_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q·k and A·v on the square 2-D grid of n tokens (the default grid_rank):
    every head attends along a line of √n tokens, 4·h·n·√n·d, half of it when causal."""
    return 4.0 * heads * n * math.sqrt(n) * head_dim * (0.5 if causal else 1.0)


def head_axes(heads: int, rank: int, axis: int | None) -> tuple[int, ...]:
    """The grid axis each head attends along: `axis` for all heads, or h mod rank for head h."""
    if axis is None:
        if heads < rank:
            raise ParameterError(
                f"heads: with axis=None the heads are split over the {rank} grid axes, so heads >= {rank} "
                f"is needed, got heads={heads}"
            )
        return tuple(h % rank for h in range(heads))
    check_int("axis", axis, 0, rank - 1, meaning="(a grid axis) or None")
    return (axis,) * heads


def _check(
    q: Tensor, k: Tensor, v: Tensor, axis: int | None, attention_mask: Tensor | None
) -> tuple[tuple[int, ...], tuple[int, ...], Tensor | None]:
    """(grid, axis of each head, attention_mask (batch, N) or None) after checking everything."""
    grid = check_grid_qkv(q, k, v, (2, 3))
    return grid, head_axes(q.shape[1], len(grid), axis), grid_padding(attention_mask, q.shape[0], grid)


# -- the fast path -----------------------------------------------------------------------------
def _along(q: Tensor, k: Tensor, v: Tensor, a: int, causal: bool, kpm: Tensor | None, scale: float | None) -> Tensor:
    """Attention of q, k, v (batch, heads, *grid, d) along grid axis a, by SDPA over the lines."""
    grid = q.shape[2:-1]
    moved = [t.movedim(2 + a, -2) for t in (q, k, v)]
    lines = moved[0].shape[2:-2]
    b, h, length = q.shape[0], q.shape[1], grid[a]
    flat = [t.reshape(b, h * math.prod(lines), length, t.shape[-1]) for t in moved]
    if kpm is None:
        out = torch.nn.functional.scaled_dot_product_attention(*flat, is_causal=causal, scale=scale)
    else:
        keep = kpm.reshape(b, *grid).movedim(1 + a, -1).reshape(b, 1, -1, 1, length)
        keep = keep.expand(b, h, keep.shape[2], 1, length).reshape(b, -1, 1, length)
        if causal:
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        out = sdpa(*flat, keep, scale=scale)
    return out.reshape(*moved[0].shape[:-1], v.shape[-1]).movedim(-2, 2 + a)


def axial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    axis: int | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Axial attention of q, k, v (batch, heads, *grid, head_dim), a grid of 2 or 3 axes.

    Each head attends along one axis (`axis`, or head h along axis h mod r when None), its
    keys the tokens of its line; causal keeps c'_a <= c_a. attention_mask: bool (batch, N)
    in raster order or (batch, *grid), True = real token. scale defaults to 1/√head_dim.
    Returns (batch, heads, *grid, head_dim of v); a query whose line is all padding gives 0.
    """
    grid, _, kpm = _check(q, k, v, axis, attention_mask)
    if axis is not None:
        return _along(q, k, v, axis, causal, kpm, scale)
    rank, heads = len(grid), q.shape[1]
    if heads % rank == 0:  # heads (j·r + a) as (j, a): unbind and stack, no per-slice copies in the backward
        groups = [t.unflatten(1, (heads // rank, rank)).unbind(2) for t in (q, k, v)]
        parts = [_along(gq, gk, gv, a, causal, kpm, scale) for a, (gq, gk, gv) in enumerate(zip(*groups))]
        return torch.stack(parts, dim=2).flatten(1, 2)
    parts = [_along(q[:, a::rank], k[:, a::rank], v[:, a::rank], a, causal, kpm, scale) for a in range(rank)]
    # parts hold heads a, a + r, a + 2r, …: put head h back at position h
    order = torch.tensor([h for a in range(rank) for h in range(a, heads, rank)], device=q.device)
    return torch.cat(parts, dim=1).index_select(1, torch.argsort(order))


# -- the reference -----------------------------------------------------------------------------
def axial_mask(grid: Sequence[int], axes: Sequence[int], causal: bool, device: torch.device | None = None) -> Tensor:
    """bool (heads, N, N), raster order: True where key j is on query i's line along the head's axis
    (every other coordinate equal) and, when causal, j's coordinate on that axis is <= i's."""
    mesh = torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij")
    coords = torch.stack([m.reshape(-1) for m in mesh], dim=-1)
    equal = coords[:, None, :] == coords[None, :, :]
    masks = []
    for a in axes:
        others = [b for b in range(len(grid)) if b != a]
        keep = equal[..., others].all(-1)
        if causal:
            keep = keep & (coords[None, :, a] <= coords[:, None, a])
        masks.append(keep)
    return torch.stack(masks)


def axial_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    axis: int | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `axial_attention` in float64: softmax(q kᵀ·scale) over all N × N pairs under
    the axial mask of `axial_mask` and the padding; weights (batch, heads, N, N) in raster order."""
    grid, axes, kpm = _check(q, k, v, axis, attention_mask)
    return masked_grid_reference(q, k, v, axial_mask(grid, axes, causal, q.device), kpm, scale)


# -- the module --------------------------------------------------------------------------------
@register(
    name="axial",
    paper=AXIAL,
    family="A",
    cost="O(N·(H+W)·d)",
    exponent=1.5,
    supports=Supports(causal=True, key_padding=True, grids=(2, 3), materialize=True),
    params=(
        Param("grid_rank", int, 2, "axes of the position grid: 2 (batch, H, W, dim) or 3 (batch, D, H, W, dim)",
              choices=(2, 3)),
        Param("axis", int, None, "grid axis of every head (in 2-D: 1 = row, 0 = column attention); None: head h "
              "attends along axis h mod grid_rank", low=0, optional=True),
        grid_shape_param("(H, W[, …])"),
    ),
    summary="Axial attention: each head attends along one grid axis (row / column), masked row/column when causal.",
    test_params={"grid_shape": (3, 4)},
    test_positions=(3, 4),
    flops=axial_flops,
)
class AxialAttention(GridAttention):
    """Multi-head axial attention on a 2-D or 3-D grid of tokens, one axis per head.

    Inputs are (batch, H, W, dim) for grid_rank 2, (batch, D, H, W, dim) for 3; attention_mask is
    bool (batch, N) in raster order or (batch, *grid). `attend(q, k, v)` takes the projected heads as
    (batch, heads, *grid, head_dim), or flat (batch, heads, N, head_dim) with `grid=(H, W, …)` (or
    the module's `grid_shape`), and answers in the same layout. `materialize` is (batch, heads, N,
    N) in raster order, zero off each head's lines.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        grid_rank: int = 2,
        axis: int | None = None,
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        if grid_rank not in (2, 3):
            raise ParameterError(f"grid_rank: expected 2 or 3, got {grid_rank!r}")
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, grid_shape=grid_shape,
                         grid_ranks=(grid_rank,))
        self.grid_rank, self.axis = grid_rank, axis
        self.axes = head_axes(heads, grid_rank, axis)

    def _options(self) -> dict[str, object]:
        return {"axis": self.axis, "causal": self.causal, "scale": self.scale}

    # -- the two paths, on (batch, heads, *grid, head_dim) and a key padding mask (batch, N) ----------
    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path; here `mask` is the key padding mask (batch, N) or None (no N×N mask is built)."""
        return axial_attention(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return axial_attention_reference(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]
