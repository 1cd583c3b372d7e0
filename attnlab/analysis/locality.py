"""Locality of attention maps: the attention mass as a function of the distance from the query (P012, ΔConvFusion).

For a map A (…, n_q, n_k) over positions p (a sequence, or a grid in raster order), the mass of query i at
distance δ is

    mass[…, i, δ] = Σ_{j : dist(p_i, p_j) = δ} A[…, i, j]

over the distinct distances δ of the grid, sorted. Each row of the curve sums to its row of A (1 for a
softmax map); the mean over queries is the paper's locality curve (attention mass decaying with distance in
pre-trained diffusion models, the motivation of replacing attention by convolutions). The maps can come from
`materialize` of any mechanism or from `capture`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.errors import DTypeError, ParameterError, ShapeError
from ..core.registry import Param, Spec, add
from ..core.validate import check_choice, check_ints, check_tensor
from ..mechanisms.mixers.delta_conv_fusion import DELTA_CONV_FUSION

METRICS = ("euclidean", "chebyshev", "manhattan")


def attention_mass_by_distance(
    weights: Tensor, grid: Sequence[int] | None = None, *, metric: str = "euclidean"
) -> tuple[Tensor, Tensor]:
    """(distances (D,), mass (…, n_q, D)): each query's attention mass at each distinct distance from it.

    weights (…, n, n) over n positions: a sequence (grid None: dist = |i − j|) or a grid of that many cells in
    raster order (grid (H, W, …)); metric "euclidean", "chebyshev" (max over axes) or "manhattan"."""
    check_tensor("weights", weights)
    check_choice("metric", metric, METRICS)
    if not weights.is_floating_point():
        raise DTypeError(f"weights: expected a floating-point tensor, got {weights.dtype}")
    if weights.dim() < 2 or weights.shape[-1] != weights.shape[-2]:
        raise ShapeError(f"weights: expected (..., n, n) self-attention maps, got shape {tuple(weights.shape)}")
    n = weights.shape[-1]
    if n == 0:
        raise ShapeError("weights: expected at least one position, got n = 0")
    if grid is None:
        sizes: tuple[int, ...] = (n,)
    elif not isinstance(grid, (tuple, list)):
        raise ParameterError(f"grid: expected a tuple of ints (H, W, ...) or None, got {grid!r}")
    else:
        sizes = check_ints("grid", grid, len(grid))
        if int(torch.tensor(sizes).prod()) != n:
            raise ShapeError(f"grid: expected sizes whose product is the {n} positions of weights, got {sizes}")
    axes = torch.meshgrid(*(torch.arange(s, device=weights.device) for s in sizes), indexing="ij")
    coords = torch.stack([a.reshape(-1) for a in axes], dim=-1).to(torch.float64)  # (n, rank)
    diff = (coords[:, None] - coords[None]).abs()
    dist = {"euclidean": diff.pow(2).sum(-1).sqrt(), "chebyshev": diff.amax(-1), "manhattan": diff.sum(-1)}[metric]
    distances, index = torch.unique(dist.round(decimals=9), sorted=True, return_inverse=True)  # index (n, n)
    mass = torch.zeros(*weights.shape[:-1], distances.numel(), dtype=weights.dtype, device=weights.device)
    mass.scatter_add_(-1, index.expand(*weights.shape[:-2], n, n), weights)
    return distances.to(weights.dtype), mass


add(Spec(
    name="attention-mass-by-distance", kind="analysis", paper=DELTA_CONV_FUSION, factory=attention_mass_by_distance,
    family="E", summary="attention mass per query at each distance from it (locality curve; P012 ΔConvFusion)",
    params=(
        Param("weights", Tensor, doc="maps (..., n, n), e.g. a mechanism's materialize"),
        Param("grid", tuple, None, "the grid (H, W, ...) of the n positions in raster order; None: a sequence",
              optional=True),
        Param("metric", str, "euclidean", "distance between positions", choices=METRICS),
    ),
))
