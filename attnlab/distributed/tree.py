"""Tree attention (P128: Shyam et al., 2024) for the softmax family: per-rank partials combined by all-reduce.

Softmax attention of a query over keys split across p ranks is a reduction: each rank r computes, against
its own keys only, the row max m_r, the sum-exp l_r = Σ_j exp(s_j − m_r) and the numerator
num_r = Σ_j exp(s_j − m_r) v_j; then

    M = max_r m_r,   out = Σ_r e^(m_r − M) num_r / Σ_r e^(m_r − M) l_r

two all-reduces (a max, then one sum of the packed (l, num)): O(log p) steps where the backend reduces
on a tree (NCCL's tree algorithm); gloo runs every all-reduce as a ring, 2(p − 1) steps (see
attnlab.distributed.decode, which also has a log2 p recursive-doubling combine) (`combine_partials`, reusable by decoding over a sharded KV cache). For a sharded sequence every rank's
queries must meet every rank's keys: the queries are all-gathered (padded to the longest slice, which
gloo needs), every rank computes its partials for all N queries against its own K/V, and the combined rows
of its own queries are its output. Communication per rank: the gathered queries plus the all-reduce of
(N, d_v + 1) per head — O(N·d) where ring attention moves the K/V blocks.

Backward is autograd through two communicating Functions: the all-reduce sum (its backward all-reduces the
gradients) and the gather (its backward sums the gathered queries' gradients over the ranks and keeps
this rank's slice). The stabiliser M is not differentiated (the output does not depend on it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import register_strategy
from .partition import Partition
from .softmax_blocks import SoftmaxForm, block_partials, normalize, sharded_forward


class AllReduceSum(torch.autograd.Function):
    """Sum over the group, differentiable: y = Σ_r x_r on every rank, so dx_r = Σ_r dy_r (an all-reduce again)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None]:
        dx = dy.contiguous().clone()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


class GatherSequence(torch.autograd.Function):
    """All ranks' slices (b, h, n_r, d) concatenated along dim 2 in rank order, differentiable."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, partition: Partition, rank: int, group: dist.ProcessGroup | None) -> Tensor:
        ctx.partition, ctx.rank, ctx.group = partition, rank, group
        longest = max(partition.sizes)
        padded = x.new_zeros(*x.shape[:2], longest, x.shape[3])
        padded[:, :, : x.shape[2]] = x
        parts = [torch.empty_like(padded) for _ in range(partition.world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:, :, :n] for part, n in zip(parts, partition.sizes)], dim=2)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None, None]:
        total = dy.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        start, stop = ctx.partition.bounds(ctx.rank)
        return total[:, :, start:stop], None, None, None


def combine_partials(m: Tensor, sumexp: Tensor, num: Tensor,
                     group: dist.ProcessGroup | None = None) -> Tensor:
    """P128's reduction: out = Σ_r e^(m_r − M) num_r / Σ_r e^(m_r − M) l_r, M = max_r m_r, over the group.

    m, sumexp: (..., 1) and num (..., d_v) are this rank's partials (m, l, o) for the same queries on every rank
    (m = −∞ on a row with no key here). Differentiable in sumexp and num; rows with no key anywhere give zeros.
    """
    top = m.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(m.detach() - safe)
    packed = AllReduceSum.apply(torch.cat((sumexp * weight, num * weight), dim=-1), group)
    return normalize(packed[..., :1], packed[..., 1:])


def _attend(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, form: SoftmaxForm, partition: Partition,
            rank: int, group: dist.ProcessGroup | None) -> Tensor:
    queries = GatherSequence.apply(q, partition, rank, group)
    start, stop = partition.bounds(rank)
    everyone = torch.arange(partition.total, device=q.device)
    m, sumexp, num = block_partials(queries, k, v, everyone, everyone[start:stop], form, table)
    return combine_partials(m, sumexp, num, group)[:, :, start:stop]


@register_strategy("tree")
def tree(module: nn.Module, x_local: Tensor, partition: Partition, group: dist.ProcessGroup | None,
         **kwargs: Any) -> Tensor:
    """This rank's output (batch, n_local, dim) of a softmax-family `module` run by tree attention."""
    return sharded_forward("tree", module, x_local, partition, group, _attend, **kwargs)
