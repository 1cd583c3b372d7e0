"""The two tasks of "On the Expressivity Role of LayerNorm in Transformers' Attention" (P037, Brody et al. 2023).

LayerNorm without its affine part is a projection followed by a scaling,

    LN(x) = scale(project(x)),   project(x) = x − (1ᵀx / d) 1   (onto the hyperplane 1^⊥),
                                 scale(x) = √d · x / ‖x‖         (onto the sphere of radius √d)

and each part helps the attention that follows:

(a) projection: every projected key k satisfies 1ᵀk = 0, so the query q ∝ 1 scores every key alike and
    attends uniformly — the average a "majority" needs. The majority task (`majority_data`): sequences of
    length L over C classes whose class counts (n₁ … n_C) are uniform over the count vectors summing to L
    whose largest count beats the runner-up by at least δ (`min_margin`), the tokens in a uniform random
    order; the label of every position is the majority class (the official code's labels; its sequences
    come from enumerated partitions, here from the uniform law on the count vectors, drawn by stars and
    bars with rejection). The model (`MajorityModel`): embeddings, one pre-norm softmax block whose norm is
    LayerNorm, scaling only, or none, logits by the tied embedding; the paper compares their learning.

(b) scaling: a key k_j is *selectable* when some query makes it the strict argmax, qᵀk_j > qᵀk_i for all
    i ≠ j, i.e. when k_j is a vertex of the convex hull of the keys (not a convex combination of the
    others). Keys scaled to one norm lie on a sphere, where every distinct key is a vertex, so none is
    unselectable. `unselectable_keys` decides each key by a linear program: k_j is unselectable iff
    λ ≥ 0, Σ λ_i = 1, Σ_{i≠j} λ_i k_i = k_j is feasible. The task (`random_key_sets`): Gaussian key sets,
    counted before and after scaling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ..mechanisms.dense.softmax import SoftmaxAttention
from ._checks import check_count

LAYERNORM_EXPRESSIVITY = Paper("P037", "On the Expressivity Role of LayerNorm in Transformers' Attention", 2023, "2305.02582")
NORMS = ("layernorm", "scale_only", "none")


def project(x: Tensor) -> Tensor:
    """x − mean(x) 1 along the last axis: the projection onto 1^⊥."""
    return x - x.mean(-1, keepdim=True)


def scale(x: Tensor) -> Tensor:
    """√d · x / ‖x‖ along the last axis (zero vectors stay zero)."""
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, math.sqrt(x.shape[-1]) * x / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def unselectable_keys(keys: Tensor | np.ndarray) -> np.ndarray:
    """(n,) bool: True where no query makes the key the strict argmax (it lies in the hull of the others)."""
    k = np.asarray(keys.detach().cpu() if isinstance(keys, Tensor) else keys, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] < 1:
        raise ValueError(f"keys: expected an (n, d) array with n >= 1, got shape {k.shape}")
    n = k.shape[0]
    out = np.zeros(n, dtype=bool)
    for j in range(n):
        others = np.delete(k, j, axis=0)
        if len(others) == 0:
            continue
        a_eq = np.vstack([others.T, np.ones((1, n - 1))])
        b_eq = np.append(k[j], 1.0)
        res = linprog(np.zeros(n - 1), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
        out[j] = res.status == 0  # feasible: a convex combination of the others
    return out


@dataclass(frozen=True)
class KeySets:
    """`keys` (sets, n, d) float64 Gaussian key sets."""

    keys: Tensor

    def __len__(self) -> int:
        return self.keys.shape[0]

    def unselectable_counts(self, scaled: bool = False) -> np.ndarray:
        """(sets,) the number of unselectable keys in each set, after `scale` when `scaled`."""
        keys = scale(self.keys) if scaled else self.keys
        return np.array([int(unselectable_keys(s).sum()) for s in keys])


def random_key_sets(num_sets: int, num_keys: int = 16, dim: int = 3, seed: int = 0) -> KeySets:
    """`num_sets` sets of `num_keys` i.i.d. N(0, I_dim) keys, seeded (numpy)."""
    rng = np.random.default_rng(seed)
    shape = (check_count("num_sets", num_sets, 1), check_count("num_keys", num_keys, 1), check_count("dim", dim, 1))
    return KeySets(torch.from_numpy(rng.standard_normal(shape)))


@dataclass(frozen=True)
class MajorityData:
    """`inputs` (examples, L) classes; `labels` (examples, L), every position the majority class."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


def majority_data(num_examples: int, seq_len: int = 50, num_classes: int = 20, min_margin: int = 6, seed: int = 0) -> MajorityData:
    """Sequences whose class counts are uniform over the count vectors with a majority margin >= `min_margin`."""
    n = check_count("num_examples", num_examples, 1)
    length = check_count("seq_len", seq_len, 1)
    c = check_count("num_classes", num_classes, 2)
    margin = check_count("min_margin", min_margin, 1)
    if margin > length:
        raise ValueError(f"min_margin: expected <= seq_len={length}, got {margin}")
    rng = np.random.default_rng(seed)
    counts = np.empty((0, c), dtype=np.int64)
    for _ in range(10_000):
        # stars and bars: C − 1 bars among L + C − 1 slots give a uniform count vector summing to L
        bars = np.sort(rng.random((4 * n, length + c - 1)).argsort(1)[:, : c - 1], 1)
        edges = np.concatenate([np.full((4 * n, 1), -1), bars, np.full((4 * n, 1), length + c - 1)], 1)
        draw = np.diff(edges, axis=1) - 1
        top2 = np.sort(draw, 1)[:, -2:]
        counts = np.concatenate([counts, draw[top2[:, 1] - top2[:, 0] >= margin]])
        if len(counts) >= n:
            break
    else:
        raise ValueError(f"min_margin: {margin} is too rare to sample for seq_len={length}, num_classes={c}")
    counts = counts[:n]
    tokens = np.repeat(np.tile(np.arange(c), n), counts.reshape(-1)).reshape(n, length)
    tokens = rng.permuted(tokens, axis=1)
    labels = np.repeat(counts.argmax(1)[:, None], length, 1)
    return MajorityData(torch.from_numpy(tokens), torch.from_numpy(labels))


class MajorityModel(nn.Module):
    """Embeddings, one pre-norm block x + Attn(N(x)), x + MLP(x), logits by the tied embedding;
    N = LayerNorm without affine (`layernorm`), `scale_only` (no projection) or `none`."""

    def __init__(self, num_classes: int, dim: int = 8, heads: int = 1, norm: str = "layernorm") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.embed = nn.Embedding(check_count("num_classes", num_classes, 2), dim)
        self.attention = SoftmaxAttention(dim, heads, qkv_bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def normalize(self, x: Tensor) -> Tensor:
        if self.norm == "layernorm":
            return scale(project(x))
        return scale(x) if self.norm == "scale_only" else x

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (batch, L) -> logits (batch, L, num_classes)."""
        x = self.embed(tokens)
        x = x + self.attention(self.normalize(x))
        x = x + self.mlp(x)
        return x @ self.embed.weight.T


add(
    Spec(
        name="layernorm-majority",
        kind="task",
        paper=LAYERNORM_EXPRESSIVITY,
        factory=majority_data,
        family="G",
        summary="majority: label every position with the most frequent class; LayerNorm's projection lets a query attend uniformly",
        params=(
            Param("num_examples", int, doc="number of sequences", low=1),
            Param("seq_len", int, 50, "tokens per sequence", low=1),
            Param("num_classes", int, 20, "number of classes", low=2),
            Param("min_margin", int, 6, "the majority count beats the runner-up by at least this", low=1),
            Param("seed", int, 0, "seed of the numpy Generator"),
        ),
    )
)
add(
    Spec(
        name="unselectable-keys",
        kind="task",
        paper=LAYERNORM_EXPRESSIVITY,
        factory=random_key_sets,
        family="G",
        summary="Gaussian key sets: count the keys no query can select (inside the hull), before and after LN scaling",
        params=(
            Param("num_sets", int, doc="number of key sets", low=1),
            Param("num_keys", int, 16, "keys per set", low=1),
            Param("dim", int, 3, "key dimension", low=1),
            Param("seed", int, 0, "seed of the numpy Generator"),
        ),
    )
)
