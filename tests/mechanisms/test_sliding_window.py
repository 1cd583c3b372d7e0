"""Sliding-window attention: exact band against loops written here, limits (w = 0, w ≥ N), decoding cache."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.sliding_window import (
    SlidingWindowAttention,
    sliding_window_attention,
    sliding_window_attention_reference,
    window_layout,
)


def hand_window(q, k, v, w, causal, kpm=None):
    """By loops: query i sees key j when |i − j| ≤ w (and j ≤ i when causal) and j is not padding."""
    b, _, n, d = q.shape
    out = torch.zeros_like(v)
    for bi in range(b):
        for i in range(n):
            js = [j for j in range(n) if abs(i - j) <= w and (not causal or j <= i) and (kpm is None or kpm[bi, j])]
            if not js:
                continue
            s = torch.einsum("hd,hjd->hj", q[bi, :, i], k[bi, :, js]) / math.sqrt(d)
            out[bi, :, i] = torch.einsum("hj,hjd->hd", torch.softmax(s, -1), v[bi, :, js])
    return out


def qkv(seed, n, b=2, h=2, d=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,w,bs", [(23, 3, 4), (23, 4, 4), (23, 9, 4), (17, 2, 8), (10, 5, 1), (31, 16, 64)])
def test_band_is_exact(n, w, bs, causal):
    q, k, v = qkv(n + w, n)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(w)) > 0.2
    want = hand_window(q, k, v, w, causal, kpm)
    kw = {"radius": w, "causal": causal, "block_size": bs, "attention_mask": kpm}
    got = sliding_window_attention(q, k, v, **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sliding_window_attention_reference(q, k, v, **kw)[0], want)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_window_zero_returns_the_values():
    q, k, v = qkv(0, 13)
    for causal in (False, True):
        torch.testing.assert_close(sliding_window_attention(q, k, v, radius=0, causal=causal, block_size=4), v)


@pytest.mark.parametrize("causal", [False, True])
def test_window_as_wide_as_the_sequence_is_full_attention(causal):
    q, k, v = qkv(1, 19)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(sliding_window_attention(q, k, v, radius=18, causal=causal, block_size=4), want)


def test_layout_reads_the_diagonal_and_ceil_w_over_b_blocks_each_side():
    for w, bs, reach in ((3, 4, 1), (4, 4, 1), (5, 4, 2), (64, 16, 4), (0, 8, 0)):
        for causal in (False, True):
            lay = window_layout(64 * 16, radius=w, block_size=bs, causal=causal)
            want = reach + 1 if causal else 2 * reach + 1
            assert lay.max_row == want
            i = torch.arange(lay.n_q_blocks)[:, None]
            j = torch.arange(lay.n_k_blocks)[None, :]
            band = ((i - j) <= reach) & ((j - i) <= (0 if causal else reach))
            assert torch.equal(lay.to_mask()[0], band)


def test_module_decodes_with_a_sliding_cache():
    torch.manual_seed(0)
    m = attnlab.build("sliding-window", dim=8, heads=2, radius=3, block_size=2, causal=True).double()
    x = torch.randn(2, 15, 8, dtype=torch.float64)
    full = m(x)
    state, outs = None, []
    for t in range(15):
        y, state = m.step(x[:, t : t + 1], state)
        assert state.length == min(t + 1, 4)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_materialize_is_zero_outside_the_band():
    torch.manual_seed(0)
    m = attnlab.build("sliding-window", dim=8, heads=2, radius=2, block_size=4).double()
    a = m.materialize(torch.randn(1, 11, 8, dtype=torch.float64))
    dist = (torch.arange(11)[:, None] - torch.arange(11)[None, :]).abs()
    assert bool((a[0][:, dist > 2] == 0).all()) and bool((a[0][:, dist <= 2] > 0).all())


def test_parameters_are_checked():
    with pytest.raises(ParameterError, match="radius"):
        attnlab.build("sliding-window", dim=8, heads=2, radius=-1)
    with pytest.raises(ParameterError, match="block_size"):
        window_layout(10, radius=2, block_size=0)
    with pytest.raises(ValueError, match="attn_mask"):
        m = attnlab.build("sliding-window", dim=8, heads=2, radius=2)
        m(torch.randn(1, 5, 8), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        attnlab.build("sliding-window", dim=8, heads=2, radius=2).step(torch.randn(1, 1, 8))


def test_old_name_window_names_radius() -> None:
    """`window` (the band's half-width) was renamed `radius`: build, the constructor and both functional ops say so."""
    with pytest.raises(ParameterError, match=r"'window' was renamed radius \(keys with \|i − j\| ≤ radius\)"):
        attnlab.build("sliding-window", dim=8, heads=2, window=2)
    with pytest.raises(TypeError, match=r"SlidingWindowAttention: keyword 'window' was renamed radius"):
        SlidingWindowAttention(8, 2, window=2)
    q = torch.randn(1, 2, 6, 4)
    for fn in (sliding_window_attention, sliding_window_attention_reference):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: keyword 'window' was renamed radius"):
            fn(q, q, q, window=2)
