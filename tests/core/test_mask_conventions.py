"""PyTorch and transformers habits give the right answer: key_padding_mask is PyTorch's (True = padding),
attention_mask is transformers' (True/1 = attend), batch_first=False is nn.MultiheadAttention's layout.

The oracle is torch's own nn.MultiheadAttention with the attnlab module's weights copied in, and the
same sequences run without padding.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import attnlab
from attnlab.core.errors import DTypeError, MaskError
from attnlab.mechanisms.dense.softmax import softmax_attention

DIM, HEADS, N = 16, 4, 10
LENGTHS = (10, 7, 4)  # real tokens per sequence; the rest is padding at the end


def torch_mha(m: nn.Module, batch_first: bool = True) -> nn.MultiheadAttention:
    """nn.MultiheadAttention holding m's q/k/v/out projections."""
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        mha.out_proj.weight.copy_(m.out_proj.weight)
        mha.out_proj.bias.copy_(m.out_proj.bias)
    return mha.eval()


def padded() -> tuple[Tensor, Tensor]:
    """x (3, N, DIM) float64 and PyTorch's key_padding_mask (True = padding) for LENGTHS."""
    x = torch.randn(len(LENGTHS), N, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pad = torch.arange(N)[None, :] >= torch.tensor(LENGTHS)[:, None]
    return x, pad


def module(causal: bool = False, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return attnlab.build("softmax", dim=DIM, heads=HEADS, causal=causal, **kw).double().eval()


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_matches_nn_multihead_attention(causal: bool) -> None:
    m = module(causal)
    x, pad = padded()
    future = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None  # PyTorch: True = not allowed
    want, _ = torch_mha(m)(x, x, x, key_padding_mask=pad, attn_mask=future, need_weights=False)
    real = ~pad
    for impl in ("fast", "reference"):
        got = m(x, key_padding_mask=pad, impl=impl)
        torch.testing.assert_close(got[real], want[real])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["softmax", "alibi", "efficient", "sliding-window"])
def test_both_spellings_equal_the_unpadded_sequences(name: str, causal: bool) -> None:
    torch.manual_seed(0)
    params = {"radius": 2} if name == "sliding-window" else {}
    m = attnlab.build(name, dim=DIM, heads=HEADS, causal=causal, **params).double().eval()
    x, pad = padded()
    by_pytorch = m(x, key_padding_mask=pad)
    by_keep = m(x, attention_mask=~pad)
    by_ints = m(x, attention_mask=(~pad).long())  # a tokenizer's 0/1 mask
    for i, n in enumerate(LENGTHS):
        alone = m(x[i : i + 1, :n])[0]
        for got in (by_pytorch, by_keep, by_ints):
            torch.testing.assert_close(got[i, :n], alone)
        if n < N:  # the trap this guards against: PyTorch's mask read as a keep-mask gives something else
            assert not torch.allclose(m(x, attention_mask=pad)[i, :n], alone)


def test_batch_first_false_matches_nn_multihead_attention_sequence_first() -> None:
    first = module(causal=False)
    seq = module(causal=False, batch_first=False)
    x, pad = padded()
    xs = x.transpose(0, 1)  # (n, batch, dim)
    want, _ = torch_mha(first, batch_first=False)(xs, xs, xs, key_padding_mask=pad, need_weights=False)
    got = seq(xs, key_padding_mask=pad)
    assert got.shape == (N, len(LENGTHS), DIM)
    torch.testing.assert_close(got.transpose(0, 1)[~pad], want.transpose(0, 1)[~pad])
    torch.testing.assert_close(got, first(x, key_padding_mask=pad).transpose(0, 1))
    ctx = torch.randn(N + 3, len(LENGTHS), DIM, dtype=torch.float64)
    torch.testing.assert_close(seq(xs, context=ctx), first(x, context=ctx.transpose(0, 1)).transpose(0, 1))
    torch.testing.assert_close(seq.materialize(xs, key_padding_mask=pad), first.materialize(x, key_padding_mask=pad))


def test_batch_first_false_decodes_sequence_first() -> None:
    first, seq = module(causal=True), module(causal=True, batch_first=False)
    x = padded()[0]
    state, outs = None, []
    for t in range(4):
        y, state = seq.step(x[:, t : t + 1].transpose(0, 1), state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 0), first(x[:, :4]).transpose(0, 1))


def test_sequence_first_input_is_refused_naming_batch_first() -> None:
    m = module()
    x, pad = padded()
    xs = x.transpose(0, 1)
    with pytest.raises(MaskError, match="key_padding_mask.*batch_first"):
        m(xs, key_padding_mask=pad)
    with pytest.raises(MaskError, match="attention_mask.*batch_first"):
        m(xs, attention_mask=~pad)
    with pytest.raises(ValueError, match="context.*batch_first"):
        m(xs, context=torch.randn(N + 3, len(LENGTHS), DIM, dtype=torch.float64))


def test_bad_padding_arguments() -> None:
    m = module()
    x, pad = padded()
    with pytest.raises(MaskError, match="attention_mask, key_padding_mask.*both"):
        m(x, attention_mask=~pad, key_padding_mask=pad)
    with pytest.raises(DTypeError, match="key_padding_mask: expected dtype torch.bool with True = padding"):
        m(x, key_padding_mask=pad.double())  # PyTorch's additive float form
    with pytest.raises(DTypeError, match="attention_mask"):
        m(x, attention_mask=(~pad).double())
    with pytest.raises(MaskError, match="attention_mask: expected 0/1"):
        m(x, attention_mask=2 * (~pad).long())
    with pytest.raises(ValueError, match="batch_first"):
        attnlab.build("softmax", dim=DIM, heads=HEADS, batch_first="no")
    with pytest.raises(ValueError, match="batch_first"):  # batch-first only: the parameter is not there
        attnlab.build("efficient", dim=DIM, heads=HEADS, batch_first=False)


def test_functional_ops_take_no_key_padding_mask() -> None:
    q = k = v = torch.randn(2, HEADS, N, 4)
    with pytest.raises(TypeError, match="key_padding_mask"):
        softmax_attention(q, k, v, key_padding_mask=torch.zeros(2, N, dtype=torch.bool))  # type: ignore[call-arg]


def test_docs_list_the_modules_that_take_batch_first() -> None:
    text = (Path(__file__).parents[2] / "docs" / "mechanisms.md").read_text()
    listed = text.split("parameter `batch_first` —", 1)[1].split("— take", 1)[0]
    have = {s.name for s in attnlab.list_mechanisms() if any(p.name == "batch_first" for p in s.params)}
    assert set(re.findall(r"`([a-z-]+)`", listed)) == have
