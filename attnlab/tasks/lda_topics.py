"""LDA topic documents, a one-layer masked-LM transformer and its topic statistics (P186, Li et al. 2023).

The data (latent Dirichlet allocation). T topics over V words; topic t has the word distribution β_t
(row t of β ∈ R^{T×V}); a document of length N draws

    θ ~ Dirichlet(α 1_T),    z_i ~ Categorical(θ),    w_i ~ Categorical(β_{z_i}),    i = 1 … N,

so given θ its words are i.i.d. with the marginal P(w | θ) = Σ_t θ_t β_{t,w} = (θ β)_w (`word_marginal`).
As in the official generator (transformer_topic_model_LDA, `lda_bert_demo.ipynb`), the topics own disjoint
blocks of V/T words and are uniform on them (β_{t,w} = T/V on block t), α = 0.1, T = 10, V = 100, and the
length N is uniform on [100, 150].

The model and training (the official recipe in small): masked language modelling, 15% of the positions
chosen, of which 80% become a MASK token, 10% a uniform random word and 10% stay (`mask_tokens`); one
layer, one head of softmax attention over the document, embeddings E (learned here, since claim (i) is
about them; the shipped official config freezes one-hot embeddings and studies the attention), attention
softmax(E Wq (E Wk)ᵀ / √d) with padding masked, output attention·(E Wv) decoded to the V words
(`TopicMLM`).

The statistics the paper reports, with topic(w) the topic owning word w:
  (i)  `embedding_topic_similarity`: the mean of ⟨e_w, e_w'⟩ over ordered pairs w ≠ w' of the same topic
       and over pairs of different topics;
  (ii) `attention_topic_similarity`: the mean attention weight A(i → j), over query positions i and key
       positions j ≠ i of the documents, split by whether words w_i and w_j share a topic.
The claim is that both are larger within topics than across topics after training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ._checks import check_count

TOPIC_STRUCTURE = Paper(
    "P186", "How Do Transformers Learn Topic Structure: Towards a Mechanistic Understanding", 2023, "2303.04245"
)


def block_topics(num_topics: int, num_words: int) -> np.ndarray:
    """β (T, V): topic t uniform on its own block of V/T words (the official topic-word matrix)."""
    t, v = check_count("num_topics", num_topics, 1), check_count("num_words", num_words, 1)
    if v % t:
        raise ValueError(f"num_words: expected a multiple of num_topics = {t}, got {v}")
    return np.kron(np.eye(t), np.full((1, v // t), t / v))


def word_marginal(theta: Tensor | np.ndarray, topic_word: Tensor | np.ndarray) -> np.ndarray:
    """P(w | θ) = Σ_t θ_t β_{t,w}, (..., V) float64."""
    return np.asarray(theta, dtype=np.float64) @ np.asarray(topic_word, dtype=np.float64)


@dataclass(frozen=True)
class LDAData:
    """`words` (documents, N_max) LongTensor padded with the PAD id V; `topics` (documents, N_max) the z_i
    (−1 on padding); `lengths` (documents,); `theta` (documents, T) and `topic_word` β (T, V) float64."""

    words: Tensor
    topics: Tensor
    lengths: Tensor
    theta: Tensor
    topic_word: Tensor

    def __len__(self) -> int:
        return self.words.shape[0]

    @property
    def num_words(self) -> int:
        return self.topic_word.shape[1]

    @property
    def padding(self) -> Tensor:
        """(documents, N_max) bool, True on padding."""
        return torch.arange(self.words.shape[1]) >= self.lengths[:, None]


def lda_documents(
    num_documents: int,
    num_topics: int = 10,
    num_words: int = 100,
    alpha: float = 0.1,
    min_length: int = 100,
    max_length: int = 150,
    seed: int = 0,
    topic_word: np.ndarray | Tensor | None = None,
) -> LDAData:
    """`num_documents` LDA documents (module doc); β = `block_topics(T, V)` unless `topic_word` (T, V) is given."""
    n = check_count("num_documents", num_documents, 1)
    if topic_word is None:
        beta = block_topics(num_topics, num_words)
    else:
        beta = np.asarray(topic_word.detach().cpu() if isinstance(topic_word, Tensor) else topic_word, dtype=np.float64)
        if beta.ndim != 2 or (beta < 0).any() or not np.allclose(beta.sum(1), 1.0):
            raise ValueError(f"topic_word: expected a (T, V) array of distributions over words, got shape {beta.shape}")
    t, v = beta.shape
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite float > 0, got {alpha!r}")
    low = check_count("min_length", min_length, 1)
    high = check_count("max_length", max_length, low)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, size=n)
    theta = rng.dirichlet(np.full(t, float(alpha)), size=n)
    cdf = np.cumsum(theta, 1)
    topics = np.minimum((rng.random((n, high, 1)) * cdf[:, None, -1:] >= cdf[:, None, :]).sum(-1), t - 1)
    word_cdf = np.cumsum(beta, 1)[topics]  # (n, N, V)
    words = np.minimum((rng.random((n, high, 1)) * word_cdf[..., -1:] >= word_cdf).sum(-1), v - 1)
    pad = np.arange(high)[None] >= lengths[:, None]
    words[pad], topics[pad] = v, -1
    return LDAData(torch.from_numpy(words.astype(np.int64)), torch.from_numpy(topics.astype(np.int64)),
                   torch.from_numpy(lengths.astype(np.int64)), torch.from_numpy(theta), torch.from_numpy(beta))


def mask_tokens(
    data: LDAData, mask_prob: float = 0.15, random_prob: float = 0.1, keep_prob: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The masked-LM inputs and targets: each non-padding position is chosen with prob. `mask_prob`; a chosen
    one becomes MASK (id V + 1) with prob. 1 − random − keep, a uniform word with prob. `random_prob`, or stays.
    Targets are the original words at chosen positions and −100 (ignored) elsewhere."""
    for name, p in (("mask_prob", mask_prob), ("random_prob", random_prob), ("keep_prob", keep_prob)):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{name}: expected a float in [0, 1], got {p!r}")
    if random_prob + keep_prob > 1:
        raise ValueError(f"random_prob + keep_prob: expected <= 1, got {random_prob + keep_prob}")
    rng = np.random.default_rng(seed)
    shape = tuple(data.words.shape)
    chosen = (rng.random(shape) < mask_prob) & ~data.padding.numpy()
    u = rng.random(shape)
    inputs = data.words.numpy().copy()
    inputs[chosen & (u < random_prob)] = rng.integers(0, data.num_words, size=shape)[chosen & (u < random_prob)]
    inputs[chosen & (u >= random_prob + keep_prob)] = data.num_words + 1
    targets = np.where(chosen, data.words.numpy(), -100)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class TopicMLM(nn.Module):
    """One layer, one head (module doc): embeddings of the V words + PAD + MASK, attention over the
    document with padding masked, decoder to the V words."""

    def __init__(self, num_words: int, dim: int = 32) -> None:
        super().__init__()
        self.num_words = check_count("num_words", num_words, 1)
        dim = check_count("dim", dim, 1)
        self.embed = nn.Embedding(self.num_words + 2, dim)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.decoder = nn.Linear(dim, self.num_words)

    def attention(self, inputs: Tensor, padding: Tensor) -> Tensor:
        """A (documents, N, N): softmax over the non-padding keys of e_i Wq · e_j Wk / √d."""
        h = self.embed(inputs)
        scores = self.query(h) @ self.key(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        return scores.masked_fill(padding[:, None, :], float("-inf")).softmax(-1)

    def forward(self, inputs: Tensor, padding: Tensor) -> Tensor:
        """Word logits (documents, N, V)."""
        return self.decoder(self.attention(inputs, padding) @ self.value(self.embed(inputs)))


def train_topic_mlm(
    model: TopicMLM, data: LDAData, steps: int, lr: float = 0.01, batch_size: int = 32, seed: int = 0
) -> list[float]:
    """Adam (the official optimiser, lr 0.01) on the masked-LM loss, fresh masks per step; the losses."""
    steps, batch_size = check_count("steps", steps, 1), check_count("batch_size", batch_size, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = model.decoder.weight.device
    losses = []
    for step in range(steps):
        rows = torch.randint(0, len(data), (batch_size,), generator=generator)
        batch = LDAData(data.words[rows], data.topics[rows], data.lengths[rows], data.theta[rows], data.topic_word)
        inputs, targets = mask_tokens(batch, seed=seed * 1_000_003 + step)
        logits = model(inputs.to(device), batch.padding.to(device))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().to(device), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def word_topics(topic_word: Tensor | np.ndarray) -> Tensor:
    """topic(w) = argmax_t β_{t,w}, (V,) LongTensor (the owning topic when the blocks are disjoint)."""
    return torch.as_tensor(np.asarray(topic_word)).argmax(0)


def embedding_topic_similarity(embeddings: Tensor, topic_of_word: Tensor) -> tuple[float, float]:
    """(mean ⟨e_w, e_w'⟩ over ordered pairs w ≠ w' of one topic, the same over pairs of different topics);
    `embeddings` (V, d) rows of the V words."""
    if embeddings.ndim != 2 or embeddings.shape[0] != topic_of_word.shape[0]:
        raise ValueError(f"embeddings: expected ({topic_of_word.shape[0]}, d), got {tuple(embeddings.shape)}")
    gram = embeddings.double() @ embeddings.double().T
    same = topic_of_word[:, None] == topic_of_word[None, :]
    off_diagonal = ~torch.eye(len(topic_of_word), dtype=torch.bool, device=same.device)
    return float(gram[same & off_diagonal].mean()), float(gram[~same].mean())


def attention_topic_similarity(attention: Tensor, words: Tensor, topic_of_word: Tensor, padding: Tensor) -> tuple[float, float]:
    """(mean A(i → j) over non-padding i ≠ j with topic(w_i) = topic(w_j), the same for different topics);
    `attention` (documents, N, N), `words` (documents, N) with any id on padding."""
    if attention.shape != words.shape + words.shape[-1:]:
        raise ValueError(f"attention: expected {tuple(words.shape + words.shape[-1:])}, got {tuple(attention.shape)}")
    topic = topic_of_word[words.clamp(max=len(topic_of_word) - 1)]
    valid = ~padding[:, :, None] & ~padding[:, None, :] & ~torch.eye(words.shape[1], dtype=torch.bool, device=words.device)
    same = topic[:, :, None] == topic[:, None, :]
    a = attention.double()
    return float(a[valid & same].mean()), float(a[valid & ~same].mean())


add(
    Spec(
        name="lda-topics",
        kind="task",
        paper=TOPIC_STRUCTURE,
        factory=lda_documents,
        family="G",
        summary="LDA documents (Dirichlet topic mixtures, disjoint topic word blocks); one-layer masked-LM model; "
        "within- vs across-topic embedding inner products and attention weights",
        params=(
            Param("num_documents", int, doc="number of documents", low=1),
            Param("num_topics", int, 10, "T topics", low=1),
            Param("num_words", int, 100, "V words (a multiple of T)", low=1),
            Param("alpha", float, 0.1, "Dirichlet concentration of θ", low=0.0),
            Param("min_length", int, 100, "shortest document", low=1),
            Param("max_length", int, 150, "longest document", low=1),
            Param("seed", int, 0, "seed of the documents"),
        ),
    )
)
