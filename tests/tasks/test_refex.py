"""RefEx (P053): held-out combinations never reach training, every expression's referent is unique and
correct by an independent resolver, the object law, the fixed embeddings, and the model's cell equivariance."""
from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy import stats

import attnlab
from attnlab.tasks.refex import (
    RefExAttention,
    RefExData,
    held_out_combinations,
    refex_accuracy,
    refex_split,
    train_refex,
)


def resolve(expression: list[int], world: list[list[int]]) -> list[int]:
    """The cells whose object has every attribute the expression names (written from the definition)."""
    found = []
    for cell, obj in enumerate(world):
        if obj[0] == -1:
            continue
        if all(want == -1 or want == have for want, have in zip(expression, obj)):
            found.append(cell)
    return found


def test_registered_as_a_task_of_p053() -> None:
    spec = attnlab.get("refex", kind="task")
    assert (spec.kind, spec.family, spec.paper.id, spec.paper.arxiv) == ("task", "G", "P053", "2210.12786")
    train, test, hidden = spec.build(num_train=3, num_test=2)
    assert isinstance(train, RefExData) and isinstance(test, RefExData) and len(hidden) == 2


def test_held_out_combinations_never_in_training() -> None:
    sizes = (3, 3, 2)
    train, test, hidden = refex_split(800, 200, grid=4, attribute_sizes=sizes, num_objects=6, held_out=4, seed=1)
    hidden_set = set(hidden)
    train_objects = {tuple(o) for o in train.world.reshape(-1, 3).tolist() if o[0] != -1}
    assert not train_objects & hidden_set, "a held-out tuple appears in a training world"
    assert train_objects == set(itertools.product(range(3), range(3), range(2))) - hidden_set
    for k, s in enumerate(sizes):  # every value is still seen in training
        assert {t[k] for t in train_objects} == set(range(s))
    rows = torch.arange(len(test))
    assert {tuple(t) for t in test.world[rows, test.target].tolist()} <= hidden_set
    assert (test.expression >= 0).all(), "test expressions name the full (novel) conjunction"


def test_every_referent_unique_and_correct() -> None:
    train, test, _ = refex_split(300, 300, grid=5, attribute_sizes=(3, 2, 2), num_objects=7, held_out=3, seed=2)
    for data in (train, test):
        for e, w, t in zip(data.expression.tolist(), data.world.tolist(), data.target.tolist()):
            assert resolve(e, w) == [t]
            assert sum(o[0] != -1 for o in w) == 7


def test_object_law_and_expression_choice() -> None:
    train, _, hidden = refex_split(3000, 1, grid=6, attribute_sizes=(3, 3), num_objects=2, held_out=2, seed=3)
    allowed = [t for t in itertools.product(range(3), range(3)) if t not in hidden]
    # with 2 objects the pair is redrawn only when both tuples are equal: each object is then uniform on the
    # allowed tuples (7 of them), and the target is named by each identifying subset with equal probability
    rows = torch.arange(len(train))
    objects = train.world[rows, train.target].tolist()
    counts = np.array([objects.count(list(t)) for t in allowed])
    assert stats.chisquare(counts).pvalue > 1e-3
    # given a distractor sharing exactly one attribute, one of the subsets {other attribute, both} is drawn,
    # each with probability 1/2; with no shared attribute, three subsets are usable, each 1/3
    full = (train.expression >= 0).all(1).double()
    others = []
    for w, t in zip(train.world.tolist(), train.target.tolist()):
        other = [o for c, o in enumerate(w) if o[0] != -1 and c != t][0]
        others.append(sum(a == b for a, b in zip(other, w[t])))
    shared = torch.tensor(others)
    for n_shared, p in ((0, 1 / 3), (1, 1 / 2)):
        sel = full[shared == n_shared]
        assert abs(sel.mean().item() - p) < 4 * np.sqrt(p * (1 - p) / len(sel))


def test_fixed_embeddings_by_hand() -> None:
    data = RefExData(torch.tensor([[2, -1]]), torch.tensor([[[-1, -1], [2, 0], [1, 2], [-1, -1]]]),
                     torch.tensor([1]), (3, 3))
    f = data.features(torch.float64)[0]
    assert f.tolist() == [
        [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0],  # "blue", unspecified shape
        [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0],
    ]


def test_held_out_combinations_keep_every_value() -> None:
    for seed in range(20):
        hidden = held_out_combinations((2, 2), 2, seed)
        kept = set(itertools.product(range(2), range(2))) - set(hidden)
        assert {t[0] for t in kept} == {0, 1} and {t[1] for t in kept} == {0, 1}


def test_model_is_cell_equivariant_and_learns() -> None:
    torch.manual_seed(0)
    train, test, _ = refex_split(2000, 200, seed=4)
    model = RefExAttention((3, 3), heads=1, layers=1).double()
    perm = torch.randperm(36)
    permuted = RefExData(test.expression, test.world[:, perm], test.target, test.attribute_sizes)
    with torch.no_grad():
        assert torch.allclose(model(permuted), model(test)[:, perm], atol=1e-12)
    before = refex_accuracy(model, train)
    train_refex(model, train, steps=150, lr=0.05, batch_size=64)
    assert refex_accuracy(model, train) > max(before, 1 / 5) + 0.3  # chance among the 5 objects is 1/5
