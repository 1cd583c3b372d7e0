"""Random-feature attention regression (P032, Fu, Guo, Bai & Mei 2023).

The data: a query x₀ and N keys x₁ … x_N, all i.i.d. uniform on the unit sphere S^{d−1}, and a target that
does not depend on the order of the keys,

    y = (1/N) Σ_{i=1}^N g(⟨x₀, x_i⟩),   g one of: t (linear), t² (quadratic), t³ (cubic), cos(π t) (cos)

The model: M heads with frozen random query–key matrices W_m ∈ R^{(d+1)×(d+1)} and trainable value vectors
v_m ∈ R^{d+1}, acting on the tokens with a constant coordinate appended, x̃ = (x, 1),

    f(x₀; x_{1:N}) = (1/M) Σ_{m=1}^M Σ_{i=1}^N a_{m,i} ⟨v_m, x̃_i⟩,
    a_{m,i} = softmax_i(x̃₀ᵀ W_m x̃_i)          (activation "softmax", PAPERS.md's form), or
    a_{m,i} = relu(x̃₀ᵀ W_m x̃_i) / N           (activation "relu", the form random-feature theory uses)

with W_m = μ diag(I_d, 0) + G_m, G_m i.i.d. N(0, 1) entries: μ = 0 is the zero-mean sampling, μ > 0 the
non-zero mean the paper finds better for targets of ⟨x₀, x_i⟩. (Without the constant coordinate the
model could not express even the linear target: its features have degree p in x₀ and p + 1 in x_i, the
wrong parity for ⟨x₀, x_i⟩.) f is linear in V = (v₁ … v_M): f = ⟨V, Φ⟩ with the features
Φ_m = (1/M) Σ_i a_{m,i} x̃_i ∈ R^{d+1}, so training is ridge regression with a closed form,

    V̂ = argmin_V Σ_j (y_j − ⟨V, Φ_j⟩)² + λ ‖V‖²  =  (ΦᵀΦ + λ I)⁻¹ Φᵀ y

(`RandomFeatureAttention.fit`). The default activation is "relu": at laptop sizes (d = N = 4, M = 256, a few
thousand samples) the softmax form barely beats the mean on these targets while the relu form fits them. The baseline is the two-layer random-feature MLP on the flattened input
X = (x₀, x₁, …, x_N) ∈ R^{(N+1)d}: features relu(w_kᵀ X) / √K, w_k ~ N(0, I/(N + 1)), k = 1 … K, with the
same ridge fit (`RandomFeatureMLP`). The paper's claims: attention needs fewer samples than the MLP for
such targets, and μ ≠ 0 fewer than μ = 0; the attention's features are invariant to the order of the
keys, the MLP's are not.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add
from ._checks import check_count

RANDOM_FEATURE_ATTENTION = Paper(
    "P032", "What can a Single Attention Layer Learn? A Study Through the Random Features Lens", 2023, "2307.11353"
)
TARGETS: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda t: t,
    "quadratic": lambda t: t**2,
    "cubic": lambda t: t**3,
    "cos": lambda t: torch.cos(math.pi * t),
}


@dataclass(frozen=True)
class KeyQueryData:
    """`query` (examples, d), `keys` (examples, N, d), unit vectors; `y` (examples,) the target; `target` its name."""

    query: Tensor
    keys: Tensor
    y: Tensor
    target: str

    def __len__(self) -> int:
        return self.query.shape[0]


def target_values(query: Tensor, keys: Tensor, target: str) -> Tensor:
    """(1/N) Σ_i g(⟨x₀, x_i⟩) for g = TARGETS[target], (examples,)."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {sorted(TARGETS)}, got {target!r}")
    return TARGETS[target](torch.einsum("nd,nid->ni", query, keys)).mean(-1)


def rf_attention_regression(
    num_examples: int, num_keys: int = 8, dim: int = 8, target: str = "linear", seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> KeyQueryData:
    """Query and keys uniform on S^{d−1}, target (1/N) Σ g(⟨x₀, x_i⟩) (see the module doc); seeded (numpy)."""
    n, m, d = check_count("num_examples", num_examples), check_count("num_keys", num_keys), check_count("dim", dim, 2)
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {sorted(TARGETS)}, got {target!r}")
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((n, m + 1, d))
    points /= np.linalg.norm(points, axis=-1, keepdims=True)  # a normalised Gaussian is uniform on the sphere
    pts = torch.from_numpy(points).to(dtype)
    query, keys = pts[:, 0], pts[:, 1:]
    return KeyQueryData(query, keys, target_values(query, keys, target), target)


def ridge(features: Tensor, y: Tensor, lam: float) -> Tensor:
    """argmin_v ‖F v − y‖² + λ‖v‖², as the least-squares solution of [F; √λ I] v ≈ [y; 0]; λ > 0."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
        raise ValueError(f"lam: expected a float > 0, got {lam!r}")
    p = features.shape[1]
    a = torch.cat([features, math.sqrt(lam) * torch.eye(p, dtype=features.dtype, device=features.device)])
    b = torch.cat([y, y.new_zeros(p)])
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd" if a.device.type == "cpu" else None).solution[:, 0]


def _augment(x: Tensor) -> Tensor:
    """x̃ = (x, 1) along the last axis."""
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1)


class RidgeReadout:
    """A fixed random feature map Φ(query, keys) (`features`, in the subclass) and a linear readout, the values,
    fitted by ridge regression: f = ⟨V, Φ⟩."""

    values: Tensor | None

    def features(self, query: Tensor, keys: Tensor) -> Tensor:
        raise NotImplementedError

    def fit(self, data: KeyQueryData, lam: float = 1e-3) -> Self:
        self.values = ridge(self.features(data.query, data.keys), data.y, lam)
        return self

    def predict(self, query: Tensor, keys: Tensor) -> Tensor:
        if self.values is None:
            raise ValueError("values: expected a fitted model (call fit first), got None")
        return self.features(query, keys) @ self.values


class RandomFeatureAttention(RidgeReadout):
    """M frozen heads W_m = μI + G_m and ridge-fitted values v_m (see the module doc)."""

    def __init__(self, dim: int, heads: int = 64, mean: float = 0.0, activation: str = "relu", seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        if activation not in ("softmax", "relu"):
            raise ValueError(f"activation: expected 'softmax' or 'relu', got {activation!r}")
        d, m = check_count("dim", dim), check_count("heads", heads)
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
            raise ValueError(f"mean: expected a finite float, got {mean!r}")
        rng = np.random.default_rng(seed)
        shift = mean * np.diag(np.append(np.ones(d), 0.0))
        self.w = torch.from_numpy(shift + rng.standard_normal((m, d + 1, d + 1))).to(dtype)  # (M, d + 1, d + 1)
        self.activation = activation
        self.values: Tensor | None = None

    def weights(self, query: Tensor, keys: Tensor) -> Tensor:
        """a_{m,i}, (examples, M, N)."""
        scores = torch.einsum("nd,mde,nie->nmi", _augment(query), self.w, _augment(keys))
        if self.activation == "softmax":
            return scores.softmax(-1)
        return scores.relu() / keys.shape[1]

    def features(self, query: Tensor, keys: Tensor) -> Tensor:
        """Φ (examples, M·(d + 1)): Φ_m = (1/M) Σ_i a_{m,i} x̃_i, so f = ⟨V, Φ⟩."""
        phi = torch.einsum("nmi,nid->nmd", self.weights(query, keys), _augment(keys)) / self.w.shape[0]
        return phi.reshape(phi.shape[0], -1)


class RandomFeatureMLP(RidgeReadout):
    """The two-layer random-feature baseline: relu(w_kᵀ X) / √K on X = (x₀, …, x_N) flattened, ridge readout."""

    def __init__(self, dim: int, num_keys: int, num_features: int = 512, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        d, n, k = check_count("dim", dim), check_count("num_keys", num_keys), check_count("num_features", num_features)
        rng = np.random.default_rng(seed)
        self.w = torch.from_numpy(rng.standard_normal(((n + 1) * d, k)) / math.sqrt(n + 1)).to(dtype)
        self.values: Tensor | None = None

    def features(self, query: Tensor, keys: Tensor) -> Tensor:
        flat = torch.cat([query[:, None], keys], 1).reshape(query.shape[0], -1)
        return (flat @ self.w).relu() / math.sqrt(self.w.shape[1])


add(
    Spec(
        name="rf-attention-regression",
        kind="task",
        paper=RANDOM_FEATURE_ATTENTION,
        factory=rf_attention_regression,
        family="G",
        summary="random-feature attention regression: frozen random W_m (zero or μI mean), ridge-fitted values, "
        "targets (1/N) Σ g(⟨x₀, x_i⟩); random-feature MLP baseline",
        params=(
            Param("num_examples", int, doc="number of (query, keys) examples", low=1),
            Param("num_keys", int, 8, "keys N per example", low=1),
            Param("dim", int, 8, "dimension d (points on S^{d−1})", low=2),
            Param("target", str, "linear", "g in (1/N) Σ g(⟨x₀, x_i⟩)", choices=tuple(TARGETS)),
            Param("seed", int, 0, "seed of the numpy Generator"),
        ),
    )
)
