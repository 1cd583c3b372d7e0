"""Memora: an associative memory kept on the probability simplex by KL retention (Miras, P157; Behrouz,
Razaviyayn, Zhong & Mirrokni, 2025, arXiv:2504.13173, Sections 3.3 and 5.3).

Miras reads a recurrent layer as online learning of a memory W with an attentional bias ℓ and a
retention term. Memora takes the ℓ2 bias and, as retention, a KL divergence to the previous memory
(local) plus the negative entropy of the memory (global), over memories with non-negative entries of
fixed mass c. The learning-retaining step is then a softmax (the paper's eqs. of the f-divergence
retention, KL case, and of Memora):

    W_t = c · Softmax(α_t log W_{t−1} − η_t ∇_W ℓ(W_{t−1}; k_t, v_t)),    ℓ = ½‖W k − v‖²,  ∇ℓ = (W k − v) kᵀ
    y_t = W_t q_t

α_t ∈ (0, 1] weighs the old memory against the entropy (α = 1: mirror descent with no global
retention; α → 0 forgets into the uniform memory), η_t is the step. W is d_v × d_k and the softmax
normalises each row of W over the key channels ("per slice"): every row is c times a probability
vector, W_0 the uniform memory c/d_k (the maximum of the entropy). Since W > 0 is only ever used
through its logarithm and a softmax, the fast path keeps log W (a log-softmax, no log of a rounded
zero).

Gates, per head and token, read the per-head key k_t (before the feature map), as miras' gate_source='key':
η_t = softplus(w_η·k_t + b_η) (any η > 0 keeps W on the simplex, so it is not capped at 1) and, with
retention='scalar', α_t = σ(w_α·k_t + b_α)^(1/τ) (τ = gate_temperature; retention='none' is α = 1).
q and k go through SiLU then an L2 norm, as in miras' ℓ2, ℓp and Huber memories.

Causal by construction: a left-to-right scan, y_t reads the memory written by tokens 1..t. A padded
token (attention_mask False) leaves W unchanged; a query with no real key at or before it reads 0
(not W_0 q_t), so fully masked rows are zero. The memory is not linear in v (the softmax), so there
is no attention matrix: `materialize` raises. Decoding carries (log W, seen) per element and head.

Fast path: the exact recurrence token by token (N steps of O(d²) batched work). The paper's
chunk-wise training (a full softmax step at the first token of a chunk, linear steps from that
memory inside it) approximates the recurrence, so it is not used. Reference: float64, per element
and head, the gradient of ℓ by autograd of the loss written out and the softmax as exp / sum.

Deviations: the paper's Memora uses a 2-layer MLP memory with the softmax on each weight slice;
here the memory is the matrix W (the MLP memories with ℓ2 / ℓp / Huber bias and weight-decay
retention are "miras-mlp" in `deep_memory.py`); c is a fixed hyperparameter (`mass`, default 1).
"""
from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.module import Attention
from ...core.registry import Param, Supports, register
from ...core.validate import check_attention_mask, check_choice, check_qkv
from .miras import MIRAS

RETENTIONS: tuple[str, ...] = ("none", "scalar")


@dataclass
class ScanState:
    """A scanned memory's state per element and head: its tensors (log W for Memora; the MLP weights for the
    deep memory) and `seen` (batch,), True once the element has had a real key (before that the read is 0)."""

    memory: tuple[Tensor, ...]
    seen: Tensor


def memory_features(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """q, k as the memory reads and writes them: SiLU, then unit L2 norm over the channels."""
    return F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1)


def check_gates(name: str, gate: Tensor | None, k: Tensor, *, optional: bool = False) -> None:
    """A gate of shape (batch, heads, n) as k's first three dims; ShapeError naming it otherwise."""
    if gate is None:
        if not optional:
            raise ValueError(f"{name}: expected a tensor of shape {tuple(k.shape[:3])}, got None")
        return
    if tuple(gate.shape) != tuple(k.shape[:3]):
        raise ShapeError(f"{name}: expected shape (batch, heads, n) = {tuple(k.shape[:3])}, got {tuple(gate.shape)}")


def check_mass(mass: object) -> float:
    """c > 0, finite; ParameterError otherwise."""
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0.0 < mass < math.inf:
        raise ParameterError(f"mass: expected a finite float > 0, got {mass!r}")
    return float(mass)


def check_scan_inputs(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None, mask: Tensor | None) -> None:
    """q, k, v of one length, the gates (batch, heads, n), the keep-mask (batch, n) or None; errors name the argument."""
    check_qkv(q, k, v, same_length=True)
    check_gates("eta", eta, k)
    check_gates("alpha", alpha, k, optional=True)
    check_attention_mask(mask, k.shape[0], k.shape[2])


def memora_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    eta: Tensor,
    alpha: Tensor | None = None,
    mass: float = 1.0,
    attention_mask: Tensor | None = None,
    state: ScanState | None = None,
) -> tuple[Tensor, ScanState]:
    """The KL memory on mapped q, k (batch, heads, n, d_k), token by token: (out (batch, heads, n, d_v), state).

    log W_t = log c + log_softmax(α_t log W_{t−1} − η_t (W_{t−1} k_t − v_t) k_tᵀ) over the key channels;
    y_t = W_t q_t, or 0 before the element's first real key. `state` continues a previous scan.
    """
    b, h, n, d_k = k.shape
    if state is None:
        log_w = k.new_full((b, h, v.shape[-1], d_k), math.log(mass / d_k))
        seen = torch.zeros(b, dtype=torch.bool, device=k.device)
    else:
        (log_w,), seen = state.memory, state.seen
    log_mass = math.log(mass)
    outs = []
    for t in range(n):
        kt = k[:, :, t]
        err = torch.einsum("bhvk,bhk->bhv", log_w.exp(), kt) - v[:, :, t]
        kept = log_w if alpha is None else alpha[:, :, t, None, None] * log_w
        new = F.log_softmax(kept - eta[:, :, t, None, None] * err[..., :, None] * kt[..., None, :], dim=-1) + log_mass
        if attention_mask is None:
            log_w, seen = new, torch.ones_like(seen)
        else:
            real = attention_mask[:, t]
            log_w, seen = torch.where(real[:, None, None, None], new, log_w), seen | real
        read = torch.einsum("bhvk,bhk->bhv", log_w.exp(), q[:, :, t])
        outs.append(torch.where(seen[:, None, None], read, torch.zeros_like(read)))
    return torch.stack(outs, dim=2), ScanState((log_w,), seen)


def memora_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    eta: Tensor,
    alpha: Tensor | None = None,
    mass: float = 1.0,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Memora's read y_t = W_t q_t (causal) over mapped q, k, v (batch, heads, n, head_dim), given the gates
    η (batch, heads, n), > 0, and α (batch, heads, n) in (0, 1] or None (α = 1); `mass` is c."""
    check_scan_inputs(q, k, v, eta, alpha, attention_mask)
    return memora_scan(q, k, v, eta=eta, alpha=alpha, mass=check_mass(mass), attention_mask=attention_mask)[0]


def memora_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    eta: Tensor,
    alpha: Tensor | None = None,
    mass: float = 1.0,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, final W (batch, heads, d_v, d_k)) of `memora_attention` in float64, per element, head and token:
    ∇ℓ by autograd of ½‖W k − v‖², then W ← c·exp(z)/Σ exp(z) per row, z = α log W − η ∇ℓ."""
    check_scan_inputs(q, k, v, eta, alpha, attention_mask)
    mass = check_mass(mass)
    grad_wanted = torch.is_grad_enabled()  # the loss's gradient needs autograd even under no_grad
    with torch.enable_grad():
        out, memory = _memora_reference_scan(q, k, v, eta, alpha, mass, attention_mask)
    return (out, memory) if grad_wanted else (out.detach(), memory.detach())


def _memora_reference_scan(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None, mass: float, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    b, h, n, d_k = k.shape
    d_v = v.shape[-1]
    q64, k64, v64, eta64 = q.double(), k.double(), v.double(), eta.double()
    alpha64 = None if alpha is None else alpha.double()
    outs, memories = [], []
    for bi in range(b):
        for hi in range(h):
            w = torch.full((d_v, d_k), mass / d_k, dtype=torch.float64, device=q.device)
            seen = False
            reads = []
            for t in range(n):
                if attention_mask is None or bool(attention_mask[bi, t]):
                    probe = torch.zeros_like(w, requires_grad=True)  # ∇ at W: d ℓ(W + P) / dP at P = 0
                    loss = 0.5 * (((w + probe) @ k64[bi, hi, t] - v64[bi, hi, t]) ** 2).sum()
                    (grad,) = torch.autograd.grad(loss, probe, create_graph=True)
                    a = 1.0 if alpha64 is None else alpha64[bi, hi, t]
                    z = a * torch.log(w) - eta64[bi, hi, t] * grad
                    e = torch.exp(z - z.max(dim=1, keepdim=True).values.detach())
                    w = mass * e / e.sum(dim=1, keepdim=True)
                    seen = True
                reads.append(w @ q64[bi, hi, t] if seen else q64.new_zeros(d_v))
            outs.append(torch.stack(reads))
            memories.append(w)
    out = torch.stack(outs).reshape(b, h, n, d_v)
    return out.to(q.dtype), torch.stack(memories).reshape(b, h, d_v, d_k).to(q.dtype)


class GatedScanMemory(Attention[ScanState]):
    """Base of the scanned Miras memories: causal only, gates η_t (and α_t) read from the per-head keys,
    q and k through `memory_features`; subclasses give the step size, the scan and its reference."""

    mask_form = "padding"
    mask_note = "a recurrent memory has no N × N matrix"
    same_length = True

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = True,
        retention: str = "scalar",
        gate_temperature: float = 16.0,
    ) -> None:
        if causal is not True:
            raise ParameterError(f"causal: {type(self).__name__} is a left-to-right scan; expected True, got {causal!r}")
        check_choice("retention", retention, RETENTIONS)
        if isinstance(gate_temperature, bool) or not isinstance(gate_temperature, (int, float)) or not gate_temperature > 0:
            raise ParameterError(f"gate_temperature: expected a float > 0, got {gate_temperature!r}")
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=True)
        self.retention, self.gate_temperature = retention, float(gate_temperature)
        d = self.head_dim
        self.step_weight = nn.Parameter(torch.randn(heads, d) / math.sqrt(d))
        self.step_bias = nn.Parameter(torch.zeros(heads))
        if retention == "scalar":
            self.decay_weight = nn.Parameter(torch.randn(heads, d) / math.sqrt(d))
            self.decay_bias = nn.Parameter(torch.zeros(heads))

    @abstractmethod
    def step_size(self, logits: Tensor) -> Tensor:
        """η_t from its logits (batch, heads, n)."""

    @abstractmethod
    def scan(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None, mask: Tensor | None,
             state: ScanState | None) -> tuple[Tensor, ScanState]:
        """The fast recurrence on mapped q, k: (out, state)."""

    @abstractmethod
    def scan_reference(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None,
                       mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The float64 reference on mapped q, k: (out, final memory)."""

    def gates(self, k: Tensor) -> tuple[Tensor, Tensor | None]:
        """(η, α or None), each (batch, heads, n), from the per-head keys k (batch, heads, n, head_dim)."""
        eta = self.step_size((k * self.step_weight[:, None, :]).sum(-1) + self.step_bias[:, None])
        if self.retention == "none":
            return eta, None
        logits = (k * self.decay_weight[:, None, :]).sum(-1) + self.decay_bias[:, None]
        return eta, torch.exp(F.logsigmoid(logits) / self.gate_temperature)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        eta, alpha = self.gates(k)
        fq, fk = memory_features(q, k)
        return self.scan(fq, fk, v, eta, alpha, mask, None)[0]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        eta, alpha = self.gates(k)
        fq, fk = memory_features(q, k)
        return self.scan_reference(fq, fk, v, eta, alpha, mask)

    def materialize(self, x: Tensor, **kwargs: Any) -> Tensor:
        raise ParameterError(
            f"materialize: {self.spec.name} updates its memory by a step that is not linear in the values, so there "
            "is no attention matrix; expected a mechanism with one (e.g. 'delta')"
        )

    def decode(self, x_t: Tensor, state: ScanState | None) -> tuple[Tensor, ScanState]:
        """One checked token x_t (batch, 1, dim): the scan continued from `state` (None at the start)."""
        if state is not None:
            if not isinstance(state, ScanState):
                raise TypeError(f"state: expected a ScanState from this module's step, got {type(state).__name__}")
            if state.seen.shape[0] != x_t.shape[0]:
                raise ShapeError(f"state: expected batch {x_t.shape[0]} (as x_t), got {state.seen.shape[0]}")
        q, k, v = self.project(x_t)
        eta, alpha = self.gates(k)
        fq, fk = memory_features(q, k)
        out, state = self.scan(fq, fk, v, eta, alpha, None, state)
        return self.out_proj(self.merge_heads(out)), state


RETENTION_PARAM = Param("retention", str, "scalar", "retention α_t: 'scalar' σ(w·k_t + b)^(1/τ) per head and token, "
                   "'none' α = 1", choices=RETENTIONS)
TEMPERATURE_PARAM = Param("gate_temperature", float, 16.0, "τ of α_t = σ(·)^(1/τ)", low=1e-3)


@register(
    name="memora",
    paper=MIRAS,
    family="A",
    cost="O(Nd²)",
    exponent=1.0,
    supports=Supports(causal=True, causal_only=True, key_padding=True, decode=True, materialize=False),
    params=(RETENTION_PARAM, TEMPERATURE_PARAM, Param("mass", float, 1.0, "c, the mass of every row of W", low=1e-6)),
    summary="Memora (matrix memory): W_t = c·Softmax(α_t log W_{t−1} − η_t (W_{t−1}k_t − v_t)k_tᵀ) per row, "
    "y_t = W_t q_t; KL retention keeps W on the simplex.",
    normalized=False,
)
class MemoraAttention(GatedScanMemory):
    """Memora's KL-retention memory with the ℓ2 bias, a matrix W whose rows stay on c times the simplex."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = True,
        retention: str = "scalar",
        gate_temperature: float = 16.0,
        mass: float = 1.0,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, retention=retention,
                         gate_temperature=gate_temperature)
        self.mass = check_mass(mass)

    def step_size(self, logits: Tensor) -> Tensor:
        return F.softplus(logits)

    def scan(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None, mask: Tensor | None,
             state: ScanState | None) -> tuple[Tensor, ScanState]:
        if state is not None and state.memory[0].shape[1:] != (self.heads, v.shape[-1], k.shape[-1]):
            raise ShapeError(f"state: expected log W of shape (batch, {self.heads}, {v.shape[-1]}, {k.shape[-1]}), "
                             f"got {tuple(state.memory[0].shape)}")
        return memora_scan(q, k, v, eta=eta, alpha=alpha, mass=self.mass, attention_mask=mask, state=state)

    def scan_reference(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None,
                       mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return memora_attention_reference(q, k, v, eta=eta, alpha=alpha, mass=self.mass, attention_mask=mask)

    def extra_repr(self) -> str:
        return f"retention={self.retention!r}, gate_temperature={self.gate_temperature}, mass={self.mass}"
