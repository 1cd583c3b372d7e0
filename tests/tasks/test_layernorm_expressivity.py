"""LayerNorm's two parts (P037): the decomposition against torch's LayerNorm, uniform attention from a query ∝ 1
after projection, unselectable keys by LP against exact 2-D hulls and sampled queries, none after scaling, and the
majority data's exact law on a tiny case."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial import ConvexHull

import attnlab
from attnlab.tasks.layernorm_expressivity import (
    KeySets,
    MajorityData,
    MajorityModel,
    majority_data,
    project,
    random_key_sets,
    scale,
    unselectable_keys,
)


def test_registered_as_tasks_of_p037() -> None:
    for name, kwargs, cls in (("layernorm-majority", {"num_examples": 3}, MajorityData),
                              ("unselectable-keys", {"num_sets": 2}, KeySets)):
        spec = attnlab.get(name, kind="task")
        assert spec.kind == "task" and spec.family == "G"
        assert (spec.paper.id, spec.paper.arxiv) == ("P037", "2305.02582")
        assert isinstance(spec.build(**kwargs), cls)


def test_layernorm_is_scaling_after_projection() -> None:
    x = torch.randn(6, 7, dtype=torch.float64) * 3 + 1
    want = torch.nn.functional.layer_norm(x, (7,), eps=0.0)
    assert torch.allclose(scale(project(x)), want, atol=1e-12)
    assert torch.allclose(project(x).sum(-1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(scale(x).norm(dim=-1), torch.full((6,), math.sqrt(7), dtype=torch.float64))


def test_a_query_along_ones_attends_uniformly_after_projection() -> None:
    keys = project(torch.randn(9, 5, dtype=torch.float64) * 4)
    values = torch.randn(9, 3, dtype=torch.float64)
    q = 2.7 * torch.ones(5, dtype=torch.float64)
    weights = (keys @ q).softmax(0)
    assert torch.allclose(weights, torch.full((9,), 1 / 9, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(weights @ values, values.mean(0), atol=1e-12)
    # without the projection the same query does not
    raw = torch.randn(9, 5, dtype=torch.float64) * 4
    assert ((raw @ q).softmax(0) - 1 / 9).abs().max() > 1e-2


@pytest.mark.parametrize("seed", range(4))
def test_unselectable_keys_are_the_non_vertices_of_the_2d_hull(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((14, 2)) * rng.uniform(0.2, 3, size=(14, 1))
    vertices = set(ConvexHull(keys).vertices.tolist())
    want = np.array([i not in vertices for i in range(14)])
    assert want.any() and (~want).any()
    assert np.array_equal(unselectable_keys(keys), want)
    # a vertex repeated: neither copy is the strict argmax of any query
    v = min(vertices)
    got = unselectable_keys(np.vstack([keys, keys[v]]))
    assert got[v] and got[-1]


def test_edge_midpoint_is_unselectable() -> None:
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.0]])
    assert unselectable_keys(square).tolist() == [False, False, False, False, True]


def test_sampled_queries_select_exactly_the_selectable_keys() -> None:
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((12, 2)) * rng.uniform(0.2, 3, size=(12, 1))
    angles = np.linspace(0, 2 * np.pi, 200_001)
    queries = np.stack([np.cos(angles), np.sin(angles)], 1)
    selected = set(np.argmax(queries @ keys.T, 1).tolist())
    assert selected == set(np.flatnonzero(~unselectable_keys(keys)).tolist())
    # in 3-D, sampled queries can only find selectable keys
    keys3 = rng.standard_normal((20, 3)) * rng.uniform(0.2, 3, size=(20, 1))
    found = set(np.argmax(rng.standard_normal((50_000, 3)) @ keys3.T, 1).tolist())
    assert found <= set(np.flatnonzero(~unselectable_keys(keys3)).tolist())


def test_scaling_leaves_no_key_unselectable() -> None:
    sets = random_key_sets(6, num_keys=16, dim=3, seed=0)
    before, after = sets.unselectable_counts(), sets.unselectable_counts(scaled=True)
    assert before.sum() > 0 and (after == 0).all()


def majority_law(length: int, classes: int, margin: int) -> dict[tuple[int, ...], float]:
    """P(sequence): count vectors uniform among those with the margin, then every arrangement alike."""
    def ok(counts: tuple[int, ...]) -> bool:
        top = sorted(counts)
        return top[-1] - top[-2] >= margin
    vectors = [c for c in itertools.product(range(length + 1), repeat=classes) if sum(c) == length and ok(c)]
    law = {}
    for seq in itertools.product(range(classes), repeat=length):
        counts = tuple(seq.count(k) for k in range(classes))
        if ok(counts):
            arrangements = math.factorial(length) / math.prod(math.factorial(n) for n in counts)
            law[seq] = 1 / len(vectors) / arrangements
    return law


def test_majority_sequences_follow_their_exact_law() -> None:
    length, classes, margin, n = 4, 3, 1, 30000
    law = majority_law(length, classes, margin)
    assert sum(law.values()) == pytest.approx(1.0)
    data = majority_data(n, seq_len=length, num_classes=classes, min_margin=margin, seed=2)
    observed = Counter(tuple(row) for row in data.inputs.tolist())
    assert set(observed) <= set(law)
    cells = sorted(law)
    assert stats.chisquare([observed[c] for c in cells], [law[c] * n for c in cells]).pvalue > 1e-4


def test_majority_labels_and_margin() -> None:
    data = majority_data(500, seq_len=30, num_classes=6, min_margin=4, seed=3)
    for row, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        (top, n1), (_, n2) = Counter(row).most_common(2)
        assert n1 - n2 >= 4 and set(labels) == {top}


def test_layernorm_model_learns_majority() -> None:
    torch.manual_seed(0)
    data = majority_data(2000, seq_len=12, num_classes=4, min_margin=3, seed=0)
    test = majority_data(500, seq_len=12, num_classes=4, min_margin=3, seed=1)
    model = MajorityModel(4, dim=8, norm="layernorm")
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        idx = torch.randint(0, 2000, (64,))
        loss = torch.nn.functional.cross_entropy(model(data.inputs[idx]).reshape(-1, 4), data.labels[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(test.inputs).argmax(-1) == test.labels).float().mean())
    assert acc > 0.9  # chance is about 1/4


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="min_margin"):
        majority_data(3, seq_len=4, min_margin=5)
    with pytest.raises(ValueError, match="norm"):
        MajorityModel(3, norm="rms")
    with pytest.raises(ValueError, match="keys"):
        unselectable_keys(np.zeros(3))
