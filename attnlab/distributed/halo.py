"""Halo exchange: local-window attention (neighborhood 1-/2-/3-D, sliding-window) sequence-parallel, exactly.

Rank ρ holds the tokens [s_ρ, e_ρ) of a sequence of N (on a grid: the rows [s_ρ, e_ρ) of the first
axis, every row whole). The projections are token-wise, so each rank computes q, k, v of its own
tokens. Its queries read only the keys of one contiguous global range [a_ρ, b_ρ) ⊇ [s_ρ, e_ρ):

* sliding-window, radius r:   a = max(0, s − r),   b = min(N, e + r)   (b = e when causal);
* neighborhood, kernel k on the first axis (undilated), window start w(i) = clamp(i − ⌊k/2⌋, 0, N − k):
  a = w(s), b = w(e − 1) + k, the windows clamped at the GLOBAL borders (a rank next to a border
  needs up to k − 1 keys on the far side); causal: a = max(0, s − k + 1), b = e.

The keys and values of [a, s) and [e, b) (the halo) come from the ranks that own them — every rank
whose slice meets the range, so a rank smaller than the halo is passed over to the next one — and
the mechanism's own core runs on the extended keys [a, b) with the queries placed at their positions
in it (zero queries on the halo positions, whose outputs are dropped). The result is exact:

* sliding-window: the band |i − j| ≤ r of an own query lies inside [a, b), so the band on the
  extended sequence is the global band;
* neighborhood: w is non-decreasing, so a = w(s) ≤ w(i) ≤ w(e − 1) = b − k for every own query i,
  and clamping i − ⌊k/2⌋ to [a, b − k] gives w(i): the window is the global one (borders included);
  a relative position bias depends on j − i only. A dilated first axis is refused (its groups i mod δ
  would need one range per group); other axes may be dilated (they are whole on every rank).

Communication: point-to-point only, with the ranks within reach. Forward, a rank sends one message
(its keys and values, with the padding mask if one is given, packed in one tensor) to each rank whose
range [a, b) meets its slice, and receives one from each rank owning part of its own halo: when every
rank holds at least the halo, that is 2 messages sent and 2 received per rank (1 and 1 when causal,
fewer at the ends of the sequence). The backward (an autograd.Function) sends the gradients of the
received halo back to their owners, the same count of messages in the other direction, and each
owner adds them to the gradients of its keys and values.

Gradients w.r.t. the inputs are exact on every rank. A parameter's gradient on a rank is its share
from that rank's tokens: summed over the ranks (all_reduce, as data-parallel training does anyway)
it is the unsharded module's (`softmax_blocks.sum_parameter_grads`; a rank without tokens holds zeros, not
None, so that it joins the all-reduce). Every rank must run the backward (the exchange is collective among
neighbours); all ranks must hold the same trailing grid axes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.masks import module_keep_mask
from ..core.validate import check_finite, check_floating, check_module_dtype, check_tensor
from ..mechanisms.local.neighborhood import NeighborhoodAttention, neighborhood_args
from ..mechanisms.sparse.sliding_window import SlidingWindowAttention
from . import register_strategy
from .partition import Partition

KeyRange = Callable[[int, int], tuple[int, int]]  # own tokens [s, e) -> the keys [a, b) they read
MASK_KEYWORDS = ("attention_mask", "key_padding_mask")


# -- which keys a rank's queries read ------------------------------------------------------------
def sliding_window_range(radius: int, causal: bool, total: int) -> KeyRange:
    """[s, e) -> [max(0, s − r), min(N, e + r)) (e when causal)."""

    def keys(start: int, stop: int) -> tuple[int, int]:
        return max(0, start - radius), stop if causal else min(total, stop + radius)

    return keys


def neighborhood_range(kernel: int, dilation: int, causal: bool, total: int) -> KeyRange:
    """[s, e) -> [w(s), w(e − 1) + k) with w(i) = clamp(i − ⌊k/2⌋, 0, N − k); causal [max(0, s − k + 1), e)."""
    if dilation != 1:
        raise ParameterError(
            f"dilation: halo exchange splits the first grid axis, which must be undilated (its dilation groups "
            f"i mod δ would each need their own key range); expected 1 on axis 0, got {dilation}"
        )
    if kernel > total:
        raise ShapeError(f"kernel_size: kernel_size={kernel} exceeds the length {total} of the sharded axis 0; "
                         f"expected kernel_size <= {total}")

    def start_of(i: int) -> int:
        return min(max(i - kernel // 2, 0), total - kernel)

    def keys(start: int, stop: int) -> tuple[int, int]:
        if causal:
            return max(0, start - kernel + 1), stop
        return start_of(start), start_of(stop - 1) + kernel

    return keys


def key_range(module: nn.Module, grid_rank: int, total: int) -> KeyRange:
    """The key range of `module` (a neighborhood or sliding-window module) on a first axis of `total` positions."""
    if isinstance(module, SlidingWindowAttention):
        if grid_rank != 1:
            raise ShapeError(f"x_local: sliding-window takes a sequence (batch, n, dim), got {grid_rank} grid axes")
        return sliding_window_range(module.radius, module.causal, total)
    if isinstance(module, NeighborhoodAttention):
        if module.grid_rank is not None and module.grid_rank != grid_rank:
            raise ShapeError(f"x_local: expected {module.grid_rank} grid axes (the module's grid_rank), got {grid_rank}")
        kernel, dilation, causal = neighborhood_args(grid_rank, module.kernel_size, module.dilation, module.causal)
        return neighborhood_range(kernel[0], dilation[0], causal[0], total)
    raise ParameterError(f"module: halo exchange serves neighborhood and sliding-window, got {type(module).__name__}")


def min_extent(module: nn.Module, grid_rank: int) -> int:
    """The fewest positions the core takes on axis 0: a causal neighborhood checks k <= length, so an extended
    range shorter than k (a rank at the left border) gets zero keys appended on its right, which its causal
    windows never reach."""
    if isinstance(module, NeighborhoodAttention):
        kernel, _, causal = neighborhood_args(grid_rank, module.kernel_size, module.dilation, module.causal)
        return kernel[0] if causal[0] else 1
    return 1


# -- who sends what to whom ----------------------------------------------------------------------
@dataclass(frozen=True)
class HaloPlan:
    """Rank `rank` owns [start, stop) and reads the keys [need_start, need_stop); `receives` and `sends` are
    (peer, lo, hi): the global tokens [lo, hi) received from / sent to the group rank `peer`, in rank order."""

    rank: int
    start: int
    stop: int
    need_start: int
    need_stop: int
    receives: tuple[tuple[int, int, int], ...]
    sends: tuple[tuple[int, int, int], ...]

    @property
    def left(self) -> int:
        """Halo tokens before the own ones."""
        return self.start - self.need_start


def key_ranges(keys: KeyRange, partition: Partition) -> list[tuple[int, int]]:
    """Every rank's key range [a, b) ((s, s) for a rank without tokens: it reads nothing)."""
    return [keys(*partition.bounds(r)) if partition.sizes[r] else partition.bounds(r) for r in range(partition.world)]


def halo_plan(keys: KeyRange, partition: Partition, rank: int) -> HaloPlan:
    """The messages of rank `rank`: the overlaps of its key range with the others' slices and vice versa."""
    ranges = key_ranges(keys, partition)
    start, stop = partition.bounds(rank)
    need_start, need_stop = ranges[rank]
    receives, sends = [], []
    for peer in range(partition.world):
        if peer == rank:
            continue
        lo, hi = partition.bounds(peer)
        if max(lo, need_start) < min(hi, need_stop):
            receives.append((peer, max(lo, need_start), min(hi, need_stop)))
        if max(start, ranges[peer][0]) < min(stop, ranges[peer][1]):
            sends.append((peer, max(start, ranges[peer][0]), min(stop, ranges[peer][1])))
    return HaloPlan(rank, start, stop, need_start, need_stop, tuple(receives), tuple(sends))


def _exchange(outgoing: list[tuple[int, Tensor]], incoming: list[tuple[int, Tensor]],
              group: dist.ProcessGroup | None) -> None:
    """Post every send and receive (peers are group ranks) as one batch (as NCCL needs to avoid ordering
    deadlocks), then wait for all of them."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), group=group, group_peer=peer) for peer, t in outgoing]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for peer, t in incoming]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class HaloExchange(torch.autograd.Function):
    """own (…, n_own, …) along dim 2 -> the extended (…, need_stop − need_start, …); backward returns the halo's
    gradients to their owners and adds what comes back to the own gradient."""

    @staticmethod
    def forward(ctx: Any, own: Tensor, plan: HaloPlan, group: dist.ProcessGroup | None) -> Tensor:
        ctx.plan, ctx.group = plan, group
        outgoing = [(peer, own.narrow(2, lo - plan.start, hi - lo)) for peer, lo, hi in plan.sends]
        incoming = [(peer, own.new_empty(*own.shape[:2], hi - lo, *own.shape[3:])) for peer, lo, hi in plan.receives]
        _exchange(outgoing, incoming, group)
        before = [t for peer, t in incoming if peer < plan.rank]
        after = [t for peer, t in incoming if peer > plan.rank]
        return torch.cat([*before, own, *after], dim=2)

    @staticmethod
    def backward(ctx: Any, grad_ext: Tensor) -> tuple[Tensor, None, None]:
        plan: HaloPlan = ctx.plan
        outgoing = [(peer, grad_ext.narrow(2, lo - plan.need_start, hi - lo)) for peer, lo, hi in plan.receives]
        incoming = [(peer, grad_ext.new_empty(*grad_ext.shape[:2], hi - lo, *grad_ext.shape[3:]))
                    for peer, lo, hi in plan.sends]
        _exchange(outgoing, incoming, ctx.group)
        grad = grad_ext.narrow(2, plan.left, plan.stop - plan.start).clone()
        for (_, lo, hi), g in zip(plan.sends, (t for _, t in incoming)):
            grad.narrow(2, lo - plan.start, hi - lo).add_(g)
        return grad, None, None


# -- the strategy ------------------------------------------------------------------------------------
def _heads(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (batch, heads, *positions, head_dim) of the tokens x (batch, *positions, dim)."""
    return tuple(  # type: ignore[return-value]
        proj(x).unflatten(-1, (module.heads, module.head_dim)).movedim(-2, 1)
        for proj in (module.q_proj, module.k_proj, module.v_proj)
    )


def _check_x(module: nn.Module, x_local: Tensor, partition: Partition, rank: int) -> None:
    check_tensor("x_local", x_local)
    check_floating("x_local", x_local)
    check_finite("x_local", x_local)
    check_module_dtype("x_local", x_local, module)
    if x_local.dim() < 3 or x_local.shape[-1] != module.dim:
        raise ShapeError(f"x_local: expected (batch, n_local, …, dim={module.dim}), got shape {tuple(x_local.shape)}")
    if x_local.shape[1] != partition.sizes[rank]:
        raise ShapeError(f"x_local: rank {rank} holds {partition.sizes[rank]} positions on axis 1 by the partition "
                         f"{partition.sizes}, got {x_local.shape[1]}")


@register_strategy("halo")
def halo_attention(module: nn.Module, x_local: Tensor, partition: Partition, group: dist.ProcessGroup | None,
                   **kwargs: Any) -> Tensor:
    """This rank's slice of module(x) for x split along axis 1 by `partition` (x_local: (batch, n_local, dim), or
    (batch, rows, …, dim) on a grid); padding as `attention_mask` / `key_padding_mask` over the local tokens."""
    unknown = sorted(set(kwargs) - set(MASK_KEYWORDS))
    if unknown:
        raise ParameterError(f"kwargs: halo exchange takes {' or '.join(MASK_KEYWORDS)}, got {', '.join(unknown)}")
    if not getattr(module, "batch_first", True):
        raise ParameterError("module: halo exchange takes batch-first tokens (batch, n_local, dim), the sizes per rank "
                             "along axis 1; got a module built with batch_first=False")
    rank = dist.get_rank(group)
    x = x_local  # (batch, rows, …, dim)
    _check_x(module, x, partition, rank)
    grid_rank = x.dim() - 2
    plan = halo_plan(key_range(module, grid_rank, partition.total), partition, rank)
    keep = module_keep_mask(kwargs.get("attention_mask"), kwargs.get("key_padding_mask"), x.shape[0],
                            x[0, ..., 0].numel(), tuple(x.shape[1:-1]))
    q, k, v = _heads(module, x)
    d_k, d_v = k.shape[-1], v.shape[-1]
    packed = [k, v]
    if keep is not None:  # one more channel, so that the mask travels in the same message
        channel = keep.reshape(x.shape[:-1]).to(k.dtype)[:, None, ..., None]
        packed.append(channel.expand(*k.shape[:-1], 1))
    ext = HaloExchange.apply(torch.cat(packed, dim=-1), plan, group)
    unseen = max(0, min_extent(module, grid_rank) - ext.shape[2])  # zero keys (and keep = 0) on the right
    ext = torch.nn.functional.pad(ext, [0, 0] * (ext.dim() - 3) + [0, unseen])
    k_ext, v_ext = ext[..., :d_k], ext[..., d_k:d_k + d_v]
    keep_ext = None if keep is None else ext[:, 0, ..., -1].reshape(x.shape[0], -1) > 0.5
    if plan.stop > plan.start:
        pad = [0, 0] * (q.dim() - 3) + [plan.left, plan.need_stop - plan.stop + unseen]  # zero queries on the halo
        q_ext = torch.nn.functional.pad(q, pad)
        out = module.attend(q_ext, k_ext, v_ext, attention_mask=keep_ext).narrow(2, plan.left, plan.stop - plan.start)
    else:  # no tokens here: the empty output, still a function of the parameters
        out = v
    return module.out_proj(out.movedim(1, -2).flatten(-2))
