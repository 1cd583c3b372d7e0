"""ALiBi: slopes, bias matrix, fast path vs reference vs a hand computation, decoding, extrapolation."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.dense.alibi import (
    ALiBi,
    ALiBiAttention,
    alibi_attention,
    alibi_attention_reference,
    alibi_bias,
    alibi_slopes,
)
from attnlab.mechanisms.dense.softmax import SoftmaxAttention

F64 = torch.float64


def hand_attention(q, k, v, bias, keep=None):
    """softmax(q kᵀ/√d + bias) v written out with torch.softmax; keep: bool (True = attend)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_slopes_8_heads_are_halvings():
    assert alibi_slopes(8, dtype=F64).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]


def test_slopes_6_heads_follow_the_paper_rule():
    # 4 heads: 2^-2, 2^-4, 2^-6, 2^-8; then every other slope of 8 heads (2^-1 .. 2^-8),
    # starting with the first: 2^-1, 2^-3.
    assert alibi_slopes(6, dtype=F64).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def test_slopes_12_heads_and_1_head():
    # 8 heads: 2^-1 .. 2^-8; 16 heads: 2^-0.5, 2^-1, 2^-1.5, ...; every other from the first: 2^-0.5, 2^-1.5, ...
    want = [2.0**-h for h in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    torch.testing.assert_close(alibi_slopes(12, dtype=F64), torch.tensor(want, dtype=F64), rtol=1e-15, atol=0)
    assert alibi_slopes(1, dtype=F64).tolist() == [2**-8]


@pytest.mark.parametrize("heads", [0, -2, 2.0, True])
def test_slopes_reject_bad_heads(heads):
    with pytest.raises(ParameterError, match="heads"):
        alibi_slopes(heads)


def test_bias_matrix_by_hand():
    # 2 heads: slopes 2^-4, 2^-8
    want0 = -torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=F64) / 16
    want1 = -torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=F64) / 256
    got = alibi_bias(2, 3, 3, dtype=F64)
    assert got.shape == (2, 3, 3)
    torch.testing.assert_close(got, torch.stack([want0, want1]), rtol=0, atol=0)


def test_bias_bottom_right_aligned_for_fewer_queries():
    # 2 queries against 4 keys: the queries sit at key positions 2 and 3
    want = -torch.tensor([[2, 1, 0, 1], [3, 2, 1, 0]], dtype=F64) / 16
    torch.testing.assert_close(alibi_bias(2, 2, 4, dtype=F64)[0], want, rtol=0, atol=0)


def test_score_term_equals_functional_bias():
    term = ALiBi(4)
    assert term(3, 5, dtype=F64).shape == (4, 3, 5)
    want = -torch.tensor([0.25, 1 / 16, 1 / 64, 1 / 256], dtype=F64)[:, None, None] * torch.tensor(
        [[2, 1, 0, 1, 2], [3, 2, 1, 0, 1], [4, 3, 2, 1, 0]], dtype=F64
    )
    torch.testing.assert_close(term(3, 5, dtype=F64), want, rtol=0, atol=0)


def _qkv(b=2, h=3, n_q=6, n_k=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(b, h, n, d, generator=g, dtype=F64, requires_grad=True)  # noqa: E731
    return make(n_q), make(n_k), make(n_k)


@pytest.mark.parametrize("causal", [False, True])
def test_fast_equals_reference_and_hand_forward_backward(causal):
    q, k, v = _qkv()
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, 4:] = False
    add = torch.randn(6, 6, dtype=F64)
    kwargs = dict(causal=causal, attention_mask=pad, attn_mask=add)
    fast = alibi_attention(q, k, v, **kwargs)
    ref, weights = alibi_attention_reference(q, k, v, **kwargs)

    # 3 heads: 2 heads' slopes 2^-4, 2^-8, then the first slope of 4 heads, 2^-2
    slopes = torch.tensor([2**-4, 2**-8, 2**-2], dtype=F64)
    i = torch.arange(6)
    dist = (i[:, None] - i[None, :]).abs().to(F64)
    keep = pad[:, None, None, :].expand(2, 3, 6, 6)
    if causal:
        keep = keep & (i[:, None] >= i[None, :])
    hand = hand_attention(q, k, v, -slopes[:, None, None] * dist + add, keep)

    torch.testing.assert_close(fast, hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref, hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 6, dtype=F64))
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (q, k, v), g)
    grads_hand = torch.autograd.grad(hand, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b, c in zip(grads_fast, grads_hand, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-12)


def test_cross_attention_bias_is_bottom_right_aligned():
    q, k, v = _qkv(n_q=2, n_k=5)
    fast = alibi_attention(q, k, v)
    rel = torch.tensor([[3, 2, 1, 0, 1], [4, 3, 2, 1, 0]], dtype=F64)
    slopes = torch.tensor([2**-4, 2**-8, 2**-2], dtype=F64)
    torch.testing.assert_close(fast, hand_attention(q, k, v, -slopes[:, None, None] * rel), rtol=1e-10, atol=1e-12)


def test_fully_masked_row_gives_zeros_and_finite_gradients():
    q, k, v = _qkv()
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0] = False
    for out in (alibi_attention(q, k, v, attention_mask=pad), alibi_attention_reference(q, k, v, attention_mask=pad)[0]):
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_module_composes_as_a_score_term():
    torch.manual_seed(0)
    alibi = ALiBiAttention(16, 4).double()
    x = torch.randn(2, 7, 16, dtype=F64)
    q, k, v = alibi.project(x)
    i = torch.arange(7)
    bias = -torch.tensor([2**-2, 2**-4, 2**-6, 2**-8], dtype=F64)[:, None, None] * (i[:, None] - i[None, :]).abs()
    hand = alibi.out_proj(alibi.merge_heads(hand_attention(q, k, v, bias)))  # 4 heads: slopes 2^-2, 2^-4, 2^-6, 2^-8
    torch.testing.assert_close(alibi(x), hand, rtol=1e-12, atol=1e-12)
    plain = SoftmaxAttention(16, 4, score_terms=[ALiBi(4)]).double()
    plain.load_state_dict(alibi.state_dict())
    torch.testing.assert_close(plain(x), hand, rtol=1e-12, atol=1e-12)
    # without the term the result differs: the bias does something
    bare = SoftmaxAttention(16, 4).double()
    bare.load_state_dict(alibi.state_dict())
    assert (bare(x) - alibi(x)).abs().max() > 1e-3


def test_materialize_shows_the_distance_penalty():
    """With q = k = 0 the logits are the bias alone: one head (slope 2^-8) gives weights ∝ exp(−|i−j|/256)."""
    m = ALiBiAttention(4, 1).double()
    with torch.no_grad():
        for p in (m.q_proj, m.k_proj):
            p.weight.zero_()
            p.bias.zero_()
    w = m.materialize(torch.randn(1, 3, 4, dtype=F64))[0, 0]
    e = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=F64) * (-(2**-8))
    want = e.exp() / e.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(w, want, rtol=1e-12, atol=1e-12)


def test_decoding_equals_causal_forward(stepped):
    torch.manual_seed(1)
    m = ALiBiAttention(16, 2, causal=True).double()
    x = torch.randn(2, 9, 16, dtype=F64)
    full = m(x)
    torch.testing.assert_close(stepped(m, x), full, rtol=1e-10, atol=1e-12)


def test_extrapolates_beyond_build_length():
    torch.manual_seed(2)
    m = ALiBiAttention(16, 2, causal=True).double()
    short, long = torch.randn(1, 8, 16, dtype=F64), torch.randn(1, 40, 16, dtype=F64)
    assert m(short).shape == (1, 8, 16)
    out = m(long)
    assert out.shape == (1, 40, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(out, m(long, impl="reference"), rtol=1e-10, atol=1e-12)
    bias = m.score_terms[0](40, 40, dtype=F64)
    assert bias[0, 39, 0].item() == -39 / 16 and bias[1, 0, 39].item() == -39 / 256


def test_registry_entry():
    spec = attnlab.get("alibi")
    assert spec.paper.arxiv == "2108.12409" and spec.paper.id is None and spec.paper.year == 2022
    assert spec.family == "C"
    s = spec.supports
    assert s.causal and s.key_padding and s.attn_mask and s.cross and s.decode
    m = attnlab.build("alibi", dim=12, heads=6)
    assert isinstance(m, ALiBiAttention)
    # 6 heads: those of 4 (2^-2, 2^-4, 2^-6, 2^-8), then every other slope of 8 heads from the first (2^-1, 2^-3)
    torch.testing.assert_close(m.score_terms[0].slopes, torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], dtype=F64))


def _official_get_slopes(n):
    """The recipe of the official code (ofirpress/attention_with_linear_biases, `get_slopes`), in its own form:
    start = ratio = 2^(−2^−(log2 n − 3)), slopes start·ratio^i; otherwise recurse on the powers of two around n."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    below = 2 ** math.floor(math.log2(n))
    return _official_get_slopes(below) + _official_get_slopes(2 * below)[0::2][: n - below]


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 7, 8, 12, 16, 24])
def test_slopes_follow_the_official_recipe(heads):
    want = torch.tensor(_official_get_slopes(heads), dtype=F64)
    torch.testing.assert_close(alibi_slopes(heads, dtype=F64), want, rtol=1e-14, atol=0)
    m = attnlab.build("alibi", dim=4 * heads, heads=heads)
    torch.testing.assert_close(m.score_terms[0].slopes, want, rtol=1e-14, atol=0)  # the module uses them
