"""SHViT's SHSA (P189): the passed-through channels reach the projection bit for bit, one head over the first C_p
channels (by hand), the official pre-norm with padding excluded, and timm's SHSA with mapped (BN-folded) weights."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlab
from attnlab.mechanisms.heads.shvit import shvit_attention, shvit_attention_reference


def build(dim: int = 20, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return attnlab.build("shvit", dim=dim, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pre_norm", ["none", "group"])
def test_untouched_channels_are_bit_identical(dtype: torch.dtype, pre_norm: str) -> None:
    m = build(partial_dim=6, pre_norm=pre_norm).to(dtype)
    x = torch.randn(2, 9, 20, dtype=dtype)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    for impl in ("fast", "reference"):
        for kw in ({}, {"attention_mask": keep}):
            mixed = m.pre_projection(x, impl=impl, **kw)
            assert torch.equal(mixed[..., 6:], x[..., 6:])
    # and the attended part does not read them
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.pre_projection(x)[..., :6].sum(), x)
    assert g[..., 6:].abs().max() == 0.0 and g[..., :6].abs().max() > 0.0


def test_single_head_over_the_first_channels_by_hand() -> None:
    m = build(dim=224).double()
    assert m.heads == 1 and m.partial_dim == 48  # round(224/4.67), the released SHViT-S1 stage 2's C_p
    assert (m.q_proj.in_features, m.q_proj.out_features, m.v_proj.out_features) == (48, 16, 48)
    x = torch.randn(2, 7, 224, dtype=torch.float64)
    xp = x[..., :48]
    q, k, v = m.q_proj(xp), m.k_proj(xp), m.v_proj(xp)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), -1)
    assert m.materialize(x).shape == (2, 1, 7, 7)
    torch.testing.assert_close(m.materialize(x)[:, 0], a)
    want = m.out_proj(torch.cat([a @ v, x[..., 48:]], -1))
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl), want)


def test_functional_ops_equal_the_module() -> None:
    m = build(partial_dim=6, heads=3, head_dim=4).double()
    x = torch.randn(2, 9, 20, dtype=torch.float64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :2] = False
    q, k, v = m.project(x)
    want = m.pre_projection(x, attention_mask=keep)
    torch.testing.assert_close(shvit_attention(q, k, v, x[..., 6:], attention_mask=keep), want)
    out, weights = shvit_attention_reference(q, k, v, x[..., 6:], attention_mask=keep)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(weights, m.materialize(x, attention_mask=keep))


def test_group_pre_norm_is_groupnorm_over_the_real_tokens() -> None:
    m = build(partial_dim=6, pre_norm="group").double()
    with torch.no_grad():
        m.norm_weight.copy_(torch.randn(6))
        m.norm_bias.copy_(torch.randn(6))
    gn = nn.GroupNorm(1, 6).double()
    gn.load_state_dict({"weight": m.norm_weight, "bias": m.norm_bias})
    x = torch.randn(1, 7, 20, dtype=torch.float64)
    want = gn(x[..., :6].transpose(1, 2)[..., None])[..., 0].transpose(1, 2)
    torch.testing.assert_close(m.attended(x), want)
    padded = torch.cat([x, 50 * torch.randn(1, 4, 20, dtype=torch.float64)], 1)
    keep = torch.tensor([[True] * 7 + [False] * 4])
    torch.testing.assert_close(m.attended(padded, keep)[:, :7], want)
    torch.testing.assert_close(m(padded, attention_mask=keep)[:, :7], m(x))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1×1 convolution then batch norm (eval) as one affine map (weight (out, in), bias (out,))."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight[:, :, 0, 0] * s[:, None], bn.bias - bn.running_mean * s


def test_peer_timm_shsa() -> None:
    shvit = pytest.importorskip("timm.models.shvit")
    dim, qk_dim, pdim = 20, 16, 6
    torch.manual_seed(2)
    peer = shvit.SHSA(dim, qk_dim, pdim).double().eval()
    with torch.no_grad():
        for name, t in list(peer.named_parameters()) + list(peer.named_buffers()):
            if "num_batches" in name:
                continue
            t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t))
    m = build(dim=dim, partial_dim=pdim, head_dim=qk_dim, pre_norm="group", activation="relu").double()
    with torch.no_grad():
        m.norm_weight.copy_(peer.pre_norm.weight)
        m.norm_bias.copy_(peer.pre_norm.bias)
        w, b = _fold(peer.qkv.c, peer.qkv.bn)
        for proj, rows in ((m.q_proj, slice(0, qk_dim)), (m.k_proj, slice(qk_dim, 2 * qk_dim)),
                           (m.v_proj, slice(2 * qk_dim, None))):
            proj.weight.copy_(w[rows])
            proj.bias.copy_(b[rows])
        w, b = _fold(peer.proj[1].c, peer.proj[1].bn)
        m.out_proj.weight.copy_(w)
        m.out_proj.bias.copy_(b)
    image = torch.randn(2, dim, 3, 4, dtype=torch.float64)
    want = peer(image).flatten(2).transpose(1, 2)
    tokens = image.flatten(2).transpose(1, 2)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(tokens, impl=impl), want)
