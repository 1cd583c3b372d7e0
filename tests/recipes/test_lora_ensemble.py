"""LoRA-Ensemble (P121): B = 0 members equal the backbone, a step moves only adapters and heads, the
ensemble equals the mean over explicit merged members, the trainable count is exact, metrics by hand."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_classifier import Tiny  # tests/recipes/tiny_classifier.py
from torch import nn

from attnlab.recipes.lora_ensemble import (
    LoRAEnsemble,
    ensemble_probabilities,
    evaluate,
    expected_calibration_error,
)


def _data(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)


def _ensemble(projections: tuple[str, ...] = ("q", "v"), members: int = 3) -> tuple[nn.Module, LoRAEnsemble]:
    torch.manual_seed(0)
    backbone = Tiny().double()
    ens = LoRAEnsemble(copy.deepcopy(backbone), members, 2, projections=projections, head="head",
                       generator=torch.Generator().manual_seed(1))
    return backbone, ens


def _step(ens: LoRAEnsemble) -> None:
    x, y = _data()
    opt = torch.optim.Adam([p for p in ens.parameters() if p.requires_grad], lr=1e-2)
    logits = ens(x)  # (members, batch, classes): each member trained on the batch
    loss = nn.functional.cross_entropy(logits.reshape(-1, 3), y.repeat(ens.members))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_members_start_as_the_backbone() -> None:
    backbone, ens = _ensemble()
    x, _ = _data()
    logits = ens(x)
    assert logits.shape == (3, 4, 3)
    for m in range(3):
        torch.testing.assert_close(logits[m], backbone(x), rtol=1e-12, atol=1e-12)
    assert all(not torch.equal(ens.adapters[0].lora_A[0], ens.adapters[0].lora_A[m]) for m in (1, 2))


def test_a_step_moves_only_adapters_and_heads() -> None:
    backbone, ens = _ensemble()
    before = {n: p.detach().clone() for n, p in ens.named_parameters()}
    _step(ens)
    # at B = 0 the gradient of A is B_mᵀ(...) = 0: the first step moves B only
    assert all(torch.equal(a.lora_A, before[f"model.{n}.lora_A"]) for n, a in ens.model.named_modules()
               if hasattr(a, "lora_A"))
    _step(ens)
    trainable = {n for n, p in ens.named_parameters() if p.requires_grad}
    adapters = {f"model.blocks.{i}.mixer.{p}_proj.lora_{w}" for i in range(2) for p in ("q", "v") for w in "AB"}
    assert trainable == adapters | {"model.head.weight", "model.head.bias"}
    for name, p in ens.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # the backbone: bit-identical
    # the shared backbone is the original one, stored once
    for name, p in backbone.named_parameters():
        if not name.startswith("head"):
            stored = ens.model.get_parameter(name.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base."))
            assert torch.equal(stored, p), name
    # after the step the members differ
    x, _ = _data(7)
    logits = ens(x)
    assert (logits[0] - logits[1]).abs().max() > 1e-6


def test_ensemble_is_the_mean_of_explicit_members() -> None:
    _, ens = _ensemble(("q", "k", "v", "o"))
    _step(ens)
    x, _ = _data(9)
    explicit = torch.stack([ens.explicit_member(m)(x).softmax(-1) for m in range(3)]).mean(0)
    torch.testing.assert_close(ens.predict(x), explicit, rtol=1e-10, atol=1e-12)
    plain = ens.explicit_member(1)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    # by hand for one projection: W + B_1 A_1
    a = ens.adapters[0]
    torch.testing.assert_close(plain.blocks[0].mixer.q_proj.weight, a.base.weight + a.lora_B[1] @ a.lora_A[1])


def test_trainable_parameter_count() -> None:
    _, ens = _ensemble(("q", "v"), members=3)
    # 3 members × 2 layers × 2 projections × r (in + out) = 3·2·2·2·32, plus 3 heads of 16·3 + 3
    expected = 3 * 2 * 2 * 2 * (16 + 16) + 3 * (16 * 3 + 3)
    assert ens.trainable_count == expected == sum(p.numel() for p in ens.parameters() if p.requires_grad)


def test_ensemble_probabilities_by_hand() -> None:
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, torch.log(torch.tensor(3.0))]]], dtype=torch.float64)
    torch.testing.assert_close(ensemble_probabilities(logits), torch.tensor([[0.375, 0.625]], dtype=torch.float64))


def test_metrics_by_hand() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.15, 0.85], [0.55, 0.45], [0.42, 0.58]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    # confidences 0.95 (right), 0.85 (wrong), 0.55 (right), 0.58 (right); 10 bins:
    # (0.9, 1]: |1 − 0.95|·1/4; (0.8, 0.9]: |0 − 0.85|·1/4; (0.5, 0.6]: |1 − 0.565|·2/4
    ece = 0.05 / 4 + 0.85 / 4 + 0.435 / 2
    assert expected_calibration_error(probs, labels) == pytest.approx(ece, abs=1e-12)
    # two bins: (0.5, 1] holds all four: |3/4 − 0.7325|
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(abs(0.75 - 0.7325), abs=1e-12)
    result = evaluate(probs, labels)
    assert result.accuracy == 0.75
    assert result.nll == pytest.approx(-(torch.log(torch.tensor([0.95, 0.15, 0.55, 0.58], dtype=torch.float64)).mean()).item())
    assert result.ece == pytest.approx(ece, abs=1e-12)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="projections: expected distinct names"):
        LoRAEnsemble(Tiny(), 2, 2, projections=("q", "x"))
    with pytest.raises(ValueError, match="head: expected the name of an nn.Linear"):
        LoRAEnsemble(Tiny(), 2, 2, head="blocks")
    with pytest.raises(ValueError, match="rank: expected <= 16"):
        LoRAEnsemble(Tiny(), 2, 17)
    with pytest.raises(ValueError, match="members: expected an int >= 1"):
        LoRAEnsemble(Tiny(), 0, 2)
    ens = LoRAEnsemble(Tiny(), 2, 2)
    with pytest.raises(ValueError, match="x: expected a batch of members × samples"):
        ens.adapters[0](torch.randn(3, 16))
    with pytest.raises(ValueError, match="labels: expected int64 class indices"):
        evaluate(torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]))
