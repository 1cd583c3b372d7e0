"""Neural attention: the output and weights against a reference written with explicit Python loops over the pairs
(i, j) (causal, padding, cross-attention; the paper's one hidden layer and the official code's two); the chunk size
changes nothing; bad MLP shapes are named."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.errors import ShapeError
from attnlab.mechanisms.dense.neural import neural_attention, neural_attention_reference

F64 = torch.float64


def _loops(m, q, k, v, keep=None, causal=False):
    """out, weights by a Python loop over every (batch, head, i, j): s_ij = MLP([P_q q_i + p_q ; P_k k_j + p_k])."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    offset = n_k - n_q
    out = torch.zeros(b, h, n_q, v.shape[-1], dtype=F64)
    weights = torch.zeros(b, h, n_q, n_k, dtype=F64)
    for z in range(b):
        for hh in range(h):
            for i in range(n_q):
                seen, scores = [], []
                for j in range(n_k):
                    if (keep is not None and not keep[z, j]) or (causal and j > i + offset):
                        continue
                    x = torch.cat([m.q_down(q[z, hh, i]), m.k_down(k[z, hh, j])])
                    for li, layer in enumerate(m.mlp):
                        x = layer(x)
                        if li < len(m.mlp) - 1:
                            x = torch.relu(x)
                    seen.append(j)
                    scores.append(x[0])
                if not seen:
                    continue
                p = torch.softmax(torch.stack(scores), 0)
                for pj, j in zip(p, seen):
                    weights[z, hh, i, j] = pj
                    out[z, hh, i] += pj * v[z, hh, j]
    return out, weights


@pytest.mark.parametrize("hidden", [None, (4, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_explicit_loops_over_pairs(causal, hidden):
    torch.manual_seed(3)
    m = attnlab.build("neural-attention", dim=12, heads=2, causal=causal, projection_dim=4, hidden=hidden,
                      chunk_size=2).double()
    assert [lin.weight.shape[1] for lin in m.mlp] == [8, *((4,) if hidden is None else (4, 2))]
    x = torch.randn(2, 6, 12, dtype=F64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 1] = keep[0, 4] = False
    keep[1, :2] = False
    q, k, v = m.project(x)
    with torch.no_grad():
        want_out, want_w = _loops(m, q, k, v, keep, causal)
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m.attend(q, k, v, attention_mask=keep, impl=impl), want_out, rtol=1e-12, atol=1e-13)
        w = m.materialize(x, attention_mask=keep)
    torch.testing.assert_close(w, want_w, rtol=1e-12, atol=1e-13)
    assert w[0, :, :, [1, 4]].abs().max() == 0 and w[1, :, :, :2].abs().max() == 0  # padded keys get nothing
    if causal:
        assert w.triu(1).abs().max() == 0  # nor do future keys
    rows = torch.ones(2, 2, 6, dtype=F64)
    if causal:
        rows[1, :, :2] = 0  # the first two queries of element 1 see only padding: zero rows
    torch.testing.assert_close(w.sum(-1), rows)


def test_cross_attention_matches_loops():
    torch.manual_seed(4)
    m = attnlab.build("neural-attention", dim=8, heads=2, projection_dim=3).double()
    x, ctx = torch.randn(1, 3, 8, dtype=F64), torch.randn(1, 5, 8, dtype=F64)
    q, k, v = m.project(x, ctx)
    with torch.no_grad():
        want, _ = _loops(m, q, k, v)
        torch.testing.assert_close(m.attend(q, k, v), want, rtol=1e-12, atol=1e-13)


def test_chunk_size_changes_nothing_forward_and_backward():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    q_down = (torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True), torch.randn(3, generator=g, dtype=F64))
    k_down = (torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64, requires_grad=True))
    layers = [(torch.randn(5, 6, generator=g, dtype=F64, requires_grad=True), torch.randn(5, generator=g, dtype=F64)),
              (torch.randn(1, 5, generator=g, dtype=F64), torch.randn(1, generator=g, dtype=F64, requires_grad=True))]
    kw = dict(q_down=q_down, k_down=k_down, layers=layers, causal=True)
    ref, _ = neural_attention_reference(q, k, v, **kw)
    inputs = (q, k, v, q_down[0], k_down[1], layers[0][0], layers[1][1])
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for chunk in (1, 4, 100):
        out = neural_attention(q, k, v, chunk_size=chunk, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
        for a, b in zip(torch.autograd.grad((out * w).sum(), inputs), want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_mlp_shapes_are_named():
    q = torch.randn(1, 2, 4, 4)
    down = (torch.randn(3, 4), torch.randn(3))
    ok = [(torch.randn(5, 6), torch.randn(5)), (torch.randn(1, 5), torch.randn(1))]
    with pytest.raises(ShapeError, match="layers: expected the last layer to give one logit"):
        neural_attention(q, q, q, q_down=down, k_down=down, layers=[(torch.randn(5, 6), torch.randn(5))])
    with pytest.raises(ShapeError, match=r"layers\[0\]: expected weight \(out, 6\)"):
        neural_attention(q, q, q, q_down=down, k_down=down, layers=[(torch.randn(5, 7), torch.randn(5)), ok[1]])
    with pytest.raises(ShapeError, match="q_down: expected weight"):
        neural_attention(q, q, q, q_down=(torch.randn(3, 5), torch.randn(3)), k_down=down, layers=ok)
    with pytest.raises(ValueError, match="hidden"):
        attnlab.build("neural-attention", dim=8, heads=2, hidden=(4, 0))


def test_backward_keeps_no_pair_tensor():
    """The blocks are recomputed in the backward pass: no tensor the autograd graph saves is as large as one block's
    pairs (batch, heads, chunk, n_k, H), let alone all of them."""
    torch.manual_seed(6)
    b, h, n, chunk, width = 2, 2, 32, 4, 8
    m = attnlab.build("neural-attention", dim=8, heads=h, causal=True, projection_dim=width, chunk_size=chunk)
    x = torch.randn(b, n, 8, requires_grad=True)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    y.sum().backward()
    block_pairs = b * h * chunk * n * width
    assert sizes and max(sizes) < block_pairs, (max(sizes), block_pairs)
    assert x.grad is not None and torch.isfinite(x.grad).all()
