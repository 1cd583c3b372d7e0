"""The causal Hebbian form's two paths (numba loops, chunked PyTorch) against the float64 reference, and the path rule."""
from __future__ import annotations

import pytest
import torch

from attnlab.core.errors import ParameterError
from attnlab.kernels import compiled
from attnlab.kernels.linear_scan import hebbian_backend, linear_attention, linear_attention_reference, loops_serve

F64 = torch.float64
needs_numba = pytest.mark.skipif(compiled.numba_module() is None, reason="numba is not installed")
BACKENDS = [pytest.param("numba", marks=needs_numba), "torch"]


def features(b, h, n, dk, dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, h, n, dk, generator=g, dtype=dtype).requires_grad_()
    k = torch.rand(b, h, n, dk, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, h, n, dv, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    return q, k, v, w


def out_and_grads(fn, q, k, v, w):
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), w))


# n divides the chunk or not, a chunk past n, head dims that are not multiples of the 4 × 4 tiles,
# n = 1 (one query, one key) and chunk 1 (the state carries everything)
SHAPES = [(2, 2, 12, 4, 4, 4), (1, 3, 37, 5, 7, 16), (2, 1, 70, 8, 3, 64), (1, 2, 9, 6, 6, 64), (1, 1, 1, 3, 2, 8),
          (1, 2, 11, 4, 5, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}n{}dk{}dv{}c{}".format(*s))
def test_both_paths_equal_the_float64_reference_forward_and_backward(backend, normalize, shape):
    b, h, n, dk, dv, chunk = shape
    q, k, v, w = features(b, h, n, dk, dv)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, n // 2 :] = False  # trailing padding (all but the first key when n is small)
    keep[-1, 0] = n == 1  # a leading pad; with n = 1 keep the one key
    kw = dict(causal=True, attention_mask=keep, normalize=normalize)
    want = out_and_grads(lambda *t: linear_attention_reference(*t, **kw)[0], q, k, v, w)
    got = out_and_grads(lambda *t: linear_attention(*t, chunk_size=chunk, backend=backend, **kw), q, k, v, w)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@needs_numba
def test_loops_in_float32_match_the_float64_reference_at_a_few_thousand_tokens():
    """Stated tolerance: 1e-5 of the largest output (value and gradients) at N = 3,000, d = 32, chunk 64."""
    q, k, v, w = features(1, 2, 3000, 32, 32, dtype=torch.float32, seed=5)
    got = out_and_grads(lambda *t: linear_attention(*t, causal=True, backend="numba"), q, k, v, w)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = out_and_grads(lambda *t: linear_attention(*t, causal=True, backend="torch"), *wide, w.double())
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-5 * y.abs().max().item(), f"{name}: float32 error {err:.2e}"


@needs_numba
def test_fully_padded_rows_give_zeros_and_finite_gradients_through_the_loops():
    q, k, v, w = features(2, 2, 10, 4, 3, dtype=torch.float32)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1] = False
    out = linear_attention(q, k, v, causal=True, attention_mask=keep, backend="numba")
    assert out[1].abs().max() == 0
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out, (q, k, v), w))
    # the same as the PyTorch path, which clamps the same denominators at the same floor
    ref = linear_attention(q, k, v, causal=True, attention_mask=keep, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@needs_numba
def test_loops_give_the_same_bits_on_one_and_two_threads():
    q, k, v, w = features(2, 3, 50, 4, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = out_and_grads(lambda *t: linear_attention(*t, causal=True, chunk_size=8), q, k, v, w)
        torch.set_num_threads(2)
        two = out_and_grads(lambda *t: linear_attention(*t, causal=True, chunk_size=8), q, k, v, w)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_the_path_rule():
    q, k, v, _ = features(1, 1, 6, 2, 2, dtype=torch.float32)
    out = linear_attention(q, k, v, causal=True)
    served = compiled.numba_module() is not None
    assert ("CausalLoops" in type(out.grad_fn).__name__) == served  # the default: loops where they serve
    assert loops_serve(q, k, v, None, None) == served
    assert not loops_serve(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None)
    assert not loops_serve(q, k, v, -torch.ones(1, 1, 6), None)  # a decay takes the PyTorch path
    low = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)  # PyTorch path, not refused
    assert "CausalLoops" not in type(low.grad_fn).__name__
    torch.testing.assert_close(low.float(), out, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, backend="numba")
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, k, v, causal=False, backend="numba")
    with pytest.raises(ParameterError, match="backend"):
        linear_attention(q, k, v, causal=True, backend="loops")
    assert ("numba" in hebbian_backend()) and (("pip install" in hebbian_backend()) != served)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_sequence_gives_empty_outputs_and_gradients(backend):
    q, k, v, w = features(1, 2, 0, 4, 3)
    out, dq, dk, dv = out_and_grads(lambda *t: linear_attention(*t, causal=True, backend=backend), q, k, v, w)
    assert out.shape == (1, 2, 0, 3) and dq.shape == (1, 2, 0, 4) and dv.shape == (1, 2, 0, 3)
