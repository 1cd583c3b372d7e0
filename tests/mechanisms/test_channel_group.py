"""DaViT channel group attention (P096): a C_g×C_g softmax over channels per group, linear in tokens."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.mixers.channel_group import channel_group_attention, channel_group_attention_reference


def _qkv(seed: int, b: int = 2, h: int = 2, n: int = 6, d: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _by_loops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One group, loops over floats: A_ij = softmax_j(Σ_n q_ni k_nj / √C_g); out_ni = Σ_j A_ij v_nj."""
    n, c = q.shape
    a = []
    for i in range(c):
        logits = [sum(q[t, i].item() * k[t, j].item() for t in range(n)) / math.sqrt(c) for j in range(c)]
        z = sum(math.exp(x) for x in logits)
        a.append([math.exp(x) / z for x in logits])
    out = [[sum(a[i][j] * v[t, j].item() for j in range(c)) for i in range(c)] for t in range(n)]
    return torch.tensor(out, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)


def test_matches_loops_per_group() -> None:
    q, k, v = _qkv(0, n=5, d=3)
    fast = channel_group_attention(q, k, v)
    ref, a = channel_group_attention_reference(q, k, v)
    assert a.shape == (2, 2, 3, 3)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 3, dtype=torch.float64))
    for b in range(2):
        for h in range(2):
            want, want_a = _by_loops(q[b, h], k[b, h], v[b, h])
            torch.testing.assert_close(fast[b, h], want)
            torch.testing.assert_close(ref[b, h], want)
            torch.testing.assert_close(a[b, h], want_a)


def test_hand_computed_value() -> None:
    """C_g = 2, N = 2: Q = [[1, 0], [0, 1]], K = [[2, 0], [0, 0]], V = [[1, 2], [3, 4]].
    QᵀK = [[2, 0], [0, 0]] / √2 → A row 0 = softmax(√2, 0), row 1 = (½, ½); out_n = A v_n."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)[None, None]
    k = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)[None, None]
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)[None, None]
    p = math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + 1)
    want = torch.tensor([[p * 1 + (1 - p) * 2, 1.5], [p * 3 + (1 - p) * 4, 3.5]], dtype=torch.float64)
    torch.testing.assert_close(channel_group_attention(q, k, v)[0, 0], want)


def test_token_permutation_equivariance() -> None:
    """A sums over tokens, so permuting the tokens permutes the outputs the same way."""
    q, k, v = _qkv(1, n=7, d=4)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    out = channel_group_attention(q, k, v)
    permuted = channel_group_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm])
    torch.testing.assert_close(permuted, out[:, :, perm])
    m = attnlab.build("channel-group", dim=8, heads=2).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm])


def test_fast_and_reference_gradients_agree() -> None:
    leaves = [t.requires_grad_(True) for t in _qkv(2, n=9, d=4)]
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 6:] = False
    w = torch.randn(2, 2, 9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fast = torch.autograd.grad((channel_group_attention(*leaves, attention_mask=kpm) * w).sum(), leaves)
    ref = torch.autograd.grad((channel_group_attention_reference(*leaves, attention_mask=kpm)[0] * w).sum(), leaves)
    for gf, gr in zip(fast, ref):
        torch.testing.assert_close(gf, gr)


def test_padding_is_removed() -> None:
    """Padded tokens: zero output, and the real tokens' result is that of the real tokens alone."""
    q, k, v = _qkv(4, n=6)
    kpm = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = channel_group_attention(q, k, v, attention_mask=kpm)
    torch.testing.assert_close(out[0, :, :4], channel_group_attention(q[:1, :, :4], k[:1, :, :4], v[:1, :, :4])[0])
    assert out[0, :, 4:].abs().max() == 0.0


def test_module_channel_attention_and_linear_cost_shape() -> None:
    m = attnlab.build("channel-group", dim=12, heads=3).double()
    x = torch.randn(2, 50, 12, dtype=torch.float64)
    a = m.channel_attention(x)
    assert a.shape == (2, 3, 4, 4)  # C_g × C_g whatever the number of tokens
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    q, k, v = m.project(x)
    torch.testing.assert_close(m.attend(q, k, v), v @ a.transpose(-1, -2))


def test_errors() -> None:
    m = attnlab.build("channel-group", dim=8, heads=2)
    with pytest.raises(ValueError, match="materialize.*channel_attention"):
        m.materialize(torch.randn(1, 4, 8))
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match="v: expected C_g = 3"):
        channel_group_attention(q, k, v[..., :2])
    with pytest.raises(ValueError, match="k: this mechanism needs as many keys as queries"):
        channel_group_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="attention_mask"):
        channel_group_attention(q, k, v, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        attnlab.build("channel-group", dim=8, heads=2, causal=True)
