"""Reversed attention, DependencyViT (Ding et al., 2023): a child token sends its message to its parents.

Per head, with Q, K, V ∈ R^{N×d_h} of the same tokens:

    P_ij  = softmax_j(q_iᵀ k_j / √d_h)          child i's distribution over its parents j (rows sum to 1)
    g_ih  = m_i · s_ih                           the message gate of child i in head h
    m_i   = σ(MLP(x_i))                          message controller: how much child i sends
    s_ih  = softmax_h(W_s x_i / τ)               head selector: which head carries child i's message
    out_j = Σ_i P_ij g_i v_i                     parent j gathers the gated messages of its children

so out = (P ⊙ g 1ᵀ)ᵀ V: the aggregation runs down the columns of the forward attention P (softmax
over the parents, "send information following a normalized probability distribution") instead of
along its rows. `materialize` returns W = (P ⊙ g 1ᵀ)ᵀ, W_ji = P_ij g_i, the matrix with out = W v; its
rows do not sum to 1 (a parent with no child gets ~0, a hub gets more than 1).

Dependency tree (the paper's induction, from the soft dependency mask A^M = Σ_h W_h):

    parent(i) = argmax_j A^M_ji          (a node that picks itself is a root)

`induce_tree(weights)` returns it. Argmax alone can close cycles (i picks j and j picks i); the paper
does not say how it resolves them, so this module does, the way a greedy arborescence does: in every
cycle the node whose edge to its parent is the weakest becomes a root. The result is a forest: from
every node the parent links reach a root (parent = itself) with no other cycle.

Leaf pruning (DependencyViT-Lite): "the leaf nodes which rarely send messages can be pruned without
hindering the model performance". `leaf_mask(parents)` marks the tokens that are nobody's parent (a
root is its own parent, so roots stay); a model drops them for its next layers. The paper states no
tolerance on a layer's outputs, only that accuracy does not suffer; the exact statement on one layer
is this bound: dropping a set S of tokens (as children and as parents) changes a kept parent j's output
by at most

    Σ_{l∈S} P_lj g_l |v_l|  +  Σ_{i∉S} P_ij g_i |v_i| · r_i / (1 − r_i),    r_i = Σ_{l∈S} P_il,

the messages the pruned tokens sent to j and the renormalisation of the kept children's distributions
(r_i: the mass child i put on pruned parents). It is small exactly when pruned leaves send little
(small g_l) and receive little attention (small r_i), the Lite variant's premise; the tests measure it.

Choices and deviations:

* Message controller: an MLP dim → `controller_hidden` (default dim // 2) → 1 with GELU, then σ; with
  `controller_hidden=0` it is σ(wᵀx_i + b), the form written in shared/PAPERS.md. The paper's
  controller is cumulative over layers in its model (a token's gate is the product of those of the
  layers it went through); that product is a model-level choice, not part of this operator.
* Head selector: on by default (`head_selector=True`), with temperature `selector_temperature`
  (default 1.0: the paper's appendix sets a temperature we could not check against its text; 0.1 is
  the value a third-party reading, timm PR #2062, took). Off, the gate is m_i in every head.
* Padding: a padded token is neither a parent (left out of every child's softmax) nor a child (it
  sends nothing), so padding is removal. An element with no real token gives zeros.
* No causal mode and no cross-attention: the children and the parents are the same tokens of an
  image, and a child's normalised distribution over all the tokens has no causal reading.
* `attend(q, k, v)` without a gate (`side`) is ungated reversed attention, g = 1.

Fast path: the children in chunks of `chunk_size` rows, each chunk's P computed and scattered to the
parents by Pᵀ(g v), so at most chunk_size × N scores are alive; no N × N matrix. The float64
reference builds P and W from the formula.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_int, check_qkv, check_scale, check_tensor

DEPENDENCY_VIT = Paper(
    "P081", "Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention", 2023, "2304.03282"
)


def reversed_attention_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of Q Kᵀ and Pᵀ(g V) (2·N²·d_h each) and the gating, per sequence."""
    return heads * (4.0 * n * n * head_dim + n * head_dim)


def _check_gate(gate: Tensor | None, q: Tensor) -> Tensor:
    """The gate as (batch, heads or 1, n, 1) in q's dtype; ones when None."""
    batch, heads, n = q.shape[0], q.shape[1], q.shape[2]
    if gate is None:
        return torch.ones(batch, 1, n, 1, dtype=q.dtype, device=q.device)
    check_tensor("gate", gate)
    if gate.dim() == 3 and tuple(gate.shape) == (batch, n, 1):
        gate = gate[:, None]
    if gate.dim() != 4 or tuple(gate.shape) not in ((batch, heads, n, 1), (batch, 1, n, 1)):
        raise ShapeError(
            f"gate: expected (batch, n, 1) = {(batch, n, 1)} or (batch, heads, n, 1) = {(batch, heads, n, 1)}, "
            f"got shape {tuple(gate.shape)}"
        )
    return gate.to(q.dtype)


def reversed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """out_j = Σ_i P_ij g_i v_i with P_ij = softmax_j(q_iᵀk_j · scale) over the real parents, over (batch, heads, n,
    head_dim) self-attention inputs; `gate` g (batch, n, 1) or (batch, heads, n, 1), None = 1; `attention_mask`
    (batch, n), True = real token (padded tokens neither send nor receive). Children in chunks of `chunk_size`."""
    check_qkv(q, k, v, same_length=True)
    chunk_size = check_int("chunk_size", chunk_size)
    scale = check_scale(scale, q.shape[-1])
    batch, n = q.shape[0], q.shape[2]
    check_attention_mask(attention_mask, batch, n)
    messages = v * _check_gate(gate, q)
    blocked = None
    if attention_mask is not None:
        messages = messages * attention_mask[:, None, :, None].to(v.dtype)
        blocked = ~attention_mask[:, None, None, :]
    out = torch.zeros_like(v)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        logits = (q[:, :, rows] @ k.transpose(-1, -2)) * scale
        if blocked is not None:  # a finite floor: a child with no real parent (a padded one) gives a finite row, zeroed
            logits = logits.masked_fill(blocked, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
        if blocked is not None:
            probs = probs.masked_fill(blocked, 0.0)
        out = out + probs.transpose(-1, -2) @ messages[:, :, rows]
    return out


def reversed_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, W) of `reversed_attention` in float64 from the formula: P = softmax over the parents, W_ji = P_ij g_i
    (batch, heads, n, n) with the parents j as rows, out = W v."""
    check_qkv(q, k, v, same_length=True)
    scale = check_scale(scale, q.shape[-1])
    batch, heads, n = q.shape[0], q.shape[1], q.shape[2]
    check_attention_mask(attention_mask, batch, n)
    g = _check_gate(gate, q).double()[..., 0].expand(batch, heads, n)
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    parent_ok = real[:, None, None, :].expand(batch, heads, n, n)
    p = masked_softmax(logits, parent_ok)  # child i's row over its real parents
    sends = g * real[:, None, :].double()  # a padded child sends nothing
    w = torch.einsum("bhij,bhi->bhji", p, sends)
    out = torch.einsum("bhji,bhid->bhjd", w, v.double())
    return out.to(q.dtype), w.to(q.dtype)


def induce_tree(weights: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The dependency forest of reversed-attention weights W (batch, heads, n, n) or (batch, n, n), W_ji = the message
    child i sends to parent j (`materialize`): A^M = Σ_h W_h, parent(i) = argmax_j A^M_ji over the real tokens, every
    cycle of the argmax graph opened at its weakest edge (that node becomes a root, its own parent).
    Returns parents (batch, n) long: a root is its own parent, a padded token has -1."""
    check_tensor("weights", weights)
    if weights.dim() not in (3, 4) or weights.shape[-1] != weights.shape[-2]:
        raise ShapeError(f"weights: expected (batch, heads, n, n) or (batch, n, n), got shape {tuple(weights.shape)}")
    dep = weights.sum(1) if weights.dim() == 4 else weights
    batch, n = dep.shape[0], dep.shape[-1]
    check_attention_mask(attention_mask, batch, n)
    real = torch.ones(batch, n, dtype=torch.bool, device=dep.device) if attention_mask is None else attention_mask
    scores = dep.detach().double().masked_fill(~real[:, :, None], -math.inf)  # rows j: only real parents
    parents = scores.argmax(dim=1)  # (batch, n): for each child i, argmax over j
    out = torch.full((batch, n), -1, dtype=torch.long)
    for b in range(batch):
        par = parents[b].tolist()
        strength = scores[b, parents[b], torch.arange(n)].tolist()
        nodes = [i for i in range(n) if bool(real[b, i])]
        state = dict.fromkeys(nodes, 0)  # 0 unseen, 1 on the current walk, 2 done
        for start in nodes:
            walk, node = [], start
            while state[node] == 0:
                state[node] = 1
                walk.append(node)
                node = par[node]
            if state[node] == 1 and par[node] != node:  # the walk closed a cycle starting at `node`
                cycle = walk[walk.index(node):]
                weakest = min(cycle, key=lambda c: strength[c])
                par[weakest] = weakest
            for visited in walk:
                state[visited] = 2
        for i in nodes:
            out[b, i] = par[i]
    return out.to(dep.device)


def leaf_mask(parents: Tensor) -> Tensor:
    """The leaves of a forest `parents` (batch, n) (as `induce_tree` gives, -1 = padding): True for the real tokens
    that are nobody's parent — what DependencyViT-Lite prunes; roots are their own parents and stay."""
    check_tensor("parents", parents)
    if parents.dim() != 2 or parents.dtype != torch.long:
        raise ShapeError(f"parents: expected a (batch, n) long tensor, got shape {tuple(parents.shape)} and {parents.dtype}")
    real = parents >= 0
    has_child = torch.zeros_like(real)
    has_child.scatter_(1, parents.clamp_min(0), real)
    return real & ~has_child


@register(
    name="dependency-vit",
    paper=DEPENDENCY_VIT,
    family="A",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(key_padding=True),
    normalized=False,
    summary="Reversed attention: children send gated messages down the columns of a parent softmax; tree induction.",
    params=(
        Param("controller_hidden", int, None, "hidden width of the message controller MLP (default dim // 2; "
              "0: σ(wᵀx + b))", low=0, optional=True),
        Param("head_selector", bool, True, "gate each child's message by a softmax over the heads (the paper's P)"),
        Param("selector_temperature", float, 1.0, "temperature τ of the head selector's softmax", low=1e-6),
        Param("chunk_size", int, 256, "children per chunk of the fast path", low=1, knob=True),
    ),
    test_params={"chunk_size": 4},
    flops=reversed_attention_flops,
    functional=("reversed_attention", "reversed_attention_reference"),
)
class DependencyViTAttention(Attention):
    """DependencyViT's reversed attention: out_j = Σ_i softmax_j(q_iᵀk_j/√d) g_i v_i, g = controller × head selector.

    `dependency_tree(x)` gives each token's parent; `leaf_mask` the leaves DependencyViT-Lite prunes.
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
        controller_hidden: int | None = None,
        head_selector: bool = True,
        selector_temperature: float = 1.0,
        chunk_size: int = 256,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        hidden = dim // 2 if controller_hidden is None else check_int("controller_hidden", controller_hidden, 0)
        if hidden:
            self.controller: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.controller = nn.Linear(dim, 1)
        self.selector = nn.Linear(dim, heads, bias=False) if head_selector else None
        if not selector_temperature > 0:
            raise ValueError(f"selector_temperature: expected > 0, got {selector_temperature!r}")
        self.selector_temperature = float(selector_temperature)
        self.chunk_size = check_int("chunk_size", chunk_size)

    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The message gate g of every token: (batch, heads, n, 1) with the head selector, else (batch, n, 1)."""
        message = torch.sigmoid(self.controller(x))  # (batch, n, 1)
        if self.selector is None:
            return message
        share = torch.softmax(self.selector(x) / self.selector_temperature, dim=-1)  # (batch, n, heads)
        return (message * share).transpose(1, 2)[..., None]

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None) -> Tensor:
        return reversed_attention(q, k, v, side, attention_mask=mask, chunk_size=self.chunk_size)

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return reversed_attention_reference(q, k, v, side, attention_mask=mask)

    def dependency_tree(self, x: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """Each token's parent (batch, n) in this layer's dependency forest (`induce_tree` of `materialize`)."""
        keep = self.keep_mask(*self.batch_major(x), attention_mask, None)
        return induce_tree(self.materialize(x, attention_mask=attention_mask), keep)
