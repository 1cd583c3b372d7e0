"""Communication cost of decoding one token over a sharded KV cache: tree (P128) vs ring, per rank.

The counts are those of `attnlab.distributed.decode` (what its `CommCounter` records), as functions of the shard
sizes n_r (N = Σ n_r over p ranks), batch b, heads h, head_dim d and the element size e of the dtype:

* tree (`reduce="butterfly"`): one state message of b·h·(d + 2)·e bytes per step. With q = 2^⌊log2 p⌋,
  ranks r < q take log2 q steps, plus one when rank r + q exists (it receives that rank's state, and sends the
  result back: two steps, one send); ranks r >= q take two steps and send once.
  For p a power of two: rounds = log2 p, bytes = log2 p · b·h·(d + 2)·e — independent of N.
* tree by the backend's all-reduce (`reduce="allreduce"`, gloo: a ring all-reduce, `allreduce_decode_cost`):
  2·2(p − 1) steps, about 2·b·h·(d + 2)·e bytes — O(p) steps, which is why the butterfly is the default.
* ring (K/V blocks around the ring): in step t = 1 … p − 1 rank r sends the block of rank r − t + 1
  (2·b·h·n_(r−t+1)·d·e bytes) and receives that of rank r − t; a step counts when either is non-empty.
  For an even split: rounds = p − 1, bytes = (p − 1)·2·b·h·(N/p)·d·e ≈ 2·b·h·N·d·e — grows with N.

Network assumptions of `step_time_s`: a message costs α (latency per step) + bytes/β (β the bandwidth of one
link); each rank's link is full duplex and links between different pairs do not share bandwidth (no
contention), so a step costs the largest of its messages, and the decode time is the slowest rank's
rounds·α + bytes_sent/β. Computation and the shard-size exchange are not included.

`buffer_bytes` is the memory a call allocates beyond the cache it is given (scores, received blocks,
states), to set against the resident-set rise the benchmark measures.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import ParameterError
from .partition import Partition

__all__ = ["Network", "RankCost", "allreduce_decode_cost", "buffer_bytes", "ring_decode_cost", "step_time_s", "tree_decode_cost"]


@dataclass(frozen=True)
class Network:
    """α: seconds per communication step (latency); β: bytes per second of one link."""

    alpha_s: float = 5e-6
    beta_bytes_per_s: float = 25e9


@dataclass(frozen=True)
class RankCost:
    """One rank's communication for one decoded token."""

    rounds: int
    messages: int
    bytes_sent: int


def _element_size(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise ParameterError(f"dtype: expected a torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def _check_dims(batch: int, heads: int, head_dim: int) -> None:
    for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        if not isinstance(value, int) or value < 1:
            raise ParameterError(f"{name}: expected a positive int, got {value!r}")


def tree_decode_cost(world: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[RankCost, ...]:
    """Per rank: steps, messages and bytes of `tree_decode(reduce="butterfly")` on `world` ranks (no N in it)."""
    if not isinstance(world, int) or world < 1:
        raise ParameterError(f"world: expected a positive int, got {world!r}")
    _check_dims(batch, heads, head_dim)
    message = batch * heads * (head_dim + 2) * _element_size(dtype)
    core = 1 << (world.bit_length() - 1)
    steps = core.bit_length() - 1  # log2 core
    out = []
    for rank in range(world):
        if rank >= core:
            out.append(RankCost(2, 1, message))
        elif rank + core < world:
            out.append(RankCost(steps + 2, steps + 1, (steps + 1) * message))
        else:
            out.append(RankCost(steps, steps, steps * message))
    return tuple(out)


def allreduce_decode_cost(world: int, batch: int, heads: int, head_dim: int,
                          dtype: torch.dtype) -> tuple[RankCost, ...]:
    """Per rank: `tree_decode(reduce="allreduce")` on gloo, whose all-reduce is a ring (reduce-scatter, then
    all-gather): per call 2(p − 1) steps, each sending ⌈n/p⌉ of the n payload elements; two calls, the max
    (b·h elements) and the rescaled (l, o) (b·h·(d + 1)). Textbook counts: gloo also splits a chunk into
    segments for pipelining, which adds messages, not bytes."""
    if not isinstance(world, int) or world < 1:
        raise ParameterError(f"world: expected a positive int, got {world!r}")
    _check_dims(batch, heads, head_dim)
    e = _element_size(dtype)
    steps = 2 * (world - 1)
    payloads = (batch * heads, batch * heads * (head_dim + 1))
    sent = sum(steps * -(-n // world) * e for n in payloads)
    return tuple(RankCost(2 * steps, 2 * steps, sent) for _ in range(world))


def ring_decode_cost(sizes: Sequence[int], batch: int, heads: int, head_dim: int,
                     dtype: torch.dtype) -> tuple[RankCost, ...]:
    """Per rank: steps, messages and bytes of `ring_decode` with shard sizes `sizes` (cached positions per rank)."""
    partition = Partition(tuple(sizes))
    _check_dims(batch, heads, head_dim)
    world, n = partition.world, partition.sizes
    per_position = 2 * batch * heads * head_dim * _element_size(dtype)
    out = []
    for rank in range(world):
        rounds = messages = sent = 0
        for t in range(1, world):
            held, incoming = n[(rank - t + 1) % world], n[(rank - t) % world]
            rounds += bool(held or incoming)
            messages += bool(held)
            sent += held * per_position
        out.append(RankCost(rounds, messages, sent))
    return tuple(out)


def step_time_s(costs: Sequence[RankCost], network: Network = Network()) -> float:
    """Communication time of one decoded token: the slowest rank's rounds·α + bytes_sent/β."""
    return max(c.rounds * network.alpha_s + c.bytes_sent / network.beta_bytes_per_s for c in costs)


def buffer_bytes(strategy: str, sizes: Sequence[int], batch: int, heads: int, head_dim: int,
                 dtype: torch.dtype) -> tuple[int, ...]:
    """Per rank: bytes a decode call allocates beside its cache ("tree", "ring"; "dense" for one process holding
    all of `sizes`). Scores and their exponentials (2·b·h·n), for the ring the stacked block it sends and the
    largest block it receives (2·b·h·n·d each); the (d + 2)-element states are left out (small)."""
    partition = Partition(tuple(sizes))
    _check_dims(batch, heads, head_dim)
    e = _element_size(dtype)
    scores = [2 * batch * heads * n * e for n in partition.sizes]
    if strategy == "dense":
        return (2 * batch * heads * partition.total * e,)
    if strategy == "tree":
        return tuple(scores)
    if strategy == "ring":
        world = partition.world
        out = []
        for rank, n in enumerate(partition.sizes):
            others = [partition.sizes[(rank - t) % world] for t in range(1, world)] or [0]
            block = 2 * batch * heads * head_dim * e
            out.append(block * (n + max(others)) + 2 * batch * heads * max([n, *others]) * e)
        return tuple(out)
    raise ParameterError(f"strategy: expected 'tree', 'ring' or 'dense', got {strategy!r}")

