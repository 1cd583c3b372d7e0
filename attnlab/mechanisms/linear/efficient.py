"""Efficient Attention (Shen, Zhang, Zhao, Yi & Li, WACV 2021): linear complexities.

    E(Q, K, V) = ρ_q(Q) (ρ_k(K)ᵀ V)

softmax normalisation: ρ_q = softmax over the d_k features of each query (rows sum to 1),
ρ_k = softmax over the tokens of each key feature (columns sum to 1), so the implicit
matrix A = ρ_q(Q) ρ_k(K)ᵀ has rows summing to 1. No 1/√d temperature (the paper has none).
scaling normalisation: ρ_q(Q) = Q/√n, ρ_k(K) = K/√n, so E = (QKᵀ/n) V exactly, the
dot-product attention with scaling normalisation, with n the number of (real) keys.
Memory O(d n + d²) and time O(n d²): the d_k × d_v context ρ_k(K)ᵀV replaces the n × n matrix.

Causal (attnlab's extension; the paper is bidirectional). Query i sees the keys j <= i, so
"over the tokens" becomes "over the prefix":
    softmax: A_ij = Σ_c ρ_q(q_i)_c · exp(k_jc) / Σ_{j'<=i} exp(k_j'c)      (rows still sum to 1)
    scaling: A_ij = q_i·k_j / n_i with n_i = the number of real keys up to i.
The softmax form is a linear attention with per-channel decay: with L_i = log Σ_{j<=i} exp(k_j),
φ(k_j) = exp(k_j − L_j) and log α_i = L_{i−1} − L_i <= 0 the engine's state is Σ_j exp(k_j − L_i) v_jᵀ,
so the chunked form, the recurrent step and the reference all hold; nothing overflows.
Padded keys drop out of every softmax and count (n, n_i).

Fast path. Bidirectional with the softmax normalisation (the paper's form): `_SoftmaxBidirectional`, an
autograd Function of two fused softmaxes and two matrix products, C = ρ_k(K)ᵀV and O = ρ_q(Q)C, whose
backward is written out from dO: dC = ρ_qᵀdO, dV = ρ_k dC, dQ = the softmax backward of dO Cᵀ over the
features (torch's fused kernel), and dK = ρ_k ⊙ (V dCᵀ − s) with s_c = Σ_j ρ_k,jc (V dCᵀ)_jc = Σ_e C_ce dC_ce,
the column sums of the softmax over the tokens read off the d_k × d_v matrices instead of an n × d pass
(autograd's softmax backward over axis 2 also copies its transposed gradient first). Its n × d outputs and
intermediates come from `kernels.buffers.recycled` (no first-touch page faults from 4 MiB up); no second
derivative (once_differentiable: a double backward raises). Causal, or normalization='scaling': the linear
engine (`linear_attention` on `efficient_terms`).
Measured (`taskset -c 1 .venv/bin/python benchmarks/efficient_fused.py`, 2-core VM shared with other jobs,
load 3.8–4.9, one thread, fwd+bwd, 8 heads of 64, float32, medians of 9 interleaved rounds, outputs and
gradients checked equal first), time / linear-attention-transformer's: N = 4,096 fused 0.71× (the engine path
before it 0.86×), N = 16,384 0.36× (0.78×), no page faults (the peer ~2,000 / ~106,000 a call); the Function
without the recycled buffers gave 0.65× / 0.63× in an earlier run (load 1–2.5).
`attnlab bench limits --rows efficient-4k,efficient-16k --rounds 7 --db …` (load 3.3–3.8): 0.62× / 0.39× the
peer (49.3 / 75.4 ms, 204 / 510 ms); an earlier run at load 2.9–3.1: 0.61× / 0.42×.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ...core.errors import ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_choice, check_qkv
from ...kernels.buffers import recycled, recycling_line
from ...kernels.linear_scan import (
    LinearState,
    LinearTerms,
    check_chunk_size,
    linear_attention,
    linear_attention_step,
    linear_flops,
)
from .base import LinearAttention

EFFICIENT = Paper("P228", "Efficient Attention: Attention with Linear Complexities", 2021, "1812.01243")
NORMALIZATIONS: tuple[str, ...] = ("softmax", "scaling")


def _check_normalization(normalization: object) -> str:
    check_choice("normalization", normalization, NORMALIZATIONS)
    return str(normalization)


def _key_counts(k: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
    """Number of real keys, (b, 1, n_q or 1, 1): per prefix when causal, else in total."""
    b, n = k.shape[0], k.shape[2]
    real = torch.ones(b, n, dtype=k.dtype, device=k.device) if attention_mask is None else attention_mask.to(k.dtype)
    counts = real.cumsum(-1) if causal else real.sum(-1, keepdim=True)
    return counts.clamp_min(1.0)[:, None, :, None]


def _token_softmax(
    k: Tensor, attention_mask: Tensor | None, softmax: Callable[[Tensor, int], Tensor] = torch.softmax
) -> Tensor:
    """softmax over the real tokens (axis 2) of each channel; a column with no real token gives 0.

    torch's fused softmax (one kernel forward and backward, as linear-attention-transformer uses): a
    hand-written max/exp/sum/divide costs 1.5× the whole layer's fwd+bwd at N = 16k. A sample with no
    real token keeps its logits finite (no −inf column, no NaN) and is zeroed by the keep-mask after.
    `softmax`: `_recycled_softmax` inside the fast path's Function (no autograd there).
    """
    if attention_mask is None:
        return softmax(k, 2)
    keep = attention_mask[:, None, :, None]
    empty = ~attention_mask.any(dim=1)[:, None, None, None]
    return softmax(k.masked_fill(~keep & ~empty, float("-inf")), 2) * keep


def _recycled_softmax(x: Tensor, dim: int) -> Tensor:
    """torch's fused softmax written into a recycled buffer (`kernels.buffers`; no autograd)."""
    return torch.ops.aten._softmax.out(x, dim, False, out=recycled(x, *x.shape))


def _recycled_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, (..., n, d) @ (..., d, e) with equal batch axes, into a recycled buffer (no autograd)."""
    return torch.matmul(a, b, out=recycled(a, *a.shape[:-1], b.shape[-1]))


def _prefix_log_norm(k: Tensor, attention_mask: Tensor | None) -> Tensor:
    """L_i = log Σ_{j<=i, real} exp(k_j) per channel, (b, h, n, d); −inf before the first real key."""
    if attention_mask is not None:
        k = k.masked_fill(~attention_mask[:, None, :, None], float("-inf"))
    return torch.logcumsumexp(k, dim=2)


def efficient_terms(
    q: Tensor, k: Tensor, v: Tensor, *, normalization: str, causal: bool, attention_mask: Tensor | None
) -> LinearTerms:
    """ρ_q(q), ρ_k(k) (and the decay of the causal softmax form) for the engine, normalize=False."""
    if normalization == "scaling":
        counts = _key_counts(k, attention_mask, causal)
        return LinearTerms(q / counts, k, v) if causal else LinearTerms(q, k / counts, v)
    rho_q = torch.softmax(q, dim=-1)
    if not causal:
        return LinearTerms(rho_q, _token_softmax(k, attention_mask), v)
    log_norm = _prefix_log_norm(k, attention_mask)
    previous = torch.cat([torch.full_like(log_norm[:, :, :1], float("-inf")), log_norm[:, :, :-1]], dim=2)
    real = torch.isfinite(log_norm)  # at or after the first real key
    # where() twice: the unselected branch holds ±inf, and must give neither a value nor a NaN gradient
    rho_k = torch.where(real, torch.exp(torch.where(real, k - log_norm, 0.0)), 0.0)
    if attention_mask is not None:
        rho_k = rho_k.masked_fill(~attention_mask[:, None, :, None], 0.0)
    carried = real & torch.isfinite(previous)  # the state exists before this key; elsewhere α is irrelevant
    log_decay = torch.where(carried, torch.where(carried, previous - log_norm, 0.0), 0.0).clamp_max(0.0)
    return LinearTerms(rho_q, rho_k, v, log_decay=log_decay)


class _SoftmaxBidirectional(torch.autograd.Function):
    """ρ_q(Q)(ρ_k(K)ᵀV), softmax normalisation, not causal: two softmaxes and two matrix products,
    the backward written out (see the module docstring, "Fast path")."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None
    ) -> Tensor:
        rho_q = _recycled_softmax(q, -1)
        rho_k = _token_softmax(k, attention_mask, _recycled_softmax)  # 0 at padded keys
        context = rho_k.transpose(-1, -2) @ v  # C = ρ_kᵀV, (b, h, d_k, d_v)
        ctx.save_for_backward(rho_q, rho_k, v, context)
        return _recycled_matmul(rho_q, context)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rho_q, rho_k, v, context = ctx.saved_tensors  # type: ignore[attr-defined]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        dq = dk = dv = None
        d_context = rho_q.transpose(-1, -2) @ grad if need_k or need_v else None  # dC = ρ_qᵀ dO
        if need_q:  # dρ_q = dO Cᵀ through the softmax over features (torch's fused softmax backward)
            d_rho_q = _recycled_matmul(grad, context.transpose(-1, -2))
            dq = torch.ops.aten._softmax_backward_data.out(
                d_rho_q, rho_q, -1, rho_q.dtype, grad_input=recycled(rho_q, *rho_q.shape)
            )
            del d_rho_q  # its buffer serves dv or dk
        if need_v:
            dv = _recycled_matmul(rho_k, d_context)  # dV = ρ_k dC
        if need_k:  # dK = ρ_k ⊙ (V dCᵀ − s), s_c = Σ_j ρ_k,jc (V dCᵀ)_jc = Σ_e C_ce dC_ce
            column = (context * d_context).sum(-1).unsqueeze(-2)
            dk = _recycled_matmul(v, d_context.transpose(-1, -2)).sub_(column).mul_(rho_k)
        return dq, dk, dv, None


def efficient_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalization: str = "softmax",
    causal: bool = False,
    attention_mask: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """ρ_q(Q)(ρ_k(K)ᵀV) over (batch, heads, n, head_dim); causal forms as in the module docstring."""
    _check_normalization(normalization)
    check_chunk_size(chunk_size)
    check_qkv(q, k, v)
    if normalization == "softmax" and not causal:
        check_attention_mask(attention_mask, k.shape[0], k.shape[2])
        return _SoftmaxBidirectional.apply(q, k, v, attention_mask)
    t = efficient_terms(q, k, v, normalization=normalization, causal=causal, attention_mask=attention_mask)
    return linear_attention(
        t.q, t.k, t.v, causal=causal, attention_mask=attention_mask, log_decay=t.log_decay,
        normalize=False, chunk_size=chunk_size,
    )


def efficient_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalization: str = "softmax",
    causal: bool = False,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) with A (batch, heads, n_q, n_k) built directly in float64: A = ρ_q(Q)ρ_k(K)ᵀ
    (softmax over the visible keys of each query's prefix when causal), or QKᵀ/n (n_i when causal)."""
    _check_normalization(normalization)
    check_qkv(q, k, v, same_length=causal)
    q64, k64, v64 = q.double(), k.double(), v.double()
    n_q, n_k = q.shape[2], k.shape[2]
    visible = torch.ones(q.shape[0], 1, n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
    if attention_mask is not None:
        visible = visible & attention_mask[:, None, None, :]
    if normalization == "scaling":
        counts = visible.sum(-1, keepdim=True).clamp_min(1).double()
        weights = (q64 @ k64.transpose(-1, -2)).masked_fill(~visible, 0.0) / counts
    else:
        # per query i and channel c: softmax over the visible keys j of k_jc, (b, h, i, j, c)
        logits = k64[:, :, None, :, :].expand(-1, -1, n_q, -1, -1).masked_fill(~visible[..., None], float("-inf"))
        top = logits.amax(dim=3, keepdim=True)
        e = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0))
        total = e.sum(dim=3, keepdim=True)
        rho_k = e / torch.where(total > 0, total, 1.0)
        weights = torch.einsum("bhic,bhijc->bhij", torch.softmax(q64, dim=-1), rho_k)
    return (weights @ v64).to(q.dtype), weights.to(q.dtype)


@dataclass
class EfficientState:
    """Decoding state: the engine's memory, the running log Σ exp(k) per channel (softmax), the key count."""

    memory: LinearState
    log_norm: Tensor | None
    count: int


def backend_line() -> str:
    """The fast paths, for `attnlab info efficient`."""
    return ("bidirectional softmax: an autograd Function (two fused softmaxes, two matrix products, the backward "
            f"written out; {recycling_line()}), plain PyTorch on every device; causal or 'scaling': the linear engine")


def efficient_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the default chunk: 4·h·n·d² bidirectional; causal (per-channel decay) as `linear_flops`."""
    return linear_flops(n, heads, head_dim, causal, channel_decay=causal)


@register(
    name="efficient",
    paper=EFFICIENT,
    family="A",
    cost="O(Nd²)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=False, cross=True, decode=True, materialize=True,
                      sharding=("state",)),
    params=(
        Param("normalization", str, "softmax", "ρ: 'softmax' (features of q, tokens of k) or 'scaling' (1/√n each)",
              choices=NORMALIZATIONS),
        Param("chunk_size", int, 64, "chunk of the causal fast path", low=1, knob=True),
    ),
    summary="Efficient Attention: ρ_q(Q)(ρ_k(K)ᵀV), softmax over q's features and k's tokens, O(n d²).",
    normalized=True,  # the default softmax normalisation; 'scaling' rows do not sum to 1
    flops=efficient_flops,
    backend=backend_line,
)
class EfficientAttention(LinearAttention):
    """Efficient Attention: ρ_q(Q)(ρ_k(K)ᵀV) with softmax or scaling normalisation; causal over the prefix.

    Rows of `materialize` sum to 1 with normalization='softmax' (the registry's `normalized`
    refers to it); with 'scaling' they are q_i·k_j/n. Arbitrary attention masks are refused:
    they need the n × n matrix.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        normalization: str = "softmax",
        chunk_size: int = 64,
    ) -> None:
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, normalize=False, chunk_size=chunk_size
        )
        self.normalization = _check_normalization(normalization)

    def terms(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> LinearTerms:
        return efficient_terms(q, k, v, normalization=self.normalization, causal=self.causal, attention_mask=attention_mask)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if self.normalization == "softmax" and not self.causal:
            return _SoftmaxBidirectional.apply(q, k, v, mask)  # q, k, v and the mask checked by `attend`
        return super().attend_fast(q, k, v, mask)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return efficient_attention_reference(
            q, k, v, normalization=self.normalization, causal=self.causal, attention_mask=mask
        )

    def decode(self, x_t: Tensor, state: EfficientState | None) -> tuple[Tensor, EfficientState]:
        """One checked token: the prefix softmax (or count) is carried in the state; equal to the causal forward."""
        q, k, v = self.project(x_t)
        if state is not None and state.log_norm is not None and state.log_norm.shape[0] != x_t.shape[0]:
            raise ShapeError(f"state: expected batch {x_t.shape[0]} (as x_t), got {state.log_norm.shape[0]}")
        memory = None if state is None else state.memory
        count = 1 if state is None else state.count + 1
        if self.normalization == "scaling":
            out, memory = linear_attention_step(q / count, k, v, memory, normalize=False)
            return self.out_proj(self.merge_heads(out)), EfficientState(memory, None, count)
        log_norm = k if state is None or state.log_norm is None else torch.logaddexp(state.log_norm, k)
        log_decay = None if state is None or state.log_norm is None else (state.log_norm - log_norm).clamp_max(0.0)
        out, memory = linear_attention_step(
            torch.softmax(q, dim=-1), torch.exp(k - log_norm), v, memory, log_decay=log_decay, normalize=False
        )
        return self.out_proj(self.merge_heads(out)), EfficientState(memory, log_norm, count)

    def extra_repr(self) -> str:
        return f"normalization={self.normalization!r}, causal={self.causal}, chunk_size={self.chunk_size}"
