"""Dual attention: relational heads beside standard (sensory) heads (Altabaa & Lafferty, "Disentangling and
Integrating Relational and Sensory Information in Transformer Architectures", 2024).

A standard head retrieves the values of the tokens it attends to (sensory information). A relational head
retrieves, from each token it attends to, the token's relation to the query, tagged with a symbol that says
which token it came from:

    α^h_ij = softmax_j(⟨W_q^h x_i, W_k^h x_j⟩ / √d_h)                   (the head's attention)
    r_ij   = (⟨W_q^{rel,ℓ} x_i, W_k^{rel,ℓ} x_j⟩ / √d_r)_{ℓ=1..d_rel}   (relation vector, shared by the heads)
    RA^h_i = Σ_j α^h_ij (W_r^h r_ij + W_s^h s_j)                         (relational head h)
    SA^h_i = Σ_j α^h_ij W_v^h x_j                                        (sensory head h)
    DualAttn(x)_i = concat(SA^1_i … SA^{n_sa}_i, RA^1_i … RA^{n_ra}_i) W_o

W_r^h ∈ R^{d_h×d_rel} and W_s^h (the symbols' value projection) per head, the relation maps W_q^{rel,ℓ},
W_k^{rel,ℓ} ∈ R^{d×d_r} shared by the relational heads. The symbols s come from a symbol retriever:

* "symbolic"           symbolic attention: s_j = Σ_m softmax_m(⟨W x_j, f_m⟩/√(d/h_s)) l_m, a learned library
                        of `n_symbols` symbols l_m with template features f_m, `symbol_heads` heads (the paper's
                        choice for language);
* "positional"         s_j = e_{p(j)}, a learned symbol per position (up to `max_length`);
* "position-relative"  s_ij = e_{clip(p(j) − p(i), ±R)}, a learned symbol per relative position (R =
                        `max_relative_position`): RA^h_i = Σ_j α^h_ij (W_r^h r_ij + W_s^h s_ij).

p(j) is the position of token j among the real tokens (padding does not shift it), so a padded sequence gives
its real tokens the output of the unpadded one with every retriever. `symmetric_relations` ties
W_k^{rel,ℓ} = W_q^{rel,ℓ}, making r_ij = r_ji.

What `materialize` returns: α, (batch, heads, n, n), the sensory heads first, then the relational ones — for
both kinds the softmax attention over j that weighs what head h retrieves from token j (rows sum to 1). For a
sensory head the output is α v (out = A v). For a relational head the retrieved message depends on the pair,
m^h_ij = W_r^h r_ij + W_s^h s_j (or s_ij), so the output is Σ_j α^h_ij m^h_ij and no fixed per-key value v
explains it: the contract is out = out_proj(concat_h Σ_j A^h_ij m^h_ij), with the messages of
`messages(x)` (batch, heads, n, n, d_h) (v_j for the sensory heads). This module is therefore not an
`attnlab.core.module.Attention` (whose core contract is out = A v), and the conformance suite's out = A v check
does not apply to it; the pair contract is tested in tests/mechanisms/test_dual_attention.py.

Fast path. Relations are bilinear, so Σ_j α^h_ij r_ijℓ = ⟨W_q^{rel,ℓ} x_i, Σ_j α^h_ij W_k^{rel,ℓ} x_j⟩/√d_r:
with the symbolic and positional retrievers one SDPA call per group of heads attends to the values
[W_k^{rel} x_j ; W_s^h s_j] (width d_rel·d_r + d_h) and the relations are read out per query afterwards, no
n×n×d_rel relation tensor (the official code materialises it). Position-relative symbols need α: it is
computed explicitly and its mass binned by relative position (the ≤ 2R + 1 symbol weights of each query) before
one matmul with the projected symbol table. The float64 reference builds α, the relation tensor r and the
messages m explicitly.

Defaults and differences from the official code (Awni00/dual-attention, `DualAttention`,
`RelationalAttention`): half the heads relational (`relational_heads=None`: ⌊heads/2⌋); d_rel = the number of
relational heads and d_r = d_h (`relations`, `relation_dim`: the code's defaults); scales 1/√d_h and 1/√d_r
as in the code (a reparametrisation of the paper's r, absorbed by W_r); relation activation the identity (the
code's default, and what the fast path's factorisation needs). The paper concatenates both kinds of heads
before one W_o; the code projects each group with its own W_o and concatenates (a block-diagonal W_o, a special
case): we implement the paper's W_o (the peer test maps the code's blocks into it). `qkv_bias` applies to
W_q, W_k, W_v and W_s (the code: none on W_q, optional on the others); the relation maps have no bias (the
paper's r is bilinear). The symbol library is part of the layer here (the code shares one retriever across a
model's layers: share the module to do the same). `n_symbols=64`, `symbol_heads=1`, `max_length=2048`,
`max_relative_position=16` are our defaults. No decoding (KV cache) and no cross-attention.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import causal_mask, combine_masks, module_keep_mask, restrict
from ...core.memory import check_memory
from ...core.reference import masked_softmax
from ...core.reference import softmax_attention_reference as softmax_reference
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_choice,
    check_finite,
    check_int,
    check_module_dtype,
    check_qkv,
    check_tensor,
    check_tokens,
)
from ...kernels.sdpa import sdpa

DAT = Paper("P061", "Disentangling and Integrating Relational and Sensory Information in Transformer Architectures",
            2024, "2405.16727")
RETRIEVERS: tuple[str, ...] = ("symbolic", "positional", "position-relative")


def dual_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the defaults (⌊h/2⌋ relational heads, d_rel = their count, d_r = d_h): the sensory heads'
    q kᵀ and A v, the relational heads' q kᵀ and A [W_k^rel x ; W_s s] (width d_rel·d_h + d_h); half when causal."""
    relational = heads // 2
    sensory = heads - relational
    width = relational * head_dim + head_dim
    return 2.0 * n * n * (sensory * 2 * head_dim + relational * (head_dim + width)) * (0.5 if causal else 1.0)


def real_positions(keep: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """The position of every token among the real tokens of its sequence, (batch, n) long (0, 1, … without padding)."""
    if keep is None:
        return torch.arange(n, device=device).expand(batch, n)
    return (keep.long().cumsum(-1) - 1).clamp_min(0)


def _check_relational(
    q: Tensor, k: Tensor, rel_q: Tensor, rel_k: Tensor, symbols: Tensor, relation_out: Tensor,
    symbol_offsets: Tensor | None,
) -> None:
    check_qkv(q, k, k)
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    for name, t, n in (("rel_q", rel_q, n_q), ("rel_k", rel_k, n_k)):
        check_tensor(name, t)
        if t.dim() != 4 or t.shape[:2] != (b, n):
            raise ShapeError(f"{name}: expected (batch, n, relations, relation_dim) = ({b}, {n}, ·, ·), got shape {tuple(t.shape)}")
    if rel_q.shape[2:] != rel_k.shape[2:]:
        raise ShapeError(f"rel_q, rel_k: expected the same (relations, relation_dim), got {tuple(rel_q.shape)}, {tuple(rel_k.shape)}")
    check_tensor("relation_out", relation_out)
    if relation_out.dim() != 3 or relation_out.shape[0] != h or relation_out.shape[2] != rel_q.shape[2]:
        raise ShapeError(f"relation_out: expected W_r (heads={h}, d_v, relations={rel_q.shape[2]}), got shape {tuple(relation_out.shape)}")
    check_tensor("symbols", symbols)
    d_v = relation_out.shape[1]
    if symbol_offsets is None:
        if tuple(symbols.shape) != (b, h, n_k, d_v):
            raise ShapeError(f"symbols: expected the projected symbols (batch, heads, n_k, d_v) = ({b}, {h}, {n_k}, {d_v}), "
                             f"got shape {tuple(symbols.shape)}")
        return
    check_tensor("symbol_offsets", symbol_offsets)
    if symbols.dim() != 3 or symbols.shape[0] != h or symbols.shape[2] != d_v:
        raise ShapeError(f"symbols: expected a table (heads={h}, m, d_v={d_v}) with symbol_offsets, got shape {tuple(symbols.shape)}")
    if tuple(symbol_offsets.shape) != (b, n_q, n_k) or symbol_offsets.dtype != torch.long:
        raise ShapeError(f"symbol_offsets: expected long (batch, n_q, n_k) = ({b}, {n_q}, {n_k}), got "
                         f"{symbol_offsets.dtype} {tuple(symbol_offsets.shape)}")
    if symbol_offsets.numel() and (int(symbol_offsets.min()) < 0 or int(symbol_offsets.max()) >= symbols.shape[1]):
        raise ValueError(f"symbol_offsets: expected indices in [0, {symbols.shape[1]}), got [{int(symbol_offsets.min())}, "
                         f"{int(symbol_offsets.max())}]")


def relational_attention(
    q: Tensor,
    k: Tensor,
    rel_q: Tensor,
    rel_k: Tensor,
    symbols: Tensor,
    relation_out: Tensor,
    *,
    symbol_offsets: Tensor | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    relation_scale: float | None = None,
) -> Tensor:
    """Relational attention heads: RA^h_i = Σ_j α^h_ij (W_r^h r_ij + σ^h_j), (batch, heads, n_q, d_v).

    q, k (batch, heads, n, d): the attention features (α = softmax(q kᵀ·scale + mask), scale 1/√d by default);
    rel_q, rel_k (batch, n, relations, relation_dim): W_q^rel x, W_k^rel x, r_ijℓ = ⟨rel_q_iℓ, rel_k_jℓ⟩·relation_scale
    (1/√relation_dim by default); relation_out W_r (heads, d_v, relations); symbols: the projected symbols
    σ = W_s s (batch, heads, n_k, d_v), or a table (heads, m, d_v) with symbol_offsets (batch, n_q, n_k), the
    table row of pair (i, j) (position-relative symbols). mask bool (True = attend) or additive, broadcastable
    to (batch, heads, n_q, n_k); causal bottom-right aligned. Fully masked rows give 0.
    """
    _check_relational(q, k, rel_q, rel_k, symbols, relation_out, symbol_offsets)
    b, h, n_q, d = q.shape
    n_k, (n_rel, d_r), d_v = k.shape[2], rel_k.shape[2:], relation_out.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    relation_scale = 1.0 / math.sqrt(d_r) if relation_scale is None else relation_scale
    rel_keys = rel_k.flatten(2)[:, None].expand(b, h, n_k, n_rel * d_r)
    if symbol_offsets is None:  # α never materialised: SDPA over the values [W_k^rel x_j ; σ_j]
        pooled, retrieved = sdpa(q, k, torch.cat([rel_keys, symbols], -1), mask, None, scale, causal=causal).split(
            [n_rel * d_r, d_v], -1)
    else:  # α needed to bin its mass by relative position
        if causal:
            mask = restrict(mask, causal_mask(n_q, n_k, q.device))
        alpha = masked_softmax((q @ k.transpose(-1, -2)) * scale, mask)
        pooled = alpha @ rel_keys
        per_symbol = alpha.new_zeros(b, h, n_q, symbols.shape[1]).scatter_add(
            -1, symbol_offsets[:, None].expand(b, h, n_q, n_k), alpha)
        retrieved = per_symbol @ symbols.to(alpha.dtype)
    relations = (rel_q[:, None] * pooled.unflatten(-1, (n_rel, d_r))).sum(-1) * relation_scale  # Σ_j α_ij r_ij
    return retrieved + relations @ relation_out.transpose(-1, -2).to(relations.dtype)


def relational_attention_reference(
    q: Tensor,
    k: Tensor,
    rel_q: Tensor,
    rel_k: Tensor,
    symbols: Tensor,
    relation_out: Tensor,
    *,
    symbol_offsets: Tensor | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    relation_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, α) of `relational_attention` in float64 from the formula: α, the relation tensor r (batch, n_q, n_k,
    relations) and the messages m^h_ij = W_r^h r_ij + σ^h_ij materialised, out_i = Σ_j α_ij m_ij."""
    _check_relational(q, k, rel_q, rel_k, symbols, relation_out, symbol_offsets)
    n_q, n_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    relation_scale = 1.0 / math.sqrt(rel_q.shape[-1]) if relation_scale is None else relation_scale
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    if causal:
        later = torch.arange(n_k, device=q.device)[None] > torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        scores = scores.masked_fill(later, -math.inf)
    alpha = masked_softmax(scores, mask if mask is None or mask.dtype == torch.bool else mask.double())
    r = torch.einsum("bild,bjld->bijl", rel_q.double(), rel_k.double()) * relation_scale
    messages = torch.einsum("bijl,hdl->bhijd", r, relation_out.double())
    if symbol_offsets is None:
        messages = messages + symbols.double()[:, :, None]  # σ_j, the same for every query
    else:
        messages = messages + symbols.double()[:, symbol_offsets].permute(1, 0, 2, 3, 4)  # σ_{offset(i, j)}
    out = torch.einsum("bhij,bhijd->bhid", alpha, messages)
    return out.to(q.dtype), alpha.to(q.dtype)


class SymbolicAttention(nn.Module):
    """Symbol retrieval by attention over a learned library: s_j = Σ_m softmax_m(⟨W x_j, f_m⟩/√(d/h_s)) l_m, per
    head h_s of the d channels (templates f_m and symbols l_m (n_symbols, d))."""

    def __init__(self, dim: int, n_symbols: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ParameterError(f"symbol_heads: expected a divisor of dim={dim}, got {heads}")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.templates = nn.Parameter(torch.randn(n_symbols, dim))
        self.library = nn.Parameter(torch.randn(n_symbols, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q = self.query(x).view(b, n, self.heads, -1).transpose(1, 2)
        keys = self.templates.view(-1, self.heads, d // self.heads).transpose(0, 1)
        values = self.library.view(-1, self.heads, d // self.heads).transpose(0, 1)
        weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return (weights @ values).transpose(1, 2).reshape(b, n, d)


@register(
    name="dual-attention",
    paper=DAT,
    family="C",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True),
    params=(
        Param("relational_heads", int, None, "relational heads n_ra among `heads` (None: ⌊heads/2⌋; 0: multi-head "
              "softmax attention)", low=0, optional=True),
        Param("relations", int, None, "d_rel, the entries of a relation vector r_ij (None: relational_heads)", low=1,
              optional=True),
        Param("relation_dim", int, None, "d_r, the width of each relation's query/key maps (None: head_dim)", low=1,
              optional=True),
        Param("symmetric_relations", bool, False, "tie W_k^rel = W_q^rel: r_ij = r_ji (the code's symmetric_rels)"),
        Param("symbol_retriever", str, "symbolic", "the symbols s_j: 'symbolic' (attention over a learned library), "
              "'positional' (one per position), 'position-relative' (one per clipped j − i)", choices=RETRIEVERS),
        Param("n_symbols", int, 64, "symbols in the library of symbolic attention", low=1),
        Param("symbol_heads", int, 1, "heads of symbolic attention (a divisor of dim)", low=1),
        Param("max_length", int, 2048, "positions with a symbol (positional retriever)", low=1),
        Param("max_relative_position", int, 16, "R: relative positions clipped to [−R, R] (position-relative)", low=0),
    ),
    summary="Dual attention: sensory softmax heads and relational heads retrieving relation vectors r_ij tagged "
            "with symbols (symbolic, positional or position-relative), one output projection.",
    test_params={"relational_heads": 1, "symbol_retriever": "position-relative", "max_relative_position": 3},
    functional=("relational_attention", "relational_attention_reference"),
    flops=dual_flops,
)
class DualAttention(nn.Module):
    """Dual attention: n_sa sensory heads Σ_j α_ij W_v x_j and n_ra relational heads Σ_j α_ij (W_r r_ij + W_s s_j),
    concatenated, W_o. `materialize` gives every head's α; `messages(x)` the per-pair messages m_ij."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        relational_heads: int | None = None,
        relations: int | None = None,
        relation_dim: int | None = None,
        symmetric_relations: bool = False,
        symbol_retriever: str = "symbolic",
        n_symbols: int = 64,
        symbol_heads: int = 1,
        max_length: int = 2048,
        max_relative_position: int = 16,
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
            head_dim = dim // heads
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, check_int("head_dim", head_dim), causal
        self.relational_heads = heads // 2 if relational_heads is None else check_int(
            "relational_heads", relational_heads, low=0, high=heads)
        self.sensory_heads = heads - self.relational_heads
        self.symbol_retriever = check_choice("symbol_retriever", symbol_retriever, RETRIEVERS)
        self.max_length = check_int("max_length", max_length)
        self.max_relative_position = check_int("max_relative_position", max_relative_position, low=0)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)  # attention queries of every head
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.sensory_heads * head_dim, bias=qkv_bias) if self.sensory_heads else None
        self.out_proj = nn.Linear(heads * head_dim, dim)
        self.relations = self.relation_dim = 0
        if self.relational_heads:
            n_ra = self.relational_heads
            self.relations = n_ra if relations is None else check_int("relations", relations)
            self.relation_dim = head_dim if relation_dim is None else check_int("relation_dim", relation_dim)
            width = self.relations * self.relation_dim
            self.rel_q_proj = nn.Linear(dim, width, bias=False)
            self.rel_k_proj = self.rel_q_proj if symmetric_relations else nn.Linear(dim, width, bias=False)
            bound = 1.0 / math.sqrt(self.relations)
            self.relation_out = nn.Parameter(torch.empty(n_ra, head_dim, self.relations).uniform_(-bound, bound))
            self.symbol_proj = nn.Linear(dim, n_ra * head_dim, bias=qkv_bias)  # W_s
            if self.symbol_retriever == "symbolic":
                self.symbols: nn.Module | nn.Parameter = SymbolicAttention(dim, check_int("n_symbols", n_symbols),
                                                                            check_int("symbol_heads", symbol_heads))
            else:
                rows = self.max_length if self.symbol_retriever == "positional" else 2 * self.max_relative_position + 1
                self.symbols = nn.Parameter(torch.randn(rows, dim))
        self.symmetric_relations = symmetric_relations

    # -- the heads ---------------------------------------------------------------------------------------------
    def _split(self, t: Tensor, heads: int) -> Tensor:
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def _relational_inputs(self, x: Tensor, keep: Tensor | None) -> dict[str, Tensor]:
        """rel_q, rel_k, the projected symbols (and the offsets of position-relative ones) of tokens x."""
        b, n, _ = x.shape
        rel_q = self.rel_q_proj(x).view(b, n, self.relations, self.relation_dim)
        rel_k = self.rel_k_proj(x).view(b, n, self.relations, self.relation_dim)
        out = {"rel_q": rel_q, "rel_k": rel_k}
        if self.symbol_retriever == "symbolic":
            assert isinstance(self.symbols, nn.Module)
            out["symbols"] = self._split(self.symbol_proj(self.symbols(x)), self.relational_heads)
            return out
        table = self.symbols
        assert isinstance(table, Tensor)
        positions = real_positions(keep, b, n, x.device)
        if self.symbol_retriever == "positional":
            if n > self.max_length:
                raise ShapeError(f"x: positional symbols cover max_length={self.max_length} positions, got {n} tokens")
            out["symbols"] = self._split(self.symbol_proj(table[positions]), self.relational_heads)
            return out
        r = self.max_relative_position
        out["symbol_offsets"] = (positions[:, None, :] - positions[:, :, None]).clamp(-r, r) + r
        out["symbols"] = self.symbol_proj(table).view(2 * r + 1, self.relational_heads, self.head_dim).transpose(0, 1)
        return out

    def heads_of(self, x: Tensor, keep: Tensor | None, attn_mask: Tensor | None, impl: str) -> tuple[Tensor, Tensor | None]:
        """Every head's output (batch, heads, n, head_dim), sensory heads first, and α for impl='reference'."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        fast = impl == "fast"
        b, n, _ = x.shape
        mask = combine_masks(batch=b, heads=self.heads, n_q=n, n_k=n, causal=self.causal and not fast,
                             attention_mask=keep, attn_mask=attn_mask, dtype=x.dtype, device=x.device)
        q, k = self._split(self.q_proj(x), self.heads), self._split(self.k_proj(x), self.heads)
        s = self.sensory_heads
        outs, weights = [], []

        def part(heads: slice) -> Tensor | None:
            return mask if mask is None or mask.shape[1] == 1 else mask[:, heads]

        if s:
            assert self.v_proj is not None
            v = self._split(self.v_proj(x), s)
            if fast:
                outs.append(sdpa(q[:, :s], k[:, :s], v, part(slice(0, s)), None, 1.0 / math.sqrt(self.head_dim),
                                 causal=self.causal))
            else:
                o, a = softmax_reference(q[:, :s], k[:, :s], v, mask=part(slice(0, s)))
                outs.append(o)
                weights.append(a)
        if self.relational_heads:
            inputs = self._relational_inputs(x, keep)
            relational = relational_attention if fast else relational_attention_reference
            o = relational(q[:, s:], k[:, s:], relation_out=self.relation_out, mask=part(slice(s, None)),
                           causal=self.causal and fast, **inputs)
            if fast:
                outs.append(o)  # type: ignore[arg-type]
            else:
                outs.append(o[0])
                weights.append(o[1])
        return torch.cat(outs, 1), (torch.cat(weights, 1) if weights else None)

    # -- the module's interface --------------------------------------------------------------------------------
    def _checked(
        self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None, key_padding_mask: Tensor | None
    ) -> Tensor | None:
        if context is not None:
            raise ValueError("context: dual-attention does not support cross-attention (symbols and relations are "
                             "of the tokens themselves)")
        check_tokens("x", x, self.dim)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        return module_keep_mask(attention_mask, key_padding_mask, x.shape[0], x.shape[1])

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: str = "fast",
    ) -> Tensor:
        """x (batch, n, dim) -> (batch, n, dim). Padding: attention_mask (batch, n), True/1 = attend, or
        key_padding_mask (batch, n), True = padding; attn_mask bool or additive (n, n) or (batch, heads, n, n)."""
        keep = self._checked(x, context, attention_mask, key_padding_mask)
        if impl == "reference":
            check_memory("impl='reference'", (x.shape[0], self.heads, x.shape[1], x.shape[1], self.head_dim), 8)
        heads, _ = self.heads_of(x, keep, attn_mask, impl)
        return self.out_proj(heads.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """α of every head (batch, heads, n, n), sensory heads first: the softmax attention over j (module docstring)."""
        keep = self._checked(x, context, attention_mask, key_padding_mask)
        check_memory("materialize", (x.shape[0], self.heads, x.shape[1], x.shape[1], self.head_dim), 8)
        weights = self.heads_of(x, keep, attn_mask, "reference")[1]
        assert weights is not None
        return weights

    def messages(self, x: Tensor, *, attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """m^h_ij (batch, heads, n, n, head_dim), what head h retrieves from token j for query i, in float64: v_j for a
        sensory head, W_r^h r_ij + W_s^h s_j (or s_ij) for a relational one; out = out_proj(concat_h Σ_j α^h_ij m^h_ij)."""
        keep = self._checked(x, None, attention_mask, key_padding_mask)
        b, n, _ = x.shape
        check_memory("messages", (b, self.heads, n, n, self.head_dim), 8)
        parts = []
        if self.sensory_heads:
            assert self.v_proj is not None
            v = self._split(self.v_proj(x), self.sensory_heads).double()
            parts.append(v[:, :, None].expand(-1, -1, n, -1, -1))
        if self.relational_heads:
            inputs = self._relational_inputs(x, keep)
            r = torch.einsum("bild,bjld->bijl", inputs["rel_q"].double(), inputs["rel_k"].double()) / math.sqrt(self.relation_dim)
            m = torch.einsum("bijl,hdl->bhijd", r, self.relation_out.double())
            sym = inputs["symbols"].double()
            if "symbol_offsets" in inputs:
                m = m + sym[:, inputs["symbol_offsets"]].permute(1, 0, 2, 3, 4)
            else:
                m = m + sym[:, :, None]
            parts.append(m)
        return torch.cat(parts, 1)
