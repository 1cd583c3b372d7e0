"""2-D state-space layer, 2-D SSM (Baron, Zimerman and Wolf, "2-D SSM: A General Spatial Layer for Visual
Transformers", 2023).

Per channel c, a Roesser-type linear recurrence runs over the image u ∈ R^{H×W} (one channel of x) with a
horizontal state h^h and a vertical state h^v, both in R^S (S = state_dim, diagonal real transitions, so the
S state dimensions run independently):

    h^h[i, j] = A1 h^h[i, j−1] + A2 h^v[i, j−1] + B1 u[i, j]          (the horizontal state moves right)
    h^v[i, j] = A3 h^h[i−1, j] + A4 h^v[i−1, j] + B2 u[i, j]          (the vertical state moves down)
    y[i, j]   = C1 h^h[i, j] + C2 h^v[i, j]                             (states outside the grid are 0)

It is linear and shift-invariant, so y = K ∗ u with the 2-D kernel K[p, q] (p, q ≥ 0) the recurrence's
impulse response: the sum, over the lattice paths from (0, 0) to (p, q), of the products of the transitions
along them (K[0, 0] = C1 B1 + C2 B2, K[0, 1] = C1 (A1 B1 + A2 B2), K[1, 0] = C2 (A3 B1 + A4 B2), …). One
scan reads only the quadrant above-left of each position; the layer runs four scans with their own parameters,
one per direction (flip the rows and/or the columns of the input, scan, flip back) and sums them:

    out = Σ_{(r, s) ∈ {no, yes}²} flip_{r,s}( K_{r,s} ∗ flip_{r,s}(x) )

in the order (no flip, flip rows, flip columns, flip both). As in the paper, the layer is computed as its
explicit kernel applied by a convolution.

Fast path (`ssm2d_kernel`, `ssm2d_attention`): the kernel of every direction by the recurrence on the impulse,
anti-diagonal by anti-diagonal (the states on diagonal i + j = d depend only on diagonal d − 1: H + W − 1
vectorised steps over the H rows, O((H + W)·H·C·S), O(N·C·S) on square grids); the four kernels are placed into
one (2H, 2W) circular kernel and applied by FFT, O(C·N log N) (float16/bfloat16 inputs are computed in float32
and cast back). Reference (`ssm2d_attention_reference`, float64): the recurrence run position by position over
the (flipped) input, explicit loops over rows and columns; its mixing matrices come from running the same
recurrence on one impulse image per position — it never forms a kernel.

The equations are those of the catalogue's specification (PAPERS.md P135): the input enters both states at its
own position, so K[0, 0] = C1 B1 + C2 B2 weighs u[i, j] itself and no separate skip term D u is added (the
textbook Roesser model feeds u[i, j] into the states of the next positions and adds D u).

Parameterisation (a choice of this implementation; the paper states diagonal real parameters with a
normalisation, the official repository is not runnable): per direction, channel and state dimension,
A1 = ρ_h σ_h, A2 = ρ_h (1 − σ_h), A3 = ρ_v (1 − σ_v), A4 = ρ_v σ_v with ρ = sigmoid(decay) ∈ (0, 1) and
σ = sigmoid(split). Then |A1| + |A2| = ρ_h < 1 and |A3| + |A4| = ρ_v < 1, and by induction the states
after an impulse at (0, 0) obey |h[i, j]| ≤ max(ρ_h, ρ_v)^{i+j} max(|B1|, |B2|): the kernel decays
geometrically on any grid size. B and C are free. Init: ρ uniform in [0.5, 0.95], split 0, B ~ N(0, 1),
C ~ N(0, 1/(2S)). The common parameters heads, head_dim and qkv_bias have no effect (no heads, no
projections).

materialize. The layer is linear in x: out[n, c] = Σ_m M_c[n, m] x[m, c] with M_c[n, m] the summed kernels of
channel c at the offset between n and m (one head per channel; the same for every batch element; N = H·W in
raster order). `materialize` returns M (batch, dim, N, N) from the reference (impulse responses of the
recurrence), `attention_path(x, M)` is the per-channel product M_c x_c: the whole output. Its rows do not sum
to 1.

Masks: none. The recurrence reads every position of its quadrant; a padding mask would not remove a position
from it, so attention_mask, key_padding_mask and attn_mask are refused by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_floating, check_int, check_tensor
from ._image_mixer import ImageMixer, mix_channels

SSM2D = Paper("P135", "2-D SSM: A General Spatial Layer for Visual Transformers", 2023, "2306.06635")

DIRECTIONS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
"""The four scans as (flip rows, flip columns), in the order of the leading axis of the parameters."""


def ssm2d_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs for C = heads·head_dim at S = 16: kernel 4·C·S·8·N (recurrence), FFT convolution
    ≈ 3 transforms of 4N points, 5·4N·log2(4N) each per channel, and the 4N-point product."""
    c = heads * head_dim
    return 4.0 * c * 16 * 8 * n + c * (3 * 5 * 4 * n * math.log2(4 * n) + 6 * 4 * n)


def _check_parameters(a: Tensor, b: Tensor, c: Tensor, channels: int | None) -> None:
    """a (4, C, S, 4) = (A1, A2, A3, A4), b (4, C, S, 2) = (B1, B2), c (4, C, S, 2) = (C1, C2), one dtype."""
    for name, t, last in (("a", a, 4), ("b", b, 2), ("c", c, 2)):
        check_tensor(name, t)
        check_floating(name, t)
        if t.dim() != 4 or t.shape[0] != len(DIRECTIONS) or t.shape[-1] != last:
            raise ShapeError(f"{name}: expected shape (4 directions, C, S, {last}), got {tuple(t.shape)}")
        if channels is not None and t.shape[1] != channels:
            raise ShapeError(f"{name}: expected {channels} channels (x's last axis) on axis 1, got {t.shape[1]}")
    if b.shape[:3] != a.shape[:3] or c.shape[:3] != a.shape[:3]:
        raise ShapeError(
            f"b, c: expected the (directions, C, S) of a, {tuple(a.shape[:3])}, got {tuple(b.shape[:3])} and "
            f"{tuple(c.shape[:3])}"
        )
    if b.dtype != a.dtype or c.dtype != a.dtype:
        raise TypeError(f"b, c: expected dtype {a.dtype} (as a), got {b.dtype} and {c.dtype}")


def _check_image(x: Tensor) -> None:
    check_tensor("x", x)
    check_floating("x", x)
    if x.dim() != 4 or min(x.shape[1:3]) < 1:
        raise ShapeError(f"x: expected (batch, H, W, C) with H, W ≥ 1, got shape {tuple(x.shape)}")


def ssm2d_kernel(a: Tensor, b: Tensor, c: Tensor, height: int, width: int) -> Tensor:
    """K (4, C, height, width): each direction's impulse response K[p, q] of the Roesser recurrence, computed
    anti-diagonal by anti-diagonal: on diagonal d the states at row i are h^h = A1 h^h + A2 h^v of (i, d−1) and
    h^v = A3 h^h + A4 h^v of (i−1, d−1), summed over the S states by C1, C2."""
    _check_parameters(a, b, c, None)
    check_int("height", height)
    check_int("width", width)
    a1, a2, a3, a4 = (t[..., None] for t in a.unbind(-1))  # (4, C, S, 1), broadcast over the rows
    b1, b2 = b.unbind(-1)
    c1, c2 = (t[..., None] for t in c.unbind(-1))
    # the states of one diagonal indexed by row i (column d − i); diagonal 0 holds the impulse at (0, 0)
    horizontal = F.pad(b1[..., None], (0, height - 1))
    vertical = F.pad(b2[..., None], (0, height - 1))
    diagonals = [torch.addcmul(c1 * horizontal, c2, vertical).sum(-2)]
    for _ in range(height + width - 2):
        downward = torch.addcmul(a3 * horizontal, a4, vertical)  # A3 h^h + A4 h^v, read by row i + 1
        horizontal = torch.addcmul(a1 * horizontal, a2, vertical)
        vertical = F.pad(downward[..., :-1], (1, 0))
        diagonals.append(torch.addcmul(c1 * horizontal, c2, vertical).sum(-2))
    stacked = torch.stack(diagonals, -2)  # (4, C, H + W − 1 diagonals, H rows); cells with column ≥ W are unused
    rows = torch.arange(height, device=a.device)[:, None]
    cols = torch.arange(width, device=a.device)[None, :]
    return stacked[..., rows + cols, rows.expand(height, width)]


def ssm2d_attention(x: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The 2-D SSM layer on x (batch, H, W, C): Σ over the 4 directions of flip(K_dir ∗ flip(x)), the kernels
    of `ssm2d_kernel`, as one FFT convolution with the four quadrants in a (2H, 2W) circular kernel."""
    _check_image(x)
    _check_parameters(a, b, c, x.shape[-1])
    if a.dtype != x.dtype:
        raise TypeError(f"a: expected dtype {x.dtype} (as x), got {a.dtype}")
    batch, h, w, channels = x.shape
    kernels = ssm2d_kernel(a, b, c, h, w)
    work = torch.promote_types(x.dtype, torch.float32)
    # out[n] = Σ_d R[d] x[n − d]: the unflipped scan reads offsets d ≥ 0, a flipped axis reads x[n + d], R[−d]
    circular = sum(_wrap(_wrap(k.to(work), -2, fr), -1, fc) for k, (fr, fc) in zip(kernels, DIRECTIONS))
    image = x.to(work).permute(0, 3, 1, 2)
    spectrum = torch.fft.rfft2(image, s=(2 * h, 2 * w)) * torch.fft.rfft2(circular)
    out = torch.fft.irfft2(spectrum, s=(2 * h, 2 * w))[..., :h, :w]
    return out.permute(0, 2, 3, 1).to(x.dtype).reshape(batch, h, w, channels)


def _wrap(kernel: Tensor, axis: int, negative: bool) -> Tensor:
    """kernel (…, L, …) placed on a circular axis of 2L: tap t at t, or at −t mod 2L when negative."""
    size = kernel.shape[axis]
    if not negative:
        return torch.cat([kernel, torch.zeros_like(kernel)], axis)
    origin, rest = kernel.split([1, size - 1], axis)
    return torch.cat([origin, torch.zeros_like(kernel), rest.flip(axis)], axis)  # tap t at 2L − t


def _roesser_scan(u: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """y (batch, H, W, C) of one direction's recurrence on u (batch, H, W, C), position by position in raster
    order; a (C, S, 4), b (C, S, 2), c (C, S, 2), all float64."""
    batch, h, w, channels = u.shape
    zero = u.new_zeros(batch, channels, a.shape[1])
    above_h, above_v = [zero] * w, [zero] * w  # the states of the previous row, per column
    y = u.new_zeros(u.shape)
    for i in range(h):
        left_h, left_v = zero, zero
        for j in range(w):
            ui = u[:, i, j, :, None]  # (batch, C, 1)
            hh = a[..., 0] * left_h + a[..., 1] * left_v + b[..., 0] * ui
            hv = a[..., 2] * above_h[j] + a[..., 3] * above_v[j] + b[..., 1] * ui
            y[:, i, j] = (c[..., 0] * hh + c[..., 1] * hv).sum(-1)
            left_h, left_v = hh, hv
            above_h[j], above_v[j] = hh, hv
    return y


def ssm2d_attention_reference(x: Tensor, a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(out, M) of `ssm2d_attention` in float64 from the recurrence itself: out = Σ_dir flip(scan_dir(flip(x)));
    M (batch, C, N, N) with M[c, n, m] the output at n of the same layer on the impulse image at m (raster order).
    Both are cast back to x's dtype."""
    _check_image(x)
    _check_parameters(a, b, c, x.shape[-1])
    batch, h, w, channels = x.shape
    n = h * w
    impulses = torch.eye(n, dtype=torch.float64, device=x.device).reshape(n, h, w, 1).expand(n, h, w, channels)
    inputs = torch.cat([x.double(), impulses])
    out = torch.zeros_like(inputs)
    for k, (flip_rows, flip_cols) in enumerate(DIRECTIONS):
        dims = [d for d, flip in ((1, flip_rows), (2, flip_cols)) if flip]
        scanned = _roesser_scan(inputs.flip(dims), a[k].double(), b[k].double(), c[k].double())
        out = out + scanned.flip(dims)
    mixing = out[batch:].reshape(n, n, channels).permute(2, 1, 0)  # [c, n, m]: response at n to the impulse at m
    return out[:batch].to(x.dtype), mixing.expand(batch, channels, n, n).to(x.dtype)


@register(
    name="ssm2d",
    paper=SSM2D,
    family="B",
    cost="O(C·S·N + C·N log N)",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    params=(Param("state_dim", int, 16, "S, the state size of each direction's recurrence per channel", low=1),),
    summary="2-D SSM: a Roesser recurrence per channel over the image in 4 directions, applied as its explicit "
            "2-D kernel by FFT; materialize = the per-channel mixing matrix.",
    normalized=False,
    test_params={"state_dim": 3},
    flops=ssm2d_flops,
)
class StateSpace2D(ImageMixer):
    """2-D SSM on x (batch, H, W, dim): four directional Roesser recurrences per channel, summed (module
    docstring); materialize (batch, dim, N, N) is the per-channel mixing matrix."""

    mask_note = "a recurrence over every position of the image: no position can be removed"

    def __init__(
        self, dim: int, heads: int = 8, *, head_dim: int | None = None, qkv_bias: bool = True, state_dim: int = 16
    ) -> None:
        super().__init__(dim)
        self.state_dim = check_int("state_dim", state_dim)
        self.heads = dim  # materialize: one map per channel (each channel has its own recurrences)
        shape = (len(DIRECTIONS), dim, state_dim)
        decay = torch.empty(*shape, 2).uniform_(0.5, 0.95)
        self.decay = nn.Parameter(torch.log(decay) - torch.log1p(-decay))  # logit: ρ_h, ρ_v
        self.split = nn.Parameter(torch.zeros(*shape, 2))  # σ_h, σ_v = sigmoid(split)
        self.input_gain = nn.Parameter(torch.randn(*shape, 2))  # B1, B2
        self.output_gain = nn.Parameter(torch.randn(*shape, 2) / math.sqrt(2 * state_dim))  # C1, C2

    def transitions(self) -> Tensor:
        """(4, dim, S, 4): A1 = ρ_h σ_h, A2 = ρ_h (1 − σ_h), A3 = ρ_v (1 − σ_v), A4 = ρ_v σ_v."""
        rho, sigma = torch.sigmoid(self.decay), torch.sigmoid(self.split)
        rho_h, rho_v = rho.unbind(-1)
        sigma_h, sigma_v = sigma.unbind(-1)
        return torch.stack([rho_h * sigma_h, rho_h * (1 - sigma_h), rho_v * (1 - sigma_v), rho_v * sigma_v], -1)

    def mix_fast(self, x: Tensor) -> Tensor:
        return ssm2d_attention(x, self.transitions(), self.input_gain, self.output_gain)

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return ssm2d_attention_reference(x, self.transitions(), self.input_gain, self.output_gain)

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        """M_c x_c per channel: the whole output (the layer is linear in x)."""
        return mix_channels(weights, x, torch.arange(self.dim, device=x.device))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, state_dim={self.state_dim}"
