"""Attention rollout and attention flow (P008, Abnar & Zuidema 2020, arXiv 2005.00928).

Both start from the attention of each layer with the residual connection mixed in:

    Â_l = normalize_rows((1 − α)·fuse_heads(A_l) + α·I),        α = `residual` = 0.5

with the heads fused by their mean (the paper), max or min. `discard_ratio` first drops the
weakest weights of the fused matrix — the rule here: in every row, among the real keys other
than the query itself, the ⌊ratio·(n_real − 1)⌋ smallest weights are set to 0 (ties broken by
position); the diagonal is never dropped and no token (CLS or other) is protected otherwise. Rows
are renormalised AFTER the drop and the residual mix, so every row of Â of a real token sums to
1 (scripts that divide by a broadcast column sum get this wrong).

* rollout: R = Â_L ⋯ Â_2 Â_1; R[b, i, j] is how much of input token j reaches output token i.
* flow: the layered graph with nodes (l, token), l = 0..L, and a DIRECTED edge from (l−1, j) to
  (l, i) of capacity Â_l[i, j]; flow[b, i, j] is the value of the maximum flow from (0, j) to
  (L, i). Computed exactly (Dinic's algorithm, below), no approximation.

Padding: padded tokens have no nodes — their rows and columns of Â are 0 — and every score that
involves them is 0. Scores are float64 tensors (batch, n, n), rows = output tokens, columns = input
tokens.

The max-flow solver works on the layered structure directly. Only the middle layers 1..L−1 matter:
(0, j) is the source, (L, i) the sink, other nodes of layer 0 receive nothing and other nodes of
layer L lead nowhere. Each phase of Dinic's algorithm labels the nodes by their distance from the
source in the residual graph (forward edges with capacity left, backward edges with flow), then
finds a blocking flow of the level graph with waves (Karzanov's scheme, proportional pushes):
a forward wave pushes every node's excess to the next level, nodes that cannot pass all of it on
become blocked, a backward wave returns their excess along the edges it came by; each forward wave
blocks at least one node, so a phase ends. The search stops when the sink is unreachable (the
flow is then maximum: max-flow/min-cut) or when the flow reaches min(source capacity, sink
capacity), a cut, so it is maximum. Residuals below `tol` (1e-13) count as zero; the result is
exact up to floating-point rounding.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add
from .capture import Attentions, as_layers

PAPER = Paper("P008", "Quantifying Attention Flow in Transformers", 2020, "2005.00928")
FUSIONS = ("mean", "max", "min")
TOL = 1e-13
_FAR = 1 << 30


# -- Â -------------------------------------------------------------------------------------
def fuse_heads(attn: Tensor, how: str = "mean") -> Tensor:
    """(..., heads, n_q, n_k) -> (..., n_q, n_k): the mean, max or min over heads."""
    if how == "mean":
        return attn.mean(dim=-3)
    if how == "max":
        return attn.amax(dim=-3)
    if how == "min":
        return attn.amin(dim=-3)
    raise ValueError(f"head_fusion: expected one of {FUSIONS}, got {how!r}")


def _mask_of(attentions: Attentions | Sequence[Tensor] | Tensor, attention_mask: Tensor | None, batch: int, n: int) -> Tensor:
    if attention_mask is None and isinstance(attentions, Attentions):
        attention_mask = attentions.attention_mask
    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool)
    if attention_mask.shape != (batch, n):
        raise ValueError(f"attention_mask: expected shape {(batch, n)} (batch, tokens), got {tuple(attention_mask.shape)}")
    return attention_mask.to(torch.bool).cpu()


def _discard(fused: Tensor, keep: Tensor, ratio: float) -> Tensor:
    """Zero the ⌊ratio·(n_real − 1)⌋ smallest off-diagonal weights among real keys of every row."""
    n = fused.shape[-1]
    eye = torch.eye(n, dtype=torch.bool)
    candidate = keep[..., None, :] & ~eye  # (..., batch, 1 -> n_q, n_k)
    candidate = candidate.expand(fused.shape)
    count = torch.floor(ratio * (keep.sum(-1) - 1).clamp(min=0).to(torch.float64)).to(torch.long)  # (batch,)
    vals = torch.where(candidate, fused, torch.full_like(fused, float("inf")))
    order = torch.argsort(vals, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n).expand(order.shape).contiguous())
    drop = candidate & (rank < count[:, None, None])
    return fused.masked_fill(drop, 0.0)


def residual_attention(
    attentions: Attentions | Sequence[Tensor] | Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: float = 0.5,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Â_l for every layer, (layers, batch, n, n) float64: rows of real tokens sum to 1, padding is 0."""
    layers = as_layers(attentions)
    if not layers:
        raise ValueError("attentions: expected at least one layer, got none")
    batch, _, n_q, n_k = layers[0].shape
    for i, t in enumerate(layers):
        if t.shape[0] != batch or t.shape[2] != n_q or t.shape[3] != n_k or n_q != n_k:
            raise ValueError(
                f"attentions[{i}]: rollout and flow need self-attention maps of one shape (batch, heads, n, n); "
                f"got {tuple(t.shape)} (first layer {tuple(layers[0].shape)})"
            )
    if head_fusion not in FUSIONS:
        raise ValueError(f"head_fusion: expected one of {FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio: expected a value in [0, 1), got {discard_ratio!r}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual: expected a value in [0, 1], got {residual!r}")
    keep = _mask_of(attentions, attention_mask, batch, n_q)
    pair = (keep[:, :, None] & keep[:, None, :]).to(torch.float64)
    eye = torch.diag_embed(keep.to(torch.float64))
    out = []
    for t in layers:
        fused = fuse_heads(t.detach().to("cpu", torch.float64), head_fusion) * pair
        if discard_ratio > 0:
            fused = _discard(fused, keep, discard_ratio)
        mixed = (1.0 - residual) * fused + residual * eye
        total = mixed.sum(-1, keepdim=True)
        out.append(torch.where(total > 0, mixed / torch.where(total > 0, total, 1.0), 0.0))
    return torch.stack(out)


def rollout(
    attentions: Attentions | Sequence[Tensor] | Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: float = 0.5,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Attention rollout R = Â_L ⋯ Â_1, (batch, n, n) float64; R[b, i, j] = share of input j in output i."""
    mixed = residual_attention(
        attentions, head_fusion=head_fusion, discard_ratio=discard_ratio, residual=residual, attention_mask=attention_mask
    )
    r = mixed[0]
    for a in mixed[1:]:
        r = a @ r
    return r


# -- exact max-flow on the layered graph ----------------------------------------------------------
def _levels(cs: np.ndarray, blocks: list[np.ndarray], flows: list[np.ndarray], fs: np.ndarray, ct: np.ndarray,
            ft: np.ndarray, tol: float) -> tuple[np.ndarray, int]:
    """Distance from the source of every middle node in the residual graph, and the sink's (or _FAR)."""
    m = len(blocks) + 1
    n = cs.shape[0]
    lev = np.full((m, n), _FAR)
    front = np.zeros((m, n), dtype=bool)
    front[0] = cs - fs > tol
    lev[0][front[0]] = 1
    fwd = [(c - f > tol).astype(np.float64) for c, f in zip(blocks, flows)]
    bwd = [(f > tol).astype(np.float64) for f in flows]
    sink_open = ct - ft > tol
    d = 1
    while front.any():
        if (front[m - 1] & sink_open).any():
            return lev, d + 1
        new = np.zeros((m, n), dtype=bool)
        for k in range(m):
            if not front[k].any():
                continue
            f = front[k].astype(np.float64)
            if k < m - 1:
                new[k + 1] |= fwd[k] @ f > 0
            if k > 0:
                new[k - 1] |= f @ bwd[k - 1] > 0
        new &= lev == _FAR
        d += 1
        lev[new] = d
        front = new
    return lev, _FAR


def _blocking_flow(cs: np.ndarray, blocks: list[np.ndarray], flows: list[np.ndarray], fs: np.ndarray, ct: np.ndarray,
                   ft: np.ndarray, lev: np.ndarray, depth: int, tol: float) -> None:
    """Add a blocking flow of the level graph to (fs, flows, ft) in place (waves with proportional pushes)."""
    m = len(blocks) + 1
    n = cs.shape[0]
    rs = np.where((cs - fs > tol) & (lev[0] == 1), cs - fs, 0.0)
    rt = np.where((ct - ft > tol) & (lev[m - 1] == depth - 1), ct - ft, 0.0)
    step_up = [lev[k + 1][:, None] == lev[k][None, :] + 1 for k in range(m - 1)]
    step_down = [lev[k][None, :] == lev[k + 1][:, None] + 1 for k in range(m - 1)]
    rf = [np.where(step_up[k] & (blocks[k] - flows[k] > tol), blocks[k] - flows[k], 0.0) for k in range(m - 1)]
    rb = [np.where(step_down[k] & (flows[k] > tol), flows[k], 0.0) for k in range(m - 1)]
    # phase flows on level-graph edges: source, forward (a@k -> b@k+1), cancelled (b@k+1 -> a@k), sink
    ps = rs.copy()
    pf = [np.zeros((n, n)) for _ in range(m - 1)]
    pb = [np.zeros((n, n)) for _ in range(m - 1)]
    pt = np.zeros(n)
    excess = np.zeros((m, n))
    excess[0] = rs
    blocked = np.zeros((m, n), dtype=bool)
    at_level = [[(k, lev[k] == d) for k in range(m) if (lev[k] == d).any()] for d in range(depth)]
    while True:
        for d in range(1, depth):  # forward wave
            for k, here in at_level[d]:
                x = here & ~blocked[k] & (excess[k] > tol)
                if not x.any():
                    continue
                out = np.zeros(n)
                if k < m - 1:
                    up = (rf[k] - pf[k]) * ~blocked[k + 1][:, None]
                    out += up.sum(0)
                if k > 0:
                    down = (rb[k - 1] - pb[k - 1]) * ~blocked[k - 1][None, :]
                    out += down.sum(1)
                if k == m - 1:
                    sink = rt - pt
                    out += sink
                theta = np.where(x & (out > 0), np.minimum(1.0, excess[k] / np.where(out > 0, out, 1.0)), 0.0)
                if k < m - 1:
                    moved = up * theta[None, :]
                    pf[k] += moved
                    excess[k + 1] += moved.sum(1)
                if k > 0:
                    moved = down * theta[:, None]
                    pb[k - 1] += moved
                    excess[k - 1] += moved.sum(0)
                if k == m - 1:
                    pt += sink * theta
                left = np.where(x, excess[k] - theta * out, excess[k])
                stuck = x & (left > tol)
                blocked[k] |= stuck
                excess[k] = np.where(x & ~stuck, 0.0, left)
        if not (excess > tol).any():
            break
        for d in range(depth - 1, 0, -1):  # backward wave: blocked nodes return their excess
            for k, here in at_level[d]:
                y = here & blocked[k] & (excess[k] > tol)
                if not y.any():
                    continue
                inflow = np.zeros(n)
                if k > 0:
                    inflow += pf[k - 1].sum(1)
                if k < m - 1:
                    inflow += pb[k].sum(0)
                if k == 0:
                    inflow += ps
                rho = np.where(y & (inflow > 0), np.minimum(1.0, excess[k] / np.where(inflow > 0, inflow, 1.0)), 0.0)
                if k > 0:
                    back = pf[k - 1] * rho[:, None]
                    pf[k - 1] -= back
                    excess[k - 1] += back.sum(0)
                if k < m - 1:
                    back = pb[k] * rho[None, :]
                    pb[k] -= back
                    excess[k + 1] += back.sum(1)
                if k == 0:
                    ps -= ps * rho
                excess[k] = np.where(y, 0.0, excess[k])
    fs += ps
    for k in range(m - 1):
        flows[k] += pf[k] - pb[k]
    ft += pt


def max_flow_layered(caps: np.ndarray, source: int, sink: int, *, tol: float = TOL) -> float:
    """Exact max-flow value from node (0, source) to node (L, sink) of the layered graph.

    caps (L, n, n): caps[l−1][i, j] is the capacity of the directed edge (l−1, j) -> (l, i).
    """
    caps = np.asarray(caps, dtype=np.float64)
    if caps.ndim != 3 or caps.shape[1] != caps.shape[2]:
        raise ValueError(f"caps: expected shape (layers, n, n), got {caps.shape}")
    n_layers, n, _ = caps.shape
    for name, v in (("source", source), ("sink", sink)):
        if not 0 <= v < n:
            raise ValueError(f"{name}: expected a token index in [0, {n}), got {v}")
    if np.any(caps < 0):
        raise ValueError("caps: expected non-negative capacities")
    if n_layers == 1:
        return float(caps[0, sink, source])
    cs = caps[0][:, source].copy()
    ct = caps[-1][sink, :].copy()
    if n_layers == 2:
        return float(np.minimum(cs, ct).sum())
    blocks = [caps[k] for k in range(1, n_layers - 1)]
    bound = min(cs.sum(), ct.sum())
    fs, ft = np.zeros(n), np.zeros(n)
    flows = [np.zeros((n, n)) for _ in blocks]
    while ft.sum() < bound - tol:
        lev, depth = _levels(cs, blocks, flows, fs, ct, ft, tol)
        if depth == _FAR:
            break
        _blocking_flow(cs, blocks, flows, fs, ct, ft, lev, depth, tol)
    return float(ft.sum())


def attention_flow(
    attentions: Attentions | Sequence[Tensor] | Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: float = 0.5,
    attention_mask: Tensor | None = None,
    outputs: Sequence[int] | None = None,
    normalize: bool = False,
) -> Tensor:
    """Attention flow, (batch, n, n) float64: flow[b, i, j] = max-flow from input j to output i.

    outputs: the output tokens to compute (default all); other rows are 0. normalize: divide each
    output row by its sum, as the paper's code does before comparing with other scores.
    """
    mixed = residual_attention(
        attentions, head_fusion=head_fusion, discard_ratio=discard_ratio, residual=residual, attention_mask=attention_mask
    ).numpy()
    _, batch, n, _ = mixed.shape
    keep = _mask_of(attentions, attention_mask, batch, n).numpy()
    rows = range(n) if outputs is None else list(outputs)
    for i in rows:
        if not 0 <= i < n:
            raise ValueError(f"outputs: expected token indices in [0, {n}), got {i}")
    out = np.zeros((batch, n, n))
    for b in range(batch):
        real = np.flatnonzero(keep[b])
        caps = mixed[:, b][:, real][:, :, real]
        pos = {int(t): k for k, t in enumerate(real)}
        for i in rows:
            if i not in pos:
                continue
            for k_in, j in enumerate(real):
                out[b, i, j] = max_flow_layered(caps, k_in, pos[i])
    result = torch.from_numpy(out)
    if normalize:
        total = result.sum(-1, keepdim=True)
        result = torch.where(total > 0, result / torch.where(total > 0, total, 1.0), 0.0)
    return result


_ATT = Param("attentions", (Attentions, list, tuple, Tensor), doc="a capture, or maps (batch, heads, n, n) per layer")
_COMMON = (
    _ATT,
    Param("head_fusion", str, "mean", "how heads are fused", choices=FUSIONS),
    Param("discard_ratio", float, 0.0, "share of the weakest off-diagonal weights dropped per row", low=0.0, high=0.999999),
    Param("residual", float, 0.5, "weight α of the identity mixed in for the residual connection", low=0.0, high=1.0),
    Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True),
)

add(
    Spec(
        name="rollout",
        kind="analysis",
        paper=PAPER,
        factory=rollout,
        family="E",
        summary="attention rollout: product of residual-mixed, head-fused attention over layers",
        params=_COMMON,
    )
)
add(
    Spec(
        name="attention-flow",
        kind="analysis",
        paper=PAPER,
        factory=attention_flow,
        family="E",
        summary="attention flow: exact max-flow from every input to every output token through the layered graph",
        params=_COMMON
        + (
            Param("outputs", (list, tuple), None, "output token indices to compute (default all)", optional=True),
            Param("normalize", bool, False, "divide each output row by its sum"),
        ),
    )
)
