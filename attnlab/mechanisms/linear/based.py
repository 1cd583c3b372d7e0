"""Based (Arora et al., 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): linear attention with a second-order Taylor feature map plus exact sliding-window softmax
attention. Its recall study builds on Zoology (P243: MQAR and recall in efficient LMs).

Taylor linear attention, on a small feature projection q_f, k_f ∈ R^{d'} of each head (d' = 16):

    φ(x) = [1, x / d'^{1/4}, (x ⊗ x) / (√2 √d')],   φ(q)ᵀφ(k) = 1 + q·k/√d' + (q·k)²/(2d')

the second-order Taylor expansion of exp(q·k/√d'), which is positive for every q, k (1 + t + t²/2 ≥ ½),
so the normalised linear attention out_i = Σ_j φ(q_i)ᵀφ(k_j) v_j / Σ_j φ(q_i)ᵀφ(k_j) never divides by 0.
As the official code's memory-saving form, x ⊗ x keeps its d'(d'+1)/2 distinct entries (the diagonal
over √(2d'), each off-diagonal pair once over √d'), the same inner product with 1 + d' + d'(d'+1)/2
features (153 for d' = 16) instead of 1 + d' + d'².

Sliding-window softmax attention over the head's ordinary q, k (scale 1/√head_dim): causal, query i
sees keys 0 ≤ i − j < window_size (64 by default, the "short (64) sliding window" of the official
README); bidirectional, |i − j| < window_size.

The name `window_size` (was `window`) is the count of keys a causal query sees, itself included: the
sense of Longformer's and Mistral's "window size" (Mistral's sliding window W) and of the
window_size of sliding-window kernels. Bidirectional (not in the paper, a causal LM) is the same
band mirrored, 2·window_size − 1 keys. attnlab names a band's half-width
`radius` (sliding-window: |i − j| ≤ radius) and a grid partition's side `tile_size` (twins-lsa,
proxy-token, bilateral), so no two meanings share a name; passing `window=` raises an error naming
`window_size`.

How they combine. Based stacks them as separate layers (linear-attention layers and sliding-window
layers among gated-convolution layers), each in its own residual block. One attention module cannot
be a stack: here the two mixers run in parallel on the same input and their outputs add, with one
value and one output projection shared by both, so the module is a single attention operator

    out = (A_taylor + A_window) v,     each of A_taylor, A_window row-normalised (rows of A sum to 2)

and `materialize` returns A_taylor + A_window. The per-head query and key that `attend` takes carry
both parts side by side: the first head_dim channels feed the window softmax, the last d' the Taylor map.

Forms: bidirectional (one pass), causal chunked and recurrent (the engine; the window part in blocks
of window_size queries against ≤ 3 blocks of keys, O(N w d), w = window_size), and `step`, which keeps
the engine's state and the last window_size − 1 keys and values. Cost O(N d'² d + N w d).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register, renamed_keywords
from ...core.validate import check_attention_mask, check_int, check_qkv
from ...kernels.linear_scan import (
    LinearState,
    LinearTerms,
    linear_attention,
    linear_attention_step,
)
from .base import LinearAttention

BASED = Paper(None, "Simple linear attention language models balance the recall-throughput tradeoff", 2024, "2402.18668")
FEATURE_DIM, WINDOW_SIZE = 16, 64
RENAMED = {"window": "window_size (keys a causal query sees, itself included)"}


def taylor_feature_map(x: Tensor) -> Tensor:
    """φ(x) = [1, x/d^{1/4}, x_a²/√(2d), x_a x_b/√d (a < b)] over the last axis (d): φ(x)·φ(y) = 1 + x·y/√d + (x·y)²/(2d)."""
    d = x.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=x.device)
    coef = torch.full((rows.numel(),), 1.0 / math.sqrt(d), dtype=x.dtype, device=x.device)  # in x's dtype
    coef[rows == cols] = 1.0 / math.sqrt(2 * d)
    second = x[..., rows] * x[..., cols] * coef
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, second], dim=-1)


def taylor_features(feature_dim: int) -> int:
    """Width of φ for a d'-wide input: 1 + d' + d'(d'+1)/2."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def _in_window(rel: Tensor, window_size: int, causal: bool) -> Tensor:
    """Keys at offset rel = i − j that query i sees."""
    return (rel >= 0) & (rel < window_size) if causal else rel.abs() < window_size


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int = WINDOW_SIZE,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact softmax attention over the keys 0 ≤ i − j < window_size (causal) or |i − j| < window_size, (batch, heads, n, d).

    Blocks of c = min(window_size, n) queries attend to the keys of their block and its neighbours
    (2c keys causal, 3c bidirectional): O(n·window_size·d) work and memory, no n × n tensor.
    A query with no visible key gives 0 (torch's SDPA on the blocks does so, forward and backward).
    """
    check_qkv(q, k, v, same_length=True)
    check_int("window_size", window_size)
    b, h, n, d = q.shape
    check_attention_mask(attention_mask, b, n)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    c = min(window_size, n)
    m = -(-n // c)
    before, after = c, 0 if causal else c
    span = before + c + after

    def neighbourhoods(x: Tensor) -> Tensor:  # (..., n, e) -> (..., m, span, e): keys (block − 1)·c … for each block
        x = F.pad(x, (0, 0, before, m * c - n + after))
        return x.unfold(-2, span, c).transpose(-1, -2)

    real = torch.ones(1, n, 1, dtype=q.dtype, device=q.device) if attention_mask is None else attention_mask[..., None].to(q.dtype)
    visible = neighbourhoods(real)[..., 0] > 0  # (b or 1, m, span): real keys inside the sequence
    r = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(span, device=q.device)[None, :]
    mask = _in_window(c + r - t, window_size, causal) & visible[:, None, :, None, :]  # (b or 1, 1, m, c, span)
    qb = F.pad(q, (0, 0, 0, m * c - n)).reshape(b, h, m, c, d)
    out = F.scaled_dot_product_attention(qb, neighbourhoods(k), neighbourhoods(v), attn_mask=mask, scale=scale)
    return out.reshape(b, h, m * c, v.shape[-1])[:, :, :n]


def sliding_window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int = WINDOW_SIZE,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `sliding_window_attention`: the n × n banded softmax matrix in float64."""
    check_qkv(q, k, v, same_length=True)
    check_int("window_size", window_size)
    b, _, n, d = q.shape
    check_attention_mask(attention_mask, b, n)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pos = torch.arange(n, device=q.device)
    keep = _in_window(pos[:, None] - pos[None, :], window_size, causal)[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :]
    weights = masked_softmax((q.double() @ k.double().transpose(-1, -2)) * scale, keep)
    return (weights @ v.double()).to(q.dtype), weights.to(q.dtype)


@renamed_keywords("based_attention", RENAMED)
def based_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_feature: Tensor,
    k_feature: Tensor,
    window_size: int = WINDOW_SIZE,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """Taylor linear attention on (q_feature, k_feature) + sliding-window softmax on (q, k), both over v.

    q, k, v (batch, heads, n, head_dim); q_feature, k_feature (batch, heads, n, d').
    """
    check_qkv(q_feature, k_feature, v)
    linear = linear_attention(
        taylor_feature_map(q_feature), taylor_feature_map(k_feature), v,
        causal=causal, attention_mask=attention_mask, chunk_size=chunk_size,
    )
    return linear + sliding_window_attention(q, k, v, window_size=window_size, causal=causal, attention_mask=attention_mask)


@renamed_keywords("based_attention_reference", RENAMED)
def based_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_feature: Tensor,
    k_feature: Tensor,
    window_size: int = WINDOW_SIZE,
    causal: bool = False,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights): A = A_taylor + A_window built in float64, out = A v; cast back to q's dtype.

    A_taylor from the kernel itself, K_ij = 1 + s/√d' + s²/(2d') with s = q_f,i · k_f,j (no feature map),
    zero on padded or (causal) future keys, each row divided by its sum.
    """
    check_qkv(q_feature, k_feature, v)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    d = q_feature.shape[-1]
    s = q_feature.double() @ k_feature.double().transpose(-1, -2)
    kernel = 1.0 + s / math.sqrt(d) + s * s / (2.0 * d)
    n_q, n_k = s.shape[-2:]
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device)
    if causal:
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).tril(n_k - n_q)
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, :]
    kernel = torch.where(visible, kernel, 0.0)
    total = kernel.sum(-1, keepdim=True)
    taylor = torch.where(total > 0, kernel / torch.where(total > 0, total, 1.0), 0.0)
    _, local = sliding_window_attention_reference(
        q.double(), k.double(), v.double(), window_size=window_size, causal=causal, attention_mask=attention_mask
    )
    weights = taylor + local
    return (weights @ v.double()).to(q.dtype), weights.to(q.dtype)


@dataclass
class BasedState:
    """Decoding state: the engine's memory and normaliser, and the last window_size − 1 keys and values (batch, heads, ≤ w − 1, head_dim)."""

    linear: LinearState | None
    keys: Tensor
    values: Tensor


def based_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the defaults (d' = 16, window_size 64, chunk 64): the engine's linear attention with
    d_k = 153 features and d_v = head_dim + 1 (the normaliser column), plus the window's blocks of scores and A v."""
    dk, dv = taylor_features(FEATURE_DIM), head_dim + 1
    c, block = min(64, n), min(WINDOW_SIZE, n)
    linear = 2.0 * n * c * (dk + dv) + 4.0 * n * dk * dv if causal else 4.0 * n * dk * dv
    local = 4.0 * n * (2 if causal else 3) * block * head_dim
    return heads * (linear + local)


@register(
    name="based",
    paper=BASED,
    family="A",
    cost="O(N d_f² d + N w d)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, decode=True, materialize=True, sharding=("state",)),
    params=(
        Param("feature_dim", int, FEATURE_DIM, "width d' of the q, k projections fed to the Taylor map", low=1),
        Param("window_size", int, WINDOW_SIZE, "keys a query sees in the sliding-window softmax (causal: itself and window_size − 1 before)", low=1),
        Param("chunk_size", int, 64, "chunk of the causal fast path of the linear part", low=1, knob=True),
    ),
    summary="Based: 2nd-order Taylor linear attention plus exact sliding-window softmax attention, summed.",
    normalized=False,
    test_params={"feature_dim": 4, "window_size": 3, "chunk_size": 4},
    flops=based_flops,
    renamed=RENAMED,
)
class BasedAttention(LinearAttention):
    """Multi-head Based attention: Taylor linear attention and sliding-window softmax sharing v (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        feature_dim: int = FEATURE_DIM,
        window_size: int = WINDOW_SIZE,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, normalize=True, chunk_size=chunk_size)
        check_int("feature_dim", feature_dim)
        self.feature_dim, self.window_size = feature_dim, check_int("window_size", window_size)
        self.feature_q = nn.Linear(dim, heads * feature_dim, bias=qkv_bias)
        self.feature_k = nn.Linear(dim, heads * feature_dim, bias=qkv_bias)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q = [q_window, q_feature], k = [k_window, k_feature] (batch, heads, n, head_dim + d'); v (batch, heads, n, head_dim)."""
        q, k, v = super().project(x, context)
        src = x if context is None else context
        q = torch.cat([q, self.split_heads(self.feature_q(x))], dim=-1)
        return q, torch.cat([k, self.split_heads(self.feature_k(src))], dim=-1), v

    def _split(self, t: Tensor, name: str) -> tuple[Tensor, Tensor]:
        want = self.head_dim + self.feature_dim
        if t.shape[-1] != want:
            raise ShapeError(
                f"{name}: expected head_dim + feature_dim = {self.head_dim} + {self.feature_dim} = {want} channels "
                f"(window part, then Taylor part), got {t.shape[-1]} in shape {tuple(t.shape)}"
            )
        return t[..., : self.head_dim], t[..., self.head_dim :]

    def terms(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> LinearTerms:
        return LinearTerms(taylor_feature_map(self._split(q, "q")[1]), taylor_feature_map(self._split(k, "k")[1]), v)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        (qw, qf), (kw, kf) = self._split(q, "q"), self._split(k, "k")
        return based_attention(
            qw, kw, v, q_feature=qf, k_feature=kf, window_size=self.window_size, causal=self.causal,
            attention_mask=mask, chunk_size=self.chunk_size,
        )

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        (qw, qf), (kw, kf) = self._split(q, "q"), self._split(k, "k")
        return based_attention_reference(
            qw, kw, v, q_feature=qf, k_feature=kf, window_size=self.window_size, causal=self.causal, attention_mask=mask
        )

    def decode(self, x_t: Tensor, state: BasedState | None) -> tuple[Tensor, BasedState]:
        """One checked token: (y_t (batch, 1, dim), state), equal to the causal forward."""
        q, k, v = self.project(x_t)
        t = self.terms(q, k, v, None)
        linear_out, linear = linear_attention_step(t.q, t.k, t.v, None if state is None else state.linear)
        qw, kw = q[..., : self.head_dim], k[..., : self.head_dim]
        keys = kw if state is None else torch.cat([state.keys, kw], dim=2)
        values = v if state is None else torch.cat([state.values, v], dim=2)
        weights = torch.softmax((qw @ keys.transpose(-1, -2)) / math.sqrt(self.head_dim), dim=-1)
        out = linear_out + weights @ values
        keep = max(0, keys.shape[2] - (self.window_size - 1))
        return self.out_proj(self.merge_heads(out)), BasedState(linear, keys[:, :, keep:], values[:, :, keep:])
