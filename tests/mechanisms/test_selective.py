"""Selective attention (SSA): unit temperature and a zero token map are softmax; the temperatures by hand with loops
(n_i = visible keys under causality and padding); long-context sharpening: the entropy of a retrieving query falls
as log i grows while softmax's rises; the parameter overhead the paper states (< 0.5%)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.dense.selective import selective_attention, selective_attention_reference
from attnlab.mechanisms.dense.softmax import softmax_attention

F64 = torch.float64


def _qkv(b=2, h=2, n=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
def test_unit_temperature_and_zero_token_map_is_softmax(causal):
    q, k, v = _qkv()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, :2] = False
    zero = (torch.zeros(2, 4, dtype=F64), torch.zeros(2, dtype=F64))
    for kw in ({}, {"attention_mask": keep}):
        want = softmax_attention(q, k, v, causal=causal, **kw)
        got = selective_attention(q, k, v, position_gate=0.0, token=zero, value=zero, causal=causal, **kw)
        ref, _ = selective_attention_reference(q, k, v, position_gate=0.0, token=zero, value=zero, causal=causal, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-13)
    # the module: position term off, token and value maps zeroed -> the softmax module with the same projections
    torch.manual_seed(1)
    m = attnlab.build("selective", dim=8, heads=2, causal=causal, position=False).double()
    with torch.no_grad():
        for name in ("token_weight", "token_bias", "value_weight", "value_bias"):
            getattr(m, name).zero_()
    soft = attnlab.build("softmax", dim=8, heads=2, causal=causal).double()
    soft.load_state_dict({n: p for n, p in m.state_dict().items() if n.endswith(("proj.weight", "proj.bias"))})
    x = torch.randn(2, 6, 8, dtype=F64)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl), soft(x), rtol=1e-12, atol=1e-12)


def test_temperatures_by_hand_with_loops():
    b, h, n, d = 2, 2, 5, 3
    q, k, v = _qkv(b, h, n, d, seed=4)
    gate = torch.tensor([0.3, 0.8], dtype=F64)
    token = (torch.randn(h, d, dtype=F64), torch.randn(h, dtype=F64))
    value = (torch.randn(h, d, dtype=F64), torch.randn(h, dtype=F64))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 0] = keep[1, 3] = False
    out = torch.zeros(b, h, n, d, dtype=F64)
    weights = torch.zeros(b, h, n, n, dtype=F64)
    for z in range(b):
        for hh in range(h):
            for i in range(n):
                seen = [j for j in range(i + 1) if keep[z, j]]
                if not seen:
                    continue
                tau = 1 + gate[hh] * math.log(len(seen)) + math.tanh(float(token[0][hh] @ q[z, hh, i] + token[1][hh]))
                logits = torch.stack([tau * (q[z, hh, i] @ k[z, hh, j]) / math.sqrt(d) for j in seen])
                p = torch.softmax(logits, 0)
                for pj, j in zip(p, seen):
                    weights[z, hh, i, j] = pj
                    v_scale = 1 + math.tanh(float(value[0][hh] @ v[z, hh, j] + value[1][hh]))
                    out[z, hh, i] += pj * v_scale * v[z, hh, j]
    kw = dict(position_gate=gate, token=token, value=value, causal=True, attention_mask=keep)
    torch.testing.assert_close(selective_attention(q, k, v, **kw), out, rtol=1e-12, atol=1e-13)
    ref, w = selective_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(ref, out, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(w, weights, rtol=1e-12, atol=1e-13)


def test_visible_key_count_follows_an_arbitrary_attn_mask():
    q, k, v = _qkv(1, 1, 4, 2, seed=6)
    allowed = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    gate = 0.9
    # row i sees n_i = (1, 3, 2, 4) keys: τ_i = 1 + 0.9 log n_i
    tau = 1 + gate * torch.log(torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=F64))
    logits = (tau[:, None] * (q[0, 0] @ k[0, 0].T) / math.sqrt(2)).masked_fill(~allowed, -math.inf)
    want = torch.softmax(logits, -1) @ v[0, 0]
    for fn in (selective_attention, lambda *a, **kw: selective_attention_reference(*a, **kw)[0]):
        torch.testing.assert_close(fn(q, k, v, position_gate=gate, attn_mask=allowed)[0, 0], want, rtol=1e-12, atol=1e-13)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def test_long_context_sharpening_entropy_falls_with_log_i():
    """One query direction; key 0 is the target (logit Δ), every later key a distractor (logit 0). Row i (n = i + 1
    visible keys) has top weight e^{τΔ}/(e^{τΔ} + n − 1), τ = 1 + s·log n: with sΔ > 1 it tends to 1 and the entropy
    falls as log i grows, while softmax's (τ = 1) rises towards log n."""
    n, delta, s = 256, 3.0, 0.9
    q = torch.zeros(1, 1, n, 2, dtype=F64)
    q[..., 0] = delta * math.sqrt(2)  # q·k_0 / √d = Δ
    k = torch.zeros(1, 1, n, 2, dtype=F64)
    k[..., 0, 0] = 1.0
    k[..., 1:, 1] = 1.0
    v = torch.eye(n, dtype=F64)[None, None, :, :2]  # any values: the weights are read below
    _, ssa = selective_attention_reference(q, k, v, position_gate=s, causal=True)
    _, soft = selective_attention_reference(q, k, v, causal=True)
    rows = torch.arange(1, n)  # queries with at least one distractor
    count = (rows + 1).double()
    tau = 1 + s * count.log()
    top = torch.exp(tau * delta) / (torch.exp(tau * delta) + count - 1)
    torch.testing.assert_close(ssa[0, 0, rows, 0], top, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(soft[0, 0, rows, 0], math.exp(delta) / (math.exp(delta) + count - 1), rtol=1e-12, atol=1e-14)
    h_ssa, h_soft = _entropy(ssa[0, 0, rows]), _entropy(soft[0, 0, rows])
    assert (h_ssa.diff() < 0).all(), "SSA: the entropy does not fall as the context grows"
    assert (h_soft.diff() > 0).all() and h_soft[-1] > 3 * h_ssa[0]
    assert h_ssa[-1] < 0.01 and (h_ssa < h_soft).all()
    # the fast path gives the same outputs
    torch.testing.assert_close(selective_attention(q, k, v, position_gate=s, causal=True),
                               selective_attention_reference(q, k, v, position_gate=s, causal=True)[0], rtol=1e-12, atol=1e-13)


def test_extra_parameters_are_under_half_a_percent():
    dim, heads = 768, 12
    ssa = sum(p.numel() for p in attnlab.build("selective", dim=dim, heads=heads).parameters())
    base = sum(p.numel() for p in attnlab.build("softmax", dim=dim, heads=heads).parameters())
    assert ssa - base == heads * (2 * (dim // heads) + 3)
    assert (ssa - base) / base < 0.005


def test_bad_arguments_are_named():
    q, k, v = _qkv()
    with pytest.raises(ParameterError, match="position_gate: expected values in"):
        selective_attention(q, k, v, position_gate=1.0)
    with pytest.raises(ShapeError, match="token: expected weight"):
        selective_attention(q, k, v, token=(torch.zeros(2, 5, dtype=F64), torch.zeros(2, dtype=F64)))
    with pytest.raises(ShapeError, match="position_gate: expected a float or 2 values"):
        selective_attention(q, k, v, position_gate=torch.full((3,), 0.1))
    with pytest.raises(ParameterError, match="position_init"):
        attnlab.build("selective", dim=8, heads=2, position_init=0.0)
