"""The numba backward's two query passes against each other on issue 14's neighborhood rows, in one process.

    taskset -c 1 .venv/bin/python benchmarks/neighborhood_backward_forms.py                 # every row, 7 rounds
    taskset -c 1 .venv/bin/python benchmarks/neighborhood_backward_forms.py --rows 1d-7 --rounds 9

Batch 1, 8 heads, head dim 64, float32, one thread. The inputs, the lanes forward's out and logsumexp, the
buffers (dq, p, dS) and the tables are made once; then each round calls the per-query pass (`_by_query`) and
the lanes pass (`_by_query_lanes`) of attnlab.kernels._neighborhood_backward_loops once each, in alternating
orders, and the medians over rounds are printed (wall ms), with the key pass (`_by_key`, the same after
either) for scale. Both passes' dq, p and dS are checked close first (float32 tolerance).

Measured 2026-12-07 (session 9), this 2-core AMD EPYC VM, nothing else running (load 0.7), medians of 7: query
pass per query → lanes 1d-7 122.0 → 103.3 ms (lanes 89–93 in other processes of the same hour: where the
pages fall), 1d-65 522 → 252, 2d-7 22.1 → 22.6, 2d-13 69.4 → 50.3; the key pass 43, 180, 8.5, 38.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from attnlab.kernels import compiled
from attnlab.kernels import neighborhood as engines
from attnlab.kernels.buffers import recycled_array
from attnlab.mechanisms.local.neighborhood import loop_windows

ROWS = {  # name: (grid, kernel)
    "1d-7": ((65536,), 7),
    "1d-65": ((65536,), 65),
    "2d-7": ((64, 64), 7),
    "2d-13": ((64, 64), 13),
}
HEADS, HEAD_DIM = 8, 64


def run_row(name: str, rounds: int) -> None:
    from attnlab.kernels import _neighborhood_backward_loops as bwd

    grid, kernel = ROWS[name]
    rank, n = len(grid), math.prod(grid)
    w = loop_windows(grid, (kernel,) * rank, (1,) * rank, (False,) * rank)
    assert engines.forward_path(w) == "lanes", name
    lib = engines.loops()
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(HEADS, n, HEAD_DIM, generator=gen).numpy() for _ in range(4))
    consts = lib.constants(np.dtype(np.float32), HEAD_DIM ** -0.5)
    keep, rpb = np.zeros((1, 0), np.uint8), np.zeros((HEADS, 0), np.float32)
    out, lse = np.empty_like(v), np.empty((HEADS, n), np.float32)
    engines._lanes(lib, q, k, v, w, keep, HEADS, rpb, consts, out, lse)
    window, l2 = kernel ** rank, grid[-1]
    units = HEADS * (n // l2) * -(-l2 // bwd.CHUNK)
    dq, dk, dv = (recycled_array(np.float32, HEADS, n, HEAD_DIM) for _ in range(3))
    drpb = np.zeros((units, 0), np.float32)
    ahead, m0, m1, behind = bwd.tables(w.pos)
    wd = lib.Width(HEAD_DIM)
    stream = bwd.streamable(dq, dk, dv)
    lanes = 64 // q.itemsize
    union = -(-(lanes + kernel - 1) // 8) * 8
    made = {form: recycled_array(np.float32, 2, HEADS, n, window) for form in ("per-query", "lanes")}

    def per_query() -> None:
        probs, dscores = made["per-query"]
        bwd._by_query(HEADS, q, k, v, out, grad, lse, *w.pos, *w.rel, *ahead, keep, rpb, consts, dq, probs, dscores,
                      drpb, wd, stream)

    def by_lanes() -> None:
        probs, dscores = made["lanes"]
        bwd._by_query_lanes(HEADS, q, k, v, grad, lse, w.pos[0], w.pos[1], w.rel[0], w.rel[1], w.runs, w.pos[2].shape[1],
                            union, keep, rpb, consts, dq, probs, dscores, drpb, lib.Width(lanes), lib.Width(lanes // 2),
                            wd, stream)

    def by_key() -> None:
        probs, dscores = made["lanes"]
        bwd._by_key(q, grad, *m0, *m1, *behind, w.pos[1].shape[1], w.pos[2].shape[1], consts, probs, dscores, dk, dv, wd,
                    wd, stream)

    passes = {"per-query": per_query, "lanes": by_lanes}
    results = {}
    for form, call in passes.items():
        call()
        results[form] = dq.copy()
    by_key()  # compiled (or loaded from numba's cache) before the rounds, as the passes were
    np.testing.assert_allclose(results["lanes"], results["per-query"], atol=2e-5, rtol=1e-4)
    for a, b in zip(made["lanes"], made["per-query"]):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    times: dict[str, list[float]] = {form: [] for form in [*passes, "key pass"]}
    for r in range(rounds):
        for form in (list(passes) if r % 2 == 0 else list(passes)[::-1]) + ["key pass"]:
            call = passes.get(form, by_key)
            start = time.perf_counter()
            call()
            times[form].append((time.perf_counter() - start) * 1e3)
    print(name)
    for form, ts in times.items():
        print(f"  {form:10s} {statistics.median(ts):7.1f} ms   (rounds: {' '.join(f'{t:.0f}' for t in ts)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if compiled.numba_module() is None:
        raise SystemExit(compiled.numba_status())
    torch.set_num_threads(1)
    with compiled.numba_threads(1):
        for name in args.rows.split(","):
            run_row(name, args.rounds)


if __name__ == "__main__":
    main()
