"""Combiner-Fixed (P147): the conditional-expectation formula by loops, full support, fast == reference."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.combiner import combiner_attention, combiner_attention_reference


def _qkv(n: int, heads: int = 2, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def by_loops(q, k, v, b, causal, pooling, log_size, kpm=None):  # type: ignore[no-untyped-def]
    """out_i = Σ_{j∈Ω0} p(j|i) v_j + Σ_r p(r|i) Σ_{j∈r} q(j|r) v_j, query by query, with the matrix."""
    bsz, h, n, d = q.shape
    s = 1 / math.sqrt(d)
    real = torch.ones(bsz, n, dtype=torch.bool) if kpm is None else kpm
    out = torch.zeros(bsz, h, n, d, dtype=torch.float64)
    mat = torch.zeros(bsz, h, n, n, dtype=torch.float64)
    blocks = [list(range(st, min(st + b, n))) for st in range(0, n, b)]
    for z in range(bsz):
        for hh in range(h):
            summaries = []
            for members in blocks:
                mem = [j for j in members if real[z, j]]
                if not mem:
                    summaries.append(None)
                    continue
                ks, qs = k[z, hh, mem], q[z, hh, mem]
                rk = ks.max(0).values if pooling == "max" else ks.mean(0)
                rq = qs.max(0).values if pooling == "max" else qs.mean(0)
                qj = torch.softmax(ks @ rq * s, 0)  # q(j|r)
                summaries.append((mem, rk, qj))
            for i in range(n):
                me = i // b
                terms = []  # (logit, {key: share})
                for j in blocks[me]:
                    if real[z, j] and (not causal or j <= i):
                        terms.append((q[z, hh, i] @ k[z, hh, j] * s, {j: 1.0}))
                for r, summ in enumerate(summaries):
                    if summ is None or r == me or (causal and r > me):
                        continue
                    mem, rk, qj = summ
                    logit = q[z, hh, i] @ rk * s + (math.log(len(mem)) if log_size else 0.0)
                    terms.append((logit, dict(zip(mem, qj))))
                if not terms:
                    continue
                p = torch.softmax(torch.stack([t[0] for t in terms]), 0)
                for pr, (_, shares) in zip(p, terms):
                    for j, share in shares.items():
                        mat[z, hh, i, j] += pr * share
                        out[z, hh, i] += pr * share * v[z, hh, j]
    return out, mat


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pooling,log_size", [("max", True), ("mean", True), ("max", False)])
@pytest.mark.parametrize("n,b", [(10, 3), (8, 4), (7, 2)])
def test_matches_the_formula_by_loops(causal, pooling, log_size, n, b):
    q, k, v = _qkv(n, seed=n + b)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
    kpm[:, 0] = True
    for mask in (None, kpm):
        kw = {"block_size": b, "causal": causal, "pooling": pooling, "log_size": log_size, "attention_mask": mask}
        want, want_w = by_loops(q.detach(), k.detach(), v.detach(), b, causal, pooling, log_size, mask)
        ref, ref_w = combiner_attention_reference(q, k, v, **kw)
        torch.testing.assert_close(combiner_attention(q, k, v, **kw), want)
        torch.testing.assert_close(ref, want)
        torch.testing.assert_close(ref_w, want_w)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_fast_equals_reference_forward_and_backward(causal, pooling, same_grads):
    q, k, v = _qkv(23, heads=3, seed=5)
    kpm = torch.rand(2, 23, generator=torch.Generator().manual_seed(2)) > 0.25
    for mask in (None, kpm):
        for b in (None, 4, 5):
            kw = {"block_size": b, "causal": causal, "pooling": pooling, "attention_mask": mask}
            fast = combiner_attention(q, k, v, **kw)
            ref, _ = combiner_attention_reference(q, k, v, **kw)
            torch.testing.assert_close(fast, ref)
            w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            same_grads(ref, (fast,), (q, k, v), w)


@pytest.mark.parametrize("causal", [False, True])
def test_full_support_unlike_the_base_sparse_pattern(causal):
    """P147's structural claim: every query puts positive weight on every (visible) key in one layer,
    while the direct support alone (the own block) reaches only B keys."""
    n, b = 24, 5
    q, k, v = _qkv(n, seed=11)
    _, w = combiner_attention_reference(q, k, v, block_size=b, causal=causal)
    visible = torch.ones(n, n, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    assert bool((w[..., visible] > 0).all())
    assert bool((w[..., ~visible] == 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, n, dtype=torch.float64))
    blk = torch.arange(n) // b
    base = (blk[:, None] == blk[None, :]) & visible  # the direct (block-local) pattern
    assert int(base.sum(-1).max()) <= b < int(visible.sum(-1).max())
    # one layer of Combiner reaches what the block-local pattern never reaches in any number of layers
    reach = base.clone()
    for _ in range(n):
        reach = (reach.int() @ base.int()) > 0
    assert not bool(reach[visible].all()) and bool((w[0, 0] > 0)[visible].all())


def test_one_block_is_plain_softmax_attention():
    q, k, v = _qkv(9)
    for causal in (False, True):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(combiner_attention(q, k, v, block_size=9, causal=causal), want)
        torch.testing.assert_close(combiner_attention(q, k, v, block_size=50, causal=causal), want)


def test_default_block_size_is_ceil_sqrt_n():
    q, k, v = _qkv(17)
    torch.testing.assert_close(combiner_attention(q, k, v), combiner_attention(q, k, v, block_size=5))


def test_module_materializes_the_implicit_matrix():
    torch.manual_seed(0)
    m = attnlab.build("combiner", dim=8, heads=2, block_size=3, causal=True).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    a = m.materialize(x)
    q, k, v = m.project(x)
    _, want = by_loops(q, k, v, 3, True, "max", True)
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(m.attend(q, k, v), a @ v)


def test_errors_name_the_argument():
    q, k, v = _qkv(6)
    with pytest.raises(ParameterError, match="block_size"):
        combiner_attention(q, k, v, block_size=0)
    with pytest.raises(ParameterError, match="pooling"):
        combiner_attention(q, k, v, pooling="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        combiner_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ParameterError, match="pooling"):
        attnlab.build("combiner", dim=8, heads=2, pooling="sum")
    m = attnlab.build("combiner", dim=8, heads=2)
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 5, 8), attn_mask=torch.ones(5, 5, dtype=torch.bool))
