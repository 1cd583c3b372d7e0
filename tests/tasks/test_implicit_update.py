"""The implicit rank-1 update of P154: W A(C, x) = (W + ΔW) A(x) to 1e-10 in float64 on random attnlab blocks,
rank ΔW = 1, the telescoping sequence of updates as tokens arrive, and a planted error caught."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.tasks.implicit_update import (
    ContextualBlock,
    ImplicitUpdateProblem,
    attention_at_query,
    implicit_update_problem,
    rank_one_update,
)


def test_registered_as_a_task_of_p154() -> None:
    spec = attnlab.get("implicit-update", kind="task")
    assert spec.kind == "task" and spec.family == "G"
    assert (spec.paper.id, spec.paper.arxiv) == ("P154", "2507.16003")
    assert isinstance(spec.build(batch=2, context_length=3, dim=4, hidden=5, heads=1), ImplicitUpdateProblem)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "dim", "hidden", "heads"), [(1, 4, 6, 1), (7, 8, 16, 2), (12, 16, 8, 4)])
def test_context_equals_a_rank_one_weight_update(seed: int, n: int, dim: int, hidden: int, heads: int) -> None:
    p = implicit_update_problem(batch=3, context_length=n, dim=dim, hidden=hidden, heads=heads, seed=seed)
    block = p.block
    with torch.no_grad():
        delta = block.implicit_update(p.context, p.x)
        alone = attention_at_query(block.attention, p.context[:, :0], p.x)
        with_context = attention_at_query(block.attention, p.context, p.x)
        w = block.first.weight
        # the first layer: W A(C, x) = (W + ΔW) A(x), per example
        lhs = with_context @ w.T
        rhs = torch.einsum("bod,bd->bo", w + delta, alone)
        assert (lhs - rhs).abs().max() < 1e-10
        # the whole block: T(C, x) = MLP_{W + ΔW}(A(x)), the updated weight put in a copy of the layer
        for b in range(3):
            layer = torch.nn.Linear(dim, hidden).double()
            layer.weight.copy_(w + delta[b])
            layer.bias.copy_(block.first.bias)
            out = block.second(block.activation(layer(alone[b])))
            assert (out - block(p.context[b : b + 1], p.x[b : b + 1])[0]).abs().max() < 1e-10
        # rank 1: one nonzero singular value
        s = torch.linalg.svdvals(delta)
        assert (s[:, 0] > 1e-6).all() and (s[:, 1:] < 1e-10 * s[:, :1]).all()


def test_update_sequence_telescopes_and_each_step_is_rank_one() -> None:
    p = implicit_update_problem(batch=2, context_length=6, dim=8, hidden=12, heads=2, seed=4)
    with torch.no_grad():
        seq = p.block.update_sequence(p.context, p.x)  # (2, 7, hidden, dim)
        assert seq[:, 0].abs().max() == 0
        assert (seq[:, -1] - p.block.implicit_update(p.context, p.x)).abs().max() < 1e-12
        alone = attention_at_query(p.block.attention, p.context[:, :0], p.x)
        w = p.block.first.weight
        for i in range(6):
            prefix = p.context[:, : i + 1]
            # W_i applied to A(x) reproduces the block's first layer on the prefix c₁ … c_i
            got = torch.einsum("bod,bd->bo", w + seq[:, i + 1], alone)
            assert (got - attention_at_query(p.block.attention, prefix, p.x) @ w.T).abs().max() < 1e-10
            step = seq[:, i + 1] - seq[:, i]
            s = torch.linalg.svdvals(step)
            assert (s[:, 1:] < 1e-9 * s[:, :1]).all(), "each step is rank 1"
            # the step is an online-GD step: W_{i+1} = W_i − (1/‖A(x)‖²) Δ_i, Δ_i = W (A_i − A_{i+1}) A(x)ᵀ
            a_i = attention_at_query(p.block.attention, p.context[:, :i], p.x)
            a_next = attention_at_query(p.block.attention, prefix, p.x)
            grad = torch.einsum("od,bd,be->boe", w, a_i - a_next, alone)
            assert (step + grad / alone.pow(2).sum(-1)[:, None, None]).abs().max() < 1e-10


def test_identity_holds_for_other_mechanisms_and_causal_attention() -> None:
    torch.manual_seed(0)
    for attention in (attnlab.build("softmax", dim=8, heads=2, causal=True), attnlab.build("linear", dim=8, heads=2)):
        block = ContextualBlock(attention, 8, 10).double()
        context, x = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
        with torch.no_grad():
            delta = block.implicit_update(context, x)
            alone = attention_at_query(attention, context[:, :0], x)
            lhs = attention_at_query(attention, context, x) @ block.first.weight.T
            assert (lhs - torch.einsum("bod,bd->bo", block.first.weight + delta, alone)).abs().max() < 1e-10


def test_a_planted_error_is_detected() -> None:
    # a wrong update (A(x) in place of A(C, x) − A(x), or the other order of the outer product) breaks the identity
    p = implicit_update_problem(batch=2, context_length=5, dim=6, hidden=7, heads=2, seed=9)
    with torch.no_grad():
        alone = attention_at_query(p.block.attention, p.context[:, :0], p.x)
        with_context = attention_at_query(p.block.attention, p.context, p.x)
        w = p.block.first.weight
        lhs = with_context @ w.T
        wrong = (with_context @ w.T)[:, :, None] * alone[:, None, :] / alone.pow(2).sum(-1)[:, None, None]
        assert (torch.einsum("bod,bd->bo", w + wrong, alone) - lhs).abs().max() > 1e-3
        right = rank_one_update(w, with_context, alone)
        assert (torch.einsum("bod,bd->bo", w + right, alone) - lhs).abs().max() < 1e-10


def test_bad_inputs_raise() -> None:
    p = implicit_update_problem(batch=2, context_length=3, dim=4, hidden=5, heads=1)
    with pytest.raises(ValueError, match="context"):
        attention_at_query(p.block.attention, p.context[:1], p.x)
    with pytest.raises(ValueError, match="A\\(x\\)"):
        rank_one_update(p.block.first.weight, torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim"):
        implicit_update_problem(dim=0)
    with pytest.raises(ValueError, match="seed: expected an int >= 0, got 'x'"):
        implicit_update_problem(seed="x")
    with pytest.raises(ValueError, match="context_length: expected an int >= 0, got -1"):
        implicit_update_problem(context_length=-1)
