"""Halo attention (P007 HaloNets): b×b query blocks attend to their (b + 2h)² halo window with 2-D relative logits."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.local.halo import HaloAttention, halo_attention, halo_attention_reference


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense_loops(q, k, v, b, h, rel_h, rel_w, kpm=None):  # type: ignore[no-untyped-def]
    """Position by position: the keys of query (y, x) are those of the window of its block, written with
    Python loops; logits q·k + q·r^H[dy] + q·r^W[dx] over √d; plain softmax over the allowed keys."""
    batch, heads, height, width, d = q.shape
    out = torch.zeros(batch, heads, height, width, v.shape[-1], dtype=torch.float64)
    off = b + h - 1
    for bi in range(batch):
        for hd in range(heads):
            for y in range(height):
                for x in range(width):
                    top, left = (y // b) * b, (x // b) * b
                    keys = [(yy, xx) for yy in range(top - h, top + b + h) for xx in range(left - h, left + b + h)
                            if 0 <= yy < height and 0 <= xx < width
                            and (kpm is None or bool(kpm[bi, yy * width + xx]))]
                    if not keys:
                        continue
                    qi = q[bi, hd, y, x]
                    logits = torch.stack([
                        (qi @ k[bi, hd, yy, xx] + qi @ rel_h[hd, yy - y + off] + qi @ rel_w[hd, xx - x + off]) / math.sqrt(d)
                        for yy, xx in keys
                    ])
                    w = torch.softmax(logits, 0)
                    out[bi, hd, y, x] = sum(w[i] * v[bi, hd, yy, xx] for i, (yy, xx) in enumerate(keys))
    return out


def test_hand_computed_case() -> None:
    """Grid 2×4, b = 2, h = 1, one head of width 1: query (0, 1) sees the 6 keys of rows 0–1, columns 0–2;
    query (1, 3) (second block) those of rows 0–1, columns 1–3. Softmax written out with math.exp."""
    kv = [[0.5, -1.0, 2.0, 0.0], [1.0, 0.3, -0.7, 1.5]]
    vals = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    qv = [[0.2, 1.1, -0.4, 0.6], [0.9, -0.3, 0.8, -1.2]]
    rh = [0.0, 0.1, 0.2, 0.3, 0.4]  # offsets −2 … 2 (b + h − 1 = 2)
    rw = [-0.5, -0.25, 0.0, 0.25, 0.5]
    q = torch.tensor(qv, dtype=torch.float64).reshape(1, 1, 2, 4, 1)
    k = torch.tensor(kv, dtype=torch.float64).reshape(1, 1, 2, 4, 1)
    v = torch.tensor(vals, dtype=torch.float64).reshape(1, 1, 2, 4, 1)
    tables = [torch.tensor(t, dtype=torch.float64).reshape(1, 5, 1) for t in (rh, rw)]
    got = halo_attention(q, k, v, block_size=2, halo=1, rel_h=tables[0], rel_w=tables[1])

    def expected(y: int, x: int, keys: list[tuple[int, int]]) -> float:
        logits = [qv[y][x] * (kv[a][c] + rh[a - y + 2] + rw[c - x + 2]) for a, c in keys]
        e = [math.exp(s) for s in logits]
        return sum(ei * vals[a][c] for ei, (a, c) in zip(e, keys)) / sum(e)

    first = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    second = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert got[0, 0, 0, 1, 0].item() == pytest.approx(expected(0, 1, first), rel=1e-12)
    assert got[0, 0, 1, 3, 0].item() == pytest.approx(expected(1, 3, second), rel=1e-12)


@pytest.mark.parametrize(("grid", "b", "h"), [((4, 6), 2, 1), ((6, 6), 3, 2), ((4, 4), 2, 0), ((2, 8), 2, 3)])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_loops_and_reference(grid: tuple[int, int], b: int, h: int, padded: bool) -> None:
    q, k, v = (_rand(2, 2, *grid, 3, seed=s) for s in range(3))
    rel_h, rel_w = (_rand(2, 2 * (b + h) - 1, 3, seed=s) for s in (5, 6))
    kpm = None
    if padded:
        kpm = torch.rand(2, math.prod(grid), generator=torch.Generator().manual_seed(9)) > 0.4
        kpm[1, :] = False  # every key of element 1 is padding: zeros
    want = _dense_loops(q, k, v, b, h, rel_h, rel_w, kpm)
    fast = halo_attention(q, k, v, block_size=b, halo=h, rel_h=rel_h, rel_w=rel_w, attention_mask=kpm)
    ref = halo_attention_reference(q, k, v, block_size=b, halo=h, rel_h=rel_h, rel_w=rel_w, attention_mask=kpm)[0]
    torch.testing.assert_close(fast, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ref, want, atol=1e-12, rtol=1e-10)


def test_gradients_match_reference() -> None:
    grid, b, h = (4, 6), 2, 1
    leaves = [_rand(2, 2, *grid, 3, seed=s).requires_grad_(True) for s in range(3)]
    leaves += [_rand(2, 5, 3, seed=s).requires_grad_(True) for s in (5, 6)]
    q, k, v, rel_h, rel_w = leaves
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[0, ::3] = False
    g = _rand(2, 2, *grid, 3, seed=7)
    kw = {"block_size": b, "halo": h, "rel_h": rel_h, "rel_w": rel_w, "attention_mask": kpm}
    fast = halo_attention(q, k, v, **kw)
    ref = halo_attention_reference(q, k, v, **kw)[0]
    for a, r in zip(torch.autograd.grad((fast * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-10)


def test_relative_logits_are_translation_invariant() -> None:
    """Content shifted by a multiple of b gives the same outputs wherever the window lies inside the content:
    the logits depend on positions only through key − query."""
    b, h = 2, 1
    q, k, v = (_rand(1, 2, 6, 6, 3, seed=s) for s in range(3))
    rel_h, rel_w = (_rand(2, 5, 3, seed=s) for s in (5, 6))
    big = [_rand(1, 2, 12, 12, 3, seed=10 + s) for s in range(3)]
    for t, small in zip(big, (q, k, v)):
        t[:, :, 4:10, 2:8] = small  # shift (4, 2)
    small_out = halo_attention(q, k, v, block_size=b, halo=h, rel_h=rel_h, rel_w=rel_w)
    big_out = halo_attention(*big, block_size=b, halo=h, rel_h=rel_h, rel_w=rel_w)
    # the middle block (rows 2–3, cols 2–3) has its window rows/cols 1–4 inside the 6×6 content
    torch.testing.assert_close(big_out[:, :, 6:8, 4:6], small_out[:, :, 2:4, 2:4], atol=1e-12, rtol=1e-10)
    # an absolute position term would break this: changing rel_w at an offset the window uses changes both
    rel_w2 = rel_w.clone()
    rel_w2[:, 0] += 1.0
    assert not torch.allclose(halo_attention(q, k, v, block_size=b, halo=h, rel_h=rel_h, rel_w=rel_w2)[:, :, 2:4, 2:4],
                              small_out[:, :, 2:4, 2:4])


def test_module_materialize_pattern_and_rows() -> None:
    torch.manual_seed(0)
    m = attnlab.build("halo", dim=8, heads=2, block_size=2, halo=1).double()
    x = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    w = m.materialize(x)
    assert w.shape == (1, 2, 24, 24)
    support = w[0, 0] > 0
    for i in range(24):
        y, xx = divmod(i, 6)
        top, left = (y // 2) * 2, (xx // 2) * 2
        want = {a * 6 + c for a in range(max(top - 1, 0), min(top + 3, 4)) for c in range(max(left - 1, 0), min(left + 3, 6))}
        assert set(torch.nonzero(support[i]).flatten().tolist()) == want, i
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 24, dtype=torch.float64))
    # flat attend with grid=, and the (batch, H, W) key padding layout
    q, k, v = m._heads(x, None, None)
    flat = [t.reshape(1, 2, 24, -1) for t in (q, k, v)]
    torch.testing.assert_close(m.attend(*flat, grid=(4, 6)), m.attend(q, k, v).reshape(1, 2, 24, -1))
    kpm = torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    torch.testing.assert_close(m(x, attention_mask=kpm), m(x, attention_mask=kpm.reshape(1, 24), impl="reference"))


def test_errors_name_the_values() -> None:
    q, k, v = (_rand(1, 2, 4, 6, 3, seed=s) for s in range(3))
    with pytest.raises(ValueError, match=r"block_size.*\(4, 6\).*block_size=4"):
        halo_attention(q, k, v, block_size=4, halo=0)
    with pytest.raises(ValueError, match=r"halo: halo=5.*expected halo <= max\(H, W\) − block_size = 4"):
        halo_attention(q, k, v, block_size=2, halo=5)
    with pytest.raises(ValueError, match=r"halo: expected an int >= 0, got -1"):
        halo_attention(q, k, v, block_size=2, halo=-1)
    with pytest.raises(ValueError, match=r"block_size: expected an int >= 1, got 0"):
        halo_attention(q, k, v, block_size=0, halo=1)
    with pytest.raises(ValueError, match=r"rel_h: expected shape .* = \(2, 5, 3\), got \(2, 4, 3\)"):
        halo_attention(q, k, v, block_size=2, halo=1, rel_h=_rand(2, 4, 3, seed=0))
    with pytest.raises(ValueError, match=r"q: expected \(batch, heads, H, W, head_dim\)"):
        halo_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], block_size=2, halo=1)
    m = HaloAttention(8, 2, block_size=2, halo=1)
    flat = [t.reshape(1, 2, 24, 3).float() for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"grid: \(5, 5\) holds 25 positions.*24"):
        m.attend(*flat, grid=(5, 5))
    with pytest.raises(ValueError, match="grid"):
        m.attend(*flat)
    fixed = HaloAttention(8, 2, block_size=2, halo=1, grid_shape=(4, 6))
    with pytest.raises(ValueError, match=r"x: expected the grid \(4, 6\).*got \(6, 4\)"):
        fixed(torch.randn(1, 6, 4, 8))
    with pytest.raises(ValueError, match="block_size"):
        attnlab.build("halo", dim=8, heads=2, block_size=0)
