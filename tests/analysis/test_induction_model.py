"""The induction-model recipe: its batches hold one repeated segment and target only the copy, the tiny recipe
learns induction (a previous-token head in layer 0, an induction head in layer 1), and the cache keys the recipe."""
import dataclasses

import pytest
import torch

from attnlab.analysis.induction_model import (
    TINY,
    InductionRecipe,
    head_scores,
    induction_accuracy,
    induction_batch,
    induction_model,
    repeated_tokens,
)
from attnlab.analysis.toy_lm import ToyLM
from attnlab.core.errors import ParameterError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The TINY recipe trained once per test session (the session's temporary folder caches it for the other files)."""
    return induction_model(TINY, cache_dir=tmp_path_factory.getbasetemp() / "induction-cache")


def test_a_batch_repeats_one_segment_and_targets_only_its_copy():
    ids, targets = induction_batch(torch.Generator().manual_seed(3), batch=64, length=16, vocab=24)
    assert ids.shape == targets.shape == (64, 16) and ids.dtype == targets.dtype == torch.int64
    lengths = set()
    for row, target in zip(ids.tolist(), targets.tolist()):
        where = [p for p, t in enumerate(target) if t != -100]
        assert where == list(range(where[0], where[-1] + 1))  # one run of predicted positions
        length = len(where) + 1  # the copy's last token predicts nothing
        lengths.add(length)
        start = where[0] - length  # first copy at [start, start + L), second at [start + L, start + 2L)
        assert start >= 0 and row[start:start + length] == row[start + length:start + 2 * length]
        assert all(target[p] == row[p + 1] for p in where)
    assert lengths == set(range(4, 9))  # L in [length // 4, length // 2], every value drawn in 64 sequences
    again = induction_batch(torch.Generator().manual_seed(3), batch=64, length=16, vocab=24)
    assert torch.equal(again[0], ids) and torch.equal(again[1], targets)


def test_repeated_tokens_are_two_copies():
    ids = repeated_tokens(torch.Generator().manual_seed(0), batch=3, half=5, vocab=7)
    assert ids.shape == (3, 10) and torch.equal(ids[:, :5], ids[:, 5:]) and int(ids.max()) < 7


def test_the_tiny_recipe_learns_induction_with_the_two_heads(tiny):
    model = tiny.model
    assert isinstance(model, ToyLM) and model.settings.mlp_ratio == 0 and model.settings.layers == 2
    assert induction_accuracy(model, TINY) > 0.7  # chance: 1/24
    probe = repeated_tokens(torch.Generator().manual_seed(5), batch=16, half=TINY.length // 2, vocab=TINY.vocab)
    scores = head_scores(model, probe)
    # [r r]: a previous-token head can score up to ~1, an induction head up to ~0.5 (the second half's queries)
    assert max(scores["previous_token"][0]) > 0.35 and max(scores["previous_token"][1]) < 0.25
    assert max(scores["induction"][1]) > 0.35 and max(scores["induction"][0]) < 0.25
    torch.manual_seed(TINY.seed)
    untrained = head_scores(ToyLM(TINY.settings()).eval(), probe)
    assert max(untrained["induction"][1]) < 0.25 and max(untrained["previous_token"][0]) < 0.25


def test_the_cache_returns_the_same_weights_and_keys_every_setting(tiny, tmp_path_factory):
    again = induction_model(TINY, cache_dir=tmp_path_factory.getbasetemp() / "induction-cache")
    assert again.hit and again.path == tiny.path
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, tiny.model.state_dict()[name])
    assert tiny.record["accuracy"] == again.record["accuracy"] and tiny.record["key"]["steps"] == TINY.steps
    assert (tiny.path.parent / (tiny.path.stem + ".json")).is_file()
    other = induction_model(dataclasses.replace(TINY, steps=1), cache_dir=tmp_path_factory.getbasetemp() / "induction-cache")
    assert not other.hit and other.path != tiny.path


@pytest.mark.parametrize("field, value", [("vocab", 0), ("length", 3), ("steps", 1.5), ("lr", -1.0), ("seed", -1),
                                           ("heads", 5)])
def test_bad_recipes_are_refused_by_name(field, value):
    with pytest.raises(ParameterError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_bad_batch_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="generator"):
        induction_batch(0, batch=2, length=8, vocab=4)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="length"):
        induction_batch(torch.Generator(), batch=2, length=3, vocab=4)
    with pytest.raises(ParameterError, match="half"):
        repeated_tokens(torch.Generator(), batch=2, half=0, vocab=4)
    with pytest.raises(TypeError, match="recipe"):
        induction_model({"steps": 1})  # type: ignore[arg-type]
    assert InductionRecipe().settings().mlp_ratio == 0.0
