"""Mimetic initialisation of self-attention (P001) and a measure of how mimetic weights are.

Pre-trained vision transformers have W_q W_kᵀ close to a positive multiple of the identity and
W_v W_o close to a negative one. Mimetic initialisation sets, per layer (papers' notation x W):

    W_q^h W_k^hᵀ ≈ α₁ Z₁^h + β₁ I        for each head h, Z₁^h ~ N(0, 1/d) entrywise (dim d)
    W_v W_o     ≈ α₂ Z₂   − β₂ I         all heads together (W_v: d × H·d_h, W_o: H·d_h × d)

realised by the SVD of the target M = U S Vᵀ: W_q^h = U_{:, :d_h} S_{:d_h}^{1/2},
W_k^h = V_{:, :d_h} S_{:d_h}^{1/2} (so W_q^h W_k^hᵀ is the best rank-d_h approximation of M, and M
itself when d_h ≥ d), and W_v = U_{:, :r} S^{1/2}, W_o = S^{1/2} V_{:, :r}ᵀ with r = min(H·d_h, d)
(exact when H·d_h ≥ d; components beyond d are zero). Defaults α₁ = β₁ = 0.7, α₂ = β₂ = 0.4 (the
paper's ViT-Tiny values). Biases are left as they are. Follows the paper (PAPER_NOTES: a
third-party version swaps the QK and VO targets and scales Z by 1/d).

`mimeticity(model)` measures how mimetic weights are, per layer and head:

    qk[l, h] =  mean_i P_ii / mean_{i≠j} |P_ij|,   P = W_q^h W_k^hᵀ
    vo[l, h] = −mean_i R_ii / mean_{i≠j} |R_ij|,   R = W_v^h W_o^h

large positive for both in a mimetic layer, near 0 for independent random weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from .projections import AttentionLayer, attention_layers

MIMETIC = Paper("P001", "Mimetic Initialization of Self-Attention Layers", 2023, "2305.09828")


@dataclass(frozen=True)
class MimeticTargets:
    """The targets of one layer: `qk` (heads, dim, dim) = α₁Z₁^h + β₁I per head, `vo` (dim, dim) = α₂Z₂ − β₂I."""

    name: str
    qk: Tensor
    vo: Tensor


def _factor(target: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B), each (dim, rank), with A Bᵀ the best rank-`rank` approximation of target (zero columns past dim)."""
    u, s, vh = torch.linalg.svd(target)
    root = s.sqrt()
    left, right = u * root, vh.T * root
    d = target.shape[0]
    if rank <= d:
        return left[:, :rank], right[:, :rank]
    pad = target.new_zeros(d, rank - d)
    return torch.cat([left, pad], 1), torch.cat([right, pad], 1)


def _check_factor(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    return float(value)


def mimetic_init_(
    model: nn.Module,
    *,
    alpha_qk: float = 0.7,
    beta_qk: float = 0.7,
    alpha_vo: float = 0.4,
    beta_vo: float = 0.4,
    generator: torch.Generator | None = None,
) -> list[MimeticTargets]:
    """Set q, k, v, o of every attention layer of `model` mimetically (module docstring), in place.

    Z is drawn in float64 on the generator's device (CPU by default), per layer: Z₁ for each head,
    then Z₂. Returns the targets, one per layer.
    """
    alpha_qk, beta_qk = _check_factor("alpha_qk", alpha_qk), _check_factor("beta_qk", beta_qk)
    alpha_vo, beta_vo = _check_factor("alpha_vo", alpha_vo), _check_factor("beta_vo", beta_vo)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else torch.device("cpu")
    out: list[MimeticTargets] = []
    with torch.no_grad():
        for layer in attention_layers(model):
            d = layer.dim
            eye = torch.eye(d, dtype=torch.float64, device=device)
            qk = []
            for h in range(layer.heads):
                target = alpha_qk * torch.randn(d, d, generator=generator, dtype=torch.float64, device=device) / math.sqrt(d)
                target = target + beta_qk * eye
                w_q, w_k = _factor(target, layer.head_dim)
                rows = layer.head_rows(h)
                layer.q.weight[rows] = w_q.T.to(layer.q.weight)
                layer.k.weight[rows] = w_k.T.to(layer.k.weight)
                qk.append(target)
            vo = alpha_vo * torch.randn(d, d, generator=generator, dtype=torch.float64, device=device) / math.sqrt(d)
            vo = vo - beta_vo * eye
            w_v, w_o = _factor(vo, layer.heads * layer.head_dim)
            layer.v.weight.copy_(w_v.T.to(layer.v.weight))
            layer.o.weight.copy_(w_o.to(layer.o.weight))
            out.append(MimeticTargets(layer.name, torch.stack(qk), vo))
    return out


@dataclass(frozen=True)
class Mimeticity:
    """Per layer and head (layers, heads): `qk` diagonal over mean |off-diagonal| of W_q^h W_k^hᵀ, `vo` the
    same of −W_v^h W_o^h; `names` the layers."""

    names: tuple[str, ...]
    qk: Tensor
    vo: Tensor


def diagonal_ratio(matrix: Tensor) -> Tensor:
    """mean_i M_ii / mean_{i≠j} |M_ij| of a square matrix (dim ≥ 2), in float64."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"matrix: expected a square matrix of side >= 2, got shape {tuple(matrix.shape)}")
    m = matrix.double()
    d = m.shape[0]
    diagonal = m.diagonal()
    off = (m.abs().sum() - diagonal.abs().sum()) / (d * d - d)
    return diagonal.mean() / off


def mimeticity(model: nn.Module) -> Mimeticity:
    """How mimetic the attention weights of `model` are (module docstring); any model `attention_layers` reads."""
    layers: list[AttentionLayer] = attention_layers(model)
    heads = {layer.heads for layer in layers}
    if len(heads) != 1:
        raise ValueError(f"model: expected the same number of heads in every layer, got {sorted(heads)}")
    with torch.no_grad():
        qk = torch.stack([torch.stack([diagonal_ratio(la.query_key(h)) for h in range(la.heads)]) for la in layers])
        vo = torch.stack([torch.stack([-diagonal_ratio(la.value_output(h)) for h in range(la.heads)]) for la in layers])
    return Mimeticity(tuple(la.name for la in layers), qk, vo)


add(
    Spec(
        name="mimetic-init",
        kind="init",
        paper=MIMETIC,
        factory=mimetic_init_,
        family="D",
        summary="mimetic initialisation: W_qW_kᵀ ≈ αZ + βI per head, W_vW_o ≈ αZ − βI by SVD; mimeticity() measures it",
        params=(
            Param("alpha_qk", float, 0.7, "scale α₁ of the random part of W_q W_kᵀ"),
            Param("beta_qk", float, 0.7, "weight β₁ of the identity in W_q W_kᵀ"),
            Param("alpha_vo", float, 0.4, "scale α₂ of the random part of W_v W_o"),
            Param("beta_vo", float, 0.4, "weight β₂ of the negative identity in W_v W_o"),
        ),
    )
)
