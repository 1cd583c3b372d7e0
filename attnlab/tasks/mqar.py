"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (P243).

An example of length L with D key–value pairs, vocabulary V:

    positions 0 .. 2D-1   k₁ v₁ k₂ v₂ … k_D v_D     keys from {1, …, ⌊V/2⌋ − 1},
                                                     values from {⌊V/2⌋, …, V − 1},
                                                     D distinct of each, in random order
    positions 2D .. L-1   each key kⱼ once more, at position 2D + 2·gⱼ; every other
                          position holds filler (0, or a uniform token of [0, V) when
                          `random_non_queries`)

The gaps g₁, …, g_D are distinct, drawn one after the other without replacement from
{0, …, S − 1}, S = (L − 2D) / 2, with probabilities following Zoology's power law

    P(g = i − 1) ∝ a · i^(a − 1),   i = 1 … S          (a = `power_a`, 0.01 by default)

so short gaps are the most likely and a = 1 gives uniform gaps; the j-th key of the
prefix gets the j-th draw. The labels are −100 (ignored) everywhere except at the query
positions, whose label is the value paired with the queried key: a model reading the
query kⱼ must predict vⱼ next. (Zoology builds L + 1 tokens and labels and shifts them,
inputs = x[:-1], labels = y[1:], which puts each value's label at its query's position,
as here.) Filler tokens drawn when `random_non_queries` may repeat a key; they are not
labelled. Zoology needs 4·D ≤ L (so that S ≥ D), an even L and V > L.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add

ZOOLOGY = Paper("P243", "Zoology: Measuring and Improving Recall in Efficient Language Models", 2023, "2312.04927")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARData:
    """MQAR examples: `inputs` and `labels` are (num_examples, seq_len) LongTensors."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def query_mask(self) -> Tensor:
        """True at the query positions (the only labelled ones)."""
        return self.labels != IGNORE_INDEX


def power_law(space: int, power_a: float = 0.01) -> np.ndarray:
    """Zoology's gap probabilities: p[i−1] ∝ a · i^(a−1) for i = 1 … space (sums to 1)."""
    if space < 1:
        raise ValueError(f"space: expected >= 1, got {space}")
    if not power_a > 0:
        raise ValueError(f"power_a: expected > 0, got {power_a}")
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def _distinct(rng: np.random.Generator, rows: int, low: int, high: int, size: int) -> np.ndarray:
    """`size` distinct integers of [low, high) per row, uniform subsets in uniform order.

    Floyd's algorithm (size draws per row, each checked against the ones before) gives a
    uniform subset; a row-wise shuffle then makes its order uniform too.
    """
    n = high - low
    chosen = np.empty((rows, size), dtype=np.int64)
    for i, j in enumerate(range(n - size, n)):
        t = rng.integers(0, j + 1, size=rows)
        taken = (chosen[:, :i] == t[:, None]).any(axis=1)
        chosen[:, i] = np.where(taken, j, t)
    return rng.permuted(chosen, axis=1) + low


def _gaps(rng: np.random.Generator, rows: int, p: np.ndarray, size: int) -> np.ndarray:
    """`size` distinct indices per row, drawn successively without replacement with weights p.

    An exponential race: index i finishes at Eᵢ / pᵢ (Eᵢ ~ Exp(1)); the order of finishing
    is the order of successive weighted draws without replacement.
    """
    finish = rng.exponential(size=(rows, p.size)) / p
    first = np.argpartition(finish, size - 1, axis=1)[:, :size]
    order = np.argsort(np.take_along_axis(finish, first, axis=1), axis=1)
    return np.take_along_axis(first, order, axis=1)


def check_mqar(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
    """Raise ValueError unless (seq_len, num_kv_pairs, vocab_size) is a valid MQAR setting."""
    for name, value in (("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs}, seq_len={seq_len}: MQAR needs 4·num_kv_pairs <= seq_len "
            f"(room for the prefix and for distinct query gaps), got 4·{num_kv_pairs} = {4 * num_kv_pairs}"
        )
    if seq_len % 2:
        raise ValueError(f"seq_len: expected an even length (keys and queries sit on even offsets), got {seq_len}")
    if vocab_size <= seq_len:  # then also vocab_size // 2 - 1 >= num_kv_pairs keys are there to draw
        raise ValueError(f"vocab_size: expected > seq_len={seq_len} (as Zoology requires), got {vocab_size}")


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    seed: int = 0,
    random_non_queries: bool = True,
) -> MQARData:
    """`num_examples` MQAR examples of length `seq_len` with `num_kv_pairs` pairs (see the module doc).

    Deterministic in `seed` (a numpy Generator). `random_non_queries` fills the non-key
    positions with uniform tokens (Zoology's generator default); False leaves them 0 (the
    setting of Zoology's Figure 2 runs).
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"num_examples: expected a positive int, got {num_examples!r}")
    check_mqar(seq_len, num_kv_pairs, vocab_size)
    n, d = int(num_examples), int(num_kv_pairs)
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = _distinct(rng, n, 1, half, d)
    values = _distinct(rng, n, half, vocab_size, d)
    gaps = _gaps(rng, n, power_law((seq_len - 2 * d) // 2, power_a), d)

    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0 : 2 * d : 2] = keys
    inputs[:, 1 : 2 * d : 2] = values
    query_pos = 2 * d + 2 * gaps
    if random_non_queries:
        filler = rng.integers(0, vocab_size, size=(n, seq_len - 2 * d))
        inputs[:, 2 * d :] = filler
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    return MQARData(torch.from_numpy(inputs), torch.from_numpy(labels))


add(
    Spec(
        name="mqar",
        kind="task",
        paper=ZOOLOGY,
        factory=mqar,
        family="G",
        summary="multi-query associative recall: recall the value of each key queried after an interleaved key–value prefix",
        params=(
            Param("num_examples", int, doc="number of examples", low=1),
            Param("seq_len", int, doc="tokens per example (even, >= 4·num_kv_pairs)", low=4),
            Param("num_kv_pairs", int, doc="key–value pairs per example", low=1),
            Param("vocab_size", int, 8192, "vocabulary: keys from the first half, values from the second", low=4),
            Param("power_a", float, 0.01, "power-law exponent of the query gaps (1 = uniform)", low=0.0),
            Param("seed", int, 0, "seed of the numpy Generator"),
            Param("random_non_queries", bool, True, "fill non-key positions with uniform tokens instead of 0"),
        ),
    )
)
