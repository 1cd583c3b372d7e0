"""Scan-and-snap data (P020): sampled context frequencies against the stated distribution, the token sets,
and the model's uniform attention at zero init, its exact initial loss and the separate learning rates."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import attnlab
from attnlab.tasks.scan_snap import ScanSnapData, ScanSnapModel, attention_by_type, scan_snap_data, train_scan_snap


def test_registered_as_a_task_of_p020() -> None:
    spec = attnlab.get("scan-snap", kind="task")
    assert (spec.kind, spec.family, spec.paper.id, spec.paper.arxiv) == ("task", "G", "P020", "2305.16380")
    assert isinstance(spec.build(num_examples=3), ScanSnapData)


def test_stated_distribution_written_out() -> None:
    data = scan_snap_data(10, num_last=2, num_next_per_last=2, num_common=3, num_common_per_last=2, num_distinct=4,
                          common_weight=1.0, distinct_min=0.5, distinct_max=2.0)
    # next token 3 (the 2nd next token of last token 1): C = {0,1,2}, C_1 = {5,6}, D_3 = 7 + 3·4 … (4 tokens)
    weights = np.zeros(data.vocab_size)
    weights[[0, 1, 2, 5, 6]] = 1.0
    weights[19:23] = [0.5, 1.0, 1.5, 2.0]
    assert np.allclose(data.probs[3].numpy(), weights / weights.sum())
    assert data.vocab_size == 3 + 2 * 2 + 4 * 4 + 2 + 4
    assert data.last_ids.tolist() == [23, 23, 24, 24] and data.next_ids.tolist() == [25, 26, 27, 28]


def test_context_frequencies_match_the_distribution() -> None:
    data = scan_snap_data(40_000, context_length=4, num_common=4, num_common_per_last=3, num_distinct=5, seed=1)
    assert np.allclose(np.bincount(data.next_token - data.next_ids[0], minlength=4) / len(data), 0.25, atol=0.01)
    for n in range(4):
        rows = data.next_token == data.next_ids[n]
        assert (data.last[rows] == data.last_ids[n]).all()
        counts = np.bincount(data.context[rows].flatten().numpy(), minlength=data.vocab_size)
        expected = data.probs[n].numpy() * counts.sum()
        support = expected > 0
        assert counts[~support].sum() == 0, "a token outside the next token's support was drawn"
        assert stats.chisquare(counts[support], expected[support]).pvalue > 1e-3


def test_common_tokens_shared_and_distinct_tokens_disjoint() -> None:
    data = scan_snap_data(5, num_last=3, num_next_per_last=2)
    support = data.probs > 0
    assert support[:, data.common].all(), "every next token uses every common token"
    for n in range(6):
        m = n // 2
        assert support[n, data.common_per_last[m]].all()
        others = [mm for mm in range(3) if mm != m]
        assert not support[n, data.common_per_last[others].flatten()].any()
        assert support[n, data.distinct[n]].all()
        assert not support[[i for i in range(6) if i != n]][:, data.distinct[n]].any(), "distinct sets overlap"
    weights = data.probs[0, data.distinct[0]]
    assert (weights.diff() > 0).all(), "distinct tokens ordered by co-occurrence"


def test_zero_init_attention_is_uniform_and_loss_is_log_vocab() -> None:
    data = scan_snap_data(64, context_length=7, seed=2)
    model = ScanSnapModel(data.vocab_size).double()
    weights = model.attention_weights(data.context, data.last)
    assert torch.allclose(weights, torch.full_like(weights, 1 / 7), atol=0, rtol=1e-15)
    loss = torch.nn.functional.cross_entropy(model(data.context, data.last), data.next_token)
    assert loss.item() == pytest.approx(math.log(data.vocab_size), abs=1e-12)
    # attention mass per type at uniform attention = the fraction of context positions of that type
    kinds = attention_by_type(model, data)
    distinct = torch.isin(data.context, data.distinct.flatten()).double().mean()
    assert kinds["distinct"] == pytest.approx(float(distinct), abs=1e-12)
    assert sum(kinds.values()) == pytest.approx(1.0, abs=1e-12)


def test_forward_against_the_formula() -> None:
    torch.manual_seed(0)
    model = ScanSnapModel(6, zero_init=False, init_std=1.0).double()
    context, last = torch.tensor([[0, 2, 2, 5]]), torch.tensor([3])
    z = model.attention.detach()
    b = np.exp([z[3, t].item() for t in (0, 2, 2, 5)])
    b /= b.sum()
    f = np.zeros(6)
    for t, w in zip((0, 2, 2, 5), b):
        f[t] += w
    f /= np.linalg.norm(f)
    assert np.allclose(model(context, last).detach().numpy()[0], model.decoder.detach().numpy() @ f, atol=1e-12)


def test_separate_learning_rates_and_the_scan() -> None:
    data = scan_snap_data(2000, seed=3)
    frozen = ScanSnapModel(data.vocab_size)
    train_scan_snap(frozen, data, steps=5, lr_decoder=1.0, lr_attention=0.0)
    assert (frozen.attention == 0).all() and (frozen.decoder != 0).any()
    model = ScanSnapModel(data.vocab_size)
    log = train_scan_snap(model, data, steps=300, lr_decoder=2.0, lr_attention=2.0, log_every=100)
    first, last = log[0], log[-1]
    assert last["loss"] < first["loss"]
    # the scan: attention moves from the common tokens to the distinct ones
    assert last["distinct"] > first["distinct"] + 0.05 and last["common"] < first["common"]
