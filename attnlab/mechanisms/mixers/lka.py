"""Large kernel attention, LKA (Guo et al., "Visual Attention Network", 2022).

A K×K depthwise convolution is decomposed into a (2d−1)×(2d−1) depthwise convolution, a
⌈K/d⌉×⌈K/d⌉ depthwise convolution of dilation d and a 1×1 convolution (K = 21, d = 3: 5×5, 7×7
dilation 3, 1×1). On an image F ∈ R^{H×W×C}:

    Attention = Conv_{1×1}(DW-D-Conv_{7×7, d=3}(DW-Conv_{5×5}(F)))      (no softmax, no normalisation)
    Output    = Attention ⊙ F                                            (elementwise)

Each convolution keeps the grid size with zero padding: d − 1 for the first, d·(⌈K/d⌉ − 1)/2 for
the dilated one (2 and 9 at the defaults, as the official code). Every layer carries a bias.
The exact support of the two depthwise convolutions is (2d − 1) + d(⌈K/d⌉ − 1) positions per axis:
23×23 at K = 21, d = 3 (offsets a + 3b, |a| ≤ 2, |b| ≤ 3) — the paper's "21×21" is the nominal K.
Cost O(N·C·(K²/d² + d² + C)): linear in the number of positions N = H·W.

`van_attention=True` wraps the core in VAN's attention module (the official `Attention`):
x + Conv_{1×1}(LKA(GELU(Conv_{1×1}(x)))), GELU exact (erf). With the default False the module is
the LKA core above, the paper's equations.

materialize. LKA is a gate computed by a linear token mixer: the two depthwise convolutions are,
per channel c, a fixed (N, N) matrix M_c (zero padding included) plus an offset β_c (their biases
carried through the padding), and

    Output[n, c] = F[n, c] · (b_1[c] + Σ_c' W_1[c, c'] ((M_c' F_c')[n] + β[n, c']))

(F the LKA core's input: x, or GELU(proj_1 x) under van_attention). `materialize` returns M,
(batch, dim, N, N), one head per channel (each channel has its own kernels), the same for every
element of the batch: the token-mixing matrix of the attention branch, whose rows hold the
composite kernel; `attention_path(x, M)` is F ⊙ W_1(M F) (times proj_2's matrix under
van_attention). Its rows do not sum to 1. The common parameters heads, head_dim and qkv_bias have
no effect (LKA has no heads or q, k, v projections): `heads` of the module is dim.

Masks: none. A padding mask would not remove a position from a convolution (zero padding is the
convolution's border rule), so attention_mask, key_padding_mask and attn_mask are refused by name.
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

VAN = Paper("P201", "Visual Attention Network", 2022, "2202.09741")


def lka_kernel_sizes(kernel_size: int, dilation: int) -> tuple[int, int]:
    """(2d − 1, ⌈K/d⌉): the sizes of the depthwise and the dilated depthwise kernels; ⌈K/d⌉ must be odd."""
    check_int("kernel_size", kernel_size, 1)
    check_int("dilation", dilation, 1)
    dilated = math.ceil(kernel_size / dilation)
    if dilated % 2 == 0:
        raise ParameterError(
            f"kernel_size: expected ⌈kernel_size / dilation⌉ odd (a centred dilated kernel), got "
            f"⌈{kernel_size}/{dilation}⌉ = {dilated}"
        )
    return 2 * dilation - 1, dilated


def lka_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the defaults (5×5, 7×7, 1×1) for C = heads·head_dim: 2·N·C·(25 + 49 + C) + N·C (the product)."""
    c = heads * head_dim
    return 2.0 * n * c * (25 + 49 + c) + n * c


def _check_weights(
    x: Tensor, depthwise: Tensor, dilated: Tensor, pointwise: Tensor, biases: tuple[Tensor | None, ...], dilation: int
) -> None:
    """x (batch, H, W, C); depthwise (C, 2d−1, 2d−1), dilated (C, k, k) with k odd, pointwise (C, C), biases (C,) or None."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected (batch, H, W, C), got shape {tuple(x.shape)}")
    c = x.shape[-1]
    check_int("dilation", dilation, 1)
    d = 2 * dilation - 1
    for name, t, want in (("depthwise", depthwise, (c, d, d)), ("pointwise", pointwise, (c, c))):
        if tuple(check_tensor(name, t).shape) != want:
            raise ShapeError(f"{name}: expected shape {want} (C = {c}, dilation {dilation}), got {tuple(t.shape)}")
    check_tensor("dilated", dilated)
    if dilated.dim() != 3 or dilated.shape[0] != c or dilated.shape[1] != dilated.shape[2] or dilated.shape[1] % 2 == 0:
        raise ShapeError(f"dilated: expected shape ({c}, k, k) with k odd, got {tuple(dilated.shape)}")
    for name, b in zip(("depthwise_bias", "dilated_bias", "pointwise_bias"), biases):
        if b is not None and tuple(check_tensor(name, b).shape) != (c,):
            raise ShapeError(f"{name}: expected shape ({c},) or None, got {tuple(b.shape)}")


def lka_attention(
    x: Tensor,
    depthwise: Tensor,
    dilated: Tensor,
    pointwise: Tensor,
    *,
    depthwise_bias: Tensor | None = None,
    dilated_bias: Tensor | None = None,
    pointwise_bias: Tensor | None = None,
    dilation: int = 3,
) -> Tensor:
    """LKA on x (batch, H, W, C): out = x ⊙ Conv_1×1(DW-D-Conv(DW-Conv(x))), zero padding keeping H×W.

    depthwise (C, 2d−1, 2d−1), dilated (C, k, k) applied with dilation d, pointwise (C_out = C, C_in = C).
    """
    _check_weights(x, depthwise, dilated, pointwise, (depthwise_bias, dilated_bias, pointwise_bias), dilation)
    c = x.shape[-1]
    local = F.conv2d(x.permute(0, 3, 1, 2), depthwise[:, None], depthwise_bias, padding=dilation - 1, groups=c)
    spread = _dilated_depthwise(local.permute(0, 2, 3, 1), dilated, dilated_bias, dilation)
    attn = F.linear(spread, pointwise, pointwise_bias)
    return x * attn


def _dilated_depthwise(x: Tensor, kernels: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """The depthwise convolution of x (batch, H, W, C) with kernels (C, k, k) at dilation d, zero padding keeping
    H×W, as an undilated convolution of the d² interleaved sub-images (positions ≡ (i, j) mod d): a tap
    d·t away is t away within a sub-image, and the grid is zero-padded to multiples of d (cells that read as
    off-grid zeros, as the dilated convolution's padding). PyTorch's dilated depthwise kernel on CPU is
    several times slower than its undilated one."""
    b, h, w, c = x.shape
    d, k = dilation, kernels.shape[-1]
    hp, wp = -(-h // d) * d, -(-w // d) * d
    padded = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    sub = padded.reshape(b, hp // d, d, wp // d, d, c).permute(0, 2, 4, 1, 3, 5).reshape(b * d * d, hp // d, wp // d, c)
    out = F.conv2d(sub.permute(0, 3, 1, 2), kernels[:, None], bias, padding=(k - 1) // 2, groups=c).permute(0, 2, 3, 1)
    return out.reshape(b, d, d, hp // d, wp // d, c).permute(0, 3, 1, 4, 2, 5).reshape(b, hp, wp, c)[:, :h, :w]


def _depthwise_matrices(kernels: Tensor, h: int, w: int, dilation: int) -> Tensor:
    """(C, N, N) float64: row n of channel c holds kernel tap (i, j) at m = n + d·(i − r, j − r), r the centre,
    where m lies on the grid (zero padding: taps off the grid read nothing)."""
    c, size = kernels.shape[0], kernels.shape[-1]
    r = size // 2
    out = torch.zeros(c, h * w, h * w, dtype=torch.float64, device=kernels.device)
    for row in range(h):
        for col in range(w):
            for i in range(size):
                for j in range(size):
                    y, z = row + dilation * (i - r), col + dilation * (j - r)
                    if 0 <= y < h and 0 <= z < w:
                        out[:, row * w + col, y * w + z] += kernels[:, i, j].double()
    return out


def lka_attention_reference(
    x: Tensor,
    depthwise: Tensor,
    dilated: Tensor,
    pointwise: Tensor,
    *,
    depthwise_bias: Tensor | None = None,
    dilated_bias: Tensor | None = None,
    pointwise_bias: Tensor | None = None,
    dilation: int = 3,
) -> tuple[Tensor, Tensor]:
    """(out, M) of `lka_attention` in float64 from explicit per-channel (N, N) convolution matrices:
    M (batch, C, N, N) = M_dilated M_depthwise, out = x ⊙ (W_1 (M x + β) + b_1), cast back to x's dtype."""
    _check_weights(x, depthwise, dilated, pointwise, (depthwise_bias, dilated_bias, pointwise_bias), dilation)
    b, h, w, c = x.shape
    n = h * w
    first = _depthwise_matrices(depthwise, h, w, 1)
    second = _depthwise_matrices(dilated, h, w, dilation)
    tokens = x.double().reshape(b, n, c)

    def bias(t: Tensor | None) -> Tensor:
        return torch.zeros(c, dtype=torch.float64, device=x.device) if t is None else t.double()

    u = torch.einsum("cnm,bmc->bnc", first, tokens) + bias(depthwise_bias)
    v = torch.einsum("cnm,bmc->bnc", second, u) + bias(dilated_bias)
    attn = torch.einsum("dc,bnc->bnd", pointwise.double(), v) + bias(pointwise_bias)
    out = (tokens * attn).reshape(b, h, w, c)
    mixing = torch.einsum("cnk,ckm->cnm", second, first).expand(b, c, n, n)
    return out.to(x.dtype), mixing.to(x.dtype)


@register(
    name="lka",
    paper=VAN,
    family="B",
    cost="O(N·C·(K²/d² + d² + C))",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    params=(
        Param("kernel_size", int, 21, "K, the decomposed kernel: DW (2d−1)², DW-D ⌈K/d⌉² of dilation d, 1×1", low=1),
        Param("dilation", int, 3, "d, the dilation of the second depthwise convolution", low=1),
        Param("van_attention", bool, False, "VAN's attention module around LKA: x + proj_2(LKA(GELU(proj_1 x)))"),
    ),
    summary="VAN large kernel attention: out = x ⊙ Conv1×1(DW-D-Conv7×7,d=3(DW-Conv5×5(x))) on an image; "
            "materialize = the per-channel depthwise mixing matrix.",
    normalized=False,
    test_params={"van_attention": True},
    flops=lka_flops,
)
class LargeKernelAttention(ImageMixer):
    """LKA on x (batch, H, W, dim): out = x ⊙ Conv1×1(DW-D-Conv(DW-Conv(x))); materialize (batch, dim, N, N) is
    the depthwise convolutions' per-channel token matrix M (module docstring)."""

    mask_note = "a convolution over an image: zero padding is its border rule, no position can be removed"

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        kernel_size: int = 21,
        dilation: int = 3,
        van_attention: bool = False,
    ) -> None:
        super().__init__(dim)
        if not isinstance(van_attention, bool):
            raise ParameterError(f"van_attention: expected a bool, got {van_attention!r}")
        first, second = lka_kernel_sizes(kernel_size, dilation)
        self.heads = dim  # materialize: one map per channel (the depthwise kernels are per channel)
        self.kernel_size, self.dilation = kernel_size, dilation
        self.depthwise = nn.Conv2d(dim, dim, first, padding=dilation - 1, groups=dim)
        self.dilated = nn.Conv2d(dim, dim, second, padding=dilation * (second - 1) // 2, dilation=dilation, groups=dim)
        self.pointwise = nn.Conv2d(dim, dim, 1)
        self.proj_in = nn.Linear(dim, dim) if van_attention else None
        self.proj_out = nn.Linear(dim, dim) if van_attention else None

    def _weights(self) -> dict[str, Tensor | None]:
        return {
            "depthwise": self.depthwise.weight[:, 0], "dilated": self.dilated.weight[:, 0],
            "pointwise": self.pointwise.weight[:, :, 0, 0], "depthwise_bias": self.depthwise.bias,
            "dilated_bias": self.dilated.bias, "pointwise_bias": self.pointwise.bias,
        }

    def mix_fast(self, x: Tensor) -> Tensor:
        if self.proj_in is None or self.proj_out is None:
            return lka_attention(x, **self._weights(), dilation=self.dilation)  # type: ignore[arg-type]
        gated = lka_attention(F.gelu(self.proj_in(x)), **self._weights(), dilation=self.dilation)  # type: ignore[arg-type]
        return x + self.proj_out(gated)

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.proj_in is None or self.proj_out is None:
            return lka_attention_reference(x, **self._weights(), dilation=self.dilation)  # type: ignore[arg-type]
        x64 = x.double()
        h = x64 @ self.proj_in.weight.double().T + self.proj_in.bias.double()
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        gated, mixing = lka_attention_reference(h, **self._weights(), dilation=self.dilation)  # type: ignore[arg-type]
        out = x64 + gated @ self.proj_out.weight.double().T + self.proj_out.bias.double()
        return out.to(x.dtype), mixing.to(x.dtype)

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        """F ⊙ W_1 (M F), F the core's input (then proj_2's matrix under van_attention): the output's part linear in M."""
        inner = x if self.proj_in is None else F.gelu(self.proj_in(x.to(self.proj_in.weight.dtype))).to(x.dtype)
        channels = torch.arange(self.dim, device=x.device)
        gated = inner * (mix_channels(weights, inner, channels) @ self.pointwise.weight[:, :, 0, 0].T.to(x.dtype))
        return gated if self.proj_out is None else gated @ self.proj_out.weight.T.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"van_attention={self.proj_in is not None}")
