"""Galerkin- and Fourier-type attention (Cao, NeurIPS 2021, "Choose a Transformer: Fourier or Galerkin", P044).

Softmax-free attention with layer normalisation in place of the softmax and a 1/n scaling:

    Galerkin-type:  z = Q (K̃ᵀ Ṽ) / n,     K̃ = LN(K), Ṽ = LN(V)       O(n d²)
    Fourier-type:   z = (Q̃ K̃ᵀ) V / n,     Q̃ = LN(Q), K̃ = LN(K)       O(n² d)

LN is a layer norm over the head dimension, one per head with its own learnable affine (ε = 1e-5),
as in the paper's code. The norms are applied in `project`, so `attend` receives K̃, Ṽ (Galerkin)
or Q̃, K̃ (Fourier) and the implicit matrix explains the output: Galerkin A = Q K̃ᵀ / n acting on Ṽ,
Fourier A = Q̃ K̃ᵀ / n acting on V. Neither is normalised: rows of A need not sum to 1.
(The official code divides the Fourier scores by √d as well; the paper's equation, followed here,
does not.)

Initialisation, as the official code's SimpleAttention (`xavier_init=1e-2, diagonal_weight=1e-2`):
the q, k and v projections get xavier_uniform with gain 1e-2 plus 1e-2 on the diagonal (W ≈ 0.01·I,
the rectangular identity when heads·head_dim ≠ dim) and zero biases (`init_projections`). The
official layer has no output projection (its `fc` exists only with positional features); the
output projection here keeps PyTorch's default initialisation.

Galerkin-type attention reads the keys only through K̃ᵀṼ = Σ_j k̃_j ṽ_jᵀ, a sum over tokens, so
permuting the key/value tokens leaves every output unchanged; with 1/n the output of a constant
sequence does not depend on its length.

n is the number of keys a query sees: with key padding, the real tokens (padded ones contribute
nothing). The paper has no causal form (it learns operators on whole grids); the causal form here
is the natural extension, not the paper's: query i averages over the keys it sees,
z_i = Σ_{j≤i} (q_i·k̃_j) ṽ_j / n_i with n_i = the number of real keys at positions ≤ i. Galerkin runs
through the linear-family engine (bidirectional O(n d²), chunked causal, recurrent `step`); Fourier
builds the n × n matrix, as its cost says, and decodes with a KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.masks import combine_masks
from ...core.module import Attention
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_qkv
from ...kernels.linear_scan import (
    LinearState,
    LinearTerms,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
    linear_flops,
)
from .base import LinearAttention

GALERKIN = Paper("P044", "Choose a Transformer: Fourier or Galerkin", 2021, "2105.14995")
LN_EPS = 1e-5


XAVIER_GAIN, DIAGONAL_WEIGHT = 1e-2, 1e-2


def init_projections(*layers: nn.Linear, gain: float = XAVIER_GAIN, diagonal: float = DIAGONAL_WEIGHT) -> None:
    """The official initialisation of the q, k, v projections: xavier_uniform(gain) + diagonal·I, zero bias."""
    with torch.no_grad():
        for layer in layers:
            nn.init.xavier_uniform_(layer.weight, gain=gain)
            layer.weight += diagonal * torch.eye(*layer.weight.shape, dtype=layer.weight.dtype, device=layer.weight.device)
            if layer.bias is not None:
                layer.bias.zero_()


class HeadLayerNorm(nn.Module):
    """Layer norm over the head dimension of (batch, heads, n, head_dim), a learnable affine per head."""

    def __init__(self, heads: int, head_dim: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * self.weight[:, None, :] + self.bias[:, None, :]


def _inverse_counts(q: Tensor, k: Tensor, causal: bool, attention_mask: Tensor | None) -> Tensor:
    """1 / n_i broadcastable to (batch, 1, n_q, 1): n_i = the real keys query i sees (at least 1)."""
    n_q, n_k = q.shape[2], k.shape[2]
    check_attention_mask(attention_mask, q.shape[0], n_k)
    real = torch.ones(1, n_k, dtype=q.dtype, device=q.device) if attention_mask is None else attention_mask.to(q.dtype)
    if causal:
        if n_q != n_k:
            raise ShapeError(
                f"k: causal Galerkin attention needs as many keys as queries, got {n_q} queries and {n_k} keys "
                "(decode one token at a time with `step`)"
            )
        counts = real.cumsum(dim=-1)[:, None, :, None]
    else:
        counts = real.sum(dim=-1)[:, None, None, None]
    return 1.0 / counts.clamp_min(1.0)


def galerkin_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """z = q (k̃ᵀ ṽ) / n on layer-normalised k̃, ṽ (batch, heads, n, head_dim): O(n d²) through the engine."""
    check_qkv(q, k, v)
    scaled = q * _inverse_counts(q, k, causal, attention_mask)
    return linear_attention(
        scaled, k, v, causal=causal, attention_mask=attention_mask, normalize=False, chunk_size=chunk_size
    )


def galerkin_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, weights): A_ij = q_i·k̃_j / n_i over visible real keys, built in float64; out = A ṽ."""
    check_qkv(q, k, v)
    q64 = q.double() * _inverse_counts(q.double(), k, causal, attention_mask)
    out, weights = linear_attention_reference(
        q64, k.double(), v.double(), causal=causal, attention_mask=attention_mask, normalize=False
    )
    return out.to(q.dtype), weights.to(q.dtype)


def _fourier_weights(q: Tensor, k: Tensor, keep: Tensor | None) -> Tensor:
    """A = (q̃ k̃ᵀ ⊙ keep) / (number of visible keys per row, at least 1)."""
    scores = q @ k.transpose(-1, -2)
    if keep is None:
        return scores / k.shape[2]
    counts = keep.sum(dim=-1, keepdim=True).clamp_min(1).to(q.dtype)
    return scores.masked_fill(~keep, 0.0) / counts


def _fourier_mask(q: Tensor, k: Tensor, causal: bool, attention_mask: Tensor | None) -> Tensor | None:
    return combine_masks(
        batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
        attention_mask=attention_mask, dtype=q.dtype, device=q.device,
    )


def fourier_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> Tensor:
    """z = (q̃ k̃ᵀ) v / n on layer-normalised q̃, k̃ (batch, heads, n, head_dim); causal is bottom-right aligned."""
    check_qkv(q, k, v)
    return _fourier_weights(q, k, _fourier_mask(q, k, causal, attention_mask)) @ v


def fourier_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `fourier_attention` in float64, cast back to q's dtype."""
    check_qkv(q, k, v)
    weights = _fourier_weights(q.double(), k.double(), _fourier_mask(q, k, causal, attention_mask))
    return (weights @ v.double()).to(q.dtype), weights.to(q.dtype)


@dataclass
class GalerkinState:
    """Decoding state: the engine's memory Σ k̃ ṽᵀ and the number of tokens seen."""

    linear: LinearState | None
    count: int


@register(
    name="galerkin",
    paper=GALERKIN,
    family="A",
    cost="O(N d²)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, cross=True, decode=True, materialize=True,
                      sharding=("state",)),
    params=(Param("chunk_size", int, 64, "chunk of the causal fast path", low=1, knob=True),),
    summary="Galerkin-type attention: z = Q (LN(K)ᵀ LN(V)) / n, softmax-free, linear in n.",
    normalized=False,
    test_params={"chunk_size": 4},
    flops=linear_flops,
)
class GalerkinAttention(LinearAttention):
    """Multi-head Galerkin-type attention; K and V are layer-normalised per head in `project`."""

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
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, normalize=False, chunk_size=chunk_size)
        self.k_norm = HeadLayerNorm(heads, self.head_dim)
        self.v_norm = HeadLayerNorm(heads, self.head_dim)
        init_projections(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, K̃ = LN(k), Ṽ = LN(v), each (batch, heads, n, head_dim)."""
        q, k, v = super().project(x, context)
        return q, self.k_norm(k), self.v_norm(v)

    def terms(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> LinearTerms:
        return LinearTerms(q * _inverse_counts(q, k, self.causal, attention_mask), k, v)

    def decode(self, x_t: Tensor, state: GalerkinState | None) -> tuple[Tensor, GalerkinState]:
        """One checked token: (y_t (batch, 1, dim), state), equal to the causal forward."""
        q, k, v = self.project(x_t)
        count = 1 if state is None else state.count + 1
        out, linear = linear_attention_step(q / count, k, v, None if state is None else state.linear, normalize=False)
        return self.out_proj(self.merge_heads(out)), GalerkinState(linear, count)


def fourier_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q̃ k̃ᵀ and A v: 4·h·n²·d (the full matrix is built, causal or not)."""
    return 4.0 * heads * n * n * head_dim


@register(
    name="fourier",
    paper=GALERKIN,
    family="A",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, cross=True, decode=True, materialize=True),
    summary="Fourier-type attention: z = (LN(Q) LN(K)ᵀ) V / n, softmax-free.",
    normalized=False,
    flops=fourier_flops,
)
class FourierAttention(Attention):
    """Multi-head Fourier-type attention; Q and K are layer-normalised per head in `project`."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.q_norm = HeadLayerNorm(heads, self.head_dim)
        self.k_norm = HeadLayerNorm(heads, self.head_dim)
        init_projections(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Q̃ = LN(q), K̃ = LN(k), v, each (batch, heads, n, head_dim)."""
        q, k, v = super().project(x, context)
        return self.q_norm(q), self.k_norm(k), v

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return _fourier_weights(q, k, mask) @ v

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        weights = _fourier_weights(q.double(), k.double(), mask)
        return (weights @ v.double()).to(q.dtype), weights.to(q.dtype)
