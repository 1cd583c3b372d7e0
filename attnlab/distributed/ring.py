"""Ring attention (Liu, Zaharia & Abbeel, 2023) for the softmax family: K/V blocks passed around the ring.

Rank r holds the queries, keys and values of its contiguous slice of tokens. At step s = 0..p−1 it holds the
K/V block of rank (r − s) mod p, merges that block's partials into its running (m, sumexp, num)
(`softmax_blocks.merge_partials`, the online softmax), and passes the block on to rank r + 1 while computing
(send/recv overlapped with the block's arithmetic). After p steps every query has met every key:

    out_i = num_i / l_i,   exact (float rounding aside) for any order of the blocks.

Backward (`RingAttention.backward`) recomputes each block from q, k, v and the saved row statistics
(M_i, L_i): with P_ij = exp(s_ij − M_i), the block's share of the output is (Σ_j P_ij v_j, Σ_j P_ij), whose
cotangents are dout/L and −(dout·out)/L. The K/V blocks travel the ring again together with their
accumulated dK, dV (and the distance-bias table's gradient stays on the rank that computed it); one last
hop brings each dK, dV home. Memory per rank: one block of scores at a time, O(n_local·n_block).

Causal: a block wholly in a rank's future (its first key after the rank's last query) is skipped (passed on,
not computed), so rank r computes r + 1 of the p blocks. Load balance is by the partition: the slices are
contiguous (`Partition`), and `balanced_causal_sizes` gives sizes of equal causal work
(n_r·(o_r + n_r/2) equal, i.e. offsets o_r ≈ N·√(r/p)); zig-zag reordering of the tokens is not done here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.errors import ParameterError
from . import register_strategy
from .partition import Partition
from .softmax_blocks import SoftmaxForm, block_partials, global_rank, merge_partials, normalize, sharded_forward


def balanced_causal_sizes(total: int, world: int) -> tuple[int, ...]:
    """Slice sizes whose causal work n_r·(o_r + n_r/2) is about equal: offsets o_r = round(total·√(r/world))."""
    if world < 1:
        raise ParameterError(f"world: expected >= 1, got {world}")
    if total < 0:
        raise ParameterError(f"total: expected >= 0, got {total}")
    offsets = [round(total * math.sqrt(r / world)) for r in range(world)] + [total]
    return tuple(offsets[r + 1] - offsets[r] for r in range(world))


def _needed(form: SoftmaxForm, partition: Partition, rank: int, block: int) -> bool:
    """Does rank `rank`'s queries see any key of `block`? (empty slices and causal future blocks: no)."""
    if partition.sizes[rank] == 0 or partition.sizes[block] == 0:
        return False
    return not form.causal or partition.offsets[block] < partition.bounds(rank)[1]


def _hop(send: Tensor, recv_rows: int, partition: Partition, rank: int,
         group: dist.ProcessGroup | None) -> tuple[Tensor, Callable[[], None]]:
    """Start sending `send` (a block) to rank + 1 and receiving the previous block (recv_rows tokens) from
    rank − 1; returns (receive buffer, wait: blocks until both are done). Empty blocks are not sent (both
    sides know the sizes). The tensors stay referenced until the wait."""
    world = partition.world
    outgoing = send.contiguous()
    recv = send.new_empty(*send.shape[:2], recv_rows, send.shape[3])
    ops = []
    if outgoing.shape[2]:
        ops.append(dist.P2POp(dist.isend, outgoing, global_rank(group, (rank + 1) % world), group))
    if recv_rows:
        ops.append(dist.P2POp(dist.irecv, recv, global_rank(group, (rank - 1) % world), group))
    requests = dist.batch_isend_irecv(ops) if ops else []

    def wait() -> None:
        for req in requests:
            req.wait()
        del ops[:]  # the tensors were referenced by the ops until here

    return recv, wait


def _positions(partition: Partition, rank: int, device: torch.device) -> Tensor:
    start, stop = partition.bounds(rank)
    return torch.arange(start, stop, device=device)


class RingAttention(torch.autograd.Function):
    """Ring attention on transformed heads q, k (b, h, n_local, d), v (b, h, n_local, d_v), the distance table."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, form: SoftmaxForm,
                partition: Partition, rank: int, group: dist.ProcessGroup | None) -> Tensor:
        world, d_k = partition.world, k.shape[-1]
        pos_q = _positions(partition, rank, q.device)
        acc = (q.new_full((*q.shape[:3], 1), -math.inf), q.new_zeros(*q.shape[:3], 1), q.new_zeros(*v.shape[:3],
                                                                                                     v.shape[-1]))
        block = torch.cat((k, v), dim=-1)
        for step in range(world):
            owner = (rank - step) % world
            if step + 1 < world:  # start passing the block on while computing with it
                nxt, wait = _hop(block, partition.sizes[(owner - 1) % world], partition, rank, group)
            if _needed(form, partition, rank, owner):
                acc = merge_partials(acc, block_partials(q, block[..., :d_k], block[..., d_k:], pos_q,
                                                         _positions(partition, owner, q.device), form, table))
            if step + 1 < world:
                wait()
                block = nxt
        m, sumexp, num = acc
        out = normalize(sumexp, num)
        ctx.save_for_backward(q, k, v, table, out, m, sumexp)
        ctx.form, ctx.partition, ctx.rank, ctx.group = form, partition, rank, group
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, table, out, m, sumexp = ctx.saved_tensors
        form, partition, rank, group = ctx.form, ctx.partition, ctx.rank, ctx.group
        world, d_k, d_v = partition.world, k.shape[-1], v.shape[-1]
        pos_q = _positions(partition, rank, q.device)
        l_safe = torch.where(sumexp > 0, sumexp, torch.ones_like(sumexp))
        d_num, d_l = dout / l_safe, -(dout * out).sum(-1, keepdim=True) / l_safe
        dq = torch.zeros_like(q)
        dtable = None if table is None else torch.zeros_like(table)
        # a travelling block: k, v and the dK, dV accumulated for it so far
        block = torch.cat((k, v, torch.zeros_like(k), torch.zeros_like(v)), dim=-1)
        for step in range(world):
            owner = (rank - step) % world
            if _needed(form, partition, rank, owner):
                with torch.enable_grad():
                    leaves = [q.detach().requires_grad_(), block[..., :d_k].detach().requires_grad_(),
                              block[..., d_k:d_k + d_v].detach().requires_grad_()]
                    if table is not None:
                        leaves.append(table.detach().requires_grad_())
                    _, bl, bnum = block_partials(*leaves[:3], pos_q, _positions(partition, owner, q.device), form,
                                                 leaves[3] if table is not None else None, stabilizer=m)
                    grads = torch.autograd.grad((bl, bnum), leaves, (d_l, d_num))
                dq = dq + grads[0]
                block = torch.cat((block[..., :d_k + d_v], block[..., d_k + d_v:d_k + d_v + d_k] + grads[1],
                                   block[..., d_k + d_v + d_k:] + grads[2]), dim=-1)
                if dtable is not None:
                    dtable = dtable + grads[3]
            # pass on; after the last step only the gradients travel, one hop home to their owner
            send = block if step + 1 < world else block[..., d_k + d_v:]
            if world > 1:
                block, wait = _hop(send, partition.sizes[(owner - 1) % world], partition, rank, group)
                wait()
            else:
                block = send
        return dq, block[..., :d_k], block[..., d_k:], dtable, None, None, None, None


def _attend(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, form: SoftmaxForm, partition: Partition,
            rank: int, group: dist.ProcessGroup | None) -> Tensor:
    return RingAttention.apply(q, k, v, table, form, partition, rank, group)


@register_strategy("ring")
def ring(module: nn.Module, x_local: Tensor, partition: Partition, group: dist.ProcessGroup | None,
         **kwargs: Any) -> Tensor:
    """This rank's output (batch, n_local, dim) of a softmax-family `module` run by ring attention."""
    return sharded_forward("ring", module, x_local, partition, group, _attend, **kwargs)
