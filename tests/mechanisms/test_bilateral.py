"""Bilateral local attention (P208 BOAT): balanced feature-space clusters, window attention, autograd."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.bilateral import (
    BilateralAttention,
    balanced_clusters,
    bilateral_attention,
    bilateral_attention_reference,
)


def qkv(b: int = 2, h: int = 2, grid: tuple[int, int] = (4, 8), d: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, *grid, d, generator=g, dtype=torch.float64) for _ in range(3)]


def random_clusters(b: int, h: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(b * h)]).view(b, h, n // m, m)


def hand_window(q, k, v, win):  # type: ignore[no-untyped-def]
    """Softmax attention inside each wh × ww window, window by window with explicit loops."""
    b, h, hh, ww, d = q.shape
    out = torch.zeros(b, h, hh, ww, v.shape[-1], dtype=q.dtype)
    for r0 in range(0, hh, win[0]):
        for c0 in range(0, ww, win[1]):
            sl = (slice(None), slice(None), slice(r0, r0 + win[0]), slice(c0, c0 + win[1]))
            qw, kw, vw = (t[sl].reshape(b, h, -1, t.shape[-1]) for t in (q, k, v))
            a = torch.softmax(qw @ kw.transpose(-1, -2) / math.sqrt(d), -1)
            out[sl] = (a @ vw).reshape(b, h, win[0], win[1], -1)
    return out.reshape(b, h, hh * ww, -1)


def hand_clusters(q, k, v, clusters):  # type: ignore[no-untyped-def]
    """Softmax attention among the members of each cluster, cluster by cluster."""
    b, h = q.shape[:2]
    d = q.shape[-1]
    qf, kf, vf = (t.reshape(b, h, -1, t.shape[-1]) for t in (q, k, v))
    rows: dict[tuple[int, int, int], torch.Tensor] = {}
    for bi in range(b):
        for hi in range(h):
            for members in clusters[bi, hi].tolist():
                s = qf[bi, hi, members] @ kf[bi, hi, members].T / math.sqrt(d)
                o = torch.softmax(s, -1) @ vf[bi, hi, members]
                for i, pos in enumerate(members):
                    rows[bi, hi, pos] = o[i]
    n = qf.shape[2]
    return torch.stack([rows[bi, hi, p] for bi in range(b) for hi in range(h) for p in range(n)]).view(b, h, n, -1)


def test_clusters_are_a_balanced_partition() -> None:
    x = torch.randn(3, 2, 64, 5, generator=torch.Generator().manual_seed(1))
    for m in (1, 4, 16, 64):
        c = balanced_clusters(x, m)
        assert c.shape == (3, 2, 64 // m, m)  # every cluster the same size
        assert torch.equal(c.reshape(3, 2, 64).sort(-1).values, torch.arange(64).expand(3, 2, 64))


def test_clustering_recovers_tight_groups_in_feature_space() -> None:
    """Four tight groups of four tokens (random directions, shuffled positions): with m = 4 each cluster
    is one group, and with m = 8 each cluster is a union of two groups."""
    g = torch.Generator().manual_seed(3)
    dirs = torch.randn(4, 6, generator=g)
    labels = torch.arange(4).repeat_interleave(4)[torch.randperm(16, generator=g)]
    x = dirs[labels] * (1 + torch.rand(16, 1, generator=g)) + 1e-3 * torch.randn(16, 6, generator=g)
    groups = {frozenset(torch.nonzero(labels == lab).flatten().tolist()) for lab in range(4)}
    got = {frozenset(row) for row in balanced_clusters(x, 4).tolist()}
    assert got == groups
    for row in balanced_clusters(x, 8).tolist():
        assert sum(1 for grp in groups if grp <= set(row)) == 2


def test_first_split_by_hand() -> None:
    """One level (m = N/2) by the paper's rule, written out: centroids from the two halves' means,
    two soft 2-means steps (sharpness 100), sort by (1 + cos c1)/(1 + cos c2), cut in the middle."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # 1 or 3 steps differ
    unit = x / x.norm(dim=-1, keepdim=True)
    c = [x[:4].mean(0), x[4:].mean(0)]
    c = [ci / ci.norm() for ci in c]
    for _ in range(2):
        cos = torch.stack([unit @ ci for ci in c], -1)
        a = torch.softmax(100 * cos, -1)
        c = [(a[:, j : j + 1] * x).sum(0) for j in range(2)]
        c = [ci / ci.norm() for ci in c]
    ratio = [(1 + float(unit[i] @ c[0])) / (1 + float(unit[i] @ c[1])) for i in range(8)]
    order = sorted(range(8), key=lambda i: ratio[i])
    assert balanced_clusters(x, 4).tolist() == [order[:4], order[4:]]


@pytest.mark.parametrize("branches", ["image", "feature", "both"])
def test_branches_match_loops(branches: str) -> None:
    q, k, v = qkv()
    clusters = random_clusters(2, 2, 32, 8)
    got = bilateral_attention(q, k, v, tile_size=(2, 4), cluster_size=8, branches=branches, clusters=clusters)
    win = hand_window(q, k, v, (2, 4))
    feat = hand_clusters(q, k, v, clusters)
    want = {"image": win, "feature": feat, "both": (win + feat) / 2}[branches]
    torch.testing.assert_close(got.reshape(want.shape), want)
    ref, _ = bilateral_attention_reference(q, k, v, tile_size=(2, 4), cluster_size=8, branches=branches, clusters=clusters)
    torch.testing.assert_close(ref.reshape(want.shape), want)


def test_attention_is_zero_across_clusters_and_windows() -> None:
    q, k, v = qkv(grid=(4, 4))
    clusters = balanced_clusters(q.reshape(2, 2, 16, 4), 4)
    cid = torch.empty(2, 2, 16, dtype=torch.int64)
    for c in range(4):
        for bi in range(2):
            for hi in range(2):
                cid[bi, hi, clusters[bi, hi, c]] = c
    same_cluster = cid[..., :, None] == cid[..., None, :]
    r, c = torch.arange(16) // 4, torch.arange(16) % 4
    same_window = ((r[:, None] // 2) == (r[None, :] // 2)) & ((c[:, None] // 2) == (c[None, :] // 2))
    _, feat = bilateral_attention_reference(q, k, v, tile_size=2, cluster_size=4, branches="feature")
    _, both = bilateral_attention_reference(q, k, v, tile_size=2, cluster_size=4, branches="both")
    assert bool((feat[~same_cluster] == 0).all()) and bool((feat[same_cluster] > 0).all())
    assert bool((both[~(same_cluster | same_window)] == 0).all())
    torch.testing.assert_close(both.sum(-1), torch.ones(2, 2, 16, dtype=torch.float64))
    # every cluster holds exactly m = 4 keys per query
    assert bool((same_cluster.sum(-1) == 4).all())


@pytest.mark.parametrize("branches", ["feature", "both"])
def test_fast_equals_reference_forward_and_backward_for_one_assignment(branches: str, same_grads) -> None:
    q, k, v = (t.requires_grad_(True) for t in qkv(grid=(4, 8), seed=2))
    clusters = random_clusters(2, 2, 32, 4, seed=4)
    kw = {"tile_size": (4, 2), "cluster_size": 4, "branches": branches, "clusters": clusters}
    fast = bilateral_attention(q, k, v, **kw)
    ref, _ = bilateral_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    same_grads(ref, (fast,), (q, k, v), w, atol=1e-10, rtol=1e-8)


def test_clustering_is_not_differentiated() -> None:
    """Gradients are those of attention inside the clusters held fixed; the assignment has no gradient."""
    q, k, v = qkv(b=1, h=1, grid=(2, 4), seed=6)
    q.requires_grad_(True)
    assert not balanced_clusters(q.reshape(1, 1, 8, 4) * 2, 2).requires_grad
    fixed = balanced_clusters(q.detach().reshape(1, 1, 8, 4), 2)
    fast = bilateral_attention(q, k, v, tile_size=2, cluster_size=2, branches="feature")
    q2 = q.detach().clone().requires_grad_(True)
    want = hand_clusters(q2, k, v, fixed)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (ga,) = torch.autograd.grad((fast.reshape(want.shape) * g).sum(), q)
    (gb,) = torch.autograd.grad((want * g).sum(), q2)
    torch.testing.assert_close(ga, gb)
    assert torch.autograd.gradcheck(
        lambda a, b, c: bilateral_attention(a, b, c, tile_size=2, cluster_size=2),
        (q.detach().clone().requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)),
    )


def test_deterministic_given_a_seed() -> None:
    x = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        m = attnlab.build("bilateral", dim=16, heads=2, tile_size=(2, 4), cluster_size=4)
        outs.append((m(x), m.materialize(x)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_module_on_flat_inputs_with_a_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """`attend` takes flat heads with grid=(H, W); SDPA runs on w×w windows and m×m clusters, never N×N."""
    torch.manual_seed(0)
    m = attnlab.build("bilateral", dim=8, heads=2, tile_size=4, cluster_size=8).double()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    q, k, v = m._heads(x)
    shapes: list[tuple[int, ...]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(a, b, c, **kw):  # type: ignore[no-untyped-def]
        shapes.append(tuple(a.shape[:-1]) + (b.shape[-2],))
        return original(a, b, c, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    flat = m.attend(*(t.reshape(1, 2, 64, 4) for t in (q, k, v)), grid=(8, 8))
    assert shapes == [(1, 2 * 4, 16, 16), (1, 2 * 8, 8, 8)]
    torch.testing.assert_close(flat, m.attend(q, k, v, impl="reference").reshape(1, 2, 64, 4))


def test_errors_name_the_values() -> None:
    q, k, v = qkv(grid=(4, 8))
    with pytest.raises(ValueError, match=r"tile_size: \(8, 8\) is larger than the grid \(4, 8\)"):
        bilateral_attention(q, k, v, tile_size=8, cluster_size=4)
    with pytest.raises(ValueError, match=r"tile_size: \(3, 4\) does not tile the grid \(4, 8\)"):
        bilateral_attention(q, k, v, tile_size=(3, 4), cluster_size=4)
    with pytest.raises(ValueError, match="N=32 and cluster_size=12"):
        bilateral_attention(q, k, v, tile_size=4, cluster_size=12)
    with pytest.raises(ValueError, match="N=32 and cluster_size=64"):
        bilateral_attention(q, k, v, tile_size=4, cluster_size=64)
    with pytest.raises(ValueError, match="clusters"):
        bad = torch.zeros(2, 2, 8, 4, dtype=torch.int64)
        bilateral_attention(q, k, v, tile_size=4, cluster_size=4, clusters=bad)
    with pytest.raises(ParameterError, match="branches"):
        attnlab.build("bilateral", dim=8, heads=2, branches="sideways")
    with pytest.raises(ParameterError, match="tile_size"):
        attnlab.build("bilateral", dim=8, heads=2, tile_size=0)
    m = attnlab.build("bilateral", dim=8, heads=2, tile_size=2, cluster_size=4)
    qh = torch.randn(1, 2, 16, 4)
    with pytest.raises(ValueError, match=r"grid: \(3, 4\) holds 12 positions, but q, k, v have 16"):
        m.attend(qh, qh, qh, grid=(3, 4))
    with pytest.raises(ValueError, match="grid"):
        m.attend(qh, qh, qh)
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randn(1, 4, 4, 8), attention_mask=torch.ones(1, 16, dtype=torch.bool))


def test_old_name_window_names_tile_size() -> None:
    """`window` (the image-space tiles' side) was renamed `tile_size`: build, the constructor and the functional
    ops say so."""
    with pytest.raises(ParameterError, match=r"'window' was renamed tile_size \(the \(wh, ww\) side"):
        attnlab.build("bilateral", dim=8, heads=2, window=2)
    with pytest.raises(TypeError, match=r"BilateralAttention: keyword 'window' was renamed tile_size"):
        BilateralAttention(8, 2, window=2)
    q, k, v = qkv()
    for fn in (bilateral_attention, bilateral_attention_reference):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: keyword 'window' was renamed tile_size"):
            fn(q, k, v, window=2, cluster_size=4)
