"""Lambda layers: loops written here for 1-D and 2-D lambdas, content-only lambdas with E = 0, the implicit
matrix (out = A v), translation equivariance of the position lambdas, and the conformance suite on a 2-D grid."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import attnlab
from attnlab import testing
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.mixers.lambda_layer import (
    lambda_attention,
    lambda_attention_reference,
    position_lambdas,
)


def inputs(seed, positions, b=2, h=2, kd=3, vd=2, r=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, *positions, kd, generator=g, dtype=torch.float64)
    k = torch.randn(b, 1, *positions, kd, generator=g, dtype=torch.float64)
    v = torch.randn(b, 1, *positions, vd, generator=g, dtype=torch.float64)
    emb = torch.randn(*(r,) * len(positions), kd, generator=g, dtype=torch.float64)
    return q, k, v, emb


def hand_lambda(q, k, v, emb, kpm=None):
    """Loops over query n and context m on a grid: y_n^h = Σ_m (K̄_m + R[n − m]·[|n − m| ≤ c]) · q_n^h  v_m."""
    b, h = q.shape[:2]
    positions = tuple(q.shape[2:-1])
    cells = list(itertools.product(*(range(p) for p in positions)))
    c = emb.shape[0] // 2
    out = torch.zeros(b, h, *positions, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        real = [True] * len(cells) if kpm is None else kpm[bi].tolist()
        keys = torch.stack([k[bi, 0][m] for m in cells])  # (N, k)
        logits = keys.masked_fill(~torch.tensor(real)[:, None], float("-inf"))
        kbar = torch.softmax(logits, dim=0) if any(real) else torch.zeros_like(keys)
        for hi, n in itertools.product(range(h), cells):
            acc = torch.zeros(v.shape[-1], dtype=torch.float64)
            for mi, m in enumerate(cells):
                if not real[mi]:
                    continue
                delta = tuple(a - z for a, z in zip(n, m))
                e = emb[tuple(d + c for d in delta)] if all(abs(d) <= c for d in delta) else torch.zeros(q.shape[-1], dtype=torch.float64)
                acc += (q[bi, hi][n] @ (kbar[mi] + e)) * v[bi, 0][m]
            out[bi, hi][n] = acc
    return out


@pytest.mark.parametrize("positions,r", [((7,), 3), ((6,), 5), ((4,), 9), ((3, 4), 3), ((4, 3), 5)])
def test_matches_loops(positions, r):
    q, k, v, emb = inputs(0, positions, r=r)
    n = math.prod(positions)
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, 1] = kpm[0, -1] = False
    for mask in (None, kpm):
        want = hand_lambda(q, k, v, emb, mask)
        torch.testing.assert_close(lambda_attention(q, k, v, embeddings=emb, attention_mask=mask), want)
        torch.testing.assert_close(lambda_attention_reference(q, k, v, embeddings=emb, attention_mask=mask)[0], want)


@pytest.mark.parametrize("grid,shape", [(1, (2, 8, 12)), (2, (2, 3, 4, 12))])
def test_zero_embeddings_give_the_content_lambda(grid, shape):
    """E = 0: y_n^h = (K̄ᵀV)ᵀ q_n^h, K̄ the softmax of the keys over the positions, by hand."""
    m = attnlab.build("lambda", dim=12, heads=3, key_dim=4, scope=3, grid=grid).double()
    with torch.no_grad():
        m.embeddings.zero_()
    x = torch.randn(*shape, dtype=torch.float64)
    flat = x.reshape(2, -1, 12)
    q = m.q_proj(flat).view(2, -1, 3, 4)
    kbar = torch.softmax(m.k_proj(flat), dim=1)  # (b, N, k): over positions
    content = kbar.transpose(1, 2) @ m.v_proj(flat)  # (b, k, v)
    y = torch.einsum("bnhk,bkv->bnhv", q, content).reshape(2, -1, 12)
    want = m.out_proj(y).reshape(shape)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl), want)


@pytest.mark.parametrize("grid,shape", [(1, (2, 9, 8)), (2, (2, 4, 3, 8))])
def test_materialize_explains_the_output(grid, shape):
    """out = W_o [A^h V]_h with V shared by the heads, under key padding too."""
    m = attnlab.build("lambda", dim=8, heads=2, key_dim=3, scope=3, grid=grid).double()
    x = torch.randn(*shape, dtype=torch.float64)
    n = x[0, ..., 0].numel()
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, :3] = False
    for mask in (None, kpm):
        a = m.materialize(x, attention_mask=mask)
        assert a.shape == (2, 2, n, n)
        v = m.v_proj(x.reshape(2, n, 8))
        y = torch.einsum("bhnm,bmv->bnhv", a, v).reshape(2, n, 8)
        torch.testing.assert_close(m(x, attention_mask=mask), m.out_proj(y).reshape(shape))
        if mask is not None:
            assert a[1, :, :, :3].abs().max().item() == 0.0


def test_position_lambdas_are_translation_equivariant_away_from_the_borders():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 20, 3, generator=g, dtype=torch.float64)
    emb = torch.randn(5, 4, generator=g, dtype=torch.float64)
    shift, c = 3, 2
    lam = position_lambdas(v, emb)
    lam_shifted = position_lambdas(torch.roll(v, shift, dims=1), emb)
    inner = range(c + shift, 20 - c)  # windows that meet neither border nor the wrap-around
    torch.testing.assert_close(lam_shifted[:, list(inner)], lam[:, [n - shift for n in inner]])
    # the layer: the content lambda sees the same set of tokens, so whole outputs shift too
    m = attnlab.build("lambda", dim=8, heads=2, key_dim=4, scope=5).double()
    x = torch.randn(1, 20, 8, dtype=torch.float64)
    y, y_shifted = m(x), m(torch.roll(x, shift, dims=1))
    torch.testing.assert_close(y_shifted[:, list(inner)], y[:, [n - shift for n in inner]])


def test_position_lambdas_are_e_transposed_v():
    """λᵖ_n = Σ_m E_nmᵀ v_m with E_nm = R[n − m] inside the scope (loops), on a 2-D grid."""
    g = torch.Generator().manual_seed(4)
    v = torch.randn(1, 3, 5, 2, generator=g, dtype=torch.float64)
    emb = torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    lam = position_lambdas(v, emb)
    assert lam.shape == (1, 3, 5, 4, 2)
    for i, j in itertools.product(range(3), range(5)):
        want = torch.zeros(4, 2, dtype=torch.float64)
        for a, b in itertools.product(range(3), range(5)):
            if abs(i - a) <= 1 and abs(j - b) <= 1:
                want += torch.outer(emb[i - a + 1, j - b + 1], v[0, a, b])
        torch.testing.assert_close(lam[0, i, j], want)


def test_conformance_suite_on_a_2d_grid():
    spec = attnlab.get("lambda")
    testing.run_all(dataclasses.replace(spec, test_params={"key_dim": 4, "scope": 3, "grid": 2}, test_positions=(4, 5)))


def test_grid_mask_may_be_given_as_a_grid():
    m = attnlab.build("lambda", dim=8, heads=2, key_dim=3, scope=3, grid=2).double()
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    kpm = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    torch.testing.assert_close(m(x, attention_mask=kpm), m(x, attention_mask=kpm.reshape(2, 12)))


def test_fully_padded_element_has_no_lambda():
    q, k, v, emb = inputs(5, (6,))
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1] = False
    for out in (lambda_attention(q, k, v, embeddings=emb, attention_mask=kpm),
                lambda_attention_reference(q, k, v, embeddings=emb, attention_mask=kpm)[0]):
        assert out[1].abs().max().item() == 0.0


def test_float32_is_close_to_float64_at_16k_tokens_and_stays_finite_at_scale_1e3():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 16384, 4, generator=g)
    k, v = torch.randn(1, 1, 16384, 4, generator=g), torch.randn(1, 1, 16384, 8, generator=g)
    emb = torch.randn(23, 4, generator=g) / 2
    want = lambda_attention(q.double(), k.double(), v.double(), embeddings=emb.double())
    torch.testing.assert_close(lambda_attention(q, k, v, embeddings=emb).double(), want, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(lambda_attention(q * 1e3, k * 1e3, v * 1e3, embeddings=emb)).all()


def test_bad_parameters_and_inputs_name_the_argument():
    with pytest.raises(ParameterError, match="scope"):
        attnlab.build("lambda", dim=8, heads=2, scope=4)
    with pytest.raises(ParameterError, match="grid"):
        attnlab.build("lambda", dim=8, heads=2, grid=3)
    q, k, v, emb = inputs(7, (5,))
    with pytest.raises(ShapeError, match="^embeddings:"):
        lambda_attention(q, k, v, embeddings=emb[:2])
    with pytest.raises(ShapeError, match="^k:"):
        lambda_attention(q, k.expand(-1, 2, -1, -1), v, embeddings=emb)
    with pytest.raises(ShapeError, match="^v:"):
        lambda_attention(q, k, v[:, :, :4], embeddings=emb)
    with pytest.raises(TypeError, match="embeddings"):
        lambda_attention(q, k, v, embeddings=emb.float())
    m = attnlab.build("lambda", dim=8, heads=2, grid=2)
    with pytest.raises(ValueError, match="^x:"):
        m(torch.randn(2, 5, 8))
