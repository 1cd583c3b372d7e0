"""lucidrains' linear-attention-transformer as a peer of efficient attention (P228), not causal.

Peer path: the function `linear_attention_transformer.linear_attention_transformer.linear_attn(q,
k, v)` (pure PyTorch, its bidirectional path), which computes P228's ρ_q(Q)(ρ_k(K)ᵀV) times
head_dim^−½; the timed call multiplies its output by √head_dim (one elementwise product),
forward and forward + backward. Causal is not mapped (see `LinearAttentionTransformerPeer`).
It also adds its own configuration at every N of a run's dense softmax: "efficient" with its
benchmark defaults.

Checked equal: the rescaled output (and for "fwd+bwd" the gradients of q, k, v) on the
run's q, k, v must agree with attnlab's "efficient" (normalization="softmax")
`module.attend` within `TOLERANCE` (1e-4 float32, 1e-8 float64) before it is timed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from .base import Peer, natural_params, spec_or_none


class LinearAttentionTransformerPeer(Peer):
    """lucidrains' linear-attention-transformer: `linear_attn`, P228 efficient attention (bidirectional).

    `linear_attn(q, k, v)` = (softmax_feature(q)·head_dim^−½)(softmax_token(k)ᵀ v): P228's
    ρ_q(Q)(ρ_k(K)ᵀV) times head_dim^−½, so the adapter multiplies its output by √head_dim
    (one elementwise product, timed with it). attnlab's "efficient" with
    normalization="softmax" is that ρ_q(Q)(ρ_k(K)ᵀV).

    Causal is not mapped: `causal_linear_attn` computes Σ_{j≤i} (ρ_q(q_i)·e^{k_j}) v_j /
    Σ_{j≤i} ρ_q(q_i)·e^{k_j}, one normaliser per query, where attnlab's causal efficient
    attention normalises each key feature over the prefix (Σ_c ρ_q(q_i)_c e^{k_jc} /
    Σ_{j'≤i} e^{k_j'c}): a different function, not a different implementation.
    """

    name = "linear-attention-transformer"
    package = "linear-attention-transformer"
    module = "linear_attention_transformer"
    summary = "lucidrains' efficient (linear) attention functions, pure PyTorch."
    mechanisms = {"efficient": "normalization='softmax', not causal: linear_attn(q, k, v)·√head_dim"}
    causal = False
    causal_note = ("its causal_linear_attn normalises once per query, attnlab's causal efficient attention each key "
                   "feature over the prefix: different functions")

    def native_configs(self, shape: Mapping[str, Any]) -> list[dict[str, Any]]:
        spec = spec_or_none("efficient")
        return [{**shape, "mechanism": "efficient", "impl": self.name, "params": natural_params(spec, {}),
                 "n": shape["n"], "grid": None}]

    def unsupported_params(self, config: Mapping[str, Any]) -> str | None:
        if config.get("grid"):
            return "efficient attention is mapped on 1-D sequences"
        normalization = config["params"].get("normalization", "softmax")
        if normalization != "softmax":
            return f"normalization {normalization!r} has no counterpart (linear_attn is the softmax normalisation)"
        return None

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, config: Mapping[str, Any]) -> Callable[[], Tensor]:
        from linear_attention_transformer.linear_attention_transformer import linear_attn

        rescale = math.sqrt(q.shape[-1])
        return lambda: linear_attn(q, k, v) * rescale
