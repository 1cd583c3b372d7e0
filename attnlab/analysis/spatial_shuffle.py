"""DiSRT-style global-structure sensitivity (P055, Li et al. 2025): shuffle an image's parts, keeping each part's
local texture, and score how well a model tells the original from the distorted image.

    x̃ = shuffle(x): the part×part squares of x permuted (one random non-identity permutation per image), so the
         multiset of parts — all local texture — is unchanged and only their arrangement (global structure) moves
    score = mean over images of  1[s(x) > s(x̃) + τ] + ½ · 1[|s(x) − s(x̃)| ≤ τ]       (two-alternative choice)

with s a scalar the model gives an image (`classifier_confidence`: its largest log-probability; a model that sees
global structure is less sure of a scrambled digit) and τ = tolerance · max(1, |s(x)|, |s(x̃)|) the round-off
below which two scores count as a tie. 1 = always picks the original, ½ = chance: a model blind to the parts'
arrangement (a bag of patches, e.g. mean- or max-pooled patch features without positions) gives x and x̃ the same
score and scores exactly ½. `representation_shift` measures the same sensitivity on features without a choice:
mean ‖f(x) − f(x̃)‖ / ‖f(x)‖ (0 for a bag of patches).

    from attnlab.analysis.spatial_shuffle import disrt_score, classifier_confidence
    result = disrt_score(classifier_confidence(vit), images, part=2, generator=torch.Generator().manual_seed(0))
    result.score, result.ties       # share of trials won (ties ½), share of ties

Deviation from the paper: DiSRT's trials and its human comparison are over natural images and several distortion
kinds; its decision rule is not reproduced here (from paper knowledge): the two-alternative score above on one
distortion (part shuffling, at several part sizes) is this module's reading of "the model's ability to tell the
original from the distorted image". The paper's Top-K activation sparsity (to restore the sensitivity after
fine-tuning) is not included.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import check_tensor, is_int
from .digits import ViTSettings, check_images, digit_vit, load_digits_split, patchify, unpatchify

P055 = Paper("P055", "From Local Cues to Global Percepts: Emergent Gestalt Organization in Self-Supervised "
             "Vision Models", 2025, "2506.00718")
DEFAULT_TOLERANCE = 1e-5


@dataclass
class Shuffled:
    """images (batch, H, W) with their parts permuted; permutations (batch, parts): the part at raster position t
    of the shuffled image is part permutations[t] of the original."""

    images: Tensor
    permutations: Tensor


def shuffle_patches(images: Tensor, part: int, *, generator: torch.Generator | None = None,
                    permutations: Tensor | None = None) -> Shuffled:
    """Permute the non-overlapping part×part squares of each image (batch, H, W): `permutations` (batch, parts)
    given, or one uniform non-identity permutation per image drawn from `generator`."""
    images = check_images("images", images)
    if not is_int(part) or part < 1 or images.shape[1] % part or images.shape[2] % part:
        raise ParameterError(f"part: expected a positive int dividing the image sides "
                             f"{images.shape[1]}×{images.shape[2]}, got {part!r}")
    parts = patchify(images, part)
    b, n = parts.shape[:2]
    if permutations is None:
        if n < 2:
            raise ParameterError(f"part: expected at least two parts to shuffle, got one part of {part}×{part}")
        permutations = torch.argsort(torch.rand(b, n, generator=generator), dim=1)
        identity = torch.arange(n)
        while bool((same := (permutations == identity).all(1)).any()):  # redraw the identity permutations
            permutations[same] = torch.argsort(torch.rand(int(same.sum()), n, generator=generator), dim=1)
    else:
        check_tensor("permutations", permutations)
        if permutations.dtype != torch.int64 or tuple(permutations.shape) != (b, n):
            raise ShapeError(f"permutations: expected an int64 tensor (batch, parts) = {(b, n)}, got "
                             f"{permutations.dtype} {tuple(permutations.shape)}")
        if not bool((permutations.sort(1).values.cpu() == torch.arange(n)).all()):
            raise ValueError("permutations: expected each row to be a permutation of 0..parts − 1")
    index = permutations.to(images.device)[..., None].expand_as(parts)
    return Shuffled(unpatchify(parts.gather(1, index), part, images.shape[1], images.shape[2]), permutations)


def classifier_confidence(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """s(x) = max_c log softmax(model(x))_c, (batch,): how sure the classifier is."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")

    def confidence(images: Tensor) -> Tensor:
        return torch.log_softmax(model(images), dim=-1).amax(-1)

    return confidence


def two_alternative_score(original: Tensor, distorted: Tensor, tolerance: float = DEFAULT_TOLERANCE) -> Tensor:
    """Per trial 1 if s(original) > s(distorted) + τ, ½ if within τ, 0 otherwise; τ = tolerance · max(1, |s|)."""
    for name, t in (("original", original), ("distorted", distorted)):
        check_tensor(name, t)
        if t.dim() != 1 or not t.is_floating_point():
            raise ShapeError(f"{name}: expected a 1-D floating tensor of scores (batch,), got {t.dtype} "
                             f"{tuple(t.shape)}")
    if original.shape != distorted.shape:
        raise ShapeError(f"distorted: expected the shape of original {tuple(original.shape)}, got "
                         f"{tuple(distorted.shape)}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ParameterError(f"tolerance: expected a float in [0, 1), got {tolerance!r}")
    a, b = original.double(), distorted.double()
    tau = tolerance * torch.maximum(torch.ones_like(a), torch.maximum(a.abs(), b.abs()))
    tie = (a - b).abs() <= tau
    return torch.where(tie, 0.5, (a > b).double())


@dataclass
class DiSRTResult:
    """score: mean trial outcome (1 = the original always chosen, ½ = chance); ties: share of tied trials;
    trials (batch,): each outcome; shuffled: the distorted images."""

    score: float
    ties: float
    trials: Tensor
    shuffled: Shuffled


def disrt_score(score_fn: Callable[[Tensor], Tensor], images: Tensor, part: int, *,
                generator: torch.Generator | None = None, tolerance: float = DEFAULT_TOLERANCE) -> DiSRTResult:
    """The two-alternative score of `score_fn` (images -> (batch,) scores) on `images` against their shuffles."""
    if not callable(score_fn):
        raise TypeError(f"score_fn: expected a callable images -> (batch,) scores, got {type(score_fn).__name__}")
    shuffled = shuffle_patches(images, part, generator=generator)
    with torch.no_grad():
        trials = two_alternative_score(score_fn(images), score_fn(shuffled.images), tolerance)
    return DiSRTResult(float(trials.mean()), float((trials == 0.5).double().mean()), trials, shuffled)


def representation_shift(feature_fn: Callable[[Tensor], Tensor], images: Tensor, part: int, *,
                         generator: torch.Generator | None = None) -> float:
    """Mean over images of ‖f(x) − f(x̃)‖ / ‖f(x)‖ (features flattened per image); 0 for a bag of patches."""
    if not callable(feature_fn):
        raise TypeError(f"feature_fn: expected a callable images -> (batch, ...) features, got "
                        f"{type(feature_fn).__name__}")
    shuffled = shuffle_patches(images, part, generator=generator)
    with torch.no_grad():
        f, g = feature_fn(images).flatten(1).double(), feature_fn(shuffled.images).flatten(1).double()
    return float(((f - g).norm(dim=1) / f.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)).mean())


def structure_sensitivity(settings: str | ViTSettings = "default", *, parts: tuple[int, ...] = (2, 4),
                          cache_dir: Any = None, progress: bool = True) -> dict[str, Any]:
    """The demo: DiSRT scores on the 359 test digits, per part size, of the digit ViT of `settings` and of the
    same recipe without positions (a bag of patches: ½ by construction), each trained and cached on a miss."""
    data = load_digits_split()
    base = digit_vit(settings, cache_dir=cache_dir, progress=progress)
    bag = digit_vit(replace(base.settings, positions=False), cache_dir=cache_dir, progress=progress)
    out: dict[str, Any] = {"settings": base.settings, "test_accuracy": base.test_accuracy,
                           "bag_test_accuracy": bag.test_accuracy}
    for label, trained in (("vit", base), ("bag", bag)):
        for part in parts:
            result = disrt_score(classifier_confidence(trained.model), data.test_images, part,
                                 generator=torch.Generator().manual_seed(part))
            out[f"{label}_score_part{part}"] = result.score
            out[f"{label}_ties_part{part}"] = result.ties
    return out


add(Spec(name="disrt-score", kind="analysis", paper=P055, factory=disrt_score, family="E",
         summary="two-alternative choice original vs part-shuffled image (local texture kept): 1 = always the "
                 "original, ½ = blind to global structure", params=(
             Param("score_fn", object, doc="images -> (batch,) scores, e.g. classifier_confidence(model)"),
             Param("images", Tensor, doc="(batch, H, W)"),
             Param("part", int, doc="side of the shuffled squares", low=1),
             Param("tolerance", float, DEFAULT_TOLERANCE, "relative difference counted as a tie", low=0.0))))
add(Spec(name="patch-shuffle", kind="analysis", paper=P055, factory=shuffle_patches, family="E",
         summary="permute an image's part×part squares (non-identity), keeping the multiset of parts", params=(
             Param("images", Tensor, doc="(batch, H, W)"), Param("part", int, doc="side of the squares", low=1))))
add(Spec(name="representation-shift", kind="analysis", paper=P055, factory=representation_shift, family="E",
         summary="mean relative change of a model's features under part shuffling (0 = bag of patches)", params=(
             Param("feature_fn", object, doc="images -> (batch, ...) features"),
             Param("images", Tensor, doc="(batch, H, W)"), Param("part", int, doc="side of the squares", low=1))))
