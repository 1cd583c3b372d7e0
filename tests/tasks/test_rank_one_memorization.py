"""Rank-1 single-head memorisation (P180): the data's law, the attention against its formula, rank 1 kept by
training, and 100% training accuracy where no last-token-only classifier can get it."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

import attnlab
from attnlab.tasks.rank_one_memorization import (
    MemorizationData,
    RankOneTransformer,
    boltzmann,
    memorization_data,
    train_to_memorize,
)


def test_registered_as_a_task_of_p180() -> None:
    spec = attnlab.get("rank-one-memorization", kind="task")
    assert spec.kind == "task" and spec.family == "G"
    assert (spec.paper.id, spec.paper.arxiv) == ("P180", "2307.14023")
    assert isinstance(spec.build(num_sequences=10), MemorizationData)


def test_sequences_are_distinct_without_positions_and_draws_are_uniform() -> None:
    data = memorization_data(3000, seq_len=5, vocab_size=12, num_classes=3, seed=1)
    keys = {(*sorted(r[:-1]), r[-1]) for r in data.inputs.tolist()}
    assert len(keys) == 3000
    assert stats.chisquare(np.bincount(data.labels.numpy(), minlength=3)).pvalue > 1e-4
    # rejecting repeats barely tilts the token law when the space (12^5) is large
    assert stats.chisquare(np.bincount(data.inputs.reshape(-1).numpy(), minlength=12)).pvalue > 1e-4


@torch.no_grad()
def test_attention_matches_its_formula() -> None:
    torch.manual_seed(0)
    model = RankOneTransformer(7, 3, dim=6, hidden=8).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    got = model.attention(x)
    wv, wo = model.value.weight, model.out.weight
    for b in range(2):
        for i in range(5):
            s = torch.tensor([float((x[b, i] @ model.w_q) * (x[b, j] @ model.w_k)) / np.sqrt(6) for j in range(5)])
            p = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
            want = sum(p[j] * (wo @ (wv @ x[b, j])) for j in range(5))
            assert torch.allclose(got[b, i], want, atol=1e-12)


def test_score_matrix_is_rank_one_before_and_after_a_step() -> None:
    torch.manual_seed(0)
    model = RankOneTransformer(10, 2, dim=16, hidden=16)
    data = memorization_data(32, seq_len=6, vocab_size=10, seed=0)
    before = model.score_matrix().detach().clone()
    assert torch.linalg.matrix_rank(before) == 1
    train_to_memorize(model, data, max_steps=1)
    after = model.score_matrix().detach()
    assert not torch.equal(before, after), "the step moved W_Q and W_K"
    assert torch.linalg.matrix_rank(after) == 1


def best_last_token_accuracy(data: MemorizationData) -> float:
    """The training accuracy of the best classifier that sees only the last token: the majority label per token."""
    groups: dict[int, Counter] = {}
    for row, label in zip(data.inputs.tolist(), data.labels.tolist()):
        groups.setdefault(row[-1], Counter())[label] += 1
    return sum(c.most_common(1)[0][1] for c in groups.values()) / len(data)


def test_memorizes_random_labels_through_the_context() -> None:
    torch.manual_seed(0)
    data = memorization_data(64, seq_len=6, vocab_size=10, num_classes=2, seed=0)
    assert best_last_token_accuracy(data) < 0.9, "the last token alone cannot fit these labels"
    steps, acc = train_to_memorize(RankOneTransformer(10, 2, dim=32, hidden=64), data, max_steps=800)
    assert acc == 1.0, f"not memorised in {steps} steps"


def test_boltzmann_operator() -> None:
    z = torch.tensor([[0.3, -1.2, 2.0, 0.5]], dtype=torch.float64)
    e = torch.exp(z)
    assert float(boltzmann(z)) == pytest.approx(float((z * e).sum() / e.sum()), abs=1e-15)
    assert float(z.mean()) < float(boltzmann(z)) < float(z.max())
    assert float(boltzmann(60 * z)) == pytest.approx(60 * 2.0, rel=1e-6), "a sharp softmax picks the maximum"


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_sequences"):
        memorization_data(1000, seq_len=2, vocab_size=3)
    with pytest.raises(ValueError, match="vocab_size"):
        memorization_data(4, vocab_size=1)
    a, b = memorization_data(20, seed=3), memorization_data(20, seed=3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
