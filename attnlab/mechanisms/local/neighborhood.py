"""Neighborhood attention on 1-D, 2-D and 3-D grids with dilation, as P019 (Hassani et al., "Faster
Neighborhood Attention", 2024, NATTEN's paper) and NATTEN define it, after "Neighborhood Attention
Transformer" (CVPR 2023) and "Dilated Neighborhood Attention Transformer" (2022):

    out_i = Σ_{j ∈ N(i)} softmax_j(q_i·k_j·scale + B[i, j]) v_j

N(i) is a product over axes. On an axis of length L with kernel k and dilation δ, the query at
position i belongs to the group of positions ≡ i (mod δ), where it sits at c = ⌊i/δ⌋ among
L_g of them; its keys are the group's positions with coordinates
  s, …, s + k − 1,   s = clamp(c − ⌊k/2⌋, 0, L_g − k)   (the window shifted, not cut, at a border),
or, causal, c − k < c' <= c (not shifted: the first queries see fewer keys). Every query sees
exactly k keys per axis when not causal; k = L (δ = 1) is full attention. B is the relative
position bias rpb[h, c'_1 − c_1 + k_1 − 1, …] (group coordinates; NATTEN's (heads, 2k − 1, …)
table; not with causal axes) plus −inf on padded keys.

NAT and DiNAT train with the bias (NATTEN's layer has `rel_pos_bias=True` in their models); here it
is off by default (`rel_pos_bias=False`) because its table (heads, 2k − 1, …) needs the grid rank
when the module is built, while one default module serves 1-, 2- and 3-D inputs, and because NATTEN
defines no bias with causal axes, which the causal default builds (decoding, the recall bench) use.
Build with `rel_pos_bias=True` and a grid rank (`grid_rank` or a kernel_size per axis) for NAT's layer.

Padding is not removal, true to the paper: P019 clamps the "window start s(i) … so the window stays
inside the sequence/image per axis" (shared/PAPERS.md), i.e. at the ends of the padded input, so the
window of a real query next to the padding reaches into the padded keys (masked) and holds fewer than
k real keys, where without the padding it would be shifted onto k real ones (attnlab.testing.PADDING_MOVES).

Two engines serve the fast path (attnlab.kernels.neighborhood), both with a backward that recomputes
the weights: direct loops over each query's keys compiled with numba, and the tiled GEMM formulation in
PyTorch. The rule (`backend=None`): the numba loops where they serve (numba installed, CPU tensors of
float32 or float64: attnlab.kernels.compiled.serves); the tiles otherwise (CUDA, half precision, no
numba). Long 1-D windows went to the tiles until the loops' register-blocked forward; now the loops win
there too: one thread, median of 5 interleaved rounds, load 1.0, loops / tiles forward 284/576 ms
(N = 65,536, k = 65) and 144/307 ms (N = 16,384, causal 256); forward + backward 1.61/1.79 s and
1.09/1.13 s. Rerun: taskset -c 1 python benchmarks/neighborhood.py --cases 1d-65,1d-causal-256
--threads 1 --rounds 5 --no-memory [--forward].
`attnlab info neighborhood` says which serves here. `backend="numba"` or `"torch"` forces one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor, nn

from ...core.errors import DTypeError, ParameterError, ShapeError
from ...core.module import KVCache
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_bools, check_ints, check_tensor
from ...kernels import buffers, compiled
from ...kernels.grid import check_grid_qkv, grid_padding
from ...kernels.neighborhood import Windows, loop_attention, plan, tiled_attention, windows
from .base import GridAttention

NAT = Paper("P019", "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
            2024, "2403.04690")
KERNEL_SIZE = 7

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]
BACKENDS = ("numba", "torch")


def neighborhood_flops(
    n: int, heads: int, head_dim: int, causal: bool, *, kernel_size: IntOrTuple = KERNEL_SIZE,
    grid: Sequence[int] | None = None,
) -> float:
    """Forward FLOPs of q·k and A·v: 4·h·d·Σ_i |N(i)|. Not causal, every query sees Π k_a keys (windows are
    shifted, not cut, at borders); causal on a sequence, the first k − 1 see fewer (Σ_i min(i + 1, k)); causal
    axes of a grid are counted as full windows (an upper bound)."""
    axes = tuple(grid) if grid else (n,)
    kernel = check_ints("kernel_size", kernel_size, len(axes))
    if causal and len(axes) == 1:
        k = min(kernel[0], n)
        keys = n * k - k * (k - 1) // 2
    else:
        keys = n * math.prod(min(k, length) for k, length in zip(kernel, axes))
    return 4.0 * heads * head_dim * keys


# -- arguments ---------------------------------------------------------------------------------
def neighborhood_args(
    rank: int, kernel_size: IntOrTuple, dilation: IntOrTuple, causal: BoolOrTuple
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """(kernel, dilation, causal) per axis of a grid of `rank` axes, checked: k >= 1, δ >= 1, k odd
    where not causal."""
    kernel = check_ints("kernel_size", kernel_size, rank)
    dil = check_ints("dilation", dilation, rank)
    caus = check_bools("causal", causal, rank)
    for axis, (k, c) in enumerate(zip(kernel, caus)):
        if not c and k % 2 == 0:
            raise ParameterError(
                f"kernel_size: expected an odd size on a non-causal axis (the window is centred on the query), "
                f"got {k} on axis {axis}"
            )
    return kernel, dil, caus


def check_grid(grid: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> None:
    """Every axis holds its dilated window: kernel_size · dilation <= the axis length."""
    for axis, (length, k, d) in enumerate(zip(grid, kernel, dilation)):
        if k * d > length:
            raise ShapeError(
                f"kernel_size: kernel_size={k} × dilation={d} = {k * d} exceeds the length {length} of axis {axis} "
                f"of the grid {tuple(grid)}; expected kernel_size · dilation <= {length}"
            )


def tile_shape(kernel: Sequence[int]) -> tuple[int, ...]:
    """Query tile of the fast path per axis (in dilation-group coordinates), chosen by measurement on a
    2-core AMD EPYC (fwd+bwd CPU time, 8 heads of 64): smaller tiles waste fewer halo keys, larger ones
    make larger matrix products."""
    big = max(kernel)
    if len(kernel) == 1:
        return (32,) if big < 64 else (64,)
    if len(kernel) == 2:
        return (4, 8) if big <= 13 else (8, 8)
    return (2, 4, 4) if big <= 3 else (4, 4, 4)


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple,
    causal: BoolOrTuple,
    rpb: Tensor | None,
    attention_mask: Tensor | None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...], Tensor | None]:
    """(grid, kernel, dilation, causal, attention_mask (batch, N)) after checking everything."""
    grid = check_grid_qkv(q, k, v, (1, 2, 3))
    kernel, dil, caus = neighborhood_args(len(grid), kernel_size, dilation, causal)
    check_grid(grid, kernel, dil)
    if rpb is not None:
        check_tensor("rpb", rpb)
        if any(caus):
            raise ParameterError("rpb: a relative position bias is not defined with causal axes (as in NATTEN)")
        want = (q.shape[1], *(2 * x - 1 for x in kernel))
        if tuple(rpb.shape) != want:
            raise ShapeError(f"rpb: expected shape (heads, 2·kernel_size − 1 per axis) = {want}, got {tuple(rpb.shape)}")
        if rpb.dtype != q.dtype:
            raise DTypeError(f"rpb: expected dtype {q.dtype} (as q), got {rpb.dtype}")
    return grid, kernel, dil, caus, grid_padding(attention_mask, q.shape[0], grid)


# -- the fast path -----------------------------------------------------------------------------
def backend_line() -> str:
    """Which engine serves here, for `attnlab info neighborhood`."""
    tiles = "the tiled PyTorch path"
    if compiled.numba_module() is None:
        return f"{tiles}: {compiled.numba_status()}"
    return (f"numba loops ({compiled.numba_status()}) for CPU float32/float64; {tiles} otherwise (CUDA, half "
            f"precision); {buffers.recycling_line()}")


def choose_backend(
    backend: str | None, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None
) -> str:
    """"numba" or "torch" by the rule of the module docstring; a forced "numba" that cannot serve raises."""
    if backend is not None and backend not in BACKENDS:
        raise ParameterError(f"backend: expected 'numba', 'torch' or None, got {backend!r}")
    tensors = [t for t in (q, k, v, rpb) if t is not None]
    if backend == "numba" and not compiled.serves(*tensors):
        why = (compiled.numba_status() if compiled.numba_module() is None
               else f"its loops take CPU float32/float64 tensors, got {q.dtype} on {q.device}")
        raise ParameterError(f"backend: 'numba' cannot serve here: {why}")
    if backend is None:
        return "numba" if compiled.serves(*tensors) else "torch"
    return backend


@lru_cache(maxsize=16)
def loop_windows(grid: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...],
                 causal: tuple[bool, ...]) -> Windows:
    """The numba loops' tables of every axis, from axis_windows (cached)."""
    return windows([axis_windows(*args) for args in zip(grid, kernel, dilation, causal)])


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    causal: BoolOrTuple = False,
    rpb: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Neighborhood attention of q, k, v (batch, heads, *grid, head_dim), a grid of 1, 2 or 3 axes.

    kernel_size, dilation, causal: one value or one per axis; rpb: (heads, 2k_1 − 1, …);
    attention_mask: bool (batch, N) in raster order or (batch, *grid), True = real token (a
    query whose window holds no real key gives 0); scale defaults to 1/√head_dim.
    backend: "numba" (direct loops), "torch" (tiles) or None (numba where it serves, see the module
    docstring). Both recompute in the backward (memory O(N·window), never N×N).
    """
    grid, kernel, dil, caus, kpm = _check(q, k, v, kernel_size, dilation, causal, rpb, attention_mask)
    engine = choose_backend(backend, q, k, v, rpb)
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    flat = (q.reshape(b, h, -1, d), k.reshape(b, h, -1, d), v.reshape(b, h, -1, v.shape[-1]))
    if engine == "numba":
        out = loop_attention(*flat, loop_windows(grid, kernel, dil, caus), scale=scale, rpb=rpb, attention_mask=kpm)
    else:
        p = plan(grid, kernel, dil, caus, tile_shape(kernel), q.device)
        out = tiled_attention(*flat, p, scale=scale, rpb=rpb, attention_mask=kpm)
    return out.view(b, h, *grid, v.shape[-1])


# -- the reference and the plain implementation --------------------------------------------------
def axis_windows(length: int, kernel: int, dilation: int, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Each query's keys on one axis, written out: (positions (L, k), real (L, k), bias index (L, k)).

    Non-causal keys are the group coordinates s … s + k − 1 around c; causal ones c − k + 1 … c, those
    below 0 not real (their position is clamped to the group's first); the bias index is c' − c + k − 1.
    """
    i = torch.arange(length)
    g, c = i % dilation, i // dilation
    t = torch.arange(kernel)
    if causal:
        cj = c[:, None] - kernel + 1 + t
        real = cj >= 0
        cj = cj.clamp(min=0)
    else:
        group_len = (length - g + dilation - 1) // dilation
        start = torch.minimum((c - kernel // 2).clamp(min=0), group_len - kernel)
        cj = start[:, None] + t
        real = torch.ones(length, kernel, dtype=torch.bool)
    return g[:, None] + dilation * cj, real, cj - c[:, None] + kernel - 1


def neighborhood_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    causal: BoolOrTuple = False,
    rpb: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, N, N)) in float64 over the full masked matrix (positions in raster
    order), cast back to q's dtype."""
    grid, kernel, dil, caus, kpm = _check(q, k, v, kernel_size, dilation, causal, rpb, attention_mask)
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    n, rank = math.prod(grid), len(grid)
    allowed = torch.ones((1,) * (2 * rank), dtype=torch.bool)
    bias_index: list[Tensor] = []
    for axis, args in enumerate(zip(grid, kernel, dil, caus)):
        pos, real, rel = axis_windows(*args)
        length = args[0]
        keep = torch.zeros(length, length, dtype=torch.bool)
        keep[torch.arange(length)[:, None].expand_as(pos)[real], pos[real]] = True  # keep[i, key]
        offset = torch.zeros(length, length, dtype=torch.long)
        offset[torch.arange(length)[:, None].expand_as(pos), pos] = rel
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = length, length
        allowed = allowed & keep.view(shape)
        bias_index.append(offset.view(shape))
    mask = allowed.reshape(n, n).to(q.device)[None, None]
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64, v64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k, v))
    scores = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    if rpb is not None:
        index = tuple(torch.broadcast_tensors(*bias_index))
        scores = scores + rpb.double()[(slice(None), *index)].reshape(h, n, n).to(q.device)
    weights = masked_softmax(scores, mask)
    out = torch.einsum("bhij,bhjd->bhid", weights, v64).reshape(b, h, *grid, v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


def neighborhood_attention_unfold(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    causal: BoolOrTuple = False,
    rpb: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The plain PyTorch way, the baseline of benchmarks/neighborhood.py: gather each query's
    k_1⋯k_r keys and values into (batch, heads, N, k_1⋯k_r, head_dim) tensors and attend over them."""
    grid, kernel, dil, caus, kpm = _check(q, k, v, kernel_size, dilation, causal, rpb, attention_mask)
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    n, rank = math.prod(grid), len(grid)
    index = torch.zeros((1,) * (2 * rank), dtype=torch.long)
    real = torch.ones((1,) * (2 * rank), dtype=torch.bool)
    bias = torch.zeros((1,) * (2 * rank), dtype=torch.long)
    for axis, args in enumerate(zip(grid, kernel, dil, caus)):
        pos, axis_real, rel = axis_windows(*args)
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = args[0], args[1]
        index = index + pos.view(shape) * math.prod(grid[axis + 1 :])
        real = real & axis_real.view(shape)
        bias = bias + rel.view(shape) * math.prod(2 * x - 1 for x in kernel[axis + 1 :])
    window = math.prod(kernel)
    index, real = index.reshape(n, window).to(q.device), real.reshape(n, window).to(q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = k.reshape(b, h, n, d)[:, :, index]  # (b, h, N, K, d)
    values = v.reshape(b, h, n, v.shape[-1])[:, :, index]
    scores = torch.einsum("bhnd,bhnkd->bhnk", q.reshape(b, h, n, d) * scale, keys)
    if rpb is not None:
        scores = scores + rpb.reshape(h, -1)[:, bias.reshape(n, window).to(q.device)]
    keep = None if bool(real.all()) else real
    if kpm is not None:
        keep = kpm[:, None, index] & (real if keep is None else keep)  # (b, 1, N, K)
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    if keep is not None:
        weights = weights * keep.any(dim=-1, keepdim=True)  # a window without a real key gives 0
    out = torch.einsum("bhnk,bhnkd->bhnd", weights, values)
    return out.reshape(b, h, *grid, v.shape[-1])


# -- the module --------------------------------------------------------------------------------
def _rank_of(value: object) -> int | None:
    """The grid rank a per-axis tuple fixes (None for one int)."""
    return len(value) if isinstance(value, (tuple, list)) else None


@register(
    name="neighborhood",
    paper=NAT,
    family="A",
    cost="O(N k^r d)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, grids=(1, 2, 3), decode=True, materialize=True,
                      sharding=("halo",)),
    params=(
        Param("kernel_size", (int, tuple), KERNEL_SIZE, "window per axis: one int or one per axis (odd unless causal)",
              low=1),
        Param("dilation", (int, tuple), 1, "dilation per axis (DiNAT): one int or one per axis", low=1),
        Param("rel_pos_bias", bool, False, "learnable relative position bias (heads, 2k − 1, …) as NAT's models; "
              "needs the grid rank, not with causal (hence off by default)"),
        Param("grid_rank", int, None, "axes of the position grid (1, 2 or 3); default: those of the input, or as "
              "many as kernel_size / dilation give", choices=(1, 2, 3), optional=True),
    ),
    summary="Neighborhood attention (NAT/DiNAT): each token attends to its k^r nearest, windows clamped at borders.",
    test_params={"kernel_size": 3},
    flops=neighborhood_flops,
    backend=backend_line,
)
class NeighborhoodAttention(GridAttention):
    """Multi-head neighborhood attention on a 1-, 2- or 3-D grid of tokens.

    Inputs are (batch, n, dim), (batch, H, W, dim) or (batch, D, H, W, dim): the grid rank is that of
    the input unless grid_rank (or a kernel_size / dilation per axis) fixes it. attention_mask is
    bool (batch, N) in raster order or (batch, *grid). `attend(q, k, v)` takes the projected heads as
    (batch, heads, *grid, head_dim), or flattened as (batch, heads, N, head_dim) together with
    `grid=(H, W, …)`, and answers in the same layout. `materialize` is (batch, heads, N, N) in raster
    order; `step` decodes a causal module on a sequence with a sliding-window KV cache.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        kernel_size: IntOrTuple = KERNEL_SIZE,
        dilation: IntOrTuple = 1,
        rel_pos_bias: bool = False,
        grid_rank: int | None = None,
    ) -> None:
        if grid_rank is not None and grid_rank not in (1, 2, 3):
            raise ParameterError(f"grid_rank: expected 1, 2, 3 or None, got {grid_rank!r}")
        ranks = {r for r in (grid_rank, _rank_of(kernel_size), _rank_of(dilation)) if r}
        if len(ranks) > 1:
            raise ParameterError(
                f"kernel_size, dilation, grid_rank: expected one grid rank, got kernel_size={kernel_size!r}, "
                f"dilation={dilation!r}, grid_rank={grid_rank!r}"
            )
        rank = ranks.pop() if ranks else None
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal,
                         grid_ranks=(1, 2, 3) if rank is None else (rank,))
        self.grid_rank: int | None = rank
        neighborhood_args(self.grid_rank or 1, kernel_size, dilation, causal)  # (one int each when no rank)
        self.kernel_size, self.dilation = kernel_size, dilation
        if rel_pos_bias and causal:
            raise ParameterError("rel_pos_bias: a relative position bias is not defined with causal=True (as in NATTEN)")
        self.rpb: nn.Parameter | None = None
        if rel_pos_bias:
            if self.grid_rank is None:
                raise ParameterError("rel_pos_bias: the bias table needs the grid rank: give grid_rank or a kernel_size per axis")
            kernel = neighborhood_args(self.grid_rank, kernel_size, dilation, causal)[0]
            self.rpb = nn.Parameter(torch.zeros(heads, *(2 * k - 1 for k in kernel)))
            nn.init.trunc_normal_(self.rpb, std=0.02)

    def _options(self) -> dict[str, object]:
        return {"kernel_size": self.kernel_size, "dilation": self.dilation, "causal": self.causal, "rpb": self.rpb}

    # -- the two paths, on (batch, heads, *grid, head_dim) and a key padding mask (batch, N) ----------
    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path; here `mask` is the key padding mask (batch, N) or None (no N×N mask is ever built)."""
        return neighborhood_attention(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return neighborhood_attention_reference(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def decode(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        """One checked position of a causal module on a sequence: x_t (batch, 1, dim) -> (y_t, state).
        The cache keeps the last (k − 1)·δ + 1 keys and values; the query attends to every δ-th of them."""
        if (self.grid_rank or 1) != 1:
            raise ValueError("step: decoding needs a causal module on a sequence (causal=True, one grid axis)")
        q, k, v = self.cached_qkv(x_t, state)
        (kernel,), (dil,), _ = neighborhood_args(1, self.kernel_size, self.dilation, True)
        span = (kernel - 1) * dil + 1
        k, v = k[:, :, -span:], v[:, :, -span:]
        picked = torch.arange(k.shape[2] - 1, -1, -dil, device=k.device)[:kernel]
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k[:, :, picked]) / math.sqrt(self.head_dim)
        out = torch.softmax(scores, dim=-1) @ v[:, :, picked]
        return self.out_proj(self.merge_heads(out)), KVCache(k, v)
