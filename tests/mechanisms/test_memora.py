"""Memora (P157): the KL-retention memory kept on the simplex, W_t = c·Softmax(α log W_{t−1} − η ∇ℓ2)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.linear.memora import (
    MemoraAttention,
    memora_attention,
    memora_attention_reference,
    memora_scan,
    memory_features,
)

F64 = torch.float64


def _inputs(b: int = 2, h: int = 2, n: int = 7, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=F64) for _ in range(3))
    fq, fk = memory_features(q, k)
    eta = 3.0 * torch.rand(b, h, n, generator=gen, dtype=F64)
    alpha = 0.5 + 0.5 * torch.rand(b, h, n, generator=gen, dtype=F64)
    return fq, fk, v, eta, alpha


def test_one_step_by_hand() -> None:
    # d_k = d_v = 2, W_0 = c/2 everywhere; the step written with math on plain floats
    c, eta, alpha = 1.5, 0.8, 0.7
    k, v, q = [0.6, 0.8], [1.0, -2.0], [0.3, -0.4]
    w0 = c / 2
    err = [w0 * k[0] + w0 * k[1] - v[i] for i in range(2)]
    w1 = []
    for i in range(2):
        z = [alpha * math.log(w0) - eta * err[i] * k[j] for j in range(2)]
        e = [math.exp(x) for x in z]
        w1.append([c * x / sum(e) for x in e])
    want = [w1[i][0] * q[0] + w1[i][1] * q[1] for i in range(2)]
    t = lambda x: torch.tensor(x, dtype=F64).view(1, 1, 1, -1)  # noqa: E731
    gate = lambda x: torch.full((1, 1, 1), x, dtype=F64)  # noqa: E731
    out = memora_attention(t(q), t(k), t(v), eta=gate(eta), alpha=gate(alpha), mass=c)
    torch.testing.assert_close(out.view(2), torch.tensor(want, dtype=F64))
    ref = memora_attention_reference(t(q), t(k), t(v), eta=gate(eta), alpha=gate(alpha), mass=c)[1]
    torch.testing.assert_close(ref.view(2, 2), torch.tensor(w1, dtype=F64))


@pytest.mark.parametrize("mass", [1.0, 2.5])
def test_every_step_keeps_each_row_on_c_times_the_simplex(mass: float) -> None:
    q, k, v, eta, alpha = _inputs()
    state = None
    for t in range(k.shape[2]):  # large steps, one token at a time: every intermediate memory
        sl = slice(t, t + 1)
        _, state = memora_scan(q[:, :, sl], k[:, :, sl], 10 * v[:, :, sl], eta=10 * eta[:, :, sl],
                               alpha=alpha[:, :, sl], mass=mass, state=state)
        w = state.memory[0].exp()
        assert torch.isfinite(state.memory[0]).all() and (w >= 0).all()  # log W kept: no log of an underflowed 0
        torch.testing.assert_close(w.sum(-1), torch.full(w.shape[:-1], mass, dtype=F64))
    assert w.amax() > 0.9 * mass  # the large steps did concentrate rows (the check above is not at uniform)


def test_alpha_one_and_no_step_keeps_the_memory_and_alpha_zero_forgets_into_the_uniform_memory() -> None:
    q, k, v, eta, alpha = _inputs(n=5)
    _, state = memora_scan(q, k, v, eta=eta, alpha=alpha)
    written = state.memory[0].exp()
    assert (written - 0.25).abs().max() > 1e-2  # the writes moved W away from uniform
    one = (slice(None), slice(None), slice(0, 1))
    zeros, ones = torch.zeros_like(eta[one]), torch.ones_like(eta[one])
    out, kept = memora_scan(q[one], k[one], v[one], eta=zeros, alpha=ones, state=state)
    torch.testing.assert_close(kept.memory[0].exp(), written)
    torch.testing.assert_close(out[:, :, 0], torch.einsum("bhvk,bhk->bhv", written, q[:, :, 0]))
    out, reset = memora_scan(q[one], k[one], v[one], eta=zeros, alpha=zeros, state=state)
    torch.testing.assert_close(reset.memory[0].exp(), torch.full_like(written, 0.25))
    torch.testing.assert_close(out[:, :, 0], q[:, :, 0].mean(-1, keepdim=True).expand(-1, -1, 4))


def test_a_small_step_lowers_the_l2_bias_it_follows() -> None:
    q, k, v, eta, _ = _inputs(n=1)
    w0 = torch.full((2, 2, 4, 4), 0.25, dtype=F64)
    w1 = memora_attention_reference(q, k, v, eta=torch.full_like(eta, 0.05))[1]
    loss = lambda w: ((w @ k[:, :, 0, :, None])[..., 0] - v[:, :, 0]).pow(2).sum(-1)  # noqa: E731
    assert (loss(w1) < loss(w0)).all()


@pytest.mark.parametrize("retention", ["scalar", "none"])
def test_fast_equals_reference_forward_and_backward_with_padding(retention: str) -> None:
    q, k, v, eta, alpha = _inputs()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, :2] = False
    keep[1, 4] = False
    alpha = alpha if retention == "scalar" else None
    args = [t.clone().requires_grad_(True) for t in (q, k, v, eta)]
    fast = memora_attention(*args[:3], eta=args[3], alpha=alpha, mass=2.0, attention_mask=keep)
    ref = memora_attention_reference(*args[:3], eta=args[3], alpha=alpha, mass=2.0, attention_mask=keep)[0]
    torch.testing.assert_close(fast, ref)
    assert fast[0, :, :2].abs().max() == 0  # no real key yet: zero
    w = torch.randn(fast.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    for gf, gr in zip(torch.autograd.grad((fast * w).sum(), args), torch.autograd.grad((ref * w).sum(), args)):
        torch.testing.assert_close(gf, gr)
    with torch.no_grad():
        out, memory = memora_attention_reference(q, k, v, eta=eta, alpha=alpha, mass=2.0, attention_mask=keep)
    assert not out.requires_grad and not memory.requires_grad
    torch.testing.assert_close(out, ref.detach())


def test_padding_equals_removing_the_padded_tokens() -> None:
    torch.manual_seed(0)
    m = MemoraAttention(16, heads=2).double().eval()
    x = torch.randn(2, 9, 16, dtype=F64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :3] = False  # left padding of element 0
    out = m(x, attention_mask=keep)
    torch.testing.assert_close(out[0, 3:], m(x[:1, 3:])[0])
    torch.testing.assert_close(out[1], m(x[1:])[0])


def test_gates_follow_their_formulas() -> None:
    torch.manual_seed(1)
    m = MemoraAttention(8, heads=2, gate_temperature=4.0).double()
    k = torch.randn(3, 2, 5, 4, dtype=F64)
    eta, alpha = m.gates(k)
    for h in range(2):
        logit_eta = k[:, h] @ m.step_weight[h] + m.step_bias[h]
        logit_alpha = k[:, h] @ m.decay_weight[h] + m.decay_bias[h]
        torch.testing.assert_close(eta[:, h], torch.log1p(torch.exp(logit_eta)))
        torch.testing.assert_close(alpha[:, h], (1 / (1 + torch.exp(-logit_alpha))) ** 0.25)
    assert MemoraAttention(8, heads=2, retention="none").gates(k.float())[1] is None


def test_step_continues_the_scan_in_float32() -> None:
    torch.manual_seed(2)
    m = MemoraAttention(16, heads=4).eval()
    x = torch.randn(2, 6, 16)
    state, outs = None, []
    with torch.no_grad():
        for t in range(6):
            y, state = m.step(x[:, t : t + 1], state)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), m(x), rtol=1e-4, atol=1e-5)


def test_registry_entry_and_errors() -> None:
    spec = attnlab.get("memora")
    assert spec.paper.id == "P157" and spec.supports.causal_only and not spec.supports.materialize
    m = attnlab.build("memora", dim=8, heads=2)
    with pytest.raises(ParameterError, match="materialize"):
        m.materialize(torch.randn(1, 3, 8))
    with pytest.raises(ParameterError, match="causal"):
        MemoraAttention(8, heads=2, causal=False)
    with pytest.raises(ParameterError, match="mass"):
        MemoraAttention(8, heads=2, mass=0.0)
    with pytest.raises(ParameterError, match="retention"):
        MemoraAttention(8, heads=2, retention="channel")
    q, k, v, eta, _ = _inputs()
    with pytest.raises(ShapeError, match="eta"):
        memora_attention(q, k, v, eta=eta[..., :3])
    with pytest.raises(ShapeError, match="state"):
        m.step(torch.randn(1, 1, 8), m.step(torch.randn(2, 1, 8))[1])
