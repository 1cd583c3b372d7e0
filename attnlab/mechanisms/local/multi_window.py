"""Multi-window multi-head attention, MW-MHA (Yadav et al., "Masked Autoencoders with Multi-Window
Local-Global Attention Are Better Audio Learners", 2023 — MW-MAE) on sequences.

Head j attends within non-overlapping windows of its own size w_j: position i lies in window
⌊i/w_j⌋, and

    out_i^(j) = Σ_{j' : ⌊j'/w_j⌋ = ⌊i/w_j⌋} softmax(q_i^(j)·k_{j'}^(j)·scale) v_{j'}^(j)

so each head's matrix is block diagonal with blocks of w_j; a global head (w_j = N) is plain
softmax attention. The heads are concatenated and projected by W_o as in multi-head attention.

Naming: the sizes are `tile_sizes` (was `windows`). MW-MAE, as Swin, says "window size" for the
length of a cell of a fixed partition of the sequence; attnlab calls such a cell a tile (twins-lsa,
proxy-token, bilateral: `tile_size`) and keeps "window" words for bands that move with the query
(sliding-window's `radius`, based's `window_size`: the count of keys a query sees, as Longformer
and Mistral). Passing `windows=` raises an error naming `tile_sizes`.

Choices: `tile_sizes` holds one size per head, 0 meaning global (whatever N; a size equal to N
is global too). Every other size must divide N (the paper draws the sizes from the divisors
of N; pad the sequence and pass attention_mask otherwise). With tile_sizes=None the sizes
follow the paper's rule at each call: the last head is global and the other h − 1 take
distinct divisors 1 < w < N, spread evenly over their sorted list (repeating when N has fewer
than h − 1 of them; windows of 1 when N is prime). Causal (not in the paper, an encoder):
within its window a query sees keys j' <= i. Sequences only (the paper's patch sequence).

Relative position bias, as the official code (WindowedAttentionHead of MW-MAE): every windowed
head has a learned table of 2w_j − 1 scalars, and the logit of query a and key b of one window
gets table_j[a − b + w_j − 1] (positions inside the window); global heads (AttentionHead) have
none. The tables are one (heads, 2·max_j w_j − 1) parameter, head j reading its first 2w_j − 1
entries, initialised trunc_normal(std 0.02) as the official PyTorch port. The table's size needs
the sizes when the module is built: `rel_pos_bias` (default None) is on when `tile_sizes` is
given and off with tile_sizes=None (sizes chosen per call); True with tile_sizes=None is refused.

Defaults: the official layer (WindowedMultiHeadAttention) takes its window sizes as given, one per
head and layer, from the model that builds it; tile_sizes=None here is the paper's stated rule above,
so to reproduce a checkpoint pass its sizes as `tile_sizes`. The official projection has no qkv bias (`qkv_bias=False`);
here qkv_bias keeps the library's default True.

The fast path groups the heads by window size and runs SDPA over the (batch, heads, N/w, w)
windows of each group (global heads over the whole sequence): cost O(N·Σ_j w_j·d), quadratic
with a global head. The reference materialises each head's masked N × N matrix in float64,
its bias indexed by i − j over the whole sequence.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register, renamed_keywords
from ...core.validate import check_attention_mask, check_qkv, is_int

MWMAE = Paper(
    "P108", "Masked Autoencoders with Multi-Window Local-Global Attention Are Better Audio Learners", 2023, "2306.00561"
)
RENAMED = {"windows": "tile_sizes (one window (tile) size per head, 0 = global)"}


def default_tile_sizes(n: int, heads: int) -> tuple[int, ...]:
    """The paper's rule for N = n: the last head global (0), the other heads − 1 distinct divisors
    1 < w < n spread evenly over their sorted list (repeats when there are fewer; 1 when there are none)."""
    divisors = [w for w in range(2, n) if n % w == 0] or [1]
    local = heads - 1
    picks = [divisors[round(i * (len(divisors) - 1) / max(local - 1, 1))] for i in range(local)]
    return (*picks, 0)


def check_tile_sizes(tile_sizes: object, heads: int) -> tuple[int, ...] | None:
    """`tile_sizes` as a tuple of ints >= 0, one per head (None kept), or ParameterError."""
    if tile_sizes is None:
        return None
    if not isinstance(tile_sizes, (tuple, list)) or any(not is_int(w) or w < 0 for w in tile_sizes):
        raise ParameterError(f"tile_sizes: expected a tuple of ints >= 0 (one window (tile) size per head, 0 = global), got {tile_sizes!r}")
    if len(tile_sizes) != heads:
        raise ParameterError(f"tile_sizes: expected one tile size per head ({heads} heads), got {len(tile_sizes)}: {tuple(tile_sizes)!r}")
    return tuple(tile_sizes)


def resolved_tile_sizes(tile_sizes: Sequence[int] | None, heads: int, n: int) -> tuple[int, ...]:
    """The tile size of every head on a sequence of n (global heads as n), checked against n."""
    sizes = default_tile_sizes(n, heads) if tile_sizes is None else check_tile_sizes(tile_sizes, heads)
    assert sizes is not None
    out = []
    for head, w in enumerate(sizes):
        if w > n or (w and n % w):
            raise ShapeError(
                f"tile_sizes: head {head} has tile size {w}, which does not divide the sequence length n={n}; expected "
                "a divisor of n or 0 (global) — pad the sequence and pass attention_mask"
            )
        out.append(w or n)
    return tuple(out)


def multi_window_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of q·k and A·v with the default tile sizes: 4·d·n·Σ_j w_j (half of it when causal)."""
    return 4.0 * head_dim * n * sum(w or n for w in default_tile_sizes(n, heads)) * (0.5 if causal else 1.0)


def _check(q: Tensor, k: Tensor, v: Tensor, tile_sizes: Sequence[int] | None, kpm: Tensor | None,
           position_bias: Tensor | None = None) -> tuple[int, ...]:
    check_qkv(q, k, v, same_length=True)
    check_attention_mask(kpm, q.shape[0], k.shape[2])
    sizes = resolved_tile_sizes(tile_sizes, q.shape[1], q.shape[2])
    if position_bias is not None:
        if tile_sizes is None:
            raise ParameterError("position_bias: needs the tile sizes of the heads (the table's size), got tile_sizes=None")
        want = (q.shape[1], 2 * max(tile_sizes) - 1)
        if tuple(position_bias.shape) != want or max(tile_sizes) == 0:
            raise ShapeError(f"position_bias: expected (heads, 2·max window − 1) = {want} with a windowed head, "
                             f"got shape {tuple(position_bias.shape)}")
        if position_bias.dtype != q.dtype:
            raise TypeError(f"position_bias: expected dtype {q.dtype} (as q), got {position_bias.dtype}")
    return sizes


# -- the fast path -----------------------------------------------------------------------------
def _window_bias(table: Tensor, w: int) -> Tensor:
    """(h, w, w): table[:, a − b + w − 1] for query a and key b inside a window (the official index)."""
    pos = torch.arange(w, device=table.device)
    return table[:, pos[:, None] - pos[None, :] + w - 1]


def _windowed(q: Tensor, k: Tensor, v: Tensor, w: int, causal: bool, kpm: Tensor | None, scale: float | None,
              table: Tensor | None = None) -> Tensor:
    """SDPA of (batch, h, n, ·) heads within windows (tiles) of w: (batch, h·n/w, w, ·) blocks; with a bias table
    (h, ≥ 2w − 1), (batch, h, n/w, w, ·) blocks and the bias as an additive mask."""
    b, h, n = q.shape[:3]
    if table is not None:
        blocks = [t.reshape(b, h, n // w, w, t.shape[-1]) for t in (q, k, v)]
        keep = torch.ones(1, 1, 1, w, w, dtype=torch.bool, device=q.device)
        if causal:
            keep = keep.tril()
        if kpm is not None:
            keep = keep & kpm.reshape(b, 1, n // w, 1, w)
        bias = _window_bias(table, w)[None, :, None].masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(*blocks, attn_mask=bias, scale=scale)  # fully masked rows give 0
        return out.reshape(b, h, n, v.shape[-1])
    blocks = [t.reshape(b, h * (n // w), w, t.shape[-1]) for t in (q, k, v)]
    if kpm is None:
        out = F.scaled_dot_product_attention(*blocks, is_causal=causal, scale=scale)
    else:
        keep = kpm.reshape(b, 1, n // w, 1, w).expand(b, h, n // w, 1, w).reshape(b, h * (n // w), 1, w)
        if causal:
            keep = keep & torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(*blocks, attn_mask=keep, scale=scale)  # fully masked rows give 0
    return out.reshape(b, h, n, v.shape[-1])


@renamed_keywords("multi_window_attention", RENAMED)
def multi_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_sizes: Sequence[int] | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    position_bias: Tensor | None = None,
) -> Tensor:
    """MW-MHA of q, k, v (batch, heads, n, head_dim): head j attends within windows (tiles) of tile_sizes[j]
    (0 = global; None: `default_tile_sizes`). attention_mask: bool (batch, n), True = real token (a
    query whose window holds no real key gives 0); scale defaults to 1/√head_dim; position_bias:
    the (heads, 2·max(tile_sizes) − 1) tables of the windowed heads (needs `tile_sizes`; global heads read none)."""
    sizes = _check(q, k, v, tile_sizes, attention_mask, position_bias)
    groups: dict[tuple[int, bool], list[int]] = {}
    for head, w in enumerate(sizes):
        biased = position_bias is not None and tile_sizes is not None and tile_sizes[head] > 0
        groups.setdefault((w, biased), []).append(head)
    parts, order = [], []
    for (w, biased), heads in groups.items():
        index = torch.tensor(heads, device=q.device)
        sel = [t.index_select(1, index) for t in (q, k, v)]
        table = position_bias.index_select(0, index) if biased and position_bias is not None else None
        parts.append(_windowed(*sel, w, causal, attention_mask, scale, table))
        order += heads
    out = torch.cat(parts, dim=1)
    if order == sorted(order):
        return out
    return out.index_select(1, torch.argsort(torch.tensor(order, device=q.device)))


# -- the reference -----------------------------------------------------------------------------
def multi_window_mask(sizes: Sequence[int], n: int, causal: bool, device: torch.device | None = None) -> Tensor:
    """bool (heads, n, n): True where key j is in query i's window of the head (and j <= i when causal)."""
    i = torch.arange(n, device=device)
    w = torch.tensor(list(sizes), device=device)[:, None, None]
    keep = (i[None, :, None] // w) == (i[None, None, :] // w)
    return keep & (i[None, None, :] <= i[None, :, None]) if causal else keep


@renamed_keywords("multi_window_attention_reference", RENAMED)
def multi_window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_sizes: Sequence[int] | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    position_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, n, n)) of `multi_window_attention` in float64, cast back to q's dtype;
    the bias of head j at (i, i') is position_bias[j, i − i' + w_j − 1] (i, i' in one window)."""
    sizes = _check(q, k, v, tile_sizes, attention_mask, position_bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    n = q.shape[2]
    keep = multi_window_mask(sizes, n, causal, q.device)[None]
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :]
    logits = (q64 @ k64.transpose(-1, -2)) * scale
    if position_bias is not None and tile_sizes is not None:
        i = torch.arange(n, device=q.device)
        for head, w in enumerate(tile_sizes):
            if w > 0:
                index = (i[:, None] - i[None, :] + w - 1).clamp(0, 2 * w - 2)  # outside the window: masked anyway
                logits[:, head] = logits[:, head] + position_bias[head].double()[index]
    weights = masked_softmax(logits, keep)
    return (weights @ v64).to(q.dtype), weights.to(q.dtype)


# -- the module --------------------------------------------------------------------------------
@register(
    name="multi-window",
    paper=MWMAE,
    family="A",
    cost="O(N·Σ_j w_j·d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, grids=(1,), materialize=True),
    params=(
        Param("tile_sizes", tuple, None, "window (tile) size per head (0 = global), each dividing N; None: the last head "
              "global, the others distinct divisors of N spread over their sorted list", low=0, optional=True),
        Param("rel_pos_bias", bool, None, "learned relative position bias of every windowed head (official code); "
              "None: on when tile_sizes are given", optional=True),
    ),
    summary="MW-MHA (MW-MAE): each head attends within non-overlapping windows of its own size, global heads included.",
    test_params={"tile_sizes": (3, 0)},
    flops=multi_window_flops,
    renamed=RENAMED,
)
class MultiWindowAttention(Attention):
    """Multi-head attention whose head j attends within non-overlapping windows (tiles) of tile_sizes[j] (0 = global).

    Self-attention over (batch, n, dim); the only mask is a key padding mask (the windows are built
    from the positions, no N × N mask). Declared exponent 2: the paper keeps a global head.
    """

    mask_form = "padding"  # the key padding keep-mask (batch, n_k): no N × N mask is built

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        causal: bool = False,
        tile_sizes: Sequence[int] | None = None,
        rel_pos_bias: bool | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first, causal=causal)
        self.tile_sizes = check_tile_sizes(tile_sizes, heads)
        if rel_pos_bias is not None and not isinstance(rel_pos_bias, bool):
            raise ParameterError(f"rel_pos_bias: expected a bool or None, got {rel_pos_bias!r}")
        if rel_pos_bias and (self.tile_sizes is None or max(self.tile_sizes) == 0):
            raise ParameterError("rel_pos_bias: the bias tables need fixed tile_sizes with a windowed head; "
                                 f"got tile_sizes={self.tile_sizes!r}")
        self.rpb: nn.Parameter | None = None
        if rel_pos_bias is not False and self.tile_sizes is not None and max(self.tile_sizes) > 0:
            self.rpb = nn.Parameter(torch.zeros(heads, 2 * max(self.tile_sizes) - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path; `mask` is the key padding mask (batch, n) or None."""
        return multi_window_attention(q, k, v, tile_sizes=self.tile_sizes, causal=self.causal,
                                      attention_mask=mask, scale=self.scale,
                                      position_bias=self.rpb)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, weights (batch, heads, n, n)); `mask` as in attend_fast."""
        return multi_window_attention_reference(q, k, v, tile_sizes=self.tile_sizes, causal=self.causal,
                                                attention_mask=mask, scale=self.scale,
                                                position_bias=self.rpb)

    def extra_repr(self) -> str:
        return f"tile_sizes={self.tile_sizes}, causal={self.causal}, rel_pos_bias={self.rpb is not None}"
