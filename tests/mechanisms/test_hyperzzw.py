"""HyperZ·Z·W (P014): the layer equals an explicit convolution with the kernel the slow net generates, built here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab


def _build(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    params = {"dim": 12, "heads": 3, "max_length": 64, "omega_0": 5.0, **kw}
    return attnlab.build("hyperzzw", **params).double().eval()


def _slow_net_by_hand(m: torch.nn.Module, deltas: torch.Tensor) -> torch.Tensor:
    """K(c) at c = δ/(max_length − 1), from the slow net's parameters: h₁ = sin(ω₁c + φ₁),
    h_{l+1} = (W_l h_l + b_l) ⊙ sin(ω_{l+1}c + φ_{l+1}), K = W_o h + b_o; returns (heads, len(deltas))."""
    net = m.slow_net
    c = deltas.double()[:, None] / (m.max_length - 1)
    h = torch.sin(c @ net.filters[0].weight.T + net.filters[0].bias)
    for lin, filt in zip(net.linears, net.filters[1:]):
        h = (h @ lin.weight.T + lin.bias) * torch.sin(c @ filt.weight.T + filt.bias)
    return (h @ net.output.weight.T + net.output.bias).T


def _explicit(m: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """W_o (Z ⊙ conv1d(Z, K)) with the hand-built kernel, F.conv1d per channel (cross-correlation: flipped kernel)."""
    b, n, _ = x.shape
    z = x @ m.z_proj.weight.T + m.z_proj.bias  # (b, n, heads·head_dim)
    if keep is not None:
        z = z * keep[..., None]
    deltas = torch.arange(0 if m.causal else 1 - n, n)
    kernel = _slow_net_by_hand(m, deltas)  # (heads, taps), taps ordered by increasing δ
    per_channel = kernel.repeat_interleave(m.head_dim, dim=0).flip(-1)[:, None, :]  # tap j ↔ δ = n − 1 − j
    pad = (n - 1, 0) if m.causal else (n - 1, n - 1)
    mixed = F.conv1d(F.pad(z.transpose(1, 2), pad), per_channel, groups=z.shape[-1]).transpose(1, 2)
    return (z * mixed) @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [7, 100])  # 100: the causal path's recursion over halves (blocks of 32) runs
def test_equals_explicit_convolution_with_the_generated_kernel(causal: bool, n: int) -> None:
    m = _build(causal=causal)
    x = torch.randn(2, n, 12, dtype=torch.float64)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, n // 3 : n // 2] = False
    with torch.no_grad():
        for mask in (None, keep):
            want = _explicit(m, x, mask)
            for impl in ("fast", "reference"):
                torch.testing.assert_close(m(x, attention_mask=mask, impl=impl), want, msg=f"{impl}, mask={mask is not None}")


def test_materialize_is_the_toeplitz_kernel_and_explains_the_output() -> None:
    m = _build()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    kernel = _slow_net_by_hand(m, torch.arange(-5, 6))  # index δ + 5
    i = torch.arange(6)
    want = kernel[:, (i[:, None] - i[None, :]) + 5]  # A[h, i, m] = K_h(i − m)
    with torch.no_grad():
        a = m.materialize(x)
        torch.testing.assert_close(a, want[None].expand(2, -1, -1, -1))
        z = m.values(x)
        out = m.out_proj((z * (a @ z)).transpose(1, 2).reshape(2, 6, 12))
        torch.testing.assert_close(m(x), out)


def test_kernel_is_read_at_fixed_coordinates() -> None:
    """K depends on the offset alone (coordinates normalised by max_length, not N): the kernel of 5 tokens is the
    middle of the kernel of 9, and δ = max_length − 1 is c = 1."""
    m = _build()
    with torch.no_grad():
        torch.testing.assert_close(m.hyper_kernel(5), m.hyper_kernel(9)[:, 4:13])
        torch.testing.assert_close(m.hyper_kernel(64)[:, -1], _slow_net_by_hand(m, torch.tensor([63]))[:, 0])
        ones = torch.ones(1, dtype=torch.float64)
        torch.testing.assert_close(m.slow_net(ones)[0], _slow_net_by_hand(m, torch.tensor([63]))[:, 0])


def test_causal_recursion_is_exactly_causal() -> None:
    """On 100 tokens (the FFT recursion over halves), outputs before t have exactly zero gradient on tokens ≥ t."""
    m = _build(causal=True)
    x = torch.randn(1, 100, 12, dtype=torch.float64, requires_grad=True)
    for t in (1, 31, 32, 33, 64, 99):
        (g,) = torch.autograd.grad(m(x)[0, :t].sum(), x)
        assert g[0, t:].abs().max().item() == 0.0, t
        assert g[0, :t].abs().sum().item() > 0, t


def test_full_context() -> None:
    """Every output depends on every token (the kernel spans the sequence), the first on the last too."""
    m = _build()
    x = torch.randn(1, 50, 12, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0, 0].sum(), x)
    assert (g[0].abs().sum(-1) > 0).all()
