"""Local, hybrid and global attention heads from the NMI of their maps (P137, UNIP).

The map A of a head (N real queries, rows softmax) is read as the joint law p(q, k) = A_qk / N, with
p(q) = 1/N; its normalised mutual information is

    NMI(A) = I(Q; K) / √(H(Q)·H(K))        (`heads.query_key_nmi`, P058's definition, reused as is)

0 when every query attends alike (the map does not depend on the query), 1 for a permutation map
(each query its own key). UNIP reads three patterns off it: local (attends to nearby tokens, high
NMI), global (every query attends to the same few tokens, NMI near 0) and hybrid, in between (nearby
and foreground tokens at once), and NMI-HAD distils the teacher layer whose mean NMI is closest to
s = 0.09 (the paper's choice; its ablation is stable for s in 0.06–0.12).

    class = global  if NMI < global_below   (default 0.06)
            local   if NMI > local_above    (default 0.12)
            hybrid  otherwise

Deviation: the paper draws the classes from the maps and NMI curves of ViTs on images; the
boundaries here are an approximation, the band of s over which NMI-HAD was stable around its target,
and are parameters. NMI depends on the number of tokens (a map mixing a fixed share of local and
uniform attention has a lower NMI over more tokens), so classes of short texts and of 197-patch images
are not on one scale. A layer's NMI is the mean over its heads (and the sequences of the batch).

    from attnlab.analysis.head_classes import head_classes, hybrid_layer
    with capture(model) as att:
        model(**batch)
    hc = head_classes(att)        # hc.nmi, hc.codes (layers, batch, heads); hc.labels()
    hybrid_layer(att)             # the layer NMI-HAD would distil (recipe nmi-hybrid-distillation)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add
from .capture import Attentions
from .heads import query_key_nmi

P137 = Paper("P137", "UNIP: Rethinking Pre-trained Attention Patterns for Infrared Semantic Segmentation", 2025,
             "2502.02257")

CLASSES: tuple[str, ...] = ("global", "hybrid", "local")  # code 0, 1, 2: by increasing NMI
GLOBAL_BELOW = 0.06
LOCAL_ABOVE = 0.12
HYBRID_TARGET = 0.09  # NMI-HAD's s

Maps = Attentions | Sequence[Tensor] | Tensor


def _check_bounds(global_below: float, local_above: float) -> None:
    for name, value in (("global_below", global_below), ("local_above", local_above)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name}: expected an NMI in [0, 1], got {value!r}")
    if global_below > local_above:
        raise ValueError(f"local_above: expected a bound >= global_below={global_below!r}, got {local_above!r}")


def classify_nmi(nmi: Tensor, *, global_below: float = GLOBAL_BELOW, local_above: float = LOCAL_ABOVE) -> Tensor:
    """int64 codes of `CLASSES` for NMI values of any shape: 0 global (< global_below), 2 local (> local_above),
    1 hybrid in between."""
    if not isinstance(nmi, Tensor) or not nmi.is_floating_point():
        raise TypeError(f"nmi: expected a floating tensor of NMI values, got {getattr(nmi, 'dtype', type(nmi).__name__)}")
    _check_bounds(global_below, local_above)
    return torch.where(nmi < global_below, 0, torch.where(nmi > local_above, 2, 1)).to(torch.int64)


@dataclass(frozen=True)
class HeadClasses:
    """NMI and class of every head on every sequence, and the layers' mean NMI."""

    nmi: Tensor  # (layers, batch, heads) float64
    codes: Tensor  # (layers, batch, heads) int64, indices into CLASSES
    global_below: float
    local_above: float

    @property
    def layer_nmi(self) -> Tensor:
        """(layers,): the mean NMI of each layer over its heads and the sequences."""
        return self.nmi.mean((1, 2))

    def labels(self) -> list[list[list[str]]]:
        """The class names, nested (layers, batch, heads)."""
        return [[[CLASSES[c] for c in row] for row in layer] for layer in self.codes.tolist()]

    def counts(self) -> Tensor:
        """(layers, 3): heads of each class (global, hybrid, local) per layer, summed over the sequences."""
        return torch.stack([(self.codes == c).sum((1, 2)) for c in range(len(CLASSES))], -1)


def _nmi(attentions: Maps, attention_mask: Tensor | None) -> Tensor:
    """(layers, batch, heads) NMI; one 4-D map counts as one layer."""
    nmi = query_key_nmi(attentions, attention_mask=attention_mask)
    return nmi[None] if isinstance(attentions, Tensor) and attentions.dim() == 4 else nmi


def head_classes(attentions: Maps, *, attention_mask: Tensor | None = None, global_below: float = GLOBAL_BELOW,
                 local_above: float = LOCAL_ABOVE) -> HeadClasses:
    """P137: NMI of every head's map on every sequence and its class (local / hybrid / global)."""
    _check_bounds(global_below, local_above)
    nmi = _nmi(attentions, attention_mask)
    return HeadClasses(nmi, classify_nmi(nmi, global_below=global_below, local_above=local_above),
                       float(global_below), float(local_above))


def hybrid_layer(attentions: Maps | HeadClasses, *, target: float = HYBRID_TARGET,
                 attention_mask: Tensor | None = None) -> int:
    """NMI-HAD's teacher layer: argmin_l |NMI_l − target|, NMI_l the layer's mean NMI (ties: the lower layer)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise ValueError(f"target: expected an NMI in [0, 1], got {target!r}")
    layer_nmi = attentions.layer_nmi if isinstance(attentions, HeadClasses) else _nmi(attentions, attention_mask).mean((1, 2))
    return int((layer_nmi - target).abs().argmin())


_ATT = Param("attentions", (Attentions, list, tuple, Tensor), doc="a capture, or maps (batch, heads, n_q, n_k)")
_MASK = Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True)
add(Spec(name="head-classes", kind="analysis", paper=P137, factory=head_classes, family="E",
         summary="local / hybrid / global head patterns from the query-key NMI of each head's map", params=(
             _ATT, _MASK,
             Param("global_below", float, GLOBAL_BELOW, "NMI under which a head is global", low=0.0, high=1.0),
             Param("local_above", float, LOCAL_ABOVE, "NMI over which a head is local", low=0.0, high=1.0))))
