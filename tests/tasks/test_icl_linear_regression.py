"""In-context linear regression (P075): the data's moments, the baselines against forms derived here independently,
the Bayes predictor's optimality, the one-step-GD risk formula and the small softmax model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab.tasks.icl_linear_regression import (
    ICLRegressionData,
    SoftmaxICLRegressor,
    bayes_predict,
    gd_predict,
    gd_risk,
    icl_linear_regression,
    optimal_gd_step,
    ridge_predict,
    train_icl_regressor,
    weight_patterns,
)


def test_registered_as_a_task_of_p075() -> None:
    spec = attnlab.get("icl-linear-regression", kind="task")
    assert spec.kind == "task" and spec.family == "G"
    assert (spec.paper.id, spec.paper.arxiv, spec.paper.year) == ("P075", "2503.12734", 2025)
    data = spec.build(num_examples=3, num_context=5, dim=2)
    assert isinstance(data, ICLRegressionData) and len(data) == 3


def test_tokens_hold_the_pairs_and_a_zero_label_query() -> None:
    data = icl_linear_regression(4, 6, 3, noise_std=0.1, seed=1)
    z = data.tokens
    assert z.shape == (4, 7, 4)
    assert torch.equal(z[:, :6, :3], data.x) and torch.equal(z[:, :6, 3], data.y)
    assert torch.equal(z[:, 6, :3], data.x_query) and bool((z[:, 6, 3] == 0).all())


def test_moments_match_the_generative_model() -> None:
    sigma = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    noise, n = 0.4, 40000
    data = icl_linear_regression(n, 4, 3, noise_std=noise, covariance=sigma, seed=2)
    x = data.x.reshape(-1, 3).numpy()
    # sample covariance entries have standard error sqrt((Σ_ij² + Σ_ii Σ_jj) / count)
    se = np.sqrt((sigma**2 + np.outer(np.diag(sigma), np.diag(sigma))) / x.shape[0])
    assert np.all(np.abs(np.cov(x.T, bias=True) - sigma) < 5 * se)
    assert np.all(np.abs(x.mean(0)) < 5 * np.sqrt(np.diag(sigma) / x.shape[0]))
    w = data.w.numpy()
    assert np.all(np.abs(np.cov(w.T, bias=True) - np.eye(3)) < 5 * np.sqrt(2 / n))
    resid = (data.y - torch.einsum("nid,nd->ni", data.x, data.w)).reshape(-1).numpy()
    assert abs(resid.var() - noise**2) < 5 * noise**2 * np.sqrt(2 / resid.size)
    # E[y²] = E[wᵀ x xᵀ w] + σ² = tr Σ + σ²
    y2 = data.y_query.numpy() ** 2
    assert abs(y2.mean() - (np.trace(sigma) + noise**2)) < 5 * y2.std() / np.sqrt(n)
    # the query is drawn like the context: same covariance
    xq = data.x_query.numpy()
    assert np.all(np.abs(np.cov(xq.T, bias=True) - sigma) < 5 * np.sqrt((sigma**2 + 1) / n) * 2)


def test_ridge_equals_the_augmented_least_squares_solution() -> None:
    data = icl_linear_regression(20, 7, 4, noise_std=0.3, seed=3)
    lam = 0.7
    got = ridge_predict(data, lam).numpy()
    for i in range(20):
        # min ‖Xw − y‖² + λ‖w‖² = least squares on [X; √λ I] w ≈ [y; 0]
        a = np.vstack([data.x[i].numpy(), np.sqrt(lam) * np.eye(4)])
        b = np.concatenate([data.y[i].numpy(), np.zeros(4)])
        w = np.linalg.lstsq(a, b, rcond=None)[0]
        assert got[i] == pytest.approx(float(w @ data.x_query[i].numpy()), abs=1e-10)


def test_bayes_equals_the_gaussian_conditional_mean() -> None:
    # (y, y_q) given X, x_q is jointly Gaussian: Cov(y) = XXᵀ + σ²I, Cov(y_q, y) = x_qᵀXᵀ (w ~ N(0, I)),
    # so E[y_q | y] = x_qᵀ Xᵀ (XXᵀ + σ²I)⁻¹ y — the kernel form, not the ridge formula
    noise = 0.5
    sigma = np.diag([3.0, 1.0, 0.2])
    data = icl_linear_regression(15, 5, 3, noise_std=noise, covariance=sigma, seed=4)
    got = bayes_predict(data).numpy()
    for i in range(15):
        x, y, xq = data.x[i].numpy(), data.y[i].numpy(), data.x_query[i].numpy()
        want = xq @ x.T @ np.linalg.solve(x @ x.T + noise**2 * np.eye(5), y)
        assert got[i] == pytest.approx(float(want), abs=1e-10)


def test_one_step_gd_is_a_gradient_step_from_zero() -> None:
    data = icl_linear_regression(6, 9, 3, noise_std=0.2, seed=5)
    step = 0.8
    got = gd_predict(data, step)
    for i in range(6):
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        loss = 0.5 * (data.y[i] - data.x[i] @ w).pow(2).mean()
        (grad,) = torch.autograd.grad(loss, w)
        assert float(got[i]) == pytest.approx(float(data.x_query[i] @ (-step * grad)), abs=1e-12)


def test_bayes_has_the_least_expected_error() -> None:
    noise, n = 0.8, 20000
    data = icl_linear_regression(n, 6, 4, noise_std=noise, seed=6)
    err_bayes = (bayes_predict(data) - data.y_query).pow(2)
    rivals = {f"ridge {lam}": ridge_predict(data, lam) for lam in (0.1 * noise**2, 0.3 * noise**2, 3 * noise**2, 10 * noise**2)}
    rivals["gd"] = gd_predict(data, optimal_gd_step(6, 4, noise))
    for name, pred in rivals.items():
        diff = ((pred - data.y_query).pow(2) - err_bayes).numpy()  # paired: same problems
        assert diff.mean() > 4 * diff.std() / np.sqrt(n), name


def test_gd_risk_formula_and_optimal_step_match_simulation() -> None:
    n_ctx, dim, noise, n = 8, 3, 0.5, 40000
    data = icl_linear_regression(n, n_ctx, dim, noise_std=noise, seed=7)
    best = optimal_gd_step(n_ctx, dim, noise)
    assert best == pytest.approx(8 / (8 + 3 + 1 + 0.25))
    for step in (0.5 * best, best, 1.5 * best):
        err = (gd_predict(data, step) - data.y_query).pow(2).numpy()
        assert abs(err.mean() - gd_risk(step, n_ctx, dim, noise)) < 5 * err.std() / np.sqrt(n), step
    # the risk is least at η*
    assert gd_risk(best, n_ctx, dim, noise) < min(gd_risk(best * f, n_ctx, dim, noise) for f in (0.9, 1.1))


@torch.no_grad()
def test_softmax_model_matches_its_formula() -> None:
    model = SoftmaxICLRegressor(2, heads=3, init_std=0.5, generator=torch.Generator().manual_seed(0))
    data = icl_linear_regression(4, 5, 2, noise_std=0.1, seed=8)
    got = model(data.tokens)
    for b in range(4):
        z, zq = data.tokens[b, :-1], data.tokens[b, -1]
        total = 0.0
        for h in range(3):
            s = [float(z[i] @ model.kq[h] @ zq) for i in range(5)]
            e = np.exp(np.array(s) - max(s))
            total += sum(e[i] / e.sum() * float(model.ov[h] @ z[i]) for i in range(5))
        assert float(got[b]) == pytest.approx(total, abs=1e-12)


def test_training_beats_the_zero_predictor() -> None:
    torch.manual_seed(0)
    model = SoftmaxICLRegressor(2, heads=4, generator=torch.Generator().manual_seed(1))
    train_icl_regressor(model, num_context=12, steps=200, batch=128, lr=0.03, seed=0)
    test = icl_linear_regression(4000, 12, 2, seed=99)
    with torch.no_grad():
        mse = float((model(test.tokens) - test.y_query).pow(2).mean())
    # the zero predictor's risk is E y_q² = d = 2; one-step GD at its best step reaches d(1 − η*) ≈ 0.40
    assert mse < 0.6


@torch.no_grad()
def test_weight_patterns_are_zero_on_the_predicted_pattern() -> None:
    model = SoftmaxICLRegressor(3, heads=2)
    model.kq.zero_()
    model.kq[0, :3, :3] = 0.7 * torch.eye(3)
    model.kq[1, :3, :3] = -0.7 * torch.eye(3)
    model.ov.zero_()
    model.ov[:, 3] = torch.tensor([1.5, -1.5])
    assert all(abs(v) < 1e-12 for v in weight_patterns(model).values())
    # each measure sees its own departure
    model.kq[1, 0, 1] = 0.7
    model.kq[1, 2, 2] = -0.35
    model.ov[0, 0] = 1.0
    model.ov[1, 3] = -0.5
    got = weight_patterns(model)
    assert got["kq_offdiag"] == pytest.approx(0.7 / float(model.kq[:, :3, :3].norm()))
    assert got["ov_not_last"] == pytest.approx(1.0 / float(model.ov.norm()))
    assert got["ov_sum"] == pytest.approx(1.0 / 2.0)
    scales = torch.tensor([0.7, (0.7 + 0.7 + 0.35) / 3])
    assert got["kq_inhomogeneous"] == pytest.approx(float(scales.std(unbiased=False) / scales.mean()))


def test_seeds_reproduce_and_differ() -> None:
    a, b, c = (icl_linear_regression(5, 4, 2, 0.1, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert icl_linear_regression(2, 3, 2, dtype=torch.float32).x.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 0}, "num_examples"),
        ({"dim": 2.5}, "dim"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"covariance": np.eye(3)}, "covariance: expected shape"),
        ({"covariance": np.array([[1.0, 2.0], [2.0, 1.0]])}, "positive definite"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, match: str) -> None:
    args = {"num_examples": 3, "num_context": 4, "dim": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        icl_linear_regression(**args)


def test_noiseless_bayes_needs_enough_points() -> None:
    with pytest.raises(ValueError, match="noise_std"):
        bayes_predict(icl_linear_regression(3, 2, 4, seed=0))
