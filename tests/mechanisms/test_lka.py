"""VAN large kernel attention: the receptive field by gradient probe, the layer by hand with delta kernels,
materialize explains the output."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError


def lka(dim: int, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("lka", dim=dim, **kw).double()


@pytest.mark.parametrize(("kernel_size", "dilation", "radius"), [(21, 3, 11), (9, 2, 5)])
def test_centre_output_depends_on_exactly_the_composite_window(kernel_size, dilation, radius):
    # (2d − 1) + d(⌈K/d⌉ − 1) positions per axis: 23×23 at the paper's K = 21, d = 3 (its nominal "21×21")
    m = lka(3, kernel_size=kernel_size, dilation=dilation)
    x = torch.randn(1, 31, 31, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0, 15, 15].sum(), x)
    reached = g[0].abs().sum(-1) > 0
    offsets = (torch.arange(31) - 15).abs() <= radius
    assert torch.equal(reached, offsets[:, None] & offsets[None, :])


def test_materialize_rows_hold_the_23x23_window():
    m = lka(2)
    a = m.materialize(torch.randn(1, 25, 25, 2, dtype=torch.float64))
    centre = a[0, :, 12 * 25 + 12].reshape(2, 25, 25)
    offsets = (torch.arange(25) - 12).abs() <= 11
    assert torch.equal(centre != 0, (offsets[:, None] & offsets[None, :]).expand(2, 25, 25))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_delta_kernels_by_hand(impl):
    # depthwise tap (0, 4) of the 5×5 reads offset (−2, +2); dilated tap (6, 3) of the 7×7 reads 3·(+3, 0):
    # the attention at (r, c) is the input at (r + 7, c + 2), channels mixed by W_1 — zero unless the
    # intermediate position (r + 9, c) is on the grid too (each convolution zero-pads its own input): r < 3
    m = lka(2)
    with torch.no_grad():
        for conv in (m.depthwise, m.dilated, m.pointwise):
            conv.weight.zero_()
            conv.bias.zero_()
        m.depthwise.weight[:, 0, 0, 4] = 1.0
        m.dilated.weight[:, 0, 6, 3] = 1.0
        m.pointwise.weight[0, 1, 0, 0] = 2.0  # attention channel 0 = 2 · shifted input channel 1
        m.pointwise.bias[1] = 1.0  # attention channel 1 = 1: output channel 1 = x
    x = torch.randn(1, 12, 12, 2, dtype=torch.float64)
    shifted = torch.zeros_like(x)
    shifted[:, :3, :-2] = x[:, 7:10, 2:]
    want = torch.stack([x[..., 0] * 2.0 * shifted[..., 1], x[..., 1]], -1)
    torch.testing.assert_close(m(x, impl=impl), want)


@pytest.mark.parametrize("van_attention", [False, True])
def test_materialize_explains_the_output(van_attention):
    m = lka(3, van_attention=van_attention)
    x = torch.randn(2, 6, 7, 3, dtype=torch.float64)
    mixing = m.materialize(x)  # (batch, C, N, N)
    inner = torch.nn.functional.gelu(m.proj_in(x)) if van_attention else x
    with torch.no_grad():  # β: the depthwise convolutions' biases carried through the zero padding
        beta = m.dilated(m.depthwise(torch.zeros(1, 3, 6, 7, dtype=torch.float64))).permute(0, 2, 3, 1).reshape(1, 42, 3)
    tokens = inner.reshape(2, 42, 3)
    spatial = torch.einsum("bcnm,bmc->bnc", mixing, tokens) + beta
    attention = spatial @ m.pointwise.weight[:, :, 0, 0].T + m.pointwise.bias
    gated = (tokens * attention).reshape(2, 6, 7, 3)
    want = x + m.proj_out(gated) if van_attention else gated
    torch.testing.assert_close(m(x), want)
    assert torch.equal(mixing[0], mixing[1])  # a convolution: the same matrix for every image


def test_kernel_sizes_and_refusals():
    m = lka(4)
    assert m.depthwise.kernel_size == (5, 5) and m.dilated.kernel_size == (7, 7) and m.dilated.dilation == (3, 3)
    assert m.depthwise.padding == (2, 2) and m.dilated.padding == (9, 9)
    with pytest.raises(ParameterError, match=r"kernel_size: expected ⌈kernel_size / dilation⌉ odd"):
        lka(4, kernel_size=12, dilation=3)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention_mask: lka takes no mask"):
        m(x, attention_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="context: lka does not support cross-attention"):
        m(x, context=x)


@pytest.mark.parametrize("van_attention", [False, True])
def test_attention_path_is_the_part_linear_in_the_matrix(van_attention):
    m = lka(3, van_attention=van_attention)
    with torch.no_grad():  # without biases (β = 0, b_1 = 0, proj_2's bias 0) the core output is linear in M
        for conv in (m.depthwise, m.dilated, m.pointwise):
            conv.bias.zero_()
        if van_attention:
            m.proj_out.bias.zero_()
    x = torch.randn(2, 5, 6, 3, dtype=torch.float64)
    shortcut = x if van_attention else 0
    torch.testing.assert_close(m.attention_path(x, m.materialize(x)), m(x) - shortcut)


def test_capture_with_gradients_reaches_the_matrix():
    from attnlab.analysis.capture import capture

    m = lka(2)
    x = torch.randn(1, 5, 5, 2, dtype=torch.float64)
    with capture(m, grads=True) as att:
        m(x).square().sum().backward()
    mixing = m.materialize(x).requires_grad_(True)
    tokens = x.reshape(1, 25, 2)
    inner = tokens * (torch.einsum("bcnm,bmc->bnc", mixing, tokens) @ m.pointwise.weight[:, :, 0, 0].T)
    (want,) = torch.autograd.grad((2 * m(x).reshape(1, 25, 2).detach() * inner).sum(), mixing)
    torch.testing.assert_close(att.grads[0], want)


@pytest.mark.parametrize(("kernel_size", "dilation"), [(21, 3), (9, 2), (5, 1)])
@pytest.mark.parametrize("grid", [(7, 8), (9, 9), (4, 13)])
def test_fast_path_equals_torch_dilated_convolutions(kernel_size, dilation, grid):
    # the fast path runs the dilated convolution on the d² interleaved sub-images; the oracle is nn.Conv2d's own
    m = lka(3, kernel_size=kernel_size, dilation=dilation)
    x = torch.randn(2, *grid, 3, dtype=torch.float64)
    with torch.no_grad():
        attn = m.pointwise(m.dilated(m.depthwise(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), x * attn)
