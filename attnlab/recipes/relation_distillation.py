"""MiniLMv2 multi-head self-attention relation distillation (P040).

For one layer, the queries of all attention heads are concatenated, (batch, n, width), and re-split
into A_r relation heads of width d_r = width / A_r, independent of the model's attention heads (the
teacher's and student's widths may differ; their relation matrices are all n × n):

    R^{QQ}_a = softmax(Q_a Q_aᵀ / √d_r)          (likewise R^{KK} from the keys, R^{VV} from the values)

    L = Σ_{rel ∈ {QQ, KK, VV}} w_rel · (1 / A_r n) Σ_a Σ_i KL(R^{T,rel}_{a,i} ‖ R^{S,rel}_{a,i})

between a chosen teacher layer (upper-middle for large teachers) and the student's last layer,
averaged over the batch (the official code's normalisation: by relation heads and sequence length per
example, then by batch). Padding (`attention_mask`, True/1 = real token): padded keys get no relation
weight and padded queries no loss, n counting real tokens; equal to the official code, which truncates
each example to its length (right padding). Teacher relations are detached.

`projections_of(model, layer, run)` records a layer's q, k, v projections (concatenated heads) during
`run(model)`, for attnlab and transformers models alike.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from .projections import attention_layers

MINILM_V2 = Paper(
    "P040",
    "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers",
    2021,
    "2012.15828",
)
QKV = tuple[Tensor, Tensor, Tensor]


def relation_logits(x: Tensor, relation_heads: int) -> Tensor:
    """(batch, n, width) -> (batch, A_r, n, n): X_a X_aᵀ / √d_r over the A_r relation heads of width d_r."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected (batch, n, width), got {getattr(x, 'shape', x)!r}")
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
        raise ValueError(f"relation_heads: expected an int >= 1, got {relation_heads!r}")
    b, n, width = x.shape
    if width % relation_heads:
        raise ValueError(f"relation_heads: expected a divisor of the width {width}, got {relation_heads}")
    d_r = width // relation_heads
    heads = x.reshape(b, n, relation_heads, d_r).transpose(1, 2)
    return heads @ heads.transpose(-1, -2) / math.sqrt(d_r)


def _relation_kl(teacher: Tensor, student: Tensor, keep: Tensor) -> Tensor:
    """Σ over heads, real queries, keys of KL(softmax T ‖ softmax S) / (A_r · n_b), averaged over the batch."""
    key_ok = keep[:, None, None, :]
    low = torch.finfo(student.dtype).min
    log_t = teacher.masked_fill(~key_ok, low).log_softmax(-1)
    log_s = student.masked_fill(~key_ok, low).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~key_ok, 0.0).sum(-1)  # (batch, A_r, n)
    kl = kl.masked_fill(~keep[:, None, :], 0.0)
    lengths = keep.sum(-1).clamp_min(1).to(kl.dtype)
    return (kl.sum((-1, -2)) / (teacher.shape[1] * lengths)).mean()


def relation_distillation_loss(
    teacher: QKV,
    student: QKV,
    relation_heads: int,
    *,
    attention_mask: Tensor | None = None,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> Tensor:
    """The MiniLMv2 loss (module docstring) of teacher (q, k, v) and student (q, k, v), each (batch, n, width)."""
    for name, qkv in (("teacher", teacher), ("student", student)):
        if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
            raise TypeError(f"{name}: expected a tuple (q, k, v) of (batch, n, width) tensors, got {type(qkv).__name__}")
    if len(weights) != 3 or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"weights: expected three finite weights >= 0 (QQ, KK, VV), got {weights!r}")
    b, n = student[0].shape[:2]
    for name, qkv in (("teacher", teacher), ("student", student)):
        for part in qkv:
            if part.dim() != 3 or part.shape[:2] != (b, n):
                raise ValueError(f"{name}: expected q, k, v of (batch, n) = {(b, n)}, got {tuple(part.shape)}")
    if attention_mask is None:
        keep = torch.ones(b, n, dtype=torch.bool, device=student[0].device)
    else:
        if attention_mask.shape != (b, n):
            raise ValueError(f"attention_mask: expected (batch, n) = {(b, n)}, got {tuple(attention_mask.shape)}")
        keep = attention_mask.to(device=student[0].device, dtype=torch.bool)
    total = student[0].new_zeros(())
    for w, t, s in zip(weights, teacher, student):
        if w == 0:
            continue
        rel_t = relation_logits(t.detach().to(s.dtype), relation_heads)
        total = total + w * _relation_kl(rel_t, relation_logits(s, relation_heads), keep)
    return total


def projections_of(model: nn.Module, layer: int, run: Callable[[nn.Module], Any]) -> QKV:
    """The q, k, v projections (batch, n, heads·head_dim) of attention layer `layer` (index into
    `attention_layers(model)`, negative from the end) during `run(model)`, in the graph (gradients flow)."""
    found = attention_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(found) <= layer < len(found):
        raise ValueError(f"layer: expected an index in [-{len(found)}, {len(found)}), got {layer!r}")
    target = found[layer]
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            seen[name] = output

        return hook

    hooks = [proj.register_forward_hook(keep(name)) for name, proj in (("q", target.q), ("k", target.k), ("v", target.v))]
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
    missing = [name for name in "qkv" if name not in seen]
    if missing:
        raise ValueError(f"run: expected a forward pass through layer {target.name!r}, its {missing} were not called")
    return seen["q"], seen["k"], seen["v"]


add(
    Spec(
        name="minilmv2-relations",
        kind="recipe",
        paper=MINILM_V2,
        factory=relation_distillation_loss,
        family="D",
        summary="MiniLMv2 relation distillation: KL of Q-Q, K-K, V-V relations over A_r relation heads, any head counts",
        params=(
            Param("relation_heads", int, doc="relation heads A_r (a divisor of both widths)", low=1),
            Param("weights", tuple, (1.0, 1.0, 1.0), "weights of the QQ, KK, VV terms"),
        ),
    )
)
