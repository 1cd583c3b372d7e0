"""CoCA: the score against explicitly collinear keys, non-negative planes near the diagonal, decay with distance."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.dense.coca import (
    coca_attention,
    coca_attention_reference,
    coca_factors,
    coca_magnitudes,
    coca_scores_reference,
)


def rotation(angle_per_plane: list[float]) -> torch.Tensor:
    """Block rotation for the half-split layout (plane m = channels (m, m + d/2))."""
    half = len(angle_per_plane)
    r = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for m, a in enumerate(angle_per_plane):
        r[m, m], r[m, m + half] = math.cos(a), -math.sin(a)
        r[m + half, m], r[m + half, m + half] = math.sin(a), math.cos(a)
    return r


def hand_scores(q: torch.Tensor, tproj: torch.Tensor, base: float) -> torch.Tensor:
    """s_ij = q_iᵀ R((j − i)θ) k_ij with k_ij built collinear with q_i plane by plane (1 batch, 1 head)."""
    n_q, d = q.shape
    n_k = tproj.shape[0]
    half = d // 2
    thetas = [base ** (-2 * m / d) for m in range(half)]
    s = torch.zeros(n_q, n_k, dtype=torch.float64)
    for i in range(n_q):
        pi = i + n_k - n_q
        for j in range(n_k):
            k_ij = torch.zeros(d, dtype=torch.float64)
            for m in range(half):
                t = max(0.0, (tproj[j, m].item() + tproj[j, m + half].item()) / 2)
                k_ij[m], k_ij[m + half] = t * q[i, m], t * q[i, m + half]
            s[i, j] = q[i] @ rotation([(j - pi) * th for th in thetas]) @ k_ij
    return s


def test_magnitudes_halve_and_clip():
    t = torch.tensor([[1.0, -4.0, 3.0, 2.0]])  # planes (0, 2) and (1, 3)
    torch.testing.assert_close(coca_magnitudes(t), torch.tensor([[2.0, 0.0]]))


def test_tiny_case_by_hand():
    # d = 4, 3 tokens; q and T chosen by hand, base 10000: θ = (1, 0.01)
    q = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 1.0, 1.0], [-1.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    tp = torch.tensor([[2.0, 1.0, 0.0, 1.0], [1.0, -3.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    want = hand_scores(q, tp, 10000.0)
    # one entry fully by hand: i = 2, j = 0: |q^(0)|² = 1 + 4, t^(0) = 1, |q^(1)|² = 1 + 0, t^(1) = 1
    assert want[2, 0].item() == pytest.approx(5 * math.cos(2.0) + 1 * math.cos(0.02))
    got = coca_scores_reference(q[None, None], tp[None, None])[0, 0]
    torch.testing.assert_close(got, want)
    a, b = coca_factors(q[None, None], tp[None, None])
    torch.testing.assert_close((a @ b.transpose(-1, -2))[0, 0], want)


def test_cross_shapes_use_bottom_right_positions():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, generator=g, dtype=torch.float64)
    tp = torch.randn(5, 6, generator=g, dtype=torch.float64)
    want = hand_scores(q, tp, 50.0)
    torch.testing.assert_close(coca_scores_reference(q[None, None], tp[None, None], base=50.0)[0, 0], want)
    a, b = coca_factors(q[None, None], tp[None, None], base=50.0)
    torch.testing.assert_close((a @ b.transpose(-1, -2))[0, 0], want)


def test_each_plane_is_non_negative_near_the_diagonal():
    # one plane at a time (the other plane of q zeroed): term = |q^(m)|² t^(m) cos((i − j)θ_m)
    g = torch.Generator().manual_seed(5)
    n, d, base = 12, 4, 10000.0
    thetas = [base ** (-2 * m / d) for m in range(d // 2)]
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    for _ in range(5):
        q = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
        tp = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
        for m, th in enumerate(thetas):
            keep = torch.zeros(d, dtype=torch.float64)
            keep[m] = keep[m + d // 2] = 1.0
            s = coca_scores_reference(q * keep, tp)[0, 0]
            near = dist * th <= math.pi / 2
            assert (s[near] >= 0).all()
            a, b = coca_factors(q * keep, tp)
            assert ((a @ b.transpose(-1, -2))[0, 0][near] >= -1e-12).all()


def test_rope_can_go_negative_next_door_but_coca_cannot():
    # plain RoPE: a key opposite to the query gives a negative score at distance 1; CoCA's key follows q
    q = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    k = -q
    r = rotation([1.0, 0.01])
    assert (q @ r @ k).item() < 0
    qs = q.expand(1, 1, 2, 4)
    tp = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64).expand(1, 1, 2, 4)
    assert (coca_scores_reference(qs, tp) > 0).all()


def test_scores_decay_with_distance_for_a_repeated_token():
    # the same token at every position: s(i, i − δ) = Σ_m |q^(m)|² t^(m) cos(δθ_m) falls as δ grows while δθ_m ≤ π
    g = torch.Generator().manual_seed(6)
    n, d = 4, 4  # θ = (1, 0.01), δ ≤ 3 < π
    q = torch.randn(d, generator=g, dtype=torch.float64).expand(1, 1, n, d)
    tp = torch.randn(d, generator=g, dtype=torch.float64).abs().expand(1, 1, n, d)
    s = coca_scores_reference(q, tp)[0, 0]
    row = s[n - 1].flip(0)  # distances 0, 1, 2, 3
    assert (row[1:] <= row[:-1] + 1e-12).all()
    assert row[0] > row[-1]


@pytest.mark.parametrize("causal", [False, True])
def test_fast_matches_reference_with_masks(causal):
    g = torch.Generator().manual_seed(7)
    q, t, v = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[0, 4:] = False
    extra = torch.randn(6, 6, generator=g, dtype=torch.float64)
    kw = {"causal": causal, "attention_mask": kpm, "attn_mask": extra, "base": 30.0}
    out, w = coca_attention_reference(q, t, v, **kw)
    torch.testing.assert_close(coca_attention(q, t, v, **kw), out)
    # weights by hand from the hand scores
    s = hand_scores(q[1, 0], t[1, 0], 30.0) / 2.0 + extra
    if causal:
        s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(w[1, 0], torch.softmax(s, dim=-1))


def test_module_materialize_matches_hand_computation():
    torch.manual_seed(0)
    m = attnlab.build("coca", dim=8, heads=2, causal=True).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    q = m.q_proj(x).view(1, 5, 2, 4).transpose(1, 2)
    tp = m.k_proj(x).view(1, 5, 2, 4).transpose(1, 2)
    a = m.materialize(x)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for h in range(2):
        s = (hand_scores(q[0, h], tp[0, h], 10000.0) / 2.0).masked_fill(future, float("-inf"))
        torch.testing.assert_close(a[0, h], torch.softmax(s, dim=-1))


def test_module_decode_equals_causal_forward(stepped):
    torch.manual_seed(1)
    m = attnlab.build("coca", dim=12, heads=2, causal=True).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(stepped(m, x), m(x))


def test_bad_inputs():
    with pytest.raises(ParameterError, match="head_dim"):
        attnlab.build("coca", dim=6, heads=2)
    q = torch.randn(1, 1, 4, 3)
    with pytest.raises(ShapeError, match="q"):
        coca_attention(q, q, q)
    with pytest.raises(ParameterError, match="base"):
        attnlab.build("coca", dim=8, heads=2, base=0.0)


def test_registry_entry():
    spec = attnlab.get("coca")
    assert spec.paper.id == "P023" and spec.paper.arxiv == "2309.08646" and spec.family == "C"
    assert spec.supports.causal and spec.supports.key_padding and spec.supports.attn_mask and spec.supports.decode
