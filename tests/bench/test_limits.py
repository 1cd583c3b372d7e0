"""`attnlab bench limits`: verdicts from known times, the limit of a case, argument errors, one real run in
worker processes (a tiny row and a peer row), the store and the report's limits section."""
from __future__ import annotations

import math
import os

import pytest

from attnlab.bench import limits as L
from attnlab.bench.report import Report
from attnlab.bench.report.html import Page
from attnlab.bench.store import ResultStore
from attnlab.core.errors import ParameterError

MACHINE = {"matmul_1_gflops": 100.0, "stream_1_gbs": 10.0, "fresh_1_gbs": 2.5}


def verdict(row: L.Row, ms: float, ratios=(), speedups=()) -> L.RowResult:
    result = L.RowResult(row.key, row.work, row.bar_kind, row.bar, row.engine, ms=ms)
    L._verdict(row, result, MACHINE, list(ratios), list(speedups))
    return result


def test_ms_bar_and_two_threads_only_for_engines():
    row = L.Row("r", "w", L.Case("neighborhood", 65536, params={"kernel_size": 7}), "ms", 100.0, engine="neighborhood")
    assert verdict(row, 99.0).passed is True
    assert verdict(row, 101.0).passed is False
    assert verdict(row, 90.0, speedups=[1.6, 1.8, 1.75]).two_threads_passed is True  # median 1.75
    assert verdict(row, 90.0, speedups=[1.6, 1.65, 1.9]).two_threads_passed is False  # median 1.65
    plain = L.Row("p", "w", row.case, "ms", 100.0)  # no engine: the speed-up is shown, no bar
    result = verdict(plain, 90.0, speedups=[1.0])
    assert result.speedup == 1.0 and result.two_threads_passed is None


def test_matmul_share_from_the_registry_flop_count():
    case = L.Case("linear", 16384, causal=True)
    flops = L._flops(case)
    assert flops == pytest.approx(8 * (4.0 * 16384 * 64 * 64 + 4.0 * 16384 * 64 * 64))  # linear_flops, chunk 64
    row = L.Row("m", "w", case, "matmul", 0.30)
    ms = flops / (30e9) * 1e3  # 30 GFLOP/s on a 100 GFLOP/s machine: exactly 30 %
    result = verdict(row, ms * 0.99)
    assert result.value == pytest.approx(0.30 / 0.99) and result.passed is True
    assert verdict(row, ms * 1.01).passed is False


def test_ratio_and_backward_bars_take_the_median_of_round_ratios():
    case = L.Case("neighborhood", 4096, "fwd+bwd", params={"kernel_size": 7}, grid=(64, 64))
    bwd = L.Row("b", "w", case, "bwd", 2.5, L.Case("neighborhood", 4096, params={"kernel_size": 7}, grid=(64, 64)))
    result = verdict(bwd, 10.0, ratios=[3.4, 3.6, 3.5, 9.0, 3.0])  # fwd+bwd / fwd; median 3.5 -> bwd/fwd 2.5
    assert result.value == pytest.approx(2.5) and result.passed is True
    assert verdict(bwd, 10.0, ratios=[3.6, 3.6, 3.0]).passed is False
    peer = L.Row("p", "w", L.Case("efficient", 4096, "fwd+bwd"), "peer", 1.0)
    assert verdict(peer, 10.0, ratios=[0.9, 1.2, 0.95]).value == pytest.approx(0.95)
    assert verdict(peer, 10.0, ratios=[1.01, 1.2, 0.9]).passed is False


def test_limit_is_the_longer_of_moving_the_tensors_and_compute():
    small = L.Case("neighborhood", 65536, params={"kernel_size": 7})  # memory bound
    tensor = 8 * 65536 * 64 * 4
    moved = 4 * tensor / 10e9  # q, k, v read, the output written, at the streaming rate
    assert L._flops(small) / 100e9 < moved
    assert L.limit_seconds(small, MACHINE) == pytest.approx(moved)
    backward = L.Case("neighborhood", 65536, "fwd+bwd", params={"kernel_size": 7})
    assert L.limit_seconds(backward, MACHINE) == pytest.approx(12 * tensor / 10e9)  # 8 read, 4 written
    assert L.limit_seconds(small, {"matmul_1_gflops": 100.0}) == pytest.approx(L._flops(small) / 100e9)
    assert L.limit_seconds(small, {"fresh_1_gbs": 2.5}) is None  # no streaming or matmul figure: no limit claimed
    heavy = L.Case("linear", 65536, causal=True)  # compute bound
    assert L.limit_seconds(heavy, MACHINE) == pytest.approx(L._flops(heavy) / 100e9)
    assert L.limit_seconds(heavy, {}) is None


def test_arguments_are_checked():
    with pytest.raises(ParameterError, match="--rows: expected keys among efficient-4k.*got nope"):
        L.select_rows(["nope"])
    assert [r.key for r in L.select_rows(["neighborhood-2d-7", "efficient-4k"])] == ["efficient-4k", "neighborhood-2d-7"]
    with pytest.raises(ParameterError, match="--rounds: expected at least 5"):
        L.run_limits(L.ROWS[:1], rounds=3)


def test_every_row_names_a_registered_case_and_a_known_bar():
    from attnlab.bench.peers.registry import all_peers
    from attnlab.core.registry import get

    for row in L.ROWS:
        for case in (row.case, row.other):
            if case is not None:
                get(case.mechanism)
                if case.impl != "attnlab":
                    assert all_peers()[case.impl].unsupported(case.config(1)) is None, row.key
        assert row.bar_kind in L.BAR_TEXT


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs for the two-thread worker")
def test_a_real_run_in_worker_processes(tmp_path):
    rows = [
        L.Row("tiny", "neighborhood 1-D N=256", L.Case("neighborhood", 256, params={"kernel_size": 7}), "ms", 1e6,
              engine="neighborhood"),
        L.Row("peer", "efficient vs the peer", L.Case("efficient", 128, "fwd+bwd"), "peer", 1e6,
              L.Case("efficient", 128, "fwd+bwd", impl="linear-attention-transformer")),
        L.Row("broken", "no such kernel", L.Case("neighborhood", 4, params={"kernel_size": 7}), "ms", 1.0),
    ]
    env, results = L.run_limits(rows, 5, machine_sizes={"matmul": 128, "stream": 1 << 16, "fresh": 1 << 16, "fresh_huge": 1 << 20})
    assert env["matmul_1_gflops"] > 0 and env["stream_2_gbs"] > 0 and env["fresh_1_gbs"] > 0 and env["fresh_huge_1_gbs"] > 0 and env["rounds"] == 5
    tiny, peer, broken = results
    assert tiny.passed is True and tiny.ms > 0 and tiny.speedup > 0 and tiny.two_threads_passed is not None
    assert len(tiny.load) == 5
    assert peer.passed is True and peer.other_ms > 0 and "checked equal" in peer.note
    assert math.isclose(peer.value, peer.value) and peer.speedup is not None
    assert broken.ms is None and broken.passed is None and "kernel_size" in broken.note  # the error, not a crash
    store = ResultStore(tmp_path / "r.sqlite")
    L.store_results(store, env, results, rows)
    report = Report.from_store(store)
    assert [row["key"] for row in report.limit_rows()] == ["tiny", "peer", "broken"]
    page = Page(report).limits()
    assert "neighborhood 1-D N=256" in page and "no such kernel" in page
    assert page.count("<span class='faster'>met</span>") >= 2  # the two rows' own bars
    text = L.table_text(env, results)
    assert "bars met: 2/3 rows" in text and "tiny" in text


def test_report_shows_the_share_of_the_matmul_rate(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    config = {"mechanism": "linear", "impl": "attnlab", "n": 1024, "mode": "fwd", "causal": True, "params": {},
              "grid": None, "dtype": "float32", "batch": 1, "heads": 8, "head_dim": 64, "threads": 1}
    store.record("speed", config, "ok", {"median_s": 0.01, "flops_per_s": 25e9}, {"matmul_gflops": 100.0, "run_id": "a"})
    shares = Report.from_store(store).matmul_shares()
    assert [cells for _, cells in shares] == [{1024: pytest.approx(0.25)}]
    assert ">25%<" in Page(Report.from_store(store)).limits()


@pytest.mark.parametrize("n,radius,causal", [(10, 3, True), (10, 3, False), (5, 9, False), (1, 4, True)])
def test_sliding_window_flops_count_the_band_pairs(n, radius, causal):
    import torch

    from attnlab.mechanisms.sparse.sliding_window import sliding_window_flops

    i = torch.arange(n)
    dist = i[:, None] - i[None, :]
    pairs = ((dist.abs() <= radius) & ((dist >= 0) if causal else True)).sum().item()
    assert sliding_window_flops(n, 2, 3, causal, radius=radius) == 4 * 2 * 3 * pairs


def test_flop_counts_take_the_entry_parameters_and_grid():
    """flops_of hands the count the parameters it declares: a 13×13 window on a 64×64 grid, not the default 7."""
    two_d = L.Case("neighborhood", 4096, params={"kernel_size": 13}, grid=(64, 64))
    assert L._flops(two_d) == 4.0 * 8 * 64 * 4096 * 169
    causal = L.Case("neighborhood", 10, causal=True, params={"kernel_size": 3})
    assert L._flops(causal) == 4.0 * 8 * 64 * (1 + 2 + 3 * 8)  # Σ_i min(i + 1, 3)
    band = L.Case("sliding-window", 1000, causal=True, params={"radius": 256})
    assert L._flops(band) == 4.0 * 8 * 64 * (1000 + 1000 * 256 - 256 * 257 // 2)
