"""Associative memory with attentional bias and retention (Miras: Behrouz, Razaviyayn, Zhong & Mirrokni, 2025).

A layer is a memory M (d_v × d_k, here stored as S = Mᵀ) that each token updates by one
step of online gradient descent on an attentional bias L, with a retention gate α:

    M_t = α_t M_{t−1} − η_t ∇_M L(M_{t−1}; k_t, v_t),      y_t = M_t φ(q_t)

    dot-product bias  L = −⟨M k, v⟩        ∇L = −v kᵀ           M_t = α_t M_{t−1} + v_t k_tᵀ          (Hebbian)
    L2 bias           L = ½‖M k − v‖²      ∇L = (M k − v) kᵀ    M_t = α_t M_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ   (delta rule)

    ℓp bias (Moneta)  L = ‖M k − v‖_p^p   ∇L = p (Sign(e) ⊙ |e|^(p−1)) kᵀ, e = M k − v
    Huber bias (Yaad) ∇L = e kᵀ where ‖e‖₂ ≤ δ, δ Sign(e) kᵀ elsewhere (ℓ2's step near the target, ℓ1's far)

with η_t = 1 (Hebbian) or β_t = σ(w·k_t + b) (delta rule, ℓp, Huber). With retention, the L2 step is
taken on the retained memory, M_t = α_t M_{t−1} − β_t ∇L(α_t M_{t−1}; k_t, v_t)
= α_t M_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, the gated delta rule (Yang, Kautz & Hatamizadeh,
2024, arXiv:2412.06464); without retention it is the formula above.
Retention α_t, one of:
    none      α = 1
    fixed     α = γ_h per head: RetNet's 1 − 2^(−5−h), h = 0..heads−1, or `gamma` for every head
    scalar    α_t = σ(w_h·k_t + b_h)^(1/τ) per head and token (data-dependent, scalar)
    channel   α_t = σ(W_h k_t + b_h)^(1/τ) per channel of the memory (GLA; τ = gate_temperature)

Gates (the learned α_t and β_t) read the token x_t itself by default (`gate_source="x"`), as GLA
and DeltaNet do: β_t = σ(x_t w_β,h + b) (DeltaNet's b_proj), scalar α_t = σ(x_t w_α,h + b)^(1/τ),
per-channel α_t = σ(x_t W₁ W₂,h + b)^(1/τ) with GLA's low-rank map (rank 16). Their logits reach
the cores through the core's side-input hook: `side_input(x, context)` gives them per head,
(batch, heads, n_k, gate_width) (α's, then β's), and `attend(q, k, v, side=...)` takes them — the
module passes them itself; a caller of `attend` with a module whose gates read x passes
`side=m.side_input(x)` (without it, ValueError naming `side`). `gate_source="key"` keeps the
per-head-key form, the gates read from the per-head key projection k_t (before φ), no side input:
β_t = σ(w·k_t + b), α_t = σ(W k_t + b)^(1/τ) — a low-rank x W_k W of GLA's kind, with W₁ = W_k. Feature maps φ: 'elu+1' (elu(x) + 1 > 0), 'identity' (queries
scaled by 1/√d_k, as RetNet and GLA do), 'silu'; the L2 bias then L2-normalises q and k, which
keeps the eigenvalues of I − β k kᵀ in [0, 1] (DeltaNet). normalize=True divides by φ(q)ᵀz
(rows of the implicit matrix sum to 1) and needs the positive 'elu+1' map and the dot-product bias.

The ℓp and Huber memories (paper Sections 3.1–3.2, eqs. of Moneta and Yaad) are not linear in
v, so there is no implicit attention matrix (`materialize` raises) and no chunk-parallel
closed form: the fast path is the exact recurrence scanned token by token (N batched
rank-1 updates, O(N d²)), the reference takes each step's gradient by autograd of the loss
written out. Following the paper, the gradient is taken at M_{t−1} (not at the retained
α_t M_{t−1} of the gated delta rule above); q and k are L2-normalised as for the L2 bias.
Non-causal, every query reads the memory written over the whole sequence, y_i = M_N φ(q_i)
(not the forward + backward reading of the delta rule below, which needs linearity in v).
The ℓp step moves each coordinate of the error e by β p |e|^(p−1) (‖k‖ = 1): for p <= 2 the
memory stays bounded, for p > 2 it overshoots and diverges once |e| > (2/(βp))^(1/(p−2)) —
hence the default p = 1.5 here (the value is ours; any p >= 1 is accepted).
Deviations from the paper: the memory is the matrix M, not Moneta/Yaad's 2-layer MLP; the
exact Sign and |·| are used, not the smooth tanh(αx) and √(x² + ε) the paper proposes for
training; δ is a fixed hyperparameter, not the paper's data-dependent δ_t; the retention gates
are those below (the paper's ℓq and elastic-net retention are not here); the paper's
chunk-wise training (gradients inside a chunk taken at the chunk's first memory, an
approximation) is not used. Missing altogether: the KL / Memora retention with a
softmax-normalised memory, and MLP (deep) memories.

Registered: the general recurrence as "miras" (P157, every choice above) and its named
instances — "linear" (Katharopoulos et al., 2020), "delta" (Schlag, Irie & Schmidhuber, 2021,
with DeltaNet's SiLU + L2 map of Yang et al., 2024), "retention" (RetNet, Sun et al., 2023) and
"gated-linear" (GLA, Yang et al., 2024) — each citing the paper that introduced it — and the
paper's own biases as "miras-lp" and "miras-huber" (matrix-memory Moneta and Yaad). The RetNet
and GLA blocks around the operator (xPos, GroupNorm, the swish output gate) are not part of it.

Causal: the recurrence, chunk-parallel (engine). Bidirectional: for the plain Hebbian memory
the usual φ(q_i)ᵀ Σ_j φ(k_j)v_jᵀ (any number of keys, so cross-attention); with retention or the
delta rule the memory read forwards and backwards, A→ + A← − diag (γ^|i−j| for RetNet's γ).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice, check_qkv
from ...kernels.linear_scan import (
    LinearState,
    LinearTerms,
    check_chunk_size,
    elu_plus_one,
    hebbian_backend,
    linear_attention,
    linear_attention_reference,
    linear_flops,
)
from .base import LinearAttention

MIRAS = Paper(
    "P157",
    "It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online Optimization",
    2025,
    "2504.13173",
)
KATHAROPOULOS = Paper(None, "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020, "2006.16236")
SCHLAG = Paper(None, "Linear Transformers Are Secretly Fast Weight Programmers", 2021, "2102.11174")
RETNET = Paper(None, "Retentive Network: A Successor to Transformer for Large Language Models", 2023, "2307.08621")
GLA = Paper(None, "Gated Linear Attention Transformers with Hardware-Efficient Training", 2024, "2312.06635")

FEATURE_MAPS: tuple[str, ...] = ("elu+1", "identity", "silu")
BIASES: tuple[str, ...] = ("dot", "l2", "lp", "huber")
NONLINEAR_BIASES: tuple[str, ...] = ("lp", "huber")  # memories not linear in v: a token-by-token scan
GATED_STEP = ("l2", *NONLINEAR_BIASES)  # biases with a learned step size β_t
RETENTIONS: tuple[str, ...] = ("none", "fixed", "scalar", "channel")
GATE_SOURCES: tuple[str, ...] = ("x", "key")
GLA_GATE_RANK = 16  # GLA's low-rank gate map x W₁ W₂ (gk_proj: dim → 16 → key dim)


def check_memory_config(feature_map: str, bias: str, retention: str, normalize: bool) -> None:
    """The combinations the recurrence supports; ParameterError naming the parameter otherwise."""
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_choice("bias", bias, BIASES)
    check_choice("retention", retention, RETENTIONS)
    if normalize and bias != "dot":
        raise ParameterError(f"normalize: bias={bias!r} gives signed weights; expected normalize=False")
    if normalize and feature_map != "elu+1":
        raise ParameterError(f"normalize: needs a positive feature map ('elu+1'), got feature_map={feature_map!r}")
    if bias == "l2" and retention == "channel":
        raise ParameterError("retention: the delta rule (bias='l2') takes 'none', 'fixed' or 'scalar', got 'channel'")


def feature_map_qk(q: Tensor, k: Tensor, feature_map: str, bias: str) -> tuple[Tensor, Tensor]:
    """φ(q), φ(k); with the L2, ℓp or Huber bias both are then L2-normalised."""
    if feature_map == "elu+1":
        q, k = elu_plus_one(q), elu_plus_one(k)
    elif feature_map == "silu":
        q, k = F.silu(q), F.silu(k)
    else:
        q = q / math.sqrt(q.shape[-1])
    if bias in GATED_STEP:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q, k


def retnet_gammas(heads: int) -> Tensor:
    """RetNet's decay per head, γ_h = 1 − 2^(−5−h), h = 0..heads−1 (float64)."""
    return 1.0 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))


def check_bias_args(bias: str, beta: Tensor | None, p: float, delta: float) -> None:
    """β given exactly for the biases with a step size; p >= 1 and δ > 0 (finite)."""
    if (beta is not None) != (bias in GATED_STEP):
        need = "needs" if bias in GATED_STEP else "takes no"
        raise ValueError(f"beta: bias={bias!r} {need} beta, got {'None' if beta is None else 'a tensor'}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 1.0 <= p < math.inf:
        raise ParameterError(f"p: expected a finite float >= 1, got {p!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < math.inf:
        raise ParameterError(f"delta: expected a finite float > 0, got {delta!r}")


def bias_gradient(err: Tensor, bias: str, p: float, delta: float) -> Tensor:
    """∂L/∂(M k) at the error e = M k − v (…, d_v): ℓp gives p·Sign(e)⊙|e|^(p−1); Huber gives e
    where ‖e‖₂ <= δ and δ·Sign(e) elsewhere."""
    if bias == "lp":
        # |e| floored at the smallest normal number: the value is unchanged (Sign(0) = 0), the gradient stays
        # finite where e = 0 and p < 2 (d|e|^(p−1)/de is infinite there)
        return p * torch.sign(err) * err.abs().clamp_min(torch.finfo(err.dtype).tiny) ** (p - 1.0)
    near = torch.linalg.vector_norm(err, dim=-1, keepdim=True) <= delta
    return torch.where(near, err, delta * torch.sign(err))


def memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: str,
    beta: Tensor,
    p: float = 1.5,
    delta: float = 1.0,
    log_decay: Tensor | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    memory: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ℓp / Huber memory on mapped q, k (batch, heads, n, d_k), token by token: (out, S_N (batch, heads, d_k, d_v)).

    S = Mᵀ; S_t = α_t S_{t−1} − β_t k_t ∇ᵀ with ∇ = `bias_gradient`(k_tᵀS_{t−1} − v_t); a padded
    token (attention_mask False) leaves S unchanged. `memory` continues from a previous S.
    """
    b, h, n, d_k = k.shape
    s = k.new_zeros(b, h, d_k, v.shape[-1]) if memory is None else memory
    outs = []
    for t in range(n):
        kt = k[:, :, t]
        grad = bias_gradient(torch.einsum("bhk,bhkv->bhv", kt, s) - v[:, :, t], bias, p, delta)
        kept = s
        if log_decay is not None:
            alpha = log_decay[:, :, t].exp()
            kept = s * (alpha[..., None, None] if alpha.dim() == 2 else alpha[..., None])
        new = kept - beta[:, :, t, None, None] * kt[..., :, None] * grad[..., None, :]
        s = new if attention_mask is None else torch.where(attention_mask[:, None, t, None, None], new, s)
        if causal:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], s))
    out = torch.stack(outs, dim=2) if causal else torch.einsum("bhnk,bhkv->bhnv", q, s)
    return out, s


def memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: str = "elu+1",
    bias: str = "dot",
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    chunk_size: int = 64,
    p: float = 1.5,
    delta: float = 1.0,
) -> Tensor:
    """The memory read y = M φ(q) over (batch, heads, n, head_dim), given the gates.

    log_decay: log α, (batch, heads, n) or per channel (batch, heads, n, head_dim), <= 0;
    beta: the step β_t (batch, heads, n), required with bias 'l2', 'lp' or 'huber' and refused with 'dot';
    p: the exponent of the ℓp bias; delta: the threshold δ of the Huber bias.
    """
    retention = "none" if log_decay is None else ("scalar" if log_decay.dim() == 3 else "channel")
    check_memory_config(feature_map, bias, retention, normalize)
    check_bias_args(bias, beta, p, delta)
    check_qkv(q, k, v)
    fq, fk = feature_map_qk(q, k, feature_map, bias)
    if bias in NONLINEAR_BIASES:
        assert beta is not None
        return memory_scan(fq, fk, v, bias=bias, beta=beta, p=p, delta=delta, log_decay=log_decay, causal=causal,
                           attention_mask=attention_mask)[0]
    return linear_attention(
        fq, fk, v, causal=causal, attention_mask=attention_mask, log_decay=log_decay, beta=beta,
        normalize=normalize, chunk_size=chunk_size,
    )


def _bias_loss(err: Tensor, bias: str, p: float, delta: float) -> Tensor:
    """The attentional bias at the error e = W k − v: Σ|e|^p, or ½‖e‖² if ‖e‖ <= δ else δ(‖e‖₁ − δ/2)."""
    if bias == "lp":
        return (err.abs() ** p).sum()
    norm = torch.sqrt((err * err).sum())
    if norm <= delta:
        return 0.5 * norm * norm
    return delta * (err.abs().sum() - 0.5 * delta)


def gradient_memory_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: str,
    beta: Tensor,
    p: float = 1.5,
    delta: float = 1.0,
    log_decay: Tensor | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, final memory W (batch, heads, d_v, d_k)) of the ℓp / Huber memory on mapped q, k, in float64:
    per element, head and token, W ← α W − β ∇_W L(W k, v) with the gradient by autograd of the loss."""
    grad_wanted = torch.is_grad_enabled()  # the loss's gradient needs autograd even under no_grad
    with torch.enable_grad():
        out, memory = _gradient_memory_scan(q, k, v, bias, beta, p, delta, log_decay, causal, attention_mask)
    return (out, memory) if grad_wanted else (out.detach(), memory.detach())


def _gradient_memory_scan(
    q: Tensor, k: Tensor, v: Tensor, bias: str, beta: Tensor, p: float, delta: float,
    log_decay: Tensor | None, causal: bool, attention_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    b, h, n, d_k = k.shape
    q64, k64, v64, beta64 = q.double(), k.double(), v.double(), beta.double()
    decay = None if log_decay is None else log_decay.double().exp()
    rows, memories = [], []
    for bi in range(b):
        for hi in range(h):
            w = torch.zeros(v.shape[-1], d_k, dtype=torch.float64, device=q.device)
            reads = []
            for t in range(n):
                if attention_mask is None or bool(attention_mask[bi, t]):
                    probe = torch.zeros_like(w, requires_grad=True)  # ∇ at W: d L(W + P) / dP at P = 0
                    loss = _bias_loss((w + probe) @ k64[bi, hi, t] - v64[bi, hi, t], bias, p, delta)
                    (grad,) = torch.autograd.grad(loss, probe, create_graph=True)
                    alpha = 1.0 if decay is None else decay[bi, hi, t]  # a scalar, or one value per key channel
                    w = w * alpha - beta64[bi, hi, t] * grad
                reads.append(w @ q64[bi, hi, t])
            out = torch.stack(reads) if causal else q64[bi, hi] @ w.T
            rows.append(out)
            memories.append(w)
    out = torch.stack(rows).reshape(b, h, q.shape[2], v.shape[-1])
    return out.to(q.dtype), torch.stack(memories).reshape(b, h, v.shape[-1], d_k).to(q.dtype)


def memory_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: str = "elu+1",
    bias: str = "dot",
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    p: float = 1.5,
    delta: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `memory_attention`, the implicit matrix built naively in float64; for the ℓp and
    Huber biases (out, final memory) of `gradient_memory_reference` (they have no attention matrix)."""
    retention = "none" if log_decay is None else ("scalar" if log_decay.dim() == 3 else "channel")
    check_memory_config(feature_map, bias, retention, normalize)
    check_bias_args(bias, beta, p, delta)
    check_qkv(q, k, v)
    fq, fk = feature_map_qk(q, k, feature_map, bias)
    if bias in NONLINEAR_BIASES:
        assert beta is not None
        return gradient_memory_reference(fq, fk, v, bias=bias, beta=beta, p=p, delta=delta, log_decay=log_decay,
                                         causal=causal, attention_mask=attention_mask)
    return linear_attention_reference(
        fq, fk, v, causal=causal, attention_mask=attention_mask, log_decay=log_decay, beta=beta,
        normalize=normalize,
    )


def _memory_flops(retention: str, bias: str) -> Callable[[int, int, int, bool], float]:
    def flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
        gated = retention != "none" or bias in GATED_STEP
        return linear_flops(
            n, heads, head_dim, causal, channel_decay=retention == "channel", delta=bias in GATED_STEP,
            two_scans=gated and not causal and bias not in NONLINEAR_BIASES,
        )

    flops.__doc__ = f"Forward FLOPs (retention={retention!r}, bias={bias!r}), see `linear_flops`."
    return flops


def register_memory(*, cross: bool = False, materialize: bool = True, sharding: tuple[str, ...] = (),
                    **entry: Any) -> Callable[[type], type]:
    """`register` for a memory entry: family A, O(Nd²), causal, key padding, decoding and (unless told otherwise)
    `materialize`, no attention mask; cross-attention only where `cross`; `sharding`: its sequence-parallel
    strategies (`attnlab.distributed`). `entry` holds the rest (name, paper, …)."""
    supports = Supports(causal=True, key_padding=True, attn_mask=False, cross=cross, decode=True,
                        materialize=materialize, sharding=sharding)
    return register(family="A", cost="O(Nd²)", exponent=1.0, supports=supports, **entry)


_CHUNK = Param("chunk_size", int, 64, "chunk of the causal fast path", low=1)
_TEMPERATURE = Param("gate_temperature", float, 16.0, "τ of α = σ(·)^(1/τ) (GLA: 16)", low=1e-3)
_GATE_SOURCE = Param("gate_source", str, "x", "what the learned gates read: the token x (GLA, DeltaNet) or "
                     "the per-head key k", choices=GATE_SOURCES)
_P = Param("p", float, 1.5, "exponent of the ℓp bias ‖M k − v‖_p^p (bias='lp')", low=1.0)
_DELTA = Param("delta", float, 1.0, "threshold δ of the Huber bias (bias='huber')", low=1e-6)
_GAMMA = Param("gamma", float, None, "decay of every head (default RetNet's 1 − 2^(−5−h))", low=0.0, high=1.0,
               optional=True)


@register_memory(
    name="miras",
    sharding=("state",),
    paper=MIRAS,
    params=(
        Param("bias", str, "dot", "attentional bias: 'dot' (Hebbian), 'l2' (delta rule), 'lp', 'huber'",
              choices=BIASES),
        Param("retention", str, "none", "retention gate α", choices=RETENTIONS),
        Param("feature_map", str, "elu+1", "φ on q and k", choices=FEATURE_MAPS),
        Param("normalize", bool, True, "divide by φ(q)ᵀz (dot bias with 'elu+1' only)"),
        _GAMMA,
        _TEMPERATURE,
        _CHUNK,
        _P,
        _DELTA,
        _GATE_SOURCE,
    ),
    summary="Miras memory M_t = α_t M_{t−1} − η_t ∇L(M_{t−1}; k_t, v_t): dot/L2/ℓp/Huber bias, "
    "none/fixed/scalar/channel retention.",
    normalized=True,  # with the defaults ('dot', 'elu+1', normalize=True); other settings are not normalised
    flops=_memory_flops("none", "dot"),  # at the defaults
)
class MemoryAttention(LinearAttention):
    """Associative memory updated by online gradient descent on an attentional bias, with retention (Miras).

    The defaults give linear attention; the named entries "linear", "delta", "retention",
    "gated-linear", "miras-lp" and "miras-huber" are its instances. Cross-attention is only in
    "linear" (a memory written from a context needs no positions); arbitrary attention masks need
    the N × N matrix and are refused. The ℓp and Huber biases have no attention matrix:
    `materialize` raises for them. Gates read from x reach the cores as the side input (`side_input`).
    """

    takes_side_input = True  # the gate logits from x (gate_source='x'); None where the gates read no x
    log_gamma: Tensor  # buffer: log γ_h per head (retention='fixed')

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        bias: str = "dot",
        retention: str = "none",
        feature_map: str = "elu+1",
        normalize: bool = True,
        gamma: float | None = None,
        gate_temperature: float = 16.0,
        chunk_size: int = 64,
        p: float = 1.5,
        delta: float = 1.0,
        gate_source: str = "x",
    ) -> None:
        check_memory_config(feature_map, bias, retention, normalize)
        check_choice("gate_source", gate_source, GATE_SOURCES)
        check_chunk_size(chunk_size)
        if p != 1.5 and bias != "lp":
            raise ParameterError(f"p: only used with bias='lp', got bias={bias!r}")
        if delta != 1.0 and bias != "huber":
            raise ParameterError(f"delta: only used with bias='huber', got bias={bias!r}")
        if gamma is not None and retention != "fixed":
            raise ParameterError(f"gamma: only used with retention='fixed', got retention={retention!r}")
        if gamma is not None and not 0.0 < gamma <= 1.0:
            raise ParameterError(f"gamma: expected 0 < gamma <= 1, got {gamma!r}")
        if not gate_temperature > 0:
            raise ParameterError(f"gate_temperature: expected > 0, got {gate_temperature!r}")
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, normalize=normalize, chunk_size=chunk_size
        )
        self.bias, self.retention, self.feature_map = bias, retention, feature_map
        self.gamma, self.gate_temperature = gamma, float(gate_temperature)
        check_bias_args(bias, torch.ones(()) if bias in GATED_STEP else None, p, delta)
        self.p, self.delta = float(p), float(delta)
        d = self.head_dim
        if retention == "fixed":
            gammas = retnet_gammas(heads) if gamma is None else torch.full((heads,), float(gamma), dtype=torch.float64)
            self.register_buffer("log_gamma", torch.log(gammas), persistent=False)
        self.gate_source = gate_source
        decay_width = {"scalar": 1, "channel": d}.get(retention, 0)
        beta_width = 1 if bias in GATED_STEP else 0
        self.gate_width = decay_width + beta_width if gate_source == "x" else 0  # gate logits of the side input
        if gate_source == "key":
            if decay_width:
                self.decay_weight = nn.Parameter(torch.randn(heads, d, decay_width) / math.sqrt(d))
                self.decay_bias = nn.Parameter(torch.zeros(heads, decay_width))
            if beta_width:
                self.beta_weight = nn.Parameter(torch.randn(heads, d) / math.sqrt(d))
                self.beta_bias = nn.Parameter(torch.zeros(heads))
        else:
            if retention == "scalar":
                self.decay_proj: nn.Module = nn.Linear(dim, heads)
            elif retention == "channel":  # GLA: x → 16 → heads·d_k
                self.decay_proj = nn.Sequential(nn.Linear(dim, GLA_GATE_RANK, bias=False), nn.Linear(GLA_GATE_RANK, heads * d))
            if beta_width:
                self.beta_proj = nn.Linear(dim, heads)

    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor | None:
        """The gate logits read from the key tokens (context, or x) (batch, n_k, dim): (batch, heads, n_k, gate_width),
        α's then β's, with gate_source='x'; None without learned gates or with gate_source='key'."""
        if not self.gate_width:
            return None
        src = x if context is None else context
        logits = []
        if self.retention in ("scalar", "channel"):
            logits.append(self.split_heads(self.decay_proj(src)))
        if self.bias in GATED_STEP:
            logits.append(self.split_heads(self.beta_proj(src)))
        return torch.cat(logits, dim=-1)

    def check_gate_logits(self, k: Tensor, side: Tensor | None) -> Tensor | None:
        """`side` for the keys k (batch, heads, n, head_dim): the gate logits (batch, heads, n, gate_width) of
        `side_input` where the gates read x, None otherwise; a ValueError naming `side` when it is not."""
        if not self.gate_width:
            if side is not None:
                why = "gate_source='key': its gates read the keys" if self.gate_source == "key" else "no learned gates"
                raise ValueError(f"side: {self.spec.name} takes no side input ({why}), got shape {tuple(side.shape)}")
            return None
        want = (*k.shape[:3], self.gate_width)
        if side is None:
            raise ValueError(
                f"side: {self.spec.name} reads its gates from x (gate_source='x'): expected the gate logits {want} "
                "of `side_input(x)` (pass side=module.side_input(x), or build with gate_source='key'), got None"
            )
        if tuple(side.shape) != want:
            raise ShapeError(f"side: expected the gate logits (batch, heads, n_k, gate_width) = {want}, got shape "
                             f"{tuple(side.shape)}")
        return side

    def gates(self, k: Tensor, side: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(log α, β) of the tokens: from the gate logits `side_input` computed from x (gate_source='x'), or from
        the projected keys k (batch, heads, n, head_dim) (gate_source='key')."""
        b, h, n, _ = k.shape
        logits = self.check_gate_logits(k, side)
        log_decay = beta = None
        learned = self.retention in ("scalar", "channel")
        if logits is not None:
            width = logits.shape[-1] - (1 if self.bias in GATED_STEP else 0)
            decay_logits, beta_logits = logits[..., :width], logits[..., width:]
        elif self.gate_source == "key":
            if learned:
                decay_logits = torch.einsum("bhnd,hdw->bhnw", k, self.decay_weight) + self.decay_bias[:, None, :]
            if self.bias in GATED_STEP:
                beta_logits = (k * self.beta_weight[:, None, :]).sum(-1, keepdim=True) + self.beta_bias[:, None, None]
        if self.retention == "fixed":
            log_decay = self.log_gamma.to(k.dtype)[None, :, None].expand(b, h, n)
        elif learned:
            log_decay = F.logsigmoid(decay_logits) / self.gate_temperature
            if self.retention == "scalar":
                log_decay = log_decay[..., 0]
        if self.bias in GATED_STEP:
            beta = torch.sigmoid(beta_logits[..., 0])
        return log_decay, beta

    def terms(
        self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, side: Tensor | None = None
    ) -> LinearTerms:
        """φ(q), φ(k), v and the gates; `side`: the gate logits of `side_input` (gate_source='x')."""
        log_decay, beta = self.gates(k, side)
        fq, fk = feature_map_qk(q, k, self.feature_map, self.bias)
        return LinearTerms(fq, fk, v, log_decay=log_decay, beta=beta)

    def _scan_args(self, t: LinearTerms) -> dict[str, Any]:
        """The keywords of `memory_scan` / `gradient_memory_reference` (ℓp and Huber biases) for the terms t."""
        return {"bias": self.bias, "beta": t.beta, "p": self.p, "delta": self.delta, "log_decay": t.log_decay}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, side: Tensor | None = None) -> Tensor:
        if self.feature_map == "elu+1" and self.bias == "dot" and self.retention == "none":
            # linear attention: the engine applies φ = elu + 1 itself (inside the causal loops where they serve)
            self.check_gate_logits(k, side)
            return linear_attention(q, k, v, causal=self.causal, attention_mask=mask, normalize=self.normalize,
                                    chunk_size=self.chunk_size, feature_map="elu+1")
        t = self.terms(q, k, v, mask, side)
        if self.bias not in NONLINEAR_BIASES:
            return self.scan(t, mask)
        return memory_scan(t.q, t.k, t.v, causal=self.causal, attention_mask=mask, **self._scan_args(t))[0]

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        t = self.terms(q, k, v, mask, side)
        if self.bias not in NONLINEAR_BIASES:
            return self.scan_reference(t, mask)
        return gradient_memory_reference(t.q, t.k, t.v, causal=self.causal, attention_mask=mask, **self._scan_args(t))

    def materialize(self, x: Tensor, **kwargs: Any) -> Tensor:
        if self.bias in NONLINEAR_BIASES:
            raise ParameterError(
                f"materialize: bias={self.bias!r} gives a memory that is not linear in the values, so there is "
                "no attention matrix; expected bias 'dot' or 'l2'"
            )
        return super().materialize(x, **kwargs)

    def decode(self, x_t: Tensor, state: LinearState | None) -> tuple[Tensor, LinearState]:
        """One checked token, its gates read from x_t; the ℓp and Huber memories by their own recurrence."""
        q, k, v = self.project(x_t)
        t = self.terms(q, k, v, None, self.side_input(x_t))
        if self.bias not in NONLINEAR_BIASES:
            return self.step_terms(t, state)
        if state is not None and state.memory.shape[0] != x_t.shape[0]:
            raise ShapeError(f"state: expected batch {x_t.shape[0]} (as x_t), got {state.memory.shape[0]}")
        out, memory = memory_scan(t.q, t.k, t.v, causal=True, memory=None if state is None else state.memory,
                                  **self._scan_args(t))
        return self.out_proj(self.merge_heads(out)), LinearState(memory)

    def extra_repr(self) -> str:
        extra = {"lp": f", p={self.p}", "huber": f", delta={self.delta}"}.get(self.bias, "")
        return (
            f"bias={self.bias!r}, retention={self.retention!r}, feature_map={self.feature_map!r}, "
            f"normalize={self.normalize}, causal={self.causal}, chunk_size={self.chunk_size}{extra}, "
            f"gate_source={self.gate_source!r}"
        )


@register_memory(
    name="linear",
    sharding=("state",),
    paper=KATHAROPOULOS,
    cross=True,
    params=(_CHUNK,),
    summary="Linear attention, φ = elu + 1: φ(q)ᵀΣφ(k)vᵀ / φ(q)ᵀΣφ(k); Miras' dot-product memory.",
    normalized=True,
    flops=_memory_flops("none", "dot"),
    backend=hebbian_backend,
)
class EluLinearAttention(MemoryAttention):
    """Linear attention (Katharopoulos et al., 2020): φ(x) = elu(x) + 1, normalised, M_t = M_{t−1} + v_t φ(k_t)ᵀ."""

    takes_side_input = False  # no learned gates

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, chunk_size=chunk_size)


@register_memory(
    name="delta",
    sharding=("state",),
    paper=SCHLAG,
    params=(_CHUNK, _GATE_SOURCE),
    summary="Delta rule (DeltaNet): M_t = M_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, L2-normalised SiLU q, k.",
    normalized=False,
    flops=_memory_flops("none", "l2"),
)
class DeltaRuleAttention(MemoryAttention):
    """The delta rule: one gradient step on ½‖M k − v‖² per token, β_t = σ(x_t w + b) (gate_source='key':
    σ(w·k_t + b)); SiLU then L2 norm on q, k."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        chunk_size: int = 64,
        gate_source: str = "x",
    ) -> None:
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, bias="l2", feature_map="silu",
            normalize=False, chunk_size=chunk_size, gate_source=gate_source,
        )


@register_memory(
    name="retention",
    sharding=("state",),
    paper=RETNET,
    params=(_GAMMA, _CHUNK),
    summary="Retention (RetNet): (QKᵀ/√d ⊙ D)V, D_ij = γ_h^(i−j), fixed decay per head.",
    normalized=False,
    flops=_memory_flops("fixed", "dot"),
)
class RetentionAttention(MemoryAttention):
    """Retention: M_t = γ_h M_{t−1} + v_t k_tᵀ, read with q_t/√d; γ_h = 1 − 2^(−5−h) unless `gamma` is given."""

    takes_side_input = False  # no learned gates

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        gamma: float | None = None,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, retention="fixed",
            feature_map="identity", normalize=False, gamma=gamma, chunk_size=chunk_size,
        )


@register_memory(
    name="gated-linear",
    sharding=("state",),
    paper=GLA,
    params=(_TEMPERATURE, _CHUNK, _GATE_SOURCE),
    summary="Gated linear attention (GLA): M_t = M_{t−1} diag(α_t) + v_t k_tᵀ, α_t = σ(x_t W₁W₂ + b)^(1/τ) per channel.",
    normalized=False,
    flops=_memory_flops("channel", "dot"),
)
class GatedLinearAttention(MemoryAttention):
    """Gated linear attention: data-dependent decay per channel of the memory, α_t = σ(x_t W₁W₂ + b)^(1/τ)
    (GLA's low-rank map; gate_source='key': σ(W k_t + b)^(1/τ))."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        gate_temperature: float = 16.0,
        chunk_size: int = 64,
        gate_source: str = "x",
    ) -> None:
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, retention="channel",
            feature_map="identity", normalize=False, gate_temperature=gate_temperature, chunk_size=chunk_size,
            gate_source=gate_source,
        )


@register_memory(
    name="miras-lp",
    sharding=("state",),
    paper=MIRAS,
    params=(_P, _GATE_SOURCE),
    summary="Miras ℓp memory (matrix Moneta): M_t = M_{t−1} − β_t p (Sign(e)⊙|e|^(p−1)) k_tᵀ, e = M_{t−1}k_t − v_t.",
    normalized=False,
    materialize=False,
    flops=_memory_flops("none", "lp"),
)
class LpMemoryAttention(MemoryAttention):
    """The ℓp attentional bias: one gradient step on ‖M k − v‖_p^p per token, β_t = σ(x_t w + b); SiLU then L2 norm."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        p: float = 1.5,
        gate_source: str = "x",
    ) -> None:
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, bias="lp", feature_map="silu",
            normalize=False, p=p, gate_source=gate_source,
        )


@register_memory(
    name="miras-huber",
    sharding=("state",),
    paper=MIRAS,
    params=(_DELTA, _GATE_SOURCE),
    summary="Miras Huber memory (matrix Yaad): the delta rule's step where ‖M k − v‖ <= δ, δ·Sign(M k − v) kᵀ beyond.",
    normalized=False,
    materialize=False,
    flops=_memory_flops("none", "huber"),
)
class HuberMemoryAttention(MemoryAttention):
    """The Huber attentional bias: ℓ2's step near the target, ℓ1's (scaled by δ) far from it; SiLU then L2 norm."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        delta: float = 1.0,
        gate_source: str = "x",
    ) -> None:
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, bias="huber", feature_map="silu",
            normalize=False, delta=delta, gate_source=gate_source,
        )
