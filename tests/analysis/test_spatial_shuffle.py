"""P055 DiSRT: the shuffle keeps the multiset of parts and moves them, a bag of patches scores exactly chance
(identical outputs: a max-pooled one, and the digit ViT without positions up to round-off), and a ViT with
positions trained here tells the original from the shuffle far above chance."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis.digits import DigitViT, ViTSettings, load_digits_split, patchify, train_digit_vit
from attnlab.analysis.spatial_shuffle import (
    classifier_confidence,
    disrt_score,
    representation_shift,
    shuffle_patches,
    two_alternative_score,
)


def _sorted_parts(images: torch.Tensor, part: int) -> torch.Tensor:
    """Each image's parts as rows sorted lexicographically: the multiset, comparable with torch.equal."""
    parts = patchify(images, part)
    out = []
    for rows in parts:
        keys = sorted(range(rows.shape[0]), key=lambda i: tuple(rows[i].tolist()))
        out.append(rows[keys])
    return torch.stack(out)


@pytest.mark.parametrize("part", [1, 2, 4])
def test_the_shuffle_keeps_the_multiset_of_parts_and_moves_them(part):
    images = load_digits_split().test_images[:40]
    shuffled = shuffle_patches(images, part, generator=torch.Generator().manual_seed(part))
    assert torch.equal(_sorted_parts(shuffled.images, part), _sorted_parts(images, part))
    n = (8 // part) ** 2
    assert not bool((shuffled.permutations == torch.arange(n)).all(1).any())  # never the identity
    assert torch.equal(patchify(shuffled.images, part), patchify(images, part)[
        torch.arange(40)[:, None], shuffled.permutations])  # part t of the shuffle is part perm[t] of the original
    assert int((shuffled.images != images).flatten(1).any(1).sum()) >= 35  # the pixels moved (blank parts aside)


class MaxPooledBag(nn.Module):
    """A bag of patches: per-patch MLP features, max-pooled (exactly order-invariant), no positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(patchify(images, 2)).amax(1))


def test_a_bag_of_patches_scores_exactly_chance():
    images = load_digits_split().test_images[:64]
    bag = MaxPooledBag()
    result = disrt_score(classifier_confidence(bag), images, 2, generator=torch.Generator().manual_seed(0),
                         tolerance=0.0)
    assert result.score == 0.5 and result.ties == 1.0
    with torch.no_grad():
        assert torch.equal(bag(result.shuffled.images), bag(images))  # identical outputs
    def per_patch(x: torch.Tensor) -> torch.Tensor:  # the features before pooling follow the parts around
        return bag.features(patchify(x, 2))

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return per_patch(x).amax(1)

    assert representation_shift(per_patch, images, 2, generator=torch.Generator().manual_seed(0)) > 0.1
    assert representation_shift(pooled, images, 2, generator=torch.Generator().manual_seed(0)) == 0.0


def test_the_vit_without_positions_is_a_bag_up_to_round_off():
    torch.manual_seed(0)
    bag = DigitViT(ViTSettings(dim=16, heads=2, layers=2, positions=False)).eval()
    with_positions = DigitViT(ViTSettings(dim=16, heads=2, layers=2)).eval()
    images = load_digits_split().test_images[:64]
    result = disrt_score(classifier_confidence(bag), images, 2, generator=torch.Generator().manual_seed(1))
    assert result.score == 0.5 and result.ties == 1.0
    seen = disrt_score(classifier_confidence(with_positions), images, 2, generator=torch.Generator().manual_seed(1))
    assert seen.ties < 0.5  # positions make the outputs differ, so the check can fail


def test_a_vit_with_positions_prefers_the_original():
    trained = train_digit_vit(ViTSettings(dim=32, heads=2, layers=3, steps=200, batch=64, lr=5e-3, seed=0))
    images = load_digits_split().test_images
    result = disrt_score(classifier_confidence(trained.model), images, 2, generator=torch.Generator().manual_seed(0))
    assert trained.test_accuracy > 0.7
    assert result.score > 0.62 and result.ties == 0.0  # 0.71 for this seed; a bag of patches: exactly 0.5


def test_the_two_alternative_rule():
    original = torch.tensor([1.0, 0.0, 2.0, -3.0])
    distorted = torch.tensor([0.0, 1.0, 2.0, -3.0 + 1e-6])
    assert two_alternative_score(original, distorted, tolerance=0.0).tolist() == [1.0, 0.0, 0.5, 0.0]
    assert two_alternative_score(original, distorted, tolerance=1e-5).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_bad_inputs_name_the_argument():
    images = load_digits_split().test_images[:3]
    with pytest.raises(ValueError, match="part: expected a positive int dividing"):
        shuffle_patches(images, 3)
    with pytest.raises(ValueError, match="part: expected at least two parts"):
        shuffle_patches(images, 8)
    with pytest.raises(ValueError, match="permutations: expected each row to be a permutation"):
        shuffle_patches(images, 4, permutations=torch.tensor([[0, 0, 1, 2]] * 3))
    with pytest.raises(ValueError, match="permutations: expected an int64 tensor"):
        shuffle_patches(images, 4, permutations=torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="distorted: expected the shape of original"):
        two_alternative_score(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="tolerance: expected a float"):
        two_alternative_score(torch.zeros(3), torch.zeros(3), tolerance=-1.0)
    with pytest.raises(TypeError, match="score_fn: expected a callable"):
        disrt_score(3, images, 2)  # type: ignore[arg-type]


def test_registered_with_the_paper():
    for name in ("disrt-score", "patch-shuffle", "representation-shift"):
        spec = attnlab.get(name, kind="analysis")
        assert spec.paper.id == "P055" and spec.paper.arxiv == "2506.00718" and spec.family == "E"
