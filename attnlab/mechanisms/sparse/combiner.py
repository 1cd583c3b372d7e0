"""Combiner (Ren et al., 2021): full attention at sparse cost, attention as a conditional expectation.

Softmax attention is out_i = E_{p(j|i)}[v_j]. Combiner splits the support of query i into a
direct part Ω_i^0 and regions Ω_i^r, and factorises p(j|i) = p(Ω_i^r|i) · q(j|Ω_i^r) inside
a region with a query-independent q:

    out_i = Σ_{j∈Ω_i^0} p(j|i) v_j + Σ_r p(Ω_i^r|i) · E_{q(j|Ω_i^r)}[v_j]

This is **Combiner-Fixed** (the paper's `sqrt_fixed` pattern): the sequence is cut into
blocks of B tokens (B = ⌈√N⌉ by default); Ω_i^0 is query i's own block (its keys j ≤ i when
causal); every other block (every earlier block when causal) is one region r, summarised by

    k̃_r = pool_{j∈r} k_j                         (max or mean over its real tokens)
    q(j|r) = softmax_{j∈r}(q̃_r · k_j · s),   q̃_r = pool_{j∈r} q_j,   ṽ_r = Σ_j q(j|r) v_j

with s = 1/√d, and one softmax over [direct keys ; regions] gives both p(j|i) and p(r|i):

    logit(i, j) = q_i · k_j · s (j ∈ Ω_i^0),     logit(i, r) = q_i · k̃_r · s + log|r|

The log|r| term (`log_size=True`) counts the |r| keys a region stands for
(Σ_{j∈r} exp(q_i·k_j·s) ≈ |r|·exp(q_i·k̃_r·s)); the official `sqrt_fixed_full` code omits it
(`log_size=False`). Every query gives every visible key a positive weight — full attention
support in one layer — at cost O(N (B + N/B) d) = O(N √N d).

`materialize` returns the exact implicit N × N matrix A_ij = p(j|i) on the direct part and
p(r|i) · q(j|r) on region r; out = A v, and rows sum to 1.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_choice, check_optional_int, check_qkv, check_scale
from ...kernels.sizes import fit_block

COMBINER = Paper("P147", "Combiner: Full Attention Transformer with Sparse Computation Cost", 2021, "2107.05768")
Pooling = Literal["max", "mean"]
POOLINGS = ("max", "mean")


def _check_args(q: Tensor, k: Tensor, v: Tensor, block_size: int | None, pooling: str,
                attention_mask: Tensor | None, scale: float | None) -> tuple[int, float]:
    """Checks shared by the fast path and the reference; the block size and the scale in use."""
    check_qkv(q, k, v, same_length=True)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    check_optional_int("block_size", block_size)
    check_choice("pooling", pooling, POOLINGS)
    scale = check_scale(scale, q.shape[-1])
    n = q.shape[2]
    b = block_size if block_size is not None else max(1, math.ceil(math.sqrt(n)))
    return fit_block(b, n), scale


def _real(attention_mask: Tensor | None, batch: int, n: int, padded: int, device: torch.device) -> Tensor:
    """(batch, padded) bool: real tokens (not key padding, not past n)."""
    if attention_mask is None:
        return (torch.arange(padded, device=device) < n)[None].expand(batch, padded)
    return F.pad(attention_mask, (0, padded - n), value=False)


def _pool(x: Tensor, ok: Tensor, count: Tensor, pooling: str) -> Tensor:
    """Pool x (batch, heads, nb, B, d) over its real tokens ok (batch, 1, nb, B); 0 for an empty block."""
    if pooling == "max":
        pooled = x.masked_fill(~ok[..., None], float("-inf")).amax(-2)
        return torch.where((count > 0)[..., None], pooled, torch.zeros_like(pooled))
    return (x * ok[..., None]).sum(-2) / count.clamp(min=1)[..., None]


def combiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int | None = None,
    causal: bool = False,
    pooling: Pooling = "max",
    log_size: bool = True,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Combiner-Fixed over (batch, heads, n, head_dim) self-attention inputs, O(N (B + N/B) d)."""
    b, s = _check_args(q, k, v, block_size, pooling, attention_mask, scale)
    bsz, h, n, d = q.shape
    if n == 0:
        return q.new_zeros(bsz, h, 0, v.shape[-1])
    nb = math.ceil(n / b)
    padded = nb * b

    def blocks(x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, 0, padded - n)).view(bsz, h, nb, b, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    ok = _real(attention_mask, bsz, n, padded, q.device).view(bsz, 1, nb, b)
    count = ok.sum(-1).to(q.dtype)  # (batch, 1, nb)
    probe, rkey = _pool(qb, ok, count, pooling), _pool(kb, ok, count, pooling)  # (batch, heads, nb, d)
    # q(j|r) and the region values ṽ_r
    inner = torch.einsum("bhrd,bhrjd->bhrj", probe, kb) * s
    rval = torch.einsum("bhrj,bhrjd->bhrd", masked_softmax(inner, ok), vb)
    # one softmax over [own block's keys ; regions]
    local = torch.einsum("bhxid,bhxjd->bhxij", qb, kb) * s
    local_keep = ok[..., None, :]  # (batch, 1, nb, 1, B)
    if causal:
        local_keep = local_keep & torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
    region = torch.einsum("bhxid,bhrd->bhxir", qb, rkey) * s
    if log_size:
        region = region + count.clamp(min=1).log()[:, :, None, None, :]
    x_idx = torch.arange(nb, device=q.device)
    other = x_idx[None, :] < x_idx[:, None] if causal else x_idx[None, :] != x_idx[:, None]  # (x, r)
    region_keep = other[None, None, :, None, :] & (count > 0)[:, :, None, None, :]
    p = masked_softmax(torch.cat([local, region], -1), torch.cat([local_keep.expand_as(local), region_keep.expand_as(region)], -1))
    out = p[..., :b] @ vb + torch.einsum("bhxir,bhrd->bhxid", p[..., b:], rval)
    return out.reshape(bsz, h, padded, -1)[:, :, :n]


def combiner_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int | None = None,
    causal: bool = False,
    pooling: Pooling = "max",
    log_size: bool = True,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `combiner_attention`: the implicit N × N matrix in float64, built as one
    softmax over token logits — q_i·k_j·s on the direct part, logit(i, r(j)) + log q(j|r(j)) on
    region keys — whose rows give p(j|i) and p(r|i)·q(j|r), since Σ_{j∈r} q(j|r) = 1."""
    b, s = _check_args(q, k, v, block_size, pooling, attention_mask, scale)
    bsz, h, n, d = q.shape
    q64, k64 = q.double(), k.double()
    real = _real(attention_mask, bsz, n, n, q.device)  # (batch, n)
    blk = torch.arange(n, device=q.device) // b
    nb = math.ceil(n / b) if n else 0
    member = blk[None, :] == torch.arange(nb, device=q.device)[:, None]  # (nb, n)
    inside = member[None] & real[:, None, :]  # (batch, nb, n): real tokens of each region
    count = inside.sum(-1).to(torch.float64)  # (batch, nb)
    region_keys, probes = [], []
    for r in range(nb):
        sel = inside[:, r][:, None, :, None]  # (batch, 1, n, 1)
        if pooling == "max":
            rk = k64.masked_fill(~sel, float("-inf")).amax(2)
            rq = q64.masked_fill(~sel, float("-inf")).amax(2)
            empty = count[:, r] == 0
            rk, rq = (t.masked_fill(empty[:, None, None], 0.0) for t in (rk, rq))
        else:
            rk = (k64 * sel).sum(2) / count[:, r].clamp(min=1)[:, None, None]
            rq = (q64 * sel).sum(2) / count[:, r].clamp(min=1)[:, None, None]
        region_keys.append(rk)
        probes.append(rq)
    rkey, probe = torch.stack(region_keys, 2), torch.stack(probes, 2)  # (batch, heads, nb, d)
    # log q(j|r(j)): softmax of probe_r · k_j over the real keys of r
    inner = torch.einsum("bhrd,bhjd->bhrj", probe, k64) * s  # (batch, heads, nb, n)
    inner = inner.masked_fill(~inside[:, None], float("-inf")).masked_fill((count == 0)[:, None, :, None], 0.0)
    log_q = torch.log_softmax(inner, -1)  # an empty region's row is finite and never used
    log_q_own = log_q.gather(2, blk[None, None, None, :].expand(bsz, h, 1, n))[:, :, 0]  # (batch, heads, n)
    region_logit = torch.einsum("bhid,bhrd->bhir", q64, rkey) * s
    if log_size:
        region_logit = region_logit + count.clamp(min=1).log()[:, None, None, :]
    i, j = blk[:, None], blk[None, :]
    pos = torch.arange(n, device=q.device)
    direct = (i == j) & (pos[None, :] <= pos[:, None]) if causal else i == j
    in_region = (j < i) if causal else (j != i)
    logits = torch.where(
        direct,
        torch.einsum("bhid,bhjd->bhij", q64, k64) * s,
        region_logit.gather(3, blk[None, None, None, :].expand(bsz, h, n, n)) + log_q_own[:, :, None, :],
    )
    keep = (direct | in_region)[None, None] & real[:, None, None, :]
    weights = masked_softmax(logits, keep)
    out = weights @ v.double()
    return out.to(q.dtype), weights.to(q.dtype)


@register(
    name="combiner",
    paper=COMBINER,
    family="A",
    cost="O(N √N d)",
    exponent=1.5,
    supports=Supports(causal=True, key_padding=True, materialize=True),
    params=(
        Param("block_size", int, None, "tokens per block B (default ⌈√n⌉): own block direct, other blocks summarised", low=1, optional=True),
        Param("pooling", str, "max", "pooling of a region's keys (its key k̃_r) and queries (its probe q̃_r)", choices=POOLINGS),
        Param("log_size", bool, True, "add log|r| to each region's logit"),
    ),
    summary="Combiner-Fixed: own block attended directly, every other block as one pooled region under the same softmax.",
    test_params={"block_size": 3},
)
class CombinerAttention(Attention):
    """Multi-head Combiner-Fixed attention (direct own block + region summaries, one softmax).

    Cost O(N (B + N/B) d): O(N √N d) at the default B = ⌈√N⌉. block_size ≥ n leaves one
    block: plain softmax attention. Causal: own block up to i, earlier blocks as regions.
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
        causal: bool = False,
        block_size: int | None = None,
        pooling: Pooling = "max",
        log_size: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first, causal=causal)
        check_optional_int("block_size", block_size)
        check_choice("pooling", pooling, POOLINGS)
        self.block_size, self.pooling, self.log_size = block_size, pooling, bool(log_size)

    def _kw(self, q: Tensor, k: Tensor, mask: Tensor | None) -> dict[str, object]:
        return {"block_size": self.block_size, "causal": self.causal, "pooling": self.pooling,
                "log_size": self.log_size, "attention_mask": mask}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return combiner_attention(q, k, v, **self._kw(q, k, mask))  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return combiner_attention_reference(q, k, v, **self._kw(q, k, mask))  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, pooling={self.pooling!r}, log_size={self.log_size}, causal={self.causal}"

