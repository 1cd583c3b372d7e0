"""Halo attention (Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual
Backbones", 2021 — HaloNets) on a 2-D grid of tokens.

The H × W map is cut into non-overlapping b × b query blocks. Every query of block (I, J)
attends to the keys of the (b + 2h) × (b + 2h) window around its block (the block grown by
the halo h on every side):

    W(I, J) = [I·b − h, I·b + b + h) × [J·b − h, J·b + b + h)
    out_i = Σ_{j ∈ W(block(i))} softmax_j((q_i·k_j + q_i·r^H_{y_j − y_i} + q_i·r^W_{x_j − x_i})·scale) v_j

with the paper's 2-D relative logits: learnable embeddings r^H (heights) and r^W (widths) per
head, one per relative offset in [−(b + h − 1), b + h − 1] (tables (heads, 2(b + h) − 1,
head_dim)), their logits added to the content logit before the scale, as in the relative
attention HaloNets build on (Bello et al., 2019). Window positions outside the map are
masked (the paper pads; here padded positions are not keys, they get no weight).

Choices: H and W must be multiples of b (the paper's blocked layout; pad the map yourself and
pass attention_mask), and a halo reaching past every key (h > max(H, W) − b) is refused.

The fast path unfolds each block's key / value window ((H/b)(W/b) windows of (b + 2h)²
positions) and runs batched matmuls per block: memory O(N·(b + 2h)²/b²·d) for the windows and
O(N·(b + 2h)²) for the scores, cost O(N·(b + 2h)²·d); autograd goes through the torch ops.
The reference materialises the masked N × N matrix in float64, positions in raster order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import DTypeError, ShapeError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_int, check_tensor
from ...kernels.grid import check_grid_qkv, grid_padding
from .base import GridAttention, grid_shape_param

HALO = Paper("P007", "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", 2021, "2103.12731")
BLOCK_SIZE, HALO_SIZE = 8, 3


def halo_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q·k, the relative logits and A·v at the defaults b = 8, h = 3: every query is
    scored against its block's whole (b + 2h)² window, 4·h·d·n·(b + 2h)² (+ 2·h·d·n·2(2(b + h) − 1))."""
    window = (BLOCK_SIZE + 2 * HALO_SIZE) ** 2
    return 4.0 * heads * head_dim * n * window + 4.0 * heads * head_dim * n * (2 * (BLOCK_SIZE + HALO_SIZE) - 1)


def relative_size(block_size: int, halo: int) -> int:
    """Relative offsets along one axis between a query and the keys of its window: 2(b + h) − 1."""
    return 2 * (block_size + halo) - 1


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    halo: int,
    rel_h: Tensor | None,
    rel_w: Tensor | None,
    attention_mask: Tensor | None,
) -> tuple[tuple[int, int], Tensor | None]:
    """(grid, attention_mask (batch, N) or None) after checking everything."""
    height, width = check_grid_qkv(q, k, v)
    check_int("block_size", block_size)
    check_int("halo", halo, 0)
    if height % block_size or width % block_size:
        raise ShapeError(
            f"block_size: the grid {(height, width)} is not a multiple of block_size={block_size} on every axis; "
            "expected H and W divisible by the block size (pad the map and mask the padding with attention_mask)"
        )
    if halo > max(height, width) - block_size:
        raise ShapeError(
            f"halo: halo={halo} reaches past every key of the grid {(height, width)} with block_size={block_size}; "
            f"expected halo <= max(H, W) − block_size = {max(height, width) - block_size}"
        )
    want = (q.shape[1], relative_size(block_size, halo), q.shape[-1])
    for name, table in (("rel_h", rel_h), ("rel_w", rel_w)):
        if table is None:
            continue
        check_tensor(name, table)
        if tuple(table.shape) != want:
            raise ShapeError(f"{name}: expected shape (heads, 2(block_size + halo) − 1, head_dim) = {want}, got {tuple(table.shape)}")
        if table.dtype != q.dtype:
            raise DTypeError(f"{name}: expected dtype {q.dtype} (as q), got {table.dtype}")
    return (height, width), grid_padding(attention_mask, q.shape[0], (height, width))


# -- the fast path -----------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _window_table(grid: tuple[int, int], block_size: int, halo: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(index (blocks·S,), inside (blocks, S)): for every block (raster order) and each of the S = (b + 2h)²
    slots of its window (raster order), the position in the map padded by h on every side, flattened, and
    whether the slot lies inside the map."""
    height, width = grid
    size = block_size + 2 * halo
    top = torch.arange(0, height, block_size, device=device)[:, None, None, None]
    left = torch.arange(0, width, block_size, device=device)[None, :, None, None]
    u = torch.arange(size, device=device)
    y, x = top + u[:, None], left + u[None, :]  # padded coordinates (nbh, nbw, size, size)
    inside = (y >= halo) & (y < height + halo) & (x >= halo) & (x < width + halo)
    index = y * (width + 2 * halo) + x
    return index.reshape(-1), inside.reshape(-1, size * size)


def _windows(x: Tensor, index: Tensor, halo: int, slots: int) -> Tensor:
    """(..., H, W, c) -> (..., blocks, slots, c): each block's halo window (gathered through `index` of
    `_window_table`), zero outside the map."""
    padded = F.pad(x, (0, 0, halo, halo, halo, halo)).flatten(-3, -2)
    return padded.index_select(-2, index).unflatten(-2, (-1, slots))


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """(..., H, W, c) -> (..., blocks, b², c), blocks and their positions in raster order."""
    *lead, height, width, c = x.shape
    b = block_size
    x = x.reshape(*lead, height // b, b, width // b, b, c).transpose(-4, -3)
    return x.reshape(*lead, (height // b) * (width // b), b * b, c)


def _window_offsets(block_size: int, halo: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(b², b + 2h) index of key − query + b + h − 1 into the relative tables, for every query slot of a
    block (raster order) and every window row (height) / window column (width)."""
    b, size = block_size, block_size + 2 * halo
    t, u = torch.arange(b * b, device=device)[:, None], torch.arange(size, device=device)[None, :]
    return u - halo - t // b + b + halo - 1, u - halo - t % b + b + halo - 1


def halo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = BLOCK_SIZE,
    halo: int = HALO_SIZE,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Halo attention of q, k, v (batch, heads, H, W, head_dim).

    rel_h, rel_w: relative embeddings (heads, 2(block_size + halo) − 1, head_dim), row r for the
    offset r − (block_size + halo − 1) (key − query); attention_mask: bool (batch, H·W) in raster
    order or (batch, H, W), True = real token (a query whose window holds no real key gives 0);
    scale defaults to 1/√head_dim. Returns (batch, heads, H, W, head_dim of v).
    """
    (height, width), kpm = _check(q, k, v, block_size, halo, rel_h, rel_w, attention_mask)
    b, heads, d, e = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qb = _blocks(q * scale, block_size)  # (B, heads, nb, b², d)
    size = block_size + 2 * halo
    index, inside = _window_table((height, width), block_size, halo, q.device)
    kw, vw = (_windows(t, index, halo, size * size) for t in (k, v))  # (B, heads, nb, S, d)
    scores = qb @ kw.transpose(-1, -2)  # (B, heads, nb, b², S), S = (b + 2h)² window slots in raster order
    if rel_h is not None or rel_w is not None:
        # q·r^H depends on the window row only, q·r^W on the window column: (b², b + 2h) each, broadcast
        iy, ix = _window_offsets(block_size, halo, q.device)
        slots = torch.arange(block_size * block_size, device=q.device)[:, None]
        rel = [torch.einsum("bhnqd,hrd->bhnqr", qb, table)[..., slots, offsets] if table is not None else None
               for table, offsets in ((rel_h, iy), (rel_w, ix))]  # each (B, heads, nb, b², b + 2h)
        if rel[0] is None or rel[1] is None:
            one = rel[0] if rel[1] is None else rel[1]
            zero = torch.zeros_like(one)
            rel = [one, zero] if rel[1] is None else [zero, one]
        scores = scores + (rel[0].unsqueeze(-1) + rel[1].unsqueeze(-2)).flatten(-2)
    keep = inside[:, None, :]  # (nb, 1, S)
    if kpm is not None:
        real = F.pad(kpm.reshape(b, height, width), (halo, halo, halo, halo)).flatten(1)[:, index]
        keep = keep & real.view(b, 1, -1, 1, size * size)
    if not bool(keep.all()):
        scores = scores + torch.zeros(keep.shape, dtype=scores.dtype, device=q.device).masked_fill_(
            ~keep, torch.finfo(scores.dtype).min / 2)
    weights = torch.softmax(scores, dim=-1)
    if kpm is not None:
        weights = weights * keep.any(dim=-1, keepdim=True)  # a window without a real key gives 0
    out = weights @ vw  # (B, heads, nb, b², e)
    nbh, nbw = height // block_size, width // block_size
    out = out.reshape(b, heads, nbh, nbw, block_size, block_size, e).transpose(3, 4)
    return out.reshape(b, heads, height, width, e)


# -- the reference -----------------------------------------------------------------------------
def halo_mask(grid: Sequence[int], block_size: int, halo: int, device: torch.device | None = None) -> Tensor:
    """bool (N, N), raster order: True where key j lies in the halo window of query i's block."""
    height, width = grid
    y = torch.arange(height, device=device).repeat_interleave(width)
    x = torch.arange(width, device=device).repeat(height)
    top, left = (y // block_size) * block_size, (x // block_size) * block_size
    rows = (y[None, :] >= top[:, None] - halo) & (y[None, :] < top[:, None] + block_size + halo)
    cols = (x[None, :] >= left[:, None] - halo) & (x[None, :] < left[:, None] + block_size + halo)
    return rows & cols


def halo_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = BLOCK_SIZE,
    halo: int = HALO_SIZE,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, N, N)) of `halo_attention` in float64 over the full masked
    matrix (positions in raster order), cast back to q's dtype."""
    (height, width), kpm = _check(q, k, v, block_size, halo, rel_h, rel_w, attention_mask)
    b, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    n = height * width
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64, v64 = (t.double().reshape(b, heads, n, t.shape[-1]) for t in (q, k, v))
    keep = halo_mask((height, width), block_size, halo, q.device)
    scores = q64 @ k64.transpose(-1, -2)
    y = torch.arange(height, device=q.device).repeat_interleave(width)
    x = torch.arange(width, device=q.device).repeat(height)
    offset = block_size + halo - 1
    for table, pos in ((rel_h, y), (rel_w, x)):
        if table is not None:
            index = (pos[None, :] - pos[:, None] + offset).clamp(0, 2 * offset)  # clamped off the windows (masked)
            rel = torch.einsum("bhid,hrd->bhir", q64, table.double())
            scores = scores + rel.gather(-1, index.expand(b, heads, n, n))
    mask = keep[None, None] if kpm is None else keep[None, None] & kpm[:, None, None, :]
    weights = masked_softmax(scores * scale, mask)
    out = (weights @ v64).reshape(b, heads, height, width, v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


# -- the module --------------------------------------------------------------------------------
@register(
    name="halo",
    paper=HALO,
    family="A",
    cost="O(N·(b+2h)²·d)",
    exponent=1.0,
    supports=Supports(key_padding=True, grids=(2,), materialize=True),
    params=(
        Param("block_size", int, BLOCK_SIZE, "query block b (H and W must be multiples of it)", low=1),
        Param("halo", int, HALO_SIZE, "halo h: keys from the (b + 2h)² window around each block", low=0),
        Param("rel_pos", bool, True, "learnable 2-D relative logits (per-head height and width embeddings)"),
        grid_shape_param(),
    ),
    summary="Halo attention (HaloNets): b×b query blocks attend to their (b+2h)² halo window, 2-D relative logits.",
    test_params={"block_size": 2, "halo": 1, "grid_shape": (4, 4)},
    test_positions=(4, 4),
    flops=halo_flops,
)
class HaloAttention(GridAttention):
    """Multi-head halo attention on a 2-D grid of tokens (batch, H, W, dim).

    attention_mask is bool (batch, N) in raster order or (batch, H, W). `attend(q, k, v)` takes the
    projected heads as (batch, heads, H, W, head_dim), or flat (batch, heads, N, head_dim) with
    `grid=(H, W)` (or the module's `grid_shape`), and answers in the same layout. `materialize` is
    (batch, heads, N, N) in raster order, zero outside each block's window.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        block_size: int = BLOCK_SIZE,
        halo: int = HALO_SIZE,
        rel_pos: bool = True,
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, grid_shape=grid_shape)
        self.block_size, self.halo = check_int("block_size", block_size), check_int("halo", halo, 0)
        self.rel_h: nn.Parameter | None = None
        self.rel_w: nn.Parameter | None = None
        if rel_pos:
            shape = (heads, relative_size(block_size, halo), self.head_dim)
            self.rel_h = nn.Parameter(torch.randn(shape) * self.head_dim**-0.5)
            self.rel_w = nn.Parameter(torch.randn(shape) * self.head_dim**-0.5)

    def _options(self) -> dict[str, object]:
        return {"block_size": self.block_size, "halo": self.halo, "rel_h": self.rel_h, "rel_w": self.rel_w,
                "scale": self.scale}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path on (batch, heads, H, W, head_dim); `mask` is the key padding mask (batch, N) or None."""
        return halo_attention(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return halo_attention_reference(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, halo={self.halo}, rel_pos={self.rel_h is not None}"
