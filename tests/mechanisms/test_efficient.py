"""Efficient Attention (P228): the paper's closed forms, row sums, causal prefix softmax, decoding, memory, the
bidirectional fast path (fwd and bwd against the float64 reference, one gradient alone, strided inputs, no second
derivative, recycled buffers)."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import attnlab
from attnlab import testing
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.linear.efficient import (
    EfficientAttention,
    efficient_attention,
    efficient_attention_reference,
    efficient_terms,
)

F64 = torch.float64


def qkv(b=2, h=2, n=10, d=4, dv=3, dtype=F64, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, m, d, generator=g, dtype=dtype),
            torch.randn(b, h, m, dv, generator=g, dtype=dtype))


def close(a, b, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -- the scaling normalisation: exactly (QKᵀ/n) V -----------------------------------------------------
def test_scaling_variant_equals_dot_product_attention_with_scaling_normalisation():
    q, k, v = qkv(n=6, m=9)
    n = k.shape[2]
    close(efficient_attention(q, k, v, normalization="scaling"), (q @ k.transpose(-1, -2) / n) @ v)
    close(efficient_attention(q, k, v, normalization="scaling"), (q / math.sqrt(n)) @ ((k / math.sqrt(n)).transpose(-1, -2) @ v))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, [1, 4, 8]] = False  # n counts real keys only: the padded result is that of the 6 real keys
    padded = efficient_attention(q, k, v, normalization="scaling", attention_mask=keep)
    real = keep[0]
    close(padded[0], (q[0] @ k[0, :, real].transpose(-1, -2) / 6) @ v[0, :, real])


def test_causal_scaling_divides_by_the_number_of_visible_keys():
    q, k, v = qkv(n=7)
    out = efficient_attention(q, k, v, normalization="scaling", causal=True, chunk_size=3)
    for i in range(7):
        by_hand = sum((q[..., i, :] * k[..., j, :]).sum(-1, keepdim=True) * v[..., j, :] for j in range(i + 1)) / (i + 1)
        close(out[..., i, :], by_hand)


# -- the softmax normalisation -------------------------------------------------------------------------
def test_softmax_variant_rho_q_rows_and_rho_k_columns_sum_to_one_and_so_do_the_rows_of_a():
    q, k, v = qkv(n=8, m=11)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, -4:] = False
    t = efficient_terms(q, k, v, normalization="softmax", causal=False, attention_mask=keep)
    close(t.q.sum(-1), torch.ones(2, 2, 8, dtype=F64))  # ρ_q: softmax over features
    close(t.k.sum(2), torch.ones(2, 2, 4, dtype=F64))  # ρ_k: softmax over (real) tokens, per column
    assert t.k[1, :, -4:].abs().max() == 0
    out, a = efficient_attention_reference(q, k, v, attention_mask=keep)
    close(a.sum(-1), torch.ones(2, 2, 8, dtype=F64))  # hence A = ρ_q ρ_kᵀ has rows summing to 1
    close(a[0], torch.softmax(q[0], -1) @ torch.softmax(k[0], dim=1).transpose(-1, -2))  # written out
    close(efficient_attention(q, k, v, attention_mask=keep), a @ v)  # out = A v, the O(n d²) path


def test_causal_softmax_on_two_tokens_by_hand():
    # d = 1: ρ_q = 1, and ρ_k at step i is the softmax of k over the keys 0..i
    q = torch.tensor([0.3, -1.2], dtype=F64).reshape(1, 1, 2, 1)
    k = torch.tensor([0.5, 2.0], dtype=F64).reshape(1, 1, 2, 1)
    v = torch.tensor([1.0, -3.0], dtype=F64).reshape(1, 1, 2, 1)
    out = efficient_attention(q, k, v, causal=True)
    e0, e1 = math.exp(0.5), math.exp(2.0)
    close(out.flatten(), torch.tensor([1.0, (e0 * 1.0 + e1 * -3.0) / (e0 + e1)], dtype=F64))
    # d = 2: ρ_q weights the two per-channel prefix softmaxes
    q = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=F64).reshape(1, 1, 2, 2)
    k = torch.tensor([[0.5, -1.0], [2.0, 3.0]], dtype=F64).reshape(1, 1, 2, 2)
    out = efficient_attention(q, k, v, causal=True, chunk_size=1)
    rq = [math.exp(1) / (math.exp(1) + math.exp(-1)), math.exp(-1) / (math.exp(1) + math.exp(-1))]
    p0 = [math.exp(k[0, 0, 0, c]) / (math.exp(k[0, 0, 0, c]) + math.exp(k[0, 0, 1, c])) for c in range(2)]
    second = sum(rq[c] * (p0[c] * 1.0 + (1 - p0[c]) * -3.0) for c in range(2))
    close(out.flatten(), torch.tensor([1.0, second], dtype=F64))


@pytest.mark.parametrize("normalization", ["softmax", "scaling"])
@pytest.mark.parametrize("chunk", [3, 4, 16])
def test_causal_chunked_equals_reference_forward_and_backward(normalization, chunk):
    q, k, v = (t.requires_grad_() for t in qkv(n=12, dtype=F64, seed=2))
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, :3] = False
    keep[1, [5, 11]] = False
    w = torch.randn(2, 2, 12, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(normalization=normalization, causal=True, attention_mask=keep)
    fast = efficient_attention(q, k, v, chunk_size=chunk, **kw)
    ref, a = efficient_attention_reference(q, k, v, **kw)
    close(fast, ref)
    close(a @ v, fast)
    for gf, gr in zip(torch.autograd.grad((fast * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        close(gf, gr)
    if normalization == "softmax":  # rows with a visible real key sum to 1; the others are 0
        sums = a.sum(-1)
        close(sums[0, :, 3:], torch.ones(2, 9, dtype=F64))
        assert sums[0, :, :3].abs().max() == 0


# -- the bidirectional softmax fast path (a Function with its backward written out) ------------------------
def _grads(out, w, inputs):
    return torch.autograd.grad((out * w).sum(), inputs)


def _made_by_fast_path(out):
    node = out.grad_fn
    while type(node).__name__ == "ViewBackward0":  # `attend` reshapes its result
        node = node.next_functions[0][0]
    return type(node).__name__ == "_SoftmaxBidirectionalBackward"


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("m", [10, 13])  # self- and cross-attention
def test_bidirectional_softmax_fast_path_equals_reference_forward_and_backward(padded, m):
    q, k, v = (t.requires_grad_() for t in qkv(b=3, n=10, m=m, seed=4))
    keep = None
    if padded:
        keep = torch.ones(3, m, dtype=torch.bool)
        keep[0, [0, 4, m - 1]] = False
        keep[2] = False  # a sample with no real key: zeros, zero gradients, no NaN
    w = torch.randn(3, 2, 10, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    ref, _ = efficient_attention_reference(q, k, v, attention_mask=keep)
    expected = _grads(ref, w, (q, k, v))
    module = EfficientAttention(8, 2, head_dim=4)
    for fast in (efficient_attention(q, k, v, attention_mask=keep), module.attend(q, k, v, attention_mask=keep)):
        assert _made_by_fast_path(fast)
        close(fast, ref)
        for got, want in zip(_grads(fast, w, (q, k, v)), expected):
            close(got, want)
    if padded:
        assert efficient_attention(q, k, v, attention_mask=keep)[2].abs().max() == 0


def test_bidirectional_fast_path_gradient_of_one_input_and_strided_inputs():
    """Each gradient alone (the others not required) and transposed views as inputs and output gradient."""
    q0, k0, v0 = qkv(n=9, m=11, seed=6)
    w = torch.randn(2, 2, 3, 9, generator=torch.Generator().manual_seed(7), dtype=F64).transpose(-1, -2)
    for i in range(3):
        leaves = [t.clone().requires_grad_(j == i) for j, t in enumerate((q0, k0, v0))]
        q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in leaves)  # column-major views
        (got,) = _grads(efficient_attention(q, k, v), w, (leaves[i],))
        (want,) = _grads(efficient_attention_reference(q, k, v)[0], w, (leaves[i],))
        close(got, want)


def test_bidirectional_fast_path_refuses_a_second_derivative():
    q, k, v = (t.requires_grad_() for t in qkv(n=6, seed=8))
    (dq,) = torch.autograd.grad(efficient_attention(q, k, v).square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # never a silently wrong second derivative
        dq.sum().backward()


def test_bidirectional_fast_path_recycled_buffers_do_not_alias_live_results():
    """Large enough for the recycler (4 MiB per tensor): a second call leaves the first call's output and
    gradients as they were; each equals the closed form ρ_q(Q)(ρ_k(K)ᵀV) written with torch's autograd."""
    n = 8192  # 1 × 1 × 8192 × 64 float64 = 4 MiB
    results = []
    for seed in (9, 10):
        q, k, v = (t.requires_grad_() for t in qkv(b=1, h=1, n=n, d=64, dv=64, seed=seed))
        out = efficient_attention(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        results.append((q, k, v, out, grads))
    for q, k, v, out, grads in results:
        closed = torch.softmax(q, -1) @ (torch.softmax(k, 2).transpose(-1, -2) @ v)
        close(out, closed)
        for got, want in zip(grads, torch.autograd.grad(closed.sum(), (q, k, v))):
            close(got, want)


@pytest.mark.parametrize("normalization", ["softmax", "scaling"])
def test_step_reproduces_the_causal_forward_in_float32(normalization):
    torch.manual_seed(0)
    m = EfficientAttention(16, 2, causal=True, normalization=normalization, chunk_size=4).eval()
    x = torch.randn(2, 11, 16)
    full = m(x)
    state, outs = None, []
    for t in range(11):
        y, state = m.step(x[:, t : t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert state.count == 11 and state.memory.memory.shape == (2, 2, 8, 8)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalization", ["softmax", "scaling"])
def test_inputs_of_scale_1e3_give_finite_outputs_and_gradients(normalization, causal):
    torch.manual_seed(0)
    m = EfficientAttention(16, 2, causal=causal, normalization=normalization)
    x = (1e3 * torch.randn(2, 20, 16)).requires_grad_()
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, :5] = False
    y = m(x, attention_mask=keep)
    (g,) = torch.autograd.grad(y.square().mean(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    # the values: those of the float64 reference on the same input, to float32 accuracy of the largest entry
    m64, x64 = copy.deepcopy(m).double(), x.detach().double().requires_grad_()
    y64 = m64(x64, attention_mask=keep, impl="reference")
    (g64,) = torch.autograd.grad(y64.square().mean(), x64)
    assert (y.double() - y64).abs().max() <= 1e-4 * y64.abs().max()
    assert (g.double() - g64).abs().max() <= 0.1 * g64.abs().max()  # saturated softmax: ill-conditioned in x
    a, a64 = m.materialize(x, attention_mask=keep), m64.materialize(x64, attention_mask=keep)
    assert (a.double() - a64).abs().max() <= 1e-4 * a64.abs().max()


@pytest.mark.parametrize("causal", [False, True])
def test_65k_tokens_run_without_any_n_by_n_tensor(causal):
    """Memory O(d n + d²): at n = 65,536 no allocation (forward or backward) comes near n² floats."""
    n = 65536
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=1, n=n, d=4, dv=4, dtype=torch.float32, seed=3))
    with testing.LargestStorage() as probe:
        out = efficient_attention(q, k, v, causal=causal, chunk_size=64)
        torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(out).all()
    assert probe.largest <= 64 * 4 * n, f"largest allocation {probe.largest} bytes"  # vs 4·n² = 16 GiB


def test_scaling_variant_passes_the_conformance_suite():
    spec = dataclasses.replace(attnlab.get("efficient"), test_params={"normalization": "scaling"}, normalized=False)
    testing.run_all(spec)


def test_registry_entry_and_parameter_errors():
    spec = attnlab.get("efficient")
    assert spec.paper.id == "P228" and spec.paper.arxiv == "1812.01243" and spec.exponent == 1.0
    assert spec.supports.causal and spec.supports.cross and spec.supports.decode and not spec.supports.attn_mask
    assert spec.flops(1024, 8, 64, False) == 4 * 8 * 1024 * 64 * 64
    with pytest.raises(ParameterError, match="normalization"):
        attnlab.build("efficient", dim=16, heads=2, normalization="l2")
    q, k, v = qkv()
    with pytest.raises(ParameterError, match="normalization"):
        efficient_attention(q, k, v, normalization="Softmax")
    m = attnlab.build("efficient", dim=16, heads=2)
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 5, 16), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        m.step(torch.randn(1, 1, 16))
