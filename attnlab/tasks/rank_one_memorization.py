"""Memorisation with one rank-1 single-head attention layer (P180, Kajitsuka & Sato 2023).

The paper proves that one self-attention layer whose query and key weights have rank 1 realises a
contextual mapping, through the Boltzmann operator that softmax attention computes,

    boltz(z) = Σ_i z_i e^{z_i} / Σ_j e^{z_j}          (`boltzmann`)

so a Transformer FF → SA → FF with one head and W_Q, W_K ∈ R^{d×1} (the score matrix W_Q W_Kᵀ of rank 1)
can memorise N arbitrary (sequence, label) pairs. The task (`memorization_data`): N token sequences of
length n over a vocabulary of V tokens, uniform, and labels uniform on [C], independent of the sequences.
Attention without positions is blind to the order of the tokens, so the sequences are drawn distinct
as (multiset of tokens, last token), the last token being where the model reads its answer.

The model (`RankOneTransformer`): token embeddings, a residual token-wise MLP (FF₁), a residual single-head
attention with scores (X w_q)(X w_k)ᵀ / √d (w_q, w_k ∈ R^d, so the score matrix w_q w_kᵀ has rank 1 by
construction, whatever training does), values and output full d × d, a residual token-wise MLP (FF₂),
and a linear classifier at the last token. The evaluation is the paper's: training accuracy, which
reaches 100% (memorisation) for N within capacity (`train_to_memorize`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ._checks import check_count

KAJITSUKA_SATO = Paper(
    "P180",
    "Are Transformers with One Layer Self-Attention Using Low-Rank Weight Matrices Universal Approximators?",
    2023,
    "2307.14023",
)


def boltzmann(z: Tensor, dim: int = -1) -> Tensor:
    """boltz(z) = Σ_i z_i softmax(z)_i along `dim`: what a softmax head outputs when its values are its scores."""
    return (z * z.softmax(dim)).sum(dim)


@dataclass(frozen=True)
class MemorizationData:
    """`inputs` (N, n) and `labels` (N,) LongTensors."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


def memorization_data(
    num_sequences: int, seq_len: int = 8, vocab_size: int = 16, num_classes: int = 2, seed: int = 0
) -> MemorizationData:
    """N sequences, uniform tokens, distinct as (multiset, last token), with uniform independent labels; seeded."""
    n = check_count("num_sequences", num_sequences)
    length = check_count("seq_len", seq_len)
    v = check_count("vocab_size", vocab_size, 2)
    c = check_count("num_classes", num_classes, 2)
    distinct = math.comb(v + length - 2, length - 1) * v  # multisets of the first n − 1 tokens × the last token
    if n > distinct // 2:
        raise ValueError(
            f"num_sequences: expected <= {distinct // 2} (half the {distinct} sequences distinguishable without positions "
            f"for seq_len={length}, vocab_size={v}), got {n}"
        )
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    seen: set[tuple[int, ...]] = set()
    while len(rows) < n:
        row = rng.integers(0, v, size=length)
        key = (*np.sort(row[:-1]).tolist(), int(row[-1]))
        if key not in seen:
            seen.add(key)
            rows.append(row)
    labels = rng.integers(0, c, size=n)
    return MemorizationData(torch.from_numpy(np.stack(rows)), torch.from_numpy(labels))


class RankOneTransformer(nn.Module):
    """FF₁ → single-head attention with rank-1 W_Q W_Kᵀ = w_q w_kᵀ → FF₂, each residual; read at the last token."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        d = check_count("dim", dim)
        h = check_count("hidden", hidden)
        self.embed = nn.Embedding(check_count("vocab_size", vocab_size, 2), d)
        self.ff1 = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))
        self.w_q = nn.Parameter(torch.randn(d) / math.sqrt(d))
        self.w_k = nn.Parameter(torch.randn(d) / math.sqrt(d))
        self.value = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.ff2 = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))
        self.classifier = nn.Linear(d, check_count("num_classes", num_classes, 2))

    def score_matrix(self) -> Tensor:
        """W_Q W_Kᵀ = w_q w_kᵀ, (dim, dim), of rank 1."""
        return torch.outer(self.w_q, self.w_k)

    def attention(self, x: Tensor) -> Tensor:
        """softmax((X w_q)(X w_k)ᵀ / √d) X W_V W_O, (batch, n, dim)."""
        scores = (x @ self.w_q)[:, :, None] * (x @ self.w_k)[:, None, :] / math.sqrt(x.shape[-1])
        return self.out(scores.softmax(-1) @ self.value(x))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (batch, n) -> class logits (batch, num_classes)."""
        x = self.embed(tokens)
        x = x + self.ff1(x)
        x = x + self.attention(x)
        x = x + self.ff2(x)
        return self.classifier(x[:, -1])


def train_to_memorize(model: nn.Module, data: MemorizationData, max_steps: int = 2000, lr: float = 3e-3) -> tuple[int, float]:
    """Full-batch Adam on the cross-entropy until every training label is predicted or `max_steps`;
    (steps taken, final training accuracy)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    acc = 0.0
    for step in range(1, check_count("max_steps", max_steps) + 1):
        logits = model(data.inputs)
        loss = nn.functional.cross_entropy(logits, data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            acc = float((model(data.inputs).argmax(-1) == data.labels).float().mean())
        if acc == 1.0:
            return step, acc
    return max_steps, acc


add(
    Spec(
        name="rank-one-memorization",
        kind="task",
        paper=KAJITSUKA_SATO,
        factory=memorization_data,
        family="G",
        summary="memorise N random (sequence, label) pairs with FF–SA–FF, one head, rank-1 W_Q W_Kᵀ",
        params=(
            Param("num_sequences", int, doc="number N of (sequence, label) pairs", low=1),
            Param("seq_len", int, 8, "tokens per sequence", low=1),
            Param("vocab_size", int, 16, "vocabulary size", low=2),
            Param("num_classes", int, 2, "number of labels", low=2),
            Param("seed", int, 0, "seed of the numpy Generator"),
        ),
    )
)
