"""TransNeXt aggregated attention (P238): k×k window + p×p pooled keys under one softmax."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.local.aggregated import (
    AggregatedAttention,
    aggregated_attention,
    aggregated_attention_reference,
)


def _build(grid_shape=None, kernel_size: int = 3, pool_size: int = 2, seed: int = 0) -> AggregatedAttention:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    m = attnlab.build("aggregated", dim=8, heads=2, kernel_size=kernel_size, pool_size=pool_size, cpb_hidden=16,
                      grid_shape=grid_shape).double()
    with torch.no_grad():  # parameters away from their (near-zero) initial values, so every term counts
        for p in (m.query_embedding, m.local_bias, m.learnable_tokens, m.learnable_bias, m.temperature):
            p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.5)
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    return m


def _bins(length: int, p: int) -> list[range]:
    """Adaptive average pooling bins, as torch documents them: [⌊iL/p⌋, ⌈(i+1)L/p⌉)."""
    return [range(math.floor(i * length / p), math.ceil((i + 1) * length / p)) for i in range(p)]


def _by_loops(m: AggregatedAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's equations for one batch element, token by token, written from the definitions:
    (output, weights (heads, N, N + p²) over [tokens ; pooled], their values (heads, N + p², head_dim))."""
    _, rows, cols, dim = x.shape
    heads, hd, ks, p = m.heads, m.head_dim, m.kernel_size, m.pool_size
    r = ks // 2
    lin = lambda t, layer: t @ layer.weight.T + layer.bias  # noqa: E731
    xq, xk, xv = lin(x[0], m.q_proj), lin(x[0], m.k_proj), lin(x[0], m.v_proj)
    # pooled features: 1×1 conv, GELU, bin means, LayerNorm
    y = torch.nn.functional.gelu(x[0] @ m.sr.weight[:, :, 0, 0].T + m.sr.bias)
    cells = []
    for bi in _bins(rows, p):
        for bj in _bins(cols, p):
            cells.append(torch.stack([y[a, c] for a in bi for c in bj]).mean(0))
    pf = torch.stack(cells)
    mu, var = pf.mean(-1, keepdim=True), pf.var(-1, unbiased=False, keepdim=True)
    pf = (pf - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias
    kp, vp = lin(pf, m.k_proj), lin(pf, m.v_proj)
    centres = [[sum(b) / len(b) for b in _bins(length, p)] for length in (rows, cols)]
    log8 = lambda t: math.copysign(math.log2(abs(t) + 1.0), t) / 3.0  # noqa: E731
    out = torch.zeros(rows, cols, heads * hd, dtype=x.dtype)
    n = rows * cols
    weights = torch.zeros(heads, n, n + p * p, dtype=x.dtype)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        tau = torch.nn.functional.softplus(m.temperature[h])
        for r0 in range(rows):
            for c0 in range(cols):
                q_hat = xq[r0, c0, sl] / xq[r0, c0, sl].norm()
                window = [(r0 + dy - r, c0 + dx - r, dy * ks + dx) for dy in range(ks) for dx in range(ks)
                          if 0 <= r0 + dy - r < rows and 0 <= c0 + dx - r < cols]
                qs = (q_hat + m.query_embedding[h]) * tau * math.log(len(window) + p * p)
                logits = [qs @ (xk[a, c, sl] / xk[a, c, sl].norm()) + m.local_bias[h, o] for a, c, o in window]
                for i in range(p):
                    for j in range(p):
                        rel = (log8((r0 - centres[0][i]) / (rows - 1) * 8), log8((c0 - centres[1][j]) / (cols - 1) * 8))
                        bias = m.cpb(torch.tensor(rel, dtype=x.dtype))[h]
                        km = kp[i * p + j, sl]
                        logits.append(qs @ (km / km.norm()) + bias)
                a = torch.softmax(torch.stack(logits), 0)
                acc = torch.zeros(hd, dtype=x.dtype)
                for t, (ra, ca, o) in enumerate(window):
                    weight = a[t] + q_hat @ m.learnable_tokens[h, :, o] + m.learnable_bias[h, o]
                    acc = acc + weight * xv[ra, ca, sl]
                    weights[h, r0 * cols + c0, ra * cols + ca] = weight
                for mm in range(p * p):
                    acc = acc + a[len(window) + mm] * vp[mm, sl]
                    weights[h, r0 * cols + c0, n + mm] = a[len(window) + mm]
                out[r0, c0, sl] = acc
    values = torch.cat([xv.reshape(n, heads * hd), vp]).reshape(n + p * p, heads, hd).transpose(0, 1)
    return lin(out, m.out_proj)[None], weights, values


@pytest.mark.parametrize("grid,kernel_size,pool_size", [((4, 5), 3, 2), ((5, 5), 5, 3)])
def test_module_equals_the_papers_equations_token_by_token(grid, kernel_size, pool_size) -> None:  # type: ignore[no-untyped-def]
    m = _build(kernel_size=kernel_size, pool_size=pool_size)
    x = torch.randn(1, *grid, 8, dtype=torch.float64)
    with torch.no_grad():
        want, weights, values = _by_loops(m, x)
        torch.testing.assert_close(m(x), want)
        torch.testing.assert_close(m(x, impl="reference"), want)
        # the keys are [the N tokens ; the p² pooled summaries]: materialize gives the exact weights over them
        n = math.prod(grid)
        assert m.spec.supports.summary_keys and m.key_count(grid) == n + pool_size**2
        k_keys, v_keys = m.key_values(x)
        assert k_keys.shape == v_keys.shape == (1, 2, n + pool_size**2, 4)
        torch.testing.assert_close(v_keys[0], values)
        a = m.materialize(x)
        torch.testing.assert_close(a[0], weights)
        # out = A v_keys, for the module and for its core given those keys
        torch.testing.assert_close(m.out_proj((a @ v_keys).transpose(1, 2).reshape(1, *grid, 8)), want)
        q = m.project(x.reshape(1, n, 8))[0]
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m.attend(q, k_keys, v_keys, grid=grid, impl=impl), a @ v_keys)


def test_functional_fast_equals_reference_forward_and_backward() -> None:
    gen = torch.Generator().manual_seed(1)
    b, h, grid, d, m_pool, ks = 2, 2, (5, 6), 4, 4, 3
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    leaves = [mk(b, h, *grid, d), mk(b, h, *grid, d), mk(b, h, *grid, d), mk(b, h, m_pool, d), mk(b, h, m_pool, d),
              mk(h, ks * ks), mk(h, 30, m_pool), mk(b, h, *grid, ks * ks)]
    q, k, v, kp, vp, lb, pb, extra = leaves
    kw = lambda: {"kernel_size": ks, "local_bias": lb, "pool_bias": pb, "local_extra": extra}  # noqa: E731
    fast = aggregated_attention(q, k, v, kp, vp, **kw())
    ref, weights = aggregated_attention_reference(q, k, v, kp, vp, **kw())
    torch.testing.assert_close(fast, ref)
    assert weights.shape == (b, h, 30, 30 + m_pool)
    torch.testing.assert_close(ref.flatten(2, 3), weights[..., :30] @ v.flatten(2, 3) + weights[..., 30:] @ vp)
    w = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    for gf, gr in zip(torch.autograd.grad((fast * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves)):
        torch.testing.assert_close(gf, gr)


def test_one_softmax_over_window_and_pooled_keys() -> None:
    """Without learnable-token affinities the weights over [window ; pooled] sum to 1; the token part is zero
    outside the k×k window, and a corner query sees (r + 1)² window keys."""
    m = _build()
    with torch.no_grad():
        m.learnable_tokens.zero_()
        m.learnable_bias.zero_()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    w = m.materialize(x)
    assert w.shape == (2, 2, 20, 24)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 20, dtype=torch.float64))
    assert torch.nonzero(w[0, 0, 0, :20]).flatten().tolist() == [0, 1, 5, 6]  # corner (0, 0): rows 0-1, cols 0-1
    assert torch.nonzero(w[0, 1, 7, :20]).flatten().tolist() == [1, 2, 3, 6, 7, 8, 11, 12, 13]  # (1, 2): full 3×3
    assert (w[..., 20:] > 0).all()  # every query sees every pooled key


def test_one_layer_reaches_the_whole_image_unlike_window_attention() -> None:
    """The paper's claim: aggregated attention perceives globally in one layer (through the pooled keys); a
    window layer does not. Input-gradient support of one output token."""
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64, requires_grad=True)
    m = _build()
    (g,) = torch.autograd.grad(m(x)[0, 0, 0].sum(), x)
    assert (g.abs().sum(-1) > 0).all()
    lsa = attnlab.build("twins-lsa", dim=8, heads=2, tile_size=3).double()
    (g,) = torch.autograd.grad(lsa(x)[0, 0, 0].sum(), x)
    reached = g.abs().sum(-1)[0] > 0
    assert reached[:3, :3].all() and not reached[3:].any() and not reached[:, 3:].any()


def test_attend_on_token_keys_alone_pools_k_and_v() -> None:
    m = _build(grid_shape=(4, 6))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 4, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    means = [torch.stack([t[:, :, a : a + 2, c : c + 3].mean((2, 3)) for a in (0, 2) for c in (0, 3)], 2) for t in (k, v)]
    want = m.attend(q, torch.cat([k.flatten(2, 3), means[0]], 2), torch.cat([v.flatten(2, 3), means[1]], 2))
    torch.testing.assert_close(m.attend(q, k, v), want)
    torch.testing.assert_close(m.attend(q, k, v, impl="reference"), want)
    flat = [t.flatten(2, 3) for t in (q, k, v)]
    torch.testing.assert_close(m.attend(*flat), want.flatten(2, 3))


def test_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match="kernel_size: expected an odd"):
        attnlab.build("aggregated", dim=8, heads=2, kernel_size=4)
    with pytest.raises(ValueError, match=r"kernel_size.*\(4, 4\).*kernel_size=5"):
        attnlab.build("aggregated", dim=8, heads=2, kernel_size=5, grid_shape=(4, 4))
    m = _build()
    with pytest.raises(ValueError, match=r"kernel_size.*\(2, 5\).*kernel_size=3"):
        m(torch.randn(1, 2, 5, 8, dtype=torch.float64))
    m7 = attnlab.build("aggregated", dim=8, heads=2, kernel_size=3, pool_size=7)
    with pytest.raises(ValueError, match=r"pool_size.*\(5, 6\).*pool_size=7"):
        m7(torch.randn(1, 5, 6, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        m.materialize(torch.randn(1, 4, 4, 8, dtype=torch.float64), attention_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pool_size.*\(5, 6\).*pool_size=7"):
        m7.key_count((5, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randn(1, 4, 4, 8, dtype=torch.float64), attention_mask=torch.ones(1, 16, dtype=torch.bool))
    q = torch.randn(1, 2, 16, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grid: \(4, 5\) holds 20 positions.*16"):
        m.attend(q, q, q, grid=(4, 5))
    kv = torch.randn(1, 2, 19, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k: expected 16 rows .* 16 \+ 2² = 20 .* got 19"):
        m.attend(q, kv, kv, grid=(4, 4))
