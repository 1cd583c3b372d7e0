"""Routing attention (Roy et al., 2021): content-based sparse attention through online k-means.

Queries and keys are layer-normalised without affine parameters, q̃ = LN(q), k̃ = LN(k)
(zero mean, unit variance over head_dim, so ‖q̃‖ = √d); routing compares the unit vectors
q̂ = q̃/√d, k̂ = k̃/√d with k centroids μ_c (per head) by the dot product q̂·μ_c, as the
official implementation does. Query i attends key j only inside a cluster:

    out_i = (1/|C(i)|) Σ_{c ∈ C(i)} Σ_{j ∈ K_c, (j ≤ i)} softmax_{j ∈ K_c}(q̃_i·k̃_j / √d) v_j

where C(i) are the clusters that hold query i and K_c the keys of cluster c.

* Not causal — balanced clusters, as the official code: each centroid takes its top-w
  queries and, separately, its top-w keys by q̂·μ_c, w = ⌈n/k⌉ with n the sequence's real tokens
  (padding neither counts nor is taken, so a padded sequence routes as without it; every cluster
  holds exactly w of each). A token may sit in several clusters (its output is the mean of its clusters'
  outputs; the official code divides by count + 0.01, here by the count) or in none
  (output 0, a zero row of `materialize`).
* Causal — queries and keys are shared (k̃ = q̃, as the paper does for decoders, so each
  query is in its own key set) and each token joins its nearest centroid μ(q̂_i) =
  argmax_c q̂_i·μ_c, the paper's routing rule; inside the cluster j ≤ i. Balancing by top-w
  over the whole sequence would let later tokens decide which cluster an earlier token is
  in (the output before t would depend on tokens after t), so the causal variant routes
  each token by its own content only; clusters then have unequal sizes, and the fast path's
  cost is O(k·W²·d) with W the largest cluster (N²·d at worst, when every token picks one
  centroid; N²d/k when they spread evenly).
* Key padding: padded positions are never picked as queries or keys of a cluster (not
  causal) and are masked as keys (causal); a query whose cluster has no real key gives 0.

Centroids are a buffer updated only in training mode, with no gradient, by an exponential
moving average over the batch: with S_c the normalised queries and keys (padding left out)
whose nearest centroid is c,

    μ_c ← λ μ_c + (1 − λ) · mean_{x ∈ S_c} x        (μ_c unchanged when S_c is empty)

The step is computed in the forward pass (from the centroids that routed it) and written into
the buffer when the gradient of that forward's output is computed: once per training step
(also under activation checkpointing, whose recomputed forward would otherwise step twice),
and never between two forward calls, so a forward stays a function of its input.

Autograd: the cluster assignment (top-w / argmax indices) is not differentiated; gradients
flow through the scores and values of the selected pairs, i.e. they equal the gradients of
the dense masked attention with the selection held fixed.

Fast path: gather every cluster's queries, keys and values into (k, w, d) blocks, one SDPA
call over all clusters (a softmax per cluster), scatter-add back and divide by the count;
O(k·w²·d) = O(n²d/k) time and O(n²/k) memory, O(n^1.5·d) at k = √n.

What of the paper is not here (the operator only):
* Commitment loss. The paper's k-means pairs the EMA update with an auxiliary term pulling the
  normalised queries and keys towards their centroids (as in VQ-VAE); a module here returns its
  output only and no library-wide contract collects auxiliary losses, so it is not computed.
  The centroids still follow the data through the EMA update above; the projections are not
  trained to commit to them.
* Local heads. The Routing Transformer gives half of a layer's heads local (sliding-window)
  attention and the other half routing attention; every head of this module routes. Build a
  layer of both by combining it with "sliding-window" heads in the model.
* The number of clusters is fixed at build (`clusters`, default 32), not set from the length:
  the paper chooses k ≈ √N for its sequence length, so pass clusters≈√N for the N you run;
  the cost and the cluster width w = ⌈N/k⌉ follow the k given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import MaskError, ParameterError, ShapeError
from ...core.masks import padding_to_mask
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_int, check_qkv, check_scale, check_tensor

ROUTING = Paper("P039", "Efficient Content-Based Sparse Attention with Routing Transformers", 2021, "2003.05997")


@dataclass(frozen=True)
class Routing:
    """Members of every cluster: positions (batch, heads, k, W) int64 and validity (bool, same shape).

    Not causal: W = ⌈n/k⌉ queries and keys per cluster; a padded sequence's slots past its own ⌈n_real/k⌉
    (and any that padding filled) are invalid.
    Causal: keys = queries, W = the largest cluster, slots past a cluster's size invalid.
    """

    q_index: Tensor
    q_valid: Tensor
    k_index: Tensor
    k_valid: Tensor

    def members(self, n: int, which: str = "q") -> Tensor:
        """bool (batch, heads, k, n): True where the position is a query (`which="q"`) or key ("k") of the cluster."""
        index, valid = (self.q_index, self.q_valid) if which == "q" else (self.k_index, self.k_valid)
        out = torch.zeros(*index.shape[:-1], n + 1, dtype=torch.bool, device=index.device)
        out.scatter_(-1, torch.where(valid, index, n), True)
        return out[..., :n]


def unit_normalize(x: Tensor) -> Tensor:
    """LN(x)/√d: layer norm without affine parameters over the last axis, scaled to unit norm."""
    return F.layer_norm(x, (x.shape[-1],)) / math.sqrt(x.shape[-1])


def _check_centroids(centroids: Tensor, heads: int, d: int) -> None:
    check_tensor("centroids", centroids)
    if centroids.dim() != 3 or centroids.shape[0] != heads or centroids.shape[2] != d or centroids.shape[1] < 1:
        raise ShapeError(f"centroids: expected (heads, k, head_dim) = ({heads}, k >= 1, {d}), got {tuple(centroids.shape)}")


def _check(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, scale: float | None) -> float:
    check_qkv(q, k, v, same_length=True)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    return check_scale(scale, q.shape[-1])


def _check_decay(decay: object) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ParameterError(f"decay: expected a float in [0, 1], got {decay!r}")


@torch.no_grad()
def route(
    q: Tensor, k: Tensor, centroids: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> Routing:
    """The clusters of q, k (batch, heads, n, d) under centroids (heads, k, d); computed without gradient."""
    check_qkv(q, k, k, same_length=True)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    b, h, n, d = q.shape
    _check_centroids(centroids, h, d)
    mu = centroids.to(q.dtype)
    qs = torch.einsum("bhnd,hcd->bhnc", unit_normalize(q), mu)  # q̂·μ_c
    n_c = mu.shape[1]
    if causal:
        assign = qs.argmax(-1)  # (b, h, n): the nearest centroid, per token
        counts = F.one_hot(assign, n_c).sum(-2)  # (b, h, k)
        width = max(int(counts.max()), 1) if n else 1
        order = (assign * n + torch.arange(n, device=q.device)).argsort(-1)  # by cluster, then position
        cluster = assign.gather(-1, order)
        start = counts.cumsum(-1) - counts
        rank = torch.arange(n, device=q.device) - start.gather(-1, cluster)
        index = torch.zeros(b, h, n_c * width, dtype=torch.int64, device=q.device)
        valid = torch.zeros(b, h, n_c * width, dtype=torch.bool, device=q.device)
        index.scatter_(-1, cluster * width + rank, order)
        valid.scatter_(-1, cluster * width + rank, True)
        index, valid = index.view(b, h, n_c, width), valid.view(b, h, n_c, width)
        return Routing(index, valid, index, valid)
    ks = torch.einsum("bhnd,hcd->bhnc", unit_normalize(k), mu)
    if attention_mask is not None:  # padding never displaces a real token
        pad = ~attention_mask[:, None, :, None]
        qs, ks = qs.masked_fill(pad, float("-inf")), ks.masked_fill(pad, float("-inf"))
    width = max(math.ceil(n / n_c), 1)
    if n == 0:
        empty = torch.zeros(b, h, n_c, 0, dtype=torch.int64, device=q.device)
        return Routing(empty, empty.bool(), empty, empty.bool())
    qtop, ktop = qs.transpose(-1, -2).topk(width, -1), ks.transpose(-1, -2).topk(width, -1)
    q_valid, k_valid = qtop.values > float("-inf"), ktop.values > float("-inf")
    if attention_mask is not None:  # w = ⌈n_real/k⌉ per sequence, as without its padding
        real_width = (attention_mask.sum(-1) + n_c - 1) // n_c  # (b,)
        within = torch.arange(width, device=q.device) < real_width[:, None, None, None]
        q_valid, k_valid = q_valid & within, k_valid & within
    return Routing(qtop.indices, q_valid, ktop.indices, k_valid)


@torch.no_grad()
def ema_centroids(
    centroids: Tensor,
    q: Tensor,
    k: Tensor,
    *,
    decay: float,
    causal: bool = False,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """μ_c ← λ μ_c + (1 − λ)·mean of the normalised queries and keys (keys = queries when causal)
    nearest to μ_c, over the batch and positions (padding left out); returns the new centroids."""
    check_qkv(q, k, k, same_length=True)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    _check_centroids(centroids, q.shape[1], q.shape[-1])
    _check_decay(decay)
    mu = centroids.to(q.dtype)
    x = unit_normalize(q) if causal else torch.cat([unit_normalize(q), unit_normalize(k)], 2)
    keep = torch.ones(x.shape[:3], dtype=x.dtype, device=x.device)
    if attention_mask is not None:
        real = attention_mask.to(x.dtype)[:, None, :]
        keep = keep * (real if causal else torch.cat([real, real], -1))
    hot = F.one_hot(torch.einsum("bhnd,hcd->bhnc", x, mu).argmax(-1), mu.shape[1]).to(x.dtype) * keep[..., None]
    count = hot.sum((0, 2))  # (h, k)
    total = torch.einsum("bhnc,bhnd->hcd", hot, x)
    mean = total / count.clamp(min=1)[..., None]
    new = torch.where(count[..., None] > 0, decay * mu + (1.0 - decay) * mean, mu)
    return new.to(centroids.dtype)


def _shared(q: Tensor, k: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    qn = F.layer_norm(q, (q.shape[-1],))
    return qn, qn if causal else F.layer_norm(k, (k.shape[-1],))


def _resolve(q: Tensor, k: Tensor, centroids: Tensor | None, routing: Routing | None, causal: bool,
             attention_mask: Tensor | None) -> Routing:
    if (centroids is None) == (routing is None):
        raise ParameterError("centroids, routing: expected exactly one of them (centroids to route, or a Routing)")
    if routing is None:
        assert centroids is not None
        return route(q, k, centroids, causal=causal, attention_mask=attention_mask)
    if not isinstance(routing, Routing):
        raise TypeError(f"routing: expected a Routing, got {type(routing).__name__}")
    b, h, n = q.shape[:3]
    for name in ("q_index", "q_valid", "k_index", "k_valid"):
        t = getattr(routing, name)
        if t.dim() != 4 or tuple(t.shape[:2]) != (b, h):
            raise MaskError(f"routing.{name}: expected (batch, heads, k, W) with batch={b}, heads={h}, got {tuple(t.shape)}")
    if routing.q_index.shape[2] != routing.k_index.shape[2]:
        raise MaskError(
            f"routing: expected as many query as key clusters, got {routing.q_index.shape[2]} and {routing.k_index.shape[2]}"
        )
    for index, valid in (("q_index", "q_valid"), ("k_index", "k_valid")):
        a, b_ = getattr(routing, index), getattr(routing, valid)
        if b_.dtype != torch.bool or a.shape != b_.shape or a.dtype != torch.int64:
            raise MaskError(f"routing.{valid}: expected a bool tensor shaped like the int64 routing.{index} {tuple(a.shape)}, "
                            f"got {b_.dtype} {tuple(b_.shape)}")
    for name in ("q_index", "k_index"):
        t = getattr(routing, name)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= max(n, 1)):
            raise MaskError(f"routing.{name}: expected positions in [0, {n}), got [{int(t.min())}, {int(t.max())}]")
    return routing


def routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    centroids: Tensor | None = None,
    routing: Routing | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Routing attention of q, k, v (batch, heads, n, d) within clusters, gathered per cluster.

    Give `centroids` (heads, k, d) to route here, or a precomputed `routing` (see `route`).
    Returns (batch, heads, n, d_v); a query in no cluster, or with no visible key, gives 0.
    """
    scale = _check(q, k, v, attention_mask, scale)
    r = _resolve(q, k, centroids, routing, causal, attention_mask)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    if n == 0 or r.q_index.shape[-1] == 0:
        return q.new_zeros(b, h, n, dv)
    qn, kn = _shared(q, k, causal)
    n_c, wq, wk = r.q_index.shape[2], r.q_index.shape[3], r.k_index.shape[3]

    base = torch.arange(b * h, device=q.device).view(b, h, 1, 1) * n  # rows of (batch · heads · n, width)
    q_rows, k_rows = (base + r.q_index).reshape(-1), (base + r.k_index).reshape(-1)

    def gather(x: Tensor, rows: Tensor, width: int) -> Tensor:
        return x.reshape(b * h * n, x.shape[-1]).index_select(0, rows).view(b, h, n_c, width, x.shape[-1])

    qg, kg, vg = gather(qn, q_rows, wq), gather(kn, k_rows, wk), gather(v, k_rows, wk)
    keep: Tensor | None = None if bool(r.k_valid.all()) else r.k_valid[..., None, :]  # (b, h, k, 1, wk)
    if attention_mask is not None:
        real = attention_mask[:, None, :].expand(b, h, n).gather(-1, r.k_index.reshape(b, h, -1)).view(b, h, n_c, 1, wk)
        keep = real if keep is None else keep & real
    if causal:
        before = r.k_index[..., None, :] <= r.q_index[..., :, None]
        keep = before if keep is None else keep & before
    if keep is not None:
        keep = keep.reshape(b, h * n_c, keep.shape[-2], wk)
    og = F.scaled_dot_product_attention(  # one softmax per cluster; SDPA gives 0 on a row without keys
        *(t.reshape(b, h * n_c, t.shape[-2], t.shape[-1]) for t in (qg, kg, vg)), attn_mask=keep, scale=scale
    ).view(b, h, n_c, wq, dv) * r.q_valid[..., None].to(v.dtype)
    out = v.new_zeros(b * h * n, dv).index_add(0, q_rows, og.reshape(-1, dv))
    count = v.new_zeros(b * h * n).index_add(0, q_rows, r.q_valid.reshape(-1).to(v.dtype))
    return (out / count.clamp(min=1)[:, None]).view(b, h, n, dv)


def routing_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    centroids: Tensor | None = None,
    routing: Routing | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `routing_attention` in float64: one dense masked softmax per cluster
    (k × n × n), averaged over each query's clusters into the n × n matrix A with out = A v."""
    scale = _check(q, k, v, attention_mask, scale)
    r = _resolve(q, k, centroids, routing, causal, attention_mask)
    n = q.shape[2]
    qn, kn = _shared(q.double(), k.double(), causal)
    mq, mk = r.members(n, "q"), r.members(n, "k")  # (b, h, k, n)
    keep = mq[..., :, None] & mk[..., None, :]  # (b, h, k, n, n)
    if causal:
        keep = keep & (torch.arange(n, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None])
    if attention_mask is not None:
        keep = keep & padding_to_mask(attention_mask)[:, :, None]
    scores = torch.einsum("bhid,bhjd->bhij", qn, kn)[:, :, None] * scale
    per_cluster = masked_softmax(scores, keep)
    count = mq.sum(2).to(torch.float64)  # clusters holding each query
    weights = per_cluster.sum(2) / count.clamp(min=1)[..., None]
    out = weights @ v.double()
    return out.to(q.dtype), weights.to(q.dtype)


def _routing_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """q·k and A·v inside √n clusters of √n tokens: 4·n^1.5·d per head."""
    return 4.0 * heads * head_dim * n * max(math.sqrt(n), 1.0)


@register(
    name="routing",
    paper=ROUTING,
    family="A",
    cost="O(N²d/k) = O(N^1.5 d) at k = √N clusters",
    exponent=1.5,
    supports=Supports(causal=True, key_padding=True, materialize=True),
    params=(
        Param("clusters", int, 32, "number of centroids k per head (the paper takes k ≈ √N)", low=1),
        Param("decay", float, 0.999, "EMA decay λ of the centroids (stepped by the backward pass in training mode)", low=0.0, high=1.0),
    ),
    summary=(
        "Routing attention: online k-means over layer-normalised queries/keys (shared when causal), balanced "
        "top-N/k clusters (nearest centroid when causal), EMA centroids; attention only within a cluster. "
        "The cluster assignment is not differentiated: gradients flow through the selected scores only."
    ),
    normalized=False,
    test_params={"clusters": 3},
    flops=_routing_flops,
)
class RoutingAttention(Attention):
    """Multi-head routing attention with k EMA centroids per head (a buffer, no gradient).

    Rows of `materialize` sum to 1, or to 0 for a token no cluster took (not causal) and
    less than 1 when one of its clusters has no visible key: hence `normalized=False`.
    In training mode the backward pass of a forward moves the centroids one EMA step (the step
    that forward computed); forward calls alone, eval mode and `materialize` never move them.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        causal: bool = False,
        clusters: int = 32,
        decay: float = 0.999,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first, causal=causal)
        check_int("clusters", clusters)
        _check_decay(decay)
        self.clusters, self.decay = clusters, float(decay)
        self.register_buffer("centroids", unit_normalize(torch.randn(heads, clusters, self.head_dim)))
        self._frozen = False

    mask_form = "padding"  # the key padding keep-mask (batch, n_k): causality is applied inside the clusters
    same_length = True

    def _route(self, q: Tensor, k: Tensor, mask: Tensor | None) -> tuple[Routing, Tensor | None]:
        return route(q, k, self.centroids, causal=self.causal, attention_mask=mask), mask

    def _schedule_ema(self, out: Tensor, q: Tensor, k: Tensor, kpm: Tensor | None) -> Tensor:
        """In training mode: compute the EMA step now, write it into the buffer when out's gradient is computed."""
        if self.training and not self._frozen and out.requires_grad:
            new = ema_centroids(self.centroids, q, k, decay=self.decay, causal=self.causal, attention_mask=kpm)

            def write(_grad: Tensor) -> None:
                with torch.no_grad():
                    self.centroids.copy_(new)

            out.register_hook(write)
        return out

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        r, kpm = self._route(q, k, mask)
        out = routing_attention(q, k, v, routing=r, causal=self.causal, attention_mask=kpm)
        return self._schedule_ema(out, q, k, kpm)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        r, kpm = self._route(q, k, mask)
        out, weights = routing_attention_reference(q, k, v, routing=r, causal=self.causal, attention_mask=kpm)
        return self._schedule_ema(out, q, k, kpm), weights

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention matrix (batch, heads, n, n) under the current centroids (which it leaves unchanged)."""
        self._frozen = True
        try:
            return super().materialize(
                x, context=context, attention_mask=attention_mask, key_padding_mask=key_padding_mask, attn_mask=attn_mask
            )
        finally:
            self._frozen = False

    def extra_repr(self) -> str:
        return f"clusters={self.clusters}, decay={self.decay}, causal={self.causal}"
