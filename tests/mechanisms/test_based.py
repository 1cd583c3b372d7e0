"""Based: 2nd-order Taylor linear attention + exact sliding-window softmax attention (Zoology P243's recall study)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.linear.based import (
    BasedAttention,
    based_attention,
    based_attention_reference,
    sliding_window_attention,
    sliding_window_attention_reference,
    taylor_feature_map,
    taylor_features,
)

DIM, HEADS = 16, 2


def build(seed: int = 0, dtype: torch.dtype = torch.float64, **params):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    params = {"feature_dim": 4, "window_size": 3, "chunk_size": 4, **params}
    return attnlab.build("based", dim=DIM, heads=HEADS, **params).to(dtype)


def tokens(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_taylor_inner_product_by_hand() -> None:
    """φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d): d = 4, q·k = 2 gives 1 + 1 + 0.5 = 2.5."""
    q = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    k = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert taylor_feature_map(q) @ taylor_feature_map(k) == pytest.approx(2.5, rel=1e-15)
    q2 = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    k2 = torch.tensor([0.5, 1.0, 1.0, -2.0], dtype=torch.float64)  # q·k = 0.5 − 1 + 2 − 1 = 0.5
    assert taylor_feature_map(q2) @ taylor_feature_map(k2) == pytest.approx(1 + 0.5 / 2 + 0.25 / 8, rel=1e-15)


def test_taylor_inner_product_identity_and_width() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(50, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g, dtype=torch.float64)
    dot = (q * k).sum(-1)
    got = (taylor_feature_map(q) * taylor_feature_map(k)).sum(-1)
    # float64 to its precision: coefficients built in float32 and cast (error ~1e-8) would fail here
    torch.testing.assert_close(got, 1 + dot / 4 + dot**2 / 32, rtol=1e-13, atol=1e-13)
    assert taylor_feature_map(q).shape[-1] == taylor_features(16) == 153
    assert (got > 0).all()  # 1 + t + t²/2 ≥ ½: the normaliser never vanishes


def projections(m, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """q, k, v (window part) and q_f, k_f (Taylor part) per head, (batch, heads, n, ·)."""
    b, n, _ = x.shape
    return [t.reshape(b, n, HEADS, -1).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x), m.v_proj(x), m.feature_q(x), m.feature_k(x))]


def taylor_part(m, x: torch.Tensor, causal: bool, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Normalised linear attention with weights by the closed form 1 + s/√d' + s²/(2d'), s = q_f·k_f (no feature map)."""
    _, _, v, qf, kf = projections(m, x)
    n, d_f = x.shape[1], qf.shape[-1]
    s = qf @ kf.transpose(-1, -2)
    w = 1 + s / math.sqrt(d_f) + s**2 / (2 * d_f)
    visible = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
    visible = visible[None, None] & (True if keep is None else keep[:, None, None, :])
    w = w.masked_fill(~visible, 0)
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-300)) @ v


def window_part(m, x: torch.Tensor, causal: bool, window: int, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Softmax attention per query over its explicit list of keys."""
    q, k, v, _, _ = projections(m, x)
    b, n = x.shape[:2]
    local = torch.zeros_like(v)
    for bi in range(b):
        for i in range(n):
            js = [j for j in range(n) if (0 <= i - j < window if causal else abs(i - j) < window)]
            js = [j for j in js if keep is None or bool(keep[bi, j])]
            if js:
                p = torch.softmax(k[bi][:, js] @ q[bi, :, i, :, None] / math.sqrt(q.shape[-1]), dim=1)  # (h, |js|, 1)
                local[bi, :, i] = (p * v[bi][:, js]).sum(1)
    return local


def merged(m, per_head: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    b, _, n, _ = per_head.shape
    return m.out_proj(per_head.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("causal", [False, True])
def test_window_at_least_n_equals_taylor_plus_exact_softmax(causal: bool) -> None:
    m = build(causal=causal, window_size=12)
    x = tokens(2, 10)
    q, k, v, _, _ = projections(m, x)
    future = torch.full((10, 10), float("-inf"), dtype=x.dtype).triu(1) if causal else 0.0
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + future, dim=-1) @ v
    want = merged(m, taylor_part(m, x, causal) + exact)
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m(x, impl="reference"), want)
    qp, kp, vp = m.project(x)
    torch.testing.assert_close(m.attend(qp, kp, vp), taylor_part(m, x, causal) + exact)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", [1, 3, 5])
def test_window_smaller_than_n_with_padding(causal: bool, window_size: int) -> None:
    m = build(causal=causal, window_size=window_size)
    x = tokens(2, 11)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 8:] = False
    keep[1, 3] = False
    want = merged(m, taylor_part(m, x, causal, keep) + window_part(m, x, causal, window_size, keep))
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), want)


def test_sliding_window_functional_forms_agree() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 13, 4, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[1, :5] = False  # query 0..4 of element 1 see no key at window 2 when causal: zeros
    for causal in (False, True):
        for window_size in (1, 2, 4, 13, 40):
            out, weights = sliding_window_attention_reference(q, k, v, window_size=window_size, causal=causal, attention_mask=keep)
            fast = sliding_window_attention(q, k, v, window_size=window_size, causal=causal, attention_mask=keep)
            torch.testing.assert_close(fast, out)
            torch.testing.assert_close(weights @ v, out)
            band = weights[0, 0] != 0
            pos = torch.arange(13)
            rel = pos[:, None] - pos[None, :]
            allowed = (rel >= 0) & (rel < window_size) if causal else rel.abs() < window_size
            assert not bool((band & ~allowed).any())
    causal_out = sliding_window_attention(q, k, v, window_size=2, causal=True, attention_mask=keep)
    assert causal_out[1, :, :5].abs().max().item() == 0.0


def test_materialize_rows_sum_to_two() -> None:
    """Each mixer is row-normalised; the module's matrix is their sum."""
    for causal in (False, True):
        a = build(causal=causal).materialize(tokens(2, 9))
        torch.testing.assert_close(a.sum(-1), torch.full(a.shape[:-1], 2.0, dtype=a.dtype))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 12, 16])
def test_chunked_causal_equals_recurrent_and_reference(chunk_size: int, causal_paths_agree) -> None:
    m = build(causal=True, chunk_size=chunk_size, window_size=5)
    x = tokens(2, 12).requires_grad_(True)
    causal_paths_agree(m, x)


def test_step_reproduces_the_causal_forward_in_float32(stepped) -> None:
    m = build(causal=True, dtype=torch.float32, feature_dim=8, window_size=6, chunk_size=8)
    x = tokens(2, 40, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(stepped(m, x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_finite_and_accurate_at_input_scale_1e3(causal: bool, float32_accurate) -> None:
    m32 = build(causal=causal, dtype=torch.float32, feature_dim=8, window_size=6, chunk_size=8)
    m64 = build(causal=causal, dtype=torch.float64, feature_dim=8, window_size=6, chunk_size=8)
    x = (tokens(2, 33) * 1e3).float().requires_grad_(True)
    float32_accurate(m32, m64, x)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ParameterError, match="window_size"):
        attnlab.build("based", dim=DIM, heads=HEADS, window_size=0)
    with pytest.raises(ParameterError, match="feature_dim"):
        attnlab.build("based", dim=DIM, heads=HEADS, feature_dim=0)
    m = build()
    q, k, v = m.project(tokens(2, 6))
    with pytest.raises(ValueError, match="q: expected head_dim \\+ feature_dim"):
        m.attend(q[..., :-1], k[..., :-1], v)
    with pytest.raises(ValueError, match="context"):
        m(tokens(2, 6), context=tokens(2, 6))


def test_old_name_window_names_window_size() -> None:
    """`window` (keys a causal query sees) was renamed `window_size`: build, the constructor and the functional ops say so."""
    with pytest.raises(ParameterError, match=r"'window' was renamed window_size \(keys a causal query sees"):
        attnlab.build("based", dim=DIM, heads=HEADS, window=3)
    with pytest.raises(TypeError, match=r"BasedAttention: keyword 'window' was renamed window_size"):
        BasedAttention(DIM, HEADS, window=3)
    q, f = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3)
    for fn in (based_attention, based_attention_reference):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: keyword 'window' was renamed window_size"):
            fn(q, q, q, q_feature=f, k_feature=f, window=3)
