"""The sink claims (P068, P248): their statistics on planted maps, smoke runs, and planted faults (an untrained LM,
sinks only where the causal mask puts them) judged wrong."""
from __future__ import annotations

import math

import pytest
import torch
from claim_lookup import claim, verdict_of  # tests/repro/claim_lookup.py

from attnlab.analysis.char_lm import PRESETS, CharLM
from attnlab.repro.claims import sinks as S

IDS = ("P068-early-sinks", "P248-late-sinks")


def uniform_causal(batch: int, heads: int, n: int) -> torch.Tensor:
    a = torch.tril(torch.ones(n, n, dtype=torch.float64))
    return (a / a.sum(-1, keepdim=True)).expand(batch, heads, n, n).clone()


def with_column(a: torch.Tensor, head: int, key: int, share: float) -> torch.Tensor:
    """Rows i >= key of `head` give `share` to `key` and the rest uniformly to their other visible keys."""
    out = a.clone()
    n = a.shape[-1]
    for i in range(key, n):
        row = torch.zeros(n, dtype=a.dtype)
        if i > 0:
            row[: i + 1] = (1 - share) / i
        row[key] = share if i > 0 else 1.0
        out[:, head, i] = row
    return out


def test_claims_are_registered_as_training_claims_within_budget() -> None:
    for claim_id in IDS:
        c = claim(claim_id)
        assert c.method == "train" and c.seeds >= 3 and c.budget_s <= 300


def test_harmonic_numbers() -> None:
    assert S.harmonic(1) == 1.0 and S.harmonic(4) == pytest.approx(25 / 12)


def test_first_token_ratio_is_one_for_uniform_causal_heads_and_n_over_h_n_for_a_full_sink() -> None:
    n = 16
    uniform = uniform_causal(2, 3, n)
    torch.testing.assert_close(S.first_token_ratio([uniform, uniform]), torch.ones(2, 3, dtype=torch.float64))
    sink = torch.zeros(2, 3, n, n, dtype=torch.float64)
    sink[..., 0] = 1.0
    rho = S.first_token_ratio([uniform, sink])
    torch.testing.assert_close(rho[1], torch.full((3,), n / S.harmonic(n), dtype=torch.float64))
    half = with_column(uniform, head=1, key=0, share=0.5)  # every row: 0.5 on key 0 (row 0: all of it)
    expected = (1 + 0.5 * (n - 1)) / n / (S.harmonic(n) / n)
    assert float(S.first_token_ratio([half])[0, 1]) == pytest.approx(expected)


def test_late_sink_count_counts_planted_sinks_at_and_after_the_first_late_key() -> None:
    n = 32
    uniform = uniform_causal(3, 2, n)
    assert S.late_sink_count([uniform, uniform]) == 0.0
    assert S.late_sink_count([uniform], first=1) == 0.0  # a_1 = (H_32 - 1)/32 < 5/32
    late = with_column(uniform, head=1, key=10, share=0.9)  # a_10 = 22 · 0.9 / 32 > 5/32
    early = with_column(uniform, head=0, key=3, share=0.9)  # a_3 = 29 · 0.9 / 32, but j = 3 < 8
    assert S.late_sink_count([uniform, late]) == 1.0
    assert S.late_sink_count([early, late]) == 1.0
    assert S.late_sink_count([early, late], first=1) == 2.0
    weak = with_column(uniform, head=1, key=10, share=0.15)  # a_10 ≈ 22 · 0.15 / 32 + small < 5/32
    assert S.late_sink_count([weak]) == 0.0


@pytest.mark.parametrize("claim_id", IDS)
def test_smoke_runs_give_a_value_and_a_curve(claim_id: str) -> None:
    out = claim(claim_id)(0, "smoke")
    assert math.isfinite(out.value) and out.value >= 0 and out.series and out.series[0].x
    if claim_id == "P068-early-sinks":
        assert out.series[0].x[0] == 0.0 and out.series[0].x[-1] == S.EMERGENCE_STEPS["smoke"]
        assert out.series[0].y[-1] == out.value  # the statistic is the last point of the max curve


def test_an_untrained_lm_is_judged_not_reproduced_and_planted_sinks_reproduced() -> None:
    _, windows = S.probe(PRESETS["tiny"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CharLM(PRESETS["tiny"]).eval()
    maps = S.attention_maps(model, windows)
    rho = float(S.first_token_ratio(maps).max())
    assert rho == pytest.approx(1.0, abs=0.3)  # near-uniform heads at initialisation
    assert verdict_of("P068-early-sinks", [rho, rho * 1.01, rho * 0.99]) == "not reproduced"
    assert verdict_of("P248-late-sinks", [S.late_sink_count(maps)] * 3) == "not reproduced"
    n = 64
    planted = with_column(with_column(uniform_causal(4, 4, n), 0, 0, 0.6), 2, 20, 0.8)
    rho_planted = float(S.first_token_ratio([planted]).max())
    assert verdict_of("P068-early-sinks", [rho_planted] * 3) == "reproduced"
    assert verdict_of("P248-late-sinks", [S.late_sink_count([planted])] * 3) == "reproduced"
