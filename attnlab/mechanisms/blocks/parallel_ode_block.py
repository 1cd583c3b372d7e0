"""The parallel attention + MLP block as one Euler step of an ODE, and explicit Runge–Kutta solvers over its field
(Zhong, Zhang, Chakraborty and Dey, "A Neural ODE Interpretation of Transformer Layers", 2022).

A residual layer x_{l+1} = x_l + g(x_l) is one explicit Euler step of size 1 of dx/dt = g(x). The standard
transformer layer, x += MHA(LN₁ x); x += MLP(LN₂ x), is then a Lie–Trotter splitting of the two sub-fields;
the paper puts them side by side, one Euler step of their sum:

    f(x) = MHA(LN x) + MLP(LN x)                          (the shared vector field)
    x_{l+1} = x_l + f(x_l)                                (the parallel block: Euler, 1 step of size 1)

and, for image classification, integrates the same field with a better solver. Here an explicit
Runge–Kutta method with s stages and step size h maps x to x' by

    k_i = f(x + h Σ_{j<i} a_ij k_j),   x' = x + h Σ_i b_i k_i           (repeated `steps` times)

with the tableaux (time does not enter: f is autonomous, so the nodes c_i play no part)

    euler     (order 1)  b = (1)
    midpoint  (order 2)  a₂₁ = ½;  b = (0, 1)
    heun      (order 2)  a₂₁ = 1;  b = (½, ½)
    rk4       (order 4)  a₂₁ = a₃₂ = ½, a₄₃ = 1;  b = (⅙, ⅓, ⅓, ⅙)

Defaults and choices:

* `steps` = 1 and `step_size` = 1/steps (None): the layer integrates over unit time, so every solver
  approximates the same flow map φ₁ and Euler with one step is exactly the parallel block. A given
  `step_size` h integrates over time steps·h instead.
* `shared_norm=True`: one LayerNorm feeds both branches, as in the paper's formula and timm's
  `ParallelScalingBlock` (the peer the tests map weights from); False gives each branch its own norm.
* The MLP is W₂ GELU(W₁ · + b₁) + b₂ of width mlp_ratio·dim (exact GELU, as timm's).
* Adaptive solvers (dopri5) are not offered: a per-sample step-size control would make a sample's
  result depend on the error estimate of its batch (or need a loop per sample), and the paper's
  improvement is reported for fixed-step schemes.
* Each stage evaluates the whole field (mixer and MLP): the cost is stages·steps blocks. The
  parameters are shared across stages and steps (it is one field).
* Causality and padding are the mixer's: the field's other parts act per token, so a stage at token i
  reads other tokens only through the mixer.

The fast path runs any tableau (`TABLEAUX`, `runge_kutta`); the reference path (`impl="reference"`)
writes each solver out by its formula (`runge_kutta_reference`) around the mixer's reference.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from .base import Block, Impl

NEURAL_ODE_TRANSFORMER = Paper("P087", "A Neural ODE Interpretation of Transformer Layers", 2022, "2212.06011")

Tableau = tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]
"""(a, b): a[i] the coefficients a_{i+1, j} (j ≤ i) of stage i + 2 on the earlier stages, b the weights of the stages."""

TABLEAUX: dict[str, Tableau] = {
    "euler": ((), (1.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0)),
    "heun": (((1.0,),), (0.5, 0.5)),
    "rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}
ORDERS: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
"""The order of accuracy of each solver: the global error falls as h^order."""

Field = Callable[[Tensor], Tensor]


def _check_solver(solver: str, steps: int, step_size: float | None) -> float:
    """The step size h (1/steps when None), after checking the three."""
    if solver not in TABLEAUX:
        raise ParameterError(f"solver: expected one of {sorted(TABLEAUX)}, got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParameterError(f"steps: expected an int >= 1, got {steps!r}")
    if step_size is None:
        return 1.0 / steps
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ParameterError(f"step_size: expected a float > 0 or None, got {step_size!r}")
    return float(step_size)


def runge_kutta(field: Field, x: Tensor, *, solver: str = "euler", steps: int = 1, step_size: float | None = None) -> Tensor:
    """x after `steps` explicit Runge–Kutta steps of size h (1/steps by default) of dx/dt = field(x):
    k_i = field(x + h Σ_j a_ij k_j), x ← x + h Σ_i b_i k_i, with the tableau `TABLEAUX[solver]`."""
    h = _check_solver(solver, steps, step_size)
    a, b = TABLEAUX[solver]
    for _ in range(steps):
        stages = [field(x)]
        for row in a:
            stages.append(field(x + h * sum((c * k for c, k in zip(row, stages) if c), x.new_zeros(()))))
        x = x + h * sum((w * k for w, k in zip(b, stages) if w), x.new_zeros(()))
    return x


def runge_kutta_reference(
    field: Field, x: Tensor, *, solver: str = "euler", steps: int = 1, step_size: float | None = None
) -> Tensor:
    """`runge_kutta` with each solver written out by its textbook formula (no tableau)."""
    h = _check_solver(solver, steps, step_size)
    for _ in range(steps):
        if solver == "euler":
            x = x + h * field(x)
        elif solver == "midpoint":
            x = x + h * field(x + (h / 2) * field(x))
        elif solver == "heun":
            k1 = field(x)
            x = x + (h / 2) * (k1 + field(x + h * k1))
        else:  # rk4
            k1 = field(x)
            k2 = field(x + (h / 2) * k1)
            k3 = field(x + (h / 2) * k2)
            k4 = field(x + h * k3)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@register(
    name="parallel-ode-block",
    kind="block",
    paper=NEURAL_ODE_TRANSFORMER,
    family="C",
    cost="O(stages·steps·(mixer + N d²))",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, materialize=False),
    params=(
        Param("mlp_ratio", float, 4.0, "hidden width of the MLP as a multiple of dim", low=0.25),
        Param("solver", str, "euler", "explicit Runge–Kutta solver over f(x) = MHA(LN x) + MLP(LN x); euler with one "
              "step of size 1 is the parallel block", choices=tuple(TABLEAUX)),
        Param("steps", int, 1, "solver steps per layer", low=1),
        Param("step_size", float, None, "step size h (None: 1/steps, integrating over unit time)", optional=True,
              low=1e-12),
        Param("shared_norm", bool, True, "one LayerNorm for both branches (the paper's formula, timm's "
              "ParallelScalingBlock); False: a LayerNorm per branch"),
    ),
    test_params={"solver": "rk4", "steps": 2},
    summary="parallel block x + MHA(LN x) + MLP(LN x) as one Euler step; Euler/midpoint/Heun/RK4 over that field",
)
class ParallelODEBlock(Block):
    """x' = ODE solve of dx/dt = Mixer(LN x) + MLP(LN x) over time steps·h; Euler, 1 step of 1: x + Mixer(LN x) + MLP(LN x)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        mixer: str = "softmax",
        mixer_params: dict[str, Any] | None = None,
        causal: bool = False,
        mlp_ratio: float = 4.0,
        solver: str = "euler",
        steps: int = 1,
        step_size: float | None = None,
        shared_norm: bool = True,
    ) -> None:
        super().__init__(dim, heads, mixer=mixer, mixer_params=mixer_params, causal=causal)
        self.step_size = _check_solver(solver, steps, step_size)
        self.solver, self.steps = solver, steps
        hidden = max(1, round(mlp_ratio * dim))
        self.norm = nn.LayerNorm(dim)
        self.mlp_norm = None if shared_norm else nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def field(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        """The vector field f(x) = Mixer(LN x) + MLP(LN x) (LN per branch when not shared)."""
        h = self.norm(x)
        return self.mix(h, keep, impl) + self.mlp(h if self.mlp_norm is None else self.mlp_norm(x))

    def block(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        solve = runge_kutta if impl == "fast" else runge_kutta_reference
        return solve(lambda z: self.field(z, keep, impl), x, solver=self.solver, steps=self.steps, step_size=self.step_size)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, steps={self.steps}, step_size={self.step_size:g}, shared_norm={self.mlp_norm is None}"
