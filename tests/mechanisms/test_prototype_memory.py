"""Prototypical memory attention (P191): softmax with an empty memory, attention over [K; K_m] by hand, prototypes
that are k-means centroids (sklearn as the oracle) and k-NN value means, a memory updated outside autograd."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.dense.prototype_memory import (
    kmeans,
    kmeans_plus_plus,
    knn_values,
    prototype_memory_attention,
    prototype_memory_attention_reference,
)

DIM, HEADS = 8, 2


def build(**kw):
    torch.manual_seed(0)
    params = {"dim": DIM, "heads": HEADS, "bank_size": 40, "prototypes": 5, "value_neighbors": 3, **kw}
    return attnlab.build("prototype-memory", **params).double()


def tokens(b=2, n=7, seed=1):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def filled(**kw):
    """A module whose memory holds prototypes of 40 past tokens, with a non-zero segment embedding."""
    m = build(**kw)
    m.update_memory(tokens(b=5, n=8, seed=9))
    with torch.no_grad():
        m.memory_segment.copy_(0.3 * torch.randn(HEADS, DIM // HEADS, generator=torch.Generator().manual_seed(2)))
    return m


def softmax_rows(logits):
    """softmax by exp and sum; rows with no finite logit are 0."""
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = (logits - top).exp()
    s = e.sum(-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


@pytest.mark.parametrize("causal", [False, True])
def test_empty_memory_is_softmax_attention(causal):
    m = build(causal=causal)
    soft = attnlab.build("softmax", dim=DIM, heads=HEADS, causal=causal).double()
    soft.load_state_dict(m.state_dict(), strict=False)  # the projections; the memory buffers have no counterpart
    x = tokens()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), soft(x, attention_mask=keep, impl=impl))
    m.update_memory(tokens(b=5, n=8, seed=9))
    assert (m(x) - soft(x)).abs().max() > 1e-3  # the memory acts
    m.clear_memory()
    torch.testing.assert_close(m(x, attention_mask=keep), soft(x, attention_mask=keep))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_attention_over_current_and_memory_keys_by_hand(impl):
    """out = softmax(q [k; K_m + s]ᵀ/√d + M) [v; V_m], M on the current keys only (causal and padding here)."""
    m = filled(causal=True)
    x = tokens()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 4:] = False
    q, k, v = m.project(x)
    km = m.prototype_keys + m.memory_segment[:, None]
    vm = m.prototype_values
    d = q.shape[-1]
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    current = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~allowed, -math.inf)
    memory = torch.einsum("bhid,hmd->bhim", q, km) / math.sqrt(d)
    weights = softmax_rows(torch.cat([current, memory], -1))
    want = weights @ torch.cat([v, vm[None].expand(2, -1, -1, -1)], 2)
    torch.testing.assert_close(m.attend(q, k, v, attention_mask=keep, impl=impl), want)
    a = m.materialize(x, attention_mask=keep)
    assert a.shape == (2, HEADS, 7, 7 + 5)
    torch.testing.assert_close(a, weights)
    # a query whose current keys are all masked still reads the memory: softmax over the memory alone
    nothing = torch.zeros(2, 7, dtype=torch.bool)
    torch.testing.assert_close(m.attend(q, k, v, attention_mask=nothing, impl=impl), softmax_rows(memory) @ vm)


def test_with_memory_fast_matches_reference_and_decoding():
    m = filled(causal=True)
    x = tokens().requires_grad_(True)
    gen = torch.Generator().manual_seed(4)
    masks = [{}, {"attention_mask": torch.tensor([[True] * 7, [True] * 4 + [False] * 3])},
             {"attn_mask": torch.rand(7, 7, generator=gen) > 0.4}, {"attn_mask": torch.randn(2, 1, 7, 7, generator=gen,
                                                                                             dtype=torch.float64)}]
    for kw in masks:
        fast, ref = m(x, impl="fast", **kw), m(x, impl="reference", **kw)
        torch.testing.assert_close(fast, ref)
        w = torch.randn(fast.shape, generator=gen, dtype=fast.dtype)
        inputs = [x, m.memory_segment, m.q_proj.weight]
        for gf, gr in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
            torch.testing.assert_close(gf, gr)
    assert torch.autograd.grad(m(x).sum(), m.memory_segment)[0].abs().max() > 0  # the segment embedding is learnt
    with torch.no_grad():
        state, outs = None, []
        for t in range(7):
            y, state = m.step(x[:, t : t + 1], state)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), m(x))


def test_state_dict_and_batch_independence_given_the_memory():
    m = filled()
    fresh = build()
    fresh.load_state_dict(m.state_dict())
    x = tokens(b=3)
    torch.testing.assert_close(fresh(x), m(x), atol=0.0, rtol=0.0)
    whole = m(x)
    for i in range(3):
        torch.testing.assert_close(whole[i : i + 1], m(x[i : i + 1]))


def blobs(heads=2, per=30, centres=4, d=3, seed=3):
    gen = torch.Generator().manual_seed(seed)
    middle = 6.0 * torch.randn(heads, centres, 1, d, generator=gen, dtype=torch.float64)
    pts = (middle + torch.randn(heads, centres, per, d, generator=gen, dtype=torch.float64)).reshape(heads, -1, d)
    return pts[:, torch.randperm(pts.shape[1], generator=gen)]


@pytest.mark.parametrize("data", ["blobs", "noise"])
def test_kmeans_equals_sklearn_from_the_same_start(data):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    points = blobs() if data == "blobs" else torch.randn(2, 90, 3, generator=torch.Generator().manual_seed(8),
                                                         dtype=torch.float64)
    init = kmeans_plus_plus(points, 4, generator=torch.Generator().manual_seed(0))
    centroids, assignment = kmeans(points, init, iterations=300)
    for h in range(2):
        oracle = sklearn_cluster.KMeans(n_clusters=4, init=init[h].numpy(), n_init=1, algorithm="lloyd", tol=0.0,
                                        max_iter=300).fit(points[h].numpy())
        torch.testing.assert_close(centroids[h], torch.from_numpy(oracle.cluster_centers_), atol=1e-10, rtol=1e-10)
        assert torch.equal(assignment[h], torch.from_numpy(oracle.labels_).long())


def test_compress_prototypes_are_a_kmeans_fixed_point_and_sklearn_centroids():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    m = build(bank_size=120, prototypes=4, value_neighbors=5, kmeans_seed=7)
    k, v = blobs(per=30), torch.randn(2, 120, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    k = torch.cat([k, k.new_zeros(2, 120, 1)], -1)  # head_dim 4
    m.store(k, v)
    m.compress()
    protos = m.prototype_keys
    # the fixed point: assignments are nearest-prototype, prototypes the means of their keys
    nearest = torch.cdist(k, protos).argmin(-1)
    for h in range(2):
        for p in range(4):
            torch.testing.assert_close(protos[h, p], k[h, nearest[h] == p].mean(0))
        start = kmeans_plus_plus(k, 4, generator=torch.Generator().manual_seed(7))[h]
        oracle = sklearn_cluster.KMeans(n_clusters=4, init=start.numpy(), n_init=1, algorithm="lloyd", tol=0.0).fit(k[h])
        torch.testing.assert_close(protos[h], torch.from_numpy(oracle.cluster_centers_), atol=1e-10, rtol=1e-10)
    # the prototype values: the mean value of the 5 bank keys nearest to each prototype
    order = torch.cdist(protos, k).argsort(-1)[..., :5]
    want = torch.stack([v[h, order[h]].mean(1) for h in range(2)])
    torch.testing.assert_close(m.prototype_values, want)


def test_knn_values_by_hand():
    """Keys 0, 1, 2.5 | 10, 11, 12.5: centroids 7/6 and 67/6; the 2 nearest keys are {1, 0} and {11, 10}."""
    keys = torch.tensor([[0.0], [1.0], [2.5], [10.0], [11.0], [12.5]], dtype=torch.float64)
    values = torch.tensor([[1.0], [3.0], [50.0], [-2.0], [-4.0], [70.0]], dtype=torch.float64)
    centroids, assignment = kmeans(keys, keys[[0, 1]], iterations=10)
    torch.testing.assert_close(centroids, torch.tensor([[7 / 6], [67 / 6]], dtype=torch.float64))
    assert assignment.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(knn_values(keys, values, centroids, 2), torch.tensor([[2.0], [-3.0]], dtype=torch.float64))


def test_the_memory_is_updated_outside_autograd():
    m = filled()
    x = tokens().requires_grad_(True)
    m(x).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    x_grad = x.grad.clone()
    before = {name: b.clone() for name, b in m.named_buffers()}
    with torch.enable_grad():
        m.update_memory(x * 2.0)
    for name, b in m.named_buffers():
        assert not b.requires_grad and b.grad_fn is None, name
    assert not torch.equal(before["prototype_keys"], m.prototype_keys)  # the update happened
    for name, p in m.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert torch.equal(x.grad, x_grad)
    after = {name: b.clone() for name, b in m.named_buffers()}
    m(x).sum().backward()  # a forward (and backward) reads the memory, never writes it
    for name, b in m.named_buffers():
        assert torch.equal(b, after[name]), name


def test_the_bank_is_a_ring_and_remember_drops_padding():
    m = build(bank_size=5, prototypes=2, value_neighbors=1)
    k = torch.arange(2 * 7 * 4, dtype=torch.float64).reshape(2, 7, 4)
    m.store(k[:, :3], -k[:, :3])
    assert int(m.bank_count) == 3
    m.store(k[:, 3:], -k[:, 3:])
    assert int(m.bank_count) == 5
    kept = {tuple(r) for r in m.bank_keys[0].tolist()}
    assert kept == {tuple(r) for r in k[0, 2:].tolist()}  # the 5 newest
    torch.testing.assert_close(m.bank_values, -m.bank_keys)
    m.clear_memory()
    x = tokens(b=2, n=3)
    keep = torch.tensor([[True, False, True], [False, True, False]])
    m.remember(x, attention_mask=keep)
    assert int(m.bank_count) == 3
    want = m.split_heads(m.k_proj(x)).transpose(0, 1)[:, keep]  # (heads, 3 real tokens, head_dim)
    torch.testing.assert_close(m.bank_keys[:, :3], want)


def test_functional_memory_and_bad_inputs():
    q, k, v = torch.randn(3, 2, 2, 5, 4, dtype=torch.float64)
    mk, mv = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    cat = (torch.cat([k, mk[None].expand(2, -1, -1, -1)], 2), torch.cat([v, mv[None].expand(2, -1, -1, -1)], 2))
    want = softmax_rows(q @ cat[0].transpose(-2, -1) / 2.0) @ cat[1]
    torch.testing.assert_close(prototype_memory_attention(q, k, v, memory_keys=mk, memory_values=mv), want)
    torch.testing.assert_close(prototype_memory_attention_reference(q, k, v, memory_keys=mk, memory_values=mv)[0], want)
    with pytest.raises(ValueError, match="^memory_keys, memory_values: expected both or neither"):
        prototype_memory_attention(q, k, v, memory_keys=mk)
    with pytest.raises(ShapeError, match=r"^memory_keys: expected \(heads, m, 4\)"):
        prototype_memory_attention(q, k, v, memory_keys=mk[:1], memory_values=mv)
    with pytest.raises(ParameterError, match="prototypes"):
        build(bank_size=4, prototypes=5)
    m = build(bank_size=10, prototypes=4)
    m.store(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="^compress: expected a bank of at least prototypes=4"):
        m.compress()
    with pytest.raises(ShapeError, match=r"^k: expected \(heads, N, head_dim\)"):
        m.store(torch.randn(3, 3, 4, dtype=torch.float64), torch.randn(3, 3, 4, dtype=torch.float64))
