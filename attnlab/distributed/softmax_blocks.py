"""Softmax attention between a block of queries and a block of keys at GLOBAL positions, and the exact merge.

The sharded strategies of the softmax family (`ring`, `tree`) cut the score matrix of

    out_i = Σ_j exp(s_ij) v_j / Σ_j exp(s_ij),   s_ij = scale·q_iᵀk_j + b_h(|i − j|)   (−∞ where masked)

into blocks (queries of one rank × keys of one rank). A block gives its partial sums against a stabiliser m_i
(a constant per query, never differentiated: the output does not depend on it),

    l_i = Σ_j exp(s_ij − m_i),   num_i = Σ_j exp(s_ij − m_i) v_j,

and partials of the same queries merge exactly: with M = max(m, m'), (l, num) = (l·e^(m−M) + l'·e^(m'−M), …),
out = num / l. A query row with no key in a block has m = −∞, l = 0, num = 0 (it adds nothing).

Per mechanism (`SoftmaxForm.of`): softmax (nothing more), alibi and kerple (a per-head bias of the distance
|i − j|, read from the module's own score term, so gradients reach KERPLE's learnt r1, r2), rope (q and k
rotated at their global positions), coca (q, k mapped to CoCA's factors a_i, b_j at their global positions,
s_ij = a_iᵀb_j), multiscale (head h keeps |i − j| ≤ ω_h). `causal` keeps j ≤ i by global index.
Projections are token-wise: each rank applies them to its own tokens (`sharded_forward`).
Parameter gradients are per-rank partial sums (as in data parallelism): their sum over the ranks
(`sum_parameter_grads`) equals the unsharded module's gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..mechanisms.dense.alibi import ALiBi, ALiBiAttention
from ..mechanisms.dense.coca import CoCAAttention, coca_magnitudes
from ..mechanisms.dense.kerple import KerpleAttention, KerpleLog, KerplePower
from ..mechanisms.dense.multiscale import GLOBAL, MultiScaleAttention
from ..mechanisms.dense.rope import RoPEAttention, apply_rope, rope_angles
from ..mechanisms.dense.softmax import SoftmaxAttention
from .partition import Partition

# the modules whose score is exactly what `block_partials` computes (subclasses may change it: refused)
SHARDABLE_CLASSES = (SoftmaxAttention, ALiBiAttention, KerpleAttention, RoPEAttention, CoCAAttention,
                     MultiScaleAttention)
DISTANCE_TERMS = (ALiBi, KerpleLog, KerplePower)  # score terms that are functions of |i − j| only

Partials = tuple[Tensor, Tensor, Tensor]  # (m, l, num): (b, h, n_q, 1), (b, h, n_q, 1), (b, h, n_q, d_v)


@dataclass(frozen=True)
class SoftmaxForm:
    """What a softmax-family module adds to scale·q·k: its rotary map, distance bias and band per head."""

    name: str
    scale: float
    causal: bool
    rotary: str  # "none", "rope" or "coca"
    base: float
    radii: tuple[int, ...] | None  # multiscale: head h keeps |i − j| <= radii[h] (−1 = every key)
    distance_terms: tuple[nn.Module, ...]  # ALiBi / KERPLE terms of the module

    @classmethod
    def of(cls, module: nn.Module, strategy: str) -> SoftmaxForm:
        """The form of `module`; ParameterError for a module whose scores are not one of the six forms."""
        if type(module) not in SHARDABLE_CLASSES:
            names = ", ".join(c.__name__ for c in SHARDABLE_CLASSES)
            raise ParameterError(f"module: the {strategy} strategy shards {names}, got {type(module).__name__}")
        terms = tuple(getattr(module, "score_terms", ()))
        for term in terms:
            if not isinstance(term, DISTANCE_TERMS):
                raise ParameterError(f"module: {strategy} shards score terms of |i − j| "
                                     f"({', '.join(t.__name__ for t in DISTANCE_TERMS)}), got {type(term).__name__}")
        rotary = "coca" if isinstance(module, CoCAAttention) else "rope" if isinstance(module, RoPEAttention) else "none"
        radii = tuple(module.radii) if isinstance(module, MultiScaleAttention) else None
        return cls(module.spec.name, float(module.scale), bool(module.causal), rotary,
                   float(getattr(module, "base", 10000.0)), radii, terms)

    def queries(self, q: Tensor, positions: Tensor) -> Tensor:
        """q (b, h, n, d) at global `positions` (n,) as the block kernel takes it (rotated / CoCA's a_i)."""
        if self.rotary == "rope":
            return apply_rope(q, positions, base=self.base)
        if self.rotary == "coca":  # a_i = [|q_i^(m)|² cos iθ_m ; |q_i^(m)|² sin iθ_m]
            half = q.shape[-1] // 2
            norm2 = q[..., :half].square() + q[..., half:].square()
            cos, sin = rope_angles(positions, q.shape[-1], self.base, q.dtype)
            return torch.cat((norm2 * cos, norm2 * sin), dim=-1)
        return q

    def keys(self, k: Tensor, positions: Tensor) -> Tensor:
        """k (b, h, n, d) at global `positions` as the block kernel takes it (rotated / CoCA's b_j)."""
        if self.rotary == "rope":
            return apply_rope(k, positions, base=self.base)
        if self.rotary == "coca":  # b_j = [t_j^(m) cos jθ_m ; t_j^(m) sin jθ_m]
            mag = coca_magnitudes(k)
            cos, sin = rope_angles(positions, k.shape[-1], self.base, k.dtype)
            return torch.cat((mag * cos, mag * sin), dim=-1)
        return k

    def distance_table(self, total: int, *, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """(heads, total): the summed score terms at distances 0..total−1, or None without terms.

        A term's forward(1, total) is the row of a query at position total−1 against keys 0..total−1, i.e.
        distances total−1..0; flipped, entry δ is the bias at distance δ (differentiable in the term's parameters).
        """
        table = None
        for term in self.distance_terms:
            row = term(1, total, device=device, dtype=dtype)[:, 0, :].flip(-1)
            table = row if table is None else table + row
        return table

    def keep(self, pos_q: Tensor, pos_k: Tensor) -> Tensor | None:
        """bool (1 or heads, n_q, n_k): the causal / multi-scale mask at global positions, or None."""
        rel = pos_q[:, None] - pos_k[None, :]
        keep = (rel >= 0)[None] if self.causal else None
        if self.radii is not None:
            radius = torch.tensor([max(w, 0) for w in self.radii], device=rel.device)
            every = torch.tensor([w == GLOBAL for w in self.radii], device=rel.device)
            band = (rel.abs()[None] <= radius[:, None, None]) | every[:, None, None]
            keep = band if keep is None else keep & band
        return keep


def block_partials(q: Tensor, k: Tensor, v: Tensor, pos_q: Tensor, pos_k: Tensor, form: SoftmaxForm,
                   table: Tensor | None, stabilizer: Tensor | None = None) -> Partials:
    """(m, l, num) of queries q (b, h, n_q, d) at `pos_q` against keys k, values v (b, h, n_k, ·) at `pos_k`.

    m is the row max of the scores (or `stabilizer` when given), −∞ for a row with no key; never differentiated.
    """
    scores = (q @ k.transpose(-1, -2)) * form.scale
    if table is not None:
        scores = scores + table[:, (pos_q[:, None] - pos_k[None, :]).abs()]
    keep = form.keep(pos_q, pos_k)
    if keep is not None:
        scores = scores.masked_fill(~keep, -math.inf)
    if stabilizer is not None:
        m = stabilizer.detach()
    elif scores.shape[-1]:
        m = scores.detach().amax(-1, keepdim=True)
    else:  # an empty block (a rank without tokens)
        m = scores.new_full((*scores.shape[:-1], 1), -math.inf)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - safe)
    return m, p.sum(-1, keepdim=True), p @ v


def merge_partials(a: Partials, b: Partials) -> Partials:
    """The partials of the union of two key sets: rescaled to the larger stabiliser and summed (exact)."""
    m = torch.maximum(a[0], b[0])
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(a[0] - safe), torch.exp(b[0] - safe)
    return m, a[1] * wa + b[1] * wb, a[2] * wa + b[2] * wb


def normalize(sumexp: Tensor, num: Tensor) -> Tensor:
    """out = num / sumexp, zeros on rows with no key (sumexp = 0), without NaN in the gradient."""
    return num / torch.where(sumexp > 0, sumexp, torch.ones_like(sumexp))


def group_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in the group, group size)."""
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    """The global rank of the group's rank `rank` (what point-to-point calls take)."""
    return rank if group is None or group is dist.GroupMember.WORLD else dist.get_global_rank(group, rank)


Attend = Callable[[Tensor, Tensor, Tensor, Tensor | None, SoftmaxForm, Partition, int, dist.ProcessGroup | None],
                  Tensor]


def sharded_forward(strategy: str, module: nn.Module, x_local: Tensor, partition: Partition,
                    group: dist.ProcessGroup | None, attend: Attend, **kwargs: object) -> Tensor:
    """The module on this rank's tokens: local projections, `attend` (the communicating core) on the heads
    (q, k transformed at global positions), the output projection. Returns (batch, n_local, dim)."""
    if kwargs:
        raise ParameterError(f"{strategy}: masks, context and other call arguments are not supported when sharded, "
                             f"got {', '.join(sorted(kwargs))}")
    form = SoftmaxForm.of(module, strategy)
    if not getattr(module, "batch_first", True):
        raise ParameterError(f"module: {strategy} takes x_local as (batch, n_local, dim), expected batch_first=True, "
                             "got batch_first=False")
    rank, world = group_rank(group)
    if partition.world != world:
        raise ParameterError(f"partition: expected {world} sizes (one per rank), got {partition.world}")
    if x_local.dim() != 3 or x_local.shape[2] != module.dim or x_local.shape[1] != partition.sizes[rank]:
        raise ShapeError(f"x_local: expected (batch, {partition.sizes[rank]}, {module.dim}) on rank {rank}, "
                         f"got shape {tuple(x_local.shape)}")
    start, stop = partition.bounds(rank)
    positions = torch.arange(start, stop, device=x_local.device)
    # the six classes project as Attention.project does; heads split with explicit sizes, so that a rank
    # without tokens (n_local = 0) works too (split_heads' view(..., -1) refuses 0 elements)
    q, k, v = (proj(x_local).unflatten(-1, (module.heads, module.head_dim)).transpose(1, 2)
               for proj in (module.q_proj, module.k_proj, module.v_proj))
    q, k = form.queries(q, positions), form.keys(k, positions)
    table = form.distance_table(max(partition.total, 1), device=x_local.device, dtype=x_local.dtype)
    out = attend(q, k, v, table, form, partition, rank, group)
    return module.out_proj(module.merge_heads(out))


def sum_parameter_grads(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce (sum) every parameter's .grad over the group: the unsharded module's gradient on every rank."""
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
