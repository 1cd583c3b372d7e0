"""The implicit rank-1 weight update of a transformer block (P154, Dherin et al. 2025).

A contextual block reads a query token x with a context C = (c₁, …, c_n) through an attention layer and
then an MLP whose first layer has the weight W:

    T(C, x) = MLP_W(A(C, x)),   A(C, x) = the attention output at x over the tokens (c₁, …, c_n, x)

and A(x) = A(∅, x) is the output without context. The paper's theorem: the context acts on the block
exactly as a rank-1 change of W,

    W A(C, x) = (W + ΔW(C)) A(x),   ΔW(C) = W (A(C, x) − A(x)) A(x)ᵀ / ‖A(x)‖²

so T(C, x) = MLP_{W + ΔW(C)}(A(x)) (the bias and the later layers are untouched). Reading the context one
token at a time gives the weights W_i = W + ΔW(c₁ … c_i), i = 0 … n (W₀ = W), whose steps

    W_{i+1} − W_i = W (A(c₁ … c_{i+1}, x) − A(c₁ … c_i, x)) A(x)ᵀ / ‖A(x)‖²

are each rank 1 as well: the paper reads them as online gradient steps with learning rate 1/‖A(x)‖²
on the losses L_i(W) = tr(Δ_iᵀ W), Δ_i = W (A(c₁ … c_i, x) − A(c₁ … c_{i+1}, x)) A(x)ᵀ (the gradient of L_i
is Δ_i, so W_{i+1} = W_i − (1/‖A(x)‖²) ∇L_i). Any attnlab mechanism (batch, n, dim) -> (batch, n, dim) can
be the attention layer; the identity is exact whatever it is, softmax or not, causal or not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..mechanisms.dense.softmax import SoftmaxAttention
from ._checks import check_count

IMPLICIT_DYNAMICS = Paper("P154", "Learning without training: The implicit dynamics of in-context learning", 2025, "2507.16003")


def attention_at_query(attention: nn.Module, context: Tensor, x: Tensor) -> Tensor:
    """A(C, x): the output of `attention` at the last token of (c₁, …, c_n, x); context (batch, n, dim), n ≥ 0,
    x (batch, dim) -> (batch, dim)."""
    if x.dim() != 2:
        raise ShapeError(f"x: expected (batch, dim), got shape {tuple(x.shape)}")
    if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != x.shape[1]:
        raise ShapeError(f"context: expected (batch={x.shape[0]}, n, dim={x.shape[1]}), got shape {tuple(context.shape)}")
    return attention(torch.cat([context, x[:, None]], 1))[:, -1]


def rank_one_update(weight: Tensor, with_context: Tensor, alone: Tensor) -> Tensor:
    """ΔW = W (A(C, x) − A(x)) A(x)ᵀ / ‖A(x)‖²: weight (out, dim), the two outputs (batch, dim) -> (batch, out, dim)."""
    if weight.dim() != 2 or weight.shape[1] != alone.shape[-1]:
        raise ShapeError(f"weight: expected (out, dim={alone.shape[-1]}), got shape {tuple(weight.shape)}")
    norm2 = alone.pow(2).sum(-1)
    if bool((norm2 == 0).any()):
        raise ValueError("x: expected A(x) != 0 (the update divides by ‖A(x)‖²), got an A(x) of norm 0")
    change = (with_context - alone) @ weight.T  # (batch, out): W (A(C, x) − A(x))
    return change[:, :, None] * alone[:, None, :] / norm2[:, None, None]


class ContextualBlock(nn.Module):
    """T(C, x) = MLP(A(C, x)), the MLP's first layer `first` (weight W, bias b), then `activation`, then `second`."""

    def __init__(self, attention: nn.Module, dim: int, hidden: int) -> None:
        super().__init__()
        self.attention = attention
        self.first = nn.Linear(dim, hidden)
        self.activation = nn.GELU()
        self.second = nn.Linear(hidden, dim)

    def mlp(self, a: Tensor, delta: Tensor | None = None) -> Tensor:
        """MLP_{W + ΔW}(a): a (batch, dim), delta ΔW (batch, hidden, dim) or None (ΔW = 0)."""
        h = self.first(a)
        if delta is not None:
            h = h + torch.einsum("bod,bd->bo", delta, a)
        return self.second(self.activation(h))

    def forward(self, context: Tensor, x: Tensor) -> Tensor:
        """T(C, x), (batch, dim)."""
        return self.mlp(attention_at_query(self.attention, context, x))

    def implicit_update(self, context: Tensor, x: Tensor) -> Tensor:
        """ΔW(C) for the first MLP layer, (batch, hidden, dim): T(C, x) = MLP_{W + ΔW(C)}(A(x))."""
        alone = attention_at_query(self.attention, context[:, :0], x)
        return rank_one_update(self.first.weight, attention_at_query(self.attention, context, x), alone)

    def update_sequence(self, context: Tensor, x: Tensor) -> Tensor:
        """ΔW(c₁ … c_i) for i = 0 … n as the tokens arrive, (batch, n + 1, hidden, dim); the first is 0."""
        alone = attention_at_query(self.attention, context[:, :0], x)
        outputs = [attention_at_query(self.attention, context[:, :i], x) for i in range(context.shape[1] + 1)]
        return torch.stack([rank_one_update(self.first.weight, a, alone) for a in outputs], 1)


@dataclass(frozen=True)
class ImplicitUpdateProblem:
    """A random contextual block and inputs: `block` (its attention an attnlab softmax layer), `context`
    (batch, n, dim) and `x` (batch, dim)."""

    block: ContextualBlock
    context: Tensor
    x: Tensor


def implicit_update_problem(
    batch: int = 4,
    context_length: int = 8,
    dim: int = 16,
    hidden: int = 32,
    heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ImplicitUpdateProblem:
    """A random block (attnlab softmax attention + GELU MLP) and Gaussian context and query tokens, seeded."""
    for name, value in (("batch", batch), ("dim", dim), ("hidden", hidden), ("heads", heads)):
        check_count(name, value)
    check_count("context_length", context_length, low=0)
    check_count("seed", seed, low=0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = ContextualBlock(SoftmaxAttention(dim, heads), dim, hidden).to(dtype)
    context = torch.randn(batch, context_length, dim, generator=generator, dtype=dtype)
    x = torch.randn(batch, dim, generator=generator, dtype=dtype)
    return ImplicitUpdateProblem(block, context, x)


add(
    Spec(
        name="implicit-update",
        kind="task",
        paper=IMPLICIT_DYNAMICS,
        factory=implicit_update_problem,
        family="G",
        summary="the context as a rank-1 update of the MLP weight: W A(C, x) = (W + ΔW(C)) A(x), and its sequence",
        params=(
            Param("batch", int, 4, "number of (context, query) pairs", low=1),
            Param("context_length", int, 8, "context tokens n", low=0),
            Param("dim", int, 16, "model width", low=1),
            Param("hidden", int, 32, "MLP width", low=1),
            Param("heads", int, 2, "attention heads", low=1),
            Param("seed", int, 0, "seed of the block and the tokens"),
        ),
    )
)
