"""Selective state-space mixer (Mamba's S6 block) read as an implicit causal attention.

The block (Gu & Dao, 2023, arXiv:2312.00752), per channel c of d_inner = expand·dim
(or heads·head_dim), state size N_s:

    x, z    = in_proj(u)                               two halves, (batch, n, d_inner) each
    x̃       = SiLU(conv(x))                            causal depthwise conv1d, kernel d_conv
    Δ       = softplus(dt_proj(W_Δ x̃))                (batch, n, d_inner), through rank dt_rank
    B, C    = W_B x̃, W_C x̃                             (batch, n, N_s), shared by the channels
    A       = −exp(A_log)                              (d_inner, N_s), diagonal per channel
    Ā_t     = exp(Δ_t A),   B̄_t = Δ_t B_t              zero-order hold for A, Euler step for B (as Mamba)
    h_t     = Ā_t ⊙ h_{t−1} + B̄_t x̃_t,   y_t = C_t · h_t + D x̃_t
    out     = out_proj(y ⊙ SiLU(z))

Hidden attention (P065, Ali, Zimerman & Wolf, "The Hidden Attention of Mamba Models"):
unrolling the recurrence, for every channel c

    y_i^c = Σ_{j≤i} α_ij^c x̃_j^c + D^c x̃_i^c,
    α_ij^c = Σ_s C_i[s] exp(A^c_s Σ_{k=j+1..i} Δ_k^c) Δ_j^c B_j[s]  = C_i (Π_{k=j+1..i} Ā_k^c) B̄_j^c,

a causal (lower triangular), data-controlled matrix per channel. `materialize` returns, for
head h (a group of head_dim consecutive channels), the mean of α^c over the head's channels:
the matrix that maps a signal equal on every channel of the head (x̃_j^c = s_j) to the mean
of the head's SSM outputs without the skip, (1/head_dim) Σ_c (y_i^c − D^c x̃_i^c) = Σ_j A_ij s_j.
It leaves out the D skip, the conv, the gate and the projections; `materialize_channels`
gives every α^c. P031 (Zimerman, Ali & Wolf, "Explaining Modern Gated-Linear RNNs via a
Unified Implicit Attention Formulation") multiplies the gate, the SiLU and the conv in:
α̃^c = diag(SiLU(z^c)) α^c diag(σ(conv(x)^c)) M_conv^c, registered as the analysis method
"unified-implicit-attention" (`unified_attention`).

Key padding: a padded position is skipped — its x is zeroed before the conv and its Δ set to
0, so Ā = 1 and B̄ = 0 there: it neither writes to the state nor decays it, and α_ij = 0
for every padded j. A left-padded sequence gives, at its real tokens, the outputs of the
unpadded one.

Fast path (`selective_scan`): a chunked scan. With chunk size T (default ⌈√n⌉): every
chunk is scanned from a zero state, all chunks at once (T steps on (batch, n/T, d, N_s)
tensors); the states entering the chunks are carried across (n/T steps on (batch, d, N_s));
every chunk is scanned again from its entering state to give y. O(n·d·N_s) work in about
2√n Python steps (5√n with the backward) instead of n, only exponentials of non-positive
numbers, and no (n, d, N_s) tensor: the backward (written out, see `_ChunkedScan`) keeps
the states every ⌈√T⌉ steps and recomputes the rest, as Mamba's kernel recomputes its
states. The reference is the plain loop over tokens in float64.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ...core.errors import ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.memory import check_memory
from ...core.registry import Paper, Param, Spec, Supports, register
from ...core.validate import check_finite, check_int, check_module_dtype, check_rank, check_tensor, check_tokens
from ...kernels.sizes import fit_block

HIDDEN_ATTENTION = Paper("P065", "The Hidden Attention of Mamba Models", 2024, "2403.01590")


class SSMInputs(NamedTuple):
    """What the block feeds the scan, each (batch, n, ·): the conv output before and after SiLU
    (d_inner), the gate z (d_inner), Δ (d_inner), B and C (N_s)."""

    conv: Tensor
    x: Tensor
    z: Tensor
    delta: Tensor
    B: Tensor
    C: Tensor


class SSMState(NamedTuple):
    """Decoding state: the last d_conv − 1 inputs of the conv (batch, d_inner, d_conv − 1) and h (batch, d_inner, N_s)."""

    conv: Tensor
    ssm: Tensor


def _check_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> None:
    for name, t, rank, layout in (
        ("u", u, 3, "(batch, n, d_inner)"),
        ("delta", delta, 3, "(batch, n, d_inner)"),
        ("A", A, 2, "(d_inner, d_state)"),
        ("B", B, 3, "(batch, n, d_state)"),
        ("C", C, 3, "(batch, n, d_state)"),
        ("D", D, 1, "(d_inner,)"),
    ):
        check_tensor(name, t)
        check_rank(name, t, rank, layout)
        if t.dtype != u.dtype:
            raise TypeError(f"{name}: expected dtype {u.dtype} (as u), got {t.dtype}")
    b, n, d = u.shape
    s = A.shape[1]
    for name, t, want in (
        ("delta", delta, (b, n, d)),
        ("A", A, (d, s)),
        ("B", B, (b, n, s)),
        ("C", C, (b, n, s)),
        ("D", D, (d,)),
    ):
        if tuple(t.shape) != want:
            raise ShapeError(f"{name}: expected shape {want} (from u {tuple(u.shape)} and A {tuple(A.shape)}), got {tuple(t.shape)}")


def _chunk_size(chunk_size: int | None, n: int) -> int:
    if chunk_size is None:
        return max(1, math.isqrt(max(n - 1, 0)) + 1)
    return fit_block(check_int("chunk_size", chunk_size), n)


def _chunked(x: Tensor, t: int) -> Tensor:
    """(b, n, ·) -> (b, m, t, ·), zero-padding n up to m·t."""
    b, n, f = x.shape
    m = -(-n // t)
    return F.pad(x, (0, 0, 0, m * t - n)).view(b, m, t, f)


class _ChunkedScan(torch.autograd.Function):
    """The selective scan in chunks of t positions, with O(n·d·N_s / √t) saved for the backward.

    Forward: (1) every chunk from a zero state, all chunks at once, t steps on (b, m, d, s);
    (2) the states entering the chunks, m steps on (b, d, s); (3) every chunk again from its
    entering state, giving y and keeping the state every r = ⌈√t⌉ steps. Backward: the adjoint
    g_i = ∂L/∂h_i = gy_i C_i + Ā_{i+1} g_{i+1} runs the same way from the right; then, one
    stretch of r positions at a time (last first), the states are recomputed from the kept ones
    and the gradients read off: ∂L/∂log Ā_i = g_i ⊙ Ā_i ⊙ h_{i−1}, ∂L/∂(B̄ x̃)_i = g_i.
    """

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, t: int,  # type: ignore[override]
                h0: Tensor) -> Tensor:
        b, n, d = u.shape
        dc, xc, bc, cc = _chunked(delta, t), _chunked(delta * u, t), _chunked(B, t), _chunked(C, t)
        m, r = dc.shape[1], math.isqrt(t - 1) + 1

        def step(h: Tensor, i: int) -> Tensor:
            return torch.exp(dc[:, :, i, :, None] * A) * h + xc[:, :, i, :, None] * bc[:, :, i, None, :]

        h = u.new_zeros(b, m, d, A.shape[1])
        for i in range(t):
            h = step(h, i)
        across = torch.exp(dc.sum(2)[..., None] * A)  # Ā over a whole chunk
        entering = [h0]  # the state entering the first chunk (zero but for a sequence-parallel rank)
        for c in range(m - 1):
            entering.append(across[:, c] * entering[-1] + h[:, c])
        h = torch.stack(entering, dim=1)
        ys, kept = [], []
        for i in range(t):
            if i % r == 0:
                kept.append(h)
            h = step(h, i)
            ys.append(torch.einsum("bmds,bms->bmd", h, cc[:, :, i]))
        ctx.save_for_backward(u, delta, A, B, C, D, torch.stack(kept, dim=2))
        ctx.t, ctx.r = t, r
        return torch.stack(ys, dim=2).reshape(b, m * t, d)[:, :n] + u * D

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        u, delta, A, B, C, D, kept = ctx.saved_tensors
        t, r = ctx.t, ctx.r
        b, n, d = u.shape
        dc, xc, bc, cc, gc = (_chunked(x, t) for x in (delta, delta * u, B, C, gy))
        m = dc.shape[1]

        def decay(i: int) -> Tensor:
            return torch.exp(dc[:, :, i, :, None] * A)

        def adjoint_in(i: int) -> Tensor:  # ∂L/∂h_i from y_i directly
            return gc[:, :, i, :, None] * cc[:, :, i, None, :]

        carry = u.new_zeros(b, m, d, A.shape[1])  # Ā_{i+1} g_{i+1}, what flows into position i from the right
        for i in reversed(range(t)):
            carry = decay(i) * (adjoint_in(i) + carry)
        across = torch.exp(dc.sum(2)[..., None] * A)
        from_right = [torch.zeros_like(carry[:, 0])]  # the carry entering each chunk at its end
        for c in range(m - 1, 0, -1):
            from_right.append(carry[:, c] + across[:, c] * from_right[-1])
        carry = torch.stack(from_right[::-1], dim=1)
        g_log, g_x, g_b, g_c = torch.zeros_like(xc), torch.zeros_like(xc), torch.zeros_like(bc), torch.zeros_like(cc)
        g_a = torch.zeros_like(A)
        for j in reversed(range(kept.shape[2])):
            lo, hi = j * r, min(t, (j + 1) * r)
            states = [kept[:, :, j]]  # states[k] = h before position lo + k
            for i in range(lo, hi):
                states.append(decay(i) * states[-1] + xc[:, :, i, :, None] * bc[:, :, i, None, :])
            for i in reversed(range(lo, hi)):
                a = decay(i)
                g = adjoint_in(i) + carry
                g_c[:, :, i] = torch.einsum("bmd,bmds->bms", gc[:, :, i], states[i - lo + 1])
                g_la = g * a * states[i - lo]  # ∂L/∂(Δ_i A)
                g_log[:, :, i] = (g_la * A).sum(-1)
                g_a += torch.einsum("bmds,bmd->ds", g_la, dc[:, :, i])
                g_x[:, :, i] = torch.einsum("bmds,bms->bmd", g, bc[:, :, i])
                g_b[:, :, i] = torch.einsum("bmds,bmd->bms", g, xc[:, :, i])
                carry = a * g

        def unchunk(x: Tensor) -> Tensor:
            return x.reshape(b, m * t, -1)[:, :n]

        g_x = unchunk(g_x)
        g_u = g_x * delta + gy * D
        g_delta = unchunk(g_log) + g_x * u
        return g_u, g_delta, g_a, unchunk(g_b), unchunk(g_c), (gy * u).sum((0, 1)), None, carry[:, 0]


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, *, chunk_size: int | None = None,
    initial_state: Tensor | None = None,
) -> Tensor:
    """y_t = C_t · h_t + D ⊙ u_t with h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_t, h_0 = 0, by a chunked scan.

    initial_state: h_0 (batch, d_inner, d_state) instead of zero (a sequence-parallel rank's entering state).

    u, delta (batch, n, d_inner); A (d_inner, d_state) (≤ 0); B, C (batch, n, d_state);
    D (d_inner,). Returns y (batch, n, d_inner). chunk_size None = ⌈√n⌉. Padded steps of the
    last chunk have Δ = 0: they neither write nor decay.
    """
    _check_scan(u, delta, A, B, C, D)
    if u.shape[1] == 0:
        return u * D
    want = (u.shape[0], u.shape[2], A.shape[1])
    if initial_state is None:
        initial_state = u.new_zeros(want)
    elif tuple(initial_state.shape) != want:
        raise ShapeError(f"initial_state: expected (batch, d_inner, d_state) = {want}, got {tuple(initial_state.shape)}")
    return _ChunkedScan.apply(u, delta, A, B, C, D, _chunk_size(chunk_size, u.shape[1]), initial_state.to(u.dtype))


def _sequential_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """The recurrence one token at a time, in float64; cast back to u's dtype."""
    u64, d64, a64, b64, c64 = u.double(), delta.double(), A.double(), B.double(), C.double()
    h = u64.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for i in range(u.shape[1]):
        h = torch.exp(d64[:, i, :, None] * a64) * h + (d64[:, i] * u64[:, i])[..., None] * b64[:, i, None, :]
        ys.append((h * c64[:, i, None, :]).sum(-1))
    return (torch.stack(ys, dim=1) + u64 * D.double()).to(u.dtype)


def hidden_attention(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, heads: int | None = None) -> Tensor:
    """α_ij^c = Σ_s C_i[s] exp(A^c_s Σ_{k=j+1..i} Δ_k^c) Δ_j^c B_j[s] for j ≤ i, 0 above; in float64.

    delta (batch, n, d_inner), A (d_inner, d_state), B, C (batch, n, d_state). Returns
    (batch, d_inner, n, n), or with `heads` the mean over each group of d_inner / heads
    consecutive channels, (batch, heads, n, n). Built one query row at a time (memory n·d·N_s per row).
    """
    d64, a64, b64, c64 = delta.double(), A.double(), B.double(), C.double()
    batch, n, d = delta.shape
    total = torch.cumsum(d64[..., None] * a64, dim=1)  # Σ_{k≤i} Δ_k A, (b, n, d, s)
    write = d64[..., None] * b64[:, :, None, :]  # B̄_j, (b, n, d, s)
    rows = []
    for i in range(n):
        decay = torch.exp(total[:, i : i + 1] - total[:, : i + 1])  # Π_{k=j+1..i} Ā_k for j ≤ i
        row = torch.einsum("bs,bjds->bdj", c64[:, i], decay * write[:, : i + 1])
        row = F.pad(row, (0, n - i - 1))
        rows.append(row if heads is None else row.view(batch, heads, d // heads, n).mean(2))
    return torch.stack(rows, dim=2)


def selective_scan_reference(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor
) -> tuple[Tensor, Tensor]:
    """(y, α): y by the plain loop over tokens in float64, α (batch, d_inner, n, n) the hidden
    attention of each channel (y = α u + D u per channel); both cast back to u's dtype."""
    _check_scan(u, delta, A, B, C, D)
    return _sequential_scan(u, delta, A, B, C, D), hidden_attention(delta, A, B, C).to(u.dtype)


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


@register(
    functional=("selective_scan", "selective_scan_reference", "hidden_attention"),
    name="mamba",
    paper=HIDDEN_ATTENTION,
    family="B",
    cost="O(N d N_s)",
    exponent=1.0,
    supports=Supports(causal=True, causal_only=True, key_padding=True, decode=True, materialize=True,
                      sharding=("state",)),
    params=(
        Param("d_state", int, 16, "state size N_s per channel", low=1),
        Param("d_conv", int, 4, "kernel of the causal depthwise conv", low=1),
        Param("expand", int, 2, "d_inner = expand · dim (unless head_dim is given: d_inner = heads · head_dim)", low=1),
        Param("dt_rank", int, None, "rank of the Δ projection (default ⌈dim / 16⌉)", low=1, optional=True),
        Param("dt_min", float, 1e-3, "smallest initial Δ", low=0.0),
        Param("dt_max", float, 1e-1, "largest initial Δ", low=0.0),
        Param("chunk_size", int, None, "chunk of the fast scan (default ⌈√n⌉)", low=1, optional=True, knob=True),
    ),
    summary="Selective state-space mixer (Mamba S6: conv, selective scan, gate) with its hidden attention matrices.",
    normalized=False,
    test_params={"d_state": 4, "d_conv": 3, "chunk_size": 4},
)
class SelectiveSSM(nn.Module):
    """Mamba's selective SSM block (S6), causal by construction; `materialize` gives its hidden attention.

    The common parameters read: `heads` groups the d_inner channels for `materialize` (the
    mean of the per-channel matrices within a group); `head_dim` sets d_inner = heads · head_dim
    (default expand · dim); `qkv_bias` is the bias of the input projection, False by default as in
    Mamba (whose in_proj has none; True adds one); `causal` must be True.
    """

    spec: ClassVar[Spec]

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        causal: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if causal is not True:
            raise ParameterError(
                f"causal: the selective SSM is causal by construction (a left-to-right scan); expected True, got {causal!r}"
            )
        if head_dim is None:
            if (expand * dim) % heads:
                raise ParameterError(
                    f"heads: d_inner = expand·dim = {expand * dim} is not divisible by heads={heads}; set head_dim"
                )
            head_dim = expand * dim // heads
        if not 0 < dt_min <= dt_max:
            raise ParameterError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min!r} and {dt_max!r}")
        _chunk_size(chunk_size, 1)
        inner = heads * head_dim
        dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, True
        self.inner, self.d_state, self.d_conv, self.dt_rank, self.chunk_size = inner, d_state, d_conv, dt_rank, chunk_size
        self.in_proj = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.conv = nn.Conv1d(inner, inner, d_conv, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        with torch.no_grad():  # Mamba's Δ initialisation: Δ log-uniform in [dt_min, dt_max] at the start
            bound = dt_rank**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(_inverse_softplus(dt.clamp(min=1e-4)))

    # -- the block's pieces -----------------------------------------------------------------
    @property
    def A(self) -> Tensor:
        """A = −exp(A_log), (d_inner, d_state)."""
        return -torch.exp(self.A_log)

    def _check(
        self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None, attn_mask: Tensor | None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor | None:
        """Check a call's arguments; the keep-mask (batch, n) of its padding arguments."""
        check_tokens("x", x, self.dim)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            raise ValueError(f"context: {self.spec.name} does not support cross-attention (it mixes its own sequence)")
        if attn_mask is not None:
            raise ValueError(f"attn_mask: {self.spec.name} does not support an arbitrary attention mask (it is a scan)")
        return module_keep_mask(attention_mask, key_padding_mask, x.shape[0], x.shape[1])

    def ssm_inputs(self, x: Tensor, attention_mask: Tensor | None = None) -> SSMInputs:
        """The conv output (before and after SiLU), gate, Δ, B and C the block computes from x (batch, n, dim)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        if attention_mask is not None:
            xs = xs.masked_fill(~attention_mask[..., None], 0.0)
        conv = F.conv1d(F.pad(xs.transpose(1, 2), (self.d_conv - 1, 0)), self.conv.weight, self.conv.bias, groups=self.inner)
        conv = conv.transpose(1, 2)
        xt = F.silu(conv)
        dt, B, C = self.x_proj(xt).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        if attention_mask is not None:
            delta = delta.masked_fill(~attention_mask[..., None], 0.0)
        return SSMInputs(conv, xt, z, delta, B, C)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Literal["fast", "reference"] = "fast",
    ) -> Tensor:
        """x (batch, n, dim) -> (batch, n, dim); impl "fast" (chunked scan) or "reference" (float64 loop)."""
        keep = self._check(x, context, attention_mask, attn_mask, key_padding_mask)
        p = self.ssm_inputs(x, keep)
        if impl == "fast":
            y = selective_scan(p.x, p.delta, self.A, p.B, p.C, self.D, chunk_size=self.chunk_size)
        elif impl == "reference":
            y = _sequential_scan(p.x, p.delta, self.A, p.B, p.C, self.D)
        else:
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        return self.out_proj(y * F.silu(p.z))

    # -- implicit attention -------------------------------------------------------------------
    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The hidden attention (batch, heads, n, n): α^c averaged over the channels of each head (module docstring)."""
        keep = self._check(x, context, attention_mask, attn_mask, key_padding_mask)
        check_memory("materialize", (x.shape[0], self.heads, x.shape[1], x.shape[1]), 8)
        p = self.ssm_inputs(x, keep)
        return hidden_attention(p.delta, self.A, p.B, p.C, heads=self.heads).to(x.dtype)

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """out_proj((weights_h x̃^c) ⊙ SiLU(z^c)): each head's matrix (batch, heads, n, n) applied to every
        channel c of the head, gated — the output as if α^c = weights_h for all c, less the D skip."""
        keep = self._check(x, context, attention_mask, None)
        with torch.no_grad():
            p = self.ssm_inputs(x, keep)
        b, n, _ = p.x.shape
        xt = p.x.to(weights.dtype).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        y = (weights @ xt).transpose(1, 2).reshape(b, weights.shape[2], self.inner)
        return self.out_proj(y * F.silu(p.z.to(weights.dtype)))

    def materialize_channels(self, x: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """α^c for every channel, (batch, d_inner, n, n): y^c = α^c x̃^c + D^c x̃^c before the gate."""
        keep = self._check(x, None, attention_mask, None)
        p = self.ssm_inputs(x, keep)
        return hidden_attention(p.delta, self.A, p.B, p.C).to(x.dtype)

    def conv_matrix(self, n: int) -> Tensor:
        """The causal conv as Toeplitz matrices M^c (d_inner, n, n): conv(x)^c = M^c x^c + bias^c."""
        w = self.conv.weight[:, 0]  # (d_inner, d_conv); conv(x)_i = Σ_m w[m] x_{i − (d_conv − 1) + m}
        lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # i − j
        inside = (lag >= 0) & (lag < self.d_conv)
        taps = w[:, (self.d_conv - 1 - lag).clamp(0, self.d_conv - 1)]  # (d_inner, n, n)
        return taps * inside

    def unified_attention(
        self, x: Tensor, *, attention_mask: Tensor | None = None, per_channel: bool = False
    ) -> Tensor:
        """P031's unified implicit attention α̃^c = diag(SiLU(z^c)) α^c diag(σ(conv^c)) M^c, in float64.

        With x^c the input projection's x half (padded positions zeroed), the gated SSM output is
        y^c ⊙ SiLU(z^c) = α̃^c x^c + SiLU(z^c) ⊙ (D^c x̃^c + α^c (σ(conv^c) · bias^c)): the matrix
        leaves out, as the paper does, the D skip and the conv bias. Returns (batch, heads, n, n),
        the mean over each head's channels, or (batch, d_inner, n, n) with per_channel=True.
        """
        keep = self._check(x, None, attention_mask, None)
        p = self.ssm_inputs(x, keep)
        alpha = hidden_attention(p.delta, self.A, p.B, p.C)  # (b, d, n, n)
        gate = F.silu(p.z.double()).transpose(1, 2)[..., None]  # (b, d, n, 1)
        act = torch.sigmoid(p.conv.double()).transpose(1, 2)[:, :, None, :]  # (b, d, 1, n)
        conv = self.conv_matrix(x.shape[1]).to(device=x.device, dtype=torch.float64)
        if keep is not None:
            conv = conv * keep[:, None, None, :]
        unified = (gate * alpha * act) @ conv
        if not per_channel:
            unified = unified.view(x.shape[0], self.heads, self.head_dim, *unified.shape[-2:]).mean(2)
        return unified.to(x.dtype)

    # -- decoding -------------------------------------------------------------------------------
    def initial_state(self, batch: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> SSMState:
        """The empty state: zero conv inputs and h = 0."""
        return SSMState(
            torch.zeros(batch, self.inner, self.d_conv - 1, dtype=dtype, device=device),
            torch.zeros(batch, self.inner, self.d_state, dtype=dtype, device=device),
        )

    def step(self, x_t: Tensor, state: SSMState | None = None) -> tuple[Tensor, SSMState]:
        """Decode one token x_t (batch, 1, dim) with a constant-size state: (y_t (batch, 1, dim), state)."""
        check_tokens("x_t", x_t, self.dim)
        check_finite("x_t", x_t)
        check_module_dtype("x_t", x_t, self)
        if x_t.shape[1] != 1:
            raise ShapeError(f"x_t: expected one position (batch, 1, dim), got shape {tuple(x_t.shape)}")
        b = x_t.shape[0]
        if state is None:
            state = self.initial_state(b, dtype=x_t.dtype, device=x_t.device)
        want = SSMState((b, self.inner, self.d_conv - 1), (b, self.inner, self.d_state))
        for name, got, shape in zip(("conv", "ssm"), state, want):
            if tuple(got.shape) != shape:
                raise ShapeError(f"state: expected {name} of shape {shape}, got {tuple(got.shape)}")
        xs, z = self.in_proj(x_t[:, 0]).chunk(2, dim=-1)  # (b, d_inner)
        window = torch.cat([state.conv, xs[..., None]], dim=-1)  # (b, d_inner, d_conv)
        xt = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)
        dt, B, C = self.x_proj(xt).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        h = torch.exp(delta[..., None] * self.A) * state.ssm + (delta * xt)[..., None] * B[:, None, :]
        y = (h * C[:, None, :]).sum(-1) + self.D * xt
        return self.out_proj(y * F.silu(z))[:, None], SSMState(window[..., 1:], h)
