"""NATTEN's neighborhood as a rule on indices, shared by the natten and flex adapters.

`neighborhood_keep` says which keys a query sees (NATTEN's clamped windows per axis, with
dilation and causal); FlexAttention's neighborhood mask_mod is that rule, and the tests
check NATTEN against it. `neighborhood_args` reads (grid, kernel, dilation) from a
configuration, `neighborhood_unsupported` says why one is not mapped.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...core.errors import ParameterError


def neighborhood_axis_keep(q: Tensor, k: Tensor, length: int, kernel: int, dilation: int, causal: bool) -> Tensor:
    """Whether key coordinate k is in the neighborhood of query coordinate q on one axis, as NATTEN defines it.

    Positions split into `dilation` groups by their residue; within a group (coordinates
    c = position // dilation, group length L) a non-causal query at c sees the `kernel`
    keys around c, the window shifted (clamped) to stay inside the group: centre
    clamp(c, ⌊kernel/2⌋, L − 1 − right), left ⌊kernel/2⌋, right ⌊kernel/2⌋ (odd kernel) or
    ⌊kernel/2⌋ − 1 (even). A causal query sees the group's keys c − kernel < c_k ≤ c: its
    window is not shifted, so the first queries see fewer keys. Works elementwise on
    tensors (FlexAttention's mask_mod calls it with 0-d tensors).
    """
    same_group = (q % dilation) == (k % dilation)
    qc, kc = q // dilation, k // dilation
    if causal:
        return same_group & (kc <= qc) & (qc - kc < kernel)
    group_length = (length - q % dilation + dilation - 1) // dilation
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1
    centre = torch.minimum(torch.clamp(qc, min=left), group_length - 1 - right)
    return same_group & (kc >= centre - left) & (kc <= centre + right)


def neighborhood_keep(
    q_idx: Tensor, k_idx: Tensor, grid: Sequence[int], kernel: Sequence[int], dilation: Sequence[int], causal: bool
) -> Tensor:
    """NATTEN's neighborhood on a row-major grid, for flat query and key indices (elementwise)."""
    keep: Tensor | None = None
    stride = math.prod(grid)
    for axis, length in enumerate(grid):
        stride //= length
        qa, ka = (q_idx // stride) % length, (k_idx // stride) % length
        axis_keep = neighborhood_axis_keep(qa, ka, length, kernel[axis], dilation[axis], causal)
        keep = axis_keep if keep is None else keep & axis_keep
    assert keep is not None
    return keep


def _axes(value: Any, rank: int, name: str) -> tuple[int, ...]:
    """An int or per-axis sequence as a tuple of `rank` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ParameterError(f"{name}: expected {rank} values (one per grid axis), got {list(value)}")
        return tuple(int(x) for x in value)
    return (int(value),) * rank


def _grid_or_line(config: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(config["grid"]) if config.get("grid") else (config["n"],)


def neighborhood_args(config: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(grid, kernel per axis, dilation per axis) of a neighborhood configuration."""
    grid = _grid_or_line(config)
    params = config["params"]
    if "kernel_size" not in params:
        raise ParameterError(f"neighborhood: params expected a 'kernel_size', got {sorted(params)}")
    kernel = _axes(params["kernel_size"], len(grid), "kernel_size")
    dilation = _axes(params.get("dilation") or 1, len(grid), "dilation")
    return grid, kernel, dilation


def neighborhood_unsupported(config: Mapping[str, Any]) -> str | None:
    try:
        grid, kernel, dilation = neighborhood_args(config)
    except ParameterError as err:
        return str(err)
    if len(grid) > 2:
        return f"neighborhood on a {len(grid)}-D grid is not mapped (1-D and 2-D are)"
    for axis, (length, ks, d) in enumerate(zip(grid, kernel, dilation)):
        if ks < 1 or d < 1 or ks * d > length:
            return f"axis {axis}: kernel_size {ks} × dilation {d} must be within 1..{length} (the axis length)"
    extra = sorted(k for k, v in config["params"].items() if k not in ("kernel_size", "dilation") and v not in (None, False))
    if extra:
        return f"neighborhood parameters {extra} have no counterpart here (mapped: kernel_size, dilation, causal)"
    return None
