"""Prefill and decoding with attnlab's softmax attention sharded across processes (tree attention, P128).

    torchrun --nproc_per_node 2 examples/torchrun_sharded_attention.py          # a laptop: gloo on CPU
    torchrun --nproc_per_node 8 examples/torchrun_sharded_attention.py --backend nccl   # one GPU per process

Every process builds the same module (same seed) and holds a contiguous slice of a prompt (`Partition.even`).
Prefill: `attnlab.distributed.shard(module, strategy="tree")` runs the causal forward sequence-parallel, each
rank computing the outputs of its own slice. Decode: each rank keeps its slice's keys and values as its part
of the KV cache; each new token's query is the same on every rank; `decode_step` combines the ranks' (max,
sum-exp, numerator) by a tree all-reduce and appends the token's key and value to the last rank's slice.
Each rank checks its prefill slice against the unsharded forward on the whole prompt, rank 0 every decoded
output against the module's own `step` over the whole cache; rank 0 prints the largest difference, and the
script exits with status 1 if it is above the tolerance (1e-5 in float32).
With --backend nccl each process uses the GPU of its LOCAL_RANK; nothing else changes.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import attnlab
from attnlab.core.module import KVCache
from attnlab.distributed import Partition, shard
from attnlab.distributed.decode import CommCounter, decode_step

DIM, HEADS, PROMPT, NEW_TOKENS, TOLERANCE = 64, 4, 37, 5, 1e-5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--strategy", default="tree", choices=["tree", "ring"])
    args = parser.parse_args()
    dist.init_process_group(args.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")

    torch.manual_seed(0)  # the same module and the same tokens on every rank
    module = attnlab.build("softmax", dim=DIM, heads=HEADS, causal=True).to(device).eval()
    prompt = torch.randn(1, PROMPT, DIM, device=device)
    new_tokens = torch.randn(1, NEW_TOKENS, DIM, device=device)

    partition = Partition.even(PROMPT, world)
    x_local = partition.local(prompt, rank)  # only this rank's slice of the prompt
    with torch.no_grad():
        y_local = shard(module, strategy="tree")(x_local)  # prefill, sequence-parallel
        _, k, v = module.project(x_local)
        cache = KVCache(k, v)
        counter = CommCounter()
        # the unsharded check: every rank its prefill slice, rank 0 the decoded tokens
        worst = float((y_local - partition.local(module(prompt), rank)).abs().max())
        full = KVCache(*module.project(prompt)[1:]) if rank == 0 else None
        for t in range(NEW_TOKENS):
            x_t = new_tokens[:, t:t + 1]
            y_t, cache = decode_step(module, x_t, cache, strategy=args.strategy, counter=counter)
            if full is not None:
                want, full = module.step(x_t, full)
                worst = max(worst, float((y_t - want).abs().max()))
    print(f"rank {rank}/{world}: {cache.length} cached positions after decoding; sent {counter.bytes_sent} bytes "
          f"in {counter.rounds} steps over {NEW_TOKENS} tokens ({args.strategy})", flush=True)
    largest = torch.tensor([worst], dtype=torch.float64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    ok = largest.item() <= TOLERANCE
    if rank == 0:
        verdict = "matches" if ok else "DOES NOT match"
        print(f"sharded prefill and decode {verdict} the unsharded module: max |difference| = {largest.item():.2e} "
              f"over the {PROMPT}-token prompt and {NEW_TOKENS} new tokens (tolerance {TOLERANCE:g})", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
