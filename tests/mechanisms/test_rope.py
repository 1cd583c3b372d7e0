"""RoPE: frequencies, the rotation by hand, relative positions, attention against an independent computation."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.dense.rope import (
    apply_rope,
    rope_attention,
    rope_attention_reference,
    rope_frequencies,
)


def rotation(p: float, thetas: list[float]) -> torch.Tensor:
    """The block rotation R(p·θ) for the half-split layout: plane m = channels (m, m + d/2)."""
    half = len(thetas)
    r = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for m, th in enumerate(thetas):
        c, s = math.cos(p * th), math.sin(p * th)
        r[m, m], r[m, m + half] = c, -s
        r[m + half, m], r[m + half, m + half] = s, c
    return r


def hand_rope_attention(q, k, v, base=10000.0, causal=False, kpm=None):
    """Rotate every vector with an explicit matrix, then softmax attention the plain way."""
    d = q.shape[-1]
    thetas = [base ** (-2 * m / d) for m in range(d // 2)]
    n_q, n_k = q.shape[2], k.shape[2]
    qr = torch.stack([q[:, :, i] @ rotation(i + n_k - n_q, thetas).T for i in range(n_q)], dim=2)
    kr = torch.stack([k[:, :, j] @ rotation(j, thetas).T for j in range(n_k)], dim=2)
    s = torch.einsum("bhid,bhjd->bhij", qr, kr) / math.sqrt(d)
    if causal:
        for i in range(n_q):
            s[:, :, i, i + n_k - n_q + 1 :] = float("-inf")
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    w = torch.softmax(s, dim=-1)
    return w @ v, w


def test_frequencies_by_hand():
    got = rope_frequencies(8, 10000.0)
    want = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)  # 10000^(-2m/8)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rope_frequencies(4, 100.0), torch.tensor([1.0, 0.1], dtype=torch.float64))


def test_rotation_of_a_unit_vector_is_half_split():
    # e_0 lies in plane 0 = channels (0, 2), θ_0 = 1: at position p it becomes cos p·e_0 + sin p·e_2
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    out = apply_rope(x, torch.tensor([0, 1, 2]))
    for p in range(3):
        torch.testing.assert_close(out[p], torch.tensor([math.cos(p), 0.0, math.sin(p), 0.0], dtype=torch.float64))
    # e_1 lies in plane 1 = channels (1, 3), θ_1 = 10000^(-1/2) = 0.01
    y = apply_rope(torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([5]))
    torch.testing.assert_close(y[0], torch.tensor([0.0, math.cos(0.05), 0.0, math.sin(0.05)], dtype=torch.float64))


def test_rotation_keeps_norms_and_scores_depend_on_offset_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, generator=g, dtype=torch.float64)
    pos = torch.arange(20)
    qr, kr = apply_rope(q.expand(20, 6), pos), apply_rope(k.expand(20, 6), pos)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(20))
    scores = qr @ kr.T  # scores[i, j] depends on i − j only
    for off in (-3, 0, 4):
        diag = torch.diagonal(scores, offset=off)
        torch.testing.assert_close(diag, diag[0].expand_as(diag))


@pytest.mark.parametrize("causal", [False, True])
def test_functional_matches_hand_computation(causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 5:] = False
    want, w_want = hand_rope_attention(q, k, v, causal=causal, kpm=kpm)
    torch.testing.assert_close(rope_attention(q, k, v, causal=causal, attention_mask=kpm), want)
    out, w = rope_attention_reference(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w, w_want)


def test_base_changes_the_rotation():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    want, _ = hand_rope_attention(q, k, v, base=7.0)
    torch.testing.assert_close(rope_attention(q, k, v, base=7.0), want)
    assert not torch.allclose(rope_attention(q, k, v, base=7.0), rope_attention(q, k, v))


def test_cross_queries_are_bottom_right_aligned():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    full = rope_attention(q, k, v, causal=True)
    last = rope_attention(q[:, :, -3:], k, v, causal=True)  # the last 3 queries sit at 5, 6, 7
    torch.testing.assert_close(last, full[:, :, -3:])
    want, _ = hand_rope_attention(q[:, :, -3:], k, v)
    torch.testing.assert_close(rope_attention(q[:, :, -3:], k, v), want)


def test_module_decode_equals_causal_forward(stepped):
    torch.manual_seed(0)
    m = attnlab.build("rope", dim=12, heads=3, causal=True, base=500.0).double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    torch.testing.assert_close(stepped(m, x), m(x))


def test_module_weights_match_hand_computation():
    torch.manual_seed(0)
    m = attnlab.build("rope", dim=8, heads=2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    q = m.q_proj(x).view(1, 5, 2, 4).transpose(1, 2)
    k = m.k_proj(x).view(1, 5, 2, 4).transpose(1, 2)
    v = m.v_proj(x).view(1, 5, 2, 4).transpose(1, 2)
    _, w = hand_rope_attention(q, k, v)
    torch.testing.assert_close(m.materialize(x), w)


def test_odd_head_dim_is_refused():
    with pytest.raises(ParameterError, match="head_dim"):
        attnlab.build("rope", dim=6, heads=2)
    q = torch.randn(1, 1, 4, 5)
    with pytest.raises(ShapeError, match="q"):
        rope_attention(q, q, q)
    with pytest.raises(ParameterError, match="head_dim"):
        rope_frequencies(5)


def test_bad_base_and_positions():
    with pytest.raises(ParameterError, match="base"):
        attnlab.build("rope", dim=8, heads=2, base=0.5)
    with pytest.raises(ParameterError, match="base"):
        rope_frequencies(4, base=-1.0)
    with pytest.raises(ShapeError, match="positions"):
        apply_rope(torch.randn(3, 4), torch.arange(4))


def test_registry_entry():
    spec = attnlab.get("rope")
    assert spec.family == "C" and spec.paper.arxiv == "2104.09864"
    assert spec.param("base").default == 10000.0
    assert spec.supports.cross and spec.supports.decode and spec.supports.attn_mask
