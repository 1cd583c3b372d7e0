"""ALiBi, attention with linear biases (Press, Smith & Lewis, 2022).

    softmax(q_i·k_j/√d − m_h·|i − j|) V

Each head h penalises a key by its distance to the query, with a fixed slope m_h from a
geometric sequence (1/2, 1/4, ..., 1/256 for 8 heads); for a head count that is not a power
of two, the official recipe (`get_slopes` of github.com/ofirpress/attention_with_linear_biases):
the slopes of the largest power of two p below, then every other slope
of 2p heads from the first, heads − p of them (6 heads: 2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3). Tokens carry no position
embedding, so the bias exists at every length: a model trained short runs on longer
inputs. Queries are bottom-right aligned to keys (query i sits at key position
i + n_k − n_q), so a decoding step over a KV cache sees the last row of the causal
matrix. The paper's causal bias −m_h·(i − j) for j ≤ i equals −m_h·|i − j| wherever the
causal mask lets a key through, so one symmetric bias serves causal and bidirectional use.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...core.masks import relative_positions
from ...core.registry import Paper
from ...core.validate import check_int, check_qkv
from .softmax import ScoreTerm, SoftmaxAttention, register_dense, softmax_attention, softmax_attention_reference

ALIBI = Paper(
    None,
    "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation",
    2022,
    "2108.12409",
)


def alibi_slopes(heads: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The slopes m_h, shape (heads,).

    For n a power of two, m_h = 2^(−8h/n), h = 1..n. Otherwise, with p the largest power of
    two below `heads`, the first p slopes are those of p heads and the other heads − p are
    every other slope of 2p heads, starting with the first: 2^(−8(2h−1)/2p), h = 1..heads − p.
    """
    check_int("heads", heads, 1)

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 1 << (heads.bit_length() - 1)
    slopes = geometric(p) + geometric(2 * p)[0::2][: heads - p]
    return torch.tensor(slopes, device=device, dtype=dtype)


def distances(n_q: int, n_k: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """|i − j| as a float (n_q, n_k) matrix, queries bottom-right aligned to keys."""
    check_int("n_q", n_q, 1)
    check_int("n_k", n_k, 1)
    return relative_positions(n_q, n_k, device).abs().to(dtype)


def linear_bias(slopes: Tensor, n_q: int, n_k: int) -> Tensor:
    """−m_h·|i − j| for slopes m of shape (heads,): (heads, n_q, n_k)."""
    return -slopes[:, None, None] * distances(n_q, n_k, device=slopes.device, dtype=slopes.dtype)


def alibi_bias(
    heads: int, n_q: int, n_k: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The ALiBi logit bias −m_h·|i − j|, shape (heads, n_q, n_k)."""
    return linear_bias(alibi_slopes(heads, device=device, dtype=dtype), n_q, n_k)


def alibi_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q kᵀ·scale − m_h|i − j| + mask) v over (batch, heads, n, head_dim), on SDPA."""
    check_qkv(q, k, v)
    bias = alibi_bias(q.shape[1], q.shape[2], k.shape[2], device=q.device, dtype=q.dtype)
    return softmax_attention(
        q, k, v, causal=causal, attention_mask=attention_mask, attn_mask=attn_mask, bias=bias, scale=scale
    )


def alibi_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `alibi_attention`, in float64 with the weights materialised."""
    check_qkv(q, k, v)
    bias = alibi_bias(q.shape[1], q.shape[2], k.shape[2], device=q.device, dtype=torch.float64)
    return softmax_attention_reference(
        q, k, v, causal=causal, attention_mask=attention_mask, attn_mask=attn_mask, bias=bias, scale=scale
    )


class ALiBi(ScoreTerm):
    """The ALiBi score term −m_h·|i − j|, with the fixed slopes of `alibi_slopes`."""

    slopes: Tensor

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.register_buffer("slopes", alibi_slopes(heads, dtype=torch.float64), persistent=False)

    def forward(self, n_q: int, n_k: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return linear_bias(self.slopes.to(device=device, dtype=dtype), n_q, n_k)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


@register_dense(
    name="alibi",
    sharding=("ring", "tree"),
    paper=ALIBI,
    family="C",
    summary="Softmax attention with ALiBi's per-head linear distance penalty (no position embedding); slopes "
    "by the official get_slopes recipe, also for head counts that are not powers of two.",
)
class ALiBiAttention(SoftmaxAttention):
    """Softmax attention with ALiBi's per-head linear distance penalty on the logits."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first, score_terms=(ALiBi(heads),))
