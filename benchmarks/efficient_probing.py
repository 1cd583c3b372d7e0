"""Efficient probing (P094) beside a full attentive probe: matmul FLOPs and forward+backward time.

    taskset -c 1 .venv/bin/python benchmarks/efficient_probing.py          # ViT-S/B/L widths, N = 196
    .venv/bin/python benchmarks/efficient_probing.py --dims 768 --tokens 196 576 --batch 16

Per row: the matmul FLOPs of one sample from `efficient_probing_flops` (EP, M queries) and
`attentive_probe_flops` (one learned query with W_q, W_k, W_v, W_o), both equal to what torch's
FlopCounterMode counts (tests/mechanisms/test_efficient_probing.py), their ratio, and the median
time of a forward + backward of the registered modules on frozen tokens (batch × N × C, float32,
the probe's parameters trained): `efficient-probing` and `class-attention` with cls_in_keys=False
and no FFN as the full probe, timed interleaved (EP, probe, EP, probe, …; median of --rounds).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnlab
from attnlab.mechanisms.pooling.efficient_probing import flops_vs_attentive_probe


def interleaved_fwd_bwd(modules: list[torch.nn.Module], x: torch.Tensor, rounds: int) -> list[float]:
    """Median seconds of module(x).sum().backward() per module, timed A B A B … over `rounds` rounds (one
    warm-up each first), so both see the same machine state."""

    def step(module: torch.nn.Module) -> None:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    for module in modules:
        step(module)
    times: list[list[float]] = [[] for _ in modules]
    for _ in range(rounds):
        for i, module in enumerate(modules):
            start = time.perf_counter()
            step(module)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1024])
    parser.add_argument("--tokens", type=int, nargs="+", default=[196])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'C':>5} {'N':>5} {'M':>3} {'EP GFLOP':>9} {'probe GFLOP':>11} {'ratio':>6} {'EP ms':>7} {'probe ms':>8} {'speed-up':>8}")
    for dim in args.dims:
        for n in args.tokens:
            f = flops_vs_attentive_probe(n, dim, args.queries)
            x = torch.randn(args.batch, n, dim)
            ep = attnlab.build("efficient-probing", dim=dim, num_queries=args.queries)
            probe = attnlab.build("class-attention", dim=dim, cls_in_keys=False, mlp_ratio=0.0)
            t_ep, t_probe = interleaved_fwd_bwd([ep, probe], x, args.rounds)
            print(
                f"{dim:>5} {n:>5} {args.queries:>3} {f['efficient_probing'] / 1e9:>9.3f} {f['attentive_probe'] / 1e9:>11.3f} "
                f"{f['ratio']:>6.2f} {1e3 * t_ep:>7.2f} {1e3 * t_probe:>8.2f} {t_probe / t_ep:>8.2f}"
            )


if __name__ == "__main__":
    main()
