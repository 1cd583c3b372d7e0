"""The speed worker: one process that measures configurations, and the parent's handle on it.

`python -m attnlab.bench.speed --worker` runs `worker_main`: JSON lines on stdin (a hello
with the parent's sys.path, `--import` modules and run id, then one request per
configuration) and JSON lines on stdout (its environment, then (status, metrics) per
request). `measure_config` times one configuration in this process (`prepare_call` builds
the call), `Worker` starts the process and talks to it. What is timed and how peak memory
is read: docs/bench.md ("Speed: what is measured, and how").
"""
from __future__ import annotations

import argparse
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
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import torch

from ..catalogue import imported_modules
from ..core.errors import ParameterError, UnknownNameError
from ..core.module import Attention
from ..core.registry import Spec, module_entry
from .compare import spread
from .env import load_average, run_environment
from .speed_configs import build_module, empty_metrics, import_user_modules, key_count, summary_keys, unsupported
from .store import canonical
from .timing import MMAP_THRESHOLD_ENV, measure, peak_memory

BACKWARD_FLOPS_FACTOR = 3.0  # forward + backward ≈ 3 × forward
TARGET_S = 1.0  # timed calls stop once this is spent and three are made
STARTUP_TIMEOUT_S = 180.0
MEMORY_SLACK_BYTES = 1 << 30  # address space allowed beyond the memory budget before allocations fail
_ALLOC_FAILURE = re.compile(r"can't allocate memory|not enough memory|out of memory|cannot allocate", re.IGNORECASE)


# -- the worker (child process) ---------------------------------------------------------
def _spec(name: str, module: str | None) -> Spec:
    try:
        return module_entry(name)
    except UnknownNameError:
        if not module:
            raise
        importlib.import_module(module)  # a mechanism registered outside attnlab/mechanisms
        return module_entry(name)


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
    elif hasattr(module, "bench_inputs"):  # a module of another input kind (sets, graphs …) makes its inputs
        shapes = []
    else:
        shapes = [(batch, *positions, heads * head_dim)]
    backward = config["mode"] == "fwd+bwd"
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).requires_grad_(backward) for s in shapes]
    extra: dict[str, Any] = {"grid": tuple(grid)} if takes_grid else {}
    if not shapes:  # `bench_inputs(batch, n, dtype, generator)` -> (tensors, keywords): the float tensors are timed inputs
        made, extra = module.bench_inputs(batch, math.prod(positions), dtype, gen)
        inputs = [t.requires_grad_(backward) if t.is_floating_point() else t for t in made]
    if isinstance(module, Attention) and module.takes_side_input:
        # the cores' side input (gates from x, token norms …) made from tokens once, outside the timed call, as
        # q, k and v are: the call times the core, the projections stay out
        with torch.no_grad():
            tokens = torch.randn(batch, math.prod(positions), module.dim, generator=gen, dtype=torch.float32).to(dtype)
            side = module.side_input(tokens)
        if side is not None:
            extra["side"] = side.requires_grad_(backward)

    if not backward:
        def forward() -> Any:
            with torch.no_grad():
                return target(*inputs, **extra)

        return forward

    leaves = [t for t in [*inputs, *extra.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves += [p for p in module.parameters() if p.requires_grad]
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
    taken = inspect.signature(spec.flops).parameters  # a count may also take the mechanism's parameters and the grid
    extra = {key: value for key, value in {**config.get("params", {}), "grid": config.get("grid")}.items()
             if key in taken and value is not None}
    fwd = spec.flops(config["n"], config["heads"], config["head_dim"], config["causal"], **extra) * config["batch"]
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
