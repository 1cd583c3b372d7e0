"""MRA attention (P066): the two-resolution matrix by loops, a hand-computed case, exactness with every
block refined, fast == reference forward and backward, gradients with the top-m selection held fixed."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.mra import mra_attention, mra_attention_reference


def _qkv(n: int, heads: int = 2, d: int = 4, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def by_loops(q, k, v, b, m, kpm=None):  # type: ignore[no-untyped-def]
    """Block means over real tokens, coarse logits, the m largest per query block picked by Python
    sorting (so the selection is a constant here), Â entry by entry, rows normalised."""
    bsz, h, n, d = q.shape
    s = 1 / math.sqrt(d)
    real = torch.ones(bsz, n, dtype=torch.bool) if kpm is None else kpm
    blocks = [list(range(st, min(st + b, n))) for st in range(0, n, b)]
    outs, mats = [], []
    for z in range(bsz):
        for hh in range(h):
            def mean(x, members, z=z, hh=hh):  # type: ignore[no-untyped-def]
                mem = [j for j in members if real[z, j]]
                return x[z, hh, mem].mean(0) if mem else torch.zeros(d, dtype=torch.float64)

            q_hat = [mean(q, blk) for blk in blocks]
            k_hat = [mean(k, blk) for blk in blocks]
            coarse = [[float("-inf") if not any(real[z, j] for j in blocks[y]) else q_hat[x] @ k_hat[y] * s
                       for y in range(len(blocks))] for x in range(len(blocks))]
            chosen = []
            for x in range(len(blocks)):
                vals = [float(c.detach()) if torch.is_tensor(c) else c for c in coarse[x]]
                chosen.append(set(sorted(range(len(blocks)), key=lambda y: -vals[y])[:m]))
            rows = []
            for i in range(n):
                x = i // b
                row = []
                for j in range(n):
                    if not real[z, j]:
                        row.append(torch.zeros((), dtype=torch.float64))
                    elif j // b in chosen[x]:
                        row.append(torch.exp(q[z, hh, i] @ k[z, hh, j] * s))
                    else:
                        row.append(torch.exp(coarse[x][j // b]))
                row = torch.stack(row)
                total = row.sum()
                rows.append(row / total if total > 0 else row)
            mat = torch.stack(rows)
            mats.append(mat)
            outs.append(mat @ v[z, hh])
    return torch.stack(outs).view(bsz, h, n, -1), torch.stack(mats).view(bsz, h, n, n)


def test_hand_computed_case():
    """d = 1, scale 1, b = 2, m = 1: q = [1, 1, −1, −1], k = [2, 0, 0, 0], v = [1, 2, 3, 4].
    q̂ = [1, −1], k̂ = [1, 0]: L = [[1, 0], [−1, 0]], so block 0 refines key block 0, block 1 key block 1.
    out_0 = (e²·1 + e⁰·2 + e⁰·3 + e⁰·4) / (e² + 3);  out_2 = (1·3 + 1·4 + e⁻¹·(1 + 2)) / (2 + 2e⁻¹)."""
    q = torch.tensor([1.0, 1, -1, -1], dtype=torch.float64).view(1, 1, 4, 1)
    k = torch.tensor([2.0, 0, 0, 0], dtype=torch.float64).view(1, 1, 4, 1)
    v = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64).view(1, 1, 4, 1)
    e = math.e
    out0 = (e**2 + 9) / (e**2 + 3)  # query 1 has q = 1 too: out_1 = out_0; out_3 = out_2
    out2 = (3 + 4 + (1 + 2) / e) / (2 + 2 / e)
    want = torch.tensor([out0, out0, out2, out2], dtype=torch.float64).view(1, 1, 4, 1)
    for fn in (mra_attention, lambda *a, **kw: mra_attention_reference(*a, **kw)[0]):
        torch.testing.assert_close(fn(q, k, v, block_size=2, blocks=1, scale=1.0), want)


@pytest.mark.parametrize("n,b,m", [(10, 3, 2), (12, 4, 1), (9, 2, 3), (7, 7, 1)])
def test_matches_the_definition_by_loops_with_gradients(n, b, m, same_grads):
    q, k, v = _qkv(n, seed=n * b + m)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) > 0.3
    kpm[:, ::b] = True  # a real token in every block: no tied coarse logits (a padded block's row is all 0)
    for mask in (None, kpm):
        want, want_w = by_loops(q, k, v, b, m, mask)
        fast = mra_attention(q, k, v, block_size=b, blocks=m, attention_mask=mask)
        ref, ref_w = mra_attention_reference(q, k, v, block_size=b, blocks=m, attention_mask=mask)
        torch.testing.assert_close(fast, want)
        torch.testing.assert_close(ref, want)
        torch.testing.assert_close(ref_w, want_w.detach())
        # the selection is a constant of the loops: equal gradients = top-m not differentiated
        w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        same_grads(want, (fast, ref), (q, k, v), w)


def test_fast_equals_reference_forward_and_backward(same_grads):
    q, k, v = _qkv(45, heads=3, d=8, seed=3)
    kpm = torch.rand(2, 45, generator=torch.Generator().manual_seed(5)) > 0.2
    for mask in (None, kpm):
        for b, m in ((4, 3), (8, 2), (5, 1), (16, 2)):
            fast = mra_attention(q, k, v, block_size=b, blocks=m, attention_mask=mask)
            ref, _ = mra_attention_reference(q, k, v, block_size=b, blocks=m, attention_mask=mask)
            torch.testing.assert_close(fast, ref)
            w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
            same_grads(ref, (fast,), (q, k, v), w)


def test_every_block_refined_is_softmax_attention():
    """P066: with m = n/b the multi-resolution approximation is the full attention matrix."""
    q, k, v = _qkv(20, seed=8)
    kpm = torch.rand(2, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    for mask in (None, kpm):
        keep = None if mask is None else mask[:, None, None, :]
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        for b in (1, 3, 4, 20):
            m = math.ceil(20 / b)
            torch.testing.assert_close(mra_attention(q, k, v, block_size=b, blocks=m, attention_mask=mask), want)
            torch.testing.assert_close(mra_attention(q, k, v, block_size=b, blocks=m + 5, attention_mask=mask), want)


def test_block_constant_off_the_refined_blocks():
    """Outside the m refined key blocks a row of the matrix is constant on each key block (low resolution);
    inside, weights keep the exact ratios exp(q_i·k_j·s − q_i·k_j'·s)."""
    q, k, v = _qkv(16, seed=2)
    _, w = mra_attention_reference(q, k, v, block_size=4, blocks=1)
    blocks = w.view(2, 2, 16, 4, 4)
    varies = (blocks - blocks[..., :1]).abs().amax(-1) > 1e-12  # (batch, heads, query, key block)
    assert int(varies.sum(-1).max()) == 1
    scores = (q @ k.transpose(-1, -2) / 2.0).detach().view(2, 2, 16, 4, 4)
    ratio = blocks.log() - blocks[..., :1].log()
    exact = scores - scores[..., :1]
    torch.testing.assert_close(ratio[varies], exact[varies])


def test_rows_sum_to_one_and_module_explains_its_output():
    torch.manual_seed(0)
    m = attnlab.build("mra", dim=8, heads=2, block_size=3, blocks=2).double()
    x = torch.randn(2, 14, 8, dtype=torch.float64)
    a = m.materialize(x)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 14, dtype=torch.float64))
    q, k, v = m.project(x)
    torch.testing.assert_close(m.attend(q, k, v), a @ v)


def test_errors_name_the_argument():
    q, k, v = _qkv(6)
    with pytest.raises(ParameterError, match="blocks"):
        mra_attention(q, k, v, block_size=2, blocks=0)
    with pytest.raises(ParameterError, match="block_size"):
        mra_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="k"):
        mra_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ParameterError, match="blocks"):
        attnlab.build("mra", dim=8, heads=2, blocks=-1)
    with pytest.raises(ParameterError, match="causal"):
        attnlab.build("mra", dim=8, heads=2, causal=True)
    m = attnlab.build("mra", dim=8, heads=2, block_size=2)
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 5, 8), attn_mask=torch.ones(5, 5, dtype=torch.bool))


# -- the paper code's global budget ---------------------------------------------------------------
def _block_structured() -> list[torch.Tensor]:
    """4 blocks of 8: query blocks 0–1 see key block 0 dominate (one refined block is enough); query
    blocks 2–3 see four key blocks equal at block level whose tokens differ (the coarse logit is poor)."""
    g = torch.Generator().manual_seed(0)
    b, nb, d = 8, 4, 8
    n = b * nb
    k = 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    xi = torch.randn(n, generator=g, dtype=torch.float64)
    xi = xi - xi.view(nb, b).mean(-1).repeat_interleave(b)  # zero mean in every block
    k[:, 0] += 3.0 * xi
    k[:b, 1] += 3.0
    q = 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    q[: 2 * b, 1] += 6.0
    q[2 * b :, 0] += 3.0
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return [t[None, None] for t in (q, k, v)]


def test_global_budget_has_lower_error_on_block_structured_inputs() -> None:
    q, k, v = _block_structured()
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    err = {}
    for selection in ("block", "global"):
        out = mra_attention(q, k, v, block_size=8, blocks=2, selection=selection)
        torch.testing.assert_close(out, mra_attention_reference(q, k, v, block_size=8, blocks=2, selection=selection)[0],
                                   rtol=1e-12, atol=1e-12)
        err[selection] = ((out - exact).norm() / exact.norm()).item()
    assert err["global"] < 0.8 * err["block"], err  # 0.35 vs 0.48 here


def test_global_budget_spends_m_times_nb_blocks_unevenly() -> None:
    """The weights show the refinement: a refined block has token-varying weights, a coarse one a constant."""
    q, k, v = _block_structured()
    _, w = mra_attention_reference(q, k, v, block_size=8, blocks=2, selection="global")
    blocks = w[0, 0].view(4, 8, 4, 8)  # (query block, query, key block, key)
    varies = (blocks.amax(-1) - blocks.amin(-1)).amax(1) > 1e-12  # (query block, key block): refined
    assert varies.sum().item() == 8  # m · n_b = 2 · 4
    # the peaked query blocks keep only their dominant key block; the spread ones get the other 6 (per block: 2 + 2)
    assert varies[:2].sum(-1).tolist() == [1, 1] and varies[2:].sum().item() == 6


@pytest.mark.parametrize("causal_padding", [False, True])
def test_global_selection_fast_equals_reference_with_padding(causal_padding: bool) -> None:
    q, k, v = _qkv(21, heads=3)
    kpm = torch.ones(2, 21, dtype=torch.bool)
    if causal_padding:
        kpm[1, 13:] = False
    fast = mra_attention(q, k, v, block_size=4, blocks=2, selection="global", attention_mask=kpm)
    ref = mra_attention_reference(q, k, v, block_size=4, blocks=2, selection="global", attention_mask=kpm)[0]
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    m = attnlab.build("mra", dim=12, heads=3, block_size=4, blocks=2, selection="global").double()
    x = torch.randn(2, 21, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x, attention_mask=kpm), m(x, attention_mask=kpm, impl="reference"), rtol=1e-10, atol=1e-12)
    with pytest.raises(ParameterError, match="selection"):
        attnlab.build("mra", dim=12, heads=3, selection="per-row")
