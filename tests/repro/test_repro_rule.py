"""The decision rule of a claim, the t-interval it judges, and the measuring helpers, on planted numbers."""
from __future__ import annotations

import math

import pytest
import torch

from attnlab.core.registry import Paper
from attnlab.repro.claim import Claim, Measurement, Rule, t_interval
from attnlab.repro.measure import core_flops, cpu_sdpa_flops, loglog_slope

PAPER = Paper("P999", "A planted paper", 2024)


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (0.95, 1.05, "reproduced"),        # inside [0.9, 1.1]
    (0.9, 1.1, "reproduced"),          # the band itself
    (1.2, 1.4, "not reproduced"),      # wholly above
    (0.1, 0.5, "not reproduced"),      # wholly below
    (1.05, 1.3, "inconclusive"),       # straddles the upper end
    (0.8, 0.95, "inconclusive"),       # straddles the lower end
    (0.5, 1.5, "inconclusive"),        # covers the band
    (-math.inf, math.inf, "inconclusive"),  # one seed: unbounded
])
def test_two_sided_rule(low: float, high: float, verdict: str) -> None:
    assert Rule(0.9, 1.1).verdict(low, high) == verdict


def test_one_sided_rule() -> None:
    below = Rule(high=-10.0)
    assert below.verdict(-16.0, -14.0) == "reproduced"
    assert below.verdict(-3.0, -2.0) == "not reproduced"
    assert below.verdict(-11.0, -9.0) == "inconclusive"
    assert "at or below -10" in below.text()
    assert Rule(low=0.99).verdict(1.0, 1.0) == "reproduced"


@pytest.mark.parametrize(("low", "high"), [(1.0, 1.0), (2.0, 1.0), (math.nan, 1.0), (-math.inf, math.inf)])
def test_a_rule_without_a_band_is_refused(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="Rule"):
        Rule(low, high)


def test_an_interval_upside_down_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        Rule(0.0, 1.0).verdict(0.6, 0.4)


def test_t_interval_matches_the_closed_form() -> None:
    # values 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302652729911275 -> half width 4.3026527 / √3
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-9)
    assert t_interval([1.5, 1.5, 1.5]) == (1.5, 1.5, 1.5)  # a deterministic count: the point
    assert t_interval([4.0])[1:] == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="values"):
        t_interval([])


def test_loglog_slope_recovers_a_power_law() -> None:
    xs = [256.0, 1024.0, 4096.0]
    assert loglog_slope(xs, [3.0 * x ** 1.5 for x in xs]) == pytest.approx(1.5, abs=1e-12)
    with pytest.raises(ValueError, match="positive"):
        loglog_slope([1.0, 2.0], [0.0, 1.0])


def test_dense_attention_is_counted_at_4_n2_d() -> None:
    """The CPU attention kernel is counted (torch has no formula for it): 2·n²·d for QKᵀ and as much for AV."""
    import attnlab

    n, heads, dim = 64, 2, 32
    module = attnlab.build("softmax", dim=dim, heads=heads)
    want = heads * 4 * n * n * (dim // heads)
    assert core_flops(module, torch.randn(1, n, dim)) == want
    assert cpu_sdpa_flops((1, heads, n, 16), (1, heads, n, 16), (1, heads, n, 16)) == want


def planted(**changes: object) -> Claim:
    fields: dict = dict(id="P999-planted", paper=PAPER, statement="s", statistic="x", direction="≈ 1",
                        rule=Rule(0.9, 1.1), run=lambda seed, size: Measurement(1.0), budget_s=1)
    fields.update(changes)
    return Claim(**fields)


@pytest.mark.parametrize(("changes", "match"), [
    ({"id": "P998-other"}, "id"),
    ({"budget_s": 301}, "budget_s"),
    ({"seeds": 2}, "seeds"),
    ({"method": "guess"}, "method"),
])
def test_a_malformed_claim_is_refused(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        planted(**changes)


def test_a_claim_checks_size_and_result() -> None:
    with pytest.raises(ValueError, match="size"):
        planted()(0, "huge")
    with pytest.raises(TypeError, match="Measurement"):
        planted(run=lambda seed, size: 1.0)(0, "full")
