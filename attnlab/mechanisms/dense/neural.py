"""Neural attention: attention logits from a feed-forward network on query-key pairs (DiGiugno & Mahmood, 2025).

The dot product q_iᵀk_j/√d is replaced by an MLP on the concatenated pair:

    s_ij = w_aᵀ σ(W_h [q̂_i ; k̂_j] + b_h) + b_a,    q̂_i = P_q q_i + p_q,  k̂_j = P_k k_j + p_k
    A = softmax_j(s_ij + M_ij),    out = A V

with the paper's memory mitigation: q and k are first down-projected from d_h to a small d'
(P_q, P_k ∈ R^{d'×d_h}) so the pair tensor is (n, n, 2d') instead of (n, n, 2d_h). σ is ReLU (the
official code's). The paper writes one hidden layer (`hidden=(d',)`, the default); the official
code (awayfromzel/neural-attention-research) uses two, 2d' → d' → d'/2 → 1 (`hidden=(d', d'//2)`),
and d' = d_h/32 by default. The MLP and the down-projections are shared by the heads (as in that
code); there is no 1/√d scale (the MLP learns its own).

Fast path. The logits are not q·k plus a bias, so SDPA does not apply. The first layer is linear in
the pair, W_h[q̂_i; k̂_j] = W_q q̂_i + W_k k̂_j, so the fast path folds the down-projections into it and
adds a (n_q, H) and a (n_k, H) term per pair instead of forming the concatenation (exact, the same
function); queries go in blocks of `chunk_size` (a speed knob), each block recomputed in the
backward pass (activation checkpointing) so the memory of a training step stays
O(chunk_size · n_k · H) per head rather than O(n² · H). The float64 reference forms the
concatenated pairs (n_q, n_k, 2d') and applies the layers as written.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...core.errors import ShapeError
from ...core.masks import combine_masks
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, register
from ...core.validate import check_int, check_qkv, check_tensor
from .softmax import DENSE_SUPPORTS

NEURAL = Paper("P116", "Neural Attention: A Novel Mechanism for Enhanced Expressive Power in Transformer Models", 2025, "2502.17206")
PROJECTION_DIM = 16  # d' when not given (capped at head_dim)
CHUNK = 16  # queries per block: a block of pairs (16 · n_k · H) stays in cache

Linear = tuple[Tensor, Tensor]  # (weight (out, in), bias (out,))


def _check_linear(name: str, layer: Linear, fan_in: int) -> int:
    """A (weight (out, fan_in), bias (out,)) pair; its out width."""
    if not isinstance(layer, (tuple, list)) or len(layer) != 2:
        raise TypeError(f"{name}: expected (weight, bias), got {type(layer).__name__}")
    weight, bias = check_tensor(f"{name} weight", layer[0]), check_tensor(f"{name} bias", layer[1])
    if weight.dim() != 2 or weight.shape[1] != fan_in or tuple(bias.shape) != (weight.shape[0],):
        raise ShapeError(
            f"{name}: expected weight (out, {fan_in}) and bias (out,), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return int(weight.shape[0])


def _check_neural(q: Tensor, q_down: Linear, k_down: Linear, layers: Sequence[Linear]) -> None:
    check_qkv(q, q, q)
    d_q = _check_linear("q_down", q_down, q.shape[-1])
    d_k = _check_linear("k_down", k_down, q.shape[-1])
    if not layers:
        raise ShapeError("layers: expected at least one (weight, bias) layer ending in width 1, got none")
    width = d_q + d_k
    for i, layer in enumerate(layers):
        width = _check_linear(f"layers[{i}]", layer, width)
    if width != 1:
        raise ShapeError(f"layers: expected the last layer to give one logit (width 1), got width {width}")


def _pair_logits(a: Tensor, c: Tensor, rest: Sequence[Linear]) -> Tensor:
    """s_ij for a block of queries: a (b, h, m, H₁) the query half of the first layer (its bias included), c
    (b, h, n_k, H₁) the key half, `rest` the layers after the first; σ between layers -> (b, h, m, n_k)."""
    hidden = a[:, :, :, None, :] + c[:, :, None, :, :]
    for weight, bias in rest:
        hidden = F.linear(hidden.relu_(), weight, bias)  # in place: the sum is not kept for the backward
    return hidden[..., 0]


def _block(a: Tensor, c: Tensor, v: Tensor, mask: Tensor | None, *params: Tensor) -> Tensor:
    """The output of a block of queries: softmax over the pair logits, times v. `params`: the weights and biases of the
    layers after the first, flat (activation checkpointing sees them as inputs)."""
    rest = [(params[i], params[i + 1]) for i in range(0, len(params), 2)]
    return masked_softmax(_pair_logits(a, c, rest), mask) @ v


def neural_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_down: Linear,
    k_down: Linear,
    layers: Sequence[Linear],
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    chunk_size: int = CHUNK,
) -> Tensor:
    """Neural attention over (batch, heads, n, head_dim): softmax_j(MLP([P_q q_i + p_q ; P_k k_j + p_k]) + mask) v.

    q_down, k_down: (weight (d', head_dim), bias (d',)); layers: the MLP's (weight, bias) pairs, the first taking the
    2d' concatenation, ReLU between, the last giving width 1. Queries in blocks of `chunk_size` (speed only).
    """
    check_qkv(q, k, v)
    _check_neural(q, q_down, k_down, layers)
    check_int("chunk_size", chunk_size)
    mask = combine_masks(batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device)
    return _neural_fast(q, k, v, mask, q_down, k_down, layers, chunk_size)


def _neural_fast(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_down: Linear, k_down: Linear, layers: Sequence[Linear],
    chunk_size: int,
) -> Tensor:
    """The fast path on a combined mask (causality included): the first layer split into its query and key halves
    with the down-projections folded in, queries in checkpointed blocks."""
    d_q = q_down[0].shape[0]
    w1, b1 = layers[0]
    w1q, w1k = w1[:, :d_q], w1[:, d_q:]
    a = F.linear(q, w1q @ q_down[0], w1q @ q_down[1] + b1)  # (b, h, n_q, H₁): W_q (P_q q + p_q) + b_h
    c = F.linear(k, w1k @ k_down[0], w1k @ k_down[1])  # (b, h, n_k, H₁): W_k (P_k k + p_k)
    flat = [t for layer in layers[1:] for t in layer]
    n_q = q.shape[2]
    outs = []
    for start in range(0, n_q, chunk_size):
        rows = slice(start, min(start + chunk_size, n_q))
        block_mask = None if mask is None else mask[..., rows, :] if mask.shape[-2] > 1 else mask
        args = (a[:, :, rows], c, v, block_mask, *flat)
        if torch.is_grad_enabled() and (a.requires_grad or c.requires_grad or v.requires_grad):
            outs.append(checkpoint(_block, *args, use_reentrant=False))
        else:
            outs.append(_block(*args))
    return torch.cat(outs, dim=2)


def neural_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_down: Linear,
    k_down: Linear,
    layers: Sequence[Linear],
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `neural_attention` in float64: the concatenated pairs (n_q, n_k, 2d') through the MLP."""
    check_qkv(q, k, v)
    _check_neural(q, q_down, k_down, layers)
    mask = combine_masks(batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=torch.float64, device=q.device)
    return _reference(q, k, v, mask, q_down, k_down, layers)


def _reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_down: Linear, k_down: Linear, layers: Sequence[Linear]
) -> tuple[Tensor, Tensor]:
    q_hat = torch.einsum("bhnd,ed->bhne", q.double(), q_down[0].double()) + q_down[1].double()
    k_hat = torch.einsum("bhnd,ed->bhne", k.double(), k_down[0].double()) + k_down[1].double()
    n_q, n_k = q.shape[2], k.shape[2]
    pairs = torch.cat(
        [q_hat[:, :, :, None, :].expand(-1, -1, -1, n_k, -1), k_hat[:, :, None, :, :].expand(-1, -1, n_q, -1, -1)], dim=-1
    )  # (b, h, n_q, n_k, 2d'): [q̂_i ; k̂_j]
    hidden = pairs
    for i, (weight, bias) in enumerate(layers):
        hidden = torch.einsum("bhijf,of->bhijo", hidden, weight.double()) + bias.double()
        if i < len(layers) - 1:
            hidden = hidden.clamp_min(0)
    scores = hidden[..., 0]
    weights = masked_softmax(scores, None if mask is None else mask if mask.dtype == torch.bool else mask.double())
    out = torch.einsum("bhij,bhjd->bhid", weights, v.double())
    return out.to(q.dtype), weights.to(q.dtype)


def _widths(head_dim: int, projection_dim: int | None, hidden: Sequence[int] | None) -> tuple[int, tuple[int, ...]]:
    d_proj = min(PROJECTION_DIM, head_dim) if projection_dim is None else check_int("projection_dim", projection_dim)
    if hidden is None:
        return d_proj, (d_proj,)
    if not isinstance(hidden, (tuple, list)) or not hidden:
        raise ShapeError(f"hidden: expected one or more hidden widths, got {hidden!r}")
    return d_proj, tuple(check_int(f"hidden[{i}]", w) for i, w in enumerate(hidden))


def neural_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per sequence at the defaults (d' = min(16, d_h), one hidden layer of d'): the pair MLP
    2·n²·(d' + d') per head (the add and the last layer), the two folded first-layer maps 2·2·n·d_h·d', and A v."""
    d_proj = min(PROJECTION_DIM, head_dim)
    pairs = n * n * (0.5 if causal else 1.0)
    return heads * (2.0 * pairs * 2 * d_proj + 4.0 * n * head_dim * d_proj + 2.0 * pairs * head_dim)


@register(
    name="neural-attention",
    paper=NEURAL,
    family="A",
    cost="O(N² d' H)",
    exponent=2.0,
    supports=DENSE_SUPPORTS,
    params=(
        Param("projection_dim", int, None, "d': width q and k are down-projected to before the pair MLP "
              f"(default min({PROJECTION_DIM}, head_dim))", low=1, optional=True),
        Param("hidden", tuple, None, "hidden widths of the pair MLP (default (d',), the paper's one layer; the "
              "official code: (d', d'//2))", optional=True),
        Param("chunk_size", int, CHUNK, "queries per block of the fast path (checkpointed)", low=1, knob=True),
    ),
    summary="Neural attention: logits from an MLP on the down-projected pair [q_i; k_j], softmax over keys.",
    test_params={"projection_dim": 3, "hidden": (5, 2), "chunk_size": 4},
    flops=neural_flops,
)
class NeuralAttention(Attention):
    """Attention whose logits are an MLP (shared by the heads) of the concatenated down-projected query and key."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        projection_dim: int | None = None,
        hidden: Sequence[int] | None = None,
        chunk_size: int = CHUNK,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        d_proj, widths = _widths(self.head_dim, projection_dim, hidden)
        self.projection_dim, self.hidden = d_proj, widths
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.q_down = nn.Linear(self.head_dim, d_proj)
        self.k_down = nn.Linear(self.head_dim, d_proj)
        sizes = (2 * d_proj, *widths, 1)
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    @property
    def layers(self) -> list[Linear]:
        return [(layer.weight, layer.bias) for layer in self.mlp]

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        down = [(lin.weight.to(q.dtype), lin.bias.to(q.dtype)) for lin in (self.q_down, self.k_down)]
        layers = [(w.to(q.dtype), b.to(q.dtype)) for w, b in self.layers]
        return _neural_fast(q, k, v, mask, down[0], down[1], layers, self.chunk_size)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        down = [(lin.weight, lin.bias) for lin in (self.q_down, self.k_down)]
        return _reference(q, k, v, mask, down[0], down[1], self.layers)

    def extra_repr(self) -> str:
        return f"projection_dim={self.projection_dim}, hidden={self.hidden}, causal={self.causal}, chunk_size={self.chunk_size}"
