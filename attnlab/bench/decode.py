"""Decoding one token over a KV cache sharded on p gloo processes: tree (P128) vs ring, measured and modelled.

`measure(config, network)` runs what `benchmarks/distributed_decode.py` reports: one query (batch b, h heads,
head dim d) against a cache of N positions split evenly over p processes on 127.0.0.1 (one thread each), for
each p of config["worlds"], and against the same cache unsharded in one process (SDPA). Three schedules:
"tree" (`tree_decode`, butterfly all-reduce), "ring" (`ring_decode`, K/V blocks around the ring) and
"allreduce" (`tree_decode` through gloo's own all-reduce, a ring). Per p and schedule: the steps, messages
and bytes each rank sent (`CommCounter`; for "allreduce" the textbook counts of gloo's ring all-reduce, not
observed), the cost model's prediction of them (`attnlab.distributed.cost_model`), the wall time per decoded
token (the slowest rank's, median over interleaved rounds), and the peak memory per rank (the resident set's
rise during one call, `timing.peak_memory`) beside the buffers the model says the call allocates. Then the
model's rounds, bytes per rank and α-β time at p = 64 … 1024 under the stated network.

`records(result)` turns a run into results-store rows of the "decode" suite (`record` writes them):

* kind "unsharded": the one-process run (time per token, peak rise, cache bytes);
* kind "sharded": one per (schedule, p), every per-rank list as measured and as predicted;
* kind "extrapolated": one per p of the model's extrapolation, with the network it assumes.

The configuration of a row is the cache's shape (tokens, batch, heads, head_dim, dtype) plus its kind's keys,
so a rerun of the same setting replaces its rows; the report (`report.inference`) reads them back.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import Partition
from ..distributed.cost_model import (
    Network,
    allreduce_decode_cost,
    buffer_bytes,
    ring_decode_cost,
    step_time_s,
    tree_decode_cost,
)
from ..distributed.decode import CommCounter, ring_decode, tree_decode
from ..testing_distributed import run_ranks
from .store import ResultStore
from .timing import MMAP_THRESHOLD_ENV, peak_memory

SUITE = "decode"
SCHEDULES = ("tree", "ring", "allreduce")  # allreduce: tree_decode by gloo's own all-reduce (a ring)
SHAPE_KEYS = ("tokens", "batch", "heads", "head_dim", "dtype")  # a setting: the cache every row of it decodes


def _cache(config: Mapping[str, Any], sizes: tuple[int, ...], rank: int
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
    counters = {name: CommCounter() for name in SCHEDULES}
    outs = {name: calls[name](counters[name]) for name in SCHEDULES}  # also the warm-up
    torch.testing.assert_close(outs["tree"], outs["ring"])
    torch.testing.assert_close(outs["tree"], outs["allreduce"])
    times: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    for r in range(config["rounds"]):
        shift = r % len(SCHEDULES)  # each schedule goes first in turn
        for name in SCHEDULES[shift:] + SCHEDULES[:shift]:
            dist.barrier()
            t0 = time.perf_counter()
            calls[name]()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the token is decoded when the slowest rank is done
            times[name].append(float(elapsed))
    peaks = {}
    for name in SCHEDULES:
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


def _dims(config: Mapping[str, Any]) -> tuple[int, int, int, torch.dtype]:
    return config["batch"], config["heads"], config["head_dim"], getattr(torch, config["dtype"])


def _predicted(config: Mapping[str, Any], sizes: tuple[int, ...], network: Network) -> dict[str, Any]:
    dims = _dims(config)
    costs = {"tree": tree_decode_cost(len(sizes), *dims), "ring": ring_decode_cost(sizes, *dims),
             "allreduce": allreduce_decode_cost(len(sizes), *dims)}
    return {name: {"rounds": [c.rounds for c in cost], "messages": [c.messages for c in cost],
                   "bytes_sent": [c.bytes_sent for c in cost], "time_s": step_time_s(cost, network),
                   "buffer_bytes": list(buffer_bytes("ring" if name == "ring" else "tree", sizes, *dims))}
            for name, cost in costs.items()}


def measure(config: dict[str, Any], network: Network) -> dict[str, Any]:
    """The run described in the module docstring (config: worlds, tokens, batch, heads, head_dim, dtype, rounds,
    extrapolate_tokens, extrapolate_worlds); the three schedules' outputs are checked equal first."""
    os.environ.update(MMAP_THRESHOLD_ENV)  # inherited by the spawned ranks (glibc reads it at start)
    dims = _dims(config)
    unsharded = run_ranks(_unsharded_rank, 1, args=(config,), timeout=600)[0]
    unsharded["median_s"] = statistics.median(unsharded["times_s"])
    unsharded["buffer_bytes"] = buffer_bytes("dense", (config["tokens"],), *dims)[0]
    worlds = []
    for world in config["worlds"]:
        ranks = run_ranks(_sharded_rank, world, args=(config,), timeout=900)
        sizes = ranks[0]["sizes"]
        predicted = _predicted(config, sizes, network)
        entry: dict[str, Any] = {"world": world, "sizes": list(sizes),
                                 "cache_bytes_per_rank": [r["cache_bytes"] for r in ranks]}
        for name in SCHEDULES:
            measured_bytes = [r["counters"][name]["bytes_sent"] for r in ranks]
            entry[name] = {
                "rounds": [r["counters"][name]["rounds"] for r in ranks],
                "messages": [r["counters"][name]["messages"] for r in ranks],
                "bytes_sent": measured_bytes,
                "modelled": any(r["counters"][name]["modelled"] for r in ranks),
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


def records(result: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(config, metrics) per store row of a `measure` result: unsharded, sharded per (schedule, p), extrapolated."""
    cfg = result["config"]
    shape = {k: cfg[k] for k in SHAPE_KEYS}
    un = result["unsharded"]
    rows = [({"kind": "unsharded", **shape},
             {"median_s": un["median_s"], "times_s": un["times_s"], "peak_bytes": un["peak_bytes"],
              "cache_bytes": un["cache_bytes"], "buffer_bytes": un["buffer_bytes"]})]
    for w in result["worlds"]:
        for name in SCHEDULES:
            s = w[name]
            rows.append(({"kind": "sharded", **shape, "schedule": name, "world": w["world"]}, {
                "sizes": w["sizes"], "cache_bytes": w["cache_bytes_per_rank"],
                "rounds": s["rounds"], "messages": s["messages"], "bytes_sent": s["bytes_sent"],
                "modelled": bool(s.get("modelled", False)),
                "predicted_rounds": s["predicted"]["rounds"], "predicted_messages": s["predicted"]["messages"],
                "predicted_bytes": s["predicted"]["bytes_sent"], "predicted_time_s": s["predicted"]["time_s"],
                "buffer_bytes": s["predicted"]["buffer_bytes"],
                "median_s": s["median_s"], "times_s": s["times_s"], "peak_bytes": s["peak_bytes"],
                "timed_rounds": cfg["rounds"],
            }))
    net = result["network"]
    for row in result["extrapolated"]:
        rows.append(({"kind": "extrapolated", **shape, "world": row["world"], "extrapolate_tokens": row["tokens"],
                      "alpha_s": net["alpha_s"], "beta_bytes_per_s": net["beta_bytes_per_s"]},
                     {name: row[name] for name in SCHEDULES}))
    return rows


def record(store: ResultStore, result: Mapping[str, Any], env: Mapping[str, Any]) -> int:
    """Write the rows of `result` to `store` (a rerun of a setting replaces its rows); the number written."""
    rows = records(result)
    for config, metrics in rows:
        store.record(SUITE, config, "ok", metrics, dict(env), replace=True)
    return len(rows)


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def table_text(result: Mapping[str, Any]) -> str:
    """The measured and extrapolated tables as text (what the script prints)."""
    cfg, un = result["config"], result["unsharded"]
    out = [f"N = {cfg['tokens']}, batch {cfg['batch']}, {cfg['heads']} heads, head dim {cfg['head_dim']}, "
           f"{cfg['dtype']}, median of {cfg['rounds']} interleaved rounds"]
    held = None if un["peak_bytes"] is None else un["cache_bytes"] + un["peak_bytes"]
    out.append(f"unsharded (1 process, SDPA): {un['median_s'] * 1e3:.2f} ms/token, cache {_mib(un['cache_bytes'])} MiB, "
               f"peak rise {_mib(un['peak_bytes'])} MiB (model {_mib(un['buffer_bytes'])}), held {_mib(held)} MiB")
    out.append("per p: the largest over ranks; rise = resident set rise during one call, held = cache + rise; "
               "ms/token = the slowest rank's, all processes on this machine's cores over loopback")
    out.append(f"{'p':>3} {'':9} {'rounds':>7} {'pred':>5} {'msgs':>5} {'KiB sent/rank':>14} {'pred KiB':>10} "
               f"{'ms/token':>9} {'rise MiB/rank':>14} {'model MiB':>10} {'cache MiB/rank':>15} {'held MiB/rank':>14}")
    for w in result["worlds"]:
        for name in SCHEDULES:
            s = w[name]
            peaks = [p for p in s["peak_bytes"] if p is not None]
            held = (max(c + p for c, p in zip(w["cache_bytes_per_rank"], s["peak_bytes"]))
                    if len(peaks) == w["world"] else None)
            out.append(f"{w['world']:>3} {name:9} {max(s['rounds']):>7} {max(s['predicted']['rounds']):>5} "
                       f"{max(s['messages']):>5} {max(s['bytes_sent']) / 1024:>14.1f} "
                       f"{max(s['predicted']['bytes_sent']) / 1024:>10.1f} {s['median_s'] * 1e3:>9.2f} "
                       f"{_mib(max(peaks) if peaks else None):>14} {_mib(max(s['predicted']['buffer_bytes'])):>10} "
                       f"{_mib(max(w['cache_bytes_per_rank'])):>15} {_mib(held):>14}")
    net = result["network"]
    out.append(f"\ncost model, N = {cfg['extrapolate_tokens']} even split, α = {net['alpha_s'] * 1e6:g} µs per step, "
               f"β = {net['beta_bytes_per_s'] / 1e9:g} GB/s per link (no contention, full duplex)")
    out.append(f"{'p':>5} {'tree rounds':>11} {'tree KiB':>9} {'tree µs':>8} {'ring rounds':>11} {'ring MiB':>9} "
               f"{'ring µs':>9} {'allreduce rounds':>16} {'allreduce µs':>12}")
    for row in result["extrapolated"]:
        t, r, a = row["tree"], row["ring"], row["allreduce"]
        out.append(f"{row['world']:>5} {t['rounds']:>11} {t['bytes_sent'] / 1024:>9.2f} {t['time_s'] * 1e6:>8.1f} "
                   f"{r['rounds']:>11} {r['bytes_sent'] / 2**20:>9.2f} {r['time_s'] * 1e6:>9.1f} "
                   f"{a['rounds']:>16} {a['time_s'] * 1e6:>12.1f}")
    return "\n".join(out)
