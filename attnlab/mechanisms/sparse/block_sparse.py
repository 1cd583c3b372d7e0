"""Block-sparse attention: softmax attention over chosen (query block, key block) pairs.

With block size B, query i lies in block ⌊i/B⌋ and key j in block ⌊j/B⌋. A layout L is
any set of block pairs (shared by the heads or one per head); an optional mask_mod m(i, j)
refines it element by element inside the chosen blocks, like attention-gym's mask_mod:

    S(i)  = { j : (⌊i/B⌋, ⌊j/B⌋) ∈ L,  m(i, j),  key j not padding }
    out_i = Σ_{j ∈ S(i)} softmax_j(q_i · k_j · scale) v_j,        S(i) = ∅  ⇒  out_i = 0

The engine pads every query block's list of key blocks to the longest one, R (a validity
mask marks the padding), gathers those key and value blocks, and runs batched matmuls and
a masked softmax over the gathered keys, a chunk of query blocks at a time. The backward
(a custom autograd.Function) recomputes each chunk's scores from the saved log-sum-exp,
as FlashAttention does: memory is O(N·d) plus one chunk's O(c·R·B²) working set, never an
N × N tensor; time is O(n_q_blocks · R · B² · d). First derivatives only (no double
backward). N need not be a multiple of B: the last block is padded and its padding masked.

`backend="flex"` runs the same layout and mask_mod through torch's FlexAttention
(`BlockMask.from_kv_blocks`, `flex_attention` compiled once per process): on CPU it runs
the forward only.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...core.errors import DTypeError, MaskError, ParameterError, ShapeError
from ...core.masks import padding_to_mask
from ...core.module import Attention, KVCache
from ...core.reference import softmax_attention_reference
from ...core.validate import check_finite, check_key_padding_mask, check_qkv, check_tokens

MaskMod = Callable[[Tensor, Tensor], Tensor]
"""mask_mod(q_idx, kv_idx) -> bool tensor (True = attend) on broadcasting int64 position tensors."""
Backend = Literal["engine", "flex"]
CHUNK_ELEMENTS = 1 << 20  # scores held per chunk (batch · heads · c · B · R·B): 4 MiB in float32


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
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ParameterError(f"block_size: expected an int >= 1, got {self.block_size!r}")
        if isinstance(self.n_k_blocks, bool) or not isinstance(self.n_k_blocks, int) or self.n_k_blocks < 0:
            raise ParameterError(f"n_k_blocks: expected an int >= 0, got {self.n_k_blocks!r}")
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
        b = self.block_size
        dense = self.to_mask().repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :n_q, :n_k]
        if mask_mod is not None:
            dev = self.indices.device
            dense = dense & _call_mask_mod(mask_mod, torch.arange(n_q, device=dev)[:, None], torch.arange(n_k, device=dev)[None])
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


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def _call_mask_mod(mask_mod: MaskMod, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    keep = mask_mod(q_idx, kv_idx)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"mask_mod: expected mask_mod(q_idx, kv_idx) to return a bool tensor (True = attend), got {_describe(keep)}")
    return keep


# -- the engine ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    layout: BlockLayout
    mask_mod: MaskMod | None
    key_ok: Tensor | None  # (batch or 1, n_k_blocks · B) bool: real keys (not padding, not past n_k)
    chunk: int  # query blocks per step


# Tensors inside the engine are query-block major, so that a chunk of query blocks is one
# contiguous slice: queries (n_q_blocks, batch, heads, B, d), already multiplied by the
# scale; keys and values flattened to (batch · heads · n_k_blocks, B, width).
def _flat_index(plan: _Plan, start: int, stop: int, batch: int, heads: int) -> Tensor:
    """(c, batch, heads, R) rows of the flattened key blocks read by query blocks start..stop."""
    idx = plan.layout.indices[:, start:stop].transpose(0, 1)[:, None]  # (c, 1, H, R)
    base = torch.arange(batch * heads, device=idx.device).view(1, batch, heads, 1) * plan.layout.n_k_blocks
    return base + idx


def _drop(plan: _Plan, start: int, stop: int) -> Tensor | None:
    """Where the gathered keys of query blocks start..stop are hidden: None, or bool broadcastable to
    the scores (c, batch, heads, B, R·B)."""
    layout, b = plan.layout, plan.layout.block_size
    dev = layout.indices.device
    offs = torch.arange(b, device=dev)
    valid = layout.valid[:, start:stop].transpose(0, 1)  # (c, H, R)
    kpos = (layout.indices[:, start:stop].transpose(0, 1)[..., None] * b + offs).flatten(-2)  # (c, H, R·B)
    keep = None if bool(valid.all()) else valid.repeat_interleave(b, -1)[:, None, :, None, :]
    if plan.key_ok is not None:
        ok = plan.key_ok[:, kpos].transpose(0, 1)[:, :, :, None, :]  # (c, batch, H, 1, R·B)
        keep = ok if keep is None else keep & ok
    if plan.mask_mod is not None:
        qpos = torch.arange(start, stop, device=dev)[:, None, None, None] * b + offs[:, None]  # (c, 1, B, 1)
        mod = _call_mask_mod(plan.mask_mod, qpos, kpos[:, :, None, :])  # (c, H, B, R·B)
        mod = mod.expand(stop - start, layout.heads, b, kpos.shape[-1])[:, None]
        keep = mod if keep is None else keep & mod
    return None if keep is None else ~keep


def _scores(qc: Tensor, kc: Tensor, drop: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """Masked scores (c·batch·heads, B, R·B) of queries qc (c·batch·heads, B, d) against keys kc."""
    s = torch.bmm(qc, kc.transpose(1, 2))
    if drop is not None:
        s.view(shape).masked_fill_(drop, float("-inf"))
    return s


def _gather(x_flat: Tensor, flat: Tensor) -> Tensor:
    """Key or value blocks of `flat` (c, batch, heads, R) -> (c·batch·heads, R·B, width)."""
    c, bsz, h, r = flat.shape
    return x_flat.index_select(0, flat.reshape(-1)).view(c * bsz * h, r * x_flat.shape[1], x_flat.shape[2])


def _forward(plan: _Plan, qt: Tensor, k_flat: Tensor, v_flat: Tensor) -> tuple[Tensor, Tensor]:
    """out (n_q_blocks, batch, heads, B, dv) and the row log-sum-exp (+inf on rows that see no key)."""
    nqb, bsz, h, b, d = qt.shape
    out = qt.new_empty(nqb, bsz, h, b, v_flat.shape[-1])
    lse = qt.new_empty(nqb, bsz, h, b, 1)
    for start in range(0, nqb, plan.chunk):
        stop = min(start + plan.chunk, nqb)
        flat = _flat_index(plan, start, stop, bsz, h)
        c, rb = stop - start, flat.shape[-1] * b
        p = _scores(qt[start:stop].view(-1, b, d), _gather(k_flat, flat), _drop(plan, start, stop), (c, bsz, h, b, rb))
        m = p.amax(-1, keepdim=True)
        m.masked_fill_(m == float("-inf"), 0.0)
        p.sub_(m).exp_()
        den = p.sum(-1, keepdim=True)
        o = out[start:stop].view(-1, b, out.shape[-1])
        torch.bmm(p, _gather(v_flat, flat), out=o)
        empty = den == 0
        o.div_(den.masked_fill_(empty, 1.0))
        lse[start:stop] = den.log_().add_(m).masked_fill_(empty, float("inf")).view(c, bsz, h, b, 1)
    return out, lse


class _BlockSparseFunction(torch.autograd.Function):
    """Forward by chunks of query blocks; backward recomputes each chunk from the log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, qt: Tensor, k_flat: Tensor, v_flat: Tensor, plan: _Plan) -> Tensor:  # type: ignore[override]
        out, lse = _forward(plan, qt, k_flat, v_flat)
        ctx.save_for_backward(qt, k_flat, v_flat, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        qt, k_flat, v_flat, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        nqb, bsz, h, b, d = qt.shape
        dv_w = v_flat.shape[-1]
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)  # D_i = Σ_c dO_ic O_ic
        dq = torch.empty_like(qt)
        dk = torch.zeros_like(k_flat)
        dv = torch.zeros_like(v_flat)
        for start in range(0, nqb, plan.chunk):
            stop = min(start + plan.chunk, nqb)
            flat = _flat_index(plan, start, stop, bsz, h)
            c, rb = stop - start, flat.shape[-1] * b
            shape = (c, bsz, h, b, rb)
            qc, kc, vc = qt[start:stop].view(-1, b, d), _gather(k_flat, flat), _gather(v_flat, flat)
            doc = dout[start:stop].view(-1, b, dv_w)
            p = _scores(qc, kc, _drop(plan, start, stop), shape)
            p.view(shape).sub_(lse[start:stop]).exp_()
            rows = flat.reshape(-1)
            dv.index_add_(0, rows, torch.bmm(p.transpose(1, 2), doc).view(-1, b, dv_w))
            ds = torch.bmm(doc, vc.transpose(1, 2))
            ds.view(shape).sub_(delta[start:stop])
            ds.mul_(p)
            torch.bmm(ds, kc, out=dq[start:stop].view(-1, b, d))
            dk.index_add_(0, rows, torch.bmm(ds.transpose(1, 2), qc).view(-1, b, d))
        return dq, dk, dv, None


def _check_call(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, mask_mod: MaskMod | None,
    key_padding_mask: Tensor | None, scale: float | None,
) -> float:
    check_qkv(q, k, v)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    layout.check(q.shape[2], k.shape[2], q.shape[1])
    if layout.indices.device != q.device:
        raise ValueError(f"layout: expected its tensors on {q.device} (as q), got {layout.indices.device}")
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"mask_mod: expected a callable mask_mod(q_idx, kv_idx) -> bool tensor, got {type(mask_mod).__name__}")
    check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2])
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ParameterError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def _key_ok(key_padding_mask: Tensor | None, n_k: int, padded: int, device: torch.device) -> Tensor | None:
    if key_padding_mask is not None:
        return F.pad(key_padding_mask, (0, padded - n_k), value=False)
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
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "engine",
    chunk: int | None = None,
) -> Tensor:
    """softmax(q kᵀ·scale) v over the layout's blocks, refined by mask_mod(q_idx, kv_idx) and key padding.

    q (batch, heads, n_q, d), k (batch, heads, n_k, d), v (batch, heads, n_k, dv); positions
    are absolute (query i and key j both count from 0). `chunk`: query blocks per step of the
    engine (default: a ~16 MiB working set). `backend="flex"`: FlexAttention (forward only on
    CPU). Rows that see no key give 0.
    """
    scale = _check_call(q, k, v, layout, mask_mod, key_padding_mask, scale)
    if backend == "flex":
        return _flex_attention(q, k, v, layout, mask_mod, key_padding_mask, scale)
    if backend != "engine":
        raise ParameterError(f"backend: expected 'engine' or 'flex', got {backend!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ParameterError(f"chunk: expected an int >= 1 (query blocks per step) or None, got {chunk!r}")
    bsz, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[-1]
    if n_q == 0 or n_k == 0:
        return q.new_zeros(bsz, h, n_q, dv)
    b = layout.block_size
    if layout.max_row == 0:  # no block at all: one padding entry per row, every row empty
        layout = BlockLayout(b, layout.n_k_blocks, layout.indices.new_zeros(layout.heads, layout.n_q_blocks, 1), layout.counts)
    nqb, nkb = layout.n_q_blocks, layout.n_k_blocks
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qt = F.pad(q.to(work) * scale, (0, 0, 0, nqb * b - n_q)).view(bsz, h, nqb, b, d).permute(2, 0, 1, 3, 4).contiguous()
    k_flat = F.pad(k.to(work), (0, 0, 0, nkb * b - n_k)).reshape(bsz * h * nkb, b, d)
    v_flat = F.pad(v.to(work), (0, 0, 0, nkb * b - n_k)).reshape(bsz * h * nkb, b, dv)
    steps = chunk or max(1, CHUNK_ELEMENTS // (bsz * h * b * b * layout.max_row))
    plan = _Plan(layout, mask_mod, _key_ok(key_padding_mask, n_k, nkb * b, q.device), steps)
    out = _BlockSparseFunction.apply(qt, k_flat, v_flat, plan)
    return out.permute(1, 2, 0, 3, 4).reshape(bsz, h, nqb * b, dv)[:, :, :n_q].to(q.dtype)


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    mask_mod: MaskMod | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `block_sparse_attention`: the dense masked N × N matrix, float64, materialised."""
    scale = _check_call(q, k, v, layout, mask_mod, key_padding_mask, scale)
    keep = layout.element_mask(q.shape[2], k.shape[2], mask_mod)[None]
    if key_padding_mask is not None:
        keep = keep & padding_to_mask(key_padding_mask)
    return softmax_attention_reference(q, k, v, mask=keep, scale=scale)


# -- the FlexAttention backend --------------------------------------------------------------------
_FLEX: dict[str, Callable[..., Tensor]] = {}


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch.nn.attention.flex_attention)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled_flex() -> Callable[..., Tensor]:
    """flex_attention under torch.compile, built once per process (dynamo caches per shape)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _flex_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, mask_mod: MaskMod | None,
    key_padding_mask: Tensor | None, scale: float,
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
    key_ok = _key_ok(key_padding_mask, n_k, nkb * b, q.device)
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
    out = _compiled_flex()(qp, kp, vp, block_mask=block_mask, scale=scale)
    return out[:, :, :n_q]


# -- the module base of block-sparse patterns ------------------------------------------------------
class BlockSparseAttention(Attention):
    """Multi-head attention whose pattern is a block layout plus an in-block mask_mod.

    Subclasses give `block_rows(rows, n_k_blocks)` — the key blocks of the query blocks
    `rows` — and `mask_mod`. Queries and keys are one sequence (self-attention). The mask
    given to `attend_*` carries key padding only: the pattern (and causality) is the
    layout's, since a dense causal mask would be an N × N tensor.
    """

    block_size: int

    @abstractmethod
    def block_rows(self, rows: Tensor, n_k_blocks: int) -> Tensor:
        """Candidate key blocks of query blocks `rows` (1-D), (len(rows), C) or (heads, len(rows), C);
        entries outside [0, n_k_blocks) are dropped, repeats merged."""

    @abstractmethod
    def mask_mod(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """In-block mask on absolute positions, True = attend."""

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def layout(self, n: int, device: torch.device | None = None) -> BlockLayout:
        """The block layout of a sequence of n tokens."""
        nb = math.ceil(n / self.block_size)
        return BlockLayout.from_candidates(self.block_rows(torch.arange(nb, device=device), nb), self.block_size, nb)

    def combined_mask(
        self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None
    ) -> Tensor | None:
        if attn_mask is not None:
            raise ValueError(
                f"attn_mask: {self.spec.name} does not support an arbitrary attention mask "
                "(it would need the N × N matrix the block-sparse layout avoids)"
            )
        check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2])
        return None if key_padding_mask is None else padding_to_mask(key_padding_mask)

    def _padding(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor | None:
        if q.shape[2] != k.shape[2]:
            raise ShapeError(
                f"k: {self.spec.name} attends within one sequence, expected as many keys as queries, "
                f"got n_q={q.shape[2]} and n_k={k.shape[2]}"
            )
        if mask is None:
            return None
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            raise MaskError(f"mask: expected a key padding mask, bool (batch, 1, 1, n_k), got {_describe(mask)}")
        return mask[:, 0, 0]

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        kpm = self._padding(q, k, mask)
        layout = self.layout(q.shape[2], q.device)
        return block_sparse_attention(q, k, v, layout, mask_mod=self.mask_mod, key_padding_mask=kpm, scale=self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        kpm = self._padding(q, k, mask)
        layout = self.layout(q.shape[2], q.device)
        return block_sparse_attention_reference(q, k, v, layout, mask_mod=self.mask_mod, key_padding_mask=kpm, scale=self.scale)

    def step_inputs(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
        """Checks of `step`; q of x_t (batch, heads, 1, head_dim) and the keys, values so far including x_t's."""
        if not self.causal:
            raise ValueError("step: decoding needs a causal module (build it with causal=True)")
        check_tokens("x_t", x_t, self.dim)
        check_finite("x_t", x_t)
        if x_t.shape[1] != 1:
            raise ShapeError(f"x_t: expected one position (batch, 1, dim), got shape {tuple(x_t.shape)}")
        q, k, v = self.project(x_t)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        return q, k, v

    def step(self, x_t: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """Decode one token: the cache keeps every key; the new query reads only its row of the layout."""
        q, k, v = self.step_inputs(x_t, state)
        t, b = k.shape[2] - 1, self.block_size
        row = BlockLayout.from_candidates(
            self.block_rows(torch.tensor([t // b], device=q.device), t // b + 1), b, t // b + 1
        )
        pos = (row.indices[:, 0, :, None] * b + torch.arange(b, device=q.device)).flatten(-2)  # (H, R·B)
        keep = row.valid[:, 0].repeat_interleave(b, -1) & (pos <= t)
        keep = keep & _call_mask_mod(self.mask_mod, torch.tensor(t, device=q.device), pos)
        pos = pos.clamp(max=t)[None, :, :, None]
        kg = k.gather(2, pos.expand(k.shape[0], self.heads, -1, k.shape[-1]))
        vg = v.gather(2, pos.expand(v.shape[0], self.heads, -1, v.shape[-1]))
        out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=keep[None, :, None, :], scale=self.scale)
        return self.out_proj(self.merge_heads(out)), KVCache(k, v)
