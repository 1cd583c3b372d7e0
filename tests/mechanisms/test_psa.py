"""Polarized self-attention: each branch by hand from the paper's equations (and the official code's variant),
sequential == spatial ∘ channel, parallel == channel + spatial, materialize explains the output."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError

COMBOS = [(a, v) for a in ("parallel", "sequential") for v in ("paper", "code")]


def psa(dim: int = 8, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("psa", dim=dim, **kw).double()


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-t))


def layer_norm(t: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5) * ln.weight + ln.bias


@pytest.mark.parametrize("arrangement", ["parallel", "sequential"])
def test_channel_branch_by_hand(arrangement):
    m = psa(arrangement=arrangement)
    x = image()
    branch = m.channel
    with torch.no_grad():  # a non-trivial LayerNorm affine
        branch.norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        branch.norm.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    tokens = x.reshape(2, 12, 8)
    logits = tokens @ branch.query[0]  # W_q: C → 1 per position
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)  # softmax over the 12 positions
    z = torch.stack([sum(p[b, n] * (branch.value @ tokens[b, n]) for n in range(12)) for b in range(2)])  # (2, C/2)
    want = sigmoid(layer_norm(z @ branch.up.weight.T, branch.norm))
    torch.testing.assert_close(branch.weights(x), want)
    torch.testing.assert_close(branch.weights_reference(x), want)
    torch.testing.assert_close(m.branch_weights(x)[0], p.reshape(2, 3, 4))
    torch.testing.assert_close(branch(x), x * want[:, None, None, :])


def test_channel_branch_follows_the_spatial_softmax():
    # W_q = 0: the softmax over positions is uniform and the pooled value is W_v · mean(x); a W_q that
    # singles out one position (a large logit there) pools that position's value alone
    m = psa()
    x = image()
    branch = m.channel
    with torch.no_grad():
        branch.query.zero_()
    uniform = sigmoid(layer_norm((x.mean((1, 2)) @ branch.value.T) @ branch.up.weight.T, branch.norm))
    torch.testing.assert_close(branch.weights(x), uniform)
    spike = x.clone()
    spike[:, 1, 2, 0] = 1e3  # channel 0 huge at position (1, 2): W_q = e_0 puts all the softmax mass there
    with torch.no_grad():
        branch.query.copy_(torch.eye(8)[:1])
    single = sigmoid(layer_norm((spike[:, 1, 2] @ branch.value.T) @ branch.up.weight.T, branch.norm))
    torch.testing.assert_close(branch.weights(spike), single)


@pytest.mark.parametrize("arrangement", ["parallel", "sequential"])
def test_spatial_branch_by_hand(arrangement):
    m = psa(arrangement=arrangement)
    x = image()
    branch = m.spatial
    tokens = x.reshape(2, 12, 8)
    q = (tokens @ branch.query.T).mean(1)  # GAP(W_q' X), (2, C/2)
    s = torch.exp(q) / torch.exp(q).sum(-1, keepdim=True)  # softmax over the C/2 channels
    want = sigmoid(torch.einsum("bd,bnd->bn", s, tokens @ branch.value.T)).reshape(2, 3, 4)
    torch.testing.assert_close(branch.weights(x), want)
    torch.testing.assert_close(branch.weights_reference(x), want)


def test_official_code_variants_by_hand():
    x = image()
    tokens = x.reshape(2, 12, 8)
    softmax = torch.nn.functional.softmax
    # PSA_p: no LayerNorm; spatial softmax over the positions after the product
    m = psa(arrangement="parallel", variant="code")
    assert m.channel.norm is None
    p = softmax(tokens @ m.channel.query[0], 1)
    z = torch.einsum("bn,bnd->bd", p, tokens @ m.channel.value.T)
    torch.testing.assert_close(m.channel.weights(x), sigmoid(z @ m.channel.up.weight.T))
    q = (tokens @ m.spatial.query.T).mean(1)
    want = sigmoid(softmax(torch.einsum("bd,bnd->bn", q, tokens @ m.spatial.value.T), 1)).reshape(2, 3, 4)
    torch.testing.assert_close(m.spatial.weights(x), want)
    # PSA_s: bottleneck C/2 → C/8 → LN → ReLU → C with biases; each value channel softmax over the positions
    m = psa(arrangement="sequential", variant="code")
    down, up, ln = m.channel.down, m.channel.up, m.channel.norm
    assert (down.in_features, down.out_features, up.in_features, up.out_features) == (4, 1, 1, 8)  # C/2, C/8, C
    p = softmax(tokens @ m.channel.query[0], 1)
    z = torch.einsum("bn,bnd->bd", p, tokens @ m.channel.value.T)
    hidden = torch.relu(layer_norm(z @ down.weight.T + down.bias, ln))
    torch.testing.assert_close(m.channel.weights(x), sigmoid(hidden @ up.weight.T + up.bias))
    q = (tokens @ m.spatial.query.T).mean(1)
    want = sigmoid(torch.einsum("bd,bnd->bn", q, softmax(tokens @ m.spatial.value.T, 1))).reshape(2, 3, 4)
    torch.testing.assert_close(m.spatial.weights(x), want)


@pytest.mark.parametrize(("arrangement", "variant"), COMBOS)
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_arrangements_compose_the_branch_modules(arrangement, variant, impl):
    m = psa(dim=16, arrangement=arrangement, variant=variant)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    channel, spatial = m.channel(x), m.spatial(x)
    want = m.spatial(channel) if arrangement == "sequential" else channel + spatial
    torch.testing.assert_close(m(x, impl=impl), want)
    # sequential: the spatial gate is computed on Z^ch, not on x
    if arrangement == "sequential":
        assert (m.spatial(channel) - spatial * m.channel.weights(x)[:, None, None, :]).abs().max() > 1e-6


@pytest.mark.parametrize(("arrangement", "variant"), COMBOS)
def test_materialize_explains_the_output(arrangement, variant):
    m = psa(dim=16, arrangement=arrangement, variant=variant)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    a = m.materialize(x)
    assert a.shape == (2, 16, 15, 15)
    tokens = x.reshape(2, 15, 16)
    torch.testing.assert_close(torch.einsum("bcnm,bmc->bnc", a, tokens).reshape(x.shape), m(x))
    p, a_ch, a_sp = m.branch_weights(x)
    gains = a_ch[:, None, None, :] * a_sp[..., None] if arrangement == "sequential" else a_ch[:, None, None, :] + a_sp[..., None]
    torch.testing.assert_close(torch.diagonal(a, dim1=-2, dim2=-1), gains.reshape(2, 15, 16).transpose(1, 2))


def test_refusals():
    with pytest.raises(ParameterError, match="dim: expected >= 8"):
        attnlab.build("psa", dim=4, arrangement="sequential", variant="code")
    with pytest.raises(ParameterError, match="variant"):
        attnlab.build("psa", dim=8, variant="official")
    m = psa()
    with pytest.raises(ValueError, match="key_padding_mask: psa takes no mask"):
        m(image(), key_padding_mask=torch.zeros(2, 12, dtype=torch.bool))


def test_attention_path_is_the_output():
    m = psa(arrangement="sequential")
    x = image()
    torch.testing.assert_close(m.attention_path(x, m.materialize(x)), m(x))
