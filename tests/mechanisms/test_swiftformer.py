"""SwiftFormer efficient additive attention: a tiny case by hand, the official code's steps, padding, permutations."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import testing
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.mixers.swiftformer import additive_attention, additive_attention_reference


def tiny():
    """One batch, one head, three tokens of width 2, with round numbers."""
    q = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)[None, None]
    k = torch.tensor([[0.0, 5.0], [6.0, 8.0], [-1.0, 0.0]], dtype=torch.float64)[None, None]
    w_a = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    return q, k, w_a


def test_tiny_case_by_hand():
    q, k, w_a = tiny()
    # q̂ = (0.6, 0.8), (1, 0), (0, −1); k̂ = (0, 1), (0.6, 0.8), (−1, 0)
    # s = q̂·w_a/√2 = 2.2/√2, 1/√2, −2/√2
    s = [2.2 / math.sqrt(2), 1 / math.sqrt(2), -2 / math.sqrt(2)]
    norm = math.sqrt(sum(x * x for x in s))
    z = sum(math.exp(x) for x in s)
    for token_norm, alpha in (("l2", [x / norm for x in s]), ("softmax", [math.exp(x) / z for x in s])):
        g = [alpha[0] * 0.6 + alpha[1] * 1.0, alpha[0] * 0.8 - alpha[2] * 1.0]
        want = torch.tensor([[0.0, g[1]], [0.6 * g[0], 0.8 * g[1]], [-g[0], 0.0]], dtype=torch.float64)
        got = additive_attention(q, k, w_a, token_norm=token_norm)
        ref, a = additive_attention_reference(q, k, w_a, token_norm=token_norm)
        torch.testing.assert_close(got[0, 0], want)
        torch.testing.assert_close(ref[0, 0], want)
        torch.testing.assert_close(a[0, 0], torch.tensor(alpha, dtype=torch.float64))


def official_steps(m, x):
    """The official code's forward, written out with this module's weights (one head)."""
    query = F.normalize(m.q_proj(x), dim=-1)
    key = F.normalize(m.k_proj(x), dim=-1)
    a = (query @ m.w_a[0][:, None]) * m.head_dim**-0.5
    a = F.normalize(a, dim=1)  # over the tokens
    g = (a * query).sum(dim=1, keepdim=True)
    return m.out_proj(m.transform(g * key) + query)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_one_head_is_the_official_layer(impl):
    m = attnlab.build("swiftformer", dim=6, heads=1).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x, impl=impl), official_steps(m, x))


def test_heads_pool_separately():
    """Each head has its own w_a, α and global query; T then mixes the concatenated heads."""
    m = attnlab.build("swiftformer", dim=8, heads=2, token_norm="softmax").double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    q = F.normalize(m.q_proj(x).view(1, 5, 2, 4), dim=-1)
    k = F.normalize(m.k_proj(x).view(1, 5, 2, 4), dim=-1)
    parts = []
    for h in range(2):
        alpha = torch.softmax(q[:, :, h] @ m.w_a[h] / 2.0, dim=1)
        g = (alpha[..., None] * q[:, :, h]).sum(1, keepdim=True)
        parts.append(g * k[:, :, h])
    want = m.out_proj(m.transform(torch.cat(parts, -1)) + q.reshape(1, 5, 8))
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("token_norm", ["softmax", "l2"])
def test_token_weights_over_real_tokens(token_norm):
    m = attnlab.build("swiftformer", dim=8, heads=2, token_norm=token_norm).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    kpm = torch.tensor([[True, True, False, True, True, False], [True] * 6])
    alpha = m.token_weights(x, attention_mask=kpm)
    assert alpha.shape == (2, 2, 6)
    assert alpha[0, :, ~kpm[0]].abs().max().item() == 0.0
    if token_norm == "softmax":
        assert (alpha >= 0).all()
        torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    else:
        torch.testing.assert_close(alpha.norm(dim=-1), torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("token_norm", ["softmax", "l2"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_padding_equals_the_real_tokens_alone(token_norm, impl):
    m = attnlab.build("swiftformer", dim=8, heads=2, token_norm=token_norm).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    kpm = torch.tensor([[True, False, True, True, False, True, True], [True] * 4 + [False] * 3])
    noisy = x.clone()
    noisy[~kpm] = 1e3 * torch.randn(int((~kpm).sum()), 8, dtype=torch.float64)
    y = m(noisy, attention_mask=kpm, impl=impl)
    for b in range(2):
        alone = m(x[b : b + 1, kpm[b]], impl=impl)
        torch.testing.assert_close(y[b : b + 1, kpm[b]], alone)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_token_permutation_equivariance(impl):
    m = attnlab.build("swiftformer", dim=8, heads=2).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(x[:, perm], impl=impl), m(x, impl=impl)[:, perm])
    torch.testing.assert_close(m.token_weights(x[:, perm]), m.token_weights(x)[..., perm])


def test_fully_padded_element_has_no_global_query():
    q, k, w_a = tiny()
    kpm = torch.zeros(1, 3, dtype=torch.bool)
    for token_norm in ("l2", "softmax"):
        u = additive_attention(q, k, w_a, attention_mask=kpm, token_norm=token_norm)
        u_ref, alpha = additive_attention_reference(q, k, w_a, attention_mask=kpm, token_norm=token_norm)
        assert u.abs().max().item() == 0.0 and u_ref.abs().max().item() == 0.0 and alpha.abs().max().item() == 0.0


def test_conformance_suite_with_softmax_weights():
    testing.run_all(dataclasses.replace(attnlab.get("swiftformer"), test_params={"token_norm": "softmax"}))


@pytest.mark.parametrize("token_norm", ["l2", "softmax"])
def test_float32_is_close_to_float64_at_16k_tokens_and_stays_finite_at_scale_1e3(token_norm):
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 16384, 8, generator=g) for _ in range(2))
    w_a = torch.randn(2, 8, generator=g)
    ref = additive_attention_reference(q.double(), k.double(), w_a.double(), token_norm=token_norm)[0]
    fast = additive_attention(q, k, w_a, token_norm=token_norm)
    torch.testing.assert_close(fast.double(), ref, atol=1e-6, rtol=1e-4)
    assert torch.isfinite(additive_attention(q * 1e3, k * 1e3, w_a, token_norm=token_norm)).all()


def test_bad_inputs_name_the_argument():
    q, k, w_a = tiny()
    with pytest.raises(ShapeError, match="^w_a:"):
        additive_attention(q, k, w_a[:, :1])
    with pytest.raises(ParameterError, match="token_norm"):
        additive_attention(q, k, w_a, token_norm="max")
    with pytest.raises(ParameterError, match="token_norm"):
        attnlab.build("swiftformer", dim=8, heads=2, token_norm="max")
    m = attnlab.build("swiftformer", dim=8, heads=2)
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="^context:"):
        m(x, context=x)
    with pytest.raises(ValueError, match="^attn_mask:"):
        m(x, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="^impl:"):
        m(x, impl="slow")
