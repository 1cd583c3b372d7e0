"""LDA topic data (P186): the word law against its exact marginal θβ, the Dirichlet moments, the masking
rates, and the within/across-topic statistics on planted embeddings and attention maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import attnlab
from attnlab.tasks.lda_topics import (
    LDAData,
    TopicMLM,
    attention_topic_similarity,
    block_topics,
    embedding_topic_similarity,
    lda_documents,
    mask_tokens,
    train_topic_mlm,
    word_marginal,
    word_topics,
)


def test_registered_as_a_task_of_p186() -> None:
    spec = attnlab.get("lda-topics", kind="task")
    assert (spec.kind, spec.family, spec.paper.id, spec.paper.arxiv) == ("task", "G", "P186", "2303.04245")
    assert isinstance(spec.build(num_documents=2), LDAData)


def test_block_topics() -> None:
    beta = block_topics(2, 6)
    assert np.array_equal(beta, [[1 / 3] * 3 + [0] * 3, [0] * 3 + [1 / 3] * 3])
    with pytest.raises(ValueError, match="num_words"):
        block_topics(4, 6)


def test_words_follow_theta_beta_given_theta() -> None:
    beta = np.array([[0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.1, 0.1, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2, 0.2]])
    data = lda_documents(400, alpha=0.7, min_length=20, max_length=40, topic_word=beta, seed=4)
    expected = np.zeros(5)
    counts = np.zeros(5)
    for d in range(len(data)):
        n = int(data.lengths[d])
        expected += n * word_marginal(data.theta[d], beta)
        counts += np.bincount(data.words[d, :n].numpy(), minlength=5)
    assert counts.sum() == pytest.approx(expected.sum(), rel=1e-12) and counts.sum() == data.lengths.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # each word is drawn from its own topic's row: no word outside supp β_z
    valid = ~data.padding
    assert (beta[data.topics[valid], data.words[valid]] > 0).all()
    assert (data.words[data.padding] == 5).all() and (data.topics[data.padding] == -1).all()


def test_dirichlet_moments_and_lengths() -> None:
    t, alpha = 4, 0.3
    data = lda_documents(20_000, num_topics=t, num_words=8, alpha=alpha, min_length=3, max_length=5, seed=5)
    a0 = t * alpha
    var = alpha * (a0 - alpha) / (a0**2 * (a0 + 1))
    theta = data.theta.numpy()
    assert np.allclose(theta.sum(1), 1.0)
    assert np.abs(theta.mean(0) - 1 / t).max() < 5 * np.sqrt(var / len(data))
    assert np.allclose(theta.var(0), var, rtol=0.05)
    assert np.allclose(np.bincount(data.lengths.numpy())[3:] / len(data), 1 / 3, atol=0.015)


def test_masking_rates() -> None:
    data = lda_documents(200, seed=6)
    inputs, targets = mask_tokens(data, seed=1)
    valid = ~data.padding
    chosen = targets != -100
    n = int(valid.sum())
    assert not chosen[data.padding].any() and (targets[chosen] == data.words[chosen]).all()
    assert abs(chosen.sum().item() / n - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
    m = int(chosen.sum())
    masked = (inputs[chosen] == 101).double().mean().item()
    assert abs(masked - 0.8) < 4 * np.sqrt(0.16 / m)
    unchanged = (inputs[chosen] == data.words[chosen]).double().mean().item()
    assert abs(unchanged - (0.1 + 0.1 / 100)) < 4 * np.sqrt(0.1 * 0.9 / m)  # kept, or replaced by itself
    assert (inputs[~chosen] == data.words[~chosen]).all()


def test_embedding_statistic_on_planted_embeddings() -> None:
    beta = block_topics(3, 9)
    topic = word_topics(beta)
    assert topic.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    a, b = 2.0, 5.0
    e = torch.cat([a * torch.eye(3)[topic], b * torch.eye(9)], 1)  # ⟨e_w, e_w'⟩ = a² same topic, 0 across (w ≠ w')
    within, across = embedding_topic_similarity(e, topic)
    assert (within, across) == (pytest.approx(a * a, abs=1e-12), pytest.approx(0.0, abs=1e-12))


def test_attention_statistic_by_hand() -> None:
    topic = torch.tensor([0, 0, 1])  # words 0, 1 in topic 0; word 2 in topic 1
    words = torch.tensor([[0, 1, 2, 3]])  # the last position is padding
    padding = torch.tensor([[False, False, False, True]])
    a = torch.tensor(dtype=torch.float64, data=[[[0.5, 0.2, 0.3, 0.0], [0.6, 0.1, 0.3, 0.0], [0.1, 0.7, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    within, across = attention_topic_similarity(a, words, topic, padding)
    assert within == pytest.approx((0.2 + 0.6) / 2, abs=1e-12)  # pairs (0→1), (1→0)
    assert across == pytest.approx((0.3 + 0.3 + 0.1 + 0.7) / 4, abs=1e-12)  # (0→2), (1→2), (2→0), (2→1)


def test_model_attention_uniform_with_zero_query_and_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    data = lda_documents(64, min_length=20, max_length=30, seed=7)
    model = TopicMLM(100, dim=16)
    torch.nn.init.zeros_(model.query.weight)
    attention = model.attention(data.words, data.padding)
    expected = (~data.padding).double() / data.lengths[:, None]
    assert torch.allclose(attention.double(), expected[:, None, :].expand_as(attention), atol=1e-6)
    losses = train_topic_mlm(TopicMLM(100, dim=16), data, steps=60, lr=0.01, batch_size=16)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
