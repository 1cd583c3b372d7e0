"""MHE: multiple head embeddings on one shared Q/K/V projection (Ni et al., "Finding the Pillars of Strength
for Multi-Head Attention", 2023).

Multi-head attention gives every head its own projections W_q^i, W_k^i, W_v^i ∈ R^{d×d_h}. MHE keeps ONE
projection of each kind, shared by all n heads, and tells the heads apart by learned head embeddings
e_i^Q, e_i^K, e_i^V ∈ R^{d_h}, added to (MHE-ADD) or multiplied with (MHE-MUL) the shared projection:

    MHE-ADD:  Q_i = X W_q + e_i^Q      K_i = X W_k + e_i^K      V_i = X W_v + e_i^V
    MHE-MUL:  Q_i = X W_q ⊙ e_i^Q      K_i = X W_k ⊙ e_i^K      V_i = X W_v ⊙ e_i^V
    head_i   = softmax(Q_i K_iᵀ / √d_h) V_i
    MHE(X)   = concat(head_1, …, head_n) W_o

(the embedding broadcasts over the tokens). The Q/K/V parameters are those of a single head, 3·d·d_h, plus
the 3·n·d_h of the embeddings: 3·n·d_h more than single-head attention, where multi-head attention with
d = n·d_h needs (3n² − 3n)·d_h² more (the paper's count; W_o, the same n·d_h × d matrix for MHE and MHA,
and the biases, 3·d_h for MHE as for a single head, are outside it). `qkv_parameter_count` gives the count.

Defaults and choices. `mode="add"` (MHE-ADD; "mul" for MHE-MUL). d_h = dim // heads as in multi-head
attention (`head_dim` sets it), so the output projection is that of MHA. The embeddings are drawn from
N(0, 1) in both modes (our choice, the PAPERS row gives none): with the shared projection's O(1) outputs they
make the heads differ from the first step. The attention core is softmax attention (SDPA on the fast path, the
float64 reference otherwise) on the heads `project` builds, so every mask, causality, cross-attention (the
query embedding on the queries, the key and value embeddings on the context) and KV-cache decoding apply
unchanged; `materialize` is the heads' softmax matrix and the output is out_proj(merge_heads(A V)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import combine_masks
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.reference import softmax_attention_reference as softmax_reference
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice, check_tensor
from ...kernels.sdpa import sdpa

MHE = Paper("P036", "Finding the Pillars of Strength for Multi-Head Attention", 2023, "2305.14380")
MODES: tuple[str, ...] = ("add", "mul")


def mhe_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the core, q kᵀ and A v per head (4·h·n²·d_h, half when causal); the embeddings add 3·h·n·d_h."""
    return 4.0 * heads * n * n * head_dim * (0.5 if causal else 1.0) + 3.0 * heads * n * head_dim


def qkv_parameter_count(dim: int, heads: int, head_dim: int) -> int:
    """The paper's count of MHE's Q/K/V parameters: one shared d×d_h projection of each kind (3·d·d_h) and the
    3·n·d_h head embeddings (biases and W_o aside)."""
    return 3 * dim * head_dim + 3 * heads * head_dim


def embed_heads(shared: Tensor, embeddings: Tensor, mode: str) -> Tensor:
    """The n heads of one shared projection (batch, tokens, d_h) and the head embeddings (n, d_h):
    (batch, n, tokens, d_h), P + e_i ("add") or P ⊙ e_i ("mul")."""
    check_choice("mode", mode, MODES)
    check_tensor("shared", shared)
    check_tensor("embeddings", embeddings)
    if shared.dim() != 3:
        raise ShapeError(f"shared: expected (batch, tokens, head_dim), got shape {tuple(shared.shape)}")
    if embeddings.dim() != 2 or embeddings.shape[1] != shared.shape[2]:
        raise ShapeError(
            f"embeddings: expected (heads, head_dim) with head_dim {shared.shape[2]} (as the projection), "
            f"got shape {tuple(embeddings.shape)}"
        )
    e = embeddings.to(shared.dtype)[None, :, None, :]
    return shared[:, None] + e if mode == "add" else shared[:, None] * e


def _check_embeddings(q: Tensor, k: Tensor, v: Tensor, embeddings: tuple[Tensor, Tensor, Tensor]) -> None:
    for name, t in zip(("q", "k", "v"), (q, k, v)):
        check_tensor(name, t)
        if t.dim() != 3:
            raise ShapeError(f"{name}: expected the shared projection (batch, tokens, head_dim), got shape {tuple(t.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2]:
        raise ShapeError(
            f"q, k, v: expected (batch, n_q, d), (batch, n_k, d), (batch, n_k, d_v), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    heads = {e.shape[0] if e.dim() == 2 else -1 for e in embeddings}
    if len(heads) != 1:
        raise ParameterError(
            f"query_embeddings, key_embeddings, value_embeddings: expected one head count (heads, head_dim) each, "
            f"got shapes {[tuple(e.shape) for e in embeddings]}"
        )


def mhe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_embeddings: Tensor,
    key_embeddings: Tensor,
    value_embeddings: Tensor,
    mode: str = "add",
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """MHE attention from the shared projections q = X W_q (batch, n_q, d_h), k = X W_k, v = X W_v (batch, n_k, d_h)
    and the head embeddings (heads, d_h): (batch, heads, n_q, d_h), head i = softmax(Q_i K_iᵀ/√d_h) V_i with
    Q_i = q + e_i^Q ("add") or q ⊙ e_i^Q ("mul"), likewise K_i, V_i. attention_mask (batch, n_k) True = attend;
    attn_mask bool (True = attend) or additive, broadcastable to (batch, heads, n_q, n_k)."""
    embeddings = (query_embeddings, key_embeddings, value_embeddings)
    _check_embeddings(q, k, v, embeddings)
    qh, kh, vh = (embed_heads(p, e, mode) for p, e in zip((q, k, v), embeddings))
    mask = combine_masks(batch=q.shape[0], heads=qh.shape[1], n_q=q.shape[1], n_k=k.shape[1], causal=False,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device)
    return sdpa(qh, kh, vh, mask, None, 1.0 / math.sqrt(q.shape[-1]), causal=causal)


def mhe_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_embeddings: Tensor,
    key_embeddings: Tensor,
    value_embeddings: Tensor,
    mode: str = "add",
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, n_q, n_k)) of `mhe_attention` in float64, head by head from the formula."""
    embeddings = (query_embeddings, key_embeddings, value_embeddings)
    _check_embeddings(q, k, v, embeddings)
    check_choice("mode", mode, MODES)
    heads, d_h = query_embeddings.shape[0], q.shape[-1]
    mask = combine_masks(batch=q.shape[0], heads=heads, n_q=q.shape[1], n_k=k.shape[1], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=torch.float64, device=q.device)
    q64, k64, v64 = q.double(), k.double(), v.double()
    outs, weights = [], []
    for i in range(heads):
        eq, ek, ev = (e[i].double() for e in embeddings)
        if mode == "add":
            qi, ki, vi = q64 + eq, k64 + ek, v64 + ev
        else:
            qi, ki, vi = q64 * eq, k64 * ek, v64 * ev
        scores = torch.einsum("bid,bjd->bij", qi, ki) / math.sqrt(d_h)
        head_mask = None if mask is None else mask[:, min(i, mask.shape[1] - 1)]
        a = masked_softmax(scores, head_mask)
        outs.append(torch.einsum("bij,bjd->bid", a, vi))
        weights.append(a)
    return torch.stack(outs, 1).to(q.dtype), torch.stack(weights, 1).to(q.dtype)


@register(
    name="mhe",
    paper=MHE,
    family="C",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True, cross=True, decode=True),
    params=(Param("mode", str, "add", "head embeddings added to ('add', MHE-ADD) or multiplied with ('mul', MHE-MUL) "
                  "the shared projection", choices=MODES),),
    summary="Multiple head embeddings: one shared Q/K/V projection, heads told apart by added or multiplied "
            "learned embeddings (3·n·d_h parameters over a single head).",
    test_params={"mode": "mul"},
    flops=mhe_flops,
)
class MultiHeadEmbeddingAttention(Attention):
    """MHE: one d×d_h projection of each of Q, K, V shared by the heads; head i adds (or multiplies) its embeddings
    e_i^Q, e_i^K, e_i^V; softmax attention per head; concat · W_o."""

    causal_in_kernel = True  # attend_fast hands causality to SDPA

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        mode: str = "add",
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.mode = check_choice("mode", mode, MODES)
        d_h = self.head_dim
        self.q_proj = nn.Linear(dim, d_h, bias=qkv_bias)  # the one shared projection of each kind
        self.k_proj = nn.Linear(dim, d_h, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, d_h, bias=qkv_bias)
        self.query_embeddings = nn.Parameter(torch.randn(heads, d_h))
        self.key_embeddings = nn.Parameter(torch.randn(heads, d_h))
        self.value_embeddings = nn.Parameter(torch.randn(heads, d_h))

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The heads (batch, heads, n, head_dim) of the shared projections: Q_i = X W_q + e_i^Q (or ⊙), K_i and V_i
        from context (or x)."""
        src = x if context is None else context
        return (
            embed_heads(self.q_proj(x), self.query_embeddings, self.mode),
            embed_heads(self.k_proj(src), self.key_embeddings, self.mode),
            embed_heads(self.v_proj(src), self.value_embeddings, self.mode),
        )

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return sdpa(q, k, v, mask, None, 1.0 / math.sqrt(self.head_dim), causal=self.causal)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return softmax_reference(q, k, v, mask=mask)
