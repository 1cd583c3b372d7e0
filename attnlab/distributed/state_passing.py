"""State passing: the linear family sequence-parallel, exact, forward and backward (strategy "state").

Every mechanism built on the engine of `attnlab.kernels.linear_scan` runs one recurrence,

    S_t = T_t S_{t−1} + w_t φ(k_t) v_tᵀ,    out_t = S_tᵀ φ(q_t)  [ / φ(q_t)ᵀ z_t ]

    Hebbian:     T_t = diag(α_t)                      (α_t = 1, a scalar or one per channel)
    delta rule:  T_t = α_t (I − β_t φ(k_t) φ(k_t)ᵀ)

and it is linear in the state: the tokens of rank r map an entering state S_in to
S_out = A_r S_in + E_r, with E_r the end state of the rank's tokens from a zero state and A_r
their total transition (a diagonal Π α_t for the Hebbian form, carried as its log; the matrix
product T_n ⋯ T_1 for the delta rule, read as the end state of the recurrence started from the
identity with zero values). So rank r

1. computes its terms (`module.terms` on its own tokens: feature maps, decays, β — token-local)
   and its summary (E_r, A_r), the normaliser z riding along as one more value column;
2. all-gathers the summaries (one collective of p·d_k·(d_v + d_k) numbers per head) and
   composes the ones before it, S_in = A_{r−1}(⋯(A_0·0 + E_0)⋯) + E_{r−1};
3. reads its outputs with that entering state: the engine from S_in for the delta rule
   (`causal_delta_from`), or the engine from zero plus the correction (φ(q_t) ⊙ e^{g_t})ᵀ S_in
   (g_t the log decay since the rank's first token) for the Hebbian form; then normalises.

Why an all-gather and not a send to the next rank: the composition costs p small matrix
products, the same on every rank, in one round instead of p − 1 sequential ones (a log-depth
prefix scan would save nothing at this size), and its backward is one all-reduce: the gradient
of the gathered summaries summed over the ranks, every rank keeping its own — exactly
d loss / d(E_r, A_r), so the gradients of the inputs are the unsharded module's. Gradients of
the parameters are this rank's share: their sum over the ranks (what DistributedDataParallel
all-reduces) is the unsharded module's gradient.

Bidirectional: without decay or delta rule the global sums Σ φ(k_j)[v_j, 1]ᵀ, all-reduced
(backward: the gradient all-reduced); with them, the engine's A→ + A← − diag, the backward
scan passing states from the last rank down (both directions in the same all-gather).

Terms that are not token-local are made global first (`_global_terms`): Galerkin's and Efficient
'scaling''s 1/n from the global positions; Efficient 'softmax''s per-channel softmax over the
(prefix of the) sequence from the all-gathered log-sum-exp of every rank's keys.

Mamba ("mamba", `SelectiveSSM`): its causal conv reads the d_conv − 1 tokens before a rank's first
(all-gathered tails, so a rank shorter than that reach is crossed), and its diagonal state
h_t = e^{Δ_t A} ⊙ h_{t−1} + Δ_t u_t B_t passes like the Hebbian one, read by
`selective_scan(initial_state=)`.

Served (their entries declare "state"): "linear", "delta", "retention", "gated-linear", "miras"
(dot or L2 bias), "galerkin", "efficient", "focused-linear" (sequences; its 2-D grid form is refused),
"based" (its sliding window through a halo of window_size − 1 tokens), "mamba", and Miras' ℓp / Huber
memories ("miras-lp", "miras-huber", "miras" with those biases), causal: their update is not linear in v,
so there is no transition to compose; the memory is handed rank to rank instead (p − 1 sequential steps
forward and backward, differentiable send / recv). Refused with an error: those memories' bidirectional
form (every query reads the final memory), modules whose entry does not declare the strategy, and
attention masks (the padding would have to be passed too; not implemented). Every rank must join the backward (the collectives are in its graph),
as with DistributedDataParallel.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import ParameterError, ShapeError
from ..kernels.linear_scan import LinearTerms, causal_delta_from, linear_attention, normalizer_floor
from ..mechanisms.linear.base import LinearAttention
from ..mechanisms.linear.based import BasedAttention, sliding_window_attention
from ..mechanisms.linear.efficient import EfficientAttention
from ..mechanisms.linear.focused import FocusedLinearAttention, depthwise_conv
from ..mechanisms.linear.galerkin import GalerkinAttention
from ..mechanisms.linear.miras import NONLINEAR_BIASES, MemoryAttention, memory_scan
from ..mechanisms.linear.selective_ssm import SelectiveSSM, selective_scan
from . import register_strategy
from .partition import Partition

__all__ = ["state_passing"]


class _AllGather(torch.autograd.Function):
    """Every rank's `t` stacked (p, *t.shape); backward: the gradient summed over the ranks, this rank's row."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        ctx.group = group
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


class _AllReduce(torch.autograd.Function):
    """The sum of `t` over the ranks; backward: the gradient summed over the ranks."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _peer(group: dist.ProcessGroup | None, rank: int) -> int:
    """The global rank of `rank` in `group` (what send and recv take)."""
    return rank if group is None else dist.get_global_rank(group, rank)


class _Receive(torch.autograd.Function):
    """The state rank − 1 hands on (forward: recv); its gradient sent back to rank − 1 (backward).
    `anchor`: an empty tensor that requires grad when the rank's parameters or tokens do."""

    @staticmethod
    def forward(ctx, anchor: Tensor, shape: tuple[int, ...], source: int,  # type: ignore[override]
                group: dist.ProcessGroup | None) -> Tensor:
        state = anchor.new_empty(shape)
        dist.recv(state, src=_peer(group, source), group=group)
        ctx.source, ctx.group = source, group
        return state

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        dist.send(grad.contiguous(), dst=_peer(ctx.group, ctx.source), group=ctx.group)
        return None, None, None, None


class _Send(torch.autograd.Function):
    """Hand `state` on to rank + 1 (forward: send; returns a zero to add to the output, which puts this node
    in the graph); backward: the state's gradient received from rank + 1."""

    @staticmethod
    def forward(ctx, state: Tensor, dest: int, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        dist.send(state.contiguous(), dst=_peer(group, dest), group=group)
        ctx.dest, ctx.group, ctx.like = dest, group, state
        return state.new_zeros(())

    @staticmethod
    def backward(ctx, _: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = torch.empty_like(ctx.like)
        dist.recv(grad, src=_peer(ctx.group, ctx.dest), group=ctx.group)
        return grad, None, None


def _sequential_memory(module: MemoryAttention, x: Tensor, rank: int, world: int,
                       group: dist.ProcessGroup | None) -> Tensor:
    """Miras' ℓp / Huber memories (not linear in v): the memory handed rank to rank, p − 1 steps each way.
    Rank r receives rank r − 1's end memory, scans its tokens from it (`memory_scan`) and sends its own on."""
    if not module.causal:
        raise ParameterError(f"causal: the bidirectional {module.bias!r} memory reads the final memory M_N at every "
                             "query; state passing serves its causal form only, got causal=False")
    q, k, v, side = _project(module, x)
    t = module.terms(q, k, v, None, side)
    b, h, n, dk = t.k.shape
    if rank == 0:
        incoming = t.k.new_zeros(b, h, dk, t.v.shape[-1])
    else:
        anchor = torch.cat([p.reshape(-1)[:0].to(x.dtype) for p in module.parameters()] + [x.reshape(-1)[:0]])
        incoming = _Receive.apply(anchor, (b, h, dk, t.v.shape[-1]), rank - 1, group)
    if n == 0:  # the empty kᵀv keeps `end` in the graph on every rank (its _Send must run in the backward)
        out, end = t.q @ incoming, incoming + t.k.transpose(-1, -2) @ t.v
    else:
        out, end = memory_scan(t.q, t.k, t.v, bias=module.bias, beta=t.beta, p=module.p, delta=module.delta,
                               log_decay=t.log_decay, causal=True, memory=incoming)
    if rank + 1 < world:
        out = out + _Send.apply(end, rank + 1, group)
    return module.out_proj(module.merge_heads(out))


def _channel_log_decay(t: LinearTerms) -> Tensor | None:
    """log α as (b, h, n, d_k) (a scalar decay broadcast over the channels), or None."""
    if t.log_decay is None:
        return None
    return t.log_decay[..., None].expand_as(t.k) if t.log_decay.dim() == 3 else t.log_decay


class _Direction:
    """One scan direction of a rank's tokens: terms (b, h, n, ·) and the values (with the ones column)."""

    def __init__(self, t: LinearTerms, values: Tensor, chunk_size: int) -> None:
        self.t, self.values, self.chunk_size = t, values, chunk_size
        b, h, _, dk = t.k.shape
        self.shape = (b, h, dk, values.shape[-1])  # E_r
        self.delta = t.beta is not None
        self.trans_shape = (b, h, dk, dk) if self.delta else (b, h, dk)  # A_r, or log of its diagonal

    def summary_width(self) -> int:
        """Length of the last axis of `summary`."""
        return self.shape[2] * self.shape[3] + int(torch.Size(self.trans_shape[2:]).numel())

    def summary(self) -> Tensor:
        """(E_r, A_r) flattened into one (b, h, ·) tensor: the end state from zero and the total transition."""
        t, v = self.t, self.values
        b, h, n, dk = t.k.shape
        if n == 0:  # no token: E = 0 (written as an empty sum, in the graph like every rank's), A = identity
            eye = torch.eye(dk, dtype=v.dtype, device=v.device).expand(b, h, dk, dk)
            end, trans = t.k.transpose(-1, -2) @ v, eye if self.delta else v.new_zeros(self.trans_shape)
        elif self.delta:
            assert t.beta is not None
            start = torch.cat([v.new_zeros(self.shape), torch.eye(dk, dtype=v.dtype, device=v.device).expand(b, h, dk, dk)], -1)
            both = causal_delta_from(t.q, t.k, torch.cat([v, v.new_zeros(b, h, n, dk)], -1), t.beta, start,
                                     log_decay=t.log_decay, chunk_size=self.chunk_size)[1]
            end, trans = both[..., : v.shape[-1]], both[..., v.shape[-1]:]
        else:
            g = _channel_log_decay(t)
            if g is None:
                end, trans = t.k.transpose(-1, -2) @ v, v.new_zeros(self.trans_shape)
            else:
                g = g.cumsum(dim=2)
                last = g[:, :, -1]
                end, trans = (t.k * torch.exp(last[:, :, None] - g)).transpose(-1, -2) @ v, last
        return torch.cat([end.flatten(2), trans.flatten(2)], dim=-1)

    def compose(self, summaries: Tensor, ranks: list[int]) -> Tensor:
        """The state entering after the ranks `ranks` in order, from zero: S ← A_s S + E_s.

        The zero start is written 0·E of the first summary, so that the gathered tensor is in every
        rank's graph (its backward is a collective every rank must join)."""
        split = self.shape[2] * self.shape[3]
        ends = summaries[..., :split].unflatten(-1, self.shape[2:])
        trans = summaries[..., split:].unflatten(-1, self.trans_shape[2:])
        state = ends[0] * 0.0
        for s in ranks:
            state = (trans[s] @ state if self.delta else torch.exp(trans[s])[..., None] * state) + ends[s]
        return state

    def read(self, incoming: Tensor) -> Tensor:
        """Unnormalised outputs (b, h, n, d_v') of the rank's tokens entering with `incoming`."""
        t, v = self.t, self.values
        if t.q.shape[2] == 0:
            return t.q @ incoming
        if self.delta:
            assert t.beta is not None
            return causal_delta_from(t.q, t.k, v, t.beta, incoming, log_decay=t.log_decay, chunk_size=self.chunk_size)[0]
        local = linear_attention(t.q, t.k, v, causal=True, log_decay=t.log_decay, normalize=False,
                                 chunk_size=self.chunk_size)
        g = _channel_log_decay(t)
        q = t.q if g is None else t.q * torch.exp(g.cumsum(dim=2))
        return local + q @ incoming


def _flipped(t: LinearTerms) -> LinearTerms:
    flip = lambda x: None if x is None else x.flip(2)  # noqa: E731
    return LinearTerms(t.q.flip(2), t.k.flip(2), t.v.flip(2), flip(t.log_decay), flip(t.beta))


def _check(module: Any, x_local: Tensor, partition: Partition, rank: int) -> None:
    if not isinstance(module, LinearAttention):
        raise ParameterError("module: state passing serves the linear family (LinearAttention) and Mamba "
                             f"(SelectiveSSM), got {type(module).__name__}")
    spec = getattr(module, "spec", None)
    if spec is None or spec.supports is None or "state" not in spec.supports.sharding:
        name = getattr(spec, "name", type(module).__name__)
        raise ParameterError(f"module: {name} does not declare the 'state' strategy (its terms are not computed "
                             "here from a rank's own tokens), so state passing would not be exact")
    _check_tokens(module, x_local, partition, rank)


def _check_tokens(module: Any, x_local: Tensor, partition: Partition, rank: int) -> None:
    if x_local.dim() != 3 or x_local.shape[-1] != module.dim:
        raise ShapeError(f"x_local: expected (batch, n_local, {module.dim}), got shape {tuple(x_local.shape)}")
    if x_local.shape[1] != partition.sizes[rank]:
        raise ShapeError(f"x_local: rank {rank} holds {partition.sizes[rank]} tokens by the partition "
                         f"{partition.sizes}, got {x_local.shape[1]}")


def _project(module: LinearAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q, k, v (b, h, n, ·) and the side input of the tokens x; a rank holding no token projects one zero
    token and keeps none (splitting zero tokens into heads cannot infer the head width)."""
    n = x.shape[1]
    src = x if n else torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
    q, k, v = module.project(src)
    side = module.side_input(src)
    if n:
        return q, k, v, side
    return q[:, :, :0], k[:, :, :0], v[:, :, :0], None if side is None else side.narrow(-2, 0, 0)


def _halo(x: Tensor, partition: Partition, group: dist.ProcessGroup | None, rank: int, before: int,
          after: int) -> tuple[Tensor, Tensor]:
    """The `before` tokens preceding this rank's and the `after` following them (fewer at the ends of the
    sequence), across ranks shorter than that: every rank's last `before` and first `after` tokens,
    all-gathered in one collective."""
    b, n, dim = x.shape
    edges = torch.cat([torch.cat([x.new_zeros(b, before, dim), x], 1).narrow(1, n, before),
                       torch.cat([x, x.new_zeros(b, after, dim)], 1).narrow(1, 0, after)], 1)
    every = _AllGather.apply(edges, group)  # (p, b, before + after, dim)
    sizes, start = partition.sizes, partition.offsets[rank]
    none = every[rank][:, :0]  # an empty piece from the gathered tensor: every rank's graph holds the collective
    left = torch.cat([none] + [every[s].narrow(1, before - min(before, sizes[s]), min(before, sizes[s]))
                               for s in range(rank)], 1)
    right = torch.cat([none] + [every[s].narrow(1, before, min(after, sizes[s]))
                                for s in range(rank + 1, partition.world)], 1)
    seen_before, seen_after = min(before, start), min(after, partition.total - start - n)
    return left.narrow(1, left.shape[1] - seen_before, seen_before), right.narrow(1, 0, seen_after)


def _selective_ssm(module: SelectiveSSM, x_local: Tensor, partition: Partition, group: dist.ProcessGroup | None,
                   rank: int) -> Tensor:
    """Mamba: the conv's d_conv − 1 previous tokens from the ranks before (a halo, all-gathered), then the
    diagonal state h passed like the linear family's (E_r read off by d_state probe positions appended to
    the rank's scan: Δ = 0, u = 0, B = 0, C = e_j, so y = h_n[:, :, j]; A_r = exp(A Σ Δ) as its log)."""
    b, n, _ = x_local.shape
    context = _halo(x_local, partition, group, rank, module.d_conv - 1, 0)[0]  # the tokens its conv reads
    seen = context.shape[1]
    spare = [x_local.new_zeros(b, 1, x_local.shape[2])] if n == 0 else []  # the conv refuses an empty sequence
    p = module.ssm_inputs(torch.cat([context, x_local, *spare], 1))
    u, delta, B, C, z = (t[:, seen:seen + n] for t in (p.x, p.delta, p.B, p.C, p.z))
    A, states = module.A, module.d_state
    probes = torch.eye(states, dtype=u.dtype, device=u.device).expand(b, states, states)
    pad = lambda t: torch.cat([t, t.new_zeros(b, states, t.shape[-1])], 1)  # noqa: E731
    end = selective_scan(pad(u), pad(delta), A, pad(B), torch.cat([C, probes], 1), module.D,
                         chunk_size=module.chunk_size)[:, n:].transpose(1, 2)  # (b, d_inner, d_state)
    log_transition = delta.sum(1)[..., None] * A
    shape = end.shape
    summaries = _AllGather.apply(torch.cat([end.flatten(1), log_transition.flatten(1)], -1), group)
    ends, logs = summaries[:, :, : end[0].numel()].unflatten(-1, shape[1:]), summaries[:, :, end[0].numel():]
    incoming = ends[0] * 0.0  # in the graph on every rank: the all-gather's backward is a collective
    for s in range(rank):
        incoming = torch.exp(logs[s].unflatten(-1, shape[1:])) * incoming + ends[s]
    if n == 0:  # nothing to scan; the empty read keeps `incoming` in the graph
        y = u * module.D + torch.einsum("bns,bds->bnd", C, incoming)
    else:
        y = selective_scan(u, delta, A, B, C, module.D, chunk_size=module.chunk_size, initial_state=incoming)
    return module.out_proj(y * F.silu(z))


def _global_terms(module: LinearAttention, x: Tensor, partition: Partition, group: dist.ProcessGroup | None,
                  rank: int) -> tuple[LinearTerms, Tensor | None]:
    """The terms of this rank's tokens as the unsharded module computes them on the whole sequence, and what
    the module adds to the attention's output outside the engine (Focused's DWC(V)), or None.

    Token-local for most entries. Galerkin and Efficient 'scaling' divide by the number of keys a query sees
    (causal: its global position + 1; else the sequence length). Efficient 'softmax' normalises every key
    channel over the tokens (causal: over the prefix, L_i = log Σ_{j<=i} e^{k_j}): each rank's log-sum-exp is
    all-gathered and the ones before it (or all) folded in, L_i = log(e^{L_in} + Σ_{rank's j<=i} e^{k_j}).
    Focused's depthwise conv on V and Based's sliding-window softmax read a halo of tokens from the
    neighbouring ranks (`_halo`); the rank's q, k, v are sliced from the projection of the extended tokens,
    so the halo's collective comes before the state's in every rank's graph (their backwards run in one
    order everywhere)."""
    if isinstance(module, FocusedLinearAttention):
        if module.grid != 1:
            raise ParameterError(f"grid: state passing splits a sequence (grid=1), got grid={module.grid}")
        width = module.kernel_size
        left, right = _halo(x, partition, group, rank, width - 1 if module.causal else width // 2,
                            0 if module.causal else width // 2)
        q, k, v, _ = _project(module, torch.cat([left, x, right], 1))
        mine = slice(left.shape[1], left.shape[1] + x.shape[1])
        conv = depthwise_conv(v, module.dwc.weight, module.dwc.bias, causal=module.causal)[:, :, mine]
        return module.terms(q[:, :, mine], k[:, :, mine], v[:, :, mine], None), conv
    if isinstance(module, BasedAttention):  # its sliding-window softmax reads window_size − 1 tokens each way
        reach = module.window_size - 1
        left, right = _halo(x, partition, group, rank, reach, 0 if module.causal else reach)
        q, k, v, _ = _project(module, torch.cat([left, x, right], 1))
        mine = slice(left.shape[1], left.shape[1] + x.shape[1])
        d = module.head_dim  # q, k: the window part's channels, then the Taylor part's
        window = sliding_window_attention(q[..., :d], k[..., :d], v, window_size=module.window_size, causal=module.causal)
        return module.terms(q[:, :, mine], k[:, :, mine], v[:, :, mine], None), window[:, :, mine]
    q, k, v, side = _project(module, x)
    n = q.shape[2]
    offset, total = partition.offsets[rank], partition.total
    counted = isinstance(module, GalerkinAttention) or (
        isinstance(module, EfficientAttention) and module.normalization == "scaling")
    if counted:
        if module.causal:
            return LinearTerms(q / torch.arange(offset + 1, offset + n + 1, dtype=q.dtype, device=q.device)[:, None],
                               k, v), None
        return (LinearTerms(q / total, k, v) if isinstance(module, GalerkinAttention)
                else LinearTerms(q, k / total, v)), None
    if isinstance(module, EfficientAttention):
        every = _AllGather.apply(torch.logsumexp(k, dim=2), group)  # (p, b, h, d_k); −inf for a rank without tokens
        rho_q = torch.softmax(q, dim=-1)
        if not module.causal:
            return LinearTerms(rho_q, torch.exp(k - torch.logsumexp(every, dim=0)[:, :, None]), v), None
        before = torch.logsumexp(every[:rank], dim=0)[:, :, None]  # −inf on rank 0
        log_norm = torch.logaddexp(before, torch.logcumsumexp(k, dim=2))
        previous = torch.cat([before, log_norm[:, :, :-1]], dim=2)
        seen = torch.isfinite(previous)  # where() twice: no value and no NaN gradient from the −inf branch
        log_decay = torch.where(seen, torch.where(seen, previous, 0.0) - log_norm, 0.0).clamp_max(0.0)
        return LinearTerms(rho_q, torch.exp(k - log_norm), v, log_decay=log_decay), None
    return (module.terms(q, k, v, None) if side is None else module.terms(q, k, v, None, side)), None


@register_strategy("state")
def state_passing(module: Any, x_local: Tensor, partition: Partition, group: dist.ProcessGroup | None = None,
                  **kwargs: Any) -> Tensor:
    """This rank's slice (batch, n_local, dim) of `module`'s output on the whole sequence, by state passing.

    x_local: this rank's tokens (batch-major), rank r holding the tokens of `partition.bounds(r)`."""
    if kwargs:
        raise ParameterError(f"kwargs: state passing takes no further arguments (no attention masks), "
                             f"got {sorted(kwargs)}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if isinstance(module, SelectiveSSM):
        _check_tokens(module, x_local, partition, rank)
        return _selective_ssm(module, x_local, partition, group, rank)
    _check(module, x_local, partition, rank)
    if getattr(module, "batch_first", True) is False:
        raise ParameterError("module: state passing expects batch_first=True, got batch_first=False")
    if isinstance(module, MemoryAttention) and module.bias in NONLINEAR_BIASES:
        return _sequential_memory(module, x_local, rank, world, group)
    t, extra = _global_terms(module, x_local, partition, group, rank)
    values = torch.cat([t.v, t.v.new_ones(*t.v.shape[:-1], 1)], -1) if module.normalize else t.v
    gated = t.log_decay is not None or t.beta is not None
    if not module.causal and not gated:  # one pass: the global sums
        total = _AllReduce.apply(t.k.transpose(-1, -2) @ values, group)
        out = t.q @ total
    else:
        forward = _Direction(t, values, module.chunk_size)
        directions = [forward]
        if not module.causal:
            directions.append(_Direction(_flipped(t), values.flip(2), module.chunk_size))
        gathered = _AllGather.apply(torch.cat([d.summary() for d in directions], dim=-1), group)
        widths = [d.summary_width() for d in directions]
        parts = gathered.split(widths, dim=-1)
        out = forward.read(forward.compose(parts[0], list(range(rank))))
        if not module.causal:
            backward = directions[1]
            out = out + backward.read(backward.compose(parts[1], list(range(world - 1, rank, -1)))).flip(2)
            diag = (t.q * t.k).sum(-1, keepdim=True)
            out = out - (diag if t.beta is None else diag * t.beta[..., None]) * values
    if module.normalize:
        out = out[..., :-1] / out[..., -1:].clamp_min(normalizer_floor(out.dtype))
    if extra is not None:
        out = out + extra
    return module.out_proj(module.merge_heads(out))
