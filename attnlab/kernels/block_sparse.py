"""Block-sparse attention: softmax attention over chosen (query block, key block) pairs.

With block size B, query i lies in block ⌊i/B⌋ and key j in block ⌊j/B⌋. A layout L is
any set of block pairs (shared by the heads or one per head); an optional mask_mod m(i, j)
refines it element by element inside the chosen blocks, like attention-gym's mask_mod:

    S(i)  = { j : (⌊i/B⌋, ⌊j/B⌋) ∈ L,  m(i, j),  key j not padding }
    out_i = Σ_{j ∈ S(i)} softmax_j(q_i · k_j · scale) v_j,        S(i) = ∅  ⇒  out_i = 0

The engine first sorts the chosen blocks once per call: mask_mod is evaluated once per
distinct (query block, key block) pair; blocks it hides whole are dropped, blocks it keeps
whole need no element mask, and only the partial ones (e.g. the diagonal under causality)
keep a B × B mask. It then works a chunk of query blocks at a time (~2 MiB of scores): one
row gather of the chunk's key and value blocks, one batched matmul for the scores, −inf
written into the partial blocks only, softmax, one batched matmul for the output. A chunk
reads as many key blocks as its longest row. The backward (a custom autograd.Function)
recomputes each chunk's scores from the saved log-sum-exp, as FlashAttention does: memory
is O(N·d) plus per-thread O(c·R·B²) workspaces reused across chunks, never an N × N
tensor; time is O(n_q_blocks · R · B² · d). With several torch threads, a large call splits
its chunks between worker threads that each run torch single-threaded (one synchronisation
per call instead of one per small op; dk and dv accumulate per worker). First derivatives
only (no double backward). N need not be a multiple of B: the last block is padded and its
padding masked.

The band path: when mask_mod is a `RelativeBand` (lo ≤ j − i ≤ hi, e.g. a sliding window) and
the layout holds every key block the band touches, query block r sees one contiguous range of
B + hi − lo keys, the previous block's moved by B. The engine then reads the keys in place through
overlapping strided views (no gather, no mask per block): the band inside a window is one additive
bias shared by all windows, fused into the score matmul (see "the band path" below). Same results,
same recomputing backward (memory O(N·d) plus the per-thread workspaces), same worker threads.
`backend="engine"` (the default) takes the band path exactly in that case and the block path
otherwise; `backend="band"` requires it (ParameterError if it does not apply), `backend="blocks"`
never takes it.

`backend="flex"` runs the same layout and mask_mod through torch's FlexAttention
(`BlockMask.from_kv_blocks`, `attnlab.kernels.flex`): on CPU it runs the forward only.
The module base of block-sparse patterns is `attnlab.mechanisms.sparse.base.BlockSparseAttention`.
"""
from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.errors import DTypeError, MaskError, ParameterError, ShapeError
from ..core.masks import padding_to_mask
from ..core.reference import softmax_attention_reference
from ..core.validate import check_attention_mask, check_int, check_optional_int, check_qkv
from .flex import compiled_flex, flex_available
from .pool import cpus as _cpus  # a name of this module: tests pin it
from .pool import run_parallel
from .sizes import fit_block

MaskMod = Callable[[Tensor, Tensor], Tensor]
"""mask_mod(q_idx, kv_idx) -> bool tensor (True = attend) on broadcasting int64 position tensors."""
Backend = Literal["engine", "band", "blocks", "flex"]
CHUNK_ELEMENTS = 1 << 19  # scores held per chunk (batch · heads · c · B · R·B): 2 MiB in float32
PARALLEL_ELEMENTS = 1 << 21  # scores per worker thread below which a call stays on the calling thread


# -- the layout ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Chosen key blocks of every query block, padded to the longest row.

    `indices` (H, n_q_blocks, R) int64 holds each row's key blocks in increasing order,
    its first `counts` (H, n_q_blocks) entries valid (the rest is padding, any block id).
    H is 1 (a layout shared by all heads) or the number of heads. Build one with
    `from_mask` (bool block matrix), `from_csr` (CSR index lists) or `from_candidates`.
    """

    block_size: int
    n_k_blocks: int
    indices: Tensor
    counts: Tensor

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size)
        check_int("n_k_blocks", self.n_k_blocks, 0)
        idx, cnt = self.indices, self.counts
        if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 3:
            raise MaskError(f"indices: expected an int64 tensor (heads, n_q_blocks, R), got {_describe(idx)}")
        if not isinstance(cnt, Tensor) or cnt.dtype != torch.int64 or tuple(cnt.shape) != tuple(idx.shape[:2]):
            raise MaskError(f"counts: expected an int64 tensor of shape {tuple(idx.shape[:2])}, got {_describe(cnt)}")
        if cnt.numel() and (int(cnt.min()) < 0 or int(cnt.max()) > idx.shape[2]):
            raise MaskError(f"counts: expected values in [0, {idx.shape[2]}], got [{int(cnt.min())}, {int(cnt.max())}]")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_k_blocks):
            raise MaskError(
                f"indices: expected key blocks in [0, {self.n_k_blocks}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        steps = (idx[..., 1:] > idx[..., :-1]) | ~self.valid[..., 1:]
        if not bool(steps.all()):
            raise MaskError("indices: expected each row's valid key blocks strictly increasing (no repeats)")

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_candidates(cls, candidates: Tensor, block_size: int, n_k_blocks: int) -> BlockLayout:
        """From candidate key blocks per row, (n_q_blocks, C) or (H, n_q_blocks, C) integers:
        entries outside [0, n_k_blocks) are dropped and repeats merged."""
        if not isinstance(candidates, Tensor) or candidates.dtype.is_floating_point or candidates.dim() not in (2, 3):
            raise MaskError(f"candidates: expected an integer tensor (n_q_blocks, C) or (heads, n_q_blocks, C), got {_describe(candidates)}")
        cand = candidates.to(torch.int64)
        if cand.dim() == 2:
            cand = cand[None]
        sentinel = n_k_blocks  # sorts after every valid block
        cand = torch.where((cand >= 0) & (cand < n_k_blocks), cand, sentinel).sort(-1).values
        if cand.shape[-1] > 1:
            repeat = torch.zeros_like(cand, dtype=torch.bool)
            repeat[..., 1:] = cand[..., 1:] == cand[..., :-1]
            cand = cand.masked_fill(repeat, sentinel).sort(-1).values
        counts = (cand < sentinel).sum(-1)
        width = int(counts.max()) if counts.numel() else 0
        indices = cand[..., :width]
        return cls(block_size, n_k_blocks, indices.masked_fill(indices == sentinel, 0).contiguous(), counts)

    @classmethod
    def from_mask(cls, blocks: Tensor, block_size: int) -> BlockLayout:
        """From a bool block matrix (n_q_blocks, n_k_blocks) or (H, n_q_blocks, n_k_blocks), True = computed."""
        if not isinstance(blocks, Tensor) or blocks.dtype != torch.bool or blocks.dim() not in (2, 3):
            raise MaskError(f"blocks: expected a bool tensor (n_q_blocks, n_k_blocks) or (heads, n_q_blocks, n_k_blocks), got {_describe(blocks)}")
        n_k_blocks = blocks.shape[-1]
        cols = torch.arange(n_k_blocks, device=blocks.device).expand(blocks.shape)
        return cls.from_candidates(torch.where(blocks, cols, n_k_blocks), block_size, n_k_blocks)

    @classmethod
    def from_csr(cls, crow_indices: Tensor, col_indices: Tensor, block_size: int, n_k_blocks: int) -> BlockLayout:
        """From CSR index lists: row r's key blocks are col_indices[crow[r]:crow[r+1]]; crow (n_q_blocks + 1,)
        with col (nnz,), or per head crow (H, n_q_blocks + 1) with col (H, nnz) (a head with fewer
        entries leaves the end of its col row unused)."""
        crow, col = crow_indices, col_indices
        if not isinstance(crow, Tensor) or crow.dtype.is_floating_point or crow.dim() not in (1, 2) or crow.shape[-1] < 1:
            raise MaskError(f"crow_indices: expected an integer tensor (n_q_blocks + 1,) or (heads, n_q_blocks + 1), got {_describe(crow)}")
        if not isinstance(col, Tensor) or col.dtype.is_floating_point or col.dim() != crow.dim() or col.shape[:-1] != crow.shape[:-1]:
            raise MaskError(f"col_indices: expected an integer tensor of shape ({'heads, ' if crow.dim() == 2 else ''}nnz), got {_describe(col)}")
        crow, col = crow.to(torch.int64).reshape(-1, crow.shape[-1]), col.to(torch.int64).reshape(-1, col.shape[-1])
        counts = crow.diff(dim=-1)
        if (crow[:, 0] != 0).any() or (counts < 0).any() or (crow[:, -1] > col.shape[-1]).any():
            raise MaskError(f"crow_indices: expected to start at 0, never decrease and end at most at nnz={col.shape[-1]}")
        width = int(counts.max()) if counts.numel() else 0
        slot = torch.arange(width, device=crow.device)
        pos = crow[:, :-1, None] + slot
        pos = pos.clamp(max=max(col.shape[-1] - 1, 0))
        picked = col[:, None, :].expand(-1, pos.shape[1], -1).gather(-1, pos) if col.shape[-1] else pos
        cand = torch.where(slot < counts[..., None], picked, -1)
        return cls.from_candidates(cand, block_size, n_k_blocks)

    # -- views ---------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        """1 for a shared layout, else the number of heads."""
        return self.indices.shape[0]

    @property
    def n_q_blocks(self) -> int:
        return self.indices.shape[1]

    @property
    def max_row(self) -> int:
        """R: the most key blocks any query block attends to."""
        return self.indices.shape[2]

    @property
    def valid(self) -> Tensor:
        """(H, n_q_blocks, R) bool: True where the entry is a chosen block, not padding."""
        return torch.arange(self.max_row, device=self.indices.device) < self.counts[..., None]

    @property
    def nnz(self) -> int:
        """Number of chosen (query block, key block) pairs, summed over the layout's heads."""
        return int(self.counts.sum())

    def to_mask(self) -> Tensor:
        """The bool block matrix (H, n_q_blocks, n_k_blocks)."""
        out = torch.zeros(self.heads, self.n_q_blocks, self.n_k_blocks + 1, dtype=torch.bool, device=self.indices.device)
        out.scatter_(-1, torch.where(self.valid, self.indices, self.n_k_blocks), True)
        return out[..., : self.n_k_blocks]

    def element_mask(self, n_q: int, n_k: int, mask_mod: MaskMod | None = None) -> Tensor:
        """The dense bool mask (H, n_q, n_k) the layout and mask_mod define (for references and plots)."""
        self.check(n_q, n_k, self.heads)
        b = fit_block(self.block_size, max(n_q, n_k))
        dense = self.to_mask().repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :n_q, :n_k]
        if mask_mod is not None:
            dev = self.indices.device
            dense = dense & call_mask_mod(mask_mod, torch.arange(n_q, device=dev)[:, None], torch.arange(n_k, device=dev)[None])
        return dense

    def check(self, n_q: int, n_k: int, heads: int) -> None:
        """Raise unless the layout covers n_q queries and n_k keys in blocks of its size, for `heads` heads."""
        b = self.block_size
        if self.n_q_blocks != math.ceil(n_q / b) or self.n_k_blocks != math.ceil(n_k / b):
            raise ShapeError(
                f"layout: expected ceil(n_q/B) × ceil(n_k/B) = {math.ceil(n_q / b)} × {math.ceil(n_k / b)} blocks for "
                f"n_q={n_q}, n_k={n_k}, B={b}, got {self.n_q_blocks} × {self.n_k_blocks}"
            )
        if self.heads not in (1, heads):
            raise ShapeError(f"layout: expected 1 (shared) or {heads} heads, got {self.heads}")

    def fitted(self, n_q: int, n_k: int) -> BlockLayout:
        """The same layout with its block capped at max(n_q, n_k) rounded up to a power of two (one block
        either way: nothing changes but the padding, so cost follows the input, not the block size)."""
        b = fit_block(self.block_size, max(n_q, n_k))
        return self if b == self.block_size else BlockLayout(b, self.n_k_blocks, self.indices, self.counts)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def call_mask_mod(mask_mod: MaskMod, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """mask_mod(q_idx, kv_idx), checked to be a bool tensor (True = attend)."""
    keep = mask_mod(q_idx, kv_idx)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"mask_mod: expected mask_mod(q_idx, kv_idx) to return a bool tensor (True = attend), got {_describe(keep)}")
    return keep


@dataclass(frozen=True)
class RelativeBand:
    """The mask_mod of a band of offsets: key j visible from query i when lo ≤ j − i ≤ hi.

    A plain mask_mod everywhere (references, FlexAttention, decoding), which the engine also
    recognises: given with a layout holding every key block the band touches, the call takes the
    band path (see `block_sparse_attention`). Sliding-window attention of radius r is
    RelativeBand(−r, r), or RelativeBand(−r, 0) when causal.
    """

    lo: int
    hi: int

    def __post_init__(self) -> None:
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParameterError(f"{name}: expected an int (an offset j − i), got {value!r}")
        if self.lo > self.hi:
            raise ParameterError(f"hi: expected an offset >= lo = {self.lo}, got {self.hi}")

    def __call__(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        rel = kv_idx - q_idx
        return (rel >= self.lo) & (rel <= self.hi)


# -- the engine ---------------------------------------------------------------------------------
# Tensors inside the engine are query-block major, so that a chunk of query blocks is one
# contiguous slice: queries (n_q_blocks, batch, heads, B, d), already multiplied by the
# scale; keys and values flattened to (batch · heads · n_k_blocks, B, width).
@dataclass(frozen=True, eq=False)
class _Plan:
    """A call's work, prepared once for its forward and backward.

    Blocks that mask_mod and the key count hide whole are dropped from the layout; the others
    are full (no element mask) or partial. A chunk (start, stop, r) of query blocks reads the
    first r key slots of its rows (r: the longest row of the chunk). The scores to hide are
    patched block by block (`fixes`): partial blocks with their element mask (`fix_drop`),
    and the slots past a row's count whole.
    """

    block_size: int
    n_k_blocks: int
    indices: Tensor  # (H, n_q_blocks, R) key blocks of each row, the first `counts` valid
    chunks: tuple[tuple[int, int, int], ...]  # (start, stop, r)
    max_blocks: int  # the most (query block, key slot) pairs of a chunk
    fixes: tuple[tuple[tuple[int, int, int, int], ...], ...]  # per chunk: (row, head or −1 if shared, slot, mask or −1 = all)
    fix_drop: Tensor  # (M, B, B) bool, True = hidden
    key_bias: Tensor | None  # (batch or 1, n_k_blocks · B): 0 for real keys, −inf for padding
    spans: tuple[tuple[int, int], ...]  # chunks lo..hi of each worker thread

    @property
    def heads(self) -> int:
        return self.indices.shape[0]


def _classify(layout: BlockLayout, mask_mod: MaskMod | None, n_k: int, per_step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(kept, partial, mask id, drop masks): which layout entries (H, n_q_blocks, R) keep a key,
    which of those hide some, the id of their mask in drop (M, B, B) (True = hidden).
    mask_mod is evaluated once per distinct (query block, key block) pair, `per_step` pairs at a time."""
    b, nkb, idx, valid = layout.block_size, layout.n_k_blocks, layout.indices, layout.valid
    dev = idx.device
    rows = torch.arange(layout.n_q_blocks, device=dev)[None, :, None]
    pairs, inverse = torch.unique((rows * nkb + idx)[valid], return_inverse=True)
    offs = torch.arange(b, device=dev)
    none = torch.zeros(0, dtype=torch.bool, device=dev)
    anys, alls, drops = [none], [none], [none.view(0, 1, 1).expand(0, b, b)]
    for u0 in range(0, pairs.shape[0], per_step):
        u = pairs[u0 : u0 + per_step]
        kpos = (u % nkb)[:, None, None] * b + offs
        keep = kpos < n_k
        if mask_mod is not None:
            keep = keep & call_mask_mod(mask_mod, (u // nkb)[:, None, None] * b + offs[:, None], kpos)
        keep = keep.expand(u.shape[0], b, b).reshape(u.shape[0], b * b)
        some, every = keep.any(1), keep.all(1)
        anys.append(some)
        alls.append(every)
        drops.append(~keep[some & ~every].view(-1, b, b))
    some, every = torch.cat(anys), torch.cat(alls)
    part = some & ~every
    mask_id = part.cumsum(0) - 1
    kept, partial, ids = torch.zeros_like(valid), torch.zeros_like(valid), torch.zeros_like(idx)
    kept[valid], partial[valid], ids[valid] = some[inverse], part[inverse], mask_id[inverse]
    return kept, partial & kept, ids, torch.cat(drops)


def _split(weights: list[int], parts: int) -> tuple[tuple[int, int], ...]:
    """Cut a list of work amounts into `parts` contiguous spans of about equal sums."""
    total, lo, acc = sum(weights), 0, 0
    spans: list[tuple[int, int]] = []
    for i, w in enumerate(weights):
        acc += w
        if acc * parts >= total * (len(spans) + 1) and len(spans) < parts - 1:
            spans.append((lo, i + 1))
            lo = i + 1
    spans.append((lo, len(weights)))
    return tuple(s for s in spans if s[1] > s[0])


def _make_plan(
    layout: BlockLayout, mask_mod: MaskMod | None, attention_mask: Tensor | None,
    n_k: int, batch_heads: int, chunk: int | None, dtype: torch.dtype,
) -> _Plan:
    b, nkb, nqb = layout.block_size, layout.n_k_blocks, layout.n_q_blocks
    dev = layout.indices.device
    width = max(layout.max_row, 1)
    step = chunk or max(1, CHUNK_ELEMENTS // (batch_heads * b * b * width))
    if mask_mod is None and nkb * b == n_k:  # every chosen block is full
        kept, partial, ids = layout.valid, torch.zeros_like(layout.valid), torch.zeros_like(layout.indices)
        drop = torch.zeros(0, b, b, dtype=torch.bool, device=dev)
    else:
        kept, partial, ids, drop = _classify(layout, mask_mod, n_k, max(1, step * batch_heads * width))
    # compact: the kept entries of each row, in order, then padding
    counts = kept.sum(-1)
    r_max = int(counts.max()) if counts.numel() else 0
    slot = torch.where(kept, kept.cumsum(-1) - 1, r_max)
    indices = layout.indices.new_zeros(layout.heads, nqb, r_max + 1).scatter_(-1, slot, layout.indices)[..., :r_max]
    moved_partial = torch.zeros(layout.heads, nqb, r_max + 1, dtype=torch.bool, device=dev).scatter_(-1, slot, partial)
    moved_ids = layout.indices.new_zeros(layout.heads, nqb, r_max + 1).scatter_(-1, slot, ids)[..., :r_max]
    # chunks and the slots each reads
    n_chunks = -(-nqb // step)
    row_counts = F.pad(counts.amax(0), (0, n_chunks * step - nqb)).view(n_chunks, step).amax(1)
    starts = range(0, nqb, step)
    chunks = tuple((s, min(s + step, nqb), int(r)) for s, r in zip(starts, row_counts.tolist()))
    reads = torch.arange(r_max, device=dev) < row_counts.repeat_interleave(step)[:nqb, None]  # (n_q_blocks, R)
    padding = reads & (torch.arange(r_max, device=dev) >= counts[..., None])  # (H, n_q_blocks, R)
    fix = moved_partial[..., :r_max] | padding
    where = fix.permute(1, 0, 2).nonzero()  # (P, 3): row, head, slot — ordered by row
    row, head, at = where.unbind(1)
    mask = torch.where(padding[head, row, at], -1, moved_ids[head, row, at])
    entries = torch.stack([row, head if layout.heads > 1 else torch.full_like(head, -1), at, mask], 1).tolist()
    bounds = torch.searchsorted(row, torch.tensor([*starts, nqb], device=dev)).tolist()
    fixes = tuple(tuple(map(tuple, entries[p0:p1])) for p0, p1 in zip(bounds[:-1], bounds[1:]))
    key_bias = None
    if attention_mask is not None:
        key_bias = torch.zeros(attention_mask.shape[0], nkb * b, dtype=dtype, device=dev)
        key_bias[:, :n_k].masked_fill_(~attention_mask, float("-inf"))
    work = [(stop - start) * r for start, stop, r in chunks]
    workers = min(torch.get_num_threads(), _cpus(), max(1, sum(work) * batch_heads * b * b // PARALLEL_ELEMENTS))
    return _Plan(
        b, nkb, indices, chunks, max(work, default=0), fixes, drop, key_bias, _split(work, workers),
    )


def _flat_index(plan: _Plan, start: int, stop: int, r: int, batch: int, heads: int) -> Tensor:
    """(c, batch, heads, r) rows of the flattened key blocks read by query blocks start..stop."""
    idx = plan.indices[:, start:stop, :r].transpose(0, 1)[:, None]  # (c, 1, H, r)
    base = torch.arange(batch * heads, device=idx.device).view(1, batch, heads, 1) * plan.n_k_blocks
    return base + idx


def _take(space: Tensor, *shape: int) -> Tensor:
    """The first elements of a workspace as a contiguous tensor of `shape`."""
    return space[: math.prod(shape)].view(shape)


def _gather(x_flat: Tensor, flat: Tensor, space: Tensor) -> Tensor:
    """Key or value blocks of `flat` (c, batch, heads, r) -> (c·batch·heads, r·B, width), into `space`."""
    c, bsz, h, r = flat.shape
    rows = flat.reshape(-1)
    out = _take(space, rows.shape[0], x_flat.shape[1] * x_flat.shape[2])
    torch.index_select(x_flat.view(x_flat.shape[0], -1), 0, rows, out=out)
    return out.view(c * bsz * h, r * x_flat.shape[1], x_flat.shape[2])


def _scores(plan: _Plan, i: int, qc: Tensor, kc: Tensor, shape: tuple[int, ...], space: Tensor) -> Tensor:
    """Scores (c·batch·heads, B, r·B) of chunk i into `space`, −inf where hidden; shape = (c, batch, heads, B, r, B)."""
    c, bsz, h, b, r, _ = shape
    s = torch.bmm(qc, kc.transpose(1, 2), out=_take(space, c * bsz * h, b, r * b))
    start = plan.chunks[i][0]
    if plan.key_bias is not None:
        kpos = (plan.indices[:, start : start + c, :r, None] * b + torch.arange(b, device=s.device)).flatten(-2)  # (H, c, r·B)
        bias = plan.key_bias[:, kpos].permute(2, 0, 1, 3)[:, :, :, None, :]  # (c, batch or 1, H, 1, r·B)
        s.view(c, bsz, h, b, r * b).add_(bias)
    s6 = s.view(shape)
    for row, head, slot, mask in plan.fixes[i]:  # a few blocks per chunk: in place, on views
        block = s6[row - start, :, :, :, slot] if head < 0 else s6[row - start, :, head, :, slot]
        if mask < 0:
            block.fill_(float("-inf"))
        else:
            block.masked_fill_(plan.fix_drop[mask], float("-inf"))
    return s


def _forward_chunk(
    plan: _Plan, i: int, qt: Tensor, k_flat: Tensor, v_flat: Tensor, out: Tensor, lse: Tensor, space: list[Tensor],
) -> None:
    """out (n_q_blocks, batch, heads, B, dv) and row log-sum-exp (+inf on rows that see no key) of chunk i;
    space: workspaces (keys, values, scores)."""
    start, stop, r = plan.chunks[i]
    if r == 0:
        out[start:stop] = 0.0
        lse[start:stop] = float("inf")
        return
    _, bsz, h, b, d = qt.shape
    flat = _flat_index(plan, start, stop, r, bsz, h)
    kc = _gather(k_flat, flat, space[0])
    p = _scores(plan, i, qt[start:stop].view(-1, b, d), kc, (stop - start, bsz, h, b, r, b), space[2])
    m = p.amax(-1, keepdim=True)
    m.masked_fill_(m == float("-inf"), 0.0)
    p.sub_(m).exp_()
    den = p.sum(-1, keepdim=True)
    o = out[start:stop].view(-1, b, out.shape[-1])
    torch.bmm(p, _gather(v_flat, flat, space[1]), out=o)
    empty = den == 0
    o.div_(den.masked_fill_(empty, 1.0))
    lse[start:stop] = den.log_().add_(m).masked_fill_(empty, float("inf")).view(lse[start:stop].shape)


def _backward_chunk(
    plan: _Plan, i: int, qt: Tensor, k_flat: Tensor, v_flat: Tensor, lse: Tensor, dout: Tensor, delta: Tensor,
    dq: Tensor, dk: Tensor, dv: Tensor, space: list[Tensor],
) -> None:
    """dq of chunk i's rows; its contributions added to dk and dv. space: workspaces (keys, values,
    scores, score gradients, key-block gradients)."""
    start, stop, r = plan.chunks[i]
    if r == 0:
        dq[start:stop] = 0.0
        return
    _, bsz, h, b, d = qt.shape
    dv_w = v_flat.shape[-1]
    shape = (stop - start, bsz, h, b, r * b)
    flat = _flat_index(plan, start, stop, r, bsz, h)
    rows = flat.reshape(-1)
    qc, kc, vc = qt[start:stop].view(-1, b, d), _gather(k_flat, flat, space[0]), _gather(v_flat, flat, space[1])
    doc = dout[start:stop].view(-1, b, dv_w)
    p = _scores(plan, i, qc, kc, (stop - start, bsz, h, b, r, b), space[2])
    p.view(shape).sub_(lse[start:stop]).exp_()  # P = exp(S − LSE)
    grad = torch.bmm(p.transpose(1, 2), doc, out=_take(space[4], p.shape[0], r * b, dv_w))  # dV rows = Pᵀ dO
    dv.view(dv.shape[0], -1).index_add_(0, rows, grad.view(rows.shape[0], -1))
    ds = torch.bmm(doc, vc.transpose(1, 2), out=_take(space[3], *p.shape))  # dP = dO Vᵀ
    ds.view(shape).sub_(delta[start:stop])
    ds.mul_(p)  # dS = P ∘ (dP − D)
    torch.bmm(ds, kc, out=dq[start:stop].view(-1, b, d))
    grad = torch.bmm(ds.transpose(1, 2), qc, out=_take(space[4], p.shape[0], r * b, d))  # dK rows = dSᵀ Q
    dk.view(dk.shape[0], -1).index_add_(0, rows, grad.view(rows.shape[0], -1))


def _run(plan: _Plan, step: Callable[[int, int, list[Tensor]], None], like: Tensor, widths: tuple[int, ...]) -> None:
    """step(worker, chunk, workspaces) for every chunk: the spans on worker threads (one intra-op
    thread each), or here. Each worker allocates its workspaces once, of width · (the largest chunk's
    batch · heads · query blocks · key slots · B) elements: reused buffers, not fresh pages per chunk."""
    def span(w: int) -> None:
        space = [like.new_empty(plan.max_blocks * like.shape[1] * like.shape[2] * like.shape[3] * n) for n in widths]
        with torch.no_grad():
            for i in range(*plan.spans[w]):
                step(w, i, space)

    run_parallel([partial(span, w) for w in range(len(plan.spans))])


def _query_blocks(x: Tensor, blocks: int, b: int, scale: float, work: torch.dtype) -> Tensor:
    """(batch, heads, n, d) -> (blocks, batch, heads, B, d) in `work`, times scale, padding rows 0: one pass."""
    bsz, h, n, d = x.shape
    out = x.new_empty(blocks, bsz, h, b, d, dtype=work)
    view = out.permute(1, 2, 0, 3, 4)  # (batch, heads, blocks, B, d) over out's memory
    full = n // b
    if full:
        torch.mul(x[:, :, : full * b].unflatten(2, (full, b)), scale, out=view[:, :, :full])
    if full < blocks:
        tail = view[:, :, full]
        torch.mul(x[:, :, full * b :], scale, out=tail[:, :, : n - full * b])
        tail[:, :, n - full * b :] = 0.0
    return out


def _key_blocks(x: Tensor, blocks: int, b: int, work: torch.dtype) -> Tensor:
    """(batch, heads, n, width) -> (batch · heads · blocks, B, width) in `work`, padding rows 0 (a view when possible)."""
    bsz, h, n, w = x.shape
    if n == blocks * b and x.dtype == work and x.is_contiguous():
        return x.view(bsz * h * blocks, b, w)
    out = x.new_zeros(bsz, h, blocks * b, w, dtype=work)
    out[:, :, :n] = x
    return out.view(bsz * h * blocks, b, w)


class _BlockSparseFunction(torch.autograd.Function):
    """Forward by chunks of query blocks; backward recomputes each chunk from the log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, plan: _Plan, scale: float, work: torch.dtype) -> Tensor:  # type: ignore[override]
        bsz, h, n_q, _ = q.shape
        b, nqb, nkb, dv = plan.block_size, plan.indices.shape[1], plan.n_k_blocks, v.shape[-1]
        qt = _query_blocks(q, nqb, b, scale, work)
        k_flat, v_flat = _key_blocks(k, nkb, b, work), _key_blocks(v, nkb, b, work)
        out = qt.new_empty(nqb, bsz, h, b, dv)
        lse = qt.new_empty(nqb, bsz, h, b, 1)
        _run(plan, lambda w, i, space: _forward_chunk(plan, i, qt, k_flat, v_flat, out, lse, space), qt, (qt.shape[-1], dv, b))
        ctx.save_for_backward(qt, k_flat, v_flat, out, lse)
        ctx.plan, ctx.scale, ctx.shapes = plan, scale, (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype)
        return out.permute(1, 2, 0, 3, 4).reshape(bsz, h, nqb * b, dv)[:, :, :n_q].to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        qt, k_flat, v_flat, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        (bsz, h, n_q, d), (_, _, n_k, _), (_, _, _, dv), q_dtype, k_dtype, v_dtype = ctx.shapes
        nqb, b = qt.shape[0], plan.block_size
        dout = _query_blocks(grad, nqb, b, 1.0, qt.dtype)
        delta = (dout * out).sum(-1, keepdim=True)  # D_i = Σ_c dO_ic O_ic
        dqt = torch.empty_like(qt)
        dks = [torch.zeros_like(k_flat) for _ in plan.spans]  # one accumulator per worker
        dvs = [torch.zeros_like(v_flat) for _ in plan.spans]
        _run(plan, lambda w, i, space: _backward_chunk(plan, i, qt, k_flat, v_flat, lse, dout, delta, dqt, dks[w], dvs[w], space),
             qt, (d, dv, b, b, max(d, dv)))
        dq = torch.empty(bsz, h, nqb, b, d, dtype=q_dtype, device=qt.device)
        torch.mul(dqt.permute(1, 2, 0, 3, 4), ctx.scale, out=dq)  # qt = q · scale
        dk, dv_ = sum(dks[1:], dks[0]), sum(dvs[1:], dvs[0])
        return (
            dq.view(bsz, h, nqb * b, d)[:, :, :n_q],
            dk.view(bsz, h, -1, d)[:, :, :n_k].to(k_dtype),
            dv_.view(bsz, h, -1, dv)[:, :, :n_k].to(v_dtype),
            None, None, None,
        )


# -- the band path --------------------------------------------------------------------------------
# With a RelativeBand lo ≤ j − i ≤ hi as the element mask, query block r (queries r·B … r·B + B − 1)
# sees keys in r·B + lo … r·B + B − 1 + hi only: one window of W = B + hi − lo keys, block r − 1's
# moved by B. The keys are read in place through overlapping strided views (Tensor.unfold(0, W, B):
# window r starts B keys after window r − 1), so no key or value block is gathered or copied; only
# the few windows that reach past either end of the keys read small zero-padded copies of the keys
# they cover. The band inside a window is the same (B, W) additive bias (0 / −inf) for every r, added
# by baddbmm while it computes the scores; padding and masked keys add a (keys,) bias only in the
# chunks that read such a key. Softmax runs in place on the scores; the backward recomputes them
# from the saved log-sum-exp, and adds the overlapping windows' key gradients B-wide slice by slice.
#
# Measured (16,384 tokens, 8 heads, d = 64, causal radius 256, float32, one thread pinned, medians of
# 7 interleaved rounds on an otherwise idle 2-core EPYC, `taskset -c 1`): the forward takes ~189 ms at
# B = 64 (W = 320), of which the score matmul with the fused bias ~72 ms, the in-place softmax ~25 ms
# and the output matmul ~82 ms (cProfile); Python and the plan ~2%. B = 32 (W = 288: 11% of the
# scores outside the band instead of 20%) took 0.98× that time and B = 128 (W = 384) 1.11×: the
# smaller matmuls lose about what the narrower windows save, so the sliding-window module keeps B = 64.
# Chunks of 2^19 scores (CHUNK_ELEMENTS: 2 MiB in float32, 25 windows at B = 64): 2^17 took 1.06× the
# time (more, smaller calls), 2^18 and 2^20 within 2% of it. Two threads: 1.96× faster than one
# (`taskset -c 0,1`, same machine idle). Compiled FlexAttention on the same shapes: ~1.5× our time.
class _BandItem(NamedTuple):
    """Windows start..stop of one (batch, head); `hidden`: whether they read a padding or masked key;
    `edge`: whether they reach past either end of the keys (then they read a zero-padded copy)."""

    batch: int
    head: int
    start: int
    stop: int
    hidden: bool
    edge: bool


@dataclass(frozen=True, eq=False)
class _BandPlan:
    """A band call's work: windows of B queries against W keys, in chunks per (batch, head)."""

    block_size: int  # B: queries per window
    width: int  # W: keys per window
    lo: int  # window r's first key is r·B + lo
    n_blocks: int  # windows: ⌈n_q / B⌉
    front: int  # key_bias[front + j] is key j's
    window_bias: Tensor  # (B, W): 0 inside the band, −inf outside
    key_bias: Tensor  # (batch or 1, front + keys + back): 0 for a real key, −inf for padding and masked keys
    items: tuple[_BandItem, ...]
    workers: int  # threads taking the items

    @property
    def max_windows(self) -> int:
        return max((item.stop - item.start for item in self.items), default=0)

    def keys_of(self, item: _BandItem) -> tuple[int, int]:
        """The keys begin..end the item's windows read (past 0 or n_k for an edge item)."""
        return item.start * self.block_size + self.lo, (item.stop - 1) * self.block_size + self.lo + self.width


def _visible_band(band: RelativeBand, n_q: int, n_k: int) -> tuple[int, int]:
    """The band's offsets lo..hi clipped to those a query 0 ≤ i < n_q and a key 0 ≤ j < n_k can have."""
    return max(band.lo, 1 - n_q), min(band.hi, n_k - 1)


def _covers_band(layout: BlockLayout, band: RelativeBand, n_q: int, n_k: int) -> bool:
    """Whether some query sees a key through the band and every layout row (of every head) holds
    all the key blocks its band touches (blocks beyond the band may be there: the band hides them)."""
    lo, hi = _visible_band(band, n_q, n_k)
    if lo > hi:
        return False
    b, dev = layout.block_size, layout.indices.device
    first = torch.arange(layout.n_q_blocks, device=dev) * b
    lo_key = (first + lo).clamp(min=0)
    hi_key = ((first + b).clamp(max=n_q) - 1 + hi).clamp(max=n_k - 1)
    touched = lo_key <= hi_key
    lo_block, hi_block = (lo_key // b)[:, None], (hi_key.clamp(min=0) // b)[:, None]
    held = (layout.valid & (layout.indices >= lo_block) & (layout.indices <= hi_block)).sum(-1)  # distinct entries
    return bool(((held == (hi_block - lo_block + 1)[:, 0]) | ~touched).all())


def _band_plan(
    band: RelativeBand, b: int, n_q: int, n_k: int, batch: int, heads: int,
    attention_mask: Tensor | None, chunk: int | None, work: torch.dtype, device: torch.device,
) -> _BandPlan:
    lo, hi = _visible_band(band, n_q, n_k)
    width, n_blocks = b + hi - lo, -(-n_q // b)
    rel = lo + torch.arange(width, device=device) - torch.arange(b, device=device)[:, None]  # j − i in a window
    window_bias = torch.zeros(b, width, dtype=work, device=device)
    window_bias.masked_fill_((rel < band.lo) | (rel > band.hi), float("-inf"))
    # windows 0..inner_first − 1 start before key 0, inner_stop.. end after key n_k − 1
    inner_first = min(n_blocks, max(0, -(lo // b)))
    inner_stop = max(inner_first, min(n_blocks, (n_k - lo - width) // b + 1))
    runs = ((0, inner_first, True), (inner_first, inner_stop, False), (inner_stop, n_blocks, True))
    front = max(0, -lo)
    key_ok = torch.zeros(1 if attention_mask is None else batch, front + max(n_k, (n_blocks - 1) * b + lo + width),
                         dtype=torch.bool, device=device)
    key_ok[:, front : front + n_k] = True if attention_mask is None else attention_mask
    key_bias = torch.zeros(key_ok.shape, dtype=work, device=device).masked_fill_(~key_ok, float("-inf"))
    step = chunk or max(1, CHUNK_ELEMENTS // (b * width))
    chunks = [(start, min(start + step, stop), edge) for first, stop, edge in runs for start in range(first, stop, step)]
    hidden = F.pad((~key_ok).cumsum(-1), (1, 0))  # hidden keys before each position of key_bias
    begin = torch.tensor([front + lo + start * b for start, _, _ in chunks], dtype=torch.int64, device=device)
    end = torch.tensor([front + lo + (stop - 1) * b + width for _, stop, _ in chunks], dtype=torch.int64, device=device)
    reads_hidden = ((hidden[:, end] - hidden[:, begin]) > 0).tolist()  # (batch or 1, chunks)
    items = tuple(
        _BandItem(bi, hh, start, stop, reads_hidden[bi % len(reads_hidden)][ci], edge)
        for bi in range(batch) for hh in range(heads) for ci, (start, stop, edge) in enumerate(chunks)
    )
    windows = sum(item.stop - item.start for item in items)
    workers = min(torch.get_num_threads(), _cpus(), max(1, windows * b * width // PARALLEL_ELEMENTS))
    return _BandPlan(b, width, lo, n_blocks, front, window_bias, key_bias, items, workers)


def _windows(x: Tensor, first: int, count: int, plan: _BandPlan, width: int | None = None) -> Tensor:
    """`count` windows of `width` (default W) rows of x (length, …), the first at row `first`, each B
    rows after the previous: an overlapping view (count, …, width)."""
    w = plan.width if width is None else width
    return x[first : first + (count - 1) * plan.block_size + w].unfold(0, w, plan.block_size)


def _rows(x: Tensor, plan: _BandPlan, item: _BandItem) -> Tensor:
    """The queries (or their outputs, gradients) of an item's windows: (batch, heads, n, w) -> (c, B, w)."""
    b = plan.block_size
    return x[item.batch, item.head, item.start * b : item.stop * b].unflatten(0, (item.stop - item.start, b))


def _source(x: Tensor, plan: _BandPlan, item: _BandItem, space: Tensor) -> tuple[Tensor, int]:
    """(source, row of the item's first key in it): the keys (or values) x (batch, heads, n_k, w) of the
    item's (batch, head) in place, or for an edge item a copy of the keys it reads into `space`, zero
    past either end (a few windows per sequence: the copy is small)."""
    begin, end = plan.keys_of(item)
    if not item.edge:
        return x[item.batch, item.head], begin
    n_k = x.shape[2]
    copy = _take(space, end - begin, x.shape[-1]).zero_()
    if min(n_k, end) > max(0, begin):
        copy[max(0, -begin) : min(n_k, end) - begin] = x[item.batch, item.head, max(0, begin) : min(n_k, end)]
    return copy, 0


def _band_scores(plan: _BandPlan, item: _BandItem, qp: Tensor, keys: Tensor, first: int, scale: float, space: Tensor) -> Tensor:
    """Scores (c, B, W) of an item's windows into `space`, −inf outside the band and on hidden keys;
    keys: the item's source (length, d), its first window at row `first`."""
    c = item.stop - item.start
    scores = _take(space, c, plan.block_size, plan.width)
    torch.baddbmm(plan.window_bias, _rows(qp, plan, item), _windows(keys, first, c, plan), alpha=scale, out=scores)
    if item.hidden:
        key_bias = plan.key_bias[item.batch % plan.key_bias.shape[0]]
        scores.add_(_windows(key_bias, plan.front + plan.keys_of(item)[0], c, plan)[:, None, :])
    return scores


def _band_forward_item(
    plan: _BandPlan, item: _BandItem, qp: Tensor, k: Tensor, v: Tensor,
    out: Tensor, lse: Tensor | None, scale: float, space: list[Tensor],
) -> None:
    """out of an item's windows, and their rows' log-sum-exp (+inf on a row that sees no key) unless
    lse is None. space: workspaces (scores, edge keys, edge values)."""
    keys, first = _source(k, plan, item, space[1])
    values, _ = _source(v, plan, item, space[2])
    p = _band_scores(plan, item, qp, keys, first, scale, space[0])
    top = p.amax(-1, keepdim=True) if item.hidden or lse is not None else None
    torch.softmax(p, -1, out=p)  # in place
    o = _rows(out, plan, item)
    torch.bmm(p, _windows(values, first, item.stop - item.start, plan).transpose(1, 2), out=o)
    empty = top == float("-inf") if item.hidden and top is not None else None
    if empty is not None:
        o.masked_fill_(empty, 0.0)  # their softmax was 0/0
    if lse is not None and top is not None:
        row = _rows(lse, plan, item)
        torch.log(p.amax(-1, keepdim=True), out=row)  # log max P = max S − LSE
        torch.sub(top, row, out=row)
        if empty is not None:
            row.masked_fill_(empty, float("inf"))


def _fold(acc: Tensor, grad: Tensor, first: int, plan: _BandPlan) -> None:
    """acc[the keys of window r] += grad[r] for the windows (c, W, w) whose first starts at row `first` of
    acc (length, w). Windows overlap, so B-wide slice by slice: slice t of every window is a
    non-overlapping view of acc."""
    for t in range(0, plan.width, plan.block_size):
        part = min(plan.block_size, plan.width - t)
        _windows(acc, first + t, grad.shape[0], plan, part).transpose(1, 2).add_(grad[:, t : t + part])


def _band_backward_item(
    plan: _BandPlan, item: _BandItem, qp: Tensor, k: Tensor, v: Tensor, lse: Tensor,
    dout: Tensor, delta: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, scale: float, space: list[Tensor],
) -> None:
    """dQ of an item's windows (up to the scale); their dK (up to the scale) and dV added to dk, dv
    (batch, heads, n_k, w). space: workspaces (scores, score gradients, key-window gradients, edge keys,
    edge values, edge key gradients, edge value gradients)."""
    c, b, w = item.stop - item.start, plan.block_size, plan.width
    keys, first = _source(k, plan, item, space[3])
    values, _ = _source(v, plan, item, space[4])
    if item.edge:  # the gradients of the edge copies, added to the real keys' at the end
        dk_src, dv_src = (_take(space[i], keys.shape[0], t.shape[-1]).zero_() for i, t in ((5, k), (6, v)))
    else:
        dk_src, dv_src = dk[item.batch, item.head], dv[item.batch, item.head]
    q, do = _rows(qp, plan, item), _rows(dout, plan, item)
    p = _band_scores(plan, item, qp, keys, first, scale, space[0])
    p.sub_(_rows(lse, plan, item)).exp_()  # P = exp(S − LSE)
    _fold(dv_src, torch.bmm(p.transpose(1, 2), do, out=_take(space[2], c, w, do.shape[-1])), first, plan)  # dV = Pᵀ dO
    ds = torch.bmm(do, _windows(values, first, c, plan), out=_take(space[1], c, b, w))  # dP = dO Vᵀ
    ds.sub_(_rows(delta, plan, item)).mul_(p)  # dS = P ∘ (dP − D)
    torch.bmm(ds, _windows(keys, first, c, plan).transpose(1, 2), out=_rows(dq, plan, item))  # dQ = dS K
    _fold(dk_src, torch.bmm(ds.transpose(1, 2), q, out=_take(space[2], c, w, q.shape[-1])), first, plan)  # dK = dSᵀ Q
    if item.edge:
        begin, end = plan.keys_of(item)
        lo, hi = max(0, begin), min(k.shape[2], end)
        if hi > lo:
            dk[item.batch, item.head, lo:hi] += dk_src[lo - begin : hi - begin]
            dv[item.batch, item.head, lo:hi] += dv_src[lo - begin : hi - begin]


def _band_run(plan: _BandPlan, step: Callable[[int, _BandItem, list[Tensor]], None], like: Tensor, sizes: tuple[int, ...]) -> None:
    """step(worker, item, workspaces) for every item, on `plan.workers` threads that take the items in
    order as they finish the previous one (not fixed spans: a worker whose core is shared with another
    process takes fewer instead of holding up the call). Each worker allocates its workspaces once,
    of sizes[i] elements."""
    lock, taken = threading.Lock(), itertools.count()

    def work(w: int) -> None:
        space = [like.new_empty(n) for n in sizes]
        with torch.no_grad():
            while True:
                with lock:
                    i = next(taken)
                if i >= len(plan.items):
                    return
                step(w, plan.items[i], space)

    run_parallel([partial(work, w) for w in range(plan.workers)])


def _band_queries(x: Tensor, plan: _BandPlan, work: torch.dtype) -> Tensor:
    """(batch, heads, n, w) -> (batch, heads, windows · B, w) in `work`, padding rows 0 (x itself when it fits)."""
    rows = plan.n_blocks * plan.block_size
    if x.shape[2] == rows and x.dtype == work:
        return x
    out = x.new_zeros(*x.shape[:2], rows, x.shape[3], dtype=work)
    out[:, :, : x.shape[2]] = x
    return out


def _band_forward(
    plan: _BandPlan, q: Tensor, k: Tensor, v: Tensor, scale: float, work: torch.dtype, with_lse: bool,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, Tensor]]:
    """(out (batch, heads, windows · B, dv), rows' log-sum-exp or None, (q padded, k, v) in `work`)."""
    qp, k, v = _band_queries(q, plan, work), k.to(work), v.to(work)
    out = qp.new_empty(*qp.shape[:3], v.shape[-1])
    lse = qp.new_empty(*qp.shape[:3], 1) if with_lse else None
    span = (plan.max_windows - 1) * plan.block_size + plan.width  # keys of the longest item

    def step(w: int, item: _BandItem, space: list[Tensor]) -> None:
        _band_forward_item(plan, item, qp, k, v, out, lse, scale, space)

    _band_run(plan, step, qp, (plan.max_windows * plan.block_size * plan.width, span * k.shape[-1], span * v.shape[-1]))
    return out, lse, (qp, k, v)


def _band_backward(
    plan: _BandPlan, qp: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq (batch, heads, windows · B, d), dk, dv) of the band path, recomputing the scores."""
    dout = _band_queries(grad, plan, qp.dtype)
    delta = (dout * out).sum(-1, keepdim=True)  # D_i = Σ_c dO_ic O_ic
    dq = torch.empty_like(qp, memory_format=torch.contiguous_format)
    dks = [torch.zeros_like(k, memory_format=torch.contiguous_format) for _ in range(plan.workers)]  # one per worker
    dvs = [torch.zeros_like(v, memory_format=torch.contiguous_format) for _ in range(plan.workers)]

    def step(w: int, item: _BandItem, space: list[Tensor]) -> None:
        _band_backward_item(plan, item, qp, k, v, lse, dout, delta, dq, dks[w], dvs[w], scale, space)

    scores = plan.max_windows * plan.block_size * plan.width
    span = (plan.max_windows - 1) * plan.block_size + plan.width  # keys of the longest item
    d, dv_width = k.shape[-1], v.shape[-1]
    _band_run(plan, step, qp, (scores, scores, plan.max_windows * plan.width * max(d, dv_width),
                               span * d, span * dv_width, span * d, span * dv_width))
    dk, dv = sum(dks[1:], dks[0]), sum(dvs[1:], dvs[0])
    return dq.mul_(scale), dk.mul_(scale), dv  # scores = scale · q kᵀ


class _BandFunction(torch.autograd.Function):
    """The band path's forward; its backward recomputes each chunk's scores from the log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, plan: _BandPlan, scale: float, work: torch.dtype) -> Tensor:  # type: ignore[override]
        out, lse, (qp, kw, vw) = _band_forward(plan, q, k, v, scale, work, with_lse=True)
        ctx.save_for_backward(qp, kw, vw, out, lse)
        ctx.plan, ctx.scale, ctx.dtypes = plan, scale, (q.dtype, k.dtype, v.dtype)
        return out[:, :, : q.shape[2]].to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        qp, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _band_backward(ctx.plan, qp, k, v, out, lse, grad, ctx.scale)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq[:, :, : grad.shape[2]].to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None


def _check_call(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, mask_mod: MaskMod | None,
    attention_mask: Tensor | None, scale: float | None,
) -> float:
    check_qkv(q, k, v)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    layout.check(q.shape[2], k.shape[2], q.shape[1])
    if layout.indices.device != q.device:
        raise ValueError(f"layout: expected its tensors on {q.device} (as q), got {layout.indices.device}")
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"mask_mod: expected a callable mask_mod(q_idx, kv_idx) -> bool tensor, got {type(mask_mod).__name__}")
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ParameterError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def _key_ok(attention_mask: Tensor | None, n_k: int, padded: int, device: torch.device) -> Tensor | None:
    if attention_mask is not None:
        return F.pad(attention_mask, (0, padded - n_k), value=False)
    if padded > n_k:
        return (torch.arange(padded, device=device) < n_k)[None]
    return None


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    mask_mod: MaskMod | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "engine",
    chunk: int | None = None,
) -> Tensor:
    """softmax(q kᵀ·scale) v over the layout's blocks, refined by mask_mod(q_idx, kv_idx) and key padding.

    q (batch, heads, n_q, d), k (batch, heads, n_k, d), v (batch, heads, n_k, dv); positions
    are absolute (query i and key j both count from 0). `chunk`: query blocks per step of the
    engine (default: ~2 MiB of float32 scores). `backend`: "engine" (the band path when mask_mod
    is a RelativeBand whose key blocks the layout holds, else the block path), "band" (the band
    path, or ParameterError), "blocks" (the block path), "flex" (FlexAttention, forward only on
    CPU). Rows that see no key give 0.
    """
    scale = _check_call(q, k, v, layout, mask_mod, attention_mask, scale)
    layout = layout.fitted(q.shape[2], k.shape[2])
    if backend == "flex":
        return _flex_attention(q, k, v, layout, mask_mod, attention_mask, scale)
    if backend not in ("engine", "band", "blocks"):
        raise ParameterError(f"backend: expected 'engine', 'band', 'blocks' or 'flex', got {backend!r}")
    check_optional_int("chunk", chunk, meaning="(query blocks per step)")
    bsz, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[-1]
    if n_q == 0 or n_k == 0:
        return q.new_zeros(bsz, h, n_q, dv)
    band = mask_mod if isinstance(mask_mod, RelativeBand) and backend != "blocks" and _covers_band(layout, mask_mod, n_q, n_k) else None
    if backend == "band" and band is None:
        raise ParameterError(
            "backend: 'band' needs mask_mod a RelativeBand through which some query sees a key, with a layout "
            f"holding every key block the band touches; got mask_mod {mask_mod!r}"
        )
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if band is not None:
        band_plan = _band_plan(band, layout.block_size, n_q, n_k, bsz, h, attention_mask, chunk, work, q.device)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _BandFunction.apply(q, k, v, band_plan, scale, work)
        out = _band_forward(band_plan, q, k, v, scale, work, with_lse=False)[0]
        return out[:, :, :n_q].to(q.dtype)
    plan = _make_plan(layout, mask_mod, attention_mask, n_k, bsz * h, chunk, work)
    return _BlockSparseFunction.apply(q, k, v, plan, scale, work)


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    mask_mod: MaskMod | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `block_sparse_attention`: the dense masked N × N matrix, float64, materialised."""
    scale = _check_call(q, k, v, layout, mask_mod, attention_mask, scale)
    keep = layout.element_mask(q.shape[2], k.shape[2], mask_mod)[None]
    if attention_mask is not None:
        keep = keep & padding_to_mask(attention_mask)
    return softmax_attention_reference(q, k, v, mask=keep, scale=scale)


# -- the FlexAttention backend --------------------------------------------------------------------
def _flex_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, mask_mod: MaskMod | None,
    attention_mask: Tensor | None, scale: float,
) -> Tensor:
    if not flex_available():
        raise ParameterError(f"backend: 'flex' needs torch.nn.attention.flex_attention, not in torch {torch.__version__}")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            "backend: FlexAttention runs the forward only on CPU, and q, k or v requires grad; "
            "train with backend='engine', or call under torch.no_grad()"
        )
    if q.device.type == "cpu" and q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DTypeError(f"q: FlexAttention on CPU takes float32, float16 or bfloat16, got {q.dtype}; use backend='engine'")
    from torch.nn.attention.flex_attention import BlockMask

    bsz, h, n_q, _ = q.shape
    n_k, b = k.shape[2], layout.block_size
    nqb, nkb = layout.n_q_blocks, layout.n_k_blocks
    key_ok = _key_ok(attention_mask, n_k, nkb * b, q.device)
    key_ok = torch.ones(1, nkb * b, dtype=torch.bool, device=q.device) if key_ok is None else key_ok
    batch_of_mask = key_ok.shape[0]

    def flex_mask(b_idx: Tensor, h_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = key_ok[b_idx % batch_of_mask, kv_idx]
        return keep if mask_mod is None else keep & mask_mod(q_idx, kv_idx)

    width = max(nkb, 1)
    kv_indices = torch.zeros(1, layout.heads, nqb, width, dtype=torch.int32, device=q.device)
    kv_indices[..., : layout.max_row] = layout.indices.to(torch.int32)
    block_mask = BlockMask.from_kv_blocks(
        layout.counts.to(torch.int32)[None], kv_indices, BLOCK_SIZE=b, mask_mod=flex_mask, seq_lengths=(nqb * b, nkb * b)
    )
    qp = F.pad(q, (0, 0, 0, nqb * b - n_q))
    kp, vp = (F.pad(t, (0, 0, 0, nkb * b - n_k)) for t in (k, v))
    out = compiled_flex()(qp, kp, vp, block_mask=block_mask, scale=scale)
    return out[:, :, :n_q]
