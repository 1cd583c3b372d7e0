"""Inherently faithful attention masks, iFAM (P047, Aniraj et al. 2025): a two-stage ViT whose second stage can
only attend to the image patches a learned binary mask keeps.

    stage 1:  s = w·LN(h_t) + b for each patch token t of ViT₁(image)        mask scores (batch, patches)
              p_t = σ(s_t),   m_t = 1[p_t > ½]                                   keep probability, binary mask
    stage 2:  logits = ViT₂(image) with key mask m: every block attends to [CLS] and the patches with m_t = 1
              (the mechanism's key-padding mask), the prediction is read from ViT₂'s [CLS]

So a patch with m_t = 0 never reaches [CLS] through any block: given the mask, stage 2's prediction is exactly
invariant to those patches' pixels, whatever they are (`FaithfulMaskViT.forward(images, patch_mask=m)`), and the
attention maps of stage 2 put exactly zero weight on them (`capture`). The mask itself is computed from the full
image by stage 1 (its receptive field is the whole image: that is where context enters, as in the paper).

Training (`train_faithful_masks`): both stages jointly, loss = CE(stage 2) + stage1_weight · CE(stage 1's own
[CLS] head) + area · (mean_t p_t − keep_target)² (per image, averaged). The binary mask is trained with a
straight-through estimator: in every block of stage 2 the mixer's input (the first LayerNorm's output) of patch t
is multiplied by g_t = m_t + (p_t − stop_grad(p_t)) — exactly m_t in the forward pass (1: unchanged bit for bit;
0: a dropped patch, which the key mask excludes anyway) and ∂g_t/∂s_t = σ'(s_t) backward: the gradient the patch's
presence would get were it a continuous scale of what the attention reads from it. A dropped patch gets no task
gradient (nothing reads it); the area term pulls the mean keep probability to its target from both sides — a
plain price on the area (area · mean p) drives every score down together under Adam (its steady gradient wins
over the noisy task gradient) until no patch is kept. Scores start at `mask_init` (all patches kept). Any
registered mechanism with key padding can mix the tokens (`ViTSettings.mixer`).

    from attnlab.analysis.faithful_masks import faithful_masks
    ifam = faithful_masks()                          # attnlab-results/faithful_masks/default-<key>.pt, or trains it
    out = ifam.model(images)                         # out.logits, out.mask (batch, 16) bool, out.keep_probability

Deviations from the paper: iFAM's stage 1 is PDiscoFormer (K part maps + background, Gumbel-softmax, part-shaping
priors) and the mask keeps the foreground parts; here stage 1 scores each patch directly with a sigmoid and a
straight-through step (the brief's "learned binary patch mask"), and stage 2 is a ViT trained from scratch with
the first stage rather than a fine-tuned DINOv2. The official code can train with soft masks added to the softmax
scores in log space (a binary boolean mask otherwise); the straight-through gate here keeps the binary mask in
training too, and needs no softmax scores, so it works with any mechanism (linear attention etc.).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.registry import Paper, Param, Spec, add
from .digits import (
    DigitViT,
    TrainedDigits,
    ViTSettings,
    accuracy,
    cached_model,
    load_digits_split,
    patchify,
    train_classifier,
    unpatchify,
    with_threads,
)

P047 = Paper("P047", "Inherently Faithful Attention Maps for Vision Transformers", 2025, "2506.08915")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class FaithfulSettings:
    """The two stages (both `vit`) and the joint recipe (steps, batch, lr, seed of `vit`)."""

    vit: ViTSettings = field(default_factory=lambda: ViTSettings(layers=2))
    area: float = 1.0
    keep_target: float = 0.75
    stage1_weight: float = 1.0
    mask_init: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.vit, ViTSettings):
            raise ParameterError(f"vit: expected ViTSettings, got {type(self.vit).__name__}")
        for name in ("area", "stage1_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < float("inf"):
                raise ParameterError(f"{name}: expected a finite float >= 0, got {value!r}")
        if not _is_number(self.keep_target) or not 0 <= self.keep_target <= 1:
            raise ParameterError(f"keep_target: expected a share in [0, 1], got {self.keep_target!r}")
        if not _is_number(self.mask_init) or abs(self.mask_init) == float("inf"):
            raise ParameterError(f"mask_init: expected a finite float, got {self.mask_init!r}")


PRESETS: dict[str, FaithfulSettings] = {
    "default": FaithfulSettings(),
    "tiny": FaithfulSettings(ViTSettings(dim=32, heads=2, layers=2, steps=600, batch=64, lr=5e-3)),
}
"""default: the demo's model (about 40 s on one core: 95 % test accuracy keeping about two thirds of the patches;
keep_target 0.5 keeps 9 % at 70 %); tiny: seconds."""


@dataclass
class FaithfulOutput:
    """logits (batch, classes) of stage 2; stage1_logits (batch, classes); mask (batch, patches) bool, the keys
    stage 2 saw; keep_probability (batch, patches) = σ(s) of stage 1 (with its gradient)."""

    logits: Tensor
    stage1_logits: Tensor
    mask: Tensor
    keep_probability: Tensor


class FaithfulMaskViT(nn.Module):
    """Two-stage iFAM over digits: stage 1 (a DigitViT + a linear mask score per patch) picks the patches, stage 2
    (a DigitViT) attends only to them. forward(images, patch_mask=None) -> FaithfulOutput."""

    def __init__(self, settings: FaithfulSettings) -> None:
        super().__init__()
        if not isinstance(settings, FaithfulSettings):
            raise TypeError(f"settings: expected FaithfulSettings, got {type(settings).__name__}")
        self.settings = settings
        self.stage1 = DigitViT(settings.vit)
        self.stage2 = DigitViT(settings.vit)
        self.mask_head = nn.Linear(settings.vit.dim, 1)
        nn.init.zeros_(self.mask_head.weight)
        nn.init.constant_(self.mask_head.bias, settings.mask_init)

    def stage1_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(stage 1's class logits (batch, classes), mask scores s (batch, patches))."""
        features = self.stage1.encode(self.stage1.tokens(images))
        return self.stage1.head(features[:, 0]), self.mask_head(features[:, 1:])[..., 0]

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> FaithfulOutput:
        """Stage 1 computes the mask; stage 2 classifies with it. Given `patch_mask` (batch, patches) bool, stage 2
        uses that mask instead (no straight-through gate): its logits depend only on the kept patches."""
        stage1_logits, scores = self.stage1_outputs(images)
        probability = torch.sigmoid(scores)
        tokens = self.stage2.tokens(images)
        if patch_mask is not None:
            logits = self.stage2.head(self.stage2.encode(tokens, patch_mask)[:, 0])
            return FaithfulOutput(logits, stage1_logits, patch_mask, probability)
        mask = scores > 0  # σ(s) > ½
        gate = mask.to(probability.dtype) + (probability - probability.detach())  # the mask forward, σ'(s) backward
        gate = torch.cat([torch.ones_like(gate[:, :1]), gate], dim=1)[..., None]  # [CLS] always in
        hooks = [block.norm1.register_forward_hook(lambda _m, _a, out: out * gate) for block in self.stage2.blocks]
        try:
            logits = self.stage2.head(self.stage2.encode(tokens, mask)[:, 0])
        finally:
            for hook in hooks:
                hook.remove()
        return FaithfulOutput(logits, stage1_logits, mask, probability)


def faithful_loss(model: FaithfulMaskViT, images: Tensor, labels: Tensor) -> Tensor:
    """CE(stage 2) + stage1_weight · CE(stage 1) + area · mean over images of (mean_t p_t − keep_target)²."""
    out = model(images)
    s = model.settings
    ce = nn.functional.cross_entropy
    area = (out.keep_probability.mean(1) - s.keep_target).pow(2).mean()
    return ce(out.logits, labels) + s.stage1_weight * ce(out.stage1_logits, labels) + s.area * area


class _Stage2Logits(nn.Module):
    """model(images).logits, for `accuracy`."""

    def __init__(self, model: FaithfulMaskViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images).logits


def train_faithful_masks(settings: FaithfulSettings | None = None, *, progress: bool = False,
                         threads: int | None = 1) -> TrainedDigits[FaithfulSettings]:
    """Train both stages jointly on the train digits with `faithful_loss` (default: the "default" preset), the
    steps, batch, learning rate and seed of `settings.vit`. extra["kept_share"]: the mean share of the patches
    stage 1 keeps on the test digits; test_accuracy: stage 2's."""
    settings = PRESETS["default"] if settings is None else settings
    if not isinstance(settings, FaithfulSettings):
        raise TypeError(f"settings: expected FaithfulSettings, got {type(settings).__name__}")
    data = load_digits_split()
    vit = settings.vit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(vit.seed)
        model = FaithfulMaskViT(settings)

    def batches(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        pick = torch.randint(0, len(data.train_labels), (vit.batch,), generator=generator)
        return data.train_images[pick], data.train_labels[pick]

    start = time.perf_counter()
    losses = with_threads(threads, lambda: train_classifier(
        model, batches, steps=vit.steps, lr=vit.lr, seed=vit.seed, loss=faithful_loss, label="faithful_masks",
        progress=progress))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        kept = float(model(data.test_images).mask.double().mean())
    acc = accuracy(_Stage2Logits(model), data.test_images, data.test_labels)
    return TrainedDigits(model, settings, acc, losses, seconds, data.sha256, extra={"kept_share": kept})


def faithful_masks(name: str | FaithfulSettings = "default", *, cache_dir: str | Path | None = None,
                   retrain: bool = False, progress: bool = True,
                   threads: int | None = 1) -> TrainedDigits[FaithfulSettings]:
    """The iFAM model of preset `name` (PRESETS) or of the given settings from the cache (default folder
    attnlab-results/faithful_masks), else trained and cached (weights + JSON record as in `digits`)."""
    return cached_model("faithful_masks", name, PRESETS, FaithfulSettings, FaithfulMaskViT, train_faithful_masks,
                        cache_dir, retrain, progress, threads)


def masked_patch_invariance(model: FaithfulMaskViT, images: Tensor, *, generator: torch.Generator | None = None
                            ) -> dict[str, Any]:
    """The faithfulness check: the mask m stage 1 computes on `images`, then stage 2's logits with m on the images
    and on copies whose dropped patches (m = 0) hold uniform random pixels. Returns the largest absolute logit
    difference (0.0 when faithful), the share of patches dropped, and the number of images."""
    with torch.no_grad():
        mask = model(images).mask
        patches = patchify(images, model.settings.vit.patch)
        noise = torch.rand(patches.shape, generator=generator, dtype=patches.dtype).to(patches.device)
        changed = unpatchify(torch.where(mask[..., None], patches, noise), model.settings.vit.patch,
                             images.shape[1], images.shape[2])
        difference = (model(images, patch_mask=mask).logits - model(changed, patch_mask=mask).logits).abs().max()
    return {"max_logit_difference": float(difference), "dropped_share": float((~mask).double().mean()),
            "images": images.shape[0]}


def faithful_masks_demo(settings: str | FaithfulSettings = "default", *, cache_dir: str | Path | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """The demo: the iFAM model of `settings` (trained and cached on a miss) on the 359 test digits: stage 2's test
    accuracy, the share of patches kept, the share of the kept patches that hold ink (a pixel > 0) against the
    share of all patches that do, and the invariance check (largest logit change, exactly 0.0 when faithful)."""
    trained = faithful_masks(settings, cache_dir=cache_dir, progress=progress)
    model: FaithfulMaskViT = trained.model  # type: ignore[assignment]
    images = load_digits_split().test_images
    with torch.no_grad():
        mask = model(images).mask
    ink = patchify(images, model.settings.vit.patch).amax(-1) > 0
    check = masked_patch_invariance(model, images, generator=torch.Generator().manual_seed(0))
    return {"settings": trained.settings, "test_accuracy": trained.test_accuracy,
            "kept_share": float(mask.double().mean()), "ink_share_of_kept": float(ink[mask].double().mean()),
            "ink_share_of_all": float(ink.double().mean()), "max_logit_difference": check["max_logit_difference"]}


add(Spec(name="faithful-masks", kind="analysis", paper=P047, factory=FaithfulMaskViT, family="E",
         summary="iFAM: stage 1 learns a binary patch mask (straight-through), stage 2 attends only to the kept "
                 "patches, so its prediction is exactly invariant to the others", params=(
             Param("settings", FaithfulSettings, doc="the two stages' ViTSettings (any mixer with key padding), "
                                                     "area weight and keep target, stage-1 weight, initial mask "
                                                     "score"),)))
add(Spec(name="faithful-mask-invariance", kind="analysis", paper=P047, factory=masked_patch_invariance, family="E",
         summary="largest change of stage 2's logits when the dropped patches' pixels are replaced (0 = faithful)",
         params=(Param("model", nn.Module, doc="a FaithfulMaskViT"), Param("images", Tensor, doc="(batch, 8, 8)"))))
