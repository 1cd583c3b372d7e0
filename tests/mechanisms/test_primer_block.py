"""The Primer block: x + MDHA(LN₁ x), then + W₂ relu(W₁ LN₂ ·)², composed by hand from its parts; the default mixer
is Primer's MDHA; the FFN is the squared ReLU (not ReLU, not GELU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import attnlab
from attnlab.mechanisms.dense.primer import PrimerAttention

F64 = torch.float64


def _block(**kw):
    torch.manual_seed(0)
    return attnlab.build("primer-block", dim=12, heads=3, **kw).double()


def _layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def test_block_by_hand_with_padding():
    m = _block(causal=True)
    assert isinstance(m.mixer, PrimerAttention)
    x = torch.randn(2, 7, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    h = x + m.mixer(_layer_norm(x, m.norm1), attention_mask=keep, impl="reference")
    hidden = F.linear(_layer_norm(h, m.norm2), m.ffn.up.weight, m.ffn.up.bias)
    want = h + F.linear(torch.clamp(hidden, min=0.0) ** 2, m.ffn.down.weight, m.ffn.down.bias)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), want, rtol=1e-12, atol=1e-12)


def test_ffn_width_and_squared_activation():
    m = _block(mlp_ratio=2.0)
    assert m.ffn.up.weight.shape == (24, 12) and m.ffn.down.weight.shape == (12, 24)
    # one token, the mixer silenced: the block is x + FFN(LN x) and its FFN squares the positive pre-activations
    torch.nn.init.zeros_(m.mixer.out_proj.weight)
    torch.nn.init.zeros_(m.mixer.out_proj.bias)
    x = torch.randn(1, 1, 12, dtype=F64, generator=torch.Generator().manual_seed(2))
    pre = F.linear(_layer_norm(x, m.norm2), m.ffn.up.weight, m.ffn.up.bias)
    relu_sq = F.linear(F.relu(pre) ** 2, m.ffn.down.weight, m.ffn.down.bias)
    relu = F.linear(F.relu(pre), m.ffn.down.weight, m.ffn.down.bias)
    y = m(x)
    torch.testing.assert_close(y, x + relu_sq, rtol=1e-12, atol=1e-12)
    assert (y - x - relu).abs().max() > 1e-3  # not a plain ReLU


def test_other_mixer_is_the_ffn_ablation():
    m = _block(mixer="softmax")
    assert type(m.mixer).__name__ == "SoftmaxAttention"
    assert m.spec.paper.id == "P005"
