"""Ultra-lightweight subspace attention, ULSAM (Saini et al., 2020).

The feature map F ∈ R^{H×W×C} is split along the channels into g groups (subspaces) F_1 … F_g;
each group gets one spatial attention map from its own tiny branch:

    A_n = softmax_{H·W}(PW^1(MaxPool_{3×3, stride 1}(DW_{1×1}(F_n))))     (one map per group, sums to 1 over positions)
    F̂_n = F_n ⊕ (A_n ⊗ F_n)                                              (A_n broadcast over the group's channels)
    F̂  = concat(F̂_1, …, F̂_g)

DW_{1×1} is a depthwise 1×1 convolution (a scale and a bias per channel), the max-pool keeps the
grid (padding 1, the padded cells never win: PyTorch's max-pool padding), PW^1 a pointwise 1×1
convolution from the group's channels to one map (weights and a bias), and the softmax runs over
all H·W positions of that map. The groups are the heads: g = heads. When g does not divide C the
groups are `torch.tensor_split`'s (the first C mod g groups one channel wider); the paper and the
official code take g | C. Weights are initialised as nn.Conv2d's (uniform ±1/√fan_in).

Official code (Nandan91/ULSAM) against the paper: it puts BatchNorm (momentum 0.9) + ReLU after
both 1×1 convolutions — per channel after DW, per group's map after PW — which the paper's
equations do not have. The default variant="paper" implements the equations; variant="code" adds
those stages. In training mode BatchNorm normalises with the batch's statistics, so an image's
map then depends on the other images of the batch (in eval mode, the running statistics: a fixed
affine map per channel).

materialize. Every token keeps its own features: per group, out = x + A x with A = diag(A_n), the
group's spatial map on the diagonal of an (N, N) matrix. `materialize` returns those matrices,
(batch, g, N, N) — the attention part, without the residual identity, as context-broadcasting's —
and `spatial_maps(x)` the maps themselves, (batch, g, H, W); `attention_path(x, A)` is A x.
A's diagonal sums to 1 (its rows do not).
The common parameters head_dim and qkv_bias have no effect (ULSAM has no q, k, v projections).

Masks: none. The softmax runs over the image's positions and the max-pool over neighbours; an
image grid has no padded positions to remove, so attention_mask, key_padding_mask and attn_mask are
refused by name.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice, check_int, check_tensor
from ._image_mixer import ImageMixer, mix_channels

Stage = Callable[[Tensor], Tensor]  # a map applied between the stages (the official code's BatchNorm + ReLU)

ULSAM = Paper("P049", "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
              2020, "1909.12400")


def ulsam_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per image, C = heads·head_dim: DW 2NC, max-pool 8NC, PW 2NC, softmax ~3Ng, gating 2NC."""
    c = heads * head_dim
    return 14.0 * n * c + 3.0 * n * heads


def group_sizes(channels: int, groups: int) -> list[int]:
    """The channel count of each of `groups` groups, torch.tensor_split's: the first channels mod groups one wider."""
    check_int("groups", groups, 1, channels, meaning=f"(at most the {channels} channels)")
    return [len(part) for part in torch.arange(channels).tensor_split(groups)]


def _check(x: Tensor, depthwise: Tensor, depthwise_bias: Tensor, pointwise: Tensor, pointwise_bias: Tensor,
           groups: int) -> list[int]:
    """x (batch, H, W, C); depthwise, depthwise_bias, pointwise (C,); pointwise_bias (groups,): the group sizes."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected (batch, H, W, C), got shape {tuple(x.shape)}")
    c = x.shape[-1]
    sizes = group_sizes(c, groups)
    for name, t, want in (("depthwise", depthwise, (c,)), ("depthwise_bias", depthwise_bias, (c,)),
                          ("pointwise", pointwise, (c,)), ("pointwise_bias", pointwise_bias, (groups,))):
        if tuple(check_tensor(name, t).shape) != want:
            raise ShapeError(f"{name}: expected shape {want} (C = {c}, {groups} groups), got {tuple(t.shape)}")
    return sizes


def ulsam_attention(
    x: Tensor,
    depthwise: Tensor,
    depthwise_bias: Tensor,
    pointwise: Tensor,
    pointwise_bias: Tensor,
    *,
    groups: int,
    after_depthwise: Stage | None = None,
    after_pointwise: Stage | None = None,
) -> Tensor:
    """ULSAM on x (batch, H, W, C): per channel group n, out = F_n + A_n ⊙ F_n with
    A_n = softmax_HW(PW(MaxPool3×3(DW(F_n)))); pointwise[c] weighs channel c in its group's map.

    after_depthwise / after_pointwise: maps applied to the DW output (batch, H, W, C) and to the PW
    logits (batch, H, W, groups) — the official code's BatchNorm + ReLU; None (the paper) = none."""
    sizes = _check(x, depthwise, depthwise_bias, pointwise, pointwise_bias, groups)
    b, h, w, c = x.shape
    features = x * depthwise + depthwise_bias
    if after_depthwise is not None:
        features = after_depthwise(features)
    pooled = F.max_pool2d(features.permute(0, 3, 1, 2), 3, stride=1, padding=1).permute(0, 2, 3, 1)
    weighted = (pooled * pointwise).split(sizes, dim=-1)
    logits = torch.stack([part.sum(-1) for part in weighted], -1) + pointwise_bias  # (batch, H, W, groups)
    if after_pointwise is not None:
        logits = after_pointwise(logits)
    maps = torch.softmax(logits.reshape(b, h * w, groups), dim=1).reshape(b, h, w, groups)
    group_of = torch.repeat_interleave(torch.arange(groups, device=x.device), torch.tensor(sizes, device=x.device))
    return x + x * maps[..., group_of]


def ulsam_attention_reference(
    x: Tensor,
    depthwise: Tensor,
    depthwise_bias: Tensor,
    pointwise: Tensor,
    pointwise_bias: Tensor,
    *,
    groups: int,
    after_depthwise: Stage | None = None,
    after_pointwise: Stage | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, A) of `ulsam_attention` in float64, group by group: A (batch, groups, N, N) = diag of each
    group's map (raster order), out = x + A x per group; cast back to x's dtype. The stages get float64."""
    sizes = _check(x, depthwise, depthwise_bias, pointwise, pointwise_bias, groups)
    b, h, w, c = x.shape
    x64 = x.double()
    features = x64 * depthwise.double() + depthwise_bias.double()
    if after_depthwise is not None:
        features = after_depthwise(features)
    logits = []
    start = 0
    for g, size in enumerate(sizes):
        part = slice(start, start + size)
        start += size
        rows = torch.full((b, 1, w, size), -math.inf, dtype=torch.float64, device=x.device)
        padded = torch.cat([rows, features[..., part], rows], 1)
        cols = torch.full((b, h + 2, 1, size), -math.inf, dtype=torch.float64, device=x.device)
        padded = torch.cat([cols, padded, cols], 2)  # −inf around the grid: a padded cell never wins the max
        neighbours = [padded[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
        pooled = torch.stack(neighbours).amax(0)  # the max over the in-grid 3×3 neighbours
        logits.append(torch.einsum("bhwc,c->bhw", pooled, pointwise[part].double()) + pointwise_bias[g].double())
    stacked = torch.stack(logits, -1)  # (batch, H, W, groups)
    if after_pointwise is not None:
        stacked = after_pointwise(stacked)
    outs, diagonals = [], []
    start = 0
    for g, size in enumerate(sizes):
        part = slice(start, start + size)
        start += size
        scores = torch.exp(stacked[..., g] - stacked[..., g].amax(dim=(1, 2), keepdim=True))
        attention = scores / scores.sum(dim=(1, 2), keepdim=True)  # A_n, (batch, H, W)
        outs.append(x64[..., part] + attention[..., None] * x64[..., part])
        diagonals.append(torch.diag_embed(attention.reshape(b, h * w)))
    out = torch.cat(outs, -1)
    return out.to(x.dtype), torch.stack(diagonals, 1).to(x.dtype)


def _bn_relu(norm: nn.BatchNorm2d) -> Stage:
    """ReLU(BatchNorm(t)) on channel-last t (batch, H, W, channels): the official code's stage."""
    return lambda t: F.relu(norm(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def _bn_relu64(norm: nn.BatchNorm2d) -> Stage:
    """`_bn_relu` in float64 written out: batch statistics (biased variance) in training, the running ones in eval;
    the running statistics are not updated."""

    def stage(t: Tensor) -> Tensor:
        if norm.training:
            mean, var = t.mean((0, 1, 2)), t.var((0, 1, 2), unbiased=False)
        else:
            assert norm.running_mean is not None and norm.running_var is not None
            mean, var = norm.running_mean.double(), norm.running_var.double()
        scaled = (t - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
        return torch.clamp_min(scaled, 0.0)

    return stage


@register(
    name="ulsam",
    paper=ULSAM,
    family="B",
    cost="O(N·C)",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    summary="ULSAM subspace attention: per channel group a spatial softmax map from DW 1×1 → max-pool 3×3 → PW "
            "1×1, out = x + map ⊙ x; materialize = diag(map) per group.",
    params=(
        Param("variant", str, "paper", "paper: the equations; code: BatchNorm + ReLU after both 1×1 convolutions, as "
              "the official code (train-mode BatchNorm mixes the batch)", choices=("paper", "code")),
    ),
    normalized=False,
    flops=ulsam_flops,
)
class SubspaceAttention(ImageMixer):
    """ULSAM on x (batch, H, W, dim): heads = g channel groups, each reweighted by its own spatial softmax map,
    out = x + A_n ⊙ x; materialize (batch, g, N, N) = diag(A_n)."""

    mask_note = "a softmax over the image's positions and a max-pool over neighbours: no position can be removed"

    def __init__(
        self, dim: int, heads: int = 8, *, head_dim: int | None = None, qkv_bias: bool = True, variant: str = "paper"
    ) -> None:
        super().__init__(dim)
        self.variant = check_choice("variant", variant, ("paper", "code"))
        self.heads = check_int("heads", heads, 1, dim, meaning=f"(channel groups, at most dim = {dim})")
        self.sizes = group_sizes(dim, heads)
        self.depthwise = nn.Parameter(torch.empty(dim).uniform_(-1.0, 1.0))  # fan_in 1
        self.depthwise_bias = nn.Parameter(torch.empty(dim).uniform_(-1.0, 1.0))
        bound = torch.tensor([1.0 / math.sqrt(s) for s in self.sizes])  # fan_in: the group's channels
        self.pointwise = nn.Parameter(torch.repeat_interleave(bound, torch.tensor(self.sizes)) * (2 * torch.rand(dim) - 1))
        self.pointwise_bias = nn.Parameter(bound * (2 * torch.rand(heads) - 1))
        # the official code: BatchNorm2d(momentum 0.9) + ReLU after DW (per channel) and PW (per group's map)
        self.depthwise_norm = nn.BatchNorm2d(dim, momentum=0.9) if variant == "code" else None
        self.pointwise_norm = nn.BatchNorm2d(heads, momentum=0.9) if variant == "code" else None

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.depthwise, self.depthwise_bias, self.pointwise, self.pointwise_bias

    def mix_fast(self, x: Tensor) -> Tensor:
        if self.depthwise_norm is None or self.pointwise_norm is None:
            return ulsam_attention(x, *self._weights(), groups=self.heads)
        return ulsam_attention(x, *self._weights(), groups=self.heads, after_depthwise=_bn_relu(self.depthwise_norm),
                               after_pointwise=_bn_relu(self.pointwise_norm))

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.depthwise_norm is None or self.pointwise_norm is None:
            return ulsam_attention_reference(x, *self._weights(), groups=self.heads)
        return ulsam_attention_reference(
            x, *self._weights(), groups=self.heads, after_depthwise=_bn_relu64(self.depthwise_norm),
            after_pointwise=_bn_relu64(self.pointwise_norm),
        )

    def spatial_maps(self, x: Tensor) -> Tensor:
        """The g spatial maps A_n (batch, g, H, W), each summing to 1 over the positions."""
        a = self.materialize(x)
        return torch.diagonal(a, dim1=-2, dim2=-1).reshape(*a.shape[:2], *x.shape[1:3])

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        """A x per group (out = x + A x)."""
        group_of = torch.repeat_interleave(torch.arange(self.heads, device=x.device), torch.tensor(self.sizes, device=x.device))
        return mix_channels(weights, x, group_of)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.heads}, variant={self.variant!r}"
