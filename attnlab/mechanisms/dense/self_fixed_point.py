"""Fixed-point self-attention, FPSA, of the SELF-Transformer (Mathur, Doan, Pearlmutter and Plis, "Change of Thought:
Adaptive Test-Time Computation", 2025).

Instead of computing the alignment matrix once from the input, FPSA iterates a hidden state Z to a fixed point,
recomputing the alignment from the current state at every step while the values stay those of the input:

    Z⁰ = X
    A^k_h = softmax((Z^k W_q^h)(Z^k W_k^h)ᵀ / √d_h + M)                   (per head h)
    Z^{k+1} = F(Z^k) = W_o concat_h(A^k_h X W_v^h) + b_o                  (projection biases b_q, b_k, b_v too)

until ‖Z^{k+1} − Z^k‖_F / ‖Z^k‖_F ≤ eps or k + 1 = max_iterations; the output is Z* (and A* = A(Z*) the layer's
attention). The number of iterations follows the input ("computation scales with input difficulty"); the
parameters are those of a standard multi-head layer (W_q, W_k, W_v, W_o).

Backward by implicit differentiation (the paper's; no backprop through the iterations): at the fixed point
Z* = F(Z*, θ), so dZ*/dθ = (I − J)⁻¹ ∂F/∂θ with J = ∂F/∂Z at Z*. The forward iterates without a graph, then
evaluates F once at Z* with the graph; a hook turns the incoming gradient g into y = (I − Jᵀ)⁻¹ g, solved by the
fixed-point iteration y ← g + Jᵀ y (vector–Jacobian products through that one graph; the same eps and
max_iterations, relative change measured like the forward's). The memory of the backward is one evaluation
of F whatever the number of iterations (benchmarks/self_fixed_point_memory.py).

In attnlab's terms the core `attend(q, k, v)` takes the projections of X, q⁰ = X W_q + b_q, k⁰ = X W_k + b_k
(the q, k of the first state: Z⁰ = X, or Z⁰ = 0 with the input injected, below) and v = X W_v + b_v, carries the
state through the module's W_q, W_k, W_o, and returns per head
U* = A(Z*) v, so the module's output W_o concat(U*) + b_o = F(Z*) (= Z* at the fixed point), `materialize` gives
A(Z*) and out = out_proj(A* v) holds exactly as for softmax attention.

Choices and deviations (no official code; PAPERS.md marks the row's operands as approximate):

* The state lives in the model width and W_o is applied inside the loop: that is what makes Z^{k+1} of the same
  shape as the Z^k that the next W_q, W_k read, for any head_dim (the row's formula). A summary of the paper
  describes per-head states started at the query projection with W_o after convergence; with keys and values
  from X that state's fixed point would not depend on W_q at all, so the row's form is implemented.
* Collapse: in this form, a state whose rows are all equal gives identical keys, hence uniform attention, hence
  equal rows again — Z_i = W_o mean_j(V_j) + b_o for every i is always a fixed point, and from Z⁰ = X it is the
  one reached at the default initialisation (and with W_q, W_k scaled up 50×, in our checks): the layer then
  outputs one vector per sequence, and q⁰ = X W_q, k⁰ = X W_k do not reach the output at all (the fixed point
  forgets its start). The module therefore defaults to the deep-equilibrium form (Bai et al., 2019),
  `inject_input=True`, where q and k read Z + X (a deviation; `inject_input=False` is the paper's form):

      A^k_h = softmax(((Z^k + X) W_q^h + b_q^h)((Z^k + X) W_k^h + b_k^h)ᵀ / √d_h + M),   Z⁰ = 0

  so Z¹ is exactly standard multi-head attention's output and the iteration refines it; tokens keep their
  identity through X, and the number of iterations grows with the input's scale (sharper attention).
* The convergence test is per sample (a sample stops updating once its own relative change is ≤ eps), so a
  sample's result does not depend on its batch; the norms run over the real tokens only (padding is removal;
  a sample with no real token has 0 ≤ eps·0 and stops at once). The first update, Z⁰ → Z¹, is always taken
  (the core sees q⁰, k⁰, not X), so a test compares Z^{k+1} with Z^k from k = 1; `max_iterations` counts the
  updates, and the output F(Z*) is one evaluation of F beyond the last of them.
* eps = 1e-4 and max_iterations = 50 are defaults of this library (the paper reports neither here). When a
  sample reaches max_iterations unconverged, the output is its last state and the implicit gradient is that of
  the fixed point it approximates; `last_info` (module) or `return_info=True` (functional) reports the
  iterations, the final residual and `converged` per sample, and the backward iterations once it ran.
* No causal mode (an encoder layer, as in the paper: the per-sample stopping rule reads every token), no
  cross-attention (the keys come from the state), no arbitrary attn_mask, no decoding.
* Fast path: SDPA per iteration without a graph, then one F and one A with the graph. Reference
  (`impl="reference"`): float64, one sample at a time, einsum logits and a masked softmax, and backprop through
  every iteration (unrolled; the test that the implicit gradient equals it).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ParameterError, ShapeError
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_int, check_qkv, check_tensor
from ...kernels.sdpa import sdpa

SELF = Paper("P091", "Change of Thought: Adaptive Test-Time Computation", 2025, "2507.13569")
EPS = 1e-4
MAX_ITERATIONS = 50


@dataclass
class FixedPointInfo:
    """Per sample (batch,): state updates taken, final relative change ‖Z^{k+1} − Z^k‖/‖Z^k‖, whether it reached
    eps; `backward_iterations` is filled by the implicit backward when it runs."""

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    backward_iterations: Tensor | None = None


@dataclass(frozen=True)
class StateMaps:
    """The weights that carry the state: q = Z W_qᵀ + b_q, k = Z W_kᵀ + b_k (heads·head_dim each), Z = U W_oᵀ + b_o."""

    q_weight: Tensor
    k_weight: Tensor
    out_weight: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    out_bias: Tensor | None = None


def _check(q: Tensor, k: Tensor, v: Tensor, maps: StateMaps, attention_mask: Tensor | None, eps: float,
           max_iterations: int) -> None:
    check_qkv(q, k, v, same_length=True)
    batch, heads, _, head_dim = q.shape
    if v.shape[-1] != head_dim:
        raise ShapeError(f"v: expected head_dim {head_dim} (as q; the state is read back through W_o), got {v.shape[-1]}")
    inner = heads * head_dim
    dim = check_tensor("out_weight", maps.out_weight).shape[0]
    want = {"q_weight": (inner, dim), "k_weight": (inner, dim), "out_weight": (dim, inner),
            "q_bias": (inner,), "k_bias": (inner,), "out_bias": (dim,)}
    for name, shape in want.items():
        t = getattr(maps, name)
        if t is None:
            continue
        check_tensor(name, t)
        if tuple(t.shape) != shape:
            raise ShapeError(f"{name}: expected shape {shape} (heads·head_dim = {inner}, dim = {dim}), got {tuple(t.shape)}")
    check_attention_mask(attention_mask, batch, k.shape[2])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ParameterError(f"eps: expected a finite float >= 0, got {eps!r}")
    check_int("max_iterations", max_iterations)


def _split(t: Tensor, heads: int) -> Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def _merge(u: Tensor) -> Tensor:
    b, h, n, d = u.shape
    return u.transpose(1, 2).reshape(b, n, h * d)


def _relative_change(new: Tensor, old: Tensor, rows: Tensor) -> Tensor:
    """‖new − old‖_F / ‖old‖_F per sample over the real rows (batch, n) of (batch, n, dim) tensors; 0/0 is 0."""
    w = rows[..., None].to(new.dtype)
    diff = ((new - old) * w).flatten(1).norm(dim=1)
    size = (old * w).flatten(1).norm(dim=1)
    return torch.where(size > 0, diff / size.clamp_min(torch.finfo(size.dtype).tiny), diff * math.inf).nan_to_num(0.0)


def _solve(step: Callable[[Tensor], Tensor], start: Tensor, rows: Tensor, eps: float, max_steps: int,
           first: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Iterate x ← step(x) from `start` (batch, n, dim), each sample until its relative change is ≤ eps or `max_steps`
    updates; (x, updates per sample, last relative change). `first`: updates taken before `start`."""
    x = start
    active = torch.ones(start.shape[0], dtype=torch.bool, device=start.device)
    count = torch.full_like(active, first, dtype=torch.long)
    residual = torch.full(active.shape, math.inf, dtype=start.dtype, device=start.device)
    for _ in range(max_steps - first):
        if not bool(active.any()):
            break
        new = step(x)
        change = _relative_change(new, x, rows)
        x = torch.where(active[:, None, None], new, x)
        residual = torch.where(active, change, residual)
        count = count + active.long()
        active = active & ~(change <= eps)
    return x, count, residual


def _state_qk(z: Tensor, q0: Tensor, k0: Tensor, maps: StateMaps, inject: bool) -> tuple[Tensor, Tensor]:
    """The heads' q, k read from the state: Z W_qᵀ + b_q, or with the input injected (Z + X) W_qᵀ + b_q = q⁰ + Z W_qᵀ."""
    heads = q0.shape[1]
    if inject:
        return q0 + _split(F.linear(z, maps.q_weight), heads), k0 + _split(F.linear(z, maps.k_weight), heads)
    return _split(F.linear(z, maps.q_weight, maps.q_bias), heads), _split(F.linear(z, maps.k_weight, maps.k_bias), heads)


def _alignment_values(z: Tensor, q0: Tensor, k0: Tensor, v: Tensor, maps: StateMaps, mask: Tensor | None, scale: float,
                      inject: bool) -> Tensor:
    """U = A(Z) v per head (batch, heads, n, head_dim), on SDPA."""
    q, k = _state_qk(z, q0, k0, maps, inject)
    return sdpa(q, k, v, mask, None, scale)


def _field(z: Tensor, q0: Tensor, k0: Tensor, v: Tensor, maps: StateMaps, mask: Tensor | None, scale: float,
           inject: bool) -> Tensor:
    """F(Z) = W_o concat_h(A(Z) v_h) + b_o."""
    return F.linear(_merge(_alignment_values(z, q0, k0, v, maps, mask, scale, inject)), maps.out_weight, maps.out_bias)


def _implicit_hook(z_leaf: Tensor, fz: Tensor, rows: Tensor, eps: float, max_iterations: int,
                   info: FixedPointInfo) -> Callable[[Tensor], Tensor]:
    """The gradient hook on F(Z*): g ↦ y solving y = g + Jᵀ y, J = ∂F/∂Z at Z*, by fixed-point iteration per sample.
    The products Jᵀ y run back through F's own graph, which calls the hook again: it passes those through."""
    solving = False

    def hook(g: Tensor) -> Tensor | None:
        nonlocal solving
        if solving:
            return None

        def step(y: Tensor) -> Tensor:
            (jty,) = torch.autograd.grad(fz, z_leaf, y, retain_graph=True)
            return g + jty

        solving = True
        try:
            y, count, _ = _solve(step, g, rows, eps, max_iterations)
        finally:
            solving = False
        info.backward_iterations = count
        return y

    return hook


def self_fixed_point_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    maps: StateMaps,
    attention_mask: Tensor | None = None,
    eps: float = EPS,
    max_iterations: int = MAX_ITERATIONS,
    inject_input: bool = True,
    scale: float | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, FixedPointInfo]:
    """FPSA on projected heads (batch, heads, n, head_dim): q = X W_q, k = X W_k (the state Z⁰ = X), v = X W_v; the
    state Z (batch, n, dim) iterates Z ← F(Z) (module docstring) with `maps` until ‖ΔZ‖/‖Z‖ ≤ eps per sample or
    `max_iterations` updates; returns U* = A(Z*) v per head, differentiable by implicit differentiation.

    `attention_mask` (batch, n), True = real token (keys, and the rows of the convergence norms); `inject_input`:
    q and k read Z + X (the first state is then the standard attention output, module docstring).
    """
    _check(q, k, v, maps, attention_mask, eps, max_iterations)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = None if attention_mask is None else attention_mask[:, None, None, :]
    rows = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask
    with torch.no_grad():
        z1 = F.linear(_merge(sdpa(q, k, v, mask, None, scale)), maps.out_weight, maps.out_bias)
        z_star, count, residual = _solve(lambda z: _field(z, q, k, v, maps, mask, scale, inject_input), z1, rows, eps,
                                         max_iterations, first=1)
    info = FixedPointInfo(count, residual, residual <= eps)
    tracked = [q, k, v, *(t for t in vars(maps).values() if t is not None)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        z_leaf = z_star.detach().requires_grad_(True)
        fz = _field(z_leaf, q, k, v, maps, mask, scale, inject_input)
        fz.register_hook(_implicit_hook(z_leaf, fz, rows, eps, max_iterations, info))
        z_star = z_star.detach() + (fz - fz.detach())  # the value of Z*, the gradient of F at Z*
    out = _alignment_values(z_star, q, k, v, maps, mask, scale, inject_input)
    return (out, info) if return_info else out


def _sample_reference(q0: Tensor, k0: Tensor, v: Tensor, real: Tensor, maps: StateMaps, eps: float, max_iterations: int,
                      inject_input: bool, scale: float) -> tuple[Tensor, Tensor]:
    """One sample in float64: q0, k0, v (heads, n, head_dim), real (n,); (U* (heads, n, head_dim), A* (heads, n, n))."""
    heads, n, head_dim = q0.shape
    wq, wk, wo = (t.double() for t in (maps.q_weight, maps.k_weight, maps.out_weight))
    bq, bk, bo = (torch.zeros(t.shape[0], dtype=torch.float64, device=t.device) if b is None else b.double()
                  for t, b in ((wq, maps.q_bias), (wk, maps.k_bias), (wo, maps.out_bias)))
    keep = real[None, None, :].expand(heads, n, n)

    def align(z: Tensor | None) -> Tensor:
        """A(Z) per head; Z = None is the start, q⁰ and k⁰ as given."""
        qs, ks = q0, k0
        if z is not None:
            zq, zk = (z @ wq.T), (z @ wk.T)
            if inject_input:
                qs = q0 + zq.reshape(n, heads, head_dim).transpose(0, 1)
                ks = k0 + zk.reshape(n, heads, head_dim).transpose(0, 1)
            else:
                qs = (zq + bq).reshape(n, heads, head_dim).transpose(0, 1)
                ks = (zk + bk).reshape(n, heads, head_dim).transpose(0, 1)
        return masked_softmax(torch.einsum("hid,hjd->hij", qs, ks) * scale, keep)

    def state(a: Tensor) -> Tensor:
        return torch.einsum("hij,hjd->ihd", a, v).reshape(n, heads * head_dim) @ wo.T + bo

    z = state(align(None))
    for _ in range(max_iterations - 1):
        z_next = state(align(z))
        diff, size = torch.linalg.norm((z_next - z)[real]), torch.linalg.norm(z[real])
        z = z_next
        if diff <= eps * size:
            break
    a = align(z)
    return torch.einsum("hij,hjd->hid", a, v), a


def self_fixed_point_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    maps: StateMaps,
    attention_mask: Tensor | None = None,
    eps: float = EPS,
    max_iterations: int = MAX_ITERATIONS,
    inject_input: bool = True,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(U*, A*) of `self_fixed_point_attention` in float64, one sample at a time with einsums and a masked softmax;
    autograd runs through every iteration (backprop through the unrolled loop, no implicit step)."""
    _check(q, k, v, maps, attention_mask, eps, max_iterations)
    batch, _, n, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    outs, weights = [], []
    for s in range(batch):
        real = torch.ones(n, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask[s]
        u, a = _sample_reference(q[s].double(), k[s].double(), v[s].double(), real, maps, eps, max_iterations,
                                 inject_input, scale)
        outs.append(u)
        weights.append(a)
    return torch.stack(outs).to(q.dtype), torch.stack(weights).to(q.dtype)


def self_fixed_point_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """FLOPs of ONE iteration at dim = heads·head_dim: W_q, W_k and W_o (2·n·dim² each) and the attention (4·h·n²·d);
    a call takes as many iterations as its input needs (≤ max_iterations)."""
    dim = heads * head_dim
    return 3 * 2.0 * n * dim * dim + 4.0 * heads * n * n * head_dim


@register(
    name="self-fixed-point",
    paper=SELF,
    family="A",
    cost="O(K N² d)",
    exponent=2.0,
    supports=Supports(key_padding=True),
    params=(
        Param("eps", float, EPS, "stop when ‖Z^{k+1} − Z^k‖_F / ‖Z^k‖_F ≤ eps (per sample; also the backward solve's)",
              low=0.0),
        Param("max_iterations", int, MAX_ITERATIONS, "most state updates per call (and per backward solve)", low=1),
        Param("inject_input", bool, True, "q and k read Z + X (DEQ input injection; the first state is standard "
              "attention's output); False: Z alone, the paper's form, whose uniform-attention state attracts at init"),
    ),
    test_params={"eps": 1e-12, "max_iterations": 300},
    summary="SELF fixed-point self-attention: Z ← W_o softmax(ZW_q (ZW_k)ᵀ/√d) XW_v to ‖ΔZ‖/‖Z‖ ≤ eps; implicit backward",
    flops=self_fixed_point_flops,
)
class SelfFixedPointAttention(Attention):
    """FPSA: the state Z (from X) iterates Z ← W_o concat_h softmax(Z W_q^h (Z W_k^h)ᵀ/√d_h) X W_v^h + b_o to its
    fixed point; out = Z* (exactly W_o A(Z*) V + b_o); backward by implicit differentiation. `last_info` holds
    the last call's iteration counts (`FixedPointInfo`)."""

    mask_form = "padding"  # the key padding keep-mask (batch, n): it also selects the rows of the convergence norms
    mask_note = "the state iterates over the whole sequence (an encoder layer)"
    same_length = True

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        eps: float = EPS,
        max_iterations: int = MAX_ITERATIONS,
        inject_input: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        self.inject_input = inject_input
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise ParameterError(f"eps: expected a finite float >= 0, got {eps!r}")
        self.eps, self.max_iterations = float(eps), check_int("max_iterations", max_iterations)
        self.last_info: FixedPointInfo | None = None

    @property
    def maps(self) -> StateMaps:
        """The state maps of this module: its W_q, W_k, W_o and their biases."""
        return StateMaps(self.q_proj.weight, self.k_proj.weight, self.out_proj.weight,
                         self.q_proj.bias, self.k_proj.bias, self.out_proj.bias)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out, self.last_info = self_fixed_point_attention(
            q, k, v, maps=self.maps, attention_mask=mask, eps=self.eps, max_iterations=self.max_iterations,
            inject_input=self.inject_input, return_info=True,
        )
        return out

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self_fixed_point_attention_reference(
            q, k, v, maps=self.maps, attention_mask=mask, eps=self.eps, max_iterations=self.max_iterations,
            inject_input=self.inject_input,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}, max_iterations={self.max_iterations}, inject_input={self.inject_input}"
