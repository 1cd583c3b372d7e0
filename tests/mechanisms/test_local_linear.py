"""Local Linear Attention (P244): the intercept of a softmax-weighted ridge local linear fit."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.linear.local_linear import local_linear_attention, local_linear_attention_reference


def qkv(b: int = 2, h: int = 2, n: int = 10, d: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def softmax_attention(q, k, v, causal: bool):  # type: ignore[no-untyped-def]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def least_squares_intercept(q_i, k, v, p, ridge: float):  # type: ignore[no-untyped-def]
    """min_a,B Σ_j p_j ‖v_j − a − B(k_j − q_i)‖² + λ‖B‖² as one stacked least-squares problem (lstsq)."""
    n, d = k.shape
    design = torch.cat([torch.ones(n, 1, dtype=k.dtype), k - q_i], dim=1) * p.sqrt()[:, None]
    target = v * p.sqrt()[:, None]
    prior = torch.cat([torch.zeros(d, 1, dtype=k.dtype), math.sqrt(ridge) * torch.eye(d, dtype=k.dtype)], dim=1)
    system = torch.cat([design, prior], dim=0)
    rhs = torch.cat([target, torch.zeros(d, v.shape[1], dtype=k.dtype)], dim=0)
    return torch.linalg.lstsq(system, rhs).solution[0]


def closed_form(q_i, k, v, p, ridge: float):  # type: ignore[no-untyped-def]
    """out = μ_v − C_vk (C_kk + λI)⁻¹ (μ_k − q) (shared/PAPERS.md, P244)."""
    mu_k, mu_v = p @ k, p @ v
    c_kk = ((k - mu_k) * p[:, None]).T @ (k - mu_k)
    c_vk = ((v - mu_v) * p[:, None]).T @ (k - mu_k)
    return mu_v - c_vk @ torch.linalg.solve(c_kk + ridge * torch.eye(k.shape[1], dtype=k.dtype), mu_k - q_i)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_per_query_weighted_least_squares(causal: bool) -> None:
    q, k, v = qkv(n=9, d=3, seed=1)
    ridge = 0.7
    fast = local_linear_attention(q, k, v, ridge=ridge, causal=causal)
    ref, _ = local_linear_attention_reference(q, k, v, ridge=ridge, causal=causal)
    for b, h, i in [(0, 0, 0), (0, 1, 4), (1, 0, 8), (1, 1, 2)]:
        last = i + 1 if causal else 9
        keys, vals = k[b, h, :last], v[b, h, :last]
        p = torch.softmax(keys @ q[b, h, i] / math.sqrt(3), dim=0)
        want = least_squares_intercept(q[b, h, i], keys, vals, p, ridge)
        torch.testing.assert_close(closed_form(q[b, h, i], keys, vals, p, ridge), want)
        torch.testing.assert_close(fast[b, h, i], want)
        torch.testing.assert_close(ref[b, h, i], want)


@pytest.mark.parametrize("causal", [False, True])
def test_large_ridge_is_softmax_attention(causal: bool) -> None:
    q, k, v = qkv(seed=2)
    want = softmax_attention(q, k, v, causal)
    torch.testing.assert_close(local_linear_attention(q, k, v, ridge=1e10, causal=causal), want, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(local_linear_attention_reference(q, k, v, ridge=1e10, causal=causal)[0], want, atol=1e-8, rtol=1e-6)
    # and a moderate ridge is not: the slope term matters
    assert (local_linear_attention(q, k, v, ridge=0.1, causal=causal) - want).abs().max() > 1e-3


def test_values_affine_in_the_keys_are_recovered_with_zero_ridge() -> None:
    """v_j = c + G k_j  ⇒  out_i = c + G q_i when λ = 0 (the local linear fit is exact)."""
    q, k, _ = qkv(n=16, d=3, seed=3)
    g = torch.Generator().manual_seed(4)
    c, G = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    v = c + k @ G.T
    want = c + q @ G.T
    kpm = torch.ones(2, 16, dtype=torch.bool)
    kpm[0, 10:] = False  # 10 visible keys still determine a 3-d affine map
    for kw in ({}, {"attention_mask": kpm}):
        torch.testing.assert_close(local_linear_attention(q, k, v, ridge=0.0, **kw), want, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(local_linear_attention_reference(q, k, v, ridge=0.0, **kw)[0], want, atol=1e-8, rtol=1e-8)
    # softmax attention cannot do it: it averages values
    assert (softmax_attention(q, k, v, False) - want).abs().max() > 0.1


def test_equivalent_kernel_sums_to_one_explains_the_output_and_can_be_negative() -> None:
    torch.manual_seed(0)
    m = attnlab.build("local-linear", dim=16, heads=2, ridge=0.05, causal=True).double()
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = m.materialize(x)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 12, dtype=torch.float64))
    q, k, v = m.project(x)
    torch.testing.assert_close(m.attend(q, k, v), a @ v)
    assert a.min().item() < -1e-3  # local linear regression's kernel is not a probability
    assert a.triu(1).abs().max().item() == 0.0


def test_zero_ridge_with_too_few_keys_is_refused() -> None:
    q, k, v = qkv(n=6, d=3, seed=6)
    with pytest.raises(ValueError, match="ridge"):
        local_linear_attention(q, k, v, ridge=0.0, causal=True)  # query 0 sees one key
    with pytest.raises(ValueError, match="ridge"):
        local_linear_attention(q, k, v, ridge=-1.0)
    with pytest.raises(ParameterError, match="ridge"):
        attnlab.build("local-linear", dim=16, heads=2, ridge=-0.5)


def test_fully_masked_rows_are_zero_even_with_zero_ridge() -> None:
    q, k, v = qkv(n=8, d=2, seed=7)
    kpm = torch.ones(2, 8, dtype=torch.bool)
    kpm[1] = False
    out = local_linear_attention(q, k, v, ridge=0.0, attention_mask=kpm)
    assert out[1].abs().max().item() == 0.0 and torch.isfinite(out).all()


def test_float32_is_close_to_float64() -> None:
    q, k, v = qkv(b=1, h=2, n=128, d=16, seed=8)
    ref, _ = local_linear_attention_reference(q, k, v, ridge=1.0, causal=True)
    fast = local_linear_attention(q.float(), k.float(), v.float(), ridge=1.0, causal=True)
    torch.testing.assert_close(fast.double(), ref, atol=1e-4, rtol=1e-3)


def test_float32_stays_accurate_for_widely_spread_keys() -> None:
    """Keys of scale 100: the moments Σ p k kᵀ − μμᵀ cancel badly in float32; the result must not."""
    q, k, v = (100 * t for t in qkv(b=1, h=2, n=128, d=16, seed=10))
    ref, _ = local_linear_attention_reference(q, k, v, ridge=1.0, causal=True)
    fast = local_linear_attention(q.float(), k.float(), v.float(), ridge=1.0, causal=True)
    assert (fast.double() - ref).abs().max() < 1e-3 * ref.abs().max()


def test_large_inputs_stay_finite() -> None:
    q, k, v = (1e3 * t for t in qkv(n=32, d=8, seed=9, dtype=torch.float32))
    q.requires_grad_(True)
    out = local_linear_attention(q, k, v, ridge=1.0, causal=True)
    (g,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    # the values: the float64 reference's on the same inputs, to float32 accuracy of the largest entry
    want, _ = local_linear_attention_reference(q.detach().double(), k.double(), v.double(), ridge=1.0, causal=True)
    assert (out.double() - want).abs().max() <= 1e-3 * want.abs().max()
