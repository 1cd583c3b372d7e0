"""The numba backward of neighborhood attention (attnlab.kernels._neighborhood_backward_loops), called directly
on the loops' forward (out, logsumexp): dq, dk, dv and the bias gradient equal autograd of the float64
reference on 1-D, 2-D and 3-D grids (dilation, causal axes, a bias table, a padding mask with windows left
without a real key, a value width other than the head dim, last axes shorter than a block, long lines,
float32), by both forms of the query pass (per query; the lanes form where the lanes forward serves, including a
line's last block moved back into the previous unit's queries), bit for bit the same on one and two threads and
with gradient rows written by non-temporal stores (rows on 64 bytes) or plain ones; its tables (the windows seen
from the keys, the blocks' unions) against the windows written out; and neighborhood_attention's numba path runs
it (after either form of the forward, with the matching query pass)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.kernels import neighborhood as engines
from attnlab.mechanisms.local import neighborhood as nb
from attnlab.mechanisms.local.neighborhood import axis_windows, neighborhood_attention, neighborhood_attention_reference

bwd = pytest.importorskip("attnlab.kernels._neighborhood_backward_loops")

CASES = [  # grid, kernel, dilation, causal, head dim, value width, bias, padding ("some", "last": only the last 3 real)
    ((200,), 5, 2, False, 4, 4, True, "some"),
    ((45,), 13, 1, True, 8, 8, False, "last"),
    ((40, 12), 3, (1, 2), False, 4, 4, True, "some"),
    ((7, 9), (5, 3), (1, 2), False, 6, 5, False, None),
    ((6, 7), (3, 5), 1, False, 4, 4, False, "last"),
    ((9, 3), (3, 3), 1, (True, False), 4, 4, False, "some"),  # a last axis shorter than a block
    ((3, 4, 5), 3, 1, True, 4, 4, False, "last"),
    ((4, 6, 7), (3, 3, 5), (1, 2, 1), False, 8, 4, True, "some"),
    # long lines (the forward's lanes form)
    ((100,), 7, 1, False, 8, 8, True, "some"),
    ((70,), 65, 1, False, 8, 8, True, "some"),
    ((7, 40), (3, 5), (2, 1), (False, True), 4, 6, False, "last"),
    ((20, 17), (3, 9), 1, False, 6, 5, True, "last"),
    ((2, 3, 33), (1, 3, 7), 1, (False, False, True), 4, 4, False, "some"),
    ((261,), 9, 1, False, 4, 4, True, "some"),  # two units a line; the last block reaches back into the first unit
]


def problem(grid, kernel, dil, causal, d, e, bias, padding, dtype=torch.float64, b=2, h=3, seed=0, spread=1.0):
    """Inputs (float64 leaves for the reference), the reference's keyword arguments and the loops' windows."""
    rank, n = len(grid), math.prod(grid)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    ds = dil if isinstance(dil, tuple) else (dil,) * rank
    cs = causal if isinstance(causal, tuple) else (causal,) * rank
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (spread * torch.randn(b, h, *grid, x, generator=gen, dtype=torch.float64) for x in (d, d, e))
    kw = dict(kernel_size=ks, dilation=ds, causal=cs)
    if bias:
        kw["rpb"] = torch.randn(h, *(2 * x - 1 for x in ks), generator=gen, dtype=torch.float64)
    if padding == "some":
        kw["attention_mask"] = torch.rand(b, n, generator=gen) > 0.25
    elif padding == "last":
        mask = torch.zeros(b, n, dtype=torch.bool)
        mask[:, -3:] = True
        kw["attention_mask"] = mask
    grad = torch.randn(b, h, *grid, e, generator=gen, dtype=torch.float64)
    q, k, v, grad = (t.to(dtype) for t in (q, k, v, grad))
    if bias:
        kw["rpb"] = kw["rpb"].to(dtype)
    return (q, k, v), grad, kw, nb.loop_windows(tuple(grid), ks, ds, cs)


def rows_at(shape, dtype, offset):
    """A NaN-filled C-contiguous array of `shape` whose data start `offset` bytes past a 64-byte boundary."""
    count = math.prod(shape)
    raw = np.full(count + 128 // dtype.itemsize, np.nan, dtype)
    skip = (-raw.ctypes.data % 64 + offset) // dtype.itemsize
    return raw[skip : skip + count].reshape(shape)


def query_forms(w, dtype):
    """The forms of the backward's query pass these windows can take: per query always, lanes where the lanes
    forward could serve them (consecutive keys on the last axis, lines of at least a register's lanes)."""
    lanes = 64 // (4 if dtype == torch.float32 else 8)
    return ["per-query"] + (["lanes"] if w.runs is not None and w.runs.shape[0] >= lanes else [])


def loops_gradients(tensors, grad, kw, w, threads=1, offset=None, form="per-query"):
    """(dq, dk, dv, drpb or None) by the loops' forward (the lanes form for `form` "lanes", else per query) then the
    backward (its query pass in `form`), on `threads` threads; dq, dk, dv written into NaN-filled arrays (starting `offset` bytes past a 64-byte boundary, or wherever
    numpy puts them: None)."""
    q, k, v = tensors
    b, h, d, e = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    n, rows = math.prod(q.shape[2:-1]), b * h
    lib = engines.loops()
    dtype = np.dtype(np.float32 if q.dtype == torch.float32 else np.float64)
    consts = lib.constants(dtype, 1.0 / math.sqrt(d))
    mask = kw.get("attention_mask")
    keep = np.zeros((1, 0), np.uint8) if mask is None else mask.to(torch.uint8).numpy()
    rpb = np.zeros((h, 0), dtype) if kw.get("rpb") is None else kw["rpb"].reshape(h, -1).numpy()
    flat = [t.reshape(rows, n, -1).numpy() for t in (q, k, v, grad)]
    out, lse = np.empty((rows, n, e), dtype), np.empty((rows, n), dtype)
    if offset is None:
        dq, dk, dv = (np.full((rows, n, x), np.nan, dtype) for x in (d, d, e))
    else:
        dq, dk, dv = (rows_at((rows, n, x), dtype, offset) for x in (d, d, e))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with engines.numba_threads(threads):
            if form == "lanes":  # the forward the lanes query pass follows in neighborhood_attention
                engines._lanes(lib, *flat[:3], w, keep, h, rpb, consts, out, lse)
            else:
                lib.forward(*flat[:3], *w.pos, *w.rel, keep, h, rpb, consts, out, lse)
            drpb = bwd.backward(h, *flat[:3], out, flat[3], lse, w.pos, w.rel, keep, rpb, consts, dq, dk, dv,
                                runs=w.runs if form == "lanes" else None)
    finally:
        torch.set_num_threads(before)
    grads = [torch.from_numpy(x).view(t.shape) for x, t in zip((dq, dk, dv), tensors)]
    if kw.get("rpb") is not None:
        grads.append(torch.from_numpy(drpb.reshape(b, h, -1, drpb.shape[1]).sum(axis=(0, 2))).view(kw["rpb"].shape))
    return grads


def reference_gradients(tensors, grad, kw):
    """Autograd of the float64 reference on float64 copies of the inputs."""
    leaves = [t.detach().double().requires_grad_(True) for t in tensors]
    kw64 = dict(kw)
    if kw.get("rpb") is not None:
        kw64["rpb"] = kw["rpb"].detach().double().requires_grad_(True)
        leaves.append(kw64["rpb"])
    out = neighborhood_attention_reference(*leaves[:3], **kw64)[0]
    return list(torch.autograd.grad((out * grad.double()).sum(), leaves))


@pytest.mark.parametrize("grid,kernel,dil,causal,d,e,bias,padding", CASES)
def test_backward_equals_the_float64_reference_on_one_and_two_threads(grid, kernel, dil, causal, d, e, bias, padding):
    tensors, grad, kw, w = problem(grid, kernel, dil, causal, d, e, bias, padding)
    want = reference_gradients(tensors, grad, kw)
    for form in query_forms(w, torch.float64):
        one = loops_gradients(tensors, grad, kw, w, threads=1, form=form)
        two = loops_gradients(tensors, grad, kw, w, threads=2, form=form)
        for a, b_ in zip(one, two):
            assert torch.equal(a, b_), form
        for i, (got, ref) in enumerate(zip(one, want)):
            torch.testing.assert_close(got, ref.view(got.shape), atol=1e-10, rtol=1e-8,
                                       msg=f"{form}: gradient {i} (dq, dk, dv, drpb)")
        if padding == "last":  # queries without a real key: zero dq; keys masked out: zero dk, dv
            n = math.prod(grid)
            dead_keys = (~kw["attention_mask"])[:, None].expand(2, 3, n)
            assert (one[1].reshape(2, 3, n, -1)[dead_keys] == 0).all() and (one[2].reshape(2, 3, n, -1)[dead_keys] == 0).all()
            assert (one[0] == 0).any() and torch.isfinite(one[0]).all()


@pytest.mark.parametrize("grid", [(12, 13), (5, 37)])
def test_float32_and_large_scores(grid):
    """float32 inputs with scores of ±tens: close to the float64 reference on the same values (lines of 37: both
    forms of the query pass)."""
    tensors, grad, kw, w = problem(grid, (5, 7), 1, False, 16, 16, True, "some", dtype=torch.float32, spread=4.0)
    want = reference_gradients(tensors, grad, kw)
    forms = query_forms(w, torch.float32)
    assert len(forms) == (2 if grid[1] >= 16 else 1)
    for form in forms:
        got = loops_gradients(tensors, grad, kw, w, form=form)
        for i, (a, ref) in enumerate(zip(got, want)):
            assert a.dtype == torch.float32
            scale = ref.abs().max()
            torch.testing.assert_close(a.double() / scale, ref.view(a.shape) / scale, atol=2e-5, rtol=0,
                                       msg=f"{form}: gradient {i}")


@pytest.mark.parametrize("grid,kernel,dtype,d", [((300,), 7, torch.float32, 16), ((9, 20), (3, 5), torch.float64, 8)])
def test_rows_on_64_bytes_are_streamed_and_equal_plain_stores_and_the_reference(monkeypatch, grid, kernel, dtype, d):
    """Gradient rows that start on 64 bytes are written by non-temporal stores (`streamable` says so); the gradients
    are bit for bit those written by plain stores into rows off the boundary (one and two threads), and the
    reference's, by both forms of the query pass."""
    tensors, grad, kw, w = problem(grid, kernel, 1, False, d, d, True, "some", dtype=dtype)
    check = bwd.streamable
    itemsize = np.dtype(np.float32 if dtype == torch.float32 else np.float64).itemsize
    want = reference_gradients(tensors, grad, kw)
    forms = query_forms(w, dtype)
    assert forms == ["per-query", "lanes"]
    said: list[bool] = []
    monkeypatch.setattr(bwd, "streamable", lambda *a: said.append(check(*a)) or said[-1])
    for form in forms:
        said.clear()
        streamed = [loops_gradients(tensors, grad, kw, w, threads=t, offset=0, form=form) for t in (1, 2)]
        plain = loops_gradients(tensors, grad, kw, w, threads=2, offset=itemsize, form=form)
        assert said == [True, True, False]
        for got in streamed:
            for a, b_ in zip(got, plain):
                assert torch.equal(a, b_), form
        for i, (a, ref) in enumerate(zip(plain, want)):
            scale = ref.abs().max()
            torch.testing.assert_close(a.double() / scale, ref.view(a.shape) / scale,
                                       atol=2e-6 if itemsize == 4 else 1e-12, rtol=0, msg=f"{form}: gradient {i}")


@pytest.mark.parametrize("length,kernel,dil,causal", [(12, 5, 1, False), (13, 3, 2, False), (11, 4, 1, True),
                                                      (2, 1, 1, False)])
def test_tables_against_the_windows_written_out(length, kernel, dil, causal):
    """mirror: key a's (query, slot) pairs are exactly those with pos[query, slot] = a, in increasing query
    order; blocks: each block's union is the sorted set of its positions' entries and `which` gives the slot
    through which each position has each member."""
    pos, real, _ = axis_windows(length, kernel, dil, causal)
    pos = torch.where(real, pos, -1).numpy()
    count, query, slot = bwd.mirror(pos)
    for a in range(length):
        want = [(c, t) for c in range(length) for t in range(kernel) if pos[c, t] == a]
        assert [(int(query[a, u]), int(slot[a, u])) for u in range(count[a])] == want
        assert (query[a, count[a]:] == -1).all()
    slots = np.ascontiguousarray(np.broadcast_to(np.arange(kernel), pos.shape))
    for table, slot_of in ((pos, slots), (query, slot)):
        bcount, member, which = bwd.blocks(table, slot_of)
        assert len(bcount) == -(-length // bwd.BLOCK)
        for blk in range(len(bcount)):
            first = blk * bwd.BLOCK
            entries = {(z - first, int(table[z, t]), int(slot_of[z, t])) for z in range(first, min(first + bwd.BLOCK, length))
                       for t in range(table.shape[1]) if table[z, t] >= 0}
            union = sorted({m for _, m, _ in entries})
            assert member[blk, : bcount[blk]].tolist() == union
            got = {(r, int(member[blk, u]), int(which[blk, u, r])) for u in range(bcount[blk]) for r in range(bwd.BLOCK)
                   if which[blk, u, r] >= 0}
            assert got == entries


@pytest.mark.parametrize("grid", [(10, 11), (3, 20)])
def test_neighborhood_attention_runs_this_backward(monkeypatch, grid):
    """The numba path's backward is this module's (counted) after the per-query or the lanes forward, its query pass
    in the same form (the lanes form given the windows' runs), and its gradients are the reference's."""
    calls = []
    run = bwd.backward
    monkeypatch.setattr(bwd, "backward", lambda *a, **kw: calls.append(kw["runs"]) or run(*a, **kw))
    tensors, grad, kw, w = problem(grid, 3, 1, False, 4, 4, True, "some")
    lanes = grid == (3, 20)
    assert engines.forward_path(w) == ("lanes" if lanes else "per-query")
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    rpb = kw["rpb"].clone().requires_grad_(True)
    out = neighborhood_attention(*leaves, **{**kw, "rpb": rpb}, backend="numba")
    got = torch.autograd.grad((out * grad).sum(), [*leaves, rpb])
    assert len(calls) == 1 and (calls[0] is not None) == lanes
    want = reference_gradients(tensors, grad, kw)
    for a, ref in zip(got, want):
        torch.testing.assert_close(a, ref.view(a.shape), atol=1e-10, rtol=1e-8)


def test_lanes_query_pass_needs_lines_of_a_register():
    """The lanes form of the query pass refuses lines shorter than a register's lanes, naming `runs`."""
    w = problem((3, 12), 3, 1, False, 4, 4, False, None, dtype=torch.float32)[3]
    assert w.runs is not None and query_forms(w, torch.float32) == ["per-query"]
    rows, n = 6, 36
    q = np.zeros((rows, n, 4), np.float32)
    with pytest.raises(ValueError, match="runs: expected a last axis of at least 16 positions.*got 12"):
        bwd.backward(3, q, q, q, q, q, np.zeros((rows, n), np.float32), w.pos, w.rel, np.zeros((1, 0), np.uint8),
                     np.zeros((3, 0), np.float32), engines.loops().constants(np.dtype(np.float32), 0.5), q.copy(),
                     q.copy(), q.copy(), runs=w.runs)
