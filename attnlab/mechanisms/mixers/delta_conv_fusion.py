"""ΔConvBlock, the pyramid convolution block of ΔConvFusion (Dong et al., "Can We Achieve Efficient Diffusion without
Self-Attention? Distilling Self-Attention into Convolutions", 2025), distilled from an attention layer.

The paper observes that the self-attention of pre-trained diffusion models is mostly local — its mass decays
with the distance from the query pixel — plus a weak, spatially flat component, and replaces each attention
layer by a ΔConvBlock: a pyramid of depthwise convolutions at several scales (the local part) and an average
pooling branch (the flat part), trained by MSE feature distillation to the frozen attention's output. On an
image x ∈ R^{H×W×C}, with h = x W_in + b_in:

    y_s = Up_s(DWConv^s_{k×k}(Pool_s(h)))          one pyramid stage per scale s ∈ S (default S = (1, 2, 4))
    g   = γ ⊙ mean_{H·W}(h)                         the average pooling branch, broadcast to every position
    out = (Σ_s y_s + g) W_out + b_out

Pool_s averages s×s blocks (the last block of an axis whose length s does not divide holds the remaining
positions and averages those), DWConv^s is a k×k depthwise convolution (zero padding, no bias) on the coarse
grid, and Up_s copies each coarse cell back to its s×s block (nearest upsampling). The receptive field of
stage s is s·k positions per axis: the pyramid mixes at growing distances at the cost of k² per cell.
Cost O(N·C·(k²·Σ_s 1/s² + C)): linear in the number of positions N = H·W.

Deviations (the paper gives the block in a figure, no code is public): the paper's stages carry a scaled
simple gate (a product of two depthwise-convolved halves) and its pooling branch a 1×1 convolution across
channels; here every stage is linear and the pooling branch a per-channel scale γ (the channel mixing is
W_out's), which keeps the block a token mixer linear in h with an exact (N, N) matrix per channel.

materialize. out = (M h) W_out + b_out with, per channel c, M_c = Σ_s U_s D^s_c P_s + γ_c/N · 11ᵀ ((N, N),
raster order; P_s, D^s_c, U_s the pooling, convolution and upsampling matrices). `materialize` returns M,
(batch, dim, N, N) (one head per channel: each has its own kernels; the same for every image of the batch);
`attention_path(x, M)` is (M h) W_out. Its rows do not sum to 1. heads, head_dim and qkv_bias have no effect.

Distillation. `distill(student, teacher, inputs, steps, lr)` fits the block (all its parameters) to a frozen
teacher's outputs on `inputs` by Adam on the mean squared error, the paper's feature distillation loss;
`attnlab.analysis.locality.attention_mass_by_distance` is the paper's locality analysis of the teacher's maps.

Masks: none (a convolution over an image: zero padding is its border rule), so attention_mask,
key_padding_mask and attn_mask are refused by name.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_finite, check_int, check_tensor
from ._image_mixer import ImageMixer, mix_channels

DELTA_CONV_FUSION = Paper(
    "P012", "Can We Achieve Efficient Diffusion without Self-Attention? Distilling Self-Attention into Convolutions",
    2025, "2504.21292",
)


def delta_conv_fusion_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the defaults (k = 3, S = (1, 2, 4)), C = heads·head_dim: projections 4NC², stages
    2NC·9·(1 + 1/4 + 1/16), pooling and upsampling ~3NC, the pooling branch 2NC."""
    c = heads * head_dim
    return 4.0 * n * c * c + 2.0 * n * c * 9 * (1 + 1 / 4 + 1 / 16) + 5.0 * n * c


def check_scales(scales: object) -> tuple[int, ...]:
    """A non-empty tuple of distinct positive ints (the pyramid's pooling factors)."""
    if not isinstance(scales, (tuple, list)) or not scales or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales
    ) or len(set(scales)) != len(scales):
        raise ParameterError(f"scales: expected a non-empty tuple of distinct positive ints, got {scales!r}")
    return tuple(scales)


def _check(h: Tensor, kernels: Sequence[Tensor], scales: Sequence[int], pool_scale: Tensor) -> None:
    """h (batch, H, W, C); one kernel (C, k, k) with k odd per scale; pool_scale (C,)."""
    check_tensor("h", h)
    if h.dim() != 4:
        raise ShapeError(f"h: expected (batch, H, W, C), got shape {tuple(h.shape)}")
    check_scales(tuple(scales))
    c = h.shape[-1]
    if len(kernels) != len(scales):
        raise ShapeError(f"kernels: expected one per scale ({len(scales)}), got {len(kernels)}")
    for t in kernels:
        check_tensor("kernels", t)
        if t.dim() != 3 or t.shape[0] != c or t.shape[1] != t.shape[2] or t.shape[1] % 2 == 0:
            raise ShapeError(f"kernels: expected shape ({c}, k, k) with k odd, got {tuple(t.shape)}")
    if tuple(check_tensor("pool_scale", pool_scale).shape) != (c,):
        raise ShapeError(f"pool_scale: expected shape ({c},), got {tuple(pool_scale.shape)}")


def delta_conv_fusion_mix(h: Tensor, kernels: Sequence[Tensor], scales: Sequence[int], pool_scale: Tensor) -> Tensor:
    """M h on h (batch, H, W, C): Σ_s Up_s(DWConv^s(Pool_s(h))) + γ ⊙ mean(h), kernels[i] (C, k, k) at scales[i]."""
    _check(h, kernels, scales, pool_scale)
    b, hh, ww, c = h.shape
    image = h.permute(0, 3, 1, 2)
    out = image.mean(dim=(2, 3), keepdim=True) * pool_scale.to(h.dtype)[:, None, None]
    for kernel, s in zip(kernels, scales):
        pad = (0, -ww % s, 0, -hh % s)
        sums = F.avg_pool2d(F.pad(image, pad), s, divisor_override=1)
        counts = F.avg_pool2d(F.pad(torch.ones_like(image[:1, :1]), pad), s, divisor_override=1)
        coarse = F.conv2d(sums / counts, kernel.to(h.dtype)[:, None], padding=kernel.shape[-1] // 2, groups=c)
        out = out + coarse.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)[:, :, :hh, :ww]
    return out.permute(0, 2, 3, 1)


def delta_conv_fusion_matrices(
    kernels: Sequence[Tensor], scales: Sequence[int], pool_scale: Tensor, grid: tuple[int, int]
) -> Tensor:
    """M (C, N, N) float64 from the formula: Σ_s U_s D^s_c P_s + γ_c/N · 11ᵀ, every matrix written entry by entry."""
    hh, ww = grid
    n, c = hh * ww, pool_scale.shape[0]
    total = pool_scale.double()[:, None, None] * torch.full((n, n), 1.0 / n, dtype=torch.float64, device=pool_scale.device)
    for kernel, s in zip(kernels, scales):
        ch, cw = -(-hh // s), -(-ww // s)
        pool = torch.zeros(ch * cw, n, dtype=torch.float64, device=pool_scale.device)
        up = torch.zeros(n, ch * cw, dtype=torch.float64, device=pool_scale.device)
        for y in range(hh):
            for x in range(ww):
                cell = (y // s) * cw + x // s
                rows, cols = min(s, hh - (y // s) * s), min(s, ww - (x // s) * s)
                pool[cell, y * ww + x] = 1.0 / (rows * cols)
                up[y * ww + x, cell] = 1.0
        size = kernel.shape[-1]
        r = size // 2
        conv = torch.zeros(c, ch * cw, ch * cw, dtype=torch.float64, device=pool_scale.device)
        for y in range(ch):
            for x in range(cw):
                for i in range(size):
                    for j in range(size):
                        u, v = y + i - r, x + j - r
                        if 0 <= u < ch and 0 <= v < cw:
                            conv[:, y * cw + x, u * cw + v] = kernel[:, i, j].double()
        total = total + up @ conv @ pool
    return total


def delta_conv_fusion_attention(
    x: Tensor, w_in: Tensor, b_in: Tensor, kernels: Sequence[Tensor], pool_scale: Tensor, w_out: Tensor, b_out: Tensor,
    *, scales: Sequence[int] = (1, 2, 4),
) -> Tensor:
    """ΔConvBlock on x (batch, H, W, C): (M (x W_inᵀ + b_in)) W_outᵀ + b_out, M the pyramid + pooling mix."""
    h = F.linear(x, w_in, b_in)
    return F.linear(delta_conv_fusion_mix(h, kernels, scales, pool_scale), w_out, b_out)


def delta_conv_fusion_attention_reference(
    x: Tensor, w_in: Tensor, b_in: Tensor, kernels: Sequence[Tensor], pool_scale: Tensor, w_out: Tensor, b_out: Tensor,
    *, scales: Sequence[int] = (1, 2, 4),
) -> tuple[Tensor, Tensor]:
    """(out, M) of `delta_conv_fusion_attention` in float64 from the explicit matrices: M (batch, C, N, N)."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected (batch, H, W, C), got shape {tuple(x.shape)}")
    b, hh, ww, c = x.shape
    h = x.double() @ w_in.double().T + b_in.double()
    _check(h, kernels, scales, pool_scale)
    m = delta_conv_fusion_matrices(kernels, scales, pool_scale, (hh, ww))
    mixed = torch.einsum("cnm,bmc->bnc", m, h.reshape(b, hh * ww, c))
    out = (mixed @ w_out.double().T + b_out.double()).reshape(b, hh, ww, -1)
    return out.to(x.dtype), m.expand(b, c, hh * ww, hh * ww).to(x.dtype)


@register(
    name="delta-conv-fusion",
    paper=DELTA_CONV_FUSION,
    family="B",
    cost="O(N·C·(k²·Σ_s s⁻² + C))",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    params=(
        Param("kernel_size", int, 3, "k, the depthwise kernel of every pyramid stage (odd)", low=1),
        Param("scales", tuple, (1, 2, 4), "the pyramid's pooling factors s (stage s sees s·k positions per axis)"),
    ),
    summary="ΔConvFusion ΔConvBlock: pyramid of depthwise convs at pooled scales + average-pooling branch, a "
            "replacement for self-attention fit by MSE distillation (`distill`); materialize = per-channel matrix.",
    normalized=False,
    test_params={"scales": (1, 2)},
    test_positions=(4, 5),
    flops=delta_conv_fusion_flops,
)
class DeltaConvBlock(ImageMixer):
    """ΔConvBlock on x (batch, H, W, dim): out = (M h) W_out + b_out, h = x W_in + b_in; materialize (batch, dim,
    N, N) is M (module docstring)."""

    mask_note = "a convolution over an image: zero padding is its border rule, no position can be removed"

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        scales: tuple[int, ...] = (1, 2, 4),
    ) -> None:
        super().__init__(dim)
        check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ParameterError(f"kernel_size: expected an odd size (a centred kernel), got {kernel_size}")
        self.scales = check_scales(scales)
        self.heads = dim  # materialize: one map per channel (the depthwise kernels are per channel)
        self.kernel_size = kernel_size
        self.proj_in = nn.Linear(dim, dim)
        bound = 1.0 / kernel_size  # nn.Conv2d's default bound 1/√fan_in, fan_in = k²
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.empty(dim, kernel_size, kernel_size).uniform_(-bound, bound)) for _ in self.scales
        )
        self.pool_scale = nn.Parameter(torch.zeros(dim))
        self.proj_out = nn.Linear(dim, dim)

    def _weights(self) -> dict[str, object]:
        return {"w_in": self.proj_in.weight, "b_in": self.proj_in.bias, "kernels": list(self.kernels),
                "pool_scale": self.pool_scale, "w_out": self.proj_out.weight, "b_out": self.proj_out.bias,
                "scales": self.scales}

    def mix_fast(self, x: Tensor) -> Tensor:
        return delta_conv_fusion_attention(x, **self._weights())  # type: ignore[arg-type]

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return delta_conv_fusion_attention_reference(x, **self._weights())  # type: ignore[arg-type]

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        """(M h) W_out: the output's part linear in M (without b_out)."""
        h = self.proj_in(x.to(self.proj_in.weight.dtype)).to(x.dtype)
        channels = torch.arange(self.dim, device=x.device)
        return mix_channels(weights, h, channels) @ self.proj_out.weight.T.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, scales={self.scales}"


def distill(student: nn.Module, teacher: nn.Module, inputs: Tensor, steps: int, lr: float) -> list[float]:
    """Fit `student` to the frozen `teacher` on `inputs` by Adam on MSE(student(x), teacher(x)), full batch, `steps`
    steps at learning rate `lr` (the paper's feature distillation): the loss before each step, then the final one."""
    check_tensor("inputs", inputs)
    check_finite("inputs", inputs)
    check_int("steps", steps, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ParameterError(f"lr: expected a finite positive number, got {lr!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ParameterError("student: expected a module with trainable parameters, got none")
    with torch.no_grad():
        target = teacher(inputs)
    optimizer = torch.optim.Adam(params, lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = student(inputs)
        if out.shape != target.shape:
            raise ShapeError(f"student: expected outputs of the teacher's shape {tuple(target.shape)}, "
                             f"got {tuple(out.shape)}")
        loss = F.mse_loss(out, target)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    with torch.no_grad():
        history.append(float(F.mse_loss(student(inputs), target)))
    return history
