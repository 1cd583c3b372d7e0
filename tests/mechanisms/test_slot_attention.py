"""Slot attention (P125): one iteration by hand (softmax over the slots, weighted mean over the inputs, GRU, MLP),
equivariance over the slots and invariance over the inputs, the explicit slot draw, what materialize returns,
and slot-attention 1.5.2's SlotAttention with mapped weights and the same initial slots (float64)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab

DIM, K = 8, 4


def build(**params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("slot-attention", **{"dim": DIM, "num_slots": K, "hidden": 16, **params}).double().eval()


def inputs(batch: int = 2, n: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def slots(batch: int = 2, k: int = K, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, k, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_one_iteration_by_hand() -> None:
    """iters=1: A = softmax over slots of k qᵀ/√D, W = (A + ε) normalised over the real inputs, U = W v,
    S = GRUCell(U, S⁰) (torch's), S += MLP(LN S); W and A are what materialize and competition return."""
    m = build(iters=1, eps=1e-3)
    x, s0 = inputs(), slots()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 2] = keep[1, 6] = False
    ln = torch.nn.functional.layer_norm
    for mask in (None, keep):
        want = torch.zeros(2, K, DIM, dtype=torch.float64)
        want_w = torch.zeros(2, K, 7, dtype=torch.float64)
        want_a = torch.zeros(2, 7, K, dtype=torch.float64)
        for b in range(2):
            real = torch.arange(7) if mask is None else mask[b].nonzero().flatten()
            h = ln(x[b, real], (DIM,), m.norm_input.weight, m.norm_input.bias)
            k, v = h @ m.k.weight.T, h @ m.v.weight.T
            q = ln(s0[b], (DIM,), m.norm_slots.weight, m.norm_slots.bias) @ m.q.weight.T
            a = torch.softmax(k @ q.T / math.sqrt(DIM), dim=1)  # (n_real, K): over the slots
            w = (a + 1e-3) / (a + 1e-3).sum(0, keepdim=True)  # over the inputs
            s = m.gru(w.T @ v, s0[b])
            s = s + m.mlp_out(torch.relu(m.mlp_in(ln(s, (DIM,), m.norm_mlp.weight, m.norm_mlp.bias))))
            want[b], want_w[b, :, real], want_a[b, real] = s, w.T, a
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, slots=s0, attention_mask=mask, impl=impl), want)
        torch.testing.assert_close(m.materialize(x, slots=s0, attention_mask=mask)[:, 0], want_w)
        torch.testing.assert_close(m.competition(x, slots=s0, attention_mask=mask), want_a)
    w = m.materialize(x, slots=s0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 1, K, dtype=torch.float64))  # rows: over the inputs
    a = m.competition(x, slots=s0)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 7, dtype=torch.float64))  # the softmax: over the slots
    assert (w[:, 0].sum(1) - 1).abs().max() > 1e-3  # a column of W is not normalised: the slots compete in A only


def test_equivariant_over_slots_invariant_over_inputs() -> None:
    m = build(iters=3)
    x, s0 = inputs(), slots()
    ps = torch.tensor([2, 0, 3, 1])
    px = torch.tensor([5, 3, 0, 6, 1, 2, 4])
    for impl in ("fast", "reference"):
        base = m(x, slots=s0, impl=impl)
        torch.testing.assert_close(m(x, slots=s0[:, ps], impl=impl), base[:, ps])
        torch.testing.assert_close(m(x[:, px], slots=s0, impl=impl), base)
    torch.testing.assert_close(m.materialize(x[:, px], slots=s0[:, ps]), m.materialize(x, slots=s0)[:, :, ps][..., px])
    assert (base[:, 0] - base[:, 1]).abs().max() > 1e-3  # distinct slots stay distinct


def test_initial_slots_are_explicit() -> None:
    """eval without slots/generator: every slot starts at μ (deterministic); a generator draws μ + σ ε reproducibly;
    training mode draws from the global RNG; any number of given slots."""
    m = build()
    x = inputs()
    torch.testing.assert_close(m(x), m(x, slots=m.mu.detach().expand(K, DIM)))
    mean_out = m(x)
    torch.testing.assert_close(mean_out[:, 1:], mean_out[:, :1].expand(2, K - 1, DIM))  # equal slots stay equal
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    drawn = m(x, generator=g1)
    torch.testing.assert_close(drawn, m(x, generator=g2))
    noise = torch.randn(2, K, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        m.log_sigma.fill_(math.log(0.5))
    torch.testing.assert_close(m(x, generator=torch.Generator().manual_seed(9)), m(x, slots=m.mu.detach() + 0.5 * noise))
    assert (drawn[:, 0] - drawn[:, 1]).abs().max() > 1e-3
    m.train()
    torch.manual_seed(4)
    a = m(x)
    torch.manual_seed(4)
    torch.testing.assert_close(m(x), a)
    assert (m(x) - a).abs().max() > 1e-6  # a fresh draw
    m.eval()
    assert m(x, slots=slots(k=6)).shape == (2, 6, DIM)
    with pytest.raises(ValueError, match="^slots: expected"):
        m(x, slots=slots()[:, :, :3])
    with pytest.raises(ValueError, match="^slots, generator: "):
        m(x, slots=slots(), generator=g1)
    with pytest.raises(TypeError, match="^slots: expected dtype"):
        m(x, slots=slots().float())


def test_matches_slot_attention_package() -> None:
    """slot-attention 1.5.2 (biases in W_q, W_k, W_v; draws ε inside forward): the same weights and the same ε
    (seeded global RNG on its side; the same stream as slots= and as generator= on ours)."""
    sa = pytest.importorskip("slot_attention")
    torch.manual_seed(3)
    peer = sa.SlotAttention(num_slots=K, dim=DIM, iters=3, eps=1e-8, hidden_dim=16).double().eval()
    ours = build(qkv_bias=True)
    with torch.no_grad():
        ours.mu.copy_(peer.slots_mu.reshape(DIM))
        ours.log_sigma.copy_(peer.slots_logsigma.reshape(DIM))
        for name in ("q", "k", "v"):
            getattr(ours, name).load_state_dict(getattr(peer, f"to_{name}").state_dict())
        ours.gru.load_state_dict(peer.gru.state_dict())
        ours.mlp_in.load_state_dict(peer.mlp[0].state_dict())
        ours.mlp_out.load_state_dict(peer.mlp[2].state_dict())
        ours.norm_input.load_state_dict(peer.norm_input.state_dict())
        ours.norm_slots.load_state_dict(peer.norm_slots.state_dict())
        ours.norm_mlp.load_state_dict(peer.norm_pre_ff.state_dict())
    x = inputs(n=9)
    torch.manual_seed(11)
    want = peer(x)
    noise = torch.randn(2, K, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    start = (ours.mu + ours.log_sigma.exp() * noise).detach()
    for impl in ("fast", "reference"):
        torch.testing.assert_close(ours(x, slots=start, impl=impl), want, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(ours(x, generator=torch.Generator().manual_seed(11)), want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("n", [20, 37])
def test_flops_equal_the_counted_matmul_flops(n: int) -> None:
    """The registry's FLOPs (default parameters, width 8 = 2 heads × 4) == torch's FlopCounterMode count."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = attnlab.get("slot-attention", "pooling")
    torch.manual_seed(0)
    m = spec.build(dim=8, **{}).eval()
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(1, n, 8))
    assert spec.flops is not None and counter.get_total_flops() == spec.flops(n, 2, 4, False)


def test_functional_read() -> None:
    """slot_attention == its reference == softmax over the slots, +ε, normalised over the real inputs, by hand."""
    from attnlab.mechanisms.latents.slot_attention import slot_attention, slot_attention_reference

    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), *torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 1] = False
    keep[1] = False
    out = slot_attention(q, k, v, attention_mask=keep, eps=0.01)
    ref, w = slot_attention_reference(q, k, v, attention_mask=keep, eps=0.01)
    torch.testing.assert_close(out, ref)
    real = torch.tensor([0, 2, 3, 4])
    a = torch.softmax(k[0, real] @ q[0].T / 2.0, dim=1) + 0.01
    torch.testing.assert_close(w[0][:, real], (a / a.sum(0)).T)
    torch.testing.assert_close(out[0], (a / a.sum(0)).T @ v[0, real])
    assert w[0][:, 1].abs().max() == 0 and out[1].abs().max() == 0 and w[1].abs().max() == 0
    with pytest.raises(ValueError, match="^q, k, v: expected"):
        slot_attention(q[:, :, :3], k, v)
