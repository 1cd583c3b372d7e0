"""`attnlab bench limits`: attnlab's time beside a peer's and beside what the machine can do, in one run.

    attnlab bench limits [--rows KEY,...] [--rounds 5] [--json PATH] [--db PATH]

Each row of `ROWS` is one piece of work (batch 1, 8 heads, head_dim 64, float32: the attention core
`module.attend` on q, k, v, as `attnlab bench speed` times it) and a bar it must meet:

* "peer"   — attnlab's time / the peer's time <= bar, on the same shapes, outputs (and gradients) checked
             equal first (`attnlab.bench.peers.run.checked_calls`);
* "matmul" — the achieved FLOP rate (the registry's FLOP count) / the matmul rate >= bar;
* "ms"     — the time <= bar milliseconds;
* "ratio"  — the time / the time of a second case (causal / non-causal, fwd+bwd / fwd) <= bar.

Every row also gets its limit: the larger of the time to move its tensors and the time of its FLOPs at
the measured matmul rate; "of limit" is that time over the measured one. Moving the tensors: the ones a
call reads (q, k, v; fwd+bwd also the output and its gradient twice: 8) and the ones it returns (the
output; fwd+bwd also dq, dk, dv: 4), all at the streaming rate — what memory the process holds already
takes. A fresh allocation costs more: writing memory the process has not touched yet costs a page fault
per page too (on a virtual machine several times a streaming write); the figure "fresh" measures it as
`torch.empty(n).fill_(1)` over 128 MiB, "fresh_huge" the same advised into transparent huge pages. The
neighborhood loops avoid it by recycling their large buffers (attnlab.kernels.buffers), as PyTorch's
caching allocator does on CUDA. And every row's attnlab case is
timed on two threads too: "2 threads" is the one-thread time over the two-thread time, with the bar
`TWO_THREADS` for the engines that parallelise (neighborhood, block-sparse, the linear scan).

How it is measured: two worker processes, one pinned to one CPU running one thread (torch and numba),
one pinned to two CPUs running two (the last CPUs this process may use; `taskset -c 1` and
`taskset -c 0,1` on a 2-core machine). The machine's figures first — a 2048³ float32 matmul, a
streaming add c = a + b over 3 × 128 MiB and the first touch of a fresh 128 MiB tensor — then row after row: each round times the attnlab case, the
peer's or second case, and the attnlab case on two threads once each (A B C A B C …, every timing the
median of up to three calls within a second), and a row's figure is the median over `--rounds` rounds
(at least 5). Ratios are taken within a round, then their median. Nothing else should run on the machine;
the load average is printed and stored. Results go to the results store (suite "limits"; the report shows
them) and, with --json, to a file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from ..core.errors import ParameterError
from .env import load_average, run_environment
from .progress import say
from .store import ResultStore

SUITE = "limits"
SHAPE = {"batch": 1, "heads": 8, "head_dim": 64, "dtype": "float32"}
TWO_THREADS = 1.7  # the two-thread speed-up the parallel engines must reach
MIN_ROUNDS = 5
MATMUL_N = 2048
STREAM_FLOATS = 1 << 25  # 128 MiB per float32 tensor: far beyond the caches
MACHINE_FIGURES = ("matmul", "stream", "fresh", "fresh_huge")
STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Case:
    """One timed computation: a registered mechanism's core on q, k, v (impl "attnlab") or a peer's."""

    mechanism: str
    n: int
    mode: str = "fwd"
    causal: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    grid: tuple[int, ...] | None = None
    impl: str = "attnlab"

    def config(self, threads: int) -> dict[str, Any]:
        from .peers.base import natural_params, spec_or_none

        params = natural_params(spec_or_none(self.mechanism), self.params)
        return {**SHAPE, "mechanism": self.mechanism, "n": self.n, "mode": self.mode, "causal": self.causal,
                "params": params, "grid": list(self.grid) if self.grid else None, "impl": self.impl,
                "threads": threads}


@dataclass(frozen=True)
class Row:
    """One line of the table: the work, its bar (kind "peer" | "matmul" | "ms" | "ratio") and, for "peer" and
    "ratio", the case it is compared with; `engine` names the parallel engine the two-thread bar applies to."""

    key: str
    work: str
    case: Case
    bar_kind: str
    bar: float
    other: Case | None = None
    engine: str | None = None


def _nb(n: int, kernel: int, grid: tuple[int, ...] | None = None, mode: str = "fwd") -> Case:
    return Case("neighborhood", n, mode, params={"kernel_size": kernel}, grid=grid)


_LAT = "linear-attention-transformer"
ROWS: tuple[Row, ...] = (
    Row("efficient-4k", "efficient fwd+bwd, N=4,096, vs linear-attention-transformer",
        Case("efficient", 4096, "fwd+bwd"), "peer", 1.0, Case("efficient", 4096, "fwd+bwd", impl=_LAT)),
    Row("efficient-16k", "efficient fwd+bwd, N=16,384, vs linear-attention-transformer",
        Case("efficient", 16384, "fwd+bwd"), "peer", 1.0, Case("efficient", 16384, "fwd+bwd", impl=_LAT)),
    Row("sliding-window-16k", "sliding-window radius 256, causal fwd, N=16,384, vs compiled FlexAttention",
        Case("sliding-window", 16384, causal=True, params={"radius": 256}), "peer", 1.0,
        Case("sliding-window", 16384, causal=True, params={"radius": 256}, impl="flex"), engine="block-sparse"),
    Row("linear-causal-16k", "linear (chunked) causal fwd, N=16,384: share of the matmul rate",
        Case("linear", 16384, causal=True), "matmul", 0.30, engine="linear scan"),
    Row("linear-causal-65k", "linear (chunked) causal fwd, N=65,536: share of the matmul rate",
        Case("linear", 65536, causal=True), "matmul", 0.30, engine="linear scan"),
    Row("linear-causal-vs-not-65k", "linear fwd+bwd, N=65,536: causal / non-causal",
        Case("linear", 65536, "fwd+bwd", causal=True), "ratio", 1.5, Case("linear", 65536, "fwd+bwd"),
        engine="linear scan"),
    Row("neighborhood-1d-7", "neighborhood 1-D fwd, N=65,536, kernel 7", _nb(65536, 7), "ms", 100.0,
        engine="neighborhood"),
    Row("neighborhood-1d-65", "neighborhood 1-D fwd, N=65,536, kernel 65", _nb(65536, 65), "ms", 150.0,
        engine="neighborhood"),
    Row("neighborhood-2d-7", "neighborhood 2-D fwd, 64×64, kernel 7×7", _nb(4096, 7, (64, 64)), "ms", 25.0,
        engine="neighborhood"),
    Row("neighborhood-2d-13", "neighborhood 2-D fwd, 64×64, kernel 13×13", _nb(4096, 13, (64, 64)), "ms", 45.0,
        engine="neighborhood"),
    Row("neighborhood-1d-7-bwd", "neighborhood 1-D, N=65,536, kernel 7: fwd+bwd / fwd − 1 (backward / forward)",
        _nb(65536, 7, mode="fwd+bwd"), "bwd", 2.5, _nb(65536, 7), engine="neighborhood"),
    Row("neighborhood-2d-7-bwd", "neighborhood 2-D 64×64, kernel 7×7: backward / forward",
        _nb(4096, 7, (64, 64), "fwd+bwd"), "bwd", 2.5, _nb(4096, 7, (64, 64)), engine="neighborhood"),
)


# -- the worker (child process) -------------------------------------------------------------------
def _machine_call(name: str, size: int) -> tuple[Any, float]:
    """(call, work) of a machine figure: "matmul" of size³ (work in FLOPs), "stream", c = a + b over `size`
    floats each (work in bytes moved), or "fresh", filling a newly allocated tensor of `size` floats (bytes)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if name == "matmul":
        a, b = (torch.randn(size, size, generator=gen) for _ in range(2))
        out = torch.empty(size, size)
        return (lambda: torch.mm(a, b, out=out)), 2.0 * size**3
    if name == "stream":
        a, b = (torch.randn(size, generator=gen) for _ in range(2))
        out = torch.empty(size)
        return (lambda: torch.add(a, b, out=out)), 3.0 * 4 * size
    if name == "fresh":
        return (lambda: torch.empty(size).fill_(1.0)), 4.0 * size
    if name == "fresh_huge":  # the same in transparent huge pages, as the neighborhood loops allocate outputs
        from ..kernels.buffers import fresh

        like = torch.empty(0)
        return (lambda: fresh(like, size).fill_(1.0)), 4.0 * size
    raise ValueError(f"machine figure: expected 'matmul', 'stream', 'fresh' or 'fresh_huge', got {name!r}")


class _Calls:
    """The worker's prepared calls, by id; cleared between rows."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.calls: dict[str, Any] = {}

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        from .peers.registry import all_peers
        from .peers.run import attnlab_call, checked_calls
        from .timing import measure

        op = request["op"]
        if op == "clear":
            self.calls.clear()
            import gc

            gc.collect()
            return {}
        if op == "machine":
            call, work = _machine_call(request["name"], request["size"])
            self.calls[request["name"]] = call
            return {"work": work}
        if op == "prepare":
            config = request["config"]
            start = time.perf_counter()
            if config["impl"] == "attnlab":
                self.calls[request["id"]] = attnlab_call(config)
                self.calls[request["id"]]()  # the warm-up (numba and kernel caches)
                return {"first_s": time.perf_counter() - start}
            peer = all_peers()[config["impl"]]
            why = peer.unsupported(config)
            if why:
                return {"error": why}
            checked = checked_calls(peer, config)
            if not checked.agree:
                return {"error": f"outputs differ from attnlab's by {checked.diff:.3g} > {checked.tolerance:g}"}
            self.calls[request["id"]] = checked.theirs
            return {"first_s": time.perf_counter() - start, "max_abs_diff": checked.diff}
        if op == "time":
            timing = measure(self.calls[request["id"]], warmup=0, repeats=3, budget_s=1.0)
            return {"seconds": timing.median_s, "load": load_average()}
        raise ValueError(f"op: expected clear, machine, prepare or time, got {op!r}")


def worker_main(threads: int) -> int:
    """Serve requests (JSON lines on stdin) with `threads` threads in torch and numba; answers on stdout."""
    import torch

    from ..kernels.compiled import numba_module

    torch.set_num_threads(threads)
    numba = numba_module()
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    calls = _Calls(threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by the timed code stays off the answer channel
    out.write(json.dumps({"ready": True, "cpus": sorted(os.sched_getaffinity(0))}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = calls.handle(request)
        except Exception as err:  # the row is reported failed; the run goes on
            answer = {"error": f"{type(err).__name__}: {err}"[:600]}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


class Worker:
    """A worker process pinned to `cpus`, running `threads` threads."""

    def __init__(self, cpus: Sequence[int], threads: int) -> None:
        self.cpus, self.threads = tuple(cpus), threads
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attnlab.bench.limits", "--worker", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            preexec_fn=lambda: os.sched_setaffinity(0, self.cpus),
        )
        hello = self._read()
        if not hello.get("ready"):
            raise RuntimeError(f"limits worker on CPUs {self.cpus} did not start: {hello}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"limits worker on CPUs {self.cpus} exited (code {self.proc.poll()})")
        return json.loads(line)

    def ask(self, **request: Any) -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- the run (parent) -------------------------------------------------------------------------------
def worker_cpus() -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(the CPU of the one-thread worker, the CPUs of the two-thread worker or None on a one-CPU machine):
    the last CPUs this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[-1],), (tuple(cpus[-2:]) if len(cpus) >= 2 else None)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def machine_figures(one: Worker, two: Worker | None, rounds: int, sizes: Mapping[str, int] | None = None
                    ) -> dict[str, float | None]:
    """GFLOP/s of the matmul, GB/s of the streaming add and of the first touch, on one thread and on two,
    interleaved; `sizes`: the matmul's side and the floats per tensor of the others (default MATMUL_N,
    STREAM_FLOATS)."""
    sizes = {"matmul": MATMUL_N, "stream": STREAM_FLOATS, "fresh": STREAM_FLOATS, "fresh_huge": STREAM_FLOATS,
             **(sizes or {})}
    workers = {"1": one, "2": two}
    work: dict[str, float] = {}
    for w in (one, two):
        if w is not None:
            for name in MACHINE_FIGURES:
                work[name] = w.ask(op="machine", name=name, size=sizes[name])["work"]
    times: dict[str, list[float]] = {f"{name}_{t}": [] for name in MACHINE_FIGURES for t in workers}
    for _ in range(rounds):
        for name in MACHINE_FIGURES:
            for t, w in workers.items():
                if w is not None:
                    times[f"{name}_{t}"].append(w.ask(op="time", id=name)["seconds"])
    for w in (one, two):
        if w is not None:
            w.ask(op="clear")
    out: dict[str, float | None] = {}
    for key, values in times.items():
        median = _median(values)
        out[f"{key}_{'gflops' if key.startswith('matmul') else 'gbs'}"] = (
            work[key.rsplit("_", 1)[0]] / median / 1e9 if median else None)
    return out


@dataclass
class RowResult:
    key: str
    work: str
    bar_kind: str
    bar: float
    engine: str | None
    ms: float | None = None  # attnlab, one thread
    other_ms: float | None = None  # the peer's or the second case's, one thread
    two_threads_ms: float | None = None
    value: float | None = None  # what the bar is about (a ratio, a share, ms)
    speedup: float | None = None  # one-thread time / two-thread time (median of per-round ratios)
    limit_ms: float | None = None
    of_limit: float | None = None
    gflops: float | None = None
    passed: bool | None = None
    two_threads_passed: bool | None = None
    note: str = ""
    load: list[float] = field(default_factory=list)


def _flops(case: Case) -> float | None:
    from .peers.base import spec_or_none
    from .speed_worker import flops_of

    spec = spec_or_none(case.mechanism)
    return flops_of(spec, case.config(1)) if spec is not None else None


def limit_seconds(case: Case, machine: Mapping[str, float | None]) -> float | None:
    """The larger of the time to move the case's tensors (those read and those returned, at the streaming
    rate) and the time of its FLOPs at the matmul rate."""
    moved = 12 if case.mode == "fwd+bwd" else 4
    tensor_bytes = SHAPE["batch"] * SHAPE["heads"] * case.n * SHAPE["head_dim"] * 4
    stream, matmul = machine.get("stream_1_gbs"), machine.get("matmul_1_gflops")
    flops = _flops(case)
    candidates = [moved * tensor_bytes / (stream * 1e9)] if stream else []
    if flops and matmul:
        candidates.append(flops / (matmul * 1e9))
    return max(candidates) if candidates else None


def _verdict(row: Row, result: RowResult, machine: Mapping[str, float | None],
             ratios: list[float], speedups: list[float]) -> None:
    result.speedup = _median(speedups)
    if row.engine is not None and result.speedup is not None:
        result.two_threads_passed = result.speedup >= TWO_THREADS
    if result.ms is None:
        return
    seconds = result.ms / 1e3
    flops = _flops(row.case)
    if flops:
        result.gflops = flops / seconds / 1e9
    limit = limit_seconds(row.case, machine)
    if limit is not None:
        result.limit_ms, result.of_limit = limit * 1e3, limit / seconds
    if row.bar_kind == "ms":
        result.value = result.ms
        result.passed = result.ms <= row.bar
    elif row.bar_kind == "matmul":
        matmul = machine.get("matmul_1_gflops")
        if result.gflops is not None and matmul:
            result.value = result.gflops / matmul
            result.passed = result.value >= row.bar
    elif row.bar_kind == "bwd":
        value = _median([r - 1.0 for r in ratios])  # fwd+bwd / fwd − 1 = backward / forward
        result.value = value
        result.passed = value is not None and value <= row.bar
    else:  # peer, ratio
        result.value = _median(ratios)
        result.passed = result.value is not None and result.value <= row.bar


def measure_row(row: Row, one: Worker, two: Worker | None, rounds: int,
                machine: Mapping[str, float | None]) -> RowResult:
    """Prepare the row's cases in the workers, then `rounds` interleaved rounds."""
    result = RowResult(row.key, row.work, row.bar_kind, row.bar, row.engine)
    try:
        prepared = one.ask(op="prepare", id="case", config=row.case.config(1))
        if "error" in prepared:
            result.note = f"attnlab: {prepared['error']}"
            return result
        if row.other is not None:
            other = one.ask(op="prepare", id="other", config=row.other.config(1))
            if "error" in other:
                result.note = f"{row.other.impl if row.other.impl != 'attnlab' else 'second case'}: {other['error']}"
                return result
            if "max_abs_diff" in other:
                result.note = f"outputs checked equal first (largest difference {other['max_abs_diff']:.2g})"
        if two is not None and "error" in two.ask(op="prepare", id="case", config=row.case.config(2)):
            two = None
        times: dict[str, list[float]] = {"case": [], "other": [], "two": []}
        ratios, speedups = [], []
        for _ in range(rounds):
            answer = one.ask(op="time", id="case")
            times["case"].append(answer["seconds"])
            result.load.append(answer["load"])
            if row.other is not None:
                times["other"].append(one.ask(op="time", id="other")["seconds"])
                ratios.append(times["case"][-1] / times["other"][-1])
            if two is not None:
                times["two"].append(two.ask(op="time", id="case")["seconds"])
                speedups.append(times["case"][-1] / times["two"][-1])
    finally:
        one.ask(op="clear")
        if two is not None:
            two.ask(op="clear")
    ms = {key: (_median(values) or 0.0) * 1e3 or None for key, values in times.items()}
    result.ms, result.other_ms, result.two_threads_ms = ms["case"], ms["other"], ms["two"]
    _verdict(row, result, machine, ratios, speedups)
    return result


def select_rows(keys: Sequence[str] | None) -> list[Row]:
    """The rows named by `keys` (all when None), in table order; unknown keys raise naming the known ones."""
    if not keys:
        return list(ROWS)
    known = {row.key: row for row in ROWS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ParameterError(f"--rows: expected keys among {', '.join(known)}, got {', '.join(unknown)}")
    return [row for row in ROWS if row.key in keys]


def run_limits(rows: Sequence[Row], rounds: int = MIN_ROUNDS, *, machine_sizes: Mapping[str, int] | None = None
               ) -> tuple[dict[str, Any], list[RowResult]]:
    """(the machine's figures and the run's environment, one result per row); `machine_sizes` as in
    `machine_figures`."""
    if rounds < MIN_ROUNDS:
        raise ParameterError(f"--rounds: expected at least {MIN_ROUNDS} (medians of >= 5 interleaved rounds), got {rounds}")
    one_cpus, two_cpus = worker_cpus()
    say(f"limits: one-thread worker on CPU {one_cpus[0]}, two-thread worker on CPUs "
        f"{','.join(map(str, two_cpus)) if two_cpus else '- (one CPU here: no two-thread figures)'}; "
        f"load {load_average()}")
    one = Worker(one_cpus, 1)
    two = Worker(two_cpus, 2) if two_cpus else None
    results = []
    try:
        machine = machine_figures(one, two, rounds, machine_sizes)
        say("limits: matmul " + ", ".join(f"{machine[f'matmul_{t}_gflops'] or 0:.0f} GFLOP/s ({t} thr)" for t in "12")
            + "; stream " + ", ".join(f"{machine[f'stream_{t}_gbs'] or 0:.1f} GB/s ({t} thr)" for t in "12")
            + "; first touch " + ", ".join(f"{machine[f'fresh_{t}_gbs'] or 0:.1f} GB/s ({t} thr)" for t in "12")
            + f" ({machine['fresh_huge_1_gbs'] or 0:.1f} GB/s in huge pages, 1 thr)")
        for i, row in enumerate(rows, 1):
            start = time.perf_counter()
            results.append(measure_row(row, one, two, rounds, machine))
            say(f"limits [{i}/{len(rows)}] {row.key}: {time.perf_counter() - start:.0f} s")
    finally:
        one.close()
        if two is not None:
            two.close()
    env = run_environment(matmul=False)
    env.update(machine, rounds=rounds, one_thread_cpus=list(one_cpus), two_thread_cpus=list(two_cpus or ()))
    return env, results


# -- output -----------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


BAR_TEXT = {"peer": "≤ {:g}× the peer", "matmul": "≥ {:.0%} of matmul", "ms": "≤ {:g} ms",
            "ratio": "≤ {:g}×", "bwd": "bwd/fwd ≤ {:g}"}


def limit_value_text(row: Mapping[str, Any]) -> str:
    """The value a row's bar is about, as text: a share in %, milliseconds, or a ratio."""
    value, kind = row.get("value"), row["bar_kind"]
    if kind == "matmul":
        return _num(value * 100 if value is not None else None, ".0f") + "%"
    if kind == "ms":
        return _num(value, ".0f") + " ms"
    return _num(value, ".2f") + ("×" if kind != "bwd" else "")


def value_text(r: RowResult) -> str:
    return limit_value_text(asdict(r))


def table_text(env: Mapping[str, Any], results: Sequence[RowResult]) -> str:
    """The table as text: machine figures, then one line per row."""
    head = (f"machine: matmul {_num(env.get('matmul_1_gflops'), '.0f')} GFLOP/s on 1 thread, "
            f"{_num(env.get('matmul_2_gflops'), '.0f')} on 2; stream {_num(env.get('stream_1_gbs'), '.1f')} GB/s on 1 "
            f"thread, {_num(env.get('stream_2_gbs'), '.1f')} on 2; first touch of fresh memory "
            f"{_num(env.get('fresh_1_gbs'), '.1f')} GB/s on 1 thread, {_num(env.get('fresh_2_gbs'), '.1f')} on 2 "
            f"({_num(env.get('fresh_huge_1_gbs'), '.1f')} in transparent huge pages); medians of {env.get('rounds')} interleaved rounds; "
            f"load {env.get('load_1m')}")
    columns = ("row", "attnlab ms", "other ms", "value", "bar", "met", "of limit", "2 threads", "≥ 1.7×")
    cells = []
    for r in results:
        met = "-" if r.passed is None else "yes" if r.passed else "NO"
        met2 = "-" if r.two_threads_passed is None else "yes" if r.two_threads_passed else "NO"
        cells.append([
            r.key, _num(r.ms, ".1f"), _num(r.other_ms, ".1f"), value_text(r), BAR_TEXT[r.bar_kind].format(r.bar), met,
            _num(r.of_limit * 100 if r.of_limit is not None else None, ".0f") + "%", _num(r.speedup, ".2f") + "×", met2,
        ])
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *cells)]
    lines = [head, "", "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for r, row in zip(results, cells):
        note = f"  ({r.note})" if r.note and r.passed is None else ""
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + note)
    failed = [r.key for r in results if r.passed is False or r.two_threads_passed is False]
    lines += ["", f"bars met: {sum(r.passed is True for r in results)}/{len(results)} rows, two threads "
              f"{sum(r.two_threads_passed is True for r in results)}/{sum(r.engine is not None for r in results)}"
              + (f"; not met: {', '.join(failed)}" if failed else "")]
    return "\n".join(lines)


def store_results(store: ResultStore, env: Mapping[str, Any], results: Sequence[RowResult], rows: Sequence[Row]) -> None:
    """Each row's result in the store (suite "limits", keyed by the row and its cases), replacing an older one."""
    by_key = {row.key: row for row in rows}
    for r in results:
        row = by_key[r.key]
        config = {"row": r.key, "case": asdict(row.case), "other": asdict(row.other) if row.other else None}
        status = "ok" if r.ms is not None else "error"
        store.record(SUITE, json.loads(json.dumps(config, default=list)), status, asdict(r), dict(env), replace=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default=None, help="comma-separated row keys (default: all): " + ", ".join(r.key for r in ROWS))
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f"interleaved rounds (at least {MIN_ROUNDS})")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the machine figures and rows as JSON")


def run_command(args: argparse.Namespace, store: ResultStore) -> int:
    rows = select_rows(args.rows.split(",") if args.rows else None)
    env, results = run_limits(rows, args.rounds)
    store_results(store, env, results, rows)
    print(table_text(env, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(int(sys.argv[2])))
    sys.exit("usage: attnlab bench limits (this module's --worker mode is started by it)")
