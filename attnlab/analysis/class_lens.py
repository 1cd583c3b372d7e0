"""Class-embedding-space projection of a ViT's residual stream: the logit lens for vision (P064, Vilas et al. 2023).

Every hidden state x_l (token t, after block l; l = 0 is the embedded input) is read with the model's own final
LayerNorm and class head:

    logits_l,t = W_cls · LN_final(x_l,t) + b_cls                                   (batch, tokens, classes)
    identifiability_l,t = 1 − rank_l,t / C,   rank = #{c : logit_c > logit_y} + ½ #{c ≠ y : logit_c = logit_y}

with y the true class and C the number of classes: 1 when the true class ranks first, 1/C when last; ties are
split evenly, so a constant logit vector scores the chance level (C + 1)/(2C) on average over the classes. At the
last layer the [CLS] projection IS the model's output (`ClassLens.model_logits`). The same projection of each
sublayer's residual update (the attention mixer's output a_l and the MLP's output m_l, x_l = x_{l−1} + a_l + m_l)
attributes class-building to attention or MLP (`sublayer_attribution`: identifiability of each update, and how
often its top class is the top class of the block's output stream). The true-class logit of each image token is
an importance map (`token_importance`).

    from attnlab.analysis.digits import digit_vit, load_digits_split
    from attnlab.analysis.class_lens import class_lens, identifiability_profile
    vit = digit_vit().model
    data = load_digits_split()
    lens = class_lens(vit, data.test_images)
    profile = identifiability_profile(lens, data.test_labels)   # {"cls": (layers + 1,), "image": (layers + 1,)}

Deviations from the paper: identifiability is 1 − rank/C as in the official code (its normalised 'pos'), with ties
split rather than broken by sort order; the lens reads a model through `trace` (the residual stream and the two
updates of each block: `attnlab.analysis.digits.DigitViT.trace`), its `norm` and its `head`, so any attnlab
mechanism mixes the tokens (it reads residual streams, never attention maps). The official code also projects the
keys and values of each layer ('memories'); not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import check_tensor, is_int
from .digits import ResidualTrace, ViTSettings, digit_vit, load_digits_split

P064 = Paper("P064", "Analyzing Vision Transformers for Image Classification in Class Embedding Space", 2023,
             "2310.18969")


@dataclass
class ClassLens:
    """The class projections of a traced batch, tokens [CLS] + patches.

    logits (layers + 1, batch, n, classes): the stream before block 1 (l = 0) and after each block;
    attention_logits, mlp_logits (layers, batch, n, classes): each block's attention / MLP update projected alike;
    model_logits (batch, classes): the model's output.
    """

    logits: Tensor
    attention_logits: Tensor
    mlp_logits: Tensor
    model_logits: Tensor

    @property
    def layers(self) -> int:
        return self.attention_logits.shape[0]


def project_to_classes(hidden: Tensor, norm: nn.Module, head: nn.Module) -> Tensor:
    """W_cls · LN_final(hidden) + b_cls for hidden states (..., dim) -> (..., classes)."""
    check_tensor("hidden", hidden)
    return head(norm(hidden))


def class_lens(model: nn.Module, images: Tensor, *, patch_mask: Tensor | None = None) -> ClassLens:
    """Project the residual stream and each sublayer update of `model` on `images` onto its class embeddings.

    model: a module with `trace(images, patch_mask)` -> `ResidualTrace` and the `norm` and `head` its output uses
    (a `DigitViT`, with any registered mechanism as mixer). No gradients are kept.
    """
    for attribute in ("trace", "norm", "head"):
        if not hasattr(model, attribute):
            raise TypeError(f"model: expected a ViT with trace(), norm and head (e.g. DigitViT), got "
                            f"{type(model).__name__} without {attribute!r}")
    with torch.no_grad():
        trace = model.trace(images, patch_mask)
        if not isinstance(trace, ResidualTrace):
            raise TypeError(f"model: expected trace() to return a ResidualTrace, got {type(trace).__name__}")
        norm, head = model.norm, model.head
        return ClassLens(project_to_classes(trace.residuals, norm, head),
                         project_to_classes(trace.attention, norm, head),
                         project_to_classes(trace.mlp, norm, head), trace.logits)


def class_identifiability(logits: Tensor, labels: Tensor) -> Tensor:
    """1 − rank/C of the true class in logits (..., C); labels int64 broadcastable to logits.shape[:-1]."""
    check_tensor("logits", logits)
    check_tensor("labels", labels)
    if labels.dtype != torch.int64:
        raise TypeError(f"labels: expected an int64 tensor of class indices, got {labels.dtype}")
    classes = logits.shape[-1]
    try:
        target = labels.to(logits.device).expand(logits.shape[:-1])
    except RuntimeError:
        raise ShapeError(f"labels: expected a shape broadcastable to {tuple(logits.shape[:-1])}, got "
                         f"{tuple(labels.shape)}") from None
    if bool(((target < 0) | (target >= classes)).any()):
        raise ValueError(f"labels: expected class indices in [0, {classes}), got values in "
                         f"[{int(target.min())}, {int(target.max())}]")
    true = logits.gather(-1, target[..., None])
    above = (logits > true).sum(-1)
    tied = (logits == true).sum(-1) - 1  # the true class itself is not a tie
    return 1.0 - (above + 0.5 * tied).to(torch.float64) / classes


def _check_labels(lens: ClassLens, labels: Tensor) -> Tensor:
    check_tensor("labels", labels)
    batch = lens.model_logits.shape[0]
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ShapeError(f"labels: expected shape (batch,) = ({batch},), got {tuple(labels.shape)}")
    return labels[:, None]  # broadcast over the tokens


def identifiability_profile(lens: ClassLens, labels: Tensor) -> dict[str, Tensor]:
    """Mean identifiability per depth (layers + 1,) float64: of [CLS] ("cls") and of the image tokens ("image")."""
    ident = class_identifiability(lens.logits, _check_labels(lens, labels))  # (layers + 1, batch, n)
    return {"cls": ident[:, :, 0].mean(1), "image": ident[:, :, 1:].mean((1, 2))}


@dataclass
class SublayerAttribution:
    """Per block (layers,) float64, for [CLS] ("cls") and the image tokens ("image"): the mean identifiability of
    the attention and of the MLP update, and the share of tokens whose update's top class is the top class of the
    block's output stream."""

    attention_identifiability: dict[str, Tensor]
    mlp_identifiability: dict[str, Tensor]
    attention_match: dict[str, Tensor]
    mlp_match: dict[str, Tensor]


def _split(values: Tensor) -> dict[str, Tensor]:
    """(layers, batch, n) -> {"cls": mean over batch of token 0, "image": mean over batch and the other tokens}."""
    return {"cls": values[:, :, 0].mean(1), "image": values[:, :, 1:].mean((1, 2))}


def sublayer_attribution(lens: ClassLens, labels: Tensor) -> SublayerAttribution:
    """How much each block's attention and MLP update carry the class (identifiability) and agree with the stream
    they write to (top-1 match with the block's output), per block."""
    target = _check_labels(lens, labels)
    top = lens.logits[1:].argmax(-1)  # the block's output stream
    return SublayerAttribution(
        _split(class_identifiability(lens.attention_logits, target)),
        _split(class_identifiability(lens.mlp_logits, target)),
        _split((lens.attention_logits.argmax(-1) == top).to(torch.float64)),
        _split((lens.mlp_logits.argmax(-1) == top).to(torch.float64)),
    )


def token_importance(lens: ClassLens, labels: Tensor, layer: int = -1) -> Tensor:
    """The true-class logit of each image token at depth `layer` (0 = embeddings, −1 = last): (batch, g, g) over
    the square patch grid."""
    target = _check_labels(lens, labels)
    depth = lens.logits.shape[0]
    if not is_int(layer) or not -depth <= layer < depth:
        raise ValueError(f"layer: expected an int in [{-depth}, {depth}), got {layer!r}")
    logits = lens.logits[layer, :, 1:]
    side = int(round(logits.shape[1] ** 0.5))
    if side * side != logits.shape[1]:
        raise ShapeError(f"lens: expected a square grid of image tokens, got {logits.shape[1]}")
    values = logits.gather(-1, target.expand(logits.shape[:2])[..., None])[..., 0]
    return values.reshape(-1, side, side)


def identifiability_by_depth(settings: str | ViTSettings = "default", *, cache_dir: Any = None,
                             progress: bool = True) -> dict[str, Any]:
    """The demo: the digit ViT of `settings` (trained and cached on a miss) on the 359 test digits: its test
    accuracy, identifiability per depth of [CLS] and of the image tokens, and the attention / MLP attribution
    per block (float lists)."""
    trained = digit_vit(settings, cache_dir=cache_dir, progress=progress)
    data = load_digits_split()
    lens = class_lens(trained.model, data.test_images)
    profile = identifiability_profile(lens, data.test_labels)
    parts = sublayer_attribution(lens, data.test_labels)
    return {
        "settings": trained.settings, "test_accuracy": trained.test_accuracy,
        "cls_identifiability": profile["cls"].tolist(), "image_identifiability": profile["image"].tolist(),
        "attention_identifiability": {k: v.tolist() for k, v in parts.attention_identifiability.items()},
        "mlp_identifiability": {k: v.tolist() for k, v in parts.mlp_identifiability.items()},
        "attention_match": {k: v.tolist() for k, v in parts.attention_match.items()},
        "mlp_match": {k: v.tolist() for k, v in parts.mlp_match.items()},
    }


_LENS = Param("lens", ClassLens, doc="the projections of class_lens")
_LABELS = Param("labels", Tensor, doc="true classes (batch,) int64")
add(Spec(name="class-lens", kind="analysis", paper=P064, factory=class_lens, family="E",
         summary="project every layer's tokens and each attention / MLP update onto the class embeddings "
                 "(W_cls·LN_final(x_l)): the logit lens for ViTs", params=(
             Param("model", nn.Module, doc="a ViT with trace(), norm and head, e.g. digits.DigitViT (any mixer)"),
             Param("images", Tensor, doc="images (batch, 8, 8)"),
             Param("patch_mask", Tensor, None, "bool (batch, patches), True = the patch is a key", optional=True))))
add(Spec(name="class-identifiability", kind="analysis", paper=P064, factory=identifiability_profile, family="E",
         summary="1 − rank/C of the true class per depth, for [CLS] and the image tokens", params=(_LENS, _LABELS)))
add(Spec(name="class-lens-attribution", kind="analysis", paper=P064, factory=sublayer_attribution, family="E",
         summary="identifiability of each block's attention and MLP update and their top-1 match with the stream",
         params=(_LENS, _LABELS)))
