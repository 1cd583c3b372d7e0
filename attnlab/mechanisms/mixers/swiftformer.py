"""Efficient additive attention (Shaker et al., SwiftFormer, 2023).

No key–value product: one global query vector, pooled from the queries with learned
token weights, gates the keys element-wise, and a linear layer stands in for the
key–value interaction. Per head, with Q, K ∈ R^{N×d} and a learned w_a ∈ R^d:

    q̂_n, k̂_n = q_n/‖q_n‖, k_n/‖k_n‖                 (L2 over the channels of each token)
    α = normalize_tokens(Q̂ w_a / √d) ∈ R^N            (the token weights)
    g = Σ_n α_n q̂_n ∈ R^d                              (the global query)
    u_n = g ⊙ k̂_n                                      (the attention core, `additive_attention`)
    out_n = W_o( T(u_n) + q̂_n )                        (T: a linear layer over all heads; W_o: output projection)

normalize_tokens is an L2 normalisation over the tokens by default (`token_norm="l2"`),
as in the official code — α then has unit norm and may be negative (the paper's equation
gives α = Q w_a/√d; the normalisation over tokens is the official code's). `token_norm="softmax"` gives a distribution over the tokens
instead (α ≥ 0, Σ α = 1). With heads = 1 the layer is the official one; with more
heads, q̂, k̂, w_a, α and g are per head and T mixes the concatenated heads.

Key padding: padded tokens get α = 0 (they are left out of the normalisation over
tokens, so g pools the real tokens only); a padded position still gets its output
(g ⊙ k̂_n through T, plus its own q̂_n), like a padded query in attention. An element
with no real token has α = 0 and g = 0.

Not causal (g pools all tokens), no cross-attention. There is no N×N matrix to
materialise — every token receives the same g, combined element-wise with its own key —
so `materialize` is not offered; `token_weights(x)` returns α (batch, heads, N), the
one distribution over tokens this layer computes.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_attention_mask,
    check_choice,
    check_finite,
    check_module_dtype,
    check_qkv,
    check_tokens,
)

SWIFTFORMER = Paper(
    "P100",
    "SwiftFormer: Efficient Additive Attention for Transformer-based Real-time Mobile Vision Applications",
    2023,
    "2303.15446",
)
EPS = 1e-12  # floor of the norms (a zero vector stays zero)
TokenNorm = Literal["l2", "softmax"]
TOKEN_NORMS = ("l2", "softmax")


def swiftformer_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the whole module at dim = heads·head_dim (the benchmark times module(x)).

    q and k projections, T and the output projection: 8·N·D²; the core (two L2
    normalisations, Q̂ w_a, the pooling of g, g ⊙ K̂): about 11·N·D.
    """
    width = heads * head_dim
    return 8.0 * n * width * width + 11.0 * n * width


def _check(q: Tensor, k: Tensor, w_a: Tensor, attention_mask: Tensor | None, token_norm: str) -> None:
    check_qkv(q, k, k, same_length=True)
    if not isinstance(w_a, Tensor) or tuple(w_a.shape) != (q.shape[1], q.shape[-1]):
        got = tuple(w_a.shape) if isinstance(w_a, Tensor) else type(w_a).__name__
        raise ShapeError(f"w_a: expected a tensor of shape (heads, head_dim) = {(q.shape[1], q.shape[-1])}, got {got}")
    check_attention_mask(attention_mask, q.shape[0], q.shape[2])
    check_choice("token_norm", token_norm, TOKEN_NORMS)


def _token_weights(s: Tensor, attention_mask: Tensor | None, token_norm: str) -> Tensor:
    """α from the scores s (batch, heads, n), padded tokens left out."""
    keep = None if attention_mask is None else attention_mask[:, None, :]
    if token_norm == "softmax":
        return masked_softmax(s, keep)
    if keep is not None:
        s = s * keep.to(s.dtype)
    return F.normalize(s, dim=-1, eps=EPS)


def additive_attention(
    q: Tensor,
    k: Tensor,
    w_a: Tensor,
    *,
    attention_mask: Tensor | None = None,
    token_norm: TokenNorm = "l2",
) -> Tensor:
    """The core u_n = g ⊙ k̂_n over (batch, heads, n, head_dim), g = Σ_n α_n q̂_n; O(N d).

    q and k are L2-normalised per token here; w_a is (heads, head_dim); `attention_mask`
    (batch, n), True = real token.
    """
    _check(q, k, w_a, attention_mask, token_norm)
    q_hat = F.normalize(q, dim=-1, eps=EPS)
    k_hat = F.normalize(k, dim=-1, eps=EPS)
    s = torch.einsum("bhnd,hd->bhn", q_hat, w_a.to(q.dtype)) / math.sqrt(q.shape[-1])
    alpha = _token_weights(s, attention_mask, token_norm)
    g = torch.einsum("bhn,bhnd->bhd", alpha, q_hat)
    return g[:, :, None, :] * k_hat


def additive_attention_reference(
    q: Tensor,
    k: Tensor,
    w_a: Tensor,
    *,
    attention_mask: Tensor | None = None,
    token_norm: TokenNorm = "l2",
) -> tuple[Tensor, Tensor]:
    """(u, α) of `additive_attention` in float64, token by token; α is (batch, heads, n)."""
    _check(q, k, w_a, attention_mask, token_norm)
    q64, k64, w64 = q.double(), k.double(), w_a.double()
    q_hat = q64 / torch.linalg.vector_norm(q64, dim=-1, keepdim=True).clamp_min(EPS)
    k_hat = k64 / torch.linalg.vector_norm(k64, dim=-1, keepdim=True).clamp_min(EPS)
    s = (q_hat * w64[None, :, None, :]).sum(-1) / math.sqrt(q.shape[-1])
    real = torch.ones_like(s) if attention_mask is None else attention_mask[:, None, :].to(s.dtype).expand_as(s)
    if token_norm == "softmax":
        top = torch.where(real > 0, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True)
        e = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top))) * real
        total = e.sum(-1, keepdim=True)
        alpha = e / torch.where(total > 0, total, torch.ones_like(total))
    else:
        alpha = s * real / torch.linalg.vector_norm(s * real, dim=-1, keepdim=True).clamp_min(EPS)
    g = (alpha[..., None] * q_hat).sum(2)
    u = g[:, :, None, :] * k_hat
    return u.to(q.dtype), alpha.to(q.dtype)


@register(
    functional=("additive_attention", "additive_attention_reference"),
    name="swiftformer",
    paper=SWIFTFORMER,
    family="B",
    cost="O(N d)",
    exponent=1.0,
    supports=Supports(key_padding=True, materialize=False),
    params=(
        Param(
            "token_norm", str, "l2",
            "normalisation of the token weights α over the tokens: 'l2' (official code) or 'softmax'",
            choices=TOKEN_NORMS,
        ),
    ),
    summary="Efficient additive attention: a pooled global query gates the keys element-wise, then a linear layer.",
    normalized=False,
    flops=swiftformer_flops,
)
class AdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention over tokens (batch, n, dim) -> (batch, n, dim).

    `token_weights(x)` returns α (batch, heads, n); there is no `materialize`.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        token_norm: TokenNorm = "l2",
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
            head_dim = dim // heads
        check_choice("token_norm", token_norm, TOKEN_NORMS)
        self.dim, self.heads, self.head_dim, self.token_norm = dim, heads, head_dim, token_norm
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.w_a = nn.Parameter(torch.randn(heads, head_dim))
        self.transform = nn.Linear(inner, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _project(self, x: Tensor, context: Tensor | None, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        check_tokens("x", x, self.dim)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            raise ValueError("context: swiftformer does not support cross-attention (g pools the tokens of x)")
        if attn_mask is not None:
            raise ValueError("attn_mask: swiftformer does not support an attention mask (there is no N×N matrix)")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        return q, k

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Literal["fast", "reference"] = "fast",
    ) -> Tensor:
        """x (batch, n, dim) -> W_o(T(g ⊙ K̂) + Q̂), (batch, n, dim)."""
        q, k = self._project(x, context, attn_mask)
        keep = module_keep_mask(attention_mask, key_padding_mask, x.shape[0], x.shape[1])
        kw = {"attention_mask": keep, "token_norm": self.token_norm}
        if impl == "fast":
            u = additive_attention(q, k, self.w_a, **kw)
        elif impl == "reference":
            u = additive_attention_reference(q, k, self.w_a, **kw)[0]
        else:
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        b, n = x.shape[:2]
        merged = u.transpose(1, 2).reshape(b, n, -1)
        q_hat = F.normalize(q, dim=-1, eps=EPS).transpose(1, 2).reshape(b, n, -1)
        return self.out_proj(self.transform(merged) + q_hat)

    def token_weights(self, x: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """α (batch, heads, n): the weights pooling the global query (0 at padded tokens)."""
        q, k = self._project(x, None, None)
        return additive_attention_reference(q, k, self.w_a, attention_mask=attention_mask, token_norm=self.token_norm)[1]
