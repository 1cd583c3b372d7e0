"""Decoding one query token against a KV cache sharded over the ranks of a process group (Tree Attention, P128).

Rank r holds the keys and values of its slice of the cache, K_r, V_r (batch, heads, n_r, head_dim), n_r >= 0;
every rank holds the same query q (batch, heads, 1, head_dim). Softmax attention over the whole cache is
recovered exactly from each rank's partial state (P128, eq. of the energy's gradient at ζ = 0):

    s_r = q K_rᵀ · scale,   m_r = max_j s_rj,   l_r = Σ_j exp(s_rj − m_r),   o_r = Σ_j exp(s_rj − m_r) V_rj
    (m, l, o) = (m_1, l_1, o_1) ⊕ … ⊕ (m_p, l_p, o_p),   m = max_r m_r,
    l = Σ_r l_r e^{m_r − m},   o = Σ_r o_r e^{m_r − m},   out = o / l

⊕ is associative and commutative, so the p states can be combined in any tree. An empty shard (or one whose
is (−inf, 0, 0), the identity of ⊕; a query with no key at all gives zeros.

Two exact schedules, every rank ending with the full output:

* `tree_decode` — the states combined by an all-reduce. `reduce="butterfly"` (default) runs it here over
  point-to-point messages, recursive doubling: in step k rank r swaps its (m, l, o) with rank r XOR 2^k and both
  apply ⊕, log2 p steps of one message of batch·heads·(head_dim + 2) elements each. When p is not a power
  of two, the ranks beyond the largest power of two q first hand their state to rank r − q and get the result
  back at the end (two more steps for those pairs). `reduce="allreduce"` calls the backend's all-reduce twice,
  as P128 writes it: MAX of m, then SUM of the rescaled (l, o). Gloo (torch's ProcessGroupGloo calls
  `gloo::allreduce` with no algorithm set) runs a *ring* all-reduce (gloo/allreduce.cc: reduce-scatter then
  all-gather along the ring, 2(p − 1) steps, each rank sending 2(p − 1)/p of the payload), so on gloo that form
  takes O(p) steps, not O(log p); NCCL picks ring or tree itself. Its counts are therefore the textbook ring's
  (`CommCounter.modelled`), not observed.
* `ring_decode` — Ring Attention's schedule (Liu et al., 2023), the baseline P128 compares against: the K/V
  blocks travel around the ring; in step t = 1 … p − 1 rank r sends the block it holds to rank r + 1, receives
  rank (r − t)'s block from rank r − 1 and merges its partial state into its running (m, l, o). p − 1 steps,
  each moving a whole K/V block (2·batch·heads·n_(r−t)·head_dim elements); steps whose block is empty send
  nothing. Every rank needs the shard sizes to size its receive buffers (`sizes`, or one all-gather).

`CommCounter` counts what each call sends: steps (rounds) in which this rank sent or received, messages and
bytes. `attnlab.distributed.cost_model` gives the same numbers from (sizes, batch, heads, head_dim, dtype).
`decode_step` is the module form: one token through a softmax module whose KV cache is sharded.
Decoding is inference only: nothing here is differentiable across ranks (sequence-parallel training is
`attnlab.distributed.shard`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.module import KVCache
from ..core.registry import Paper, Spec, add
from ..core.validate import check_qkv
from .cost_model import allreduce_decode_cost
from .partition import Partition, check_sizes

__all__ = ["CommCounter", "decode_partials", "decode_step", "merge_partials", "ring_decode", "tree_decode"]

REDUCTIONS = ("butterfly", "allreduce")
TREE_ATTENTION = Paper("P128", "Tree Attention: Topology-aware Decoding for Long-Context Attention on GPU Clusters",
                       2024, "2408.04093")


@dataclass
class CommCounter:
    """What one rank sent in the calls it was handed to (added up over calls).

    rounds: communication steps this rank took part in; messages and bytes_sent: point-to-point sends (or, for
    backend collectives, the textbook ring all-reduce's, then `modelled` is True); setup_*: the shard-size
    all-gather of `ring_decode` when `sizes` was not given (one step, 8 bytes to each other rank in a ring).
    """

    rounds: int = 0
    messages: int = 0
    bytes_sent: int = 0
    setup_rounds: int = 0
    setup_bytes: int = 0
    modelled: bool = False

    def add_send(self, t: Tensor) -> None:
        self.messages += 1
        self.bytes_sent += t.numel() * t.element_size()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def decode_partials(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """This shard's state packed as (batch, heads, head_dim + 2): [m, l, o] with m = max s, l = Σ e^{s−m},
    o = Σ e^{s−m} v, s = q kᵀ·scale over its keys. An empty shard gives (−inf, 0, 0)."""
    check_qkv(q, k, v)
    if q.shape[2] != 1:
        raise ShapeError(f"q: expected one query position (batch, heads, 1, head_dim), got shape {tuple(q.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)).squeeze(2) * scale  # (batch, heads, n_r)
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:2], 1), -math.inf)
    weights = torch.exp(s - m)
    sum_exp = weights.sum(dim=-1, keepdim=True)
    numerator = (weights.unsqueeze(2) @ v).squeeze(2)
    return torch.cat([m, sum_exp, numerator], dim=-1)


def _finite(m: Tensor) -> Tensor:
    """m with −inf (no key) replaced by 0, so that e^{m_r − m} is 0, not NaN, for an empty state."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def merge_partials(a: Tensor, b: Tensor) -> Tensor:
    """⊕ of two packed states: (max m, l_a e^{m_a−m} + l_b e^{m_b−m}, o_a e^{m_a−m} + o_b e^{m_b−m})."""
    m = torch.maximum(a[..., :1], b[..., :1])
    mf = _finite(m)
    wa, wb = torch.exp(a[..., :1] - mf), torch.exp(b[..., :1] - mf)
    return torch.cat([m, a[..., 1:] * wa + b[..., 1:] * wb], dim=-1)


def _finish(state: Tensor) -> Tensor:
    """out = o / l as (batch, heads, 1, head_dim); zeros where no key was attended (l = 0)."""
    sum_exp, numerator = state[..., 1:2], state[..., 2:]
    attended = sum_exp > 0
    out = torch.where(attended, numerator / torch.where(attended, sum_exp, torch.ones_like(sum_exp)),
                      torch.zeros_like(numerator))
    return out.unsqueeze(2)


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _exchange(send: Tensor | None, dst: int, recv: Tensor | None, src: int, group: dist.ProcessGroup | None,
              counter: CommCounter | None) -> None:
    """Send `send` to group rank dst while receiving `recv` from group rank src (either may be None): one step."""
    works = []
    if recv is not None:
        works.append(dist.irecv(recv, src=_global(group, src), group=group))
    if send is not None:
        works.append(dist.isend(send.contiguous(), dst=_global(group, dst), group=group))
        if counter is not None:
            counter.add_send(send)
    for w in works:
        w.wait()
    if counter is not None and works:
        counter.rounds += 1


def _butterfly(state: Tensor, group: dist.ProcessGroup | None, counter: CommCounter | None) -> Tensor:
    """All-reduce of ⊕ by recursive doubling (module docstring); every rank ends with the same bits."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    core = 1 << (world.bit_length() - 1)  # largest power of two <= world
    if rank >= core:  # fold in: hand the state over, get the result back
        result = torch.empty_like(state)
        _exchange(state, rank - core, None, -1, group, counter)
        _exchange(None, -1, result, rank - core, group, counter)
        return result
    if rank + core < world:
        extra = torch.empty_like(state)
        _exchange(None, -1, extra, rank + core, group, counter)
        state = merge_partials(state, extra)
    step = 1
    while step < core:
        partner = rank ^ step
        theirs = torch.empty_like(state)
        _exchange(state, partner, theirs, partner, group, counter)
        # the lower rank's state first, so both partners compute the same bits
        state = merge_partials(state, theirs) if rank < partner else merge_partials(theirs, state)
        step <<= 1
    if rank + core < world:
        _exchange(state, rank + core, None, -1, group, counter)
    return state


def _backend_allreduce(state: Tensor, group: dist.ProcessGroup | None, counter: CommCounter | None) -> Tensor:
    """P128's form: all-reduce MAX of m, then SUM of (l, o) rescaled to the global max (two backend calls)."""
    world = dist.get_world_size(group)
    m = state[..., :1].clone(memory_format=torch.contiguous_format)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    rest = state[..., 1:] * torch.exp(state[..., :1] - _finite(m))
    dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=group)
    if counter is not None and world > 1:  # the ring all-reduce gloo runs, by the textbook count
        b, h, d = state.shape[0], state.shape[1], state.shape[2] - 2
        cost = allreduce_decode_cost(world, b, h, d, state.dtype)[dist.get_rank(group)]
        counter.rounds += cost.rounds
        counter.messages += cost.messages
        counter.bytes_sent += cost.bytes_sent
        counter.modelled = True
    return torch.cat([m, rest], dim=-1)


def tree_decode(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *,
                scale: float | None = None, reduce: str = "butterfly",
                counter: CommCounter | None = None) -> Tensor:
    """softmax(q Kᵀ·scale) V over the cache sharded on `group`: this rank's k, v (batch, heads, n_r, head_dim),
    the query q (batch, heads, 1, head_dim) the same on every rank. Returns (batch, heads, 1, head_dim) on
    every rank. The ranks' (m, l, o) combined by an all-reduce (module docstring; `reduce`)."""
    if reduce not in REDUCTIONS:
        raise ParameterError(f"reduce: expected one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    state = decode_partials(q, k, v, scale=scale)
    if dist.get_world_size(group) > 1:
        state = (_butterfly if reduce == "butterfly" else _backend_allreduce)(state, group, counter)
    return _finish(state)


def _ring_sizes(k: Tensor, sizes: Sequence[int] | None, group: dist.ProcessGroup | None,
                counter: CommCounter | None) -> Partition:
    world = dist.get_world_size(group)
    if sizes is not None:
        partition = check_sizes("sizes", sizes, world)
    else:
        partition = Partition.gather(k.shape[2], group)
        if counter is not None:
            counter.setup_rounds += 1
            counter.setup_bytes += 8 * (world - 1)
    rank = dist.get_rank(group)
    if partition.sizes[rank] != k.shape[2]:
        raise ShapeError(f"sizes: rank {rank} holds {k.shape[2]} cached positions, sizes says {partition.sizes[rank]}")
    return partition


def ring_decode(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *,
                sizes: Sequence[int] | None = None, scale: float | None = None,
                counter: CommCounter | None = None) -> Tensor:
    """`tree_decode`'s output by Ring Attention's schedule: the K/V blocks passed around the ring (p − 1 steps),
    each rank merging every block into its running (m, l, o). `sizes`: cached positions per rank (default:
    gathered, one extra step counted as setup)."""
    state = decode_partials(q, k, v, scale=scale)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return _finish(state)
    partition = _ring_sizes(k, sizes, group, counter)
    block = torch.stack([k, v])  # (2, batch, heads, n, head_dim): one message per step
    for t in range(1, world):
        held = (rank - t + 1) % world  # whose block this rank holds now and sends on
        incoming = (rank - t) % world
        send = block if partition.sizes[held] else None
        recv = None
        if partition.sizes[incoming]:
            recv = block.new_empty((2, *k.shape[:2], partition.sizes[incoming], k.shape[3]))
        _exchange(send, (rank + 1) % world, recv, (rank - 1) % world, group, counter)
        if recv is not None:
            state = merge_partials(state, decode_partials(q, recv[0], recv[1], scale=scale))
            block = recv
        else:
            block = block.new_empty((2, *k.shape[:2], 0, k.shape[3]))
    return _finish(state)


STRATEGIES = {"tree": tree_decode, "ring": ring_decode}


def decode_step(module: nn.Module, x_t: Tensor, cache: KVCache | None, group: dist.ProcessGroup | None = None, *,
                owner: int | None = None, strategy: str = "tree", counter: CommCounter | None = None
                ) -> tuple[Tensor, KVCache]:
    """One token x_t (batch, 1, dim), the same on every rank, through a causal softmax module whose KV cache is
    sharded: `cache` is this rank's slice (None: empty). The new token's key and value join the cache of rank
    `owner` (default: the last rank). Returns (y_t (batch, 1, dim), this rank's new cache); y_t equals
    `module.step(x_t, full cache)`. Modules with score terms (ALiBi, KERPLE, …) are refused: their biases
    need global positions, not handled here."""
    spec = getattr(module, "spec", None)
    if spec is None or spec.name != "softmax" or len(getattr(module, "score_terms", ())) or not module.batch_first:
        name = getattr(spec, "name", type(module).__name__)
        raise ParameterError(f"module: expected a batch-first 'softmax' module without score terms, got {name}")
    if strategy not in STRATEGIES:
        raise ParameterError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = world - 1 if owner is None else owner
    if not 0 <= owner < world:
        raise ParameterError(f"owner: expected a rank in [0, {world}), got {owner}")
    x_b = module.check_step(x_t)
    q, k_t, v_t = module.project(x_b)
    if cache is None:
        k, v = k_t[:, :, :0], v_t[:, :, :0]
    else:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache (this rank's slice), got {type(cache).__name__}")
        k, v = cache.k, cache.v
    if rank == owner:
        k, v = torch.cat([k, k_t], dim=2), torch.cat([v, v_t], dim=2)
    out = STRATEGIES[strategy](q, k, v, group, scale=module.scale, counter=counter)
    return module.out_proj(module.merge_heads(out)), KVCache(k, v)


add(Spec(
    name="tree-decode", kind="inference", paper=TREE_ATTENTION, factory=tree_decode, family="F",
    summary="one query against a KV cache sharded over ranks: per-rank (max, sum-exp, numerator) all-reduced "
            "in log2 p steps; exact (ring_decode: Ring Attention's p − 1 steps, for comparison)",
    cost="O(N d / p) per rank + log2 p messages of b·h·(d + 2)",
))
