"""Loki (P027) against a float64 reference written from the formula, and its exact limits."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.inference.loki import (
    KeyBasis,
    LokiAttention,
    fit_key_basis,
    loki_attention,
    loki_decode,
    loki_select,
    split_rotated_keys,
)


def reference(q, k, v, P, r, top_k, causal, bias=None):
    """Per query, loops: s̃_j = (q P_r)·(k_j P_r)/√d + b_ij over visible j, top-k, softmax of exact q·k_j/√d + b_ij,
    Σ w_j v_j."""
    q, k, v, P = q.double(), k.double(), v.double(), P.double()
    bias = torch.zeros(q.shape[1], q.shape[2], k.shape[2], dtype=torch.float64) if bias is None else bias.double()
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.zeros(b, h, n_q, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            Pr = P[hi][:, :r]
            for i in range(n_q):
                pos = n_k - n_q + i
                visible = [j for j in range(n_k) if not causal or j <= pos]
                approx = {j: float((q[bi, hi, i] @ Pr) @ (k[bi, hi, j] @ Pr)) / math.sqrt(d) + float(bias[hi, i, j])
                          for j in visible}
                chosen = sorted(visible, key=lambda j: -approx[j])[:top_k]
                logits = torch.stack([q[bi, hi, i] @ k[bi, hi, j] / math.sqrt(d) + bias[hi, i, j] for j in chosen])
                w = torch.softmax(logits, 0)
                out[bi, hi, i] = sum(w[t] * v[bi, hi, j] for t, j in enumerate(chosen))
    return out


def dense(q, k, v, causal):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n_q, n_k = s.shape[-2:]
        s = s.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q).logical_not(), float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def random_orthonormal(heads, d, gen):
    return torch.linalg.qr(torch.randn(heads, d, d, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r,top_k", [(2, 3), (4, 5), (8, 1)])
def test_matches_float64_reference(causal, r, top_k):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64) for n in (5, 9, 9))
    P = random_orthonormal(2, 8, gen)
    got = loki_attention(q, k, v, P, r, top_k, causal=causal)
    torch.testing.assert_close(got, reference(q, k, v, P, r, top_k, causal), atol=1e-12, rtol=1e-12)
    # an additive score term (ALiBi-like) enters both the ranking and the exact logits; scale 1/√d (full d) matters
    bias = -0.4 * torch.arange(9.0)[None, None, :].flip(-1).expand(2, 5, 9) * torch.tensor([1.0, 2.0])[:, None, None]
    got = loki_attention(q, k, v, P, r, top_k, causal=causal, bias=bias)
    torch.testing.assert_close(got, reference(q, k, v, P, r, top_k, causal, bias), atol=1e-12, rtol=1e-12)


def test_full_rank_and_all_keys_is_dense_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    P = random_orthonormal(3, 8, gen)
    for causal in (False, True):
        torch.testing.assert_close(loki_attention(q, k, v, P, 8, 12, causal=causal), dense(q, k, v, causal),
                                   atol=1e-12, rtol=1e-12)
    # full rank but few keys: the selection is the exact top-k of q kᵀ
    idx, valid = loki_select(q, k, P, 8, 4)
    true = (q @ k.transpose(-1, -2)).topk(4, dim=-1).indices
    assert valid.all() and torch.equal(idx.sort(-1).values, true.sort(-1).values)


def test_selection_respects_the_causal_mask():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 10, 4, generator=gen), torch.randn(1, 2, 10, 4, generator=gen)
    k[..., 9, :] = 100 * q.mean(2)  # the last key scores highest for every query: only the last query may take it
    P = random_orthonormal(2, 4, gen).float()
    idx, valid = loki_select(q, k, P, 2, 3, causal=True)
    pos = torch.arange(10)[:, None]
    assert bool(((idx <= pos) | ~valid).all())
    assert valid.sum(-1)[0, 0].tolist() == [1, 2] + [3] * 8  # the first queries see fewer than k keys
    # a query that sees no key gets zeros, not NaN (padding everything)
    out = loki_attention(q, k, k, P, 2, 3, causal=True, keep=torch.zeros(1, 10, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


def test_pca_basis_is_orthonormal_and_ranks_variance():
    gen = torch.Generator().manual_seed(4)
    # keys of head 0 live in 3 directions (scales 10, 5, 1), head 1 isotropic in 8
    basis3 = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))[0]
    low = (torch.randn(1, 4000, 3, generator=gen, dtype=torch.float64) * torch.tensor([10.0, 5.0, 1.0])) @ basis3.T
    iso = torch.randn(1, 4000, 8, generator=gen, dtype=torch.float64)
    basis = fit_key_basis(torch.cat([low, iso])[None])
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(basis.components.transpose(1, 2) @ basis.components, eye.expand(2, 8, 8))
    assert bool((basis.variance[:, :-1] >= basis.variance[:, 1:]).all())
    torch.testing.assert_close(basis.variance[0, :3], torch.tensor([100.0, 25.0, 1.0], dtype=torch.float64), rtol=0.08, atol=0)
    assert basis.variance[0, 3:].abs().max() < 1e-9
    # the first direction of head 0 is the planted scale-10 one
    assert abs(float(basis.components[0, :, 0] @ basis3[:, 0])) > 0.999
    # 90%: 100/126 < 0.9 < 125/126 -> 2 for head 0; about 8·0.9 -> 7 or 8 for the isotropic head
    ranks = basis.rank_for(0.9)
    assert ranks[0].item() == 2 and ranks[1].item() >= 7
    assert basis.rank_for(1.0)[0].item() == 3


def test_recall_of_planted_keys_in_the_top_directions():
    gen = torch.Generator().manual_seed(5)
    d, n, planted = 16, 200, [17, 60, 133, 190]
    # keys vary mostly in the first 4 coordinates; the planted keys align with the query there
    k = torch.randn(1, 1, n, d, generator=gen) * torch.cat([torch.full((4,), 3.0), torch.full((d - 4,), 0.3)])
    q = torch.zeros(1, 1, 1, d)
    q[..., :4] = 1.0
    k[0, 0, planted, :4] = 8.0
    basis = fit_key_basis(k)
    idx, _ = loki_select(q, k, basis.components, 4, 4)
    assert sorted(idx.flatten().tolist()) == planted
    # the bottom directions rank them no better than chance: a reversed basis misses them
    reversed_basis = basis.components.flip(-1)
    idx_low, _ = loki_select(q, k, reversed_basis, 4, 4)
    assert len(set(idx_low.flatten().tolist()) & set(planted)) < 4


def test_decode_on_rotated_cache_matches_prefill_last_row():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    P = random_orthonormal(2, 8, gen)
    prefill = loki_attention(q, k, v, P, 3, 7, causal=True)
    step = loki_decode(q[:, :, -1:], *split_rotated_keys(k, P, 3), v, P, 7)
    torch.testing.assert_close(step, prefill[:, :, -1:], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(step, reference(q[:, :, -1:], k, v, P, 3, 7, False), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["softmax", "alibi"])
def test_wrapper_full_rank_all_keys_equals_module(name):
    torch.manual_seed(7)
    module = attnlab.build(name, dim=16, heads=2, causal=True).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    loki = LokiAttention.fit(module, x, rank=8, top_k=11)
    torch.testing.assert_close(loki(x), module(x, impl="reference"), atol=1e-10, rtol=1e-10)
    cache, ys = None, []
    for t in range(11):
        y, cache = loki.step(x[:, t : t + 1], cache)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), module(x, impl="reference"), atol=1e-10, rtol=1e-10)
    # sparse: decode equals the prefill's rows
    sparse = LokiAttention.fit(module, x, rank=2, top_k=3)
    cache, ys = None, []
    for t in range(11):
        y, cache = sparse.step(x[:, t : t + 1], cache)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), sparse(x), atol=1e-10, rtol=1e-10)


def test_bad_inputs():
    q = torch.randn(1, 2, 3, 4)
    P = torch.eye(4).expand(2, 4, 4)
    with pytest.raises(ValueError, match="rank: expected an int in \\[1, 4\\]"):
        loki_select(q, q, P, 5, 2)
    with pytest.raises(ValueError, match="top_k: expected an int >= 1"):
        loki_select(q, q, P, 2, 0)
    with pytest.raises(ValueError, match="components: expected shape"):
        loki_select(q, q, torch.eye(4), 2, 2)
    with pytest.raises(ValueError, match="fraction: expected a float in"):
        KeyBasis(P, torch.ones(2, 4)).rank_for(1.5)
    with pytest.raises(TypeError, match="module: expected a softmax-family"):
        LokiAttention(torch.nn.Linear(2, 2), KeyBasis(P, torch.ones(2, 4)), 2, 2)  # type: ignore[arg-type]
    rope = attnlab.build("rope", dim=8, heads=2)
    with pytest.raises(TypeError, match="transforms q/k inside its core"):
        LokiAttention(rope, KeyBasis(P, torch.ones(2, 4)), 2, 2)
    with pytest.raises(ValueError, match="q: expected one query"):
        loki_decode(q, q[..., :2], q[..., 2:], q, P, 2)
    with pytest.raises(ValueError, match="keys_rest: expected shape"):
        loki_decode(q[:, :, :1], q[..., :2], q[..., 1:], q, P, 2)


def test_registered():
    spec = attnlab.get("loki", "inference")
    assert spec.kind == "inference" and spec.paper.id == "P027" and spec.factory is LokiAttention
