"""Associative memory with attentional bias and retention (Miras: Behrouz, Razaviyayn, Zhong & Mirrokni, 2025).

A layer is a memory M (d_v × d_k, here stored as S = Mᵀ) that each token updates by one
step of online gradient descent on an attentional bias L, with a retention gate α:

    M_t = α_t M_{t−1} − η_t ∇_M L(M_{t−1}; k_t, v_t),      y_t = M_t φ(q_t)

    dot-product bias  L = −⟨M k, v⟩        ∇L = −v kᵀ           M_t = α_t M_{t−1} + v_t k_tᵀ          (Hebbian)
    L2 bias           L = ½‖M k − v‖²      ∇L = (M k − v) kᵀ    M_t = α_t M_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ   (delta rule)

with η_t = 1 (Hebbian) or β_t = σ(w·k_t + b) (delta rule). With retention, the L2 step is
taken on the retained memory, M_t = α_t M_{t−1} − β_t ∇L(α_t M_{t−1}; k_t, v_t)
= α_t M_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, the gated delta rule (Yang, Kautz & Hatamizadeh,
2024, arXiv:2412.06464); without retention it is the formula above.
Retention α_t, one of:
    none      α = 1
    fixed     α = γ_h per head: RetNet's 1 − 2^(−5−h), h = 0..heads−1, or `gamma` for every head
    scalar    α_t = σ(w_h·k_t + b_h)^(1/τ) per head and token (data-dependent, scalar)
    channel   α_t = σ(W_h k_t + b_h)^(1/τ) per channel of the memory (GLA; τ = gate_temperature)

Gates read the token through its per-head key projection k_t (before φ). GLA computes its
gate from x_t with a low-rank map x W₁W₂; with W₁ = W_k this is that map, and it keeps
`attend(q, k, v)` a function of q, k and v alone, so cross-attention writes memory from the
context with the context's gates. Feature maps φ: 'elu+1' (elu(x) + 1 > 0), 'identity' (queries
scaled by 1/√d_k, as RetNet and GLA do), 'silu'; the L2 bias then L2-normalises q and k, which
keeps the eigenvalues of I − β k kᵀ in [0, 1] (DeltaNet). normalize=True divides by φ(q)ᵀz
(rows of the implicit matrix sum to 1) and needs the positive 'elu+1' map and the dot-product bias.

Registered: the general recurrence as "miras" (P157, every choice above) and its named
instances — "linear" (Katharopoulos et al., 2020), "delta" (Schlag, Irie & Schmidhuber, 2021,
with DeltaNet's SiLU + L2 map of Yang et al., 2024), "retention" (RetNet, Sun et al., 2023) and
"gated-linear" (GLA, Yang et al., 2024) — each citing the paper that introduced it. The RetNet
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

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_qkv
from ...kernels.linear_scan import (
    LinearTerms,
    check_chunk_size,
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
BIASES: tuple[str, ...] = ("dot", "l2")
RETENTIONS: tuple[str, ...] = ("none", "fixed", "scalar", "channel")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ParameterError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return str(value)


def check_memory_config(feature_map: str, bias: str, retention: str, normalize: bool) -> None:
    """The combinations the recurrence supports; ParameterError naming the parameter otherwise."""
    _choice("feature_map", feature_map, FEATURE_MAPS)
    _choice("bias", bias, BIASES)
    _choice("retention", retention, RETENTIONS)
    if normalize and bias == "l2":
        raise ParameterError("normalize: the delta rule (bias='l2') has signed weights; expected normalize=False")
    if normalize and feature_map != "elu+1":
        raise ParameterError(f"normalize: needs a positive feature map ('elu+1'), got feature_map={feature_map!r}")
    if bias == "l2" and retention == "channel":
        raise ParameterError("retention: the delta rule (bias='l2') takes 'none', 'fixed' or 'scalar', got 'channel'")


def feature_map_qk(q: Tensor, k: Tensor, feature_map: str, bias: str) -> tuple[Tensor, Tensor]:
    """φ(q), φ(k); with the L2 bias both are then L2-normalised."""
    if feature_map == "elu+1":
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    elif feature_map == "silu":
        q, k = F.silu(q), F.silu(k)
    else:
        q = q / math.sqrt(q.shape[-1])
    if bias == "l2":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q, k


def retnet_gammas(heads: int) -> Tensor:
    """RetNet's decay per head, γ_h = 1 − 2^(−5−h), h = 0..heads−1 (float64)."""
    return 1.0 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))


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
) -> Tensor:
    """The memory read y = M φ(q) over (batch, heads, n, head_dim), given the gates.

    log_decay: log α, (batch, heads, n) or per channel (batch, heads, n, head_dim), <= 0;
    beta: the delta rule's step (batch, heads, n), required with bias='l2' and refused otherwise.
    """
    retention = "none" if log_decay is None else ("scalar" if log_decay.dim() == 3 else "channel")
    check_memory_config(feature_map, bias, retention, normalize)
    if (beta is not None) != (bias == "l2"):
        raise ValueError(f"beta: bias={bias!r} {'needs' if bias == 'l2' else 'takes no'} beta, got {'None' if beta is None else 'a tensor'}")
    check_qkv(q, k, v)
    fq, fk = feature_map_qk(q, k, feature_map, bias)
    return linear_attention(
        fq, fk, v, causal=causal, attention_mask=attention_mask, log_decay=log_decay, beta=beta,
        normalize=normalize, chunk_size=chunk_size,
    )


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
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `memory_attention`, the implicit matrix built naively in float64."""
    retention = "none" if log_decay is None else ("scalar" if log_decay.dim() == 3 else "channel")
    check_memory_config(feature_map, bias, retention, normalize)
    check_qkv(q, k, v)
    fq, fk = feature_map_qk(q, k, feature_map, bias)
    return linear_attention_reference(
        fq, fk, v, causal=causal, attention_mask=attention_mask, log_decay=log_decay, beta=beta,
        normalize=normalize,
    )


def _memory_flops(retention: str, bias: str) -> Callable[[int, int, int, bool], float]:
    def flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
        gated = retention != "none" or bias == "l2"
        return linear_flops(
            n, heads, head_dim, causal, channel_decay=retention == "channel", delta=bias == "l2",
            two_scans=gated and not causal,
        )

    flops.__doc__ = f"Forward FLOPs (retention={retention!r}, bias={bias!r}), see `linear_flops`."
    return flops


def register_memory(*, cross: bool = False, **entry: Any) -> Callable[[type], type]:
    """`register` for a memory entry: family A, O(Nd²), causal, key padding, decoding and `materialize`,
    no attention mask; cross-attention only where `cross`. `entry` holds the rest (name, paper, params, …)."""
    supports = Supports(causal=True, key_padding=True, attn_mask=False, cross=cross, decode=True, materialize=True)
    return register(family="A", cost="O(Nd²)", exponent=1.0, supports=supports, **entry)


_CHUNK = Param("chunk_size", int, 64, "chunk of the causal fast path", low=1)
_TEMPERATURE = Param("gate_temperature", float, 16.0, "τ of α = σ(·)^(1/τ) (GLA: 16)", low=1e-3)
_GAMMA = Param("gamma", float, None, "decay of every head (default RetNet's 1 − 2^(−5−h))", low=0.0, high=1.0,
               optional=True)


@register_memory(
    name="miras",
    paper=MIRAS,
    params=(
        Param("bias", str, "dot", "attentional bias: 'dot' (Hebbian) or 'l2' (delta rule)", choices=BIASES),
        Param("retention", str, "none", "retention gate α", choices=RETENTIONS),
        Param("feature_map", str, "elu+1", "φ on q and k", choices=FEATURE_MAPS),
        Param("normalize", bool, True, "divide by φ(q)ᵀz (dot bias with 'elu+1' only)"),
        _GAMMA,
        _TEMPERATURE,
        _CHUNK,
    ),
    summary="Miras memory M_t = α_t M_{t−1} − η_t ∇L(M_{t−1}; k_t, v_t): dot/L2 bias, none/fixed/scalar/channel retention.",
    normalized=True,  # with the defaults ('dot', 'elu+1', normalize=True); other settings are not normalised
    flops=_memory_flops("none", "dot"),  # at the defaults
)
class MemoryAttention(LinearAttention):
    """Associative memory updated by online gradient descent on an attentional bias, with retention (Miras).

    The defaults give linear attention; the named entries "linear", "delta", "retention" and
    "gated-linear" are its instances. Cross-attention is only in "linear" (a memory written from
    a context needs no positions); arbitrary attention masks need the N × N matrix and are refused.
    """

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
    ) -> None:
        check_memory_config(feature_map, bias, retention, normalize)
        check_chunk_size(chunk_size)
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
        d = self.head_dim
        if retention == "fixed":
            gammas = retnet_gammas(heads) if gamma is None else torch.full((heads,), float(gamma), dtype=torch.float64)
            self.register_buffer("log_gamma", torch.log(gammas), persistent=False)
        if retention in ("scalar", "channel"):
            width = 1 if retention == "scalar" else d
            self.decay_weight = nn.Parameter(torch.randn(heads, d, width) / math.sqrt(d))
            self.decay_bias = nn.Parameter(torch.zeros(heads, width))
        if bias == "l2":
            self.beta_weight = nn.Parameter(torch.randn(heads, d) / math.sqrt(d))
            self.beta_bias = nn.Parameter(torch.zeros(heads))

    def gates(self, k: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(log α, β) from the projected keys (batch, heads, n, head_dim)."""
        b, h, n, _ = k.shape
        log_decay = beta = None
        if self.retention == "fixed":
            log_decay = self.log_gamma.to(k.dtype)[None, :, None].expand(b, h, n)
        elif self.retention in ("scalar", "channel"):
            logits = torch.einsum("bhnd,hdw->bhnw", k, self.decay_weight) + self.decay_bias[:, None, :]
            log_decay = F.logsigmoid(logits) / self.gate_temperature
            if self.retention == "scalar":
                log_decay = log_decay[..., 0]
        if self.bias == "l2":
            beta = torch.sigmoid((k * self.beta_weight[:, None, :]).sum(-1) + self.beta_bias[:, None])
        return log_decay, beta

    def terms(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> LinearTerms:
        log_decay, beta = self.gates(k)
        fq, fk = feature_map_qk(q, k, self.feature_map, self.bias)
        return LinearTerms(fq, fk, v, log_decay=log_decay, beta=beta)

    def extra_repr(self) -> str:
        return (
            f"bias={self.bias!r}, retention={self.retention!r}, feature_map={self.feature_map!r}, "
            f"normalize={self.normalize}, causal={self.causal}, chunk_size={self.chunk_size}"
        )


@register_memory(
    name="linear",
    paper=KATHAROPOULOS,
    cross=True,
    params=(_CHUNK,),
    summary="Linear attention, φ = elu + 1: φ(q)ᵀΣφ(k)vᵀ / φ(q)ᵀΣφ(k); Miras' dot-product memory.",
    normalized=True,
    flops=_memory_flops("none", "dot"),
)
class EluLinearAttention(MemoryAttention):
    """Linear attention (Katharopoulos et al., 2020): φ(x) = elu(x) + 1, normalised, M_t = M_{t−1} + v_t φ(k_t)ᵀ."""

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
    paper=SCHLAG,
    params=(_CHUNK,),
    summary="Delta rule (DeltaNet): M_t = M_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, L2-normalised SiLU q, k.",
    normalized=False,
    flops=_memory_flops("none", "l2"),
)
class DeltaRuleAttention(MemoryAttention):
    """The delta rule: one gradient step on ½‖M k − v‖² per token, β_t = σ(w·k_t + b); SiLU then L2 norm on q, k."""

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
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, bias="l2", feature_map="silu",
            normalize=False, chunk_size=chunk_size,
        )


@register_memory(
    name="retention",
    paper=RETNET,
    params=(_GAMMA, _CHUNK),
    summary="Retention (RetNet): (QKᵀ/√d ⊙ D)V, D_ij = γ_h^(i−j), fixed decay per head.",
    normalized=False,
    flops=_memory_flops("fixed", "dot"),
)
class RetentionAttention(MemoryAttention):
    """Retention: M_t = γ_h M_{t−1} + v_t k_tᵀ, read with q_t/√d; γ_h = 1 − 2^(−5−h) unless `gamma` is given."""

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
    paper=GLA,
    params=(_TEMPERATURE, _CHUNK),
    summary="Gated linear attention (GLA): M_t = M_{t−1} diag(α_t) + v_t k_tᵀ, α_t = σ(W k_t + b)^(1/τ) per channel.",
    normalized=False,
    flops=_memory_flops("channel", "dot"),
)
class GatedLinearAttention(MemoryAttention):
    """Gated linear attention: data-dependent decay per channel of the memory, α_t = σ(W k_t + b)^(1/τ)."""

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
    ) -> None:
        super().__init__(
            dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, retention="channel",
            feature_map="identity", normalize=False, gate_temperature=gate_temperature, chunk_size=chunk_size,
        )
