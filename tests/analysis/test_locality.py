"""Locality analysis (P012): attention mass per distance, by hand and on banded mechanisms' materialize."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.analysis.locality import attention_mass_by_distance
from attnlab.core.errors import ShapeError
from attnlab.core.registry import get


def test_sequence_case_by_hand() -> None:
    a = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.4, 0.6]], dtype=torch.float64)
    distances, mass = attention_mass_by_distance(a)
    torch.testing.assert_close(distances, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(mass, torch.tensor([[0.5, 0.5, 0.0], [0.3, 0.7, 0.0], [0.6, 0.4, 0.0]], dtype=torch.float64))


def test_grid_case_by_hand() -> None:
    """2×2 grid, query 0 at (0, 0): keys (0, 1) and (1, 0) at distance 1, (1, 1) at √2 (Euclidean) or 1 (Chebyshev)."""
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).expand(4, 4)
    distances, mass = attention_mass_by_distance(a, (2, 2))
    torch.testing.assert_close(distances, torch.tensor([0.0, 1.0, math.sqrt(2)], dtype=torch.float64))
    torch.testing.assert_close(mass[0], torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64))
    torch.testing.assert_close(mass[3], torch.tensor([0.4, 0.5, 0.1], dtype=torch.float64))
    distances, mass = attention_mass_by_distance(a, (2, 2), metric="chebyshev")
    torch.testing.assert_close(mass[0], torch.tensor([0.1, 0.9], dtype=torch.float64))


def test_sliding_window_mass_is_zero_beyond_its_radius_and_sums_to_one() -> None:
    torch.manual_seed(0)
    m = attnlab.build("sliding-window", dim=8, heads=2, radius=2).double()
    weights = m.materialize(torch.randn(2, 11, 8, dtype=torch.float64))
    distances, mass = attention_mass_by_distance(weights)
    assert mass.shape == (2, 2, 11, 11)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 2, 11, dtype=torch.float64))
    assert (mass[..., distances > 2] == 0).all() and (mass[..., distances <= 2] > 0).any(-1).all()


def test_neighborhood_mass_on_a_grid_is_zero_beyond_its_window() -> None:
    """3×3 neighbourhoods on a 5×6 grid: Chebyshev distance ≤ 1 inside, ≤ 2 at the border (windows shift inward)."""
    torch.manual_seed(0)
    m = attnlab.build("neighborhood", dim=8, heads=2, kernel_size=3).double()
    weights = m.materialize(torch.randn(1, 5, 6, 8, dtype=torch.float64))
    distances, mass = attention_mass_by_distance(weights, (5, 6), metric="chebyshev")
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 2, 30, dtype=torch.float64))
    interior = 2 * 6 + 3
    assert (mass[:, :, interior, distances > 1] == 0).all()
    assert (mass[..., distances > 2] == 0).all() and (mass[:, :, 0, distances == 2] > 0).all()


def test_bad_inputs_refused_by_name() -> None:
    with pytest.raises(ShapeError, match="grid"):
        attention_mass_by_distance(torch.ones(4, 4) / 4, (3, 2))
    with pytest.raises(ShapeError, match="weights"):
        attention_mass_by_distance(torch.ones(4, 3))
    with pytest.raises(ValueError, match="metric"):
        attention_mass_by_distance(torch.ones(4, 4), metric="cosine")


def test_registered_as_analysis() -> None:
    spec = get("attention-mass-by-distance", "analysis")
    assert spec.paper.id == "P012" and spec.factory is attention_mass_by_distance
