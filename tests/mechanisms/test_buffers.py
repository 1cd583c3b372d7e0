"""The compiled loops' large CPU buffers (attnlab.kernels.buffers): huge-page advice on exactly the tensor's
whole huge pages, and recycling — a buffer is handed out again only when nothing holds its memory any more
(the tensor, views of it, arrays of it, autograd's saved tensors and .grad), within the byte budget."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from attnlab.kernels import buffers
from attnlab.mechanisms.local.neighborhood import neighborhood_attention, neighborhood_attention_reference

MIB = 1 << 20


@pytest.fixture
def pool(monkeypatch):
    """An empty recycler for the test (the process's own is put back after)."""
    monkeypatch.setattr(buffers, "_BUFFERS", [])
    return buffers


def test_fresh_advises_its_whole_huge_pages(monkeypatch):
    """madvise(MADV_HUGEPAGE) on exactly the whole 2 MiB pages inside the tensor; none for a tensor under two
    huge pages or where there is no madvise (another OS)."""
    calls = []
    monkeypatch.setattr(buffers, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)) or 0)
    like = torch.zeros(1, dtype=torch.float32)
    out = buffers.fresh(like, 3, 1000, 1001)
    assert out.shape == (3, 1000, 1001) and out.dtype == torch.float32
    (start, length, advice), = calls
    page, begin, end = buffers.HUGE_PAGE, out.data_ptr(), out.data_ptr() + out.numel() * 4
    assert advice == buffers.MADV_HUGEPAGE and start % page == 0 and length % page == 0
    assert begin <= start < begin + page and end - page < start + length <= end
    buffers.fresh(like, 2 * page // 4 - 1)
    assert len(calls) == 1  # under two huge pages: no advice
    monkeypatch.setattr(buffers, "_madvise", lambda: None)
    assert buffers.fresh(like.double(), 3, 1000, 1001).dtype == torch.float64 and len(calls) == 1


def test_a_buffer_returns_only_when_nothing_holds_its_memory(pool):
    like = torch.zeros(1)
    a = pool.recycled(like, 2, MIB)  # 8 MiB
    address = a.data_ptr()
    assert a.shape == (2, MIB) and a.dtype == torch.float32 and a.is_contiguous()
    row, array = a[1], a.numpy()
    del a
    b = pool.recycled(like, 2, MIB)  # a's buffer is held by the view and the array: a second buffer
    assert b.data_ptr() != address and pool.held_bytes() == (16 * MIB, 0)
    del row, b  # b's buffer is idle, a's still held by the array
    assert pool.held_bytes() == (16 * MIB, 8 * MIB)
    c = pool.recycled(like, 2, MIB)
    assert c.data_ptr() != address and pool.held_bytes() == (16 * MIB, 0)
    del array
    d = pool.recycled(like.double(), MIB)  # the same 8 MiB as float64: a's buffer, free now
    assert d.data_ptr() == address and d.dtype == torch.float64 and d.shape == (MIB,)
    assert pool.held_bytes() == (16 * MIB, 0)
    assert pool.recycled(like, 3, MIB).data_ptr() not in (c.data_ptr(), d.data_ptr())  # another size: a new one
    assert pool.held_bytes() == (28 * MIB, 12 * MIB)


def test_small_and_over_budget_requests_are_not_kept(pool, monkeypatch):
    like = torch.zeros(1)
    small = pool.recycled(like, pool.RECYCLE_MIN_BYTES // 4 - 1)
    assert small.numel() == pool.RECYCLE_MIN_BYTES // 4 - 1 and pool.held_bytes() == (0, 0)
    monkeypatch.setattr(pool, "POOL_BYTES", 20 * MIB)
    kept = [pool.recycled(like, 2, MIB), pool.recycled(like, 2, MIB)]  # 16 MiB
    extra = pool.recycled(like, 2, MIB)  # past 20 MiB: a plain tensor, not kept
    assert extra.shape == (2, MIB) and pool.held_bytes() == (16 * MIB, 0)
    del extra
    assert pool.held_bytes() == (16 * MIB, 0)
    del kept
    gc.collect()
    assert pool.held_bytes() == (16 * MIB, 16 * MIB)
    assert pool.release() == 16 * MIB and pool.held_bytes() == (0, 0)


def test_gradients_and_saved_outputs_hold_their_buffers(pool, monkeypatch):
    """Neighborhood attention's output (saved for the backward) and gradients (kept as .grad) come from the
    recycler; a second step while the first's are alive gets other buffers, and its results stay right."""
    monkeypatch.setattr(pool, "RECYCLE_MIN_BYTES", 1)  # small tensors recycled too
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, kernel_size=7, backend="numba")
    saved = out.data_ptr()
    out.sum().backward()
    grads = {t.grad.data_ptr() for t in (q, k, v)}
    assert len(grads) == 3 and saved not in grads
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    gradient = torch.randn(2, 3, 40, 8)
    out2 = neighborhood_attention(q2, k2, v2, kernel_size=7, backend="numba")
    assert out2.data_ptr() != saved  # out is still alive (the graph was freed, but the name holds it)
    out2.backward(gradient)
    assert {t.grad.data_ptr() for t in (q2, k2, v2)}.isdisjoint(grads)  # q.grad, k.grad, v.grad still alive
    x = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = neighborhood_attention_reference(*x, kernel_size=7)[0]
    ref.backward(gradient.double())
    torch.testing.assert_close(out2.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for t, r in zip((q2, k2, v2), x):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=1e-5, rtol=1e-5)
    del out, q, k, v
    gc.collect()
    held, idle = pool.held_bytes()
    assert idle > 0  # the first step's output and gradients went back
    out3 = neighborhood_attention(q2.detach(), k2.detach(), v2.detach(), kernel_size=7, backend="numba")
    assert out3.data_ptr() in grads | {saved}


def test_arrays_come_from_the_same_buffers(pool):
    """recycled_array: a numpy array of the dtype and shape over a kept buffer, handed out again once freed."""
    array = pool.recycled_array(np.dtype(np.float64), 4, MIB // 4)  # 8 MiB
    assert array.dtype == np.float64 and array.shape == (4, MIB // 4) and pool.held_bytes() == (8 * MIB, 0)
    address = array.ctypes.data
    del array
    assert pool.recycled_array(np.dtype(np.float32), 2, MIB).ctypes.data == address
