"""Attention-map distillation (P146): zero for identical maps, hand-computed KL and MSE on tiny cases, the
head-count adapter, gradients reaching the student only, a student learning a teacher's maps."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.recipes.attention_map_distillation import AttentionMapDistillation


def _maps(b: int, h: int, n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, m, generator=g, dtype=torch.float64).softmax(-1)


def test_zero_for_identical_maps() -> None:
    t = _maps(2, 3, 4, 5, 0)
    assert AttentionMapDistillation(3, 3)(t.clone(), t).item() == pytest.approx(0.0, abs=1e-15)
    assert AttentionMapDistillation(3, 3, loss="mse")(t.clone(), t).item() == 0.0


def test_kl_by_hand() -> None:
    teacher = torch.tensor([[[[0.25, 0.75], [1.0, 0.0]]]], dtype=torch.float64)  # (1, 1, 2 queries, 2 keys)
    student = torch.tensor([[[[0.5, 0.5], [0.8, 0.2]]]], dtype=torch.float64)
    row0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    row1 = 1.0 * math.log(1.0 / 0.8)  # 0·log 0 = 0
    assert AttentionMapDistillation(1, 1)(student, teacher).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    # a fully masked teacher row (all zero) adds nothing, and no NaN
    masked = teacher.clone()
    masked[..., 1, :] = 0
    assert AttentionMapDistillation(1, 1)(student, masked).item() == pytest.approx(row0 / 2, rel=1e-12)


def test_convex_adapter_by_hand() -> None:
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)  # 2 student heads, one query
    teacher = torch.tensor([[[[0.5, 0.5]]]], dtype=torch.float64)  # 1 teacher head
    loss = AttentionMapDistillation(2, 1).double()
    assert loss.mixing().tolist() == [[0.5, 0.5]]  # starts at the mean map: here exactly the teacher
    assert loss(student, teacher).item() == pytest.approx(0.0, abs=1e-15)
    with torch.no_grad():
        loss.adapter.copy_(torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))  # weights 1/4, 3/4
    adapted = loss.adapt(student)
    torch.testing.assert_close(adapted, torch.tensor([[[[0.25, 0.75]]]], dtype=torch.float64))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_mse_adapter_is_a_head_mixing() -> None:
    student, teacher = _maps(2, 3, 4, 4, 1), _maps(2, 2, 4, 4, 2)
    loss = AttentionMapDistillation(3, 2, loss="mse").double()
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        loss.adapter.copy_(w)
    mixed = torch.stack([sum(w[t, s] * student[:, s] for s in range(3)) for t in range(2)], 1)
    assert loss(student, teacher).item() == pytest.approx(((mixed - teacher) ** 2).mean().item(), rel=1e-12)


def test_gradient_reaches_the_student_only() -> None:
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    teacher = _maps(2, 2, 3, 3, 3).requires_grad_(True)
    loss = AttentionMapDistillation(4, 2).double()
    loss(logits.softmax(-1), teacher).backward()
    assert teacher.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert loss.adapter.grad is not None and loss.adapter.grad.abs().sum() > 0


def test_student_learns_the_teacher_maps() -> None:
    torch.manual_seed(0)
    teacher_layer = attnlab.build("softmax", dim=16, heads=4)
    student_layer = attnlab.build("softmax", dim=16, heads=2)
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        target = teacher_layer.materialize(x)
    loss = AttentionMapDistillation(2, 4)
    opt = torch.optim.Adam(list(student_layer.parameters()) + list(loss.parameters()), lr=3e-2)
    first = loss(student_layer.materialize(x), target).item()
    for _ in range(60):
        opt.zero_grad()
        value = loss(student_layer.materialize(x), target)
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="adapter: expected True"):
        AttentionMapDistillation(2, 3, adapter=False)
    with pytest.raises(ValueError, match="loss: expected 'kl' or 'mse'"):
        AttentionMapDistillation(2, 2, loss="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected 2 and 3 heads, got 3 and 3"):
        AttentionMapDistillation(2, 3)(_maps(1, 3, 2, 2, 0), _maps(1, 3, 2, 2, 0))
    with pytest.raises(ValueError, match="teacher: expected maps of batch and positions"):
        AttentionMapDistillation(1, 1)(_maps(1, 1, 2, 2, 0), _maps(1, 1, 2, 3, 0))
