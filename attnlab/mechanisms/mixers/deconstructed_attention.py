"""Deconstructed attention: controlled variants that each relax one principle of softmax attention
(Xue, Moosavi & Aletras, "Deconstructing Attention", 2025), and stacks interleaving them with softmax layers.

Standard attention, per head: A = softmax(Q Kᵀ/√d), Q = W_q h, K = W_k h, V = W_v h, out = W_o A V,
with h the current layer's hidden states. The paper names four principles — token mixing,
sequence-dependent weights, the mathematical form (dot product + softmax) and queries/keys
coupled to the current hidden state — and relaxes each one; the entries here:

* `no-mixing` (no token mixing): A = I, out_i = W_o W_v x_i — each token sees itself only.
* `fixed-mixing` (sequence-independent weights): Q and K are computed from a learned fixed
  sequence E ∈ R^{max_length×dim} instead of the input, A = softmax((E W_q)(E W_k)ᵀ/√d) (+ the
  causal mask): the same matrix for every input (a low-rank learned N×N mixing); only V reads x.
* `altered-similarity` (the mathematical form): a non-dot-product score, softmax-normalised:
  "distance": s_ij = −‖q_i − k_j‖² / (2√d) (an RBF kernel), or "cosine": s_ij = √d · cos(q_i, k_j).
* `decoupled-attention` (queries and keys decoupled from the hidden state): Q = W_q e, K = W_k e
  from the layer-0 (input) embeddings e, V = W_v h from the current hidden state; e is the
  forward argument `embeddings` (batch, n, dim), by default x itself (so at layer 0 it is
  standard attention).

and `InterleavedStack`, a pre-norm stack in which every `softmax_every`-th layer keeps
standard softmax attention and the others use a variant (the paper's hybrids), handing the
stack's input to decoupled layers as their embeddings.

Reading of the paper. We could read its abstract and principles but not its equations; its
variant names (RndEmbQK, FixedSeqQK, StaticEmbQK, approximate / non-approximate forms) suggest
that queries and keys come from random embeddings, from a fixed sequence and from static
(layer-0) token embeddings, and that the form is replaced by approximations of softmax
attention or by other functions. The entries follow that reading and the spec in PAPERS.md
("no token mixing; fixed/learned causal mixing weights not depending on input;
non-dot-product/non-softmax similarity (e.g. MLP- or distance-based scores); Q, K computed
from the input embeddings (layer 0)"); the exact parametrisations are ours, said above.

Padding: padded tokens are no keys (and no values); `fixed-mixing` indexes E by a token's
position among the real tokens (cumulative count), so padding anywhere changes no real
token's output. Everything is causal-capable (`causal=True`: the causal mask on A; no-mixing
is causal by construction).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.module import Attention, Impl
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, get, register
from ...core.validate import check_attention_mask, check_choice, check_finite, check_int, check_qkv, check_tokens
from ...kernels.sdpa import sdpa
from ..dense.softmax import SoftmaxAttention, dense_flops, softmax_attention, softmax_attention_reference  # noqa: F401 (decoupled-attention's ops)
from ._sequence_mixer import SequenceMixer, drop_padding

DECONSTRUCTING = Paper("P057", "Deconstructing Attention: Investigating Design Principles for Effective Language Modeling",
                       2025, "2510.11602")
SIMILARITIES = ("distance", "cosine")
FIXED_MAX_LENGTH = 8192  # covers `attnlab bench speed`'s default lengths (256 … 8192)


def _heads_width(dim: int, heads: int, head_dim: int | None) -> int:
    if head_dim is None:
        if dim % heads:
            raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
        return dim // heads
    return check_int("head_dim", head_dim)


# -- no mixing ----------------------------------------------------------------------------------------------------


def no_mixing_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per sequence: W_v and W_o, 4·N·d² (no token mixing)."""
    return 4.0 * n * (heads * head_dim) ** 2


def no_mixing_attention(v: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """A = I over v (batch, heads, n, head_dim): every token keeps its own value (padded tokens: 0)."""
    check_qkv(v, v, v)
    check_attention_mask(attention_mask, v.shape[0], v.shape[2])
    return drop_padding(v, attention_mask)


def no_mixing_attention_reference(v: Tensor, *, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, A) of `no_mixing_attention` in float64: A = I at the real tokens, 0 at padded ones."""
    check_qkv(v, v, v)
    check_attention_mask(attention_mask, v.shape[0], v.shape[2])
    b, h, n, _ = v.shape
    a = torch.eye(n, dtype=torch.float64, device=v.device).expand(b, h, n, n)
    if attention_mask is not None:
        a = a * attention_mask[:, None, None, :].double()
    return (a @ v.double()).to(v.dtype), a.to(v.dtype)


@register(
    functional=("no_mixing_attention", "no_mixing_attention_reference"),
    name="no-mixing",
    paper=DECONSTRUCTING,
    family="B",
    cost="O(N d²)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True),
    summary="Deconstructed attention without token mixing: A = I, out_i = W_o W_v x_i.",
    flops=no_mixing_flops,
)
class NoMixing(SequenceMixer):
    """out_i = W_o W_v x_i: the attention matrix is the identity (causal by construction; `causal` changes nothing).

    materialize: I per head, 0 at padded tokens."""

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
        super().__init__(dim, heads, causal=causal, batch_first=batch_first)
        self.head_dim = _heads_width(dim, heads, head_dim)
        self.v_proj = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(heads * self.head_dim, dim)

    def values(self, x: Tensor) -> Tensor:
        """W_v x per head, (batch, heads, n, head_dim)."""
        return self.v_proj(x).view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def mix(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        v = self.values(x)
        out = no_mixing_attention(v, attention_mask=keep) if impl == "fast" else no_mixing_attention_reference(
            v, attention_mask=keep)[0]
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def mixing(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return no_mixing_attention_reference(self.values(x), attention_mask=keep)[1]


# -- sequence-independent mixing ----------------------------------------------------------------------------------


def _check_fixed(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> None:
    """q, k (heads, n, head_dim) from the fixed sequence; v (batch, heads, n, head_dim)."""
    if q.dim() != 3 or q.shape != k.shape:
        raise ShapeError(f"q, k: expected (heads, n, head_dim) each (one fixed sequence), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[1:3] != q.shape[:2]:
        raise ShapeError(f"v: expected (batch, {q.shape[0]}, {q.shape[1]}, head_dim) (heads and n as q), got shape "
                         f"{tuple(v.shape)}")
    check_attention_mask(attention_mask, v.shape[0], v.shape[2])


def fixed_mixing_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> Tensor:
    """softmax(q kᵀ/√d) v with q, k (heads, n, head_dim) shared by the batch (input-independent) and v (batch, heads, n,
    head_dim); padded keys masked. SDPA."""
    _check_fixed(q, k, v, attention_mask)
    b = v.shape[0]
    qb, kb = q.expand(b, *q.shape), k.expand(b, *k.shape)
    mask = None if attention_mask is None else attention_mask[:, None, None, :]
    return sdpa(qb, kb, v, mask, None, 1.0 / math.sqrt(q.shape[-1]), causal=causal)


def fixed_mixing_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, A) of `fixed_mixing_attention` in float64: A (batch, heads, n, n) the masked softmax of the logits."""
    _check_fixed(q, k, v, attention_mask)
    n = q.shape[1]
    logits = torch.einsum("hid,hjd->hij", q.double(), k.double()) / math.sqrt(q.shape[-1])
    allowed = torch.ones(v.shape[0], 1, n, n, dtype=torch.bool, device=v.device)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=v.device).tril()
    a = masked_softmax(logits.expand(v.shape[0], -1, -1, -1), allowed)  # rows with no allowed key: 0
    return (a @ v.double()).to(v.dtype), a.to(v.dtype)


@register(
    functional=("fixed_mixing_attention", "fixed_mixing_attention_reference"),
    name="fixed-mixing",
    paper=DECONSTRUCTING,
    family="B",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True),
    params=(Param("max_length", int, FIXED_MAX_LENGTH, "length of the learned fixed sequence E (the most tokens)", low=1),),
    summary="Deconstructed attention with sequence-independent weights: Q, K from a learned fixed sequence, "
            "A the same for every input, V from x.",
    test_params={"max_length": 32},
    flops=dense_flops,
)
class FixedMixing(SequenceMixer):
    """out = W_o softmax((E W_q)(E W_k)ᵀ/√d) W_v x with E a learned fixed sequence, indexed by the position among the
    real tokens: the mixing weights do not depend on the input.

    materialize: that A (batch, heads, n, n); the batch differs only by its padding."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        max_length: int = FIXED_MAX_LENGTH,
    ) -> None:
        super().__init__(dim, heads, causal=causal, batch_first=batch_first)
        self.head_dim = _heads_width(dim, heads, head_dim)
        self.max_length = check_int("max_length", max_length)
        inner = heads * self.head_dim
        self.sequence = nn.Parameter(torch.randn(self.max_length, dim))  # E: the fixed sequence Q and K are read from
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, dim)

    def fixed_qk(self, n: int) -> tuple[Tensor, Tensor]:
        """q, k (heads, n, head_dim) of E's first n rows."""
        if n > self.max_length:
            raise ShapeError(f"x: expected at most max_length={self.max_length} tokens, got {n}")
        e = self.sequence[:n]
        return (self.q_proj(e).view(n, self.heads, self.head_dim).transpose(0, 1),
                self.k_proj(e).view(n, self.heads, self.head_dim).transpose(0, 1))

    def _run(self, x: Tensor, keep: Tensor | None, reference: bool) -> tuple[Tensor, Tensor | None]:
        """(out (batch, heads, n, head_dim), A or None) with E indexed by the rank among the real tokens."""
        b, n, _ = x.shape
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        q, k = self.fixed_qk(n)
        if keep is None:
            if reference:
                return fixed_mixing_attention_reference(q, k, v, causal=self.causal)
            return fixed_mixing_attention(q, k, v, causal=self.causal), None
        # real tokens first in their order, padding after: token i of the packed sequence sits at E[i]
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (b, n)
        back = torch.argsort(order, dim=1)
        packed_v = torch.gather(v, 2, order[:, None, :, None].expand_as(v))
        packed_keep = torch.gather(keep, 1, order)
        if reference:
            out, a = fixed_mixing_attention_reference(q, k, packed_v, causal=self.causal, attention_mask=packed_keep)
            a = torch.gather(a, 2, back[:, None, :, None].expand_as(a))
            a = torch.gather(a, 3, back[:, None, None, :].expand_as(a))
        else:
            out, a = fixed_mixing_attention(q, k, packed_v, causal=self.causal, attention_mask=packed_keep), None
        return torch.gather(out, 2, back[:, None, :, None].expand_as(out)), a

    def mix(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        out = self._run(x, keep, reference=impl == "reference")[0]
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def mixing(self, x: Tensor, keep: Tensor | None) -> Tensor:
        a = self._run(x, keep, reference=True)[1]
        assert a is not None
        return a


# -- altered similarity -------------------------------------------------------------------------------------------


def _check_similarity(similarity: str) -> str:
    return check_choice("similarity", similarity, SIMILARITIES)


def altered_similarity_attention(
    q: Tensor, k: Tensor, v: Tensor, *, similarity: str = "distance", mask: Tensor | None = None
) -> Tensor:
    """softmax(s(q_i, k_j) + mask) v over (batch, heads, n, head_dim): "distance" s = −‖q_i − k_j‖²/(2√d), by SDPA on
    q' = [q, 1], k' = [k, −‖k‖²/2] (the −‖q_i‖²/2 term is constant in j and cancels in the softmax); "cosine"
    s = √d·cos(q_i, k_j), by SDPA on unit vectors with scale √d. `mask` bool (True = attend) or additive, broadcastable
    to (batch, heads, n_q, n_k); fully masked rows give 0."""
    check_qkv(q, k, v)
    d = q.shape[-1]
    if _check_similarity(similarity) == "distance":
        q2 = torch.cat([q, torch.ones_like(q[..., :1])], -1)
        k2 = torch.cat([k, -0.5 * (k * k).sum(-1, keepdim=True)], -1)
        return sdpa(q2, k2, v, mask, None, 1.0 / math.sqrt(d))
    return sdpa(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, mask, None, math.sqrt(d))


def altered_similarity_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, similarity: str = "distance", mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, A) of `altered_similarity_attention` in float64, the scores written from their definitions."""
    check_qkv(q, k, v)
    d = q.shape[-1]
    q64, k64 = q.double(), k.double()
    if _check_similarity(similarity) == "distance":
        diff = q64[..., :, None, :] - k64[..., None, :, :]
        scores = -(diff * diff).sum(-1) / (2.0 * math.sqrt(d))
    else:
        norms = torch.linalg.vector_norm(q64, dim=-1)[..., :, None] * torch.linalg.vector_norm(k64, dim=-1)[..., None, :]
        scores = math.sqrt(d) * torch.einsum("bhid,bhjd->bhij", q64, k64) / norms.clamp_min(1e-12)
    a = masked_softmax(scores, None if mask is None else (mask if mask.dtype == torch.bool else mask.double()))
    return (a @ v.double()).to(v.dtype), a.to(v.dtype)


@register(
    functional=("altered_similarity_attention", "altered_similarity_attention_reference"),
    name="altered-similarity",
    paper=DECONSTRUCTING,
    family="B",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True, cross=True, decode=True),
    params=(Param("similarity", str, "distance", "the score: 'distance' −‖q−k‖²/(2√d) or 'cosine' √d·cos(q, k)",
                  choices=SIMILARITIES),),
    summary="Deconstructed attention with another mathematical form: softmax of a distance (RBF) or cosine score "
            "instead of the dot product.",
    flops=dense_flops,
)
class AlteredSimilarity(Attention):
    """softmax over s(q_i, k_j) (negative scaled squared distance, or scaled cosine), times V."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        similarity: str = "distance",
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.similarity = _check_similarity(similarity)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return altered_similarity_attention(q, k, v, similarity=self.similarity, mask=mask)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return altered_similarity_attention_reference(q, k, v, similarity=self.similarity, mask=mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, similarity={self.similarity!r}, causal={self.causal}"


# -- decoupled queries and keys -----------------------------------------------------------------------------------


@register(
    functional=("softmax_attention", "softmax_attention_reference"),  # the core: softmax over q, k from the embeddings
    name="decoupled-attention",
    paper=DECONSTRUCTING,
    family="B",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True),
    summary="Deconstructed attention with queries and keys from the layer-0 embeddings (forward argument "
            "`embeddings`, default x), values from the current hidden state.",
    flops=dense_flops,
)
class DecoupledAttention(SoftmaxAttention):
    """softmax((W_q e)(W_k e)ᵀ/√d) W_v x: q and k from the embeddings e (forward(x, embeddings=e); default e = x), v
    from x. The core is softmax attention; materialize(x, embeddings=e) depends on e alone (and the masks)."""

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
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)

    def project(self, x: Tensor, context: Tensor | None = None, *,
                embeddings: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k from the embeddings (batch-major, checked as x), v from x: each (batch, heads, n, head_dim); without
        embeddings (or with a context) as `Attention.project`."""
        if embeddings is None or context is not None:
            return super().project(x, context)
        e = self.batch_major(embeddings)[0]
        check_tokens("embeddings", e, self.dim)
        check_finite("embeddings", e)
        if e.shape[:2] != x.shape[:2] or e.dtype != x.dtype:
            raise ShapeError(f"embeddings: expected (batch, n, dim) = {tuple(x.shape)} of dtype {x.dtype} (as x), got "
                             f"shape {tuple(e.shape)} of dtype {e.dtype}")
        return self.split_heads(self.q_proj(e)), self.split_heads(self.k_proj(e)), self.split_heads(self.v_proj(x))

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        *,
        embeddings: Tensor | None = None,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """x (batch, n, dim) -> (batch, n, dim), queries and keys from `embeddings` (batch, n, dim) (default x)."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(x, context, embeddings=embeddings)
        out = self.out_proj(self.merge_heads(self.attend(q, k, v, attention_mask=keep, attn_mask=attn_mask, impl=impl)))
        return out if self.batch_first else out.transpose(0, 1)

    def materialize(  # type: ignore[override]
        self,
        x: Tensor,
        *,
        embeddings: Tensor | None = None,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """A = softmax((W_q e)(W_k e)ᵀ/√d + masks) (batch, heads, n, n), e = `embeddings` (default x)."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(x, context, embeddings=embeddings)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, self.combined_mask(q, k, keep, attn_mask))[1]


# -- interleaving with softmax layers -----------------------------------------------------------------------------


class InterleavedStack(nn.Module):
    """A pre-norm stack of `layers` blocks h ← h + Mixer(LN h), h ← h + MLP(LN h) (GELU, 4·dim) whose mixer is softmax
    attention in every `softmax_every`-th layer (layers softmax_every − 1, 2·softmax_every − 1, … counted from 0) and
    the mechanism `variant` elsewhere (softmax_every = 0: the variant everywhere, 1: softmax everywhere) — the paper's
    hybrids. A `decoupled-attention` layer reads its queries and keys from the stack's input x (the layer-0 embeddings)
    under that layer's first norm.

    forward(x, *, attention_mask=None) over (batch, n, dim); `mixers` lists the layers' mechanisms."""

    def __init__(
        self,
        variant: str,
        *,
        dim: int,
        heads: int,
        layers: int,
        softmax_every: int = 2,
        causal: bool = False,
        variant_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        layers = check_int("layers", layers)
        softmax_every = check_int("softmax_every", softmax_every, low=0)
        if variant_params is not None and not isinstance(variant_params, dict):
            raise ParameterError(f"variant_params: expected a dict or None, got {type(variant_params).__name__}")
        self.names: list[str] = [
            "softmax" if softmax_every and (i + 1) % softmax_every == 0 else variant for i in range(layers)
        ]
        common = {"dim": dim, "heads": heads, "causal": causal}
        self.mixers = nn.ModuleList(
            get(name).build(**common, **({} if name == "softmax" else dict(variant_params or {}))) for name in self.names
        )
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                  for _ in range(layers))
        self.dim = dim

    def forward(self, x: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        check_tokens("x", x, self.dim)
        keep = module_keep_mask(attention_mask, None, x.shape[0], x.shape[1])
        h = x
        for mixer, norm1, norm2, mlp in zip(self.mixers, self.norms1, self.norms2, self.mlps):
            extra = {"embeddings": norm1(x)} if isinstance(mixer, DecoupledAttention) else {}
            h = h + mixer(norm1(h), attention_mask=keep, **extra)
            h = h + mlp(norm2(h))
        return h

