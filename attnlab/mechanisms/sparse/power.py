"""PowerAttention (Chen et al., 2025): causal block-sparse attention at power-of-two distances.

Query block i attends to key block j ≤ i when

    i − j < w   (local window: the diagonal block and the w − 1 before it)
    or j < s    (sink blocks at the start of the sequence)
    or i − j = 2^m for some m ≥ 0

and, inside the diagonal block, to keys j ≤ i only. A query block reads at most
w + s + ⌊log₂ n_blocks⌋ + 1 key blocks, so the cost is O(N (w + s + log(N/B)) B d).

The paper's point is the receptive field over layers. As a graph with an edge j → i when
i attends to j, d layers (the d-th power of the mask) connect every pair at a distance δ
that is a sum of d powers of two (or 0): that is every δ whose binary writing has at most
d ones, which includes every δ ≤ 2^d — complete and continuous, where a sliding window
of width w reaches d·w. At block size 1 this holds token by token; at block size B it
holds between blocks.

Padding is not removal, true to the paper: P223's mask is "block i attends to block j iff i−j = 0
or i−j is a power of 2 (plus local sliding window / sink)" (shared/PAPERS.md), the sink being the
sequence's first blocks, so tokens padded before the real ones take the sinks' place and the real
first blocks lose their sink role (attnlab.testing.PADDING_MOVES lists it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_int, check_qkv
from ...kernels.block_sparse import BlockLayout, block_sparse_attention, block_sparse_attention_reference
from .base import BlockSparseAttention

POWER = Paper("P223", "PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention", 2025, "2503.03588")


def power_block_rows(rows: Tensor, *, local_blocks: int = 1, sink_blocks: int = 1) -> Tensor:
    """Candidate key blocks (len(rows), C) of query blocks `rows`: local, sink and power-of-two
    distances, −1 where a candidate lies in the future (dropped by `BlockLayout.from_candidates`)."""
    check_int("local_blocks", local_blocks, 1)
    check_int("sink_blocks", sink_blocks, 0)
    i = rows.to(torch.int64)[:, None]
    top = int(rows.max()) if rows.numel() else 0
    powers = 2 ** torch.arange(max(top, 1).bit_length(), device=rows.device)
    local = i - torch.arange(local_blocks, device=rows.device)
    sinks = torch.arange(sink_blocks, device=rows.device).expand(i.shape[0], -1)
    cand = torch.cat([local, torch.where(sinks <= i, sinks, -1), i - powers], dim=-1)
    return cand.clamp(min=-1)


def power_layout(n: int, *, block_size: int = 64, local_blocks: int = 1, sink_blocks: int = 1, device: torch.device | None = None) -> BlockLayout:
    """The PowerAttention block layout of a sequence of n tokens."""
    check_int("n", n, 0)
    check_int("block_size", block_size, 1)
    nb = -(-n // block_size)
    rows = torch.arange(nb, device=device)
    return BlockLayout.from_candidates(power_block_rows(rows, local_blocks=local_blocks, sink_blocks=sink_blocks), block_size, nb)


def causal_mod(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """mask_mod of causality: key j visible from query i when j ≤ i."""
    return kv_idx <= q_idx


def power_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 64,
    local_blocks: int = 1,
    sink_blocks: int = 1,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal PowerAttention over (batch, heads, n, head_dim) self-attention inputs (block-sparse engine)."""
    check_qkv(q, k, v, same_length=True)
    layout = power_layout(q.shape[2], block_size=block_size, local_blocks=local_blocks, sink_blocks=sink_blocks, device=q.device)
    return block_sparse_attention(q, k, v, layout, mask_mod=causal_mod, attention_mask=attention_mask, scale=scale)


def power_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 64,
    local_blocks: int = 1,
    sink_blocks: int = 1,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `power_attention`: the dense masked matrix in float64."""
    check_qkv(q, k, v, same_length=True)
    layout = power_layout(q.shape[2], block_size=block_size, local_blocks=local_blocks, sink_blocks=sink_blocks, device=q.device)
    return block_sparse_attention_reference(q, k, v, layout, mask_mod=causal_mod, attention_mask=attention_mask, scale=scale)


def reachable(mask: Tensor, layers: int) -> Tensor:
    """bool (n, n): True where query i is reached from key j through `layers` layers of the bool mask (n, n)."""
    check_int("layers", layers, 1)
    step = mask.to(torch.float64)
    out = step
    for _ in range(layers - 1):
        out = ((out @ step) > 0).to(torch.float64)
    return out > 0


@register(
    name="power-attention",
    paper=POWER,
    family="A",
    cost="O(N log N d)",
    exponent=1.0,
    supports=Supports(causal=True, causal_only=True, key_padding=True, decode=True, materialize=True),
    params=(
        Param("block_size", int, 64, "tokens per block B", low=1),
        Param("local_blocks", int, 1, "local window w in blocks: key blocks i − w + 1 … i", low=1),
        Param("sink_blocks", int, 1, "sink blocks s at the start, seen by every query block", low=0),
    ),
    summary="PowerAttention: causal block-sparse attention to local, sink and power-of-two-distance blocks.",
    test_params={"block_size": 2},
)
class PowerAttention(BlockSparseAttention):
    """Multi-head PowerAttention, causal by construction, on the block-sparse engine.

    Declared exponent 1.0: the cost is N·(w + s + log₂(N/B))·B·d, linear up to the log
    factor (over N = 2,048 … 32,768 at B = 64 it adds ≈ 0.1 to a fitted log-log slope).
    Decoding keeps every key (the power-of-two distances reach back to the start) and
    reads O(w + s + log N) blocks per token.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = True,
        block_size: int = 64,
        local_blocks: int = 1,
        sink_blocks: int = 1,
    ) -> None:
        if causal is not True:
            raise ParameterError(f"causal: PowerAttention is causal by construction; expected True, got {causal!r}")
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=True)
        self.block_size = check_int("block_size", block_size, 1)
        self.local_blocks = check_int("local_blocks", local_blocks, 1)
        self.sink_blocks = check_int("sink_blocks", sink_blocks, 0)

    def block_rows(self, rows: Tensor, n_k_blocks: int) -> Tensor:
        return power_block_rows(rows, local_blocks=self.local_blocks, sink_blocks=self.sink_blocks)

    def mask_mod(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return causal_mod(q_idx, kv_idx)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, local_blocks={self.local_blocks}, sink_blocks={self.sink_blocks}"

