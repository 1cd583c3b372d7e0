"""Deep (MLP) memories of Miras (P157; Behrouz, Razaviyayn, Zhong & Mirrokni, 2025, arXiv:2504.13173,
Sections 3 and 5: the memory architecture of Moneta, Yaad and Memora).

The memory is a small network M_W, its weights W = (W₁, W₂) per head, trained online: each token
takes one gradient step of the attentional bias ℓ on the pair (k_t, v_t), with retention α_t as
weight decay, and the query reads the updated network:

    M_W(x) = x + W₂ σ(W₁ x)                      (layers=2, residual; W₁: d_h × d_k, W₂: d_v × d_h)
    W_t    = α_t W_{t−1} − η_t ∇_W ℓ(M_{W_{t−1}}(k_t), v_t)       (every weight matrix; gradient at W_{t−1})
    y_t    = M_{W_t}(q_t)

    ℓ2 bias      ℓ = ½‖e‖²,            ∂ℓ/∂M = e,                      e = M(k_t) − v_t
    ℓp (Moneta)  ℓ = ‖e‖_p^p,          ∂ℓ/∂M = p Sign(e) ⊙ |e|^(p−1)
    Huber (Yaad) ℓ = ½‖e‖² if ‖e‖ <= δ else δ(‖e‖₁ − δ/2),  ∂ℓ/∂M = e near, δ Sign(e) far

With g = ∂ℓ/∂M and a = W₁ k_t the chain rule gives ∇W₂ = g σ(a)ᵀ, ∇W₁ = ((W₂ᵀ g) ⊙ σ'(a)) k_tᵀ:
the fast path applies these (per token, batched over elements and heads, O(N d d_h)).
layers=1 is M_W(x) = [x +] W x; with residual=False, the ℓ2 bias, W₀ = 0 and no retention it is the
delta rule W_t = W_{t−1} − η_t (W_{t−1} k_t − v_t) k_tᵀ (`delta`, with η_t its β_t).

W₀ (the initial weights, per head) are parameters of the module, learned with the rest (the paper's
meta-learned initial memory): W₁ ~ N(0, 1/d_k), W₂ ~ N(0, 1/d_h); layers=1 starts at W₀ = 0, the
empty matrix memory. Gates read the per-head key k_t (before the feature map), as in `memora.py`:
η_t = σ(w_η·k_t + b_η), α_t = σ(w_α·k_t + b_α)^(1/τ) (retention='scalar') or 1 ('none'). q and k go
through SiLU then an L2 norm. Causal by construction; a padded token leaves W unchanged; a query with
no real key at or before it reads 0. No attention matrix (the memory is not linear in v): `materialize`
raises. Decoding carries the weights per element and head.

Fast path: the exact recurrence token by token. The paper trains with chunk-wise gradients (every
token of a chunk takes its gradient at the chunk's first memory), an approximation of the recurrence,
not used here. Reference: float64 per element, head and token, the gradient by autograd of the loss
written out on the network written out.

The ℓp step moves the output by about η p |e|^(p−1) per coordinate: for p > 2 it overshoots and
diverges once the error is large (found here: p = 3 overflows to NaN within 9 tokens of unit-scale
values), which the paper's Moneta (p = 3) avoids with its ℓq normalisation of the weights and smooth
approximations; without those the default is p = 1.5 (ours, as "miras-lp"); any p >= 1 is accepted.

Deviations: no LayerNorm inside the residual branch (the paper's M(x) = x + LN(W₁σ(W₂x))), exact
Sign and |·| (not the smooth tanh / √(x² + ε) the paper trains with), fixed p and δ (not data-dependent),
scalar gates per head (not per channel), retention by weight decay only (Moneta's ℓq normalisation
and Memora's KL retention on the MLP are not here; the KL memory is the matrix "memora").
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.registry import Param, Supports, register
from ...core.validate import check_choice, check_int
from .memora import RETENTION_PARAM, TEMPERATURE_PARAM, GatedScanMemory, ScanState, check_scan_inputs
from .miras import MIRAS, bias_gradient, check_bias_args

BIASES: tuple[str, ...] = ("l2", "lp", "huber")
ACTIVATIONS: tuple[str, ...] = ("gelu", "silu", "identity")


def _activate(a: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """σ(a) and σ'(a) of the hidden pre-activation a."""
    if activation == "gelu":  # exact GELU: a Φ(a), derivative Φ(a) + a φ(a)
        cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
        return a * cdf, cdf + a * torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    if activation == "silu":
        s = torch.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    return a, torch.ones_like(a)


def _output_gradient(err: Tensor, bias: str, p: float, delta: float) -> Tensor:
    """∂ℓ/∂M(k) at the error e (…, d_v)."""
    return err if bias == "l2" else bias_gradient(err, bias, p, delta)


def _forward(weights: tuple[Tensor, ...], x: Tensor, activation: str, residual: bool) -> tuple[Tensor, Tensor, Tensor]:
    """M_W(x) for x (batch, heads, d_k): (output, hidden σ(a), σ'(a)); one layer gives empty hidden tensors."""
    if len(weights) == 1:
        out = torch.einsum("bhvk,bhk->bhv", weights[0], x)
        hidden = slope = x.new_zeros(0)
    else:
        pre = torch.einsum("bhmk,bhk->bhm", weights[0], x)
        hidden, slope = _activate(pre, activation)
        out = torch.einsum("bhvm,bhm->bhv", weights[1], hidden)
    return (out + x if residual else out), hidden, slope


def deep_memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weights: tuple[Tensor, ...],
    *,
    eta: Tensor,
    alpha: Tensor | None = None,
    bias: str = "l2",
    activation: str = "gelu",
    residual: bool = True,
    p: float = 1.5,
    delta: float = 1.0,
    attention_mask: Tensor | None = None,
    seen: Tensor | None = None,
) -> tuple[Tensor, ScanState]:
    """The MLP memory on mapped q, k (batch, heads, n, d), token by token, from `weights` (batch, heads, …)
    ((W,) or (W₁, W₂)): (out (batch, heads, n, d_v), state). `seen` continues a previous scan."""
    b, h, n, _ = k.shape
    seen = torch.zeros(b, dtype=torch.bool, device=k.device) if seen is None else seen
    outs = []
    for t in range(n):
        kt = k[:, :, t]
        out, hidden, slope = _forward(weights, kt, activation, residual)
        g = _output_gradient(out - v[:, :, t], bias, p, delta)
        if len(weights) == 1:
            grads: tuple[Tensor, ...] = (g[..., :, None] * kt[..., None, :],)
        else:
            back = torch.einsum("bhvm,bhv->bhm", weights[1], g) * slope
            grads = (back[..., :, None] * kt[..., None, :], g[..., :, None] * hidden[..., None, :])
        step = eta[:, :, t, None, None]
        keep = 1.0 if alpha is None else alpha[:, :, t, None, None]
        new = tuple(keep * w - step * gw for w, gw in zip(weights, grads))
        if attention_mask is None:
            weights, seen = new, torch.ones_like(seen)
        else:
            real = attention_mask[:, t]
            weights = tuple(torch.where(real[:, None, None, None], nw, w) for nw, w in zip(new, weights))
            seen = seen | real
        read = _forward(weights, q[:, :, t], activation, residual)[0]
        outs.append(torch.where(seen[:, None, None], read, torch.zeros_like(read)))
    return torch.stack(outs, dim=2), ScanState(weights, seen)


def _check_deep(
    q: Tensor, k: Tensor, v: Tensor, weights: tuple[Tensor, ...], eta: Tensor, alpha: Tensor | None,
    bias: str, activation: str, residual: bool, p: float, delta: float, mask: Tensor | None,
) -> None:
    check_scan_inputs(q, k, v, eta, alpha, mask)
    check_choice("bias", bias, BIASES)
    check_choice("activation", activation, ACTIVATIONS)
    check_bias_args(bias, eta, p, delta)
    b, h, _, d_k = k.shape
    d_v = v.shape[-1]
    if residual and d_v != d_k:
        raise ShapeError(f"v: residual=True adds the input to the output, expected d_v = d_k = {d_k}, got {d_v}")
    if len(weights) not in (1, 2):
        raise ParameterError(f"weights: expected (W,) or (W1, W2), got {len(weights)} tensors")
    d_h = weights[0].shape[-2]
    shapes = [(b, h, d_v, d_k)] if len(weights) == 1 else [(b, h, d_h, d_k), (b, h, d_v, d_h)]
    for i, (w, want) in enumerate(zip(weights, shapes)):
        if tuple(w.shape) != want:
            raise ShapeError(f"weights[{i}]: expected shape {want}, got {tuple(w.shape)}")


def deep_memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weights: tuple[Tensor, ...],
    *,
    eta: Tensor,
    alpha: Tensor | None = None,
    bias: str = "l2",
    activation: str = "gelu",
    residual: bool = True,
    p: float = 1.5,
    delta: float = 1.0,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The read y_t = M_{W_t}(q_t) (causal) over mapped q, k, v (batch, heads, n, head_dim) from the initial
    weights (W₀,) (batch, heads, d_v, d_k) or (W₁, W₂) ((batch, heads, d_h, d_k), (batch, heads, d_v, d_h)),
    given η (batch, heads, n) and α (batch, heads, n) or None (α = 1)."""
    _check_deep(q, k, v, weights, eta, alpha, bias, activation, residual, p, delta, attention_mask)
    return deep_memory_scan(q, k, v, weights, eta=eta, alpha=alpha, bias=bias, activation=activation,
                            residual=residual, p=p, delta=delta, attention_mask=attention_mask)[0]


def _loss(err: Tensor, bias: str, p: float, delta: float) -> Tensor:
    """The attentional bias at the error e: ½‖e‖², Σ|e|^p, or Huber (½‖e‖² within δ, δ(‖e‖₁ − δ/2) beyond)."""
    if bias == "l2":
        return 0.5 * (err * err).sum()
    if bias == "lp":
        return (err.abs() ** p).sum()
    norm = torch.sqrt((err * err).sum())
    return 0.5 * norm * norm if norm <= delta else delta * (err.abs().sum() - 0.5 * delta)


def _network(weights: list[Tensor], x: Tensor, activation: str, residual: bool) -> Tensor:
    """M_W(x) written out for one head: W x, or W₂ act(W₁ x); plus x when residual."""
    if len(weights) == 1:
        out = weights[0] @ x
    else:
        act = {"gelu": F.gelu, "silu": F.silu, "identity": lambda a: a}[activation]
        out = weights[1] @ act(weights[0] @ x)
    return out + x if residual else out


def deep_memory_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weights: tuple[Tensor, ...],
    *,
    eta: Tensor,
    alpha: Tensor | None = None,
    bias: str = "l2",
    activation: str = "gelu",
    residual: bool = True,
    p: float = 1.5,
    delta: float = 1.0,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(out, final weights) of `deep_memory_attention` in float64, per element, head and token: every W ←
    α W − η ∇_W ℓ(M_W(k), v), the gradient by autograd of the loss on the network written out."""
    _check_deep(q, k, v, weights, eta, alpha, bias, activation, residual, p, delta, attention_mask)
    grad_wanted = torch.is_grad_enabled()  # the loss's gradient needs autograd even under no_grad
    with torch.enable_grad():
        out, final = _deep_reference_scan(q, k, v, weights, eta, alpha, bias, activation, residual, p, delta,
                                          attention_mask)
    if grad_wanted:
        return out, final
    return out.detach(), tuple(w.detach() for w in final)


def _deep_reference_scan(
    q: Tensor, k: Tensor, v: Tensor, weights: tuple[Tensor, ...], eta: Tensor, alpha: Tensor | None, bias: str,
    activation: str, residual: bool, p: float, delta: float, attention_mask: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    b, h, n, _ = k.shape
    q64, k64, v64, eta64 = q.double(), k.double(), v.double(), eta.double()
    outs, finals = [], []
    for bi in range(b):
        for hi in range(h):
            ws = [w[bi, hi].double() for w in weights]
            seen = False
            reads = []
            for t in range(n):
                if attention_mask is None or bool(attention_mask[bi, t]):
                    probes = [torch.zeros_like(w, requires_grad=True) for w in ws]  # ∇ at W: d ℓ(W + P) / dP at 0
                    shifted = [w + pr for w, pr in zip(ws, probes)]
                    err = _network(shifted, k64[bi, hi, t], activation, residual) - v64[bi, hi, t]
                    grads = torch.autograd.grad(_loss(err, bias, p, delta), probes, create_graph=True)
                    a = 1.0 if alpha is None else alpha[bi, hi, t].double()
                    ws = [a * w - eta64[bi, hi, t] * g for w, g in zip(ws, grads)]
                    seen = True
                read = _network(ws, q64[bi, hi, t], activation, residual)
                reads.append(read if seen else torch.zeros_like(read))
            outs.append(torch.stack(reads))
            finals.append(ws)
    out = torch.stack(outs).reshape(b, h, n, v.shape[-1]).to(q.dtype)
    final = tuple(torch.stack([f[i] for f in finals]).reshape(weights[i].shape).to(q.dtype) for i in range(len(weights)))
    return out, final


@register(
    name="miras-mlp",
    paper=MIRAS,
    family="A",
    cost="O(Nd²)",
    exponent=1.0,
    supports=Supports(causal=True, causal_only=True, key_padding=True, decode=True, materialize=False),
    params=(
        Param("bias", str, "l2", "attentional bias: 'l2' (½‖e‖²), 'lp' (Moneta, ‖e‖_p^p), 'huber' (Yaad)",
              choices=BIASES),
        Param("layers", int, 2, "layers of the memory network: 1 (W x) or 2 (W₂ σ(W₁ x))", low=1, high=2),
        Param("expansion", int, 4, "hidden width d_h = expansion · head_dim (layers=2)", low=1),
        Param("activation", str, "gelu", "σ of the hidden layer", choices=ACTIVATIONS),
        Param("residual", bool, True, "M(x) = x + …"),
        RETENTION_PARAM,
        TEMPERATURE_PARAM,
        Param("p", float, 1.5, "exponent of the ℓp bias (bias='lp'; the paper's Moneta: 3, see the docstring)", low=1.0),
        Param("delta", float, 1.0, "threshold δ of the Huber bias (bias='huber')", low=1e-6),
    ),
    summary="Miras deep memory: an MLP M(x) = x + W₂σ(W₁x) per head, W_t = α_t W_{t−1} − η_t ∇ℓ(M(k_t), v_t) "
    "(ℓ2 / ℓp / Huber), y_t = M_t(q_t).",
    normalized=False,
    test_params={"expansion": 2},
    functional=("deep_memory_attention", "deep_memory_attention_reference"),
)
class DeepMemoryAttention(GatedScanMemory):
    """A 2-layer (or 1-layer) MLP memory per head, one gradient step of the attentional bias per token."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = True,
        bias: str = "l2",
        layers: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        residual: bool = True,
        retention: str = "scalar",
        gate_temperature: float = 16.0,
        p: float = 1.5,
        delta: float = 1.0,
    ) -> None:
        check_choice("bias", bias, BIASES)
        check_int("layers", layers, 1, 2)
        check_int("expansion", expansion, 1)
        check_choice("activation", activation, ACTIVATIONS)
        if not isinstance(residual, bool):
            raise ParameterError(f"residual: expected a bool, got {residual!r}")
        check_bias_args(bias, torch.ones(()), p, delta)
        if p != 1.5 and bias != "lp":
            raise ParameterError(f"p: only used with bias='lp', got bias={bias!r}")
        if delta != 1.0 and bias != "huber":
            raise ParameterError(f"delta: only used with bias='huber', got bias={bias!r}")
        if layers == 1 and (expansion != 4 or activation != "gelu"):
            raise ParameterError("expansion, activation: only used with layers=2, got layers=1")
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, retention=retention,
                         gate_temperature=gate_temperature)
        self.bias, self.layers, self.expansion, self.activation = bias, layers, expansion, activation
        self.residual, self.p, self.delta = residual, float(p), float(delta)
        d = self.head_dim
        if layers == 1:
            self.init_weights = nn.ParameterList([nn.Parameter(torch.zeros(heads, d, d))])
        else:
            d_h = expansion * d
            self.init_weights = nn.ParameterList([
                nn.Parameter(torch.randn(heads, d_h, d) / math.sqrt(d)),
                nn.Parameter(torch.randn(heads, d, d_h) / math.sqrt(d_h)),
            ])

    def step_size(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def _options(self) -> dict[str, Any]:
        return {"bias": self.bias, "activation": self.activation, "residual": self.residual, "p": self.p,
                "delta": self.delta}

    def _initial(self, k: Tensor) -> tuple[Tensor, ...]:
        return tuple(w.to(k.dtype)[None].expand(k.shape[0], *w.shape) for w in self.init_weights)

    def scan(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None, mask: Tensor | None,
             state: ScanState | None) -> tuple[Tensor, ScanState]:
        if state is None:
            weights, seen = self._initial(k), None
        else:
            weights, seen = state.memory, state.seen
            for w, w0 in zip(weights, self.init_weights):
                if w.shape[1:] != w0.shape:
                    raise ShapeError(f"state: expected weights of shape (batch, {', '.join(map(str, w0.shape))}), "
                                     f"got {tuple(w.shape)}")
        return deep_memory_scan(q, k, v, weights, eta=eta, alpha=alpha, attention_mask=mask, seen=seen,
                                **self._options())

    def scan_reference(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None,
                       mask: Tensor | None) -> tuple[Tensor, Tensor]:
        out, final = deep_memory_attention_reference(q, k, v, self._initial(k), eta=eta, alpha=alpha,
                                                     attention_mask=mask, **self._options())
        return out, final[-1]

    def extra_repr(self) -> str:
        shape = "W x" if self.layers == 1 else f"W₂ {self.activation}(W₁ x), d_h = {self.expansion}·head_dim"
        return (f"bias={self.bias!r}, memory={shape!r}, residual={self.residual}, retention={self.retention!r}, "
                f"p={self.p}, delta={self.delta}")
