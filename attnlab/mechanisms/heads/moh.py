"""MoH: multi-head attention as mixture-of-head attention (Jin, Zhu, Yuan & Yan, 2024).

Multi-head attention is a sum over heads, MHA(X) = Σ_h H_h W_O^h (W_O^h: the rows of W_o that read head h).
MoH weights every head by a per-token gate and lets each token switch most of its heads off:

    MoH(X)_t = Σ_h g_h(x_t) H_h(x_t) W_O^h

The h heads are h_s shared heads, always on, and h − h_s routed heads of which each token keeps its top K:

    shared:  g_i = α1 · Softmax(W_s x_t)_i                                  i = 1..h_s
    routed:  g_i = α2 · Softmax(W_r x_t)_i  if i ∈ TopK(Softmax(W_r x_t)), else 0
    [α1, α2] = Softmax(W_h x_t)

W_s ∈ R^{h_s×d}, W_r ∈ R^{(h−h_s)×d}, W_h ∈ R^{2×d}, no biases. With no shared heads g is the routed term with
α2 = 1, with no routed heads the shared term with α1 = 1. A load-balance loss keeps the routed heads in use:

    L_b = Σ_i f_i P_i        f_i = (1/T) Σ_t 1[token t keeps routed head i],  P_i = (1/T) Σ_t Softmax(W_r x_t)_i

over the T real tokens (padding excluded). `routing(x)` returns the gates, which heads each token keeps, each
head's usage (its f_i; 1 for the shared heads), the fraction of heads in use and L_b; every forward stores the
routing of its tokens in `last_routing` (L_b with its graph: add λ·L_b to the training loss).

Paper and official code (SkyworkAI/MoH, `MoHAttention`) differ in the scale of the gates: the code renormalises
the kept routed gates to sum to K (gates·mask / Σ gates·mask · K), scales the shared gates by h_s
(Softmax(W_s x)·h_s) and α by 2 (Softmax(W_h x)·2), so each group's gates average 1 as in MHA, and its loss is
E²·mean_i(f_i P_i) = E·Σ_i f_i P_i (E = h − h_s routed heads). `variant="paper"` (default) follows the paper,
`variant="code"` the code (gates and loss). With every head kept and uniform gates, "code" is exactly
multi-head attention; "paper" is multi-head attention with each head scaled by its constant gate.

The fast path computes attention only for the (token, head) pairs a token keeps: heads that every token keeps
(the shared heads) go to SDPA in one call; for each routed head the queries of the tokens that keep it are
gathered (padded to the largest count over the batch) and attend alone, so the kernel sees Σ_h max_b count_b(h)
query rows instead of h·n, and the rows are scattered back and weighted by the gates. The float64 reference
computes every head and multiplies by the gates (g = 0 switches a head off), as the official code does.
A gate that underflows to exactly 0 counts as switched off (its product with the head is 0 either way).

The module. The gates are read from the tokens, so they are the core's side input (`side_input(x)`:
(batch, n, heads)); the core weights head h of query t by side[t] (queries bottom-right aligned, so KV-cache
decoding works with the cached gates). `materialize` returns the gated weights g_h(x_i)·A^h_ij, the weight with
which token j's value in head h reaches token i, so out = out_proj(merge_heads(A v)) holds; its rows sum to the
gate (0 for a head the token switched off), not to 1. No cross-attention (the gates belong to the queries, the
side input to the keys).

Defaults: `shared_heads=None` is ⌈h/4⌉ and `top_k=None` half the routed heads rounded up (h = 8: 2 shared,
3 of 6 routed, 5/8 of the heads on per token; the paper runs 50–90 % of the heads) — our choice, the paper tunes
both per model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import causal_mask, restrict
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_attention_mask,
    check_choice,
    check_finite,
    check_int,
    check_module_dtype,
    check_optional_int,
    check_qkv,
    check_tensor,
    check_tokens,
)
from ...kernels.sdpa import sdpa

MOH = Paper("P230", "MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024, "2410.11842")
VARIANTS: tuple[str, ...] = ("paper", "code")


def moh_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the heads in use at the defaults (⌈h/4⌉ shared + half the routed): 4·n²·d_h each, half
    when causal; the routers add 2·n·d·(h + 2)."""
    shared = math.ceil(heads / 4)
    active = shared + math.ceil((heads - shared) / 2)
    return 4.0 * active * n * n * head_dim * (0.5 if causal else 1.0) + 2.0 * n * heads * head_dim * (heads + 2)


@dataclass(frozen=True)
class HeadRouting:
    """The routing of one call.

    gates:        (batch, n, heads) g_h(x_t), 0 for a routed head the token does not keep (shared heads first);
    kept:         (batch, n, heads) bool, the heads each token uses;
    usage:        (heads,) the fraction of real tokens using each head (f_i; 1 for the shared heads);
    active:       the mean fraction of heads a real token uses (a float tensor);
    balance_loss: L_b over the routed heads (0 without routed heads), with its graph.
    """

    gates: Tensor
    kept: Tensor
    usage: Tensor
    active: Tensor
    balance_loss: Tensor


def check_heads(heads: int, shared_heads: int | None, top_k: int | None) -> tuple[int, int]:
    """(shared heads, top K) of `heads`, the defaults resolved: ⌈h/4⌉ shared, half the routed rounded up."""
    check_int("heads", heads)
    shared = math.ceil(heads / 4) if shared_heads is None else check_int("shared_heads", shared_heads, low=0, high=heads)
    routed = heads - shared
    k = math.ceil(routed / 2) if top_k is None else check_optional_int("top_k", top_k, low=0)
    assert k is not None
    if k > routed:
        raise ParameterError(f"top_k: expected at most the {routed} routed heads (heads {heads} − shared_heads {shared}), got {k}")
    if routed and not k:
        raise ParameterError(f"top_k: expected >= 1 with {routed} routed heads (or shared_heads={heads}), got {k}")
    return shared, k


def route_heads(
    x: Tensor,
    *,
    shared_router: Tensor | None,
    routed_router: Tensor | None,
    mix_router: Tensor | None,
    top_k: int,
    variant: str = "paper",
    attention_mask: Tensor | None = None,
) -> HeadRouting:
    """The gates of MoH for tokens x (batch, n, d): shared_router W_s (h_s, d), routed_router W_r (h − h_s, d), mix_router
    W_h (2, d) (None where a group is empty; W_h needed when both are there); attention_mask (batch, n), True = real
    token, limits usage, `active` and the loss to the real tokens."""
    check_choice("variant", variant, VARIANTS)
    check_tensor("x", x)
    if x.dim() != 3:
        raise ShapeError(f"x: expected (batch, n, dim), got shape {tuple(x.shape)}")
    check_attention_mask(attention_mask, x.shape[0], x.shape[1])
    if shared_router is None and routed_router is None:
        raise ParameterError("shared_router, routed_router: expected at least one of them, got neither")
    if shared_router is not None and routed_router is not None and mix_router is None:
        raise ParameterError("mix_router: expected W_h (2, dim) with shared and routed heads, got None")
    batch, n, _ = x.shape
    real = torch.ones(batch, n, dtype=x.dtype, device=x.device) if attention_mask is None else attention_mask.to(x.dtype)
    count = real.sum().clamp_min(1.0)
    groups, kept, loss = [], [], x.new_zeros(())
    if shared_router is not None:
        shared = torch.softmax(x @ shared_router.t(), dim=-1)
        groups.append(shared * shared.shape[-1] if variant == "code" else shared)
        kept.append(torch.ones_like(shared, dtype=torch.bool))
    if routed_router is not None:
        scores = torch.softmax(x @ routed_router.t(), dim=-1)
        experts = scores.shape[-1]
        top = torch.topk(scores, top_k, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)
        routed = scores * keep
        if variant == "code":
            routed = routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps) * top_k
        groups.append(routed)
        kept.append(keep)
        f = (keep.to(x.dtype) * real[..., None]).sum((0, 1)) / count
        p = (scores * real[..., None]).sum((0, 1)) / count
        loss = (f * p).sum() * (experts if variant == "code" else 1)
    if len(groups) == 2:
        assert mix_router is not None
        alpha = torch.softmax(x @ mix_router.t(), dim=-1) * (2 if variant == "code" else 1)
        groups = [groups[0] * alpha[..., :1], groups[1] * alpha[..., 1:]]
    gates, kept_all = torch.cat(groups, -1), torch.cat(kept, -1)
    usage = (kept_all.to(x.dtype) * real[..., None]).sum((0, 1)) / count
    active = (kept_all.to(x.dtype).mean(-1) * real).sum() / count
    return HeadRouting(gates, kept_all, usage.detach(), active.detach(), loss)


def _check_gates(q: Tensor, gates: Tensor) -> None:
    check_tensor("gates", gates)
    b, h, n_q = q.shape[:3]
    if tuple(gates.shape) != (b, n_q, h):
        raise ShapeError(f"gates: expected (batch, n_q, heads) = ({b}, {n_q}, {h}), got shape {tuple(gates.shape)}")


def _head_rows(mask: Tensor | None, head: int, shape: tuple[int, int, int, int]) -> Tensor | None:
    """The mask rows of one head, (batch, n_q, n_k), from a mask broadcastable to `shape`."""
    return None if mask is None else mask.expand(shape)[:, head]


def moh_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Σ-ready MoH heads over (batch, heads, n, head_dim): head h of query t is g_h(t)·softmax(q kᵀ·scale + mask) v,
    computed only where g_h(t) ≠ 0 (gates (batch, n_q, heads)); mask bool (True = attend) or additive, broadcastable
    to (batch, heads, n_q, n_k); causal bottom-right aligned. Rows of switched-off pairs are 0."""
    check_qkv(q, k, v)
    _check_gates(q, gates)
    b, h, n_q, _ = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    on = (gates != 0).transpose(1, 2)  # (batch, heads, n_q)
    every = on.all(-1).all(0)  # heads every query of every element keeps
    heads: list[Tensor | None] = [None] * h
    if every.any():
        idx = every.nonzero().flatten()
        sub = None if mask is None else mask.expand(b, h, n_q, n_k)[:, idx]
        full = sdpa(q[:, idx], k[:, idx], v[:, idx], sub, None, scale, causal=causal)
        for i, head in enumerate(idx.tolist()):
            heads[head] = full[:, i]
    rows_mask = mask if not causal else restrict(mask, causal_mask(n_q, n_k, q.device))
    for head in (~every).nonzero().flatten().tolist():
        sel = on[:, head]  # (batch, n_q)
        m = int(sel.sum(-1).max())
        if m == 0:
            continue
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[:, :m]  # kept queries first, in order
        q_rows = q[:, head].gather(1, order[..., None].expand(-1, -1, q.shape[-1]))
        m_rows = _head_rows(rows_mask, head, (b, h, n_q, n_k))
        if m_rows is not None:
            m_rows = m_rows.gather(1, order[..., None].expand(-1, -1, n_k))[:, None]
        o = sdpa(q_rows[:, None], k[:, head : head + 1], v[:, head : head + 1], m_rows, None, scale)[:, 0]
        heads[head] = o.new_zeros(b, n_q, d_v).scatter(1, order[..., None].expand(-1, -1, d_v), o)
    zero = q.new_zeros(b, n_q, d_v)
    out = torch.stack([zero if t is None else t for t in heads], 1)
    return out * gates.transpose(1, 2)[..., None].to(out.dtype)


def moh_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `moh_attention` in float64: every head computed, weights = g_h(i)·A^h_ij, out = weights v."""
    check_qkv(q, k, v)
    _check_gates(q, gates)
    n_q, n_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    if causal:
        i = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        scores = scores.masked_fill(torch.arange(n_k, device=q.device)[None] > i, -math.inf)
    a = masked_softmax(scores, mask if mask is None or mask.dtype == torch.bool else mask.double())
    weights = a * gates.double().transpose(1, 2)[..., None]
    out = torch.einsum("bhij,bhjd->bhid", weights, v.double())
    return out.to(q.dtype), weights.to(q.dtype)


@register(
    name="moh",
    paper=MOH,
    family="C",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True, decode=True),
    params=(
        Param("shared_heads", int, None, "heads every token uses (None: ⌈heads/4⌉)", low=0, optional=True),
        Param("top_k", int, None, "routed heads each token keeps (None: half the routed heads, rounded up)", low=0,
              optional=True),
        Param("variant", str, "paper", "gate scale and loss: 'paper' (the paper's gates, L_b = Σ f·P) or 'code' "
              "(SkyworkAI/MoH: kept routed gates renormalised ×K, shared ×h_s, α ×2; loss E·Σ f·P)", choices=VARIANTS),
    ),
    summary="Mixture-of-head attention: shared heads plus top-K routed heads per token, each head weighted by its "
            "gate; unrouted (token, head) pairs are not computed; load-balance loss.",
    normalized=False,
    flops=moh_flops,
)
class MixtureOfHeadAttention(Attention):
    """MoH: out_t = Σ_h g_h(x_t) H_h(x_t) W_O^h with shared heads always on and each token's top-K routed heads;
    `routing(x)` and `last_routing` report the gates, the heads in use and the load-balance loss."""

    takes_side_input = True  # the gates (batch, n, heads), read from the tokens

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        shared_heads: int | None = None,
        top_k: int | None = None,
        variant: str = "paper",
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.shared_heads, self.top_k = check_heads(heads, shared_heads, top_k)
        self.variant = check_choice("variant", variant, VARIANTS)
        routed = heads - self.shared_heads
        self.shared_router = nn.Linear(dim, self.shared_heads, bias=False) if self.shared_heads else None
        self.routed_router = nn.Linear(dim, routed, bias=False) if routed else None
        self.mix_router = nn.Linear(dim, 2, bias=False) if self.shared_heads and routed else None
        self.last_routing: HeadRouting | None = None

    def routing(
        self, x: Tensor, *, attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> HeadRouting:
        """The routing of tokens x (batch, n, dim) (as forward, batch_first applies): gates, heads kept, usage, L_b."""
        x = self.batch_major(x)[0]
        check_tokens("x", x, self.dim)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        keep = self.keep_mask(x, None, attention_mask, key_padding_mask)
        return self._route(x, keep)

    def _route(self, x: Tensor, keep: Tensor | None) -> HeadRouting:
        def weight(layer: nn.Linear | None) -> Tensor | None:
            return None if layer is None else layer.weight

        return route_heads(
            x, shared_router=weight(self.shared_router), routed_router=weight(self.routed_router),
            mix_router=weight(self.mix_router), top_k=self.top_k, variant=self.variant, attention_mask=keep,
        )

    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The gates (batch, n, heads) of the tokens x."""
        return self._route(x, None).gates

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
        """x (batch, n, dim) -> (batch, n, dim), as `Attention.forward`; the call's routing (padding excluded from the
        usage and the loss) is kept in `last_routing`."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        routing = self._route(x, keep)
        self.last_routing = routing
        q, k, v = self.project(x, context)
        heads = self.attend(q, k, v, attention_mask=keep, attn_mask=attn_mask, impl=impl, side=routing.gates)  # type: ignore[arg-type]
        out = self.out_proj(self.merge_heads(heads))
        return out if self.batch_first else out.transpose(0, 1)

    def _query_gates(self, q: Tensor, side: Tensor | None) -> Tensor:
        """The gates of the queries: the last n_q of the side input (queries bottom-right aligned)."""
        if side is None:
            raise ValueError("side: moh's core needs the gates, side=module.side_input(x) (batch, n, heads), got None")
        if side.dim() != 3 or side.shape[-1] != self.heads:
            raise ShapeError(f"side: expected the gates (batch, n_k, heads={self.heads}), got shape {tuple(side.shape)}")
        return side[:, side.shape[1] - q.shape[2] :]

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, side: Tensor | None = None) -> Tensor:
        return moh_attention(q, k, v, self._query_gates(q, side), mask=mask, scale=1.0 / math.sqrt(self.head_dim))

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return moh_attention_reference(q, k, v, self._query_gates(q, side), mask=mask, scale=1.0 / math.sqrt(self.head_dim))
