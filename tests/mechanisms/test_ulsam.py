"""ULSAM: one spatial map per channel group, the residual form by hand, materialize explains the output."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError


def ulsam(dim: int, heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("ulsam", dim=dim, heads=heads).double()


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_residual_form_by_hand(impl):
    # one channel on a 1×3 image, DW = identity, PW = identity: max-pool 3×3 (padding never wins) of
    # (−3, −4, −1) is (−3, −1, −1); A = softmax(−3, −1, −1); out = x + A ⊙ x
    m = ulsam(1, 1)
    with torch.no_grad():
        m.depthwise.fill_(1.0)
        m.depthwise_bias.zero_()
        m.pointwise.fill_(1.0)
        m.pointwise_bias.zero_()
    x = torch.tensor([-3.0, -4.0, -1.0], dtype=torch.float64).reshape(1, 1, 3, 1)
    e = [math.exp(-3.0), math.exp(-1.0), math.exp(-1.0)]
    a = torch.tensor([v / sum(e) for v in e], dtype=torch.float64).reshape(1, 1, 3, 1)
    torch.testing.assert_close(m(x, impl=impl), x + a * x)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_group_maps_by_hand_with_scales_and_biases(impl):
    # two groups of one channel on a 2×2 image: every 3×3 window covers the whole image, so each group's
    # logits are equal at all positions and its map is uniform, 1/4 — whatever the weights
    m = ulsam(2, 2)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(m(x, impl=impl), 1.25 * x)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_one_spatial_map_per_group(impl):
    m = ulsam(6, 2)  # groups: channels 0-2 and 3-5
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y = m(x, impl=impl)
    maps = m.spatial_maps(x)
    assert maps.shape == (2, 2, 4, 5)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 2, dtype=torch.float64))
    # every channel of a group is scaled by its group's map: y / x − 1 = A_n
    gain = y / x - 1
    for c in range(6):
        torch.testing.assert_close(gain[..., c], maps[:, c // 3])
    # a group's map reads only its own channels
    other = x.clone()
    other[..., 3:] = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(m(other, impl=impl)[..., :3], y[..., :3])
    torch.testing.assert_close(m.spatial_maps(other)[:, 0], maps[:, 0])
    assert (m.spatial_maps(other)[:, 1] - maps[:, 1]).abs().max() > 1e-3


def test_materialize_explains_the_output_with_uneven_groups():
    m = ulsam(7, 3)  # torch.tensor_split's groups: 3, 2, 2 channels
    assert m.sizes == [3, 2, 2]
    x = torch.randn(2, 3, 4, 7, dtype=torch.float64)
    a = m.materialize(x)
    group_of = [0, 0, 0, 1, 1, 2, 2]
    tokens = x.reshape(2, 12, 7)
    mixed = torch.stack([torch.einsum("bnm,bm->bn", a[:, group_of[c]], tokens[..., c]) for c in range(7)], -1)
    torch.testing.assert_close(m(x), (tokens + mixed).reshape(x.shape))
    off_diagonal = a - torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))
    assert off_diagonal.abs().max() == 0


def test_more_groups_than_channels_refused():
    with pytest.raises(ParameterError, match=r"heads: expected an int in \[1, 4\] \(channel groups"):
        attnlab.build("ulsam", dim=4, heads=5)


def test_attention_path_is_the_residual_free_part():
    m = ulsam(5, 2)
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(m.attention_path(x, m.materialize(x)), m(x) - x)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_official_code_variant_by_hand_in_eval_mode(impl):
    # variant="code": ReLU(BN(DW x)) per channel, max-pool, ReLU(BN(PW ·)) per group's map, softmax, residual
    torch.manual_seed(0)
    m = attnlab.build("ulsam", dim=4, heads=2, variant="code").double().eval()
    with torch.no_grad():
        for norm, n in ((m.depthwise_norm, 4), (m.pointwise_norm, 2)):
            norm.running_mean.copy_(torch.linspace(-0.5, 0.5, n))
            norm.running_var.copy_(torch.linspace(0.5, 2.0, n))
            norm.weight.copy_(torch.linspace(0.8, 1.5, n))
            norm.bias.copy_(torch.linspace(-0.2, 0.3, n))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def bn_relu(t, norm):
        return torch.relu((t - norm.running_mean) / torch.sqrt(norm.running_var + 1e-5) * norm.weight + norm.bias)

    features = bn_relu(x * m.depthwise + m.depthwise_bias, m.depthwise_norm)
    pooled = torch.nn.functional.max_pool2d(features.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)
    weighted = pooled * m.pointwise
    logits = torch.stack([weighted[..., :2].sum(-1), weighted[..., 2:].sum(-1)], -1) + m.pointwise_bias
    maps = torch.softmax(bn_relu(logits, m.pointwise_norm).reshape(2, 12, 2), 1).reshape(2, 3, 4, 2)
    want = x + x * maps[..., [0, 0, 1, 1]]
    torch.testing.assert_close(m(x, impl=impl), want)


def test_official_code_variant_in_training_mode_uses_the_batch():
    torch.manual_seed(0)
    m = attnlab.build("ulsam", dim=4, heads=2, variant="code").double().train()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x, impl="fast"), m(x, impl="reference"))
    assert (m(x)[:1] - m(x[:1])).abs().max() > 1e-6  # batch statistics: an image's map depends on the others
