"""Cost exponent of the block-sparse engine, PowerAttention and sliding-window attention, beside dense SDPA.

    .venv/bin/python benchmarks/block_sparse.py                 # N = 2,048 … 32,768, forward + backward
    .venv/bin/python benchmarks/block_sparse.py --lengths 2048 4096 --sdpa-max 4096
    taskset -c 0,1 .venv/bin/python benchmarks/block_sparse.py --lengths 16384 --forward --threads 1 2 \
        --series sliding-window window-blocks            # the band path against the block path, 2 threads vs 1

Batch 1, 8 heads, head dim 64, float32, causal. Each series times the attention core on
q, k, v of shape (1, 8, N, 64) that require grad: the forward and the backward of
(out · g).sum() for a fixed random g (median of timed calls after a warm-up, with
`attnlab.bench.timing.measure`), and the peak memory of one call; with --forward, the
forward alone under no_grad. Series:

* power-attention  — the registered module's core (`module.attend`), default parameters
  (B = 64, local 1 block, 1 sink block): O(N log N d);
* sliding-window   — the registered module's core, causal, radius 256, B = 64: O(N r d), on the
  engine's band path (keys read in place through strided windows);
* window-blocks    — the same attention on the engine's block path (`backend="blocks"`: gathered
  key blocks, the band's partial blocks masked), for the band path's gain;
* engine           — `block_sparse_attention` on a fixed random layout of 8 key blocks per
  query block (B = 64): O(N), the engine alone;
* sdpa             — dense causal `scaled_dot_product_attention`, for the ratios (up to --sdpa-max).

With several --threads the whole table is measured per thread count (threads interleaved per
configuration) and each series' speed-up over the first count printed: pin the process to as
many cores (taskset) and run it on an otherwise idle machine.

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
from attnlab.mechanisms.sparse.sliding_window import band_mod, window_layout

HEADS, HEAD_DIM, BLOCK, RADIUS = 8, 64, 64, 256
SERIES = ("power-attention", "sliding-window", "window-blocks", "engine", "sdpa")


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
        return attnlab.build("sliding-window", dim=HEADS * HEAD_DIM, heads=HEADS, radius=RADIUS, causal=True).attend
    if name == "window-blocks":
        window = window_layout(n, radius=RADIUS, block_size=BLOCK, causal=True)
        mod = band_mod(RADIUS, True)
        return lambda q, k, v: block_sparse_attention(q, k, v, window, mask_mod=mod, backend="blocks")
    if name == "engine":
        layout = random_layout(n, 8)
        return lambda q, k, v: block_sparse_attention(q, k, v, layout)
    if name == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"series: unknown {name!r}")


def run(name: str, n: int, budget_s: float, backward: bool, threads: int | None) -> tuple[float, int | None]:
    """(median seconds, peak bytes) of forward + backward (or the forward alone) at length n."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).requires_grad_(backward) for _ in range(3))
    g = torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)
    fn = core(name, n)

    def call() -> None:
        if not backward:
            with torch.no_grad():
                fn(q, k, v)
            return
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(g)

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        timing = measure(call, warmup=1, repeats=5, budget_s=budget_s, memory=True)
    finally:
        torch.set_num_threads(before)
    return timing.median_s, timing.peak_mem_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--sdpa-max", type=int, default=32768, help="largest N at which dense SDPA is timed")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per configuration (at least 3 timed calls)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch threads (default: torch's); several: the table per count and the speed-ups")
    parser.add_argument("--forward", action="store_true", help="time the forward alone (no autograd)")
    parser.add_argument("--series", nargs="+", choices=SERIES, default=list(SERIES))
    args = parser.parse_args(argv)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        print(f"note: load average {load:.1f} on {cores} cores: timings are slow and noisy; with several threads every "
              "parallel region waits for descheduled threads (--threads 1 suffers less)", flush=True)
    series = [s for s in SERIES if s in args.series]
    counts = args.threads or [None]
    times: dict[tuple[str, int | None], list[tuple[int, float]]] = {(s, t): [] for s in series for t in counts}
    what = "forward" if args.forward else "forward+backward"
    print(f"torch {torch.__version__}, threads {', '.join(str(t or torch.get_num_threads()) for t in counts)}; batch 1, "
          f"{HEADS} heads, head dim {HEAD_DIM}, float32, causal, {what} (median ms; peak MiB)", flush=True)
    print(f"{'N':>6} {'threads':>7} " + " ".join(f"{s:>22}" for s in series) + "   power/sdpa  window/sdpa", flush=True)
    for n in sorted(args.lengths):
        rows: dict[int | None, dict[str, float]] = {t: {} for t in counts}
        cells: dict[int | None, list[str]] = {t: [] for t in counts}
        for s in series:
            for t in counts:  # thread counts interleaved per configuration
                if s == "sdpa" and n > args.sdpa_max:
                    cells[t].append(f"{'-':>22}")
                    continue
                median, peak = run(s, n, args.budget, not args.forward, t)
                times[(s, t)].append((n, median))
                rows[t][s] = median
                mem = "?" if peak is None else f"{peak / 2**20:.0f}"
                cells[t].append(f"{median * 1e3:>14.0f} ({mem:>5})")
        for t in counts:
            row = rows[t]
            ratios = [f"{row[s] / row['sdpa']:>11.3f}" if "sdpa" in row and s in row else f"{'-':>11}"
                      for s in ("power-attention", "sliding-window")]
            print(f"{n:>6} {t or torch.get_num_threads():>7} " + " ".join(cells[t]) + "  " + " ".join(ratios), flush=True)
        for t in counts[1:]:
            gains = [f"{rows[counts[0]][s] / rows[t][s]:>21.2f}×" if s in rows[t] else f"{'-':>22}" for s in series]
            print(f"{'':>6} {f'{t}/{counts[0]}':>7} " + " ".join(gains) + "   (speed-up)", flush=True)
    print("log-log slope of time against N:")
    for (s, t), points in times.items():
        fit = slope(points)
        span = f"N = {points[0][0]}…{points[-1][0]}" if points else "no points"
        label = s if len(counts) == 1 else f"{s} ({t} threads)"
        print(f"  {label:>26}: {'-' if fit is None else f'{fit:.3f}'}  ({span})")
    return 0


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed memory must return to the system for the peak
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MMAP_THRESHOLD_ENV})
    sys.exit(main())
