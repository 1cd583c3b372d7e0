"""KERPLE: kernel values by hand, fast path vs reference vs a hand computation, learnt r1/r2
with their constraints, decoding, extrapolation, the variant parameter."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.dense.kerple import (
    KerpleAttention,
    KerpleLog,
    KerplePower,
    kerple_attention,
    kerple_attention_reference,
    kerple_bias,
)

F64 = torch.float64
DIST3 = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=F64)


def hand_attention(q, k, v, bias, keep=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_power_with_exponent_one_is_a_linear_alibi_style_bias():
    r1 = torch.tensor([0.3, 1.7], dtype=F64)
    got = kerple_bias(2, 3, 3, variant="power", r1=r1, r2=1.0, dtype=F64)
    want = torch.stack([-0.3 * DIST3, -1.7 * DIST3])
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    # the learnt term, started at r2 = 1 (up to float32 storage of the raw parameter)
    term = KerplePower(2, r1=r1, r2=1.0)
    torch.testing.assert_close(term(3, 3, dtype=F64), want, rtol=1e-6, atol=1e-6)


def test_power_values_by_hand():
    # r1 = 0.5, r2 = 2: −0.5·d²; r2 = 0.5: −0.5·√d
    got = kerple_bias(2, 3, 3, variant="power", r1=0.5, r2=torch.tensor([2.0, 0.5]), dtype=F64)
    torch.testing.assert_close(got[0], -0.5 * torch.tensor([[0, 1, 4], [1, 0, 1], [4, 1, 0]], dtype=F64))
    s2 = math.sqrt(2)
    torch.testing.assert_close(got[1], -0.5 * torch.tensor([[0, 1, s2], [1, 0, 1], [s2, 1, 0]], dtype=F64))


def test_log_values_by_hand():
    # r1 = 2, r2 = 0.5: d = 0 -> 0, d = 1 -> −2·log 1.5, d = 2 -> −2·log 2
    a, b = -2 * math.log(1.5), -2 * math.log(2.0)
    want = torch.tensor([[0, a, b], [a, 0, a], [b, a, 0]], dtype=F64)
    got = kerple_bias(1, 3, 3, variant="log", r1=2.0, r2=0.5, dtype=F64)
    torch.testing.assert_close(got[0], want, rtol=1e-15, atol=1e-15)
    term = KerpleLog(1, r1=2.0, r2=0.5)
    torch.testing.assert_close(term(3, 3, dtype=F64)[0], want, rtol=1e-6, atol=1e-6)


def test_bias_is_bottom_right_aligned_for_fewer_queries():
    got = kerple_bias(1, 2, 4, variant="power", r1=1.0, r2=1.0, dtype=F64)[0]
    torch.testing.assert_close(got, -torch.tensor([[2, 1, 0, 1], [3, 2, 1, 0]], dtype=F64))


def _qkv(b=2, h=2, n_q=6, n_k=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(b, h, n, d, generator=g, dtype=F64, requires_grad=True)  # noqa: E731
    return make(n_q), make(n_k), make(n_k)


@pytest.mark.parametrize("variant", ["log", "power"])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_equals_reference_and_hand_forward_backward(variant, causal):
    q, k, v = _qkv()
    r1 = torch.tensor([0.7, 1.3], dtype=F64, requires_grad=True)
    r2 = torch.tensor([0.4, 1.6], dtype=F64, requires_grad=True)
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, 5] = False
    kw = dict(variant=variant, r1=r1, r2=r2, causal=causal, attention_mask=pad)
    fast = kerple_attention(q, k, v, **kw)
    ref, _ = kerple_attention_reference(q, k, v, **kw)

    i = torch.arange(6)
    d = (i[:, None] - i[None, :]).abs().to(F64)
    p1, p2 = r1[:, None, None], r2[:, None, None]
    bias = -p1 * d**p2 if variant == "power" else -p1 * torch.log(1 + p2 * d)
    keep = pad[:, None, None, :].expand(2, 2, 6, 6)
    if causal:
        keep = keep & (i[:, None] >= i[None, :])
    hand = hand_attention(q, k, v, bias, keep)

    torch.testing.assert_close(fast, hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref, hand, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(fast)
    inputs = (q, k, v, r1, r2)
    for out in (fast, ref):
        got = torch.autograd.grad(out, inputs, g, retain_graph=True)
        want = torch.autograd.grad(hand, inputs, g, retain_graph=True)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_functional_rejects_out_of_range_coefficients():
    q, k, v = _qkv()
    with pytest.raises(ParameterError, match="r2"):
        kerple_attention(q, k, v, variant="power", r1=1.0, r2=2.5)
    with pytest.raises(ParameterError, match="r1"):
        kerple_attention(q, k, v, variant="log", r1=torch.tensor([1.0, -0.1]), r2=1.0)
    with pytest.raises(ParameterError, match="r2"):
        kerple_attention(q, k, v, variant="log", r1=1.0, r2=0.0)
    with pytest.raises(ShapeError, match="r1"):
        kerple_attention(q, k, v, variant="log", r1=torch.ones(3), r2=1.0)
    with pytest.raises(ParameterError, match="variant"):
        kerple_attention(q, k, v, variant="cubic", r1=1.0, r2=1.0)
    # the power variant admits r2 = 2 (the Gaussian end of the range), the log variant any r2 > 0: by hand
    d = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs().to(F64)
    torch.testing.assert_close(kerple_attention(q, k, v, variant="power", r1=1.0, r2=2.0), hand_attention(q, k, v, -(d**2)))
    torch.testing.assert_close(kerple_attention(q, k, v, variant="log", r1=1.0, r2=5.0),
                               hand_attention(q, k, v, -torch.log(1 + 5 * d)))


@pytest.mark.parametrize("cls, r1_high, r2_high", [(KerplePower, 1.0, 2.0), (KerpleLog, 2.0, 1.0)])
def test_initial_values_lie_in_the_papers_ranges(cls, r1_high, r2_high):
    torch.manual_seed(0)
    term = cls(64)
    r1, r2 = term.r1.detach(), term.r2.detach()
    assert r1.shape == r2.shape == (64,)
    assert (r1 > 0.01).all() and (r1 <= r1_high + 1e-6).all() and r1.max() > 0.5 * r1_high
    assert (r2 > 0.01).all() and (r2 <= r2_high + 1e-6).all() and r2.max() > 0.5 * r2_high
    with pytest.raises(ParameterError, match="r1"):
        cls(2, r1=0.0)


@pytest.mark.parametrize("variant", ["log", "power"])
def test_gradients_reach_r1_and_r2(variant):
    torch.manual_seed(3)
    m = attnlab.build("kerple", dim=16, heads=2, variant=variant, causal=True).double()
    x = torch.randn(2, 7, 16, dtype=F64)
    m(x).square().sum().backward()
    for p in (m.kernel.r1_raw, m.kernel.r2_raw):
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad.abs() > 0).all()
        with torch.no_grad():  # the gradient of head 0 against a central difference
            eps, grad = 1e-6, p.grad[0].item()
            p[0] += eps
            up = m(x).square().sum().item()
            p[0] -= 2 * eps
            down = m(x).square().sum().item()
            p[0] += eps
        assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("cls, r2_max", [(KerplePower, 2.0), (KerpleLog, math.inf)])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_constraints_hold_after_a_step_that_pushes_out_of_range(cls, r2_max, direction):
    term = cls(2, r1=0.5, r2=torch.tensor([0.5, 1.5]))
    opt = torch.optim.SGD(term.parameters(), lr=1e4)
    # direction +1 drives r1, r2 down (towards and past 0), −1 drives them up (r2 past 2)
    (direction * (term.r1.sum() + term.r2.sum())).backward()
    opt.step()
    r1, r2 = term.r1.detach(), term.r2.detach()
    assert (r1 > 0).all() and (r2 > 0).all() and (r2 <= r2_max).all()
    if direction > 0:
        assert (term.r1_raw < -1000).all()  # the raw parameter left the range; r1 did not
    bias = term(40, 40, dtype=F64)
    assert torch.isfinite(bias).all() and (bias <= 0).all()
    d = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs().to(F64)
    want = -r1[:, None, None] * (d ** r2[:, None, None] if cls is KerplePower else torch.log(1 + r2[:, None, None] * d))
    torch.testing.assert_close(bias.detach(), want.to(F64))
    # and the term still learns
    opt.zero_grad()
    term(5, 5).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in term.parameters())


@pytest.mark.parametrize("variant", ["log", "power"])
def test_extrapolates_beyond_build_length(variant):
    torch.manual_seed(4)
    m = KerpleAttention(16, 2, causal=True, variant=variant).double()
    assert m(torch.randn(1, 8, 16, dtype=F64)).shape == (1, 8, 16)
    long = torch.randn(1, 40, 16, dtype=F64)
    out = m(long)
    assert out.shape == (1, 40, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(out, m(long, impl="reference"), rtol=1e-10, atol=1e-12)
    r1, r2 = m.kernel.r1.detach().tolist(), m.kernel.r2.detach().tolist()
    bias = m.kernel(40, 40, dtype=F64).detach()
    for h in range(2):
        for d in (1, 17, 39):
            want = -r1[h] * d ** r2[h] if variant == "power" else -r1[h] * math.log(1 + r2[h] * d)
            assert bias[h, d, 0].item() == pytest.approx(want, rel=1e-12)
            assert bias[h, 0, d].item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(m.kernel(8, 8, dtype=F64), m.kernel(40, 40, dtype=F64)[:, 32:, 32:])


@pytest.mark.parametrize("variant", ["log", "power"])
def test_decoding_equals_causal_forward(variant, stepped):
    torch.manual_seed(5)
    m = KerpleAttention(16, 2, causal=True, variant=variant).double()
    x = torch.randn(2, 9, 16, dtype=F64)
    full = m(x)
    torch.testing.assert_close(stepped(m, x), full, rtol=1e-10, atol=1e-12)


def test_variant_parameter():
    assert isinstance(attnlab.build("kerple", dim=16, heads=2).kernel, KerpleLog)
    assert isinstance(attnlab.build("kerple", dim=16, heads=2, variant="power").kernel, KerplePower)
    with pytest.raises(ParameterError, match=r"variant.*'log'.*'power'"):
        attnlab.build("kerple", dim=16, heads=2, variant="cubic")
    with pytest.raises(ParameterError, match=r"variant.*'log'.*'power'"):
        KerpleAttention(16, 2, variant="cubic")


def test_registry_entry():
    spec = attnlab.get("kerple")
    assert spec.paper.id == "P212" and spec.paper.arxiv == "2205.09921" and spec.family == "C"
    assert spec.param("variant").choices == ("log", "power") and spec.param("variant").default == "log"
    s = spec.supports
    assert s.causal and s.key_padding and s.attn_mask and s.cross and s.decode
