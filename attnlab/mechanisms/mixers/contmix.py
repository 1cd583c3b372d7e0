"""ContMix, the context-mixing dynamic convolution of OverLoCK (Lou & Yu, "OverLoCK: An Overview-first-Look-Closely-next
ConvNet with Context-Mixing Dynamic Kernels", 2025).

Each token gets its own k×k depthwise kernel, generated from its affinity with a few region tokens that
summarise the whole image. On an image with queries, keys and values Q, K, V ∈ R^{H×W×C} (linear
projections of x), channels split into g groups (the heads):

    R   = AdaptiveAvgPool_{r×r}(K)                          region tokens, r² of them (PyTorch's bins)
    a_i = (q_i^(h) · R_j^(h))_{j=1..r²} / √d_h              affinity of token i with every region, per group h
    w_i = softmax_{k²}(a_i W + b)                            W ∈ R^{r²×k²}, b ∈ R^{k²}: one kernel per token and group
    o_i = Σ_{t ∈ k×k} w_{i,t}^(h) v_{i+δ_t}^(h)              dynamic depthwise convolution (zero padding)
    out = o W_o + b_o

Every token's kernel sums to 1 over its k² taps (the softmax). The adaptive average pool uses PyTorch's bins
(region j of an axis of length L covers ⌊jL/r⌋ … ⌈(j+1)L/r⌉ − 1), so r may exceed the grid (bins then overlap).
Cost O(N·C·(r² + k²) + N·C²): linear in the number of positions N = H·W.

Against the official code (LMMMEng/OverLoCK, `DynamicConvBlock`): it splits the channels in two halves with
two kernels (7×7 and 5×5, the 1×1 convolution emitting k² + k_s² logits), adds relative position biases to
the logits, takes the keys (and so the region tokens) from the top-down context features of its Overview-Net,
and applies the kernels with NATTEN's `na2d_av`, whose windows are shifted inward at the border. Here: one
kernel size for all channels, no position bias, keys from x, and a zero-padded convolution (taps off the grid
read zeros, so a border token's kernel keeps its weight 1 but part of it reads nothing). The scale 1/√d_h on
the affinity follows the code.

materialize. ContMix is linear in V: per group h, o^(h) = A^(h) V^(h) with A^(h) (N, N) holding token n's kernel
tap w_{n,t} at m = n + δ_t (raster order; taps off the grid dropped). `materialize` returns A, (batch, heads,
N, N); `attention_path(x, A)` is (A V) W_o (the output without b_o). Interior rows sum to 1, border rows to
the part of the kernel on the grid. `kernels(x)` returns w itself, (batch, heads, H, W, k, k).

Masks: none (a convolution over an image has no position to remove: zero padding is its border rule), so
attention_mask, key_padding_mask and attn_mask are refused by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_int, check_tensor
from ._image_mixer import ImageMixer, mix_channels
from .ulsam import group_sizes

OVERLOCK = Paper("P240", "OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
                 2025, "2502.20087")


def contmix_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the defaults (k = 7, r = 7), C = heads·head_dim: projections 8NC², affinity 2NC·49,
    kernel logits 2N·heads·49·49, softmax ~3N·heads·49, convolution 2NC·49."""
    c = heads * head_dim
    return 8.0 * n * c * c + 2.0 * n * c * 49 * 2 + 2.0 * n * heads * 49 * 49 + 3.0 * n * heads * 49


def _check(q: Tensor, k: Tensor, v: Tensor, kernel_weight: Tensor, kernel_bias: Tensor, heads: int,
           kernel_size: int, region_size: int) -> list[int]:
    """q, k, v (batch, H, W, C); kernel_weight (r², k²), kernel_bias (k²,); k odd: the group sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected (batch, H, W, C), got shape {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ShapeError(f"k, v: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ParameterError(f"kernel_size: expected an odd size (a centred kernel), got {kernel_size}")
    check_int("region_size", region_size, 1)
    want = (region_size**2, kernel_size**2)
    if tuple(check_tensor("kernel_weight", kernel_weight).shape) != want:
        raise ShapeError(f"kernel_weight: expected shape {want} (r², k²), got {tuple(kernel_weight.shape)}")
    if tuple(check_tensor("kernel_bias", kernel_bias).shape) != want[1:]:
        raise ShapeError(f"kernel_bias: expected shape {want[1:]} (k²,), got {tuple(kernel_bias.shape)}")
    return group_sizes(q.shape[-1], heads)


def contmix_kernels(
    q: Tensor, k: Tensor, kernel_weight: Tensor, kernel_bias: Tensor, *, heads: int, kernel_size: int,
    region_size: int,
) -> Tensor:
    """w = softmax_{k²}((q·AdaptiveAvgPool_{r×r}(k) / √d_h) W + b) per token and channel group:
    (batch, heads, H, W, k, k), each kernel summing to 1. q, k (batch, H, W, C)."""
    sizes = _check(q, k, k, kernel_weight, kernel_bias, heads, kernel_size, region_size)
    b, h, w, c = q.shape
    regions = F.adaptive_avg_pool2d(k.permute(0, 3, 1, 2), region_size).flatten(2)  # (batch, C, r²)
    group_of = torch.repeat_interleave(torch.arange(heads, device=q.device), torch.tensor(sizes, device=q.device))
    scale = torch.tensor(sizes, dtype=q.dtype, device=q.device).rsqrt()[group_of]
    member = F.one_hot(group_of, heads).to(q.dtype) * scale[:, None]  # (C, heads): 1/√d_h on the group's channels
    affinity = torch.einsum("bnc,bcr,cg->bgnr", q.reshape(b, h * w, c), regions, member)
    logits = affinity @ kernel_weight.to(q.dtype) + kernel_bias.to(q.dtype)
    return torch.softmax(logits, dim=-1).reshape(b, heads, h, w, kernel_size, kernel_size)


def contmix_attention(
    q: Tensor, k: Tensor, v: Tensor, kernel_weight: Tensor, kernel_bias: Tensor, *, heads: int, kernel_size: int = 7,
    region_size: int = 7,
) -> Tensor:
    """ContMix on q, k, v (batch, H, W, C): o_i = Σ_t w_{i,t} v_{i+δ_t} per channel group with the kernels of
    `contmix_kernels` (zero padding): (batch, H, W, C), before the output projection."""
    sizes = _check(q, k, v, kernel_weight, kernel_bias, heads, kernel_size, region_size)
    b, h, w, c = v.shape
    kernels = contmix_kernels(q, k, kernel_weight, kernel_bias, heads=heads, kernel_size=kernel_size,
                              region_size=region_size).reshape(b, heads, h * w, kernel_size**2)
    taps = F.unfold(v.permute(0, 3, 1, 2), kernel_size, padding=kernel_size // 2)  # (batch, C·k², N)
    taps = taps.reshape(b, c, kernel_size**2, h * w)
    group_of = torch.repeat_interleave(torch.arange(heads, device=v.device), torch.tensor(sizes, device=v.device))
    per_channel = kernels[:, group_of]  # (batch, C, N, k²)
    return torch.einsum("bctn,bcnt->bnc", taps, per_channel).reshape(b, h, w, c)


def _pooled_by_hand(k: Tensor, r: int) -> Tensor:
    """(batch, r², C) float64: region (i, j) the mean of k over rows ⌊iH/r⌋ … ⌈(i+1)H/r⌉ − 1 and the same for columns."""
    b, h, w, c = k.shape
    out = torch.zeros(b, r * r, c, dtype=torch.float64, device=k.device)
    for i in range(r):
        for j in range(r):
            rows = slice(i * h // r, -(-(i + 1) * h // r))
            cols = slice(j * w // r, -(-(j + 1) * w // r))
            out[:, i * r + j] = k[:, rows, cols].double().mean(dim=(1, 2))
    return out


def contmix_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, kernel_weight: Tensor, kernel_bias: Tensor, *, heads: int, kernel_size: int = 7,
    region_size: int = 7,
) -> tuple[Tensor, Tensor]:
    """(out, A) of `contmix_attention` in float64, group by group from the formula: region means by explicit bins,
    affinities, a softmax by exp and sum, and the (N, N) matrix A (batch, heads, N, N) with each token's kernel
    tap at its grid neighbour; out = A v per group, cast back to v's dtype."""
    sizes = _check(q, k, v, kernel_weight, kernel_bias, heads, kernel_size, region_size)
    b, h, w, c = v.shape
    n, r = h * w, kernel_size // 2
    regions = _pooled_by_hand(k, region_size)
    q64, v64 = q.double().reshape(b, n, c), v.double().reshape(b, n, c)
    matrices, parts = [], []
    start = 0
    for size in sizes:
        part = slice(start, start + size)
        start += size
        affinity = torch.einsum("bnc,brc->bnr", q64[..., part], regions[..., part]) / math.sqrt(size)
        logits = affinity @ kernel_weight.double() + kernel_bias.double()
        e = (logits - logits.amax(-1, keepdim=True)).exp()
        kernel = e / e.sum(-1, keepdim=True)  # (batch, N, k²)
        matrix = torch.zeros(b, n, n, dtype=torch.float64, device=v.device)
        for row in range(h):
            for col in range(w):
                for i in range(kernel_size):
                    for j in range(kernel_size):
                        y, z = row + i - r, col + j - r
                        if 0 <= y < h and 0 <= z < w:
                            matrix[:, row * w + col, y * w + z] = kernel[:, row * w + col, i * kernel_size + j]
        matrices.append(matrix)
        parts.append(matrix @ v64[..., part])
    out = torch.cat(parts, dim=-1).reshape(b, h, w, c)
    return out.to(v.dtype), torch.stack(matrices, dim=1).to(v.dtype)


@register(
    name="contmix",
    paper=OVERLOCK,
    family="B",
    cost="O(N·C·(r² + k²) + N·C²)",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    params=(
        Param("kernel_size", int, 7, "k, the side of each token's dynamic depthwise kernel (odd)", low=1),
        Param("region_size", int, 7, "r, the region tokens are the keys adaptive-average-pooled to r×r", low=1),
    ),
    summary="OverLoCK ContMix: per-token depthwise k×k kernels = softmax of a linear map of the token's affinity "
            "to r×r pooled region tokens; materialize = each token's kernel scattered into the (N, N) matrix.",
    normalized=False,
    test_params={"kernel_size": 3, "region_size": 2},
    test_positions=(4, 5),
    flops=contmix_flops,
)
class ContMix(ImageMixer):
    """ContMix on x (batch, H, W, dim): dynamic per-token depthwise convolution of V with kernels from the
    affinity of Q to r×r region tokens of K; materialize (batch, heads, N, N) = the kernels as token matrices."""

    mask_note = "a convolution over an image: zero padding is its border rule, no position can be removed"

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        kernel_size: int = 7,
        region_size: int = 7,
    ) -> None:
        super().__init__(dim)
        group_sizes(dim, heads)
        check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ParameterError(f"kernel_size: expected an odd size (a centred kernel), got {kernel_size}")
        self.heads = heads
        self.kernel_size, self.region_size = kernel_size, check_int("region_size", region_size, 1)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.kernel_proj = nn.Linear(region_size**2, kernel_size**2)
        self.proj = nn.Linear(dim, dim)

    def _args(self) -> dict[str, object]:
        return {"kernel_weight": self.kernel_proj.weight.T, "kernel_bias": self.kernel_proj.bias, "heads": self.heads,
                "kernel_size": self.kernel_size, "region_size": self.region_size}

    def kernels(self, x: Tensor) -> Tensor:
        """Each token's kernels w (batch, heads, H, W, k, k), every one summing to 1."""
        x = self.checked(x, None, None, None, None)
        q, k, _ = self.qkv(x).chunk(3, dim=-1)
        return contmix_kernels(q, k, **self._args())  # type: ignore[arg-type]

    def mix_fast(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(contmix_attention(q, k, v, **self._args()))  # type: ignore[arg-type]

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x64 = x.double()
        bias = None if self.qkv.bias is None else self.qkv.bias.double()
        q, k, v = F.linear(x64, self.qkv.weight.double(), bias).chunk(3, dim=-1)
        mixed, mixing = contmix_attention_reference(q, k, v, **self._args())  # type: ignore[arg-type]
        out = mixed @ self.proj.weight.double().T + self.proj.bias.double()
        return out.to(x.dtype), mixing.to(x.dtype)

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        """(A V) W_o: the output's part linear in A (without the bias b_o)."""
        v = self.qkv(x.to(self.qkv.weight.dtype)).chunk(3, dim=-1)[2].to(x.dtype)
        sizes = group_sizes(self.dim, self.heads)
        group_of = torch.repeat_interleave(torch.arange(self.heads, device=x.device), torch.tensor(sizes, device=x.device))
        return mix_channels(weights, v, group_of) @ self.proj.weight.T.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}, region_size={self.region_size}"
