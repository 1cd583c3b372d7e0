"""Random-feature attention regression (P032): the data on the sphere, the target and features against loops, the
ridge fit against the normal equations, invariance to the keys' order, the head means, and a fit that works."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnlab
from attnlab.tasks.random_feature_attention import (
    KeyQueryData,
    RandomFeatureAttention,
    RandomFeatureMLP,
    rf_attention_regression,
    ridge,
)


def test_registered_as_a_task_of_p032() -> None:
    spec = attnlab.get("rf-attention-regression", kind="task")
    assert spec.kind == "task" and spec.family == "G"
    assert (spec.paper.id, spec.paper.arxiv) == ("P032", "2307.11353")
    assert isinstance(spec.build(num_examples=4, target="cos"), KeyQueryData)


def test_points_are_uniform_on_the_sphere_and_independent() -> None:
    d, n = 5, 20000
    data = rf_attention_regression(n, 3, d, seed=1)
    x = torch.cat([data.query[:, None], data.keys], 1).reshape(-1, d).numpy()
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-12)
    # uniform on S^{d−1}: E x = 0, E x xᵀ = I/d; Var(x_j²) = 2/(d(d+2)) sets the tolerance of the diagonal
    assert np.abs(x.mean(0)).max() < 5 / math.sqrt(d * len(x))
    second = x.T @ x / len(x)
    assert np.abs(np.diag(second) - 1 / d).max() < 5 * math.sqrt(2 / (d * (d + 2)) / len(x))
    assert np.abs(second - np.diag(np.diag(second))).max() < 5 / (d * math.sqrt(len(x)))
    # query and key independent: E⟨x₀, x_i⟩ = 0, E⟨x₀, x_i⟩² = 1/d
    t = torch.einsum("nd,nid->ni", data.query, data.keys).reshape(-1).numpy()
    assert abs(t.mean()) < 5 / math.sqrt(d * t.size)
    assert abs((t**2).mean() - 1 / d) < 5 * t.var() * math.sqrt(2 / t.size)


@pytest.mark.parametrize(("target", "g"), [("linear", lambda t: t), ("quadratic", lambda t: t * t),
                                           ("cubic", lambda t: t**3), ("cos", lambda t: math.cos(math.pi * t))])
def test_target_is_the_mean_of_g_over_the_keys(target: str, g) -> None:
    data = rf_attention_regression(5, 4, 3, target=target, seed=2)
    for j in range(5):
        want = sum(g(float(data.query[j] @ data.keys[j, i])) for i in range(4)) / 4
        assert float(data.y[j]) == pytest.approx(want, abs=1e-14)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_features_match_the_formula(activation: str) -> None:
    d, m, n_keys = 3, 5, 4
    model = RandomFeatureAttention(d, heads=m, mean=1.5, activation=activation, seed=3)
    data = rf_attention_regression(2, n_keys, d, seed=4)
    phi = model.features(data.query, data.keys).reshape(2, m, d + 1)
    for j in range(2):
        x0 = np.append(data.query[j].numpy(), 1.0)
        xs = [np.append(data.keys[j, i].numpy(), 1.0) for i in range(n_keys)]
        for h in range(m):
            w = model.w[h].numpy()
            s = np.array([x0 @ w @ xi for xi in xs])
            a = np.exp(s - s.max()) / np.exp(s - s.max()).sum() if activation == "softmax" else np.maximum(s, 0) / n_keys
            want = sum(a[i] * xs[i] for i in range(n_keys)) / m
            assert np.allclose(phi[j, h].numpy(), want, atol=1e-14)


def test_head_matrices_have_the_stated_mean() -> None:
    d, heads, mu = 3, 4000, 2.0
    w = RandomFeatureAttention(d, heads=heads, mean=mu, seed=0).w.numpy()
    want = mu * np.diag([1.0, 1.0, 1.0, 0.0])
    assert np.abs(w.mean(0) - want).max() < 5 / math.sqrt(heads)
    assert np.abs(w.var(0) - 1).max() < 5 * math.sqrt(2 / heads)


def test_ridge_equals_the_normal_equations() -> None:
    rng = np.random.default_rng(0)
    f, y = rng.standard_normal((30, 12)), rng.standard_normal(30)
    for lam in (1e-3, 0.5, 10.0):
        want = np.linalg.solve(f.T @ f + lam * np.eye(12), f.T @ y)
        assert np.allclose(ridge(torch.from_numpy(f), torch.from_numpy(y), lam).numpy(), want, atol=1e-10)
    # more features than samples too
    f2 = rng.standard_normal((8, 20))
    want = np.linalg.solve(f2.T @ f2 + 0.1 * np.eye(20), f2.T @ y[:8])
    assert np.allclose(ridge(torch.from_numpy(f2), torch.from_numpy(y[:8]), 0.1).numpy(), want, atol=1e-10)
    # and the fitted model's values are the ridge solution on its own features
    data = rf_attention_regression(50, 4, 3, seed=5)
    model = RandomFeatureAttention(3, heads=8, seed=1).fit(data, lam=0.01)
    phi = model.features(data.query, data.keys).numpy()
    want = np.linalg.solve(phi.T @ phi + 0.01 * np.eye(phi.shape[1]), phi.T @ data.y.numpy())
    assert np.allclose(model.values.numpy(), want, atol=1e-9)


def test_attention_is_invariant_to_the_order_of_the_keys_and_the_mlp_is_not() -> None:
    train = rf_attention_regression(300, 6, 4, target="quadratic", seed=6)
    test = rf_attention_regression(20, 6, 4, target="quadratic", seed=7)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    shuffled = test.keys[:, perm]
    attention = RandomFeatureAttention(4, heads=32, seed=2).fit(train)
    mlp = RandomFeatureMLP(4, 6, num_features=256, seed=2).fit(train)
    assert torch.allclose(attention.predict(test.query, shuffled), attention.predict(test.query, test.keys), atol=1e-12)
    assert (mlp.predict(test.query, shuffled) - mlp.predict(test.query, test.keys)).abs().max() > 1e-3


def test_relu_attention_fits_the_linear_target_better_than_the_mlp() -> None:
    train = rf_attention_regression(1000, 4, 4, target="linear", seed=0)
    test = rf_attention_regression(2000, 4, 4, target="linear", seed=1)
    var = float(test.y.var())
    attention = RandomFeatureAttention(4, heads=256, seed=0).fit(train, lam=1e-4)
    mlp = RandomFeatureMLP(4, 4, num_features=1024, seed=0).fit(train, lam=1e-4)
    err_attention = float((attention.predict(test.query, test.keys) - test.y).pow(2).mean()) / var
    err_mlp = float((mlp.predict(test.query, test.keys) - test.y).pow(2).mean()) / var
    assert err_attention < 0.05 and err_attention < err_mlp


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="target"):
        rf_attention_regression(3, target="sine")
    with pytest.raises(ValueError, match="activation"):
        RandomFeatureAttention(3, activation="tanh")
    with pytest.raises(ValueError, match="lam"):
        ridge(torch.ones(3, 2), torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="fitted"):
        RandomFeatureAttention(3).predict(torch.ones(1, 3), torch.ones(1, 2, 3))
