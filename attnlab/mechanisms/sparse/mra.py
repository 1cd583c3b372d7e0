"""MRA attention (Zeng et al., 2022): multi-resolution approximation of softmax attention.

With blocks of b tokens, block means q̂_x, k̂_y, v̂_y (over the block's real tokens, c_y of
them) give coarse logits L_xy = q̂_x · k̂_y · s (s = 1/√d). Each query block x keeps the m
key blocks of largest L_xy, T(x), at full resolution and approximates exp(q_i · k_j · s)
by the block-constant exp(L_xy) on every other block — one normalisation over both:

    Â_ij = exp(q_i · k_j · s)    if ⌊j/b⌋ ∈ T(⌊i/b⌋)        (high resolution)
           exp(L_{⌊i/b⌋ ⌊j/b⌋})  otherwise                   (low resolution)
    out_i = Σ_j Â_ij v_j / Σ_j Â_ij

the MRA-2 "full" scheme of the paper's code (low-resolution terms enter as c_y·exp(L_xy)·v̂_y).
With m ≥ n/b every block is refined and MRA is exact softmax attention.

Selection of T. `selection="block"` (default): the m key blocks of largest L_xy in each query
block's row. `selection="global"`: the paper's code's budget — one top-(m·n_b) over all
(query block, key block) pairs of the row-max-normalised coarse logits L_xy − max_y' L_xy', so
a query block whose attention is spread over many key blocks gets more refined blocks and a
peaked one fewer (some none); the total is the same. On block-structured inputs the global
budget approximates better (the test builds such a case). Deviations from the official code:
no forced diagonal/first-block priors; key padding removes padded tokens from the block
means and counts.

Fast path: the refined blocks run on the block-sparse engine. The low-resolution mass of
query block x becomes one extra "sink" key per block x: with q'_i = [q_i·s, 1],
k'_j = [k_j, 0], the sink key [0, λ_x] scores λ_x = log Σ_{y∉T(x)} c_y exp(L_xy) and
carries the value Σ_y softmax_y(L_xy + log c_y) v̂_y; it opens an extra key block (the other
b − 1 slots score −1e30) in the layout of query block x only, so the engine's one softmax is
exactly MRA's normalisation. Cost O((N/b)² d + N (m+1) b d):
the coarse logits are quadratic with a 1/b² constant, the refinement linear.

Autograd: the top-m selection is not differentiated (made under no_grad from the coarse
logits); gradients flow through the exact scores of the selected blocks and through the
coarse logits and block means of the low-resolution part.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ParameterError
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_choice, check_int, check_qkv
from ...kernels.block_sparse import BlockLayout, block_sparse_attention
from ...kernels.sizes import fit_block

MRA = Paper("P066", "Multi Resolution Analysis (MRA) for Approximate Self-Attention", 2022, "2207.10284")


def _check_args(q: Tensor, k: Tensor, v: Tensor, block_size: int, blocks: int,
                attention_mask: Tensor | None, scale: float | None) -> float:
    check_qkv(q, k, v, same_length=True)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    check_int("block_size", block_size, 1)
    check_int("blocks", blocks, 1)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ParameterError(f"scale: expected a finite float or None, got {scale!r}")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _real(attention_mask: Tensor | None, batch: int, n: int, padded: int, device: torch.device) -> Tensor:
    """(batch, padded) bool: real tokens (not padding, not past n)."""
    if attention_mask is None:
        return (torch.arange(padded, device=device) < n)[None].expand(batch, padded)
    return F.pad(attention_mask, (0, padded - n), value=False)


def mra_coarse(
    q: Tensor, k: Tensor, v: Tensor, *, block_size: int, attention_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Coarse logits L (batch, heads, nb, nb) (−inf on key blocks without real tokens), real-token
    counts c (batch, 1, nb) and block means v̂ (batch, heads, nb, dv)."""
    bsz, h, n, _ = q.shape
    nb = math.ceil(n / block_size)
    padded = nb * block_size
    ok = _real(attention_mask, bsz, n, padded, q.device).view(bsz, 1, nb, block_size, 1).to(q.dtype)
    count = ok.sum(-2)  # (batch, 1, nb, 1)

    def means(x: Tensor) -> Tensor:
        xb = F.pad(x, (0, 0, 0, padded - n)).view(bsz, h, nb, block_size, x.shape[-1])
        return (xb * ok).sum(-2) / count.clamp(min=1)

    logits = means(q) @ means(k).transpose(-1, -2) * scale
    logits = logits.masked_fill((count == 0).view(bsz, 1, 1, nb), float("-inf"))
    return logits, count.view(bsz, 1, nb), means(v)


SELECTIONS = ("block", "global")


def mra_select(logits: Tensor, blocks: int, selection: str = "block") -> Tensor:
    """The refined key blocks of each query block as candidates (batch, heads, nb, C) int64, −1 = none:
    "block", the top-`blocks` of each row (C = min(blocks, nb)); "global", the top-(blocks·nb) of all
    pairs by L_xy − max_y' L_xy' (C = nb). Not differentiated; ties go to the lower index (a stable sort)."""
    with torch.no_grad():
        logits = logits.detach()
        nb = logits.shape[-1]
        if selection == "block":
            return logits.argsort(dim=-1, descending=True, stable=True)[..., :blocks]
        normed = (logits - logits.amax(-1, keepdim=True)).nan_to_num(nan=float("-inf"))  # empty rows: −inf
        flat = normed.flatten(-2)
        picked = flat.argsort(dim=-1, descending=True, stable=True)[..., : blocks * nb]
        chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, picked, True).view(logits.shape)
        return torch.where(chosen, torch.arange(nb, device=logits.device), -1)


def mra_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 32,
    blocks: int = 4,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    selection: str = "block",
) -> Tensor:
    """MRA-2 attention over (batch, heads, n, head_dim) self-attention inputs: the top-`blocks` key
    blocks of each query block (selection="block") or the top-(blocks·n_b) pairs overall
    (selection="global") exact, the others at block resolution, one normalisation."""
    s = _check_args(q, k, v, block_size, blocks, attention_mask, scale)
    check_choice("selection", selection, SELECTIONS)
    bsz, h, n, d = q.shape
    dv = v.shape[-1]
    if n == 0:
        return q.new_zeros(bsz, h, 0, dv)
    b = fit_block(block_size, n)
    nb = math.ceil(n / b)
    padded = nb * b
    logits, count, v_hat = mra_coarse(q, k, v, block_size=b, attention_mask=attention_mask, scale=s)
    top = mra_select(logits, blocks, selection)  # (batch, heads, nb, C), −1 = none
    refined = torch.zeros(bsz, h, nb, nb + 1, dtype=torch.bool, device=q.device)
    refined = refined.scatter_(-1, torch.where(top < 0, nb, top), True)[..., :nb]
    low = (~refined) & (count > 0)[:, :, None, :]  # (batch, heads, nb, nb)
    has_low = low.any(-1)  # (batch, heads, nb)
    low_logits = logits + count.clamp(min=1).log()[:, :, None, :]
    safe = low_logits.masked_fill(~low, float("-inf")).masked_fill(~has_low[..., None], 0.0)
    lam = torch.where(has_low, safe.logsumexp(-1), torch.zeros_like(has_low, dtype=q.dtype))  # (batch, heads, nb)
    v_low = masked_softmax(safe, low) @ v_hat  # (batch, heads, nb, dv)
    # augmented keys: tokens [k, 0], then block x of sinks: [0, λ_x] and b − 1 fillers [0, −1e30];
    # queries [q·s, 1]. Sink block x sits in the layout of query block x only.
    filler = max(torch.finfo(q.dtype).min, -1e30)
    q_aug = torch.cat([q * s, q.new_ones(bsz, h, n, 1)], -1)
    k_tok = torch.cat([F.pad(k, (0, 0, 0, padded - n)), k.new_zeros(bsz, h, padded, 1)], -1)
    sink_col = torch.cat([lam[..., None], lam.new_full((bsz, h, nb, b - 1), filler)], -1)
    k_sink = torch.cat([k.new_zeros(bsz, h, nb, b, d), sink_col[..., None]], -1).view(bsz, h, padded, d + 1)
    v_sink = torch.cat([v_low[..., None, :], v.new_zeros(bsz, h, nb, b - 1, dv)], -2).view(bsz, h, padded, dv)
    k_aug, v_aug = torch.cat([k_tok, k_sink], 2), torch.cat([F.pad(v, (0, 0, 0, padded - n)), v_sink], 2)
    key_ok = None
    if attention_mask is not None or padded > n:
        key_ok = torch.cat([_real(attention_mask, bsz, n, padded, q.device), q.new_ones(bsz, padded, dtype=torch.bool)], 1)
    sink_block = nb + torch.arange(nb, device=q.device)
    candidates = torch.cat([top, torch.where(has_low, sink_block, -1)[..., None]], -1)
    outs = []
    for z in range(bsz):  # the layout is content-based: one per batch element, per head
        layout = BlockLayout.from_candidates(candidates[z], b, 2 * nb)
        kpm = None if key_ok is None else key_ok[z : z + 1]
        outs.append(block_sparse_attention(q_aug[z : z + 1], k_aug[z : z + 1], v_aug[z : z + 1], layout,
                                           attention_mask=kpm, scale=1.0))
    return torch.cat(outs, 0)


def mra_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 32,
    blocks: int = 4,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    selection: str = "block",
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `mra_attention`: the normalised Â as a dense N × N matrix in float64 — one
    softmax over q_i·k_j·s on refined blocks and the coarse logit L_xy elsewhere; the refined blocks
    chosen by sorting the coarse logits (per row, or all pairs after subtracting each row's max)."""
    s = _check_args(q, k, v, block_size, blocks, attention_mask, scale)
    check_choice("selection", selection, SELECTIONS)
    bsz, h, n, _ = q.shape
    q64, k64, v64 = q.double(), k.double(), v.double()
    real = _real(attention_mask, bsz, n, n, q.device)  # (batch, n)
    blk = torch.arange(n, device=q.device) // block_size
    nb = math.ceil(n / block_size) if n else 0
    member = (blk[None, :] == torch.arange(nb, device=q.device)[:, None])[None] & real[:, None, :]  # (batch, nb, n)
    weights_in_block = member.double() / member.sum(-1, keepdim=True).clamp(min=1)
    q_hat = torch.einsum("bxn,bhnd->bhxd", weights_in_block, q64)
    k_hat = torch.einsum("bxn,bhnd->bhxd", weights_in_block, k64)
    block_logits = (q_hat @ k_hat.transpose(-1, -2) * s).masked_fill(~member.any(-1)[:, None, None, :], float("-inf"))
    refined = torch.zeros(bsz, h, nb, nb, dtype=torch.bool, device=q.device)
    if selection == "block":
        order = block_logits.argsort(dim=-1, descending=True, stable=True)[..., :blocks]
        refined.scatter_(-1, order, True)
    else:
        rowmax = block_logits.amax(-1, keepdim=True)
        normed = torch.where(rowmax > float("-inf"), block_logits - rowmax, float("-inf")).flatten(-2)
        order = normed.argsort(dim=-1, descending=True, stable=True)[..., : blocks * nb]
        refined = refined.flatten(-2).scatter_(-1, order, True).view(bsz, h, nb, nb)
    coarse = block_logits[:, :, blk][:, :, :, blk]  # (batch, heads, n, n)
    refined = refined[:, :, blk][:, :, :, blk]
    logits = torch.where(refined, torch.einsum("bhid,bhjd->bhij", q64, k64) * s, coarse)
    weights = masked_softmax(logits, real[:, None, None, :])
    return (weights @ v64).to(q.dtype), weights.to(q.dtype)


@register(
    name="mra",
    paper=MRA,
    family="A",
    cost="O((N/b)² d + N m b d)",
    exponent=2.0,
    supports=Supports(key_padding=True, materialize=True),
    params=(
        Param("block_size", int, 32, "tokens per block b of the coarse resolution", low=1),
        Param("blocks", int, 4, "m: key blocks refined to full resolution per query block (top-m coarse logits)", low=1),
        Param("selection", str, "block", "'block': top-m per query block; 'global': the paper code's top-(m·n_b) "
              "over all pairs of row-max-normalised coarse logits", choices=SELECTIONS),
    ),
    summary="MRA-2: coarse block-mean logits everywhere, exact scores in each query block's top-m key blocks "
    "(top-m selection not differentiated), one normalisation.",
    test_params={"block_size": 2, "blocks": 2},
)
class MRAAttention(Attention):
    """Multi-head MRA-2 attention (bidirectional), refined blocks on the block-sparse engine.

    Declared exponent 2: the coarse logits are (N/b)² d; at b = 32 and N ≤ 32k they cost less
    than the refinement's N (m+1) b d. The top-m selection is not differentiated.
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
        block_size: int = 32,
        blocks: int = 4,
        selection: str = "block",
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        self.block_size = check_int("block_size", block_size, 1)
        self.blocks = check_int("blocks", blocks, 1)
        self.selection = check_choice("selection", selection, SELECTIONS)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        kpm = mask
        return mra_attention(q, k, v, block_size=self.block_size, blocks=self.blocks, attention_mask=kpm,
                             selection=self.selection)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        kpm = mask
        return mra_attention_reference(q, k, v, block_size=self.block_size, blocks=self.blocks, attention_mask=kpm,
                                       selection=self.selection)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, blocks={self.blocks}, selection={self.selection!r}"
