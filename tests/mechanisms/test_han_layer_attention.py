"""HAN's layer attention (P113, LAM): α = 0 is the identity, the weights by hand, the official code's variant."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.mixers.han_layer_attention import han_layer_attention, han_layer_attention_reference


def test_alpha_zero_is_the_identity() -> None:
    """The paper's init α = 0: the module returns its input exactly, on (batch, L, H, W, C) features, whatever W."""
    lam = attnlab.build("han-layer-attention", dim=2 * 3 * 4).double()
    assert lam.alpha.item() == 0.0
    x = torch.randn(2, 5, 2, 3, 4, dtype=torch.float64)
    for impl in ("fast", "reference"):
        assert torch.equal(lam(x, impl=impl), x)
    assert lam.materialize(x).shape == (2, 1, 5, 5)


def test_layer_weights_by_hand() -> None:
    """Three layers of two features: F = [[1, 0], [0, 1], [1, 1]], E = F Fᵀ = [[1, 0, 1], [0, 1, 1], [1, 1, 2]];
    W = softmax of each row, F'_j = α Σ_i W_ji F_i + F_j."""
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    e, one = math.e, 1.0
    rows = [[e, one, e], [one, e, e], [e, e, e * e]]
    w = torch.tensor([[v / sum(r) for v in r] for r in rows], dtype=torch.float64)
    assert w[2, 2] == pytest.approx(math.e**2 / (2 * math.e + math.e**2))
    alpha = 0.5
    want = alpha * (w @ f[0]) + f[0]
    torch.testing.assert_close(han_layer_attention(f, alpha=alpha)[0], want)
    out, weights = han_layer_attention_reference(f, alpha=alpha)
    torch.testing.assert_close(out[0], want)
    torch.testing.assert_close(weights[0, 0], w)
    lam = attnlab.build("han-layer-attention", dim=2, alpha_init=alpha).double()
    torch.testing.assert_close(lam(f), want[None])
    torch.testing.assert_close(lam.materialize(f)[0, 0], w)


def test_negated_is_the_official_max_subtracted_energy() -> None:
    """similarity="negated": softmax(max_i E_ji − E_ji) (wwlCape/HAN's LAM_Module), i.e. the paper's with −E."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 4, 3, 2, 2, generator=gen, dtype=torch.float64) / 2
    flat = f.reshape(2, 4, -1)
    energy = flat @ flat.transpose(1, 2)
    official = torch.softmax(energy.amax(-1, keepdim=True) - energy, -1)
    want = (0.3 * (official @ flat)).reshape(f.shape) + f
    torch.testing.assert_close(han_layer_attention(f, alpha=0.3, similarity="negated"), want)
    out, weights = han_layer_attention_reference(f, alpha=0.3, similarity="negated")
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(weights[:, 0], official)
    paper = torch.softmax(energy, -1)
    assert not torch.allclose(paper, official)
    torch.testing.assert_close(han_layer_attention_reference(f, alpha=0.3)[1][:, 0], paper)


def test_missing_layers_are_no_keys() -> None:
    """A missing layer gets no weight and changes no real layer; the weights renormalise over the real layers."""
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(1, 4, 6, generator=gen, dtype=torch.float64) / 3
    keep = torch.tensor([[True, False, True, True]])
    real = f[:, [0, 2, 3]]
    want = han_layer_attention(real, alpha=0.8)
    for fn in (han_layer_attention, lambda *a, **kw: han_layer_attention_reference(*a, **kw)[0]):
        got = fn(f, alpha=0.8, attention_mask=keep)
        torch.testing.assert_close(got[:, [0, 2, 3]], want)
    w = han_layer_attention_reference(f, alpha=0.8, attention_mask=keep)[1]
    assert w[0, 0, :, 1].abs().max() == 0
    nothing = torch.zeros(1, 4, dtype=torch.bool)
    torch.testing.assert_close(han_layer_attention(f, alpha=0.8, attention_mask=nothing), f)


def test_bad_arguments() -> None:
    lam = attnlab.build("han-layer-attention", dim=12)
    with pytest.raises(ValueError, match=r"x: expected features of dim=12 values per layer"):
        lam(torch.randn(2, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="similarity: expected one of"):
        han_layer_attention(torch.randn(1, 2, 3), alpha=0.0, similarity="cosine")
    with pytest.raises(ValueError, match="attention_mask: "):
        han_layer_attention(torch.randn(1, 2, 3), alpha=0.0, attention_mask=torch.ones(1, 3, dtype=torch.bool))
