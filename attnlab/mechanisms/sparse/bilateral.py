"""Bilateral local attention (BOAT, Yu et al., 2022): image-space window attention plus
feature-space local attention inside balanced clusters of tokens.

On an H × W grid of N tokens, per head:

* image-space local attention (ISLA): full softmax attention inside non-overlapping
  wh × ww windows (Swin's W-MSA without the shift);
* feature-space local attention (FSLA): the tokens are grouped by their query features
  into N/m clusters of exactly m tokens by balanced hierarchical clustering, and full
  softmax attention runs inside each cluster.

The window side is `tile_size` = (wh, ww) or one int (was `window`): Swin's and BOAT's "window
size" is the side of a cell of a fixed partition of the grid, which attnlab calls a tile (twins-lsa,
proxy-token), keeping "window" words for bands that move with the query (sliding-window's
`radius`, based's `window_size`: the count of keys a query sees, as Longformer and Mistral).
Passing `window=` raises an error naming `tile_size`.

Balanced hierarchical clustering, as the paper: every group of s tokens is split into two
halves of s/2 — two centroids start as the normalised means of the group's first and second
half, two steps of soft 2-means refine them (assignment softmax(100 · cos(x, c)), centroid
= normalised Σ assignment · x), then the tokens are sorted by (1 + cos(x, c₁))/(1 + cos(x, c₂))
and cut in the middle — repeated log₂(N/m) times, so N must be m·2^L.

Combination: `branches="both"` averages the two branches on shared q, k, v,
out = ½(A_img + A_feat) v, a row-stochastic matrix. The paper stacks them as two residual
sub-layers with their own projections (x ← x + ISLA(LN x); x ← x + FSLA(LN x)); build that
from two modules with `branches="image"` and `branches="feature"`. The authors' code also
lets each cluster's keys reach 20 tokens of its sibling cluster and adds a depth-wise
convolution of v (LePE); neither is part of this operator.

Autograd: the clustering (soft 2-means and the sort) is computed without gradient; the
assignment is not differentiated, gradients flow through the scores and values inside the
chosen clusters, i.e. they equal those of the dense masked attention with the clusters held
fixed.

Fast path: windows by reshape, clusters by gather; one SDPA call per branch over all
windows/clusters, the clusters scattered back: O(N·(w + m)·d) time and memory, with
O(N·d·log(N/m)) for the clustering.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import MaskError, ShapeError
from ...core.module import Impl
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register, renamed_keywords
from ...core.validate import check_choice, check_int, check_pair, check_scale, check_tensor
from ...kernels.grid import check_grid_qkv, refuse_masks
from ..local.base import GridAttention, grid_shape_param

BOAT = Paper("P208", "BOAT: Bilateral Local Attention Vision Transformer", 2022, "2201.13027")
KMEANS_STEPS = 2  # soft 2-means refinements per split, as the authors' code
SHARPNESS = 100.0  # temperature of the soft assignment softmax(SHARPNESS · cos)
BRANCHES = ("both", "image", "feature")
RENAMED = {"window": "tile_size (the (wh, ww) side of the image-space windows the grid is tiled into)"}
WHY_NO_MASK = "its windows and feature-space clusters partition every token of the grid"


def _check_cluster_size(n: int, cluster_size: int) -> int:
    """The number of levels L with n = cluster_size · 2^L, else a ValueError naming both."""
    check_int("cluster_size", cluster_size)
    groups = n // cluster_size
    if cluster_size > n or n % cluster_size or groups & (groups - 1):
        raise ShapeError(
            f"cluster_size: balanced halving needs N = cluster_size · 2^L tokens, got N={n} and cluster_size={cluster_size}"
        )
    return groups.bit_length() - 1


def _check_tile(grid: tuple[int, int], tile_size: tuple[int, int]) -> None:
    if tile_size[0] > grid[0] or tile_size[1] > grid[1]:
        raise ShapeError(f"tile_size: {tile_size} is larger than the grid {grid}")
    if grid[0] % tile_size[0] or grid[1] % tile_size[1]:
        raise ShapeError(
            f"tile_size: {tile_size} does not tile the grid {grid} (each grid axis must be a multiple of the tile)"
        )


@torch.no_grad()
def balanced_clusters(x: Tensor, cluster_size: int) -> Tensor:
    """Balanced hierarchical clustering of features x (..., N, d) into N/m clusters of m = cluster_size:
    (..., N/m, m) int64 positions, the clusters in the order of the binary tree. No gradient.

    Computed in float64 for float64 input, else float32. With two centroids the soft assignment
    softmax(100·cos) is σ(100·(cos₁ − cos₂)), and the second centroid is Σx − the first's sum.
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ShapeError(f"x: expected features (..., N, d), got shape {tuple(x.shape)}")
    *lead, n, d = x.shape
    levels = _check_cluster_size(n, cluster_size)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    feats = x.detach().to(work).reshape(-1, n, d)
    b = feats.shape[0]
    tables = feats.reshape(b * n, d), F.normalize(feats, dim=-1).reshape(b * n, d)  # rows x and x/‖x‖
    base = torch.arange(b, device=x.device)[:, None] * n
    rows = base + torch.arange(n, device=x.device)  # (b, n): the current order, as rows of the tables
    for level in range(levels):
        groups = 2**level
        size = n // groups
        f, unit = (t.index_select(0, rows.reshape(-1)).view(b, groups, size, d) for t in tables)
        total = f.sum(2)
        first = f[:, :, : size // 2].sum(2)  # centroids start at the means of the two halves
        c1, c2 = F.normalize(first, dim=-1), F.normalize(total - first, dim=-1)
        for _ in range(KMEANS_STEPS):
            a1 = torch.sigmoid(SHARPNESS * (unit @ (c1 - c2)[..., None]))  # (b, g, s, 1)
            s1 = (a1.transpose(-1, -2) @ f).squeeze(-2)
            c1, c2 = F.normalize(s1, dim=-1), F.normalize(total - s1, dim=-1)
        cos = unit @ torch.stack([c1, c2], -1)  # (b, g, s, 2)
        order = ((1 + cos[..., 0]) / (1 + cos[..., 1]).clamp(min=1e-12)).argsort(dim=-1, stable=True)
        rows = rows.view(b, groups, size).gather(-1, order).view(b, n)
    return (rows - base).reshape(*lead, n // cluster_size, cluster_size)


def _check(
    q: Tensor, k: Tensor, v: Tensor, tile_size: int | Sequence[int], cluster_size: int, branches: str,
    clusters: Tensor | None, scale: float | None,
) -> tuple[tuple[int, int], float]:
    check_grid_qkv(q, k, v)
    check_choice("branches", branches, BRANCHES)
    grid = (q.shape[2], q.shape[3])
    win = check_pair("tile_size", tile_size)
    if branches != "feature":
        _check_tile(grid, win)
    n = grid[0] * grid[1]
    if branches != "image":
        _check_cluster_size(n, cluster_size)
        if clusters is not None:
            want = (q.shape[0], q.shape[1], n // cluster_size, cluster_size)
            check_tensor("clusters", clusters)
            if clusters.dtype != torch.int64 or tuple(clusters.shape) != want:
                raise MaskError(f"clusters: expected int64 of shape {want}, got {clusters.dtype} {tuple(clusters.shape)}")
            positions = clusters.reshape(*want[:2], n).sort(-1).values
            if not bool((positions == torch.arange(n, device=q.device)).all()):
                raise MaskError(f"clusters: expected every position 0 … {n - 1} in exactly one cluster")
    return win, check_scale(scale, q.shape[-1])


def _window_branch(q: Tensor, k: Tensor, v: Tensor, win: tuple[int, int], scale: float) -> Tensor:
    b, h, hh, ww = q.shape[:4]
    wh, wv = win

    def part(t: Tensor) -> Tensor:
        t = t.reshape(b, h, hh // wh, wh, ww // wv, wv, t.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(b, h * (hh // wh) * (ww // wv), wh * wv, t.shape[-1])

    out = F.scaled_dot_product_attention(part(q), part(k), part(v), scale=scale)
    out = out.reshape(b, h, hh // wh, ww // wv, wh, wv, v.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(b, h, hh * ww, v.shape[-1])


def _cluster_branch(q: Tensor, k: Tensor, v: Tensor, clusters: Tensor, scale: float) -> Tensor:
    b, h, n_c, m = clusters.shape
    n = n_c * m
    rows = (torch.arange(b * h, device=q.device).view(b, h, 1, 1) * n + clusters).reshape(-1)

    def gather(t: Tensor) -> Tensor:
        return t.reshape(b * h * n, t.shape[-1]).index_select(0, rows).view(b, h * n_c, m, t.shape[-1])

    out = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), scale=scale)
    dv = v.shape[-1]
    return out.new_zeros(b * h * n, dv).index_copy(0, rows, out.reshape(-1, dv)).view(b, h, n, dv)


@renamed_keywords("bilateral_attention", RENAMED)
def bilateral_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_size: int | Sequence[int] = 8,
    cluster_size: int = 64,
    branches: str = "both",
    clusters: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Bilateral local attention of q, k, v (batch, heads, H, W, head_dim) -> (batch, heads, H, W, d_v).

    `clusters` (batch, heads, N/m, m): a given feature-space assignment; default: the balanced
    hierarchical clustering of q. `branches`: "both" (the mean of the two), "image" or "feature".
    """
    win, scale = _check(q, k, v, tile_size, cluster_size, branches, clusters, scale)
    b, h, hh, ww, _ = q.shape
    n = hh * ww
    flat = [t.reshape(b, h, n, t.shape[-1]) for t in (q, k, v)]
    parts = []
    if branches != "feature":
        parts.append(_window_branch(q, k, v, win, scale))
    if branches != "image":
        idx = balanced_clusters(flat[0], cluster_size) if clusters is None else clusters
        parts.append(_cluster_branch(*flat, idx, scale))
    out = parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])
    return out.reshape(b, h, hh, ww, v.shape[-1])


def window_ids(grid: tuple[int, int], tile_size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(N,) the window (tile) of each raster position."""
    r = torch.arange(grid[0], device=device)[:, None] // tile_size[0]
    c = torch.arange(grid[1], device=device)[None, :] // tile_size[1]
    return (r * (grid[1] // tile_size[1]) + c).reshape(-1)


@renamed_keywords("bilateral_attention_reference", RENAMED)
def bilateral_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_size: int | Sequence[int] = 8,
    cluster_size: int = 64,
    branches: str = "both",
    clusters: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out (batch, heads, H, W, d_v), weights (batch, heads, N, N)) in float64: one dense masked
    softmax per branch (same window / same cluster), averaged when both run; out = A v."""
    win, scale = _check(q, k, v, tile_size, cluster_size, branches, clusters, scale)
    b, h, hh, ww, _ = q.shape
    n = hh * ww
    q64, k64, v64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) * scale
    mats = []
    if branches != "feature":
        wid = window_ids((hh, ww), win, q.device)
        mats.append(masked_softmax(scores, (wid[:, None] == wid[None, :])[None, None]))
    if branches != "image":
        idx = balanced_clusters(q.reshape(b, h, n, q.shape[-1]), cluster_size) if clusters is None else clusters
        cid = torch.empty(b, h, n, dtype=torch.int64, device=q.device)
        cid.scatter_(-1, idx.reshape(b, h, n), torch.arange(idx.shape[2], device=q.device).repeat_interleave(cluster_size).expand(b, h, n))
        mats.append(masked_softmax(scores, cid[..., :, None] == cid[..., None, :]))
    weights = mats[0] if len(mats) == 1 else 0.5 * (mats[0] + mats[1])
    out = (weights @ v64).reshape(b, h, hh, ww, v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


def _bilateral_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """q·k and A·v in 8 × 8 windows and clusters of 64: 4·N·(64 + 64)·d per head."""
    return 4.0 * heads * head_dim * n * 128


@register(
    name="bilateral",
    paper=BOAT,
    family="A",
    cost="O(N (w + m) d + N d log(N/m))",
    exponent=1.0,
    supports=Supports(grids=(2,), materialize=True),
    params=(
        Param("tile_size", (int, tuple), 8, "image-space window (tile) (wh, ww) or one int; must tile the grid "
              "(the paper: 7)", low=1),
        Param("cluster_size", int, 64, "tokens m per feature-space cluster; N must be m·2^L (the paper: 49)", low=1),
        Param("branches", str, "both", "'both' (mean of the two branches), 'image' (windows) or 'feature' (clusters)",
              choices=BRANCHES),
        grid_shape_param(),
    ),
    summary=(
        "BOAT bilateral local attention: window attention plus attention inside balanced hierarchical feature-space "
        "clusters of the queries, averaged. The clustering is not differentiated: gradients flow through the "
        "selected scores only."
    ),
    test_params={"tile_size": 2, "cluster_size": 4, "grid_shape": (4, 4)},
    renamed=RENAMED,
    test_positions=(4, 4),
    flops=_bilateral_flops,
)
class BilateralAttention(GridAttention):
    """Multi-head bilateral local attention on a 2-D grid of tokens (batch, H, W, dim).

    `attend(q, k, v)` takes (batch, heads, H, W, head_dim), or flat (batch, heads, N, head_dim)
    with `grid=(H, W)` (or the module's `grid_shape`), and answers in the same layout.
    `materialize` is (batch, heads, N, N) in raster order: ½(window softmax + cluster softmax).
    """

    mask_form = "none"
    mask_note = WHY_NO_MASK

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        tile_size: int | Sequence[int] = 8,
        cluster_size: int = 64,
        branches: str = "both",
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        win = check_pair("tile_size", tile_size)
        check_int("cluster_size", cluster_size)
        check_choice("branches", branches, BRANCHES)
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, grid_shape=grid_shape)
        self.tile_size, self.cluster_size, self.branches = win, cluster_size, branches

    def _options(self) -> dict[str, object]:
        return {"tile_size": self.tile_size, "cluster_size": self.cluster_size, "branches": self.branches,
                "scale": self.scale}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path on (batch, heads, H, W, head_dim); `mask` must be None (no masks are supported)."""
        return bilateral_attention(q, k, v, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return bilateral_attention_reference(q, k, v, **self._options())  # type: ignore[arg-type]

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
        refuse_masks("bilateral attention", attention_mask, attn_mask, WHY_NO_MASK, key_padding_mask)
        return super().forward(x, context=context, impl=impl)

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
        refuse_masks("bilateral attention", attention_mask, attn_mask, WHY_NO_MASK, key_padding_mask)
        return super().materialize(x, context=context)

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}, cluster_size={self.cluster_size}, branches={self.branches!r}"
