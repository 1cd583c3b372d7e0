"""Routing attention (P039): balanced clusters, attention only within a cluster, EMA centroids, autograd."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.routing import (
    Routing,
    ema_centroids,
    route,
    routing_attention,
    routing_attention_reference,
)


def ln(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine parameters, written out (eps 1e-5 as torch's default)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def qkv(b: int = 2, h: int = 2, n: int = 12, d: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def centroids(h: int, c: int, d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(h, c, d, generator=g, dtype=torch.float64)
    return mu / mu.norm(dim=-1, keepdim=True)


def hand_members(q, k, mu, causal, kpm=None):  # type: ignore[no-untyped-def]
    """Membership (b, h, c, n) bool of queries and keys, by loops over clusters and sorting by hand."""
    b, h, n, d = q.shape
    c = mu.shape[1]
    qs = torch.einsum("bhnd,hcd->bhcn", ln(q) / math.sqrt(d), mu)
    ks = torch.einsum("bhnd,hcd->bhcn", ln(q if causal else k) / math.sqrt(d), mu)
    mq = torch.zeros(b, h, c, n, dtype=torch.bool)
    mk = torch.zeros(b, h, c, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            if causal:
                for i in range(n):
                    best = max(range(c), key=lambda cc: float(qs[bi, hi, cc, i]))
                    mq[bi, hi, best, i] = mk[bi, hi, best, i] = True
                continue
            real = [i for i in range(n) if kpm is None or bool(kpm[bi, i])]
            w = math.ceil(len(real) / c)  # the width of this sequence without its padding
            for cc in range(c):
                for scores, m in ((qs, mq), (ks, mk)):
                    for i in sorted(real, key=lambda j: -float(scores[bi, hi, cc, j]))[:w]:
                        m[bi, hi, cc, i] = True
    return mq, mk


def hand_attention(q, k, v, mq, mk, causal, kpm=None):  # type: ignore[no-untyped-def]
    """out_i = mean over i's clusters of softmax over the cluster's visible keys, row by row."""
    b, h, n, d = q.shape
    qn = ln(q)
    kn = qn if causal else ln(k)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    rows = []
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                acc, count = torch.zeros(v.shape[-1], dtype=q.dtype), 0
                for cc in range(mq.shape[2]):
                    if not mq[bi, hi, cc, i]:
                        continue
                    count += 1
                    keys = [j for j in range(n) if mk[bi, hi, cc, j] and (not causal or j <= i) and (kpm is None or kpm[bi, j])]
                    if keys:
                        s = torch.stack([qn[bi, hi, i] @ kn[bi, hi, j] for j in keys]) / math.sqrt(d)
                        acc = acc + torch.softmax(s, 0) @ v[bi, hi, keys]
                rows.append(acc / max(count, 1))
    out = torch.stack(rows).view(b, h, n, -1)
    return out


@pytest.mark.parametrize("n,c", [(12, 3), (10, 3), (16, 4), (5, 7)])
def test_balanced_clusters_are_each_centroids_top_n_over_k(n: int, c: int) -> None:
    q, k, _ = qkv(n=n)
    mu = centroids(2, c, 4)
    r = route(q, k, mu)
    w = math.ceil(n / c)
    assert r.q_index.shape == r.k_index.shape == (2, 2, c, w)
    assert bool(r.q_valid.all()) and bool(r.k_valid.all())
    mq, mk = hand_members(q, k, mu, causal=False)
    assert torch.equal(r.members(n, "q"), mq) and torch.equal(r.members(n, "k"), mk)
    assert bool((r.members(n, "q").sum(-1) == w).all())  # every cluster the same size, no repeats


def test_causal_routing_is_the_nearest_centroid_with_shared_queries_and_keys() -> None:
    q, k, _ = qkv(n=11)
    mu = centroids(2, 3, 4)
    r = route(q, k, mu, causal=True)
    mq, mk = hand_members(q, k, mu, causal=True)
    assert torch.equal(r.members(11, "q"), mq) and torch.equal(r.members(11, "k"), mq)
    assert bool((r.members(11, "q").sum(2) == 1).all())  # each token in exactly one cluster
    # positions inside a cluster are in increasing order (the valid prefix)
    idx = torch.where(r.q_valid, r.q_index, 10**6)
    assert bool((idx[..., 1:] > idx[..., :-1])[r.q_valid[..., 1:]].all())


@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_zero_across_clusters_and_matches_loops(causal: bool) -> None:
    q, k, v = qkv(n=12)
    mu = centroids(2, 3, 4)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[0, 9:] = False
    mq, mk = hand_members(q, k, mu, causal, kpm)
    out, weights = routing_attention_reference(q, k, v, centroids=mu, causal=causal, attention_mask=kpm)
    share = (mq[..., :, None] & mk[..., None, :]).any(2)
    assert bool((weights[~share] == 0).all())
    assert bool((weights[..., ~kpm[0]][0] == 0).all())
    if causal:
        assert bool((weights.triu(1) == 0).all())
    want = hand_attention(q, k, v, mq, mk, causal, kpm)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(routing_attention(q, k, v, centroids=mu, causal=causal, attention_mask=kpm), want)


@pytest.mark.parametrize("causal", [False, True])
def test_fast_equals_reference_forward_and_backward_for_one_assignment(causal: bool) -> None:
    q, k, v = (t.requires_grad_(True) for t in qkv(n=13, seed=3))
    mu = centroids(2, 4, 4, seed=5)
    kpm = torch.rand(2, 13, generator=torch.Generator().manual_seed(2)) > 0.2
    r = route(q, k, mu, causal=causal, attention_mask=kpm)
    fast = routing_attention(q, k, v, routing=r, causal=causal, attention_mask=kpm)
    ref, _ = routing_attention_reference(q, k, v, routing=r, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    gf = torch.autograd.grad((fast * w).sum(), (q, k, v), allow_unused=True)
    gr = torch.autograd.grad((ref * w).sum(), (q, k, v), allow_unused=True)
    for a, b in zip(gf, gr):
        if a is None or b is None:
            assert a is None and b is None and causal  # keys are the queries when causal: k gets no gradient
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_selection_is_not_differentiated() -> None:
    """The gradient is the dense masked attention's with the clusters held fixed; gradcheck holds
    (a small step keeps the assignment), and the centroids never get a gradient."""
    q, k, v = qkv(b=1, h=1, n=8, seed=4)
    mu = centroids(1, 2, 4, seed=6).requires_grad_(True)
    mq, mk = hand_members(q, k, mu.detach(), causal=False)
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    fast = routing_attention(qa, ka, va, centroids=mu)
    want = hand_attention(*(t.clone().requires_grad_(True) for t in (q, k, v)), mq, mk, False)
    g = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast_grads = torch.autograd.grad((fast * g).sum(), (qa, ka, va))
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    hand_grads = torch.autograd.grad((hand_attention(q2, k2, v2, mq, mk, False) * g).sum(), (q2, k2, v2))
    torch.testing.assert_close(fast, want)
    for a, b in zip(fast_grads, hand_grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.grad(fast.sum(), mu, allow_unused=True) == (None,)
    r = route(q, k, mu)
    assert torch.autograd.gradcheck(
        lambda a, b, c: routing_attention(a, b, c, routing=r), (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    )


def test_one_cluster_is_full_attention_over_normalised_queries_and_keys() -> None:
    q, k, v = qkv(n=9)
    out = routing_attention(q, k, v, centroids=centroids(2, 1, 4))
    want = torch.softmax(ln(q) @ ln(k).transpose(-1, -2) / 2.0, -1) @ v
    torch.testing.assert_close(out, want)


def test_ema_update_by_hand() -> None:
    """Two centroids, three queries and three keys; μ_c ← λμ_c + (1 − λ)·mean of the normalised vectors nearest to c."""
    mu = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)
    q = torch.tensor([[[[3.0, 0.0, 0.0, 1.0], [0.0, 1.0, 4.0, 0.0], [2.0, 0.0, 0.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.0, 0.0, 5.0, 1.0], [1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 0.0, 0.0]]]], dtype=torch.float64)
    lam = 0.9
    new = ema_centroids(mu, q, k, decay=lam)
    vecs = torch.cat([ln(q), ln(k)], 2)[0, 0] / 2.0  # unit vectors (d = 4)
    nearest = (vecs @ mu[0].T).argmax(-1)
    for c in range(2):
        mine = vecs[nearest == c]
        want = lam * mu[0, c] + (1 - lam) * mine.mean(0) if len(mine) else mu[0, c]
        torch.testing.assert_close(new[0, c], want)
    assert not torch.equal(new, mu)
    # padding leaves the padded tokens' vectors out; an empty cluster keeps its centroid
    kpm = torch.tensor([[True, False, True]])
    new_p = ema_centroids(mu, q, k, decay=lam, attention_mask=kpm)
    keep = torch.tensor([True, False, True, True, False, True])
    for c in range(2):
        mine = vecs[(nearest == c) & keep]
        want = lam * mu[0, c] + (1 - lam) * mine.mean(0) if len(mine) else mu[0, c]
        torch.testing.assert_close(new_p[0, c], want)


def test_module_updates_centroids_in_training_only() -> None:
    """Training mode: the forward's EMA step lands in the buffer with its backward pass (forward
    calls alone leave it, so two forwards agree); eval mode and materialize never move it."""
    torch.manual_seed(0)
    m = attnlab.build("routing", dim=8, heads=2, clusters=3, decay=0.5).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    before = m.centroids.clone()
    m.eval()
    m(x).sum().backward()
    m(x, impl="reference").sum().backward()
    m.materialize(x).sum().backward()
    assert torch.equal(m.centroids, before)
    m.train()
    m.materialize(x).sum().backward()
    y = m(x)
    torch.testing.assert_close(m(x, impl="reference"), y)  # no step between forward calls
    assert torch.equal(m.centroids, before)
    with torch.no_grad():
        q, k, _ = m.project(x)
    want = ema_centroids(before, q, k, decay=0.5)
    y.sum().backward()
    torch.testing.assert_close(m.centroids, want)
    assert not m.centroids.requires_grad and m.centroids.grad is None and "centroids" in m.state_dict()
    y2 = m(x)
    y2.sum().backward()  # the next step starts from the moved centroids
    torch.testing.assert_close(m.centroids, ema_centroids(want, q, k, decay=0.5))


def test_deterministic_given_a_seed() -> None:
    x = torch.randn(1, 12, 8, generator=torch.Generator().manual_seed(3))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        m = attnlab.build("routing", dim=8, heads=2, clusters=3, decay=0.5).train()
        y = m(x)
        y.sum().backward()
        outs.append((y, m(x), m.centroids.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_scores_per_cluster_are_k_w_squared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path attends clusters × w queries to w keys each (n²/k scores per head), never n × n."""
    q, k, v = qkv(b=1, h=1, n=64, d=4)
    seen: list[tuple[int, ...]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(qq, kk, vv, **kw):  # type: ignore[no-untyped-def]
        seen.append((*qq.shape[:-1], kk.shape[-2]))
        return original(qq, kk, vv, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    routing_attention(q, k, v, centroids=centroids(1, 8, 4))
    assert seen == [(1, 8, 8, 8)]  # (batch, heads · clusters, w queries, w keys)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ParameterError, match="clusters"):
        attnlab.build("routing", dim=8, heads=2, clusters=0)
    with pytest.raises(ParameterError, match="decay"):
        attnlab.build("routing", dim=8, heads=2, decay=1.5)
    q, k, v = qkv(n=6)
    with pytest.raises(ValueError, match="centroids"):
        routing_attention(q, k, v, centroids=torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="centroids, routing"):
        routing_attention(q, k, v)
    with pytest.raises(ValueError, match="k"):
        routing_attention(q, k[:, :, :5], v[:, :, :5], centroids=centroids(2, 2, 4))
    index, valid = torch.full((2, 2, 2, 3), 9), torch.ones(2, 2, 2, 3, dtype=torch.bool)
    bad = Routing(index, valid, index, valid)
    with pytest.raises(ValueError, match="routing.q_index"):
        routing_attention(q, k, v, routing=bad)
    ok = torch.zeros(2, 2, 3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="as many query as key clusters, got 2 and 3"):
        routing_attention(q, k, v, routing=Routing(index.clamp(max=5), valid, ok, ok.bool()))
    with pytest.raises(ValueError, match="routing.k_valid"):
        routing_attention(q, k, v, routing=Routing(ok, ok.bool(), ok, ok))
    m = attnlab.build("routing", dim=8, heads=2, clusters=2)
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 5, 8), attn_mask=torch.ones(5, 5, dtype=torch.bool))
