"""P179 feature-geometry metrics, each on a constructed case with a known answer: perfect parallelograms score 1 and
LDA recovers crystals hidden by a distractor direction; planted co-occurrence modules that are also spatial
clusters give an AMI of 1 (unrelated ones ≈ 0); a point cloud with a known power-law spectrum gives its slope."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from attnlab.analysis.feature_geometry import (
    adjusted_mutual_information,
    cooccurrence_affinity,
    crystal_quality,
    eigenvalue_power_law,
    lda_directions,
    power_law_slopes,
    silhouette,
    spatial_modularity,
)
from attnlab.core.registry import get

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _crystal(seed: int, relations: int = 4, pairs: int = 12, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Words a_i and b_i = a_i + δ_r for each relation r: the differences b − a are exactly δ_r (parallelograms)."""
    g = _gen(seed)
    deltas = torch.randn(relations, d, generator=g, dtype=F64)
    labels = torch.arange(relations).repeat_interleave(pairs)
    words = torch.randn(relations * pairs, d, generator=g, dtype=F64) * 3
    return (words + deltas[labels]) - words, labels, deltas


def test_perfect_parallelograms_score_one():
    differences, labels, _ = _crystal(0)
    assert crystal_quality(differences, labels, project=False).item() == pytest.approx(1.0, abs=1e-9)
    assert crystal_quality(differences, labels).item() == pytest.approx(1.0, abs=1e-9)
    assert get("crystal-quality", "analysis").build(differences=differences, labels=labels).item() == pytest.approx(1.0, abs=1e-9)


def test_lda_projects_out_a_distractor_that_hides_the_crystals():
    differences, labels, _ = _crystal(1)
    g = _gen(2)
    u = torch.randn(16, generator=g, dtype=F64)
    u /= u.norm()  # a distractor direction (word length): large, unrelated to the relation
    noisy = differences + 10 * torch.randn(len(labels), 1, generator=g, dtype=F64) * u \
        + 0.02 * torch.randn(len(labels), 16, generator=g, dtype=F64)
    assert crystal_quality(noisy, labels, project=False).item() < 0.4
    assert crystal_quality(noisy, labels).item() > 0.95
    v = lda_directions(noisy, labels)
    assert v.shape == (16, 3)  # classes − 1
    assert (u @ v / v.norm(dim=0)).abs().max().item() < 0.05  # the kept directions are (nearly) blind to u


def test_lda_direction_of_two_classes_and_silhouette_by_hand():
    g = _gen(3)
    spread = torch.randn(40, 1, generator=g, dtype=F64) * 5  # large within-class spread along e2, none along e1
    x = torch.cat([torch.zeros(40, 1, dtype=F64), spread], 1)
    labels = torch.arange(2).repeat_interleave(20)
    x[labels == 1, 0] += 1.0  # the classes differ along e1 only
    v = lda_directions(x, labels)[:, 0]
    assert abs(v[0].item()) / v.norm().item() == pytest.approx(1.0, abs=1e-6)
    points = torch.tensor([[0.0], [1.0], [4.0], [5.0]], dtype=F64)
    pair = torch.tensor([0, 0, 1, 1])
    # point 0: a = 1, b = mean(4, 5) = 4.5; point 1: a = 1, b = mean(3, 4) = 3.5; the others mirror them
    assert silhouette(points, pair).item() == pytest.approx((3.5 / 4.5 + 2.5 / 3.5) / 2, abs=1e-12)
    cloud, groups = torch.randn(30, 3, generator=g, dtype=F64), torch.randint(0, 4, (30,), generator=g)
    groups[0] = 3  # keep four clusters, one maybe a singleton (s = 0 there, as sklearn)
    assert silhouette(cloud, groups).item() == pytest.approx(silhouette_score(cloud.numpy(), groups.numpy()), abs=1e-12)


def _planted_features(seed: int, modules: int = 4, per: int = 10, d: int = 12, contexts: int = 400):
    """Features in `modules` groups: decoder directions near the group's centre, and in each context window the
    features of one group fire (each with probability 1/2)."""
    g = _gen(seed)
    group = torch.arange(modules).repeat_interleave(per)
    centres = torch.randn(modules, d, generator=g, dtype=F64)
    decoder = centres[group] + 0.1 * torch.randn(modules * per, d, generator=g, dtype=F64)
    active = torch.randint(0, modules, (contexts,), generator=g)
    occurrences = (group[None, :] == active[:, None]) & (torch.rand(contexts, modules * per, generator=g) < 0.5)
    return decoder, occurrences, group


def test_spatial_modularity_of_planted_clusters():
    decoder, occurrences, group = _planted_features(4)
    found = spatial_modularity(decoder, occurrences, n_clusters=4)
    assert found.ami == pytest.approx(1.0, abs=1e-12)  # the same partition from both sides
    assert adjusted_mutual_information(found.functional, group) == pytest.approx(1.0, abs=1e-12)
    shuffled = occurrences[:, torch.randperm(group.numel(), generator=_gen(5))]  # modules unrelated to the geometry
    assert abs(spatial_modularity(decoder, shuffled, n_clusters=4).ami) < 0.15


def test_phi_coefficient_by_hand():
    occ = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # features 0 and 1 over 5 windows: n11 = 2, n10 = 1, n01 = 1, n00 = 1; n1· = 3, n0· = 2, n·1 = 3, n·0 = 2
    phi = (2 * 1 - 1 * 1) / math.sqrt(3 * 2 * 3 * 2)
    affinity = cooccurrence_affinity(occ)
    assert affinity[0, 1].item() == pytest.approx(1 + phi, abs=1e-12) and affinity[1, 0].item() == pytest.approx(1 + phi)
    assert affinity[0, 0].item() == pytest.approx(2.0) and 0 <= affinity.min().item() and affinity.max().item() <= 2
    assert cooccurrence_affinity(torch.cat([occ, torch.ones(5, 1, dtype=torch.bool)], 1))[0, 3].item() == 1.0  # always on


def _power_law_cloud(alpha: float, seed: int, n: int = 400, d: int = 200) -> torch.Tensor:
    """Points whose sample covariance has eigenvalues exactly r^−alpha (r = 1..d), in a random basis."""
    g = _gen(seed)
    z = torch.randn(n, d, generator=g, dtype=F64)
    u = torch.linalg.qr(z - z.mean(0))[0]  # centred, orthonormal columns
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    values = torch.arange(1, d + 1, dtype=F64) ** -alpha
    return math.sqrt(n - 1) * (u * values.sqrt()) @ q.T + 3.0


def test_a_known_power_law_slope_is_recovered_per_layer():
    fit = eigenvalue_power_law(_power_law_cloud(1.5, 6))
    assert fit.slope == pytest.approx(-1.5, abs=1e-9) and fit.intercept == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(fit.eigenvalues[:5].numpy(), np.arange(1, 6) ** -1.5, rtol=1e-9)
    clouds = [_power_law_cloud(a, 7 + i) for i, a in enumerate((0.5, 1.0, 2.0))]
    assert power_law_slopes(clouds).tolist() == pytest.approx([-0.5, -1.0, -2.0], abs=1e-8)
    assert eigenvalue_power_law(_power_law_cloud(1.0, 8), start=0, stop=20).slope == pytest.approx(-1.0, abs=1e-9)
    iso = torch.randn(20000, 50, generator=_gen(9), dtype=F64)  # isotropic Gaussian: a flat spectrum
    assert abs(eigenvalue_power_law(iso, start=0, stop=40).slope) < 0.1


def test_bad_inputs_name_the_argument():
    differences, labels, _ = _crystal(0)
    with pytest.raises(ValueError, match=r"^labels: expected one integer label per sample \(48,\)"):
        crystal_quality(differences, labels[:-1])
    with pytest.raises(TypeError, match=r"^labels: expected integer labels"):
        silhouette(differences, labels.double())
    with pytest.raises(ValueError, match=r"^components: expected an int in \[1, 3\]"):
        lda_directions(differences, labels, 5)
    with pytest.raises(ValueError, match=r"^labels: expected at least 2 classes, got 1"):
        lda_directions(differences, torch.zeros(48, dtype=torch.int64))
    decoder, occurrences, _ = _planted_features(4)
    with pytest.raises(ValueError, match=r"^occurrences: expected \(contexts, 40\)"):
        spatial_modularity(decoder, occurrences[:, :30], n_clusters=4)
    with pytest.raises(ValueError, match=r"^n_clusters: expected an int in \[2, 40\]"):
        spatial_modularity(decoder, occurrences, n_clusters=1)
    with pytest.raises(ValueError, match=r"^stop: expected at least 2 ranks after start=10, got stop=11"):
        eigenvalue_power_law(decoder, start=10, stop=11)
    with pytest.raises(ValueError, match=r"^points: expected at least 2 positive eigenvalues in ranks \[10, 150\)"):
        eigenvalue_power_law(decoder[:, :11])  # 11 dimensions: one eigenvalue from rank 10 on
    with pytest.raises(TypeError, match=r"^layers: expected a non-empty list of point clouds"):
        power_law_slopes(decoder)
