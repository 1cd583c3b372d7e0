"""Cost exponent of the block-sparse engine, PowerAttention and sliding-window attention, beside dense SDPA.

    .venv/bin/python benchmarks/block_sparse.py                 # N = 2,048 … 32,768, forward + backward
    .venv/bin/python benchmarks/block_sparse.py --lengths 2048 4096 --sdpa-max 4096

Batch 1, 8 heads, head dim 64, float32, causal. Each series times the attention core on
q, k, v of shape (1, 8, N, 64) that require grad: the forward and the backward of
(out · g).sum() for a fixed random g (median of timed calls after a warm-up, with
`attnlab.bench.timing.measure`), and the peak memory of one call. Series:

* power-attention  — the registered module's core (`module.attend`), default parameters
  (B = 64, local 1 block, 1 sink block): O(N log N d);
* sliding-window   — the registered module's core, causal, radius 256, B = 64: O(N r d);
* engine           — `block_sparse_attention` on a fixed random layout of 8 key blocks per
  query block (B = 64): O(N), the engine alone;
* sdpa             — dense causal `scaled_dot_product_attention`, for the ratios (up to --sdpa-max).

The slope is the least-squares fit of log time against log N. Peak memory is the rise of
the resident set during a call; the script re-runs itself with MALLOC_MMAP_THRESHOLD_=65536
so that freed memory returns to the system (see attnlab.bench.timing).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import torch

import attnlab
from attnlab.bench.timing import MMAP_THRESHOLD_ENV, measure
from attnlab.kernels.block_sparse import BlockLayout, block_sparse_attention

HEADS, HEAD_DIM, BLOCK = 8, 64, 64


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than two points)."""
    if len(points) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def random_layout(n: int, per_row: int, seed: int = 0) -> BlockLayout:
    """`per_row` distinct random key blocks for every query block (fewer when there are fewer blocks)."""
    nb = -(-n // BLOCK)
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(nb, nb, generator=g).argsort(-1)[:, :per_row]
    return BlockLayout.from_candidates(picks, BLOCK, nb)


def core(name: str, n: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "power-attention":
        return attnlab.build("power-attention", dim=HEADS * HEAD_DIM, heads=HEADS).attend
    if name == "sliding-window":
        return attnlab.build("sliding-window", dim=HEADS * HEAD_DIM, heads=HEADS, radius=256, causal=True).attend
    if name == "engine":
        layout = random_layout(n, 8)
        return lambda q, k, v: block_sparse_attention(q, k, v, layout)
    if name == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"series: unknown {name!r}")


def run(name: str, n: int, budget_s: float) -> tuple[float, int | None]:
    """(median seconds, peak bytes) of forward + backward at length n."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).requires_grad_(True) for _ in range(3))
    g = torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)
    fn = core(name, n)

    def call() -> None:
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(g)

    timing = measure(call, warmup=1, repeats=5, budget_s=budget_s, memory=True)
    return timing.median_s, timing.peak_mem_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--sdpa-max", type=int, default=32768, help="largest N at which dense SDPA is timed")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per configuration (at least 3 timed calls)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        print(f"note: load average {load:.1f} on {cores} cores: timings are slow and noisy; with several threads every "
              "parallel region waits for descheduled threads (--threads 1 suffers less)", flush=True)
    series = ("power-attention", "sliding-window", "engine", "sdpa")
    times: dict[str, list[tuple[int, float]]] = {s: [] for s in series}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, {HEADS} heads, head dim {HEAD_DIM}, "
          "float32, causal, forward+backward (median ms; peak MiB)", flush=True)
    print(f"{'N':>6} " + " ".join(f"{s:>22}" for s in series) + "   power/sdpa  window/sdpa", flush=True)
    for n in sorted(args.lengths):
        cells, row = [], {}
        for s in series:
            if s == "sdpa" and n > args.sdpa_max:
                cells.append(f"{'-':>22}")
                continue
            median, peak = run(s, n, args.budget)
            times[s].append((n, median))
            row[s] = median
            mem = "?" if peak is None else f"{peak / 2**20:.0f}"
            cells.append(f"{median * 1e3:>14.0f} ({mem:>5})")
        ratios = [f"{row[s] / row['sdpa']:>11.3f}" if "sdpa" in row else f"{'-':>11}" for s in ("power-attention", "sliding-window")]
        print(f"{n:>6} " + " ".join(cells) + "  " + " ".join(ratios), flush=True)
    print("log-log slope of time against N:")
    for s in series:
        fit = slope(times[s])
        span = f"N = {times[s][0][0]}…{times[s][-1][0]}" if times[s] else "no points"
        print(f"  {s:>16}: {'-' if fit is None else f'{fit:.3f}'}  ({span})")
    return 0


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed memory must return to the system for the peak
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MMAP_THRESHOLD_ENV})
    sys.exit(main())
