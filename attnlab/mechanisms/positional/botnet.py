"""BoTNet's multi-head self-attention with 2-D relative position logits (Srinivas et al., "Bottleneck Transformers
for Visual Recognition", 2021).

BoTNet replaces the 3 × 3 convolution of the last ResNet bottleneck blocks by global multi-head self-attention over
the H × W positions of the feature map. A token i sits at (row x_i, column y_i); the position term of key j seen from
query i is the sum of a row and a column relative embedding, shared by all heads,

    r_ij = R^H[x_j − x_i] + R^W[y_j − y_i]        R^H ∈ R^{(2H−1) × d_h},  R^W ∈ R^{(2W−1) × d_h}

and each head h adds the content-position logits q_i·r_ij to the content-content logits q_i·k_j (the paper's Fig. 4):

    logits^h_ij = s·(q^h_i·k^h_j + q^h_i·r_ij)        s = 1/√d_h
    A^h = softmax_j(logits^h),    out = concat_h(A^h V^h) W_o

The scale: the paper's figure writes q kᵀ + q rᵀ without a scale; its reference code (the gist linked from the paper,
after Attention Augmented Convolution) multiplies q by d_h^−1/2 before both products, so both logits are scaled
(`scale_position_logits=True`, the default). timm's `BottleneckAttn` scales only the content logits by default
(its `scale_pos_embed=False`): `scale_position_logits=False` gives that, logits = s·q·k + q·r.

Table sizes. R^H and R^W are learned for a grid of `max_grid` = (H_max, W_max): offsets −(H_max−1)…H_max−1 and
−(W_max−1)…W_max−1 (index δ + H_max − 1). An input on a smaller grid uses the offsets it has (the embedding of an
offset does not depend on the grid), a larger one is refused; with the grid equal to `max_grid` this is timm's
`PosEmbedRel` (which requires it). Initialisation: N(0, d_h^−1/2) as timm and the gist.

Not part of the operator: BoTNet's stride-2 2 × 2 average pooling after the MHSA in the first block of a stage, the
1 × 1 convolutions and normalisation of the bottleneck block around it (timm's `BottleneckAttn` has no output
projection; its block's following 1 × 1 conv plays that part: W_o = I maps it). Key padding (bool (batch, N) or
(batch, H, W)) removes keys; a query with no key gives zeros. No causal mode and no cross-attention: the relative
offsets are those of one image grid.

Fast path: the per-axis products q·R (2H−1 and 2W−1 columns per query) gathered to absolute key rows/columns,
summed to the (N × N) score bias of SDPA. Reference: r_ij built per pair from each token's (row, column), float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_pair, check_tensor
from ...kernels.grid import check_grid_qkv
from ...kernels.sdpa import sdpa
from ..local.base import GridAttention, grid_shape_param

BOTNET = Paper("P106", "Bottleneck Transformers for Visual Recognition", 2021, "2101.11605")


def botnet_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: q kᵀ and A v (4·h·N²·d_h), q·R per axis (≈ 4·h·N·√N·d_h) and the bias sum (h·N²)."""
    side = math.sqrt(n)
    return heads * (4.0 * n * n * head_dim + 4.0 * n * (2 * side - 1) * head_dim + n * n)


def _check(q: Tensor, k: Tensor, v: Tensor, rel_rows: Tensor, rel_cols: Tensor,
           attention_mask: Tensor | None) -> tuple[int, int]:
    rows, cols = check_grid_qkv(q, k, v)
    for name, table, side in (("rel_rows", rel_rows, rows), ("rel_cols", rel_cols, cols)):
        check_tensor(name, table)
        axis = "rows H" if name == "rel_rows" else "columns W"
        if table.dim() != 2 or table.shape[-1] != q.shape[-1] or table.shape[0] % 2 == 0:
            raise ShapeError(f"{name}: expected (2·max − 1, head_dim) = (odd, {q.shape[-1]}), got {tuple(table.shape)}")
        if table.shape[0] < 2 * side - 1:
            raise ShapeError(f"{name}: holds offsets up to ±{(table.shape[0] - 1) // 2}, the grid's {side} {axis} "
                             f"need ±{side - 1} (build with a larger max_grid)")
    check_attention_mask(attention_mask, q.shape[0], rows * cols)
    return rows, cols


def _axis_logits(q: Tensor, table: Tensor, axis: int) -> Tensor:
    """q·R[pos_key − pos_query] along one grid axis (axis 2: rows, 3: columns) of q (b, h, H, W, d): (b, h, H, W, size)."""
    size = q.shape[axis]
    centre = (table.shape[0] - 1) // 2
    local = table[centre - size + 1 : centre + size].to(q.dtype)  # offsets −(size−1)…size−1
    by_offset = q @ local.transpose(0, 1)  # (b, h, H, W, 2·size − 1)
    pos = torch.arange(size, device=q.device)
    index = pos[None, :] - pos[:, None] + size - 1  # [query position, key position] -> offset index
    shape = [1, 1, 1, 1, size]
    shape[axis] = size
    index = index.reshape(shape).expand(*q.shape[:-1], size)
    return torch.gather(by_offset, -1, index)


def position_logits(q: Tensor, rel_rows: Tensor, rel_cols: Tensor) -> Tensor:
    """The content-position logits q_i·(R^H[x_j − x_i] + R^W[y_j − y_i]) of q (batch, heads, H, W, d): (batch, heads,
    N, N), positions in raster order (unscaled)."""
    b, h, rows, cols = q.shape[:4]
    along_rows = _axis_logits(q, rel_rows, 2)  # (b, h, H, W, H): key row
    along_cols = _axis_logits(q, rel_cols, 3)  # (b, h, H, W, W): key column
    return (along_rows[..., :, None] + along_cols[..., None, :]).reshape(b, h, rows * cols, rows * cols)


def botnet_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    rel_rows: Tensor,
    rel_cols: Tensor,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    scale_position_logits: bool = True,
) -> Tensor:
    """BoTNet MHSA on q, k, v (batch, heads, H, W, head_dim): softmax(s·q kᵀ + s'·q rᵀ) v with r_ij = R^H[x_j − x_i] +
    R^W[y_j − y_i]; rel_rows (2·H_max − 1, head_dim), rel_cols (2·W_max − 1, head_dim) indexed by offset + max − 1;
    s = scale (1/√head_dim), s' = s with scale_position_logits else 1; attention_mask bool (batch, N), True = real key."""
    rows, cols = _check(q, k, v, rel_rows, rel_cols, attention_mask)
    b, h, n = q.shape[0], q.shape[1], rows * cols
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = position_logits(q, rel_rows, rel_cols)
    if scale_position_logits:
        bias = bias * s
    qf, kf, vf = (t.reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    mask = None if attention_mask is None else attention_mask[:, None, None, :]
    return sdpa(qf, kf, vf, mask, bias, s).reshape(*q.shape[:-1], v.shape[-1])


def botnet_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    rel_rows: Tensor,
    rel_cols: Tensor,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    scale_position_logits: bool = True,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, N, N)) of `botnet_attention` in float64, r_ij (N, N, head_dim) built pair by pair
    from each token's (row, column)."""
    rows, cols = _check(q, k, v, rel_rows, rel_cols, attention_mask)
    b, h, n = q.shape[0], q.shape[1], rows * cols
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s_pos = s if scale_position_logits else 1.0
    q64, k64, v64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    centre_r, centre_c = (rel_rows.shape[0] - 1) // 2, (rel_cols.shape[0] - 1) // 2
    r = torch.empty(n, n, q.shape[-1], dtype=torch.float64, device=q.device)
    for i in range(n):
        for j in range(n):
            dx, dy = j // cols - i // cols, j % cols - i % cols
            r[i, j] = rel_rows[centre_r + dx].double() + rel_cols[centre_c + dy].double()
    logits = s * torch.einsum("bhid,bhjd->bhij", q64, k64) + s_pos * torch.einsum("bhid,ijd->bhij", q64, r)
    keep = None if attention_mask is None else attention_mask[:, None, None, :]
    weights = masked_softmax(logits, keep)
    out = (weights @ v64).reshape(*q.shape[:-1], v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


@register(
    name="botnet",
    paper=BOTNET,
    family="C",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(key_padding=True, grids=(2,), materialize=True),
    params=(
        Param("max_grid", tuple, (64, 64), "the largest grid (H, W): the relative tables hold 2H − 1 row and 2W − 1 "
              "column offsets; a smaller grid uses the offsets it has", low=1),
        Param("scale_position_logits", bool, True, "scale q·r by 1/√d_h as q·k (the paper's code); False: only q·k "
              "(timm's BottleneckAttn default)"),
        grid_shape_param(),
    ),
    summary="BoTNet MHSA: global self-attention over an H × W grid with content-position logits q·(R^H[Δrow] + "
            "R^W[Δcol]), the relative row and column embeddings shared by the heads.",
    test_params={"max_grid": (5, 6), "grid_shape": (4, 5)},
    test_positions=(4, 5),
    flops=botnet_flops,
)
class BoTNetAttention(GridAttention):
    """BoTNet's MHSA on a 2-D grid (batch, H, W, dim); `attend(q, k, v)` takes (batch, heads, H, W, head_dim), or flat
    (batch, heads, N, head_dim) with `grid=(H, W)`. `materialize` is the (batch, heads, N, N) softmax weights."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        max_grid: Sequence[int] = (64, 64),
        scale_position_logits: bool = True,
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, grid_shape=grid_shape)
        if not isinstance(scale_position_logits, bool):
            raise TypeError(f"scale_position_logits: expected a bool, got {scale_position_logits!r}")
        self.max_grid = check_pair("max_grid", max_grid)
        if self.grid_shape is not None and any(g > m for g, m in zip(self.grid_shape, self.max_grid)):
            raise ParameterError(f"grid_shape: expected a grid within max_grid {self.max_grid}, got {self.grid_shape}")
        self.scale_position_logits = scale_position_logits
        std = self.head_dim**-0.5
        self.rel_rows = nn.Parameter(torch.randn(2 * self.max_grid[0] - 1, self.head_dim) * std)
        self.rel_cols = nn.Parameter(torch.randn(2 * self.max_grid[1] - 1, self.head_dim) * std)

    def _options(self) -> dict[str, object]:
        return {"rel_rows": self.rel_rows, "rel_cols": self.rel_cols, "scale": self.scale,
                "scale_position_logits": self.scale_position_logits}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path; `mask` is the key padding keep-mask (batch, N) or None."""
        return botnet_attention(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return botnet_attention_reference(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"max_grid={self.max_grid}, scale_position_logits={self.scale_position_logits}"
