"""Proxy-token attention (P200, PT-DiT): one proxy per window, proxy self-attention, tokens read the
proxies, plus window attention; composed matrix ½ (A_cross A_proxy S + A_win)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.proxy import (
    ProxyTokenAttention,
    proxy_token_attention,
    proxy_token_attention_reference,
    proxy_token_matrices,
)


def _qkv(shape: tuple[int, ...], heads: int = 2, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, *shape, d, generator=gen, dtype=torch.float64) for _ in range(3)]


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize(("proxy", "expected"), [("first", [2.0, 2.0, 4.25, 4.25]), ("mean", [2.625, 2.625, 4.875, 4.875])])
def test_hand_computed_1d(proxy: str, expected: list[float]) -> None:
    # q = 0: every softmax is uniform. Windows {0, 1}, {2, 3}; v = 1, 2, 4, 8.
    # first: proxies v0 = 1, v2 = 4 -> global (1 + 4)/2 = 2.5; window means 1.5, 6 -> ½(1.5 + 2.5) = 2, ½(6 + 2.5).
    # mean: proxies 1.5, 6 -> global 3.75 -> ½(1.5 + 3.75) = 2.625, ½(6 + 3.75) = 4.875.
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64).view(1, 1, 4, 1)
    want = torch.tensor(expected, dtype=torch.float64).view(1, 1, 4, 1)
    for fn in (proxy_token_attention, lambda *a, **kw: proxy_token_attention_reference(*a, **kw)[0]):
        torch.testing.assert_close(fn(q, k, v, tile_size=2, proxy=proxy), want)


def test_hand_computed_2d_windows_are_tiles() -> None:
    # grid (2, 4), windows (2, 2): tiles {0, 1, 4, 5} and {2, 3, 6, 7} in raster order; v = raster index.
    # first proxies: tokens 0 and 2 -> global (0 + 2)/2 = 1; window means 2.5 and 4.5.
    q = torch.zeros(1, 1, 2, 4, 3, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 4, 3, dtype=torch.float64)
    v = torch.arange(8, dtype=torch.float64).view(1, 1, 2, 4, 1)
    want = torch.tensor([[1.75, 1.75, 2.75, 2.75], [1.75, 1.75, 2.75, 2.75]], dtype=torch.float64).view(1, 1, 2, 4, 1)
    torch.testing.assert_close(proxy_token_attention(q, k, v, tile_size=(2, 2), proxy="first"), want)
    torch.testing.assert_close(proxy_token_attention_reference(q, k, v, tile_size=2, proxy="first")[0], want)


def test_window_one_global_path_is_full_attention_composed() -> None:
    # w = 1: S = I, A_proxy = A = softmax(q kᵀ/√d) (full attention), K' = A k, A_cross = softmax(q K'ᵀ/√d);
    # the global path is A_cross A, the window path the identity (each token its own window).
    q, k, v = _qkv((7,))
    d = q.shape[-1]
    full = _softmax(q @ k.transpose(-1, -2) / math.sqrt(d))
    cross = _softmax(q @ (full @ k).transpose(-1, -2) / math.sqrt(d))
    mats = proxy_token_matrices(q, k, tile_size=1, proxy="random")
    torch.testing.assert_close(mats["proxy"], full)
    torch.testing.assert_close(mats["cross"] @ mats["proxy"] @ mats["select"], cross @ full)
    torch.testing.assert_close(mats["window"], torch.eye(7, dtype=torch.float64).expand(2, 2, 7, 7))
    torch.testing.assert_close(proxy_token_attention(q, k, v, tile_size=1), 0.5 * (cross @ full @ v + v))


@pytest.mark.parametrize(("proxy", "shift"), [("random", False), ("first", False), ("mean", False), ("random", True)])
@pytest.mark.parametrize(("shape", "window"), [((12,), 3), ((12,), 4), ((4, 6), (2, 3)), ((6, 4), 2)])
def test_fast_matches_reference_forward_and_backward(
    proxy: str, shift: bool, shape: tuple[int, ...], window: object, same_grads
) -> None:
    q, k, v = (t.requires_grad_(True) for t in _qkv(shape, seed=3))
    n = math.prod(shape)
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, -5:] = False  # a whole window and part of another are padding
    kpm[1, 1] = False
    w = torch.randn(2, 2, *shape, 4, dtype=torch.float64)
    for mask in (None, kpm):
        kw = {"tile_size": window, "proxy": proxy, "seed": 5, "shift": shift, "attention_mask": mask}
        fast = proxy_token_attention(q, k, v, **kw)
        ref = proxy_token_attention_reference(q, k, v, **kw)[0]
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
        same_grads(ref, (fast,), (q, k, v), w, atol=1e-10, rtol=1e-8)


def test_shifted_windows() -> None:
    # 1-D, n = 8, w = 4, shift ⌊4/2⌋ = 2: windows {0, 1}, {2, 3, 4, 5}, {6, 7}; q = 0 -> uniform within each.
    q = torch.zeros(1, 1, 8, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 8, 2, dtype=torch.float64)
    a = proxy_token_matrices(q, k, tile_size=4, shift=True)["window"][0, 0]
    want = torch.block_diag(torch.full((2, 2), 0.5), torch.full((4, 4), 0.25), torch.full((2, 2), 0.5)).double()
    torch.testing.assert_close(a, want)
    # the proxies keep the unshifted windows {0..3}, {4..7}
    assert proxy_token_matrices(q, k, tile_size=4, shift=True, proxy="first")["select"][0, 0].nonzero().tolist() == [[0, 0], [1, 4]]
    # 2-D, grid (4, 4), w = 2, shift 1: per axis the groups {0}, {1, 2}, {3}
    q2, k2 = torch.randn(1, 1, 4, 4, 3, dtype=torch.float64), torch.randn(1, 1, 4, 4, 3, dtype=torch.float64)
    support = proxy_token_matrices(q2, k2, tile_size=2, shift=True)["window"][0, 0] > 0
    part = torch.tensor([0, 1, 1, 2])
    r, c = torch.arange(16) // 4, torch.arange(16) % 4
    same = (part[r][:, None] == part[r][None, :]) & (part[c][:, None] == part[c][None, :])
    assert torch.equal(support, same)
    v = torch.randn(2, 2, 8, 4, dtype=torch.float64)
    qq, kk = torch.randn(2, 2, 8, 4, dtype=torch.float64), torch.randn(2, 2, 8, 4, dtype=torch.float64)
    assert not torch.allclose(proxy_token_attention(qq, kk, v, tile_size=4, shift=True), proxy_token_attention(qq, kk, v, tile_size=4))


def test_selection_rows() -> None:
    q, k, _ = _qkv((12,))
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[0, 3] = False  # first token of window 1 is padding
    kpm[0, 9:] = False  # window 3 is all padding
    first = proxy_token_matrices(q, k, tile_size=3, proxy="first", attention_mask=kpm)["select"][0, 0]
    assert first.nonzero().tolist() == [[0, 0], [1, 4], [2, 6]]  # window 3: no proxy
    mean = proxy_token_matrices(q, k, tile_size=3, proxy="mean", attention_mask=kpm)["select"][0, 0]
    torch.testing.assert_close(mean[1, 3:6], torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))
    assert mean[3].abs().max() == 0
    for seed in range(5):  # random: one real token of the window, weight 1
        sel = proxy_token_matrices(q, k, tile_size=3, proxy="random", seed=seed, attention_mask=kpm)["select"][0, 0]
        rows, cols = sel.nonzero().unbind(-1)
        assert rows.tolist() == [0, 1, 2] and ((cols // 3) == rows).all() and kpm[0, cols].all()
        assert (sel.sum(-1)[:3] == 1).all()


def test_random_proxy_is_seeded_in_eval_and_redrawn_in_train() -> None:
    torch.manual_seed(0)
    m = attnlab.build("proxy-token", dim=8, heads=2, tile_size=4, proxy="random").double()
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    m.eval()
    torch.manual_seed(1)
    first = m(x)
    torch.manual_seed(2)
    torch.rand(100)  # the global generator moved: an eval draw must not read it
    torch.testing.assert_close(m(x), first, atol=0, rtol=0)
    fresh = attnlab.build("proxy-token", dim=8, heads=2, tile_size=4, proxy="random", seed=0, resample=False).double()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.train()(x), first, atol=0, rtol=0)  # train without resample: the draw of `seed`
    torch.testing.assert_close(m(x, impl="reference"), first)
    other = attnlab.build("proxy-token", dim=8, heads=2, tile_size=4, proxy="random", seed=1).double().eval()
    other.load_state_dict(m.state_dict())
    assert not torch.allclose(m(x), other(x))  # another seed draws other proxies
    m.train()
    draws = {tuple(m(x).flatten()[:4].tolist()) for _ in range(6)}
    assert len(draws) > 1  # a new choice per call
    torch.manual_seed(11)
    a = m(x)
    torch.manual_seed(11)
    torch.testing.assert_close(a, m(x, impl="reference"))  # same global draw: fast == reference


def test_module_2d_tokens_and_flat_attend() -> None:
    torch.manual_seed(0)
    m = ProxyTokenAttention(8, 2, tile_size=(2, 3), proxy="first").double()
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, m(x, impl="reference"))
    q, k, v = (t.flatten(2, 3) for t in m._heads(x, None, None))
    flat = m.attend(q, k, v, grid=(4, 6))
    torch.testing.assert_close(flat, m.attend(q, k, v, grid=(4, 6), impl="reference"))
    a = m.materialize(x)
    assert a.shape == (2, 2, 24, 24)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 24, dtype=torch.float64))
    torch.testing.assert_close(a @ v, flat)


def test_errors_name_the_values() -> None:
    q, k, v = _qkv((10,))
    with pytest.raises(ValueError, match=r"tile_size.*\(4,\).*\(10,\).*10 % 4 = 2"):
        proxy_token_attention(q, k, v, tile_size=4)
    with pytest.raises(ValueError, match=r"tile_size.*larger than the grid.*12 > 10"):
        proxy_token_attention(q, k, v, tile_size=12)
    q2, k2, v2 = _qkv((4, 6))
    with pytest.raises(ValueError, match=r"tile_size.*\(2, 4\).*axis 1"):
        proxy_token_attention(q2, k2, v2, tile_size=(2, 4))
    with pytest.raises(ValueError, match="tile_size"):
        proxy_token_attention(q2, k2, v2, tile_size=(2, 2, 2))
    with pytest.raises(ValueError, match="proxy"):
        proxy_token_attention(q, k, v, tile_size=2, proxy="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proxy"):
        attnlab.build("proxy-token", dim=8, heads=2, proxy="max")
    with pytest.raises(ValueError, match="tile_size"):
        attnlab.build("proxy-token", dim=8, heads=2, tile_size=(2, 2, 2))
    m = ProxyTokenAttention(8, 2, tile_size=2)
    qf, kf, vf = (t.float().flatten(2, 3) for t in (q2, k2, v2))
    with pytest.raises(ValueError, match=r"grid.*\(5, 5\).*25.*24"):
        m.attend(qf, kf, vf, grid=(5, 5))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 2, 3, 4, 8))  # 3-D grid
    with pytest.raises(ValueError, match="tile_size"):
        m(torch.randn(1, 5, 8))


def test_old_name_window_names_tile_size() -> None:
    """`window` (the side of the grid's tiles) was renamed `tile_size`: build, the constructor and the functional
    ops say so."""
    with pytest.raises(ParameterError, match=r"'window' was renamed tile_size \(w: the side of the tiles"):
        attnlab.build("proxy-token", dim=8, heads=2, window=2)
    with pytest.raises(TypeError, match=r"ProxyTokenAttention: keyword 'window' was renamed tile_size"):
        ProxyTokenAttention(8, 2, window=2)
    q, k, v = _qkv((8,))
    for fn in (proxy_token_attention, proxy_token_attention_reference):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: keyword 'window' was renamed tile_size"):
            fn(q, k, v, window=2)
    with pytest.raises(TypeError, match=r"proxy_token_matrices: keyword 'window' was renamed tile_size"):
        proxy_token_matrices(q, k, window=2)
