"""Aggregated attention (Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
CVPR 2024) on a 2-D grid of tokens (H, W).

Every query attends, under ONE softmax, to the k×k sliding window around it (fine, near) and
to p×p pooled summaries of the whole map (coarse, far):

    q̃_i  = (q̂_i + e_h) · softplus(τ_h) · log(n_i + p²)                 (q̂, k̂: L2-normalised)
    a_i  = softmax([ q̃_i·k̂_j + B_h[j − i]  for j in window(i) ;  q̃_i·k̂^p_m + C_h(i, m)  for m = 1..p² ])
    out_i = Σ_{j ∈ window(i)} (a_ij + q̂_i·T_h[j − i] + t_h[j − i]) v_j  +  Σ_m a_im v^p_m

* window(i): the k×k positions centred on i that lie in the grid (the map is zero-padded and
  the padded positions masked, so border queries see fewer keys); n_i is their number, so the
  logit scale log(n_i + p²) grows with the number of keys the query sees.
* e_h: a learnable query embedding; τ_h: a learnable temperature (softplus keeps it positive,
  initialised at 1/0.24); B_h: a learnable bias per window offset (the relative position bias
  of the window part).
* pooled keys / values: X^p = LayerNorm(AdaptiveAvgPool_{p×p}(GELU(Conv_{1×1}(X)))), then
  k^p, v^p = the same key / value projections as the tokens'; C_h(i, m): a continuous relative
  position bias, an MLP (2 → cpb_hidden → heads, ReLU) of the log-spaced offset between token i
  and the centre of pooled cell m (offsets in units of 8/(H − 1), 8/(W − 1), mapped by
  sign(x)·log2(1 + |x|)/3), as in the official code.
* T_h, t_h ("learnable tokens" and their bias): query-dependent, key-content-independent
  affinities added to the window weights after the softmax; so the rows of the effective
  weights do not sum to 1 in general.

The fast path loops over the k² window offsets (a shifted view of the zero-padded keys per
offset: one elementwise product and sum for the logits, one multiply-add for the output) and
does one matmul against the p² pooled keys, then the joint softmax: memory O(N·(k² + p²) + N·d),
no unfold of the keys or values, no N×N tensor. Cost O(N·(k² + p²)·d). The position-bias MLP
runs once per forward on the U distinct token-to-cell offsets (U ≤ N·p²; about 4N on a 64×64
grid with p = 7), its hidden layer U × cpb_hidden being the largest tensor at small d; the offset
table is cached per (grid, p).

No N×N matrix maps the input values to the output: the pooled values are projections of
LayerNorm(pool(GELU(conv(x)))), not averages of the tokens' values (were they, the matrix would
be W_window + W_pool·P with P the pooling matrix). The keys are therefore [the N tokens ; the p²
pooled summaries] (registered with `summary_keys`, `key_count((H, W))` = N + p²): `materialize(x)`
gives the exact (batch, heads, N, N + p²) weights W over them and `key_values(x)` their keys and
values, so that out = W v_keys = W[..., :N] v + W[..., N:] v^p. The token part is the window
weights plus the learnable-token affinities, so rows do not sum to 1 (they do without the
learnable tokens). `attend(q, k, v)` takes k, v of N + p² rows, [tokens ; pooled] as `key_values`
gives them (the operator the speed benchmark times), or the token heads alone, whose p×p adaptive
averages then stand for the pooled ones.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.module import Impl
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_grid_shape, check_int, check_odd, check_pair, check_qkv, check_tensor
from ...kernels.grid import check_grid_qkv, refuse_masks
from .base import GridAttention, SummaryKeyAttention, grid_shape_param

TRANSNEXT = Paper("P238", "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", 2024, "2311.17132")
KERNEL_SIZE = 3  # TransNeXt's window
POOL_SIZE = 7  # TransNeXt's pooled grid at 224² input (56/8, 28/4, 14/2)
CPB_HIDDEN = 512
TEMPERATURE = 1 / 0.24  # softplus(τ) at initialisation
EPS = 1e-12
WHY_NO_MASK = "its pooled keys average every token"


def aggregated_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the logits and the weighted sums: 4·h·d·N·(k² + p²) at the defaults."""
    return 4.0 * heads * head_dim * n * (KERNEL_SIZE**2 + POOL_SIZE**2)


# -- geometry ------------------------------------------------------------------------------------
def window_valid(grid: Sequence[int], kernel_size: int, device: torch.device | None = None) -> Tensor:
    """bool (H, W, k²): window offset o = (dy, dx) (row-major, centred) of query (r, c) lies in the grid."""
    offs = torch.arange(kernel_size, device=device) - kernel_size // 2
    rows = torch.arange(grid[0], device=device)[:, None] + offs
    cols = torch.arange(grid[1], device=device)[:, None] + offs
    rows, cols = (rows >= 0) & (rows < grid[0]), (cols >= 0) & (cols < grid[1])
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(grid[0], grid[1], kernel_size * kernel_size)


def check_geometry(grid: Sequence[int], kernel_size: int, pool_size: int | None = None) -> None:
    """The window is odd and within the grid; the pooled grid is no finer than the grid."""
    check_odd("kernel_size", kernel_size, meaning="(the window is centred)")
    if kernel_size > min(grid):
        raise ValueError(f"kernel_size: expected a window within the grid {tuple(grid)}, got kernel_size={kernel_size}")
    if pool_size is not None and pool_size > min(grid):
        raise ValueError(
            f"pool_size: expected a pooled grid no finer than the grid {tuple(grid)}, got pool_size={pool_size}"
        )


def pool_matrix(length: int, pool: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """(pool, length): row i averages the positions of adaptive-average-pooling bin i,
    [⌊i·L/p⌋, ⌈(i+1)·L/p⌉)."""
    out = torch.zeros(pool, length, dtype=dtype)
    for i in range(pool):
        start, end = (i * length) // pool, -((-(i + 1) * length) // pool)
        out[i, start:end] = 1.0 / (end - start)
    return out


@functools.lru_cache(maxsize=32)
def cpb_coordinates(grid: tuple[int, int], pool: int) -> tuple[Tensor, Tensor]:
    """(table (U, 2), index (N·p²,)): the distinct log-spaced offsets between every token and every
    pooled-cell centre, and where each (token, cell) pair finds its offset in the table. Cached per
    (grid, pool): the result is shared, do not modify it."""
    values, codes = [], []
    for length in grid:
        pos = torch.arange(length, dtype=torch.float64)
        centres = pool_matrix(length, pool) @ pos
        rel = (pos[:, None] - centres[None, :]) / max(length - 1, 1) * 8.0  # (L, p)
        u, inv = torch.unique(rel, return_inverse=True)
        values.append(u)
        codes.append(inv)
    width = values[1].numel()
    pair = codes[0][:, None, :, None] * width + codes[1][None, :, None, :]  # (H, W, p, p): one code per offset pair
    used, index = torch.unique(pair.reshape(-1), return_inverse=True)
    table = torch.stack([values[0][used // width], values[1][used % width]], -1)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0, index


# -- the fast path ---------------------------------------------------------------------------------
def _pooled_flat(name: str, t: Tensor) -> Tensor:
    check_tensor(name, t)
    if t.dim() not in (4, 5):
        raise ShapeError(f"{name}: expected (batch, heads, M, d) or (batch, heads, p, p, d), got shape {tuple(t.shape)}")
    return t.flatten(2, 3) if t.dim() == 5 else t


def _check(
    q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, kernel_size: int,
    local_bias: Tensor | None, pool_bias: Tensor | None, local_extra: Tensor | None,
) -> tuple[tuple[int, int], Tensor, Tensor]:
    height, width = check_grid_qkv(q, k, v)
    grid = (height, width)
    check_geometry(grid, kernel_size)
    kp, vp = _pooled_flat("k_pool", k_pool), _pooled_flat("v_pool", v_pool)
    check_qkv(q.flatten(2, 3), kp, vp)
    b, h, n, m, kk = q.shape[0], q.shape[1], grid[0] * grid[1], kp.shape[2], kernel_size * kernel_size
    for name, t, shape in (("local_bias", local_bias, (h, kk)), ("pool_bias", pool_bias, (h, n, m)),
                           ("local_extra", local_extra, (b, h, *grid, kk))):
        if t is not None and tuple(t.shape) != shape:
            raise ShapeError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return grid, kp, vp


def aggregated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    *,
    kernel_size: int = KERNEL_SIZE,
    local_bias: Tensor | None = None,
    pool_bias: Tensor | None = None,
    local_extra: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Window + pooled keys under one softmax: q, k, v (batch, heads, H, W, d); k_pool, v_pool
    (batch, heads, M, d) or (batch, heads, p, p, d).

    logits = [q_i·k_j·scale + local_bias[h, o(j − i)] (j in the k×k window of i, inside the grid) ;
    q_i·k^p_m·scale + pool_bias[h, i, m]]; out_i = Σ_j (a_ij + local_extra[b, h, i, o]) v_j + Σ_m a_im v^p_m.
    The module passes normalised, scaled q and k with scale = 1. Returns (batch, heads, H, W, d_v).
    """
    (h, w), kp, vp = _check(q, k, v, k_pool, v_pool, kernel_size, local_bias, pool_bias, local_extra)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    r = kernel_size // 2
    k_pad = F.pad(k, (0, 0, r, r, r, r))
    v_pad = F.pad(v, (0, 0, r, r, r, r))
    offsets = [(dy, dx) for dy in range(kernel_size) for dx in range(kernel_size)]
    local = torch.stack([(q * k_pad[:, :, dy : dy + h, dx : dx + w]).sum(-1) for dy, dx in offsets], -1) * scale
    if local_bias is not None:
        local = local + local_bias[:, None, None, :]
    local = local.masked_fill(~window_valid((h, w), kernel_size, q.device), float("-inf"))
    flat_q = q.flatten(2, 3)
    pooled = (flat_q @ kp.transpose(-1, -2)) * scale
    if pool_bias is not None:
        pooled = pooled + pool_bias
    kk = kernel_size * kernel_size
    weights = torch.softmax(torch.cat([local.flatten(2, 3), pooled], -1), -1)
    w_local, w_pool = weights.split([kk, kp.shape[2]], -1)
    w_local = w_local.unflatten(2, (h, w))
    if local_extra is not None:  # out-of-grid offsets meet zero-padded values: they add nothing
        w_local = w_local + local_extra
    out = w_pool @ vp
    out = out.unflatten(2, (h, w))
    for o, (dy, dx) in enumerate(offsets):
        out = out + w_local[..., o : o + 1] * v_pad[:, :, dy : dy + h, dx : dx + w]
    return out


# -- the reference -------------------------------------------------------------------------------
def window_offsets(grid: Sequence[int], kernel_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(inside (N, N) bool, offset (N, N) long) in raster order: key j is in query i's k×k window,
    at window offset index (Δr + r)·k + (Δc + r)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    r = kernel_size // 2
    dr, dc = rows[None, :] - rows[:, None] + r, cols[None, :] - cols[:, None] + r
    inside = (dr >= 0) & (dr < kernel_size) & (dc >= 0) & (dc < kernel_size)
    return inside, (dr * kernel_size + dc).clamp(0, kernel_size * kernel_size - 1)


def aggregated_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    *,
    kernel_size: int = KERNEL_SIZE,
    local_bias: Tensor | None = None,
    pool_bias: Tensor | None = None,
    local_extra: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `aggregated_attention` in float64 over the dense (N, N + M) logits: the
    token part masked outside each window, the biases placed by window offset; weights (batch,
    heads, N, N + M), the token part including local_extra, so out = W [v ; v^p]."""
    grid, kp, vp = _check(q, k, v, k_pool, v_pool, kernel_size, local_bias, pool_bias, local_extra)
    b, h, n = q.shape[0], q.shape[1], grid[0] * grid[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    inside, offset = window_offsets(grid, kernel_size, q.device)
    tokens = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    if local_bias is not None:
        tokens = tokens + local_bias.double()[:, offset]
    pooled = torch.einsum("bhid,bhmd->bhim", q64, kp.double()) * scale
    if pool_bias is not None:
        pooled = pooled + pool_bias.double()
    keep = torch.cat([inside, torch.ones(n, kp.shape[2], dtype=torch.bool, device=q.device)], -1)
    weights = masked_softmax(torch.cat([tokens, pooled], -1), keep)
    if local_extra is not None:
        extra = local_extra.double().reshape(b, h, n, -1).gather(-1, offset.expand(b, h, n, n)) * inside
        weights = torch.cat([weights[..., :n] + extra, weights[..., n:]], -1)
    out = weights[..., :n] @ v64 + weights[..., n:] @ vp.double()
    return out.reshape(b, h, *grid, v.shape[-1]).to(q.dtype), weights.to(q.dtype)


# -- the module ----------------------------------------------------------------------------------
@register(
    name="aggregated",
    paper=TRANSNEXT,
    family="A",
    cost="O(N·(k² + p²)·d)",
    exponent=1.0,
    supports=Supports(grids=(2,), materialize=True, summary_keys=True),
    params=(
        Param("kernel_size", int, KERNEL_SIZE, "side k of the sliding window (odd)", low=1),
        Param("pool_size", int, POOL_SIZE, "side p of the pooled grid (adaptive average pooling)", low=1),
        Param("cpb_hidden", int, CPB_HIDDEN, "hidden width of the MLP giving the pooled keys' position bias", low=1),
        grid_shape_param(),
    ),
    summary="TransNeXt aggregated attention: k×k sliding window + p×p pooled keys under one softmax, "
            "length-scaled cosine logits, query embedding, learnable tokens.",
    normalized=False,
    test_params={"kernel_size": 3, "pool_size": 2, "cpb_hidden": 16},
    test_positions=(4, 5),
    flops=aggregated_flops,
)
class AggregatedAttention(SummaryKeyAttention, GridAttention):
    """TransNeXt aggregated attention on (batch, H, W, dim) tokens.

    `attend(q, k, v)` takes the raw projected heads, k and v of the N tokens then the p² pooled
    features (`key_values(x)`), or of the tokens alone (then pooled by p×p adaptive averages); it
    normalises, scales and biases them as the paper. `materialize(x)` gives the (batch, heads,
    N, N + p²) weights over [tokens ; summaries] (see the module docstring).
    """

    mask_form = "none"
    mask_note = WHY_NO_MASK

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        kernel_size: int = KERNEL_SIZE,
        pool_size: int = POOL_SIZE,
        cpb_hidden: int = CPB_HIDDEN,
        grid_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias,
                         grid_shape=None if grid_shape is None else check_pair("grid_shape", grid_shape))
        check_int("pool_size", pool_size)
        check_geometry(self.grid_shape or (kernel_size, kernel_size), kernel_size,
                       pool_size if self.grid_shape else None)
        self.kernel_size, self.pool_size = kernel_size, pool_size
        kk, d = kernel_size * kernel_size, self.head_dim
        self.temperature = nn.Parameter(torch.full((heads,), math.log(math.expm1(TEMPERATURE))))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, d), std=0.02))
        self.local_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, kk), std=0.0004))
        self.learnable_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, d, kk), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(heads, kk))
        self.sr = nn.Conv2d(dim, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.cpb = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(), nn.Linear(cpb_hidden, heads))

    # -- pieces ------------------------------------------------------------------------------------
    def pooled_features(self, x: Tensor) -> Tensor:
        """X^p = LayerNorm(AdaptiveAvgPool_{p×p}(GELU(Conv_{1×1}(x)))): (batch, p, p, dim) from (batch, H, W, dim)."""
        y = F.gelu(self.sr(x.permute(0, 3, 1, 2)))
        return self.norm(F.adaptive_avg_pool2d(y, self.pool_size).permute(0, 2, 3, 1))

    def pool_bias(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """C (heads, N, p²): the MLP of the log-spaced token-to-cell-centre offsets."""
        table, index = cpb_coordinates(tuple(grid), self.pool_size)
        first, last = self.cpb[0], self.cpb[2]  # the MLP in `dtype` (float64 for the reference of a float32 module)
        hidden = F.relu(F.linear(table.to(device=device, dtype=dtype), first.weight.to(dtype), first.bias.to(dtype)))
        bias = F.linear(hidden, last.weight.to(dtype), last.bias.to(dtype))  # (U, heads)
        return bias[index.to(device)].T.reshape(self.heads, grid[0] * grid[1], self.pool_size**2)

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor, pooled: tuple[Tensor, Tensor] | None, reference: bool
                 ) -> tuple[Tensor, ...]:
        """(q̃, k̂, v, k̂^p, v^p, pool_bias, local_extra) from the raw heads, in float64 for the reference."""
        if reference:
            q, k, v = q.double(), k.double(), v.double()
        height, width = check_grid_qkv(q, k, v)
        grid = (height, width)
        check_geometry(grid, self.kernel_size, self.pool_size)
        p = self.pool_size
        if pooled is None:
            if reference:  # the pooling matrix P (p², N) applied to the tokens
                pm = torch.kron(pool_matrix(grid[0], p), pool_matrix(grid[1], p)).to(q.device)
                kp, vp = (pm @ t.flatten(2, 3) for t in (k, v))
            else:
                kp, vp = (F.adaptive_avg_pool2d(t.movedim(-1, 2).flatten(0, 1), p).unflatten(0, t.shape[:2])
                          .movedim(2, -1).flatten(2, 3) for t in (k, v))
        else:
            kp, vp = (_pooled_flat(name, t) for name, t in zip(("k_pool", "v_pool"), pooled))
            if reference:
                kp, vp = kp.double(), vp.double()
        dtype = q.dtype
        params = {name: t.to(dtype) for name, t in (("e", self.query_embedding), ("tau", self.temperature),
                                                      ("tokens", self.learnable_tokens), ("tb", self.learnable_bias))}
        q_hat = F.normalize(q, dim=-1, eps=EPS)
        seen = window_valid(grid, self.kernel_size, q.device).sum(-1).to(dtype)  # n_i (H, W)
        length_scale = torch.log(seen + p * p)[..., None]
        q_scaled = (q_hat + params["e"][:, None, None, :]) * F.softplus(params["tau"])[:, None, None, None] * length_scale
        extra = torch.einsum("bhxyd,hdo->bhxyo", q_hat, params["tokens"]) + params["tb"][:, None, None, :]
        return (q_scaled, F.normalize(k, dim=-1, eps=EPS), v, F.normalize(kp, dim=-1, eps=EPS), vp,
                self.pool_bias(grid, dtype, q.device), extra)

    # -- the two paths, on (batch, heads, H, W, head_dim) ----------------------------------------------
    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                    pooled: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Fast path; `mask` is always None (no masks); `pooled` the raw pooled heads or None."""
        qs, kh, v, kp, vp, bias, extra = self._prepare(q, k, v, pooled, reference=False)
        return aggregated_attention(qs, kh, v, kp, vp, kernel_size=self.kernel_size, local_bias=self.local_bias,
                                    pool_bias=bias, local_extra=extra, scale=1.0)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                         pooled: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N + p²)) in float64; arguments as in attend_fast."""
        qs, kh, v64, kp, vp, bias, extra = self._prepare(q, k, v, pooled, reference=True)
        out, weights = aggregated_attention_reference(qs, kh, v64, kp, vp, kernel_size=self.kernel_size,
                                                      local_bias=self.local_bias, pool_bias=bias,
                                                      local_extra=extra, scale=1.0)
        return out.to(q.dtype), weights.to(q.dtype)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attention_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
        grid: Sequence[int] | None = None,
    ) -> Tensor:
        """Raw query heads (batch, heads, H, W, head_dim), or flat (batch, heads, N, head_dim) with `grid`;
        k, v: flat (batch, heads, N + p², head_dim), the N tokens' heads then the p² pooled features'
        (as `key_values(x)` gives them), or the tokens' alone in q's layout (pooled here by p×p averages)."""
        self.masks(q, k, attention_mask, attn_mask)  # refuses every mask (mask_form "none")
        pooled = None
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t)
        n = math.prod(q.shape[2:-1])
        if k.dim() == 4 and k.shape[2] != n and q.dim() >= 4:
            m = self.pool_size**2
            if k.shape[2] != n + m:
                raise ShapeError(
                    f"k: expected {n} rows (the tokens, as q) or {n} + {self.pool_size}² = {n + m} "
                    f"([tokens ; pooled], pool_size={self.pool_size}), got {k.shape[2]} in shape {tuple(k.shape)}"
                )
            check_qkv(k, k, v)
            pooled = (k[:, :, n:], v[:, :, n:])
            k, v = (t[:, :, :n].reshape(*t.shape[:2], *q.shape[2:-1], t.shape[-1]) for t in (k, v))
        qg, kg, vg = self.core_view(q, k, v, grid)
        return self._run(qg, kg, vg, impl, pooled).reshape(*q.shape[:-1], v.shape[-1])

    def _run(self, q: Tensor, k: Tensor, v: Tensor, impl: Impl, pooled: tuple[Tensor, Tensor] | None) -> Tensor:
        """The path `impl` on the grid view, with the pooled keys and values (or None: pooled here)."""
        if impl == "fast":
            return self.attend_fast(q, k, v, None, pooled)
        if impl == "reference":
            return self.attend_reference(q, k, v, None, pooled)[0]
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")

    def key_count(self, grid: Sequence[int]) -> int:
        """N + p²: the N tokens of the grid (H, W) and the p² pooled summaries."""
        check_grid_shape("grid", grid, (2,), ShapeError)
        self._check_grid("grid", tuple(grid))
        check_geometry(grid, self.kernel_size, self.pool_size)
        return grid[0] * grid[1] + self.pool_size**2

    def key_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(k, v), each (batch, heads, N + p², head_dim): the tokens' raw key / value heads in raster order,
        then those of the p² pooled features."""
        _, k, v, (kp, vp) = self._all_heads(x, None, None, None)
        return torch.cat([k.flatten(2, 3), kp.flatten(2, 3)], 2), torch.cat([v.flatten(2, 3), vp.flatten(2, 3)], 2)

    def _all_heads(self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None,
                   attn_mask: Tensor | None, key_padding_mask: Tensor | None = None,
                   ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        refuse_masks("aggregated attention", attention_mask, None, WHY_NO_MASK, key_padding_mask)
        q, k, v = self._heads(x, context, attn_mask)
        check_geometry(tuple(x.shape[1:3]), self.kernel_size, self.pool_size)
        xp = self.pooled_features(x)
        kp, vp = (proj(xp).unflatten(-1, (self.heads, self.head_dim)).movedim(-2, 1) for proj in (self.k_proj, self.v_proj))
        return q, k, v, (kp, vp)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, H, W, dim) -> the same shape."""
        q, k, v, pooled = self._all_heads(x, context, attention_mask, attn_mask, key_padding_mask)
        if impl == "reference":
            self.check_dense_memory("impl='reference'", q, k)
        out = self._run(q, k, v, impl, pooled)
        return self.out_proj(out.movedim(1, -2).flatten(-2))

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """(batch, heads, N, N + p²): the weights over [the N tokens (window weights + learnable-token
        affinities) ; the p² pooled summaries], raster order, so that out = W v_keys with the values of
        `key_values(x)`."""
        q, k, v, pooled = self._all_heads(x, context, attention_mask, attn_mask, key_padding_mask)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, None, pooled)[1]
