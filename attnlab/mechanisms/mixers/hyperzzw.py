"""HyperZ·Z·W: a coordinate-MLP hyper-kernel gated by the activations, full-context convolution (Zhang, 2024).

The slow network is a coordinate-based implicit MLP, a multiplicative filter network (the
paper's slow net: each layer a linear map times a sinusoidal filter of the coordinate):

    h₁ = sin(ω₁ c + φ₁),   h_{l+1} = (W_l h_l + b_l) ⊙ sin(ω_{l+1} c + φ_{l+1}),   K(c) = W_o h_L + b_o ∈ R^H

evaluated at the relative coordinate c = δ / (max_length − 1) of every offset δ = i − m
between two tokens of the sequence: the hyper-kernel K_h(δ) spans the whole context (δ from
−(N−1) to N−1; causal: 0 to N−1), one kernel per head h (channel group; channel c of
head h(c) = ⌊c / head_dim⌋). The fast network computes the activations Z = W_z x and
applies the HyperZ·Z·W operator, context-dependent weights from the hyper-kernel and the
activations by an elementwise product, then a convolution of Z with them:

    W_ctx(i, m) = K_{h(c)}(i − m) ⊙ Z_{i,c}
    HyperZZW(Z)_{i,c} = Σ_m W_ctx(i, m) Z_{m,c} = Z_{i,c} · (K_{h(c)} ⊛ Z_{:,c})_i
    out = W_o HyperZZW(Z)

Reading of the paper. The abstract says "connects hyper-kernels (W) and hidden activations
(Z) through simple elementwise multiplication, followed by convolution of Z using the
context-dependent W"; the exact global form is not recoverable (the official code was
withdrawn; a public copy multiplies an input-sized kernel with Z at aligned absolute
positions and then takes a matrix product over the spatial axes, which is not a convolution
on a sequence). We take the kernel on relative offsets, so the layer is a convolution, and
the product with Z at the output position, so the operator is Z ⊙ (K ⊛ Z). Left aside: the
Terminator block around it (nine branches, local hyper-kernels, bottleneck, the slow net's
local feedback loss, standardisation). Defaults (the paper's values are not stated in what
we could read): mlp_width 32, mlp_layers 2, frequencies ω ~ U(−ω₀, ω₀) with ω₀ = 30 and
phases φ ~ U(−π, π); W_o scaled by 1/√max_length (Chang et al.'s kernel initialisation, as
in the CKConv family) so that a sum over max_length taps stays of order one.

Coordinates are normalised by the fixed `max_length`, not by N, so a token pair has the
same kernel value at every sequence length and padding changes nothing (N > max_length
reads the MLP beyond c = 1, a continuous function there).

Fast path: the full-context convolution by FFT (length 2N, circular, no wrap-around:
offsets stay within ±(N−1)), O(N log N · d), computed in float32 at least (bfloat16 inputs
are transformed in float32). Causal: one FFT over the whole sequence would let round-off of
later tokens reach earlier outputs, so the sequence is split in halves recursively, each
right half receiving its left half's contribution by an FFT over the left tokens only, and
blocks of 32 tokens are mixed directly: exactly causal, O(N log² N · d). The float64
reference writes out the sums. `materialize`:
the Toeplitz matrix A[b, h, i, m] = K_h(i − m) (causal: 0 for m > i), 0 at padded m; it
explains the output as out = W_o (Z ⊙ (A Z)) with Z = `values(x)` per head — the gate
Z_i is per channel, outside A. Not normalised (rows do not sum to 1).

Padding: padded tokens are zeroed in Z (no inputs, and their own outputs are W_o's bias).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.module import Impl
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_int, check_tensor
from ._sequence_mixer import SequenceMixer, drop_padding

HYPERZZW = Paper("P014", "HyperZ·Z·W Operator Connects Slow-Fast Networks for Full Context Interaction", 2024, "2401.17948")
MAX_LENGTH = 1024
OMEGA_0 = 30.0
LEAF = 32  # tokens mixed directly (a Toeplitz block) at the bottom of the causal FFT recursion


def hyperzzw_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per sequence: the FFT convolution ≈ 3 FFTs of length 2N per channel (5·2N·log2(2N) each) and the
    spectral product, the gate, and W_z, W_o (2·N·d² each); the slow net is O(N·width²), left out."""
    d, m = heads * head_dim, 2 * n
    return d * (15.0 * m * math.log2(m) + 6.0 * m) + n * d + 4.0 * n * d * d


def offsets(n: int, causal: bool) -> Tensor:
    """The relative offsets δ = i − m the kernel is read at: −(N−1)..N−1, or 0..N−1 when causal."""
    return torch.arange(0 if causal else 1 - n, n)


def _check(z: Tensor, kernel: Tensor, causal: bool, attention_mask: Tensor | None) -> None:
    check_tensor("z", z)
    check_tensor("kernel", kernel)
    if z.dim() != 4:
        raise ShapeError(f"z: expected (batch, heads, n, head_dim), got shape {tuple(z.shape)}")
    heads, n = z.shape[1], z.shape[2]
    taps = n if causal else 2 * n - 1
    if tuple(kernel.shape) != (heads, taps):
        what = "n (offsets 0..n−1)" if causal else "2n − 1 (offsets −(n−1)..n−1)"
        raise ShapeError(f"kernel: expected (heads, {what}) = ({heads}, {taps}), got shape {tuple(kernel.shape)}")
    if kernel.dtype != z.dtype:
        raise TypeError(f"kernel: expected dtype {z.dtype} (as z), got {kernel.dtype}")
    check_attention_mask(attention_mask, z.shape[0], n)


def _full_convolution(z: Tensor, kernel: Tensor) -> Tensor:
    """Σ_m K(i − m) z_m over all offsets −(n−1)..n−1 (kernel (heads, 2n − 1)) by one circular FFT of length 2n:
    offset δ sits at index δ mod 2n, and |i − m| < n never wraps onto another offset."""
    n = z.shape[2]
    circular = torch.zeros(kernel.shape[0], 2 * n, dtype=z.dtype, device=z.device)
    circular[:, :n] = kernel[:, n - 1 :]  # δ = 0..n−1
    circular[:, n + 1 :] = kernel[:, : n - 1]  # δ = −(n−1)..−1
    spectrum = torch.fft.rfft(z, n=2 * n, dim=2) * torch.fft.rfft(circular, dim=-1)[None, :, :, None]
    return torch.fft.irfft(spectrum, n=2 * n, dim=2)[:, :, :n]


def _causal_convolution(z: Tensor, kernel: Tensor) -> Tensor:
    """Σ_{m ≤ i} K(i − m) z_m (kernel (heads, n) at offsets 0..n−1), exactly causal: an FFT would let round-off of
    later tokens reach earlier outputs, so the sequence is split in halves recursively, the right half of every
    pair receiving the left half's contribution by an FFT over the left half's tokens only (offsets 1..2s − 1 fit a
    circular length 2s), and blocks of LEAF tokens are mixed directly by their lower-triangular Toeplitz block.
    O(N log² N · d)."""
    b, h, n, d = z.shape
    leaf = min(LEAF, n)
    padded = leaf * 2 ** math.ceil(math.log2(math.ceil(n / leaf)))
    zp = F.pad(z, (0, 0, 0, padded - n))
    kp = F.pad(kernel, (0, padded - n))  # offsets ≥ n only pair a token with a padding position
    lag = torch.arange(leaf, device=z.device)
    lag = lag[:, None] - lag[None, :]
    block = kp[:, lag.clamp_min(0)] * (lag >= 0).to(z.dtype)  # (heads, leaf, leaf), zero above the diagonal
    out = torch.einsum("hij,bhcjd->bhcid", block, zp.view(b, h, padded // leaf, leaf, d)).reshape(b, h, padded, d)
    s = leaf
    while s < padded:
        left = zp.view(b, h, padded // (2 * s), 2 * s, d)[:, :, :, :s]
        spectrum = torch.fft.rfft(left, n=2 * s, dim=3) * torch.fft.rfft(kp[:, : 2 * s], dim=-1)[None, :, None, :, None]
        right = torch.fft.irfft(spectrum, n=2 * s, dim=3)[:, :, :, s:]  # positions a + s .. a + 2s − 1 of each pair
        out = out + torch.cat([torch.zeros_like(right), right], dim=3).reshape(b, h, padded, d)
        s *= 2
    return out[:, :, :n]


def hyperzzw_attention(z: Tensor, kernel: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None) -> Tensor:
    """HyperZ·Z·W on z (batch, heads, n, head_dim): z_i ⊙ Σ_m K_h(i − m) z_m with the full-context kernel (heads, 2n − 1)
    over offsets −(n−1)..n−1 (causal: (heads, n) over 0..n−1); padded tokens (attention_mask False) are zeroed. By FFT
    (float32 at least): one of length 2n, O(N log N · d); causal, an exactly causal recursive split, O(N log² N · d)."""
    _check(z, kernel, causal, attention_mask)
    work = torch.promote_types(z.dtype, torch.float32)
    zz = drop_padding(z, attention_mask).to(work)
    mixed = (_causal_convolution if causal else _full_convolution)(zz, kernel.to(work))
    return (zz * mixed).to(z.dtype)


def hyperzzw_attention_reference(
    z: Tensor, kernel: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, A) of `hyperzzw_attention` in float64 by the explicit sums: A (batch, heads, n, n), A[i, m] = K(i − m)
    (causal: 0 for m > i), 0 at padded m; out_i = z_i ⊙ Σ_m A[i, m] z_m."""
    _check(z, kernel, causal, attention_mask)
    b, h, n, _ = z.shape
    first = 0 if causal else 1 - n  # the offset of kernel[:, 0]
    a = torch.zeros(b, h, n, n, dtype=torch.float64, device=z.device)
    for i in range(n):
        for m in range(n):
            if i - m >= first:
                a[:, :, i, m] = kernel[:, i - m - first].double()
    keep = None if attention_mask is None else attention_mask[:, None, :].double()
    z64 = z.double() if keep is None else z.double() * keep[..., None]
    if keep is not None:
        a = a * keep[:, :, None, :]
    return (z64 * (a @ z64)).to(z.dtype), a.to(z.dtype)


class CoordinateMLP(nn.Module):
    """The slow net: a multiplicative filter network from a coordinate c to `out` kernel values,
    h₁ = sin(ω₁ c + φ₁), h_{l+1} = (W_l h_l + b_l) ⊙ sin(ω_{l+1} c + φ_{l+1}), K = W_o h_L + b_o."""

    def __init__(self, out: int, width: int, layers: int, omega_0: float, output_scale: float) -> None:
        super().__init__()
        filters = [nn.Linear(1, width) for _ in range(layers + 1)]
        with torch.no_grad():
            for f in filters:
                f.weight.uniform_(-omega_0, omega_0)
                f.bias.uniform_(-math.pi, math.pi)
        self.filters = nn.ModuleList(filters)
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.output = nn.Linear(width, out)
        with torch.no_grad():
            self.output.weight.mul_(output_scale)

    def forward(self, coords: Tensor) -> Tensor:
        """coords (m,) -> kernel values (m, out)."""
        c = coords[:, None]
        h = torch.sin(self.filters[0](c))
        for linear, sine in zip(self.linears, self.filters[1:]):
            h = linear(h) * torch.sin(sine(c))
        return self.output(h)


@register(
    name="hyperzzw",
    paper=HYPERZZW,
    family="B",
    cost="O(N log N d)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True),
    params=(
        Param("max_length", int, MAX_LENGTH, "the length the relative coordinates are normalised by: c = δ/(max_length − 1)", low=2),
        Param("mlp_width", int, 32, "hidden width of the slow net (coordinate MLP)", low=1),
        Param("mlp_layers", int, 2, "hidden layers of the slow net (each a linear map times a sinusoidal filter)", low=1),
        Param("omega_0", float, OMEGA_0, "scale of the slow net's filter frequencies at initialisation, ω ~ U(−ω₀, ω₀)",
              low=0.0),
    ),
    summary="HyperZ·Z·W: a coordinate-MLP hyper-kernel over the whole context, out = W_o (Z ⊙ (K ⊛ Z)), Z = W_z x; "
            "FFT convolution; causal form over the past.",
    normalized=False,
    test_params={"max_length": 16, "omega_0": 3.0},
    flops=hyperzzw_flops,
)
class HyperZZW(SequenceMixer):
    """out = W_o (Z ⊙ (K ⊛ Z)), Z = W_z x, K_h(δ) = the slow net at c = δ/(max_length − 1), one kernel per head.

    materialize: the Toeplitz matrix A[b, h, i, m] = K_h(i − m) (0 at padded m, and for m > i when causal)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        max_length: int = MAX_LENGTH,
        mlp_width: int = 32,
        mlp_layers: int = 2,
        omega_0: float = OMEGA_0,
    ) -> None:
        super().__init__(dim, heads, causal=causal, batch_first=batch_first)
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
            head_dim = dim // heads
        self.head_dim = check_int("head_dim", head_dim)
        self.max_length = check_int("max_length", max_length, low=2)
        if isinstance(omega_0, bool) or not isinstance(omega_0, (int, float)) or not math.isfinite(omega_0) or omega_0 < 0:
            raise ParameterError(f"omega_0: expected a finite float >= 0, got {omega_0!r}")
        inner = heads * self.head_dim
        self.z_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, dim)
        self.slow_net = CoordinateMLP(heads, check_int("mlp_width", mlp_width), check_int("mlp_layers", mlp_layers),
                                      float(omega_0), 1.0 / math.sqrt(self.max_length))

    def values(self, x: Tensor) -> Tensor:
        """Z = W_z x per head, (batch, heads, n, head_dim), from batch-major x."""
        return self.z_proj(x).view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def hyper_kernel(self, n: int) -> Tensor:
        """K (heads, 2n − 1) at the offsets −(n−1)..n−1 (causal: (heads, n) at 0..n−1), from the slow net."""
        weight = self.z_proj.weight
        coords = offsets(n, self.causal).to(device=weight.device, dtype=weight.dtype) / (self.max_length - 1)
        return self.slow_net(coords).transpose(0, 1)

    def mix(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        z = self.values(x)
        kernel = self.hyper_kernel(x.shape[1])
        if impl == "fast":
            out = hyperzzw_attention(z, kernel, causal=self.causal, attention_mask=keep)
        else:
            out = hyperzzw_attention_reference(z, kernel, causal=self.causal, attention_mask=keep)[0]
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def mixing(self, x: Tensor, keep: Tensor | None) -> Tensor:
        z = self.values(x)
        return hyperzzw_attention_reference(z, self.hyper_kernel(x.shape[1]), causal=self.causal, attention_mask=keep)[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}, max_length={self.max_length}"
