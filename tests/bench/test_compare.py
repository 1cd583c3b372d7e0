"""The comparison rules: comparable environments, ratios and exponents between comparable results only,
rows reused from the store marked, implausible values flagged, spread from the per-call times."""
from __future__ import annotations

import pytest

from attnlab.bench import compare
from attnlab.bench.compare import comparable, fingerprint, fit_exponents, flags, peer_ratios, sdpa_ratios, spread

MACHINE = {"attnlab": "0.1", "git_commit": "abc", "torch": "2.13.0", "python": "3.11", "platform": "linux",
           "cpu": "X", "cpu_flags": ["avx2"], "cpu_count": 2, "threads": 1, "interop_threads": 1, "mkldnn": True}


def env(run_id: str, **over: object) -> dict:
    return {**MACHINE, "run_id": run_id, "time": float(len(run_id)), "load_1m": 0.5, "matmul_gflops": 50.0, **over}


def row(mechanism: str, n: int, median_s: float, e: dict, *, causal: bool = False, impl: str = "attnlab",
        status: str = "ok", **metrics: object) -> dict:
    config = {"mechanism": mechanism, "impl": impl, "params": {}, "n": n, "grid": None, "mode": "fwd",
              "causal": causal, "dtype": "float32", "batch": 1, "heads": 8, "head_dim": 64, "threads": 1}
    return {"config": config, "status": status, "metrics": {"median_s": median_s, **metrics}, "env": e}


def test_fingerprint_ignores_the_run_but_not_the_machine() -> None:
    assert fingerprint(env("r1")) == fingerprint(env("r2", load_1m=9.0, matmul_gflops=1.0, peer="flex"))
    assert fingerprint(env("r1")) != fingerprint(env("r1", git_commit="def"))
    assert fingerprint(env("r1")) != fingerprint(env("r1", threads=2))
    assert fingerprint(None) is None


def test_comparable_same_run_or_same_fingerprint() -> None:
    a = row("softmax", 256, 1.0, env("r1"))
    assert comparable(a, row("x", 256, 1.0, env("r2")))  # same machine and software
    assert not comparable(a, row("x", 256, 1.0, env("r2", torch="2.12")))
    assert comparable(row("x", 1, 1.0, env("r1", torch="2.12")), a)  # the same run, whatever it says


def test_sdpa_ratio_uses_the_same_run_then_the_latest_comparable_and_marks_reuse() -> None:
    old = env("r-old")  # time 5.0
    new = env("r-new-run")  # time 9.0, the current run
    other = env("r-other", torch="2.12")
    rows = [
        row("softmax", 256, 2.0, old),
        row("softmax", 256, 4.0, new),
        row("softmax", 256, 1.0, other),
        row("softmax", 256, 8.0, new, causal=True),
        row("linear", 256, 1.0, new),  # fresh, against the fresh baseline: 1 / 4
        row("linear", 256, 3.0, new, causal=True),  # causal against the causal baseline: 3 / 8
        row("rope", 256, 1.0, old),  # stored: against the same run's baseline, 1 / 2
        row("alibi", 256, 1.0, other),  # another torch: only its own run's baseline, 1 / 1
        row("kerple", 256, 1.0, env("r-third", torch="2.11")),  # no comparable baseline
    ]
    ratios = {(r["mechanism"], r["causal"]): r for r in sdpa_ratios(rows, run_id="r-new-run")}
    assert ratios["linear", False]["ratio"] == pytest.approx(0.25) and ratios["linear", False]["reused"] is False
    assert ratios["linear", True]["ratio"] == pytest.approx(3 / 8)
    assert ratios["rope", False]["ratio"] == pytest.approx(0.5) and ratios["rope", False]["reused"] is True
    assert ratios["rope", False]["sdpa_reused"] is True
    assert ratios["alibi", False]["ratio"] == pytest.approx(1.0)
    assert ratios["kerple", False]["ratio"] is None and ratios["kerple", False]["incomparable"] is True
    assert [r["mechanism"] for r in sdpa_ratios(rows)] == [r["config"]["mechanism"] for r in rows]  # in order
    assert sdpa_ratios(rows)[4]["reused"] is None  # without a run id nothing is said


def test_a_fresh_row_against_a_stored_baseline_of_the_same_machine_is_marked() -> None:
    rows = [row("softmax", 256, 4.0, env("r-old")), row("linear", 256, 1.0, env("r-new"))]
    r = sdpa_ratios(rows, run_id="r-new")[1]
    assert r["ratio"] == pytest.approx(0.25) and r["reused"] is False and r["sdpa_reused"] is True


def test_exponent_from_one_environment_preferring_the_current_run() -> None:
    mine, theirs = env("r-new"), env("r-old", torch="2.12")
    rows = [row("linear", n, 1e-3 * (n / 256) ** 1.0, mine) for n in (256, 512, 1024)]
    rows += [row("linear", n, 5e-3 * (n / 256) ** 2.0, theirs) for n in (256, 512, 1024, 2048)]
    (fit,) = fit_exponents(rows, run_id="r-new")
    assert fit["measured"] == pytest.approx(1.0) and fit["points"] == 3 and fit["left_out"] == 4
    assert fit["reused"] is False and fit["fingerprint"] == fingerprint(mine)
    (fit,) = fit_exponents(rows)  # no current run: the largest comparable group
    assert fit["measured"] == pytest.approx(2.0) and fit["points"] == 4 and fit["n_max"] == 2048


def test_peer_ratio_needs_a_comparable_attnlab_side() -> None:
    ours = row("efficient", 256, 2.0, env("r1"))
    peer = row("efficient", 256, 0.5, env("r1", peer="lat", peer_version="0.19"), impl="lat")
    far = row("efficient", 256, 0.5, env("r2", torch="2.12"), impl="lat")
    (good,) = peer_ratios([ours, peer], run_id="r1")
    assert good["ratio"] == pytest.approx(4.0) and good["reused"] is False and good["attnlab_reused"] is False
    (bad,) = peer_ratios([ours, far])
    assert bad["ratio"] is None and bad["incomparable"] is True


def test_flags_zero_peak_and_a_rate_above_the_runs_matmul() -> None:
    e = env("r1")  # matmul 50 GFLOP/s
    assert flags({"peak_mem_bytes": 0, "flops_per_s": 10e9}, e) == [compare.ZERO_PEAK]
    assert flags({"peak_mem_bytes": 1 << 20, "flops_per_s": 70e9}, e) == [compare.ABOVE_MATMUL]
    assert flags({"peak_mem_bytes": 1 << 20, "flops_per_s": 60e9}, e) == []  # within the margin of a loaded start
    assert flags({"peak_mem_bytes": 1 << 20, "flops_per_s": 70e9}, {**e, "matmul_gflops": None}) == []
    assert flags({"peak_mem_bytes": None, "flops_per_s": None}, e) == []


def test_spread_quartiles_of_the_calls() -> None:
    assert spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"min_s": 1.0, "max_s": 5.0, "q1_s": 2.0, "q3_s": 4.0}
    assert spread([2.0]) == {"min_s": 2.0, "max_s": 2.0, "q1_s": None, "q3_s": None}


def test_speed_table_labels_causal_marks_reused_and_fits_100_columns() -> None:
    from attnlab.bench.cli import speed_table
    from attnlab.bench.store import Result, config_hash

    def result(r: dict) -> Result:
        return Result("speed", r["config"], r["status"], r["metrics"], r["env"], 0.0, config_hash(r["config"]))

    times = {"q1_s": 0.9, "q3_s": 1.1, "load_1m": 3.5, "peak_mem_bytes": 0, "flags": [compare.ZERO_PEAK]}
    rows = [row("softmax", 256, 1.0, env("r-old"), **times), row("softmax", 256, 2.0, env("r-new"), causal=True),
            row("power-attention", 256, 1.0, env("r-new"), causal=True, **times)]
    text = speed_table([result(r) for r in rows], run_id="r-new")
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    # the plain softmax (stored, marked) and the causal one, labelled
    assert lines[2].split()[:2] == ["softmax*", "256"] and lines[3].split()[:3] == ["softmax", "causal", "256"]
    assert "20%" in lines[2] and "3.5" in lines[2] and "!0B" in lines[2]  # IQR, load, flag
    assert lines[4].split()[:2] == ["power-attention", "causal"] and "0.50" in lines[4]  # against the causal one
    assert "reused from the store" in text
