"""Tiled neighborhood attention: the GEMM formulation of "Faster Neighborhood Attention"
(Hassani et al., 2024), written for the CPU, with a backward that recomputes.

Positions are cut into tiles *within a dilation group* (the positions of an axis with one
residue modulo δ; inside a group the window is undilated). A tile holds T_a consecutive
group coordinates per axis; its halo is the box of H_a = min(T_a + k_a − 1, L) group
coordinates per axis that holds the clamped window of every query of the tile. Per tile,
for a batch of (batch·head, tile) pairs at once:

    S = (scale · Q_tile) K_haloᵀ + B,   P = softmax(S),   O_tile = P V_halo

where the additive B is −inf outside each query's own window (plus the relative position
bias and the key padding inside it). The tables that map positions to tile slots are
integer arithmetic, built once per (grid, kernel, dilation, causal, tile) and cached.

Work goes in chunks of (batch·head, tile) pairs whose scores fit in cache. The backward
recomputes a chunk's scores (as FlashAttention does) instead of keeping P: memory is
q, k, v, the output and one chunk per worker thread, never N × N.

`loop_attention` is the other engine: direct loops over each query's own keys, compiled with numba
(attnlab.kernels._neighborhood_loops), forward and a recomputing backward from the saved
logsumexp. It does no work on keys outside a window (a tile's halo does: with a window of 7 on a
sequence, tiles of 32 compute 38 keys a query), reads each input row from cache instead of
gathering copies, and fuses scores, softmax and the weighted sum, so it is 2–5× faster than the
tiles on the CPU (benchmarks/neighborhood.py). Its forward takes a register's lanes of consecutive queries
against each key of their union (`_lanes`) where the last axis is undilated with lines of at least
LANES_MIN_LINE, is register-blocked (four queries against a run of keys, GEMM-style, `_blocked`) on shorter
such lines with a kernel there of at least BLOCKED_MIN_KERNEL, per query otherwise (`forward_path`); the
backward's query pass takes the lanes form after the lanes forward, the per-query form after the others. It
serves CPU float32/float64 tensors when numba is installed (attnlab.kernels.compiled.serves); the tiles
serve the rest (CUDA, half precision).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from types import ModuleType

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .buffers import recycled, recycled_array
from .compiled import numba_threads
from .pool import run_parallel

# Scores of one chunk stay in cache through mask, softmax and the second matmul. Measured on
# a 2-core AMD EPYC (see benchmarks/neighborhood.py): 1–4 MiB chunks are alike, all tiles at
# once is 1.3–1.7× slower (page faults of the large temporaries, scores read back from memory).
CHUNK_BYTES = 2 << 20
# The backward splits its work into at least this many units when it can (a constant, not the thread
# count, so that the sums of partial gradients, and so the result, do not depend on the threads).
UNITS = 8
# The loops' forward has three forms, by the windows (forward_path): lanes (`_lanes`, a register's lanes of
# consecutive queries against each key of their union on the last axis, GEMM-style with k broadcast) where
# the last axis is undilated with lines of at least LANES_MIN_LINE positions (a register's lanes in float32);
# register-blocked (`_blocked`, four queries against a run of keys) where it is undilated with a kernel of at
# least BLOCKED_MIN_KERNEL on shorter lines; the per-query loops otherwise. What they give is measured by
# `attnlab bench limits --rows neighborhood-1d-7,neighborhood-1d-65,neighborhood-2d-7,neighborhood-2d-13`.
# BLOCKED = False: the per-query loops everywhere (for tests and measurements).
BLOCKED = True
BLOCKED_MIN_KERNEL = 9
LANES_MIN_LINE = 16
# The lanes forward writes outputs of at least this many bytes (as this machine's L3: they leave the cache anyway)
# by non-temporal stores, straight to memory without first reading each line (half the output's memory traffic;
# 1-D N = 65,536 k = 65: −12 ms of 160, attnlab/kernels/_neighborhood_loops.py); smaller ones stay in cache for
# whatever reads them next.
STREAM_BYTES = 32 << 20


# -- tables ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AxisTiles:
    """Tiles of one axis: `tiles` tiles of `tile` query slots, each against a halo of `halo` keys.

    q_pos (tiles, tile) / k_pos (tiles, halo): the axis position of every query / key slot
    (slots past the end of a group repeat its last position); real (tiles, tile): the slot
    is the one that answers for its position (not such a repeat); keep (tiles, tile, halo):
    key slot u is in the window of query slot t; rel (tiles, tile, halo): the relative
    position (key − query, in group coordinates) + k − 1, the index into the bias table.
    """

    tiles: int
    tile: int
    halo: int
    q_pos: Tensor
    k_pos: Tensor
    real: Tensor
    keep: Tensor
    rel: Tensor


def axis_tiles(length: int, kernel: int, dilation: int, causal: bool, tile: int) -> AxisTiles:
    """The tiles of one axis (needs kernel · dilation <= length, checked by the caller)."""
    group = torch.arange(dilation)
    group_len = (length - group + dilation - 1) // dilation  # L_g, the longest first
    longest = int(group_len[0])
    tile = max(1, min(tile, longest))
    halo = min(tile + kernel - 1, longest)
    per_group = (group_len + tile - 1) // tile
    first = torch.cumsum(per_group, 0) - per_group
    g = torch.repeat_interleave(group, per_group)  # group of each tile
    index = torch.arange(int(per_group.sum())) - first[g]  # tile index inside its group
    glen = group_len[g][:, None]
    slot = index[:, None] * tile + torch.arange(tile)
    j = torch.minimum(slot, glen - 1)  # query group coordinates
    if causal:  # keys j − k < j' <= j, not shifted at the start
        lo, hi = j - kernel + 1, j
        box = index * tile - kernel + 1
    else:  # k keys, the window shifted to stay inside the group
        lo = torch.minimum((j - kernel // 2).clamp(min=0), glen - kernel)
        hi = lo + kernel - 1
        box = lo[:, 0]
    box = torch.minimum(box, (glen[:, 0] - halo).clamp(min=0)).clamp(min=0)
    kj = box[:, None] + torch.arange(halo)  # key group coordinates (may pass the group's end)
    key = kj[:, None, :]
    return AxisTiles(
        tiles=int(g.numel()),
        tile=tile,
        halo=halo,
        q_pos=g[:, None] + dilation * j,
        k_pos=g[:, None] + dilation * torch.minimum(kj, glen - 1),
        real=slot < glen,
        keep=(key >= lo[..., None]) & (key <= hi[..., None]),
        rel=(key - j[..., None] + kernel - 1).clamp(0, 2 * kernel - 2),
    )


@dataclass(frozen=True, eq=False)
class Plan:
    """Tiles of a grid (the outer product of the axes' tiles), positions in raster order.

    q_index (tiles, tq), k_index (tiles, hk): the raster position of every query / halo key
    slot; q_dest (tiles, tq): the position a query slot answers for, −1 for repeats;
    keep (tiles, tq, hk): the key slot is in the query's window; axes: the axes' tables,
    for `relative_index`.
    """

    n: int
    tiles: int
    tq: int
    hk: int
    q_index: Tensor
    k_index: Tensor
    q_dest: Tensor
    keep: Tensor
    axes: tuple[AxisTiles, ...]
    kernel: tuple[int, ...]


def outer(parts: list[Tensor], reduce: str) -> Tensor:
    """Combine per-axis tables (tiles_a, *slots_a) into (tiles_1, …, tiles_r, *slots_1, …, *slots_r)."""
    rank, groups = len(parts), parts[0].dim()
    out: Tensor | None = None
    for axis, part in enumerate(parts):
        shape = [1] * (rank * groups)
        for i, size in enumerate(part.shape):
            shape[rank * i + axis] = size
        view = part.reshape(shape)
        out = view if out is None else (out & view if reduce == "and" else out + view)
    assert out is not None
    return out


@lru_cache(maxsize=16)
def plan(
    grid: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    causal: tuple[bool, ...],
    tile: tuple[int, ...],
    device: torch.device,
) -> Plan:
    """The tiling of `grid` (cached; the caller has checked the arguments)."""
    axes = [axis_tiles(*args) for args in zip(grid, kernel, dilation, causal, tile)]
    strides = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
    tiles = math.prod(ax.tiles for ax in axes)
    tq = math.prod(ax.tile for ax in axes)
    hk = math.prod(ax.halo for ax in axes)
    q_index = outer([ax.q_pos * s for ax, s in zip(axes, strides)], "add").reshape(tiles, tq)
    real = outer([ax.real for ax in axes], "and").reshape(tiles, tq)
    return Plan(
        n=math.prod(grid),
        tiles=tiles,
        tq=tq,
        hk=hk,
        q_index=q_index.to(device),
        k_index=outer([ax.k_pos * s for ax, s in zip(axes, strides)], "add").reshape(tiles, hk).to(device),
        q_dest=torch.where(real, q_index, -1).to(device),
        keep=outer([ax.keep for ax in axes], "and").reshape(tiles, tq, hk).to(device),
        axes=tuple(axes),
        kernel=kernel,
    )


@lru_cache(maxsize=16)
def window_bias(p: Plan, dtype: torch.dtype) -> Tensor:
    """(tiles, tq, hk) additive: 0 inside each query's window, −inf outside (an add is much faster
    than masked_fill_ on the CPU)."""
    return torch.zeros(p.keep.shape, dtype=dtype, device=p.keep.device).masked_fill_(~p.keep, float("-inf"))


@lru_cache(maxsize=4)
def relative_index(p: Plan) -> Tensor:
    """(tiles, tq, hk): flat index of every (query, key) slot pair into the relative position bias
    table (2k_1 − 1, …, 2k_r − 1) (only for the bias: it is 8 bytes a pair)."""
    rank = len(p.kernel)
    table = [math.prod(2 * k - 1 for k in p.kernel[a + 1 :]) for a in range(rank)]
    rel = outer([ax.rel * s for ax, s in zip(p.axes, table)], "add")
    return rel.reshape(p.tiles, p.tq, p.hk).to(p.q_index.device)


# -- workers (attnlab.kernels.pool) ------------------------------------------------------------
def run(jobs: list[Callable[[], None]], device: torch.device) -> None:
    """Run every job, on the workers when there are several CPU threads to use. Jobs run without
    autograd and without autocast (in the inputs' dtype), in the caller's inference mode."""
    n = min(torch.get_num_threads(), len(jobs))
    inference = torch.is_inference_mode_enabled()
    queue = iter(jobs)  # shared: next() on a list iterator is atomic under the GIL

    def work() -> None:
        with torch.inference_mode(inference), torch.no_grad(), torch.autocast(device.type, enabled=False):
            for job in queue:
                job()

    run_parallel([work] * (n if device.type == "cpu" else 1))


# -- the computation ---------------------------------------------------------------------------
Chunk = tuple[int, int, int, int]  # batch·head rows [r0, r1) × tiles [t0, t1)


@dataclass(frozen=True)
class _Problem:
    """What every chunk needs: q, k, v, out as (B·H·n, d) rows, and the additive terms."""

    q: Tensor
    k: Tensor
    v: Tensor
    plan: Plan
    heads: int
    scale: float
    rpb: Tensor | None  # (H, R)
    key_bias: Tensor | None  # (B, n) additive
    valid: Tensor | None  # (B, tiles, tq): 0 where a window is fully masked
    bias: Tensor  # (tiles, tq, hk): window_bias
    rel: Tensor | None  # (tiles, tq, hk): relative_index, with rpb

    def chunks(self, rows: int) -> list[Chunk]:
        """Ranges of rows and tiles with about CHUNK_BYTES of scores each."""
        p = self.plan
        per = max(1, CHUNK_BYTES // (p.tq * p.hk * self.q.element_size()))
        if per >= p.tiles:
            step = per // p.tiles
            return [(r, min(r + step, rows), 0, p.tiles) for r in range(0, rows, step)]
        return [(r, r + 1, t, min(t + per, p.tiles)) for r in range(rows) for t in range(0, p.tiles, per)]

    def slots(self, c: Chunk) -> tuple[Tensor, Tensor, Tensor]:
        """(query rows, destination rows — the dummy row B·H·n for repeats —, halo rows) of a chunk."""
        p, (r0, r1, t0, t1) = self.plan, c
        base = (torch.arange(r0, r1, device=self.q.device) * p.n)[:, None, None]
        dest = p.q_dest[t0:t1]
        dest = torch.where(dest >= 0, base + dest, self.q.shape[0]).reshape(-1)
        return (base + p.q_index[t0:t1]).reshape(-1), dest, (base + p.k_index[t0:t1]).reshape(-1)

    def weight(self, c: Chunk) -> Tensor | None:
        """(chunk, tq, 1): 0 on query slots whose window is fully masked, else None."""
        if self.valid is None:
            return None
        r0, r1, t0, t1 = c
        b = torch.arange(r0, r1, device=self.q.device) // self.heads
        return self.valid[b, t0:t1].reshape(-1, self.plan.tq, 1)

    def probs(self, c: Chunk, q_rows: Tensor, k_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scale·q tiles, k halos, P (chunk, tq, hk)) of a chunk."""
        p, (r0, r1, t0, t1) = self.plan, c
        count, d = (r1 - r0) * (t1 - t0), self.q.shape[-1]
        qt = self.q.index_select(0, q_rows).view(count, p.tq, d).mul_(self.scale)
        kh = self.k.index_select(0, k_rows).view(count, p.hk, d)
        s = torch.bmm(qt, kh.transpose(1, 2)).view(r1 - r0, t1 - t0, p.tq, p.hk)
        s += self.bias[t0:t1]
        rows = torch.arange(r0, r1, device=self.q.device)
        if self.rpb is not None:
            assert self.rel is not None
            s += self.rpb.index_select(0, rows % self.heads)[:, self.rel[t0:t1]]
        if self.key_bias is not None:
            s += self.key_bias.index_select(0, rows // self.heads)[:, p.k_index[t0:t1]][:, :, None, :]
        return qt, kh, torch.softmax(s.view(count, p.tq, p.hk), dim=-1)


def _units(chunks: list[Chunk], parts: int) -> list[list[Chunk]]:
    """Chunks grouped for the backward: by rows when there are `parts` rows or more (units then
    own disjoint rows of dk, dv), else each row's tiles cut into runs."""
    rows: dict[int, list[Chunk]] = {}
    for c in chunks:
        rows.setdefault(c[0], []).append(c)
    if len(rows) >= parts:
        return list(rows.values())
    split = -(-parts // len(rows))
    out: list[list[Chunk]] = []
    for run in rows.values():
        size = -(-len(run) // split)
        out.extend(run[i : i + size] for i in range(0, len(run), size))
    return out


class TiledAttention(torch.autograd.Function):
    """out = softmax((scale·q) kᵀ + bias) v on the tiles of a plan, chunk by chunk.

    q, k, v: (B, H, n, d); rpb: (H, R) or None; key_bias: (B, n) additive or None; valid:
    (B, tiles, tq), 0 where a query's window is fully masked (output and gradients 0), or
    None. Output rows are written through a buffer with one dummy row that takes the
    repeated slots of partial tiles.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rpb: Tensor | None,
        key_bias: Tensor | None,
        valid: Tensor | None,
        p: Plan,
        scale: float,
    ) -> Tensor:
        b, h, n, d = q.shape
        e = v.shape[-1]  # value width
        prob = _Problem(q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, e), p, h, scale, rpb, key_bias, valid,
                        window_bias(p, q.dtype), None if rpb is None else relative_index(p))
        out = q.new_empty(b * h * n + 1, e)

        def chunk(c: Chunk) -> None:
            q_rows, dest, k_rows = prob.slots(c)
            _, _, probs = prob.probs(c, q_rows, k_rows)
            o = torch.bmm(probs, prob.v.index_select(0, k_rows).view(-1, p.hk, e))
            w = prob.weight(c)
            if w is not None:
                o *= w
            out.index_copy_(0, dest, o.view(-1, e))

        run([partial(chunk, c) for c in prob.chunks(b * h)], q.device)
        result = out[:-1].view(b, h, n, e)
        ctx.save_for_backward(q, k, v, rpb, key_bias, valid, result)  # type: ignore[arg-type]  # None saves as None
        ctx.plan, ctx.scale = p, scale  # type: ignore[attr-defined]
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, rpb, key_bias, valid, out = ctx.saved_tensors  # type: ignore[attr-defined]
        p: Plan = ctx.plan  # type: ignore[attr-defined]
        b, h, n, d = q.shape
        e = v.shape[-1]  # value width
        prob = _Problem(q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, e), p, h, ctx.scale,  # type: ignore[attr-defined]
                        rpb, key_bias, valid, window_bias(p, q.dtype), None if rpb is None else relative_index(p))
        g, o = grad.contiguous().view(-1, e), out.reshape(-1, e)
        dq = q.new_empty(b * h * n + 1, d)
        dk, dv = torch.zeros_like(prob.k), torch.zeros_like(prob.v)
        want_rpb = rpb is not None and ctx.needs_input_grad[3]  # type: ignore[attr-defined]
        units = _units(prob.chunks(b * h), UNITS)
        shared = len({u[0][0] for u in units}) == len(units)  # units own disjoint rows of dk, dv
        partials: list[tuple[Tensor, Tensor, Tensor | None]] = []

        def unit(i: int) -> None:
            row = units[i][0][0]
            if shared:
                uk, uv, base = dk, dv, 0
            else:  # this unit's share of one row of dk, dv, summed below in a fixed order
                uk, uv, base = k.new_zeros(n, d), v.new_zeros(n, e), row * n
            udr = torch.zeros_like(rpb) if want_rpb else None
            for c in units[i]:
                q_rows, dest, k_rows = prob.slots(c)
                qt, kh, probs = prob.probs(c, q_rows, k_rows)
                real = (dest < g.shape[0]).view(-1, p.tq, 1)
                dot = g.index_select(0, q_rows).view(-1, p.tq, e) * real  # dO on the slots that answer
                w = prob.weight(c)
                if w is not None:
                    dot *= w
                delta = (dot * o.index_select(0, q_rows).view(-1, p.tq, e)).sum(-1, keepdim=True)
                uv.index_add_(0, k_rows - base, torch.bmm(probs.transpose(1, 2), dot).view(-1, e))
                ds = torch.bmm(dot, prob.v.index_select(0, k_rows).view(-1, p.hk, e).transpose(1, 2))
                ds -= delta
                ds *= probs
                del probs
                if udr is not None:
                    heads = torch.arange(c[0], c[1], device=q.device) % h
                    assert prob.rel is not None
                    index = heads[:, None] * udr.shape[1] + prob.rel[c[2] : c[3]].reshape(1, -1)
                    udr.view(-1).index_add_(0, index.reshape(-1), ds.reshape(-1))
                dq.index_copy_(0, dest, torch.bmm(ds, kh).view(-1, d))
                uk.index_add_(0, k_rows - base, torch.bmm(ds.transpose(1, 2), qt).view(-1, d))
            partials[i] = (uk, uv, udr)

        partials.extend((dk, dv, None) for _ in units)
        run([partial(unit, i) for i in range(len(units))], q.device)
        drpb = torch.zeros_like(rpb) if want_rpb else None
        for i, (uk, uv, udr) in enumerate(partials):
            if not shared:
                row = units[i][0][0]
                dk[row * n : (row + 1) * n] += uk
                dv[row * n : (row + 1) * n] += uv
            if drpb is not None and udr is not None:
                drpb += udr
        dq = dq[:-1].mul_(ctx.scale).view(q.shape)  # type: ignore[attr-defined]
        return dq, dk.view(k.shape), dv.view(v.shape), drpb, None, None, None, None


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Plan,
    *,
    scale: float,
    rpb: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Neighborhood attention of q, k, v (B, H, n, d) (positions flattened in raster order) on plan `p`.

    rpb: (H, 2k_1 − 1, …) relative position bias; attention_mask: bool (B, n), True = real.
    """
    b, h, n, d = q.shape
    key_bias = valid = None
    if attention_mask is not None:
        key_bias = torch.zeros(b, n, dtype=q.dtype, device=q.device)
        key_bias.masked_fill_(~attention_mask, torch.finfo(q.dtype).min / 2)
        real = attention_mask[:, p.k_index].view(b, p.tiles, 1, p.hk)
        valid = (p.keep & real).any(dim=-1).to(q.dtype)
    table = None if rpb is None else rpb.reshape(h, -1)
    return TiledAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), table, key_bias, valid, p, scale)


# -- the compiled loops --------------------------------------------------------------------------
def loops() -> ModuleType:
    """The numba loops (imported on first use: numba compiles them then, or loads its disk cache)."""
    from . import _neighborhood_loops

    return _neighborhood_loops


@dataclass(frozen=True, eq=False)
class Windows:
    """Each query's keys as the loops take them: three axes (leading axes of length 1, kernel 1, for
    grids of lower rank), per axis (L_a, k_a) int64 tables `pos` (the key's position on the axis,
    −1 where the window slot holds no real key) and `rel` (c' − c + k − 1, the bias index);
    `runs` (L_3, 3), where each position's keys on the last axis are consecutive (no dilation there) and
    move by at most one key from a position to the next (as every window of axis_windows does): its first
    key, last key and the bias index of the first (the lanes and register-blocked forms' table), else None."""

    pos: tuple[np.ndarray, np.ndarray, np.ndarray]
    rel: tuple[np.ndarray, np.ndarray, np.ndarray]
    runs: np.ndarray | None


def windows(axes: list[tuple[Tensor, Tensor, Tensor]]) -> Windows:
    """Windows from each axis's (positions (L, k), real (L, k), bias index (L, k)) tables, the
    windows' definition (attnlab.mechanisms.local.neighborhood.axis_windows)."""
    one = (torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long))
    full = [one] * (3 - len(axes)) + list(axes)
    pos, real, rel = full[2]
    first = real.to(torch.int8).argmax(dim=1, keepdim=True)  # real slots come last (causal) or all are
    lo, hi = pos.gather(1, first), pos[:, -1:]
    consecutive = bool((torch.where(real, pos - lo, torch.arange(pos.shape[1]) - first) == torch.arange(pos.shape[1]) - first).all())
    steps = torch.cat([lo, hi], 1).diff(dim=0)
    consecutive = consecutive and bool(((steps >= 0) & (steps <= 1)).all())
    runs = np.ascontiguousarray(torch.cat([lo, hi, rel.gather(1, first)], 1).numpy(), dtype=np.int64) if consecutive else None
    return Windows(
        pos=tuple(np.ascontiguousarray(torch.where(real, pos, -1).numpy(), dtype=np.int64) for pos, real, _ in full),
        rel=tuple(np.ascontiguousarray(rel.numpy(), dtype=np.int64) for _, _, rel in full),
        runs=runs,
    )  # type: ignore[arg-type]


def _numpy(t: Tensor, rows: int) -> np.ndarray:
    """t (B, H, n, d) as a C-contiguous (B·H, n, d) array sharing memory where it can."""
    return t.detach().contiguous().view(rows, t.shape[2], t.shape[3]).numpy()


def forward_path(w: Windows) -> str:
    """Which form of the loops' forward serves these windows: "lanes" (consecutive keys on the last axis, lines
    of at least LANES_MIN_LINE positions), "blocked" (consecutive keys on the last axis, shorter lines of at
    least QUERIES positions, a kernel there of at least BLOCKED_MIN_KERNEL) or "per-query" (the rest, or
    BLOCKED off)."""
    from ._neighborhood_loops import QUERIES

    if not BLOCKED or w.runs is None:
        return "per-query"
    if w.runs.shape[0] >= LANES_MIN_LINE:
        return "lanes"
    if w.pos[2].shape[1] >= BLOCKED_MIN_KERNEL and w.runs.shape[0] >= QUERIES:
        return "blocked"
    return "per-query"


def _blocked(lib: ModuleType, q: np.ndarray, k: np.ndarray, v: np.ndarray, w: Windows, keep: np.ndarray, heads: int,
             rpb: np.ndarray, consts: np.ndarray, out: np.ndarray, lse: np.ndarray) -> None:
    """The register-blocked forward (w.runs is set): the vector widths from the window, and k transposed
    (a grid of one line: by each unit, its chunk's keys; else all of k, here)."""
    lanes = 64 // q.itemsize  # one 512-bit register
    kernel = w.pos[2].shape[1]
    need = lib.QUERIES + kernel - 1
    main = lanes
    while main < need and main < 4 * lanes:  # up to four registers a query (16 accumulators)
        main *= 2
    span = main if need <= main else main + -(-(need - main) // lanes) * lanes
    rows, n, d = q.shape
    if w.pos[0].shape[0] * w.pos[1].shape[0] == 1:
        kt = np.empty((rows, d, 0), q.dtype)
    else:
        kt = recycled_array(q.dtype, rows, d, n + span)
        lib.transpose(k, span, kt)
    lib.forward_blocked(q, k, kt, v, w.pos[0], w.pos[1], w.rel[0], w.rel[1], w.runs, kernel, keep, heads, rpb, consts,
                        out, lse, lib.Width(main), lib.Width(lanes), lib.Width(v.shape[2]))


def _lanes(lib: ModuleType, q: np.ndarray, k: np.ndarray, v: np.ndarray, w: Windows, keep: np.ndarray, heads: int,
           rpb: np.ndarray, consts: np.ndarray, out: np.ndarray, lse: np.ndarray) -> None:
    """The lanes forward (w.runs is set, lines of at least a register's lanes): the lanes of a 512-bit register and
    half of them, the scores' rows per window row (a block's union of keys on the last axis: the lanes' windows move
    by at most one key per position (Windows.runs), so at most lanes + k − 1 keys; rounded up to 8), the value width
    and whether out is written by non-temporal stores (`streams`)."""
    assert w.runs is not None
    lanes = 64 // q.itemsize
    union = -(-(lanes + w.pos[2].shape[1] - 1) // 8) * 8
    lib.forward_lanes(q, k, v, w.pos[0], w.pos[1], w.rel[0], w.rel[1], w.runs, w.pos[2].shape[1], union, keep, heads,
                      rpb, consts, out, lse, lib.Width(lanes), lib.Width(lanes // 2), lib.Width(v.shape[2]), streams(out))


def streams(out: np.ndarray) -> bool:
    """Whether the lanes forward writes `out` (rows, n, e) by non-temporal stores: at least STREAM_BYTES (it would
    not stay in cache anyway), its rows at multiples of 64 bytes (as those stores need)."""
    return out.nbytes >= STREAM_BYTES and out.ctypes.data % 64 == 0 and out.strides[1] % 64 == 0


class LoopAttention(torch.autograd.Function):
    """neighborhood attention by the numba loops: q, k (B, H, n, d), v (B, H, n, e); rpb (H, R) or None;
    keep (B, n) bool or None. Saves the logsumexp (B·H, n) for the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rpb: Tensor | None,
        keep: Tensor | None,
        w: Windows,
        scale: float,
    ) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # saved as the loops read them
        b, h, n, _ = q.shape
        rows, e = b * h, v.shape[-1]
        lib = loops()
        dtype = np.dtype(np.float32 if q.dtype == torch.float32 else np.float64)
        out = recycled(q, b, h, n, e)
        lse = q.new_empty(rows, n)
        keep_np = np.zeros((1, 0), np.uint8) if keep is None else keep.to(torch.uint8).contiguous().numpy()
        rpb_np = np.zeros((h, 0), dtype) if rpb is None else rpb.detach().contiguous().numpy()
        consts = lib.constants(dtype, scale)
        with numba_threads(torch.get_num_threads()):
            path = forward_path(w)
            if path != "per-query":
                form = _blocked if path == "blocked" else _lanes
                form(lib, _numpy(q, rows), _numpy(k, rows), _numpy(v, rows), w, keep_np, h, rpb_np, consts,
                     out.view(rows, n, e).numpy(), lse.numpy())
            else:
                lib.forward(_numpy(q, rows), _numpy(k, rows), _numpy(v, rows), *w.pos, *w.rel, keep_np, h, rpb_np,
                            consts, out.view(rows, n, e).numpy(), lse.numpy())
        ctx.save_for_backward(q, k, v, rpb, out, lse)  # type: ignore[arg-type]  # None saves as None
        ctx.windows, ctx.keep_np, ctx.rpb_np, ctx.consts = w, keep_np, rpb_np, consts  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, rpb, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        w: Windows = ctx.windows  # type: ignore[attr-defined]
        b, h, n, d = q.shape
        rows, e = b * h, v.shape[-1]
        from . import _neighborhood_backward_loops as backward_loops

        dq, dk, dv = recycled(q, *q.shape), recycled(k, *k.shape), recycled(v, *v.shape)
        with numba_threads(torch.get_num_threads()):
            drpb = backward_loops.backward(h, _numpy(q, rows), _numpy(k, rows), _numpy(v, rows), _numpy(out, rows),
                                           _numpy(grad, rows), lse.numpy(), w.pos, w.rel, ctx.keep_np,  # type: ignore[attr-defined]
                                           ctx.rpb_np, ctx.consts, dq.view(rows, n, d).numpy(),  # type: ignore[attr-defined]
                                           dk.view(rows, n, d).numpy(), dv.view(rows, n, e).numpy(),
                                           runs=w.runs if forward_path(w) == "lanes" else None)
        grad_rpb = None
        if rpb is not None and ctx.needs_input_grad[3]:  # type: ignore[attr-defined]
            # the partials of each head summed in one fixed order (numpy, one thread)
            grad_rpb = torch.from_numpy(drpb.reshape(b, h, -1, drpb.shape[1]).sum(axis=(0, 2))).view(rpb.shape)
        return dq, dk, dv, grad_rpb, None, None, None


def loop_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Windows,
    *,
    scale: float,
    rpb: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Neighborhood attention of q, k, v (B, H, n, d) (positions in raster order) by the numba loops, on
    CPU float32/float64 tensors (the caller checks: attnlab.kernels.compiled.serves).

    rpb: (H, 2k_1 − 1, …) relative position bias; attention_mask: bool (B, n), True = real.
    """
    table = None if rpb is None else rpb.reshape(rpb.shape[0], -1)
    return LoopAttention.apply(q, k, v, table, attention_mask, w, scale)
