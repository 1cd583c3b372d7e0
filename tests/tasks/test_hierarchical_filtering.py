"""Filtered hierarchical trees (P131): the grammar's structure, the sampled joint law against enumeration, and the
BP posteriors of the root and of a masked leaf against brute-force sums over every internal assignment."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

import attnlab
from attnlab.tasks.hierarchical_filtering import (
    TreeData,
    TreeEncoder,
    bp_accuracy,
    filtered_tree_data,
    level_marginals,
    mask_one_leaf,
    masked_leaf_posterior,
    random_grammar,
    root_posterior,
)


def path_marginal(m: np.ndarray, level: int, index: int) -> np.ndarray:
    """P(node `index` of `level` = a | root = r), summing the symbols along its path one step at a time."""
    q = m.shape[0]
    steps = [(index >> (level - 1 - j)) & 1 for j in range(level)]  # first step from the root first
    out = np.zeros((q, q))
    for r in range(q):
        for path in itertools.product(range(q), repeat=level):
            p, parent = 1.0, r
            for step, child in zip(steps, path):
                p *= m[parent, :, child].sum() if step else m[parent, child, :].sum()
                parent = child
            out[r, path[-1] if level else r] += p
    return out


def brute_joint(m: np.ndarray, depth: int, k: int, leaves: tuple[int, ...]) -> np.ndarray:
    """P(root = r, leaves) for every r under the k-filtered model: a sum over every assignment of the nodes of
    levels k … L−1 (heap order: level j holds nodes 2^j − 1 … 2^(j+1) − 2; node i has children 2i + 1, 2i + 2)."""
    q = m.shape[0]
    first = 2**k - 1  # heap index of the first level-k node
    internal = list(range(first, 2**depth - 1))
    marg = [path_marginal(m, k, i) for i in range(2**k)]
    out = np.zeros(q)
    for r in range(q):
        for assignment in itertools.product(range(q), repeat=len(internal)):
            x = dict(zip(internal, assignment))
            x.update({2**depth - 1 + j: leaf for j, leaf in enumerate(leaves)})
            p = 1.0 / q
            for i in range(2**k):
                p *= marg[i][r, x[first + i]]
            for node in internal:
                p *= m[x[node], x[2 * node + 1], x[2 * node + 2]]
            out[r] += p
    return out


def test_registered_as_a_task_of_p131() -> None:
    spec = attnlab.get("hierarchical-filtering", kind="task")
    assert spec.kind == "task" and spec.family == "G"
    assert (spec.paper.id, spec.paper.arxiv) == ("P131", "2408.15138")
    data = spec.build(num_examples=5, depth=3, q=3, filtering=1)
    assert isinstance(data, TreeData) and data.leaves.shape == (5, 8)


def test_grammar_partitions_the_child_pairs() -> None:
    q = 5
    m = random_grammar(q, sigma=2.0, seed=3)
    assert np.allclose(m.sum(axis=(1, 2)), 1.0)
    support = m > 0
    assert (support.sum(axis=(1, 2)) == q).all(), "each parent owns q pairs"
    assert (support.sum(0) == 1).all(), "each child pair has exactly one parent (unambiguous)"
    assert np.allclose(random_grammar(q, sigma=0.0, seed=3)[support], 1 / q), "σ = 0: uniform over the owned pairs"


def test_level_marginals_are_the_path_sums() -> None:
    m = random_grammar(3, seed=1)
    for level in (0, 1, 2, 3):
        got = level_marginals(m, level)
        for i in range(2**level):
            assert np.allclose(got[i], path_marginal(m, level, i), atol=1e-14)


def pooled_chi2(observed: np.ndarray, expected_p: np.ndarray) -> float:
    expected = expected_p * observed.sum()
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] < 1e-9:
        assert obs[-1] == 0, "a sample fell where the model puts no mass"
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_sampled_trees_follow_the_exact_joint_law(k: int) -> None:
    q, depth, n = 3, 2, 40000
    data = filtered_tree_data(n, depth=depth, q=q, filtering=k, sigma=1.5, grammar_seed=2, seed=10 + k)
    m = data.grammar.numpy()
    cells = list(itertools.product(range(q), repeat=2**depth))
    exact = np.array([brute_joint(m, depth, k, leaves) for leaves in cells])  # (leaf configs, q)
    assert exact.sum() == pytest.approx(1.0, abs=1e-12)
    codes = data.roots.numpy() * q ** (2**depth) + (data.leaves.numpy() * q ** np.arange(2**depth - 1, -1, -1)).sum(1)
    observed = np.bincount(codes, minlength=q * len(cells)).reshape(q, len(cells)).T
    assert pooled_chi2(observed.ravel(), exact.ravel()) > 1e-4


def test_filtering_changes_the_law() -> None:
    # sampled from k = 0, tested against k = 2's law: the test above must be able to tell them apart
    q, depth, n = 3, 2, 40000
    data = filtered_tree_data(n, depth=depth, q=q, filtering=0, sigma=1.5, grammar_seed=2, seed=1)
    m = data.grammar.numpy()
    cells = list(itertools.product(range(q), repeat=2**depth))
    other = np.array([brute_joint(m, depth, 2, leaves) for leaves in cells])
    codes = data.roots.numpy() * q ** (2**depth) + (data.leaves.numpy() * q ** np.arange(2**depth - 1, -1, -1)).sum(1)
    observed = np.bincount(codes, minlength=q * len(cells)).reshape(q, len(cells)).T
    with pytest.raises(AssertionError):
        assert pooled_chi2(observed.ravel(), other.ravel()) > 1e-4


@pytest.mark.parametrize(("depth", "k"), [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 3)])
def test_bp_root_posterior_equals_enumeration(depth: int, k: int) -> None:
    data = filtered_tree_data(6, depth=depth, q=3, filtering=k, sigma=1.0, grammar_seed=5, seed=depth * 10 + k)
    m = data.grammar.numpy()
    got = root_posterior(data).numpy()
    for i in range(len(data)):
        joint = brute_joint(m, depth, k, tuple(data.leaves[i].tolist()))
        assert np.allclose(got[i], joint / joint.sum(), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("depth", "k", "position"), [(2, 0, 1), (2, 2, 3), (3, 0, 5), (3, 1, 0)])
def test_masked_leaf_posterior_equals_enumeration(depth: int, k: int, position: int) -> None:
    data = filtered_tree_data(4, depth=depth, q=3, filtering=k, sigma=1.0, grammar_seed=7, seed=k + position)
    m = data.grammar.numpy()
    got = masked_leaf_posterior(data, position).numpy()
    for i in range(len(data)):
        leaves = data.leaves[i].tolist()
        evidence = np.array(
            [brute_joint(m, depth, k, tuple(leaves[:position] + [v] + leaves[position + 1 :])).sum() for v in range(3)]
        )
        assert np.allclose(got[i], evidence / evidence.sum(), atol=1e-12, rtol=0)
        assert got[i][leaves[position]] > 0, "the true leaf has mass"


def test_masked_leaf_task_hides_one_leaf_and_bp_reads_each_position() -> None:
    data = filtered_tree_data(300, depth=3, q=3, filtering=1, seed=4)
    inputs, positions, targets = mask_one_leaf(data, seed=1)
    rows = torch.arange(300)
    assert (inputs[rows, positions] == 3).all() and (inputs == 3).sum() == 300
    assert torch.equal(targets, data.leaves[rows, positions])
    assert stats.chisquare(np.bincount(positions.numpy(), minlength=8)).pvalue > 1e-4
    # per-example positions give, example by example, the single-position posteriors
    batched = masked_leaf_posterior(data, positions)
    for p in range(8):
        chosen = positions == p
        assert torch.allclose(batched[chosen], masked_leaf_posterior(data, p)[chosen], atol=1e-14)


def test_bp_is_calibrated_and_filtering_leaves_root_information() -> None:
    # the accuracy of argmax P(root | leaves) equals the mean of max P(root | leaves) (calibration of the exact posterior);
    # the full model's grammar is unambiguous, so its leaves fix the root; independent leaves (k = L) do not
    accuracy = {}
    for k in (0, 2, 4):
        data = filtered_tree_data(6000, depth=4, q=4, filtering=k, seed=3)
        post = root_posterior(data)
        top = post.max(-1).values.numpy()
        hit = (post.argmax(-1) == data.roots).double().numpy()
        assert abs(hit.mean() - top.mean()) <= 4 * hit.std() / np.sqrt(len(hit)) + 1e-12, k
        accuracy[k] = bp_accuracy(data)
        assert accuracy[k] == pytest.approx(hit.mean())
    assert accuracy[0] == 1.0
    assert 0.25 + 0.1 < accuracy[4] < accuracy[2] < 1.0, "filtering removes root information, not all of it"


def test_encoder_learns_root_classification_above_chance() -> None:
    torch.manual_seed(0)
    data = filtered_tree_data(2048, depth=2, q=3, filtering=0, seed=0)
    test = filtered_tree_data(1000, depth=2, q=3, filtering=0, seed=1)
    assert bp_accuracy(test) == 1.0  # an unambiguous grammar: the leaves name the root
    model = TreeEncoder(3, 4, dim=16, heads=2, layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(120):
        idx = torch.arange(step * 64, (step + 1) * 64) % 2048
        loss = torch.nn.functional.cross_entropy(model.root_logits(data.leaves[idx]), data.roots[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((model.root_logits(test.leaves).argmax(-1) == test.roots).float().mean())
    assert acc > 1 / 3 + 0.3


def test_seeds_reproduce_and_bad_arguments_raise() -> None:
    a, b, c = (filtered_tree_data(20, depth=3, q=3, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.leaves, b.leaves) and not torch.equal(a.leaves, c.leaves)
    with pytest.raises(ValueError, match="filtering"):
        filtered_tree_data(5, depth=3, filtering=4)
    with pytest.raises(ValueError, match="grammar"):
        filtered_tree_data(5, grammar=np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="position"):
        masked_leaf_posterior(a, 8)
