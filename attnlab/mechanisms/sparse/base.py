"""The module base of block-sparse patterns: `BlockSparseAttention` runs the engine of
`attnlab.kernels.block_sparse` on the layout and mask_mod a mechanism gives."""
from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import MaskError, ShapeError
from ...core.masks import padding_to_mask
from ...core.module import Attention, KVCache
from ...core.validate import check_attention_mask, check_finite, check_tokens
from ...kernels.block_sparse import (
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_reference,
    call_mask_mod,
)


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
        self, q: Tensor, k: Tensor, attention_mask: Tensor | None, attn_mask: Tensor | None
    ) -> Tensor | None:
        if attn_mask is not None:
            raise ValueError(
                f"attn_mask: {self.spec.name} does not support an arbitrary attention mask "
                "(it would need the N × N matrix the block-sparse layout avoids)"
            )
        check_attention_mask(attention_mask, q.shape[0], k.shape[2])
        return None if attention_mask is None else padding_to_mask(attention_mask)

    def _padding(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor | None:
        if q.shape[2] != k.shape[2]:
            raise ShapeError(
                f"k: {self.spec.name} attends within one sequence, expected as many keys as queries, "
                f"got n_q={q.shape[2]} and n_k={k.shape[2]}"
            )
        if mask is None:
            return None
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            raise MaskError(f"mask: expected a key padding mask, bool (batch, 1, 1, n_k), got dtype {mask.dtype} and shape {tuple(mask.shape)}")
        return mask[:, 0, 0]

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        kpm = self._padding(q, k, mask)
        layout = self.layout(q.shape[2], q.device)
        return block_sparse_attention(q, k, v, layout, mask_mod=self.mask_mod, attention_mask=kpm, scale=self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        kpm = self._padding(q, k, mask)
        layout = self.layout(q.shape[2], q.device)
        return block_sparse_attention_reference(q, k, v, layout, mask_mod=self.mask_mod, attention_mask=kpm, scale=self.scale)

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
        keep = keep & call_mask_mod(self.mask_mod, torch.tensor(t, device=q.device), pos)
        pos = pos.clamp(max=t)[None, :, :, None]
        kg = k.gather(2, pos.expand(k.shape[0], self.heads, -1, k.shape[-1]))
        vg = v.gather(2, pos.expand(v.shape[0], self.heads, -1, v.shape[-1]))
        out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=keep[None, :, None, :], scale=self.scale)
        return self.out_proj(self.merge_heads(out)), KVCache(k, v)
