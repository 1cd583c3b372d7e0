"""Hierarchical attention with attention-guided selection of high-resolution tokens, FlexAttention (Li et al., 2024).

An image is given twice: as low-resolution tokens L and as high-resolution tokens H (each low-res
token covers a region of `region_size` high-res tokens, r² for an r-times finer grid), next to the
text tokens T. Per head, with the guidance map G (batch, heads, T, L) of text queries over low-res keys:

    s_l      = Σ_h Σ_{t∈T} G_htl                     how much the text looks at low-res token l
    L_top    = the ⌈ρ·|L|⌉ low-res tokens of largest s_l           (ρ = `select_ratio`)
    H_sel    = the high-res tokens whose region lies under a token of L_top
    out_i    = Σ_{j ∈ L ∪ T ∪ H_sel} softmax_j(q_iᵀk_j/√d_h) v_j    for the queries i ∈ L ∪ T
    out_i    = 0                                      for i ∈ H: the high-res tokens are keys only, not updated

The paper takes G from the previous layer's attention (the hierarchical attention's own map of
text → low-res, which selects the high-res tokens of the next layer); pass it as `guide`, the
per-token scores s (batch, n) that `guidance(weights, groups)` makes of a previous layer's
`materialize`. Without a guide the layer guides itself: G is this layer's text queries' softmax
over the keys L ∪ T (no high-res key), the map the previous layer would have given at the first
selecting layer. Cost: (|L| + |T|)·(|L| + |T| + |H_sel|) pairs instead of (|L| + |T| + |H|)², the
paper's O((M + N)·N·D) against O((M + N)²·D) and its ~40% fewer FLOPs.

Token groups. The tokens come in one sequence. By default the real tokens (padding removed) are,
in order, `low_res_tokens` low-res tokens, `text_tokens` text tokens and the high-res tokens; left
unset, a quarter of the real tokens (rounded up) are low-res and a quarter (rounded down) text, so
any length fits with region_size ≥ 2 (the speed harness's grouping). On plain token input (the
conformance suite's: 2 low-res, 3 text, 4 high-res of 9) that is the grouping, and padding anywhere
is removal. A batch
whose groups differ per sample (ragged text) passes `groups` (batch, n) to forward: 0 = low-res,
1 = text, 2 = high-res per token. Either way the m-th real high-res token of a sample lies under its
(m // region_size)-th real low-res token (give the high-res tokens region by region: the r × r
children of low-res token 0, then those of token 1, …); a real high-res token beyond the last
region is refused (ShapeError naming region_size).

Choices and deviations:

* Selection by top-k as the paper describes it. The official code (UMass-Foundation-Model/FlexAttention)
  selects otherwise: text → low-res attention summed over heads, min–max normalised per text query,
  thresholded at 64/255, max-pooled to a 9 × 9 grid and upsampled to the high-res grid, from layer 8
  on; that needs the 2-D grids and is not offered. Ties in s_l go to the earlier low-res token.
* The code gives the high-res keys their own projections and RoPE; here they share the layer's
  k and v projections (a position scheme is a separate entry).
* No causal mode: the LLM's causal mask over [L; T] with high-res keys visible to every query leaks
  later tokens by construction, so it is not offered. No cross-attention, no attn_mask.
* The outputs of the high-res tokens are 0 also after `out_proj` (its bias is not added there), so
  a residual block passes them unchanged; `materialize` has zero rows there and zero columns at the
  high-res tokens not selected.

Fast path: the query tokens (L ∪ T) and the key tokens (L ∪ T ∪ H_sel) of each sample gathered into
dense blocks and attended with SDPA, the results scattered back; the guidance from the text rows
only. The float64 reference computes the scores, the selection (by sorting, per sample) and the
weights from the formula.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ShapeError
from ...core.module import Attention, Impl
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_int, check_qkv, check_scale, check_tensor

FLEX = Paper("P216", "FlexAttention for Efficient High-Resolution Vision-Language Models", 2024, "2407.20228")
LOW, TEXT, HIGH = 0, 1, 2


def hierarchical_selection_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs at the default grouping of a length-n input (a quarter of the tokens low-res, text
    as many, half high-res) and the default select_ratio 0.25: 4·Q·K·d_h per head, Q = |L| + |T|, K = Q + |H_sel|."""
    queries = n / 2
    keys = queries + n / 8
    return heads * 4.0 * queries * keys * head_dim


def default_groups(real: Tensor, low_res_tokens: int | None = None, text_tokens: int | None = None) -> Tensor:
    """The groups of the real tokens (batch, n) bool in order: low_res_tokens low-res (0), text_tokens text (1), the
    rest high-res (2); padded tokens get -1. None: ⌈n_real/4⌉ low-res, ⌊n_real/4⌋ text tokens per sample."""
    count = real.long().sum(1, keepdim=True)
    low = torch.div(count + 3, 4, rounding_mode="floor") if low_res_tokens is None else torch.full_like(count, low_res_tokens)
    text = torch.div(count, 4, rounding_mode="floor") if text_tokens is None else torch.full_like(count, text_tokens)
    rank = real.long().cumsum(1) - 1
    groups = torch.full_like(rank, HIGH)
    groups = torch.where(rank < low + text, torch.full_like(rank, TEXT), groups)
    groups = torch.where(rank < low, torch.full_like(rank, LOW), groups)
    return groups.masked_fill(~real, -1)


def _check_groups(groups: Tensor, batch: int, n: int) -> Tensor:
    check_tensor("groups", groups)
    if tuple(groups.shape) != (batch, n) or groups.is_floating_point() or groups.dtype == torch.bool:
        raise ShapeError(f"groups: expected a (batch, n) = {(batch, n)} integer tensor, got shape {tuple(groups.shape)} "
                         f"and {groups.dtype}")
    if bool(((groups < LOW) | (groups > HIGH)).any()):
        raise ValueError(f"groups: expected 0 (low-res), 1 (text) or 2 (high-res) per token, got values "
                         f"{sorted(set(groups.unique().tolist()))}")
    return groups.long()


def _check_guide(guide: Tensor | None, batch: int, n: int) -> None:
    if guide is None:
        return
    check_tensor("guide", guide)
    if tuple(guide.shape) != (batch, n) or not guide.is_floating_point():
        raise ShapeError(f"guide: expected (batch, n) = {(batch, n)} float scores, got shape {tuple(guide.shape)} and "
                         f"{guide.dtype}")
    if bool((guide < 0).any()) or not bool(torch.isfinite(guide).all()):
        raise ValueError("guide: expected finite scores >= 0 (attention mass on the low-res tokens), got "
                         f"{int(((guide < 0) | ~torch.isfinite(guide)).sum())} negative or non-finite entries")


def _gather(flags: Tensor) -> tuple[Tensor, Tensor]:
    """The positions of the True entries of flags (batch, n), in order, padded: (index (batch, m), valid (batch, m))."""
    count = flags.sum(1)
    width = int(count.max()) if flags.numel() else 0
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.arange(width, device=flags.device) < count[:, None]


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """t (batch, heads, n, d) at the positions index (batch, m): (batch, heads, m, d)."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))


def _self_guidance(q: Tensor, k: Tensor, groups: Tensor, scale: float) -> Tensor:
    """s (batch, n): the text queries' softmax over the keys L ∪ T summed over heads and text queries, at the low-res
    tokens (0 elsewhere)."""
    text, text_ok = _gather(groups == TEXT)
    keys, keys_ok = _gather((groups == LOW) | (groups == TEXT))
    logits = (_rows(q, text) @ _rows(k, keys).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~keys_ok[:, None, None, :], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1) * (text_ok[:, None, :, None] & keys_ok[:, None, None, :])
    per_key = probs.sum((1, 2))  # (batch, m_keys)
    scores = torch.zeros(groups.shape, dtype=q.dtype, device=q.device).scatter_add(1, keys, per_key)
    return scores * (groups == LOW)


def _select(scores: Tensor, groups: Tensor, region_size: int, select_ratio: float) -> Tensor:
    """The selected high-res tokens (batch, n) bool: those under the ⌈ρ·|L|⌉ low-res tokens of largest score."""
    low, high = groups == LOW, groups == HIGH
    n_low = low.sum(1)
    low_rank = low.long().cumsum(1) - 1
    region = torch.div(high.long().cumsum(1) - 1, region_size, rounding_mode="floor")
    if bool((high & (region >= n_low[:, None])).any()):
        worst = int(torch.where(high, region, torch.zeros_like(region)).max())
        raise ShapeError(f"region_size: the high-res tokens need {worst + 1} regions of region_size={region_size}, but "
                         f"a sample has {int(n_low.min())} low-res tokens (n = {groups.shape[1]} tokens)")
    take = torch.ceil(select_ratio * n_low.double()).long()
    order = torch.argsort(torch.where(low, -scores.double(), math.inf), dim=1, stable=True)
    place = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    chosen_low = low & (place < take[:, None])
    n = groups.shape[1]
    slot = torch.where(low, low_rank, n)  # the low-res tokens by rank; every other token to a spare column n
    by_rank = torch.zeros(groups.shape[0], n + 1, dtype=torch.bool, device=groups.device).scatter(1, slot, chosen_low)
    return high & by_rank.gather(1, region.clamp(0, n - 1))


def hierarchical_selection_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    low_res_tokens: int | None = None,
    text_tokens: int | None = None,
    region_size: int = 4,
    select_ratio: float = 0.25,
    groups: Tensor | None = None,
    guide: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """FlexAttention's hierarchical attention over (batch, heads, n, head_dim): the low-res and text queries attend to
    [low-res; text; selected high-res] keys, high-res outputs 0. `groups` (batch, n) 0/1/2 per token (default: the
    real tokens in order, module docstring), `guide` (batch, n) scores of the low-res tokens (default: this layer's
    text → low-res attention), `attention_mask` (batch, n), True = real token."""
    check_qkv(q, k, v, same_length=True)
    scale = check_scale(scale, q.shape[-1])
    batch, heads, n = q.shape[0], q.shape[1], q.shape[2]
    check_attention_mask(attention_mask, batch, n)
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask
    groups = default_groups(real, low_res_tokens, text_tokens) if groups is None else _check_groups(groups, batch, n)
    groups = groups.masked_fill(~real, -1)
    _check_guide(guide, batch, n)
    scores = _self_guidance(q.detach(), k.detach(), groups, scale) if guide is None else guide.detach()
    chosen = _select(scores, groups, region_size, select_ratio)
    queries, queries_ok = _gather((groups == LOW) | (groups == TEXT))
    keys, keys_ok = _gather((groups == LOW) | (groups == TEXT) | chosen)
    out = torch.zeros_like(v)
    if queries.shape[1] == 0:
        return out
    allowed = keys_ok[:, None, None, :] | ~queries_ok[:, None, :, None]  # an empty query slot sees all, then dropped
    result = F.scaled_dot_product_attention(_rows(q, queries), _rows(k, keys), _rows(v, keys), attn_mask=allowed,
                                            scale=scale)
    result = result * queries_ok[:, None, :, None]
    return out.scatter(2, queries[:, None, :, None].expand(-1, heads, -1, v.shape[-1]), result)


def hierarchical_selection_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    low_res_tokens: int | None = None,
    text_tokens: int | None = None,
    region_size: int = 4,
    select_ratio: float = 0.25,
    groups: Tensor | None = None,
    guide: Tensor | None = None,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, n, n)) of `hierarchical_selection_attention` in float64 from the formula: the
    scores, the top-k and the regions per sample by sorting, then a masked softmax."""
    check_qkv(q, k, v, same_length=True)
    scale = check_scale(scale, q.shape[-1])
    batch, heads, n = q.shape[0], q.shape[1], q.shape[2]
    check_attention_mask(attention_mask, batch, n)
    _check_guide(guide, batch, n)
    real = [[True] * n for _ in range(batch)] if attention_mask is None else attention_mask.tolist()
    given = None if groups is None else _check_groups(groups, batch, n).tolist()
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    plain = logits.detach()  # the selection is discrete: no gradient through the scores
    allowed = torch.zeros(batch, 1, n, n, dtype=torch.bool, device=q.device)
    for b in range(batch):
        kept = [i for i in range(n) if real[b][i]]
        if given is None:
            n_low = (len(kept) + 3) // 4 if low_res_tokens is None else low_res_tokens
            n_text = len(kept) // 4 if text_tokens is None else text_tokens
            cut = (n_low, n_low + n_text)
            group = {i: LOW if r < cut[0] else TEXT if r < cut[1] else HIGH for r, i in enumerate(kept)}
        else:
            group = {i: given[b][i] for i in kept}
        low = [i for i in kept if group[i] == LOW]
        text = [i for i in kept if group[i] == TEXT]
        high = [i for i in kept if group[i] == HIGH]
        if guide is None:  # this layer's text queries over the keys L ∪ T, summed over heads and text queries
            seen = low + text
            probs = torch.softmax(plain[b][:, text][:, :, seen], dim=-1) if text else plain.new_zeros(heads, 0, len(seen))
            score = {i: float(probs[:, :, seen.index(i)].sum()) for i in low}
        else:
            score = {i: float(guide[b, i]) for i in low}
        top = sorted(low, key=lambda i: (-score[i], i))[: math.ceil(select_ratio * len(low))]
        if high and (len(high) - 1) // region_size >= len(low):
            raise ShapeError(f"region_size: the high-res tokens need {(len(high) - 1) // region_size + 1} regions of "
                             f"region_size={region_size}, but a sample has {len(low)} low-res tokens (n = {n} tokens)")
        selected = [h for m, h in enumerate(high) if low[m // region_size] in top]
        for i in low + text:
            for j in low + text + selected:
                allowed[b, 0, i, j] = True
    weights = masked_softmax(logits, allowed.expand(batch, heads, n, n))
    out = torch.einsum("bhij,bhjd->bhid", weights, v.double())
    return out.to(q.dtype), weights.to(q.dtype)


def guidance(weights: Tensor, groups: Tensor) -> Tensor:
    """The guide of the next layer from a layer's weights (batch, heads, n, n) (`materialize`) and the groups (batch,
    n) (`default_groups` or the forward's): s_l = Σ_h Σ_{t text} A_htl at the low-res tokens, 0 elsewhere."""
    check_tensor("weights", weights)
    if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ShapeError(f"weights: expected (batch, heads, n, n), got shape {tuple(weights.shape)}")
    groups = groups.long()
    text = (groups == TEXT).to(weights.dtype)
    scores = torch.einsum("bhtl,bt->bl", weights, text)
    return scores * (groups == LOW).to(weights.dtype)


@register(
    name="hierarchical-selection",
    paper=FLEX,
    family="A",
    cost="O((|L|+|T|)(|L|+|T|+|H_sel|) d)",
    exponent=2.0,
    supports=Supports(key_padding=True),
    normalized=False,
    summary="FlexAttention: low-res and text queries attend to [low-res; text; high-res tokens under the most-attended "
            "low-res tokens].",
    params=(
        Param("low_res_tokens", int, None, "low-resolution tokens, first among the real tokens (default: a quarter "
              "of them, rounded up)", low=1, optional=True),
        Param("text_tokens", int, None, "text tokens, after the low-res ones (default: a quarter of the real tokens, "
              "rounded down)", low=0, optional=True),
        Param("region_size", int, 4, "high-res tokens under one low-res token (r² for an r-times finer grid)", low=1),
        Param("select_ratio", float, 0.25, "fraction of the low-res tokens whose high-res tokens are selected",
              low=0.0, high=1.0),
    ),
    test_params={"low_res_tokens": 2, "text_tokens": 3, "region_size": 2, "select_ratio": 0.5},
    flops=hierarchical_selection_flops,
    functional=("hierarchical_selection_attention", "hierarchical_selection_attention_reference"),
)
class HierarchicalSelectionAttention(Attention):
    """FlexAttention's hierarchical attention: low-res and text queries over [low-res; text; selected high-res].

    forward(x, groups=, guide=): per-token groups and the previous layer's guide (`guidance`); without
    them, the default grouping and this layer's own text → low-res attention (module docstring).
    """

    mask_form = "padding"
    same_length = True
    takes_side_input = True

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        low_res_tokens: int | None = None,
        text_tokens: int | None = None,
        region_size: int = 4,
        select_ratio: float = 0.25,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        self.low_res_tokens = None if low_res_tokens is None else check_int("low_res_tokens", low_res_tokens)
        self.text_tokens = None if text_tokens is None else check_int("text_tokens", text_tokens, 0)
        self.region_size = check_int("region_size", region_size)
        if not 0.0 <= select_ratio <= 1.0:
            raise ValueError(f"select_ratio: expected a float in [0, 1], got {select_ratio!r}")
        self.select_ratio = float(select_ratio)

    # the side input carries the optional groups and guide: (batch, n, 2) = [group id, guide score or -1]
    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor | None:
        """None: the default grouping and self-guidance need nothing beyond q and k (forward's groups/guide add one)."""
        return None

    def _side(self, tokens: Tensor, groups: Tensor | None, guide: Tensor | None) -> Tensor | None:
        if groups is None and guide is None:
            return None
        batch, n = tokens.shape[:2]
        ids = torch.full((batch, n), -1.0, dtype=tokens.dtype, device=tokens.device)
        if groups is not None:
            ids = _check_groups(groups, batch, n).to(tokens.dtype)
        _check_guide(guide, batch, n)
        scores = torch.full_like(ids, -1.0) if guide is None else guide.to(tokens.dtype)
        return torch.stack([ids, scores], dim=-1)

    def _options(self, side: Tensor | None) -> dict[str, object]:
        options: dict[str, object] = {"low_res_tokens": self.low_res_tokens, "text_tokens": self.text_tokens,
                                      "region_size": self.region_size, "select_ratio": self.select_ratio}
        if side is not None:
            if side.dim() != 3 or side.shape[-1] != 2:
                raise ShapeError(f"side: expected (batch, n, 2) = [group id, guide score], got shape {tuple(side.shape)}")
            if bool((side[..., 0] >= 0).all()):
                options["groups"] = side[..., 0].long()
            if bool((side[..., 1] >= 0).all()):
                options["guide"] = side[..., 1]
        return options

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None) -> Tensor:
        return hierarchical_selection_attention(q, k, v, attention_mask=mask, **self._options(side))  # type: ignore[arg-type]

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return hierarchical_selection_attention_reference(q, k, v, attention_mask=mask, **self._options(side))  # type: ignore[arg-type]

    def groups_of(self, x: Tensor, *, attention_mask: Tensor | None = None, groups: Tensor | None = None) -> Tensor:
        """The groups (batch, n) of tokens x as the layer uses them: -1 padding, 0 low-res, 1 text, 2 high-res."""
        tokens = self.batch_major(x)[0]
        keep = self.keep_mask(tokens, None, attention_mask, None)
        real = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if keep is None else keep
        if groups is None:
            return default_groups(real, self.low_res_tokens, self.text_tokens)
        return _check_groups(groups, *tokens.shape[:2]).masked_fill(~real, -1)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
        groups: Tensor | None = None,
        guide: Tensor | None = None,
    ) -> Tensor:
        """As `Attention.forward` with `groups` (batch, n) and `guide` (batch, n) (module docstring); 0 at the high-res
        tokens (out_proj's bias not added there)."""
        tokens, context = self.batch_major(x, context)
        self._check_inputs(tokens, context)
        keep = self.keep_mask(tokens, context, attention_mask, key_padding_mask)
        q, k, v = self.project(tokens)
        core = self.attend(q, k, v, attention_mask=keep, attn_mask=attn_mask, impl=impl,
                           side=self._side(tokens, groups, guide))
        real = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if keep is None else keep
        if groups is None:
            group = default_groups(real, self.low_res_tokens, self.text_tokens)
        else:
            group = _check_groups(groups, *tokens.shape[:2]).masked_fill(~real, -1)
        updated = ((group == LOW) | (group == TEXT))[..., None].to(tokens.dtype)
        out = self.out_proj(self.merge_heads(core)) * updated
        return out if self.batch_first else out.transpose(0, 1)

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        groups: Tensor | None = None,
        guide: Tensor | None = None,
    ) -> Tensor:
        """The weights (batch, heads, n, n) of forward (with its `groups` and `guide`)."""
        tokens, context = self.batch_major(x, context)
        self._check_inputs(tokens, context)
        keep = self.keep_mask(tokens, context, attention_mask, key_padding_mask)
        q, k, v = self.project(tokens)
        mask = self.combined_mask(q, k, keep, attn_mask)
        self.check_dense_memory("materialize", q, k)
        side = self._side(tokens, groups, guide)
        return self.attend_reference(q, k, v, mask, **({} if side is None else {"side": side}))[1]
