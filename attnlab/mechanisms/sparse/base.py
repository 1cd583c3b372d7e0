"""The module base of block-sparse patterns: `BlockSparseAttention` runs the engine of
`attnlab.kernels.block_sparse` on the layout and mask_mod a mechanism gives."""
from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.module import Attention, KVCache
from ...kernels.block_sparse import (
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_reference,
    call_mask_mod,
)


class BlockSparseAttention(Attention[KVCache]):
    """Multi-head attention whose pattern is a block layout plus an in-block mask_mod.

    Subclasses give `block_rows(rows, n_k_blocks)` — the key blocks of the query blocks
    `rows` — and `mask_mod`. Queries and keys are one sequence (self-attention). The cores
    take the key padding keep-mask (batch, n_k) only (`mask_form = "padding"`): the pattern
    (and causality) is the layout's, since a dense causal mask would be an N × N tensor.
    """

    mask_form = "padding"
    mask_note = "it would need the N × N matrix the block-sparse layout avoids"
    same_length = True

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

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        layout = self.layout(q.shape[2], q.device)
        return block_sparse_attention(q, k, v, layout, mask_mod=self.mask_mod, attention_mask=mask, scale=self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        layout = self.layout(q.shape[2], q.device)
        return block_sparse_attention_reference(q, k, v, layout, mask_mod=self.mask_mod, attention_mask=mask, scale=self.scale)

    def decode(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        """One checked token: the cache keeps every key; the new query reads only its row of the layout."""
        q, k, v = self.cached_qkv(x_t, state)
        t, b = k.shape[2] - 1, self.block_size
        row = BlockLayout.from_candidates(
            self.block_rows(torch.tensor([t // b], device=q.device), t // b + 1), b, t // b + 1
        )
        pos = (row.indices[:, 0, :, None] * b + torch.arange(b, device=q.device)).flatten(-2)  # (H, R·B)
        keep = row.valid[:, 0].repeat_interleave(b, -1) & (pos <= t)
        keep = keep & call_mask_mod(self.mask_mod, torch.tensor(t, device=q.device), pos)
        pos = pos.clamp(max=t)[None, :, :, None]
        kg = k.gather(2, pos.expand(k.shape[0], self.heads, -1, k.shape[-1]))
        vg = v.gather(2, pos.expand(v.shape[0], self.heads, -1, v.shape[-1]))
        out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=keep[None, :, None, :], scale=self.scale)
        return self.out_proj(self.merge_heads(out)), KVCache(k, v)
