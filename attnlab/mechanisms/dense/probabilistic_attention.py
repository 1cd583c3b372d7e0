"""Probabilistic attention: attention as inference in a Gaussian mixture (Gabbur, Bilkhu & Movellan, 2021).

Per head, the keys ζ_j are the means of a mixture of isotropic Gaussians with precision α (σ² = 1/α)
and priors π_j; a query q_i is an observation, and its attention weights are the posterior
responsibilities of the components:

    w_ij = p(j | q_i) = π_j N(q_i; ζ_j, α⁻¹I) / Σ_l π_l N(q_i; ζ_l, α⁻¹I)
         = softmax_j( log π_j − (α/2)‖q_i − ζ_j‖² )                                    (1)
    out_i = Σ_j w_ij μ_j                       (μ_j = v_j, the values: the component's value means)

Priors (`priors`):
* "magnitude": log π_j = (α/2)‖ζ_j‖² + const, which cancels the key norm in (1):
  w_ij = softmax_j(α q_i·ζ_j) — dot-product softmax attention with scale α; with α = 1/√d (the
  default precision) it is standard attention exactly (the official code's special case);
* "uniform": π_j = 1/n, the true mixture posterior w_ij = softmax_j(α q_i·ζ_j − (α/2)‖ζ_j‖²).
  Keys of one norm and equal priors make this dot-product softmax with scale α (temperature
  σ² = 1/α ↔ 1/scale);
* the functional ops also take a tensor of fixed log-priors (batch|1, heads|1, n_k).

Key adaptation (`key_iterations` EM steps at inference; 0 = plain attention). The E-step is (1);
the M-step moves each key to the mean of the queries it explains, a MAP estimate under a Gaussian
prior N(ζ_j; ζ⁰_j, (λ_ζ)⁻¹I) centred on the key the network predicted:

    ζ_j ← (ρ_ζ ζ⁰_j + Σ_i w_ij q_i) / (ρ_ζ + Σ_i w_ij),        ρ_ζ = λ_ζ / α  (`key_prior_weight`)

ρ_ζ is the prior's weight in queries (a pseudo-count); ρ_ζ = 0 is maximum likelihood, the code's
default. With fixed priors (uniform or a tensor) each step is an EM step on the mixture, so it never
decreases the log-likelihood of the queries Σ_i log Σ_j π_j N(q_i; ζ_j, α⁻¹I) (the tests check it).
With magnitude priors the priors follow the adapted keys, as in the official code (its weights are
recomputed from the updated ζ), and that guarantee does not hold. The final weights are (1) with the
adapted keys.

Value propagation (feedback): some tokens carry fixed values u_i (the user's annotations in
interactive segmentation; indicator f_i ∈ {0, 1}). Each component's value mean is re-estimated from
the annotated queries it explains, MAP under a prior centred on the layer's value v_j:

    μ_j = (ρ_v v_j + Σ_i w_ij f_i u_i) / (ρ_v + Σ_i w_ij f_i),   ρ_v = λ_μ / β  (`value_prior_weight`)

and out_i = Σ_j w_ij μ_j propagates the annotations to every token through the responsibilities.
The feedback enters the core as its side input (batch, [heads,] n, head_dim + 1): the values, then
the indicator channel — the official code's `v_fixed` layout with the tokens moved before the
channels; `ProbabilisticAttention.propagate(x, values, annotated)` builds it.

The official code (apple/ml-probabilistic-attention, probabilisticattention.py,
`ProbabilisticAttention.forward`: `update_weights` for (1) with `magnitude_priors`, the "Online key
adaptation" loop for the M-step, the "Online value belief propagation" loop for μ_j) computes the
same formulas; the differences, each a choice made here:
* its MAP key step centres the prior on the previous iterate (`zeta_prior_precision * zeta` with the
  updated zeta); here the prior stays by default on the network's key ζ⁰ over the iterations, as a
  MAP-EM with a fixed prior needs (`key_prior_mean='network'`); `key_prior_mean='previous'` is the
  code's loop (the two agree for one iteration and for ρ_ζ = 0);
* a component that no (annotated) query explains (Σ_i w_ij = 0, ρ = 0) keeps its key / value here;
  the code divides by zero there (keys: NaN; values: 0 through its ε = 1e-20);
* its value step sums w_ij·u_i over all queries (u_i must be 0 where not annotated); here u_i is
  multiplied by f_i explicitly;
* the responsibilities read the queries only (the code's β = 0 and no `v_init`, its dot-product
  setting), so the value step does not change the weights and one step is its fixed point; the
  code's per-key precisions, value-observation term and positional embeddings are not implemented.

Masks: key padding removes a token as a component (w_ij = 0) and, the module being self-attention,
as an observation (it enters no M-step and no value step), so padding equals removal. A query with
no real key gets zeros. Not causal (every key adapts to every query, the future included) and no
cross-attention (padding of the queries is the padding of the keys).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...core.errors import ParameterError, ShapeError
from ...core.module import Attention
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_choice, check_int, check_qkv, check_scale, check_tensor

PROBABILISTIC = Paper("P207", "Probabilistic Attention for Interactive Segmentation", 2021, "2106.15338")
PRIORS: tuple[str, ...] = ("magnitude", "uniform")
PRIOR_MEANS: tuple[str, ...] = ("network", "previous")  # the centre of the MAP key step's prior: ζ⁰ or the last iterate

Priors = str | Tensor


def probabilistic_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs with no key adaptation: the logits q·ζ and W v, 4·h·n²·d (each EM step adds as much)."""
    return 4.0 * heads * n * n * head_dim


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ParameterError(f"{name}: expected a finite float >= 0 (the prior's weight in queries), got {value!r}")
    return float(value)


def _check_priors(priors: object, q: Tensor, k: Tensor) -> Priors:
    """'magnitude', 'uniform', or a log-prior tensor broadcastable to (batch, heads, n_k)."""
    if isinstance(priors, Tensor):
        batch, heads, n_k = q.shape[0], q.shape[1], k.shape[2]
        if priors.dim() != 3 or priors.shape[0] not in (1, batch) or priors.shape[1] not in (1, heads) or (
            priors.shape[2] != n_k
        ):
            raise ShapeError(
                f"priors: expected log-priors of shape (batch|1, heads|1, n_k) = ({batch}, {heads}, {n_k}), "
                f"got {tuple(priors.shape)}"
            )
        if not priors.is_floating_point():
            raise TypeError(f"priors: expected a floating-point tensor of log-priors, got {priors.dtype}")
        return priors
    return check_choice("priors", priors, PRIORS)


def _check_feedback(feedback: Tensor | None, v: Tensor) -> tuple[Tensor, Tensor] | None:
    """The fixed values u (batch, heads|1, n, d_v) and the indicator f (batch, heads|1, n) of a feedback tensor."""
    if feedback is None:
        return None
    check_tensor("feedback", feedback)
    batch, heads, n, d_v = v.shape
    if feedback.dim() == 3:
        feedback = feedback[:, None]
    if feedback.dim() != 4 or feedback.shape[0] != batch or feedback.shape[1] not in (1, heads) or (
        feedback.shape[2] != n or feedback.shape[3] != d_v + 1
    ):
        raise ShapeError(
            f"feedback: expected (batch, [heads,] n, head_dim + 1) = ({batch}, {heads}, {n}, {d_v + 1}) "
            f"(the fixed values, then the indicator), got {tuple(feedback.shape)}"
        )
    if feedback.dtype != v.dtype:
        raise TypeError(f"feedback: expected dtype {v.dtype} (as v), got {feedback.dtype}")
    indicator = feedback[..., -1]
    if not bool(((indicator == 0) | (indicator == 1)).all()):
        raise ValueError("feedback: expected the last channel (the indicator of annotated tokens) in {0, 1}")
    return feedback[..., :-1], indicator


def _check(
    q: Tensor, k: Tensor, v: Tensor, precision: float | None, priors: object, key_iterations: int,
    key_prior_weight: float, value_prior_weight: float, key_prior_mean: str, attention_mask: Tensor | None,
    feedback: Tensor | None,
) -> tuple[float, Priors, tuple[Tensor, Tensor] | None]:
    check_qkv(q, k, v, same_length=True)
    check_choice("key_prior_mean", key_prior_mean, PRIOR_MEANS)
    alpha = check_scale(precision, q.shape[-1])
    if alpha <= 0:
        raise ParameterError(f"precision: expected a float > 0 (α = 1/σ²) or None (1/√head_dim), got {precision!r}")
    check_int("key_iterations", key_iterations, low=0)
    _check_weight("key_prior_weight", key_prior_weight)
    _check_weight("value_prior_weight", value_prior_weight)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    return alpha, _check_priors(priors, q, k), _check_feedback(feedback, v)


def _responsibilities(q: Tensor, keys: Tensor, alpha: float, priors: Priors, blocked: Tensor | None) -> Tensor:
    """(1) by the expanded square: α q·ζ_j − (α/2)‖ζ_j‖² + log π_j (the ‖q_i‖² term is constant in j)."""
    logits = (q @ keys.transpose(-2, -1)) * alpha
    if not (isinstance(priors, str) and priors == "magnitude"):  # magnitude priors cancel the key norm
        logits = logits - (0.5 * alpha) * keys.pow(2).sum(-1)[:, :, None, :]
        if isinstance(priors, Tensor):
            logits = logits + priors.to(q.dtype)[:, :, None, :]
    if blocked is None:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.masked_fill(blocked, -math.inf), dim=-1).masked_fill(blocked, 0.0)


def _map_update(prior: Tensor, weight: float, w: Tensor, data: Tensor, current: Tensor) -> Tensor:
    """(ρ·prior_j + Σ_i w_ij data_i) / (ρ + Σ_i w_ij), `current` where the denominator is 0."""
    mass = w.sum(-2)[..., None]
    denom = mass + weight
    total = w.transpose(-2, -1) @ data + weight * prior
    return torch.where(denom > 0, total / torch.where(denom > 0, denom, torch.ones_like(denom)), current)


def probabilistic_key_adaptation(
    q: Tensor,
    k: Tensor,
    *,
    precision: float | None = None,
    priors: Priors = "magnitude",
    key_iterations: int = 1,
    key_prior_weight: float = 0.0,
    key_prior_mean: str = "network",
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The keys after `key_iterations` EM steps ζ_j ← (ρ ζ⁰_j + Σ_i w_ij q_i) / (ρ + Σ_i w_ij), (batch, heads, n, d)
    (ζ⁰ the previous iterate with key_prior_mean='previous')."""
    v = q[..., :1]
    alpha, priors, _ = _check(q, k, v, precision, priors, key_iterations, key_prior_weight, 0.0, key_prior_mean,
                              attention_mask, None)
    return _adapt(q, k, alpha, priors, key_iterations, key_prior_weight, key_prior_mean, attention_mask)[0]


def _adapt(
    q: Tensor, k: Tensor, alpha: float, priors: Priors, iterations: int, prior_weight: float, prior_mean: str,
    attention_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(adapted keys, their responsibilities, the weights' data mask (batch, 1, n, 1) or None)."""
    blocked = None if attention_mask is None else ~attention_mask[:, None, None, :]
    observed = None if attention_mask is None else attention_mask[:, None, :, None].to(q.dtype)
    keys = k
    w = _responsibilities(q, keys, alpha, priors, blocked)
    for _ in range(iterations):
        data_w = w if observed is None else w * observed  # padded queries are no observations
        keys = _map_update(k if prior_mean == "network" else keys, prior_weight, data_w, q, keys)
        w = _responsibilities(q, keys, alpha, priors, blocked)
    return keys, w, observed


def probabilistic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    precision: float | None = None,
    priors: Priors = "magnitude",
    key_iterations: int = 0,
    key_prior_weight: float = 0.0,
    value_prior_weight: float = 0.0,
    key_prior_mean: str = "network",
    attention_mask: Tensor | None = None,
    feedback: Tensor | None = None,
) -> Tensor:
    """Probabilistic attention over (batch, heads, n, head_dim): out_i = Σ_j w_ij μ_j, w the mixture's responsibilities
    (1) after `key_iterations` EM steps on the keys, μ the values (or propagated from `feedback`, (batch, [heads,] n,
    head_dim + 1): fixed values then a 0/1 indicator). precision α (None: 1/√head_dim); priors 'magnitude' (dot-product
    softmax), 'uniform' or log-priors (batch|1, heads|1, n); attention_mask (batch, n), True = real token."""
    alpha, priors, fixed = _check(q, k, v, precision, priors, key_iterations, key_prior_weight, value_prior_weight,
                                  key_prior_mean, attention_mask, feedback)
    _, w, observed = _adapt(q, k, alpha, priors, key_iterations, key_prior_weight, key_prior_mean, attention_mask)
    if fixed is None:
        return w @ v
    values, indicator = fixed
    annotated = indicator[..., None] if observed is None else indicator[..., None] * observed
    mu = _map_update(v, value_prior_weight, w * annotated, values, v)
    return w @ mu


def probabilistic_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    precision: float | None = None,
    priors: Priors = "magnitude",
    key_iterations: int = 0,
    key_prior_weight: float = 0.0,
    value_prior_weight: float = 0.0,
    key_prior_mean: str = "network",
    attention_mask: Tensor | None = None,
    feedback: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, w) of `probabilistic_attention` in float64, the model written out: log π_j − (α/2)‖q_i − ζ_j‖² by the
    difference, π_j normalised, the M-steps as explicit weighted sums; w (batch, heads, n, n) the final weights."""
    alpha, priors, fixed = _check(q, k, v, precision, priors, key_iterations, key_prior_weight, value_prior_weight,
                                  key_prior_mean, attention_mask, feedback)
    q64, zeta0, v64 = q.double(), k.double(), v.double()
    batch, heads, n, _ = q.shape
    real = torch.ones(batch, n, dtype=torch.float64, device=q.device) if attention_mask is None else attention_mask.double()
    key_real = real[:, None, None, :] > 0

    def weights(zeta: Tensor) -> Tensor:
        sq_dist = (q64[:, :, :, None, :] - zeta[:, :, None, :, :]).pow(2).sum(-1)
        if isinstance(priors, Tensor):
            log_prior = priors.double()[:, :, None, :].expand(batch, heads, 1, n)
        elif priors == "magnitude":
            log_prior = (0.5 * alpha) * zeta.pow(2).sum(-1)[:, :, None, :]
        else:
            log_prior = torch.zeros(batch, heads, 1, n, dtype=torch.float64, device=q.device)
        # normalise π over the real keys: Σ_j π_j = 1 (a constant in j, so the posterior is unchanged)
        masked_prior = log_prior.masked_fill(~key_real, -math.inf)
        top = masked_prior.amax(-1, keepdim=True).clamp_min(-1e300)
        log_prior = log_prior - (top + (masked_prior - top).exp().sum(-1, keepdim=True).clamp_min(1e-300).log())
        joint = log_prior - 0.5 * alpha * sq_dist  # log π_j N(q_i; ζ_j, α⁻¹I) up to a constant
        joint = joint.masked_fill(~key_real, -math.inf)
        row_top = joint.amax(-1, keepdim=True)
        row_top = torch.where(torch.isfinite(row_top), row_top, torch.zeros_like(row_top))
        e = (joint - row_top).exp()
        total = e.sum(-1, keepdim=True)
        return e / torch.where(total > 0, total, torch.ones_like(total))

    zeta = zeta0
    w = weights(zeta)
    for _ in range(key_iterations):
        new = torch.empty_like(zeta)
        for j in range(n):
            r = w[:, :, :, j] * real[:, None, :]  # responsibilities of component j for the real queries
            mass = r.sum(-1)[..., None] + key_prior_weight
            centre = zeta0[:, :, j] if key_prior_mean == "network" else zeta[:, :, j]
            pulled = torch.einsum("bhi,bhid->bhd", r, q64) + key_prior_weight * centre
            new[:, :, j] = torch.where(mass > 0, pulled / mass.clamp_min(1e-300), zeta[:, :, j])
        zeta = new
        w = weights(zeta)
    mu = v64
    if fixed is not None:
        values, indicator = (t.double() for t in fixed)
        f = indicator.expand(batch, heads, n) * real[:, None, :]
        mu = torch.empty_like(v64)
        for j in range(n):
            r = w[:, :, :, j] * f
            mass = r.sum(-1)[..., None] + value_prior_weight
            pulled = torch.einsum("bhi,bhid->bhd", r, values.expand(batch, heads, n, -1)) + value_prior_weight * v64[:, :, j]
            mu[:, :, j] = torch.where(mass > 0, pulled / mass.clamp_min(1e-300), v64[:, :, j])
    out = torch.einsum("bhij,bhjd->bhid", w, mu)
    return out.to(q.dtype), w.to(q.dtype)


@register(
    name="probabilistic-attention",
    paper=PROBABILISTIC,
    family="A",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(key_padding=True),
    params=(
        Param("precision", float, None, "α = 1/σ² of the query/key Gaussians (the logit scale); None: 1/√head_dim",
              low=0.0, optional=True),
        Param("priors", str, "magnitude", "mixture priors π_j: 'magnitude' ∝ exp(α‖ζ_j‖²/2) (dot-product softmax) or "
              "'uniform' (the Gaussian posterior)", choices=PRIORS),
        Param("key_iterations", int, 0, "EM steps adapting the keys to the queries at inference (0: plain attention)",
              low=0),
        Param("key_prior_weight", float, 0.0, "ρ_ζ = λ_ζ/α: weight (in queries) of the prior on the network's key in "
              "the MAP key step; 0 = maximum likelihood", low=0.0),
        Param("key_prior_mean", str, "network", "centre of that prior: 'network' (the predicted key ζ⁰, MAP-EM) or "
              "'previous' (the last iterate, as the official code's loop)", choices=PRIOR_MEANS),
        Param("value_prior_weight", float, 0.0, "ρ_v = λ_μ/β: weight (in annotated queries) of the prior on the "
              "layer's value in value propagation", low=0.0),
    ),
    summary="Probabilistic attention: responsibilities of a Gaussian mixture over the keys, EM key adaptation and "
            "value propagation of annotated tokens.",
    test_params={"priors": "uniform", "key_iterations": 2, "key_prior_weight": 0.5},
    flops=probabilistic_flops,
)
class ProbabilisticAttention(Attention):
    """Attention weights as the posterior responsibilities of a Gaussian mixture whose means are the keys, with
    `key_iterations` EM steps adapting the keys to the queries; `propagate` clamps annotated values and spreads them."""

    mask_form = "padding"
    same_length = True
    takes_side_input = True  # the feedback (annotated values + indicator); none from the tokens themselves

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        precision: float | None = None,
        priors: str = "magnitude",
        key_iterations: int = 0,
        key_prior_weight: float = 0.0,
        value_prior_weight: float = 0.0,
        key_prior_mean: str = "network",
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        if precision is not None and (check_scale(precision, self.head_dim) <= 0):
            raise ParameterError(f"precision: expected a float > 0 (α = 1/σ²) or None (1/√head_dim), got {precision!r}")
        self.precision = precision
        self.priors = check_choice("priors", priors, PRIORS)
        self.key_iterations = check_int("key_iterations", key_iterations, low=0)
        self.key_prior_weight = _check_weight("key_prior_weight", key_prior_weight)
        self.value_prior_weight = _check_weight("value_prior_weight", value_prior_weight)
        self.key_prior_mean = check_choice("key_prior_mean", key_prior_mean, PRIOR_MEANS)

    def _options(self) -> dict[str, object]:
        return {"precision": self.precision, "priors": self.priors, "key_iterations": self.key_iterations,
                "key_prior_weight": self.key_prior_weight, "value_prior_weight": self.value_prior_weight,
                "key_prior_mean": self.key_prior_mean}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None) -> Tensor:
        return probabilistic_attention(q, k, v, attention_mask=mask, feedback=side, **self._options())  # type: ignore[arg-type]

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return probabilistic_attention_reference(q, k, v, attention_mask=mask, feedback=side, **self._options())  # type: ignore[arg-type]

    def feedback(self, values: Tensor, annotated: Tensor) -> Tensor:
        """The core's side input (batch, heads, n, head_dim + 1) of annotations: `values` (batch, n, heads·head_dim),
        in the layout of merge_heads(v), fixed at the tokens where `annotated` (batch, n) is True."""
        check_tensor("values", values)
        check_tensor("annotated", annotated)
        if values.dim() != 3 or values.shape[-1] != self.heads * self.head_dim:
            raise ShapeError(f"values: expected (batch, n, heads·head_dim) = (batch, n, {self.heads * self.head_dim}), "
                             f"got {tuple(values.shape)}")
        if annotated.dtype != torch.bool:
            raise TypeError(f"annotated: expected a bool tensor (True = annotated token), got {annotated.dtype}")
        if tuple(annotated.shape) != tuple(values.shape[:2]):
            raise ShapeError(f"annotated: expected shape (batch, n) = {tuple(values.shape[:2])} (as values), "
                             f"got {tuple(annotated.shape)}")
        fixed = self.split_heads(values)
        indicator = annotated[:, None, :, None].to(values.dtype).expand(*fixed.shape[:3], 1)
        return torch.cat([fixed * indicator, indicator], dim=-1)

    def propagate(
        self,
        x: Tensor,
        values: Tensor,
        annotated: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        impl: str = "fast",
    ) -> Tensor:
        """forward with value propagation: x (batch, n, dim) -> (batch, n, dim), the value means re-estimated from the
        annotated tokens' fixed `values` (batch, n, heads·head_dim) where `annotated` (batch, n) is True (both
        batch-major whatever batch_first; x as forward takes it)."""
        x, _ = self.batch_major(x)
        self._check_inputs(x, None)
        keep = self.keep_mask(x, None, attention_mask, key_padding_mask)
        q, k, v = self.project(x)
        side = self.feedback(values.to(x.dtype), annotated)
        out = self.out_proj(self.merge_heads(self.attend(q, k, v, attention_mask=keep, impl=impl, side=side)))  # type: ignore[arg-type]
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        alpha = "1/√head_dim" if self.precision is None else f"{self.precision:g}"
        return (f"heads={self.heads}, precision={alpha}, priors={self.priors!r}, key_iterations={self.key_iterations}, "
                f"key_prior_weight={self.key_prior_weight:g}, key_prior_mean={self.key_prior_mean!r}, "
                f"value_prior_weight={self.value_prior_weight:g}")
