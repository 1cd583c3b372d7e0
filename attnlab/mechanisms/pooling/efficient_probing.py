"""Efficient probing, EP (Psomas et al., "Attention, Please! Revisiting Attentive Probing Through the
Lens of Efficiency", 2025): an attentive probe with M learned queries on the raw tokens, no query or key
projection, each query pooling its own slice of the values.

With frozen tokens X ∈ R^{N×C} and learned queries Q = (q_1..q_M) ∈ R^{M×C}:

    a_m = softmax_tokens(q_m Xᵀ / √C)              keys are the raw tokens: no W_q, no W_k
    V = X W_v ∈ R^{N×C},  V = [V^(1) | … | V^(M)]   split by channels into M chunks of C/M
    z = concat_m(a_m V^(m)) ∈ R^C                   no W_o, no MLP, no residual

The pooled z goes to a linear classifier (not part of the pooling). As in the authors' code
(billpsomas/efficient-probing `poolings/ep.py`): queries initialised N(0, 0.02²), W_v without bias
(`qkv_bias`), scale 1/√C, M = 32 queries by default (`num_queries`, a divisor of dim).

In attnlab's pooling contract the M queries are the heads: head m has query q_m (over all C
channels of the raw tokens) and the value chunk V^(m); the pooled vector is one (m = 1), so
`materialize` gives (batch, M, 1, N), the map of each query. The code's width reduction
`d_out` (V = X W_v ∈ R^{N×C/r}) is left out: the pooling contract returns width dim, i.e. r = 1,
the code's default.

Cost. Per sample: W_v over the tokens 2·N·C², logits 2·M·N·C, pooling 2·N·C (matmul FLOPs;
`efficient_probing_flops`). A full attentive probe (one query, W_q, W_k, W_v, W_o, as the
class-attention pooling without its FFN) spends 4·N·C² + 4·N·C + 4·C² (`attentive_probe_flops`):
EP saves the key projection, about half the FLOPs at N ≫ M (`flops_vs_attentive_probe`; the paper's
larger speed-ups are over deeper probes with MLP blocks). Padding: padded tokens are no keys;
a sample with no real token pools to 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_tensor
from .base import AttentionPooling
from .common import linear64, softmax64

EFFICIENT_PROBING = Paper(
    "P094", "Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency", 2025, "2506.10178"
)
QUERY_STD = 0.02


def _check(queries: object, keys: object, values: object, attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """queries (M, C) or (batch, M, C), keys (batch, n, C), values (batch, n, C_v) with M | C_v; the queries batched."""
    queries, keys, values = check_tensor("queries", queries), check_tensor("keys", keys), check_tensor("values", values)
    if keys.dim() != 3 or values.dim() != 3 or keys.shape[:2] != values.shape[:2]:
        raise ShapeError(
            f"keys, values: expected (batch, n, C) and (batch, n, C_v), got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if queries.dim() == 2:
        queries = queries.expand(keys.shape[0], *queries.shape)
    if queries.dim() != 3 or queries.shape[0] != keys.shape[0] or queries.shape[-1] != keys.shape[-1]:
        raise ShapeError(f"queries: expected (M, C) or (batch, M, C) with C = {keys.shape[-1]}, got {tuple(queries.shape)}")
    if values.shape[-1] % queries.shape[1]:
        raise ShapeError(f"values: expected a width divisible by M = {queries.shape[1]}, got {values.shape[-1]}")
    for name, t in (("queries", queries), ("keys", keys), ("values", values)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    check_attention_mask(attention_mask, keys.shape[0], keys.shape[1])
    return queries, keys, values


def efficient_probing_attention(
    queries: Tensor, keys: Tensor, values: Tensor, *, attention_mask: Tensor | None = None
) -> Tensor:
    """z = concat_m(softmax(q_m keysᵀ/√C) values^(m)) (batch, C_v): query m pools the m-th of M channel chunks of the
    values. queries (M, C) or (batch, M, C), keys (batch, n, C), values (batch, n, C_v); `attention_mask` (batch, n)."""
    queries, keys, values = _check(queries, keys, values, attention_mask)
    b, n, cv = values.shape
    m = queries.shape[1]
    logits = queries @ keys.transpose(-2, -1) / math.sqrt(keys.shape[-1])  # (batch, M, n)
    if attention_mask is not None:
        logits = logits.masked_fill(~attention_mask[:, None, :], float("-inf"))
    a = masked_softmax(logits)
    chunks = values.reshape(b, n, m, cv // m).transpose(1, 2)  # (batch, M, n, C_v/M)
    return (a.unsqueeze(2) @ chunks).reshape(b, cv)


def efficient_probing_attention_reference(
    queries: Tensor, keys: Tensor, values: Tensor, *, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(z (batch, C_v), a (batch, M, n)) of `efficient_probing_attention` in float64, query by query."""
    queries, keys, values = _check(queries, keys, values, attention_mask)
    b, n, cv = values.shape
    m, c = queries.shape[1], keys.shape[-1]
    width = cv // m
    out = torch.zeros(b, cv, dtype=torch.float64, device=keys.device)
    weights = torch.zeros(b, m, n, dtype=torch.float64, device=keys.device)
    for bi in range(b):
        real = [j for j in range(n) if attention_mask is None or bool(attention_mask[bi, j])]
        for qi in range(m):
            q = queries[bi, qi].double()
            a = softmax64([(q * keys[bi, j].double()).sum() / math.sqrt(c) for j in real])
            for j, w in zip(real, a):
                weights[bi, qi, j] = w
                out[bi, qi * width : (qi + 1) * width] = out[bi, qi * width : (qi + 1) * width] + w * values[
                    bi, j, qi * width : (qi + 1) * width
                ].double()
    return out.to(values.dtype), weights.to(values.dtype)


def efficient_probing_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Matmul FLOPs of EP on one sample, `heads` = M queries, dim C = M·head_dim: W_v 2·n·C², logits 2·M·n·C,
    pooling 2·n·C (the softmax, O(M·n), left out)."""
    c = heads * head_dim
    return 2.0 * n * c * c + 2.0 * heads * n * c + 2.0 * n * c


def attentive_probe_flops(n: int, dim: int, queries: int = 1) -> float:
    """Matmul FLOPs of a full attentive probe (multi-head cross-attention of `queries` learned queries, W_q, W_k, W_v,
    W_o of dim×dim) on one sample: W_k, W_v 4·n·C², logits and pooling 4·queries·n·C, W_q and W_o 4·queries·C²."""
    return 4.0 * n * dim * dim + 4.0 * queries * n * dim + 4.0 * queries * dim * dim


def flops_vs_attentive_probe(n: int, dim: int, num_queries: int) -> dict[str, float]:
    """EP's matmul FLOPs beside a one-query full attentive probe's, and their ratio (probe / EP)."""
    ep = efficient_probing_flops(n, num_queries, dim // num_queries, False)
    probe = attentive_probe_flops(n, dim)
    return {"efficient_probing": ep, "attentive_probe": probe, "ratio": probe / ep}


@register(
    name="efficient-probing",
    kind="pooling",
    paper=EFFICIENT_PROBING,
    family="C",
    cost="O(N d² + M N d)",
    exponent=1.0,
    supports=Supports(key_padding=True, order_invariant=True),
    params=(
        Param("num_queries", int, 32, "M learned queries, each pooling dim/M value channels (a divisor of dim)", low=1),
        Param("qkv_bias", bool, False, "bias in W_v (the code: False)"),
    ),
    summary="efficient probing: M learned queries on the raw tokens (no W_q, W_k), each pooling its own value chunk",
    test_params={"num_queries": 4},
    flops=efficient_probing_flops,
    functional=("efficient_probing_attention", "efficient_probing_attention_reference"),
)
class EfficientProbing(AttentionPooling):
    """z = concat_m(softmax(q_m Xᵀ/√C) (X W_v)^(m)); the M queries are the heads, one pooled vector."""

    def __init__(self, dim: int, *, num_queries: int = 32, qkv_bias: bool = False) -> None:
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1 or dim % num_queries:
            raise ParameterError(f"num_queries: expected a divisor of dim={dim}, got {num_queries!r}")
        super().__init__(dim, num_queries)
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.randn(num_queries, dim) * QUERY_STD)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)

    @property
    def queries(self) -> int:
        return 1

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return efficient_probing_attention(self.query, x, self.v(x), attention_mask=keep).unsqueeze(1)

    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        z, a = efficient_probing_attention_reference(self.query.double(), x.double(), linear64(x, self.v), attention_mask=keep)
        return z.unsqueeze(1).to(x.dtype), a.unsqueeze(2).to(x.dtype)
