"""MQAR as Zoology (P243) defines it: every label, the vocabularies, the gap law, seeds, limits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import attnlab
from attnlab.tasks import MQARData, mqar


def pairs_of(row: list[int], num_kv_pairs: int) -> dict[int, int]:
    """key -> value read off the interleaved prefix k1 v1 k2 v2 ..."""
    prefix = row[: 2 * num_kv_pairs]
    return dict(zip(prefix[0::2], prefix[1::2]))


@pytest.mark.parametrize("random_non_queries", [True, False])
@pytest.mark.parametrize(("seq_len", "kv", "vocab"), [(16, 2, 20), (64, 4, 8192), (64, 16, 100), (128, 8, 512)])
def test_every_label_is_the_value_of_the_queried_key(seq_len: int, kv: int, vocab: int, random_non_queries: bool) -> None:
    data = mqar(300, seq_len, kv, vocab_size=vocab, seed=3, random_non_queries=random_non_queries)
    assert isinstance(data, MQARData) and len(data) == 300
    assert data.inputs.shape == data.labels.shape == (300, seq_len)
    assert data.inputs.dtype == data.labels.dtype == torch.long
    for row, lab in zip(data.inputs.tolist(), data.labels.tolist()):
        pairs = pairs_of(row, kv)
        assert len(pairs) == kv, "the keys of one example are distinct"
        assert len(set(pairs.values())) == kv, "the values of one example are distinct"
        labelled = [i for i, y in enumerate(lab) if y != -100]
        assert len(labelled) == kv, "each key is queried exactly once"
        assert all(i >= 2 * kv and (i - 2 * kv) % 2 == 0 for i in labelled), "queries sit at even offsets after the prefix"
        assert all(lab[i] == pairs[row[i]] for i in labelled), "the label at a query is the value paired with its key"
        assert sorted(row[i] for i in labelled) == sorted(pairs), "every prefix key is queried, and only those"
        assert all(0 <= t < vocab for t in row)
        if not random_non_queries:
            others = [row[i] for i in range(2 * kv, seq_len) if i not in labelled]
            assert set(others) <= {0}


def test_key_and_value_vocabularies_do_not_overlap() -> None:
    vocab, kv = 64, 8
    data = mqar(2000, 32, kv, vocab_size=vocab, seed=0)
    keys = data.inputs[:, 0 : 2 * kv : 2]
    values = data.inputs[:, 1 : 2 * kv : 2]
    assert int(keys.min()) >= 1 and int(keys.max()) < vocab // 2, "keys from the first half (0 is filler)"
    assert int(values.min()) >= vocab // 2 and int(values.max()) < vocab, "values from the second half"
    # and all of each half is used
    assert set(keys.unique().tolist()) == set(range(1, vocab // 2))
    assert set(values.unique().tolist()) == set(range(vocab // 2, vocab))


def test_keys_and_values_are_uniform() -> None:
    vocab, kv, n = 40, 4, 6000
    data = mqar(n, 16, kv, vocab_size=vocab, seed=5)
    key_counts = np.bincount(data.inputs[:, 0 : 2 * kv : 2].reshape(-1).numpy(), minlength=vocab)[1 : vocab // 2]
    assert stats.chisquare(key_counts).pvalue > 1e-4
    first_key = np.bincount(data.inputs[:, 0].numpy(), minlength=vocab)[1 : vocab // 2]
    assert stats.chisquare(first_key).pvalue > 1e-4, "the order of the keys is uniform too"
    value_counts = np.bincount(data.inputs[:, 1 : 2 * kv : 2].reshape(-1).numpy(), minlength=vocab)[vocab // 2 :]
    assert stats.chisquare(value_counts).pvalue > 1e-4


def zoology_law(space: int, a: float) -> np.ndarray:
    """P(gap = i-1) ∝ a·i^(a-1), i = 1..space (Zoology's power law), computed here independently."""
    w = np.array([a * i ** (a - 1) for i in range(1, space + 1)])
    return w / w.sum()


def gaps_of(data: MQARData, kv: int) -> np.ndarray:
    """(examples, kv): the gap of the query of the j-th prefix key, read off the positions."""
    out = np.empty((len(data), kv), dtype=np.int64)
    for r, (row, lab) in enumerate(zip(data.inputs.tolist(), data.labels.tolist())):
        where = {row[i]: (i - 2 * kv) // 2 for i, y in enumerate(lab) if y != -100}
        out[r] = [where[k] for k in row[0 : 2 * kv : 2]]
    return out


def chi2_pvalue(observed: np.ndarray, expected_p: np.ndarray) -> float:
    expected = expected_p * observed.sum()
    keep = expected >= 5  # pool the rare tail so every bin has enough expected counts
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_gaps_follow_zoologys_power_law(power_a: float) -> None:
    seq_len, kv, n = 48, 3, 6000
    space = (seq_len - 2 * kv) // 2
    p = zoology_law(space, power_a)
    gaps = gaps_of(mqar(n, seq_len, kv, vocab_size=64, power_a=power_a, seed=11), kv)
    assert (np.sort(gaps, axis=1)[:, 1:] != np.sort(gaps, axis=1)[:, :-1]).all(), "gaps are distinct"
    # the first key's gap is the first draw: distributed as p itself
    assert chi2_pvalue(np.bincount(gaps[:, 0], minlength=space), p) > 1e-4
    # the second key's gap is the second draw without replacement: P(j) = sum_{i != j} p_i p_j / (1 - p_i)
    second = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(space) if i != j) for j in range(space)])
    assert abs(second.sum() - 1) < 1e-12
    assert chi2_pvalue(np.bincount(gaps[:, 1], minlength=space), second) > 1e-4


def test_gap_law_is_a_power_law_with_exponent_a_minus_1() -> None:
    seq_len, kv, n = 64, 1, 20000
    space = (seq_len - 2) // 2
    counts = np.bincount(gaps_of(mqar(n, seq_len, kv, vocab_size=128, seed=2), kv)[:, 0], minlength=space)
    # P(gap=0)/P(gap=1) = 1 / 2^(a-1) = 2^0.99 for a = 0.01
    assert counts[0] / counts[1] == pytest.approx(2 ** 0.99, rel=0.08)
    assert counts[0] / counts[3] == pytest.approx(4 ** 0.99, rel=0.12)
    assert chi2_pvalue(counts, zoology_law(space, 0.01)) > 1e-4


def test_uniform_gaps_when_a_is_one() -> None:
    space = (32 - 2) // 2
    counts = np.bincount(gaps_of(mqar(6000, 32, 1, vocab_size=64, power_a=1.0, seed=4), 1)[:, 0], minlength=space)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_every_query_key_appears_in_the_prefix() -> None:
    kv = 8
    data = mqar(500, 128, kv, vocab_size=300, seed=9)  # random filler may repeat keys; queries must not miss
    mask = data.labels != -100
    for row, m in zip(data.inputs, mask):
        assert set(row[m].tolist()) <= set(row[0 : 2 * kv : 2].tolist())
    assert torch.equal(data.query_mask, mask)


def test_seeds_reproduce_and_differ() -> None:
    a = mqar(50, 64, 4, vocab_size=256, seed=7)
    b = mqar(50, 64, 4, vocab_size=256, seed=7)
    c = mqar(50, 64, 4, vocab_size=256, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_four_kv_over_seq_len_raises_naming_both() -> None:
    with pytest.raises(ValueError, match="num_kv_pairs=5.*seq_len=16"):
        mqar(4, 16, 5, vocab_size=64)
    mqar(4, 16, 4, vocab_size=64)  # 4·kv == L is allowed


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"seq_len": 15, "num_kv_pairs": 2}, "seq_len"),
        ({"seq_len": 64, "num_kv_pairs": 4, "vocab_size": 64}, "vocab_size"),
        ({"seq_len": 64, "num_kv_pairs": 0}, "num_kv_pairs"),
        ({"seq_len": 64, "num_kv_pairs": 4, "vocab_size": 8.5}, "vocab_size"),
        ({"seq_len": 64, "num_kv_pairs": 4, "power_a": 0.0}, "power_a"),
        ({"seq_len": 64, "num_kv_pairs": 4, "num_examples": 0}, "num_examples"),
    ],
)
def test_bad_settings_name_the_argument(kwargs: dict, word: str) -> None:
    kwargs = {"num_examples": 2, "vocab_size": 256, **kwargs}
    with pytest.raises(ValueError, match=word):
        mqar(**kwargs)


def test_registered_as_a_task_of_zoology() -> None:
    spec = attnlab.get("mqar", kind="task")
    assert spec.kind == "task" and spec.family == "G"
    assert spec.paper.id == "P243" and spec.paper.arxiv == "2312.04927"
    data = spec.build(num_examples=3, seq_len=16, num_kv_pairs=2, vocab_size=32)
    assert data.inputs.shape == (3, 16)
