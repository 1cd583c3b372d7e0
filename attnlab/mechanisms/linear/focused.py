"""Focused linear attention (FLatten; Han et al., ICCV 2023, P034): a focusing feature map plus a
depthwise convolution on V that restores the rank linear attention loses.

    φ_p(x) = f_p(ReLU(x) / s),     f_p(x) = (‖x‖ / ‖x^{∘p}‖) · x^{∘p}
    O_i = φ_p(q_i)ᵀ (Σ_j φ_p(k_j) v_jᵀ) / φ_p(q_i)ᵀ (Σ_j φ_p(k_j))  +  DWC(V)_i

f_p keeps the norm of its argument and raises it elementwise to the power p (default 3), which
turns each feature vector towards its largest channels: pairs of similar q, k become more
similar, dissimilar ones less so, and the attention sharper. s > 0 is a learnable scale per
channel. As in the paper's official code, s = softplus(θ) with θ initialised at 0, ReLU(x) is
shifted by ε = 1e-6 before the division (every feature is positive, so every row of the
attention has a positive normaliser), and f_p acts on the whole token — all heads' channels
together — before the heads are split. The official code also adds a learnable absolute
position embedding to K, which ties a layer to one grid size; it is left out here.

DWC is a depthwise convolution over the token grid with one kernel per head channel, shared by
the heads (as the official code): 1-D over a sequence (batch, n, dim), 2-D over a grid
(batch, H, W, dim) (`grid=2`), kernel 5 by default, zero padding, with bias. The causal form
(sequences only) uses a causal 1-D conv — output t sees values t − kernel + 1 … t — so nothing
leaks, and `step` carries the last kernel − 1 values. Padded keys have their values zeroed
before the conv.

The module applies DWC in `forward`, outside `attend`: `attend` and `materialize` are the
linear attention alone (out = A v with rows of A summing to 1). The DWC is the banded matrix
D_c per channel c (`dwc_matrix`), so channel c of head h mixes the tokens by A_h + D_c plus the
conv bias — full rank where A_h has rank ≤ head_dim. Cost O(N d² + N k^g d): the engine's
linear attention (bidirectional, chunked causal, recurrent step) plus the conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_attention_mask,
    check_finite,
    check_module_dtype,
    check_odd,
    check_qkv,
    check_tensor,
    check_tokens,
)
from ...kernels.linear_scan import (
    LinearState,
    LinearTerms,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
    linear_flops,
)
from .base import LinearAttention

FLATTEN = Paper("P034", "FLatten Transformer: Vision Transformer using Focused Linear Attention", 2023, "2308.00442")
FOCUS_EPS = 1e-6  # shift of ReLU(x) before the scale, as the official code


def _check_power(power: float) -> float:
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power < 1:
        raise ParameterError(f"power: expected a finite float >= 1, got {power!r}")
    return float(power)


def _check_kernel(kernel_size: int) -> int:
    return check_odd("kernel_size", kernel_size)


def focusing_map(x: Tensor, scale: Tensor, *, power: float = 3.0) -> Tensor:
    """φ_p(x) = f_p((ReLU(x) + ε) / s) over x (batch, heads, n, head_dim), f_p on each token's heads × channels.

    scale: s > 0, broadcastable to (heads, head_dim). f_p is positively homogeneous, so it is
    computed on x / max(x) (entries in (0, 1], ‖·^p‖ ≥ 1) and scaled back: nothing overflows at
    any input scale.
    """
    check_tensor("x", x)
    check_tensor("scale", scale)
    power = _check_power(power)
    if x.dim() != 4:
        raise ShapeError(f"x: expected (batch, heads, n, head_dim), got shape {tuple(x.shape)}")
    if bool((scale <= 0).any()):
        raise ValueError("scale: expected s > 0 everywhere, got a non-positive entry")
    u = (torch.relu(x) + FOCUS_EPS) / scale[:, None, :].to(x.dtype)
    top = u.amax(dim=(1, 3), keepdim=True).detach()  # f_p(u) = top · f_p(u / top); the gradient through top is 0
    r = u / top
    rp = r**power
    norm_r = r.pow(2).sum(dim=(1, 3), keepdim=True).sqrt()
    norm_rp = rp.pow(2).sum(dim=(1, 3), keepdim=True).sqrt()
    return rp * (top * norm_r / norm_rp)


def _grid_of(positions: tuple[int, ...], n: int) -> tuple[int, ...]:
    if math.prod(positions) != n:
        raise ShapeError(f"positions: expected a grid of {n} tokens, got {positions} ({math.prod(positions)} tokens)")
    return positions


def depthwise_conv(
    v: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    positions: tuple[int, ...] | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """DWC(V): v (batch, heads, N, head_dim) on the grid `positions` (default (N,)); weight (head_dim, 1, k[, k]).

    Zero padding, kernel centred (or, causal, over the k − 1 previous tokens and the token itself);
    padded tokens (attention_mask False) contribute nothing.
    """
    b, h, n, d = v.shape
    positions = _grid_of(positions or (n,), n)
    g, k = len(positions), weight.shape[-1]
    if weight.dim() != g + 2 or weight.shape[0] != d:
        want = (d, 1) + (k,) * g
        raise ShapeError(f"weight: expected shape {want} for a {g}-D grid of head_dim {d}, got {tuple(weight.shape)}")
    if causal and g != 1:
        raise ValueError(f"causal: the causal conv runs over sequences (1-D grids), got a {g}-D grid")
    check_attention_mask(attention_mask, b, n)
    if attention_mask is not None:
        v = v.masked_fill(~attention_mask[:, None, :, None], 0.0)
    x = v.permute(0, 1, 3, 2).reshape(b * h, d, *positions)
    if g == 1:
        x = F.pad(x, (k - 1, 0) if causal else (k // 2, k // 2))
        y = F.conv1d(x, weight, bias, groups=d)
    else:
        y = F.conv2d(x, weight, bias, padding=k // 2, groups=d)
    return y.reshape(b, h, d, n).permute(0, 1, 3, 2)


def depthwise_conv_matrix(weight: Tensor, positions: tuple[int, ...], *, causal: bool = False) -> Tensor:
    """The DWC as matrices D (head_dim, N, N), positions flattened row-major: DWC(V)[:, c] = D_c V[:, c] + bias_c."""
    d, k = weight.shape[0], weight.shape[-1]
    g = len(positions)
    axes = torch.meshgrid(*(torch.arange(p, device=weight.device) for p in positions), indexing="ij")
    coords = torch.stack([a.reshape(-1) for a in axes], dim=-1)  # (N, g)
    taps = coords[None, :, :] - coords[:, None, :] + (k - 1 if causal else k // 2)  # (N_i, N_j, g): tap of key j at query i
    valid = ((taps >= 0) & (taps < k)).all(dim=-1)
    flat = torch.zeros_like(taps[..., 0])
    for axis in range(g):
        flat = flat * k + taps[..., axis].clamp(0, k - 1)
    return weight.reshape(d, -1)[:, flat] * valid


def _conv_reference(
    v: Tensor, weight: Tensor, bias: Tensor | None, positions: tuple[int, ...], causal: bool, keep: Tensor | None
) -> Tensor:
    """DWC through its banded matrices, in float64."""
    v64 = v.double()
    if keep is not None:
        v64 = v64.masked_fill(~keep[:, None, :, None], 0.0)
    out = torch.einsum("cij,bhjc->bhic", depthwise_conv_matrix(weight.double(), positions, causal=causal), v64)
    return out if bias is None else out + bias.double()


def focused_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Tensor,
    power: float = 3.0,
    dwc_weight: Tensor | None = None,
    dwc_bias: Tensor | None = None,
    positions: tuple[int, ...] | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """Focused linear attention + DWC(V) over (batch, heads, N, head_dim); no DWC when dwc_weight is None.

    scale: s > 0 broadcastable to (heads, head_dim); positions: the token grid (default (N,)).
    """
    check_qkv(q, k, v)
    out = linear_attention(
        focusing_map(q, scale, power=power), focusing_map(k, scale, power=power), v,
        causal=causal, attention_mask=attention_mask, chunk_size=chunk_size,
    )
    if dwc_weight is None:
        return out
    return out + depthwise_conv(v, dwc_weight, dwc_bias, positions=positions, causal=causal, attention_mask=attention_mask)


def focused_linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Tensor,
    power: float = 3.0,
    dwc_weight: Tensor | None = None,
    dwc_bias: Tensor | None = None,
    positions: tuple[int, ...] | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) in float64 arithmetic: weights = the attention matrix A (rows sum to 1), out = A v + D v + bias
    with the DWC's banded matrices D (`depthwise_conv_matrix`). Cast back to q's dtype."""
    check_qkv(q, k, v)
    q64, k64, v64 = q.double(), k.double(), v.double()
    s64 = scale.double()
    out, weights = linear_attention_reference(
        focusing_map(q64, s64, power=power), focusing_map(k64, s64, power=power), v64,
        causal=causal, attention_mask=attention_mask,
    )
    if dwc_weight is not None:
        positions = _grid_of(positions or (v.shape[2],), v.shape[2])
        out = out + _conv_reference(v64, dwc_weight, dwc_bias, positions, causal, attention_mask)
    return out.to(q.dtype), weights.to(q.dtype)


@dataclass
class FocusedState:
    """Decoding state: the linear attention's memory and the last kernel − 1 values (batch, heads, k − 1, head_dim)."""

    linear: LinearState | None
    window: Tensor


def focused_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the defaults (kernel 5, 1-D, chunk 64): the engine's count plus 2·k·n·d per head for the DWC."""
    return linear_flops(n, heads, head_dim, causal) + 2.0 * 5 * n * heads * head_dim


@register(
    name="focused-linear",
    paper=FLATTEN,
    family="A",
    cost="O(N d²)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, grids=(1, 2), decode=True, materialize=True,
                      sharding=("state",)),
    params=(
        Param("power", float, 3.0, "focusing power p of f_p (1 = plain ReLU linear attention)", low=1.0),
        Param("kernel_size", int, 5, "kernel of the depthwise conv on V (odd)", low=1),
        Param("grid", int, 1, "rank of the token grid: 1 (batch, n, dim) or 2 (batch, H, W, dim)", choices=(1, 2)),
        Param("chunk_size", int, 64, "chunk of the causal fast path", low=1, knob=True),
    ),
    summary="Focused linear attention (FLatten): φ_p = f_p(ReLU(x)/s) features, normalised linear attention, plus a depthwise conv on V.",
    normalized=True,
    test_params={"kernel_size": 3, "chunk_size": 4},
    flops=focused_flops,
)
class FocusedLinearAttention(LinearAttention):
    """Multi-head focused linear attention with the DWC on V; `materialize` is the attention part, `dwc_matrix` the conv."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        power: float = 3.0,
        kernel_size: int = 5,
        grid: int = 1,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, normalize=True, chunk_size=chunk_size)
        if grid not in (1, 2):
            raise ParameterError(f"grid: expected 1 (sequence) or 2 (H×W grid), got {grid!r}")
        if causal and grid != 1:
            raise ParameterError("causal: the causal form runs over sequences; expected grid=1 with causal=True, got grid=2")
        self.power, self.kernel_size, self.grid = _check_power(power), _check_kernel(kernel_size), grid
        self.scale = nn.Parameter(torch.zeros(heads, self.head_dim))  # s = softplus(scale), ln 2 at start
        conv = nn.Conv1d if grid == 1 else nn.Conv2d
        self.dwc = conv(self.head_dim, self.head_dim, kernel_size, groups=self.head_dim)

    def feature_scale(self) -> Tensor:
        """s = softplus(θ) > 0, (heads, head_dim)."""
        return F.softplus(self.scale)

    def terms(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> LinearTerms:
        s = self.feature_scale()
        return LinearTerms(focusing_map(q, s, power=self.power), focusing_map(k, s, power=self.power), v)

    def _tokens(
        self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, tuple[int, ...], Tensor | None]:
        """Check x (batch, *grid, dim); flatten the grid; the keep-mask (batch, N) of the padding arguments, which
        may also come on the grid (batch, H, W)."""
        check_tokens("x", x, self.dim, grid_rank=self.grid)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            raise ValueError("context: focused-linear does not support cross-attention (the DWC runs on the query grid)")
        positions = tuple(x.shape[1:-1])
        keep = module_keep_mask(attention_mask, key_padding_mask, x.shape[0], math.prod(positions), positions)
        return x.reshape(x.shape[0], -1, self.dim), positions, keep

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Literal["fast", "reference"] = "fast",
    ) -> Tensor:
        """x (batch, n, dim) or (batch, H, W, dim) -> the same shape: out_proj(attention + DWC(V))."""
        flat, positions, kpm = self._tokens(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(flat)
        out = self.attend(q, k, v, attention_mask=kpm, attn_mask=attn_mask, impl=impl)
        if impl == "fast":
            out = out + depthwise_conv(v, self.dwc.weight, self.dwc.bias, positions=positions, causal=self.causal, attention_mask=kpm)
        else:
            out = out + _conv_reference(v, self.dwc.weight, self.dwc.bias, positions, self.causal, kpm).to(out.dtype)
        return self.out_proj(self.merge_heads(out)).reshape(x.shape)

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The linear attention matrix A (batch, heads, N, N), rows summing to 1; the DWC part is `dwc_matrix`."""
        flat, _, kpm = self._tokens(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(flat)
        check_qkv(q, k, v)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, self.combined_mask(q, k, kpm, attn_mask))[1]

    def dwc_matrix(self, positions: tuple[int, ...] | int) -> Tensor:
        """The DWC as banded (Toeplitz per axis) matrices D (head_dim, N, N) on the grid `positions`, row-major.

        Channel c of every head mixes the tokens by A_h + D_c (plus the conv bias), A = `materialize`.
        """
        positions = (positions,) if isinstance(positions, int) else tuple(positions)
        if len(positions) != self.grid:
            raise ShapeError(f"positions: expected a {self.grid}-D grid, got {positions}")
        return depthwise_conv_matrix(self.dwc.weight, positions, causal=self.causal)

    def decode(self, x_t: Tensor, state: FocusedState | None) -> tuple[Tensor, FocusedState]:
        """One checked token: (y_t (batch, 1, dim), state), equal to the causal forward."""
        q, k, v = self.project(x_t)
        t = self.terms(q, k, v, None)
        out, linear = linear_attention_step(t.q, t.k, t.v, None if state is None else state.linear)
        previous = v.new_zeros(*v.shape[:2], self.kernel_size - 1, v.shape[-1]) if state is None else state.window
        window = torch.cat([previous, v], dim=2)  # values t − k + 1 … t
        conv = torch.einsum("bhjc,cj->bhc", window, self.dwc.weight[:, 0]) + self.dwc.bias
        out = out + conv[:, :, None, :]
        return self.out_proj(self.merge_heads(out)), FocusedState(linear, window[:, :, 1:])
