"""Slot attention (Locatello et al., "Object-Centric Learning with Slot Attention", 2020): K slots compete for
the N inputs — a softmax over the SLOTS — and each slot takes the weighted mean of the inputs it won.

Inputs X ∈ R^{N×D} (LayerNorm'd), slots S⁰ ∈ R^{K×D}; k = W_k LN(X), v = W_v LN(X); T = `iters` times:

    A = softmax_slots(k(X) q(LN S)ᵀ / √D) ∈ R^{N×K}      normalised over the slot axis (competition)
    W = (A + ε) / Σ_inputs (A + ε)                          per slot: weights over the inputs summing to 1
    U = Wᵀ v(X) ∈ R^{K×D}                                   weighted mean
    S = GRU(input U, hidden S_prev);  S = S + MLP(LN S)
    out = S (batch, K, D)

Initial slots. S⁰ = μ + σ ⊙ ε, ε ~ N(0, I) per slot, with learned μ, log σ ∈ R^D (shared by the slots). The draw is
explicit: `forward(x, slots=S⁰)` takes given initial slots ((K', D) or (batch, K', D): any number of slots), else
`forward(x, generator=g)` draws ε from `g`; in training mode without either ε comes from torch's global RNG; in
eval mode without either the slots start at the mean μ (deterministic, what the conformance suite runs; note that
then every slot starts equal, and equal slots stay equal — give slots or a generator for distinct slots).

`materialize` returns W of the last iteration, (batch, 1, K, N): per slot the weights of the weighted mean over
the inputs, what the output uses; its rows sum to 1 over the (real) inputs — a row is NOT a softmax over the inputs:
the softmax ran over the slots. The competition weights A themselves are `competition(x, ...)` (batch, N, K).

Defaults and deviations: one head (the paper's); ε = 1e-8; W_q, W_k, W_v without bias (`qkv_bias=False`, the
official Google code; slot-attention 1.5.2 has biases); MLP hidden `hidden` (128 in the paper) widened to
max(dim, hidden) as slot-attention does (`mlp_hidden_at_least_dim`); μ ~ N(0, 1), log σ = 0 at initialisation.
Padding: a padded input takes part in neither A nor W (it is no input; ε is added only to real inputs, so
padding == removal exactly); a sample with no real input has W = 0 and U = 0, its slots evolve from S⁰ alone.
The function is equivariant in the slots (permuting S⁰ permutes the output) and invariant in the inputs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.memory import check_memory
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_finite, check_tensor
from ..pooling.base import AttentionPooling, Impl
from ..pooling.common import layer_norm64, linear64
from ._common import check_positive_int

SLOT_ATTENTION = Paper("P125", "Object-Centric Learning with Slot Attention", 2020, "2006.15055")


def _sigmoid64(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def _check_slot_qkv(q: object, k: object, v: object, attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """q (batch, K, d), k (batch, N, d), v (batch, N, d_v), one floating dtype; attention_mask (batch, N)."""
    q, k, v = check_tensor("q", q), check_tensor("k", k), check_tensor("v", v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ShapeError(f"{name}: expected a tensor (batch, tokens, width) of rank 3, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q, k, v: expected (batch, K, d), (batch, N, d), (batch, N, d_v), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_attention_mask(attention_mask, k.shape[0], k.shape[1])
    return q, k, v


def slot_attention(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """One slot-attention read: A = softmax over the K slots of k qᵀ/√d (batch, N, K), W = (A + ε) normalised over
    the real inputs, U = Wᵀ v (batch, K, d_v). q (batch, K, d) slot queries, k, v (batch, N, ·) the inputs'."""
    q, k, v = _check_slot_qkv(q, k, v, attention_mask)
    a = torch.softmax(k @ q.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) + eps
    if attention_mask is not None:
        a = a * attention_mask.bool()[:, :, None].to(a.dtype)
    total = a.sum(1, keepdim=True)
    return (a / torch.where(total > 0, total, torch.ones_like(total))).transpose(1, 2) @ v


def slot_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """(U (batch, K, d_v), W (batch, K, N)) of `slot_attention` in float64, slot by slot and input by input."""
    q, k, v = _check_slot_qkv(q, k, v, attention_mask)
    b, n, kk = k.shape[0], k.shape[1], q.shape[1]
    w = torch.zeros(b, kk, n, dtype=torch.float64, device=q.device)
    for bi in range(b):
        real = [j for j in range(n) if attention_mask is None or bool(attention_mask[bi, j])]
        for j in real:
            logits = torch.stack([(k[bi, j].double() * q[bi, s].double()).sum() / math.sqrt(q.shape[-1]) for s in range(kk)])
            e = torch.exp(logits - logits.max())
            w[bi, :, j] = e / e.sum() + eps
        for s in range(kk):
            total = w[bi, s].sum()
            if total > 0:
                w[bi, s] = w[bi, s] / total
    return (w @ v.double()).to(v.dtype), w.to(v.dtype)


def gru64(u: Tensor, h: Tensor, cell: nn.GRUCell) -> Tensor:
    """GRU cell in float64: r = σ(W_ir u + b_ir + W_hr h + b_hr), z = σ(W_iz u + … ), n = tanh(W_in u + b_in +
    r ⊙ (W_hn h + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h (PyTorch's gate order r, z, n)."""
    wi, wh = cell.weight_ih.double(), cell.weight_hh.double()
    bi = cell.bias_ih.double() if cell.bias_ih is not None else torch.zeros(wi.shape[0], dtype=torch.float64, device=u.device)
    bh = cell.bias_hh.double() if cell.bias_hh is not None else torch.zeros(wh.shape[0], dtype=torch.float64, device=u.device)
    d = h.shape[-1]
    gi = [u.double() @ wi[j * d : (j + 1) * d].T + bi[j * d : (j + 1) * d] for j in range(3)]
    gh = [h.double() @ wh[j * d : (j + 1) * d].T + bh[j * d : (j + 1) * d] for j in range(3)]
    r, z = _sigmoid64(gi[0] + gh[0]), _sigmoid64(gi[1] + gh[1])
    n = torch.tanh(gi[2] + r * gh[2])
    return (1.0 - z) * n + z * h.double()


def slot_attention_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Matmul FLOPs of one sample at the default parameters (K = 7 slots, T = 3, MLP hidden max(D, 128)), width
    D = heads·head_dim: W_k, W_v 4·N·D²; per iteration W_q 2·K·D², logits and weighted mean 4·K·N·D, GRU 12·K·D²,
    MLP 4·K·D·H."""
    d, k, iters = heads * head_dim, 7, 3
    hidden = max(d, 128)
    return 4.0 * n * d * d + iters * (2.0 * k * d * d + 4.0 * k * n * d + 12.0 * k * d * d + 4.0 * k * d * hidden)


@register(
    name="slot-attention",
    kind="pooling",
    paper=SLOT_ATTENTION,
    family="B",
    cost="O(T K N d + N d²)",
    exponent=1.0,
    supports=Supports(key_padding=True, order_invariant=True),
    params=(
        Param("num_slots", int, 7, "K, the number of slots (the output rows) drawn when no slots are given", low=1),
        Param("iters", int, 3, "T, the attention iterations", low=1),
        Param("hidden", int, 128, "MLP hidden width (widened to dim when smaller, as slot-attention does)", low=1),
        Param("eps", float, 1e-8, "ε added to the competition weights before the weighted mean", low=0.0),
        Param("qkv_bias", bool, False, "bias in W_q, W_k, W_v (the official code: none; slot-attention 1.5.2: yes)"),
    ),
    summary="slot attention: K slots compete (softmax over slots) for the inputs, weighted mean, GRU, iterated",
    test_params={"num_slots": 3, "hidden": 8},
    flops=slot_attention_flops,
)
class SlotAttention(AttentionPooling):
    """K slots from a learned Gaussian (or given) refined T times by competitive attention over the inputs."""

    def __init__(
        self, dim: int, *, num_slots: int = 7, iters: int = 3, hidden: int = 128, eps: float = 1e-8, qkv_bias: bool = False
    ) -> None:
        super().__init__(dim, 1)
        self.num_slots = check_positive_int("num_slots", num_slots)
        self.iters = check_positive_int("iters", iters)
        check_positive_int("hidden", hidden)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ParameterError(f"eps: expected a number in [0, 1), got {eps!r}")
        self.eps = float(eps)
        self.mu = nn.Parameter(torch.randn(dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))
        self.norm_input, self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.gru = nn.GRUCell(dim, dim)
        width = max(dim, hidden)
        self.mlp_in, self.mlp_out = nn.Linear(dim, width), nn.Linear(width, dim)

    @property
    def queries(self) -> int:
        return self.num_slots

    def initial_slots(self, batch: int, *, slots: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """S⁰ (batch, K, dim): the given slots, else μ + σ ε (ε from `generator`, or the global RNG in training
        mode), else (eval mode, no generator) μ."""
        dtype, device = self.mu.dtype, self.mu.device
        if slots is not None:
            if generator is not None:
                raise ValueError("slots, generator: expected at most one of them, got both")
            slots = check_tensor("slots", slots)
            if slots.dim() == 2:
                slots = slots.expand(batch, *slots.shape)
            if slots.dim() != 3 or slots.shape[0] != batch or slots.shape[-1] != self.dim or slots.shape[1] < 1:
                raise ShapeError(f"slots: expected (K, {self.dim}) or ({batch}, K, {self.dim}), got {tuple(slots.shape)}")
            if slots.dtype != dtype:
                raise TypeError(f"slots: expected dtype {dtype} (the module's), got {slots.dtype}")
            check_finite("slots", slots)
            return slots
        mean = self.mu.expand(batch, self.num_slots, self.dim)
        if generator is None and not self.training:
            return mean
        noise = torch.randn(batch, self.num_slots, self.dim, generator=generator, dtype=dtype, device=device)
        return mean + self.log_sigma.exp() * noise

    def _fast(self, x: Tensor, keep: Tensor | None, slots: Tensor) -> Tensor:
        """The slots after the iterations."""
        b, n, d = x.shape
        h = self.norm_input(x)
        k, v = self.k(h), self.v(h)
        s = slots
        for _ in range(self.iters):
            updates = slot_attention(self.q(self.norm_slots(s)), k, v, attention_mask=keep, eps=self.eps)
            s = self.gru(updates.reshape(-1, d), s.reshape(-1, d)).reshape(b, -1, d)
            s = s + self.mlp_out(torch.relu(self.mlp_in(self.norm_mlp(s))))
        return s

    def _reference(self, x: Tensor, keep: Tensor | None, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The same in float64, input by input: A_ik = exp(l_ik)/Σ_k' exp(l_ik'), W_ki = (A_ik + ε)/Σ_real (A_jk + ε)."""
        b, n, d = x.shape
        h = layer_norm64(x, self.norm_input)
        k, v = linear64(h, self.k), linear64(h, self.v)
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if keep is None else keep.bool()
        s = slots.double()
        for _ in range(self.iters):
            q = linear64(layer_norm64(s, self.norm_slots), self.q)
            logits = torch.einsum("bid,bkd->bik", k, q) / math.sqrt(d)
            top = logits.amax(-1, keepdim=True)
            e = torch.exp(logits - top)
            a = e / e.sum(-1, keepdim=True)  # over the slots
            shifted = torch.where(real[:, :, None], a + self.eps, torch.zeros_like(a))
            total = shifted.sum(1, keepdim=True)  # over the inputs
            w = torch.where(total > 0, shifted / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(a))
            updates = torch.einsum("bik,bid->bkd", w, v)
            s = gru64(updates, s, self.gru)
            mlp = linear64(torch.relu(linear64(layer_norm64(s, self.norm_mlp), self.mlp_in)), self.mlp_out)
            s = s + mlp
        a = torch.where(real[:, :, None], a, torch.zeros_like(a))
        return s.to(x.dtype), w.transpose(1, 2).to(x.dtype), a.to(x.dtype)

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self._fast(x, keep, self.initial_slots(x.shape[0]))

    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        s, w, _ = self._reference(x, keep, self.initial_slots(x.shape[0]))
        return s, w.unsqueeze(1)

    def _traced(
        self, x: Tensor, attention_mask: Tensor | None, key_padding_mask: Tensor | None, slots: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(slots, W, A) of the reference path."""
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        start = self.initial_slots(flat.shape[0], slots=slots, generator=generator)
        check_memory("impl='reference'", (flat.shape[0], start.shape[1], flat.shape[1]), 8 * 4)
        return self._reference(flat, keep, start)

    def forward(
        self, x: Tensor, *, slots: Tensor | None = None, generator: torch.Generator | None = None,
        attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, impl: Impl = "fast",
    ) -> Tensor:
        """Inputs (batch, *grid, dim) -> slots (batch, K, dim); initial `slots` or a `generator` for their draw."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        if impl == "reference":
            return self._traced(x, attention_mask, key_padding_mask, slots, generator)[0]
        flat, keep = self.prepare(x, attention_mask, key_padding_mask)
        return self._fast(flat, keep, self.initial_slots(flat.shape[0], slots=slots, generator=generator))

    def materialize(
        self, x: Tensor, *, slots: Tensor | None = None, generator: torch.Generator | None = None,
        attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """W of the last iteration (batch, 1, K, N): each slot's weighted-mean weights over the inputs (rows sum to 1)."""
        return self._traced(x, attention_mask, key_padding_mask, slots, generator)[1].unsqueeze(1)

    def competition(
        self, x: Tensor, *, slots: Tensor | None = None, generator: torch.Generator | None = None,
        attention_mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """A of the last iteration (batch, N, K): the softmax over the slots per input (0 at padded inputs)."""
        return self._traced(x, attention_mask, key_padding_mask, slots, generator)[2]
