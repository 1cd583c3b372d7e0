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
capacity), a cut, so it is maximum. Residuals below `tol` (1e-13) count as zero; results agree
with networkx's maximum_flow to ~1e-11 (tests ask 1e-9 on random graphs, 1e-6 on MiniLM).

Cost: one max-flow per (output, input) pair, a few milliseconds each for 64 tokens and 6 layers
(about 150 wave steps on 64×64 blocks, NumPy); `attention_flow` spreads the pairs over forked
worker processes (`workers`, default one per CPU when there are 512 pairs or more) and
`outputs=` restricts the work to the output tokens of interest (e.g. [0] for CLS).
benchmarks/flow.py times the all-token case.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

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
                   ft: np.ndarray, lev: np.ndarray, depth: int, tol: float, bound: float) -> float | None:
    """Add a blocking flow of the level graph to (fs, flows, ft) in place (waves with proportional pushes).

    Returns the flow value early, leaving the state unfinished, once the sink has received `bound`
    (min of source and sink capacity): what reaches the sink in a preflow is the value of a flow
    (the excess left at nodes can always be returned to the source), and no flow exceeds `bound`.

    Block k holds the edges between middle layers k and k+1, indexed [node at k+1, node at k]:
    `up` the capacity left on level-graph edges k -> k+1 (of `rf` at the start of the phase),
    `down` the flow that level-graph edges k+1 -> k may still cancel (of `rb`). The phase's flow on
    them is rf − up and rb − down. A step touches only the columns (rows) of its active nodes;
    pushes skip blocked targets by masking.
    """
    m = len(blocks) + 1
    n = cs.shape[0]
    rf, rb = [], []
    for k in range(m - 1):
        res = blocks[k] - flows[k]
        rf.append(np.where((lev[k + 1][:, None] == lev[k][None, :] + 1) & (res > tol), res, 0.0))
        rb.append(np.where((lev[k][None, :] == lev[k + 1][:, None] + 1) & (flows[k] > tol), flows[k], 0.0))
    up = [r.copy() for r in rf]
    down = [r.copy() for r in rb]
    has_down = [bool(r.any()) for r in rb]
    rt = np.where((ct - ft > tol) & (lev[m - 1] == depth - 1), ct - ft, 0.0)
    sink = rt.copy()
    rs = np.where((cs - fs > tol) & (lev[0] == 1), cs - fs, 0.0)
    ps = rs.copy()  # the source pushes all it can at once
    excess = np.zeros((m, n))
    excess[0] = rs
    free = np.ones((m, n))  # 1.0 = not blocked (multiplies pushes), as bool in `open_`
    open_ = np.ones((m, n), dtype=bool)
    any_blocked = [False] * m
    steps = [[(k, lev[k] == d) for k in range(m) if (lev[k] == d).any()] for d in range(depth)]
    while True:
        for d in range(1, depth):  # forward wave
            for k, here in steps[d]:
                xi = (here & open_[k] & (excess[k] > tol)).nonzero()[0]
                if xi.size == 0:
                    continue
                e = excess[k, xi]
                out = np.zeros(xi.size)
                if k < m - 1:
                    u = up[k][:, xi]
                    if any_blocked[k + 1]:
                        u *= free[k + 1][:, None]
                    out += u.sum(0)
                if k > 0 and has_down[k - 1]:
                    dn = down[k - 1][xi]
                    if any_blocked[k - 1]:
                        dn *= free[k - 1]
                    out += dn.sum(1)
                if k == m - 1:
                    out += sink[xi]
                theta = np.minimum(e / np.maximum(out, 1e-300), 1.0)
                if k < m - 1:
                    u *= theta
                    up[k][:, xi] -= u
                    excess[k + 1] += u.sum(1)
                if k > 0 and has_down[k - 1]:
                    dn *= theta[:, None]
                    down[k - 1][xi] -= dn
                    excess[k - 1] += dn.sum(0)
                if k == m - 1:
                    sink[xi] *= 1.0 - theta
                left = e - theta * out
                stuck = left > tol
                excess[k, xi] = left * stuck
                if stuck.any():  # blocked: it takes no more pushes this phase
                    free[k, xi[stuck]] = 0.0
                    open_[k, xi[stuck]] = False
                    any_blocked[k] = True
        received = float((ft + rt - sink).sum())
        if received >= bound - tol:
            return received
        if not (excess > tol).any():
            break
        for d in range(depth - 1, 0, -1):  # backward wave: blocked nodes return their excess
            for k, here in steps[d]:
                yi = (here & ~open_[k] & (excess[k] > tol)).nonzero()[0]
                if yi.size == 0:
                    continue
                e = excess[k, yi]
                inflow = ps[yi] if k == 0 else np.zeros(yi.size)
                if k > 0:
                    fin = rf[k - 1][yi] - up[k - 1][yi]
                    inflow = inflow + fin.sum(1)
                if k < m - 1 and has_down[k]:
                    bin_ = rb[k][:, yi] - down[k][:, yi]
                    inflow = inflow + bin_.sum(0)
                rho = np.minimum(e / np.maximum(inflow, 1e-300), 1.0)
                if k > 0:
                    fin *= rho[:, None]
                    up[k - 1][yi] += fin
                    excess[k - 1] += fin.sum(0)
                if k < m - 1 and has_down[k]:
                    bin_ *= rho
                    down[k][:, yi] += bin_
                    excess[k + 1] += bin_.sum(1)
                if k == 0:
                    ps[yi] -= ps[yi] * rho
                excess[k, yi] = 0.0
    fs += ps
    for k in range(m - 1):
        flows[k] += (rf[k] - up[k]) - (rb[k] - down[k])
    ft += rt - sink
    return None


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
    return _max_flow(caps, source, sink, tol)


def _max_flow(caps: np.ndarray, source: int, sink: int, tol: float) -> float:
    n_layers, n, _ = caps.shape
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
    m = len(blocks) + 1
    dense = bool((cs > tol).all() and (ct > tol).any() and all((c > tol).all() for c in blocks))
    while ft.sum() < bound - tol:
        if dense and not fs.any():  # first phase on a complete graph: levels are the layers
            lev, depth = np.broadcast_to(np.arange(1, m + 1)[:, None], (m, n)), m + 1
        else:
            lev, depth = _levels(cs, blocks, flows, fs, ct, ft, tol)
        if depth == _FAR:
            break
        done = _blocking_flow(cs, blocks, flows, fs, ct, ft, lev, depth, tol, bound)
        if done is not None:
            return done
    return float(ft.sum())


def _flow_rows(task: tuple[np.ndarray, list[int]]) -> np.ndarray:
    """Max-flow from every input token to each sink in `sinks`: (len(sinks), n)."""
    caps, sinks = task
    n = caps.shape[-1]
    return np.array([[_max_flow(caps, j, i, TOL) for j in range(n)] for i in sinks]).reshape(len(sinks), n)


def _run(tasks: list[tuple[np.ndarray, list[int]]], workers: int) -> list[np.ndarray]:
    if workers <= 1 or len(tasks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_flow_rows(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_flow_rows, tasks))


def attention_flow(
    attentions: Attentions | Sequence[Tensor] | Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: float = 0.5,
    attention_mask: Tensor | None = None,
    outputs: Sequence[int] | None = None,
    normalize: bool = False,
    workers: int | None = None,
) -> Tensor:
    """Attention flow, (batch, n, n) float64: flow[b, i, j] = max-flow from input j to output i.

    outputs: the output tokens to compute (default all); other rows are 0. normalize: divide each
    output row by its sum, as the paper's code does before comparing with other scores.
    workers: processes sharing the max-flows (forked, numpy only); default one per CPU when there
    are 512 flows or more, else 1.
    """
    mixed = residual_attention(
        attentions, head_fusion=head_fusion, discard_ratio=discard_ratio, residual=residual, attention_mask=attention_mask
    ).numpy()
    _, batch, n, _ = mixed.shape
    keep = _mask_of(attentions, attention_mask, batch, n).numpy()
    rows = list(range(n)) if outputs is None else [int(i) for i in outputs]
    for i in rows:
        if not 0 <= i < n:
            raise ValueError(f"outputs: expected token indices in [0, {n}), got {i}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers: expected a positive number of processes, got {workers}")
    tasks, where = [], []
    for b in range(batch):
        real = np.flatnonzero(keep[b])
        caps = np.ascontiguousarray(mixed[:, b][:, real][:, :, real])
        pos = {int(t): k for k, t in enumerate(real)}
        sinks = [i for i in rows if i in pos]
        for start in range(0, len(sinks), 4):
            chunk = sinks[start : start + 4]
            tasks.append((caps, [pos[i] for i in chunk]))
            where.append((b, chunk, real))
    pairs = sum(len(t[1]) * t[0].shape[-1] for t in tasks)
    if workers is None:
        workers = (os.cpu_count() or 1) if pairs >= 512 else 1
    out = np.zeros((batch, n, n))
    for (b, chunk, real), values in zip(where, _run(tasks, workers)):
        out[b, np.array(chunk)[:, None], real[None, :]] = values
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
            Param("workers", int, None, "processes for the max-flows (default: one per CPU for 512+ flows)", low=1, optional=True),
        ),
    )
)
