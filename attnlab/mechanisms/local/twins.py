"""Twins-SVT spatial attention (Chu et al., "Twins: Revisiting the Design of Spatial Attention in
Vision Transformers", 2021): locally-grouped self-attention (LSA) and global sub-sampled
attention (GSA), on a 2-D grid of tokens (H, W).

LSA partitions the grid into k1×k2 windows (tiles) and runs full softmax attention inside each:

    out_i = Σ_{j : w(j) = w(i)} softmax_j(q_i·k_j·scale) v_j,   w(r, c) = (⌊r/k1⌋, ⌊c/k2⌋)

A grid that k1 (k2) does not divide ends in a window of fewer rows (columns): as the official
code, which zero-pads the map to whole windows and masks the padded keys out. Cost O(N·k1k2·d).

The parameter is `tile_size` = k or (k1, k2) (was `window`). Twins (k1×k2 "sub-windows", the
official `ws`) and Swin ("window size" M) say window size for this side of a fixed partition cell;
attnlab says `tile_size` because its other local mechanisms use "window" for a band that moves
with the query (sliding-window's `radius`, based's `window_size`, the count of keys a query sees,
as Longformer and Mistral). A tile is shared by all its queries; proxy-token and bilateral name
theirs the same. Passing `window=` raises an error naming `tile_size`.

GSA lets every query attend to (H/s)(W/s) summaries of the map, each one s×s cell reduced by a
stride-s, s×s convolution followed by LayerNorm, then projected to keys and values:

    X̃ = LayerNorm(Conv_{s×s, stride s}(X)),   out = softmax(Q (X̃ W_k)ᵀ·scale) X̃ W_v

(s = 1: no convolution and no LayerNorm, the keys are the tokens: full attention.) Cost
O(N·(N/s²)·d). The grid must be a multiple of s on both axes (the convolution, without
padding, would otherwise leave the last rows / columns out of every summary).

GSA's keys are not the input tokens (registered with `summary_keys`): no (N, N) matrix maps the
input values to the output (LayerNorm sits between the convolution and the value projection).
`materialize(x)` gives the exact (batch, heads, N, N/s²) softmax weights over the summaries, rows
summing to 1, summaries in raster order of the (H/s, W/s) grid, and `key_values(x)` their keys
and values, so that the core output is A v_summaries; `key_count((H, W))` = (H/s)(W/s).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.module import Impl
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register, renamed_keywords
from ...core.validate import (
    check_finite,
    check_grid_shape,
    check_int,
    check_module_dtype,
    check_pair,
    check_qkv,
    check_tensor,
    check_tokens,
)
from ...kernels.grid import check_grid_qkv, grid_padding, masked_grid_reference, refuse_masks
from ...kernels.sdpa import sdpa
from .base import GridAttention, SummaryKeyAttention, grid_shape_param

TWINS = Paper("P178", "Twins: Revisiting the Design of Spatial Attention in Vision Transformers", 2021, "2104.13840")
TILE_SIZE = 7  # Twins-SVT's window (tile) side
SR_RATIO = 2
LSA_RENAMED = {"window": "tile_size (the k or (k1, k2) side of the tiles the grid is partitioned into)"}


def lsa_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q·k and A·v with the default 7×7 windows: 4·h·d·N·min(49, N)."""
    return 4.0 * heads * head_dim * n * min(TILE_SIZE * TILE_SIZE, n)


def gsa_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q·k and A·v against the N/s² summaries (default s = 2), convolution left out."""
    return 4.0 * heads * head_dim * n * max(n // (SR_RATIO * SR_RATIO), 1)


# -- LSA: the fast path ------------------------------------------------------------------------
def _check_lsa(
    q: Tensor, k: Tensor, v: Tensor, tile_size: int | Sequence[int], attention_mask: Tensor | None
) -> tuple[tuple[int, int], tuple[int, int], Tensor | None]:
    height, width = check_grid_qkv(q, k, v)
    grid = (height, width)
    win = check_pair("tile_size", tile_size)
    if win[0] > grid[0] or win[1] > grid[1]:
        raise ValueError(f"tile_size: expected a tile within the grid {grid}, got tile_size {win} (rows, columns)")
    return grid, win, grid_padding(attention_mask, q.shape[0], grid)


def _to_windows(t: Tensor, win: tuple[int, int]) -> Tensor:
    """(..., H, W, d), H and W multiples of the window -> (..., windows, k1·k2, d), windows in raster order."""
    (h, w), (k1, k2) = t.shape[-3:-1], win
    t = t.reshape(*t.shape[:-3], h // k1, k1, w // k2, k2, t.shape[-1]).transpose(-4, -3)
    return t.reshape(*t.shape[:-5], (h // k1) * (w // k2), k1 * k2, t.shape[-1])


def _from_windows(t: Tensor, grid: tuple[int, int], win: tuple[int, int]) -> Tensor:
    """The inverse of `_to_windows`: (..., windows, k1·k2, d) -> (..., H, W, d)."""
    (h, w), (k1, k2) = grid, win
    t = t.reshape(*t.shape[:-3], h // k1, w // k2, k1, k2, t.shape[-1]).transpose(-4, -3)
    return t.reshape(*t.shape[:-5], h, w, t.shape[-1])


def _region(q: Tensor, k: Tensor, v: Tensor, win: tuple[int, int], kpm: Tensor | None, scale: float | None) -> Tensor:
    """Window attention on a region (batch, heads, H, W, d) that the windows tile exactly."""
    b, heads = q.shape[:2]
    tq, tk, tv = (_to_windows(t, win) for t in (q, k, v))  # (b, heads, windows, k1k2, d)
    keep = None
    if kpm is not None:  # (b, H, W) -> (b, 1, windows, 1, k1k2)
        keep = _to_windows(kpm[..., None], win)[:, None, :, None, :, 0]
    out = sdpa(tq.flatten(1, 2), tk.flatten(1, 2), tv.flatten(1, 2),
               None if keep is None else keep.expand(b, heads, *keep.shape[2:]).flatten(1, 2), scale=scale)
    return _from_windows(out.view(b, heads, *tq.shape[2:4], v.shape[-1]), tuple(q.shape[2:4]), win)


@renamed_keywords("lsa_attention", LSA_RENAMED)
def lsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_size: int | Sequence[int] = TILE_SIZE,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Locally-grouped self-attention of q, k, v (batch, heads, H, W, head_dim) in k1×k2 windows.

    `tile_size` is k or (k1, k2), within the grid; attention_mask bool (batch, N) in raster order
    or (batch, H, W), True = real token. A query whose window holds no real key gives 0.
    The grid is cut into up to four regions that windows of one shape tile exactly (the whole
    windows, and the short ones at the bottom, right and corner); each region's windows are cut
    by reshapes and attended with one batched SDPA, without a mask unless there is padding.
    Memory O(N·k1k2).
    """
    (h, w), win, kpm = _check_lsa(q, k, v, tile_size, attention_mask)
    kpm3 = None if kpm is None else kpm.reshape(q.shape[0], h, w)
    rows = [(slice(0, h - h % win[0]), win[0]), (slice(h - h % win[0], h), h % win[0])]
    cols = [(slice(0, w - w % win[1]), win[1]), (slice(w - w % win[1], w), w % win[1])]
    bands = []
    for rs, kr in rows:
        if kr == 0 or rs.start == rs.stop:
            continue
        parts = []
        for cs, kc in cols:
            if kc == 0 or cs.start == cs.stop:
                continue
            sel = (slice(None), slice(None), rs, cs)
            parts.append(_region(q[sel], k[sel], v[sel], (kr, kc), None if kpm3 is None else kpm3[:, rs, cs], scale))
        bands.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=3))
    return bands[0] if len(bands) == 1 else torch.cat(bands, dim=2)


# -- LSA: the reference ------------------------------------------------------------------------
def lsa_mask(grid: Sequence[int], tile_size: Sequence[int], device: torch.device | None = None) -> Tensor:
    """bool (N, N), raster order: True where query i and key j lie in the same k1×k2 window."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    cell = ((rows // tile_size[0]) * grid[1] + cols // tile_size[1]).reshape(-1)
    return cell[:, None] == cell[None, :]


@renamed_keywords("lsa_attention_reference", LSA_RENAMED)
def lsa_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_size: int | Sequence[int] = TILE_SIZE,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `lsa_attention` in float64: softmax over all N × N pairs under the window
    mask of `lsa_mask` and the padding; weights (batch, heads, N, N) in raster order."""
    grid, win, kpm = _check_lsa(q, k, v, tile_size, attention_mask)
    return masked_grid_reference(q, k, v, lsa_mask(grid, win, q.device), kpm, scale)


# -- the LSA module ------------------------------------------------------------------------------
@register(
    functional=("lsa_attention", "lsa_attention_reference"),
    name="twins-lsa",
    paper=TWINS,
    family="A",
    cost="O(N·k1·k2·d)",
    exponent=1.0,
    supports=Supports(key_padding=True, grids=(2,), materialize=True),
    params=(
        Param("tile_size", (int, tuple), TILE_SIZE, "window (tile) side k or (k1, k2) the grid is partitioned into",
              low=1),
        grid_shape_param(),
    ),
    summary="Twins locally-grouped self-attention: full softmax inside each k1×k2 window of the grid.",
    test_params={"tile_size": (2, 3), "grid_shape": (5, 4)},
    test_positions=(5, 4),
    flops=lsa_flops,
    renamed=LSA_RENAMED,
)
class TwinsLocalAttention(GridAttention):
    """Twins-SVT LSA: the (H, W) grid is cut into k1×k2 windows (smaller ones at the bottom / right
    edge when k1, k2 do not divide H, W); each token attends to the tokens of its window."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        tile_size: int | Sequence[int] = TILE_SIZE,
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias,
                         grid_shape=None if grid_shape is None else check_pair("grid_shape", grid_shape))
        self.tile_size = check_pair("tile_size", tile_size)
        if self.grid_shape is not None and (self.tile_size[0] > self.grid_shape[0] or self.tile_size[1] > self.grid_shape[1]):
            raise ParameterError(f"tile_size: expected a tile within grid_shape {self.grid_shape}, got {self.tile_size}")

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path; `mask` is the key padding mask (batch, N) or None."""
        return lsa_attention(q, k, v, tile_size=self.tile_size, attention_mask=mask, scale=self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return lsa_attention_reference(q, k, v, tile_size=self.tile_size, attention_mask=mask, scale=self.scale)


# -- GSA ---------------------------------------------------------------------------------------
def _flat_positions(name: str, t: Tensor) -> Tensor:
    """(batch, heads, N, d) or (batch, heads, H, W, d) -> (batch, heads, N, d)."""
    check_tensor(name, t)
    if t.dim() not in (4, 5):
        raise ShapeError(
            f"{name}: expected (batch, heads, N, head_dim) or (batch, heads, H, W, head_dim), got shape {tuple(t.shape)}"
        )
    return t.flatten(2, -2) if t.dim() == 5 else t


def gsa_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Attention of the queries q to the summaries k, v: softmax(q kᵀ·scale) v, one SDPA.

    q (batch, heads, N, d) or (batch, heads, H, W, d); k, v the summaries' keys and values,
    (batch, heads, M, d) or (batch, heads, H/s, W/s, d). Returns q's layout with v's width.
    """
    q4, k4, v4 = (_flat_positions(name, t) for name, t in (("q", q), ("k", k), ("v", v)))
    check_qkv(q4, k4, v4)
    out = F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
    return out.reshape(*q.shape[:-1], v.shape[-1])


def gsa_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """(out, weights) of `gsa_attention` in float64; weights (batch, heads, N, M) over the summaries."""
    q4, k4, v4 = (_flat_positions(name, t).double() for name, t in (("q", q), ("k", k), ("v", v)))
    check_qkv(q4, k4, v4)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    weights = masked_softmax(torch.einsum("bhid,bhjd->bhij", q4, k4) * scale)
    out = (weights @ v4).reshape(*q.shape[:-1], v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


@register(
    functional=("gsa_attention", "gsa_attention_reference"),
    name="twins-gsa",
    paper=TWINS,
    family="A",
    cost="O(N²·d/s²)",
    exponent=2.0,
    supports=Supports(grids=(2,), materialize=True, summary_keys=True),
    params=(
        Param("sr_ratio", int, SR_RATIO, "sub-sampling s: one summary (s×s conv, stride s, then LayerNorm) per s×s "
              "cell; 1 = the tokens themselves (full attention)", low=1),
    ),
    summary="Twins global sub-sampled attention: every token attends to the s×s-conv (+LayerNorm) summaries of the grid.",
    test_params={"sr_ratio": 2},
    test_positions=(4, 6),
    flops=gsa_flops,
)
class TwinsGlobalAttention(SummaryKeyAttention):
    """Twins-SVT GSA: queries from every token; keys and values from LayerNorm(Conv_{s×s, stride s}(x)).

    Inputs are (batch, H, W, dim) with H, W multiples of s. `attend(q, k, v)` is the attention of
    the queries to given summary keys / values (any number M of them). `project` is the base
    per-token projection; `summarize(x)` gives the (batch, H/s, W/s, dim) summaries the keys and
    values are projected from; `key_values(x)` their heads (batch, heads, N/s², head_dim);
    `materialize(x)` the (batch, heads, N, N/s²) softmax over them.
    """

    mask_form = "none"
    mask_note = "its keys are summaries of s×s cells, not tokens"

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        sr_ratio: int = SR_RATIO,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias)
        check_int("sr_ratio", sr_ratio)
        self.sr_ratio = sr_ratio
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return gsa_attention(q, k, v, scale=self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return gsa_attention_reference(q, k, v, scale=self.scale)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attention_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
        grid: Sequence[int] | None = None,
    ) -> Tensor:
        """Queries (batch, heads, N | H, W, head_dim) attend to the summaries k, v (batch, heads, M | H', W', head_dim)."""
        q4, k4, v4 = (_flat_positions(name, t) for name, t in (("q", q), ("k", k), ("v", v)))
        if grid is not None and math.prod(grid) != q4.shape[2]:  # the keys are given: the grid only names q's layout
            raise ShapeError(f"grid: expected {q4.shape[2]} positions (as q), got {tuple(grid)}")
        out = super().attend(q4, k4, v4, attention_mask=attention_mask, attn_mask=attn_mask, impl=impl)
        return out.reshape(*q.shape[:-1], v.shape[-1])

    def _check_cells(self, name: str, grid: Sequence[int]) -> None:
        s = self.sr_ratio
        if grid[0] % s or grid[1] % s:
            raise ShapeError(
                f"{name}: the grid {tuple(grid)} is not a multiple of sr_ratio={s} on both axes (each summary covers an "
                f"{s}×{s} cell; expected H, W divisible by {s})"
            )

    def key_count(self, grid: Sequence[int]) -> int:
        """(H/s)·(W/s): one summary per s×s cell of the grid (H, W), both multiples of s."""
        check_grid_shape("grid", grid, (2,), ShapeError)
        self._check_cells("grid", grid)
        return (grid[0] // self.sr_ratio) * (grid[1] // self.sr_ratio)

    def summarize(self, x: Tensor) -> Tensor:
        """The summaries (batch, H/s, W/s, dim) of x (batch, H, W, dim): LayerNorm(Conv_{s×s, stride s}(x))."""
        check_tokens("x", x, self.dim, grid_rank=2)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        self._check_cells("x", tuple(x.shape[1:3]))
        if self.sr is None or self.norm is None:
            return x
        return self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def _split(self, t: Tensor) -> Tensor:
        """(batch, *grid, heads·head_dim) -> (batch, heads, *grid, head_dim)."""
        return t.unflatten(-1, (self.heads, self.head_dim)).movedim(-2, 1)

    def key_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The summaries' keys and values (batch, heads, N/s², head_dim) each, raster order of the (H/s, W/s) grid."""
        summaries = self.summarize(x)
        k, v = (self._split(p(summaries)).flatten(2, 3) for p in (self.k_proj, self.v_proj))
        return k, v

    def _heads(self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None,
               attn_mask: Tensor | None, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q (batch, heads, H, W, d) from the tokens, k, v (batch, heads, N/s², d) from the summaries."""
        if context is not None:
            raise ValueError("context: twins-gsa does not support cross-attention (its keys are summaries of x)")
        refuse_masks("twins-gsa", attention_mask, attn_mask, "its keys are summaries of s×s cells, not tokens",
                     key_padding_mask)
        k, v = self.key_values(x)
        return self._split(self.q_proj(x)), k, v

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
        """x (batch, H, W, dim) -> the same shape."""
        q, k, v = self._heads(x, context, attention_mask, attn_mask, key_padding_mask)
        out = self.attend(q, k, v, impl=impl)
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
        """The softmax weights (batch, heads, N, N/s²) of every token over the summaries of `key_values(x)`,
        both in raster order; the core output is these weights times the summaries' values."""
        q, k, v = self._heads(x, context, attention_mask, attn_mask, key_padding_mask)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, None)[1]
