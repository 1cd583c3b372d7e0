"""Circular-window local attention (Liu et al., "CLEAR: Conv-Like Linearization Revs Pre-Trained
Diffusion Transformers Up", 2025) on a 2-D (or 3-D) grid of tokens.

Each query attends to the keys within Euclidean grid distance r of it:

    W(i) = { j : ‖p_j − p_i‖₂ <= r },    out_i = Σ_{j ∈ W(i)} softmax_j(q_i·k_j·scale) v_j

At a border the disc is cut, not shifted (a corner query sees about a quarter of it); a radius
reaching every position (r >= the grid's diagonal) is full attention. An interior query sees
the lattice points of the disc: 5 for r = 1, 13 for r = 2, about πr² in general, so the cost is
O(N·r²·d) (the paper's r = 8 … 32 on a 64 × 64 latent grid).

The fast path is the GEMM tiling of neighborhood attention (attnlab.kernels.neighborhood): query tiles
against the halo of keys that holds the (2⌊r⌋ + 1)-wide square around each of their queries
(cut to the grid), with the disc as the in-tile mask, forward and a recomputing backward, memory
O(N·r²), never N × N. The reference materialises the masked N × N matrix in float64.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from ...kernels.grid import check_grid_qkv, grid_padding, masked_grid_reference
from ...kernels.neighborhood import Plan, outer, plan, tiled_attention
from .base import GridAttention, grid_shape_param
from .neighborhood import tile_shape

CLEAR = Paper("P170", "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up", 2025, "2412.16112")
RADIUS = 8.0


def disc_points(radius: float, rank: int = 2) -> int:
    """Lattice points of the `rank`-D ball of `radius` around the origin: the keys of an interior query."""
    reach = int(math.floor(radius))
    axis = torch.arange(-reach, reach + 1)
    mesh = torch.meshgrid(*([axis] * rank), indexing="ij")
    return int((sum(m * m for m in mesh) <= radius * radius).sum())


def circular_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q·k and A·v at the default r = 8: 4·h·d per (query, key) pair, an interior
    query's disc holding 197 keys (at most n)."""
    return 4.0 * heads * head_dim * n * min(disc_points(RADIUS), n)


def check_radius(radius: object) -> float:
    """The radius as a float, or ParameterError: a real number >= 0."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise ParameterError(f"radius: expected a finite number >= 0 (grid units), got {radius!r}")
    return float(radius)


def _check(q: Tensor, k: Tensor, v: Tensor, radius: float, attention_mask: Tensor | None) -> tuple[tuple[int, ...], float, Tensor | None]:
    """(grid, radius, attention_mask (batch, N) or None) after checking everything."""
    grid = check_grid_qkv(q, k, v, (2, 3))
    return grid, check_radius(radius), grid_padding(attention_mask, q.shape[0], grid)


# -- the fast path -----------------------------------------------------------------------------
@lru_cache(maxsize=16)
def circular_plan(grid: tuple[int, ...], radius: float, device: torch.device) -> Plan:
    """The neighborhood tiling of the (2⌊r⌋ + 1)-wide square (cut to each axis) with the disc as its
    in-tile mask. The square's halo holds every disc: with a kernel k <= L the tile's halo covers
    the clamped windows [c − ⌊k/2⌋, c + ⌊k/2⌋] ∩ [0, L) of all its queries."""
    kernel = tuple(min(2 * int(math.floor(radius)) + 1, length) for length in grid)
    rank = len(grid)
    square = plan(grid, kernel, (1,) * rank, (False,) * rank, tile_shape(kernel), device)
    squared = [(ax.k_pos[:, None, :] - ax.q_pos[:, :, None]) ** 2 for ax in square.axes]
    distance = outer(squared, "add").reshape(square.tiles, square.tq, square.hk)
    return dataclasses.replace(square, keep=(distance <= radius * radius).to(device))


def circular_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    radius: float = RADIUS,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Circular-window attention of q, k, v (batch, heads, *grid, head_dim), a grid of 2 or 3 axes.

    radius: r >= 0 in grid units (the query's own position is always in its disc);
    attention_mask: bool (batch, N) in raster order or (batch, *grid), True = real token (a
    query whose disc holds no real key gives 0); scale defaults to 1/√head_dim.
    """
    grid, radius, kpm = _check(q, k, v, radius, attention_mask)
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    p = circular_plan(grid, radius, q.device)
    out = tiled_attention(
        q.reshape(b, h, -1, d), k.reshape(b, h, -1, d), v.reshape(b, h, -1, v.shape[-1]), p,
        scale=scale, attention_mask=kpm,
    )
    return out.view(b, h, *grid, v.shape[-1])


# -- the reference -----------------------------------------------------------------------------
def circular_mask(grid: Sequence[int], radius: float, device: torch.device | None = None) -> Tensor:
    """bool (N, N), raster order: True where ‖p_j − p_i‖₂ <= radius."""
    mesh = torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij")
    coords = torch.stack([m.reshape(-1) for m in mesh], dim=-1)
    return ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1) <= radius * radius


def circular_window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    radius: float = RADIUS,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, N, N)) of `circular_window_attention` in float64 over the full masked
    matrix (positions in raster order), cast back to q's dtype."""
    grid, radius, kpm = _check(q, k, v, radius, attention_mask)
    return masked_grid_reference(q, k, v, circular_mask(grid, radius, q.device), kpm, scale)


# -- the module --------------------------------------------------------------------------------
@register(
    name="circular-window",
    paper=CLEAR,
    family="A",
    cost="O(N·r²·d)",
    exponent=1.0,
    supports=Supports(key_padding=True, grids=(2, 3), materialize=True),
    params=(
        Param("radius", (int, float), RADIUS, "r: each query attends to the keys within Euclidean grid distance r",
              low=0),
        grid_shape_param("(H, W) or (D, H, W)"),
    ),
    summary="CLEAR circular-window attention: each token attends to the keys within Euclidean distance r on the grid.",
    test_params={"radius": 1.5, "grid_shape": (4, 5)},
    test_positions=(4, 5),
    flops=circular_flops,
)
class CircularWindowAttention(GridAttention):
    """Multi-head circular-window attention on a 2-D or 3-D grid of tokens, (batch, *grid, dim).

    attention_mask is bool (batch, N) in raster order or (batch, *grid). `attend(q, k, v)` takes the
    projected heads as (batch, heads, *grid, head_dim), or flat (batch, heads, N, head_dim) with
    `grid=(H, W)` (or the module's `grid_shape`), and answers in the same layout. `materialize` is
    (batch, heads, N, N) in raster order, zero outside each query's disc.
    """

    grid_ranks = (2, 3)

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        radius: float = RADIUS,
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, grid_shape=grid_shape)
        self.radius = check_radius(radius)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path on (batch, heads, *grid, head_dim); `mask` is the key padding mask (batch, N) or None."""
        return circular_window_attention(q, k, v, radius=self.radius, attention_mask=mask, scale=self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return circular_window_attention_reference(q, k, v, radius=self.radius, attention_mask=mask, scale=self.scale)

    def extra_repr(self) -> str:
        return f"radius={self.radius:g}"
