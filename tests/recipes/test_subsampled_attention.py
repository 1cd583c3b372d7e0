"""SSA (P074): the keep law against its formula (hand values, empirical frequencies with a binomial bound),
nearby keys always kept, training output = softmax over the kept keys by hand, eval and the dense
fine-tune exactly dense, fully masked rows give zeros."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlab
from attnlab.recipes.subsampled_attention import (
    SubsampledAttention,
    dense_finetune,
    distances,
    expected_keep_fraction,
    keep_probability,
    subsample_attention,
    subsample_mask,
)


def test_keep_probability_values() -> None:
    d = torch.tensor([0, 1, 2, 3, 4, 8])
    torch.testing.assert_close(keep_probability(d, 2, 1), torch.tensor([1, 1, 1, 2 / 3, 1 / 2, 1 / 4], dtype=torch.float64))
    torch.testing.assert_close(keep_probability(d, 2, 2), torch.tensor([1, 1, 1, 4 / 9, 1 / 4, 1 / 16], dtype=torch.float64))
    assert distances(2, 4).tolist() == [[2, 1, 0, 1], [3, 2, 1, 0]]


def test_expected_fraction_by_hand() -> None:
    # n = 4, w = 1, γ = 1: rows of p over δ: [1, 1, 1/2, 1/3], [1, 1, 1, 1/2], [1/2, 1, 1, 1], [1/3, 1/2, 1, 1]
    total = 2 * (1 + 1 + 0.5 + 1 / 3) + 2 * (1 + 1 + 1 + 0.5)
    assert expected_keep_fraction(4, 1, 1) == pytest.approx(total / 16, rel=1e-12)
    causal = 1 + 2 + (0.5 + 2) + (1 / 3 + 0.5 + 2)
    assert expected_keep_fraction(4, 1, 1, causal=True) == pytest.approx(causal / 10, rel=1e-12)


def test_empirical_frequencies_match_the_law() -> None:
    n, batch, window = 64, 100, 2.0
    mask = subsample_mask(batch, n, n, window, 1.0, generator=torch.Generator().manual_seed(0))[:, 0]
    d = distances(n, n)
    assert mask[:, d <= window].all()  # the own key and the window: always kept
    for delta in (3, 4, 6, 10, 20, 40):
        hits = mask[:, d == delta]
        p, count = window / delta, hits.numel()
        bound = 5 * math.sqrt(p * (1 - p) / count)  # 5 binomial standard deviations
        assert abs(hits.double().mean().item() - p) < bound, (delta, hits.double().mean().item(), p)
    # the overall share kept matches the expected fraction
    assert mask.double().mean().item() == pytest.approx(expected_keep_fraction(n, window, 1.0), abs=0.01)
    # seeded: the same generator state gives the same mask
    again = subsample_mask(batch, n, n, window, 1.0, generator=torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(mask, again)


def _attention(causal: bool = False) -> attnlab.Attention:
    torch.manual_seed(0)
    return attnlab.build("softmax", dim=8, heads=2, causal=causal).double()


@pytest.mark.parametrize("causal", [False, True])
def test_training_output_is_softmax_over_the_kept_keys(causal: bool) -> None:
    att = _attention(causal)
    wrapper = SubsampledAttention(att, window=1.0, power=1.0, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    out = wrapper.train()(x)
    keep = wrapper.last_mask
    assert keep is not None and keep.shape == (2, 1, 7, 7) and not keep.all()
    if causal:
        keep = keep & torch.ones(7, 7, dtype=torch.bool).tril()
    q, k, v = att.project(x)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~keep, float("-inf"))
    by_hand = att.out_proj(att.merge_heads(torch.softmax(scores, -1) @ v))
    torch.testing.assert_close(out, by_hand)
    assert wrapper.last_kept_fraction == pytest.approx(keep.double().sum().item() / (2 * (28 if causal else 49)))


def test_eval_and_dense_finetune_are_dense_exactly() -> None:
    att = _attention()
    wrapper = SubsampledAttention(att, window=1.0)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    dense = att(x)
    assert torch.equal(wrapper.eval()(x), dense)
    wrapper.train()
    assert not torch.allclose(wrapper(x), dense)  # subsampled in training
    dense_finetune([wrapper])
    assert torch.equal(wrapper(x), dense)


def test_padding_attn_mask_and_fully_masked_rows() -> None:
    att = _attention()
    wrapper = SubsampledAttention(att, window=1.0, generator=torch.Generator().manual_seed(1)).train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.tensor([[True, True, True, True, False], [False] * 5])
    out = wrapper(x, attention_mask=keep)
    assert not out.isnan().any()
    torch.testing.assert_close(out[1], att.out_proj.bias.expand(5, 8))  # no key at all: zero attention, the bias
    torch.testing.assert_close(out[0], att(x[:1], attention_mask=keep[:1], attn_mask=wrapper.last_mask[:1])[0])
    # a caller's attn_mask that blocks every key of query 0 keeps that row at zero despite the sampling
    block = torch.ones(5, 5, dtype=torch.bool)
    block[0] = False
    out = wrapper(x, attn_mask=block)
    torch.testing.assert_close(out[:, 0], att.out_proj.bias.expand(2, 8))


class Tiny(nn.Module):
    def __init__(self, mixer: str = "softmax") -> None:
        super().__init__()
        self.blocks = nn.ModuleList([attnlab.build("pre-norm-block", dim=8, heads=2, mixer=mixer) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_model_wrapping_and_bad_inputs() -> None:
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 6, 8)
    dense = model(x)
    wrappers = subsample_attention(model, window=1.0, generator=torch.Generator().manual_seed(0))
    assert len(wrappers) == 2 and all(isinstance(b.mixer, SubsampledAttention) for b in model.blocks)
    assert torch.equal(model.eval()(x), dense)
    model.train()(x)
    assert all(w.last_mask is not None for w in wrappers)
    assert not torch.equal(wrappers[0].last_mask, wrappers[1].last_mask)  # each layer draws its own
    with pytest.raises(ValueError, match="attention: expected a module that takes an arbitrary attn_mask"):
        subsample_attention(Tiny(mixer="galerkin"))
    with pytest.raises(ValueError, match="window: expected a number >= 1"):
        SubsampledAttention(_attention(), window=0.5)
    with pytest.raises(ValueError, match="power: expected a finite number > 0"):
        keep_probability(torch.tensor([1]), 2.0, 0.0)
