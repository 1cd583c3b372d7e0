"""What the claims measure with: FLOPs counted from the operations a module runs, pinned wall times, log-log fits.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the call itself (matrix products: 2 FLOPs per
multiply-add; element-wise work is not counted), so a count is what the code does, not what its entry declares.
torch's counter has no formula for the CPU kernel of `scaled_dot_product_attention`; it is given one here
(QKᵀ and AV: 2·n_q·n_k·(d + d_v) per batch and head), so a dense core is not counted as free. Work done outside
torch's operators (a compiled loop) is not seen: a count of 0 is refused.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """The least-squares slope b of log y = a + b·log x (the growth exponent)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x, y: expected two or more pairs, got {len(x)} x and {len(y)} y")
    if min(x) <= 0 or min(y) <= 0:
        raise ValueError(f"x, y: expected positive values for a log-log fit, got x={list(x)}, y={list(y)}")
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    return float(np.polyfit(lx, ly, 1)[0])


def cpu_sdpa_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], *args: object,
                   **kwargs: object) -> int:
    """FLOPs of the CPU attention kernel on q (..., n_q, d), k (..., n_k, d), v (..., n_k, d_v): QKᵀ and AV."""
    *lead, n_q, d = q_shape
    n_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * math.prod(lead) * n_q * n_k * (d + d_v)


def counted_flops(call: Callable[[], object]) -> int:
    """FLOPs of the matrix products `call()` runs (no autograd); ValueError when none are seen."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops})
    with torch.no_grad(), counter:
        call()
    total = int(counter.get_total_flops())
    if total <= 0:
        raise ValueError("call: expected matrix products torch can count, got none (a compiled loop?)")
    return total


def core_flops(module: nn.Module, x: Tensor, *, impl: str = "fast", grid: Sequence[int] | None = None) -> int:
    """FLOPs of the attention core alone: q, k, v projected from tokens x (batch, N, dim) outside the count, then
    `module.attend(q, k, v)` (a grid module: on `grid`, N its product)."""
    with torch.no_grad():
        q, k, v = module.project(x)  # type: ignore[operator]
    extra = {} if grid is None else {"grid": tuple(grid)}
    return counted_flops(lambda: module.attend(q, k, v, impl=impl, **extra))  # type: ignore[operator]


def forward_flops(module: nn.Module, x: Tensor) -> int:
    """FLOPs of the whole forward pass (projections included)."""
    return counted_flops(lambda: module(x))


def median_times(calls: Sequence[Callable[[], object]], *, repeats: int, threads: int = 1) -> list[float]:
    """Median wall time (s) of each call, on `threads` torch threads, the calls interleaved round by round
    (one untimed warm-up round first), so that a slow spell of the machine hits every call alike."""
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times: list[list[float]] = [[] for _ in calls]
        with torch.no_grad():
            for call in calls:
                call()
            for _ in range(repeats):
                for i, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return [float(np.median(t)) for t in times]


def log10_floor(value: float, floor: float = 1e-300) -> float:
    """log10 of `value`, values below `floor` (an exact 0 included) counted as `floor`."""
    return math.log10(max(float(value), floor))
