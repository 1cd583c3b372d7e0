"""JoMA latent hierarchy (P048): the token-set law against enumeration of every ownership edge on a tiny
hierarchy, the two-level closed form, keep = 1 as the official deterministic generator, and the attention
entropy against hand computations (and uniform causal attention at zero query weights)."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

import attnlab
from attnlab.tasks.latent_hierarchy import (
    HierarchyData,
    HierarchyTransformer,
    LatentHierarchy,
    attention_entropy,
    random_hierarchy,
    sample_sequences,
    token_marginals,
    train_with_entropy,
)

# tokens 0..4; latents: 0 owns {0, 1}, 1 owns {1, 2}, 2 owns {3, 4}; classes: 0 owns {0, 1}, 1 owns {1, 2}
TINY = LatentHierarchy((((0, 1), (1, 2), (3, 4)), ((0, 1), (1, 2))), 5)


def exact_token_sets(h: LatentHierarchy, cls: int, keep: float) -> dict[frozenset[int], float]:
    """P(active token set | class) by enumerating whether each ownership edge below an active node fires."""
    law: Counter = Counter()
    edges = [(lv, j, c) for lv in range(len(h.children)) for j, s in enumerate(h.children[lv]) for c in s]
    for fired in itertools.product((False, True), repeat=len(edges)):
        p = math.prod(keep if f else 1 - keep for f in fired)
        active = {cls}
        for level in reversed(range(len(h.children))):
            active = {c for (lv, j, c), f in zip(edges, fired) if lv == level and f and j in active}
        law[frozenset(active)] += p
    return dict(law)


def test_registered_as_a_task_of_p048() -> None:
    spec = attnlab.get("latent-hierarchy", kind="task")
    assert (spec.kind, spec.family, spec.paper.id, spec.paper.arxiv) == ("task", "G", "P048", "2310.00535")
    data = spec.build(num_examples=4)
    assert isinstance(data, HierarchyData) and data.tokens.shape == (4, 20)


@pytest.mark.parametrize("keep", [0.6, 1.0])
def test_token_sets_match_enumeration(keep: float) -> None:
    data = sample_sequences(TINY, 20_000, length=5, keep=keep, seed=1)
    assert abs(data.labels.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / len(data))
    for cls in (0, 1):
        law = exact_token_sets(TINY, cls, keep)
        rows = data.active[data.labels == cls]
        seen = Counter(frozenset(np.flatnonzero(r).tolist()) for r in rows.numpy())
        assert set(seen) <= {s for s, p in law.items() if p > 0}
        support = [s for s, p in law.items() if p > 0]
        if len(support) == 1:
            assert seen[support[0]] == len(rows)
            continue
        observed = [seen[s] for s in support]
        expected = [law[s] * len(rows) for s in support]
        assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_two_level_marginals_closed_form_and_keep_one_is_the_official_union() -> None:
    keep = 0.7
    marg = token_marginals(TINY, keep)
    for cls in (0, 1):
        law = exact_token_sets(TINY, cls, keep)
        by_enumeration = [sum(p for s, p in law.items() if v in s) for v in range(5)]
        assert np.allclose(marg[cls], by_enumeration, atol=1e-12)
    # class 0: token 1 is owned by latents 0 and 1 (two chances), token 3 by none
    assert marg[0, 1] == pytest.approx(1 - (1 - 0.49) ** 2) and marg[0, 3] == 0
    h = random_hierarchy(seed=3)
    data = sample_sequences(h, 50, length=20, keep=1.0, seed=2)
    for tokens, label in zip(data.tokens.tolist(), data.labels.tolist()):
        ids = sorted(h.reachable_tokens(label))
        assert tokens == [19] * (20 - len(ids)) + ids, "the official order: pre-padded, ascending"


def test_random_hierarchy_sets_are_distinct() -> None:
    h = random_hierarchy(num_tokens=6, layer_sizes=(10, 4), combinations=(2, 3), seed=5)
    assert len(set(h.children[0])) == 10 and all(len(s) == 2 and max(s) < 6 for s in h.children[0])
    assert len(set(h.children[1])) == 4 and all(len(s) == 3 and max(s) < 10 for s in h.children[1])


def test_attention_entropy_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    h = [0.0, math.log(2), -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))]
    assert attention_entropy(a).item() == pytest.approx(sum(h) / 3, abs=1e-12)  # the all-zero row is left out


def test_zero_query_gives_uniform_causal_attention_with_entropy_mean_log_i() -> None:
    torch.manual_seed(0)
    model = HierarchyTransformer(19, 10, dim=16, layers=2).double()
    for block in model.blocks:
        torch.nn.init.zeros_(block.q.weight)
    data = sample_sequences(random_hierarchy(seed=1), 8, length=20)
    _, maps = model(data.tokens)
    t = 20
    assert torch.allclose(maps[0][0, 0], torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None].double())
    expected = sum(math.log(i) for i in range(1, t + 1)) / t
    for w in maps:
        assert attention_entropy(w).item() == pytest.approx(expected, abs=1e-12)


def test_tracker_logs_each_layer_and_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    h = random_hierarchy(seed=2)
    model = HierarchyTransformer(19, 10, dim=32, layers=2, activation="relu")
    log = train_with_entropy(model, h, steps=80, lr=0.05, batch_size=64, log_every=40)
    assert [e["step"] for e in log] == [0.0, 40.0, 80.0]
    assert all(0 <= e[f"entropy_{i}"] <= math.log(20) for e in log for i in (0, 1))
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
