"""Head statistics: one number per (layer, batch, head), batched and padding-aware.

Every function takes a capture (`Attentions`), a list of maps (batch, heads, n_q, n_k) per layer,
or one map, and returns (layers, batch, heads) — or (batch, heads) for a single 4-D map. Averages
run over the real queries of each sequence (`attention_mask`, taken from the capture when not
given); padded keys carry no mass. Queries are bottom-right aligned with keys when n_q < n_k
(query i sits at position i + n_k − n_q), as everywhere in attnlab.

* mean_attention_distance (P051): Σ_j A_ij·‖p_i − p_j‖, p = token index, or coordinates given in
  `positions` (n, d) — e.g. the pixel grid of image patches.
* attention_entropy: −Σ_j A_ij log A_ij (nats), 0 log 0 = 0.
* query_key_nmi (P058, P137): the map as a joint law p(q, k) = A_qk / N over the N real queries
  (p(q) = 1/N uniform); NMI = I(Q; K) / √(H(Q)·H(K)). Near 0: every query attends alike (global,
  homogeneous heads); high: where a query attends depends on the query (local heads).
* offset_attention (P051 offset-local heads): the mean attention a query gives to the key at
  `offset` positions from it (−1 = the previous token), over the real queries that have one.
* previous_token_score, duplicate_token_score, induction_score: TransformerLens' head detector
  rules with the "mul" measure — the share of the attention mass that falls on a detection pattern:
  Σ A ⊙ P / Σ A over the real tokens of a sequence. Patterns (causal, from the token ids):
  previous token: j = i − 1; duplicate token: j < i and tok_j = tok_i; induction: j ≤ i and
  tok_{j−1} = tok_i with j − 1 < i (the token after an earlier copy of the current one).
* head_statistics: the statistics of `HEAD_STATISTICS` at once, keyed by their catalogue names
  (the `head-statistics` method of `attnlab explain`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add
from .capture import Attentions, as_layers

P051 = Paper("P051", "Teaching Matters: Investigating the Role of Supervision in Vision Transformers", 2023, "2212.03862")
P058 = Paper("P058", "What Do Self-Supervised Vision Transformers Learn?", 2023, "2305.00729")
INDUCTION = Paper(None, "In-context Learning and Induction Heads", 2022, "2209.11895")

Maps = Attentions | Sequence[Tensor] | Tensor


def _prepare(attentions: Maps, attention_mask: Tensor | None) -> tuple[list[Tensor], list[Tensor], list[Tensor], bool]:
    """Maps in float64 with padding zeroed, and per map the bool query and key masks."""
    single = isinstance(attentions, Tensor) and attentions.dim() == 4
    if isinstance(attentions, Attentions):
        layers = attentions.layers
        qmasks, kmasks = attentions.query_masks, attentions.key_masks
        if attention_mask is not None:
            qmasks = [_mask(attention_mask, a.shape[0], a.shape[2], "attention_mask", a.shape[3]) for a in layers]
            kmasks = [_mask(attention_mask, a.shape[0], a.shape[3], "attention_mask") for a in layers]
    else:
        layers = as_layers(attentions)
        qmasks, kmasks = [], []
        for a in layers:
            b, _, n_q, n_k = a.shape
            full = torch.ones(b, n_k, dtype=torch.bool) if attention_mask is None else _mask(attention_mask, b, n_k, "attention_mask")
            kmasks.append(full)
            qmasks.append(full[:, n_k - n_q :])
    maps = []
    for a, q, k in zip(layers, qmasks, kmasks):
        a = a.detach().to("cpu", torch.float64)
        keep = q.cpu()[:, None, :, None] & k.cpu()[:, None, None, :]
        maps.append(a * keep)
    return maps, [q.cpu() for q in qmasks], [k.cpu() for k in kmasks], single


def _mask(mask: Tensor, batch: int, n: int, name: str, n_k: int | None = None) -> Tensor:
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in (n, n_k):
        raise ValueError(f"{name}: expected a bool mask of shape ({batch}, {n}), got {tuple(mask.shape)}")
    mask = mask.to(torch.bool).cpu()
    return mask[:, mask.shape[1] - n :]


def _finish(values: list[Tensor], single: bool) -> Tensor:
    out = torch.stack(values)
    return out[0] if single else out


def _mean_rows(per_row: Tensor, valid: Tensor) -> Tensor:
    """per_row (batch, heads, n_q), valid bool (batch, n_q) -> (batch, heads) mean over valid rows."""
    w = valid[:, None, :].to(per_row.dtype)
    count = w.sum(-1)
    return (per_row * w).sum(-1) / torch.where(count > 0, count, 1.0)


def _query_positions(n_q: int, n_k: int) -> Tensor:
    return torch.arange(n_q) + (n_k - n_q)


def mean_attention_distance(attentions: Maps, *, attention_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
    """P051: Σ_j A_ij·dist(i, j) averaged over real queries; dist = |i − j| or ‖p_i − p_j‖ of `positions`."""
    maps, qmasks, _, single = _prepare(attentions, attention_mask)
    out = []
    for a, q in zip(maps, qmasks):
        n_q, n_k = a.shape[-2:]
        if positions is None:
            dist = (_query_positions(n_q, n_k)[:, None] - torch.arange(n_k)[None, :]).abs().to(torch.float64)
        else:
            if positions.dim() != 2 or positions.shape[0] != n_k:
                raise ValueError(f"positions: expected coordinates of shape ({n_k}, d), got {tuple(positions.shape)}")
            p = positions.to(torch.float64).cpu()
            dist = torch.cdist(p[n_k - n_q :], p)
        out.append(_mean_rows((a * dist).sum(-1), q))
    return _finish(out, single)


def attention_entropy(attentions: Maps, *, attention_mask: Tensor | None = None) -> Tensor:
    """−Σ_j A_ij log A_ij in nats, averaged over real queries."""
    maps, qmasks, _, single = _prepare(attentions, attention_mask)
    out = []
    for a, q in zip(maps, qmasks):
        plogp = torch.where(a > 0, a * torch.log(torch.where(a > 0, a, 1.0)), 0.0)
        out.append(_mean_rows(-plogp.sum(-1), q))
    return _finish(out, single)


def query_key_nmi(attentions: Maps, *, attention_mask: Tensor | None = None) -> Tensor:
    """P058/P137: normalised mutual information I(Q;K)/√(H(Q)H(K)) of p(q, k) = A_qk / N_real_queries."""
    maps, qmasks, _, single = _prepare(attentions, attention_mask)
    out = []
    for a, q in zip(maps, qmasks):
        nq = q.sum(-1).to(torch.float64)  # (batch,)
        nq_safe = torch.where(nq > 0, nq, 1.0)
        joint = a / nq_safe[:, None, None, None]
        pq = q.to(torch.float64) / nq_safe[:, None]  # (batch, n_q), uniform over real queries
        pk = joint.sum(-2)  # (batch, heads, n_k)
        outer = pq[:, None, :, None] * pk[:, :, None, :]
        mi = torch.where(joint > 0, joint * torch.log(torch.where(joint > 0, joint, 1.0) / torch.where(joint > 0, outer, 1.0)), 0.0)
        mi = mi.sum((-1, -2))
        hq = torch.log(nq_safe)[:, None]
        hk = -torch.where(pk > 0, pk * torch.log(torch.where(pk > 0, pk, 1.0)), 0.0).sum(-1)
        denom = torch.sqrt(hq * hk)
        out.append(torch.where(denom > 0, mi / torch.where(denom > 0, denom, 1.0), 0.0))
    return _finish(out, single)


def offset_attention(attentions: Maps, offset: int = -1, *, attention_mask: Tensor | None = None) -> Tensor:
    """P051: mean A[i, i + offset] over the real queries whose key i + offset exists and is real."""
    maps, qmasks, kmasks, single = _prepare(attentions, attention_mask)
    out = []
    for a, q, k in zip(maps, qmasks, kmasks):
        n_q, n_k = a.shape[-2:]
        target = _query_positions(n_q, n_k) + offset
        inside = (target >= 0) & (target < n_k)
        idx = target.clamp(0, n_k - 1)
        valid = q & inside[None, :] & k[:, idx]
        picked = a.gather(-1, idx.expand(a.shape[0], a.shape[1], n_q)[..., None])[..., 0]
        out.append(_mean_rows(picked, valid))
    return _finish(out, single)


def _pattern_score(maps: list[Tensor], patterns: Tensor, single: bool) -> Tensor:
    """Σ A ⊙ P / Σ A per (batch, head); the maps already have padding zeroed."""
    out = []
    for a in maps:
        n_q, n_k = a.shape[-2:]
        p = patterns[:, None, n_k - n_q :, :n_k]
        total = a.sum((-1, -2))
        hit = (a * p).sum((-1, -2))
        out.append(torch.where(total > 0, hit / torch.where(total > 0, total, 1.0), 0.0))
    return _finish(out, single)


def _tokens(tokens: Tensor | None, attentions: Maps, real: Tensor) -> Tensor:
    """Token ids (batch, n) with every padded position made unique, so that it matches nothing."""
    if tokens is None and isinstance(attentions, Attentions):
        tokens = attentions.tokens
    if tokens is None:
        raise ValueError("tokens: expected the token ids (batch, n); the capture holds none")
    if tokens.dim() != 2:
        raise ValueError(f"tokens: expected token ids of shape (batch, n), got {tuple(tokens.shape)}")
    if tokens.shape != real.shape:
        raise ValueError(f"tokens: expected shape {tuple(real.shape)} (batch, keys), got {tuple(tokens.shape)}")
    unique = -1 - torch.arange(tokens.shape[1])
    return torch.where(real, tokens.cpu(), unique)


def previous_token_score(attentions: Maps, *, attention_mask: Tensor | None = None) -> Tensor:
    """Share of the attention mass on the previous token (j = i − 1)."""
    maps, _, _, single = _prepare(attentions, attention_mask)
    n = maps[0].shape[-1]
    pattern = torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)[None]
    return _pattern_score(maps, pattern.expand(maps[0].shape[0], n, n), single)


def duplicate_token_score(attentions: Maps, tokens: Tensor | None = None, *, attention_mask: Tensor | None = None) -> Tensor:
    """Share of the attention mass on earlier copies of the query's token (j < i, tok_j = tok_i)."""
    maps, _, kmasks, single = _prepare(attentions, attention_mask)
    tok = _tokens(tokens, attentions, kmasks[0])
    same = tok[:, :, None] == tok[:, None, :]
    pattern = (same & torch.ones_like(same).tril(-1)).to(torch.float64)
    return _pattern_score(maps, pattern, single)


def induction_score(attentions: Maps, tokens: Tensor | None = None, *, attention_mask: Tensor | None = None) -> Tensor:
    """Share of the attention mass on tokens that followed an earlier copy of the query's token."""
    maps, _, kmasks, single = _prepare(attentions, attention_mask)
    tok = _tokens(tokens, attentions, kmasks[0])
    b, n = tok.shape
    dup = (tok[:, :, None] == tok[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril(-1)
    pattern = torch.zeros(b, n, n, dtype=torch.bool)
    pattern[:, :, 1:] = dup[:, :, :-1]  # key j is the token right after the copy at j − 1
    return _pattern_score(maps, (pattern & torch.ones(n, n, dtype=torch.bool).tril()).to(torch.float64), single)


HEAD_STATISTICS: tuple[str, ...] = ("attention-entropy", "mean-attention-distance", "qk-nmi", "previous-token-score",
                                    "duplicate-token-score", "induction-score")  # catalogue names, head_statistics' keys


def head_statistics(attentions: Maps, tokens: Tensor | None = None, *,
                    attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Catalogue name -> statistic for each of `HEAD_STATISTICS`, each (layers, batch, heads) ((batch, heads) for one
    map); tokens: the ids of the duplicate-token and induction scores (default: the capture's)."""
    return {
        "attention-entropy": attention_entropy(attentions, attention_mask=attention_mask),
        "mean-attention-distance": mean_attention_distance(attentions, attention_mask=attention_mask),
        "qk-nmi": query_key_nmi(attentions, attention_mask=attention_mask),
        "previous-token-score": previous_token_score(attentions, attention_mask=attention_mask),
        "duplicate-token-score": duplicate_token_score(attentions, tokens, attention_mask=attention_mask),
        "induction-score": induction_score(attentions, tokens, attention_mask=attention_mask),
    }


_ATT = Param("attentions", (Attentions, list, tuple, Tensor), doc="a capture, or maps (batch, heads, n_q, n_k)")
_MASK = Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True)
_TOK = Param("tokens", Tensor, None, "token ids (batch, n); default: the capture's", optional=True)

for _name, _paper, _fn, _summary, _extra in (
    ("mean-attention-distance", P051, mean_attention_distance, "attention-weighted mean distance between query and key", (
        Param("positions", Tensor, None, "coordinates (n, d) of the tokens, e.g. patch grid", optional=True),)),
    ("attention-entropy", P051, attention_entropy, "entropy of each query's attention, averaged over real queries", ()),
    ("offset-attention", P051, offset_attention, "mean attention at a fixed offset (offset-local heads)", (
        Param("offset", int, -1, "key position relative to the query"),)),
    ("qk-nmi", P058, query_key_nmi, "normalised mutual information between query and key positions (also P137)", ()),
    ("previous-token-score", INDUCTION, previous_token_score, "share of attention on the previous token", ()),
    ("duplicate-token-score", INDUCTION, duplicate_token_score, "share of attention on earlier copies of the token", (_TOK,)),
    ("induction-score", INDUCTION, induction_score, "share of attention on tokens after earlier copies", (_TOK,)),
):
    add(Spec(name=_name, kind="analysis", paper=_paper, factory=_fn, family="E", summary=_summary,
             params=(_ATT, *_extra, _MASK)))
add(Spec(name="head-statistics", kind="analysis", paper=P051, factory=head_statistics, family="E",
         summary="every per-head statistic at once: " + ", ".join(HEAD_STATISTICS) + " (P051, P058)",
         params=(_ATT, _TOK, _MASK)))
