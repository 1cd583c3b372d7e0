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

from ...core.errors import ParameterError, ShapeError
from ...core.module import Attention, Impl
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_finite, check_key_padding_mask, check_qkv, check_tensor, check_tokens
from ..dense.softmax import sdpa

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
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < rank:
        raise ParameterError(f"axis: expected None or an int in [0, {rank - 1}] (a grid axis), got {axis!r}")
    return (axis,) * heads


def _check(
    q: Tensor, k: Tensor, v: Tensor, axis: int | None, key_padding_mask: Tensor | None
) -> tuple[tuple[int, ...], tuple[int, ...], Tensor | None]:
    """(grid, axis of each head, key_padding_mask (batch, N) or None) after checking everything."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if not 5 <= q.dim() <= 6:
        raise ShapeError(
            f"q: expected (batch, heads, *grid, head_dim) with a grid of 2 or 3 axes, got shape {tuple(q.shape)}"
        )
    grid = tuple(q.shape[2:-1])
    check_qkv(q, k, v, positions=len(grid), same_length=True)
    axes = head_axes(q.shape[1], len(grid), axis)
    n = math.prod(grid)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) == (q.shape[0], *grid):
            key_padding_mask = key_padding_mask.reshape(q.shape[0], n)
        check_key_padding_mask(key_padding_mask, q.shape[0], n)
    return grid, axes, key_padding_mask


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
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Axial attention of q, k, v (batch, heads, *grid, head_dim), a grid of 2 or 3 axes.

    Each head attends along one axis (`axis`, or head h along axis h mod r when None), its
    keys the tokens of its line; causal keeps c'_a <= c_a. key_padding_mask: bool (batch, N)
    in raster order or (batch, *grid), True = real token. scale defaults to 1/√head_dim.
    Returns (batch, heads, *grid, head_dim of v); a query whose line is all padding gives 0.
    """
    grid, _, kpm = _check(q, k, v, axis, key_padding_mask)
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
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `axial_attention` in float64: softmax(q kᵀ·scale) over all N × N pairs under
    the axial mask of `axial_mask` and the padding; weights (batch, heads, N, N) in raster order."""
    grid, axes, kpm = _check(q, k, v, axis, key_padding_mask)
    b, h, n = q.shape[0], q.shape[1], math.prod(grid)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    keep = axial_mask(grid, axes, causal, q.device)[None]
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    weights = masked_softmax(torch.einsum("bhid,bhjd->bhij", q64, k64) * scale, keep)
    out = (weights @ v64).reshape(b, h, *grid, v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


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
        Param("grid_shape", tuple, None, "fixed grid (H, W[, …]) every input must have, also the grid of flat "
              "(batch, heads, N, head_dim) inputs to attend; None: read from the input", low=1, optional=True),
    ),
    summary="Axial attention: each head attends along one grid axis (row / column), masked row/column when causal.",
    test_params={"grid_shape": (3, 4)},
    test_positions=(3, 4),
    flops=axial_flops,
)
class AxialAttention(Attention):
    """Multi-head axial attention on a 2-D or 3-D grid of tokens, one axis per head.

    Inputs are (batch, H, W, dim) for grid_rank 2, (batch, D, H, W, dim) for 3; key_padding_mask is
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
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal)
        if grid_rank not in (2, 3):
            raise ParameterError(f"grid_rank: expected 2 or 3, got {grid_rank!r}")
        if grid_shape is not None:
            grid_shape = tuple(grid_shape)
            if len(grid_shape) != grid_rank or any(isinstance(g, bool) or not isinstance(g, int) or g < 1
                                                   for g in grid_shape):
                raise ParameterError(
                    f"grid_shape: expected {grid_rank} positive ints (one per axis, grid_rank={grid_rank}), "
                    f"got {grid_shape!r}"
                )
        self.grid_rank, self.axis, self.grid_shape = grid_rank, axis, grid_shape
        self.axes = head_axes(heads, grid_rank, axis)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def _options(self) -> dict[str, object]:
        return {"axis": self.axis, "causal": self.causal, "scale": self.scale}

    # -- the two paths, on (batch, heads, *grid, head_dim) and a key padding mask (batch, N) ----------
    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path; here `mask` is the key padding mask (batch, N) or None (no N×N mask is built)."""
        return axial_attention(q, k, v, key_padding_mask=mask, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return axial_attention_reference(q, k, v, key_padding_mask=mask, **self._options())  # type: ignore[arg-type]

    def _check_grid(self, name: str, grid: tuple[int, ...]) -> None:
        if self.grid_shape is not None and grid != self.grid_shape:
            raise ShapeError(f"{name}: expected the grid {self.grid_shape} this module was built with, got {grid}")

    def _grid_view(self, q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int] | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (batch, heads, *grid, head_dim)."""
        check_tensor("q", q)
        if q.dim() == self.grid_rank + 3 and grid is None:
            self._check_grid("q", tuple(q.shape[2:-1]))
            return q, k, v
        if q.dim() != 4:
            raise ShapeError(
                f"q: expected (batch, heads, *grid, head_dim) with {self.grid_rank} grid axes, or flat "
                f"(batch, heads, N, head_dim), got shape {tuple(q.shape)}"
            )
        if grid is None:
            if self.grid_shape is None:
                raise ShapeError(
                    f"grid: flat q of shape {tuple(q.shape)} needs grid=(…) with {self.grid_rank} axes "
                    "(or a module built with grid_shape)"
                )
            grid = self.grid_shape
        grid = tuple(int(g) for g in grid)
        if len(grid) != self.grid_rank:
            raise ShapeError(f"grid: expected {self.grid_rank} axes, got {grid}")
        self._check_grid("grid", grid)
        check_qkv(q, k, v, same_length=True)
        if q.shape[2] != math.prod(grid):
            raise ShapeError(f"grid: {grid} holds {math.prod(grid)} positions, but q, k, v have {q.shape[2]} (at dim 2)")
        return tuple(t.reshape(*t.shape[:2], *grid, t.shape[-1]) for t in (q, k, v))  # type: ignore[return-value]

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
        grid: Sequence[int] | None = None,
    ) -> Tensor:
        """The attention core on projected heads: (batch, heads, *grid, head_dim), or flat with `grid`."""
        if attn_mask is not None:
            raise ValueError("attn_mask: axial attention takes no attention mask (only key_padding_mask)")
        qg, kg, vg = self._grid_view(q, k, v, grid)
        check_qkv(qg, kg, vg, positions=self.grid_rank, same_length=True)
        if qg.shape[1] != self.heads:
            raise ShapeError(f"q: expected {self.heads} heads at dim 1, got {qg.shape[1]} in shape {tuple(q.shape)}")
        if impl == "fast":
            out = self.attend_fast(qg, kg, vg, key_padding_mask)
        elif impl == "reference":
            out = self.attend_reference(qg, kg, vg, key_padding_mask)[0]
        else:
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        return out.reshape(*q.shape[:-1], v.shape[-1])

    def _heads(self, x: Tensor, context: Tensor | None, attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if context is not None:
            raise ValueError("context: axial attention does not support cross-attention")
        if attn_mask is not None:
            raise ValueError("attn_mask: axial attention takes no attention mask (only key_padding_mask)")
        check_tokens("x", x, self.dim, grid_rank=self.grid_rank)
        check_finite("x", x)
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
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, *grid, dim) -> the same shape."""
        q, k, v = self._heads(x, context, attn_mask)
        out = self.attend(q, k, v, key_padding_mask=key_padding_mask, impl=impl)
        return self.out_proj(out.movedim(1, -2).flatten(-2))

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention matrix (batch, heads, N, N), positions in raster order."""
        q, k, v = self._heads(x, context, attn_mask)
        return self.attend_reference(q, k, v, key_padding_mask)[1]
