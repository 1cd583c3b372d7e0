"""DHSA (P247): chunk selection by loops, a hand-computed case, top-k = all chunks is causal softmax,
fast == reference forward and backward, gradients with the selection held fixed, causality of the selection."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.dhsa import dhsa_attention, dhsa_attention_reference


def _qkv(n: int, heads: int = 2, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def keep_by_loops(q, k, b, top, query_rep, kpm=None):  # type: ignore[no-untyped-def]
    """Token mask (batch, heads, n, n): chunk reps √|c|·mean over real tokens, for each query chunk the
    `top` earlier chunks of largest score (Python sorting) and itself, causal, real keys."""
    bsz, h, n, d = q.shape
    real = torch.ones(bsz, n, dtype=torch.bool) if kpm is None else kpm
    chunks = [list(range(st, min(st + b, n))) for st in range(0, n, b)]
    keep = torch.zeros(bsz, h, n, n, dtype=torch.bool)
    for z in range(bsz):
        for hh in range(h):
            def rep(x, members, z=z, hh=hh):  # type: ignore[no-untyped-def]
                mem = [j for j in members if real[z, j]]
                return x[z, hh, mem].detach().mean(0) * math.sqrt(len(mem)) if mem else torch.zeros(d, dtype=torch.float64)

            for x, members in enumerate(chunks):
                if query_rep == "lookback":
                    qr = rep(q, chunks[x - 1]) if x > 0 else torch.zeros(d, dtype=torch.float64)
                else:
                    qr = rep(q, members)
                past = [y for y in range(x) if any(real[z, j] for j in chunks[y])]
                ranked = sorted(past, key=lambda y, qr=qr: -float(qr @ rep(k, chunks[y])))
                for y in ranked[:top] + [x]:
                    for i in members:
                        for j in chunks[y]:
                            keep[z, hh, i, j] = j <= i and bool(real[z, j])
    return keep


def dense(q, k, v, keep, scale=None):  # type: ignore[no-untyped-def]
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return w @ v, w


def test_hand_computed_case():
    """d = 1, b = 2, top 1, scale 1. k = [1, 1, −1, −1, 0, 0]: k̄_0 = √2, k̄_1 = −√2. Query chunk 2 looks
    back at chunk 1 (q = 1, 1: q̄ = √2), scores S = 2 for chunk 0 and −2 for chunk 1: it keeps chunk 0.
    out_4 (q = 0.5) = (e^0.5·1 + e^0.5·2 + e^0·5) / (2e^0.5 + 1); out_5 (q = −0.5) over keys 0, 1, 4, 5."""
    q = torch.tensor([1.0, 1, 1, 1, 0.5, -0.5], dtype=torch.float64).view(1, 1, 6, 1)
    k = torch.tensor([1.0, 1, -1, -1, 0, 0], dtype=torch.float64).view(1, 1, 6, 1)
    v = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64).view(1, 1, 6, 1)
    e = math.e
    out4 = (e**0.5 * 3 + 5) / (2 * e**0.5 + 1)
    out5 = (e**-0.5 * 3 + 5 + 6) / (2 * e**-0.5 + 2)
    out0, out1 = 1.0, (1 + 2) / 2  # chunk 0: plain causal attention, equal scores
    out2 = (e * 1 + e * 2 + e**-1 * 3) / (2 * e + e**-1)  # chunk 1 keeps chunk 0 (the only earlier one)
    out3 = (e * 1 + e * 2 + e**-1 * 3 + e**-1 * 4) / (2 * e + 2 * e**-1)
    want = torch.tensor([out0, out1, out2, out3, out4, out5], dtype=torch.float64).view(1, 1, 6, 1)
    for fn in (dhsa_attention, lambda *a, **kw: dhsa_attention_reference(*a, **kw)[0]):
        torch.testing.assert_close(fn(q, k, v, chunk_size=2, top_chunks=1, scale=1.0), want)


@pytest.mark.parametrize("query_rep", ["lookback", "chunk"])
@pytest.mark.parametrize("n,b,top", [(10, 3, 1), (12, 2, 2), (9, 4, 1), (16, 3, 0)])
def test_matches_the_rule_by_loops_with_gradients(query_rep, n, b, top, same_grads):
    q, k, v = _qkv(n, seed=n + b + top)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) > 0.3
    kpm[:, ::b] = True  # a real token in every chunk: no tied chunk scores
    for mask in (None, kpm):
        keep = keep_by_loops(q, k, b, top, query_rep, mask)
        want, want_w = dense(q, k, v, keep)
        kw = {"chunk_size": b, "top_chunks": top, "query_rep": query_rep, "attention_mask": mask}
        fast = dhsa_attention(q, k, v, **kw)
        ref, ref_w = dhsa_attention_reference(q, k, v, **kw)
        torch.testing.assert_close(fast, want)
        torch.testing.assert_close(ref, want)
        torch.testing.assert_close(ref_w, want_w)
        # the loops' mask is a constant: equal gradients = the selection is not differentiated
        w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        same_grads(want, (fast, ref), (q, k, v), w)


def test_fast_equals_reference_forward_and_backward(same_grads):
    q, k, v = _qkv(50, heads=3, d=8, seed=4)
    kpm = torch.rand(2, 50, generator=torch.Generator().manual_seed(5)) > 0.2
    for mask in (None, kpm):
        for b, top in ((4, 3), (8, 2), (5, 1), (16, 1)):
            fast = dhsa_attention(q, k, v, chunk_size=b, top_chunks=top, attention_mask=mask)
            ref, _ = dhsa_attention_reference(q, k, v, chunk_size=b, top_chunks=top, attention_mask=mask)
            torch.testing.assert_close(fast, ref)
            w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
            same_grads(ref, (fast,), (q, k, v), w)


@pytest.mark.parametrize("query_rep", ["lookback", "chunk"])
def test_all_chunks_kept_is_causal_softmax_attention(query_rep):
    q, k, v = _qkv(21, seed=7)
    kpm = torch.rand(2, 21, generator=torch.Generator().manual_seed(1)) > 0.3
    kpm[:, 0] = True
    causal = torch.ones(21, 21, dtype=torch.bool).tril()
    for mask in (None, kpm):
        keep = causal if mask is None else causal & mask[:, None, None, :]
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        for b in (1, 3, 5, 21, 40):
            top = math.ceil(21 / b)
            got = dhsa_attention(q, k, v, chunk_size=b, top_chunks=top, query_rep=query_rep, attention_mask=mask)
            torch.testing.assert_close(got, want)


def test_token_budget_per_query():
    """Each query sees at most (top_chunks + 1)·b keys, all at positions ≤ its own."""
    q, k, v = _qkv(64, seed=9)
    _, w = dhsa_attention_reference(q, k, v, chunk_size=4, top_chunks=3)
    nonzero = (w > 0).sum(-1)
    assert int(nonzero.max()) <= 16 and int(nonzero[..., 40:].min()) >= 13
    assert bool((w.triu(1) == 0).all())


def test_lookback_selection_is_causal_the_papers_chunk_rep_is_not():
    """With query_rep='chunk' a later query of the chunk (q_5) changes which key chunk query 4 keeps;
    with 'lookback' query 4's output depends on positions ≤ 4 only."""
    k = torch.tensor([1.0, 1, -1, -1, 0, 0], dtype=torch.float64).view(1, 1, 6, 1)
    v = torch.arange(1.0, 7, dtype=torch.float64).view(1, 1, 6, 1)
    outs = {}
    for rep in ("chunk", "lookback"):
        for q5 in (10.0, -10.0):
            q = torch.tensor([1.0, 1, -1, -1, 0.5, q5], dtype=torch.float64).view(1, 1, 6, 1)
            outs[rep, q5] = dhsa_attention(q, k, v, chunk_size=2, top_chunks=1, query_rep=rep)[0, 0, 4, 0]
    assert abs(float(outs["chunk", 10.0] - outs["chunk", -10.0])) > 0.1
    assert float(outs["lookback", 10.0]) == float(outs["lookback", -10.0])


def test_module_materializes_its_pattern():
    torch.manual_seed(0)
    m = attnlab.build("dhsa", dim=8, heads=2, chunk_size=3, top_chunks=1).double()
    x = torch.randn(2, 14, 8, dtype=torch.float64)
    a = m.materialize(x)
    q, k, v = m.project(x)
    keep = keep_by_loops(q, k, 3, 1, "lookback")
    torch.testing.assert_close(a, dense(q, k, v, keep)[1])
    torch.testing.assert_close(m.attend(q, k, v), a @ v)


def test_errors_name_the_argument():
    q, k, v = _qkv(6)
    with pytest.raises(ParameterError, match="chunk_size"):
        dhsa_attention(q, k, v, chunk_size=0)
    with pytest.raises(ParameterError, match="top_chunks"):
        dhsa_attention(q, k, v, top_chunks=-1)
    with pytest.raises(ParameterError, match="query_rep"):
        dhsa_attention(q, k, v, query_rep="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        dhsa_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ParameterError, match="causal"):
        attnlab.build("dhsa", dim=8, heads=2, causal=False)
    with pytest.raises(ParameterError, match="query_rep"):
        attnlab.build("dhsa", dim=8, heads=2, query_rep="mean")


# -- adaptive chunks (boundary_threshold): the paper predictor's labelling rule ------------------------
def test_adaptive_chunks_by_hand() -> None:
    """A chunk ends where consecutive keys turn (cos < τ) or at chunk_size tokens."""
    from attnlab.mechanisms.sparse.dhsa import adaptive_chunks

    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    keys = [e0, e0, e1, e1, e1, e1, e1, e0]  # turns before 2 and 7; a run of 5 e1 cut at 3 tokens
    k = torch.tensor(keys, dtype=torch.float64)[None, None]
    assert adaptive_chunks(k, chunk_size=3, threshold=0.5)[0, 0].tolist() == [0, 0, 1, 1, 1, 2, 2, 3]
    assert adaptive_chunks(k, chunk_size=100, threshold=-1.0)[0, 0].tolist() == [0] * 8  # never splits


@pytest.mark.parametrize("query_rep", ["lookback", "chunk"])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.4])
def test_adaptive_fast_equals_reference(query_rep: str, threshold: float) -> None:
    from attnlab.mechanisms.sparse.dhsa import dhsa_attention, dhsa_attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 4, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1, 9:] = False
    kw = dict(chunk_size=4, top_chunks=1, boundary_threshold=threshold, query_rep=query_rep, attention_mask=kpm)
    out, weights = dhsa_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(dhsa_attention(q, k, v, **kw), out, rtol=1e-12, atol=1e-12)
    if threshold == -1.0:  # no similarity split: the fixed chunks of the block-sparse path
        fixed = dhsa_attention(q, k, v, chunk_size=4, top_chunks=1, query_rep=query_rep, attention_mask=kpm)
        real = kpm[:, None, :, None]  # a padded query chunk ranks ties in another order on the block-sparse path
        torch.testing.assert_close(fixed * real, out * real, rtol=1e-12, atol=1e-12)


def test_adaptive_chunks_pass_the_conformance_suite() -> None:
    """The lookback form stays causal with adaptive chunks (a boundary at t reads keys t − 1 and t)."""
    import dataclasses

    from attnlab import testing

    spec = attnlab.get("dhsa")
    testing.run_all(dataclasses.replace(spec, test_params={**spec.test_params, "chunk_size": 3,
                                                           "boundary_threshold": 0.0}))
    with pytest.raises(ParameterError, match="boundary_threshold"):
        attnlab.build("dhsa", dim=8, heads=2, boundary_threshold=1.5)
