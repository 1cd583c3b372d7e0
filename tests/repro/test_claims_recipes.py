"""Claims of the family D recipes: the data and models they build, their statistics on planted outcomes, and
planted faults that give the wrong verdict."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attnlab.bench.store import ResultStore
from attnlab.recipes.illama import soft_causal
from attnlab.recipes.mimetic import mimetic_init_
from attnlab.recipes.subsampled_attention import expected_keep_fraction
from attnlab.repro.claim import select
from attnlab.repro.claims import recipes as R
from attnlab.repro.runner import run_claim

CACHED = (R.mimetic_race, R.minilm_mimeticity, R.pretrained, R.apla_transfer, R.lora_transfer, R.illama_variants,
          R.ssa_race, R.identity_removal)


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    for f in CACHED:
        f.cache_clear()
    yield
    for f in CACHED:
        f.cache_clear()


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "results.sqlite")


def claim(claim_id: str):  # type: ignore[no-untyped-def]
    (found,) = select(claim_id)
    return found


def test_patches_cut_an_image_into_2x2_tiles_row_major() -> None:
    image = torch.arange(64.0).reshape(1, 8, 8)
    tokens = R.patches(image)
    assert tokens.shape == (1, 16, 4)
    assert tokens[0, 0].tolist() == [0, 1, 8, 9]
    assert tokens[0, 1].tolist() == [2, 3, 10, 11]
    assert tokens[0, 4].tolist() == [16, 17, 24, 25]
    assert tokens[0, 15].tolist() == [54, 55, 62, 63]


def test_digits_renumbers_the_chosen_classes_and_splits_70_30() -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    xtr, ytr, xte, yte = R.digits(0, (7, 3))
    chosen = (data.target == 7) | (data.target == 3)
    assert len(ytr) + len(yte) == int(chosen.sum()) and len(ytr) == int(0.7 * chosen.sum())
    assert int((torch.cat([ytr, yte]) == 0).sum()) == int((data.target == 7).sum())  # 7 -> label 0
    # each token set is the patches of a digit of its label
    image = torch.tensor(data.images[data.target == 3], dtype=torch.float32) / 16
    sevens_or_threes = {tuple(t.flatten().tolist()) for t in R.patches(image)}
    assert all(tuple(t.flatten().tolist()) in sevens_or_threes for t in xtr[ytr == 1][:10])
    again, other = R.digits(0, (7, 3)), R.digits(1, (7, 3))
    assert torch.equal(again[1], ytr) and not torch.equal(other[1], ytr)


def test_a_causal_front_class_token_sees_no_patch_while_a_last_one_does() -> None:
    """The mechanism behind P214-front-class-token-fails: under the hard causal mask (renormalised form) the first
    token's output does not depend on the patches; the post-sequence token's does. (The official form, which the
    claim trains, leaks one normaliser per head and layer to the front token.)"""
    x = torch.rand(2, 16, 4)
    y = x.clone()
    y[:, 5:] = torch.rand(2, 11, 4)
    for position, depends in (("front", False), ("last", True)):
        torch.manual_seed(0)
        model = R.ViT(cls=position, layers=2)
        soft_causal(model, rate=0.0, form="renormalised")
        model.eval()
        with torch.no_grad():
            same = torch.allclose(model(x), model(y), atol=1e-6)
        assert same is not depends, position


def test_mimeticity_smoke_separates_mimetic_from_default_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    qk, vo = R.minilm_mimeticity("smoke")  # a mimetic-initialised tiny ViT
    assert min(qk) > 1 and min(vo) > 1
    assert claim("P001-minilm-qk-diagonal")(0, "smoke").value == pytest.approx(sum(qk) / len(qk))
    # planted fault: the measured model keeps its default weights -> the ratio is near 0 and the claim fails
    R.minilm_mimeticity.cache_clear()
    monkeypatch.setattr(R, "mimetic_init_", lambda model, generator=None: [])
    qk, vo = R.minilm_mimeticity("smoke")
    assert max(abs(v) for v in qk + vo) < 1


def test_mimetic_race_pairs_the_models_and_a_harmful_init_is_not_reproduced(
    monkeypatch: pytest.MonkeyPatch, store: ResultStore
) -> None:
    # with a no-op init the two runs are the same model on the same batches: gain exactly 0 at every point
    monkeypatch.setattr(R, "mimetic_init_", lambda model, generator=None: [])
    race = R.mimetic_race(0, "smoke")
    assert race["mimetic"] == race["default"] and claim("P001-mimetic-trains-faster")(0, "smoke").value == 0.0
    # planted outcomes: the statistic is the final accuracy of mimetic minus default; mimetic behind -> fails
    R.mimetic_race.cache_clear()
    monkeypatch.setattr(R, "mimetic_race", lambda seed, size: {"steps": (1.0, 2.0), "default": (0.5, 0.9),
                                                              "mimetic": (0.6, 0.8 - 0.01 * seed)})
    assert claim("P001-mimetic-trains-faster")(1, "full").value == pytest.approx(-0.11)
    out = run_claim(claim("P001-mimetic-trains-faster"), store, quiet=True)
    assert out.verdict == "not reproduced"


def test_apla_counts_the_output_projections_and_head_only() -> None:
    r = R.apla_transfer(0, "smoke")
    dim, layers, classes = R.TRANSFER_MODEL["dim"], R.TRANSFER_MODEL["layers"], len(R.TASK_B)
    assert r["apla trainable"] == layers * (dim * dim + dim) + dim * classes + classes
    model = R.ViT(classes=classes, **R.TRANSFER_MODEL)
    assert r["full trainable"] == sum(p.numel() for p in model.parameters())


def test_apla_memory_counts_gradients_and_adam_state_in_closed_form() -> None:
    m = claim("P021-apla-memory")(0, "smoke")
    dim, layers, classes = R.TRANSFER_MODEL["dim"], R.TRANSFER_MODEL["layers"], len(R.TASK_B)
    trainable = layers * (dim * dim + dim) + dim * classes + classes
    total = sum(p.numel() for p in R.ViT(classes=classes, **R.TRANSFER_MODEL).parameters())
    assert m.extra["apla gradients"] == 4 * trainable and m.extra["apla optimizer_state"] == 8 * trainable
    assert m.extra["full gradients"] == 4 * total and m.extra["full optimizer_state"] == 8 * total
    assert 0 < m.extra["apla saved_activations"] < m.extra["full saved_activations"]
    memory = {n: sum(m.extra[f"{n} {p}"] for p in ("saved_activations", "gradients", "optimizer_state"))
              for n in ("full", "apla")}
    assert m.value == pytest.approx(memory["apla"] / memory["full"])


def test_apla_gap_and_a_planted_loss_of_accuracy(monkeypatch: pytest.MonkeyPatch, store: ResultStore) -> None:
    planted = {"full accuracy": 0.95, "apla accuracy": 0.80, "full trainable": 100.0, "apla trainable": 10.0}
    monkeypatch.setattr(R, "apla_transfer", lambda seed, size: dict(planted, **{"apla accuracy": 0.8 + 0.01 * seed}))
    assert claim("P021-apla-matches-full-finetuning")(0, "full").value == pytest.approx(-0.15)
    assert run_claim(claim("P021-apla-matches-full-finetuning"), store, quiet=True).verdict == "not reproduced"


def test_lora_statistics_and_a_planted_overconfident_ensemble(monkeypatch: pytest.MonkeyPatch,
                                                              store: ResultStore) -> None:
    r = R.lora_transfer(0, "smoke")
    assert set(r) == {f"{n} {m}" for n in ("single", "ensemble") for m in ("accuracy", "NLL", "ECE")}
    planted = {"single accuracy": 0.9, "single NLL": 0.30, "single ECE": 0.05,
               "ensemble accuracy": 0.9, "ensemble NLL": 0.40, "ensemble ECE": 0.02}
    monkeypatch.setattr(R, "lora_transfer", lambda seed, size: dict(planted, **{"ensemble NLL": 0.4 + 0.01 * seed}))
    assert claim("P121-ensemble-lower-nll")(0, "full").value == pytest.approx(0.10)
    assert claim("P121-ensemble-lower-ece")(0, "full").value == pytest.approx(-0.03)
    assert run_claim(claim("P121-ensemble-lower-nll"), store, quiet=True).verdict == "not reproduced"
    assert run_claim(claim("P121-ensemble-lower-ece"), store, quiet=True).verdict == "reproduced"


def test_lora_ensemble_of_untrained_members_equals_the_single_model() -> None:
    """With 0 steps every member is the backbone (B = 0): ensemble and single give the same NLL."""
    R.TRANSFER["zero"] = {"pretrain": 2, "adapt": 0}
    try:
        r = R.lora_transfer(0, "zero")
    finally:
        del R.TRANSFER["zero"]
    assert r["ensemble NLL"] == pytest.approx(r["single NLL"], rel=1e-5)
    assert r["ensemble accuracy"] == r["single accuracy"]


def test_illama_differences_on_planted_accuracies(monkeypatch: pytest.MonkeyPatch, store: ResultStore) -> None:
    planted = {"bidirectional": 0.95, "causal, front class token": 0.10, "iLLaMA": 0.80}
    monkeypatch.setattr(R, "illama_variants", lambda seed, size: dict(planted, iLLaMA=0.80 + 0.01 * seed))
    assert claim("P214-illama-matches-bidirectional")(0, "full").value == pytest.approx(-0.15)
    assert claim("P214-front-class-token-fails")(0, "full").value == pytest.approx(0.70)
    assert run_claim(claim("P214-illama-matches-bidirectional"), store, quiet=True).verdict == "not reproduced"


def test_ssa_keeps_the_expected_share_of_causal_pairs() -> None:
    m = claim("P074-ssa-cuts-attention-pairs")(0, "smoke")
    expected = expected_keep_fraction(R.CONTEXT, causal=True, **R.SSA_LAW)
    assert m.extra["kept share"] == pytest.approx(expected, abs=0.01)
    assert m.value == pytest.approx(1 / m.extra["kept share"])
    assert claim("P074-ssa-val-loss-not-worse")(0, "smoke").value == pytest.approx(
        m.extra["SSA val loss"] - m.extra["dense val loss"])


def test_a_dense_law_does_not_cut_pairs_fourfold(monkeypatch: pytest.MonkeyPatch, store: ResultStore) -> None:
    """Planted fault: window 16 keeps most causal pairs at context 64 -> the 4x cut is not reproduced."""
    monkeypatch.setattr(R, "SSA_LAW", {"window": 16.0, "power": 1.0})
    out = run_claim(claim("P074-ssa-cuts-attention-pairs"), store, size="smoke", seeds=(0, 1, 2), quiet=True)
    assert out.verdict == "not reproduced" and max(out.values) < 2


def test_stdlib_text_is_ascii_and_large_enough() -> None:
    text = R.stdlib_text()
    assert text.dtype == torch.long and int(text.min()) >= 0 and int(text.max()) < 128
    assert len(text) > 20 * R.CONTEXT * R.SSA_RUN["full"]["windows"] // 10
    import argparse

    first = (argparse.__doc__ or "").encode("ascii", "replace")
    assert bytes(text[: len(first)].tolist()) == first and R.TEXT_MODULES[0] == "argparse"


def test_mimetic_init_changes_only_the_attention_weights() -> None:
    torch.manual_seed(0)
    a = R.ViT(**R.MIMETIC_MODEL)
    b = R.ViT(**R.MIMETIC_MODEL)
    b.load_state_dict(a.state_dict())
    mimetic_init_(b, generator=torch.Generator().manual_seed(0))
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}
    assert changed == {f"blocks.{i}.attn.{p}_proj.weight" for i in range(R.MIMETIC_MODEL["layers"])
                       for p in ("q", "k", "v", "out")}


def test_identity_removal_statistics_and_a_planted_top_preference(monkeypatch: pytest.MonkeyPatch,
                                                                  store: ResultStore) -> None:
    r = R.identity_removal(0, "smoke")
    assert {r["chosen first"], r["chosen second"]} <= {0.0, 1.0, 2.0, 3.0} and r["chosen first"] != r["chosen second"]
    assert r["chosen mean index"] == (r["chosen first"] + r["chosen second"]) / 2
    planted = {"accuracy trained": 0.95, "accuracy bottom removed": 0.70, "accuracy top removed": 0.90,
               "accuracy bottom removed, before fine-tuning": 0.3, "accuracy top removed, before fine-tuning": 0.5,
               "chosen mean index": 2.5, "chosen first": 3.0, "chosen second": 2.0}
    monkeypatch.setattr(R, "identity_removal", lambda seed, size: dict(
        planted, **{"accuracy top removed": 0.9 + 0.01 * seed, "chosen mean index": 2.5 - 0.5 * (seed == 1)}))
    assert claim("P018-bottom-attention-removable")(0, "full").value == pytest.approx(-0.20)
    assert run_claim(claim("P018-bottom-attention-removable"), store, quiet=True).verdict == "not reproduced"
    assert run_claim(claim("P018-entropy-picks-bottom-layers"), store, quiet=True).verdict == "not reproduced"
