"""KERPLE, kernelized relative positional embedding (Chi, Fan, Ramadge & Rudnicky, 2022).

    logits_mn = q_mᵀk_n/√d + k̃(m − n)

with a conditionally positive definite (CPD) kernel k̃ per head, learnt with the model:

    power:  k̃(m − n) = −r1·|m − n|^r2             r1 > 0, 0 < r2 ≤ 2
    log:    k̃(m − n) = −r1·log(1 + r2·|m − n|)    r1, r2 > 0

A CPD kernel turns positive definite when a constant is added, and softmax ignores a
constant shift of a row, so the bias acts as a kernelised positional embedding. It is
defined at every distance, hence at every length. With r2 = 1 the power variant is ALiBi
with a learnt slope r1. Positions follow `alibi`: queries bottom-right aligned to keys,
distances symmetric, so decoding with a KV cache equals the causal forward.

Constraints. The paper's code clamps r1, r2 to at least 0.01 (and a power exponent to at
most 2) before each use, and draws them at start from U(0, 1) for the power variant's r1
and the log variant's r2, U(0, 2) for the other one. The modules here keep unconstrained
raw parameters and map them smoothly into range, so no optimiser step can leave it and
the gradient never dies at a bound:

    r1 = ε + softplus(ρ1);   log r2 = ε + softplus(ρ2);   power r2 = ε + (2 − ε)·sigmoid(ρ2)

with ε = 0.01 by default; initial values are drawn from the paper's ranges.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.registry import Paper, Param
from ...core.validate import check_choice, check_int, check_qkv
from .alibi import distances
from .softmax import ScoreTerm, SoftmaxAttention, register_dense, softmax_attention, softmax_attention_reference

KERPLE = Paper("P212", "KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation", 2022, "2205.09921")
VARIANTS: tuple[str, ...] = ("log", "power")
POWER_MAX = 2.0  # largest exponent r2 for which −|m − n|^r2 is CPD

Coefficient = float | Tensor


def _check_variant(variant: object) -> str:
    check_choice("variant", variant, VARIANTS)
    return str(variant)


def _per_head(name: str, value: Coefficient, heads: int, device: torch.device | None, dtype: torch.dtype) -> Tensor:
    """A scalar or (heads,) coefficient as a (heads,) tensor of `dtype`, keeping its autograd graph."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((heads,), float(value), device=device, dtype=dtype)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a float or a tensor of shape ({heads},), got {type(value).__name__}")
    if value.dim() == 0:
        return value.to(device=device, dtype=dtype).expand(heads)
    if tuple(value.shape) != (heads,):
        raise ShapeError(f"{name}: expected a scalar or shape ({heads},) (one per head), got {tuple(value.shape)}")
    return value.to(device=device, dtype=dtype)


def _check_range(name: str, value: Tensor, high: float | None) -> None:
    vals = value.detach()
    bad = ~torch.isfinite(vals) | (vals <= 0)
    if high is not None:
        bad = bad | (vals > high)
    if bool(bad.any()):
        want = f"in (0, {high:g}]" if high is not None else "> 0"
        raise ParameterError(f"{name}: expected every value {want}, got {vals.tolist()}")


def _kernel(variant: str, r1: Tensor, r2: Tensor, dist: Tensor) -> Tensor:
    """k̃ on distances (n_q, n_k) for per-head r1, r2 (heads,): (heads, n_q, n_k)."""
    r1, r2 = r1[:, None, None], r2[:, None, None]
    if variant == "power":
        return -r1 * dist.pow(r2)
    return -r1 * torch.log1p(r2 * dist)


def kerple_bias(
    heads: int,
    n_q: int,
    n_k: int,
    *,
    variant: str,
    r1: Coefficient,
    r2: Coefficient,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The KERPLE logit bias k̃(i − j), shape (heads, n_q, n_k); r1, r2 a float or (heads,) each.

    Raises ParameterError when r1 or r2 is out of the variant's range.
    """
    variant = _check_variant(variant)
    r1_t = _per_head("r1", r1, heads, device, dtype)
    r2_t = _per_head("r2", r2, heads, device, dtype)
    _check_range("r1", r1_t, None)
    _check_range("r2", r2_t, POWER_MAX if variant == "power" else None)
    return _kernel(variant, r1_t, r2_t, distances(n_q, n_k, device=device, dtype=dtype))


def kerple_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str,
    r1: Coefficient,
    r2: Coefficient,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q kᵀ·scale + k̃(i − j) + mask) v over (batch, heads, n, head_dim), on SDPA.

    r1, r2: a float or a (heads,) tensor each (gradients flow to tensors); `variant` is
    'log' (−r1·log(1 + r2|i − j|)) or 'power' (−r1|i − j|^r2).
    """
    check_qkv(q, k, v)
    bias = kerple_bias(q.shape[1], q.shape[2], k.shape[2], variant=variant, r1=r1, r2=r2, device=q.device, dtype=q.dtype)
    return softmax_attention(
        q, k, v, causal=causal, attention_mask=attention_mask, attn_mask=attn_mask, bias=bias, scale=scale
    )


def kerple_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str,
    r1: Coefficient,
    r2: Coefficient,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `kerple_attention`, in float64 with the weights materialised."""
    check_qkv(q, k, v)
    bias = kerple_bias(
        q.shape[1], q.shape[2], k.shape[2], variant=variant, r1=r1, r2=r2, device=q.device, dtype=torch.float64
    )
    return softmax_attention_reference(
        q, k, v, causal=causal, attention_mask=attention_mask, attn_mask=attn_mask, bias=bias, scale=scale
    )


def _softplus_inverse(y: Tensor) -> Tensor:
    """x with softplus(x) = y, for y > 0."""
    return y + torch.log(-torch.expm1(-y))


class _Kerple(ScoreTerm):
    """A learnt KERPLE kernel per head; subclasses fix the variant and the map of r2."""

    variant: ClassVar[str]
    r1_init_high: ClassVar[float]  # start values are drawn from U(ε, high)
    r2_init_high: ClassVar[float]
    r2_high: ClassVar[float | None] = None  # upper end of r2's range

    def __init__(self, heads: int, *, r1: Coefficient | None = None, r2: Coefficient | None = None, eps: float = 0.01) -> None:
        super().__init__()
        check_int("heads", heads)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ParameterError(f"eps: expected a float in (0, 1), got {eps!r}")
        self.heads, self.eps = heads, float(eps)
        self.r1_raw = nn.Parameter(self._r1_inverse(self._initial("r1", r1, self.r1_init_high, None)))
        self.r2_raw = nn.Parameter(self._r2_inverse(self._initial("r2", r2, self.r2_init_high, self.r2_high)))

    def _initial(self, name: str, value: Coefficient | None, init_high: float, high: float | None) -> Tensor:
        """Start values (heads,) in float64: given ones (checked to lie strictly inside the range) or U(ε, init_high)."""
        if value is None:
            u = torch.rand(self.heads, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
            return self.eps + (init_high - self.eps) * u
        start = _per_head(name, value, self.heads, None, torch.float64).detach().clone()
        vals = start.tolist()
        if not all(math.isfinite(x) and x > self.eps and (high is None or x < high) for x in vals):
            upper = f", {high:g})" if high is not None else ", ∞)"
            raise ParameterError(f"{name}: expected start values in (eps={self.eps:g}{upper}, got {vals}")
        return start

    def _r1_inverse(self, r1: Tensor) -> Tensor:
        return _softplus_inverse(r1 - self.eps).to(torch.get_default_dtype())

    @abstractmethod
    def _r2_inverse(self, r2: Tensor) -> Tensor:
        """Raw parameter for the start values r2."""

    @property
    def r1(self) -> Tensor:
        """r1 = ε + softplus(ρ1) > 0, (heads,)."""
        return self.eps + F.softplus(self.r1_raw)

    @property
    @abstractmethod
    def r2(self) -> Tensor:
        """r2 (heads,), in the variant's range."""

    def forward(self, n_q: int, n_k: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        dist = distances(n_q, n_k, device=device, dtype=dtype)
        return _kernel(self.variant, self.r1.to(device=device, dtype=dtype), self.r2.to(device=device, dtype=dtype), dist)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, eps={self.eps:g}"


class KerplePower(_Kerple):
    """KERPLE power kernel −r1·|i − j|^r2, r1 > 0, 0 < r2 < 2 (r2 = ε + (2 − ε)·sigmoid(ρ2))."""

    variant = "power"
    r1_init_high = 1.0
    r2_init_high = POWER_MAX
    r2_high = POWER_MAX

    def _r2_inverse(self, r2: Tensor) -> Tensor:
        return torch.logit((r2 - self.eps) / (POWER_MAX - self.eps)).to(torch.get_default_dtype())

    @property
    def r2(self) -> Tensor:
        return self.eps + (POWER_MAX - self.eps) * torch.sigmoid(self.r2_raw)


class KerpleLog(_Kerple):
    """KERPLE log kernel −r1·log(1 + r2·|i − j|), r1, r2 > 0 (r2 = ε + softplus(ρ2))."""

    variant = "log"
    r1_init_high = 2.0
    r2_init_high = 1.0

    def _r2_inverse(self, r2: Tensor) -> Tensor:
        return _softplus_inverse(r2 - self.eps).to(torch.get_default_dtype())

    @property
    def r2(self) -> Tensor:
        return self.eps + F.softplus(self.r2_raw)


@register_dense(
    name="kerple",
    sharding=("ring", "tree"),
    paper=KERPLE,
    family="C",
    params=(
        Param("variant", str, "log", "kernel: 'log' −r1·log(1 + r2|i−j|) or 'power' −r1|i−j|^r2", choices=VARIANTS),
    ),
    summary="Softmax attention with a learnt CPD-kernel distance bias per head (KERPLE log or power).",
    test_params={"variant": "power"},
)
class KerpleAttention(SoftmaxAttention):
    """Softmax attention with a learnt KERPLE kernel bias per head (log or power variant)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        variant: str = "log",
    ) -> None:
        variant = _check_variant(variant)
        term = KerpleLog(heads) if variant == "log" else KerplePower(heads)
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first, score_terms=(term,))
        self.variant = variant

    @property
    def kernel(self) -> KerpleLog | KerplePower:
        """The learnt kernel term (holds r1, r2)."""
        term = self.score_terms[0]
        assert isinstance(term, (KerpleLog, KerplePower))
        return term
