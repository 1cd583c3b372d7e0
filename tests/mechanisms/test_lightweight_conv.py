"""LightConv and DynamicConv (P105): the banded mixing matrix by hand, no leak in the causal form, O(N·k·d)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnlab
from attnlab.mechanisms.mixers.lightweight_conv import dynamicconv_attention, lightconv_attention


def _build(name: str, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    params = {"dim": 12, "heads": 3, "kernel_size": 5, **kw}
    return attnlab.build(name, **params).double().eval()


def _hand_band(kernels: torch.Tensor, n: int, offset0: int) -> torch.Tensor:
    """A[..., i, m] = kernels[..., i, j] at m = i + offset0 + j, inside the sequence; kernels (..., n, k), softmaxed."""
    a = torch.zeros(*kernels.shape[:-2], n, n, dtype=kernels.dtype)
    for i in range(n):
        for j in range(kernels.shape[-1]):
            if 0 <= i + offset0 + j < n:
                a[..., i, i + offset0 + j] = kernels[..., i, j]
    return a


def _values(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GLU(W^I x) per head, computed here: (batch, heads, n, head_dim)."""
    h = m.in_proj(x)
    a, g = h.chunk(2, dim=-1)
    return (a * torch.sigmoid(g)).view(*x.shape[:2], m.heads, -1).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel_size", [3, 4, 5])
def test_lightconv_is_the_banded_matrix_of_its_softmax_kernel(causal: bool, kernel_size: int) -> None:
    m = _build("lightconv", causal=causal, kernel_size=kernel_size)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    w = torch.softmax(m.weight.detach(), -1)  # (heads, k)
    offset0 = 1 - kernel_size if causal else 1 - (kernel_size + 2) // 2  # the paper's j − ⌈(k+1)/2⌉ at j = 1
    a = _hand_band(w[:, None, :].expand(-1, 9, -1), 9, offset0)[None].expand(2, -1, -1, -1)
    v = _values(m, x)
    want = m.out_proj((a @ v).transpose(1, 2).reshape(2, 9, 12))
    with torch.no_grad():
        torch.testing.assert_close(m.materialize(x), a)
        torch.testing.assert_close(m(x), want)
        torch.testing.assert_close(m(x, impl="reference"), want)


@pytest.mark.parametrize("causal", [False, True])
def test_dynamicconv_is_the_banded_matrix_of_its_per_position_kernels(causal: bool) -> None:
    m = _build("dynamicconv", causal=causal)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    v = _values(m, x)  # (2, 3, 9, 4)
    logits = m.kernel_proj(v.transpose(1, 2).reshape(2, 9, 12)).view(2, 9, 3, 5).transpose(1, 2)
    a = _hand_band(torch.softmax(logits, -1), 9, -4 if causal else -2)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 6:] = False
    a_pad = a * pad[:, None, None, :]
    v_pad = v * pad[:, None, :, None]
    want = m.out_proj((a_pad @ v_pad).transpose(1, 2).reshape(2, 9, 12))
    with torch.no_grad():
        torch.testing.assert_close(m.materialize(x, attention_mask=pad), a_pad)
        torch.testing.assert_close(m(x, attention_mask=pad), want)
        torch.testing.assert_close(m(x, attention_mask=pad, impl="reference"), want)


def test_paper_window_by_hand() -> None:
    """k = 3, kernel (1/6, 2/6, 3/6) on v = (1, 10, 100, 1000): centred out_i = w1 v_{i−1} + w2 v_i + w3 v_{i+1},
    causal out_i = w1 v_{i−2} + w2 v_{i−1} + w3 v_i."""
    v = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64).view(1, 1, 4, 1)
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    centred = torch.tensor([(2 * 1 + 3 * 10) / 6, (1 + 20 + 300) / 6, (10 + 200 + 3000) / 6, (100 + 2000) / 6])
    causal = torch.tensor([3 * 1 / 6, (2 + 30) / 6, (1 + 20 + 300) / 6, (10 + 200 + 3000) / 6])
    for kind, out in (("centred", lightconv_attention(v, logits)), ("causal", lightconv_attention(v, logits, causal=True))):
        want = centred if kind == "centred" else causal
        torch.testing.assert_close(out.flatten(), want.double(), msg=kind)
    per_position = logits[None, :, None, :].expand(1, 1, 4, 3)
    torch.testing.assert_close(dynamicconv_attention(v, per_position, causal=True).flatten(), causal.double())


@pytest.mark.parametrize("name", ["lightconv", "dynamicconv"])
def test_causal_form_does_not_leak_and_sees_the_past_k_tokens(name: str) -> None:
    """Output i's gradient is nonzero exactly on tokens i − k + 1 .. i (every channel mixes through W^O)."""
    m = _build(name, causal=True)
    x = torch.randn(1, 11, 12, dtype=torch.float64, requires_grad=True)
    for impl in ("fast", "reference"):
        for i in range(11):
            (g,) = torch.autograd.grad(m(x, impl=impl)[0, i].sum(), x)
            seen = g[0].abs().sum(-1) > 0
            want = torch.zeros(11, dtype=torch.bool)
            want[max(0, i - 4) : i + 1] = True
            assert torch.equal(seen, want), (impl, i, seen)


@pytest.mark.parametrize("name", ["lightconv", "dynamicconv"])
def test_cost_is_linear_in_n(name: str) -> None:
    """FLOPs counted by torch (projections, convolution, unfold contraction) double when N doubles: O(N·k·d)."""
    m = attnlab.build(name, dim=32, heads=4, kernel_size=7).eval()
    counts = []
    for n in (256, 512, 1024):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.randn(1, n, 32))
        counts.append(counter.get_total_flops())
    assert counts[1] == 2 * counts[0] and counts[2] == 2 * counts[1], counts
    per_token = counts[0] / 256
    projections = 2 * 32 * 64 + 2 * 32 * 32 + (2 * 32 * 4 * 7 if name == "dynamicconv" else 0)
    assert per_token == projections + 2 * 7 * 32, (per_token, projections)


@pytest.mark.parametrize("name", ["lightconv", "dynamicconv"])
def test_step_keeps_the_last_k_minus_1_values_and_refuses_bad_input(name: str) -> None:
    m = _build(name, causal=True)
    x = torch.randn(2, 1, 12, dtype=torch.float64)
    with torch.no_grad():
        _, state = m.step(x)
        assert state.shape == (2, 3, 4, 4)
        torch.testing.assert_close(state[:, :, -1], _values(m, x)[:, :, 0])  # the newest value, the older ones zeros
        assert state[:, :, :-1].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="^step: decoding needs a causal module"):
        _build(name).step(x)
    with pytest.raises(ValueError, match="^state: expected the last k − 1 values"):
        m.step(x, torch.zeros(2, 3, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="^x_t: expected one position"):
        m.step(torch.randn(2, 2, 12, dtype=torch.float64))
