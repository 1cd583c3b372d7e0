"""Point Transformer vector self-attention over k nearest neighbours (Zhao et al., 2021).

For point i with feature x_i and coordinates p_i, over its k nearest neighbours kNN(i):

    δ_ij = θ(p_i − p_j)                                          θ: Linear(d_pos, h_pos) → ReLU → Linear(h_pos, dim)
    w_ij = γ(φ(x_i) − ψ(x_j) + δ_ij)                             γ: Linear(dim, m·dim) → ReLU → Linear(m·dim, heads)
    a_ij = softmax_{j ∈ kNN(i)}(w_ij)                            per attention channel, over the neighbours
    y_i  = Σ_{j ∈ kNN(i)} a_ij[g(c)] · (α(x_j) + δ_ij)[c]        channel c uses attention channel g(c) = c // (dim/heads)

φ, ψ, α are linear maps dim → dim (no bias by default, as in point-transformer-pytorch and PyG).
"Vector attention": the weights are vectors, one softmax per channel. `heads` is the number of attention
channels: heads = dim is the paper's per-channel vector attention (as point-transformer-pytorch and PyG
`PointTransformerConv` compute it), heads = dim/8 the official code's weight sharing over groups of 8
channels (its `share_planes`); each attention channel serves dim/heads consecutive value channels.

Defaults and deviations:
* kNN(i) is the k points nearest to p_i (Euclidean) among the real points of the sample, i itself included
  (distance 0), as in point-transformer-pytorch; with fewer than k real points, all of them. k = 16 is the
  paper's. Ties in distance are broken by index (`torch.topk`), so coincident points break equivariance.
* The official code uses key minus query (x_k − x_q) and p_j − p_i, and BatchNorm + ReLU inside θ and γ;
  we follow the paper (φ(x_i) − ψ(x_j), p_i − p_j; plain MLPs, no normalisation). θ's hidden width
  h_pos = 64 and γ's expansion m = 4 follow point-transformer-pytorch (the paper does not state them).
* The block around the layer (input/output linears, residual) is not part of the operator.
* The neighbours are chosen from distances computed directly (not by the matmul expansion, whose rounding
  could reorder near neighbours), in float32 at least.
* The output depends on the coordinates only through p_i − p_j (and the kNN choice, which is
  translation invariant): the class declares `translation_invariant = True`.

`materialize` gives a (batch, heads, n, n) with A[b, g, i, j] = a_ij[g] for j ∈ kNN(i), zero elsewhere;
rows sum to 1. The output is y_i = Σ_j A[g(c), i, j]·(α(x_j) + δ_ij)[c]: the values carry δ_ij, so the
matrix mixes the value *and* relative-position vectors, not α(x) alone.

Fast path: kNN indices by `torch.topk` on the pairwise distances (O(n²) distances, O(n·k·dim) for the rest),
gathers of the k neighbours. Reference: every pair i, j in float64, the neighbourhood as a membership
mask from a sort, the softmax masked to it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from .base import SetAttention

POINT_TRANSFORMER = Paper("P016", "Point Transformer", 2021, "2012.09164")


def point_transformer_flops(n: int, heads: int, head_dim: int, causal: bool, k: int = 16) -> float:
    """Forward FLOPs per sample at dim = heads·head_dim, γ expansion 4, θ hidden 64, d_pos 3."""
    dim = heads * head_dim
    projections = 3 * 2.0 * n * dim * dim
    position_mlp = n * k * 2.0 * (3 * 64 + 64 * dim)
    attention_mlp = n * k * 2.0 * (dim * 4 * dim + 4 * dim * heads)
    return projections + position_mlp + attention_mlp + 3.0 * n * n + 4.0 * n * k * dim


def knn_indices(pos: Tensor, keep: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest real points of every point (itself included): indices (batch, n, k') and a bool (batch, n, k')
    marking those that are real, k' = min(k, n)."""
    exact = pos if pos.dtype in (torch.float32, torch.float64) else pos.float()  # the choice of neighbours in ≥ float32
    dist = torch.cdist(exact, exact, compute_mode="donot_use_mm_for_euclid_dist")
    if keep is not None:
        dist = dist.masked_fill(~keep[:, None, :], float("inf"))
    nearest, idx = dist.topk(min(k, pos.shape[1]), dim=-1, largest=False)
    return idx, torch.isfinite(nearest)


def point_transformer_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    pos: Tensor,
    position_mlp: nn.Module,
    attention_mlp: nn.Module,
    *,
    neighbours: int = 16,
    keep: Tensor | None = None,
) -> Tensor:
    """y_i = Σ_{j∈kNN(i)} softmax_j(γ(φx_i − ψx_j + δ_ij)) ⊙ (αx_j + δ_ij), δ_ij = θ(p_i − p_j).

    query = φ(x), key = ψ(x), value = α(x): (batch, n, dim); pos (batch, n, d_pos); θ = position_mlp
    (d_pos → dim), γ = attention_mlp (dim → heads, heads dividing dim); keep (batch, n) True = real point.
    """
    batch, n, dim = value.shape
    idx, real = knn_indices(pos, keep, neighbours)
    rows = torch.arange(batch, device=idx.device)[:, None, None]
    delta = position_mlp(pos[:, :, None, :] - pos[rows, idx])  # (batch, n, k, dim)
    logits = attention_mlp(query[:, :, None, :] - key[rows, idx] + delta)  # (batch, n, k, heads)
    heads = logits.shape[-1]
    logits = logits.masked_fill(~real[..., None], float("-inf"))
    weights = torch.softmax(logits, dim=2).nan_to_num(0.0)  # a point with no real neighbour: zero
    messages = (value[rows, idx] + delta).unflatten(-1, (heads, dim // heads))
    return (weights[..., None] * messages).sum(2).flatten(-2)


def point_transformer_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    pos: Tensor,
    position_mlp: nn.Module,
    attention_mlp: nn.Module,
    *,
    neighbours: int = 16,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The formula over every pair (i, j) in float64, the kNN as a mask: (out (batch, n, dim), A (batch, heads, n, n))."""
    dtype = value.dtype
    q, kx, v, p = (t.double() for t in (query, key, value, pos))
    batch, n, dim = v.shape
    real = torch.ones(batch, n, dtype=torch.bool, device=v.device) if keep is None else keep
    outs: list[Tensor] = []
    weights: list[Tensor] = []
    for b in range(batch):
        distance = ((p[b, :, None, :] - p[b, None, :, :]) ** 2).sum(-1).sqrt()
        distance = distance.masked_fill(~real[b][None, :], float("inf"))
        order = distance.sort(dim=-1, stable=True).indices[:, : min(neighbours, int(real[b].sum()))]
        member = torch.zeros(n, n, dtype=torch.bool, device=v.device).scatter(1, order, True)
        delta = _mlp64(position_mlp, p[b, :, None, :] - p[b, None, :, :])  # (n, n, dim): δ_ij
        logits = _mlp64(attention_mlp, q[b, :, None, :] - kx[b, None, :, :] + delta)  # (n, n, heads)
        heads = logits.shape[-1]
        logits = logits.masked_fill(~member[..., None], float("-inf"))
        a = torch.softmax(logits, dim=1).nan_to_num(0.0)  # softmax over j, per attention channel
        channel_weights = a.repeat_interleave(dim // heads, dim=-1)  # (n, n, dim): a_ij[g(c)]
        outs.append((channel_weights * (v[b][None, :, :] + delta)).sum(1))
        weights.append(a.permute(2, 0, 1))
    return torch.stack(outs).to(dtype), torch.stack(weights).to(dtype)


def _mlp64(mlp: nn.Module, t: Tensor) -> Tensor:
    """A Linear/ReLU stack applied in float64 (the module's own weights, cast)."""
    for layer in mlp.children():
        if isinstance(layer, nn.Linear):
            bias = None if layer.bias is None else layer.bias.double()
            t = torch.nn.functional.linear(t, layer.weight.double(), bias)
        elif isinstance(layer, nn.ReLU):
            t = torch.relu(t)
        else:
            raise TypeError(f"mlp: expected Linear and ReLU layers, got {type(layer).__name__}")
    return t


def _mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, width_out))


@register(
    name="point-transformer",
    kind="set",
    paper=POINT_TRANSFORMER,
    family="A",
    cost="O(N²·d_pos + N·k·d²)",
    exponent=1.0,
    supports=Supports(key_padding=True, order_invariant=True, materialize=True),
    summary="Point Transformer: vector self-attention over the k nearest points with a relative-position MLP.",
    params=(
        Param("neighbours", int, 16, "k, the number of nearest points each point attends to (itself included)", low=1),
        Param("pos_dim", int, 3, "d_pos, the number of coordinates of a point", low=1),
        Param("pos_hidden", int, 64, "hidden width of the position MLP θ", low=1),
        Param("attention_mult", int, 4, "expansion of the attention MLP γ's hidden layer (m·dim)", low=1),
        Param("qkv_bias", bool, False, "bias in φ, ψ, α"),
    ),
    test_params={"heads": 4, "neighbours": 4},
    flops=point_transformer_flops,
)
class PointTransformerAttention(SetAttention):
    """Point Transformer layer: per point, a softmax per attention channel over its kNN of γ(φx_i − ψx_j + δ_ij),
    applied to α(x_j) + δ_ij, δ_ij = θ(p_i − p_j)."""

    translation_invariant = True

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        neighbours: int = 16,
        pos_dim: int = 3,
        pos_hidden: int = 64,
        attention_mult: int = 4,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__(dim, heads, pos_dim)
        if neighbours < 1:
            raise ParameterError(f"neighbours: expected >= 1, got {neighbours}")
        self.neighbours = neighbours
        self.query, self.key, self.value = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.position_mlp = _mlp(pos_dim, pos_hidden, dim)
        self.attention_mlp = _mlp(dim, attention_mult * dim, heads)

    def set_fast(self, x: Tensor, pos: Tensor, keep: Tensor | None) -> Tensor:
        return point_transformer_attention(self.query(x), self.key(x), self.value(x), pos, self.position_mlp,
                                           self.attention_mlp, neighbours=self.neighbours, keep=keep)

    def set_reference(self, x: Tensor, pos: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        return point_transformer_attention_reference(self.query(x), self.key(x), self.value(x), pos, self.position_mlp,
                                                     self.attention_mlp, neighbours=self.neighbours, keep=keep)
