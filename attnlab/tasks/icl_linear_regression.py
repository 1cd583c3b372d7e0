"""In-context linear regression with one-layer multi-head softmax attention (P075, He et al. 2025).

An example is a regression problem given in context. With dimension d and N context points:

    w ~ N(0, I_d)                    the task, one per example
    x_i ~ N(0, Σ), i = 1 … N, and x_q ~ N(0, Σ)     (Σ = I_d unless `covariance` is given)
    y_i = wᵀx_i + ε_i,  y_q = wᵀx_q + ε_q,  ε ~ N(0, σ²) i.i.d.   (σ = `noise_std`)

and the model reads the N + 1 tokens z_i = (x_i, y_i) ∈ R^{d+1} and the query token z_q = (x_q, 0),
and predicts y_q. The baselines, with X the (N, d) matrix of the x_i and y the vector of the y_i:

    ridge(λ):      ŷ = x_qᵀ (XᵀX + λ I)⁻¹ Xᵀ y
    Bayes:         ŷ = E[y_q | X, y, x_q] = ridge(σ²)  (the prior w ~ N(0, I) and Gaussian noise make the
                   posterior mean of w the ridge solution with λ = σ², whatever Σ is; it has the least
                   expected squared error of all predictors)
    one-step GD:   ŷ = x_qᵀ w₁,  w₁ = w₀ − η ∇L(w₀) at w₀ = 0 for L(w) = (1/2N) Σ_i (y_i − wᵀx_i)²,
                   i.e. w₁ = (η/N) Xᵀ y — the predictor linear attention implements

For Σ = I the expected squared error of one-step GD is, with E[(XᵀX)²] = N(N + d + 1) I (Wishart),

    E(ŷ − y_q)² = d [1 − 2η + η² (N + d + 1 + σ²)/N] + σ²,   least at η* = N / (N + d + 1 + σ²)

(`gd_risk`, `optimal_gd_step`). The small model of the paper is one layer of H softmax heads acting on
the token matrix, with the key–query product KQ_h ∈ R^{(d+1)×(d+1)} and the output–value vector
ov_h ∈ R^{d+1} merged per head (`SoftmaxICLRegressor`):

    ŷ = Σ_h Σ_i softmax_i(z_iᵀ KQ_h z_q) · ov_hᵀ z_i,      i over the N context tokens

trained by gradient descent from a random initialisation on fresh examples (`train_icl_regressor`).
The paper predicts that training makes the x-block of KQ_h ≈ c_h I with the same |c_h| across heads
and ov_h nonzero only in its last (y) entry with Σ_h ov_h ≈ 0 (a debiased GD predictor); the
function `weight_patterns` measures both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ._checks import check_count

ICL_LINEAR = Paper(
    "P075",
    "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability of Multi-Head "
    "Softmax Attention",
    2025,
    "2503.12734",
)


@dataclass(frozen=True)
class ICLRegressionData:
    """`x` (examples, N, d), `y` (examples, N), `x_query` (examples, d), `y_query` (examples,), `w` (examples, d);
    `noise_std` σ and `covariance` Σ (d, d) of the generator."""

    x: Tensor
    y: Tensor
    x_query: Tensor
    y_query: Tensor
    w: Tensor
    noise_std: float
    covariance: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def tokens(self) -> Tensor:
        """(examples, N + 1, d + 1): the context tokens z_i = (x_i, y_i) then the query token (x_q, 0)."""
        context = torch.cat([self.x, self.y[..., None]], -1)
        query = torch.cat([self.x_query, torch.zeros_like(self.y_query)[..., None]], -1)
        return torch.cat([context, query[:, None]], 1)


def icl_linear_regression(
    num_examples: int,
    num_context: int,
    dim: int,
    noise_std: float = 0.0,
    covariance: Tensor | np.ndarray | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ICLRegressionData:
    """`num_examples` in-context regression problems of `num_context` points in R^dim (see the module doc).

    Deterministic in `seed` (a numpy Generator); `covariance` Σ (dim, dim) symmetric positive definite,
    default I; `dtype` the floating dtype of the tensors.
    """
    n = check_count("num_examples", num_examples)
    m = check_count("num_context", num_context)
    d = check_count("dim", dim)
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std: expected a finite float >= 0, got {noise_std!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if covariance is None:
        sigma = np.eye(d)
    else:
        sigma = np.asarray(covariance.detach().cpu() if isinstance(covariance, Tensor) else covariance, dtype=np.float64)
        if sigma.shape != (d, d):
            raise ValueError(f"covariance: expected shape ({d}, {d}), got {sigma.shape}")
        if not np.allclose(sigma, sigma.T) or np.linalg.eigvalsh((sigma + sigma.T) / 2).min() <= 0:
            raise ValueError("covariance: expected a symmetric positive definite matrix, got one that is not")
    root = np.linalg.cholesky(sigma)  # x = L g, g ~ N(0, I), has covariance L Lᵀ = Σ
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, d))
    x = rng.standard_normal((n, m + 1, d)) @ root.T
    y = np.einsum("nid,nd->ni", x, w) + float(noise_std) * rng.standard_normal((n, m + 1))

    def as_tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return ICLRegressionData(
        as_tensor(x[:, :m]), as_tensor(y[:, :m]), as_tensor(x[:, m]), as_tensor(y[:, m]), as_tensor(w),
        float(noise_std), as_tensor(sigma),
    )


def ridge_predict(data: ICLRegressionData, lam: float) -> Tensor:
    """ŷ = x_qᵀ (XᵀX + λI)⁻¹ Xᵀy per example, (examples,); λ > 0 (or λ = 0 when XᵀX is invertible)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam: expected a float >= 0, got {lam!r}")
    d = data.x.shape[-1]
    gram = data.x.transpose(1, 2) @ data.x + lam * torch.eye(d, dtype=data.x.dtype, device=data.x.device)
    w_hat = torch.linalg.solve(gram, (data.x.transpose(1, 2) @ data.y[..., None]))[..., 0]
    return (w_hat * data.x_query).sum(-1)


def bayes_predict(data: ICLRegressionData) -> Tensor:
    """The posterior mean E[y_q | context] = ridge with λ = σ² (prior w ~ N(0, I), noise N(0, σ²))."""
    if data.noise_std == 0 and data.x.shape[1] < data.x.shape[2]:
        raise ValueError(
            f"noise_std: the noiseless posterior mean needs num_context >= dim, got {data.x.shape[1]} < {data.x.shape[2]}; "
            "use noise_std > 0"
        )
    return ridge_predict(data, data.noise_std**2)


def gd_predict(data: ICLRegressionData, step: float) -> Tensor:
    """One gradient step from w = 0 on (1/2N) Σ (y_i − wᵀx_i)²: ŷ = x_qᵀ (η/N) Xᵀy, (examples,)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not np.isfinite(step):
        raise ValueError(f"step: expected a finite float, got {step!r}")
    w1 = step / data.x.shape[1] * (data.x.transpose(1, 2) @ data.y[..., None])[..., 0]
    return (w1 * data.x_query).sum(-1)


def optimal_gd_step(num_context: int, dim: int, noise_std: float = 0.0) -> float:
    """η* = N / (N + d + 1 + σ²), the step of least expected error for Σ = I."""
    return num_context / (num_context + dim + 1 + noise_std**2)


def gd_risk(step: float, num_context: int, dim: int, noise_std: float = 0.0) -> float:
    """E(ŷ − y_q)² of one-step GD for Σ = I: d [1 − 2η + η² (N + d + 1 + σ²)/N] + σ²."""
    n, d, s2 = num_context, dim, noise_std**2
    return d * (1 - 2 * step + step**2 * (n + d + 1 + s2) / n) + s2


class SoftmaxICLRegressor(nn.Module):
    """One layer of H softmax heads on the tokens (x_i, y_i), read at the query (x_q, 0):
    ŷ = Σ_h Σ_i softmax_i(z_iᵀ KQ_h z_q) ov_hᵀ z_i (the paper's merged KQ and OV parametrisation)."""

    def __init__(self, dim: int, heads: int = 4, init_std: float = 0.1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        d = check_count("dim", dim) + 1
        h = check_count("heads", heads)
        self.kq = nn.Parameter(init_std * torch.randn(h, d, d, generator=generator, dtype=torch.float64))
        self.ov = nn.Parameter(init_std * torch.randn(h, d, generator=generator, dtype=torch.float64))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (batch, N + 1, d + 1), the query last -> ŷ (batch,)."""
        context, query = tokens[:, :-1], tokens[:, -1]
        scores = torch.einsum("bid,hde,be->bhi", context, self.kq, query)
        values = torch.einsum("bid,hd->bhi", context, self.ov)
        return (scores.softmax(-1) * values).sum((1, 2))


def train_icl_regressor(
    model: nn.Module,
    num_context: int,
    steps: int = 300,
    batch: int = 256,
    lr: float = 0.01,
    noise_std: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Adam on the squared error, a fresh batch of problems every step (seed + step); the losses."""
    dim = next(model.parameters()).shape[-1] - 1
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(check_count("steps", steps)):
        data = icl_linear_regression(batch, num_context, dim, noise_std, seed=seed * 1_000_003 + step)
        loss = (model(data.tokens) - data.y_query).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def weight_patterns(model: SoftmaxICLRegressor) -> dict[str, float]:
    """How far the weights are from the predicted patterns (0 = exactly the pattern):
    `kq_offdiag` ‖off-diagonal of the x-blocks‖ / ‖x-blocks‖, `kq_inhomogeneous` the spread of |mean diagonal| across
    heads over its mean, `ov_not_last` ‖ov[:, :d]‖ / ‖ov‖, `ov_sum` |Σ_h ov_h[d]| / Σ_h |ov_h[d]|."""
    kq = model.kq.detach()[:, :-1, :-1]
    diag = torch.diagonal(kq, dim1=-2, dim2=-1)
    off = kq - torch.diag_embed(diag)
    scale = diag.mean(-1).abs()
    ov = model.ov.detach()
    return {
        "kq_offdiag": float(off.norm() / kq.norm()),
        "kq_inhomogeneous": float(scale.std(unbiased=False) / scale.mean()),
        "ov_not_last": float(ov[:, :-1].norm() / ov.norm()),
        "ov_sum": float(ov[:, -1].sum().abs() / ov[:, -1].abs().sum()),
    }


add(
    Spec(
        name="icl-linear-regression",
        kind="task",
        paper=ICL_LINEAR,
        factory=icl_linear_regression,
        family="G",
        summary="in-context linear regression: tokens (x_i, wᵀx_i + ε), predict y at a query; ridge/Bayes/one-step-GD baselines",
        params=(
            Param("num_examples", int, doc="number of regression problems", low=1),
            Param("num_context", int, doc="context points N per problem", low=1),
            Param("dim", int, doc="covariate dimension d", low=1),
            Param("noise_std", float, 0.0, "standard deviation σ of the label noise", low=0.0),
            Param("seed", int, 0, "seed of the numpy Generator"),
        ),
    )
)
