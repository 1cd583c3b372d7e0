"""HAN's layer attention module, LAM (Niu et al., "Single Image Super-Resolution via a Holistic Attention Network",
2020).

HAN stacks the outputs of its L residual groups, FG ∈ R^{L × H × W × C}, reshapes them to F ∈ R^{L × HWC} (one row per
layer) and lets every layer attend to all of them through their correlation:

    W = softmax(F Fᵀ) ∈ R^{L × L}        (softmax over the summed layer: row j of W weighs the layers mixed into j)
    F'_j = α · Σ_i W_ji F_i + F_j          α a learned scalar initialised at 0 (LAM starts as the identity)

The paper writes w_{i,j} = δ(φ(FG)_i · φ(FG)_jᵀ) and F_Lj = α Σ_i w_{i,j} FG_i + FG_j; the energy E = F Fᵀ is
symmetric, so normalising the summed index i is the row softmax of E taken here (W_ji = w_{i,j}).

The official code (wwlCape/HAN, `LAM_Module`) computes softmax(max_i E_ji − E_ji), which is softmax(−E): it weighs
the *least* correlated layers most, the opposite of the paper's equation. `similarity="negated"` gives that variant,
for running checkpoints trained with the official code; the default `"dot"` is the paper's. Neither scales E (the
paper does not): with large H·W·C the dot softmax is near one-hot on the layer itself.

Input and the catalogue's contract. The operator only reads the flattened features of each layer, so its input is
the stack of layer features x (batch, L, dim), dim = H·W·C, the layers playing the tokens: or (batch, L, H, W, C)
(any feature layout whose sizes multiply to dim; the output has the input's shape). The conformance suite's tokens
(batch, n, dim) are then n layers of dim features each, a faithful view of LAM (no mapping beyond the flattening).
Padding: attention_mask (batch, L), True = a real layer (or key_padding_mask, True = missing): a missing layer is no
key; a layer with no real key gets W = 0, F'_j = F_j. No causal mode (every layer sees every other, later ones
included) and no cross-attention.

`materialize` is W, (batch, 1, L, L): LAM has one map. The common parameters heads, head_dim and qkv_bias of the
catalogue are accepted (so the module builds like every mechanism) and have no effect: LAM has no projections and
no heads. `attention_path(x, W)` = α · W F, the part of the output linear in the map.

Fast path: one batched F Fᵀ and softmax. Reference: the energies and the normalisation written per pair, float64.
The channel-spatial attention module of the same paper is the entry `han-channel-spatial`.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.masks import module_keep_mask
from ...core.memory import check_memory
from ...core.module import Impl
from ...core.registry import Paper, Param, Spec, Supports, register
from ...core.validate import (
    check_attention_mask,
    check_choice,
    check_finite,
    check_floating,
    check_int,
    check_module_dtype,
    check_optional_int,
    check_tensor,
)

HAN = Paper("P113", "Single Image Super-Resolution via a Holistic Attention Network", 2020, "2008.08767")
SIMILARITIES = ("dot", "negated")


def han_layer_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per sample: F Fᵀ and W F (4·L²·D, D = heads·head_dim) plus the residual."""
    d = heads * head_dim
    return 4.0 * n * n * d + 2.0 * n * d


def _flat(features: Tensor, attention_mask: Tensor | None) -> Tensor:
    check_tensor("features", features)
    if features.dim() < 3:
        raise ShapeError(f"features: expected (batch, layers, dim) or (batch, layers, *feature_shape), got shape "
                         f"{tuple(features.shape)}")
    check_floating("features", features)
    check_attention_mask(attention_mask, features.shape[0], features.shape[1])
    return features.reshape(*features.shape[:2], -1)


def _check_alpha(alpha: Tensor | float, similarity: str) -> None:
    check_choice("similarity", similarity, SIMILARITIES)
    if isinstance(alpha, Tensor) and alpha.numel() != 1:
        raise ShapeError(f"alpha: expected a scalar, got shape {tuple(alpha.shape)}")


def han_layer_attention(
    features: Tensor, *, alpha: Tensor | float, attention_mask: Tensor | None = None, similarity: str = "dot"
) -> Tensor:
    """LAM: F'_j = α Σ_i W_ji F_i + F_j with W = softmax(F Fᵀ) (similarity "dot", the paper) or softmax(−F Fᵀ)
    ("negated", the official code) over the real layers; features (batch, L, dim) or (batch, L, *feature_shape),
    attention_mask (batch, L), True = real layer. Returns the features' shape."""
    _check_alpha(alpha, similarity)
    flat = _flat(features, attention_mask)
    energy = flat @ flat.transpose(1, 2)
    if similarity == "negated":
        energy = -energy
    if attention_mask is not None:
        keep = attention_mask[:, None, :].bool()
        energy = energy.masked_fill(~keep, -math.inf)
        weights = torch.softmax(energy, -1)
        weights = torch.where(keep.any(-1, keepdim=True), weights, torch.zeros_like(weights))
    else:
        weights = torch.softmax(energy, -1)
    a = alpha.to(features.dtype) if isinstance(alpha, Tensor) else alpha
    return (a * (weights @ flat)).reshape(features.shape) + features


def han_layer_attention_reference(
    features: Tensor, *, alpha: Tensor | float, attention_mask: Tensor | None = None, similarity: str = "dot"
) -> tuple[Tensor, Tensor]:
    """(out, W (batch, 1, L, L)) of `han_layer_attention` in float64: E_ji = ⟨F_j, F_i⟩ pair by pair, W_ji =
    exp(±E_ji − m_j) / Σ_i' exp(±E_ji' − m_j) over the real layers i (m_j the row maximum), 0 in rows without one."""
    _check_alpha(alpha, similarity)
    flat = _flat(features, attention_mask).double()
    b, layers = flat.shape[:2]
    sign = 1.0 if similarity == "dot" else -1.0
    weights = torch.zeros(b, 1, layers, layers, dtype=torch.float64, device=features.device)
    for z in range(b):
        real = [i for i in range(layers) if attention_mask is None or bool(attention_mask[z, i])]
        if not real:
            continue
        for j in range(layers):
            e = torch.stack([sign * torch.dot(flat[z, j], flat[z, i]) for i in real])
            p = torch.exp(e - e.max())
            weights[z, 0, j, real] = p / p.sum()
    a = alpha.double() if isinstance(alpha, Tensor) else alpha
    mixed = torch.einsum("bji,bid->bjd", weights[:, 0], flat)
    out = (a * mixed + flat).reshape(features.shape)
    return out.to(features.dtype), weights.to(features.dtype)


@register(
    name="han-layer-attention",
    paper=HAN,
    family="B",
    cost="O(L²·HWC)",
    exponent=2.0,
    supports=Supports(key_padding=True),
    params=(
        Param("alpha_init", float, 0.0, "α at initialisation (0 in the paper: LAM starts as the identity)"),
        Param("similarity", str, "dot", "'dot': W = softmax(F Fᵀ) (the paper); 'negated': softmax(−F Fᵀ) (the "
              "official code's max-subtracted energy)", choices=SIMILARITIES),
    ),
    summary="HAN's layer attention: the L stacked layer features F (L × HWC) attend to each other through "
            "W = softmax(F Fᵀ); F' = α·W F + F, α initialised at 0.",
    test_params={"alpha_init": 0.7},
    flops=han_layer_flops,
)
class HANLayerAttention(nn.Module):
    """LAM over stacked layer features x (batch, L, dim) or (batch, L, *feature_shape), dim = the features of one layer
    (H·W·C): x + α·W x with W = softmax(x xᵀ) over the layers; materialize is W (batch, 1, L, L)."""

    spec: ClassVar[Spec]

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        alpha_init: float = 0.0,
        similarity: str = "dot",
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        check_int("heads", heads)
        check_optional_int("head_dim", head_dim)
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias: expected a bool, got {qkv_bias!r}")
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)) or not math.isfinite(alpha_init):
            raise TypeError(f"alpha_init: expected a finite float, got {alpha_init!r}")
        self.similarity = check_choice("similarity", similarity, SIMILARITIES)
        self.heads = 1  # one layer-attention map
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def _layers(
        self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None, key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """x checked, and the keep-mask (batch, L) of the padding arguments."""
        check_tensor("x", x)
        if x.dim() < 3:
            raise ShapeError(f"x: expected a (batch, layers, dim) or (batch, layers, *feature_shape) tensor, got shape "
                             f"{tuple(x.shape)}")
        check_floating("x", x)
        features = math.prod(x.shape[2:])
        if x.dim() == 3 and features != self.dim:
            raise ShapeError(f"x: expected last dimension dim={self.dim}, got {x.shape[-1]} in shape {tuple(x.shape)}")
        if features != self.dim:
            raise ShapeError(f"x: expected features of dim={self.dim} values per layer (H·W·C), got "
                             f"{tuple(x.shape[2:])} = {features} in shape {tuple(x.shape)}")
        if 0 in x.shape[:2]:
            raise ShapeError(f"x: expected at least one batch element and one position on every axis, got shape "
                             f"{tuple(x.shape)} (the positions are the stacked layers)")
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            raise ValueError("context: han-layer-attention does not support cross-attention (the layers attend to "
                             "each other)")
        if attn_mask is not None:
            raise ValueError("attn_mask: han-layer-attention does not support an arbitrary attention mask (only "
                             "missing layers, as attention_mask)")
        return x, module_keep_mask(attention_mask, key_padding_mask, x.shape[0], x.shape[1])

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, L, dim) or (batch, L, *feature_shape) -> x + α·W x, the same shape; padding over the layers as
        attention_mask (batch, L), True = real, or key_padding_mask (batch, L), True = missing."""
        x, keep = self._layers(x, context, attention_mask, key_padding_mask, attn_mask)
        options = {"alpha": self.alpha, "attention_mask": keep, "similarity": self.similarity}
        if impl == "fast":
            return han_layer_attention(x, **options)  # type: ignore[arg-type]
        if impl == "reference":
            return han_layer_attention_reference(x, **options)[0]  # type: ignore[arg-type]
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """W (batch, 1, L, L): row j weighs the layers mixed into layer j (0 at missing layers)."""
        x, keep = self._layers(x, context, attention_mask, key_padding_mask, attn_mask)
        check_memory("materialize", (x.shape[0], 1, x.shape[1], x.shape[1]), 8)
        return han_layer_attention_reference(x, alpha=0.0, attention_mask=keep, similarity=self.similarity)[1]

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """α · W F, the output's part linear in the map W (batch, 1, L, L), in x's shape (for `capture(grads=True)`)."""
        flat = x.detach().reshape(*x.shape[:2], -1).to(weights.dtype)
        return (self.alpha.to(weights.dtype) * (weights[:, 0] @ flat)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, similarity={self.similarity!r}"
