"""select-and-pack (P134): packed attention == per-image attention over the selected tokens, unselected tokens pass
unchanged, straight-through gate, compute saved."""
from __future__ import annotations

import math

import torch

import attnlab
from attnlab.mechanisms.sparse.select_and_pack import (
    pack_tokens,
    select_and_pack_attention,
    select_and_pack_attention_reference,
    select_and_pack_flops,
)


def _inputs(batch: int = 3, heads: int = 2, n: int = 6, d: int = 4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))


def test_packed_result_equals_per_image_attention_over_the_selected_tokens() -> None:
    """Images 0 and 1 share a pack (block-diagonal mask), image 2 is padded; each selected token's output is the
    softmax attention over its own image's selected tokens, computed here image by image; gradients too."""
    q, k, v = _inputs()
    gate = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.2, 0.3],
                         [0.2, 0.6, 0.4, 0.95, 0.1, 0.1],
                         [0.7, 0.8, 0.9, 0.6, 0.99, 0.51]], dtype=torch.float64)[..., None]
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[2, 4:] = False  # selected-looking gates on padded tokens: never selected
    selected = (gate[..., 0] > 0.5) & keep
    packing = pack_tokens(selected, 6)
    assert packing.segment.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]  # 3 + 2 tokens in the first pack
    got = select_and_pack_attention(q, k, v, gate, attention_mask=keep, pack_length=6)
    want = torch.zeros_like(got)
    for b in range(3):
        idx = selected[b].nonzero()[:, 0]
        a = torch.softmax(q[b][:, idx] @ k[b][:, idx].transpose(-1, -2) / 2.0, dim=-1)  # √d = 2
        want[b][:, idx] = a @ v[b][:, idx]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(select_and_pack_attention_reference(q, k, v, gate, attention_mask=keep)[0], want)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    for length in (1, 3, 5, 9, 18):  # the packing changes the cost, not the result
        torch.testing.assert_close(select_and_pack_attention(q, k, v, gate, attention_mask=keep, pack_length=length), want)
    assert pack_tokens(selected, 3).segment.tolist() == [[0, 0, 0, -1], [1, 1, -1, -1], [2, 2, 2, 2]]  # 4 > 3: alone


def test_unselected_tokens_pass_unchanged() -> None:
    """An unselected token's output is 0 after out_proj (a residual block returns it as it came), and it is no key:
    changing its key and value changes no other output."""
    q, k, v = _inputs()
    gate = torch.full((3, 6, 1), 0.9, dtype=torch.float64)
    gate[:, 2] = 0.1
    out = select_and_pack_attention(q, k, v, gate)
    assert out[:, :, 2].abs().max() == 0
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 2] += 5.0
    v2[:, :, 2] -= 7.0
    torch.testing.assert_close(select_and_pack_attention(q, k2, v2, gate), out)
    m = attnlab.build("select-and-pack", dim=8, heads=2, gate_hidden=0).double()
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[0, 0] = 10.0  # selected iff x_0 > 0
        m.gate.bias.zero_()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    x[0, 3, 0], x[1, 5, 0] = -1.0, -2.0
    chosen = x[..., 0] > 0
    y = m(x)
    block = x + y  # a residual block around SPA
    torch.testing.assert_close(block[~chosen], x[~chosen], rtol=0, atol=0)
    assert (y[chosen].abs().sum(-1) > 0).all()


def test_straight_through_gate() -> None:
    """The output uses the hard selection; d out_i / d g_i is the attention output of a selected token i, 0 for an
    unselected one."""
    q, k, v = (t.detach() for t in _inputs(batch=1))
    gate = torch.tensor([0.9, 0.2, 0.6, 0.7, 0.4, 0.55], dtype=torch.float64).view(1, 6, 1).requires_grad_(True)
    out = select_and_pack_attention(q, k, v, gate)
    hard = select_and_pack_attention(q, k, v, (gate.detach() > 0.5).double())  # gates 1 and 0: the values s_i
    torch.testing.assert_close(out, hard, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), gate)
    torch.testing.assert_close(grad[0, :, 0], hard.sum((1, 3))[0])  # Σ over heads and channels of attn_i
    assert grad[0, 1, 0] == 0 and grad[0, 4, 0] == 0


def test_compute_saved_by_hand() -> None:
    """Selections of 3, 2 and 4 of 6 tokens: SPA needs 9 + 4 + 16 = 29 of 3·36 = 108 pairs; the packs [3 + 2] and [4]
    score 2·5² = 50; 9 of 18 tokens kept. FLOPs of a keep ratio r: 4·(rN)²·d_h per head; the registry counts r = 1."""
    m = attnlab.build("select-and-pack", dim=8, heads=2, gate_hidden=0, pack_length=6).double()
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[0, 0] = 10.0
        m.gate.bias.zero_()
    x = -torch.ones(3, 6, 8, dtype=torch.float64)
    for b, count in enumerate((3, 2, 4)):
        x[b, :count, 0] = 1.0
    assert m.pair_counts(x) == {"selected": 9 / 18, "pairs": 29 / 108, "packed_pairs": 50 / 108}
    assert select_and_pack_flops(10, 2, 4, False, keep_ratio=0.5) == 2 * 4.0 * 25 * 4
    assert attnlab.get("select-and-pack").flops(10, 2, 4, False) == 2 * 4.0 * 100 * 4  # registry: keep ratio 1

def test_selection_loss_is_the_bce_of_the_gates() -> None:
    m = attnlab.build("select-and-pack", dim=8, heads=2, gate_hidden=0).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    g = torch.sigmoid(x @ m.gate.weight[0] + m.gate.bias[0]).detach()
    terms = [-(math.log(g[b, i]) if labels[b, i] else math.log(1 - g[b, i])) for b in range(2) for i in range(5) if keep[b, i]]
    torch.testing.assert_close(m.selection_loss(x, labels, attention_mask=keep).item(), sum(terms) / len(terms))
