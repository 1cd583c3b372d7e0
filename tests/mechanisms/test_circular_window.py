"""Circular-window attention (P170 CLEAR): each query attends to the keys within Euclidean grid distance r."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.local.circular_window import (
    CircularWindowAttention,
    circular_window_attention,
    circular_window_attention_reference,
    disc_points,
)


def _qkv(grid: tuple[int, ...], heads: int = 2, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, *grid, d, generator=gen, dtype=torch.float64) for _ in range(3)]


def _loops(q, k, v, radius, kpm=None):  # type: ignore[no-untyped-def]
    """2-D, query by query: the keys (y', x') with (y' − y)² + (x' − x)² <= r², plain softmax over them."""
    batch, heads, height, width, d = q.shape
    out = torch.zeros(batch, heads, height, width, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                keys = [(a, c) for a in range(height) for c in range(width)
                        if (a - y) ** 2 + (c - x) ** 2 <= radius**2 and (kpm is None or bool(kpm[b, a * width + c]))]
                if not keys:
                    continue
                ks = torch.stack([k[b, :, a, c] for a, c in keys], 1)  # (heads, m, d)
                vs = torch.stack([v[b, :, a, c] for a, c in keys], 1)
                w = torch.softmax(torch.einsum("hd,hmd->hm", q[b, :, y, x], ks) / math.sqrt(d), -1)
                out[b, :, y, x] = torch.einsum("hm,hmd->hd", w, vs)
    return out


def test_interior_queries_see_the_lattice_points_of_the_disc() -> None:
    """By hand: r = 1 is the cross (5 points), r = 2 adds the 4 diagonals and the 4 points at distance 2 (13)."""
    torch.manual_seed(0)
    x = torch.randn(1, 9, 9, 8, dtype=torch.float64)
    for radius, count in ((1, 5), (2, 13), (1.5, 9)):
        m = attnlab.build("circular-window", dim=8, heads=1, radius=radius).double()
        support = m.materialize(x)[0, 0] > 0
        centre = 4 * 9 + 4
        assert int(support[centre].sum()) == count
        assert disc_points(radius) == count
        # every query whose disc fits in the grid sees the same count
        for y in range(2, 7):
            for xx in range(2, 7):
                assert int(support[y * 9 + xx].sum()) == count


def test_border_discs_are_cut_not_shifted() -> None:
    """A corner query at r = 2 sees (0,0),(0,1),(0,2),(1,0),(1,1),(2,0): 6 keys; an edge query the half disc (9)."""
    torch.manual_seed(0)
    m = attnlab.build("circular-window", dim=8, heads=1, radius=2).double()
    support = m.materialize(torch.randn(1, 6, 7, 8, dtype=torch.float64))[0, 0] > 0
    corner = {a * 7 + c for a, c in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]}
    assert set(torch.nonzero(support[0]).flatten().tolist()) == corner
    edge = 0 * 7 + 3  # top row, middle column: rows 0..2 of the disc
    assert int(support[edge].sum()) == 5 + 3 + 1  # dy = 0: |dx| <= 2; dy = 1: |dx| <= 1; dy = 2: dx = 0


def test_radius_covering_the_grid_is_full_attention() -> None:
    q, k, v = _qkv((4, 5))
    full = torch.softmax(torch.einsum("bhid,bhjd->bhij", q.reshape(2, 2, 20, 4), k.reshape(2, 2, 20, 4)) / 2.0, -1)
    want = (full @ v.reshape(2, 2, 20, 4)).reshape(q.shape)
    for radius in (5.0, 100):  # the diagonal is √(3² + 4²) = 5
        torch.testing.assert_close(circular_window_attention(q, k, v, radius=radius), want, atol=1e-12, rtol=1e-10)
    # just below the diagonal the two opposite corners no longer see each other
    w = circular_window_attention_reference(q, k, v, radius=4.99)[1]
    assert w[0, 0, 0, 19] == 0 and w[0, 0, 0, 18] > 0


@pytest.mark.parametrize(("grid", "radius"), [((4, 5), 1), ((7, 6), 2.5), ((9, 13), 3), ((5, 5), 0)])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_loops_and_reference(grid: tuple[int, int], radius: float, padded: bool) -> None:
    q, k, v = _qkv(grid)
    kpm = None
    if padded:
        kpm = torch.rand(2, math.prod(grid), generator=torch.Generator().manual_seed(3)) > 0.5
        kpm[1] = False  # every key of element 1 is padding: zeros
    want = _loops(q, k, v, radius, kpm)
    torch.testing.assert_close(circular_window_attention(q, k, v, radius=radius, attention_mask=kpm), want,
                               atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(circular_window_attention_reference(q, k, v, radius=radius, attention_mask=kpm)[0],
                               want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("grid", "radius"), [((23, 19), 4.5), ((3, 4, 5), 1.8)])
def test_fast_matches_reference_with_gradients(grid: tuple[int, ...], radius: float) -> None:
    """Grids larger than one query tile (the tiles' halos must hold every disc), and a 3-D ball."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(grid, batch=1))
    kpm = torch.ones(1, math.prod(grid), dtype=torch.bool)
    kpm[0, ::5] = False
    fast = circular_window_attention(q, k, v, radius=radius, attention_mask=kpm)
    ref = circular_window_attention_reference(q, k, v, radius=radius, attention_mask=kpm)[0]
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((fast * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_module_layouts() -> None:
    torch.manual_seed(0)
    m = CircularWindowAttention(8, 2, radius=1.5).double()
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    q, k, v = m._heads(x, None, None)
    flat = [t.reshape(2, 2, 24, 4) for t in (q, k, v)]
    torch.testing.assert_close(m.attend(*flat, grid=(4, 6)), m.attend(q, k, v).reshape(2, 2, 24, 4))
    kpm = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    torch.testing.assert_close(m(x, attention_mask=kpm), m(x, attention_mask=kpm.reshape(2, 24), impl="reference"))
    y3 = m(torch.randn(1, 2, 3, 4, 8, dtype=torch.float64))  # 3-D grids too
    assert y3.shape == (1, 2, 3, 4, 8)


def test_errors_name_the_values() -> None:
    q, k, v = _qkv((4, 5))
    with pytest.raises(ValueError, match=r"radius: expected a finite number >= 0.*got -1"):
        circular_window_attention(q, k, v, radius=-1)
    with pytest.raises(ValueError, match=r"radius.*got nan"):
        circular_window_attention(q, k, v, radius=float("nan"))
    with pytest.raises(ValueError, match=r"q: expected \(batch, heads, \*grid, head_dim\) with a grid of 2 or 3 axes"):
        circular_window_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], radius=1)
    with pytest.raises(ValueError, match="radius"):
        attnlab.build("circular-window", dim=8, heads=2, radius=-0.5)
    m = CircularWindowAttention(8, 2, radius=1)
    flat = [t.reshape(2, 2, 20, 4).float() for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"grid: \(4, 4\) holds 16 positions.*20"):
        m.attend(*flat, grid=(4, 4))
    with pytest.raises(ValueError, match="grid"):
        m.attend(*flat)
    fixed = CircularWindowAttention(8, 2, radius=1, grid_shape=(4, 5))
    with pytest.raises(ValueError, match=r"x: expected the grid \(4, 5\).*got \(5, 4\)"):
        fixed(torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randn(1, 4, 5, 8), attention_mask=torch.ones(1, 21, dtype=torch.bool))
