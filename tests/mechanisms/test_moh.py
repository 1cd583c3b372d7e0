"""MoH: uniform gates with every head on == multi-head attention (torch's), the routing and its loss by hand,
attention computed only for the (token, head) pairs a token keeps."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.heads import moh as moh_module
from attnlab.mechanisms.heads.moh import moh_attention, moh_attention_reference

LN3 = math.log(3.0)


def torch_mha(m: torch.nn.Module) -> torch.nn.MultiheadAttention:
    """torch's multi-head attention with the projections of an attnlab module (float64)."""
    mha = torch.nn.MultiheadAttention(m.dim, m.heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        mha.out_proj.weight.copy_(m.out_proj.weight)
        mha.out_proj.bias.copy_(m.out_proj.bias)
    return mha


def zero_routers(m: torch.nn.Module) -> None:
    with torch.no_grad():
        for router in (m.shared_router, m.routed_router, m.mix_router):
            router.weight.zero_()


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_every_head_on_with_uniform_gates_is_multi_head_attention(impl: str) -> None:
    """variant='code', top_k = every routed head, zero routers: each gate is (1/h_s)·h_s·(1/2)·2 = 1 (shared) and
    (1/E)/(E·1/E)·E·1 = 1 (routed), so MoH is MHA; 'paper' gives gates ½·½ = ¼ (2 shared, 2 routed heads)."""
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    code = attnlab.build("moh", dim=16, heads=4, shared_heads=2, top_k=2, variant="code").double()
    zero_routers(code)
    want, _ = torch_mha(code)(x, x, x, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(code(x, attention_mask=keep, impl=impl), want)
    paper = attnlab.build("moh", dim=16, heads=4, shared_heads=2, top_k=2, variant="paper").double()
    paper.load_state_dict(code.state_dict())
    bias = paper.out_proj.bias
    torch.testing.assert_close(paper(x, attention_mask=keep, impl=impl), (want - bias) / 4 + bias)
    torch.testing.assert_close(paper.last_routing.gates, torch.full((2, 6, 4), 0.25, dtype=torch.float64))


def hand_module(variant: str) -> torch.nn.Module:
    """3 heads: 1 shared, 2 routed, top-1; W_r = ln3·I (softmax(W_r x) = [3/4, 1/4] for x = e_1), W_h = 0 (α = ½, ½)."""
    m = attnlab.build("moh", dim=2, heads=3, head_dim=2, shared_heads=1, top_k=1, variant=variant).double()
    with torch.no_grad():
        m.shared_router.weight.copy_(torch.tensor([[0.7, -1.3]]))  # one shared head: its softmax is 1 whatever W_s
        m.routed_router.weight.copy_(LN3 * torch.eye(2))
        m.mix_router.weight.zero_()
    return m


TOKENS = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)


def test_routing_and_loss_by_hand_paper() -> None:
    r = hand_module("paper").routing(TOKENS)
    # token 1: shared ½·1, routed head 1 kept with ½·3/4; token 2 keeps routed head 2
    gates = torch.tensor([[[0.5, 0.375, 0.0], [0.5, 0.0, 0.375], [0.5, 0.375, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(r.gates, gates)
    assert r.kept.tolist() == [[[True, True, False], [True, False, True], [True, True, False]]]
    torch.testing.assert_close(r.usage, torch.tensor([1.0, 2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(r.active, torch.tensor(2 / 3, dtype=torch.float64))
    # f = (2/3, 1/3), P = ((3/4 + 1/4 + 3/4)/3, (1/4 + 3/4 + 1/4)/3) = (7/12, 5/12): Σ f·P = 19/36
    torch.testing.assert_close(r.balance_loss, torch.tensor(19 / 36, dtype=torch.float64))


def test_routing_and_loss_by_hand_code() -> None:
    r = hand_module("code").routing(TOKENS)
    # kept routed gate renormalised to 1 and ×K=1, shared ×1, α ×2 = 1: every kept head has gate 1
    gates = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(r.gates, gates)
    torch.testing.assert_close(r.balance_loss, torch.tensor(2 * 19 / 36, dtype=torch.float64))  # E·Σ f·P, E = 2


def test_padding_is_outside_the_usage_and_the_loss() -> None:
    m = hand_module("paper")
    keep = torch.tensor([[True, True, False]])
    r = m.routing(TOKENS, attention_mask=keep)
    # real tokens 1 and 2: f = (1/2, 1/2), P = (1/2, 1/2): Σ f·P = 1/2
    torch.testing.assert_close(r.usage, torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(r.balance_loss, torch.tensor(0.5, dtype=torch.float64))
    m(TOKENS, key_padding_mask=~keep)
    torch.testing.assert_close(m.last_routing.balance_loss, r.balance_loss)


def test_the_loss_reaches_the_routed_router() -> None:
    m = attnlab.build("moh", dim=8, heads=4).double()
    m(torch.randn(2, 5, 8, dtype=torch.float64))
    (g,) = torch.autograd.grad(m.last_routing.balance_loss, m.routed_router.weight)
    assert g.abs().max() > 0


def test_switched_off_heads_give_zero_and_materialize_is_the_gated_matrix() -> None:
    m = hand_module("paper")
    x = torch.randn(1, 3, 2, dtype=torch.float64)  # top-1 of 2 routed heads: each token switches one head off
    q, k, v = m.project(x)
    gates = m.side_input(x)
    core = m.attend(q, k, v, side=gates)
    off = gates.transpose(1, 2) == 0
    assert off.sum() == 3 and core[off].abs().max() == 0
    w = m.materialize(x)
    torch.testing.assert_close(w.sum(-1), gates.transpose(1, 2))  # rows sum to the gate
    torch.testing.assert_close(core, w @ v)


def count_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record, for every call of the kernel in moh's fast path, the (head, query) rows it is handed."""
    rows: list[int] = []
    kernel = moh_module.sdpa

    def counted(q, *args, **kwargs):
        rows.append(q.shape[0] * q.shape[1] * q.shape[2])
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(moh_module, "sdpa", counted)
    return rows


@pytest.mark.parametrize("causal", [False, True])
def test_the_fast_path_attends_only_for_kept_pairs(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """Batch 1: the kernel is handed exactly one query row per kept (token, head) pair — 1 shared head for all 12
    tokens and one of 5 routed heads per token: 24 rows, not 6·12 = 72 — and the result is the reference's."""
    torch.manual_seed(0)
    m = attnlab.build("moh", dim=12, heads=6, head_dim=2, shared_heads=1, top_k=1, causal=causal).double()
    x = torch.randn(1, 12, 12, dtype=torch.float64)
    q, k, v = m.project(x)
    gates = m.side_input(x)
    rows = count_rows(monkeypatch)
    fast = m.attend(q, k, v, side=gates)
    assert sum(rows) == int((gates != 0).sum()) == 12 + 12
    torch.testing.assert_close(fast, m.attend(q, k, v, side=gates, impl="reference"))


def test_a_batch_pads_a_routed_head_to_its_largest_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 2: per routed head the kernel gets max over the batch of the tokens keeping it, per element."""
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 3, 7, 4, dtype=torch.float64)
    on = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    gates = torch.stack([on.t(), torch.stack([on[0], on[2], on[1]]).t()]).double() * 0.5  # (batch, n, heads)
    rows = count_rows(monkeypatch)
    out = moh_attention(q, k, v, gates)
    # head 0 on everywhere: one call of 2·7 rows; head 1: counts (3, 1) -> 2·3; head 2: counts (1, 3) -> 2·3
    assert sorted(rows) == [6, 6, 14]
    torch.testing.assert_close(out, moh_attention_reference(q, k, v, gates)[0])


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="top_k: expected at most the 2 routed heads"):
        attnlab.build("moh", dim=8, heads=4, shared_heads=2, top_k=3)
    with pytest.raises(ValueError, match="top_k: expected >= 1"):
        attnlab.build("moh", dim=8, heads=4, shared_heads=2, top_k=0)
    m = attnlab.build("moh", dim=8, heads=2)
    q, k, v = m.project(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="side: moh's core needs the gates"):
        m.attend(q, k, v)
    with pytest.raises(ValueError, match="gates: expected"):
        moh_attention(q, k, v, torch.ones(1, 3, 3))
