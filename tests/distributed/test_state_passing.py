"""State passing ("state" strategy): every served linear entry on real gloo ranks against the unsharded module.

Each spawned rank builds the same module (same seed), runs it unsharded on the whole sequence (the oracle)
and sharded on its own slice, and returns the largest differences of the outputs, of the gradients of the
inputs and of the parameters (summed over the ranks, as DistributedDataParallel does). Many cases per spawn.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.core.registry import get
from attnlab.distributed import Partition, shard, shardable
from attnlab.distributed import state_passing as sp
from attnlab.testing_distributed import run_ranks

DIM, HEADS, BATCH = 8, 2, 2
# (entry, build kwargs); every entry declaring "state" appears at least once, causal and (unless causal-only) not
CASES: tuple[tuple[str, dict], ...] = (
    ("linear", {}),
    ("delta", {}),
    ("retention", {}),
    ("gated-linear", {}),
    ("gated-linear", {"gate_source": "key"}),
    ("miras", {"bias": "l2", "retention": "scalar", "feature_map": "silu", "normalize": False}),
    ("miras", {"retention": "scalar"}),  # normalised, with a decay: z passed like the state
    ("miras", {"retention": "channel", "feature_map": "identity", "normalize": False}),
    ("mamba", {"d_state": 4, "d_conv": 3}),  # causal only
    ("galerkin", {}),  # 1/n with n the global count
    ("efficient", {}),  # softmax over the (prefix of the) sequence
    ("efficient", {"normalization": "scaling"}),
    ("focused-linear", {"kernel_size": 3}),  # DWC(V) over a halo of one token each side (causal: two before)
    ("based", {"feature_dim": 3, "window_size": 3}),  # the sliding window over a halo of 2 tokens
    ("miras-lp", {}),  # handed rank to rank, causal only
    ("miras-huber", {"delta": 0.3}),
)
SEQUENTIAL = ("miras-lp", "miras-huber")  # their bidirectional form is refused (test_refusals)


def _errors(rank: int, world: int, sizes: tuple[int, ...], cases: tuple[tuple[str, dict], ...], dtype_name: str,
            plant: bool, via_shard: bool = False) -> list[tuple[str, float, float, float]]:
    """(case, max |Δ output|, max |Δ input grad|, max |Δ parameter grad|) of this rank, for every case, both causal
    (unless causal-only); via_shard: through the public `shard(module)` (sizes gathered from the ranks)."""
    dtype = getattr(torch, dtype_name)
    if plant and rank == 0:  # the planted bug: rank 0 drops its last token from the state it passes on
        summary = sp._Direction.summary

        def dropped(self: sp._Direction) -> torch.Tensor:
            values, keep = self.values, torch.ones_like(self.values)
            keep[:, :, -1] = 0.0
            self.values = values * keep
            try:
                return summary(self)
            finally:
                self.values = values

        sp._Direction.summary = dropped  # type: ignore[method-assign]
    partition = Partition(sizes)
    out = []
    for name, kwargs in cases:
        for causal in (True, False):
            if not causal and (get(name).supports.causal_only or name in SEQUENTIAL):
                continue
            torch.manual_seed(0)
            chunked = {"chunk_size": 4} if any(p.name == "chunk_size" for p in get(name).params) else {}
            module = attnlab.build(name, dim=DIM, heads=HEADS, causal=causal, **chunked, **kwargs).to(dtype)
            x = torch.randn(BATCH, partition.total, DIM, dtype=dtype, requires_grad=True)
            weight = torch.randn(BATCH, partition.total, DIM, dtype=dtype)
            y = module(x)
            (y * weight).sum().backward()
            reference = {n: p.grad.clone() for n, p in module.named_parameters()}
            module.zero_grad()
            x_local = partition.local(x.detach(), rank).clone().requires_grad_(True)
            y_local = shard(module)(x_local) if via_shard else sp.state_passing(module, x_local, partition, None)
            (y_local * partition.local(weight, rank)).sum().backward()
            d_param = 0.0
            for n, p in module.named_parameters():
                grad = torch.zeros_like(p) if p.grad is None else p.grad  # None: unused by a rank with no token
                dist.all_reduce(grad)
                d_param = max(d_param, (grad - reference[n]).abs().max().item())
            d_out = (y_local - partition.local(y.detach(), rank)).abs().max().item() if y_local.numel() else 0.0
            d_in = ((x_local.grad - partition.local(x.grad, rank)).abs().max().item() if x_local.numel() else 0.0)
            out.append((f"{name}{kwargs} causal={causal}", d_out, d_in, d_param))
    return out


def _jobs(rank: int, world: int, jobs: list[tuple]) -> list[list[tuple[str, float, float, float]]]:
    """`_errors` for several (sizes, cases, dtype, plant[, via_shard]) in one spawn (the planted bug last: it patches the class)."""
    return [_errors(rank, world, *job) for job in jobs]


def _assert_close(results: list[list[tuple[str, float, float, float]]], tol: float) -> None:
    for rank, rows in enumerate(results):
        for case, d_out, d_in, d_param in rows:
            assert max(d_out, d_in, d_param) < tol, f"rank {rank} {case}: out {d_out:.2e} dx {d_in:.2e} dθ {d_param:.2e}"


PLANTED_CASES = (("retention", {}), ("delta", {}))
FLOAT32_CASES = (("delta", {}), ("linear", {}), ("gated-linear", {}), ("mamba", {"d_state": 4, "d_conv": 4}),
                 ("efficient", {}), ("miras-huber", {}))
# the convs of rank 2 read 3 tokens back: one of rank 1's and two of rank 0's (focused's also 3 ahead)
HALO_CASES = (("mamba", {"d_state": 3, "d_conv": 4}), ("focused-linear", {"kernel_size": 7}),
              ("based", {"feature_dim": 3, "window_size": 4}))


@pytest.fixture(scope="module")
def two_ranks() -> list[list[list[tuple[str, float, float, float]]]]:
    """Per job, per rank: the rows of `_errors` (2 gloo ranks, one spawn)."""
    jobs = [((5, 3), CASES, "float64", False), ((5, 3), PLANTED_CASES, "float64", True)]
    per_rank = run_ranks(_jobs, 2, args=(jobs,), timeout=600)
    return [[rows[j] for rows in per_rank] for j in range(len(jobs))]


@pytest.fixture(scope="module")
def four_ranks() -> list[list[list[tuple[str, float, float, float]]]]:
    """As `two_ranks` on 4 ranks: uneven sizes in float64, then float32 with a rank holding no token."""
    jobs = [((5, 3, 7, 1), CASES, "float64", False), ((6, 0, 5, 4), FLOAT32_CASES, "float32", False),
            ((2, 1, 6, 3), HALO_CASES, "float64", False, True),
            ((0, 5, 2, 4), (("miras-lp", {}), ("retention", {}), ("mamba", {"d_state": 2, "d_conv": 2})), "float64",
             False)]
    per_rank = run_ranks(_jobs, 4, args=(jobs,), timeout=600)
    return [[rows[j] for rows in per_rank] for j in range(len(jobs))]


def test_every_served_entry_is_declared_and_tested():
    declared = {name for name, strategies in shardable().items() if "state" in strategies}
    assert declared == {name for name, _ in CASES}


def test_sharded_equals_unsharded_float64_on_two_ranks(two_ranks):
    _assert_close(two_ranks[0], 1e-10)


def test_sharded_equals_unsharded_float64_on_four_uneven_ranks(four_ranks):
    _assert_close(four_ranks[0], 1e-10)


def test_float32_with_a_rank_holding_no_token(four_ranks):
    _assert_close(four_ranks[1], 1e-5)


def test_halos_across_two_ranks_through_shard(four_ranks):
    _assert_close(four_ranks[2], 1e-10)


def test_first_rank_holding_no_token(four_ranks):
    _assert_close(four_ranks[3], 1e-10)


def test_a_rank_dropping_its_last_token_from_the_passed_state_fails(two_ranks):
    results = two_ranks[1]
    with pytest.raises(AssertionError, match="rank 0"):
        _assert_close(results, 1e-10)  # the parameters' gradients, summed over the ranks, differ everywhere
    # the outputs of rank 1 read the state rank 0 passed: wrong in every case; rank 0's causal outputs are right
    assert all(d_out > 1e-3 for _, d_out, _, _ in results[1])
    assert all(d_out < 1e-10 for case, d_out, _, _ in results[0] if "causal=True" in case)


def test_refusals():
    with pytest.raises(ParameterError, match="causal: the bidirectional 'lp' memory reads the final memory"):
        sp._sequential_memory(attnlab.build("miras-lp", dim=DIM, heads=HEADS), torch.zeros(1, 3, DIM), 0, 1, None)
    with pytest.raises(ParameterError, match="module: state passing serves the linear family .* and Mamba"):
        sp._check(attnlab.build("softmax", dim=DIM, heads=HEADS), torch.zeros(1, 3, DIM), Partition((3,)), 0)
    with pytest.raises(ParameterError, match="module: state passing serves the linear family .* and Mamba"):
        sp._check(attnlab.build("memora", dim=DIM, heads=HEADS), torch.zeros(1, 3, DIM), Partition((3,)), 0)
    with pytest.raises(Exception, match="x_local: rank 0 holds 4 tokens"):
        sp._check(attnlab.build("linear", dim=DIM, heads=HEADS), torch.zeros(1, 3, DIM), Partition((4,)), 0)


def _grads(out: torch.Tensor, weight: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (out, *torch.autograd.grad((out * weight).sum(), inputs))


def test_the_engines_entering_state_matches_the_recurrence_written_out():
    """causal_delta_from and selective_scan(initial_state=): outputs and gradients (the entering state's too)
    against S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ and h_t = e^{Δ_t A} h_{t−1} + Δ_t u_t B_t."""
    from attnlab.kernels.linear_scan import causal_delta_from
    from attnlab.mechanisms.linear.selective_ssm import selective_scan

    torch.manual_seed(1)
    f64 = {"dtype": torch.float64}
    b, h, n, dk, dv = 2, 2, 7, 3, 4
    q, k = torch.randn(b, h, n, dk, **f64), torch.nn.functional.normalize(torch.randn(b, h, n, dk, **f64), dim=-1)
    v, beta, log_decay = torch.randn(b, h, n, dv, **f64), torch.rand(b, h, n, **f64), -torch.rand(b, h, n, **f64)
    s0 = torch.randn(b, h, dk, dv, **f64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, beta, log_decay, s0))
    weight = torch.randn(b, h, n, dv, **f64)
    out, end = causal_delta_from(q, k, v, beta, s0, log_decay=log_decay, chunk_size=3)
    state, rows = s0, []
    for t in range(n):
        kt = k[:, :, t, :, None]
        transition = torch.exp(log_decay[:, :, t, None, None]) * (torch.eye(dk, **f64) - beta[:, :, t, None, None] * kt * kt.mT)
        state = transition @ state + beta[:, :, t, None, None] * kt * v[:, :, t, None, :]
        rows.append((q[:, :, t, None, :] @ state)[:, :, 0])
    expected = torch.stack(rows, dim=2)
    for got, want in zip(_grads(out, weight, inputs), _grads(expected, weight, inputs)):
        assert (got - want).abs().max() < 1e-12
    assert (end - state).abs().max() < 1e-12

    d, s = 3, 4
    u, delta = torch.randn(b, n, d, **f64), torch.rand(b, n, d, **f64)
    a, bb, c = -torch.rand(d, s, **f64), torch.randn(b, n, s, **f64), torch.randn(b, n, s, **f64)
    skip, h0 = torch.randn(d, **f64), torch.randn(b, d, s, **f64)
    inputs = tuple(t.requires_grad_() for t in (u, delta, a, bb, c, skip, h0))
    weight = torch.randn(b, n, d, **f64)
    hidden, rows = h0, []
    for t in range(n):
        hidden = torch.exp(delta[:, t, :, None] * a) * hidden + (delta[:, t] * u[:, t])[..., None] * bb[:, t, None, :]
        rows.append((hidden * c[:, t, None, :]).sum(-1) + skip * u[:, t])
    got = _grads(selective_scan(u, delta, a, bb, c, skip, chunk_size=3, initial_state=h0), weight, inputs)
    for g, w in zip(got, _grads(torch.stack(rows, dim=1), weight, inputs)):
        assert (g - w).abs().max() < 1e-12
