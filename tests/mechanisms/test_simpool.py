"""SimPool (P142): γ = 1 is the attention-weighted mean of LN(X) (by hand); the power mean by hand at γ = 2 with the
shift by the sample's own minimum (restored or, as the code, not); a sample's result does not depend on the rest of
its batch, even when the other samples reach far lower values (the official code's batch-wide minimum would)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.pooling.simpool import EPS, simpool_attention

DIM = 8


def build(**params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    m = attnlab.build("simpool", dim=DIM, **params).double().eval()
    with torch.no_grad():
        if m.beta is not None:
            m.beta.fill_(0.3)
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    return m


def tokens(batch: int = 2, n: int = 7, seed: int = 1) -> Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def attention_and_values(m: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """One sample (n, dim) by hand: the SimPool weights a (heads, n) and the values LN(x) (n, dim)."""
    v = F.layer_norm(x, (DIM,), m.norm.weight, m.norm.bias, m.norm.eps)
    q, k = m.wq(x.mean(0)), m.wk(v)
    h, dh = m.heads, DIM // m.heads
    a = torch.stack([torch.softmax(k[:, j * dh : (j + 1) * dh] @ q[j * dh : (j + 1) * dh] / dh**0.5, 0) for j in range(h)])
    return a, v


def power_mean_by_hand(m: torch.nn.Module, x: Tensor, gamma: float, shift: Tensor | None = None, restore: bool = True) -> Tensor:
    """z (dim,) of one sample: per head, (Σ a (v − s + ε)^γ)^{1/γ} (+ s − ε) + β, s the sample's minimum unless given."""
    a, v = attention_and_values(m, x)
    s = v.min() if shift is None else shift
    dh = DIM // m.heads
    z = torch.cat([(a[j] @ (v[:, j * dh : (j + 1) * dh] - s + EPS) ** gamma) ** (1 / gamma) for j in range(m.heads)])
    return z + (s - EPS if restore else 0.0) + m.beta


@pytest.mark.parametrize("heads", [1, 2])
def test_gamma_one_is_the_attention_weighted_mean(heads: int) -> None:
    m = build(gamma=1.0, heads=heads)
    x = tokens()
    dh = DIM // heads
    for impl in ("fast", "reference"):
        got = m(x, impl=impl)
        for i in range(2):
            a, v = attention_and_values(m, x[i])
            want = torch.cat([a[j] @ v[:, j * dh : (j + 1) * dh] for j in range(heads)]) + 0.3
            torch.testing.assert_close(got[i, 0], want)


def test_gamma_one_without_restoring_the_shift_is_the_code_form() -> None:
    m = build(gamma=1.0, restore_shift=False)
    x = tokens()
    got = m(x)
    for i in range(2):
        a, v = attention_and_values(m, x[i])
        torch.testing.assert_close(got[i, 0], a[0] @ v - v.min() + EPS + 0.3)


@pytest.mark.parametrize(("gamma", "restore"), [(2.0, True), (2.0, False), (3.5, True)])
def test_power_mean_by_hand(gamma: float, restore: bool) -> None:
    m = build(gamma=gamma, restore_shift=restore)
    x = tokens()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    for impl in ("fast", "reference"):
        got = m(x, attention_mask=keep, impl=impl)
        torch.testing.assert_close(got[0, 0], power_mean_by_hand(m, x[0], gamma, restore=restore))
        torch.testing.assert_close(got[1, 0], power_mean_by_hand(m, x[1, :4], gamma, restore=restore))
    a, _ = attention_and_values(m, x[0])
    torch.testing.assert_close(m.materialize(x)[0, :, 0], a)


def test_a_sample_does_not_depend_on_the_rest_of_its_batch() -> None:
    """Sample 0 alone and in a batch whose other samples hold a spike (one channel −1000: LN takes it to about −√(d−1) ≈ −2.65,
    far below sample 0's minimum, about −1.5): the same result. The official code's batch-wide minimum (by hand) would differ."""
    m = build(gamma=2.0)
    with torch.no_grad():
        m.norm.weight.fill_(1.0)
        m.norm.bias.zero_()
    x = tokens(batch=3)
    g = torch.Generator().manual_seed(5)
    ramp = torch.arange(DIM, dtype=x.dtype) - (DIM - 1) / 2  # LN of a permuted ramp: minimum ≈ −1.53
    x[0] = torch.stack([ramp[torch.randperm(DIM, generator=g)] for _ in range(7)]) + 0.05 * x[0]
    x[1:, :, 0] = -1000.0
    others_min = F.layer_norm(x[1:], (DIM,), m.norm.weight, m.norm.bias, m.norm.eps).min()
    own_min = F.layer_norm(x[0], (DIM,), m.norm.weight, m.norm.bias, m.norm.eps).min()
    assert others_min < own_min - 0.8
    for impl in ("fast", "reference"):
        alone = m(x[:1], impl=impl)[0, 0]
        torch.testing.assert_close(m(x, impl=impl)[0, 0], alone)
        torch.testing.assert_close(alone, power_mean_by_hand(m, x[0], 2.0))
    batch_wide = power_mean_by_hand(m, x[0], 2.0, shift=others_min)
    assert (batch_wide - m(x)[0, 0]).abs().max() > 1e-3


def test_bad_gamma_raises() -> None:
    for gamma in (0.0, -1.0):
        with pytest.raises(ParameterError, match="gamma"):
            attnlab.build("simpool", dim=DIM, gamma=gamma)
    q = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ParameterError, match="gamma"):
        simpool_attention(q, q.expand(1, 1, 3, 4), q.expand(1, 1, 3, 4), gamma=float("nan"))
