"""SELF fixed-point self-attention: the forward reaches ‖ΔZ‖/‖Z‖ < eps (checked with the map written out by hand), the
implicit-differentiation gradient equals backprop through many unrolled iterations (float64), the graph kept for the
backward does not grow with the iteration count, the paper's form collapses to uniform attention at init, and the
input-injected form keeps its tokens apart and iterates longer on sharper inputs."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.dense.self_fixed_point import StateMaps, self_fixed_point_attention

F64 = torch.float64
DIM, HEADS, N = 12, 3, 6


def _module(**kw):
    torch.manual_seed(0)
    return attnlab.build("self-fixed-point", dim=DIM, heads=HEADS, **kw).double()


def _tokens(scale=1.0, batch=2, seed=1):
    return scale * torch.randn(batch, N, DIM, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _field_by_hand(m, z, x):
    """F(Z) = W_o concat_h softmax(q_h k_hᵀ/√d) X W_v^h + b_o, q, k read from Z (or Z + X when injected), per head."""
    d = DIM // HEADS
    src = z + x if m.inject_input else z
    q, k = m.q_proj(src), m.k_proj(src)
    v = m.v_proj(x)
    heads = []
    for h in range(HEADS):
        cols = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(d), dim=-1)
        heads.append(a @ v[..., cols])
    return m.out_proj(torch.cat(heads, dim=-1))


def _relative_change(new, old):
    return ((new - old).flatten(1).norm(dim=1) / old.flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("inject", [False, True])
def test_forward_reaches_eps(inject):
    eps = 1e-8
    m = _module(eps=eps, max_iterations=200, inject_input=inject)
    x = _tokens(2.0)
    out = m(x)  # F(Z*)
    info = m.last_info
    assert bool(info.converged.all()) and (info.residual <= eps).all() and (info.iterations > 3).all(), info
    assert _relative_change(_field_by_hand(m, out, x), out) < eps
    # stopped early, the same state is measurably not a fixed point: the criterion decides where the loop ends
    short = _module(eps=eps, max_iterations=3, inject_input=inject)
    out3 = short(x)
    assert not bool(short.last_info.converged.any()) and (short.last_info.iterations == 3).all()
    assert _relative_change(_field_by_hand(short, out3, x), out3) > eps


def _unrolled(m, x, iterations):
    """Z^K by plain backprop-able iteration of the hand-written map from Z⁰ (X, or 0 when injected); the module's output
    F(Z*) is Z^{K+1}."""
    z = torch.zeros_like(x) if m.inject_input else x
    for _ in range(iterations + 1):
        z = _field_by_hand(m, z, x)
    return z


@pytest.mark.parametrize("inject", [False, True])
def test_implicit_gradient_equals_unrolled_backprop(inject):
    m = _module(eps=1e-14, max_iterations=400, inject_input=inject)
    x0 = _tokens(2.0)
    w = torch.randn(x0.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    params = list(m.parameters())
    grads = {}
    for label, run in (("implicit", lambda x: m(x)), ("unrolled", lambda x: _unrolled(m, x, 150)),
                       ("reference", lambda x: m(x, impl="reference"))):
        x = x0.clone().requires_grad_(True)
        out = run(x)
        grads[label] = (out.detach(), torch.autograd.grad((out * w).sum(), [x, *params]))
    assert m.last_info is not None and bool(m.last_info.converged.all())
    for other in ("unrolled", "reference"):
        torch.testing.assert_close(grads["implicit"][0], grads[other][0], rtol=1e-9, atol=1e-10)
        for g_implicit, g_other in zip(grads["implicit"][1], grads[other][1]):
            torch.testing.assert_close(g_implicit, g_other, rtol=1e-6, atol=1e-6)
    if inject:  # the backward solve ran and needed more than one step: (I − Jᵀ)⁻¹ is not the identity here
        assert (m.last_info.backward_iterations > 3).all()


def _saved_numel(m, x, impl):
    """Elements of the tensors autograd saves for the backward of one call."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x.clone().requires_grad_(True), impl=impl)
    return total


def test_backward_graph_does_not_grow_with_iterations():
    x = _tokens(2.0)
    fast, ref = {}, {}
    for iterations in (10, 100):
        m = _module(eps=0.0, max_iterations=iterations, inject_input=True)
        fast[iterations] = _saved_numel(m, x, "fast")
        assert int(m.last_info.iterations.min()) > 10 or iterations == 10
        ref[iterations] = _saved_numel(m, x, "reference")
    assert fast[10] == fast[100], fast
    assert ref[100] > 3 * ref[10], ref  # backprop through the iterations keeps every step's graph


def test_paper_form_collapses_to_uniform_attention_at_init():
    m = _module(eps=1e-12, max_iterations=200, inject_input=False)
    x = _tokens(2.0)
    out = m(x)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-12)  # one vector per sequence
    torch.testing.assert_close(m.materialize(x), torch.full((2, HEADS, N, N), 1 / N, dtype=F64), rtol=0, atol=1e-12)
    injected = _module(eps=1e-12, max_iterations=200, inject_input=True)
    assert (injected(x) - injected(x)[:, :1]).abs().max() > 0.1


def test_injected_form_first_state_is_standard_attention_and_iterations_grow_with_sharpness():
    m = _module(eps=1e-10, max_iterations=1, inject_input=True)
    softmax = attnlab.build("softmax", dim=DIM, heads=HEADS).double()
    softmax.load_state_dict(m.state_dict())
    x = _tokens()
    # one update: Z¹ = F(0) is multi-head softmax attention of x, and the output is F(Z¹)
    torch.testing.assert_close(m(x), _field_by_hand(m, softmax(x), x), rtol=1e-12, atol=1e-12)
    m = _module(eps=1e-10, max_iterations=400, inject_input=True)
    counts = []
    for scale in (0.5, 1.0, 2.0):
        m(_tokens(scale))
        counts.append(int(m.last_info.iterations.max()))
    assert counts[0] < counts[1] < counts[2], counts


def test_bad_arguments():
    with pytest.raises(ParameterError, match="eps"):
        _module(eps=-1.0)
    with pytest.raises(ParameterError, match="max_iterations"):
        _module(max_iterations=0)
    m = _module()
    q, k, v = m.project(_tokens())
    maps = StateMaps(m.q_proj.weight[:, :-1], m.k_proj.weight, m.out_proj.weight)
    with pytest.raises(ShapeError, match="q_weight"):
        self_fixed_point_attention(q, k, v, maps=maps)
