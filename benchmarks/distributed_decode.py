"""Decoding one token over a KV cache sharded on p gloo processes (127.0.0.1): tree (P128) vs ring, and the cost model.

    .venv/bin/python benchmarks/distributed_decode.py                          # p = 2, 4, 8; N = 16,384
    .venv/bin/python benchmarks/distributed_decode.py --json out/distributed_decode.json
    .venv/bin/python benchmarks/distributed_decode.py --worlds 2 4 --tokens 4096 --rounds 5   # quick look

One query (batch 1, 8 heads, head dim 64, float32 by default) against a cache of N positions split evenly
over p processes (one thread each), for p in --worlds, and against the same cache unsharded in one process
(SDPA). Three schedules: "tree" (tree_decode, butterfly all-reduce), "ring" (ring_decode, K/V blocks around
the ring) and "allreduce" (tree_decode through gloo's own all-reduce, which gloo runs as a ring). Per p:
the steps, messages and bytes each rank sends (`CommCounter`; for "allreduce" the textbook counts of gloo's
ring all-reduce, not observed) beside the cost model's prediction (`attnlab.distributed.cost_model`); wall
time per decoded token, the slowest rank's, median over --rounds rounds (the three schedules interleaved,
each going first in turn, a barrier before each call); peak memory per rank as the rise of the resident set
during one call (`attnlab.bench.timing.peak_memory`, glibc's mmap threshold at 64 KiB) beside the buffers
the model says the call allocates. The three outputs are checked equal first. Then the cost model's rounds,
bytes per rank and α-β time at p = 64 … 1024 (--extrapolate-tokens N, even split) under the network of
--alpha-us and --beta-gbs. All processes share this machine's cores and talk over loopback, so measured
times show the schedules' overhead here, not a cluster's; the counts do not depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attnlab.bench.timing import MMAP_THRESHOLD_ENV, peak_memory
from attnlab.distributed import Partition
from attnlab.distributed.cost_model import (
    Network,
    allreduce_decode_cost,
    buffer_bytes,
    ring_decode_cost,
    step_time_s,
    tree_decode_cost,
)
from attnlab.distributed.decode import CommCounter, ring_decode, tree_decode
from attnlab.testing_distributed import run_ranks

STRATEGIES = ("tree", "ring", "allreduce")  # allreduce: tree_decode by gloo's own all-reduce (a ring)


def _cache(config: dict[str, Any], sizes: tuple[int, ...], rank: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query (same on all ranks) and this rank's keys and values (seeded by rank)."""
    dtype = getattr(torch, config["dtype"])
    b, h, d = config["batch"], config["heads"], config["head_dim"]
    q = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = torch.Generator().manual_seed(1 + rank)
    k = torch.randn(b, h, sizes[rank], d, generator=g).to(dtype)
    v = torch.randn(b, h, sizes[rank], d, generator=g).to(dtype)
    return q, k, v


def _sharded_rank(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    sizes = Partition.even(config["tokens"], world).sizes
    q, k, v = _cache(config, sizes, rank)
    calls = {"tree": lambda counter=None: tree_decode(q, k, v, counter=counter),
             "ring": lambda counter=None: ring_decode(q, k, v, sizes=sizes, counter=counter),
             "allreduce": lambda counter=None: tree_decode(q, k, v, reduce="allreduce", counter=counter)}
    counters = {name: CommCounter() for name in STRATEGIES}
    outs = {name: calls[name](counters[name]) for name in STRATEGIES}  # also the warm-up
    torch.testing.assert_close(outs["tree"], outs["ring"])
    torch.testing.assert_close(outs["tree"], outs["allreduce"])
    times: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for r in range(config["rounds"]):
        shift = r % len(STRATEGIES)  # each strategy goes first in turn
        for name in STRATEGIES[shift:] + STRATEGIES[:shift]:
            dist.barrier()
            t0 = time.perf_counter()
            calls[name]()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the token is decoded when the slowest rank is done
            times[name].append(float(elapsed))
    peaks = {}
    for name in STRATEGIES:
        dist.barrier()
        peaks[name] = peak_memory(calls[name])
    return {"sizes": sizes, "cache_bytes": 2 * k.numel() * k.element_size(),
            "counters": {n: vars(c) for n, c in counters.items()}, "times_s": times, "peak_bytes": peaks}


def _unsharded_rank(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    q, k, v = _cache(config, (config["tokens"],), 0)

    def call() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    call()
    times = []
    for _ in range(config["rounds"]):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"cache_bytes": 2 * k.numel() * k.element_size(), "times_s": times, "peak_bytes": peak_memory(call)}


def _predicted(config: dict[str, Any], sizes: tuple[int, ...], network: Network) -> dict[str, Any]:
    dtype = getattr(torch, config["dtype"])
    dims = (config["batch"], config["heads"], config["head_dim"], dtype)
    costs = {"tree": tree_decode_cost(len(sizes), *dims), "ring": ring_decode_cost(sizes, *dims),
             "allreduce": allreduce_decode_cost(len(sizes), *dims)}
    return {name: {"rounds": [c.rounds for c in cost], "messages": [c.messages for c in cost],
                   "bytes_sent": [c.bytes_sent for c in cost], "time_s": step_time_s(cost, network),
                   "buffer_bytes": list(buffer_bytes("ring" if name == "ring" else "tree", sizes, *dims))}
            for name, cost in costs.items()}


def measure(config: dict[str, Any], network: Network) -> dict[str, Any]:
    os.environ.update(MMAP_THRESHOLD_ENV)  # inherited by the spawned ranks (glibc reads it at start)
    dtype = getattr(torch, config["dtype"])
    dims = (config["batch"], config["heads"], config["head_dim"], dtype)
    unsharded = run_ranks(_unsharded_rank, 1, args=(config,), timeout=600)[0]
    unsharded["median_s"] = statistics.median(unsharded["times_s"])
    unsharded["buffer_bytes"] = buffer_bytes("dense", (config["tokens"],), *dims)[0]
    worlds = []
    for world in config["worlds"]:
        ranks = run_ranks(_sharded_rank, world, args=(config,), timeout=900)
        sizes = ranks[0]["sizes"]
        predicted = _predicted(config, sizes, network)
        entry: dict[str, Any] = {"world": world, "sizes": list(sizes), "cache_bytes_per_rank": [r["cache_bytes"] for r in ranks]}
        for name in STRATEGIES:
            measured_bytes = [r["counters"][name]["bytes_sent"] for r in ranks]
            entry[name] = {
                "rounds": [r["counters"][name]["rounds"] for r in ranks],
                "messages": [r["counters"][name]["messages"] for r in ranks],
                "bytes_sent": measured_bytes,
                "median_s": statistics.median(ranks[0]["times_s"][name]),
                "times_s": ranks[0]["times_s"][name],
                "peak_bytes": [r["peak_bytes"][name] for r in ranks],
                "predicted": predicted[name],
                "bytes_ratio_predicted_to_measured": [p / m if m else (1.0 if p == 0 else None)
                                                      for p, m in zip(predicted[name]["bytes_sent"], measured_bytes)],
            }
        worlds.append(entry)
        print(f"p = {world}: done", flush=True)
    extrapolated = []
    for world in config["extrapolate_worlds"]:
        sizes = Partition.even(config["extrapolate_tokens"], world).sizes
        row: dict[str, Any] = {"world": world, "tokens": config["extrapolate_tokens"]}
        for name, cost in (("tree", tree_decode_cost(world, *dims)), ("ring", ring_decode_cost(sizes, *dims)),
                           ("allreduce", allreduce_decode_cost(world, *dims))):
            row[name] = {"rounds": max(c.rounds for c in cost), "bytes_sent": max(c.bytes_sent for c in cost),
                         "time_s": step_time_s(cost, network)}
        extrapolated.append(row)
    return {"config": config, "network": {"alpha_s": network.alpha_s, "beta_bytes_per_s": network.beta_bytes_per_s},
            "unsharded": unsharded, "worlds": worlds, "extrapolated": extrapolated}


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def print_tables(result: dict[str, Any]) -> None:
    cfg, un = result["config"], result["unsharded"]
    print(f"\nN = {cfg['tokens']}, batch {cfg['batch']}, {cfg['heads']} heads, head dim {cfg['head_dim']}, "
          f"{cfg['dtype']}, median of {cfg['rounds']} interleaved rounds")
    held = None if un["peak_bytes"] is None else un["cache_bytes"] + un["peak_bytes"]
    print(f"unsharded (1 process, SDPA): {un['median_s'] * 1e3:.2f} ms/token, cache {_mib(un['cache_bytes'])} MiB, "
          f"peak rise {_mib(un['peak_bytes'])} MiB (model {_mib(un['buffer_bytes'])}), held {_mib(held)} MiB")
    print("per p: the largest over ranks; rise = resident set rise during one call, held = cache + rise; "
          "ms/token = the slowest rank's, all processes on this machine's cores over loopback")
    head = (f"{'p':>3} {'':9} {'rounds':>7} {'pred':>5} {'msgs':>5} {'KiB sent/rank':>14} {'pred KiB':>10} "
            f"{'ms/token':>9} {'rise MiB/rank':>14} {'model MiB':>10} {'cache MiB/rank':>15} {'held MiB/rank':>14}")
    print(head)
    for w in result["worlds"]:
        for name in STRATEGIES:
            s = w[name]
            peaks = [p for p in s["peak_bytes"] if p is not None]
            held = max(c + p for c, p in zip(w["cache_bytes_per_rank"], s["peak_bytes"])) if len(peaks) == w["world"] else None
            print(f"{w['world']:>3} {name:9} {max(s['rounds']):>7} {max(s['predicted']['rounds']):>5} "
                  f"{max(s['messages']):>5} {max(s['bytes_sent']) / 1024:>14.1f} "
                  f"{max(s['predicted']['bytes_sent']) / 1024:>10.1f} {s['median_s'] * 1e3:>9.2f} "
                  f"{_mib(max(peaks) if peaks else None):>14} {_mib(max(s['predicted']['buffer_bytes'])):>10} "
                  f"{_mib(max(w['cache_bytes_per_rank'])):>15} {_mib(held):>14}")
    net = result["network"]
    print(f"\ncost model, N = {cfg['extrapolate_tokens']} even split, α = {net['alpha_s'] * 1e6:g} µs per step, "
          f"β = {net['beta_bytes_per_s'] / 1e9:g} GB/s per link (no contention, full duplex)")
    print(f"{'p':>5} {'tree rounds':>11} {'tree KiB':>9} {'tree µs':>8} {'ring rounds':>11} {'ring MiB':>9} "
          f"{'ring µs':>9} {'allreduce rounds':>16} {'allreduce µs':>12}")
    for row in result["extrapolated"]:
        t, r, a = row["tree"], row["ring"], row["allreduce"]
        print(f"{row['world']:>5} {t['rounds']:>11} {t['bytes_sent'] / 1024:>9.2f} {t['time_s'] * 1e6:>8.1f} "
              f"{r['rounds']:>11} {r['bytes_sent'] / 2**20:>9.2f} {r['time_s'] * 1e6:>9.1f} "
              f"{a['rounds']:>16} {a['time_s'] * 1e6:>12.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=16384, help="cached positions N (default 16384)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (>= 5)")
    parser.add_argument("--alpha-us", type=float, default=5.0, help="latency per communication step, µs")
    parser.add_argument("--beta-gbs", type=float, default=25.0, help="bandwidth of one link, GB/s")
    parser.add_argument("--extrapolate-tokens", type=int, default=1 << 20)
    parser.add_argument("--extrapolate-worlds", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error(f"--rounds: expected >= 5, got {args.rounds}")
    if any(w < 1 for w in args.worlds):
        parser.error(f"--worlds: expected positive ints, got {args.worlds}")
    config = {"worlds": args.worlds, "tokens": args.tokens, "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "dtype": args.dtype, "rounds": args.rounds,
              "extrapolate_tokens": args.extrapolate_tokens, "extrapolate_worlds": args.extrapolate_worlds}
    result = measure(config, Network(args.alpha_us * 1e-6, args.beta_gbs * 1e9))
    print_tables(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
