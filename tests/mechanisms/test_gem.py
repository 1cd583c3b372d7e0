"""GEM self-self attention: closed forms by hand, the adaptive temperature, scale invariance, the qkv ensemble."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.dense.gem import gem_attention, gem_attention_reference

LN3 = math.log(3.0)


def hand_qkv():
    """One head, two tokens: q ∝ e_1, e_2 (different norms), k parallel tokens, v = diag(4, 8)."""
    q = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[4.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    return tuple(t[None, None] for t in (q, k, v))


def both(q, k, v, **kw):
    """The fast path and the reference's output (they must agree with the hand values alike)."""
    return gem_attention(q, k, v, **kw), gem_attention_reference(q, k, v, **kw)[0]


@pytest.mark.parametrize(
    ("branches", "want"),
    [
        # q̂ = I: A_q = softmax(ln3 · I) = [[3/4, 1/4], [1/4, 3/4]]; A_q v = [[3, 2], [1, 6]]
        ("q", [[3.0, 2.0], [1.0, 6.0]]),
        # k̂ rows both e_1: A_k uniform 1/2; A_k v = [[2, 4], [2, 4]]
        ("k", [[2.0, 4.0], [2.0, 4.0]]),
        # v̂ = I as q̂: A_v = A_q
        ("v", [[3.0, 2.0], [1.0, 6.0]]),
        # the mean of the three: W = [[2/3, 1/3], [1/3, 2/3]], W v = [[8/3, 8/3], [4/3, 16/3]]
        ("qkv", [[8 / 3, 8 / 3], [4 / 3, 16 / 3]]),
    ],
)
def test_no_iteration_closed_form_by_hand(branches, want):
    q, k, v = hand_qkv()
    want_t = torch.tensor(want, dtype=torch.float64)[None, None]
    for out in both(q, k, v, inverse_temperature=LN3, iterations=0, branches=branches):
        torch.testing.assert_close(out, want_t)


def test_one_iteration_by_hand():
    """q̂ = I → A = [[3/4, 1/4], [1/4, 3/4]] → A q̂ normalised = [3, 1]/√10, [1, 3]/√10 (cosine 0.6) →
    final A = softmax(ln3 · [[1, 0.6], [0.6, 1]]): A_00 = 3 / (3 + 3^0.6)."""
    q, k, v = hand_qkv()
    big, small = 3.0 / (3.0 + 3.0**0.6), 3.0**0.6 / (3.0 + 3.0**0.6)
    a = torch.tensor([[big, small], [small, big]], dtype=torch.float64)
    out_fast, out_ref = both(q, k, v, inverse_temperature=LN3, iterations=1, branches="q")
    for out in (out_fast, out_ref):
        torch.testing.assert_close(out[0, 0], a @ v[0, 0])
    torch.testing.assert_close(
        gem_attention_reference(q, k, v, inverse_temperature=LN3, iterations=1, branches="q")[1][0, 0], a
    )


def identity_module(iterations=0):
    """gem with heads=1, dim=4 and identity projections (no bias): q = k = v = x, out = W x."""
    m = attnlab.build("gem", dim=4, heads=1, iterations=iterations).double()
    with torch.no_grad():
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
            lin.weight.copy_(torch.eye(4, dtype=torch.float64))
            lin.bias.zero_()
    return m


def test_adaptive_temperature_by_hand_with_padding_excluded():
    """Token norms 2 and 6, head_dim 4: τ = mean norm / √4 = 2. Tokens orthogonal, so every branch's
    A = softmax(2·I) = [[e², 1], [1, e²]] / (e² + 1) and out = A x. A padded third token of norm 100
    changes neither τ nor the real tokens' outputs."""
    m = identity_module()
    x = torch.tensor([[[2.0, 0, 0, 0], [0, 6.0, 0, 0]]], dtype=torch.float64)
    e2 = math.exp(2.0)
    a = torch.tensor([[e2, 1.0], [1.0, e2]], dtype=torch.float64) / (e2 + 1.0)
    want = a @ x[0]
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl)[0], want)
    padded = torch.cat([x, torch.tensor([[[0, 0, 100.0, 0]]], dtype=torch.float64)], 1)
    keep = torch.tensor([[True, True, False]])
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(padded, attention_mask=keep, impl=impl)[0, :2], want)
    torch.testing.assert_close(m.materialize(padded, attention_mask=keep)[0, 0, :2, :2], a)


def scaled(m, name, c):
    out = attnlab.build("gem", dim=m.dim, heads=m.heads, inverse_temperature=m.inverse_temperature,
                        iterations=m.iterations).double()
    out.load_state_dict(m.state_dict())
    lin = getattr(out, name)
    with torch.no_grad():
        lin.weight.mul_(c)
        lin.bias.mul_(c)
    return out


@pytest.mark.parametrize("inverse_temperature", [None, 1.5])
def test_invariant_to_the_scale_of_the_projections(inverse_temperature):
    """The paper's L2 normalisation: the weights do not depend on the norm of W_q, W_k, W_v; the output
    is unchanged under W_q, W_k scaling and scales with W_v through v alone."""
    torch.manual_seed(0)
    m = attnlab.build("gem", dim=12, heads=3, iterations=2, inverse_temperature=inverse_temperature).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    y, w = m(x), m.materialize(x)
    for name, c in (("q_proj", 3.7), ("k_proj", 0.2)):
        other = scaled(m, name, c)
        torch.testing.assert_close(other(x), y)
        torch.testing.assert_close(other.materialize(x), w)
    other = scaled(m, "v_proj", 2.5)
    torch.testing.assert_close(other.materialize(x), w)
    bias = m.out_proj.bias
    torch.testing.assert_close(other(x) - bias, 2.5 * (y - bias))


def test_ensemble_is_the_mean_of_the_three_branches():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    kw = {"inverse_temperature": 2.0, "iterations": 1}
    singles = [gem_attention(q, k, v, branches=p, **kw) for p in "qkv"]
    torch.testing.assert_close(gem_attention(q, k, v, branches="qkv", **kw), sum(singles) / 3)
    torch.testing.assert_close(gem_attention(q, k, v, branches="kv", **kw), (singles[1] + singles[2]) / 2)


def test_bad_arguments_name_themselves():
    q, k, v = hand_qkv()
    with pytest.raises(ParameterError, match="^inverse_temperature: "):
        gem_attention(q, k, v, inverse_temperature=0.0)
    with pytest.raises(ParameterError, match="^branches: "):
        gem_attention(q, k, v, inverse_temperature=1.0, branches="qq")
    with pytest.raises(ParameterError, match="^iterations: "):
        gem_attention(q, k, v, inverse_temperature=1.0, iterations=-1)
    with pytest.raises(ParameterError, match="inverse_temperature"):
        attnlab.build("gem", dim=4, heads=1, inverse_temperature=-1.0)
    m = attnlab.build("gem", dim=4, heads=1).double()
    qkv = [torch.ones(1, 1, 2, 4, dtype=torch.float64)] * 3
    with pytest.raises(ValueError, match="^side: gem's adaptive temperature reads the token norms"):
        m.attend(*qkv)  # the adaptive temperature needs the norms
    with pytest.raises(ValueError, match="^side: expected \\(batch, n_k, s\\)"):
        m.attend(*qkv, side=torch.ones(1, 3, 1, dtype=torch.float64))
    fixed = attnlab.build("gem", dim=4, heads=1, inverse_temperature=2.0).double()
    with pytest.raises(ValueError, match="^side: gem with a fixed inverse_temperature takes no side input"):
        fixed.attend(*qkv, side=torch.ones(1, 2, 1, dtype=torch.float64))


def test_attend_with_the_side_input_equals_the_module():
    """The adaptive temperature reaches the core as the side input ‖x_n‖: attend(project(x), side=side_input(x))
    is the module's core, and other norms give another result."""
    torch.manual_seed(0)
    m = attnlab.build("gem", dim=8, heads=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = m.project(x)
    side = m.side_input(x)
    torch.testing.assert_close(side[..., 0], x.norm(dim=-1))
    core = m.attend(q, k, v, side=side)
    torch.testing.assert_close(m.out_proj(m.merge_heads(core)), m(x))
    assert not torch.allclose(m.attend(q, k, v, side=3 * side), core)
