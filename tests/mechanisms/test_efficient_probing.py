"""Efficient probing (P094): the authors' published form — M learned queries straight on the raw tokens (no W_q, no
W_k: the parameters are the queries and W_v alone), query m pooling the m-th chunk of X W_v — by hand; its FLOPs
count (and a full attentive probe's) equal the matmul FLOPs torch's FlopCounterMode counts in a forward."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.pooling.efficient_probing import (
    attentive_probe_flops,
    efficient_probing_flops,
    flops_vs_attentive_probe,
)

DIM, M = 12, 3


def build(**params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("efficient-probing", dim=DIM, num_queries=M, **params).double().eval()


def test_parameters_are_the_queries_and_w_v_only() -> None:
    m = build()
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {"query": (M, DIM), "v.weight": (DIM, DIM)}
    assert sum(p.numel() for p in m.parameters()) == M * DIM + DIM * DIM
    with_bias = attnlab.build("efficient-probing", dim=DIM, num_queries=M, qkv_bias=True)
    assert sum(p.numel() for p in with_bias.parameters()) == M * DIM + DIM * DIM + DIM


def test_the_formula_by_hand() -> None:
    """z[m·w:(m+1)·w] = Σ_j softmax_j(q_m·x_j/√C) (W_v x_j)[m·w:(m+1)·w], w = C/M, over each sample's real tokens."""
    m = build()
    with torch.no_grad():
        m.query.mul_(50.0)  # the 0.02 init gives near-uniform weights: make the maps distinct
    x = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 2] = keep[1, 5] = False
    w = DIM // M
    for mask in (None, keep):
        want = torch.zeros(2, DIM, dtype=x.dtype)
        maps = torch.zeros(2, M, 7, dtype=x.dtype)
        for i in range(2):
            real = torch.arange(7) if mask is None else mask[i].nonzero().flatten()
            values = x[i, real] @ m.v.weight.T
            for q in range(M):
                a = torch.softmax(x[i, real] @ m.query[q] / DIM**0.5, 0)  # raw tokens as keys
                maps[i, q, real] = a
                want[i, q * w : (q + 1) * w] = a @ values[:, q * w : (q + 1) * w]
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, attention_mask=mask, impl=impl)[:, 0], want)
        torch.testing.assert_close(m.materialize(x, attention_mask=mask)[:, :, 0], maps)
        assert (maps[:, 0] - maps[:, 1]).abs().max() > 1e-2


def _matmul_flops(fn: object) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()  # type: ignore[operator]
    return counter.get_total_flops()


@pytest.mark.parametrize(("n", "dim", "queries"), [(9, 12, 3), (20, 32, 8)])
def test_flops_equal_the_counted_matmul_flops(n: int, dim: int, queries: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, n, dim)
    ep = attnlab.build("efficient-probing", dim=dim, num_queries=queries).eval()
    assert _matmul_flops(lambda: ep(x)) == efficient_probing_flops(n, queries, dim // queries, False)
    assert ep.spec.flops(n, queries, dim // queries, False) == efficient_probing_flops(n, queries, dim // queries, False)
    # a full attentive probe: one learned query with W_q, W_k, W_v, W_o (class attention over the tokens, no FFN)
    probe = attnlab.build("class-attention", dim=dim, cls_in_keys=False, mlp_ratio=0.0).eval()
    assert _matmul_flops(lambda: probe(x)) == attentive_probe_flops(n, dim)


def test_flops_comparison_at_vit_base() -> None:
    """ViT-B/16 at 224 (N = 196 tokens, C = 768), M = 32: EP needs about half of a full attentive probe's FLOPs."""
    got = flops_vs_attentive_probe(196, 768, 32)
    assert got["efficient_probing"] == 2 * 196 * 768**2 + 2 * 32 * 196 * 768 + 2 * 196 * 768
    assert got["attentive_probe"] == 4 * 196 * 768**2 + 4 * 196 * 768 + 4 * 768**2
    assert got["ratio"] == pytest.approx(got["attentive_probe"] / got["efficient_probing"])
    assert 1.8 < got["ratio"] < 2.0


def test_bad_num_queries_raise() -> None:
    with pytest.raises(ParameterError, match="num_queries"):
        attnlab.build("efficient-probing", dim=DIM, num_queries=5)
