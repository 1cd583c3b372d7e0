"""iLLaMA (P214): the schedule's values, the soft mask against softmax(S) ⊙ M computed by hand, the
post-sequence class token seeing every patch under the causal mask, patches not seeing later ones."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlab
from attnlab.recipes.illama import (
    PostSequenceClassToken,
    SoftCausalAttention,
    set_soft_mask_rate,
    soft_causal,
    soft_causal_mask,
    soft_mask_rate,
)


class TinyViT(nn.Module):
    """Patches -> [patches, cls] -> two pre-norm blocks (softmax mixers) -> head on the class token."""

    def __init__(self, dim: int = 16, heads: int = 2, mixer: str = "softmax") -> None:
        super().__init__()
        self.cls = PostSequenceClassToken(dim)
        self.blocks = nn.ModuleList([attnlab.build("pre-norm-block", dim=dim, heads=heads, mixer=mixer) for _ in range(2)])
        self.head = nn.Linear(dim, 3)

    def features(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.cls(patches)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.head(self.cls.read(self.features(patches)))


def test_schedule_values_equal_the_formula() -> None:
    # linear: np.linspace(1, 0, T) over the first T steps, then 0 (official mask_scheduler)
    assert [soft_mask_rate(t, 5) for t in range(7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert [soft_mask_rate(t, 5, start=0.5) for t in range(5)] == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert [soft_mask_rate(t, 3, schedule="constant") for t in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert soft_mask_rate(0, 1) == 1.0 and soft_mask_rate(1, 1) == 0.0 and soft_mask_rate(0, 0) == 0.0
    with pytest.raises(ValueError, match="schedule: expected 'linear' or 'constant'"):
        soft_mask_rate(0, 5, schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step: expected an int >= 0"):
        soft_mask_rate(-1, 5)


def test_soft_mask_matrix() -> None:
    expected = torch.tensor([[1.0, 0.3, 0.3], [1.0, 1.0, 0.3], [1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(soft_causal_mask(3, 0.3, dtype=torch.float64), expected)
    with pytest.raises(ValueError, match=r"rate: expected a float in \[0, 1\]"):
        soft_causal_mask(3, 1.5)


def _module(seed: int = 0) -> attnlab.Attention:
    torch.manual_seed(seed)
    return attnlab.build("softmax", dim=8, heads=2).double()


def test_official_form_is_probabilities_times_mask() -> None:
    att = _module()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    wrapper = SoftCausalAttention(att, 0.4)
    a, _ = wrapper.weights(x)
    q, k, _ = att.project(x)
    p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # head_dim 4: scale 1/2
    mask = torch.tensor([[1.0 if j <= i else 0.4 for j in range(5)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(a, p * mask)
    # no renormalisation: row i sums to Σ_{j≤i} p_ij + 0.4 Σ_{j>i} p_ij
    upper = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    torch.testing.assert_close(a.sum(-1), 1.0 - 0.6 * (p * upper).sum(-1))


def test_bidirectional_at_rate_one_equals_the_module() -> None:
    att = _module()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    for form in ("official", "renormalised"):
        torch.testing.assert_close(SoftCausalAttention(att, 1.0, form=form)(x), att(x))


def test_renormalised_form_is_causal_attention_at_rate_zero() -> None:
    att = _module()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    causal = attnlab.build("softmax", dim=8, heads=2, causal=True).double()
    causal.load_state_dict(att.state_dict())
    torch.testing.assert_close(SoftCausalAttention(att, 0.0, form="renormalised")(x), causal(x))
    # in between: softmax(S + log M), the future keys down-weighted by 0.25 before normalising
    a, _ = SoftCausalAttention(att, 0.25, form="renormalised").weights(x)
    q, k, _ = att.project(x)
    e = torch.exp(q @ k.transpose(-1, -2) / 2.0) * soft_causal_mask(5, 0.25, dtype=torch.float64)
    torch.testing.assert_close(a, e / e.sum(-1, keepdim=True))


def test_class_token_sees_every_patch_and_patches_not_later_ones() -> None:
    torch.manual_seed(1)
    model = TinyViT().double()
    wrappers = soft_causal(model, 1.0, form="renormalised")
    assert len(wrappers) == 2 and all(isinstance(b.mixer, SoftCausalAttention) for b in model.blocks)
    set_soft_mask_rate(wrappers, soft_mask_rate(10, 10))  # the end of the schedule: causal
    patches = torch.randn(1, 6, 16, dtype=torch.float64)
    base = model.features(patches)
    for j in range(6):
        moved = patches.clone()
        moved[0, j] += torch.randn(16, dtype=torch.float64)  # not a constant shift, which LayerNorm removes
        out = model.features(moved)
        torch.testing.assert_close(out[0, :j], base[0, :j], rtol=0, atol=0)  # rows before patch j: untouched
        assert (out[0, -1] - base[0, -1]).abs().max() > 1e-6  # the class token (last row) sees patch j
    # its attention row covers every patch, a patch row none after it
    a, _ = wrappers[0].weights(model.cls(patches))
    assert (a[0, :, -1] > 0).all()
    assert (a[0].triu(1) == 0).all()


def test_official_form_at_rate_zero_zeroes_the_future_but_keeps_it_in_the_denominator() -> None:
    att = _module()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    a, _ = SoftCausalAttention(att, 0.0).weights(x)
    assert (a.triu(1) == 0).all()
    torch.testing.assert_close(a[..., -1, :].sum(-1), torch.ones(1, 2, dtype=torch.float64))  # the last row: all keys
    assert (a[..., :-1, :].sum(-1) < 1 - 1e-6).all()  # the others lose the future keys' mass


def test_padding_and_fully_masked_rows() -> None:
    att = _module()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.tensor([[True, True, True, False, False], [False] * 5])
    for form in ("official", "renormalised"):
        wrapper = SoftCausalAttention(att, 0.5, form=form)
        a, _ = wrapper.weights(x, attention_mask=keep)
        assert (a[0, ..., 3:] == 0).all() and (a[1] == 0).all()
        out = wrapper(x, attention_mask=keep)
        assert not out.isnan().any()
        torch.testing.assert_close(out[1], att.out_proj.bias.expand(5, 8))  # zero attention: only the bias


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="attention: expected a non-causal module"):
        SoftCausalAttention(attnlab.build("softmax", dim=8, heads=2, causal=True))
    with pytest.raises(TypeError, match="attention: expected an attnlab SoftmaxAttention module"):
        SoftCausalAttention(nn.Linear(8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="form: expected 'official' or 'renormalised'"):
        SoftCausalAttention(_module(), form="hard")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model: expected attnlab SoftmaxAttention layers, got"):
        soft_causal(TinyViT(mixer="galerkin"))
    with pytest.raises(ValueError, match="tokens: expected"):
        PostSequenceClassToken(16)(torch.randn(2, 5, 8))
