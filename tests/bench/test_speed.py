"""`attnlab bench speed`: timing logic, memory probe, configurations, predictions, fits, real runs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnlab.bench import cli as bench_cli
from attnlab.bench import speed, timing
from attnlab.bench.speed import (
    SpeedOptions,
    bench_params,
    fit_exponents,
    grid_for,
    loglog_slope,
    predict_over_budget,
    run_speed,
    sdpa_ratios,
)
from attnlab.bench.store import STATUSES, ResultStore
from attnlab.cli import main
from attnlab.core import registry
from attnlab.core.registry import COMMON_PARAMS, Paper, Param, Spec


# -- measure: the repeat logic on a fake clock --------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed(monkeypatch, costs):
    """A fn whose calls take the given (exact binary) durations on a fake clock, then the last one."""
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    costs = list(costs)

    def fn():
        clock.now += costs.pop(0) if len(costs) > 1 else costs[0]

    return fn


@pytest.mark.parametrize(
    ("cost", "kwargs", "expected"),
    [
        (0.125, {"budget_s": 1.0}, 7),  # warm-up 0.125 + 7 calls = 1.0; an 8th would pass 1.0
        (0.125, {"budget_s": 100.0, "repeats": 5}, 5),  # the repeat cap
        (2.0, {"budget_s": 1.0}, 1),  # always one timed call
        (0.25, {"budget_s": 1.0}, 3),  # three fit exactly: warm-up + 3 × 0.25
        (0.5, {"budget_s": 1.0, "limit_s": 4.0}, 3),  # budget spent after 2, but 3 fit in the limit
        (0.25, {"budget_s": 0.5, "limit_s": 10.0, "warmup": 0}, 3),  # budget spent after 2: stop at 3
        (1.5, {"budget_s": 1.0, "limit_s": 4.0}, 1),  # warm-up + 2 calls would pass the limit
    ],
)
def test_measure_repeats(monkeypatch, cost, kwargs, expected):
    t = timing.measure(timed(monkeypatch, [cost]), **kwargs)
    assert t.repeats == expected
    assert t.median_s == t.min_s == t.max_s == cost
    assert t.peak_mem_bytes is None


def test_measure_statistics_skip_the_warmup(monkeypatch):
    t = timing.measure(timed(monkeypatch, [0.5, 0.125, 0.375, 0.25]), repeats=3, budget_s=10.0)
    assert (t.median_s, t.min_s, t.max_s, t.repeats) == (0.25, 0.125, 0.375, 3)


@pytest.mark.parametrize(("kwargs", "word"), [({"repeats": 0}, "repeats"), ({"budget_s": 0.0}, "budget_s"),
                                              ({"warmup": -1}, "warmup"), ({"limit_s": 0.5}, "limit_s")])
def test_measure_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        timing.measure(lambda: None, **kwargs)


# -- the memory probe ----------------------------------------------------------------------
needs_probe = pytest.mark.skipif(not timing.can_measure_memory(), reason="no /proc/self/clear_refs here")
MiB = 2**20


@needs_probe
def test_peak_memory_sees_a_touched_allocation():
    """In a fresh process with the worker's allocator setting, as the speed worker measures (in the
    test process, allocations freed by earlier tests may be reused and never raise the mark)."""
    script = textwrap.dedent("""
        import json, torch
        from attnlab.bench import timing
        size = 64 * 2**20  # above glibc's mmap threshold: mapped on allocation, unmapped on free

        def allocate():
            buf = torch.ones(size // 4, dtype=torch.float32)  # written, so resident
            return float(buf[-1])

        print(json.dumps([timing.peak_memory(allocate), timing.peak_memory(lambda: None)]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, **timing.MMAP_THRESHOLD_ENV})
    peak, idle = json.loads(done.stdout.strip().splitlines()[-1])
    size = 64 * MiB
    assert size - MiB <= peak < size + 16 * MiB  # (pages freed during the call count against it)
    assert idle < 4 * MiB  # and the mark was reset in between


@needs_probe
def test_peak_memory_after_a_call_that_left_the_heap_large():
    """A token-by-token scan (miras-huber) leaves tens of MiB of small freed blocks in glibc's heap; a later
    call made of small blocks reuses them and read 0 B until the probe handed free heap pages back first."""
    script = textwrap.dedent("""
        import json, torch
        from attnlab.bench import timing

        def small_blocks(count):  # 4 KiB tensors, under the mmap threshold: served from the heap
            keep = [torch.ones(1024) for _ in range(count)]
            return len(keep)

        small_blocks(20_000)  # ~80 MiB allocated and freed: the heap stays large
        print(json.dumps(timing.peak_memory(lambda: small_blocks(5_000))))  # ~20 MiB, reusing that heap
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, **timing.MMAP_THRESHOLD_ENV})
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    assert 16 * MiB <= peak < 40 * MiB


@needs_probe
def test_measure_probes_the_first_timed_call():
    """In a fresh process with the worker's allocator setting, as the speed worker measures (a long-lived
    test process has read 0 B here: what earlier tests left in the allocator is not the worker's state)."""
    script = textwrap.dedent("""
        import json, torch
        from attnlab.bench import timing
        calls = []

        def fn():
            calls.append(1)
            size = 96 * 2**20 if len(calls) == 2 else 0  # only the first timed call (after one warm-up) allocates
            torch.ones(size // 4)

        t = timing.measure(fn, warmup=1, repeats=3, budget_s=60.0, memory=True)
        print(json.dumps([t.repeats, t.peak_mem_bytes]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, **timing.MMAP_THRESHOLD_ENV})
    repeats, peak = json.loads(done.stdout.strip().splitlines()[-1])
    assert repeats == 3 and 95 * MiB <= peak < 112 * MiB


# -- configurations ------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "rank", "grid"), [
    (256, 2, [16, 16]), (8192, 2, [91, 91]),  # 91² = 8281 is 89 away, 90² = 8100 is 92 away
    (512, 2, [23, 23]), (4096, 3, [16, 16, 16]), (1000, 3, [10, 10, 10]), (200, 2, [14, 14]), (1, 2, [1, 1]),
])
def test_grid_for(n, rank, grid):
    assert grid_for(n, rank) == grid


def test_bench_params_take_defaults_and_the_test_value_of_required_ones():
    own = (Param("width", int, doc="required", low=1), Param("base", float, 10.0), Param("sizes", tuple, (1, 2)),
           Param("extra", int, doc="required, no test value"))
    spec = Spec("p", "mechanism", Paper(None, "P", 2000), factory=dict, params=COMMON_PARAMS + own,
                test_params={"width": 3, "base": 2.0})
    assert bench_params(spec) == {"width": 3, "base": 10.0, "sizes": [1, 2]}  # defaults beat test values


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"lengths": ()}, "lengths"), ({"lengths": (64, 0)}, "lengths"), ({"modes": ("bwd",)}, "modes"),
    ({"dtype": "int8"}, "dtype"), ({"heads": 0}, "heads"), ({"threads": 0}, "threads"), ({"budget_s": 0}, "budget_s"),
    ({"total_s": -1.0}, "total_s"), ({"memory_budget_bytes": 0}, "memory_budget_bytes"),
])
def test_speed_options_are_checked(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SpeedOptions(**kwargs)


def test_predictions():
    ok = [(256, {"median_s": 0.1, "peak_mem_bytes": 10 * MiB}), (512, {"median_s": 0.4, "peak_mem_bytes": 20 * MiB})]
    cfg = {"n": 1024}
    # slope between the last two points: 2, so 1.6 s per call; warm-up + a call = 3.2 s
    status, note = predict_over_budget(cfg, ok, 2.0, 3.0, 10**12)
    assert status == "over_time" and "N=512" in note and "1.6 s" in note
    assert predict_over_budget(cfg, ok, 2.0, 3.3, 10**12) is None
    # the slope is clipped to the declared exponent: 1.0 -> 0.8 s per call
    assert predict_over_budget(cfg, ok, 1.0, 1.7, 10**12) is None
    assert predict_over_budget(cfg, ok, 1.0, 1.5, 10**12)[0] == "over_time"
    # after one point, linear: 0.2 s at N=512
    assert predict_over_budget({"n": 512}, ok[:1], 2.0, 0.41, 10**12) is None
    assert predict_over_budget({"n": 512}, ok[:1], 2.0, 0.39, 10**12)[0] == "over_time"
    # memory: linear from the last point, 40 MiB at N=1024
    assert predict_over_budget(cfg, ok, 2.0, 100.0, 39 * MiB)[0] == "over_memory"
    assert predict_over_budget(cfg, ok, 2.0, 100.0, 41 * MiB) is None
    assert predict_over_budget(cfg, [], 2.0, 1e-9, 1) is None  # nothing to predict from


# -- derived quantities ----------------------------------------------------------------------
def result(mechanism, n, median, *, status="ok", mode="fwd", heads=8, impl="attnlab"):
    config = {"mechanism": mechanism, "impl": impl, "params": {}, "n": n, "grid": None, "mode": mode, "causal": False,
              "dtype": "float32", "batch": 1, "heads": heads, "head_dim": 64, "threads": 2}
    return {"config": config, "status": status, "metrics": {"median_s": median if status == "ok" else None}}


def test_loglog_slope_of_a_power_law():
    ns = [256, 512, 1024, 2048, 4096]
    assert loglog_slope([(n, 3e-9 * n**2) for n in ns]) == pytest.approx(2.0, abs=1e-9)
    assert loglog_slope([(n, 5e-7 * n**1.5) for n in ns]) == pytest.approx(1.5, abs=1e-9)
    assert loglog_slope([(256, 1.0), (512, 2.0)]) is None
    assert loglog_slope([(256, 1.0), (512, 2.0)], min_points=2) == pytest.approx(1.0)


def test_fit_exponents_per_series_from_the_store(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    rows = [result("softmax", n, 2e-9 * n**2) for n in (256, 512, 1024, 2048)]
    rows += [result("softmax", 4096, None, status="over_time"), result("softmax", 8192, None, status="error")]
    rows += [result("softmax", n, 1e-6 * n**1.25, mode="fwd+bwd") for n in (256, 1024, 4096)]
    rows += [result("test-not-registered", n, 1e-3 * n) for n in (256, 512)]
    for r in rows:
        store.record("speed", r["config"], r["status"], r["metrics"], {})
    fits = {(f["mechanism"], f["mode"]): f for f in fit_exponents(store.results("speed"))}
    assert fits["softmax", "fwd"]["measured"] == pytest.approx(2.0)
    assert (fits["softmax", "fwd"]["points"], fits["softmax", "fwd"]["n_max"]) == (4, 2048)
    assert fits["softmax", "fwd"]["declared"] == registry.get("softmax").exponent
    assert fits["softmax", "fwd+bwd"]["measured"] == pytest.approx(1.25)
    unknown = fits["test-not-registered", "fwd"]
    assert unknown["measured"] is None and unknown["declared"] is None and unknown["points"] == 2
    assert fit_exponents(rows) == fit_exponents(store.results("speed"))  # JSON objects work alike


def test_sdpa_ratios_match_shapes():
    rows = [result("softmax", 256, 0.5), result("softmax", 512, None, status="over_time"),
            result("softmax", 256, 4.0, heads=4),
            result("other", 256, 2.0), result("other", 512, 3.0), result("other", 256, 1.0, heads=4),
            result("softmax", 256, 0.25, impl="flex")]
    ratios = [r["ratio"] for r in sdpa_ratios(rows)]
    assert ratios == [1.0, None, 1.0, 4.0, None, 0.25, 0.5]


# -- real runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny real run: softmax at N = 64, 128, forward and forward+backward."""
    db = tmp_path_factory.mktemp("tiny") / "results.sqlite"
    store = ResultStore(db)
    options = SpeedOptions(lengths=(128, 64), budget_s=2.0, repeats=5, quiet=True)
    return db, run_speed(store, ["softmax"], options), options


def test_tiny_run_lands_in_the_store(tiny):
    db, results, options = tiny
    assert [(r.config["n"], r.config["mode"]) for r in results] == [(64, "fwd"), (128, "fwd"), (64, "fwd+bwd"), (128, "fwd+bwd")]
    stored = ResultStore(db).results("speed")
    assert {r.config_hash for r in stored} == {r.config_hash for r in results}
    for r in results:
        m, c = r.metrics, r.config
        assert r.status == "ok", m
        assert 0 < m["min_s"] <= m["median_s"] <= m["max_s"] and 1 <= m["repeats"] <= 5
        assert c["threads"] == torch.get_num_threads() == r.env["threads"]
        flops = 4 * 8 * c["n"] ** 2 * 64 * (3 if c["mode"] == "fwd+bwd" else 1)  # q kᵀ and A v, 2 FLOPs a MAC
        assert m["flops"] == flops and m["flops_per_s"] == pytest.approx(flops / m["median_s"])
        if timing.can_measure_memory():  # tiny here: below the kernel counters' resolution it reads 0
            assert isinstance(m["peak_mem_bytes"], int) and m["peak_mem_bytes"] >= 0
    # run again: everything comes from the store, nothing is measured twice
    again = run_speed(ResultStore(db), ["softmax"], options)
    assert [(r.config_hash, r.created) for r in again] == [(r.config_hash, r.created) for r in results]


def test_cli_json_to_stdout_is_only_json(tiny, capsys):
    db, results, _ = tiny
    code = main(["bench", "speed", "--mechanisms", "softmax", "--lengths", "64,128", "--budget-seconds", "2",
                 "--repeats", "5", "--json", "-", "--db", str(db)])
    out, err = capsys.readouterr()
    assert code == 0
    data = json.loads(out)  # the whole of stdout
    assert [(r["config"], r["status"], r["metrics"]) for r in data["results"]] == [(r.config, r.status, r.metrics) for r in results]
    assert {(f["mechanism"], f["mode"], f["measured"], f["declared"]) for f in data["exponents"]} == {
        ("softmax", "fwd", None, 2.0), ("softmax", "fwd+bwd", None, 2.0)}  # two points: no slope
    assert [r["ratio"] for r in data["ratios"]] == [1.0] * 4
    assert "xSDPA" in err and "reused from the store" in err  # the table went to stderr
    assert all(r["reused"] for r in data["results"])  # every result came from the fixture's run


def test_cli_prints_a_table(tiny, capsys):
    db, _, _ = tiny
    code = main(["bench", "speed", "--mechanisms", "softmax", "--lengths", "64,128", "--budget-seconds", "2",
                 "--repeats", "5", "--quiet", "--db", str(db)])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["mechanism", "N", "mode", "status", "ms", "IQR", "load", "MiB", "GFLOP/s", "xSDPA"]
    assert [line.split()[:4] for line in lines[2:6]] == [  # every row reused from the fixture's run: marked
        ["softmax*", "64", "fwd", "ok"], ["softmax*", "128", "fwd", "ok"],
        ["softmax*", "64", "fwd+bwd", "ok"], ["softmax*", "128", "fwd+bwd", "ok"]]
    assert max(len(line) for line in lines) <= 100


def test_default_suite_runs_speed_recall_report(tiny, monkeypatch, capsys):
    db, results, _ = tiny
    monkeypatch.setattr(bench_cli, "QUICK_LENGTHS", (64, 128))
    monkeypatch.setattr(bench_cli, "QUICK_BUDGET_S", 2.0)  # the fixture's budgets: everything is reused
    monkeypatch.setattr(bench_cli, "QUICK_REPEATS", 5)
    monkeypatch.setattr(bench_cli, "benched_entries", lambda: [registry.get("softmax")])
    calls = []

    class Recall:
        add_recall_arguments = staticmethod(lambda parser: None)
        run_recall_command = staticmethod(lambda args: 0)

        results_table = staticmethod(lambda rows: "")

        @staticmethod
        def run_default_panel(store, quiet, total_seconds):
            calls.append((store.path, quiet, store.count("speed")))
            return []

    monkeypatch.setattr(bench_cli, "recall", Recall)
    code = main(["bench", "--db", str(db), "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert calls == [(db, True, len(results))]  # recall ran after speed, on the same store
    last = Path(out.splitlines()[-1])
    assert last.suffix == ".html" and last.exists() and last.parent == db.parent / "report"


def test_peers_flag(tiny, tmp_path, capsys):
    db, results, _ = tiny
    assert main(["bench", "speed", "--peers", "natten,nope", "--db", str(tmp_path / "r.sqlite")]) == 2
    assert "unknown peer 'nope'" in capsys.readouterr().err and not (tmp_path / "r.sqlite").exists()
    code = main(["bench", "speed", "--mechanisms", "softmax", "--lengths", "64,128", "--modes", "fwd", "--budget-seconds",
                 "2", "--repeats", "5", "--peers", "local-attention", "--json", "-", "--quiet", "--db", str(db)])
    out, _ = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    rows = data["peers"]
    assert rows and {r["impl"] for r in rows} == {"local-attention"}
    assert {r["status"] for r in rows} <= set(STATUSES)
    hashes = {r["config_hash"] for r in data["results"]}
    assert {r.config_hash for r in results if r.config["mode"] == "fwd"} <= hashes  # the speed results are there too


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["bench", "speed", "--lengths", "0,64", "--db", str(tmp_path / "r.sqlite")]) == 2
    assert main(["bench", "speed", "--modes", "bwd", "--db", str(tmp_path / "r.sqlite")]) == 2
    assert main(["bench", "speed", "--mechanisms", "sofmax", "--db", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "positive integers" in err and "fwd, fwd+bwd" in err and "did you mean 'softmax'" in err


PLANTED = '''
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.core.module import Attention
from attnlab.core.errors import ParameterError
from attnlab.core.registry import Param, Paper, Supports, register

PAPER = Paper(None, "Planted for the speed tests", 2000)


class Dense(Attention):
    def attend_fast(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v)

    def attend_reference(self, q, k, v, mask):
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return w @ v, w


@register(name="test-speed-grid-kw", paper=PAPER, family="A", cost="O(N^2)", exponent=2.0,
          supports=Supports(grids=(2, 3)))
class GridKeyword(Dense):
    def attend(self, q, k, v, *, grid):
        if q.dim() != 4 or len(grid) != 2 or grid[0] != grid[1] or grid[0] * grid[1] != q.shape[2]:
            raise ValueError(f"grid {grid} does not fit q {tuple(q.shape)}")
        return self.attend_fast(q, k, v, None)


@register(name="test-speed-grid-axes", paper=PAPER, family="B", cost="O(N d^2)", exponent=1.0,
          supports=Supports(grids=(2,)), flops=lambda n, h, d, causal: 2.0 * n * (h * d) ** 2)
class GridAxes(nn.Module):
    def __init__(self, dim, heads=8, *, head_dim=None, qkv_bias=True):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f"expected (batch, side, side, dim), got {tuple(x.shape)}")
        return self.proj(x)


@register(name="test-speed-broken", paper=PAPER, family="A", cost="O(N^2)", exponent=2.0, supports=Supports())
class Broken(Dense):
    def attend_fast(self, q, k, v, mask):
        raise RuntimeError("planted failure")


@register(name="test-speed-sleeper", paper=PAPER, family="A", cost="O(N^2)", exponent=2.0, supports=Supports())
class Sleeper(Dense):
    def attend_fast(self, q, k, v, mask):
        time.sleep(60)
        return super().attend_fast(q, k, v, mask)


@register(name="test-speed-causal-only", paper=PAPER, family="A", cost="O(N^2)", exponent=2.0,
          supports=Supports(causal=True, causal_only=True), params=(Param("width", int, 2, low=1),))
class CausalOnly(Dense):
    def __init__(self, dim, heads=8, *, head_dim=None, qkv_bias=True, causal=True, width=2):
        if not causal:
            raise ParameterError("causal: expected True, this one is a scan")
        if width > 2:
            raise ParameterError(f"width: expected at most 2, got {width}")
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal)

    def attend_fast(self, q, k, v, mask):
        if not self.causal or mask is None:
            raise ValueError("measured without its causal mask")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@register(name="test-speed-hog", paper=PAPER, family="A", cost="O(N^2)", exponent=2.0, supports=Supports())
class Hog(Dense):
    def attend_fast(self, q, k, v, mask):
        return super().attend_fast(q, k, v, mask) + torch.ones(40 * 2**20).sum()  # 160 MiB, written


@register(name="test-speed-huge", paper=PAPER, family="A", cost="O(N^2)", exponent=2.0, supports=Supports())
class Huge(Dense):
    def attend_fast(self, q, k, v, mask):
        return super().attend_fast(q, k, v, mask) + torch.empty(2**31).sum()  # 8 GiB of address space


@register(name="test-speed-f64", paper=PAPER, family="A", cost="O(N^2)", exponent=2.0,
          supports=Supports(dtypes=("float64",)))
class Float64Only(Dense):
    pass
'''
PLANTED_NAMES = ("test-speed-grid-kw", "test-speed-grid-axes", "test-speed-broken", "test-speed-sleeper",
                 "test-speed-causal-only", "test-speed-hog", "test-speed-huge", "test-speed-f64")


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """Mechanisms in a module outside attnlab (the worker imports it by name)."""
    (tmp_path / "planted_speed_mechs.py").write_text(textwrap.dedent(PLANTED))
    monkeypatch.syspath_prepend(str(tmp_path))
    import planted_speed_mechs  # noqa: F401  (registers them)

    yield
    for name in PLANTED_NAMES:
        registry.remove(name)
    sys.modules.pop("planted_speed_mechs", None)


def test_planted_grids_errors_timeouts(planted, tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "r.sqlite")
    options = SpeedOptions(lengths=(64, 200), modes=("fwd",), budget_s=1.0, repeats=3, threads=1,
                           memory_budget_bytes=128 * MiB, quiet=True)
    # everything but the sleeper under the default kill limit (2 × 1 + 10 s): the memory hog's verdict
    # is the worker's budget rule (two calls over the budget: over_memory, untimed), never a kill
    run_speed(store, [n for n in PLANTED_NAMES if n != "test-speed-sleeper"], options)
    monkeypatch.setattr(speed, "KILL_SLACK_S", 1.0)  # the sleeper (60 s a call) is killed after 2 × 1 + 1 s
    run_speed(store, ["test-speed-sleeper"], options)
    results = store.results("speed")
    by = {(r.config["mechanism"], r.config["n"]): r for r in results if not r.config["causal"]}
    # softmax, the baseline, is measured at the requested lengths and at the grids' token counts,
    # and causally too, beside the causal-only mechanism
    assert sorted(n for m, n in by if m == "softmax") == [64, 196, 200]
    causal = {(r.config["mechanism"], r.config["n"]): r for r in results if r.config["causal"]}
    assert sorted(causal) == [("softmax", 64), ("softmax", 196), ("softmax", 200),
                              ("test-speed-causal-only", 64), ("test-speed-causal-only", 200)]
    assert all(r.status == "ok" for r in causal.values())
    ratio = next(r for r in sdpa_ratios(results) if r["mechanism"] == "test-speed-causal-only" and r["n"] == 200)
    assert ratio["causal"] and ratio["ratio"] == pytest.approx(
        causal["test-speed-causal-only", 200].metrics["median_s"] / causal["softmax", 200].metrics["median_s"])
    for name in ("test-speed-grid-kw", "test-speed-grid-axes"):
        assert [(by[name, n].config["grid"], by[name, n].status) for n in (64, 196)] == [([8, 8], "ok"), ([14, 14], "ok")]
        assert all(by[name, n].env["threads"] == 1 for n in (64, 196))
    axes = by["test-speed-grid-axes", 196].metrics
    assert axes["flops"] == 2.0 * 196 * 512**2 and axes["flops_per_s"] == pytest.approx(axes["flops"] / axes["median_s"])
    assert [by["test-speed-broken", n].status for n in (64, 200)] == ["error", "error"]  # the run went on
    assert "RuntimeError: planted failure" in by["test-speed-broken", 200].metrics["note"]
    assert [by["test-speed-f64", n].status for n in (64, 200)] == ["unsupported", "unsupported"]
    assert "float64" in by["test-speed-f64", 64].metrics["note"]
    sleeper = [by["test-speed-sleeper", n] for n in (64, 200)]
    assert [r.status for r in sleeper] == ["over_time", "over_time"]
    assert "killed after" in sleeper[0].metrics["note"] and "N=64" in sleeper[1].metrics["note"]
    # the ratio to SDPA at the grid's token count, from the two measurements
    ratio = next(r for r in sdpa_ratios(results) if r["mechanism"] == "test-speed-grid-kw" and r["n"] == 196)
    expected = by["test-speed-grid-kw", 196].metrics["median_s"] / by["softmax", 196].metrics["median_s"]
    assert ratio["ratio"] == pytest.approx(expected) and ratio["grid"] == [14, 14]
    # memory: measured over the budget (a 160 MiB buffer), or an allocation refused by the worker's limit
    if timing.can_measure_memory():
        hog = [by["test-speed-hog", n] for n in (64, 200)]
        assert [r.status for r in hog] == ["over_memory", "over_memory"], [r.metrics for r in hog]
        assert 159 * MiB <= hog[0].metrics["peak_mem_bytes"] < 176 * MiB and hog[0].metrics["median_s"] is None
        assert "exceeds the memory budget of 128 MiB (not timed)" in hog[0].metrics["note"]
        assert "N=64 was over the memory budget" in hog[1].metrics["note"]
    huge = by["test-speed-huge", 64]
    assert huge.status == "over_memory" and "allocate" in huge.metrics["note"]
    assert store.count("speed") == len(results) == 22 and math.isfinite(expected)
    # a configuration the mechanism refuses to build is unsupported, with its reason
    status, metrics = speed.measure_config({**causal["test-speed-causal-only", 64].config, "params": {"width": 3}},
                                           budget_s=0.5, repeats=1)
    assert status == "unsupported" and "width: expected at most 2" in metrics["note"]


def test_rounds_give_every_series_its_kth_length_before_any_its_next():
    import attnlab

    options = SpeedOptions(lengths=(256, 512, 1024, 2048), modes=("fwd",), lengths_for={"halo": (256, 1024, 4096)})
    names = ["softmax", "linear", "halo"]
    configs = speed.make_configs([attnlab.get("softmax")], options, lengths={"softmax": [256, 512, 1024, 2048, 4096]})
    configs += speed.make_configs([attnlab.get("linear"), attnlab.get("halo")], options)
    rounds = speed._rounds(configs, options.modes, names)
    order = [(c["mechanism"], c["n"]) for _, c in rounds]
    assert [k for k, _ in rounds] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert order == [("softmax", 256), ("linear", 256), ("halo", 256),
                     ("softmax", 512), ("linear", 512),
                     ("softmax", 1024), ("halo", 1024), ("linear", 1024),  # with halo's second N
                     ("softmax", 2048), ("softmax", 4096), ("halo", 4096), ("linear", 2048)]
    # each series still goes up in N (the predictions and the blocking after an over-budget N rely on it)
    for name in names:
        ns = [n for m, n in order if m == name]
        assert ns == sorted(ns)


def test_the_time_limit_does_not_stop_the_first_rounds(tmp_path):
    options = SpeedOptions(lengths=(64, 96, 128), modes=("fwd",), budget_s=1.0, repeats=3, threads=1, quiet=True,
                           total_s=1e-9, min_rounds=2)
    results = run_speed(ResultStore(tmp_path / "r.sqlite"), ["softmax"], options)
    assert [(r.config["n"], r.status) for r in results] == [(64, "ok"), (96, "ok")]  # not 128: the next run's
