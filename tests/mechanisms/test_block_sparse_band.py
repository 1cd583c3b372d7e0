"""The block-sparse engine's band path (mask_mod a RelativeBand): against the float64 references,
forward and backward, with padding, ragged N, radius below / not a multiple of the block, shifted and
cross-length bands, empty rows, worker threads, memory, and when the engine takes it."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.kernels import block_sparse
from attnlab.kernels.block_sparse import (
    BlockLayout,
    RelativeBand,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from attnlab.mechanisms.sparse.sliding_window import (
    band_mod,
    sliding_window_attention,
    sliding_window_attention_reference,
    window_layout,
)
from attnlab.testing import LargestStorage

TOL = {"atol": 1e-12, "rtol": 1e-10}


def qkv(seed, n, b=2, h=2, d=3, n_k=None, dv=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    return tuple(
        torch.randn(b, h, m, w, generator=g, dtype=dtype).requires_grad_(True) for m, w in ((n, d), (n_k, d), (n_k, dv))
    )


def grads(out, inputs, seed=5):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


def assert_same_with_grads(got, want, inputs):
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(grads(got, inputs), grads(want, inputs)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL)


WINDOWS = [
    # (n, radius, block, causal, key padding, chunk): ragged n, radius < B, radius not a multiple of B,
    # radius ≥ n, one window per chunk, B = 1
    (23, 3, 4, True, True, None),
    (23, 3, 4, False, True, 1),
    (37, 10, 8, True, False, 2),
    (37, 10, 8, False, True, None),
    (40, 16, 8, True, True, 3),
    (40, 16, 8, False, False, 1),
    (13, 30, 4, True, True, None),
    (13, 30, 4, False, True, 2),
    (9, 2, 1, False, True, 4),
    (64, 0, 16, True, False, None),
]


@pytest.mark.parametrize("case", range(len(WINDOWS)))
def test_sliding_window_band_path_matches_the_reference(case):
    n, radius, bs, causal, padded, chunk = WINDOWS[case]
    q, k, v = qkv(case, n)
    kpm = None
    if padded:
        kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(case)) > 0.3
        kpm[1, : n // 2] = False  # the first queries of batch 1 see no key when causal
    layout = window_layout(n, radius=radius, block_size=bs, causal=causal)
    got = block_sparse_attention(q, k, v, layout, mask_mod=band_mod(radius, causal), attention_mask=kpm,
                                 chunk=chunk, backend="band")
    want, _ = sliding_window_attention_reference(q, k, v, radius=radius, causal=causal, block_size=bs, attention_mask=kpm)
    assert_same_with_grads(got, want, (q, k, v))
    if padded and causal:
        assert got[1, :, : n // 2].abs().max().item() == 0.0


BANDS = [
    # (n_q, n_k, lo, hi, block, layout heads, key padding): shifted, strictly past / future, cross-length,
    # windows reaching past both ends, a per-head layout holding more blocks than the band touches
    (20, 20, -5, -2, 4, 1, True),
    (20, 20, 2, 7, 4, 1, False),
    (17, 29, -3, 9, 8, 1, True),
    (29, 11, -12, 1, 4, 2, True),
    (7, 7, -40, 40, 4, 1, False),
    (21, 21, -6, 6, 3, 2, False),
]


@pytest.mark.parametrize("case", range(len(BANDS)))
def test_relative_band_matches_the_block_path_and_the_reference(case):
    n_q, n_k, lo, hi, bs, heads, padded = BANDS[case]
    q, k, v = qkv(10 + case, n_q, n_k=n_k)
    g = torch.Generator().manual_seed(case)
    blocks = torch.rand(heads, -(-n_q // bs), -(-n_k // bs), generator=g) < 0.3  # extra blocks: hidden by the band
    i = torch.arange(blocks.shape[1])[:, None] * bs
    j = torch.arange(blocks.shape[2])[None, :] * bs
    blocks |= (j + bs - 1 - i >= lo) & (j - (i + bs - 1) <= hi)  # every block the band touches
    layout = BlockLayout.from_mask(blocks, bs)
    kpm = torch.rand(2, n_k, generator=g) > 0.3 if padded else None
    band = RelativeBand(lo, hi)
    got = block_sparse_attention(q, k, v, layout, mask_mod=band, attention_mask=kpm, chunk=2, backend="band")
    want, _ = block_sparse_attention_reference(q, k, v, layout, mask_mod=band, attention_mask=kpm)
    assert_same_with_grads(got, want, (q, k, v))
    blocks_path = block_sparse_attention(q, k, v, layout, mask_mod=band, attention_mask=kpm, backend="blocks")
    torch.testing.assert_close(got, blocks_path, **TOL)


def test_forward_without_gradients_is_the_same_computation():
    q, k, v = qkv(3, 45)
    kpm = torch.rand(2, 45, generator=torch.Generator().manual_seed(3)) > 0.4
    with_grad = sliding_window_attention(q, k, v, radius=7, causal=True, block_size=8, attention_mask=kpm)
    with torch.no_grad():
        without = sliding_window_attention(q, k, v, radius=7, causal=True, block_size=8, attention_mask=kpm)
    want, _ = sliding_window_attention_reference(q, k, v, radius=7, causal=True, block_size=8, attention_mask=kpm)
    torch.testing.assert_close(without, want, **TOL)
    torch.testing.assert_close(with_grad, want, **TOL)


def test_rows_that_see_no_key_give_zeros_and_zero_gradients():
    q, k, v = qkv(4, 20)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0] = False  # batch 0: every key is padding
    kpm[1, :12] = False  # batch 1: queries 0..11 see no key under a causal band
    layout = window_layout(20, radius=5, block_size=4, causal=True)
    got = block_sparse_attention(q, k, v, layout, mask_mod=band_mod(5, True), attention_mask=kpm, backend="band")
    assert got[0].abs().max().item() == 0.0 and got[1, :, :12].abs().max().item() == 0.0
    want, _ = sliding_window_attention_reference(q, k, v, radius=5, causal=True, block_size=4, attention_mask=kpm)
    torch.testing.assert_close(got, want, **TOL)
    got_grads = grads(got, (q, k, v))
    for a, b in zip(got_grads, grads(want, (q, k, v))):
        assert torch.isfinite(a).all() and a[0].abs().max().item() == 0.0
        torch.testing.assert_close(a, b, **TOL)


def test_worker_threads_give_the_reference_result(monkeypatch):
    """Two worker threads (one torch thread each), edge windows and key padding on both."""
    monkeypatch.setattr(block_sparse, "PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(block_sparse, "_cpus", lambda: 2)  # even where this process is pinned to one CPU
    q, k, v = qkv(5, 50)
    kpm = torch.rand(2, 50, generator=torch.Generator().manual_seed(5)) > 0.2
    layout = window_layout(50, radius=9, block_size=4, causal=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = block_sparse._band_plan(band_mod(9, False), 4, 50, 50, 2, 2, kpm, 2, torch.float64, q.device)
        assert plan.workers == 2 and any(item.edge for item in plan.items)  # two workers; windows reaching past the ends
        got = block_sparse_attention(q, k, v, layout, mask_mod=band_mod(9, False), attention_mask=kpm, chunk=2, backend="band")
        got_grads = grads(got, (q, k, v))
    finally:
        torch.set_num_threads(threads)
    want, _ = sliding_window_attention_reference(q, k, v, radius=9, block_size=4, attention_mask=kpm)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(got_grads, grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, **TOL)


def test_low_precision_stays_close_to_float64():
    q, k, v = (t.detach() for t in qkv(6, 70, d=16, dv=16))
    want, _ = sliding_window_attention_reference(q, k, v, radius=20, causal=True, block_size=16)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got = sliding_window_attention(*(t.to(dtype) for t in (q, k, v)), radius=20, causal=True, block_size=16)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_the_engine_takes_the_band_path_exactly_when_the_layout_holds_the_band(monkeypatch):
    calls = []
    plan = block_sparse._band_plan
    monkeypatch.setattr(block_sparse, "_band_plan", lambda *a, **kw: calls.append(1) or plan(*a, **kw))
    q, k, v = qkv(7, 24)
    layout = window_layout(24, radius=5, block_size=4, causal=True)
    band = band_mod(5, True)
    block_sparse_attention(q, k, v, layout, mask_mod=band)
    assert len(calls) == 1
    # the same band as a plain function, or forced onto the block path: no band path
    block_sparse_attention(q, k, v, layout, mask_mod=lambda i, j: band(i, j))
    block_sparse_attention(q, k, v, layout, mask_mod=band, backend="blocks")
    assert len(calls) == 1
    # the module's core gives the engine its RelativeBand
    attnlab.build("sliding-window", dim=6, heads=2, radius=5, block_size=4, causal=True).double()(torch.randn(1, 24, 6, dtype=torch.float64))
    assert len(calls) == 2
    # a layout missing a block the band touches: the block path, which hides what the layout lacks
    blocks = layout.to_mask()[0].clone()
    blocks[3, 2] = False
    holed = BlockLayout.from_mask(blocks, 4)
    got = block_sparse_attention(q, k, v, holed, mask_mod=band)
    assert len(calls) == 2
    want, _ = block_sparse_attention_reference(q, k, v, holed, mask_mod=band)
    torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(ParameterError, match="backend: 'band' needs mask_mod a RelativeBand"):
        block_sparse_attention(q, k, v, holed, mask_mod=band, backend="band")
    with pytest.raises(ParameterError, match="backend: 'band' needs"):
        block_sparse_attention(q, k, v, layout, mask_mod=lambda i, j: band(i, j), backend="band")
    with pytest.raises(ParameterError, match="backend: expected 'engine', 'band', 'blocks' or 'flex'"):
        block_sparse_attention(q, k, v, layout, mask_mod=band, backend="bands")


def test_relative_band_is_the_offset_mask_and_checks_its_offsets():
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    assert torch.equal(RelativeBand(-2, 1)(i, j), (j - i >= -2) & (j - i <= 1))
    assert torch.equal(band_mod(3, True)(i, j), ((i - j).abs() <= 3) & (j <= i))
    with pytest.raises(ParameterError, match="hi: expected an offset >= lo = 2, got 1"):
        RelativeBand(2, 1)
    with pytest.raises(ParameterError, match="lo: expected an int"):
        RelativeBand(0.5, 1)  # type: ignore[arg-type]


def test_memory_is_order_n_times_d_forward_and_backward():
    """Recomputing backward: at N = 4096 with a radius of 64 the largest tensor is an O(N·d) input or
    gradient, not the N × (B + r) scores (8 MiB) and never the N × N matrix."""
    n, heads, d = 4096, 2, 8
    q, k, v = (t.detach().requires_grad_(True) for t in qkv(8, n, b=1, h=heads, d=d, dv=d))
    layout = window_layout(n, radius=64, block_size=32, causal=True)
    with LargestStorage() as mode:
        out = block_sparse_attention(q, k, v, layout, mask_mod=band_mod(64, True), chunk=4, backend="band")
        out.backward(torch.ones_like(out))
    assert mode.largest <= heads * n * d * 8, mode.largest
