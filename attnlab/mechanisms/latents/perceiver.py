"""Perceiver (Jaegle et al., "Perceiver: General Perception with Iterative Attention", 2021): a learned latent
array reads the inputs by cross-attention, then latent self-attention processes it; the pair repeats.

With inputs X ∈ R^{N×C} (C = dim, plus the Fourier position features when `fourier_bands` > 0) and learned
latents Z⁰ ∈ R^{M×D} (M = `num_latents` ≪ N, D = dim):

    Z ← Z + W_o softmax((LN(Z) W_q)(LN'(X) W_k)ᵀ / √d) (LN'(X) W_v)     latent cross-attention, cost O(M·N)
    Z ← Z + MLP(LN Z)
    L times (`latent_layers`):  Z ← Z + MHSA(LN Z);  Z ← Z + MLP(LN Z)   latent transformer, cost O(M²)
    the pair repeated `depth` times; out = Z (batch, M, D), the latent array (classification: mean over M).

Weight sharing (the paper's "iterative attention" with shared weights): with `share_weights` the first
repeat has its own weights and repeats 2..depth share one set (as the paper, which found sharing the first
cross-attention unstable, and perceiver-pytorch's `weight_tie_layers`); `share_weights=False` gives every repeat
its own. The cross-attention has `heads` heads (the paper: 1), the latent self-attention `latent_heads` (8).

Fourier position features (`fourier_features`): a position x_a ∈ [−1, 1] on each of the input's axes gives
[sin(π f_k x_a)]_k, [cos(π f_k x_a)]_k and x_a, with K = `fourier_bands` frequencies f_k spaced equally (linearly)
between 1 and μ/2 (μ = `max_freq`, the Nyquist frequency of the sampling); they are concatenated to the input
channels, C = dim + axes·(2K + 1). Positions: the input's grid (batch, *grid, dim) sampled by `grid_positions`
(linspace(−1, 1) per axis, as the paper and perceiver-pytorch), or given to `forward(x, positions=...)`.
With the default `fourier_bands=0` the Perceiver has no position input and is a set function: permuting the
tokens leaves the latents unchanged (`order_invariant`; what the conformance suite checks). Grid positions
count padded tokens: pass `positions` to place a padded sequence's real tokens where its unpadded form has them.

Deviations and defaults. The MLP is the paper's GELU MLP (hidden `mlp_ratio`·D); `feedforward="geglu"` is
perceiver-pytorch's GEGLU. W_q, W_k, W_v have no bias (`qkv_bias`, as perceiver-pytorch), W_o has one. Latents
initialised N(0, 1) as perceiver-pytorch (the paper: truncated normal, scale 0.02). Padded tokens are no keys;
a sample with no real token gets a zero cross-attention read (its latents then depend on no token).
`materialize` returns the last repeat's cross-attention weights (batch, heads, M, N); `attention_maps` all of them.
No N×N tensor is ever formed: the largest intermediate of the fast path is the (batch, heads, M, N) logits.
"""
from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.memory import check_memory
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_finite, check_tensor
from ..pooling.base import AttentionPooling, Impl
from ..pooling.common import check_pooling_qkv
from ._common import (
    CrossAttention,
    FeedForward,
    Feedforward,
    LatentLayer,
    check_positive_int,
    cross_attention_core,
    softmax64,
)

PERCEIVER = Paper("P151", "Perceiver: General Perception with Iterative Attention", 2021, "2103.03206")


def fourier_features(pos: Tensor, bands: int, max_freq: float) -> Tensor:
    """Perceiver's position encoding: pos (..., axes) in [−1, 1] -> (..., axes·(2·bands + 1)); per axis
    [sin(π f_k x)]_{k<bands}, [cos(π f_k x)]_{k<bands}, x, with f_k = linspace(1, max_freq/2, bands)."""
    pos = check_tensor("pos", pos)
    if not pos.is_floating_point():
        raise TypeError(f"pos: expected a floating-point tensor, got {pos.dtype}")
    if pos.dim() < 1:
        raise ShapeError(f"pos: expected a tensor (..., axes), got shape {tuple(pos.shape)}")
    check_positive_int("bands", bands)
    if not isinstance(max_freq, (int, float)) or isinstance(max_freq, bool) or max_freq < 2:
        raise ParameterError(f"max_freq: expected a number >= 2 (the top band is max_freq/2 >= 1), got {max_freq!r}")
    freqs = torch.linspace(1.0, max_freq / 2, bands, dtype=pos.dtype, device=pos.device)
    angles = math.pi * pos.unsqueeze(-1) * freqs  # (..., axes, bands)
    per_axis = torch.cat([angles.sin(), angles.cos(), pos.unsqueeze(-1)], -1)  # (..., axes, 2·bands + 1)
    return per_axis.flatten(-2)


def grid_positions(grid: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Positions (*grid, axes) of a grid's cells, linspace(−1, 1, size) on each axis (row-major, 'ij')."""
    axes = [torch.linspace(-1.0, 1.0, size, dtype=dtype, device=device) for size in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def perceiver_attention(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """Latent cross-attention softmax(q kᵀ/√d) v: q (batch, heads, M, d) latent queries, k, v (batch, heads, N, d),
    attention_mask (batch, N) True = real token; O(M·N) memory (never N×N). A latent with no real token reads 0."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    return cross_attention_core(q, k, v, attention_mask)


def perceiver_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, M, N)) of `perceiver_attention` in float64 by einsum and exp/sum."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / math.sqrt(q.shape[-1])
    keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    w = softmax64(logits, keep)
    return torch.einsum("bhij,bhjd->bhid", w, v.double()).to(v.dtype), w.to(v.dtype)


class PerceiverRepeat(nn.Module):
    """One repeat: latent cross-attention + MLP, then `latent_layers` × (latent self-attention + MLP)."""

    def __init__(
        self, dim: int, context_dim: int, heads: int, latent_heads: int, latent_layers: int, hidden: int,
        feedforward: Feedforward, qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.cross = CrossAttention(dim, context_dim, heads, dim // heads, qkv_bias=qkv_bias)
        self.cross_ff = FeedForward(dim, hidden, feedforward)
        self.latent = nn.ModuleList(
            LatentLayer(dim, latent_heads, dim // latent_heads, hidden, feedforward, qkv_bias=qkv_bias)
            for _ in range(latent_layers)
        )

    def forward(self, z: Tensor, context: Tensor, keep: Tensor | None) -> Tensor:
        z = z + self.cross(z, context, keep)
        z = z + self.cross_ff(z)
        for layer in cast("list[LatentLayer]", list(self.latent)):
            z = layer(z)
        return z

    def reference(self, z: Tensor, context: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        read, weights = self.cross.reference(z, context, keep)
        z = z.double() + read
        z = z + self.cross_ff.reference(z)
        for layer in cast("list[LatentLayer]", list(self.latent)):
            z = layer.reference(z)[0]
        return z, weights


def perceiver_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Matmul FLOPs of one sample at the default parameters (M = 64 latents, depth 2, 2 latent layers, MLP 4·D, no
    Fourier features), width D = heads·head_dim: per repeat the cross-attention 4·N·D² (W_k, W_v) + 4·M·D² (W_q,
    W_o) + 4·M·N·D (logits, mixing) and its MLP 16·M·D², per latent layer 8·M·D² + 4·M²·D + 16·M·D²."""
    d, m, depth, layers = heads * head_dim, 64, 2, 2
    cross = 4.0 * n * d * d + 4.0 * m * d * d + 4.0 * m * n * d + 16.0 * m * d * d
    latent = 8.0 * m * d * d + 4.0 * m * m * d + 16.0 * m * d * d
    return depth * (cross + layers * latent)


@register(
    name="perceiver",
    kind="pooling",
    paper=PERCEIVER,
    family="B",
    cost="O(depth·(M N d + L M² d))",
    exponent=1.0,
    supports=Supports(key_padding=True, order_invariant=True),
    params=(
        Param("num_latents", int, 64, "M, the number of learned latents (the output rows)", low=1),
        Param("heads", int, 1, "heads of the latent cross-attention (the paper: 1); a divisor of dim", low=1),
        Param("latent_heads", int, 8, "heads of the latent self-attention; a divisor of dim", low=1),
        Param("depth", int, 2, "repeats of cross-attention + latent stack", low=1),
        Param("latent_layers", int, 2, "latent self-attention layers per repeat", low=0),
        Param("share_weights", bool, True, "repeats 2..depth share one set of weights (the first has its own)"),
        Param("fourier_bands", int, 0, "K Fourier position bands per axis (0: no position features, a set function)", low=0),
        Param("max_freq", float, 10.0, "μ, the top frequency is μ/2 (with fourier_bands > 0)", low=2.0),
        Param("input_axes", int, 1, "axes of the input grid the Fourier features encode (with fourier_bands > 0)", low=1),
        Param("mlp_ratio", int, 4, "MLP hidden width = mlp_ratio·dim", low=1),
        Param("feedforward", str, "gelu", "'gelu' MLP (the paper) or 'geglu' (perceiver-pytorch)", choices=("gelu", "geglu")),
        Param("qkv_bias", bool, False, "bias in W_q, W_k, W_v (perceiver-pytorch: none)"),
    ),
    summary="Perceiver: M learned latents cross-attend to the N inputs, then a latent self-attention stack; repeated",
    test_params={"num_latents": 4, "latent_heads": 2, "depth": 3, "latent_layers": 1},
    flops=perceiver_flops,
)
class Perceiver(AttentionPooling):
    """Latent array Z (M, dim) read from the inputs by cross-attention, processed by latent self-attention."""

    def __init__(
        self, dim: int, *, num_latents: int = 64, heads: int = 1, latent_heads: int = 8, depth: int = 2,
        latent_layers: int = 2, share_weights: bool = True, fourier_bands: int = 0, max_freq: float = 10.0,
        input_axes: int = 1, mlp_ratio: int = 4, feedforward: Feedforward = "gelu", qkv_bias: bool = False,
    ) -> None:
        super().__init__(dim, heads)
        self.num_latents = check_positive_int("num_latents", num_latents)
        check_positive_int("depth", depth)
        check_positive_int("latent_layers", latent_layers, 0)
        check_positive_int("fourier_bands", fourier_bands, 0)
        check_positive_int("input_axes", input_axes)
        check_positive_int("mlp_ratio", mlp_ratio)
        if check_positive_int("latent_heads", latent_heads) and dim % latent_heads:
            raise ParameterError(f"latent_heads: expected a divisor of dim={dim}, got {latent_heads}")
        if fourier_bands and (not isinstance(max_freq, (int, float)) or max_freq < 2):
            raise ParameterError(f"max_freq: expected a number >= 2, got {max_freq!r}")
        self.depth, self.share_weights = depth, share_weights
        self.fourier_bands, self.max_freq, self.input_axes = fourier_bands, float(max_freq), input_axes
        context_dim = dim + (input_axes * (2 * fourier_bands + 1) if fourier_bands else 0)
        self.latents = nn.Parameter(torch.randn(num_latents, dim))

        def repeat() -> PerceiverRepeat:
            return PerceiverRepeat(dim, context_dim, heads, latent_heads, latent_layers, mlp_ratio * dim, feedforward, qkv_bias)

        self.first = repeat()
        self.rest = nn.ModuleList([repeat()] if share_weights else [repeat() for _ in range(depth - 1)])

    @property
    def queries(self) -> int:
        return self.num_latents

    def repeats(self) -> list[PerceiverRepeat]:
        """The depth repeats in order (the shared one listed depth − 1 times)."""
        rest: list[PerceiverRepeat] = [r for r in self.rest if isinstance(r, PerceiverRepeat)]
        later = rest[:1] * (self.depth - 1) if self.share_weights else rest
        return [self.first, *later]

    def context(self, x: Tensor, grid: tuple[int, ...], positions: Tensor | None) -> Tensor:
        """The cross-attention's keys/values input: x (batch, n, dim), with the Fourier features of `positions`
        ((n, axes) or (batch, n, axes); default the grid's) concatenated when fourier_bands > 0."""
        if not self.fourier_bands:
            if positions is not None:
                raise ValueError("positions: expected None with fourier_bands=0 (no position features), got a tensor")
            return x
        b, n = x.shape[:2]
        if positions is None:
            if len(grid) != self.input_axes:
                raise ShapeError(f"x: expected {self.input_axes} position axes (input_axes), got grid {grid}")
            positions = grid_positions(grid, dtype=x.dtype, device=x.device).reshape(n, self.input_axes)
        positions = check_tensor("positions", positions)
        if positions.dim() == 2:
            positions = positions.expand(b, *positions.shape)
        if positions.shape != (b, n, self.input_axes):
            raise ShapeError(f"positions: expected (n, axes) or (batch, n, axes) = {(b, n, self.input_axes)}, got {tuple(positions.shape)}")
        if positions.dtype != x.dtype:
            raise TypeError(f"positions: expected dtype {x.dtype} (the input's), got {positions.dtype}")
        check_finite("positions", positions)
        return torch.cat([x, fourier_features(positions, self.fourier_bands, self.max_freq)], -1)

    def _fast(self, context: Tensor, keep: Tensor | None) -> Tensor:
        z = self.latents.expand(context.shape[0], *self.latents.shape)
        for block in self.repeats():
            z = block(z, context, keep)
        return z

    def _reference(self, context: Tensor, keep: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        z = self.latents.double().expand(context.shape[0], *self.latents.shape)
        maps = []
        for block in self.repeats():
            z, w = block.reference(z, context.double(), keep)
            maps.append(w.to(context.dtype))
        return z.to(context.dtype), maps

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self._fast(self.context(x, (x.shape[1],), None), keep)

    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        z, maps = self._reference(self.context(x, (x.shape[1],), None), keep)
        return z, maps[-1]

    def forward(
        self, x: Tensor, *, positions: Tensor | None = None, attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None, impl: Impl = "fast",
    ) -> Tensor:
        """Tokens (batch, *grid, dim) -> latents (batch, M, dim); `positions` (n, axes) / (batch, n, axes) in [−1, 1]
        for the Fourier features (default: the grid's)."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        grid = tuple(check_tensor("x", x).shape[1:-1])
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        context = self.context(flat, grid, positions)
        if impl == "fast":
            return self._fast(context, keep)
        check_memory("impl='reference'", (flat.shape[0], self.heads, self.queries, flat.shape[1]), 8)
        return self._reference(context, keep)[0]

    def attention_maps(
        self, x: Tensor, *, positions: Tensor | None = None, attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> list[Tensor]:
        """The cross-attention weights (batch, heads, M, N) of every repeat, in order."""
        grid = tuple(check_tensor("x", x).shape[1:-1])
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        check_memory("attention_maps", (self.depth, flat.shape[0], self.heads, self.queries, flat.shape[1]), 8)
        return self._reference(self.context(flat, grid, positions), keep)[1]

    def materialize(
        self, x: Tensor, *, positions: Tensor | None = None, attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """The last repeat's cross-attention weights (batch, heads, M, N) of the latents over the tokens."""
        return self.attention_maps(x, positions=positions, attention_mask=attention_mask, key_padding_mask=key_padding_mask)[-1]
