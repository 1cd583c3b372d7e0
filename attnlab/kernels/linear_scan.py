"""The engine of the linear family: attention through a d_k × d_v state instead of an N × N matrix.

A mechanism of the family supplies feature-mapped queries and keys φ(q), φ(k)
(batch, heads, n, d_k), values v (batch, heads, n, d_v) and, optionally, a decay α and
a delta-rule step size β. The engine computes the one recurrence they all share,

    S_t = T_t S_{t−1} + w_t φ(k_t) v_tᵀ,        z_t = T_t z_{t−1} + φ(k_t)
    out_t = S_tᵀ φ(q_t)  [ / max(φ(q_t)ᵀ z_t, floor)  when normalize=True ]

    Hebbian (linear attention):   T_t = diag(α_t)                      w_t = 1
    delta rule:                   T_t = α_t (I − β_t φ(k_t) φ(k_t)ᵀ)    w_t = β_t

α_t = 1 (no decay), a scalar per head and position (`log_decay` of shape (batch, heads, n))
or a vector over the d_k channels of the state (`log_decay` (batch, heads, n, d_k)); the
decay is given as log α ≤ 0, so products of many decays are sums, never underflowing
products. The delta rule takes a scalar decay (gated delta rule) or none.

Forms (all equal where they overlap; tests/mechanisms/test_linear_engine.py checks it):

* bidirectional, no decay and no delta rule: out_i = φ(q_i)ᵀ S / φ(q_i)ᵀ z with
  S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j); O(N d²), any n_q and n_k.
* bidirectional with a decay or the delta rule: the recurrence read forwards and backwards,
  A = A→ + A← − diag (the backward pass is the causal form on the reversed sequence); this
  is RMT's γ^|i−j| for a fixed scalar decay. Needs n_q = n_k.
* causal, chunk-parallel (`chunk_size` C, any N): within a chunk a C × C causal block, across
  chunks the running state; O(N·C·d + N·d²) work and no N × N tensor. A per-channel decay
  has no C × C factorisation that cannot overflow, so pairs inside sub-blocks of up to 16
  tokens are built elementwise (rebuilt in the backward, never stored) and sub-blocks meet
  through the decay at a sub-block boundary as a matrix product with exponents <= 0. The delta
  rule solves a unit lower-triangular C × C system per chunk (the WY form of Yang et al., 2024,
  "Parallelizing Linear Transformers with the Delta Rule over Sequence Length").
* recurrent, one token at a time with a constant-size `LinearState` (`linear_attention_step`).
* reference: the N × N matrix A_ij built naively in float64 (decay products from cumulative
  sums of log α; for the delta rule, products of the per-step transition matrices T_t), out = A v.

Paths of the causal form without decay or delta rule (the `backend` argument; `hebbian_backend()` is the
line `attnlab info` prints): fused chunk loops compiled with numba (`_linear_loops`, chosen where
`loops_serve`: numba installed, CPU, float32/float64), else the chunked PyTorch form (CUDA, bfloat16,
no numba). Why loops: the PyTorch form runs every chunk's C × C products as one batched matmul over
all chunks, so scores, chunk states and their prefix sums are full tensors streamed through memory,
and torch's batched matmul on 64 × 64 blocks out of cache reaches about a third of a large matmul's
rate; a profile at N = 16,384 (8 heads, d 64, one thread) gave bmm 57%, cat 12% (the ones column and
the zero state), cumsum 11%, add, div, copy and masked_fill the rest: 15.6 GFLOP/s. The loops keep one
(batch·head) row's state in cache, skip the causal triangle and run rows in parallel: 0.38–0.48 of a
2048³ matmul's rate forward at N = 16k–65k (one thread, a shared machine; the PyTorch form 0.11–0.16),
backward (recomputing each chunk's blocks) ~3.6× the forward, causal / bidirectional fwd+bwd 1.1–1.4×
(PyTorch form 1.8–2.6×); `benchmarks/linear_chunked.py` measures it. With `feature_map="elu+1"` the
loops also apply φ (no φ(q), φ(k) tensors): the "linear" entry's causal core (`attnlab bench limits`,
one thread, load ~1.8) 120 ms at N = 16k and 480 ms at 65k, 0.40 of the matmul rate, where mapping
outside first cost 0.27. The
bidirectional form stays two matmuls: it is bound by memory, not FLOPs (4·d² = 16k FLOPs per token
and head against reading q, k, v and writing out, plus the ones column's copy of v and the division's
pass over the output), so it reaches only ~0.25 of the matmul rate.
Two threads: the rows are all the loops' work, and the serial rest is small. At N = 65,536, fwd+bwd with
φ = elu + 1 inside, 8 heads of 64, per-thread on-CPU times (/proc schedstat and time.thread_time per unit; load
1–3, `benchmarks/linear_chunked.py --on-cpu` is the method): the caller's own CPU time 3–5 ms of ~2.4 s (checks,
autograd; outputs and gradients are recycled, so no page faults and no frees), the units' CPU time the same
within ~3% on one thread and two, and their measured times list-scheduled on two workers 1.87× one thread (the
guest cannot see a second vCPU on the host core's other hardware thread, or a lower clock with both busy). What
a shared machine takes is wall time: a worker descheduled or slowed by another process holds the end of the call
by up to one unit, so the backward's units are each row's two independent passes (16 at 8 heads; the key pass
~2/3 of a row's backward, the query pass ~1/3: 206 and 97 ms at N = 65,536, one thread) rather than its rows:
in an in-process A/B (two threads, load ~3, 6 rounds) the longest wait of one worker for the other at the end
of the backward fell from 76 to 30 ms, bit for bit the same result.
Wall-clock figures on a shared machine mostly measure the others' load: in runs here a process's two threads
often got about the CPU time its one thread got.

Numerics. Decays enter only as exp of non-positive sums of log α within a chunk, so nothing
overflows. A normaliser is clamped below at `normalizer_floor(dtype)` = √(finfo(dtype).tiny)
(1.1e-19 in float32, 1.5e-154 in float64): it leaves every row whose weights sum above it
untouched, whatever the scale of the features; a row with no weight (all keys padded, every
weight underflowed) gives 0; and 1/floor stays far from overflow in the backward pass.
Normalisation needs non-negative features (the denominator is then a sum of non-negative
weights), so it is refused with the delta rule. In float32 the causal form stays within 1e-5
of float64 (relative to the largest output) at N = 16,384; bfloat16 triangular solves run in float32.

Key padding: a padded key contributes nothing and is skipped, not decayed through (its φ(k),
v, log α and β are zeroed), so the real tokens' outputs equal those of the sequence without it.

Building a mechanism: subclass `attnlab.mechanisms.linear.base.LinearAttention` and implement
`terms(q, k, v, attention_mask)` returning `LinearTerms` (feature-mapped q, k, values, optional
log_decay and beta); the class supplies the fast path, the reference, `materialize`, the
padding-only mask and `step`.
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.errors import DTypeError, ParameterError, ShapeError
from ..core.validate import check_attention_mask, check_finite, check_int, check_qkv, check_tensor
from . import compiled
from .buffers import recycled, recycling_line
from .pool import cpus, run_parallel
from .sizes import fit_block

FUSED_FEATURE_MAPS = ("elu+1",)  # `feature_map=` of linear_attention: applied inside the loops where they serve
BACKENDS = ("numba", "torch")  # the causal Hebbian form's paths (`backend=`); None picks by the rule in `loops_serve`
PAIRWISE_BLOCK = 1 << 22  # elements of one block of the per-channel pairwise decay tensor
SUB_BLOCK = 16  # per-channel decay: largest sub-block whose pairs are built elementwise


@dataclass
class LinearState:
    """Recurrent state: memory S (batch, heads, d_k, d_v); normaliser z (batch, heads, d_k) when normalised."""

    memory: Tensor
    normalizer: Tensor | None = None


@dataclass
class LinearTerms:
    """What a mechanism hands the engine: φ(q) (b, h, n_q, d_k), φ(k) (b, h, n_k, d_k), v (b, h, n_k, d_v),
    log α (b, h, n_k) or (b, h, n_k, d_k) or None, β (b, h, n_k) or None."""

    q: Tensor
    k: Tensor
    v: Tensor
    log_decay: Tensor | None = None
    beta: Tensor | None = None


def normalizer_floor(dtype: torch.dtype) -> float:
    """The smallest denominator used: √(finfo(dtype).tiny)."""
    return torch.finfo(dtype).tiny ** 0.5


def linear_flops(
    n: int,
    heads: int,
    head_dim: int,
    causal: bool,
    *,
    chunk_size: int = 64,
    channel_decay: bool = False,
    delta: bool = False,
    two_scans: bool = False,
) -> float:
    """Forward FLOPs for one sequence (multiply-add = 2; an entry of the pairwise decay tensor = 4).

    One-pass bidirectional: φ(k)ᵀv and φ(q)ᵀS, 4·n·d². Causal, chunk C: the C × C block and its
    product with v, 4·n·C·d (plus 2·n·C·d for per-channel decays), the chunk states and their
    reads, 4·n·d²; the delta rule adds its kkᵀ block, the triangular solves and W_k S, 4·n·C·d + 2·n·d².
    `two_scans` (bidirectional with a decay or the delta rule) doubles the causal count.
    """
    d, c = head_dim, min(chunk_size, n)
    if not causal and not two_scans:
        return 4.0 * heads * n * d * d
    per_head = 4.0 * n * c * d + 4.0 * n * d * d
    if channel_decay:
        per_head += 2.0 * n * c * d
    if delta:
        per_head += 4.0 * n * c * d + 2.0 * n * d * d
    return heads * per_head * (2.0 if two_scans else 1.0)


# -- input checks -----------------------------------------------------------------------------
def _check_gate(name: str, t: Tensor, full: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    check_tensor(name, t)
    if not t.is_floating_point():
        raise DTypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != len(full) or any(s not in (1, f) for s, f in zip(t.shape, full)):
        raise ShapeError(f"{name}: expected a shape broadcastable to {full}, got {tuple(t.shape)}")
    check_finite(name, t)
    return t.to(dtype).expand(full)


def _decay_mode(log_decay: Tensor | None) -> str:
    if log_decay is None:
        return "none"
    return "scalar" if log_decay.dim() == 3 else "channel"


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    attention_mask: Tensor | None,
    log_decay: Tensor | None,
    beta: Tensor | None,
    normalize: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Check the inputs; return k, v, log α, β with padded keys zeroed (and gates expanded)."""
    check_qkv(q, k, v)
    b, h, n, dk = k.shape
    if causal and q.shape[2] != n:
        raise ShapeError(
            f"k: causal linear attention needs as many keys as queries, got {q.shape[2]} queries and {n} keys "
            "(decode one token at a time with `step`)"
        )
    if log_decay is not None:
        if log_decay.dim() not in (3, 4):
            raise ShapeError(
                f"log_decay: expected (batch, heads, n) for a scalar decay or (batch, heads, n, d_k) per channel, "
                f"got shape {tuple(log_decay.shape)}"
            )
        full = (b, h, n) if log_decay.dim() == 3 else (b, h, n, dk)
        log_decay = _check_gate("log_decay", log_decay, full, q.dtype)
        if bool((log_decay > 0).any()):
            raise ValueError(f"log_decay: expected log α <= 0 (a decay, not a growth), got max {log_decay.max().item():.3g}")
    if beta is not None:
        beta = _check_gate("beta", beta, (b, h, n), q.dtype)
        if log_decay is not None and log_decay.dim() == 4:
            raise ValueError("log_decay: the delta rule takes a scalar decay (batch, heads, n), got one per channel")
        if normalize:
            raise ValueError("normalize: the delta rule's weights may be negative; expected normalize=False with beta")
    if not (q.shape[2] == n or (log_decay is None and beta is None)):
        raise ShapeError(f"k: a decay or the delta rule needs as many keys as queries, got {q.shape[2]} and {n}")
    check_attention_mask(attention_mask, b, n)
    if attention_mask is not None:
        pad = ~attention_mask[:, None, :]  # (b, 1, n)
        k = k.masked_fill(pad[..., None], 0.0)
        v = v.masked_fill(pad[..., None], 0.0)
        if log_decay is not None:
            log_decay = log_decay.masked_fill(pad if log_decay.dim() == 3 else pad[..., None], 0.0)
        if beta is not None:
            beta = beta.masked_fill(pad, 0.0)
    return k, v, log_decay, beta


def check_chunk_size(chunk_size: int) -> None:
    """chunk_size must be an int >= 1 (ParameterError otherwise)."""
    check_int("chunk_size", chunk_size)


# -- normalisation through an extra value column ------------------------------------------------
def _with_normalizer(run: Callable[[Tensor], Tensor], v: Tensor, normalize: bool) -> Tensor:
    """run(v) when not normalising; else run([v, 1]) and divide by the last column (the denominator)."""
    if not normalize:
        return run(v)
    out = run(torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1))
    num, den = out[..., :-1], out[..., -1:]
    return num / den.clamp_min(normalizer_floor(out.dtype))


# -- the chunk-parallel causal form -----------------------------------------------------------
def _chunks(x: Tensor, c: int) -> Tensor:
    """(b, h, n, ...) -> (b, h, m, c, ...), zero-padding n up to m·c."""
    b, h, n = x.shape[:3]
    m = -(-n // c)
    if m * c != n:
        x = torch.cat([x, x.new_zeros(b, h, m * c - n, *x.shape[3:])], dim=2)
    return x.reshape(b, h, m, c, *x.shape[3:])


def _unchunk(x: Tensor, n: int) -> Tensor:
    b, h, m, c = x.shape[:4]
    return x.reshape(b, h, m * c, *x.shape[4:])[:, :, :n]


def _tri(c: int, device: torch.device, diagonal: int = 0) -> Tensor:
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(diagonal)


class _ChannelDecayScores(torch.autograd.Function):
    """A_ts = Σ_c q_tc k_sc exp(g_tc − g_sc) for s <= t, 0 above, over chunks (B, C, d_k).

    The (C, C, d_k) pairwise decays E are built one block of chunks at a time in the forward and
    again in the backward, so memory stays O(B·C·(C + d_k)). Gradients: dq_tc = Σ_s dA_ts E_tsc k_sc,
    dk_sc = Σ_t dA_ts E_tsc q_tc, dg = q ⊙ dq − k ⊙ dk.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, k, g)
        nb, c, d = q.shape
        tri = _tri(c, q.device)
        out = q.new_empty(nb, c, c)
        step = max(1, PAIRWISE_BLOCK // (c * c * d))
        for i in range(0, nb, step):
            sl = slice(i, i + step)
            ek = _pair_decay_channel(g[sl], tri).mul_(k[sl, None, :, :])  # (b, t, s, c)
            out[sl] = (ek.flatten(0, 1) @ q[sl].flatten(0, 1)[..., None]).view(-1, c, c)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        q, k, g = ctx.saved_tensors
        nb, c, d = q.shape
        tri = _tri(c, q.device)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        step = max(1, PAIRWISE_BLOCK // (c * c * d))
        for i in range(0, nb, step):
            sl = slice(i, i + step)
            e = _pair_decay_channel(g[sl], tri).mul_(grad[sl, :, :, None])  # dA_ts E_tsc
            dq[sl] = (e * k[sl, None, :, :]).sum(2)
            dk[sl] = e.mul_(q[sl, :, None, :]).sum(1)
        return dq, dk, q * dq - k * dk


def _pair_decay_channel(g: Tensor, tri: Tensor) -> Tensor:
    """exp(g_tc − g_sc) for s <= t (else 0): (..., C, d) -> (..., C, C, d)."""
    diff = g[..., :, None, :] - g[..., None, :, :]
    return diff.masked_fill_(~tri[..., None], float("-inf")).exp_()


def _channel_scores(q: Tensor, k: Tensor, g: Tensor) -> Tensor:
    """The causal C × C block under per-channel decay, A_ts = Σ_c q_tc k_sc exp(g_tc − g_sc), chunks (B, C, d).

    Split into sub-blocks of `sub` (the largest divisor of C up to SUB_BLOCK): pairs inside a
    sub-block go through the pairwise decays (`_ChannelDecayScores`); a query sub-block I and an
    earlier key sub-block J meet through the decay at the end of sub-block I − 1, r, as the matrix
    product (q ⊙ e^(g − r)) (k ⊙ e^(r − g))ᵀ, both exponents <= 0.
    """
    nb, c, d = q.shape
    sub = max(x for x in range(1, min(c, SUB_BLOCK) + 1) if c % x == 0)
    s = c // sub
    if s == 1:
        return _ChannelDecayScores.apply(q, k, g)
    qs, ks, gs = (t.reshape(nb, s, sub, d) for t in (q, k, g))
    diag = _ChannelDecayScores.apply(q.reshape(-1, sub, d), k.reshape(-1, sub, d), g.reshape(-1, sub, d))
    ref = gs[:, :-1, -1, :]  # (nb, s − 1, d): the reference of query sub-blocks 1..s−1
    q_scaled = qs[:, 1:] * torch.exp(gs[:, 1:] - ref[:, :, None, :])
    earlier = _tri(s - 1, q.device)[:, :, None, None]  # key sub-block J <= I − 1
    exponent = (ref[:, :, None, None, :] - gs[:, None, :-1]).masked_fill(~earlier, float("-inf"))
    k_scaled = torch.exp(exponent) * ks[:, None, :-1]  # (nb, I, J, sub, d)
    lower = q_scaled[:, :, None] @ k_scaled.transpose(-1, -2)  # (nb, s − 1, s − 1, sub, sub)
    lower = F.pad(lower, (0, 0, 0, 0, 0, 1, 1, 0))  # rows I = 0..s−1, columns J = 0..s−1
    blocks = lower + torch.diag_embed(diag.reshape(nb, s, sub, sub).permute(0, 2, 3, 1)).permute(0, 3, 4, 1, 2)
    return blocks.transpose(2, 3).reshape(nb, c, c)


def _pair_decay_scalar(g: Tensor, tri: Tensor) -> Tensor:
    """exp(g_t − g_s) for s <= t (else 0): (..., C) -> (..., C, C)."""
    diff = g[..., :, None] - g[..., None, :]
    return torch.exp(diff.masked_fill(~tri, float("-inf")))


def _scan(increments: Tensor, decay: Tensor | None) -> Tensor:
    """States before each chunk: S_0 = 0, S_{m+1} = decay_m ⊙ S_m + increments_m, over axis 2."""
    if decay is None:
        total = increments.cumsum(dim=2)
        return torch.cat([torch.zeros_like(total[:, :, :1]), total[:, :, :-1]], dim=2)
    # unbind (not indexing) along a leading axis: its backward stacks the slices' gradients
    # instead of scattering each one into a zero tensor of the full size
    states, s = [], torch.zeros_like(increments[:, :, 0])
    for inc, dec in zip(increments.movedim(2, 0).unbind(0), decay.expand_as(increments).movedim(2, 0).unbind(0)):
        states.append(s)
        s = dec * s + inc
    return torch.stack(states, dim=2)


def _causal_hebbian(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, c: int) -> Tensor:
    n = q.shape[2]
    qc, kc, vc = _chunks(q, c), _chunks(k, c), _chunks(v, c)
    tri = _tri(c, q.device)
    mode = _decay_mode(log_decay)
    if mode == "none":
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~tri, 0.0)
        states = _scan(kc.transpose(-1, -2) @ vc, None)
        inter = qc @ states
    elif mode == "scalar":
        assert log_decay is not None
        g = _chunks(log_decay, c).cumsum(dim=-1)  # (b, h, m, C): log of the decay since the chunk start
        last = g[..., -1:]
        scores = (qc @ kc.transpose(-1, -2)) * _pair_decay_scalar(g, tri)
        increments = (kc * torch.exp(last - g)[..., None]).transpose(-1, -2) @ vc
        states = _scan(increments, torch.exp(last)[..., None])
        inter = (qc * torch.exp(g)[..., None]) @ states
    else:
        assert log_decay is not None
        g = _chunks(log_decay, c).cumsum(dim=-2)  # (b, h, m, C, d_k)
        last = g[..., -1:, :]
        shape = qc.shape
        flat = (-1, c, shape[-1])
        scores = _channel_scores(qc.reshape(flat), kc.reshape(flat), g.reshape(flat)).reshape(*shape[:-1], c)
        increments = (kc * torch.exp(last - g)).transpose(-1, -2) @ vc
        states = _scan(increments, torch.exp(last).transpose(-1, -2))
        inter = (qc * torch.exp(g)) @ states
    return _unchunk(scores @ vc + inter, n)


def _solve_unit_lower(system: Tensor, rhs: Tensor) -> Tensor:
    """system⁻¹ rhs for unit lower-triangular systems (..., C, C); batch axes flattened (much faster on CPU).

    Half-precision inputs are solved in float32 (CPU has no bfloat16 triangular solve) and cast back.
    """
    c = system.shape[-1]
    work = torch.promote_types(system.dtype, torch.float32)
    out = torch.linalg.solve_triangular(
        system.reshape(-1, c, c).to(work), rhs.reshape(-1, c, rhs.shape[-1]).to(work), upper=False, unitriangular=True
    )
    return out.reshape(rhs.shape).to(rhs.dtype)


def _causal_delta(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, beta: Tensor, c: int, initial: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ in chunks, from S_0 = `initial` (zero if None):
    (out, the end state S_n).

    With γ_t the decay since the chunk start and S_0 the state entering it, the written values
    u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t) solve (I + L) U = diag(β) V − diag(β γ) K S_0 with
    L_ts = β_t (γ_t/γ_s) k_tᵀk_s (s < t), so U = W_v − W_k S_0; then out = diag(γ) Q S_0 + (QKᵀ ⊙ Γ) U
    and the next state is γ_C S_0 + Σ_s (γ_C/γ_s) k_s u_sᵀ.
    """
    n = q.shape[2]
    qc, kc, vc, bc = _chunks(q, c), _chunks(k, c), _chunks(v, c), _chunks(beta, c)
    tri, strict = _tri(c, q.device), _tri(c, q.device, -1)
    g = _chunks(log_decay, c).cumsum(dim=-1) if log_decay is not None else torch.zeros_like(bc)
    decay = _pair_decay_scalar(g, tri)
    gamma, to_end = torch.exp(g), torch.exp(g[..., -1:] - g)
    lower = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    system = lower + torch.eye(c, dtype=q.dtype, device=q.device)
    w_v = _solve_unit_lower(system, bc[..., None] * vc)
    w_k = _solve_unit_lower(system, (bc * gamma)[..., None] * kc)
    scores = (qc @ kc.transpose(-1, -2)) * decay
    per_chunk = (  # chunk axis first, contiguous, unbound: see _scan
        t.movedim(2, 0).contiguous().unbind(0)
        for t in (w_v, w_k, qc * gamma[..., None], scores, kc * to_end[..., None], gamma[..., -1, None, None])
    )
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1]) if initial is None else initial
    outs = []
    for wv, wk, q_in, block, k_out, carry in zip(*per_chunk):
        u = wv - wk @ state
        outs.append(q_in @ state + block @ u)
        state = carry * state + k_out.transpose(-1, -2) @ u
    return _unchunk(torch.stack(outs, dim=2), n), state


# -- the compiled path of the causal Hebbian form -------------------------------------------------
def loops_serve(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, beta: Tensor | None) -> bool:
    """Whether the numba loops serve a causal call: no decay, no delta rule, and `compiled.serves` (numba
    installed, CPU, float32/float64, one dtype). Everything else (CUDA, bfloat16, decays) takes the PyTorch path."""
    return log_decay is None and beta is None and compiled.serves(q, k, v)


def hebbian_backend() -> str:
    """The `backend` line of the entries whose causal form is Hebbian without decay (shown by `attnlab info`)."""
    if compiled.numba_module() is None:
        return f"chunked PyTorch path: {compiled.numba_status()}"
    return (
        f"causal: fused chunk loops ({compiled.numba_status()}) for CPU float32/float64, φ = elu + 1 applied "
        f"inside them; the chunked PyTorch path otherwise (CUDA, bfloat16); bidirectional: two matmuls; the loops' "
        f"{recycling_line()}"
    )


def _loops():  # type: ignore[no-untyped-def]
    from . import _linear_loops  # compiles on first use (cached on disk); imports numba

    return _linear_loops


def _rows(t: Tensor) -> Tensor:
    """(b, h, n, d) -> contiguous (b·h, n, d), detached (the loops write numpy views)."""
    return t.detach().reshape(t.shape[0] * t.shape[1], *t.shape[2:]).contiguous()


def _over_rows(kernels: Sequence[Callable[..., None]], rows: int, *args: object) -> None:
    """kernel(r, *args) for every kernel of `kernels` and every (batch·head) row r, on min(torch.get_num_threads(),
    CPUs, units) worker threads (`pool`) that take the units (kernel, row) one at a time from a shared counter,
    the first kernel's rows first (give the longest first). Dynamic, not split in advance: a worker on a core that
    another process also runs takes fewer units instead of holding up the call (numba's `prange` splits them evenly
    in advance: two threads measured 0.95–1.0× one with the other core busy). The kernels release the GIL (nogil)
    and write disjoint parts of their outputs, so the result does not depend on which worker ran what."""
    units = [(kernel, r) for kernel in kernels for r in range(rows)]
    taken, lock = itertools.count(), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(taken)
            if i >= len(units):
                return
            kernel, r = units[i]
            kernel(r, *args)

    run_parallel([worker] * min(torch.get_num_threads(), cpus(), len(units)))


class _CausalLoops(torch.autograd.Function):
    """Causal linear attention, no decay, through `_linear_loops` (forward and a recomputing backward).

    feature_map "elu+1": q and k are the raw projections, mapped chunk by chunk inside the loops (no
    φ(q), φ(k) tensors; keep (batch, n) marks real keys, whose φ(k) the loops zero otherwise), and
    the gradients are with respect to the raw q, k. Saves q, k, v, the output and the (b·h, n)
    denominators; the backward rebuilds each chunk's C × C blocks (and φ) instead of storing them.
    Threads: torch.get_num_threads() (`_over_rows`); the forward's units are the rows, the backward's each row's
    two independent passes (key pass dk, dv right to left; query pass dq left to right), so with 8 rows on two
    threads the last unit a worker takes is about 1/16 of the backward instead of 1/8.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, normalize: bool, chunk: int, feature_map: str | None, keep: Tensor | None
    ) -> Tensor:
        loops = _loops()
        qr, kr, vr = _rows(q), _rows(k), _rows(v)
        out, den = recycled(vr, *vr.shape), q.new_empty(qr.shape[:2])
        dtype = qr.numpy().dtype
        fmap = loops.IDENTITY if feature_map is None else loops.ELU1
        keep_rows = (keep if keep is not None and feature_map is not None else q.new_ones(1, 0)).to(torch.uint8)
        extra = (fmap, keep_rows.contiguous().numpy(), q.shape[1], loops.exp_constants(dtype))
        floor = dtype.type(normalizer_floor(q.dtype))
        _over_rows([loops.causal_forward], qr.shape[0], qr.numpy(), kr.numpy(), vr.numpy(), out.numpy(), den.numpy(),
                   chunk, normalize, floor, *extra)
        ctx.save_for_backward(qr, kr, vr, out, den)
        ctx.normalize, ctx.chunk, ctx.extra = normalize, chunk, extra
        return out.view(v.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        qr, kr, vr, out, den = ctx.saved_tensors
        g = _rows(grad)
        dq, dk, dv = recycled(qr, *qr.shape), recycled(kr, *kr.shape), recycled(vr, *vr.shape)
        floor = qr.numpy().dtype.type(normalizer_floor(qr.dtype))
        arrays = (qr, kr, vr, out, den, g, dq, dk, dv)
        loops = _loops()  # two units a row: its key pass (dk, dv; the longer) and its query pass (dq)
        _over_rows([loops.causal_backward_keys, loops.causal_backward_queries], qr.shape[0],
                   *(t.numpy() for t in arrays), ctx.chunk, ctx.normalize, floor, *ctx.extra)
        shape = grad.shape[:2]
        grads = (dq.view(*shape, *qr.shape[1:]), dk.view(*shape, *kr.shape[1:]), dv.view(*shape, *vr.shape[1:]))
        return (*grads, None, None, None, None)


def elu_plus_one(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 (x + 1 for x > 0, e^x otherwise): positive features (Katharopoulos et al., 2020)."""
    return F.elu(x).add_(1.0)  # in place: one new tensor (elu saves its input, so the gradient is unchanged)


def _causal(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, beta: Tensor | None, c: int) -> Tensor:
    c = fit_block(c, q.shape[2])
    if beta is None:
        return _causal_hebbian(q, k, v, log_decay, c)
    return _causal_delta(q, k, v, log_decay, beta, c)[0]


def causal_delta_from(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, initial_state: Tensor, *, log_decay: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The causal delta rule on feature-mapped q, k (b, h, n, d_k), v (b, h, n, d_v) entering with the state
    S_0 = `initial_state` (b, h, d_k, d_v) instead of zero: (out (b, h, n, d_v), end state S_n). n >= 1,
    no padding, no normalisation (a sequence-parallel rank's share of `linear_attention`)."""
    check_chunk_size(chunk_size)
    if q.dim() == 4 and q.shape[2] == 0:
        raise ShapeError("q: expected at least one position, got 0")
    k, v, log_decay, beta = _prepare(
        q, k, v, causal=True, attention_mask=None, log_decay=log_decay, beta=beta, normalize=False
    )
    assert beta is not None  # checked and expanded by _prepare
    want = (*k.shape[:2], k.shape[-1], v.shape[-1])
    if tuple(initial_state.shape) != want:
        raise ShapeError(f"initial_state: expected shape {want}, got {tuple(initial_state.shape)}")
    return _causal_delta(q, k, v, log_decay, beta, fit_block(chunk_size, q.shape[2]), initial_state.to(q.dtype))


def _flip(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.flip(2)


def _diagonal_weight(q: Tensor, k: Tensor, beta: Tensor | None) -> Tensor:
    """A_ii = w_i φ(q_i)ᵀφ(k_i), (b, h, n, 1): the term both scans of the bidirectional form contain."""
    diag = (q * k).sum(-1, keepdim=True)
    return diag if beta is None else diag * beta[..., None]


# -- public functional forms ------------------------------------------------------------------
def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
    backend: str | None = None,
    feature_map: str | None = None,
) -> Tensor:
    """The fast path on feature-mapped q = φ(q), k = φ(k): (batch, heads, n_q, d_v).

    causal: chunk-parallel with `chunk_size`; bidirectional: one pass, or two scans with a
    decay or the delta rule (see the module docstring). attention_mask (batch, n_k), True = real.
    backend, for the causal form without decay or delta rule: "numba" (the fused loops of
    `_linear_loops`; ValueError where they do not serve), "torch" (the chunked PyTorch form), or
    None: the loops where `loops_serve`, PyTorch otherwise.
    feature_map "elu+1": q and k are the raw projections and φ = `elu_plus_one` is applied here (the result
    and gradients equal those of linear_attention(φ(q), φ(k), v)): inside the loops, chunk by chunk, where
    they serve (no φ(q), φ(k) tensors are built: at N = 16k with 8 heads each is a fresh 32 MiB whose
    first touch costs as much as the map), on whole tensors before any other path. None: q, k are φ(q), φ(k).
    """
    check_chunk_size(chunk_size)
    if backend is not None and backend not in BACKENDS:
        raise ParameterError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if feature_map is not None:
        if feature_map not in FUSED_FEATURE_MAPS:
            raise ParameterError(f"feature_map: expected one of {FUSED_FEATURE_MAPS} or None, got {feature_map!r}")
        check_qkv(q, k, v)  # before the path rule reads their dtype and device
    fused = causal and backend != "torch" and loops_serve(q, k, v, log_decay, beta)
    if feature_map is not None and not fused:
        q, k = elu_plus_one(q), elu_plus_one(k)
    k, v, log_decay, beta = _prepare(
        q, k, v, causal=causal, attention_mask=attention_mask, log_decay=log_decay, beta=beta, normalize=normalize
    )
    if backend == "numba" and not (causal and loops_serve(q, k, v, log_decay, beta)):
        raise ValueError(
            "backend: the numba loops serve the causal form without decay or delta rule on CPU float32/float64 "
            f"with numba installed; got causal={causal}, decay={log_decay is not None}, delta rule={beta is not None}, "
            f"{q.dtype} on {q.device.type}, {compiled.numba_status()}"
        )
    if fused:
        keep = attention_mask if feature_map is not None else None  # raw keys: the loops zero φ(k) at padding
        return _CausalLoops.apply(q, k, v, normalize, fit_block(chunk_size, q.shape[2]), feature_map, keep)
    if causal:
        return _with_normalizer(lambda vv: _causal(q, k, vv, log_decay, beta, chunk_size), v, normalize)
    if log_decay is None and beta is None:
        return _with_normalizer(lambda vv: q @ (k.transpose(-1, -2) @ vv), v, normalize)

    def both_ways(vv: Tensor) -> Tensor:
        forward = _causal(q, k, vv, log_decay, beta, chunk_size)
        backward = _causal(q.flip(2), k.flip(2), vv.flip(2), _flip(log_decay), _flip(beta), chunk_size).flip(2)
        return forward + backward - _diagonal_weight(q, k, beta) * vv

    return _with_normalizer(both_ways, v, normalize)


def _step(
    q: Tensor, k: Tensor, v: Tensor, state: LinearState | None, log_decay: Tensor | None, beta: Tensor | None, normalize: bool
) -> tuple[Tensor, LinearState]:
    b, h, _, dk = k.shape
    kt = k[:, :, 0, :, None]  # (b, h, d_k, 1)
    vt = v[:, :, 0, None, :]  # (b, h, 1, d_v)
    memory = state.memory if state is not None else q.new_zeros(b, h, dk, v.shape[-1])
    z = None
    if normalize:
        z = state.normalizer[..., None] if state is not None and state.normalizer is not None else q.new_zeros(b, h, dk, 1)
    if log_decay is not None:
        alpha = torch.exp(log_decay)
        alpha = alpha[..., None] if log_decay.dim() == 3 else alpha.transpose(-1, -2)  # (b, h, 1, 1) or (b, h, d_k, 1)
        memory = alpha * memory
        z = None if z is None else alpha * z
    if beta is None:
        memory = memory + kt * vt
    else:
        rate = beta[..., None]  # (b, h, 1, 1)
        memory = memory + rate * kt * (vt - kt.transpose(-1, -2) @ memory)
    out = q @ memory
    if z is not None:
        z = z + kt
        out = out / (q @ z).clamp_min(normalizer_floor(out.dtype))
    return out, LinearState(memory, None if z is None else z[..., 0])


def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: LinearState | None = None,
    *,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
) -> tuple[Tensor, LinearState]:
    """One token: q, k (batch, heads, 1, d_k), v (batch, heads, 1, d_v), log_decay (b, h, 1) or (b, h, 1, d_k),
    beta (b, h, 1); returns (out (batch, heads, 1, d_v), new state). state None = the empty memory."""
    if q.dim() == 4 and q.shape[2] != 1:
        raise ShapeError(f"q: expected one position (batch, heads, 1, d_k), got shape {tuple(q.shape)}")
    k, v, log_decay, beta = _prepare(
        q, k, v, causal=True, attention_mask=None, log_decay=log_decay, beta=beta, normalize=normalize
    )
    if state is not None:
        want = (q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
        if tuple(state.memory.shape) != want:
            raise ShapeError(f"state: expected memory of shape {want}, got {tuple(state.memory.shape)}")
        if normalize and state.normalizer is None:
            raise ValueError("state: normalize=True needs a state with a normalizer, got None")
    return _step(q, k, v, state, log_decay, beta, normalize)


def linear_attention_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Tensor | None = None,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """The causal form computed one token at a time with a constant-size state."""
    k, v, log_decay, beta = _prepare(
        q, k, v, causal=True, attention_mask=attention_mask, log_decay=log_decay, beta=beta, normalize=normalize
    )
    state, outs = None, []
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        out, state = _step(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], state,
            None if log_decay is None else log_decay[:, :, sl],
            None if beta is None else beta[:, :, sl],
            normalize,
        )
        outs.append(out)
    return torch.cat(outs, dim=2)


def _causal_matrix(q: Tensor, k: Tensor, log_decay: Tensor | None, beta: Tensor | None) -> Tensor:
    """The causal implicit matrix (b, h, n, n), naively."""
    n = q.shape[2]
    tri = _tri(n, q.device)
    if beta is None:
        if log_decay is None:
            return (q @ k.transpose(-1, -2)).masked_fill(~tri, 0.0)
        total = log_decay.cumsum(dim=2)  # Σ_{s<=i} log α_s, so Π_{s=j+1..i} α_s = exp(total_i − total_j)
        if log_decay.dim() == 3:
            return (q @ k.transpose(-1, -2)) * _pair_decay_scalar(total, tri)
        return torch.einsum("bhic,bhjc,bhijc->bhij", q, k, _pair_decay_channel(total, tri))
    # delta rule: out_i = Σ_j β_j (k_jᵀ T_{j+1} ⋯ T_i q_i) v_j with T_t = α_t (I − β_t k_t k_tᵀ);
    # sweep j downwards carrying R_i = T_{j+1} ⋯ T_i q_i for every query i >= j.
    b, h, _, dk = q.shape
    alpha = torch.exp(log_decay) if log_decay is not None else q.new_ones(b, h, n)
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    rows = torch.arange(n, device=q.device)[:, None]
    carried, columns = q, []
    for j in reversed(range(n)):
        kj = k[:, :, j]
        columns.append(beta[:, :, j, None] * (carried @ kj[..., None])[..., 0] * (rows[:, 0] >= j))
        transition = alpha[:, :, j, None, None] * (eye - beta[:, :, j, None, None] * kj[..., :, None] * kj[..., None, :])
        carried = torch.where(rows >= j, carried @ transition.transpose(-1, -2), carried)
    return torch.stack(columns[::-1], dim=-1)


def linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """(out, weights): the implicit matrix A (batch, heads, n_q, n_k) built in float64, out = A v.

    A_ij = w_j φ(k_j)ᵀ T_{j+1} ⋯ T_i φ(q_i) for j <= i (causal; decay products from cumulative
    sums of log α, delta-rule products from the transition matrices); bidirectional without
    gates A = φ(Q)φ(K)ᵀ, with gates A→ + A← − diag; normalised rows divide by their sum
    clamped at `normalizer_floor`. Results are cast back to q's dtype.
    """
    k, v, log_decay, beta = _prepare(
        q, k, v, causal=causal, attention_mask=attention_mask, log_decay=log_decay, beta=beta, normalize=normalize
    )
    q64, k64, v64 = q.double(), k.double(), v.double()
    ld64 = None if log_decay is None else log_decay.double()
    b64 = None if beta is None else beta.double()
    if causal or ld64 is not None or b64 is not None:
        weights = _causal_matrix(q64, k64, ld64, b64)
        if not causal:
            backward = _causal_matrix(q64.flip(2), k64.flip(2), _flip(ld64), _flip(b64)).flip(-1, -2)
            weights = weights + backward - torch.diag_embed(weights.diagonal(dim1=-2, dim2=-1))
    else:
        weights = q64 @ k64.transpose(-1, -2)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(normalizer_floor(torch.float64))
    out = weights @ v64
    return out.to(q.dtype), weights.to(q.dtype)
