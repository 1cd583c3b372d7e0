"""HAN's channel-spatial attention module, CSAM (Niu et al., "Single Image Super-Resolution via a Holistic Attention
Network", 2020).

The feature map F ∈ R^{H × W × C} of HAN's last layer is seen as a one-channel 3-D volume over (C, H, W); a 3-D
convolution (one 3 × 3 × 3 kernel, stride 1, zero padding 1, a bias) and a sigmoid give one attention value per
channel and position, and a learned scale β (initialised at 0) adds the attended map back to the input:

    M = σ(Conv3D(F)) ∈ R^{C × H × W}          (the kernel slides over channels as over rows and columns)
    F' = β · (M ⊙ F) + F

which is the official code's x · (β·σ(Conv3d(x))) + x (wwlCape/HAN, `CSAM_Module`). `kernel_size` (odd, 3 in the
paper) sets the cube's side, padding (kernel_size − 1)/2 keeping the shape.

Input: an image grid (batch, H, W, C), dim = C (`Supports(grids=(2,))`). CSAM mixes tokens only in making M (the
kernel reads the 3 × 3 neighbourhood of every position and channel); the values are not mixed: as a token mixer it
is a per-channel diagonal. `materialize` is that matrix, (batch, C, N, N) with A[b, c, n, n] = M[b, c, n] and 0 off
the diagonal, one "head" per channel (each channel has its own map), so that out[b, n, c] = x[b, n, c] + β ·
Σ_m A[b, c, n, m]·x[b, m, c]; its size grows as C·N², so it is for small inputs. The common parameters heads,
head_dim and qkv_bias are accepted and have no effect (no projections; the module's `heads` is C). No mask: a zero
padding of the convolution is the only border rule, and an image has no padded positions here; no causal mode.

Fast path: torch's conv3d. Reference: the convolution written as the sum over the kernel's offsets of the shifted,
zero-padded volume, float64. The layer attention module of the same paper is the entry `han-layer-attention`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_int,
    check_odd,
    check_optional_int,
    check_tensor,
)
from ._image_mixer import ImageMixer, mix_channels

HAN = Paper("P113", "Single Image Super-Resolution via a Holistic Attention Network", 2020, "2008.08767")


def han_channel_spatial_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per image: the 3 × 3 × 3 convolution (2·27 per value), sigmoid, product and sum (≈ 60·N·C)."""
    return 60.0 * n * heads * head_dim


def _check(x: Tensor, weight: Tensor, bias: Tensor | None) -> int:
    check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected (batch, H, W, C), got shape {tuple(x.shape)}")
    check_tensor("weight", weight)
    side = weight.shape[-1]
    if weight.shape != (side, side, side) or side % 2 == 0:
        raise ShapeError(f"weight: expected an odd cube (k, k, k), got shape {tuple(weight.shape)}")
    if bias is not None and bias.numel() != 1:
        raise ShapeError(f"bias: expected a scalar, got shape {tuple(bias.shape)}")
    return side


def han_channel_spatial_attention(
    x: Tensor, *, weight: Tensor, bias: Tensor | None, beta: Tensor | float
) -> Tensor:
    """CSAM: x + β·σ(Conv3D(x)) ⊙ x on x (batch, H, W, C), the kernel `weight` (k, k, k) over (C, H, W) with zero
    padding (k − 1)/2 and a scalar `bias`."""
    side = _check(x, weight, bias)
    volume = x.permute(0, 3, 1, 2)[:, None]  # (batch, 1, C, H, W)
    logits = F.conv3d(volume, weight[None, None].to(x.dtype), None if bias is None else bias.reshape(1).to(x.dtype),
                      padding=side // 2)
    gate = torch.sigmoid(logits[:, 0].permute(0, 2, 3, 1))
    b = beta.to(x.dtype) if isinstance(beta, Tensor) else beta
    return x + b * gate * x


def han_channel_spatial_attention_reference(
    x: Tensor, *, weight: Tensor, bias: Tensor | None, beta: Tensor | float
) -> tuple[Tensor, Tensor]:
    """(out, M (batch, C, H, W)) of `han_channel_spatial_attention` in float64: M = σ(b + Σ_{offsets o} K[o] ·
    x̃[(c, h, w) + o − p]) with x̃ the volume zero-padded by p = (k − 1)/2 on every side."""
    side = _check(x, weight, bias)
    p = side // 2
    volume = x.double().permute(0, 3, 1, 2)  # (batch, C, H, W)
    c, h, w = volume.shape[1:]
    padded = torch.zeros(volume.shape[0], c + 2 * p, h + 2 * p, w + 2 * p, dtype=torch.float64, device=x.device)
    padded[:, p : p + c, p : p + h, p : p + w] = volume
    logits = torch.zeros_like(volume) + (0.0 if bias is None else bias.double().reshape(()))
    for i in range(side):
        for j in range(side):
            for m in range(side):
                logits = logits + weight[i, j, m].double() * padded[:, i : i + c, j : j + h, m : m + w]
    gate = torch.sigmoid(logits)
    b = beta.double() if isinstance(beta, Tensor) else beta
    out = volume + b * gate * volume
    return out.permute(0, 2, 3, 1).to(x.dtype), gate.to(x.dtype)


@register(
    name="han-channel-spatial",
    paper=HAN,
    family="B",
    cost="O(N·C·k³)",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    params=(
        Param("kernel_size", int, 3, "side k of the 3-D kernel over (C, H, W) (odd; 3 in the paper)", low=1),
        Param("beta_init", float, 0.0, "β at initialisation (0 in the paper: CSAM starts as the identity)"),
    ),
    normalized=False,
    summary="HAN's channel-spatial attention: M = σ(Conv3D(F)) over the (C, H, W) volume, F' = β·(M ⊙ F) + F, "
            "β initialised at 0.",
    test_params={"beta_init": 0.6},
    flops=han_channel_spatial_flops,
)
class HANChannelSpatialAttention(ImageMixer):
    """CSAM on an image (batch, H, W, C): x + β·σ(Conv3D(x)) ⊙ x; materialize is the per-channel diagonal
    (batch, C, N, N) holding M."""

    mask_note = "every position of the image is real"

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        beta_init: float = 0.0,
    ) -> None:
        super().__init__(dim)
        check_int("heads", heads)
        check_optional_int("head_dim", head_dim)
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias: expected a bool, got {qkv_bias!r}")
        if isinstance(beta_init, bool) or not isinstance(beta_init, (int, float)) or not math.isfinite(beta_init):
            raise TypeError(f"beta_init: expected a finite float, got {beta_init!r}")
        self.kernel_size = check_odd("kernel_size", kernel_size)
        self.heads = self.dim  # one diagonal map per channel
        conv = nn.Conv3d(1, 1, self.kernel_size)  # torch's default init, as the official module
        self.weight = nn.Parameter(conv.weight.detach()[0, 0].clone())
        self.bias = nn.Parameter(conv.bias.detach().reshape(()).clone())  # type: ignore[union-attr]
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def mix_fast(self, x: Tensor) -> Tensor:
        """x + β·σ(Conv3D(x)) ⊙ x."""
        return han_channel_spatial_attention(x, weight=self.weight, bias=self.bias, beta=self.beta)  # type: ignore[arg-type]

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(out, A): A (batch, C, N, N) = diag(M[b, c]) per channel c, raster order; out = x + β·A x per channel."""
        out, m = han_channel_spatial_attention_reference(x, weight=self.weight, bias=self.bias, beta=self.beta)  # type: ignore[arg-type]
        b, n = x.shape[0], x.shape[1] * x.shape[2]
        return out, torch.diag_embed(m.reshape(b, self.dim, n))

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        """β·A x per channel: the part of the output linear in A."""
        return self.beta.to(weights.dtype) * mix_channels(weights, x, torch.arange(self.dim, device=x.device))

    def gate(self, x: Tensor) -> Tensor:
        """M = σ(Conv3D(x)), (batch, C, H, W)."""
        x = self.checked(x, None, None, None, None)
        return han_channel_spatial_attention_reference(x, weight=self.weight, bias=self.bias, beta=0.0)[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
