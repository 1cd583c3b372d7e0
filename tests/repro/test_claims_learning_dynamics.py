"""The learning-dynamics claims (P020, P048, P053, P131, P186): statistics on planted inputs, smoke runs, and planted
faults (an untrained attention, a monotone entropy, chance-level predictors, topic-blind embeddings) judged wrong."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from claim_lookup import claim, verdict_of  # tests/repro/claim_lookup.py

from attnlab.repro.claims import learning_dynamics as ld
from attnlab.tasks.lda_topics import attention_topic_similarity, block_topics, embedding_topic_similarity, word_topics
from attnlab.tasks.scan_snap import scan_snap_data

IDS = ("P020-scan-to-distinct", "P048-entropy-u-shape", "P053-held-out-combinations", "P131-root-near-bp",
       "P186-embedding-topics", "P186-attention-topics")


def test_every_claim_is_registered_with_a_training_budget_that_fits() -> None:
    for claim_id in IDS:
        c = claim(claim_id)
        assert c.method == "train" and c.seeds >= 3 and c.budget_s <= 240


@pytest.mark.parametrize("claim_id", IDS)
def test_smoke_runs_give_a_finite_value(claim_id: str) -> None:
    out = claim(claim_id)(0, "smoke")
    assert math.isfinite(out.value) and out.series


# ---- P020


def test_share_ratio_on_planted_shares() -> None:
    assert ld.share_ratio_statistic(0.5, 0.25) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="initial_share"):
        ld.share_ratio_statistic(0.5, 0.0)
    with pytest.raises(ValueError, match="final_share"):
        ld.share_ratio_statistic(1.5, 0.2)


def test_p020_starts_from_the_uniform_attention_share() -> None:
    """Z = 0 at init: the distinct share at step 0 is the mean fraction of context tokens that are the example's own
    distinct tokens, counted here from the data."""
    out = claim("P020-scan-to-distinct")(0, "smoke")
    data = scan_snap_data(ld.SCAN_SNAP["smoke"]["examples"], seed=0)
    own = data.distinct[data.next_token - data.next_ids[0]]  # (examples, |D_n|)
    counted = (data.context[:, :, None] == own[:, None, :]).any(-1).double().mean()
    assert out.extra["initial distinct share"] == pytest.approx(float(counted), abs=1e-6)
    assert out.value == pytest.approx(out.extra["final distinct share"] / out.extra["initial distinct share"])


def test_p020_frozen_attention_is_not_reproduced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted fault: η_Z = 0, the attention never moves: the ratio is exactly 1 for every seed."""
    monkeypatch.setitem(ld.SCAN_SNAP_LR, "lr_attention", 0.0)
    ld.scan_snap_run.cache_clear()
    try:
        values = [claim("P020-scan-to-distinct")(seed, "smoke").value for seed in range(3)]
    finally:
        ld.scan_snap_run.cache_clear()
    assert values == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    assert verdict_of("P020-scan-to-distinct", values) == "not reproduced"


# ---- P048


def test_u_depth_on_planted_curves() -> None:
    u = [3.0, 2.0, 1.0, 1.5, 2.5]  # falls by 2, rises by 1.5: min(2, 1.5) / 3
    assert ld.u_depth_statistic(u, window=1) == pytest.approx(0.5)
    assert ld.u_depth_statistic([3.0, 2.0, 1.0, 0.5], window=1) == 0.0  # only falls: the minimum is the end
    assert ld.u_depth_statistic([1.0, 2.0, 3.0], window=1) == 0.0  # only rises: the minimum is the start
    # smoothing over 2 points: [2.5, 1.5, 1.25, 2.0] -> min(1.25, 0.75) / 2.5
    assert ld.u_depth_statistic(u, window=2) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="values"):
        ld.u_depth_statistic([1.0, 2.0], window=5)


def test_p048_monotone_entropy_is_not_reproduced() -> None:
    """Planted fault: entropy curves that only fall (the linear-MLP prediction) give U-depth 0."""
    values = [ld.u_depth_statistic(np.linspace(2.5, end, 100)) for end in (0.9, 1.0, 1.1)]
    assert verdict_of("P048-entropy-u-shape", values) == "not reproduced"
    u_shaped = [ld.u_depth_statistic(2.0 + (np.linspace(-1, 1, 101) ** 2) * s) for s in (0.4, 0.5, 0.6)]
    assert verdict_of("P048-entropy-u-shape", u_shaped) == "reproduced"


# ---- P053


def test_p053_chance_among_the_objects_is_not_reproduced() -> None:
    """The chance level the rule is set against: every world holds NUM_OBJECTS objects (a guess among the occupied
    cells is right 1/NUM_OBJECTS of the time), and that accuracy is judged not reproduced; a perfect one reproduced."""
    _, test, _ = ld.refex_split(40, 40, num_objects=ld.NUM_OBJECTS, seed=0)
    assert ((test.world >= 0).all(-1).sum(1) == ld.NUM_OBJECTS).all()
    chance = 1 / ld.NUM_OBJECTS
    assert verdict_of("P053-held-out-combinations", [chance - 0.01, chance, chance + 0.01]) == "not reproduced"
    assert verdict_of("P053-held-out-combinations", [0.97, 0.99, 1.0]) == "reproduced"


# ---- P131


def test_bp_ratio_on_planted_accuracies_and_a_constant_predictor() -> None:
    assert ld.bp_ratio_statistic(0.45, 0.9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="accuracies"):
        ld.bp_ratio_statistic(0.5, 0.0)
    # planted fault: predict root 0 always, on trees of the claim's setting: accuracy ≈ 1/q, far below BP's
    ratios = []
    for seed in range(3):
        test = ld.filtered_tree_data(2000, depth=ld.TREE_DEPTH, q=ld.TREE_Q, filtering=ld.TREE_FILTERING,
                                     grammar_seed=seed, seed=seed)
        constant = float((test.roots == 0).double().mean())
        ratios.append(ld.bp_ratio_statistic(constant, ld.bp_accuracy(test)))
    assert verdict_of("P131-root-near-bp", ratios) == "not reproduced"


def test_p131_smoke_value_is_the_last_accuracy_over_bp() -> None:
    out = claim("P131-root-near-bp")(0, "smoke")
    assert out.value == pytest.approx(out.extra["encoder accuracy"] / out.extra["BP accuracy"])
    assert out.extra["BP accuracy"] > 1 / ld.TREE_Q  # BP beats guessing on this grammar


# ---- P186


def test_p186_topic_embeddings_reproduce_and_random_ones_do_not() -> None:
    topics = word_topics(block_topics(10, 100))
    one_hot = torch.nn.functional.one_hot(topics, 10).double()  # e_w = the unit vector of its topic
    within, across = embedding_topic_similarity(one_hot, topics)
    assert ld.similarity_gap_statistic(within, across, 1.0) == pytest.approx(1.0)
    gaps = []
    for seed in range(3):  # planted fault: topic-blind random embeddings, gap ≈ 0
        e = torch.randn(100, 256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        w, a = embedding_topic_similarity(e, topics)
        gaps.append(ld.similarity_gap_statistic(w, a, float((e**2).sum(1).mean())))
    assert verdict_of("P186-embedding-topics", gaps) == "not reproduced"
    assert verdict_of("P186-embedding-topics", [1.0, 0.9, 0.95]) == "reproduced"


def test_p186_uniform_attention_has_ratio_one() -> None:
    """Planted fault: attention uniform over the other positions gives the ratio 1 exactly (not reproduced);
    attention mostly within the topic gives 0.7 / 0.1 = 7."""
    topics = word_topics(block_topics(2, 4))  # words 0, 1 topic 0; words 2, 3 topic 1
    words = torch.tensor([[0, 1, 2, 3]])
    padding = torch.zeros(1, 4, dtype=torch.bool)
    uniform = torch.full((1, 4, 4), 0.25)
    w, a = attention_topic_similarity(uniform, words, topics, padding)
    assert ld.attention_ratio_statistic(w, a) == pytest.approx(1.0)
    assert verdict_of("P186-attention-topics", [1.0, 1.0, 1.0]) == "not reproduced"
    mostly_within = torch.tensor([[[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7],
                                   [0.1, 0.1, 0.7, 0.1]]])
    w, a = attention_topic_similarity(mostly_within, words, topics, padding)
    assert ld.attention_ratio_statistic(w, a) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="across"):
        ld.attention_ratio_statistic(0.5, 0.0)
