"""Neighborhood attention's two engines, forced with `backend=`: the numba loops' backward in stripes
(bit-for-bit the same on one or two threads, equal to the float64 reference), windows with no real key,
a value width other than the head dim, large scores, the loops' exp, and the rule that picks the
engine (numba loops for CPU float32/float64 where numba is installed, except long windows on a sequence;
tiles otherwise) with its errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.core.errors import ParameterError
from attnlab.kernels import compiled
from attnlab.kernels import neighborhood as engines
from attnlab.mechanisms.local import neighborhood as nb
from attnlab.mechanisms.local.neighborhood import neighborhood_attention, neighborhood_attention_reference

BACKENDS = ("numba", "torch")


def inputs(grid, b=2, h=3, d=4, e=None, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, *grid, d), (b, h, *grid, d), (b, h, *grid, e or d))
    return [(spread * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_(True) for s in shapes]


def fwd_bwd(fn, tensors, grad):
    out = fn(*tensors)
    return [out, *torch.autograd.grad((out * grad).sum(), tensors)]


def agree(got, want, atol=1e-10, rtol=1e-8):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"output {i} (0: out, then the gradients)")


@pytest.mark.parametrize("grid,kernel,dil,b,h", [((200,), 5, 2, 2, 3), ((200,), 5, 2, 1, 1), ((40, 12), 3, (1, 2), 2, 3)])
def test_loops_backward_in_stripes_threads_and_reference(grid, kernel, dil, b, h):
    """Several stripes a row (checked), both phases; a bias and a padding mask; bit-for-bit equal on
    one and two threads, and equal to the float64 reference forward and backward."""
    q, k, v = inputs(grid, b=b, h=h, seed=1)
    rank = len(grid)
    ks, ds = (kernel,) * rank, dil if isinstance(dil, tuple) else (dil,) * rank
    w = nb.loop_windows(grid, ks, ds, (False,) * rank)
    assert engines._stripes(b * h, math.prod(grid), w.reach) >= 4
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(h, *(2 * x - 1 for x in ks), generator=gen, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(b, math.prod(grid), generator=gen) > 0.2
    kw = dict(kernel_size=kernel, dilation=dil, rpb=table, attention_mask=mask)
    grad = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    want = fwd_bwd(lambda *t: neighborhood_attention_reference(*t[:3], **{**kw, "rpb": t[3]})[0], [q, k, v, table], grad)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(fwd_bwd(lambda *t: neighborhood_attention(*t[:3], **{**kw, "rpb": t[3]}, backend="numba"),
                                [q, k, v, table], grad))
    finally:
        torch.set_num_threads(before)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)
    agree(runs[0], want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,kernel,causal", [((20,), 3, False), ((6, 7), (3, 5), False), ((3, 4, 5), 3, True)])
def test_windows_without_a_real_key_give_zeros(backend, grid, kernel, causal):
    """Only the last positions are real: every query whose window misses them gives 0 and gets zero
    gradients (never NaN); the rest match the reference."""
    q, k, v = inputs(grid, seed=3)
    n = math.prod(grid)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[:, -3:] = True
    kw = dict(kernel_size=kernel, causal=causal, attention_mask=mask)
    grad = torch.randn(v.shape, dtype=torch.float64)
    got = fwd_bwd(lambda *t: neighborhood_attention(*t, **kw, backend=backend), [q, k, v], grad)
    agree(got, fwd_bwd(lambda *t: neighborhood_attention_reference(*t, **kw)[0], [q, k, v], grad))
    out, dq = got[0].reshape(2, 3, n, -1), got[1].reshape(2, 3, n, -1)
    dead = out.abs().sum((0, 1, 3)) == 0
    assert 0 < int(dead.sum()) < n
    assert (dq[:, :, dead] == 0).all() and all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_width_and_large_scores(backend):
    """v's head dim differs from q's; scores of ±hundreds (softmax taken from the row's maximum)."""
    q, k, v = inputs((7, 9), d=6, e=5, seed=4, spread=12.0)
    grad = torch.randn(v.shape, dtype=torch.float64)
    kw = dict(kernel_size=(5, 3), dilation=(1, 2))
    got = fwd_bwd(lambda *t: neighborhood_attention(*t, **kw, backend=backend), [q, k, v], grad)
    assert got[0].shape == v.shape and got[0].abs().max() > 1
    agree(got, fwd_bwd(lambda *t: neighborhood_attention_reference(*t, **kw)[0], [q, k, v], grad))


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 5e-7), (np.float64, 1e-14)])
def test_loops_exp(dtype, rtol):
    lib = engines.loops()
    consts = lib.constants(np.dtype(dtype), 1.0)
    xs = np.concatenate([-np.geomspace(1e-8, 80.0, 300), [0.0]]).astype(dtype)
    got = np.array([lib._exp(x, consts) for x in xs])
    assert str(lib._exp.nopython_signatures[-1].return_type) == np.dtype(dtype).name  # float32 stays float32
    np.testing.assert_allclose(got, np.exp(xs.astype(np.float64)), rtol=rtol, atol=0)


def test_the_rule_and_its_errors(monkeypatch):
    q = torch.zeros(1, 2, 9, 4)
    assert nb.choose_backend(None, q, q, q, None, (3,)) == "numba"
    assert nb.choose_backend(None, q.double(), q.double(), q.double(), None, (3,)) == "numba"
    long_1d = nb.LONG_WINDOW_1D + 1
    assert nb.choose_backend(None, q, q, q, None, (long_1d,)) == "torch"
    assert nb.choose_backend(None, q, q, q, None, (long_1d, 3)) == "numba"
    assert nb.choose_backend("numba", q, q, q, None, (long_1d,)) == "numba"
    half = q.bfloat16()
    assert nb.choose_backend(None, half, half, half, None, (3,)) == "torch"
    assert nb.backend_line().startswith("numba loops (numba ")
    with pytest.raises(ParameterError, match=r"backend: 'numba' cannot serve here: .*got torch.bfloat16 on cpu"):
        neighborhood_attention(half, half, half, kernel_size=3, backend="numba")
    with pytest.raises(ParameterError, match=r"backend: expected 'numba', 'torch' or None, got 'cuda'"):
        neighborhood_attention(q, q, q, kernel_size=3, backend="cuda")
    monkeypatch.setattr(compiled, "numba_module", lambda: None)  # as without numba
    assert nb.choose_backend(None, q, q, q, None, (3,)) == "torch"
    assert nb.backend_line().startswith("the tiled PyTorch path: numba is not installed")
    with pytest.raises(ParameterError, match=r"backend: 'numba' cannot serve here: numba is not installed"):
        neighborhood_attention(q, q, q, kernel_size=3, backend="numba")
