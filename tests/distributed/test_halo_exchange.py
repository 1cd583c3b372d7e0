"""Halo exchange (attnlab.distributed.halo) on real gloo processes: neighborhood 1-/2-/3-D and sliding-window,
causal and not, uneven splits (ranks without tokens, ranks smaller than the halo), forward and gradients w.r.t.
the inputs and the parameters against the single-process module; a halo one token short must be caught.

Two spawns (world 2 and world 4) run every case each; the parametrised tests read their results. The spawned
processes run neighborhood on its PyTorch tiles (the numba loops would be compiled, or their cache loaded, in
every process); the halo logic is the same for both engines, which tests/ compare with the reference."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.distributed import Partition, shard
from attnlab.distributed import halo as halo_module
from attnlab.distributed.halo import halo_attention, halo_plan, key_range, neighborhood_range, sliding_window_range
from attnlab.kernels import compiled
from attnlab.testing_distributed import run_ranks

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DIM, HEADS, BATCH = 8, 2, 2

# name -> (mechanism, params, sizes per rank (positions of axis 1), trailing grid axes, dtype, padding mask)
CASES_2: dict[str, tuple[str, dict[str, Any], tuple[int, ...], tuple[int, ...], torch.dtype, bool]] = {
    "window-small-rank": ("sliding-window", {"radius": 3, "block_size": 2}, (2, 9), (), torch.float64, True),
    "window-causal": ("sliding-window", {"radius": 3, "causal": True}, (7, 4), (), torch.float64, False),
    "nbhd1-border": ("neighborhood", {"kernel_size": 7}, (3, 9), (), torch.float64, False),
    "nbhd1-causal": ("neighborhood", {"kernel_size": 4, "causal": True}, (2, 8), (), torch.float64, True),
    "nbhd2-bias": ("neighborhood", {"kernel_size": (5, 3), "rel_pos_bias": True}, (1, 6), (5,), torch.float64, False),
}
CASES_4 = {
    "window-empty-rank": ("sliding-window", {"radius": 3, "block_size": 4}, (5, 1, 0, 6), (), torch.float64, True),
    "window-causal-4": ("sliding-window", {"radius": 4, "causal": True}, (1, 2, 6, 3), (), torch.float64, False),
    "nbhd1-two-owners": ("neighborhood", {"kernel_size": 7}, (5, 1, 0, 6), (), torch.float64, True),
    "nbhd1-causal-4": ("neighborhood", {"kernel_size": 5, "causal": True}, (2, 1, 4, 3), (), torch.float64, False),
    "nbhd2-dilated-cols": ("neighborhood", {"kernel_size": (3, 3), "dilation": (1, 2), "rel_pos_bias": True},
                           (3, 0, 1, 4), (6,), torch.float64, False),
    "nbhd2-causal": ("neighborhood", {"kernel_size": (3, 3), "causal": True}, (2, 2, 1, 3), (4,), torch.float64, True),
    "nbhd3": ("neighborhood", {"kernel_size": 3}, (2, 1, 2, 1), (3, 3), torch.float64, False),
    "window-float32": ("sliding-window", {"radius": 2}, (3, 3, 2, 4), (), torch.float32, False),
    "nbhd2-float32": ("neighborhood", {"kernel_size": (3, 3)}, (1, 3, 2, 1), (5,), torch.float32, True),
}
# the planted bug: rank 1's left halo one token short (rank 0 sends one token fewer), planned alike on both sides
BUG_CASES = {
    "bug-window": ("sliding-window", {"radius": 3}, (6, 5), (), torch.float64, False),
    "bug-nbhd1": ("neighborhood", {"kernel_size": 5}, (6, 5), (), torch.float64, False),
}


def _errors(rank: int, case: tuple) -> tuple[float, float, float]:
    """Max |sharded − unsharded| of the output, d/dx and d/dparameters (summed over the ranks) on this rank."""
    mechanism, params, sizes, rest, dtype, masked = case
    torch.manual_seed(0)
    module = attnlab.build(mechanism, dim=DIM, heads=HEADS, **params).to(dtype)
    partition = Partition(sizes)
    x = torch.randn(BATCH, partition.total, *rest, DIM, dtype=dtype)
    grad_out = torch.randn_like(x)
    mask = torch.rand(BATCH, partition.total, *rest) > 0.3 if masked else None

    x_full = x.clone().requires_grad_()
    y_full = module(x_full, attention_mask=mask)
    (y_full * grad_out).sum().backward()
    want_params = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()

    x_local = partition.local(x, rank).clone().requires_grad_()
    kwargs = {} if mask is None else {"attention_mask": partition.local(mask, rank)}
    y_local = shard(module, strategy="halo")(x_local, **kwargs)  # the sizes gathered from the ranks
    (y_local * partition.local(grad_out, rank)).sum().backward()
    got_params = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]
    for g in got_params:
        dist.all_reduce(g)
    out_err = _max_diff(y_local, partition.local(y_full.detach(), rank))
    dx_err = _max_diff(x_local.grad, partition.local(x_full.grad, rank))
    return out_err, dx_err, max(_max_diff(g, w) for g, w in zip(got_params, want_params))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _short_left_halo(real: Any) -> Any:
    def key_ranges(keys: Any, partition: Partition) -> list[tuple[int, int]]:
        ranges = real(keys, partition)
        start, stop = ranges[1]
        if start < partition.bounds(1)[0]:
            ranges[1] = (start + 1, stop)
        return ranges

    return key_ranges


def _run_cases(rank: int, world: int, cases: dict, bug_cases: dict) -> dict[str, tuple[float, float, float]]:
    compiled.serves = lambda *tensors: False  # neighborhood on its PyTorch tiles: no numba compilation per process
    results = {name: _errors(rank, case) for name, case in cases.items()}
    real = halo_module.key_ranges
    halo_module.key_ranges = _short_left_halo(real)
    try:
        results.update({name: _errors(rank, case) for name, case in bug_cases.items()})
    finally:
        halo_module.key_ranges = real
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[float, float, float]]:
    merged: dict[str, tuple[float, float, float]] = {}
    for world, cases, bugs in ((2, CASES_2, BUG_CASES), (4, CASES_4, {})):
        per_rank = run_ranks(_run_cases, world, args=(cases, bugs), timeout=600)
        for name in per_rank[0]:
            merged[name] = tuple(max(r[name][i] for r in per_rank) for i in range(3))  # type: ignore[assignment]
    return merged


@pytest.mark.parametrize("name", [*CASES_2, *CASES_4])
def test_sharded_output_and_gradients_equal_the_unsharded_module(results, name):
    dtype = {**CASES_2, **CASES_4}[name][4]
    out_err, dx_err, dp_err = results[name]
    assert out_err < TOL[dtype], f"output off by {out_err:.3g}"
    assert dx_err < TOL[dtype], f"d/dx off by {dx_err:.3g}"
    assert dp_err < TOL[dtype], f"d/dparameters off by {dp_err:.3g}"


@pytest.mark.parametrize("name", list(BUG_CASES))
def test_a_halo_one_token_short_is_caught(results, name):
    out_err, dx_err, _ = results[name]
    assert out_err > 1e-3 and dx_err > 1e-3, (out_err, dx_err)


def test_key_ranges_follow_the_global_borders():
    window = sliding_window_range(radius=3, causal=False, total=12)
    assert window(0, 5) == (0, 8) and window(5, 6) == (2, 9) and window(6, 12) == (3, 12)
    assert sliding_window_range(radius=3, causal=True, total=12)(6, 12) == (3, 12)
    nbhd = neighborhood_range(kernel=7, dilation=1, causal=False, total=12)  # w(i) = clamp(i − 3, 0, 5)
    assert nbhd(0, 2) == (0, 7)  # next to the left border the window is shifted: k − 1 keys to the right
    assert nbhd(5, 6) == (2, 9) and nbhd(10, 12) == (5, 12)
    assert neighborhood_range(kernel=4, dilation=1, causal=True, total=12)(5, 8) == (2, 8)


def test_only_ranks_within_reach_exchange_messages():
    keys = sliding_window_range(radius=2, causal=False, total=16)
    plans = [halo_plan(keys, Partition((4, 4, 4, 4)), r) for r in range(4)]
    assert plans[1].receives == ((0, 2, 4), (2, 8, 10)) and plans[1].sends == ((0, 4, 6), (2, 6, 8))
    assert plans[0].receives == ((1, 4, 6),) and plans[3].sends == ((2, 12, 14),)
    small = [halo_plan(keys, Partition((6, 1, 0, 9)), r) for r in range(4)]  # rank 1 smaller than the halo
    assert small[3].receives == ((0, 5, 6), (1, 6, 7)) and small[2].receives == () and small[2].sends == ()
    causal = halo_plan(sliding_window_range(radius=2, causal=True, total=16), Partition((4, 4, 4, 4)), 1)
    assert causal.receives == ((0, 2, 4),) and causal.sends == ((2, 6, 8),)


def test_a_dilated_sharded_axis_and_a_kernel_longer_than_it_are_refused():
    with pytest.raises(ParameterError, match="dilation: halo exchange splits the first grid axis.*got 2"):
        key_range(attnlab.build("neighborhood", dim=8, heads=2, kernel_size=(3, 3), dilation=(2, 1)), 2, 12)
    with pytest.raises(ShapeError, match="kernel_size: kernel_size=7 exceeds the length 5"):
        key_range(attnlab.build("neighborhood", dim=8, heads=2, kernel_size=7), 1, 5)
    with pytest.raises(ShapeError, match="x_local: sliding-window takes a sequence"):
        key_range(attnlab.build("sliding-window", dim=8, heads=2, radius=2), 2, 12)


def test_unknown_keywords_and_sequence_first_modules_are_refused():
    x = torch.zeros(1, 4, 8)
    with pytest.raises(ParameterError, match="kwargs: halo exchange takes attention_mask or key_padding_mask, got impl"):
        halo_attention(attnlab.build("sliding-window", dim=8, heads=2, radius=1), x, Partition((4,)), None, impl="fast")
    seq_first = attnlab.build("sliding-window", dim=8, heads=2, radius=1)
    seq_first.batch_first = False  # (n, batch, dim) in and out, as nn.MultiheadAttention
    with pytest.raises(ParameterError, match="module: halo exchange takes batch-first tokens"):
        halo_attention(seq_first, x, Partition((4,)), None)
