"""The causal Hebbian form's two paths (numba loops, chunked PyTorch) against the float64 reference, and the path rule."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.kernels import compiled, linear_scan, pool
from attnlab.kernels.linear_scan import hebbian_backend, linear_attention, linear_attention_reference, loops_serve

try:
    import resource  # per-thread page-fault counts (Unix)
except ImportError:
    resource = None

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


@pytest.mark.parametrize("threads", [1, 2])
def test_over_rows_runs_every_kernel_on_every_row_once_the_first_kernel_first(threads):
    """The units of `_over_rows` are (kernel, row) pairs: each runs once, with the arguments; the first kernel's rows
    are handed out before the second's (so its units start first, in row order)."""
    started, lock = [], threading.Lock()

    def kernel(name):
        def run(r, *args):
            with lock:
                started.append((name, r, args))
        return run

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        linear_scan._over_rows([kernel("keys"), kernel("queries")], 5, "x", 7)
    finally:
        torch.set_num_threads(before)
    assert sorted(started) == sorted((name, r, ("x", 7)) for name in ("keys", "queries") for r in range(5))
    if threads == 1:
        assert [(name, r) for name, r, _ in started] == [("keys", r) for r in range(5)] + [("queries", r) for r in range(5)]


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


# -- the elu + 1 feature map applied inside the engine (feature_map="elu+1") ---------------------------
def elu_plus_one_formula(x):
    """φ(x) = x + 1 for x > 0, e^x otherwise, from the formula (not the engine's helper)."""
    return torch.where(x > 0, x + 1, torch.exp(x.clamp_max(0)))


def raw_projections(b, h, n, dk, dv, dtype=F64, seed=0):
    """Raw q, k of both signs (some far below 0, where φ is a tiny e^x), v and an output weight w."""
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(b, h, n, dk, generator=g, dtype=dtype)
    k = 2 * torch.randn(b, h, n, dk, generator=g, dtype=dtype)
    q.view(-1)[::7] = -30.0  # φ = e^−30: the slope e^x matters, not 1
    k.view(-1)[3::11] = -90.0
    v = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    w = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}n{}dk{}dv{}c{}".format(*s))
def test_the_fused_elu_map_equals_the_float64_reference_on_mapped_inputs_forward_and_backward(backend, normalize, shape):
    """feature_map="elu+1" on raw q, k = the reference on φ(q), φ(k): value and gradients with respect to the
    raw q, k (the slope 1 or e^x), with padded keys (whose raw k is not 0 and whose φ(k) must not count)."""
    b, h, n, dk, dv, chunk = shape
    q, k, v, w = raw_projections(b, h, n, dk, dv)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, n // 2 :] = False
    keep[-1, 0] = n == 1
    kw = dict(causal=True, attention_mask=keep, normalize=normalize)
    want = out_and_grads(
        lambda q, k, v: linear_attention_reference(elu_plus_one_formula(q), elu_plus_one_formula(k), v, **kw)[0],
        q, k, v, w,
    )
    got = out_and_grads(
        lambda *t: linear_attention(*t, chunk_size=chunk, backend=backend, feature_map="elu+1", **kw), q, k, v, w
    )
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    if backend == "numba":
        out = linear_attention(q, k, v, feature_map="elu+1", **kw)
        assert "CausalLoops" in type(out.grad_fn).__name__  # the loops served, applying φ themselves


@needs_numba
def test_the_fused_map_in_float32_matches_the_float64_reference_at_a_few_thousand_tokens():
    """Stated tolerance, as for mapped inputs: 1e-5 of the largest output (value and gradients), N = 3,000."""
    q, k, v, w = raw_projections(1, 2, 3000, 32, 32, dtype=torch.float32, seed=5)
    got = out_and_grads(lambda *t: linear_attention(*t, causal=True, backend="numba", feature_map="elu+1"), q, k, v, w)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = out_and_grads(
        lambda q, k, v: linear_attention_reference(elu_plus_one_formula(q), elu_plus_one_formula(k), v, causal=True)[0],
        *wide, w.double(),
    )
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-5 * y.abs().max().item(), f"{name}: float32 error {err:.2e}"


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_loops_exponential_is_within_two_ulp_of_exp_down_to_the_underflow(dtype):
    """The loops' own e^x (no vector libm in numba): relative error <= 2 eps where e^x is a normal number,
    0 below the smallest normal's log, x + 1 above 0."""
    from attnlab.kernels import _linear_loops as loops

    x = np.concatenate([np.linspace(-800.0, 6.0, 64 * 500), [0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, -87.5, -708.5]])
    x = np.resize(x, (x.size // 64 + 1) * 64).astype(dtype).reshape(-1, 64)
    got = np.empty_like(x)
    loops._map_chunk(x, 0, x.shape[0], 64, loops.ELU1, np.ones(0, np.uint8), loops.exp_constants(np.dtype(dtype)), got)
    x64 = x.astype(np.float64)
    want = np.where(x64 > 0, x64 + 1, np.exp(np.minimum(x64, 0)))
    tiny = np.finfo(dtype).tiny
    normal = want >= 2 * tiny
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    assert rel.max() <= 2 * np.finfo(dtype).eps, f"worst relative error {rel.max():.3g}"
    assert np.all(got[~normal] <= 2 * tiny)


def test_the_linear_entry_core_takes_the_fused_map_and_equals_its_reference():
    """The "linear" module's causal core (padding mask, float64): fast = reference in value and gradients; the
    fast core runs the loops with φ inside where numba serves."""
    torch.manual_seed(0)
    m = attnlab.build("linear", dim=12, heads=3, causal=True, chunk_size=4).double()
    q, k, v, w = raw_projections(2, 3, 11, 4, 4)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 7:] = False
    fast = out_and_grads(lambda *t: m.attend(*t, attention_mask=keep), q, k, v, w)
    ref = out_and_grads(lambda *t: m.attend(*t, attention_mask=keep, impl="reference"), q, k, v, w)
    for name, x, y in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9, msg=lambda msg, name=name: f"{name}: {msg}")
    served = compiled.numba_module() is not None
    core = m.attend(q, k, v, attention_mask=keep).grad_fn.next_functions[0][0]  # under attend's reshape
    assert ("CausalLoops" in type(core).__name__) == served


def test_an_unknown_feature_map_is_refused():
    q, k, v, _ = features(1, 1, 4, 2, 2)
    with pytest.raises(ParameterError, match="feature_map"):
        linear_attention(q, k, v, causal=True, feature_map="relu")


def faults(who):
    return resource.getrusage(who).ru_minflt


@needs_numba
@pytest.mark.skipif(pool.cpus() < 2 or not hasattr(resource, "RUSAGE_THREAD"),
                    reason="needs two CPUs and per-thread counters (Linux)")
def test_on_two_threads_the_workers_not_the_caller_first_touch_the_fresh_outputs():
    """The serial part of a two-thread call stays small: the outputs (out; dq, dk, dv; 33.6 MB each, so each is a
    fresh mapping) are first written inside the rows, by the workers, so the caller itself takes almost none of
    their page faults (a zero_() or a torch op over an output in the caller would take them all, serially)."""
    q, k, v, w = raw_projections(1, 8, 16400, 64, 64, dtype=torch.float32, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        small = raw_projections(1, 8, 64, 64, 64, dtype=torch.float32)
        linear_attention(*small[:3], causal=True, feature_map="elu+1").backward(small[3])  # first-use set-up
        for backward in (False, True):
            mine, every = faults(resource.RUSAGE_THREAD), faults(resource.RUSAGE_SELF)
            out = linear_attention(q, k, v, causal=True, feature_map="elu+1")
            if backward:
                out.backward(w)
            mine, every = faults(resource.RUSAGE_THREAD) - mine, faults(resource.RUSAGE_SELF) - every
            if every < 16:
                pytest.skip(f"{every} page faults in all: the memory was not fresh, nothing to tell apart")
            assert mine <= 0.1 * every, f"backward={backward}: the caller took {mine} of {every} page faults"
            del out
    finally:
        torch.set_num_threads(before)
