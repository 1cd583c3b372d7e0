"""Multi-scale heads: band masks per head, checked against plain einsum computations written here."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.dense.multiscale import (
    multiscale_attention,
    multiscale_attention_reference,
)


def hand_attention(q, k, v, radii, causal=False, kpm=None):
    """Per head h, keys with |i − j| ≤ radii[h] (None/−1 = all), queries bottom-right aligned."""
    n_q, n_k = q.shape[2], k.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    keep = torch.ones(q.shape[1], n_q, n_k, dtype=torch.bool)
    for h, w in enumerate(radii):
        for i in range(n_q):
            pi = i + n_k - n_q
            for j in range(n_k):
                if (w is not None and w >= 0 and abs(pi - j) > w) or (causal and j > pi):
                    keep[h, i, j] = False
    s = s.masked_fill(~keep[None], float("-inf"))
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(nan=0.0)  # a query with no visible key gets zero weights
    return w @ v, w


def qkv(seed, b=2, h=2, n=7, d=4, n_k=None):
    g = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    return (torch.randn(b, h, n, d, generator=g, dtype=torch.float64),
            torch.randn(b, h, n_k, d, generator=g, dtype=torch.float64),
            torch.randn(b, h, n_k, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("causal", [False, True])
def test_windows_wider_than_the_sequence_give_plain_softmax(causal):
    q, k, v = qkv(0)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[0, 5:] = False
    s = torch.einsum("bhid,bhjd->bhij", q, k) / 2.0  # √d = 2
    if causal:
        s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    want = torch.softmax(s, dim=-1) @ v
    for radii in ((7, 9), (6, None), (-1, 100)):
        kw = {"radii": radii, "causal": causal, "attention_mask": kpm}
        torch.testing.assert_close(multiscale_attention(q, k, v, **kw), want)
        torch.testing.assert_close(multiscale_attention_reference(q, k, v, **kw)[0], want)


def test_window_one_is_tri_diagonal():
    torch.manual_seed(0)
    m = attnlab.build("multiscale", dim=8, heads=2, radii=(1, None)).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    a = m.materialize(x)
    i, j = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    outside = (i - j).abs() > 1
    assert a[:, 0][:, outside].abs().max().item() == 0.0
    assert (a[:, 0][:, ~outside] > 0).all()
    assert (a[:, 1] > 0).all()  # the global head sees everything


def test_window_zero_copies_the_value():
    q, k, v = qkv(1)
    out = multiscale_attention(q, k, v, radii=(0, 0))
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_scales_match_hand_computation(causal):
    q, k, v = qkv(2, h=3, n=8)
    radii = (1, 3, None)
    kpm = torch.ones(2, 8, dtype=torch.bool)
    kpm[1, 6:] = False
    want, w_want = hand_attention(q, k, v, radii, causal=causal, kpm=kpm)
    kw = {"radii": radii, "causal": causal, "attention_mask": kpm}
    fast = multiscale_attention(q, k, v, **kw)
    torch.testing.assert_close(fast, want)
    assert fast[1, 0, 7].abs().max().item() == 0.0  # window 1 around 7 holds only padded keys 6, 7
    out, w = multiscale_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w, w_want)


def test_additive_mask_is_combined_with_the_bands():
    q, k, v = qkv(3, b=1, n=6)
    bias = torch.randn(6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / 2.0 + bias
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    s[:, 0] = s[:, 0].masked_fill((i - j).abs() > 2, float("-inf"))
    want = torch.softmax(s, dim=-1) @ v
    torch.testing.assert_close(multiscale_attention(q, k, v, radii=(2, -1), attn_mask=bias), want)


def test_cross_attention_is_bottom_right_aligned():
    q, k, v = qkv(4, n=3, n_k=8)
    want, _ = hand_attention(q, k, v, (1, 2))
    torch.testing.assert_close(multiscale_attention(q, k, v, radii=(1, 2)), want)
    qf, _, _ = qkv(4, n=8)
    qf[:, :, -3:] = q
    torch.testing.assert_close(multiscale_attention(q, k, v, radii=(1, 2)), multiscale_attention(qf, k, v, radii=(1, 2))[:, :, -3:])


def test_decode_equals_causal_forward(stepped):
    torch.manual_seed(1)
    m = attnlab.build("multiscale", dim=12, heads=3, radii=(0, 2, None), causal=True).double()
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(stepped(m, x), m(x))


def test_none_and_minus_one_both_mean_global():
    torch.manual_seed(2)
    a = attnlab.build("multiscale", dim=8, heads=2, radii=(1, None)).double()
    b = attnlab.build("multiscale", dim=8, heads=2, radii=(1, -1)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    assert a.radii == (1, -1)


def test_default_windows():
    assert attnlab.build("multiscale", dim=16, heads=4).radii == (1, 3, 9, -1)
    assert attnlab.build("multiscale", dim=16, heads=1).radii == (-1,)


def test_bad_windows():
    with pytest.raises(ParameterError, match=r"radii.*heads=2.*3 scales"):
        attnlab.build("multiscale", dim=8, heads=2, radii=(1, 2, 3))
    with pytest.raises(ParameterError, match="radii"):
        attnlab.build("multiscale", dim=8, heads=2, radii=(1, -2))
    with pytest.raises(ParameterError, match="radii"):
        attnlab.build("multiscale", dim=8, heads=2, radii=(1.5, 2))
    with pytest.raises(ParameterError, match="radii"):
        attnlab.build("multiscale", dim=8, heads=2, radii=(True, 2))
    q, k, v = qkv(5)
    with pytest.raises(ParameterError, match="heads=2"):
        multiscale_attention(q, k, v, radii=(1,))


def test_registry_entry():
    spec = attnlab.get("multiscale")
    assert spec.paper.id == "P199" and spec.paper.arxiv == "1912.00544"
    assert spec.family == "A" and spec.cost == "O(N²d)" and spec.exponent == 2.0
    s = spec.supports
    assert s.causal and s.key_padding and s.attn_mask and s.cross and s.decode
    assert spec.test_params == {"radii": (1, None)}


def test_the_old_name_windows_is_refused_naming_radii():
    with pytest.raises(ParameterError, match="parameter 'windows' was renamed radii"):
        attnlab.build("multiscale", dim=8, heads=2, windows=(1, None))
    q = k = v = torch.randn(1, 2, 4, 4)
    for fn in (multiscale_attention, multiscale_attention_reference):
        with pytest.raises(TypeError, match="keyword 'windows' was renamed radii"):
            fn(q, k, v, windows=(1, None))
    with pytest.raises(TypeError, match="keyword 'windows' was renamed radii"):
        attnlab.get("multiscale").factory(8, 2, windows=(1, None))
