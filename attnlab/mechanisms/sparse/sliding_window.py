"""Sliding-window attention (Longformer, Beltagy et al., 2020; causal as in Mistral 7B), exact band.

Query i attends to the keys within `radius` r positions:

    out_i = Σ_{j : |i − j| ≤ r} softmax_j(q_i · k_j / √d) v_j          (and j ≤ i when causal)

so a query sees 2r + 1 keys (r + 1 when causal). The parameter is the band's half-width, named
`radius` (was `window`): Longformer's and Mistral's "window size" w is the count of keys a query
sees (Longformer: w/2 on each side; Mistral: the last W tokens, itself included), which here is
2r + 1 or r + 1, and attnlab keeps `window_size` for that count (based) and `tile_size` for the side
of a grid partition (Twins/Swin's "window size": twins-lsa, proxy-token, bilateral). Passing
`window=` raises an error naming `radius`.

On the block-sparse engine: query block I reads key blocks I − a … I + a with
a = ⌈r / B⌉ (I − a … I when causal), and the mask_mod |i − j| ≤ r (j ≤ i) makes the band
exact inside them. The mask_mod is a `RelativeBand` (−r ≤ j − i ≤ r, or ≤ 0 when causal), so
the engine takes its band path: query block I reads the B + 2r (B + r when causal) keys
I·B − r … I·B + B − 1 + r in place, through overlapping strided views of k and v, with the band
as one additive bias fused into the score matmul. Cost O(N (B + 2r) d) = O(N r d) for r ≥ B. The
default B = 64 was chosen by measurement (N = 16,384, r = 256, causal, one thread: B = 32 and
B = 128 took 0.98× and 1.11× its time; see `attnlab.kernels.block_sparse`). Decoding keeps a sliding
KV cache of the last r + 1 keys. P199's multi-scale heads (attnlab "multiscale") are the per-head
generalisation: one band width per head, on dense SDPA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.module import KVCache
from ...core.registry import Paper, Param, Supports, register, renamed_keywords
from ...core.validate import check_int, check_qkv
from ...kernels.block_sparse import BlockLayout, RelativeBand, block_sparse_attention, block_sparse_attention_reference
from .base import BlockSparseAttention

LONGFORMER = Paper(None, "Longformer: The Long-Document Transformer", 2020, "2004.05150")
RENAMED = {"window": "radius (keys with |i − j| ≤ radius)"}


def window_block_rows(rows: Tensor, *, radius: int, block_size: int, causal: bool) -> Tensor:
    """Candidate key blocks (len(rows), C) of query blocks `rows`: I − ⌈r/B⌉ … I (+ ⌈r/B⌉ unless causal)."""
    reach = math.ceil(check_int("radius", radius, 0) / check_int("block_size", block_size, 1))
    offsets = torch.arange(-reach, 1 if causal else reach + 1, device=rows.device)
    return rows.to(torch.int64)[:, None] + offsets


def window_layout(n: int, *, radius: int, block_size: int = 64, causal: bool = False, device: torch.device | None = None) -> BlockLayout:
    """The block layout of sliding-window attention over n tokens."""
    nb = -(-check_int("n", n, 0) // check_int("block_size", block_size, 1))
    rows = window_block_rows(torch.arange(nb, device=device), radius=radius, block_size=block_size, causal=causal)
    return BlockLayout.from_candidates(rows, block_size, nb)


def band_mod(radius: int, causal: bool) -> RelativeBand:
    """mask_mod of the band: key j visible from query i when |i − j| ≤ radius (and j ≤ i when causal),
    i.e. −radius ≤ j − i ≤ radius (≤ 0 when causal); the engine runs it on its band path."""
    check_int("radius", radius, 0)
    return RelativeBand(-radius, 0 if causal else radius)


@renamed_keywords("sliding_window_attention", RENAMED)
def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    radius: int,
    causal: bool = False,
    block_size: int = 64,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention of each query to the keys with |i − j| ≤ radius (j ≤ i when causal), block-sparse engine."""
    check_qkv(q, k, v, same_length=True)
    layout = window_layout(q.shape[2], radius=radius, block_size=block_size, causal=causal, device=q.device)
    return block_sparse_attention(q, k, v, layout, mask_mod=band_mod(radius, causal), attention_mask=attention_mask, scale=scale)


@renamed_keywords("sliding_window_attention_reference", RENAMED)
def sliding_window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    radius: int,
    causal: bool = False,
    block_size: int = 64,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `sliding_window_attention`: the dense band-masked matrix in float64."""
    check_qkv(q, k, v, same_length=True)
    layout = window_layout(q.shape[2], radius=radius, block_size=block_size, causal=causal, device=q.device)
    return block_sparse_attention_reference(
        q, k, v, layout, mask_mod=band_mod(radius, causal), attention_mask=attention_mask, scale=scale
    )


def sliding_window_flops(n: int, heads: int, head_dim: int, causal: bool, *, radius: int = 256) -> float:
    """Forward FLOPs of q·k and A·v over the band: 4·h·d·Σ_i |{j : |i − j| ≤ r (, j ≤ i)}| (useful pairs only)."""
    r = min(radius, max(n - 1, 0))
    before = n * r - r * (r + 1) // 2  # Σ_i min(i, r)
    return 4.0 * heads * head_dim * (n + before * (1 if causal else 2))


def backend_line() -> str:
    """The fast path, for `attnlab info sliding-window`."""
    return ("the block-sparse engine's band path (keys read in place through strided windows, the band a "
            "bias fused into the score matmul), plain PyTorch on every device; bfloat16/float16 computed in float32")


@register(
    name="sliding-window",
    paper=LONGFORMER,
    family="A",
    cost="O(N r d)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, decode=True, materialize=True, sharding=("halo",)),
    params=(
        Param("radius", int, 256, "r: keys with |i − j| ≤ r are seen (j ≤ i when causal)", low=0),
        Param("block_size", int, 64, "tokens per block B of the block-sparse engine", low=1, knob=True),
    ),
    summary="Sliding-window attention: each query sees the keys within radius positions (exact band, block-sparse engine).",
    test_params={"radius": 2, "block_size": 2},
    renamed=RENAMED,
    backend=backend_line,
    flops=sliding_window_flops,
)
class SlidingWindowAttention(BlockSparseAttention):
    """Multi-head sliding-window attention, causal or bidirectional, on the block-sparse engine."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        radius: int = 256,
        block_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal)
        self.radius = check_int("radius", radius, 0)
        self.block_size = check_int("block_size", block_size, 1)
        self._mod = band_mod(radius, causal)

    def block_rows(self, rows: Tensor, n_k_blocks: int) -> Tensor:
        return window_block_rows(rows, radius=self.radius, block_size=self.block_size, causal=self.causal)

    def mask_mod(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self._mod(q_idx, kv_idx)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The engine given the band itself (a RelativeBand), so that it takes its band path."""
        layout = self.layout(q.shape[2], q.device)
        return block_sparse_attention(q, k, v, layout, mask_mod=self._mod, attention_mask=mask, scale=self.scale)

    def decode(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        """One checked token with a sliding KV cache: the last radius + 1 keys, all inside the band."""
        q, k, v = self.cached_qkv(x_t, state)
        k, v = k[:, :, -(self.radius + 1):], v[:, :, -(self.radius + 1):]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(self.merge_heads(out)), KVCache(k, v)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, block_size={self.block_size}, causal={self.causal}"
