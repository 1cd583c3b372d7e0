"""Twins-SVT (P178): locally-grouped self-attention (LSA) and global sub-sampled attention (GSA)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.local.twins import (
    TwinsGlobalAttention,
    TwinsLocalAttention,
    gsa_attention,
    gsa_attention_reference,
    lsa_attention,
    lsa_attention_reference,
)


def _qkv(grid: tuple[int, int], heads: int = 2, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, *grid, d, generator=gen, dtype=torch.float64) for _ in range(3)]


def _windows_by_loops(q, k, v, window, kpm=None):  # type: ignore[no-untyped-def]
    """LSA by slicing each window out of the grid and running softmax attention on it alone."""
    b, h, rows, cols, d = q.shape
    out = torch.zeros_like(q)
    for r0 in range(0, rows, window[0]):
        for c0 in range(0, cols, window[1]):
            sl = (slice(None), slice(None), slice(r0, r0 + window[0]), slice(c0, c0 + window[1]))
            wq, wk, wv = (t[sl].reshape(b, h, -1, d) for t in (q, k, v))
            scores = wq @ wk.transpose(-1, -2) / math.sqrt(d)
            if kpm is not None:
                keep = kpm.reshape(b, rows, cols)[:, r0 : r0 + window[0], c0 : c0 + window[1]].reshape(b, 1, 1, -1)
                scores = scores.masked_fill(~keep, float("-inf"))
            w = torch.softmax(scores, -1).nan_to_num(0.0)
            out[sl] = (w @ wv).reshape(out[sl].shape)
    return out


@pytest.mark.parametrize("grid,window", [((4, 6), (2, 3)), ((5, 7), (2, 3)), ((3, 3), (3, 3)), ((6, 4), (4, 1))])
def test_lsa_equals_attention_window_by_window(grid: tuple[int, int], window: tuple[int, int]) -> None:
    q, k, v = _qkv(grid)
    kpm = torch.rand(2, math.prod(grid), generator=torch.Generator().manual_seed(4)) > 0.3
    for mask in (None, kpm):
        want = _windows_by_loops(q, k, v, window, mask)
        torch.testing.assert_close(lsa_attention(q, k, v, tile_size=window, attention_mask=mask), want)
        torch.testing.assert_close(lsa_attention_reference(q, k, v, tile_size=window, attention_mask=mask)[0], want)


def test_lsa_fast_and_reference_gradients_agree() -> None:
    grid, window = (5, 7), (2, 3)
    leaves = [t.requires_grad_(True) for t in _qkv(grid, seed=2)]
    kpm = torch.ones(2, 5, 7, dtype=torch.bool)
    kpm[0, 4, 6] = False
    w = torch.randn(2, 2, *grid, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fast = torch.autograd.grad((lsa_attention(*leaves, tile_size=window, attention_mask=kpm) * w).sum(), leaves)
    ref = torch.autograd.grad((lsa_attention_reference(*leaves, tile_size=window, attention_mask=kpm)[0] * w).sum(), leaves)
    for gf, gr in zip(fast, ref):
        torch.testing.assert_close(gf, gr)


def test_lsa_weights_are_block_diagonal_and_hand_values() -> None:
    """1×1 windows: every token attends to itself only (out = v); a window as large as the grid is full attention."""
    q, k, v = _qkv((3, 4))
    torch.testing.assert_close(lsa_attention(q, k, v, tile_size=1), v)
    flat = [t.reshape(2, 2, 12, 4) for t in (q, k, v)]
    full = torch.softmax(flat[0] @ flat[1].transpose(-1, -2) / 2.0, -1) @ flat[2]
    torch.testing.assert_close(lsa_attention(q, k, v, tile_size=(3, 4)).reshape(2, 2, 12, 4), full)
    # (2, 2) windows on a (3, 4) grid: tokens 0 = (0, 0) and 5 = (1, 1) share a window, 0 and 2 = (0, 2) do not,
    # and the bottom windows hold one row: token 8 = (2, 0) sees tokens 8, 9 only.
    weights = lsa_attention_reference(q, k, v, tile_size=2)[1]
    assert (weights[..., 0, 5] > 0).all() and (weights[..., 0, 2] == 0).all()
    assert torch.nonzero(weights[0, 0, 8]).flatten().tolist() == [8, 9]


def test_lsa_module_flat_and_grid_inputs_and_materialize() -> None:
    torch.manual_seed(0)
    m = attnlab.build("twins-lsa", dim=8, heads=2, tile_size=(2, 2)).double()
    x = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    y = m(x)
    a = m.materialize(x)
    assert a.shape == (1, 2, 24, 24)
    q, k, v = (t.flatten(2, 3) for t in m._heads(x, None, None))
    torch.testing.assert_close(m.attend(q, k, v, grid=(4, 6)), a @ v)
    assert y.shape == x.shape
    # a token outside the window of token 0 does not change its output
    x2 = x.clone()
    x2[0, 3, 5] += 10.0
    torch.testing.assert_close(m(x2)[0, 0, 0], y[0, 0, 0])


def test_lsa_errors_name_the_values() -> None:
    q, k, v = _qkv((3, 4))
    with pytest.raises(ValueError, match=r"tile_size.*\(3, 4\).*\(4, 2\)"):
        lsa_attention(q, k, v, tile_size=(4, 2))
    with pytest.raises(ValueError, match="tile_size"):
        lsa_attention(q, k, v, tile_size=0)
    m = TwinsLocalAttention(8, 2, tile_size=2)
    flat = [t.reshape(2, 2, 12, 4).float() for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"grid: \(3, 5\) holds 15 positions.*12"):
        m.attend(*flat, grid=(3, 5))
    with pytest.raises(ValueError, match="grid_shape"):
        attnlab.build("twins-lsa", dim=8, heads=2, tile_size=5, grid_shape=(4, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        lsa_attention(q, k, v, tile_size=2, attention_mask=torch.ones(2, 11, dtype=torch.bool))


def test_lsa_fully_padded_window_gives_zeros() -> None:
    q, k, v = _qkv((4, 4))
    kpm = torch.ones(2, 4, 4, dtype=torch.bool)
    kpm[:, :2, :2] = False  # the top-left 2×2 window holds only padding
    out = lsa_attention(q, k, v, tile_size=2, attention_mask=kpm)
    assert out[:, :, :2, :2].abs().max() == 0.0 and torch.isfinite(out).all()


# -- GSA ---------------------------------------------------------------------------------------
def _summaries_by_hand(m: TwinsGlobalAttention, x: torch.Tensor) -> torch.Tensor:
    """Conv_{s×s, stride s} as a sum over each cell's s² tokens, then LayerNorm written out."""
    s, (b, rows, cols, c) = m.sr_ratio, x.shape
    assert m.sr is not None and m.norm is not None
    out = torch.zeros(b, rows // s, cols // s, c, dtype=x.dtype)
    for i in range(rows // s):
        for j in range(cols // s):
            acc = m.sr.bias.detach().clone().expand(b, c).clone()
            for a in range(s):
                for e in range(s):
                    acc = acc + x[:, i * s + a, j * s + e] @ m.sr.weight[:, :, a, e].detach().T
            out[:, i, j] = acc
    mu = out.mean(-1, keepdim=True)
    var = ((out - mu) ** 2).mean(-1, keepdim=True)
    return (out - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight.detach() + m.norm.bias.detach()


def test_gsa_equals_attention_to_conv_layernorm_summaries() -> None:
    torch.manual_seed(0)
    m = attnlab.build("twins-gsa", dim=8, heads=2, sr_ratio=2).double()
    with torch.no_grad():  # non-trivial LayerNorm affine
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    summ = _summaries_by_hand(m, x)
    torch.testing.assert_close(m.summarize(x), summ)
    q = (x @ m.q_proj.weight.T + m.q_proj.bias).reshape(2, 24, 2, 4).transpose(1, 2)
    k = (summ @ m.k_proj.weight.T + m.k_proj.bias).reshape(2, 6, 2, 4).transpose(1, 2)
    v = (summ @ m.v_proj.weight.T + m.v_proj.bias).reshape(2, 6, 2, 4).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    want = m.out_proj((weights @ v).transpose(1, 2).reshape(2, 4, 6, 8))
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m(x, impl="reference"), want)
    # the keys are the 6 summaries: materialize is the exact (N, N/s²) softmax over them
    assert m.spec.supports.summary_keys and m.key_count((4, 6)) == 6
    k_keys, v_keys = m.key_values(x)
    torch.testing.assert_close(k_keys, k)
    torch.testing.assert_close(v_keys, v)
    a = m.materialize(x)
    assert a.shape == (2, 2, 24, 6)
    torch.testing.assert_close(a, weights)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 24, dtype=torch.float64))
    # out = A v_summaries: the module's output and its core on the summary keys
    torch.testing.assert_close(m(x), m.out_proj((a @ v_keys).transpose(1, 2).reshape(2, 4, 6, 8)))
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m.attend(q, k_keys, v_keys, impl=impl), weights @ v)


def test_gsa_materialize_written_out_entry_by_entry() -> None:
    """A[b, h, i, m] = exp(q_i·k_m/√d) / Σ_m' exp(q_i·k_m'/√d), q_i from token i, k_m from summary m (s = 3)."""
    torch.manual_seed(4)
    m = TwinsGlobalAttention(6, 3, sr_ratio=3).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    summ = _summaries_by_hand(m, x)  # (1, 1, 2, 6): cells (0, 0) and (0, 1)
    a = m.materialize(x)
    assert a.shape == (1, 3, 18, 2) and m.key_count((3, 6)) == 2
    for h in range(3):
        sl = slice(2 * h, 2 * h + 2)
        for i in range(18):
            qi = (x[0, i // 6, i % 6] @ m.q_proj.weight.T + m.q_proj.bias)[sl]
            logits = [qi @ (summ[0, 0, c] @ m.k_proj.weight.T + m.k_proj.bias)[sl] / math.sqrt(2) for c in range(2)]
            e = [math.exp(t.item()) for t in logits]
            for c in range(2):
                assert a[0, h, i, c].item() == pytest.approx(e[c] / sum(e), rel=1e-12)


def test_gsa_summary_depends_on_its_cell_only() -> None:
    torch.manual_seed(1)
    m = TwinsGlobalAttention(8, 2, sr_ratio=3).double()
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 4, 1] += 5.0  # cell (1, 0)
    changed = (m.summarize(x) - m.summarize(x2)).abs().amax(-1)[0]
    assert torch.nonzero(changed).tolist() == [[1, 0]]


def test_gsa_with_sr_ratio_one_is_full_attention() -> None:
    torch.manual_seed(2)
    m = TwinsGlobalAttention(8, 2, sr_ratio=1).double()
    x = torch.randn(2, 3, 3, 8, dtype=torch.float64)
    q, k, v = m.project(x.reshape(2, 9, 8))
    full = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    torch.testing.assert_close(m(x), m.out_proj(full.transpose(1, 2).reshape(2, 3, 3, 8)))


def test_gsa_fast_and_reference_gradients_agree() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 4, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(2, 2, 4, 6, 4, generator=gen, dtype=torch.float64)
    out = gsa_attention(q, k, v)
    assert out.shape == q.shape
    fast = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((gsa_attention_reference(q, k, v)[0] * w).sum(), (q, k, v))
    for gf, gr in zip(fast, ref):
        torch.testing.assert_close(gf, gr)
    # the module's parameters (conv, LayerNorm) get gradients through the summaries
    m = TwinsGlobalAttention(8, 2, sr_ratio=2).double()
    m(torch.randn(1, 4, 4, 8, dtype=torch.float64)).sum().backward()
    assert m.sr.weight.grad is not None and m.sr.weight.grad.abs().sum() > 0


def test_gsa_errors_name_the_values() -> None:
    m = TwinsGlobalAttention(8, 2, sr_ratio=2)
    with pytest.raises(ValueError, match=r"\(5, 4\).*sr_ratio=2"):
        m(torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match=r"grid: the grid \(5, 4\) is not a multiple of sr_ratio=2"):
        m.key_count((5, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        m.materialize(torch.randn(1, 4, 4, 8), attention_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randn(1, 4, 4, 8), attention_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="sr_ratio"):
        attnlab.build("twins-gsa", dim=8, heads=2, sr_ratio=0)
    with pytest.raises(ValueError, match="q"):
        gsa_attention(torch.randn(2, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))


def test_old_name_window_names_tile_size() -> None:
    """LSA's `window` (the side of the partition's tiles) was renamed `tile_size`: build, the constructor and the
    functional ops say so."""
    with pytest.raises(ParameterError, match=r"'window' was renamed tile_size \(the k or \(k1, k2\) side of the tiles"):
        attnlab.build("twins-lsa", dim=8, heads=2, window=2)
    with pytest.raises(TypeError, match=r"TwinsLocalAttention: keyword 'window' was renamed tile_size"):
        TwinsLocalAttention(8, 2, window=2)
    q, k, v = _qkv((4, 4))
    for fn in (lsa_attention, lsa_attention_reference):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: keyword 'window' was renamed tile_size"):
            fn(q, k, v, window=2)
