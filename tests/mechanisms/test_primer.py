"""Primer MDHA: the causal depthwise conv by hand and without leaks (also in the non-causal module), per-head kernels
independent, width 1 with identity weights equal to softmax attention, labml-nn's primer_ez as a peer (shared
kernel), the squared-ReLU feed-forward by hand."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ShapeError
from attnlab.mechanisms.dense.primer import (
    SquaredReLUFeedForward,
    causal_depthwise_conv,
    primer_attention,
    primer_attention_reference,
    squared_relu,
)

F64 = torch.float64


def _module(**kw):
    torch.manual_seed(0)
    return attnlab.build("primer", dim=12, heads=3, **kw).double()


def test_conv_values_by_hand_fast_and_reference():
    # one head, one channel, kernel [a, b, c] (c weighs the token itself), bias e
    a, b, c, e = 0.5, -2.0, 3.0, 0.25
    x = torch.tensor([1.0, 2.0, -1.0, 4.0], dtype=F64).reshape(1, 1, 4, 1)
    kernel = torch.tensor([[[a, b, c]]], dtype=F64)
    bias = torch.tensor([[e]], dtype=F64)
    x0, x1, x2, x3 = 1.0, 2.0, -1.0, 4.0
    want = torch.tensor([c * x0, b * x0 + c * x1, a * x0 + b * x1 + c * x2, a * x1 + b * x2 + c * x3], dtype=F64) + e
    torch.testing.assert_close(causal_depthwise_conv(x, kernel, bias).flatten(), want, rtol=0, atol=1e-15)
    # with token 1 padding: the real tokens 2 and 3 read it as zero, the padded token keeps its plain window
    keep = torch.tensor([[True, False, True, True]])
    want_pad = torch.tensor([c * x0, b * x0 + c * x1, a * x0 + c * x2, b * x2 + c * x3], dtype=F64) + e
    torch.testing.assert_close(causal_depthwise_conv(x, kernel, bias, keep=keep).flatten(), want_pad, rtol=0, atol=1e-15)
    # the functional reference convolves by its own shifts: the same numbers through the attention weights
    ones = torch.ones(1, 1, 4, 1, dtype=F64)
    ident = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=F64)
    _, w = primer_attention_reference(x, x, ones, kernels=(ident, kernel, ident), biases=(None, bias, None),
                                      attention_mask=keep, query_mask=keep)
    logits = torch.outer(x.flatten(), want_pad) * 1.0  # scale 1/√1
    logits[:, 1] = -math.inf
    torch.testing.assert_close(w[0, 0], torch.softmax(logits, -1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_conv_never_reads_later_tokens_in_either_mode(causal):
    m = _module(causal=causal)
    x = torch.randn(2, 10, 12, dtype=F64)
    t = 4
    later = x.clone()
    later[:, t:] += torch.randn(2, 10 - t, 12, dtype=F64)
    for impl in ("fast", "reference"):
        for a, b in zip(m.project(x, impl=impl), m.project(later, impl=impl)):
            torch.testing.assert_close(a[:, :, :t], b[:, :, :t], rtol=0, atol=0)
            assert (a[:, :, t:] - b[:, :, t:]).abs().amax() > 1e-3  # the later positions do change
    if causal:
        torch.testing.assert_close(m(x)[:, :t], m(later)[:, :t], rtol=0, atol=1e-14)


def test_each_head_has_its_own_kernels():
    m = _module(causal=True)
    x = torch.randn(2, 9, 12, dtype=F64)
    before = m.attend(*m.project(x))
    with torch.no_grad():
        for kernel in m.kernels:
            kernel[1] += torch.randn_like(kernel[1])
    after = m.attend(*m.project(x))
    torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]], rtol=0, atol=0)
    assert (after[:, 1] - before[:, 1]).abs().amax() > 1e-3
    assert m.q_kernel.shape == (3, 4, 3)


@pytest.mark.parametrize("shared_kernel", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_width_one_identity_kernel_is_softmax_attention(causal, shared_kernel):
    m = _module(causal=causal, kernel_size=1, shared_kernel=shared_kernel)
    with torch.no_grad():
        for kernel, bias in zip(m.kernels, m.conv_biases):
            kernel.fill_(1.0)
            bias.zero_()
    soft = attnlab.build("softmax", dim=12, heads=3, causal=causal).double()
    soft.load_state_dict({k: v for k, v in m.state_dict().items() if "kernel" not in k and "conv_bias" not in k})
    x = torch.randn(2, 8, 12, dtype=F64)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :3] = False
    for kw in ({}, {"attention_mask": keep}):
        want = soft(x, **kw)
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, impl=impl, **kw), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.materialize(x), soft.materialize(x), rtol=1e-12, atol=1e-12)


def test_functional_fast_equals_reference_with_masks_and_gradients():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    kernels = tuple(torch.randn(3, 4, 3, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    biases = tuple(torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 2] = keep[1, 5] = False
    kw = dict(kernels=kernels, biases=biases, causal=True, attention_mask=keep, query_mask=keep)
    fast = primer_attention(q, k, v, **kw)
    ref, weights = primer_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert weights[1, :, :, [2, 5]].abs().max() == 0
    w = torch.randn_like(fast)
    inputs = (q, k, v, *kernels, *biases)
    for a, b in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_bad_kernels_are_named():
    q = torch.randn(1, 2, 5, 4)
    good = torch.randn(2, 4, 3)
    with pytest.raises(ShapeError, match=r"kernels \(k\): expected"):
        primer_attention(q, q, q, kernels=(good, torch.randn(2, 5, 3), good))
    with pytest.raises(ShapeError, match="kernels: expected three"):
        primer_attention(q, q, q, kernels=(good, good))
    with pytest.raises(ShapeError, match=r"biases \(v\)"):
        primer_attention(q, q, q, kernels=(good,) * 3, biases=(None, None, torch.randn(3, 4)))
    with pytest.raises(ValueError, match="kernel_size"):
        attnlab.build("primer", dim=8, heads=2, kernel_size=0)


def test_squared_relu_and_feed_forward_by_hand():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=F64)
    torch.testing.assert_close(squared_relu(x), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0], dtype=F64))
    ffn = SquaredReLUFeedForward(2, 3).double()
    with torch.no_grad():
        ffn.up.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        ffn.up.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
        ffn.down.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0]]))
        ffn.down.bias.copy_(torch.tensor([0.5, 0.0]))
    # x = (2, −3): hidden (2, −2, 5) -> relu² (4, 0, 25) -> (0.5 + 29, −25)
    torch.testing.assert_close(ffn(torch.tensor([2.0, -3.0], dtype=F64)), torch.tensor([29.5, -25.0], dtype=F64))
    assert ffn.up.out_features == 3 and SquaredReLUFeedForward(5).up.out_features == 20


@pytest.mark.parametrize("causal", [False, True])
def test_peer_labml_primer_ez_shared_kernel(causal, monkeypatch):
    pytest.importorskip("labml_nn")
    from labml import tracker

    monkeypatch.setattr(tracker, "debug", lambda *a, **k: None, raising=False)  # labml 0.5.3 lacks it; labml-nn calls it
    from labml_nn.transformers.primer_ez import MultiDConvHeadAttention

    torch.manual_seed(5)
    peer = MultiDConvHeadAttention(heads=2, d_model=16, dropout_prob=0.0).double().eval()
    ours = attnlab.build("primer", dim=16, heads=2, shared_kernel=True, causal=causal).double()
    with torch.no_grad():
        for name in ("q", "k", "v"):
            seq = getattr(peer, {"q": "query", "k": "key", "v": "value"}[name])
            getattr(ours, f"{name}_proj").weight.copy_(seq[0].linear.weight)
            getattr(ours, f"{name}_proj").bias.copy_(seq[0].linear.bias)
            getattr(ours, f"{name}_kernel").copy_(seq[1].conv.weight[:, 0, :][None])
            getattr(ours, f"{name}_conv_bias").copy_(seq[1].conv.bias[None])
        ours.out_proj.weight.copy_(peer.output.weight)
        ours.out_proj.bias.copy_(peer.output.bias)
    x = torch.randn(3, 11, 16, dtype=F64)  # (batch, n, dim); labml takes (n, batch, dim)
    mask = torch.tril(torch.ones(11, 11)) if causal else torch.ones(11, 11)
    want = peer(query=x.transpose(0, 1), key=x.transpose(0, 1), value=x.transpose(0, 1), mask=mask[:, :, None])
    for impl in ("fast", "reference"):
        torch.testing.assert_close(ours(x, impl=impl), want.transpose(0, 1), rtol=1e-10, atol=1e-12)
