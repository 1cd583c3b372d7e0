"""Cross-covariance attention (XCiT): checked against loops written here and the paper's V·softmax(K̂ᵀQ̂) form."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.mixers.xcit import xca_attention, xca_attention_reference


def qkv(seed, b=2, h=2, n=6, d=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))


def hand_xca(q, k, v, tau):
    """One head, loops: q, k, v (n, d); A_ij = softmax_j(τ Σ_n q̂_ni k̂_nj); out_ni = Σ_j A_ij v_nj."""
    n, d = q.shape
    qn = [[q[t, i].item() / math.sqrt(sum(q[s, i].item() ** 2 for s in range(n))) for i in range(d)] for t in range(n)]
    kn = [[k[t, j].item() / math.sqrt(sum(k[s, j].item() ** 2 for s in range(n))) for j in range(d)] for t in range(n)]
    a = []
    for i in range(d):
        logits = [tau * sum(qn[t][i] * kn[t][j] for t in range(n)) for j in range(d)]
        z = sum(math.exp(x) for x in logits)
        a.append([math.exp(x) / z for x in logits])
    out = [[sum(a[i][j] * v[t, j].item() for j in range(d)) for i in range(d)] for t in range(n)]
    return torch.tensor(out, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)


def test_matches_loops_per_head_and_batch():
    q, k, v = qkv(0, n=5, d=3)
    tau = torch.tensor([0.7, 2.5], dtype=torch.float64)
    fast = xca_attention(q, k, v, temperature=tau)
    ref, a = xca_attention_reference(q, k, v, temperature=tau)
    for b in range(2):
        for h in range(2):
            want, want_a = hand_xca(q[b, h], k[b, h], v[b, h], tau[h].item())
            torch.testing.assert_close(fast[b, h], want)
            torch.testing.assert_close(ref[b, h], want)
            torch.testing.assert_close(a[b, h], want_a)


def test_equals_the_paper_form_v_times_softmax_of_khat_t_qhat():
    """The paper: XCA = V · softmax(K̂ᵀQ̂ / τ'), the softmax normalising each column (over key channels)."""
    q, k, v = qkv(1, n=8, d=4)
    q_hat = q / q.norm(dim=2, keepdim=True)
    k_hat = k / k.norm(dim=2, keepdim=True)
    a_paper = torch.softmax(k_hat.transpose(-2, -1) @ q_hat * 1.7, dim=-2)  # (d_k, d_q), columns sum to 1
    torch.testing.assert_close(xca_attention(q, k, v, temperature=1.7), v @ a_paper)


def test_channel_attention_is_dh_by_dh_and_rows_sum_to_one():
    m = attnlab.build("xcit", dim=12, heads=3).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    a = m.channel_attention(x)
    assert a.shape == (2, 3, 4, 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    assert (a > 0).all()
    # it is the matrix the module applies: out_n = A v_n, then the output projection
    v = m.v_proj(x).view(2, 10, 3, 4)
    mixed = torch.einsum("bhij,bnhj->bnhi", a, v).reshape(2, 10, 12)
    torch.testing.assert_close(m(x), m.out_proj(mixed))


def test_materialize_says_there_is_no_token_matrix():
    m = attnlab.build("xcit", dim=8, heads=2).double()
    with pytest.raises(ValueError, match="channel_attention"):
        m.materialize(torch.randn(1, 5, 8, dtype=torch.float64))
    assert attnlab.get("xcit").supports.materialize is False


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_token_permutation_equivariance(impl):
    m = attnlab.build("xcit", dim=8, heads=2).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(m(x[:, perm], impl=impl), m(x, impl=impl)[:, perm])
    torch.testing.assert_close(m.channel_attention(x[:, perm]), m.channel_attention(x))


def test_padded_tokens_enter_neither_the_norms_nor_the_covariance():
    """With padding, the real tokens get exactly what XCA over the real tokens alone gives."""
    q, k, v = qkv(2, b=2, n=7, d=3)
    kpm = torch.tensor([[True, False, True, True, False, True, True], [True] * 5 + [False] * 2])
    q_pad, k_pad, v_pad = (t.clone() for t in (q, k, v))
    for t in (q_pad, k_pad, v_pad):
        t[~kpm[:, None, :, None].expand_as(t)] = 1e3  # huge padded tokens would dominate any norm they entered
    for fn in (xca_attention, lambda *a, **kw: xca_attention_reference(*a, **kw)[0]):
        out = fn(q_pad, k_pad, v_pad, temperature=1.3, attention_mask=kpm)
        for b in range(2):
            real = kpm[b]
            alone = xca_attention_reference(q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], temperature=1.3)[0]
            torch.testing.assert_close(out[b : b + 1, :, real], alone)
            assert out[b, :, ~real].abs().max().item() == 0.0  # padded tokens are removed: zero output


def test_fully_padded_element_gives_zeros_and_finite_gradients():
    m = attnlab.build("xcit", dim=8, heads=2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1] = False
    a = m.channel_attention(x, attention_mask=kpm)
    assert a[1].abs().max().item() == 0.0
    torch.testing.assert_close(a[0].sum(-1), torch.ones(2, 4, dtype=torch.float64))
    for impl in ("fast", "reference"):
        y = m(x, attention_mask=kpm, impl=impl)
        torch.testing.assert_close(y[1], m.out_proj.bias.expand(6, 8))
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(g).all()


def test_zero_temperature_averages_the_value_channels():
    q, k, v = qkv(4)
    out = xca_attention(q, k, v, temperature=0.0)
    torch.testing.assert_close(out, v.mean(-1, keepdim=True).expand_as(v))


def test_temperature_is_learnable_per_head():
    m = attnlab.build("xcit", dim=8, heads=2).double()
    assert m.temperature.shape == (2,)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    m(x).sum().backward()
    assert m.temperature.grad is not None and (m.temperature.grad != 0).all()
    before = m.channel_attention(x)
    with torch.no_grad():
        m.temperature[1] = 5.0
    after = m.channel_attention(x)
    torch.testing.assert_close(after[:, 0], before[:, 0])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_float32_is_close_to_float64_at_16k_tokens_and_stays_finite_at_scale_1e3():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 16384, 8, generator=g) for _ in range(3))
    tau = torch.tensor([1.0, 4.0])
    ref = xca_attention_reference(q.double(), k.double(), v.double(), temperature=tau.double())[0]
    torch.testing.assert_close(xca_attention(q, k, v, temperature=tau).double(), ref, atol=1e-5, rtol=1e-4)
    big = xca_attention(q * 1e3, k * 1e3, v * 1e3, temperature=tau)
    assert torch.isfinite(big).all()


def test_bad_inputs_name_the_argument():
    q, k, v = qkv(6)
    with pytest.raises(ShapeError, match="^v:"):
        xca_attention(q, k, v[..., :2])
    with pytest.raises(ShapeError, match="^k:"):
        xca_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ParameterError, match="^temperature:"):
        xca_attention(q, k, v, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="attention_mask"):
        xca_attention(q, k, v, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    m = attnlab.build("xcit", dim=8, heads=2)
    with pytest.raises(ValueError, match="context"):
        m(torch.randn(1, 4, 8), context=torch.randn(1, 4, 8))
