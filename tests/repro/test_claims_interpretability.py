"""The interpretability claims (P046, P064, P077, P103, P119, P173, P187, P190): their statistics on planted inputs
(uniform-attention and token-blind models, a planted concept-head denoiser, exact power laws, bilinear forms with a
known spectrum), smoke runs, and planted faults (untrained models, reversed relevance, an isotropic form) judged
wrong."""
from __future__ import annotations

import math

import pytest
import torch
from claim_lookup import claim, verdict_of  # tests/repro/claim_lookup.py

from attnlab.analysis.capture import capture
from attnlab.analysis.cross_attention_heads import HeadRelevance
from attnlab.analysis.deception import DeceptionRun, evaluate_deception
from attnlab.analysis.last_token_circuit import (
    ArithmeticSettings,
    all_for_one_grid,
    arithmetic_prompts,
    train_arithmetic,
)
from attnlab.analysis.qk_decomposition import qk_form, top_terms_share
from attnlab.analysis.toy_diffusion import ConceptTask, planted_denoiser
from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings
from attnlab.repro.claims import interpretability as ip
from attnlab.repro.measure import loglog_slope

IDS = ("P042-last-token-computes", "P046-mass-vanishes", "P046-accuracy-kept", "P046-token-still-used", "P064-identifiability-rises",
       "P077-ordered-weakening", "P103-separating-latent", "P103-steering-idk", "P119-top-neurons-ablation",
       "P173-score-tracks-ablation", "P187-fvu-falls", "P187-patterns-found", "P190-sparse-qk-terms")


def test_every_claim_is_registered_as_a_training_claim_within_budget() -> None:
    for claim_id in IDS:
        c = claim(claim_id)
        assert c.method == "train" and c.seeds >= 3 and c.budget_s <= 300 and "Margin" in c.note


@pytest.mark.parametrize("claim_id", IDS)
def test_smoke_runs_give_a_finite_value_and_a_figure(claim_id: str) -> None:
    out = claim(claim_id)(0, "smoke")
    assert math.isfinite(out.value) and out.series and all(len(s.x) >= 1 for s in out.series)


# ---- P042


def _rows(accuracy: dict[tuple[int, int], float], full: float) -> list[dict[str, float]]:
    return [{"wait": w, "transfer": t, "accuracy": a, "full_accuracy": full} for (w, t), a in accuracy.items()]


def test_af1_gap_on_planted_grids() -> None:
    grid = {(0, 1): 1.0, (1, 0): 0.1, (1, 1): 0.9, (1, 2): 0.95, (2, 1): 0.5, (1, 3): 1.0}
    assert ip.af1_gap_statistic(_rows(grid, 0.97)) == pytest.approx(0.95 - 0.97)  # wait 0 and transfer 3 left out
    late = {(0, 2): 1.0, (1, 1): 0.3, (1, 2): 0.4, (2, 1): 0.2, (1, 3): 1.0}  # only a long transfer keeps it
    gap = ip.af1_gap_statistic(_rows(late, 1.0))
    assert verdict_of("P042-last-token-computes", [gap, gap - 0.02, gap + 0.02]) == "not reproduced"
    with pytest.raises(ValueError, match="rows"):
        ip.af1_gap_statistic(_rows({(0, 1): 1.0}, 1.0))


def test_a_model_trained_under_the_all_for_one_structure_keeps_its_accuracy() -> None:
    """Trained self-only before layer 1 and with peeking in layer 1: CAMA at layer 1 changes nothing (each state
    there depends on its own token only), so the subgraph at (1, 1) is the model itself."""
    settings = ArithmeticSettings(operands=4, layers=2, dim=16, heads=2, steps=60, planted=(1, 1))
    trained = train_arithmetic(settings, use_cache=False)
    ids, answers = arithmetic_prompts(settings)
    rows = all_for_one_grid(trained.model, ids, answers, reference=ids, run=trained.run)
    placed = next(r for r in rows if (r["wait"], r["transfer"]) == (1, 1))
    assert placed["accuracy"] == placed["full_accuracy"] > 0.25
    assert ip.af1_gap_statistic(rows) == 0.0


# ---- P046


def _token_blind_uniform_run() -> DeceptionRun:
    """The smoke marked-token model with zero query projections (every attention row uniform over the 6 tokens)
    and the marks A, B embedded as the first filler (its predictions cannot depend on the marked token)."""
    settings = ip.DECEPTION["smoke"]
    torch.manual_seed(0)
    model = ToyLM(ToyLMSettings(vocab=settings.vocab, dim=settings.dim, heads=settings.heads, layers=settings.layers,
                                context=settings.length, mlp_ratio=settings.mlp_ratio, causal=False)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.zero_()
            if block.attn.q_proj.bias is not None:
                block.attn.q_proj.bias.zero_()
        model.embed.weight[1:3] = model.embed.weight[3]
    return DeceptionRun(model, settings, [])


def test_deception_statistics_on_a_uniform_token_blind_model() -> None:
    run = _token_blind_uniform_run()
    ev = evaluate_deception(run, examples=64, seed=3)
    assert ev["mass_penalised"] == pytest.approx(1 / run.settings.length, abs=1e-6)  # uniform over 6 keys
    assert ip.ablation_loss_statistic(ev) == 0.0  # the marks look like a filler: nothing to lose
    assert verdict_of("P046-mass-vanishes", [ev["mass_penalised"]] * 3) == "not reproduced"
    assert verdict_of("P046-token-still-used", [ip.ablation_loss_statistic(ev)] * 3) == "not reproduced"
    assert ip.accuracy_cost_statistic({"accuracy": 0.9}, {"accuracy": 1.0}) == pytest.approx(-0.1)
    assert ip.ablation_loss_statistic({"accuracy": 1.0, "ablated_accuracy": 0.5}) == 0.5
    assert verdict_of("P046-accuracy-kept", [-0.1, -0.12, -0.08]) == "not reproduced"  # a ten-point cost
    assert verdict_of("P046-accuracy-kept", [0.0, -0.001, 0.0]) == "reproduced"
    assert verdict_of("P046-mass-vanishes", [1e-5, 2e-5, 1e-5]) == "reproduced"
    assert verdict_of("P046-token-still-used", [0.5, 0.48, 0.49]) == "reproduced"


# ---- P064


def test_identifiability_rise_is_last_minus_embeddings_and_a_flat_profile_is_judged_not_reproduced() -> None:
    profile = torch.tensor([0.55, 0.6, 0.8, 0.95], dtype=torch.float64)
    assert ip.identifiability_rise_statistic(profile) == pytest.approx(0.4)
    flat = torch.full((5,), 0.55, dtype=torch.float64)  # chance level at every depth
    assert verdict_of("P064-identifiability-rises", [ip.identifiability_rise_statistic(flat)] * 3) == "not reproduced"
    assert verdict_of("P064-identifiability-rises", [0.4, 0.38, 0.42]) == "reproduced"


# ---- P077


TASK = ConceptTask(concepts=3, words=4, width=4, grid=4, seed=0)
PLANTED = {(0, 0): 0, (1, 1): 0, (0, 2): 1, (2, 3): 1, (1, 0): 2, (2, 1): 2}  # (layer, head) -> concept


def test_weakening_gap_on_planted_concept_heads_and_on_reversed_relevance() -> None:
    """Planted heads: one weakened planted head already reverses its concept, so the HRV order (planted heads first)
    has a far lower area than the other orders; with the relevance negated the 'HRV' order is the reverse one."""
    model = planted_denoiser(TASK, PLANTED, layers=3, heads=4)
    g = torch.Generator().manual_seed(1)
    prompt, words = TASK.sample(6, g)
    relevance = ip.relevance_of(model, TASK, prompt, seed=0, generator=g)
    for concept in range(TASK.concepts):
        first_two = set(relevance.order(concept)[:2])
        assert first_two == {(f"cross.{layer}", head) for (layer, head), c in PLANTED.items() if c == concept}
    areas = ip.areas_of(ip.weakening_curves(model, TASK, relevance, prompt, words, random_orders=2, seed=0))
    gap = ip.weakening_gap_statistic(areas["hrv"], areas["reverse"], areas["random"])
    assert gap > 0.5 and verdict_of("P077-ordered-weakening", [gap] * 3) == "reproduced"
    flipped = HeadRelevance(-relevance.vectors, relevance.counts, relevance.heads)
    areas = ip.areas_of(ip.weakening_curves(model, TASK, flipped, prompt, words, random_orders=2, seed=0))
    wrong = ip.weakening_gap_statistic(areas["hrv"], areas["reverse"], areas["random"])
    assert wrong < 0 and verdict_of("P077-ordered-weakening", [wrong] * 3) == "not reproduced"


def test_weakening_gap_takes_the_better_baseline_per_concept() -> None:
    assert ip.weakening_gap_statistic([0.1, 0.2], [0.5, 0.3], [0.4, 0.9]) == pytest.approx(((0.4 - 0.1) + (0.3 - 0.2)) / 2)
    assert ip.area(torch.tensor([1.0, 0.0, -1.0])) == 0.0


# ---- P103


def test_entity_statistics_on_planted_records() -> None:
    record = {"separation_unknown": 0.85, "separation_null": 0.1, "p_idk_known_steered_unknown_latent": 0.6,
              "p_idk_known_steered_random": 0.01}
    assert ip.separation_gap_statistic(record) == pytest.approx(0.75)
    assert ip.steering_gap_statistic(record) == pytest.approx(0.59)
    chance = {**record, "separation_unknown": 0.12, "p_idk_known_steered_unknown_latent": 0.02}  # no better than null
    assert verdict_of("P103-separating-latent", [ip.separation_gap_statistic(chance)] * 3) == "not reproduced"
    assert verdict_of("P103-steering-idk", [ip.steering_gap_statistic(chance)] * 3) == "not reproduced"
    assert verdict_of("P103-separating-latent", [0.75, 0.7, 0.8]) == "reproduced"


# ---- P119


def test_neuron_ablation_gap_and_a_random_choice_judged_not_reproduced() -> None:
    assert ip.ablation_gap_statistic(0.66, 0.014) == pytest.approx(0.646)
    assert verdict_of("P119-top-neurons-ablation", [ip.ablation_gap_statistic(0.02, 0.02)] * 3) == "not reproduced"


# ---- P173


def test_maps_correlation_on_planted_scores() -> None:
    scores = torch.tensor([[0.0, 0.1, 0.0, 0.2], [0.0, 1.0, 0.05, 0.0]], dtype=torch.float64)
    assert ip.maps_correlation_statistic(scores, 3 * scores + 0.5) == pytest.approx(1.0)
    assert ip.maps_correlation_statistic(scores, -scores) == pytest.approx(-1.0)
    assert verdict_of("P173-score-tracks-ablation", [0.95, 0.97, 0.9]) == "reproduced"
    unrelated = torch.tensor([[0.3, 0.0, 0.3, 0.0], [0.3, 0.0, 0.3, 0.0]], dtype=torch.float64)
    r = ip.maps_correlation_statistic(scores, unrelated)
    assert verdict_of("P173-score-tracks-ablation", [r, r + 0.05, r - 0.05]) == "not reproduced"


def test_the_free_successor_lm_has_every_head_free() -> None:
    task, recipe = ip.SUCCESSOR["smoke"]
    model = ip.train_free_successor(task, seed=0, **{**recipe, "steps": 1})
    ids = task.sample(torch.Generator().manual_seed(0), 4)[0]
    with torch.no_grad(), capture(model) as att:
        model(ids)
    off_diagonal = [a[..., 1:, :].tril(-1).sum() for a in att.layers]  # attention to earlier positions
    assert all(float(v) > 0 for v in off_diagonal)


# ---- P187


def test_lorsa_slope_of_a_planted_power_law_and_a_flat_error() -> None:
    heads = (4, 8, 16, 32)
    assert loglog_slope(heads, [0.8 * h ** -0.5 for h in heads]) == pytest.approx(-0.5)
    flat = loglog_slope(heads, [0.3, 0.31, 0.3, 0.3])
    assert verdict_of("P187-fvu-falls", [flat, flat + 0.01, flat - 0.01]) == "not reproduced"
    assert ip.pattern_statistic(0.8, 0.45) == 0.45


def test_lorsa_patterns_of_an_untrained_induction_model_are_judged_not_reproduced() -> None:
    """The smoke model (5 training steps) has no induction head: neither has a Lorsa fitted to it."""
    values = [claim("P187-patterns-found")(seed, "smoke").value for seed in range(3)]
    assert max(values) < 0.3 and verdict_of("P187-patterns-found", values) == "not reproduced"


# ---- P190


def _form(scales: list[float]):
    w = torch.diag(torch.tensor(scales, dtype=torch.float64))
    return qk_form(w, w)  # Ω̃ = [W 0]ᵀ[W 0]: singular values scales², no bias


def test_pair_terms_sum_to_the_score_in_every_basis_and_match_the_form() -> None:
    form = _form([2.0, 1.0, 0.5, 0.3])
    g = torch.Generator().manual_seed(0)
    x_q, x_k = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    svd = ip.pair_terms(form, x_q, x_k)
    torch.testing.assert_close(svd, torch.diagonal(form.terms(x_q, x_k), dim1=0, dim2=1).T)
    score = (x_q * torch.tensor([4.0, 1.0, 0.25, 0.09], dtype=torch.float64) * x_k).sum(-1)  # x_qᵀ W² x_k
    torch.testing.assert_close(svd.sum(-1), score)
    for rotation in ip.random_rotations(form.rank, 3, g, svd.device):
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(form.rank, dtype=torch.float64))
        torch.testing.assert_close(ip.pair_terms(form, x_q, x_k, rotation).sum(-1), score)
    curve = ip.top_share_curve(svd)
    assert curve.shape == (form.rank,) and float(curve[-1]) == pytest.approx(1.0)


def _gap(scales: list[float], seed: int) -> float:
    form = _form(scales)
    g = torch.Generator().manual_seed(seed)
    x_q, x_k = torch.randn(400, len(scales), generator=g, dtype=torch.float64), torch.randn(400, len(scales), generator=g,
                                                                                         dtype=torch.float64)
    rotated = [ip.pair_terms(form, x_q, x_k, r) for r in ip.random_rotations(form.rank, 8, g, x_q.device)]
    return ip.sparsity_gap_statistic(ip.pair_terms(form, x_q, x_k), rotated)


def test_a_dominant_singular_pair_is_sparse_and_an_isotropic_form_is_not() -> None:
    sparse = [_gap([3.0] + [0.3] * 15, seed) for seed in range(3)]  # σ_1 = 9, the rest 0.09
    assert min(sparse) > 0.2 and verdict_of("P190-sparse-qk-terms", sparse) == "reproduced"
    isotropic = [_gap([1.0] * 16, seed) for seed in range(3)]  # every basis is a singular basis
    assert max(abs(v) for v in isotropic) < 0.05
    assert verdict_of("P190-sparse-qk-terms", isotropic) == "not reproduced"
    assert ip.sparsity_gap_statistic(torch.tensor([[3.0, 1.0, 0.0]]), [torch.tensor([[1.0, 1.0, 2.0]])], k=1) == \
        pytest.approx(3 / 4 - 2 / 4)


def test_magnitude_share_is_not_inflated_by_cancelling_terms() -> None:
    """Terms (3, −2, 1) sum to 2: the largest is 150% of the signed score but half of the terms' magnitude."""
    terms = torch.tensor([[3.0, -2.0, 1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    assert float(top_terms_share(terms[:1], 1)) == pytest.approx(1.5)
    torch.testing.assert_close(ip.magnitude_share(terms, 1), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(ip.magnitude_share(terms, 3), torch.ones(2, dtype=torch.float64))
