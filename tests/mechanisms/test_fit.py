"""FIT (P164): local attention in groups, per-group latents read their group, attend globally and write
back; composed matrix ½ (A_loc + W A_glob R A_loc)."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.sparse.fit import FITAttention, fit_attention, fit_attention_reference, fit_matrices


def _qkv(n: int, heads: int = 2, d: int = 4, batch: int = 2, m: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    return [q, k, v, torch.randn(heads, m, d, generator=gen, dtype=torch.float64)]


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def test_hand_computed() -> None:
    # q = 0 and latent queries 0: every softmax is uniform. Groups {0, 1}, {2, 3}, one latent each; v = 1, 2, 4, 8.
    # local: group means 1.5, 6; read: latent z_v = mean of its group's local outputs = 1.5, 6;
    # global: uniform over the 2 latents -> 3.75 each; write: the group's latent -> 3.75.
    # out = ½ (local + write) = 2.625, 2.625, 4.875, 4.875.
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64).view(1, 1, 4, 1)
    u = torch.zeros(1, 1, 2, dtype=torch.float64)
    want = torch.tensor([2.625, 2.625, 4.875, 4.875], dtype=torch.float64).view(1, 1, 4, 1)
    torch.testing.assert_close(fit_attention(q, k, v, u, group_size=2), want)
    torch.testing.assert_close(fit_attention_reference(q, k, v, u, group_size=2)[0], want)


def test_one_group_local_layer_is_dense_attention() -> None:
    q, k, v, u = _qkv(6)
    d = q.shape[-1]
    dense = _softmax(q @ k.transpose(-1, -2) / math.sqrt(d))
    mats = fit_matrices(q, k, u, group_size=6)
    torch.testing.assert_close(mats["local"], dense)
    # the latent path by hand: R = softmax(u kᵀ), A_glob over the m latents, W = softmax(q (A_glob R k)ᵀ)
    read = _softmax(u[None] @ k.transpose(-1, -2) / math.sqrt(d))
    glob = _softmax((read @ q) @ (read @ k).transpose(-1, -2) / math.sqrt(d))
    write = _softmax(q @ (glob @ read @ k).transpose(-1, -2) / math.sqrt(d))
    want = 0.5 * (dense @ v + write @ glob @ read @ dense @ v)
    torch.testing.assert_close(fit_attention(q, k, v, u, group_size=6), want)
    torch.testing.assert_close(mats["composed"] @ v, want)


def test_structure_of_the_stages() -> None:
    q, k, _, u = _qkv(12, m=2)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[0, 8:] = False  # group 2 of element 0 is all padding
    mats = fit_matrices(q, k, u, group_size=4, attention_mask=kpm)
    group = torch.arange(12) // 4
    latent_group = torch.arange(6) // 2
    assert (mats["local"][..., group[:, None] != group[None, :]] == 0).all()
    assert (mats["read"][..., latent_group[:, None] != group[None, :]] == 0).all()
    assert (mats["write"][..., group[:, None] != latent_group[None, :]] == 0).all()
    assert (mats["global"][0, :, :, 4:] == 0).all()  # latents of the empty group are no keys
    assert (mats["composed"][0, ..., 8:] == 0).all()
    torch.testing.assert_close(mats["composed"][1].sum(-1), torch.ones(2, 12, dtype=torch.float64))
    rows = mats["composed"][0].sum(-1)  # queries of the empty group see no real key and no valid latent
    torch.testing.assert_close(rows, torch.cat([torch.ones(2, 8), torch.zeros(2, 4)], -1).double())


@pytest.mark.parametrize(("n", "group", "m"), [(12, 3, 2), (12, 4, 1), (16, 16, 3), (10, 1, 2)])
def test_fast_matches_reference_forward_and_backward(n: int, group: int, m: int, same_grads) -> None:
    q, k, v, u = (t.requires_grad_(True) for t in _qkv(n, m=m, seed=2))
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, -group:] = False
    kpm[1, 0] = False
    w = torch.randn(2, 2, n, 4, dtype=torch.float64)
    for mask in (None, kpm):
        fast = fit_attention(q, k, v, u, group_size=group, attention_mask=mask)
        ref = fit_attention_reference(q, k, v, u, group_size=group, attention_mask=mask)[0]
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
        same_grads(ref, (fast,), (q, k, v, u), w, atol=1e-10, rtol=1e-8)


def test_module_latents_are_learned() -> None:
    torch.manual_seed(0)
    m = attnlab.build("fit", dim=8, heads=2, group_size=4, latents=3).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    y = m(x)
    (g,) = torch.autograd.grad(y.square().sum(), m.latents)
    assert g.abs().max() > 0
    torch.testing.assert_close(y, m(x, impl="reference"))
    q, k, v = m.project(x)
    torch.testing.assert_close(m.materialize(x) @ v, m.attend(q, k, v))


def test_errors_name_the_values() -> None:
    q, k, v, u = _qkv(10)
    with pytest.raises(ValueError, match=r"group_size.*4.*n=10.*10 % 4 = 2"):
        fit_attention(q, k, v, u, group_size=4)
    with pytest.raises(ValueError, match=r"group_size.*12.*larger.*n=10"):
        fit_attention(q, k, v, u, group_size=12)
    with pytest.raises(ValueError, match="group_size"):
        fit_attention(q, k, v, u, group_size=0)
    with pytest.raises(ValueError, match=r"latents.*\(2, m, 4\)"):
        fit_attention(q, k, v, u[:, :, :3], group_size=5)
    with pytest.raises(ValueError, match="latents"):
        attnlab.build("fit", dim=8, heads=2, latents=0)
    m = FITAttention(8, 2, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        m(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 8, 8), attn_mask=torch.ones(8, 8, dtype=torch.bool))
