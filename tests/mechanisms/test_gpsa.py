"""GPSA (P013): the gate's two ends (content softmax, positional softmax, both by hand), the locality init (each head
peaks at its offset; timm's local_init for a square head count), the nonlocality by hand, and timm's GPSA with
mapped weights (outputs, attention maps and its nonlocality)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.positional.gpsa import local_position_weights, nonlocality, positional_weights


def build(heads: int = 4, dim: int = 16, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("gpsa", dim=dim, heads=heads, **kw).double()


def hand_positional(weights: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """softmax_j(w_x δ_x + w_y δ_y + w_d ‖δ‖²) per head, the offsets by loops: (heads, N, N)."""
    n = rows * cols
    logits = torch.zeros(weights.shape[0], n, n, dtype=torch.float64)
    for h in range(weights.shape[0]):
        for i in range(n):
            for j in range(n):
                dx, dy = j % cols - i % cols, j // cols - i // cols
                logits[h, i, j] = weights[h, 0] * dx + weights[h, 1] * dy + weights[h, 2] * (dx * dx + dy * dy)
    return torch.softmax(logits, -1)


def test_gate_zero_is_the_content_softmax() -> None:
    m = build()
    with torch.no_grad():
        m.gate.fill_(-math.inf)  # σ(λ) = 0
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    q, k, v = m.project(x.reshape(2, 12, 16))
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    torch.testing.assert_close(m.materialize(x), want)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl), m.out_proj(m.merge_heads(want @ v)).reshape(x.shape))


def test_gate_one_is_the_positional_softmax() -> None:
    m = build(local_init=False)
    with torch.no_grad():
        m.gate.fill_(math.inf)  # σ(λ) = 1
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    v = m.project(x.reshape(2, 12, 16))[2]
    want = hand_positional(m.position_weights.detach(), 3, 4).expand(2, -1, -1, -1)
    torch.testing.assert_close(m.materialize(x), want)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl), m.out_proj(m.merge_heads(want @ v)).reshape(x.shape))


def test_gate_mixes_and_renormalises() -> None:
    m = build()
    with torch.no_grad():
        m.gate.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    x = torch.randn(1, 3, 3, 16, dtype=torch.float64)
    q, k, _ = m.project(x.reshape(1, 9, 16))
    s = torch.sigmoid(m.gate.detach()).reshape(1, 4, 1, 1)
    want = (1 - s) * torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) + s * hand_positional(
        m.position_weights.detach(), 3, 3)
    torch.testing.assert_close(m.materialize(x), want)


def test_locality_init_peaks_each_head_at_its_offset() -> None:
    rows = cols = 7
    p = positional_weights(local_position_weights(9, 2.0), (rows, cols))
    offsets = [(h // 3 - 1, h % 3 - 1) for h in range(9)]  # (Δ_x, Δ_y) on the 3 × 3 grid of heads
    for h, (ox, oy) in enumerate(offsets):
        for i in range(rows * cols):
            r, c = divmod(i, cols)
            if not (0 <= r + oy < rows and 0 <= c + ox < cols):
                continue
            assert p[h, i].argmax().item() == (r + oy) * cols + (c + ox), (h, i)
    # the module's init: v_pos from the offsets, W_v = I, λ = 1
    m = build(heads=9, dim=18, locality_strength=2.0)
    torch.testing.assert_close(m.position_weights.detach(), local_position_weights(9, 2.0))
    torch.testing.assert_close(m.v_proj.weight.detach(), torch.eye(18, dtype=torch.float64))
    assert torch.equal(m.gate.detach(), torch.ones(9, dtype=torch.float64))


def test_locality_strength_sharpens() -> None:
    soft, sharp = (positional_weights(local_position_weights(4, a), (5, 5)) for a in (0.5, 4.0))
    assert (sharp.amax(-1) > soft.amax(-1)).all()


def test_nonlocality_by_hand() -> None:
    grid = (2, 2)  # tokens (0,0) (0,1) (1,0) (1,1); distances from a corner: 0, 1, 1, √2
    uniform = torch.full((1, 4, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(nonlocality(uniform, grid), torch.tensor([(2 + math.sqrt(2)) / 4], dtype=torch.float64))
    own = torch.eye(4, dtype=torch.float64)[None]
    assert nonlocality(own, grid).item() == 0.0
    opposite = torch.eye(4, dtype=torch.float64).flip(-1)[None]  # token i attends to 3 − i: the diagonal corner
    torch.testing.assert_close(nonlocality(opposite, grid), torch.tensor([math.sqrt(2)], dtype=torch.float64))
    mixed = 0.5 * own + 0.5 * torch.eye(4, dtype=torch.float64)[[1, 0, 3, 2]][None]  # half self, half the row neighbour
    torch.testing.assert_close(nonlocality(mixed, grid), torch.tensor([0.5], dtype=torch.float64))


def _timm_gpsa(heads: int, dim: int) -> torch.nn.Module:
    convit = pytest.importorskip("timm.models.convit")
    torch.manual_seed(1)
    peer = convit.GPSA(dim, num_heads=heads, qkv_bias=True, locality_strength=1.5).double().eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.copy_(torch.randn_like(p))
    return peer


def _mapped(peer: torch.nn.Module, heads: int, dim: int, grid: int) -> torch.nn.Module:
    m = build(heads=heads, dim=dim, grid_shape=(grid, grid))
    with torch.no_grad():
        m.q_proj.weight.copy_(peer.qk.weight[:dim])
        m.q_proj.bias.copy_(peer.qk.bias[:dim])
        m.k_proj.weight.copy_(peer.qk.weight[dim:])
        m.k_proj.bias.copy_(peer.qk.bias[dim:])
        m.v_proj.load_state_dict(peer.v.state_dict())
        m.out_proj.load_state_dict(peer.proj.state_dict())
        m.position_weights.copy_(peer.pos_proj.weight)  # pos_proj.bias: a constant per row, no effect
        m.gate.copy_(peer.gating_param)
    return m


def test_peer_timm_gpsa() -> None:
    heads, dim, grid = 4, 16, 5
    peer = _timm_gpsa(heads, dim)
    m = _mapped(peer, heads, dim, grid)
    x = torch.randn(3, grid * grid, dim, dtype=torch.float64)
    want = peer(x)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x.reshape(3, grid, grid, dim), impl=impl).reshape(3, -1, dim), want)
    dist, attn_map = peer.get_attention_map(x, return_map=True)
    ours = m.materialize(x.reshape(3, grid, grid, dim))
    torch.testing.assert_close(ours.mean(0), attn_map)
    torch.testing.assert_close(nonlocality(ours.mean(0), (grid, grid)), dist)


def test_peer_timm_local_init() -> None:
    convit = pytest.importorskip("timm.models.convit")
    for heads in (4, 9, 16):
        peer = convit.GPSA(2 * heads, num_heads=heads, locality_strength=1.5).double()
        peer.local_init()
        torch.testing.assert_close(local_position_weights(heads, 1.5), peer.pos_proj.weight.detach())
