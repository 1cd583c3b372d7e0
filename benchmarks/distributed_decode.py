"""Decoding one token over a KV cache sharded on p gloo processes (127.0.0.1): tree (P128) vs ring, and the cost model.

    .venv/bin/python benchmarks/distributed_decode.py                          # p = 2, 4, 8; N = 16,384
    .venv/bin/python benchmarks/distributed_decode.py --json out/distributed_decode.json
    .venv/bin/python benchmarks/distributed_decode.py --worlds 2 4 8 --tokens 4096 --rounds 5   # quick look
    .venv/bin/python benchmarks/distributed_decode.py --db attnlab-results/results.sqlite   # then `attnlab report`

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

The measurement is `attnlab.bench.decode.measure`; its rows go to the results store (--db, suite "decode":
the unsharded run, each (schedule, p), the extrapolation), where `attnlab report` shows them beside the
cost model, its % difference from the measured bytes and a figure. Quick setting: --worlds 2 4 8
--tokens 4096 --rounds 5 (47 s on the shared 2-core machine at load 2, 122 s at load 8; the defaults took
189 s at load 9).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnlab.bench import decode
from attnlab.bench.env import run_environment
from attnlab.bench.store import DEFAULT_DB, ResultStore
from attnlab.distributed.cost_model import Network


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
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, metavar="PATH",
                        help=f"the results database the rows go to, suite {decode.SUITE!r} (default {DEFAULT_DB})")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error(f"--rounds: expected >= 5, got {args.rounds}")
    if any(w < 1 for w in args.worlds):
        parser.error(f"--worlds: expected positive ints, got {args.worlds}")
    config = {"worlds": args.worlds, "tokens": args.tokens, "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "dtype": args.dtype, "rounds": args.rounds,
              "extrapolate_tokens": args.extrapolate_tokens, "extrapolate_worlds": args.extrapolate_worlds}
    store = ResultStore(args.db)  # checked writable before the run
    env = run_environment(matmul=False)
    result = decode.measure(config, Network(args.alpha_us * 1e-6, args.beta_gbs * 1e9))
    print()
    print(decode.table_text(result))
    written = decode.record(store, result, env)
    print(f"\nrecorded {written} rows of suite {decode.SUITE!r} in {args.db} (`attnlab report --db {args.db}`)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
