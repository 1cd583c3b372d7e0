"""Gated positional self-attention, GPSA (d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft
Convolutional Inductive Biases", 2021).

On an H × W grid of patches, with δ_ij = (δ_x, δ_y) = (column of j − column of i, row of j − row of i) the offset
of key j from query i and r_ij = (δ_x, δ_y, ‖δ_ij‖²) its relative encoding, every head h mixes a content softmax and
a positional softmax through a learned gate σ(λ_h):

    C^h_ij = softmax_j(q_i·k_j/√d_h)                    (content: standard attention)
    P^h_ij = softmax_j(v_pos^h · r_ij)                  (position only: the same for every image)
    A^h_ij = normalize_j[(1 − σ(λ_h))·C^h_ij + σ(λ_h)·P^h_ij]
    out    = concat_h(A^h V^h) W_o

normalize_j divides by the row sum (1 whenever a row has a key, so the fast path is (1 − σ)·C V + σ·P V). λ_h is
initialised at 1 (`gate_init`), so heads start mostly positional (σ(1) ≈ 0.73) and can escape locality in training.

Locality initialisation (`local_init=True`, the default): head h gets an offset Δ^h on a K × K grid centred at 0,
K = ⌈√heads⌉, centre c = (K − 1)/2, head h at Δ^h = (⌊h/K⌋ − c, (h mod K) − c) = (Δ_x, Δ_y), and

    v_pos^h = α·(2Δ^h_x, 2Δ^h_y, −1)      so   v_pos^h·r_ij = −α‖δ_ij − Δ^h‖² + α‖Δ^h‖²

a Gaussian-like positional attention peaked at the key at offset Δ^h from the query, α = `locality_strength`
controlling its sharpness (the paper's convolutional init: α large is a K × K convolution). The value projection
is set to the identity (when heads·head_dim = dim), as in the official code. The paper's r_ij = (‖δ‖², δ_x, δ_y)
with v_pos = −α(1, −2Δ_x, −2Δ_y) is this in another order; `position_weights` (heads, 3) keeps the official order
(δ_x, δ_y, ‖δ‖²) so that timm's `pos_proj.weight` loads as is (its bias adds a constant per row: no effect).

Nonlocality (the paper's diagnostic): D^h = (1/N) Σ_i Σ_j A^h_ij ‖δ_ij‖, the mean over queries of the expected
patch distance; `nonlocality(weights, grid)` computes it from (…, heads, N, N) weights, e.g. `materialize(x)`
averaged over the batch as the official `get_attention_map` does.

Deviations and choices. The official code takes a square grid of √N × √N patches and places only ⌊√heads⌋²
heads on the offset grid, leaving the other heads' v_pos at their random init; here any H × W grid is taken (the
module's `grid_shape` or the input's), and every head gets an offset: the first `heads` cells of the ⌈√heads⌉
grid in the official order (identical to the official init for a square head count). ConViT's class token
(added after the GPSA layers) is not part of this operator. Key padding (bool (batch, N) or (batch, H, W)) removes
keys from both softmaxes; a query with no key gives zeros. GPSA is a vision operator: no causal mode and no
cross-attention (the positions r_ij are those of one grid).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_int, check_tensor
from ...kernels.grid import check_grid_qkv
from ...kernels.sdpa import sdpa
from ..local.base import GridAttention, grid_shape_param

CONVIT = Paper("P013", "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases", 2021,
               "2103.10697")


def gpsa_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: the content attention (4·h·N²·d_h), the positional logits and P V (3·h·N² + 2·h·N²·d_h)."""
    return heads * (6.0 * n * n * head_dim + 3.0 * n * n)


def relative_encoding(grid: Sequence[int], *, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """r_ij = (δ_x, δ_y, ‖δ_ij‖²) of key j from query i on an (H, W) grid in raster order: (N, N, 3)."""
    rows, cols = (check_int("grid", g, 1) for g in grid)
    r = torch.arange(rows * cols, device=device) // cols
    c = torch.arange(rows * cols, device=device) % cols
    dx = (c[None, :] - c[:, None]).to(dtype)
    dy = (r[None, :] - r[:, None]).to(dtype)
    return torch.stack((dx, dy, dx * dx + dy * dy), dim=-1)


def head_offsets(heads: int) -> Tensor:
    """Δ^h = (Δ_x, Δ_y) of each head, (heads, 2) float64: head h at (⌊h/K⌋ − c, (h mod K) − c), K = ⌈√heads⌉,
    c = (K − 1)/2."""
    check_int("heads", heads, 1)
    side = math.isqrt(heads - 1) + 1
    centre = (side - 1) / 2
    h = torch.arange(heads, dtype=torch.float64)
    return torch.stack((torch.div(h, side, rounding_mode="floor") - centre, h % side - centre), dim=-1)


def local_position_weights(heads: int, locality_strength: float) -> Tensor:
    """The locality init v_pos^h = α·(2Δ^h_x, 2Δ^h_y, −1), (heads, 3) float64 in the order of `relative_encoding`."""
    offsets = head_offsets(heads)
    return locality_strength * torch.cat((2 * offsets, -torch.ones(heads, 1, dtype=torch.float64)), dim=-1)


def _check(q: Tensor, k: Tensor, v: Tensor, position_weights: Tensor, gate: Tensor,
           attention_mask: Tensor | None) -> tuple[int, int]:
    grid = check_grid_qkv(q, k, v)
    heads = q.shape[1]
    check_tensor("position_weights", position_weights)
    check_tensor("gate", gate)
    if tuple(position_weights.shape) != (heads, 3):
        raise ShapeError(f"position_weights: expected (heads, 3) = ({heads}, 3), got {tuple(position_weights.shape)}")
    if tuple(gate.shape) != (heads,):
        raise ShapeError(f"gate: expected (heads,) = ({heads},), got {tuple(gate.shape)}")
    check_attention_mask(attention_mask, q.shape[0], grid[0] * grid[1])
    return grid[0], grid[1]


def positional_weights(position_weights: Tensor, grid: Sequence[int], attention_mask: Tensor | None = None) -> Tensor:
    """P^h_ij = softmax_j(v_pos^h·r_ij) over the kept keys: (heads, N, N), or (batch, heads, N, N) with padding."""
    logits = torch.einsum("ijc,hc->hij", relative_encoding(grid, device=position_weights.device,
                                                          dtype=position_weights.dtype), position_weights)
    keep = None if attention_mask is None else attention_mask[:, None, None, :]
    return masked_softmax(logits if keep is None else logits[None], keep)


def gpsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    position_weights: Tensor,
    gate: Tensor,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """GPSA on q, k, v (batch, heads, H, W, head_dim): (1 − σ(λ_h))·softmax(q kᵀ·scale) v + σ(λ_h)·softmax(v_pos·r) v.
    position_weights v_pos (heads, 3) in the order (δ_x, δ_y, ‖δ‖²); gate λ (heads,); attention_mask bool (batch, N),
    True = real key. Content on SDPA."""
    grid = _check(q, k, v, position_weights, gate, attention_mask)
    b, h, n = q.shape[0], q.shape[1], grid[0] * grid[1]
    qf, kf, vf = (t.reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    mask = None if attention_mask is None else attention_mask[:, None, None, :]
    content = sdpa(qf, kf, vf, mask, None, scale)
    positional = positional_weights(position_weights.to(q.dtype), grid, attention_mask) @ vf
    g = torch.sigmoid(gate.to(q.dtype)).reshape(1, h, 1, 1)
    return ((1 - g) * content + g * positional).reshape(*q.shape[:-1], v.shape[-1])


def gpsa_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    position_weights: Tensor,
    gate: Tensor,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, N, N)) of `gpsa_attention` in float64: both softmaxes, the gated mix and its row
    normalisation materialised; the offsets δ_ij from each token's (row, column)."""
    rows, cols = _check(q, k, v, position_weights, gate, attention_mask)
    b, h, n = q.shape[0], q.shape[1], rows * cols
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    row = torch.tensor([p // cols for p in range(n)], dtype=torch.float64, device=q.device)
    col = torch.tensor([p % cols for p in range(n)], dtype=torch.float64, device=q.device)
    dx, dy = col[None, :] - col[:, None], row[None, :] - row[:, None]
    w = position_weights.double()
    pos_logits = w[:, 0, None, None] * dx + w[:, 1, None, None] * dy + w[:, 2, None, None] * (dx**2 + dy**2)
    keep = None if attention_mask is None else attention_mask[:, None, None, :]
    content = masked_softmax(torch.einsum("bhid,bhjd->bhij", q64, k64) * scale, keep)
    positional = masked_softmax(pos_logits.expand(b, h, n, n), keep)
    g = torch.sigmoid(gate.double()).reshape(1, h, 1, 1)
    mixed = (1 - g) * content + g * positional
    total = mixed.sum(-1, keepdim=True)
    weights = mixed / torch.where(total > 0, total, torch.ones_like(total))
    out = (weights @ v64).reshape(*q.shape[:-1], v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


def nonlocality(weights: Tensor, grid: Sequence[int]) -> Tensor:
    """The paper's nonlocality D = (1/N) Σ_i Σ_j A_ij ‖δ_ij‖ of attention weights (…, N, N) on an (H, W) grid in
    raster order: (…) (e.g. (batch, heads); average the weights over the batch first for the official metric)."""
    check_tensor("weights", weights)
    rows, cols = (check_int("grid", g, 1) for g in grid)
    n = rows * cols
    if weights.dim() < 2 or weights.shape[-2:] != (n, n):
        raise ShapeError(f"weights: expected (..., N, N) with N = {n} (grid {tuple(grid)}), got {tuple(weights.shape)}")
    distance = relative_encoding((rows, cols), device=weights.device, dtype=weights.dtype)[..., 2].sqrt()
    return (weights * distance).sum((-1, -2)) / n


@register(
    name="gpsa",
    paper=CONVIT,
    family="C",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(key_padding=True, grids=(2,), materialize=True),
    params=(
        Param("locality_strength", float, 1.0, "α: sharpness of the positional attention at the locality init "
              "(v_pos^h = α(2Δ_x, 2Δ_y, −1))", low=0.0),
        Param("local_init", bool, True, "locality init: per-head offsets on a ⌈√heads⌉ grid and W_v = I (else v_pos "
              "drawn at random)"),
        Param("gate_init", float, 1.0, "λ_h at init (the gate is σ(λ_h); 1 as in ConViT)"),
        grid_shape_param(),
    ),
    summary="ConViT's gated positional self-attention: per head σ(λ_h) mixes content softmax and a learned "
            "relative-position softmax, locality init (each head peaked at its offset), nonlocality metric.",
    test_params={"grid_shape": (4, 5), "locality_strength": 0.5},
    test_positions=(4, 5),
    flops=gpsa_flops,
)
class GatedPositionalSelfAttention(GridAttention):
    """GPSA on a 2-D grid of tokens (batch, H, W, dim); `attend(q, k, v)` takes (batch, heads, H, W, head_dim), or flat
    (batch, heads, N, head_dim) with `grid=(H, W)`. `materialize` is the gated, normalised (batch, heads, N, N)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        locality_strength: float = 1.0,
        local_init: bool = True,
        gate_init: float = 1.0,
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, grid_shape=grid_shape)
        if not isinstance(local_init, bool):
            raise TypeError(f"local_init: expected a bool, got {type(local_init).__name__} {local_init!r}")
        if not isinstance(locality_strength, (int, float)) or not 0 <= locality_strength < math.inf:
            raise ParameterError(f"locality_strength: expected a finite float >= 0, got {locality_strength!r}")
        if not isinstance(gate_init, (int, float)) or not math.isfinite(gate_init):
            raise ParameterError(f"gate_init: expected a finite float, got {gate_init!r}")
        self.locality_strength, self.local_init = float(locality_strength), local_init
        self.gate = nn.Parameter(torch.full((heads,), float(gate_init)))
        self.position_weights = nn.Parameter(torch.empty(heads, 3))
        if local_init:
            with torch.no_grad():
                self.position_weights.copy_(local_position_weights(heads, self.locality_strength))
                if heads * self.head_dim == dim:
                    self.v_proj.weight.copy_(torch.eye(dim))
        else:
            nn.init.normal_(self.position_weights, std=1.0 / math.sqrt(3))

    def _options(self) -> dict[str, object]:
        return {"position_weights": self.position_weights, "gate": self.gate, "scale": self.scale}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path; `mask` is the key padding keep-mask (batch, N) or None."""
        return gpsa_attention(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return gpsa_attention_reference(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"locality_strength={self.locality_strength}, local_init={self.local_init}"
