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

Causal: a key span wholly in a query span's future is skipped (passed on, not computed). With the
contiguous layout (default) rank r then computes r + 1 of the p blocks. `layout="zigzag"` balances this:
one all-to-all (`Exchange`, differentiable) first moves the tokens (their transformed q, k, v) so that rank
r holds chunks r and 2p − 1 − r of 2p (`RingLayout.zigzag`); each block is then two chunk pairs against
two, of which every rank computes the same number (2p + 1 over the ring), and a second all-to-all brings
the outputs back to the ranks' slices. Alternatively `balanced_causal_sizes` gives contiguous slices of
equal causal work (n_r·(o_r + n_r/2) equal, offsets o_r ≈ N·√(r/p)).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RingLayout:
    """The global positions each rank holds during the ring: per rank, ascending (start, stop) spans."""

    spans: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def world(self) -> int:
        return len(self.spans)

    def size(self, rank: int) -> int:
        return sum(stop - start for start, stop in self.spans[rank])

    def positions(self, rank: int, device: torch.device) -> Tensor:
        """The positions of rank `rank`'s tokens, ascending (n,)."""
        parts = [torch.arange(start, stop, device=device) for start, stop in self.spans[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    @classmethod
    def contiguous(cls, partition: Partition) -> RingLayout:
        """Each rank its own slice (`Partition`)."""
        bounds = [partition.bounds(r) for r in range(partition.world)]
        return cls(tuple(((a, b),) if b > a else () for a, b in bounds))

    @classmethod
    def zigzag(cls, total: int, world: int) -> RingLayout:
        """The sequence cut into 2p chunks, rank r holding chunks r and 2p − 1 − r (equal causal work)."""
        chunks = Partition.even(total, 2 * world)
        spans = [(chunks.bounds(r), chunks.bounds(2 * world - 1 - r)) for r in range(world)]
        return cls(tuple(tuple(span for span in pair if span[1] > span[0]) for pair in spans))


LAYOUTS = ("contiguous", "zigzag")


def _span_pairs(form: SoftmaxForm, layout: RingLayout, rank: int, block: int) -> list[tuple[slice, slice]]:
    """(query rows, key rows) of the pairs of rank `rank`'s spans and `block`'s spans with keys to see: all
    of them, except (causal) a key span wholly after the query span (skipped: not computed)."""
    pairs, q_at = [], 0
    for q_start, q_stop in layout.spans[rank]:
        k_at = 0
        for k_start, k_stop in layout.spans[block]:
            if not form.causal or k_start < q_stop:
                pairs.append((slice(q_at, q_at + q_stop - q_start), slice(k_at, k_at + k_stop - k_start)))
            k_at += k_stop - k_start
        q_at += q_stop - q_start
    return pairs


def _hop(send: Tensor, recv_rows: int, world: int, rank: int,
         group: dist.ProcessGroup | None) -> tuple[Tensor, Callable[[], None]]:
    """Start sending `send` (a block) to rank + 1 and receiving the previous block (recv_rows tokens) from
    rank − 1; returns (receive buffer, wait: blocks until both are done). Empty blocks are not sent (both
    sides know the sizes). The tensors stay referenced until the wait."""
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


class RingAttention(torch.autograd.Function):
    """Ring attention on transformed heads q, k (b, h, n_local, d), v (b, h, n_local, d_v) held as `layout`
    says, and the distance table."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, form: SoftmaxForm,
                layout: RingLayout, rank: int, group: dist.ProcessGroup | None) -> Tensor:
        world, d_k = layout.world, k.shape[-1]
        pos_q = layout.positions(rank, q.device)
        m = q.new_full((*q.shape[:3], 1), -math.inf)
        sumexp, num = q.new_zeros(*q.shape[:3], 1), q.new_zeros(*v.shape[:3], v.shape[-1])
        block = torch.cat((k, v), dim=-1)
        for step in range(world):
            owner = (rank - step) % world
            if step + 1 < world:  # start passing the block on while computing with it
                nxt, wait = _hop(block, layout.size((owner - 1) % world), world, rank, group)
            pos_k = layout.positions(owner, q.device)
            for rows, keys in _span_pairs(form, layout, rank, owner):
                part = block_partials(q[:, :, rows], block[:, :, keys, :d_k], block[:, :, keys, d_k:], pos_q[rows],
                                      pos_k[keys], form, table)
                m[:, :, rows], sumexp[:, :, rows], num[:, :, rows] = merge_partials(
                    (m[:, :, rows], sumexp[:, :, rows], num[:, :, rows]), part)
            if step + 1 < world:
                wait()
                block = nxt
        out = normalize(sumexp, num)
        ctx.save_for_backward(q, k, v, table, out, m, sumexp)
        ctx.form, ctx.layout, ctx.rank, ctx.group = form, layout, rank, group
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, table, out, m, sumexp = ctx.saved_tensors
        form, layout, rank, group = ctx.form, ctx.layout, ctx.rank, ctx.group
        world, d_k, d_v = layout.world, k.shape[-1], v.shape[-1]
        pos_q = layout.positions(rank, q.device)
        l_safe = torch.where(sumexp > 0, sumexp, torch.ones_like(sumexp))
        d_num, d_l = dout / l_safe, -(dout * out).sum(-1, keepdim=True) / l_safe
        dq = torch.zeros_like(q)
        dtable = None if table is None else torch.zeros_like(table)
        # a travelling block: k, v and the dK, dV accumulated for it so far
        block = torch.cat((k, v, torch.zeros_like(k), torch.zeros_like(v)), dim=-1)
        for step in range(world):
            owner = (rank - step) % world
            pos_k = layout.positions(owner, q.device)
            for rows, keys in _span_pairs(form, layout, rank, owner):
                with torch.enable_grad():
                    leaves = [q[:, :, rows].detach().requires_grad_(),
                              block[:, :, keys, :d_k].detach().requires_grad_(),
                              block[:, :, keys, d_k:d_k + d_v].detach().requires_grad_()]
                    if table is not None:
                        leaves.append(table.detach().requires_grad_())
                    _, bl, bnum = block_partials(*leaves[:3], pos_q[rows], pos_k[keys], form,
                                                 leaves[3] if table is not None else None,
                                                 stabilizer=m[:, :, rows])
                    grads = torch.autograd.grad((bl, bnum), leaves, (d_l[:, :, rows], d_num[:, :, rows]))
                dq[:, :, rows] += grads[0]
                block[:, :, keys, d_k + d_v:] += torch.cat(grads[1:3], dim=-1)
                if dtable is not None:
                    dtable = dtable + grads[3]
            # pass on; after the last step only the gradients travel, one hop home to their owner
            send = block if step + 1 < world else block[..., d_k + d_v:]
            if world > 1:
                block, wait = _hop(send, layout.size((owner - 1) % world), world, rank, group)
                wait()
            else:
                block = send
        return dq, block[..., :d_k], block[..., d_k:], dtable, None, None, None, None


class Exchange(torch.autograd.Function):
    """x (n, ...) cut into consecutive pieces of `send` rows, piece d to rank d; returns the pieces received,
    `recv` rows from each rank, in rank order (all-to-all). Backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, None, None, None]:
        dx = dout.new_empty(sum(ctx.send), *dout.shape[1:])
        dist.all_to_all_single(dx, dout.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return dx, None, None, None


def _overlap(span: tuple[int, int], spans: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """The parts of `span` inside `spans`, ascending."""
    parts = [(max(span[0], a), min(span[1], b)) for a, b in spans]
    return [(a, b) for a, b in parts if b > a]


def _attend_contiguous(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, form: SoftmaxForm,
                       partition: Partition, rank: int, group: dist.ProcessGroup | None) -> Tensor:
    return RingAttention.apply(q, k, v, table, form, RingLayout.contiguous(partition), rank, group)


def _attend_zigzag(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, form: SoftmaxForm,
                   partition: Partition, rank: int, group: dist.ProcessGroup | None) -> Tensor:
    """The tokens moved from their slices to the zig-zag layout (one all-to-all), the ring, and back."""
    layout = RingLayout.zigzag(partition.total, partition.world)
    mine = partition.bounds(rank)
    send_rows = [_overlap(mine, layout.spans[d]) for d in range(partition.world)]
    send = [sum(b - a for a, b in parts) for parts in send_rows]
    recv = [sum(b - a for a, b in _overlap(partition.bounds(s), layout.spans[rank])) for s in range(partition.world)]
    order = torch.cat([torch.arange(a - mine[0], b - mine[0], device=q.device)
                       for parts in send_rows for a, b in parts] + [torch.zeros(0, dtype=torch.long, device=q.device)])
    d_q, d_k = q.shape[-1], k.shape[-1]
    tokens = torch.cat((q, k, v), dim=-1)[:, :, order].movedim(2, 0)  # (n, b, h, ·), grouped by destination
    moved = Exchange.apply(tokens, send, recv, group).movedim(0, 2)  # this rank's zig-zag tokens, ascending
    out = RingAttention.apply(moved[..., :d_q], moved[..., d_q:d_q + d_k], moved[..., d_q + d_k:], table, form,
                              layout, rank, group)
    back = Exchange.apply(out.movedim(2, 0), recv, send, group).movedim(0, 2)  # in `order`
    return back[:, :, torch.argsort(order)]


@register_strategy("ring")
def ring(module: nn.Module, x_local: Tensor, partition: Partition, group: dist.ProcessGroup | None, *,
         layout: str = "contiguous", **kwargs: Any) -> Tensor:
    """This rank's output (batch, n_local, dim) of a softmax-family `module` run by ring attention.

    layout: 'contiguous' (each rank's K/V block is its slice) or 'zigzag' (the tokens are first moved to
    chunks r and 2p − 1 − r of 2p, which balances the causal work, and the outputs moved back).
    """
    if layout not in LAYOUTS:
        raise ParameterError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    attend = _attend_zigzag if layout == "zigzag" else _attend_contiguous
    return sharded_forward("ring", module, x_local, partition, group, attend, **kwargs)
