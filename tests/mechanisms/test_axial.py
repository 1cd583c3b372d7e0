"""Axial attention (P070): each head attends along one grid axis; causal = masked row/column attention."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.local.axial import AxialAttention, axial_attention, axial_attention_reference


def _qkv(grid: tuple[int, ...], heads: int = 2, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, *grid, d, generator=gen, dtype=torch.float64) for _ in range(3)]


def _line_mask(grid: tuple[int, ...], axis: int, causal: bool) -> torch.Tensor:
    """(N, N) by raster-index arithmetic: j is on i's line along `axis` when i and j differ by a multiple of
    the axis stride and agree on every other coordinate; causal on a line is j <= i in raster order."""
    n = math.prod(grid)
    stride = math.prod(grid[axis + 1 :])
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    # drop the axis' coordinate: (index // (stride·L)) and (index % stride) identify the line
    span = stride * grid[axis]
    same = (i // span == j // span) & (i % stride == j % stride)
    return same & (j <= i) if causal else same


def _dense(q, k, v, grid, axes, causal, kpm=None):  # type: ignore[no-untyped-def]
    """Plain softmax attention over all N tokens, per head restricted to its line mask."""
    b, d = q.shape[0], q.shape[-1]
    n = math.prod(grid)
    outs = []
    for head, axis in enumerate(axes):
        keep = _line_mask(grid, axis, causal)[None].expand(b, n, n)
        if kpm is not None:
            keep = keep & kpm[:, None, :]
        scores = q[:, head].reshape(b, n, d) @ k[:, head].reshape(b, n, d).transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(~keep, float("-inf"))
        w = torch.softmax(scores, -1).nan_to_num(0.0)
        outs.append(w @ v[:, head].reshape(b, n, d))
    return torch.stack(outs, 1).reshape(q.shape)


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_equals_dense_attention_on_line_masks(grid: tuple[int, ...], causal: bool, axis: int | None) -> None:
    heads = 6 if len(grid) == 3 else 4  # several heads per axis: checks where each head goes
    q, k, v = _qkv(grid, heads=heads)
    axes = [h % len(grid) for h in range(heads)] if axis is None else [axis] * heads
    want = _dense(q, k, v, grid, axes, causal)
    for fn in (axial_attention, lambda *a, **kw: axial_attention_reference(*a, **kw)[0]):
        got = fn(q, k, v, axis=axis, causal=causal)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_row_attention_by_hand_loops() -> None:
    """axis=1 on (H, W): each row is ordinary softmax attention over its W tokens, computed row by row."""
    q, k, v = _qkv((3, 4), heads=1)
    got = axial_attention(q, k, v, axis=1)
    for r in range(3):
        s = q[:, 0, r] @ k[:, 0, r].transpose(-1, -2) / 2.0
        torch.testing.assert_close(got[:, 0, r], torch.softmax(s, -1) @ v[:, 0, r])


def test_key_padding_matches_dense_and_grid_layout() -> None:
    grid = (3, 4)
    q, k, v = _qkv(grid)
    kpm = torch.rand(2, 12, generator=torch.Generator().manual_seed(4)) > 0.4
    kpm[1, 8:] = False  # the last row of element 1: its row-attention queries see no key
    want = _dense(q, k, v, grid, [0, 1], True, kpm)
    fast = axial_attention(q, k, v, causal=True, attention_mask=kpm)
    torch.testing.assert_close(fast, want, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(axial_attention(q, k, v, causal=True, attention_mask=kpm.reshape(2, 3, 4)), fast)
    assert fast[1, 1, 2].abs().max() == 0.0  # fully masked rows give zeros


def test_fast_matches_reference_3d_with_gradients() -> None:
    grid = (2, 3, 3)
    q, k, v = (t.requires_grad_(True) for t in _qkv(grid, heads=4))
    kpm = torch.ones(2, 18, dtype=torch.bool)
    kpm[0, ::4] = False
    g = torch.randn(2, 4, *grid, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for causal in (False, True):
        fast = axial_attention(q, k, v, causal=causal, attention_mask=kpm)
        ref = axial_attention_reference(q, k, v, causal=causal, attention_mask=kpm)[0]
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
        gf = torch.autograd.grad((fast * g).sum(), (q, k, v))
        gr = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for a, b in zip(gf, gr):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 2)])
def test_causal_no_leakage_in_raster_order(grid: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = attnlab.build("axial", dim=12, heads=len(grid), causal=True, grid_rank=len(grid)).double()
    n = math.prod(grid)
    x = torch.randn(1, *grid, 12, dtype=torch.float64)
    for t in range(1, n):
        later = x.reshape(1, n, 12).clone()
        later[:, t:] += torch.randn(1, n - t, 12, dtype=torch.float64)
        for impl in ("fast", "reference"):
            a = m(x, impl=impl).reshape(1, n, 12)[:, :t]
            b = m(later.reshape(x.shape), impl=impl).reshape(1, n, 12)[:, :t]
            torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)
    w = m.materialize(x)
    assert (w[..., torch.ones(n, n, dtype=torch.bool).triu(1)] == 0).all()
    # masked column attention: the first token of each column sees only itself
    assert torch.allclose(w[0, 0, 0], torch.eye(n, dtype=torch.float64)[0])


def test_heads_split_between_axes_and_materialize_pattern() -> None:
    torch.manual_seed(0)
    m = attnlab.build("axial", dim=16, heads=4).double()
    w = m.materialize(torch.randn(1, 3, 4, 16, dtype=torch.float64))
    for h in range(4):
        support = w[0, h] != 0
        assert torch.equal(support, _line_mask((3, 4), h % 2, False)), h
        torch.testing.assert_close(w[0, h].sum(-1), torch.ones(12, dtype=torch.float64))


def test_row_then_column_layers_reach_every_token() -> None:
    """The paper: a row layer followed by a column layer gives every token the whole image (A_col·A_row > 0)."""
    torch.manual_seed(0)
    row = attnlab.build("axial", dim=8, heads=1, axis=1).double()
    col = attnlab.build("axial", dim=8, heads=1, axis=0).double()
    x = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    a_row, a_col = row.materialize(x)[0, 0], col.materialize(row(x))[0, 0]
    assert (a_row > 0).sum() == 20 * 5 and (a_col > 0).sum() == 20 * 4
    assert ((a_col @ a_row) > 0).all()


def test_flat_attend_with_grid_and_module_grid_shape() -> None:
    torch.manual_seed(0)
    m = AxialAttention(8, 2).double()
    q, k, v = _qkv((3, 4))
    flat = [t.reshape(2, 2, 12, 4) for t in (q, k, v)]
    torch.testing.assert_close(m.attend(*flat, grid=(3, 4)), m.attend(q, k, v).reshape(2, 2, 12, 4))
    fixed = AxialAttention(8, 2, grid_shape=(3, 4)).double()
    torch.testing.assert_close(fixed.attend(*flat), m.attend(*flat, grid=(3, 4)))


def test_errors_name_the_values() -> None:
    q, k, v = _qkv((3, 4))
    flat = [t.reshape(2, 2, 12, 4) for t in (q, k, v)]
    m = AxialAttention(8, 2)
    with pytest.raises(ValueError, match=r"grid: \(3, 5\) holds 15 positions.*12"):
        m.attend(*flat, grid=(3, 5))
    with pytest.raises(ValueError, match="grid"):
        m.attend(*flat)
    with pytest.raises(ValueError, match=r"grid: expected 2 axes"):
        m.attend(*flat, grid=(2, 2, 3))
    fixed = AxialAttention(8, 2, grid_shape=(3, 4))
    with pytest.raises(ValueError, match=r"x: expected the grid \(3, 4\).*got \(4, 3\)"):
        fixed(torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="grid_shape"):
        AxialAttention(8, 2, grid_shape=(3, 4, 2))
    with pytest.raises(ValueError, match="heads >= 3"):
        AxialAttention(8, 2, grid_rank=3)
    with pytest.raises(ValueError, match="axis"):
        AxialAttention(8, 2, axis=2)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 12, 8))  # a sequence, not a 2-D grid
    with pytest.raises(ValueError, match="attention_mask"):
        axial_attention(q, k, v, attention_mask=torch.ones(2, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="context"):
        m(torch.randn(1, 3, 4, 8), context=torch.randn(1, 3, 4, 8))
    with pytest.raises(ValueError, match="q"):
        axial_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])


def test_registry_entry() -> None:
    spec = attnlab.get("axial")
    assert spec.paper.id == "P070" and spec.family == "A" and spec.exponent == 1.5
    assert spec.supports.grids == (2, 3) and spec.supports.causal and spec.supports.key_padding
    assert spec.flops(16, 1, 1, False) == 4.0 * 16 * 4  # every token attends to its √N-long line
