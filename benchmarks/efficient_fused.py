"""Efficient attention (P228) fwd+bwd: the fused Function, the engine path it replaced, and linear-attention-transformer.

    taskset -c 1 .venv/bin/python benchmarks/efficient_fused.py                       # N = 4,096 and 16,384, 9 rounds
    taskset -c 1 .venv/bin/python benchmarks/efficient_fused.py --n 4096 --rounds 15

Batch 1, 8 heads, head dim 64, float32, one thread, not causal, normalization="softmax": forward + backward
of a fixed output gradient with q, k, v requiring gradients, as `attnlab bench limits` times the efficient rows.
Three implementations in one process, outputs and gradients checked equal first (float32 tolerance):
  fused  — `efficient_attention` (the `_SoftmaxBidirectional` Function: backward written out, buffers recycled);
  engine — the path before it: `efficient_terms` (autograd through the two softmaxes) and the linear engine's
           bidirectional form `linear_attention(..., normalize=False)`;
  peer   — lucidrains' `linear_attn(q, k, v)` times √head_dim, as attnlab.bench.peers times it (if installed).
Every round times each once more (A B C A B C …, each timing the median of three calls); printed are the
medians over rounds of the wall and thread-CPU time, of the per-round ratio to the peer, and the minor page
faults per call (a fresh tensor's first touch; see attnlab.kernels.buffers).
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from attnlab.kernels.linear_scan import linear_attention
from attnlab.mechanisms.linear.efficient import efficient_attention, efficient_terms

HEADS, HEAD_DIM = 8, 64


def engine(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    t = efficient_terms(q, k, v, normalization="softmax", causal=False, attention_mask=None)
    return linear_attention(t.q, t.k, t.v, normalize=False)


def implementations() -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    impls: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"fused": efficient_attention, "engine": engine}
    try:
        from linear_attention_transformer.linear_attention_transformer import linear_attn
    except ImportError:
        print("linear-attention-transformer is not installed: no peer column")
        return impls
    rescale = math.sqrt(HEAD_DIM)
    impls["peer"] = lambda q, k, v: linear_attn(q, k, v) * rescale
    return impls


def timed(call: Callable[[], None]) -> tuple[float, float, float]:
    """(wall ms, thread CPU ms, minor page faults): per call, the medians (faults: mean) of three calls."""
    walls, cpus = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3, faults / 3


def run(n: int, rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(4))
    calls: dict[str, Callable[[], None]] = {}
    want: list[Tensor] | None = None
    for name, impl in implementations().items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = impl(*leaves)
        out.backward(grad)
        got = [out.detach()] + [t.grad for t in leaves if t.grad is not None]
        if want is None:
            want = got
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

        def call(impl: Callable[[Tensor, Tensor, Tensor], Tensor] = impl, leaves: list[Tensor] = leaves) -> None:
            for t in leaves:
                t.grad = None
            impl(*leaves).backward(grad)

        calls[name] = call
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(timed(call))
    print(f"N = {n}: fwd+bwd, {rounds} rounds")
    for name in calls:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        faults = statistics.median(t[2] for t in times[name])
        line = f"  {name:7s} wall {wall:7.2f} ms   cpu {cpu:7.2f} ms   faults/call {faults:6.0f}"
        if "peer" in times:
            ratios = [a[0] / b[0] for a, b in zip(times[name], times["peer"])]
            line += f"   / peer {statistics.median(ratios):.3f} (rounds {min(ratios):.2f}–{max(ratios):.2f})"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="4096,16384", help="comma-separated sequence lengths")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in args.n.split(","):
        run(int(n), args.rounds)


if __name__ == "__main__":
    main()
