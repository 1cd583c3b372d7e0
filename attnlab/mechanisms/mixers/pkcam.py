"""PKCAM, previous knowledge channel attention (Bakr et al., "PKCAM: Previous Knowledge Channel Attention Module",
2022).

ECA-style channel attention on the current feature map X_l ∈ R^{H × W × C}, with a second, global branch that reads
the channel descriptors of earlier layers. With z = GAP(X) ∈ R^C (the mean over positions) and z_1 … z_L the
descriptors of the L previous layers (each the GAP of that layer's output):

    s_loc  = σ(Conv1D_k(z))                                  local: ECA over the channel axis
    g      = ReLU(Σ_j w_j · z_j)                             global: the previous layers fused per channel
    s_glob = σ(Conv1D'_k(g))
    s      = σ(a · s_loc + b · s_glob)                       fusion: a Conv1D of kernel = stride = 2 over the
                                                             interleaved pair (s_loc,c, s_glob,c): two scalars
    Y      = X ⊙ (1 + s)                                     (the ResNet block then adds its shortcut)

Conv1D_k is a 1-D convolution across the channels (one input and output channel, zero padding (k − 1)/2, no bias);
the layer fusion w is a Conv1D of kernel = stride = L over the channel-major interleaved stack, i.e. one weight per
layer shared by the channels. The kernel size adapts to the width as ECA's (γ = 2, b = 1):

    k = ψ(C) = |log2(C)/γ + b/γ|_odd = odd(|log2 C + 1| / 2)

with |t|_odd as in ECA's and the authors' code: t truncated to an int, plus 1 when even (C = 64 → 3, 128 → 5,
2048 → 7). `kernel_size` fixes k instead.

Sources and choices. The paper's code is the authors' EMCA repository (eslambakr/EMCA), from which the layer fusion,
the output fusion and the residual form Y = X(1 + s) are read; a descriptor of a layer with fewer channels C_j is
tiled to C (the code's `repeat`, C a multiple of C_j). In that code the fused stack also holds the current layer's
descriptor after the previous ones (a kernel of L + 1): `include_current=True` gives that variant; the default reads
the previous layers only, as the paper describes the global branch ("previous knowledge"). A layer with no previous
layer (`previous_layers=0`, the first block) has s = s_loc, plain ECA, as in the code.

Inputs: the current map x (batch, H, W, C), dim = C (`Supports(grids=(2,))`), and `previous`: the L descriptors as
(batch, L, C) or a sequence of L tensors (batch, C_j); `channel_descriptor(x)` makes one from a layer's output.
`previous_layers` (L) is fixed at construction (w has one weight per layer); a module with L > 0 refuses a call
without them. The conformance suite calls a module with x alone: its entry is checked at L = 0 (the local branch and
the module contract); the global branch is checked by tests/mechanisms/test_pkcam.py. `bench_inputs` gives the
speed harness x on a grid and L random descriptors, so the bench times the full module.

`materialize`: PKCAM mixes positions only through the mean z; the values are not mixed. As a token mixer it is a
per-channel diagonal: (batch, C, N, N) with A[b, c, n, n] = s_c, so that Y[n, c] = X[n, c] + Σ_m A[b, c, n, m]
X[m, c] (one "head" per channel; the common parameters heads, head_dim and qkv_bias have no effect). No mask and no
causal mode (a whole-image mean). Fast path: conv1d calls; reference: every sum written out, float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.memory import check_memory
from ...core.module import Impl
from ...core.registry import Paper, Param, Spec, Supports, register
from ...core.validate import (
    check_finite,
    check_int,
    check_module_dtype,
    check_odd,
    check_optional_int,
    check_tensor,
    check_tokens,
)
from ...kernels.grid import refuse_masks

PKCAM_PAPER = Paper("P184", "PKCAM: Previous Knowledge Channel Attention Module", 2022, "2211.07521")
Previous = Tensor | Sequence[Tensor] | None


def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's k = |log2(C)/γ + b/γ|_odd: t = int(|(log2 C + b)/γ|), k = t if t is odd else t + 1."""
    check_int("channels", channels)
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def channel_descriptor(x: Tensor) -> Tensor:
    """GAP: the mean over the positions of a feature map x (batch, H, W, C) -> (batch, C)."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected a feature map (batch, H, W, C), got shape {tuple(x.shape)}")
    return x.mean((1, 2))


def pkcam_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per image: the mean and the product with (1 + s) (≈ 3·N·C); the channel convolutions are O(C·k)."""
    return 3.0 * n * heads * head_dim


def _stack(previous: Previous, batch: int, channels: int, layers: int, dtype: torch.dtype) -> Tensor | None:
    """The previous descriptors as (batch, L, C), those of C_j < C channels tiled to C; checked."""
    if layers == 0:
        if previous is not None and (not isinstance(previous, (list, tuple)) or len(previous) > 0):
            raise ValueError("previous: this module reads no previous layer (previous_layers=0), got descriptors")
        return None
    want = f"the descriptors of {layers} previous layers, (batch, L, C) = ({batch}, {layers}, {channels}) or {layers} " \
           f"tensors (batch, C_j) with C_j dividing {channels}"
    if previous is None:
        raise ValueError(f"previous: expected {want}, got None")
    items = list(previous.unbind(1)) if isinstance(previous, Tensor) and previous.dim() == 3 else previous
    if isinstance(items, Tensor) or not isinstance(items, (list, tuple)) or len(items) != layers:
        got = f"shape {tuple(previous.shape)}" if isinstance(previous, Tensor) else f"{len(previous)} tensors"
        raise ShapeError(f"previous: expected {want}, got {got}")
    tiled = []
    for j, z in enumerate(items):
        check_tensor(f"previous[{j}]", z)
        if z.dim() != 2 or z.shape[0] != batch or channels % z.shape[1] != 0:
            raise ShapeError(f"previous[{j}]: expected (batch, C_j) = ({batch}, C_j) with C_j dividing {channels}, "
                             f"got shape {tuple(z.shape)}")
        if z.dtype != dtype:
            raise TypeError(f"previous[{j}]: expected dtype {dtype} (as x), got {z.dtype}")
        check_finite(f"previous[{j}]", z)
        tiled.append(z.repeat(1, channels // z.shape[1]))
    return torch.stack(tiled, 1)


def _conv_channels(z: Tensor, kernel: Tensor) -> Tensor:
    """Conv1D_k across the channels of z (batch, C), zero padding (k − 1)/2, no bias."""
    return F.conv1d(z[:, None], kernel.to(z.dtype)[None, None], padding=kernel.shape[0] // 2)[:, 0]


def pkcam_attention(
    x: Tensor,
    previous: Previous,
    *,
    local_kernel: Tensor,
    global_kernel: Tensor,
    layer_weights: Tensor,
    fusion: Tensor,
    include_current: bool = False,
) -> Tensor:
    """PKCAM: Y = X ⊙ (1 + s) on x (batch, H, W, C), s = σ(a·σ(Conv1D_k(z)) + b·σ(Conv1D'_k(ReLU(Σ_j w_j z_j)))) with
    z = GAP(x) and z_j the previous descriptors (batch, L, C) or L tensors (batch, C_j); layer_weights w (L,) (L + 1
    with include_current: the current z last), fusion (a, b); s = σ(Conv1D_k(z)) when L = 0."""
    return x * (1 + pkcam_scales(x, previous, local_kernel=local_kernel, global_kernel=global_kernel,
                                 layer_weights=layer_weights, fusion=fusion, include_current=include_current))[:, None, None]


def pkcam_scales(
    x: Tensor,
    previous: Previous,
    *,
    local_kernel: Tensor,
    global_kernel: Tensor,
    layer_weights: Tensor,
    fusion: Tensor,
    include_current: bool = False,
) -> Tensor:
    """s (batch, C) of `pkcam_attention` (fast path)."""
    layers = _check(x, local_kernel, global_kernel, layer_weights, fusion, include_current)
    z = x.mean((1, 2))
    local = torch.sigmoid(_conv_channels(z, local_kernel))
    stack = _stack(previous, x.shape[0], x.shape[-1], layers, x.dtype)
    if stack is None:
        return local
    if include_current:
        stack = torch.cat([stack, z[:, None]], 1)
    g = torch.relu(torch.einsum("blc,l->bc", stack, layer_weights.to(x.dtype)))
    glob = torch.sigmoid(_conv_channels(g, global_kernel))
    f = fusion.to(x.dtype)
    return torch.sigmoid(f[0] * local + f[1] * glob)


def _check(x: Tensor, local_kernel: Tensor, global_kernel: Tensor, layer_weights: Tensor, fusion: Tensor,
           include_current: bool) -> int:
    """The checks of both paths; the number L of previous layers."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected a feature map (batch, H, W, C), got shape {tuple(x.shape)}")
    for name, kernel in (("local_kernel", local_kernel), ("global_kernel", global_kernel)):
        check_tensor(name, kernel)
        if kernel.dim() != 1 or kernel.shape[0] % 2 == 0:
            raise ShapeError(f"{name}: expected an odd kernel (k,), got shape {tuple(kernel.shape)}")
    check_tensor("layer_weights", layer_weights)
    check_tensor("fusion", fusion)
    if tuple(fusion.shape) != (2,):
        raise ShapeError(f"fusion: expected the two weights (a, b), got shape {tuple(fusion.shape)}")
    if not isinstance(include_current, bool):
        raise TypeError(f"include_current: expected a bool, got {include_current!r}")
    if layer_weights.dim() != 1:
        raise ShapeError(f"layer_weights: expected (L,) (L + 1 with include_current), got {tuple(layer_weights.shape)}")
    return layer_weights.shape[0] - int(include_current and layer_weights.shape[0] > 0)


def pkcam_attention_reference(
    x: Tensor,
    previous: Previous,
    *,
    local_kernel: Tensor,
    global_kernel: Tensor,
    layer_weights: Tensor,
    fusion: Tensor,
    include_current: bool = False,
) -> tuple[Tensor, Tensor]:
    """(Y, s (batch, C)) of `pkcam_attention` in float64, every convolution written as its sum over the kernel's taps
    (zero beyond the channels) and each previous descriptor tiled channel by channel (z_j[c mod C_j])."""
    layers = _check(x, local_kernel, global_kernel, layer_weights, fusion, include_current)
    b, h, w, c = x.shape
    x64 = x.double()
    z = x64.sum((1, 2)) / (h * w)

    def conv(t: Tensor, kernel: Tensor) -> Tensor:
        k, half = kernel.shape[0], kernel.shape[0] // 2
        out = torch.zeros_like(t)
        for ch in range(c):
            for tap in range(k):
                src = ch + tap - half
                if 0 <= src < c:
                    out[:, ch] = out[:, ch] + kernel[tap].double() * t[:, src]
        return out

    local = torch.sigmoid(conv(z, local_kernel))
    if layers == 0:
        _stack(previous, b, c, 0, x.dtype)  # refuses descriptors given to a module without previous layers
        s = local
    else:
        stack = _stack(previous, b, c, layers, x.dtype)
        assert stack is not None
        items = previous.unbind(1) if isinstance(previous, Tensor) else previous
        assert items is not None
        g = torch.zeros(b, c, dtype=torch.float64, device=x.device)
        for j, zj in enumerate(items):
            for ch in range(c):
                g[:, ch] = g[:, ch] + layer_weights[j].double() * zj[:, ch % zj.shape[1]].double()
        if include_current:
            g = g + layer_weights[layers].double() * z
        glob = torch.sigmoid(conv(torch.clamp(g, min=0.0), global_kernel))
        s = torch.sigmoid(fusion[0].double() * local + fusion[1].double() * glob)
    out = x64 + x64 * s[:, None, None, :]
    return out.to(x.dtype), s.to(x.dtype)


@register(
    name="pkcam",
    paper=PKCAM_PAPER,
    family="B",
    cost="O(N·C)",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    params=(
        Param("previous_layers", int, 3, "L: the previous layers whose descriptors the global branch fuses (0: "
              "ECA alone, the first block)", low=0),
        Param("kernel_size", int, None, "k of the channel convolutions (odd); None: ECA's adaptive "
              "odd(|log2 C + 1| / 2)", low=1, optional=True),
        Param("include_current", bool, False, "fuse the current layer's descriptor with the previous ones (the "
              "authors' EMCA code); False: previous layers only (the paper)"),
    ),
    normalized=False,
    summary="PKCAM: ECA channel attention fused with a global branch over the previous layers' channel descriptors; "
            "Y = X ⊙ (1 + σ(a·s_loc + b·s_glob)).",
    test_params={"previous_layers": 0},
    flops=pkcam_flops,
)
class PKCAM(nn.Module):
    """PKCAM on a feature map x (batch, H, W, C) with the previous layers' descriptors `previous` (batch, L, C) or L
    tensors (batch, C_j): Y = X ⊙ (1 + s); materialize is the per-channel diagonal (batch, C, N, N) holding s."""

    spec: ClassVar[Spec]

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        previous_layers: int = 3,
        kernel_size: int | None = None,
        include_current: bool = False,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        check_int("heads", heads)
        check_optional_int("head_dim", head_dim)
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias: expected a bool, got {qkv_bias!r}")
        if not isinstance(include_current, bool):
            raise TypeError(f"include_current: expected a bool, got {include_current!r}")
        self.previous_layers = check_int("previous_layers", previous_layers, 0)
        self.kernel_size = adaptive_kernel_size(dim) if kernel_size is None else check_odd("kernel_size", kernel_size)
        self.include_current = include_current
        self.heads = self.dim  # one diagonal map per channel
        k = self.kernel_size
        fused = self.previous_layers + int(include_current) if self.previous_layers else 0
        # torch's Conv1d init (uniform ±1/√fan_in), as the authors' nn.Conv1d layers
        self.local_kernel = nn.Parameter(torch.empty(k).uniform_(-(k**-0.5), k**-0.5))
        self.global_kernel = nn.Parameter(torch.empty(k).uniform_(-(k**-0.5), k**-0.5))
        self.layer_weights = nn.Parameter(torch.empty(fused).uniform_(-(max(fused, 1) ** -0.5), max(fused, 1) ** -0.5))
        self.fusion = nn.Parameter(torch.empty(2).uniform_(-(2**-0.5), 2**-0.5))

    def _image(self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None,
               key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        check_tokens("x", x, self.dim, grid_rank=2)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            raise ValueError("context: pkcam does not support cross-attention (previous layers come as `previous`)")
        refuse_masks("pkcam", attention_mask, attn_mask, "the channel descriptors are means over the whole image",
                     key_padding_mask)
        return x

    def _options(self) -> dict[str, Any]:
        return {"local_kernel": self.local_kernel, "global_kernel": self.global_kernel,
                "layer_weights": self.layer_weights, "fusion": self.fusion, "include_current": self.include_current}

    def forward(
        self,
        x: Tensor,
        previous: Previous = None,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, H, W, C) and the previous descriptors -> X ⊙ (1 + s), the same shape."""
        x = self._image(x, context, attention_mask, key_padding_mask, attn_mask)
        if impl == "fast":
            return pkcam_attention(x, previous, **self._options())
        if impl == "reference":
            return pkcam_attention_reference(x, previous, **self._options())[0]
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")

    def scales(self, x: Tensor, previous: Previous = None) -> Tensor:
        """s (batch, C), the channel scales of Y = X ⊙ (1 + s) (float64 reference)."""
        x = self._image(x, None, None, None, None)
        return pkcam_attention_reference(x, previous, **self._options())[1]

    def materialize(
        self,
        x: Tensor,
        previous: Previous = None,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """A (batch, C, N, N): diag(s_c) per channel, positions in raster order; Y = X + A X per channel."""
        x = self._image(x, context, attention_mask, key_padding_mask, attn_mask)
        b, n = x.shape[0], x.shape[1] * x.shape[2]
        check_memory("materialize", (b, self.dim, n, n), 8)
        s = pkcam_attention_reference(x, previous, **self._options())[1]
        return torch.diag_embed(s[:, :, None].expand(b, self.dim, n))

    def bench_inputs(self, batch: int, n: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[list[Tensor], dict[str, Any]]:
        """x on the most square H × W grid of n positions and the L previous descriptors (batch, L, C)."""
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        x = torch.randn(batch, rows, n // rows, self.dim, generator=generator).to(dtype)
        previous = torch.randn(batch, self.previous_layers, self.dim, generator=generator).to(dtype)
        return [x], {"previous": previous if self.previous_layers else None}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, previous_layers={self.previous_layers}, kernel_size={self.kernel_size}, "
                f"include_current={self.include_current}")
