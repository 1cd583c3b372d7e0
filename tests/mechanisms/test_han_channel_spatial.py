"""HAN's channel-spatial attention (P113, CSAM): β = 0 is the identity, the 3-D gate by hand, materialize."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.mechanisms.mixers.han_channel_spatial import (
    han_channel_spatial_attention,
    han_channel_spatial_attention_reference,
)


def test_beta_zero_is_the_identity() -> None:
    csam = attnlab.build("han-channel-spatial", dim=4).double()
    assert csam.beta.item() == 0.0
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    for impl in ("fast", "reference"):
        assert torch.equal(csam(x, impl=impl), x)


def test_gate_by_hand() -> None:
    """A kernel with one tap at offset (+1 channel, 0, −1 column): M[c, h, w] = σ(b + t·x[h, w − 1, c + 1]), 0-padded
    beyond the last channel and left of the first column; out = x + β·M ⊙ x."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    weight = torch.zeros(3, 3, 3, dtype=torch.float64)
    weight[2, 1, 0] = 1.5  # kernel index (i, j, m) reads (c + i − 1, h + j − 1, w + m − 1)
    bias, beta = torch.tensor(-0.25, dtype=torch.float64), 0.4
    gate = torch.empty(1, 4, 2, 3, dtype=torch.float64)
    for c in range(4):
        for h in range(2):
            for w in range(3):
                inside = c + 1 < 4 and w - 1 >= 0
                gate[0, c, h, w] = torch.sigmoid(bias + (1.5 * x[0, h, w - 1, c + 1] if inside else 0.0))
    want = x + beta * gate.permute(0, 2, 3, 1) * x
    torch.testing.assert_close(han_channel_spatial_attention(x, weight=weight, bias=bias, beta=beta), want)
    out, m = han_channel_spatial_attention_reference(x, weight=weight, bias=bias, beta=beta)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(m, gate)


def test_official_form_with_nn_conv3d() -> None:
    """The module equals x · (β·σ(Conv3d(x as (batch, 1, C, H, W)))) + x with torch's Conv3d holding its kernel."""
    csam = attnlab.build("han-channel-spatial", dim=6, beta_init=0.7, kernel_size=5).double()
    conv = torch.nn.Conv3d(1, 1, 5, padding=2).double()
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.copy_(csam.weight[None, None])
        conv.bias.copy_(csam.bias.reshape(1))
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    volume = x.permute(0, 3, 1, 2)[:, None]
    want = (volume * (0.7 * torch.sigmoid(conv(volume))) + volume)[:, 0].permute(0, 2, 3, 1)
    torch.testing.assert_close(csam(x), want)
    torch.testing.assert_close(csam(x, impl="reference"), want)


def test_materialize_explains_the_output() -> None:
    """out[n, c] = x[n, c] + β Σ_m A[c, n, m] x[m, c], A diagonal per channel."""
    csam = attnlab.build("han-channel-spatial", dim=3, beta_init=0.9).double()
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    a = csam.materialize(x)
    assert a.shape == (2, 3, 12, 12)
    assert (a - torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))).abs().max() == 0
    flat = x.reshape(2, 12, 3)
    mixed = torch.einsum("bcnm,bmc->bnc", a, flat)
    torch.testing.assert_close(csam(x).reshape(2, 12, 3), flat + 0.9 * mixed)


def test_even_kernel_refused() -> None:
    with pytest.raises(ValueError, match="kernel_size: expected an odd int"):
        attnlab.build("han-channel-spatial", dim=3, kernel_size=4)


def test_attention_path_is_the_part_linear_in_the_map():
    """out = x + attention_path(x, A) with A = materialize(x): the β·(A x) per channel that capture(grads=True) routes."""
    torch.manual_seed(3)
    m = attnlab.build("han-channel-spatial", dim=4, beta_init=0.7).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    a = m.materialize(x)
    torch.testing.assert_close(m(x), x + m.attention_path(x, a))
    assert not torch.allclose(m.attention_path(x, 2 * a), m.attention_path(x, a))
