"""Multi-window multi-head attention (P108 MW-MAE): each head attends within non-overlapping windows of its own size."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.local.multi_window import (
    MultiWindowAttention,
    default_tile_sizes,
    multi_window_attention,
    multi_window_attention_reference,
)


def _qkv(n: int, heads: int, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(3)]


def _per_window(q, k, v, sizes, causal=False, kpm=None):  # type: ignore[no-untyped-def]
    """Head by head, window by window: slice the window out, plain softmax attention inside it."""
    batch, heads, n, d = q.shape
    out = torch.zeros_like(q)
    for h, w in enumerate(sizes):
        w = w or n
        for start in range(0, n, w):
            sl = slice(start, start + w)
            s = q[:, h, sl] @ k[:, h, sl].transpose(-1, -2) / math.sqrt(d)
            keep = torch.ones(batch, w, w, dtype=torch.bool)
            if causal:
                keep &= torch.ones(w, w, dtype=torch.bool).tril()
            if kpm is not None:
                keep &= kpm[:, None, sl]
            p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
            out[:, h, sl] = p @ v[:, h, sl]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_softmax_per_window(causal: bool, padded: bool) -> None:
    sizes = (2, 3, 0, 12, 4, 3)  # two heads share a window size; 0 and 12 are both global
    q, k, v = _qkv(12, len(sizes))
    kpm = None
    if padded:
        kpm = torch.rand(2, 12, generator=torch.Generator().manual_seed(5)) > 0.4
        kpm[1, 0:6] = False  # windows of element 1 with no real key: zeros
    want = _per_window(q, k, v, sizes, causal, kpm)
    for fn in (multi_window_attention, lambda *a, **kw: multi_window_attention_reference(*a, **kw)[0]):
        got = fn(q, k, v, tile_sizes=sizes, causal=causal, attention_mask=kpm)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_each_head_is_block_diagonal_with_its_window() -> None:
    torch.manual_seed(0)
    sizes = (1, 2, 4, 8, 0)
    m = attnlab.build("multi-window", dim=20, heads=5, tile_sizes=sizes).double()
    w = m.materialize(torch.randn(1, 16, 20, dtype=torch.float64))[0]
    for h, size in enumerate(sizes):
        size = size or 16
        block = torch.block_diag(*[torch.ones(size, size)] * (16 // size)).bool()
        assert torch.equal(w[h] > 0, block), h
        torch.testing.assert_close(w[h].sum(-1), torch.ones(16, dtype=torch.float64))


def test_global_head_equals_softmax_attention() -> None:
    q, k, v = _qkv(10, 2)
    got = multi_window_attention(q, k, v, tile_sizes=(0, 5))[:, 0]
    p = torch.softmax(q[:, 0] @ k[:, 0].transpose(-1, -2) / 2.0, -1)
    torch.testing.assert_close(got, p @ v[:, 0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(multi_window_attention(q, k, v, tile_sizes=(10, 5))[:, 0], got)  # w = N is global too


def test_gradients_match_reference() -> None:
    q, k, v = (t.requires_grad_(True) for t in _qkv(12, 4))
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[0, ::5] = False
    g = torch.randn(2, 4, 12, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for causal in (False, True):
        kw = {"tile_sizes": (3, 0, 6, 3), "causal": causal, "attention_mask": kpm}
        fast, ref = multi_window_attention(q, k, v, **kw), multi_window_attention_reference(q, k, v, **kw)[0]
        for a, b in zip(torch.autograd.grad((fast * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_default_windows_follow_the_divisor_rule() -> None:
    # divisors of 1024 below it and above 1: 2, 4, …, 512 (9 of them); 7 local heads spread over them
    assert default_tile_sizes(1024, 8) == (2, 4, 16, 32, 64, 256, 512, 0)
    assert default_tile_sizes(12, 3) == (2, 6, 0)  # divisors 2, 3, 4, 6: first and last
    assert default_tile_sizes(7, 3) == (1, 1, 0)  # a prime length: windows of one token
    assert default_tile_sizes(12, 1) == (0,)
    m = MultiWindowAttention(12, 3).double()
    x = torch.randn(1, 12, 12, dtype=torch.float64)
    w = m.materialize(x)[0]
    assert [int((w[h] > 0).sum(-1)[0]) for h in range(3)] == [2, 6, 12]
    torch.testing.assert_close(m(x), m(x, impl="reference"))


def test_errors_name_the_values() -> None:
    q, k, v = _qkv(12, 2)
    with pytest.raises(ValueError, match=r"tile_sizes: head 1 has tile size 5, which does not divide the sequence length n=12"):
        multi_window_attention(q, k, v, tile_sizes=(3, 5))
    with pytest.raises(ValueError, match=r"tile_sizes: head 0 has tile size 16"):
        multi_window_attention(q, k, v, tile_sizes=(16, 0))
    with pytest.raises(ValueError, match=r"tile_sizes: expected one tile size per head \(2 heads\), got 3"):
        multi_window_attention(q, k, v, tile_sizes=(3, 0, 4))
    with pytest.raises(ValueError, match=r"tile_sizes: expected a tuple of ints >= 0"):
        multi_window_attention(q, k, v, tile_sizes=(3, -1))
    with pytest.raises(ValueError, match=r"tile_sizes: expected one tile size per head \(4 heads\), got 2"):
        attnlab.build("multi-window", dim=16, heads=4, tile_sizes=(2, 0))
    m = MultiWindowAttention(8, 2, tile_sizes=(3, 0))
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 6, 8), attn_mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="n=7"):
        m(torch.randn(1, 7, 8))
    with pytest.raises(ValueError, match="context"):
        m(torch.randn(1, 6, 8), context=torch.randn(1, 6, 8))


# -- the official relative position bias of the windowed heads ------------------------------------
def test_window_bias_by_hand() -> None:
    """q = k = 0: the logits are the bias alone; query a and key b of a window of 2 read table[a − b + 1]."""
    table = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)  # offsets −1, 0, +1
    q = torch.zeros(1, 1, 4, 3, dtype=torch.float64)
    v = torch.arange(12, dtype=torch.float64).reshape(1, 1, 4, 3)
    def soft(x, y):
        return [math.exp(x) / (math.exp(x) + math.exp(y)), math.exp(y) / (math.exp(x) + math.exp(y))]

    rows = [soft(-1.0, 0.5), soft(2.0, -1.0)]  # a = 0: b = 0 (offset 0), b = 1 (−1); a = 1: b = 0 (+1), b = 1 (0)
    want = torch.zeros(4, 4, dtype=torch.float64)
    for start in (0, 2):
        want[start : start + 2, start : start + 2] = torch.tensor(rows, dtype=torch.float64)
    out, weights = multi_window_attention_reference(q, q, v, tile_sizes=(2,), position_bias=table)
    torch.testing.assert_close(weights[0, 0], want, rtol=1e-14, atol=0)
    torch.testing.assert_close(multi_window_attention(q, q, v, tile_sizes=(2,), position_bias=table), want @ v,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_biased_fast_path_equals_reference_forward_and_backward(causal: bool) -> None:
    q, k, v = _qkv(12, 3)
    table = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, 5:9] = False
    kw = dict(tile_sizes=(2, 4, 0), causal=causal, attention_mask=kpm, position_bias=table)
    fast = multi_window_attention(q, k, v, **kw)
    ref, weights = multi_window_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), table)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), table)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)
    assert g_fast[2].abs().max() == 0  # the global head reads no bias
    assert g_fast[0, 3:].abs().max() == 0 and g_fast[0, :3].abs().max() > 0  # window 2 reads its first 3 entries
    unbiased = multi_window_attention(q, k, v, tile_sizes=(2, 4, 0), causal=causal, attention_mask=kpm)
    assert (fast - unbiased)[:, :2].abs().max() > 1e-3 and (fast - unbiased)[:, 2].abs().max() == 0


def test_rel_pos_bias_is_on_with_fixed_windows() -> None:
    m = attnlab.build("multi-window", dim=12, heads=3, tile_sizes=(2, 4, 0))
    assert m.rpb is not None and m.rpb.shape == (3, 7) and 0 < m.rpb.std() < 0.1
    assert attnlab.build("multi-window", dim=12, heads=3).rpb is None  # windows chosen per call: no table
    assert attnlab.build("multi-window", dim=12, heads=3, tile_sizes=(2, 4, 0), rel_pos_bias=False).rpb is None
    with pytest.raises(ValueError, match="rel_pos_bias"):
        attnlab.build("multi-window", dim=12, heads=3, rel_pos_bias=True)
    with pytest.raises(ValueError, match="position_bias"):
        multi_window_attention(*_qkv(4, 1), position_bias=torch.zeros(1, 3, dtype=torch.float64))


def test_old_name_windows_names_tile_sizes() -> None:
    """`windows` (one tile size per head) was renamed `tile_sizes`: build, the constructor and the functional ops
    say so."""
    with pytest.raises(ParameterError, match=r"'windows' was renamed tile_sizes \(one window \(tile\) size per head"):
        attnlab.build("multi-window", dim=8, heads=2, windows=(3, 0))
    with pytest.raises(TypeError, match=r"MultiWindowAttention: keyword 'windows' was renamed tile_sizes"):
        MultiWindowAttention(8, 2, windows=(3, 0))
    q, k, v = _qkv(6, 2)
    for fn in (multi_window_attention, multi_window_attention_reference):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: keyword 'windows' was renamed tile_sizes"):
            fn(q, k, v, windows=(3, 0))
