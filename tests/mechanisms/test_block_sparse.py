"""Block-sparse engine: against a dense computation written here, layouts, memory, errors, FlexAttention."""
from __future__ import annotations

import math

import pytest
import torch

from attnlab.core.errors import DTypeError, MaskError, ParameterError, ShapeError
from attnlab.kernels import block_sparse
from attnlab.kernels.block_sparse import (
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_reference,
    flex_available,
)
from attnlab.testing import LargestStorage


def hand_attention(q, k, v, blocks, block_size, mask_mod=None, kpm=None, scale=None):
    """Dense softmax over keys j with blocks[h, i // B, j // B], mask_mod(i, j) and kpm[b, j]."""
    d, n_q, n_k = q.shape[-1], q.shape[2], k.shape[2]
    i = torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    keep = blocks[:, i // block_size, j // block_size][None]  # (1, heads of the layout, n_q, n_k)
    if mask_mod is not None:
        keep = keep & mask_mod(i, j)
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (1 / math.sqrt(d) if scale is None else scale)
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(nan=0.0)
    return w @ v, w


def qkv(seed, b=2, h=2, n=13, d=3, n_k=None, dv=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    dv = d if dv is None else dv
    return tuple(
        torch.randn(b, h, m, w, generator=g, dtype=dtype).requires_grad_(True)
        for m, w in ((n, d), (n_k, d), (n_k, dv))
    )


def grads(out, inputs, seed=5):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


def odd_sum(i, j):
    return (i + 2 * j) % 3 != 0


CASES = [
    # (n, n_k, block, heads of the layout, density, mask_mod, key padding, chunk)
    (13, 13, 4, 1, 0.5, None, False, None),
    (13, 13, 4, 2, 0.5, odd_sum, True, 1),
    (16, 16, 4, 2, 0.7, None, True, 3),
    (11, 17, 3, 1, 0.4, odd_sum, False, 2),
    (9, 9, 1, 2, 0.3, None, True, 4),
    (7, 7, 16, 1, 1.0, None, True, None),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_engine_matches_a_dense_computation_forward_and_backward(case):
    n, n_k, bs, lh, density, mod, padded, chunk = CASES[case]
    q, k, v = qkv(case, n=n, n_k=n_k, dv=5)
    g = torch.Generator().manual_seed(100 + case)
    blocks = torch.rand(lh, -(-n // bs), -(-n_k // bs), generator=g) < density
    blocks[:, 0] = False  # query block 0 sees nothing: its rows must be zeros
    kpm = None
    if padded:
        kpm = torch.rand(2, n_k, generator=g) > 0.3
        kpm[1] = False  # every key of batch element 1 is padding
    layout = BlockLayout.from_mask(blocks, bs)
    want, _ = hand_attention(q, k, v, blocks, bs, mod, kpm)
    got = block_sparse_attention(q, k, v, layout, mask_mod=mod, attention_mask=kpm, chunk=chunk)
    ref, _ = block_sparse_attention_reference(q, k, v, layout, mask_mod=mod, attention_mask=kpm)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ref, want, atol=1e-12, rtol=1e-10)
    assert got[:, :, : min(bs, n)].abs().max().item() == 0.0
    if padded:
        assert got[1].abs().max().item() == 0.0
    for a, b in zip(grads(got, (q, k, v)), grads(want, (q, k, v))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def causal(i, j):
    return j <= i


def test_blocks_hidden_whole_are_skipped_and_partial_blocks_masked():
    """A full layout under a causal mask_mod: the blocks above the diagonal hold no visible key, so
    query block r reads r + 1 key blocks (r in chunks of one); the diagonal blocks are partial."""
    n, bs = 20, 4  # 5 blocks
    q, k, v = qkv(11, n=n, dv=2)
    full = BlockLayout.from_mask(torch.ones(5, 5, dtype=torch.bool), bs)
    plan = block_sparse._make_plan(full, causal, None, n, 4, 1, torch.float64)
    assert [r for _, _, r in plan.chunks] == [1, 2, 3, 4, 5]
    assert [[(row, slot) for row, _, slot, _ in fix] for fix in plan.fixes] == [[(r, r)] for r in range(5)]
    want, _ = hand_attention(q, k, v, torch.ones(1, 5, 5, dtype=torch.bool), bs, causal)
    got = block_sparse_attention(q, k, v, full, mask_mod=causal, chunk=2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads(got, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_worker_threads_give_the_dense_result(monkeypatch):
    """With two intra-op threads and a large enough call, chunks run on two worker threads (one
    torch thread each, dk and dv accumulated per worker): same values and gradients."""
    monkeypatch.setattr(block_sparse, "PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(block_sparse, "_cpus", lambda: 2)  # even where this process is pinned to one CPU
    q, k, v = qkv(12, n=30, n_k=30, dv=4)
    g = torch.Generator().manual_seed(12)
    blocks = torch.rand(2, 8, 8, generator=g) < 0.6
    kpm = torch.rand(2, 30, generator=g) > 0.2
    layout = BlockLayout.from_mask(blocks, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert len(block_sparse._make_plan(layout, odd_sum, kpm, 30, 4, 1, torch.float64).spans) == 2
        got = block_sparse_attention(q, k, v, layout, mask_mod=odd_sum, attention_mask=kpm, chunk=1)
        got_grads = grads(got, (q, k, v))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    want, _ = hand_attention(q, k, v, blocks, 4, odd_sum, kpm)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for a, b in zip(got_grads, grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_float32_and_bfloat16_stay_close_to_float64():
    q, k, v = qkv(1, n=21)
    layout = BlockLayout.from_mask(torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) < 0.6, 4)
    want = block_sparse_attention(q, k, v, layout)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_scale_is_applied():
    q, k, v = qkv(2, n=8)
    blocks = torch.ones(1, 2, 2, dtype=torch.bool)
    want, _ = hand_attention(q, k, v, blocks, 4, scale=0.3)
    torch.testing.assert_close(block_sparse_attention(q, k, v, BlockLayout.from_mask(blocks, 4), scale=0.3), want)


def test_full_layout_is_plain_softmax_attention():
    q, k, v = qkv(3, n=10)
    full = BlockLayout.from_mask(torch.ones(4, 4, dtype=torch.bool), 3)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(3)
    torch.testing.assert_close(block_sparse_attention(q, k, v, full), torch.softmax(s, -1) @ v)


def test_empty_layout_gives_zeros_and_zero_gradients():
    q, k, v = qkv(4, n=6)
    empty = BlockLayout.from_mask(torch.zeros(3, 3, dtype=torch.bool), 2)
    assert empty.nnz == 0 and empty.max_row == 0
    out = block_sparse_attention(q, k, v, empty)
    assert out.shape == (2, 2, 6, 3) and out.abs().max().item() == 0.0
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert gq.abs().max().item() == gk.abs().max().item() == gv.abs().max().item() == 0.0


# -- layouts --------------------------------------------------------------------------------------
def test_layout_constructors_agree():
    blocks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    a = BlockLayout.from_mask(blocks, 8)
    crow = torch.tensor([0, 2, 2, 6])
    col = torch.tensor([0, 2, 0, 1, 2, 3])
    b = BlockLayout.from_csr(crow, col, 8, 4)
    c = BlockLayout.from_candidates(torch.tensor([[2, 0, 0, -1], [7, -3, 4, 5], [3, 1, 2, 0]]), 8, 4)
    for lay in (a, b, c):
        assert torch.equal(lay.to_mask()[0], blocks)
        assert lay.nnz == 6 and lay.max_row == 4 and lay.heads == 1
        assert lay.counts.tolist() == [[2, 0, 4]]
        assert lay.indices[0, 0, :2].tolist() == [0, 2]


def test_per_head_csr_layout():
    crow = torch.tensor([[0, 1, 2], [0, 2, 3]])  # head 0: 2 blocks (its third column entry unused), head 1: 3
    col = torch.tensor([[0, 1, 1], [0, 1, 1]])
    lay = BlockLayout.from_csr(crow, col, 4, 2)
    assert lay.heads == 2
    assert lay.to_mask().tolist() == [[[True, False], [False, True]], [[True, True], [False, True]]]


def test_element_mask_pads_the_last_block():
    lay = BlockLayout.from_mask(torch.tensor([[True, False], [True, True]]), 3)
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(lay.element_mask(5, 5)[0], want)
    assert torch.equal(lay.element_mask(5, 5, lambda i, j: j <= i)[0], want & torch.ones(5, 5, dtype=torch.bool).tril())


def test_bad_layouts_are_refused():
    with pytest.raises(MaskError, match="indices"):
        BlockLayout(4, 3, torch.tensor([[[0, 5]]]), torch.tensor([[2]]))
    with pytest.raises(MaskError, match="strictly increasing"):
        BlockLayout(4, 3, torch.tensor([[[1, 1]]]), torch.tensor([[2]]))
    with pytest.raises(MaskError, match="counts"):
        BlockLayout(4, 3, torch.tensor([[[0, 1]]]), torch.tensor([[3]]))
    with pytest.raises(MaskError, match="indices"):
        BlockLayout(4, 3, torch.tensor([[0, 1]]), torch.tensor([2]))
    with pytest.raises(ParameterError, match="block_size"):
        BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), 0)
    with pytest.raises(MaskError, match="blocks"):
        BlockLayout.from_mask(torch.ones(2, 2), 4)
    with pytest.raises(MaskError, match="crow_indices"):
        BlockLayout.from_csr(torch.tensor([0, 3, 2]), torch.tensor([0, 1]), 4, 2)


def test_bad_calls_name_the_argument():
    q, k, v = qkv(6, n=10)
    lay = BlockLayout.from_mask(torch.ones(3, 3, dtype=torch.bool), 4)
    with pytest.raises(ShapeError, match="layout"):
        block_sparse_attention(q, k, v, BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), 4))
    with pytest.raises(ShapeError, match="layout"):
        block_sparse_attention(q, k, v, BlockLayout.from_mask(torch.ones(3, 3, 3, dtype=torch.bool), 4))
    with pytest.raises(TypeError, match="layout"):
        block_sparse_attention(q, k, v, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask_mod"):
        block_sparse_attention(q, k, v, lay, mask_mod=lambda i, j: (i - j).double())
    with pytest.raises(ParameterError, match="backend"):
        block_sparse_attention(q, k, v, lay, backend="triton")
    with pytest.raises(ParameterError, match="chunk"):
        block_sparse_attention(q, k, v, lay, chunk=0)
    with pytest.raises(DTypeError, match="attention_mask"):
        block_sparse_attention(q, k, v, lay, attention_mask=torch.ones(2, 10))


# -- memory: no N × N tensor ---------------------------------------------------------------------


def largest_allocation(n, chunk=None):
    q, k, v = qkv(7, b=1, h=2, n=n, d=8)
    band = (torch.arange(n // 32)[:, None] - torch.arange(n // 32)[None]).abs() <= 1
    layout = BlockLayout.from_mask(band, 32)
    with LargestStorage() as mode:
        out = block_sparse_attention(q, k, v, layout, mask_mod=lambda i, j: (i - j).abs() <= 32, chunk=chunk)
        out.backward(torch.ones_like(out))
    return mode.largest


def test_memory_grows_linearly_with_n_and_never_holds_n_squared():
    dense = 2 * 4096 * 4096 * 8  # heads · N² float64 scores at N = 4096
    for chunk in (4, None):
        small, large = largest_allocation(1024, chunk), largest_allocation(4096, chunk)
        assert large <= 4.5 * small, (small, large)
        assert large < dense / 16, (large, dense)
    # with 4 query blocks per step the largest tensors are the O(N·d) inputs and gradients
    assert largest_allocation(4096, 4) <= 2 * 4096 * 8 * 8 * 2


# -- FlexAttention backend --------------------------------------------------------------------------
def test_flex_backend_refuses_backward_on_cpu():
    q, k, v = qkv(8, n=16, dtype=torch.float32)
    lay = BlockLayout.from_mask(torch.ones(1, 1, dtype=torch.bool), 16)
    if not flex_available():
        with pytest.raises(ParameterError, match="flex"):
            block_sparse_attention(q, k, v, lay, backend="flex")
        return
    with pytest.raises(ValueError, match="forward only on CPU"):
        block_sparse_attention(q, k, v, lay, backend="flex")
    with torch.no_grad(), pytest.raises(DTypeError, match="float32"):
        block_sparse_attention(q.double(), k.double(), v.double(), lay, backend="flex")


@pytest.mark.slow
@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
def test_flex_backend_matches_the_dense_computation():
    """One compile (~25-40 s on CPU): per-head layout, N not a multiple of B, key padding, mask_mod, empty rows."""
    n, bs = 200, 32
    q, k, v = (t.detach().float() for t in qkv(9, n=n, d=16))
    g = torch.Generator().manual_seed(9)
    blocks = torch.rand(2, 7, 7, generator=g) < 0.5
    blocks[:, 1] = False
    kpm = torch.rand(2, n, generator=g) > 0.2
    layout = BlockLayout.from_mask(blocks, bs)
    with torch.no_grad():
        got = block_sparse_attention(q, k, v, layout, mask_mod=odd_sum, attention_mask=kpm, backend="flex")
    want, _ = hand_attention(q.double(), k.double(), v.double(), blocks, bs, odd_sum, kpm)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    assert got[:, :, bs : 2 * bs].abs().max().item() == 0.0
