"""FaceFormer (P222): the periodic bias by hand, the PPE's period, the alignment of the cross-attention, and the
module against nn.MultiheadAttention given FaceFormer's masks (as the official decoder layer gets them)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlab
from attnlab.mechanisms.positional.faceformer import (
    aligned_cross_attention,
    aligned_cross_attention_reference,
    alignment_mask,
    faceformer_attention,
    faceformer_attention_reference,
    periodic_bias,
    periodic_positional_encoding,
)

SLOPES_4 = (2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8)  # ALiBi's slopes for 4 heads (FaceFormer uses 4 heads)


def hand_bias(n: int, period: int) -> torch.Tensor:
    """−m_h·⌊(i − j)/p⌋ for j ≤ i, −inf above the diagonal, written with Python integers."""
    out = torch.full((4, n, n), -math.inf, dtype=torch.float64)
    for h, m in enumerate(SLOPES_4):
        for i in range(n):
            for j in range(i + 1):
                out[h, i, j] = -m * ((i - j) // period)
    return out


def test_bias_by_hand() -> None:
    bias = periodic_bias(torch.tensor(SLOPES_4, dtype=torch.float64), 7, 7, 3)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    want = hand_bias(7, 3)
    torch.testing.assert_close(bias[:, causal], want[:, causal], rtol=0, atol=0)
    assert bias[0, 6, 0] == -0.5 and bias[0, 6, 4] == 0.0 and bias[1, 5, 2] == -1 / 16  # ⌊6/3⌋=2, ⌊2/3⌋=0, ⌊3/3⌋=1


def test_module_weights_are_softmax_of_the_hand_bias() -> None:
    m = attnlab.build("faceformer", dim=16, heads=4, period=3, causal=True).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    q, k, _ = m.project(x)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4) + hand_bias(7, 3), -1)
    torch.testing.assert_close(m.materialize(x), want)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m.attend(*m.project(x), impl=impl), want @ m.project(x)[2])


def test_functional_fast_equals_reference() -> None:
    q, k, v = torch.randn(3, 2, 5, 11, 4, dtype=torch.float64)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, :3] = False
    for causal in (True, False):
        fast = faceformer_attention(q, k, v, period=4, causal=causal, attention_mask=keep)
        ref = faceformer_attention_reference(q, k, v, period=4, causal=causal, attention_mask=keep)[0]
        torch.testing.assert_close(fast, ref)


def test_ppe_by_hand_and_periodic() -> None:
    d, p = 6, 5
    pe = periodic_positional_encoding(13, d, p, dtype=torch.float64)
    for t in (0, 3, 7, 12):
        for c in range(d):
            angle = (t % p) / 10000 ** (2 * (c // 2) / d)
            assert pe[t, c].item() == pytest.approx(math.sin(angle) if c % 2 == 0 else math.cos(angle), abs=1e-15)
    torch.testing.assert_close(pe[p:], pe[:-p], rtol=0, atol=0)  # period p
    for shorter in range(1, p):
        assert not torch.allclose(pe[shorter:], pe[:-shorter]), f"PPE also periodic with {shorter}"
    torch.testing.assert_close(periodic_positional_encoding(4, d, p, start=9, dtype=torch.float64), pe[9:13])


def test_decoding_adds_the_ppe_of_the_absolute_position() -> None:
    m = attnlab.build("faceformer", dim=8, heads=2, period=3, causal=True).double()
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    state, outs = None, []
    for t in range(8):
        y, state = m.step(x[:, t : t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), m(x))
    shifted = attnlab.build("faceformer", dim=8, heads=2, period=3, causal=True, ppe=False).double()
    shifted.load_state_dict(m.state_dict())
    pe = periodic_positional_encoding(8, 8, 3, dtype=torch.float64)
    torch.testing.assert_close(shifted(x + pe), m(x))


def test_alignment_mask_by_hand() -> None:
    got = alignment_mask(3, 7, 2)
    want = torch.tensor([[1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(got, want)


@pytest.mark.parametrize("frames_per_query", [1, 2])
def test_cross_attention_sees_only_aligned_frames(frames_per_query: int) -> None:
    r = frames_per_query
    m = attnlab.build("faceformer", dim=8, heads=2, period=3, causal=True, frames_per_query=r).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    audio = torch.randn(2, 2 * 5, 8, dtype=torch.float64, requires_grad=True)
    a = m.materialize(x, context=audio)
    n_audio = audio.shape[1]
    for i in range(5):
        for j in range(n_audio):
            if r * i <= j < r * (i + 1):
                assert (a[..., i, j] > 0).all()
            else:
                assert (a[..., i, j] == 0).all(), (i, j)
    for impl in ("fast", "reference"):
        y = m(x, context=audio, impl=impl)
        for i in range(5):
            (g,) = torch.autograd.grad(y[:, i].sum(), audio, retain_graph=True)
            seen = g.abs().sum((0, 2)) > 0
            want = torch.zeros(n_audio, dtype=torch.bool)
            want[r * i : r * (i + 1)] = True
            assert torch.equal(seen, want), (impl, i, seen)


def test_motion_frame_without_audio_gets_zeros() -> None:
    q = torch.randn(1, 2, 4, 4, dtype=torch.float64)  # 4 motion frames
    k, v = torch.randn(2, 1, 2, 5, 4, dtype=torch.float64)  # 5 audio frames, r = 2: frame 2 has audio frame 4 only
    for out in (aligned_cross_attention(q, k, v, frames_per_query=2),
                aligned_cross_attention_reference(q, k, v, frames_per_query=2)[0]):
        assert out[:, :, 3].abs().max() == 0.0
        torch.testing.assert_close(out[:, :, 2], v[:, :, 4])  # one key: its value


def test_equals_multihead_attention_with_the_faceformer_masks() -> None:
    """The official decoder layer runs nn.MultiheadAttention on x + PPE with tgt_mask = the biased causal mask
    (heads, T, T) and, in cross-attention, memory_mask = True off the aligned frames; attnlab's module with the
    same weights gives the same outputs."""
    torch.manual_seed(0)
    dim, heads, n, period = 16, 4, 9, 4
    m = attnlab.build("faceformer", dim=dim, heads=heads, period=period, causal=True, frames_per_query=2).double()
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        mha.out_proj.weight.copy_(m.out_proj.weight)
        mha.out_proj.bias.copy_(m.out_proj.bias)
    x = torch.randn(1, n, dim, dtype=torch.float64)
    audio = torch.randn(1, 2 * n, dim, dtype=torch.float64)
    xp = x + periodic_positional_encoding(n, dim, period, dtype=torch.float64)
    biased = torch.zeros(heads, n, n, dtype=torch.float64)
    for h, slope in enumerate(SLOPES_4):
        for i in range(n):
            for j in range(n):
                biased[h, i, j] = -slope * ((i - j) // period) if j <= i else -math.inf
    want = mha(xp, xp, xp, attn_mask=biased, need_weights=False)[0]
    torch.testing.assert_close(m(x), want)
    memory_mask = ~alignment_mask(n, 2 * n, 2)
    want = mha(xp, audio, audio, attn_mask=memory_mask, need_weights=False)[0]
    torch.testing.assert_close(m(x, context=audio), want)
