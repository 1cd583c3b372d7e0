"""NMI-guided hybrid-attention distillation (P137, UNIP's NMI-HAD).

The teacher layer to distil is the one whose attention is hybrid: its mean NMI over heads (and the
inputs given) closest to s (`analysis.head_classes.hybrid_layer`; the paper's s = 0.09, e.g. layer
18 of MAE-L). The student's last layer is pulled towards that layer's maps with the attention-map
distillation loss of `attention_map_distillation` (KL over the keys per query, mean over batch,
heads and queries). The official code takes the KL between the softmax of the teacher's and the
student's q·kᵀ logits — the same rows — and gives the student's last layer the teacher's head count;
with other head counts the adapter of `AttentionMapDistillation` maps the student's heads.

    target = nmi_hybrid_distillation(teacher_capture, student_heads=6)   # teacher: capture on a batch
    target.layer, target.classes                                          # the chosen layer; every layer's class
    loss = target.loss(student_last_maps, teacher_capture.layers[target.layer])
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..analysis.capture import Attentions, as_layers
from ..analysis.head_classes import CLASSES, HYBRID_TARGET, P137, classify_nmi, head_classes, hybrid_layer
from ..core.registry import Param, Spec, add
from .attention_map_distillation import AttentionMapDistillation, Loss


@dataclass(frozen=True)
class HybridTarget:
    """The teacher layer NMI-HAD distils, every teacher layer's mean NMI and class, and the loss to train with."""

    layer: int
    layer_nmi: Tensor  # (layers,)
    classes: list[str]  # class of each layer's mean NMI
    loss: AttentionMapDistillation


def nmi_hybrid_distillation(teacher: Attentions | Sequence[Tensor], student_heads: int, *, target: float = HYBRID_TARGET,
                            loss: Loss = "kl", adapter: bool | None = None,
                            attention_mask: Tensor | None = None) -> HybridTarget:
    """NMI-HAD: the teacher layer whose mean NMI is closest to `target`, and the distillation loss of the student's
    last-layer maps (student_heads heads) to that layer's maps."""
    classes = head_classes(teacher, attention_mask=attention_mask)
    layer = hybrid_layer(classes, target=target)
    teacher_heads = as_layers(teacher)[layer].shape[1]
    codes = classify_nmi(classes.layer_nmi, global_below=classes.global_below, local_above=classes.local_above).tolist()
    return HybridTarget(layer, classes.layer_nmi, [CLASSES[c] for c in codes],
                        AttentionMapDistillation(student_heads, teacher_heads, loss=loss, adapter=adapter))


add(
    Spec(
        name="nmi-hybrid-distillation",
        kind="recipe",
        paper=P137,
        factory=nmi_hybrid_distillation,
        family="D",
        summary="NMI-HAD: distil the teacher layer whose mean NMI is closest to s = 0.09 (hybrid attention) into the "
        "student's last layer",
        params=(
            Param("teacher", (Attentions, list, tuple), doc="a capture of the teacher, or its maps per layer"),
            Param("student_heads", int, doc="heads of the student's last layer", low=1),
            Param("target", float, HYBRID_TARGET, "the NMI s of the layer to distil", low=0.0, high=1.0),
            Param("loss", str, "kl", "KL over keys or MSE (attention-map-distillation)", choices=("kl", "mse")),
            Param("adapter", bool, None, "a head-count adapter (default: when the head counts differ)", optional=True),
            Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True),
        ),
    )
)
