"""DHSA (Xiong et al., 2025): dynamic hierarchical sparse attention, chunk scores pick key chunks.

The sequence is cut into chunks c; each chunk gets length-normalised representations

    q̄_c = √|c| · mean_{i∈c} q_i,        k̄_c = √|c| · mean_{j∈c} k_j

(means and |c| over the chunk's real tokens), chunk scores S = Q̄ K̄ᵀ are upsampled to the
tokens (every token pair inherits its chunk pair's score), and each query keeps the keys of
its top-scoring key chunks — here the top `top_chunks` earlier chunks plus its own (diagonal)
chunk — for exact causal softmax attention on the block-sparse engine:

    out_i = Σ_{j ≤ i, ⌊j/b⌋ ∈ T(⌊i/b⌋)} softmax_j(q_i · k_j / √d) v_j

With top_chunks ≥ the number of chunks this is causal softmax attention.

Deviations from the paper, documented choices:

* chunks have a fixed size b, so the ranking is a block top-k — the baseline the paper claims
  to beat. The paper's dynamic chunking is a trained boundary predictor (an encoder over the
  left and right context of each position, a fusion of the two features with their
  difference, product and similarity, and an MLP classifier; its weights are released
  separately, "sxiong/DHSA"), trained on boundaries labelled by similarity shifts between
  consecutive key embeddings. It is not a closed-form rule and attnlab ships no trained
  weights. `boundary_threshold=τ` offers the labelling rule itself as adaptive chunking: a
  chunk ends before real token t when cos(k_t, k_s) < τ for the previous real token s (per
  head) or when it has reached chunk_size real tokens (padding neither splits nor counts), so chunks have variable lengths ≤ chunk_size and token t's chunk
  depends on keys ≤ t only (causal). Variable chunks do not fit the fixed blocks of the
  block-sparse engine: that option's fast path is SDPA under the N × N token mask (O(N²)
  memory, and a Python loop of N steps to place the boundaries), and it is not the default
  since it is the predictor's training signal, not the predictor.
* the budget is whole chunks per query chunk (`top_chunks` plus the diagonal chunk); the
  paper keeps a per-token budget N_b of key tokens by the upsampled score (the same chunks
  when N_b is a multiple of the chunk size, up to ties inside a chunk);
* `query_rep="lookback"` (the default) scores query chunk x with the representation of chunk
  x − 1, whose queries all precede every query of chunk x, so the selection — and the output
  of query i — depends on positions ≤ i only (strictly causal, as the conformance suite
  checks). `query_rep="chunk"` is the paper's own q̄_x: then later queries of a chunk take
  part in choosing the key chunks of earlier ones (fine for a prefill that sees the whole
  prompt, but not causal at the level of the selection). The paper targets prefill, where
  the whole prompt is known, and gives no strictly causal form of the selection; "lookback"
  is ours.

Autograd: the top-k chunk selection is not differentiated (made under no_grad); gradients
flow through the exact token scores of the kept chunks only — the chunk representations
get no gradient. Cost O((N/b)² d + N (k+1) b d): the chunk scores are quadratic with a
1/b² constant, the attention linear.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ParameterError
from ...core.module import Attention
from ...core.reference import softmax_attention_reference
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_choice, check_int, check_qkv
from ...kernels.block_sparse import BlockLayout, block_sparse_attention
from ...kernels.sizes import fit_block
from .power import causal_mod

DHSA = Paper("P247", "Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs", 2025, "2510.24606")
QueryRep = Literal["lookback", "chunk"]
QUERY_REPS = ("lookback", "chunk")


def _check_args(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_chunks: int, query_rep: str,
                attention_mask: Tensor | None, scale: float | None) -> None:
    check_qkv(q, k, v, same_length=True)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    check_int("chunk_size", chunk_size, 1)
    check_int("top_chunks", top_chunks, 0)
    check_choice("query_rep", query_rep, QUERY_REPS)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ParameterError(f"scale: expected a finite float or None, got {scale!r}")


def dhsa_select(
    q: Tensor, k: Tensor, *, chunk_size: int, top_chunks: int, query_rep: QueryRep = "lookback",
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Kept key chunks (batch, heads, n_chunks, top_chunks + 1) int64 of each query chunk: its top
    earlier chunks by S = Q̄ K̄ᵀ (−1 where fewer exist) and the chunk itself. Not differentiated."""
    bsz, h, n, d = q.shape
    b = fit_block(chunk_size, n)  # a chunk of n or more is one chunk: no padding beyond it
    nc = math.ceil(n / b)
    padded = nc * b
    with torch.no_grad():
        if attention_mask is None:
            real = (torch.arange(padded, device=q.device) < n)[None].expand(bsz, padded)
        else:
            real = F.pad(attention_mask, (0, padded - n), value=False)
        ok = real.view(bsz, 1, nc, b, 1).to(q.dtype)
        count = ok.sum(-2)  # (batch, 1, nc, 1)

        def rep(x: Tensor) -> Tensor:  # √|c| · mean = Σ / √|c|
            xb = F.pad(x.detach(), (0, 0, 0, padded - n)).view(bsz, h, nc, b, d)
            return (xb * ok).sum(-2) / count.clamp(min=1).sqrt()

        q_rep, k_rep = rep(q), rep(k)
        if query_rep == "lookback":
            q_rep = torch.cat([torch.zeros_like(q_rep[:, :, :1]), q_rep[:, :, :-1]], 2)
        scores = q_rep @ k_rep.transpose(-1, -2)  # (batch, heads, nc, nc)
        chunk = torch.arange(nc, device=q.device)
        allowed = (chunk[None, :] < chunk[:, None])[None, None] & (count > 0).view(bsz, 1, 1, nc)
        scores = scores.masked_fill(~allowed, float("-inf"))
        own = chunk.view(1, 1, nc, 1).expand(bsz, h, nc, 1)
        if top_chunks == 0 or nc == 1:
            return own.clone()
        vals, idx = scores.topk(min(top_chunks, nc), dim=-1)
        idx = idx.masked_fill(vals == float("-inf"), -1)
        return torch.cat([idx, own], -1)


def _check_threshold(boundary_threshold: object) -> None:
    if boundary_threshold is not None and (
        isinstance(boundary_threshold, bool) or not isinstance(boundary_threshold, (int, float))
        or not -1.0 <= boundary_threshold <= 1.0
    ):
        raise ParameterError(f"boundary_threshold: expected a float in [-1, 1] or None, got {boundary_threshold!r}")


def adaptive_chunks(k: Tensor, *, chunk_size: int, threshold: float, attention_mask: Tensor | None = None) -> Tensor:
    """Chunk index (batch, heads, n) int64 of every token: a chunk ends before real token t when
    cos(k_t, k_s) < threshold for the previous real token s, or when it holds chunk_size real tokens
    (causal: from keys ≤ t); a padded token joins the current chunk and is not counted."""
    with torch.no_grad():
        bsz, h, n, _ = k.shape
        real = torch.ones(bsz, n, dtype=torch.bool, device=k.device) if attention_mask is None else attention_mask.bool()
        ids = torch.zeros(bsz, h, n, dtype=torch.int64, device=k.device)
        run = torch.zeros(bsz, h, dtype=torch.int64, device=k.device)  # real tokens in the current chunk
        last = k[:, :, 0]
        for t in range(n):
            is_real = real[:, t, None].expand(bsz, h)
            turn = F.cosine_similarity(k[:, :, t], last, dim=-1) < threshold
            new = is_real & (run > 0) & (turn | (run >= chunk_size))
            ids[..., t] = (ids[..., t - 1] if t else 0) + new.long()
            run = torch.where(is_real, torch.where(new, 1, run + 1), run)
            last = torch.where(is_real[..., None], k[:, :, t], last)
        return ids


def adaptive_keep(
    q: Tensor, k: Tensor, *, chunk_size: int, top_chunks: int, threshold: float, query_rep: QueryRep,
    attention_mask: Tensor | None,
) -> Tensor:
    """The token mask (batch, heads, n, n) of DHSA on `adaptive_chunks`: key j is kept for query i when j <= i,
    j is real and j's chunk is i's own or one of the top_chunks earlier chunks by the chunk scores."""
    with torch.no_grad():
        bsz, h, n, d = q.shape
        ids = adaptive_chunks(k, chunk_size=chunk_size, threshold=threshold, attention_mask=attention_mask)
        nc = int(ids.max()) + 1
        real = torch.ones(bsz, n, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask
        weight = real[:, None, :, None].to(q.dtype)
        member = F.one_hot(ids, nc).to(q.dtype) * weight  # (batch, heads, n, nc), real tokens only
        count = member.sum(2)  # (batch, heads, nc)
        q_rep, k_rep = ((member.transpose(-1, -2) @ x.detach()) / count.clamp(min=1).sqrt()[..., None] for x in (q, k))
        if query_rep == "lookback":
            q_rep = torch.cat([torch.zeros_like(q_rep[:, :, :1]), q_rep[:, :, :-1]], 2)
        scores = q_rep @ k_rep.transpose(-1, -2)
        chunk = torch.arange(nc, device=q.device)
        allowed = (chunk[None, :] < chunk[:, None])[None, None] & (count > 0)[:, :, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        pairs = torch.eye(nc, dtype=torch.bool, device=q.device).expand(bsz, h, nc, nc).clone()
        if top_chunks and nc > 1:
            idx = scores.argsort(dim=-1, descending=True, stable=True)[..., :top_chunks]  # ties: the earlier chunk
            pairs.scatter_(-1, idx, scores.gather(-1, idx) > float("-inf"))
            pairs |= torch.eye(nc, dtype=torch.bool, device=q.device)
        keep = torch.gather(pairs, 2, ids[..., None].expand(bsz, h, n, nc))  # (batch, heads, n, nc): row of i's chunk
        keep = torch.gather(keep, 3, ids[:, :, None, :].expand(bsz, h, n, n))  # (batch, heads, n, n)
        pos = torch.arange(n, device=q.device)
        return keep & (pos[None, :] <= pos[:, None]) & real[:, None, None, :]


def dhsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int = 64,
    top_chunks: int = 4,
    query_rep: QueryRep = "lookback",
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    boundary_threshold: float | None = None,
) -> Tensor:
    """Causal DHSA over (batch, heads, n, head_dim) self-attention inputs: fixed chunks on the block-sparse
    engine, or (boundary_threshold given) adaptive chunks under their token mask."""
    _check_args(q, k, v, chunk_size, top_chunks, query_rep, attention_mask, scale)
    _check_threshold(boundary_threshold)
    bsz, h, n, _ = q.shape
    if n == 0:
        return q.new_zeros(bsz, h, 0, v.shape[-1])
    if boundary_threshold is not None:
        keep = adaptive_keep(q, k, chunk_size=chunk_size, top_chunks=top_chunks, threshold=float(boundary_threshold),
                             query_rep=query_rep, attention_mask=attention_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)  # fully masked rows give 0
    kept = dhsa_select(q, k, chunk_size=chunk_size, top_chunks=top_chunks, query_rep=query_rep, attention_mask=attention_mask)
    nc = kept.shape[2]
    outs = []
    for z in range(bsz):  # the layout is content-based: one per batch element, per head
        layout = BlockLayout.from_candidates(kept[z], chunk_size, nc)
        kpm = None if attention_mask is None else attention_mask[z : z + 1]
        outs.append(block_sparse_attention(q[z : z + 1], k[z : z + 1], v[z : z + 1], layout,
                                           mask_mod=causal_mod, attention_mask=kpm, scale=scale))
    return torch.cat(outs, 0)


def dhsa_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int = 64,
    top_chunks: int = 4,
    query_rep: QueryRep = "lookback",
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    boundary_threshold: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `dhsa_attention`: dense causal softmax in float64 under the token mask the
    kept chunk pairs define (same selection; adaptive chunks placed and ranked token by token)."""
    _check_args(q, k, v, chunk_size, top_chunks, query_rep, attention_mask, scale)
    _check_threshold(boundary_threshold)
    bsz, h, n, _ = q.shape
    if boundary_threshold is not None:
        keep = _adaptive_keep_by_loops(q, k, chunk_size, top_chunks, float(boundary_threshold), query_rep, attention_mask)
        return softmax_attention_reference(q, k, v, mask=keep, scale=scale)
    kept = dhsa_select(q, k, chunk_size=chunk_size, top_chunks=top_chunks, query_rep=query_rep, attention_mask=attention_mask)
    nc = kept.shape[2]
    pairs = torch.zeros(bsz, h, nc, nc + 1, dtype=torch.bool, device=q.device)
    pairs.scatter_(-1, torch.where(kept < 0, nc, kept), True)
    chunk = torch.arange(n, device=q.device) // chunk_size
    keep = pairs[..., :nc][:, :, chunk][:, :, :, chunk]  # (batch, heads, n, n)
    pos = torch.arange(n, device=q.device)
    keep = keep & (pos[None, :] <= pos[:, None])
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :]
    return softmax_attention_reference(q, k, v, mask=keep, scale=scale)


def _chunk_rep(x: Tensor, real: list[bool], lo: int, hi: int) -> Tensor:
    """√|c| · mean of the real rows lo..hi − 1 of x (zeros when none is real)."""
    rows = [x[t] for t in range(lo, hi) if real[t]]
    return torch.stack(rows).sum(0) / math.sqrt(len(rows)) if rows else torch.zeros_like(x[0])


def _adaptive_keep_by_loops(q: Tensor, k: Tensor, chunk_size: int, top_chunks: int, threshold: float,
                            query_rep: str, attention_mask: Tensor | None) -> Tensor:
    """The adaptive token mask written out per element and head in float64 (the reference's own selection)."""
    bsz, h, n, _ = q.shape
    keep = torch.zeros(bsz, h, n, n, dtype=torch.bool, device=q.device)
    for z in range(bsz):
        real = [True] * n if attention_mask is None else [bool(r) for r in attention_mask[z]]
        for head in range(h):
            qs, ks = q[z, head].detach().double(), k[z, head].detach().double()  # the selection is not differentiated
            starts, prev, run = [0], None, 0  # prev: the last real token; run: real tokens in the chunk
            for t in range(n):
                if not real[t]:
                    continue
                if prev is not None:
                    cos = float(ks[t] @ ks[prev]) / max(float(ks[t].norm() * ks[prev].norm()), 1e-8)
                    if cos < threshold or run >= chunk_size:
                        starts.append(t)
                        run = 0
                prev, run = t, run + 1
            bounds = list(zip(starts, [*starts[1:], n]))

            for c, (lo, hi) in enumerate(bounds):
                if query_rep == "lookback":
                    qc = _chunk_rep(qs, real, *bounds[c - 1]) if c > 0 else torch.zeros_like(qs[0])
                else:
                    qc = _chunk_rep(qs, real, lo, hi)
                earlier = [(float(qc @ _chunk_rep(ks, real, *bounds[e])), e) for e in range(c) if any(real[bounds[e][0]:bounds[e][1]])]
                chosen = {c} | {e for _, e in sorted(earlier, key=lambda se: (-se[0], se[1]))[:top_chunks]}
                for i in range(lo, hi):
                    for e in chosen:
                        for j in range(bounds[e][0], min(bounds[e][1], i + 1)):
                            keep[z, head, i, j] = real[j]
    return keep


@register(
    name="dhsa",
    paper=DHSA,
    family="A",
    cost="O((N/b)² d + N (k+1) b d)",
    exponent=2.0,
    supports=Supports(causal=True, causal_only=True, key_padding=True, materialize=True),
    params=(
        Param("chunk_size", int, 64, "tokens per chunk b (fixed-size chunks stand in for the paper's trained boundary predictor)", low=1),
        Param("top_chunks", int, 4, "k: earlier key chunks kept per query chunk by chunk score, besides its own chunk", low=0),
        Param("query_rep", str, "lookback", "query-chunk representation: 'lookback' (chunk x − 1, strictly causal) "
              "or 'chunk' (the paper's chunk x itself)", choices=QUERY_REPS),
        Param("boundary_threshold", float, None, "adaptive chunks: a chunk ends where cos(k_t, k_{t−1}) < τ (or at "
              "chunk_size tokens); None: fixed chunks. O(N²) mask", low=-1.0, high=1.0, optional=True),
    ),
    summary="DHSA: length-normalised chunk means score key chunks; each query chunk keeps its top-k earlier chunks "
    "and itself for exact causal attention (top-k selection not differentiated).",
    test_params={"chunk_size": 2, "top_chunks": 1},
)
class DHSAAttention(Attention):
    """Multi-head causal DHSA with fixed-size chunks on the block-sparse engine.

    Declared exponent 2: the chunk scores are (N/b)² d; at b = 64 they cost far less than the
    attention's N (k+1) b d up to N = 32k. The top-k selection is not differentiated.
    """

    mask_form = "padding"  # the key padding keep-mask (batch, n_k) only
    mask_note = "it would need the N × N matrix the block-sparse layout avoids"
    same_length = True

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        causal: bool = True,
        chunk_size: int = 64,
        top_chunks: int = 4,
        query_rep: QueryRep = "lookback",
        boundary_threshold: float | None = None,
    ) -> None:
        if causal is not True:
            raise ParameterError(f"causal: DHSA is causal by construction; expected True, got {causal!r}")
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first, causal=True)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.top_chunks = check_int("top_chunks", top_chunks, 0)
        check_choice("query_rep", query_rep, QUERY_REPS)
        self.query_rep = query_rep
        _check_threshold(boundary_threshold)
        self.boundary_threshold = boundary_threshold

    def _kw(self, q: Tensor, k: Tensor, mask: Tensor | None) -> dict[str, object]:
        return {"chunk_size": self.chunk_size, "top_chunks": self.top_chunks, "query_rep": self.query_rep,
                "attention_mask": mask, "boundary_threshold": self.boundary_threshold}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return dhsa_attention(q, k, v, **self._kw(q, k, mask))  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return dhsa_attention_reference(q, k, v, **self._kw(q, k, mask))  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, top_chunks={self.top_chunks}, query_rep={self.query_rep!r}"
