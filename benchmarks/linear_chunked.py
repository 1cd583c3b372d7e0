"""Causal linear attention (the "linear" entry's engine form, normalised, chunk 64) beside the machine's matmul rate.

    taskset -c 1 .venv/bin/python benchmarks/linear_chunked.py                   # one thread, N = 16,384 and 65,536
    taskset -c 0,1 .venv/bin/python benchmarks/linear_chunked.py --threads 1 2   # two threads vs one
    .venv/bin/python benchmarks/linear_chunked.py --tokens 4096 --rounds 3        # quick look
    taskset -c 0,1 .venv/bin/python benchmarks/linear_chunked.py --on-cpu         # two threads from on-CPU time

On feature-mapped φ(q), φ(k) >= 0 and v (batch 1, 8 heads, head dim 64, float32), per N and thread
count, timed interleaved (every variant once per round, --rounds rounds, medians): a 2048³ float32
matmul (the machine's matmul rate, measured in the same rounds), the bidirectional form (two
matmuls), the causal form through the numba loops and through the chunked PyTorch form, each
forward only and forward + backward; and, on raw q, k (what the "linear" entry's core receives),
the causal loops with φ = elu + 1 applied inside (feature_map="elu+1") and applied outside first
(`elu_plus_one`, two fresh tensors). Outputs (and, for fwd+bwd, gradients) are checked equal
first. Printed: milliseconds, GFLOP/s of the forward by `linear_flops`, that rate as a fraction of
the matmul rate, and causal / bidirectional fwd+bwd time (issue 14's bars: >= 0.30 and <= 1.5×).

--on-cpu: the two-thread speed-up of the loops (φ = elu + 1 inside, the "linear" entry's core; fwd and
fwd+bwd) from on-CPU times instead of wall times, so that other processes on a shared machine do not
decide it (a wall-clock figure there mostly measures their load: a process's two threads then get
about the CPU time its one thread got). Per call: one thread, the process's CPU time T1; two threads,
the caller's own CPU time (the serial part: checks, allocation, autograd, freeing; it waits without
CPU while the workers run the rows) and the rest of the process's CPU time (the rows, on the two
workers). A quiet machine would take caller + rows × ⌈R/2⌉ / R for R equal rows (the backward's units are each
row's key pass and query pass, R of each), so the speed-up is T1 over that. Stalls (page faults, memory) count
as CPU time; idle OpenMP threads spinning would too, so
the estimate errs low. It cannot see what the guest does not: a second vCPU on the host core's other
hardware thread, or a lower clock with both cores busy.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from attnlab.kernels import compiled
from attnlab.kernels.linear_scan import elu_plus_one, linear_attention, linear_flops

HEADS, HEAD_DIM, CHUNK, MATMUL = 8, 64, 64, 2048


def variants(n: int) -> dict[str, Callable[[], object]]:
    """name -> a call to time; also checks the causal paths agree (values and gradients)."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(1, HEADS, n, HEAD_DIM, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(1, HEADS, n, HEAD_DIM, generator=g).requires_grad_()
    w = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)
    raw_q, raw_k = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(2))
    a, b = torch.randn(MATMUL, MATMUL, generator=g), torch.randn(MATMUL, MATMUL, generator=g)

    def run(causal: bool, backend: str | None, grad: bool) -> object:
        if not grad:
            with torch.no_grad():
                return linear_attention(q, k, v, causal=causal, chunk_size=CHUNK, backend=backend)
        out = linear_attention(q, k, v, causal=causal, chunk_size=CHUNK, backend=backend)
        return torch.autograd.grad(out, (q, k, v), w)

    loops, torch_form = run(True, "numba", True), run(True, "torch", True)
    for x, y in zip(loops, torch_form):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(run(True, "numba", False), run(True, "torch", False), rtol=1e-4, atol=1e-6)

    def mapped(inside: bool) -> object:
        with torch.no_grad():
            if inside:
                return linear_attention(raw_q, raw_k, v, causal=True, chunk_size=CHUNK, feature_map="elu+1")
            return linear_attention(elu_plus_one(raw_q), elu_plus_one(raw_k), v, causal=True, chunk_size=CHUNK)

    torch.testing.assert_close(mapped(True), mapped(False), rtol=1e-4, atol=1e-6)
    return {
        "matmul 2048³": lambda: a @ b,
        "bidirectional fwd": lambda: run(False, None, False),
        "causal loops fwd": lambda: run(True, "numba", False),
        "causal torch fwd": lambda: run(True, "torch", False),
        "elu+1 inside fwd": lambda: mapped(True),
        "elu+1 outside fwd": lambda: mapped(False),
        "bidirectional fwd+bwd": lambda: run(False, None, True),
        "causal loops fwd+bwd": lambda: run(True, "numba", True),
        "causal torch fwd+bwd": lambda: run(True, "torch", True),
    }


def on_cpu_split(n: int, rounds: int) -> None:
    """Print the loops' two-thread speed-up from on-CPU times (see --on-cpu in the module docstring)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g).requires_grad_() for _ in range(3))
    w = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)

    def fwd() -> None:
        with torch.no_grad():
            linear_attention(q, k, v, causal=True, chunk_size=CHUNK, feature_map="elu+1")

    def fwd_bwd() -> None:
        for t in (q, k, v):
            t.grad = None
        linear_attention(q, k, v, causal=True, chunk_size=CHUNK, feature_map="elu+1").backward(w)

    share = -(-HEADS // 2) / HEADS  # the rows (batch 1: one per head) the busier of two workers runs
    for name, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        call()  # warm-up (compilation, the worker pool)
        one, caller, rows = [], [], []
        for _ in range(rounds):
            torch.set_num_threads(1)
            start = time.process_time()
            call()
            one.append(time.process_time() - start)
            torch.set_num_threads(2)
            start, own = time.process_time(), time.thread_time()
            call()
            caller.append(time.thread_time() - own)
            rows.append(time.process_time() - start - caller[-1])
        t1, serial, parallel = (statistics.median(x) for x in (one, caller, rows))
        quiet = serial + parallel * share
        print(f"  elu+1 inside {name:8s} CPU: 1 thread {t1 * 1e3:8.1f} ms; 2 threads: caller {serial * 1e3:6.1f} ms, "
              f"rows {parallel * 1e3:8.1f} ms -> {quiet * 1e3:8.1f} ms, speed-up {t1 / quiet:.2f}x")


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call, timed A B C … A B C … over `rounds` rounds after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--on-cpu", action="store_true", help="two threads vs one from on-CPU times, not wall times")
    args = parser.parse_args()
    if compiled.numba_module() is None:
        raise SystemExit(f"numba is needed for the loops ({compiled.INSTALL})")
    if args.on_cpu:
        print(f"float32, batch 1, {HEADS} heads, head dim {HEAD_DIM}, chunk {CHUNK}; medians of {args.rounds} rounds; "
              "two threads from on-CPU times (see --on-cpu)")
        for n in args.tokens:
            print(f"\nN = {n}")
            on_cpu_split(n, args.rounds)
        return
    print(f"float32, batch 1, {HEADS} heads, head dim {HEAD_DIM}, chunk {CHUNK}; medians of {args.rounds} interleaved rounds")
    for n in args.tokens:
        calls = variants(n)
        first: dict[str, float] = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            t = interleaved(calls, args.rounds)
            first = first or t
            rate = 2 * MATMUL**3 / t["matmul 2048³"]
            print(f"\nN = {n}, {threads} thread(s): matmul {rate / 1e9:.1f} GFLOP/s")
            for name, sec in t.items():
                if name.startswith("matmul"):
                    continue
                line = f"  {name:24s} {sec * 1e3:9.1f} ms"
                if name.endswith(" fwd"):
                    flops = linear_flops(n, HEADS, HEAD_DIM, not name.startswith("bidirectional"), chunk_size=CHUNK)
                    line += f"  {flops / sec / 1e9:6.1f} GFLOP/s  {flops / sec / rate:.2f} of matmul"
                print(line)
            for form in ("loops", "torch"):
                ratio = t[f"causal {form} fwd+bwd"] / t["bidirectional fwd+bwd"]
                print(f"  causal ({form}) / bidirectional fwd+bwd: {ratio:.2f}×")
            if t is not first:
                speed_ups = ", ".join(f"{name} {first[name] / t[name]:.2f}×" for name in t if "loops" in name)
                print(f"  speed-up over {args.threads[0]} thread(s): {speed_ups}")


if __name__ == "__main__":
    main()
