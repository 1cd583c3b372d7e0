"""P010 rank collapse: residual to rank-1, and random attention stacks with/without skip."""
import itertools

import pytest
import torch

import attnlab
from attnlab.analysis.rank_collapse import rank_collapse_experiment, relative_residual, residual, residual_norm


def test_residual_hand_computed_3x2():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]], dtype=torch.float64)
    # column means (3, 5)
    expected = torch.tensor([[-2.0, -3.0], [0.0, -1.0], [2.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(residual(x), expected)
    assert residual_norm(x).item() == pytest.approx((4 + 9 + 0 + 1 + 4 + 16) ** 0.5)


@pytest.mark.parametrize("norm", ["fro", "l1inf"])
def test_rank_one_has_zero_residual(norm):
    c = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    x = torch.ones(4, 1, dtype=torch.float64) * c[None, :]
    assert residual_norm(x, norm).item() == pytest.approx(0.0, abs=1e-9)


def _l1inf_of(x, c):
    r = (x - c[None, :]).abs()
    return (r.sum(0).max() * r.sum(1).max()).sqrt().item()


def test_l1inf_residual_is_the_minimum_over_a_grid():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0], [7.0, 1.0]], dtype=torch.float64)
    lp = residual_norm(x, "l1inf").item()
    grid = torch.linspace(-1.0, 8.0, 361, dtype=torch.float64)  # step 0.025
    brute = min(_l1inf_of(x, torch.stack([a, b])) for a, b in itertools.product(grid, grid))
    assert lp <= brute + 1e-9
    assert lp >= brute - 0.025 * 4  # the objective is at most (2·n)-Lipschitz per grid step in each coordinate
    r = residual(x, "l1inf")
    assert _l1inf_of(r, torch.zeros(2, dtype=torch.float64)) == pytest.approx(lp)
    # the composite norm's centre is not the mean here
    assert lp < _l1inf_of(x, x.mean(0)) - 1e-3


def test_relative_residual_starts_at_one():
    h = [torch.randn(2, 5, 3, dtype=torch.float64) for _ in range(3)]
    rel = relative_residual(h)
    assert rel.shape == (3, 2)
    torch.testing.assert_close(rel[0], torch.ones(2, dtype=torch.float64))
    manual = (h[2][1] - h[2][1].mean(0)).norm() / (h[0][1] - h[0][1].mean(0)).norm()
    assert rel[2, 1].item() == pytest.approx(manual.item())


def test_pure_softmax_attention_collapses_and_skip_prevents_it():
    # setting: softmax, dim 32, 4 heads, n 16 tokens, X ~ N(0, 1), PyTorch default init, float64
    r = rank_collapse_experiment("softmax", depth=6, dim=32, heads=4, n=16, seed=0, batch=2)
    assert set(r) == {"attention", "attention+skip", "attention+mlp", "attention+skip+mlp"}
    pure, skip = r["attention"], r["attention+skip"]
    assert pure.shape == (7, 2)
    assert (pure[6] < 1e-2).all()
    assert (pure[2] < pure[1]).all()  # falls layer after layer
    assert (skip > 0.5).all()
    assert (r["attention+skip+mlp"] > 0.5).all()


def test_experiment_runs_on_another_mechanism_and_l1inf():
    r = rank_collapse_experiment("alibi", depth=3, dim=8, heads=2, n=6, seed=1, norm="l1inf",
                                 variants=("attention", "attention+skip"))
    assert r["attention"][3].item() < r["attention+skip"][3].item()


def test_registered_and_bad_inputs():
    assert attnlab.get("rank-collapse", kind="analysis").paper.id == "P010"
    assert attnlab.get("rank-residual", kind="analysis").paper.id == "P010"
    with pytest.raises(ValueError, match="norm"):
        residual(torch.zeros(3, 2), "l2")
    with pytest.raises(ValueError, match="variants"):
        rank_collapse_experiment("softmax", depth=1, dim=4, heads=1, n=3, variants=("skip",))
    with pytest.raises(ValueError, match="x"):
        residual(torch.zeros(3))
