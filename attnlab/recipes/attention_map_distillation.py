"""Attention-map distillation (P146, MAE-Lite: "A Closer Look at Self-Supervised Lightweight Vision Transformers").

The student's last-layer attention maps S (batch, H_s, n, m) are pulled towards a teacher's maps T
(batch, H_t, n, m) (MAE-Lite: ViT-Tiny student, the 12th layer of a MAE-Base teacher). When the head
counts differ, a head-count adapter maps the student's H_s maps to H_t: the official code's 1×1
convolution over heads without bias, A(S)_t = Σ_s W_ts S_s (W: H_t × H_s, trained with the student).

    loss="kl"  (default):  L = mean_{b, t, i} KL(T_{b,t,i,:} ‖ A(S)_{b,t,i,:})
                              = mean Σ_j T_j (log T_j − log A(S)_j)
                           with a convex adapter, W_t = softmax(θ_t) over the student heads, so that
                           every adapted row stays a distribution (θ = 0 at the start: the mean map);
    loss="mse" (official code's criterion):  L = mean (A(S) − T)², W unconstrained, nn.Conv2d's init.

The teacher's maps are detached: gradients reach the student (and the adapter) only. Rows the
teacher gives no mass (fully masked queries) contribute 0; log A(S) is floored at the dtype's
smallest normal number, so a zero student weight where the teacher has mass gives a large finite loss.
Equal head counts use no adapter unless `adapter=True`.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add

MAE_LITE = Paper("P146", "A Closer Look at Self-Supervised Lightweight Vision Transformers", 2023, "2205.14443")
Loss = Literal["kl", "mse"]


def attention_kl(teacher: Tensor, student: Tensor) -> Tensor:
    """mean over (batch, heads, queries) of KL(teacher row ‖ student row), rows over the last dim (keys)."""
    log_student = student.clamp_min(torch.finfo(student.dtype).tiny).log()
    per_row = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(-1)
    return per_row.mean()


class AttentionMapDistillation(nn.Module):
    """The distillation loss of student maps (batch, H_s, n, m) to teacher maps (batch, H_t, n, m), with the
    head-count adapter as a submodule (train it with the student); module docstring."""

    def __init__(self, student_heads: int, teacher_heads: int, *, loss: Loss = "kl", adapter: bool | None = None) -> None:
        super().__init__()
        for name, value in (("student_heads", student_heads), ("teacher_heads", teacher_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if loss not in ("kl", "mse"):
            raise ValueError(f"loss: expected 'kl' or 'mse', got {loss!r}")
        if adapter is None:
            adapter = student_heads != teacher_heads
        if not adapter and student_heads != teacher_heads:
            raise ValueError(
                f"adapter: expected True (or None) when head counts differ, got False with {student_heads} student "
                f"and {teacher_heads} teacher heads"
            )
        self.student_heads, self.teacher_heads, self.loss = student_heads, teacher_heads, loss
        self.adapter: nn.Parameter | None = None
        if adapter:
            if loss == "kl":
                weight = torch.zeros(teacher_heads, student_heads)  # softmax(0): the mean of the student maps
            else:
                weight = nn.Conv2d(student_heads, teacher_heads, 1, bias=False).weight.detach()[:, :, 0, 0]
            self.adapter = nn.Parameter(weight)

    def mixing(self) -> Tensor | None:
        """The adapter's matrix W (H_t, H_s): softmax rows for "kl", the raw weight for "mse"; None without one."""
        if self.adapter is None:
            return None
        return self.adapter.softmax(-1) if self.loss == "kl" else self.adapter

    def adapt(self, student: Tensor) -> Tensor:
        """A(S): (batch, H_s, n, m) -> (batch, H_t, n, m)."""
        w = self.mixing()
        return student if w is None else torch.einsum("ts,bsij->btij", w.to(student.dtype), student)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        for name, t in (("student", student), ("teacher", teacher)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: expected maps (batch, heads, n_q, n_k), got {getattr(t, 'shape', t)!r}")
        if student.shape[1] != self.student_heads or teacher.shape[1] != self.teacher_heads:
            raise ValueError(
                f"student, teacher: expected {self.student_heads} and {self.teacher_heads} heads, "
                f"got {student.shape[1]} and {teacher.shape[1]}"
            )
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"teacher: expected maps of batch and positions as the student's {tuple(student.shape)}, got "
                f"{tuple(teacher.shape)}"
            )
        adapted, target = self.adapt(student), teacher.detach().to(student.dtype)
        if self.loss == "mse":
            return (adapted - target).pow(2).mean()
        return attention_kl(target, adapted)


add(
    Spec(
        name="attention-map-distillation",
        kind="recipe",
        paper=MAE_LITE,
        factory=AttentionMapDistillation,
        family="D",
        summary="distil a teacher's attention maps into the student's last layer (KL over keys or MSE), "
        "with the head-count adapter",
        params=(
            Param("student_heads", int, doc="heads of the student's maps", low=1),
            Param("teacher_heads", int, doc="heads of the teacher's maps", low=1),
            Param("loss", str, "kl", "KL over keys (convex adapter) or the official code's MSE", choices=("kl", "mse")),
            Param("adapter", bool, None, "a head-count adapter (default: when the head counts differ)", optional=True),
        ),
    )
)
