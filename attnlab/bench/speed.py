"""`attnlab bench speed`: time and peak memory of every mechanism against N.

Configurations are mechanisms × lengths × modes ("fwd", "fwd+bwd") at one dtype and
causal flag; each is measured in a worker process (`python -m attnlab.bench.speed
--worker`) under a time and a memory budget, which are part of the configuration. What
is timed, the budget rules, the worker and the peak-memory probe are described in
docs/bench.md ("Speed: what is measured, and how"); the comparison rules (which results
may be compared, ratios, exponents, flags) are `attnlab.bench.compare`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any

import torch

from ..catalogue import import_modules, imported_modules
from ..core.errors import ParameterError, UnknownNameError
from ..core.module import Attention
from ..core.registry import BATCH_FIRST_PARAM, CAUSAL_PARAM, COMMON_PARAMS, Spec, get
from .compare import BASELINE as BASELINE  # (re-exported: the reference of every ratio)
from .compare import fit_exponents as fit_exponents  # (re-exported)
from .compare import flags, loglog_slope, spread
from .compare import sdpa_ratios as sdpa_ratios  # (re-exported)
from .env import load_average, new_run_id, run_environment
from .progress import progress, say
from .store import Result, ResultStore, canonical, config_hash
from .timing import MMAP_THRESHOLD_ENV, measure, peak_memory

SUITE = "speed"
MODES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
BACKWARD_FLOPS_FACTOR = 3.0  # forward + backward ≈ 3 × forward
TARGET_S = 1.0  # timed calls stop once this is spent and three are made
STARTUP_TIMEOUT_S = 180.0
KILL_SLACK_S = 10.0  # beyond twice the budget before a configuration is killed
MEMORY_SLACK_BYTES = 1 << 30  # address space allowed beyond the memory budget before allocations fail
Series = tuple[str, str, bool]  # (mechanism, mode, causal)
_COMMON_NAMES = {p.name for p in COMMON_PARAMS} | {CAUSAL_PARAM.name, BATCH_FIRST_PARAM.name}  # set by the harness
_ALLOC_FAILURE = re.compile(r"can't allocate memory|not enough memory|out of memory|cannot allocate", re.IGNORECASE)


def machine_memory_bytes() -> int:
    """Physical memory of the machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class SpeedOptions:
    """What a speed run measures and its budgets (time per configuration, peak memory)."""

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    modes: tuple[str, ...] = MODES
    dtype: str = "float32"
    causal: bool = False
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    threads: int | None = None  # None: torch's default
    budget_s: float = 10.0
    memory_budget_bytes: int = field(default_factory=lambda: machine_memory_bytes() // 2)
    repeats: int = 20  # at most this many timed calls
    total_s: float | None = None  # start no configuration after this many seconds (the rest: next run)
    rerun: bool = False
    quiet: bool = False
    run_id: str | None = None  # the run's id (default: a new one per run_speed call)
    lengths_for: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # mechanism -> its own lengths
    min_rounds: int = 0  # total_s does not stop the first rounds (each series' first N): 3 fit an exponent
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # mechanism -> its --param values

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths: expected positive integers, got {list(self.lengths)}")
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"modes: expected some of {list(MODES)}, got {list(self.modes)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        for name in ("batch", "heads", "head_dim", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected >= 1, got {self.threads}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s: expected > 0 seconds, got {self.budget_s}")
        if self.total_s is not None and self.total_s <= 0:
            raise ValueError(f"total_s: expected > 0 seconds or None, got {self.total_s}")
        if self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes: expected > 0, got {self.memory_budget_bytes}")

    def budget(self) -> dict[str, Any]:
        """The caps that can change a result, part of every configuration: seconds per configuration,
        timed calls at most, peak memory."""
        return {"time_s": self.budget_s, "repeats": self.repeats, "memory_bytes": self.memory_budget_bytes}

    def resolved_threads(self) -> int:
        return self.threads if self.threads is not None else torch.get_num_threads()


# -- configurations -------------------------------------------------------------------
def grid_for(n: int, rank: int) -> list[int]:
    """The rank-D cube grid whose token count is nearest to n: grid_for(8192, 2) == [91, 91]."""
    low = max(1, math.floor(n ** (1.0 / rank)))
    while (low + 1) ** rank <= n:  # guard against float rounding of the root
        low += 1
    side = min((low, low + 1), key=lambda s: (abs(s**rank - n), s))
    return [side] * rank


def grid_rank(spec: Spec) -> int:
    """1 for a mechanism of token sequences, else the smallest grid rank it supports."""
    grids = spec.supports.grids if spec.supports is not None else (1,)
    return 1 if 1 in grids else min(grids)


def bench_params(spec: Spec, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The mechanism's own parameters for the benchmark: defaults, the test value of required ones,
    then `overrides` (a user's `--param`, checked by `parse_params`).

    A required parameter without a value in the registry's `test_params` is left out
    (building the module then fails and the configuration is recorded as an error).
    """
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.name in _COMMON_NAMES:
            continue
        if not p.required:
            out[p.name] = p.default
        elif p.name in spec.test_params:
            out[p.name] = spec.test_params[p.name]
    out.update(overrides or {})
    return json.loads(canonical(out))  # tuples -> lists, as stored


def import_user_modules(names: Sequence[str] | None) -> None:
    """Import a user's `--import` modules not imported yet in this process (a .py file runs once)."""
    import_modules([name for name in names or () if name not in imported_modules()])


def parse_params(items: Sequence[str], mechanisms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--param MECHANISM.NAME=VALUE` items -> {mechanism: {name: value}}, each checked by its registry Param.

    VALUE is read as JSON (`64`, `0.5`, `true`, `[2, 4]`, `null`), else taken as a string. The
    mechanism must be among `mechanisms` (those the run measures); the width, heads and causal
    flag are the benchmark's own options, not parameters. Errors are ParameterError naming the item.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, text = item.partition("=")
        mechanism, dot, name = head.strip().rpartition(".")
        if not eq or not dot or not mechanism or not name:
            raise ParameterError(f"--param: expected MECHANISM.NAME=VALUE (e.g. sliding-window.window=64), got {item!r}")
        if mechanism not in mechanisms:
            raise ParameterError(
                f"--param: expected one of the measured mechanisms ({', '.join(mechanisms)}), got {mechanism!r} in {item!r}"
            )
        spec = get(mechanism)
        if name in _COMMON_NAMES:
            raise ParameterError(f"--param: {name!r} is set by the benchmark's own options, not per mechanism ({item!r})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        checked = spec.param(name).validate(spec.name, value)  # ParameterError: unknown name, type, range
        out.setdefault(mechanism, {})[name] = json.loads(canonical(checked))
    return out


def make_configs(specs: Sequence[Spec], options: SpeedOptions, *, lengths: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """The configurations of a run, series by series (mechanism, mode), lengths increasing.

    `lengths` (then `options.lengths_for`) overrides `options.lengths` for some mechanisms. A mechanism that runs only
    causally is measured causally whatever `options.causal` says (its config says so).
    A mechanism whose keys are summaries gets "n_keys", the keys its core attends to (None
    where it refuses the grid, or cannot be built).
    """
    threads = options.resolved_threads()
    out = []
    for spec in specs:
        causal = options.causal or causal_only(spec)
        rank = grid_rank(spec)
        params = bench_params(spec, options.params.get(spec.name))
        ns = (lengths or {}).get(spec.name) or options.lengths_for.get(spec.name) or options.lengths
        module = None
        if summary_keys(spec):
            try:
                module = build_module(spec, params, options.heads, options.head_dim, causal)
            except ParameterError:
                pass  # the worker says why ("unsupported")
        for mode in options.modes:
            seen = set()
            for n in sorted(ns):
                grid = grid_for(n, rank) if rank > 1 else None
                tokens = math.prod(grid) if grid else n
                if tokens in seen:
                    continue
                seen.add(tokens)
                config = {
                    "mechanism": spec.name, "impl": "attnlab", "params": params, "n": tokens, "grid": grid,
                    "mode": mode, "causal": causal, "dtype": options.dtype, "batch": options.batch,
                    "heads": options.heads, "head_dim": options.head_dim, "threads": threads,
                    "budget": options.budget(),
                }
                if summary_keys(spec):
                    config["n_keys"] = None
                    if module is not None:
                        with contextlib.suppress(ParameterError):
                            config["n_keys"] = key_count(spec, module, grid or [tokens])
                out.append(config)
    return out


def summary_keys(spec: Spec) -> bool:
    """Whether the mechanism's keys are summaries of the tokens, `key_count(grid)` of them (registry)."""
    return spec.supports is not None and spec.supports.summary_keys


def build_module(spec: Spec, params: Mapping[str, Any], heads: int, head_dim: int, causal: bool) -> Any:
    """The mechanism at the benchmark's width (heads · head_dim), with its benchmark parameters."""
    kwargs = {"dim": heads * head_dim, "heads": heads, "head_dim": head_dim, **params}
    if spec.supports is not None and spec.supports.causal:
        kwargs["causal"] = causal
    return spec.build(**kwargs)


def key_count(spec: Spec, module: Any, positions: Sequence[int]) -> int:
    """The number of keys the core of a summary-key mechanism attends to on `positions` (its grid, or
    (n,)); ParameterError (the configuration is "unsupported") when the mechanism refuses the grid."""
    try:
        return int(module.key_count(tuple(positions)))
    except ValueError as err:
        raise ParameterError(str(err)) from err


def causal_only(spec: Spec) -> bool:
    """Whether the mechanism runs only causally (a scan, say), as its registry entry declares."""
    return spec.supports is not None and spec.supports.causal_only


def unsupported(spec: Spec, config: Mapping[str, Any]) -> str | None:
    """Why `spec` cannot run `config`, or None."""
    supports = spec.supports
    if supports is None:
        return None
    if config["causal"] and not supports.causal:
        return f"{spec.name} has no causal mode"
    if config["dtype"] not in supports.dtypes:
        return f"{spec.name} supports dtypes {', '.join(supports.dtypes)}, not {config['dtype']}"
    return None


def empty_metrics(note: str | None = None, **extra: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "median_s": None, "min_s": None, "max_s": None, "q1_s": None, "q3_s": None, "repeats": 0, "peak_mem_bytes": None,
        "flops": None, "flops_per_s": None, "max_abs_diff": None,
    }
    if note:
        metrics["note"] = note
    metrics.update(extra)
    return metrics


def predict_over_budget(
    config: Mapping[str, Any],
    history: Sequence[tuple[int, Mapping[str, Any]]],
    exponent: float | None,
    budget_s: float,
    memory_budget_bytes: int,
) -> tuple[str, str] | None:
    """(status, note) when `config` would exceed a budget, predicted from the ok N's before it in its series.

    Fixed costs dominate small N, so scaling the last time by (N / N_prev)^declared
    exponent overestimates (it predicted 2.9 s for dense SDPA forward+backward at
    N=1024 from N=256; it took 0.5 s). The prediction therefore scales by the slope
    between the last two ok points, clipped to [1, declared exponent] (1 after a single
    point): a skipped configuration is one that would exceed its budget even so. A
    configuration needs a warm-up and a timed call, so it is over time when twice the
    predicted call exceeds the budget. Peak memory scales linearly from the last point.
    An underestimate costs at most the kill time limit (time) or a failed allocation
    (memory, the worker's address space being limited).
    """
    if not history:
        return None
    prev_n, prev = history[-1]
    high = exponent if exponent is not None else 2.0
    slope = 1.0
    if len(history) >= 2 and history[-2][0] != prev_n:
        slope = loglog_slope([(float(n), m["median_s"]) for n, m in history[-2:]], min_points=2) or 1.0
    slope = min(high, max(1.0, slope))
    ratio = config["n"] / prev_n
    seconds = prev["median_s"] * ratio**slope
    if 2 * seconds > budget_s:
        return "over_time", (
            f"predicted from N={prev_n}: {seconds:.3g} s per call (N^{slope:.2f}); "
            f"warm-up and one call exceed the budget of {budget_s:g} s"
        )
    if prev.get("peak_mem_bytes") is not None and prev["peak_mem_bytes"] * ratio > memory_budget_bytes:
        return "over_memory", (
            f"predicted from N={prev_n}: peak {prev['peak_mem_bytes'] * ratio / 2**20:.0f} MiB or more "
            f"exceeds the budget of {memory_budget_bytes / 2**20:.0f} MiB"
        )
    return None


# -- the worker (child process) ---------------------------------------------------------
def _spec(name: str, module: str | None) -> Spec:
    try:
        return get(name)
    except UnknownNameError:
        if not module:
            raise
        importlib.import_module(module)  # a mechanism registered outside attnlab/mechanisms
        return get(name)


def prepare_call(spec: Spec, config: Mapping[str, Any]) -> Callable[[], Any]:
    """The function one timed call runs, with the module and inputs of `config` built."""
    dtype = getattr(torch, config["dtype"])
    batch, heads, head_dim, n, grid = config["batch"], config["heads"], config["head_dim"], config["n"], config["grid"]
    torch.manual_seed(0)
    module = build_module(spec, config["params"], heads, head_dim, config["causal"]).to(dtype)
    target = module.attend if isinstance(module, Attention) else module
    takes_grid = grid is not None and "grid" in inspect.signature(target).parameters
    positions = tuple(grid) if grid is not None and not takes_grid else (n,)
    if isinstance(module, Attention):
        # the widths `attend` takes are those `project` makes (head_dim, or more: based's q, k
        # carry [window | Taylor] channels)
        with torch.no_grad():
            probe = module.project(torch.zeros(1, 1, module.dim, dtype=dtype))
        shapes = [(batch, heads, *positions, t.shape[-1]) for t in probe]
        if summary_keys(spec):  # k and v: the keys the core really attends to, flat
            n_keys = key_count(spec, module, grid or [n])
            if config.get("n_keys", n_keys) != n_keys:
                raise ValueError(f"config: n_keys {config['n_keys']}, but {spec.name} makes {n_keys} keys of {grid or [n]}")
            shapes[1:] = [(batch, heads, n_keys, t.shape[-1]) for t in probe[1:]]
    else:
        shapes = [(batch, *positions, heads * head_dim)]
    backward = config["mode"] == "fwd+bwd"
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).requires_grad_(backward) for s in shapes]
    extra = {"grid": tuple(grid)} if takes_grid else {}

    if not backward:
        def forward() -> Any:
            with torch.no_grad():
                return target(*inputs, **extra)

        return forward

    leaves = inputs + [p for p in module.parameters() if p.requires_grad]
    grad: list[torch.Tensor] = []

    def forward_backward() -> None:
        for t in leaves:
            t.grad = None
        out = target(*inputs, **extra)
        if not grad:  # a fixed random output gradient, drawn at the first (warm-up) call
            grad.append(torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.dtype))
        out.backward(grad[0])

    return forward_backward


def flops_of(spec: Spec, config: Mapping[str, Any]) -> float | None:
    """FLOPs of one call of `config`, or None when the registry declares none."""
    if spec.flops is None:
        return None
    fwd = spec.flops(config["n"], config["heads"], config["head_dim"], config["causal"]) * config["batch"]
    return fwd * (BACKWARD_FLOPS_FACTOR if config["mode"] == "fwd+bwd" else 1.0)


def measure_config(
    config: Mapping[str, Any],
    *,
    budget_s: float,
    repeats: int,
    module: str | None = None,
    memory_budget_bytes: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """Measure one configuration in this process: (status, metrics).

    A warm-up call, then timed calls until `repeats` are made, or TARGET_S (1 s) is
    spent with three made, or the next would take the configuration past `budget_s`;
    the first timed call also gives the peak memory. With `memory_budget_bytes`, the
    warm-up's peak is read too: when it and a second call's both exceed the budget, the
    configuration is "over_memory" at once, without timed calls (so that the verdict is
    the budget rule's, whatever the machine's speed).
    """
    try:
        spec = _spec(config["mechanism"], module)
        why = unsupported(spec, config)
        if why:
            return "unsupported", empty_metrics(why)
        try:
            fn = prepare_call(spec, config)
        except ParameterError as err:  # the mechanism refuses this configuration: not a failure of it
            return "unsupported", empty_metrics(f"{spec.name} cannot be built so: {err}"[:600], budget_s=budget_s)
        warmup = 1
        if memory_budget_bytes is not None:
            warmup = 0
            peak = peak_memory(fn)  # the warm-up (its peak includes code loaded on first use)
            if peak is not None and peak > memory_budget_bytes:
                peak = peak_memory(fn)
                if peak is not None and peak > memory_budget_bytes:
                    return "over_memory", empty_metrics(
                        f"peak {peak / 2**20:.0f} MiB exceeds the memory budget of "
                        f"{memory_budget_bytes / 2**20:.0f} MiB (not timed)",
                        budget_s=budget_s, peak_mem_bytes=peak, load_1m=load_average(),
                    )
        timing = measure(fn, warmup=warmup, repeats=repeats, budget_s=min(TARGET_S, budget_s), limit_s=budget_s,
                         memory=True)
        peak = timing.peak_mem_bytes
    except Exception as err:  # the run goes on; the message is the result
        message = f"{type(err).__name__}: {err}"[:600]
        status = "over_memory" if isinstance(err, MemoryError) or _ALLOC_FAILURE.search(str(err)) else "error"
        return status, empty_metrics(message, budget_s=budget_s)
    finally:
        gc.collect()
    flops = flops_of(spec, config)
    metrics = empty_metrics(
        None if peak is not None else "peak memory not measured: /proc/self/clear_refs is not writable here",
        budget_s=budget_s,
    )
    metrics.update(
        median_s=timing.median_s, repeats=timing.repeats, **spread(timing.times),
        times_s=[float(f"{t:.6g}") for t in timing.times],
        peak_mem_bytes=peak, flops=flops, flops_per_s=flops / timing.median_s if flops else None,
        load_1m=load_average(),  # other work on the machine slows the measurement; say how much there was
    )
    return "ok", metrics


def _limit_address_space(extra_bytes: int) -> None:
    """Make allocations beyond the current address space + `extra_bytes` (+1 GiB) fail in this process
    (MemoryError, or torch's "can't allocate memory"), rather than exhaust the machine."""
    import resource

    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm_size + extra_bytes + MEMORY_SLACK_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def worker_main(argv: Sequence[str]) -> int:
    """Serve measurement requests: JSON lines on stdin -> JSON lines on stdout."""
    parser = argparse.ArgumentParser(prog="python -m attnlab.bench.speed")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--memory-limit", type=int, default=None, help="bytes of address space beyond the start")
    args = parser.parse_args(argv)
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, not into the protocol
    torch.set_num_threads(args.threads)
    import attnlab.mechanisms  # noqa: F401  (registers the built-in mechanisms)

    torch.randn(256, 256) @ torch.randn(256, 256)  # start the thread pool before the first measurement
    hello = json.loads(sys.stdin.readline() or "{}")
    sys.path.extend(p for p in hello.get("sys_path", []) if p not in sys.path)
    import_user_modules(hello.get("imports", []))  # a user's --import modules, before any mechanism is resolved
    if args.memory_limit is not None and sys.platform.startswith("linux"):
        _limit_address_space(args.memory_limit)

    def send(obj: Mapping[str, Any]) -> None:
        channel.write(canonical(obj) + "\n")
        channel.flush()

    send({"ready": True, "env": run_environment(hello.get("run_id"))})  # with the matmul rate at these threads
    gc.freeze()  # what is loaded now stays: the collection after each configuration skips it (0.3 s -> ms)
    for line in sys.stdin:
        request = json.loads(line)
        status, metrics = measure_config(
            request["config"], budget_s=request["budget_s"], repeats=request["repeats"], module=request.get("module"),
            memory_budget_bytes=request.get("memory_budget_bytes"),
        )
        send({"status": status, "metrics": metrics})
    return 0


# -- the parent's side --------------------------------------------------------------------
class WorkerDied(RuntimeError):
    """The worker process ended without answering."""


class Worker:
    """A measurement process and the pipe to it."""

    def __init__(self, threads: int, memory_limit: int | None, run_id: str | None = None) -> None:
        cmd = [sys.executable, "-m", "attnlab.bench.speed", "--worker", "--threads", str(threads)]
        if memory_limit is not None:
            cmd += ["--memory-limit", str(memory_limit)]
        self.errors: IO[str] = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
            env={**os.environ, **MMAP_THRESHOLD_ENV},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._send({"sys_path": [p for p in sys.path if p], "imports": imported_modules(), "run_id": run_id})
        hello = self.receive(STARTUP_TIMEOUT_S)
        if hello is None:
            self.kill()
            raise WorkerDied(f"the speed worker did not start within {STARTUP_TIMEOUT_S:g} s")
        self.env: dict[str, Any] = hello["env"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _send(self, obj: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(canonical(obj) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone; receive() reports it

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next message, None after `timeout` seconds; WorkerDied when the worker ended."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            code = self.proc.wait()
            raise WorkerDied(f"the speed worker exited with status {code}: {self.stderr_tail()}")
        return json.loads(line)

    def request(
        self, config: Mapping[str, Any], *, budget_s: float, repeats: int, module: str, timeout: float,
        memory_budget_bytes: int | None = None,
    ) -> dict[str, Any] | None:
        self._send({"config": config, "budget_s": budget_s, "repeats": repeats, "module": module,
                    "memory_budget_bytes": memory_budget_bytes})
        return self.receive(timeout)

    def stderr_tail(self, chars: int = 400) -> str:
        self.errors.seek(0)
        return " ".join(self.errors.read()[-chars:].split()) or "(no output)"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.errors.close()

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rounds(
    configs: Sequence[dict[str, Any]], modes: Sequence[str], names: Sequence[str]
) -> list[tuple[int, dict[str, Any]]]:
    """`configs` in rounds: the k-th N of every series (mechanism, mode, causal) in round k, the baseline's N in
    the first round another series needs it or a larger N (so each series still goes up in N); within a round
    by N, mode and mechanism. (round, config) pairs."""
    index: dict[int, int] = {}  # id(config) -> its round
    series: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for c in configs:
        series.setdefault((c["mechanism"], c["mode"], c["causal"]), []).append(c)
    first_round: dict[tuple[int, str], int] = {}  # (N, mode) -> the first round a non-baseline series has it
    for (name, _, _), members in series.items():
        for k, c in enumerate(sorted(members, key=lambda c: c["n"])):
            index[id(c)] = k
            if name != BASELINE:
                key = (c["n"], c["mode"])
                first_round[key] = min(first_round.get(key, k), k)
    for (name, _, _), members in series.items():
        if name != BASELINE:
            continue
        soonest = math.inf  # a smaller N of the baseline is never scheduled after a larger one
        for c in sorted(members, key=lambda c: c["n"], reverse=True):
            soonest = min(soonest, index[id(c)], first_round.get((c["n"], c["mode"]), math.inf))
            index[id(c)] = int(soonest)
    ordered = sorted(configs, key=lambda c: (index[id(c)], c["n"], modes.index(c["mode"]), names.index(c["mechanism"])))
    return [(index[id(c)], c) for c in ordered]


def run_speed(store: ResultStore, mechanisms: Sequence[str], options: SpeedOptions) -> list[Result]:
    """Measure `mechanisms` (and "softmax", the baseline) under `options`; the results, series by series.

    Configurations stored already are taken from the store (the budgets are part of a
    configuration), except with `options.rerun`: then a stored result is replaced once its
    new measurement is recorded, in the same transaction (a rerun stopped midway leaves
    it). The run goes round by round: every series (mechanism, mode, causal) at its
    smallest N, then every series at its second N, and so on (the baseline at an N in the
    first round any series needs it), in one worker process restarted only when killed or
    dead, so that a run stopped by `options.total_s` has every mechanism at its first k
    lengths; the configurations it did not reach are not recorded, and the next run
    measures them.
    """
    names = [BASELINE, *(m for m in dict.fromkeys(mechanisms) if m != BASELINE)]
    specs = [get(name) for name in names]
    needed = {math.prod(grid_for(n, grid_rank(s))) for s in specs
              for n in (options.lengths_for.get(s.name) or options.lengths)}
    baseline_lengths = sorted(set(options.lengths) | needed)
    configs = make_configs(specs[:1], options, lengths={BASELINE: baseline_lengths})
    if not options.causal and any(causal_only(s) for s in specs):  # the baseline of causal-only mechanisms
        configs += make_configs(specs[:1], replace(options, causal=True), lengths={BASELINE: baseline_lengths})
    configs += make_configs(specs[1:], options)
    schedule = _rounds(configs, options.modes, names)
    by_name = {s.name: s for s in specs}
    stored = {r.config_hash: r for r in store.results(SUITE)}
    run_id = options.run_id or new_run_id()
    with _threads(options.resolved_threads()):
        parent_env = run_environment(run_id)  # (the env of results decided here, without a measurement)
    run_env: dict[str, Any] | None = None  # the worker's: the same run, start time and load

    _warn_if_loaded(options)
    history: dict[Series, list[tuple[int, Mapping[str, Any]]]] = {}  # series -> its ok (N, metrics)
    blocked: dict[Series, tuple[str, str]] = {}  # series -> (status, note) for larger N
    worker: Worker | None = None
    timeout = 2 * options.budget_s + KILL_SLACK_S
    deadline = None if options.total_s is None else time.monotonic() + options.total_s
    not_reached = 0
    try:
        for k, config in progress(schedule, total=len(schedule), desc="speed", quiet=options.quiet):
            spec, key = by_name[config["mechanism"]], (config["mechanism"], config["mode"], config["causal"])
            h = config_hash(config)
            existing = stored.get(h)
            replace_old = options.rerun  # replaced when the new result is recorded, not before
            if replace_old:
                existing = None
            elif existing is None and store.done(SUITE, config):  # a concurrent run measured it meanwhile
                existing = next(r for r in store.results(SUITE) if r.config_hash == h)
            if existing is not None:
                _follow(key, config, existing.status, existing.metrics, history, blocked)
                continue
            if deadline is not None and time.monotonic() > deadline and k >= options.min_rounds:
                not_reached += 1
                continue
            env = parent_env
            why = unsupported(spec, config)
            skip = ("unsupported", why) if why else blocked.get(key) or predict_over_budget(
                config, history.get(key, []), spec.exponent, options.budget_s, options.memory_budget_bytes
            )
            if skip:
                status, metrics = skip[0], empty_metrics(skip[1])
            else:
                if worker is None:
                    worker = Worker(config["threads"], options.memory_budget_bytes, run_id)
                    run_env = run_env or {**worker.env, **{k: parent_env[k] for k in ("time", "load_1m")}}
                env = run_env
                try:
                    answer = worker.request(
                        config, budget_s=options.budget_s, repeats=options.repeats,
                        module=spec.factory.__module__, timeout=timeout,
                        memory_budget_bytes=options.memory_budget_bytes,
                    )
                except WorkerDied as died:
                    worker.kill()
                    worker = None
                    answer = {"status": "error", "metrics": empty_metrics(str(died))}
                if answer is None:
                    worker.kill()
                    worker = None
                    answer = {"status": "over_time", "metrics": empty_metrics(f"killed after {timeout:g} s")}
                status, metrics = answer["status"], answer["metrics"]
            metrics.setdefault("budget_s", options.budget_s)
            metrics["memory_budget_bytes"] = options.memory_budget_bytes
            if status == "ok" and metrics["peak_mem_bytes"] is not None and metrics["peak_mem_bytes"] > options.memory_budget_bytes:
                status = "over_memory"
                metrics["note"] = f"peak {metrics['peak_mem_bytes'] / 2**20:.0f} MiB exceeds the memory budget"
            if status == "ok":
                metrics["flags"] = flags(metrics, env)
            store.record(SUITE, config, status, metrics, env, replace=replace_old)
            _follow(key, config, status, metrics, history, blocked)
    finally:
        if worker is not None:
            worker.close()
    if not_reached:
        say(f"speed: {not_reached} configurations not reached within {options.total_s:g} s; "
            "run again to measure them", quiet=options.quiet)
    order = {config_hash(c): i for i, c in enumerate(configs)}
    return sorted((r for r in store.results(SUITE) if r.config_hash in order), key=lambda r: order[r.config_hash])


def _warn_if_loaded(options: SpeedOptions) -> None:
    """Say so when other work occupies the machine: timings then are slow and noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        say(f"speed: the load average is {load:.1f} on {cores} cores; timings will be slow and noisy "
            f"(with {options.resolved_threads()} threads every parallel region waits for descheduled threads; "
            "--threads 1 suffers less)", quiet=options.quiet)


def _follow(
    key: Series,
    config: Mapping[str, Any],
    status: str,
    metrics: Mapping[str, Any],
    history: dict[Series, list[tuple[int, Mapping[str, Any]]]],
    blocked: dict[Series, tuple[str, str]],
) -> None:
    """Update a series' state after a result: the last ok N, or what blocks the larger ones."""
    if status == "ok":
        history.setdefault(key, []).append((config["n"], metrics))
    elif status in ("over_time", "over_memory") and key not in blocked:
        what = "time" if status == "over_time" else "memory"
        blocked[key] = (status, f"N={config['n']} was over the {what} budget")


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
