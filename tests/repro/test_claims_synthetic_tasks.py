"""The family G claims (P075, P154, P180, P032, P037): each statistic on planted cases whose value is known, and
a planted fault that turns the verdict."""
from __future__ import annotations

import math

import pytest
import torch
from claim_lookup import claim  # tests/repro/claim_lookup.py
from torch import nn

import attnlab.repro.claims.synthetic_tasks as st
from attnlab.repro.claim import t_interval
from attnlab.tasks.icl_linear_regression import gd_predict, icl_linear_regression, optimal_gd_step
from attnlab.tasks.layernorm_expressivity import KeySets
from attnlab.tasks.random_feature_attention import rf_attention_regression, ridge, target_values

IDS = ("P075-multihead-beats-single", "P075-reaches-debiased-gd", "P154-rank-one-identity", "P154-online-gd",
       "P180-memorization", "P032-attention-beats-mlp", "P032-nonzero-mean", "P037-scaling-all-selectable",
       "P037-projection-majority")


def verdict(claim_id: str, values: list[float]) -> str:
    _, low, high = t_interval(values)
    return claim(claim_id).rule.verdict(low, high)


@pytest.fixture(autouse=True)
def fresh_caches():
    st.icl_experiment.cache_clear()
    st.rfa_curves.cache_clear()
    yield
    st.icl_experiment.cache_clear()
    st.rfa_curves.cache_clear()


def test_all_registered_with_their_papers() -> None:
    for claim_id in IDS:
        c = claim(claim_id)
        assert c.paper.id == claim_id[:4] and c.seeds >= 3 and c.budget_s <= 300


# -- P075 ---------------------------------------------------------------------------------------------------
class PlantedRegressor(nn.Module):
    """One-step GD at η* exactly; with one head, GD plus the bias term mean(y) a single head cannot cancel."""

    def __init__(self, dim: int, heads: int = 4, generator: torch.Generator | None = None, **_: object) -> None:
        super().__init__()
        self.heads = heads
        self.weight = nn.Parameter(torch.zeros(dim + 1, dim + 1, dtype=torch.float64))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, y, xq = tokens[:, :-1, :-1], tokens[:, :-1, -1], tokens[:, -1, :-1]
        step = optimal_gd_step(x.shape[1], x.shape[2], st.ICL_SETTING["smoke"]["noise"])
        gd = step / x.shape[1] * torch.einsum("bid,bi,bd->b", x, y, xq)
        return gd if self.heads > 1 else gd + y.mean(1)


def test_p075_statistics_on_a_planted_gd_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "SoftmaxICLRegressor", PlantedRegressor)
    monkeypatch.setattr(st, "train_icl_regressor", lambda *a, **k: [])
    monkeypatch.setattr(st, "weight_patterns", lambda model: {})
    s = st.ICL_SETTING["smoke"]
    test = icl_linear_regression(s["test"], s["context"], s["dim"], s["noise"], seed=10_000 + 1)
    gd = gd_predict(test, optimal_gd_step(s["context"], s["dim"], s["noise"]))
    single = float((gd + test.y.mean(1) - test.y_query).pow(2).mean())
    reached = st.icl_gd(1, "smoke")
    assert reached.value == pytest.approx(1.0, abs=1e-12)
    multi = st.icl_multihead(1, "smoke")
    assert multi.value == pytest.approx(float((gd - test.y_query).pow(2).mean()) / single, rel=1e-12)
    assert multi.value < 0.9
    # a planted fault: the H-head model gets the single head's bias too -> no gain, not reproduced
    monkeypatch.setattr(PlantedRegressor, "forward", lambda self, t: t[:, :-1, -1].mean(1))
    st.icl_experiment.cache_clear()
    assert verdict("P075-multihead-beats-single", [st.icl_multihead(seed, "smoke").value for seed in range(3)]) \
        == "not reproduced"


def test_p075_smoke_runs() -> None:
    m = claim("P075-reaches-debiased-gd")(0, "smoke")
    assert m.value > 0 and m.extra["Bayes"] < m.extra["one-step GD (η*)"]


# -- P154 ---------------------------------------------------------------------------------------------------
def test_p154_identity_is_round_off_and_a_wrong_update_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    values = [st.implicit_identity(seed, "smoke").value for seed in range(3)]
    assert max(values) < 1e-13 and verdict("P154-rank-one-identity", values) == "reproduced"
    exact = st.ContextualBlock.implicit_update

    def rank_two(self, context, x):  # the same action on A(x), plus a direction orthogonal to A(x): rank 2
        delta = exact(self, context, x)
        a = self.attention(x[:, None])[:, -1]
        side = torch.randn_like(a)
        side = side - (side * a).sum(-1, keepdim=True) / a.pow(2).sum(-1, keepdim=True) * a
        return delta + 1e-3 * torch.randn(delta.shape[:2], dtype=a.dtype)[:, :, None] * side[:, None, :]

    monkeypatch.setattr(st.ContextualBlock, "implicit_update", rank_two)
    found = st.implicit_identity(0, "smoke")
    assert found.extra["max relative error"] < 1e-13 and found.extra["max σ₂/σ₁ of ΔW"] > 1e-6
    monkeypatch.setattr(st.ContextualBlock, "implicit_update", lambda self, c, x: 1.01 * exact(self, c, x))
    values = [st.implicit_identity(seed, "smoke").value for seed in range(3)]
    assert verdict("P154-rank-one-identity", values) == "not reproduced"


def test_p154_online_loss_is_the_block_loss_on_each_prefix() -> None:
    s = st.ONLINE_SETTING["smoke"]
    found = st.online_gd(2, "smoke")
    block = st.train_regression_block(2, s)
    test = icl_linear_regression(s["test"], s["context"], s["dim"], seed=10_000 + 2)
    tokens = st.pad_tokens(test.tokens, s["width"])
    with torch.no_grad():
        first = float((block(tokens[:, :0], tokens[:, -1])[:, s["dim"]] - test.y_query).pow(2).mean())
        last = float((block(tokens[:, :-1], tokens[:, -1])[:, s["dim"]] - test.y_query).pow(2).mean())
    assert found.extra["loss, no context"] == pytest.approx(first, rel=1e-9)
    assert found.value == pytest.approx(last / first, rel=1e-9)
    # an untrained block (5 steps) does not learn from its context: the verdict is not "reproduced"
    assert verdict("P154-online-gd", [st.online_gd(seed, "smoke").value for seed in range(3)]) != "reproduced"


# -- P180 ---------------------------------------------------------------------------------------------------
def test_p180_memorises_and_contradictory_labels_are_not_memorised(monkeypatch: pytest.MonkeyPatch) -> None:
    assert st.memorize(0, "smoke").value == 1.0
    real = st.memorization_data

    def contradictory(n, **kwargs):  # every sequence twice, once with each label: at most half can be right
        data = real(n // 2, **kwargs)
        return type(data)(data.inputs.repeat(2, 1), torch.cat([data.labels, 1 - data.labels]))

    monkeypatch.setattr(st, "memorization_data", contradictory)
    values = [st.memorize(seed, "smoke").value for seed in range(3)]
    assert max(values) <= 0.5 and verdict("P180-memorization", values) == "not reproduced"


# -- P032 ---------------------------------------------------------------------------------------------------
class Oracle:
    """Predicts `factor` × the target exactly."""

    factor = 1.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def features(self, query, keys):
        return query.new_zeros(query.shape[0], 1)

    def predict(self, query, keys):
        return self.factor * target_values(query, keys, st.RFA_TARGET)


class HalfOracle(Oracle):
    factor = 0.5


class Zero(Oracle):
    factor = 0.0


def test_p032_ridge_is_the_task_modules_ridge() -> None:
    g = torch.Generator().manual_seed(0)
    features, y = torch.randn(60, 25, generator=g, dtype=torch.float64), torch.randn(60, generator=g, dtype=torch.float64)
    normal = torch.linalg.solve(features.T @ features + 0.3 * torch.eye(25, dtype=torch.float64), features.T @ y)
    assert torch.allclose(st.augmented_ridge(features, y, 0.3), normal, rtol=1e-10, atol=1e-12)
    assert torch.allclose(st.augmented_ridge(features, y, 0.3), ridge(features, y, 0.3), rtol=1e-10, atol=1e-12)


def test_p032_ratios_of_planted_predictors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "RandomFeatureAttention", Oracle)
    monkeypatch.setattr(st, "RandomFeatureMLP", HalfOracle)
    assert st.rfa_measure(0, "smoke", "attention, W mean 0", "random-feature MLP").value == 0.0
    test = rf_attention_regression(st.RFA_SETTING["smoke"]["test"], st.RFA_KEYS, st.RFA_DIM, st.RFA_TARGET,
                                   seed=10_000)
    curves = st.rfa_curves(0, "smoke")
    assert curves["random-feature MLP"][-1] == pytest.approx(float((test.y / 2).pow(2).mean() / test.y.var()))
    # a planted fault: attention predicts 0, the MLP half the target -> error ratio 4, not reproduced
    monkeypatch.setattr(st, "RandomFeatureAttention", Zero)
    st.rfa_curves.cache_clear()
    values = [st.rfa_measure(seed, "smoke", "attention, W mean 0", "random-feature MLP").value for seed in range(3)]
    assert values == pytest.approx([4.0] * 3) and verdict("P032-attention-beats-mlp", values) == "not reproduced"


def test_p032_smoke_runs() -> None:
    m = claim("P032-nonzero-mean")(0, "smoke")
    assert m.value > 0 and len(m.series) == 3


# -- P037 ---------------------------------------------------------------------------------------------------
def test_p037_counts_on_a_planted_square(monkeypatch: pytest.MonkeyPatch) -> None:
    square = torch.tensor([[[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.1, 0.0]]], dtype=torch.float64)
    monkeypatch.setattr(st, "random_key_sets", lambda **kw: KeySets(square))
    monkeypatch.setitem(st.KEY_SETTING, "smoke", dict(num_sets=1, num_keys=5, dim=2))
    found = st.unselectable(0, "smoke")  # (0.1, 0) is inside the square; scaled to (√2, 0) it is a vertex
    assert found.value == 0.0 and found.extra["unselectable share without scaling"] == pytest.approx(0.2)
    doubled = torch.cat([square, square[:, :1]], 1)  # a repeated key is never the strict argmax, scaled or not
    monkeypatch.setattr(st, "random_key_sets", lambda **kw: KeySets(doubled))
    monkeypatch.setitem(st.KEY_SETTING, "smoke", dict(num_sets=1, num_keys=6, dim=2))
    values = [st.unselectable(seed, "smoke").value for seed in range(3)]
    assert values == pytest.approx([2 / 6] * 3) and verdict("P037-scaling-all-selectable", values) == "not reproduced"


class Majority(nn.Module):
    """Planted: logits one-hot on the majority class (`right`) or on another class (not `right`)."""

    right = True

    def __init__(self, num_classes: int, **_: object) -> None:
        super().__init__()
        self.c = num_classes
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        counts = nn.functional.one_hot(tokens, self.c).sum(1)
        top = counts.argmax(-1) if self.right else (counts.argmax(-1) + 1) % self.c
        logits = 10.0 * nn.functional.one_hot(top, self.c).double() + self.bias
        return logits[:, None].expand(-1, tokens.shape[1], -1)


class Minority(Majority):
    right = False


def test_p037_majority_accuracy_and_the_sign_of_the_gain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "MajorityModel", lambda c, dim, norm: (Majority if norm == "layernorm" else Minority)(c))
    found = st.majority_gain(0, "smoke")
    assert found.value == 1.0 and found.extra["accuracy without"] == 0.0
    monkeypatch.setattr(st, "MajorityModel", lambda c, dim, norm: (Minority if norm == "layernorm" else Majority)(c))
    values = [st.majority_gain(seed, "smoke").value for seed in range(3)]
    assert values == [-1.0] * 3 and verdict("P037-projection-majority", values) == "not reproduced"


def test_smoke_of_every_claim_gives_a_finite_value() -> None:
    for claim_id in ("P154-online-gd", "P180-memorization", "P037-scaling-all-selectable"):
        assert math.isfinite(claim(claim_id)(0, "smoke").value)
