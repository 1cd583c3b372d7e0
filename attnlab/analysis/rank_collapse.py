"""Rank collapse of attention stacks (P010, Dong et al. 2021): the residual to a rank-1 matrix.

    res(X) = X − 1xᵀ,   x = argmin_x ‖X − 1xᵀ‖                           X: (n, d) tokens × features

A pure self-attention network (no skip, no MLP) drives res to zero doubly exponentially in depth,
‖res(SAN(X))‖_{1,∞} ≤ (4γβH/√d_qk)^{(3^L−1)/2} ‖res(X)‖_{1,∞}^{3^L}; skip connections stop it.

Two norms:

* "fro": Frobenius norm; the minimiser x is the column mean.
* "l1inf": the paper's composite ‖M‖_{1,∞} = √(‖M‖_1·‖M‖_∞) (‖M‖_1 = largest column ℓ1 sum,
  ‖M‖_∞ = largest row ℓ1 sum). It is not separable, and x is not the mean. Computed exactly:
  f(x) = ‖X − 1xᵀ‖_1 and g(x) = ‖X − 1xᵀ‖_∞ are convex and piecewise linear, so the reachable
  (f, g) form a convex polyhedron; f·g is quasi-concave on the positive quadrant, so its minimum
  sits at a vertex of the lower-left (Pareto) boundary. The vertices are enumerated by dichotomic
  search, each a linear program min w_f·f + w_g·g (scipy's HiGHS), exact up to the LP tolerance.
  Needs scipy; meant for small matrices (n·d LP variables).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ..core.registry import build as build_mechanism

P010 = Paper("P010", "Attention is not all you need: pure attention loses rank doubly exponentially with depth", 2021, "2103.03404")

NORMS = ("fro", "l1inf")
VARIANTS = ("attention", "attention+skip", "attention+mlp", "attention+skip+mlp")


def _check_matrix(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a tensor (..., n, d), got {shape}")


def _l1inf(m: Tensor) -> Tensor:
    col = m.abs().sum(-2).amax(-1)
    row = m.abs().sum(-1).amax(-1)
    return (col * row).sqrt()


def _l1inf_lp(x: np.ndarray, w_f: float, w_g: float) -> tuple[float, float, np.ndarray]:
    """min over c of w_f·f(c) + w_g·g(c), f/g the column/row ℓ1 maxima of x − 1cᵀ -> (f, g, c)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    n, d = x.shape
    nu = n * d  # variables: c (d), u (n·d, u_ij ≥ |x_ij − c_j|), F, G
    nv = d + nu + 2
    i, j = np.divmod(np.arange(nu), d)
    u = d + np.arange(nu)
    ones = np.ones(nu)
    # x_ij − c_j − u_ij ≤ 0  and  −x_ij + c_j − u_ij ≤ 0
    a1 = coo_matrix((np.r_[-ones, -ones], (np.r_[np.arange(nu), np.arange(nu)], np.r_[j, u])), shape=(nu, nv))
    a2 = coo_matrix((np.r_[ones, -ones], (np.r_[np.arange(nu), np.arange(nu)], np.r_[j, u])), shape=(nu, nv))
    # Σ_i u_ij − F ≤ 0 per column j;  Σ_j u_ij − G ≤ 0 per row i
    a3 = coo_matrix((np.r_[ones, -np.ones(d)], (np.r_[j, np.arange(d)], np.r_[u, np.full(d, nv - 2)])), shape=(d, nv))
    a4 = coo_matrix((np.r_[ones, -np.ones(n)], (np.r_[i, np.arange(n)], np.r_[u, np.full(n, nv - 1)])), shape=(n, nv))
    flat = x.reshape(-1)
    b = np.r_[-flat, flat, np.zeros(d + n)]
    cost = np.zeros(nv)
    cost[-2:] = (w_f, w_g)
    bounds = [(None, None)] * d + [(0, None)] * (nu + 2)
    res = linprog(cost, A_ub=vstack([a1, a2, a3, a4]).tocsr(), b_ub=b, bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"residual: the l1inf linear program failed: {res.message}")
    c = res.x[:d]
    r = np.abs(x - c[None, :])
    return float(r.sum(0).max()), float(r.sum(1).max()), c


def _l1inf_center(x: np.ndarray) -> np.ndarray:
    """The x minimising ‖X − 1xᵀ‖_{1,∞}, by dichotomic search over the Pareto vertices of (f, g)."""
    scale = max(float(np.abs(x).max()), 1.0)
    eps = 1e-9
    f_a, g_a, c_a = _l1inf_lp(x, 1.0, eps)  # least f, then least g
    f_b, g_b, c_b = _l1inf_lp(x, eps, 1.0)  # least g, then least f
    vertices = [(f_a, g_a, c_a), (f_b, g_b, c_b)]
    todo = [((f_a, g_a), (f_b, g_b))]
    tol = 1e-9 * scale * max(x.shape)
    while todo:
        (fa, ga), (fb, gb) = todo.pop()
        w_f, w_g = ga - gb, fb - fa  # normal of the segment between two vertices
        if w_f <= tol or w_g <= tol:
            continue
        f, g, c = _l1inf_lp(x, w_f, w_g)
        if w_f * f + w_g * g < w_f * fa + w_g * ga - tol:
            vertices.append((f, g, c))
            todo += [((fa, ga), (f, g)), ((f, g), (fb, gb))]
    return min(vertices, key=lambda v: v[0] * v[1])[2]


def residual(x: Tensor, norm: str = "fro") -> Tensor:
    """res(X) = X − 1xᵀ with x = argmin ‖X − 1xᵀ‖ in `norm` ("fro" or "l1inf"); x (..., n, d)."""
    _check_matrix(x)
    if norm == "fro":
        return x - x.mean(dim=-2, keepdim=True)
    if norm == "l1inf":
        flat = x.detach().reshape(-1, *x.shape[-2:]).to("cpu", torch.float64).numpy()
        centers = np.stack([_l1inf_center(m) for m in flat])
        c = torch.from_numpy(centers).reshape(*x.shape[:-2], 1, x.shape[-1]).to(x.device, x.dtype)
        return x - c
    raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


def residual_norm(x: Tensor, norm: str = "fro") -> Tensor:
    """‖res(X)‖ in `norm`, one value per matrix of x (..., n, d)."""
    r = residual(x, norm)
    if norm == "fro":
        return r.flatten(-2).norm(dim=-1)
    return _l1inf(r)


def relative_residual(hidden: Sequence[Tensor], norm: str = "fro") -> Tensor:
    """‖res(X_l)‖ / ‖res(X_0)‖ for hidden states X_0, X_1, ... each (batch, n, d) -> (layers + 1, batch)."""
    if len(hidden) == 0:
        raise ValueError("hidden: expected at least one hidden state (batch, n, d), got none")
    norms = torch.stack([residual_norm(h, norm) for h in hidden])
    return norms / norms[0]


class _Block(nn.Module):
    """One layer of a variant: attention, optionally a skip connection and/or an MLP (ReLU, its own skip if skip)."""

    def __init__(self, attention: nn.Module, dim: int, skip: bool, mlp: bool) -> None:
        super().__init__()
        self.attention, self.skip = attention, skip
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim)) if mlp else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.attention(x) + (x if self.skip else 0)
        if self.mlp is not None:
            y = self.mlp(y) + (y if self.skip else 0)
        return y


def rank_collapse_experiment(
    mechanism: str,
    *,
    depth: int = 6,
    dim: int = 32,
    heads: int = 4,
    n: int = 16,
    seed: int = 0,
    batch: int = 1,
    norm: str = "fro",
    variants: Sequence[str] = VARIANTS,
    **params: object,
) -> dict[str, Tensor]:
    """Relative residual per layer of random-init stacks of `mechanism` on random X (P010's check).

    For each variant in ("attention", "attention+skip", "attention+mlp", "attention+skip+mlp")
    builds `depth` layers `attnlab.build(mechanism, dim=, heads=, **params)` (PyTorch default init,
    float64, seeded), feeds X ~ N(0, 1) of shape (batch, n, dim) — the same X for every variant —
    and returns {variant: (depth + 1, batch)} with ‖res(X_l)‖ / ‖res(X_0)‖, row 0 = 1.
    No layer norm: the paper's setting.
    """
    for name, value in (("depth", depth), ("dim", dim), ("heads", heads), ("n", n), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants: expected entries from {VARIANTS}, got {v!r}")
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, n, dim, generator=gen, dtype=torch.float64)
    out = {}
    for k, variant in enumerate(variants):
        torch.manual_seed(seed * 1000 + k)
        parts = variant.split("+")
        layers = [
            _Block(build_mechanism(mechanism, dim=dim, heads=heads, **params), dim, "skip" in parts, "mlp" in parts)
            for _ in range(depth)
        ]
        stack = nn.ModuleList(layers).to(torch.float64).eval()
        hidden = [x0]
        with torch.no_grad():
            for layer in stack:
                hidden.append(layer(hidden[-1]))
        out[variant] = relative_residual(hidden, norm)
    return out


_X = Param("x", Tensor, doc="matrix (..., n, d): tokens × features")
_NORM = Param("norm", str, "fro", "'fro' (x = column mean) or 'l1inf' (the paper's ‖·‖_{1,∞}, exact LP)", choices=NORMS)
add(Spec(name="rank-residual", kind="analysis", paper=P010, factory=residual, family="G",
         summary="residual X − 1xᵀ to the nearest rank-1 (constant-token) matrix", params=(_X, _NORM)))
add(Spec(name="rank-collapse", kind="analysis", paper=P010, factory=rank_collapse_experiment, family="G",
         summary="relative residual per layer of random attention stacks with/without skip and MLP", params=(
             Param("mechanism", str, doc="a catalogue mechanism name"),
             Param("depth", int, 6, "layers", low=1),
             Param("dim", int, 32, "model width", low=1),
             Param("heads", int, 4, "heads", low=1),
             Param("n", int, 16, "tokens", low=1),
             Param("seed", int, 0, "seed of X and of the weights"),
             _NORM,
         )))
