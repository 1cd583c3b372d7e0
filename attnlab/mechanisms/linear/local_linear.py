"""Local Linear Attention (Zuo et al., 2025, P244): the intercept of a local linear regression at each query.

For query q_i, softmax kernel weights p_ij = softmax_j(q_i·k_j/√d + mask) (the weights of
softmax attention) and a ridge λ on the slope, LLA fits the values with an affine function of
the keys around the query and outputs its value at the query, the intercept a:

    (a_i, B_i) = argmin_{a, B}  Σ_j p_ij ‖v_j − a − B (k_j − q_i)‖² + λ ‖B‖²_F

    out_i = a_i = μ_v − C_vk (C_kk + λ I)⁻¹ (μ_k − q_i),
    μ_v = Σ_j p_ij v_j,  μ_k = Σ_j p_ij k_j,  C_vk = Σ_j p_ij (v_j − μ_v)(k_j − μ_k)ᵀ,  C_kk likewise.

Softmax attention is the local-constant fit (λ → ∞ gives out_i = μ_v, Nadaraya–Watson); with
λ = 0 a v that is affine in k (v_j = c + G k_j) is recovered exactly, out_i = c + G q_i.
The paper writes the fit with kernel weights w_ij; here the weights are the normalised p_ij, so
λ is measured against weights that sum to 1 and the output does not change when every logit
of a row shifts by a constant.

Implicit attention: out_i = Σ_j A_ij v_j with the equivalent kernel of local linear regression

    A_ij = p_ij (1 − (k_j − μ_k)ᵀ (C_kk + λ I)⁻¹ (μ_k − q_i)),   Σ_j A_ij = 1,

whose entries may be negative. A query with no visible key gives 0.

Numerics: the intercept extrapolates along the fitted slope, which amplifies the rounding of
the key covariance, a difference Σ_j p_ij k_j k_jᵀ − μ_k μ_kᵀ that cancels when the keys spread
far beyond their local covariance (logits of a few hundred and up). The fast path therefore
builds A in float64 whatever the input dtype (about twice the float32 cost), after shifting
keys and queries by a common point (which leaves the output unchanged), and applies it to v
in the input dtype. Float32 results then differ from the float64 reference by about what the
rounding of the float32 inputs causes (2e-5 relative for q, k of scale 100, where float32
moments err by several percent).

Cost: the per-query second moments Σ_j p_ij k_j k_jᵀ are an N × N by N × d² product, so the
exact fast path is O(N² d²) work (plus O(N d³) for the N solves of d × d systems) and O(N² + N d²)
memory; the paper's FlashLLA lowers the memory with blockwise passes and conjugate-gradient
solves, not the quadratic cost. The reference solves each query's weighted least-squares
problem explicitly in float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...core.masks import combine_masks
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_qkv

LLA = Paper(
    "P244",
    "Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention For Test-Time Regression",
    2025,
    "2510.01450",
)


def _mask(
    q: Tensor, k: Tensor, causal: bool, attention_mask: Tensor | None, attn_mask: Tensor | None
) -> Tensor | None:
    return combine_masks(
        batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
        attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device,
    )


def _check_ridge(ridge: float) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or math.isinf(ridge):
        raise ValueError(f"ridge: expected a finite float >= 0, got {ridge!r}")


def _singular(info: Tensor, ridge: float) -> None:
    if bool((info > 0).any()):
        raise ValueError(
            f"ridge: C_kk + ridge·I is singular for some query (ridge={ridge!r}); with ridge=0 every query needs "
            "head_dim + 1 visible keys in general position, which the first causal queries lack; use ridge > 0"
        )


def local_linear_weights(q: Tensor, k: Tensor, mask: Tensor | None, *, ridge: float, scale: float | None = None) -> Tensor:
    """The equivalent kernel A (batch, heads, n_q, n_k) of LLA under a combined mask (None, bool or additive).

    Vectorised over queries: second moments by one matmul, one Cholesky solve per query, all in
    float64 whatever the input dtype (see the module docstring); A is cast back to q's dtype.
    """
    _check_ridge(ridge)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dtype = q.dtype
    q, k = q.double(), k.double()
    mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    p = masked_softmax((q @ k.transpose(-1, -2)) * scale, mask)  # (b, h, n_q, n_k); blocked rows are 0
    # shift keys and queries by a common point (the output does not change) to keep the moments small
    centre = k[..., :1, :].detach()
    kc, qc = k - centre, q - centre
    mean = p @ kc  # μ_k, (b, h, n_q, d)
    second = (p @ (kc[..., :, None] * kc[..., None, :]).flatten(-2)).unflatten(-1, (d, d))
    eye = torch.eye(d, dtype=q.dtype, device=q.device)
    system = second - mean[..., :, None] * mean[..., None, :] + ridge * eye
    seen = p.sum(-1) > 0  # rows with a visible key; the others solve I x = r and are zeroed by p
    system = torch.where(seen[..., None, None], system, eye)
    factor, info = torch.linalg.cholesky_ex(system)
    _singular(info, ridge)
    x = torch.cholesky_solve((mean - qc)[..., None], factor)[..., 0]  # (C_kk + λI)⁻¹ (μ_k − q), (b, h, n_q, d)
    lever = kc @ x.transpose(-1, -2) - (mean * x).sum(-1)[..., None, :]  # (k_j − μ_k)·x_i, as (b, h, n_k, n_q)
    return (p * (1 - lever.transpose(-1, -2))).to(dtype)


def local_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    ridge: float = 1.0,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """LLA over (batch, heads, n, head_dim): the intercept of the p-weighted ridge local linear fit at each query."""
    check_qkv(q, k, v)
    return local_linear_weights(q, k, _mask(q, k, causal, attention_mask, attn_mask), ridge=ridge, scale=scale) @ v


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, ridge: float, scale: float | None) -> tuple[Tensor, Tensor]:
    """Per query: the weighted least-squares problem with design [1, k_j − q_i], solved in float64."""
    _check_ridge(ridge)
    q64, k64, v64 = q.double(), k.double(), v.double()
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    p = masked_softmax((q64 @ k64.transpose(-1, -2)) * scale, mask if mask is None or mask.dtype == torch.bool else mask.double())
    offsets = k64[:, :, None, :, :] - q64[:, :, :, None, :]  # (b, h, n_q, n_k, d)
    design = torch.cat([torch.ones_like(offsets[..., :1]), offsets], dim=-1)  # (b, h, n_q, n_k, 1 + d)
    weighted = (design * p[..., None]).transpose(-1, -2)  # Xᵀ W, (b, h, n_q, 1 + d, n_k)
    penalty = torch.diag(torch.tensor([0.0] + [float(ridge)] * d, dtype=torch.float64, device=q.device))
    normal = weighted @ design + penalty  # Xᵀ W X + diag(0, λ, …, λ)
    seen = p.sum(-1) > 0
    normal = torch.where(seen[..., None, None], normal, torch.eye(d + 1, dtype=torch.float64, device=q.device))
    coef, info = torch.linalg.solve_ex(normal, weighted @ v64[:, :, None])  # rows: intercept, then the slope
    hat, info_hat = torch.linalg.solve_ex(normal, weighted)
    _singular(info, ridge)
    _singular(info_hat, ridge)
    out = coef[..., 0, :] * seen[..., None]
    weights = hat[..., 0, :] * seen[..., None]
    return out.to(q.dtype), weights.to(q.dtype)


def local_linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    ridge: float = 1.0,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `local_linear_attention`: each query's weighted least squares solved explicitly in
    float64; weights = the intercept row of the hat matrix, e₀ᵀ (XᵀWX + Λ)⁻¹ XᵀW."""
    check_qkv(q, k, v)
    return _reference(q, k, v, _mask(q, k, causal, attention_mask, attn_mask), ridge, scale)


@register(
    name="local-linear",
    paper=LLA,
    family="A",
    cost="O(N²d²)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True, cross=True, decode=True),
    params=(
        Param("ridge", float, 1.0, "ridge λ on the slope (λ → ∞: softmax attention; 0: plain local linear fit)", low=0.0),
    ),
    summary="Local Linear Attention: the intercept of a softmax-weighted ridge local linear regression at each query.",
)
class LocalLinearAttention(Attention):
    """Multi-head Local Linear Attention; decoding keeps a KV cache (each step fits at the new query)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        causal: bool = False,
        ridge: float = 1.0,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first, causal=causal)
        _check_ridge(ridge)
        self.ridge = float(ridge)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return local_linear_weights(q, k, mask, ridge=self.ridge) @ v

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return _reference(q, k, v, mask, self.ridge, None)
