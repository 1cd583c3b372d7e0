"""The numba loops' forms against each other on issue 14's neighborhood rows, in one process: the forward's, or
with --backward the backward's two query passes.

    taskset -c 1 .venv/bin/python benchmarks/neighborhood_forms.py                 # every row, 7 rounds
    taskset -c 1 .venv/bin/python benchmarks/neighborhood_forms.py --rows 1d-65 --rounds 9
    taskset -c 1 .venv/bin/python benchmarks/neighborhood_forms.py --backward --rows 1d-7

Batch 1, 8 heads, head dim 64, float32, one thread (torch and numba), the forward of
`neighborhood_attention(backend="numba")` under no_grad, as `attnlab bench limits` times it. Each row is run
with every form the rule could give its windows — lanes (`_lanes`), register-blocked (`_blocked`) and the
per-query loops — by forcing attnlab.kernels.neighborhood.forward_path; the outputs are checked equal first
(float32 tolerance). Every round times every form once more (A B C A B C …, each timing the median of three
calls), and the medians over rounds are printed, wall time and the thread's CPU time (the second is the
better figure on a shared machine: time the process waits for a CPU is not in it). The rule gives the
blocked form only to lines shorter than LANES_MIN_LINE; it is timed on every row here for comparison.

Measured 2026-12-08 (session 7), this 2-core AMD EPYC VM shared with other jobs (load 1.3–3.5), forward
alone, against the commit before the lanes form (its diagonal and blocked forms, the same harness with that
commit's modules imported side by side), medians of 5–7 interleaved rounds, CPU ms (wall ms where the load
was 1.3): 1d-65 blocked 235 → lanes 198 (wall 235 → 199), 1d-7 diagonal 130 → lanes 120, 2d-7 diagonal
20.2 → lanes 17.8; 2d-13 blocked 34–41 → lanes 35–36 (within the noise). The kernels alone (outputs
preallocated): 1d-65 173–177 → 154–165, 1d-7 95–97 → 87–89.

--backward: batch 1, 8 heads, head dim 64, float32, one thread. The inputs, the lanes forward's out and
logsumexp, the buffers (dq, p, dS) and the tables are made once; then each round calls the per-query pass (`_by_query`) and
the lanes pass (`_by_query_lanes`) of attnlab.kernels._neighborhood_backward_loops once each, in alternating
orders, and the medians over rounds are printed (wall ms), with the key pass (`_by_key`, the same after
either) for scale. Both passes' dq, p and dS are checked close first (float32 tolerance).

Measured 2026-12-07 (session 9), this 2-core AMD EPYC VM, nothing else running (load 0.7), medians of 7: query
pass per query → lanes 1d-7 122.0 → 103.3 ms (lanes 87–93 in other processes of the same hour: where the
pages fall), 1d-65 522 → 252, 2d-7 22.1 → 22.6, 2d-13 69.4 → 50.3; the key pass 43, 180, 8.5, 38.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from attnlab.kernels import compiled
from attnlab.kernels import neighborhood as engines
from attnlab.kernels.buffers import recycled_array
from attnlab.mechanisms.local.neighborhood import loop_windows, neighborhood_attention

ROWS = {  # name: (grid, kernel)
    "1d-7": ((65536,), 7),
    "1d-65": ((65536,), 65),
    "2d-7": ((64, 64), 7),
    "2d-13": ((64, 64), 13),
}
FORMS = ("lanes", "blocked", "per-query")
HEADS, HEAD_DIM = 8, 64


def forced(form: str) -> Callable[[engines.Windows], str]:
    """A forward_path that answers `form` (where the windows have runs; else the per-query loops)."""
    return lambda w: form if w.runs is not None else "per-query"


def timed(call: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """(wall ms, thread CPU ms): the medians of three calls."""
    walls, cpus = [], []
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def run_row(name: str, rounds: int) -> None:
    grid, kernel = ROWS[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, *grid, HEAD_DIM, generator=gen) for _ in range(3))
    original = engines.forward_path

    def call(form: str) -> torch.Tensor:
        engines.forward_path = forced(form)
        try:
            with torch.no_grad():
                return neighborhood_attention(q, k, v, kernel_size=kernel, backend="numba")
        finally:
            engines.forward_path = original

    want = call("per-query")
    for form in FORMS[:-1]:
        torch.testing.assert_close(call(form), want, atol=2e-5, rtol=1e-4)
    times: dict[str, list[tuple[float, float]]] = {form: [] for form in FORMS}
    for _ in range(rounds):
        for form in FORMS:
            times[form].append(timed(partial(call, form)))
    rank = len(grid)
    print(f"{name} (the rule: {original(loop_windows(grid, (kernel,) * rank, (1,) * rank, (False,) * rank))})")
    for form in FORMS:
        wall = statistics.median(t[0] for t in times[form])
        cpu = statistics.median(t[1] for t in times[form])
        print(f"  {form:10s} wall {wall:7.1f} ms   cpu {cpu:7.1f} ms")


def run_backward_row(name: str, rounds: int) -> None:
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
    parser.add_argument("--backward", action="store_true", help="the backward's query passes instead of the forward's forms")
    args = parser.parse_args()
    if compiled.numba_module() is None:
        raise SystemExit(compiled.numba_status())
    torch.set_num_threads(1)
    with compiled.numba_threads(1):
        for name in args.rows.split(","):
            (run_backward_row if args.backward else run_row)(name, args.rounds)


if __name__ == "__main__":
    main()
