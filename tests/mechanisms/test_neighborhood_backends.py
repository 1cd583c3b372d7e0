"""Neighborhood attention's two engines, forced with `backend=`: the numba loops with a bias and padding
(bit-for-bit the same on one or two threads, equal to the float64 reference forward and backward), windows with no real key,
a value width other than the head dim, large scores, the loops' exp, the three forms of the loops' forward
(lanes, register-blocked, per query) against the reference and each other with their rule, and the rule
that picks the engine (numba loops for CPU float32/float64 where numba is installed;
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
def test_loops_with_bias_and_padding_threads_and_reference(grid, kernel, dil, b, h):
    """A bias and a padding mask with dilation; bit-for-bit equal on one and two threads, and equal to the
    float64 reference forward and backward."""
    q, k, v = inputs(grid, b=b, h=h, seed=1)
    ks = (kernel,) * len(grid)
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
    assert nb.choose_backend(None, q, q, q, None) == "numba"
    assert nb.choose_backend(None, q.double(), q.double(), q.double(), None) == "numba"
    assert nb.choose_backend("torch", q, q, q, None) == "torch"
    half = q.bfloat16()
    assert nb.choose_backend(None, half, half, half, None) == "torch"
    assert nb.choose_backend(None, q, q, q, torch.zeros(2, 5, dtype=torch.float64)) == "torch"  # rpb of another dtype
    assert nb.backend_line().startswith("numba loops (numba ")
    with pytest.raises(ParameterError, match=r"backend: 'numba' cannot serve here: .*got torch.bfloat16 on cpu"):
        neighborhood_attention(half, half, half, kernel_size=3, backend="numba")
    with pytest.raises(ParameterError, match=r"backend: expected 'numba', 'torch' or None, got 'cuda'"):
        neighborhood_attention(q, q, q, kernel_size=3, backend="cuda")
    monkeypatch.setattr(compiled, "numba_module", lambda: None)  # as without numba
    assert nb.choose_backend(None, q, q, q, None) == "torch"
    assert nb.backend_line().startswith("the tiled PyTorch path: numba is not installed")
    with pytest.raises(ParameterError, match=r"backend: 'numba' cannot serve here: numba is not installed"):
        neighborhood_attention(q, q, q, kernel_size=3, backend="numba")


FORMS = [  # (form, grid, kernel, dilation, causal, dtype, head dim, value width, bias, padding)
    # lanes: lines of at least LANES_MIN_LINE; blocks at a line's ends (clamped windows) and the last block
    # moved back (a line not a multiple of the lanes); unions of keys not a multiple of 8
    ("lanes", (100,), 7, 1, False, torch.float64, 8, 8, True, True),
    ("lanes", (90,), 5, 1, True, torch.float64, 8, 16, False, True),  # causal
    ("lanes", (7, 70), (3, 7), (2, 1), False, torch.float32, 16, 8, True, True),  # dilated rows, 16 lanes
    ("lanes", (3, 4, 66), (3, 3, 5), 1, (False, True, False), torch.float64, 8, 8, False, True),
    ("lanes", (75,), 3, 1, False, torch.float32, 6, 5, False, True),  # head dims not a multiple of the lanes
    ("lanes", (45,), 13, 1, True, torch.float64, 8, 16, False, True),  # causal: the first queries see fewer keys
    ("lanes", (70,), 65, 1, False, torch.float64, 8, 8, True, False),  # a union of keys wider than four registers
    ("lanes", (6, 30), (5, 13), 1, False, torch.float32, 16, 32, True, True),
    ("lanes", (7, 23), (3, 9), (2, 1), False, torch.float64, 16, 8, True, True),
    # blocked: lines shorter than LANES_MIN_LINE, kernels there of at least BLOCKED_MIN_KERNEL
    ("blocked", (12,), 9, 1, False, torch.float64, 8, 8, True, True),  # one line: each unit transposes its keys
    ("blocked", (15,), 13, 1, True, torch.float64, 8, 16, False, True),  # causal
    ("blocked", (7, 14), (3, 9), (2, 1), False, torch.float64, 16, 8, True, True),  # dilated rows, two rows at once
    ("blocked", (3, 4, 14), (3, 3, 11), 1, (False, True, False), torch.float64, 8, 8, False, True),
    ("blocked", (6, 13), (5, 13), 1, False, torch.float32, 16, 32, True, True),
]


@pytest.mark.parametrize("form,grid,kernel,dil,causal,dtype,d,e,bias,padding", FORMS)
def test_forward_forms_reference_and_per_query_loops(monkeypatch, form, grid, kernel, dil, causal, dtype, d, e, bias,
                                                     padding):
    """The lanes or the register-blocked forward serves (counted), equals the float64 reference forward and
    backward (the backward recomputes from its logsumexp), the per-query loops, and is bit-for-bit the same
    on 1 and 2 threads; a padding mask leaves some windows without a real key (zeros). The lanes form writes its
    outputs by non-temporal stores here (STREAM_BYTES 0) where their rows are whole 64-byte lines."""
    rank = len(grid)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, *grid, x, generator=gen, dtype=dtype).requires_grad_(True) for x in (d, d, e))
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    kw = dict(kernel_size=kernel, dilation=dil, causal=causal)
    if bias:
        kw["rpb"] = torch.randn(3, *(2 * x - 1 for x in ks), generator=gen, dtype=dtype)
    if padding:
        n = math.prod(grid)
        mask = torch.rand(2, n, generator=gen) > 0.3
        mask[0, :-1] = False  # batch 0: only its last position real, most windows without a real key
        kw["attention_mask"] = mask
    grad = torch.randn(*v.shape, generator=gen, dtype=dtype)
    calls = []
    lib = engines.loops()
    name = f"forward_{form}"
    kernel_fn = getattr(lib, name)
    monkeypatch.setattr(lib, name, lambda *a: calls.append(a[-1] is True) or kernel_fn(*a))  # lanes: streamed
    monkeypatch.setattr(engines, "STREAM_BYTES", 0)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(fwd_bwd(lambda *t: neighborhood_attention(*t, **kw, backend="numba"), [q, k, v], grad))
    finally:
        torch.set_num_threads(before)
    assert calls == [form == "lanes" and e * q.element_size() % 64 == 0] * 2
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)
    want = fwd_bwd(lambda *t: neighborhood_attention_reference(*t, **kw)[0], [q, k, v], grad)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    if dtype == torch.float32:  # the reference in float64 on the same values
        kw64 = {**kw, "rpb": kw["rpb"].double()} if bias else kw
        want = fwd_bwd(lambda *t: neighborhood_attention_reference(*t, **kw64)[0],
                       [t.detach().double().requires_grad_(True) for t in (q, k, v)], grad.double())
        want = [t.float() for t in want]
    agree(runs[0], want, **tol)
    if padding:
        dead = runs[0][0].reshape(2, 3, -1, e).abs().sum(-1) == 0
        assert dead[0].any() and not dead[1].all()
    monkeypatch.setattr(engines, "BLOCKED", False)
    agree(fwd_bwd(lambda *t: neighborhood_attention(*t, **kw, backend="numba"), [q, k, v], grad), runs[0], **tol)
    assert len(calls) == 2  # the per-query loops took that call


def test_streams_rule():
    """Non-temporal output stores only for outputs of at least STREAM_BYTES whose rows start at multiples of 64 bytes."""
    big = torch.empty(engines.STREAM_BYTES // 4 + 16)  # torch's CPU allocations start at multiples of 64 bytes
    assert engines.streams(big[: engines.STREAM_BYTES // 4].view(1, -1, 16).numpy())
    assert not engines.streams(big[4 : engines.STREAM_BYTES // 4 + 4].view(1, -1, 16).numpy())  # 16 bytes off
    assert not engines.streams(big[: engines.STREAM_BYTES // 4].view(1, -1, 8).numpy())  # rows of 32 bytes
    assert not engines.streams(big[: engines.STREAM_BYTES // 4 - 16].view(1, -1, 16).numpy())  # below the size


def test_lanes_forward_large_scores():
    """Scores of ±hundreds on the lanes forward: each query's softmax taken from its own maximum (a maximum over
    the block would underflow every weight of some queries)."""
    q, k, v = inputs((80,), b=1, h=2, d=8, seed=6, spread=12.0)
    q.data[0, 0, :40] *= 4  # queries of very different score ranges in one block
    assert engines.forward_path(nb.loop_windows((80,), (7,), (1,), (False,))) == "lanes"
    grad = torch.randn(v.shape, dtype=torch.float64)
    got = fwd_bwd(lambda *t: neighborhood_attention(*t, kernel_size=7, backend="numba"), [q, k, v], grad)
    agree(got, fwd_bwd(lambda *t: neighborhood_attention_reference(*t, kernel_size=7)[0], [q, k, v], grad))


def test_forward_forms_rule(monkeypatch):
    """Consecutive keys on the last axis: lanes on lines of at least LANES_MIN_LINE, blocked on shorter lines
    (of at least QUERIES positions) with a kernel there of at least BLOCKED_MIN_KERNEL; the per-query loops
    otherwise or with BLOCKED off. Each position's run of keys is its window on that axis; windows whose runs
    move by more than one key from a position to the next have no runs."""
    small, line = engines.BLOCKED_MIN_KERNEL - 2, engines.LANES_MIN_LINE

    def path(*args):
        return engines.forward_path(nb.loop_windows(*args))

    assert path((line,), (small,), (1,), (False,)) == "lanes"
    assert path((line,), (line,), (1,), (True,)) == "lanes"
    assert path((5, line), (9, small), (1, 1), (False, True)) == "lanes"
    assert path((line - 1,), (9,), (1,), (False,)) == "blocked"
    assert path((5, line - 2), (3, 9), (2, 1), (False, True)) == "blocked"
    assert path((line - 1,), (small,), (1,), (False,)) == "per-query"  # short lines, small kernels
    assert path((30,), (9,), (2,), (False,)) == "per-query"  # dilated last axis
    assert path((30, 3), (9, 3), (1, 1), (False, False)) == "per-query"  # lines of 3
    monkeypatch.setattr(engines, "BLOCKED", False)
    assert path((line - 1,), (9,), (1,), (False,)) == path((line,), (small,), (1,), (False,)) == "per-query"
    w = nb.loop_windows((12,), (5,), (1,), (True,))
    assert w.runs[:, 0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]  # causal: first real key
    assert w.runs[:, 1].tolist() == list(range(12)) and w.runs[:3, 2].tolist() == [4, 3, 2]
    w = nb.loop_windows((12,), (5,), (1,), (False,))
    assert w.runs[:, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 7] and (w.runs[:, 1] == w.runs[:, 0] + 4).all()
    assert w.runs[:, 2].tolist() == [4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 0]
    pos = torch.arange(10)[:, None] + torch.arange(2)  # [0, 1], [1, 2], …: one key further on at each position
    real, rel = torch.ones(10, 2, dtype=torch.bool), torch.zeros(10, 2, dtype=torch.long)
    assert engines.windows([(pos, real, rel)]).runs[:, :2].tolist() == pos.tolist()
    assert engines.windows([(pos + torch.arange(10)[:, None], real, rel)]).runs is None  # two further on
