"""PowerAttention: the pattern by its definition, the paper's receptive-field claim, and the attention values."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.sparse.power import (
    power_attention,
    power_attention_reference,
    power_layout,
    reachable,
)


def is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def hand_blocks(n_blocks: int, local: int, sink: int) -> torch.Tensor:
    """Block i sees block j ≤ i when i − j < local, j < sink or i − j is a power of two (by loops)."""
    out = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for i in range(n_blocks):
        for j in range(i + 1):
            out[i, j] = i - j < local or j < sink or is_power_of_two(i - j)
    return out


def compose(mask: torch.Tensor, layers: int) -> torch.Tensor:
    """Reachability through `layers` layers: paths of exactly `layers` edges (bool matrix product)."""
    out = mask.clone()
    for _ in range(layers - 1):
        out = (out.int() @ mask.int()) > 0
    return out


@pytest.mark.parametrize("local,sink", [(1, 0), (1, 1), (3, 2), (5, 1)])
def test_layout_is_the_papers_pattern(local, sink):
    for n_blocks in (1, 2, 7, 33):
        lay = power_layout(n_blocks * 4, block_size=4, local_blocks=local, sink_blocks=sink)
        assert torch.equal(lay.to_mask()[0], hand_blocks(n_blocks, local, sink))


def test_d_layers_reach_every_token_within_two_to_the_d():
    """P223: with edges at distances 0 and 2^m, d layers reach every earlier token within 2^d, no gaps."""
    n = 130
    mask = power_layout(n, block_size=1, local_blocks=1, sink_blocks=0).element_mask(n, n)[0]
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    for d in range(1, 8):
        reach = compose(mask, d)
        assert torch.equal(reachable(mask, d), reach)
        within = (dist >= 0) & (dist <= 2**d)
        assert bool(reach[within].all()), f"{d} layers leave a gap within distance {2 ** d}"
        # exactly: δ is reached when it is a sum of d terms from {0, 1, 2, 4, …}, i.e. popcount(δ) ≤ d
        popcount = torch.tensor([bin(x).count("1") if x >= 0 else 99 for x in range(-n + 1, n)])
        assert torch.equal(reach, popcount[dist + n - 1] <= d)
        assert not bool(reach[dist < 0].any())


def test_a_sliding_window_reaches_only_d_times_w():
    n, w = 60, 3
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    window = (dist >= 0) & (dist < w)  # local blocks only: w − 1 back
    lay_mask = power_layout(n, block_size=1, local_blocks=w, sink_blocks=0).element_mask(n, n)[0]
    for d in (1, 2, 3, 4):
        reach = compose(window, d)
        assert torch.equal(reach, (dist >= 0) & (dist <= d * (w - 1)))
        assert compose(lay_mask, d)[(dist >= 0) & (dist <= 2**d)].all()


def test_nonzeros_per_row_are_w_plus_log2_n():
    n, w = 1024, 4
    counts = power_layout(n, block_size=1, local_blocks=w, sink_blocks=0).counts[0]
    for i in (0, 1, 5, 100, 1000, 1023):
        # the local window, plus the powers of two 2^m with w ≤ 2^m ≤ i
        want = min(i + 1, w) + sum(1 for m in range(11) if w <= 2**m <= i)
        assert int(counts[i]) == want
    assert int(counts.max()) <= w + math.log2(n)


def test_block_level_reach_at_block_size_64():
    """At block size B the claim holds between blocks: d layers connect blocks up to 2^d apart."""
    lay = power_layout(64 * 40, block_size=64, local_blocks=1, sink_blocks=1)
    blocks = lay.to_mask()[0]
    dist = torch.arange(40)[:, None] - torch.arange(40)[None, :]
    for d in (1, 2, 3, 5):
        assert compose(blocks, d)[(dist >= 0) & (dist <= 2**d)].all()


def hand_power(q, k, v, block_size, local, sink, kpm=None):
    n = q.shape[2]
    blocks = hand_blocks(-(-n // block_size), local, sink)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = blocks[i // block_size, j // block_size] & (j <= i)
    if kpm is not None:
        keep = keep[None, None] & kpm[:, None, None, :]
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(nan=0.0)
    return w @ v, w


@pytest.mark.parametrize("n,bs,local,sink", [(37, 4, 1, 1), (64, 8, 2, 0), (9, 2, 1, 1), (23, 1, 1, 2)])
def test_attention_matches_a_dense_computation(n, bs, local, sink):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kpm = torch.rand(2, n, generator=g) > 0.25
    kw = {"block_size": bs, "local_blocks": local, "sink_blocks": sink, "attention_mask": kpm}
    want, weights = hand_power(q, k, v, bs, local, sink, kpm)
    got = power_attention(q, k, v, **kw)
    ref, ref_w = power_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ref, want)
    torch.testing.assert_close(ref_w, weights)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_module_materializes_the_pattern_and_decodes():
    torch.manual_seed(0)
    m = attnlab.build("power-attention", dim=12, heads=3, block_size=2, sink_blocks=0).double()
    x = torch.randn(1, 19, 12, dtype=torch.float64)
    a = m.materialize(x)
    blocks = hand_blocks(10, 1, 0)
    i = torch.arange(19)[:, None]
    j = torch.arange(19)[None, :]
    pattern = blocks[i // 2, j // 2] & (j <= i)
    assert bool((a[0][:, ~pattern] == 0).all()) and bool((a[0][:, pattern] > 0).all())
    full = m(x)
    state, outs = None, []
    for t in range(19):
        y, state = m.step(x[:, t : t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_parameters_are_checked():
    with pytest.raises(ParameterError, match="causal"):
        attnlab.build("power-attention", dim=8, heads=2, causal=False)
    with pytest.raises(ParameterError, match="block_size"):
        attnlab.build("power-attention", dim=8, heads=2, block_size=0)
    with pytest.raises(ParameterError, match="local_blocks"):
        power_layout(10, local_blocks=0)
    with pytest.raises(ValueError, match="k"):
        q = torch.randn(1, 1, 5, 2)
        power_attention(q, torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2))
