"""NPT's lookup task (P030): the generator's tables, and a tiny NPT that learns to look the target up.

The training test runs benchmarks/npt_lookup.py's recipe for 150 steps instead of 600 (about 5–10 s on one
core) and asks for accuracy >= 0.9 on 256 held-out tables (512 masked targets), chance being 1/8. The recipe
reaches 0.999–1.0 at 120 steps on each of the seeds 0–5 (and 1.0 from step 150 at 600 steps), so 0.9 leaves a
wide margin, while a model that does not look between rows stays near 0.125 (a binomial 512 draws at p = 1/8
reaches 0.2 with probability < 1e-6). Then the visible copies get new targets: a model that looks the target up
follows them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.tasks import TableLookupData, table_lookup

ROOT = Path(__file__).resolve().parents[2]


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("npt_lookup", ROOT / "benchmarks" / "npt_lookup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["npt_lookup"] = module
    spec.loader.exec_module(module)
    return module


def test_every_query_has_one_visible_duplicate_with_the_same_cells() -> None:
    data = table_lookup(50, pairs=6, attributes=4, categories=5, seed=3)
    assert isinstance(data, TableLookupData) and len(data) == 50
    assert data.values.shape == data.masked.shape == (50, 12, 4) and data.values.dtype == torch.long
    assert int(data.values.min()) >= 0 and int(data.values.max()) <= 4
    copy = data.values.gather(1, data.duplicate[..., None].expand(-1, -1, 4))
    assert torch.equal(copy, data.values), "a row and its duplicate differ"
    assert torch.equal(data.duplicate.gather(1, data.duplicate), torch.arange(12).expand(50, -1)), "not an involution"
    assert not (data.duplicate == torch.arange(12)).any(), "a row is its own duplicate"
    assert not data.masked[..., :-1].any(), "a feature cell is masked"
    query = data.query_rows
    assert torch.equal(query.gather(1, data.duplicate), ~query), "exactly one copy of each pair is masked"
    for table in data.values:
        assert len({tuple(r) for r in table[:, :-1].tolist()}) == 6, "two pairs share their features"
    positions = torch.stack([q.nonzero()[:, 0] for q in query])
    assert len({tuple(p) for p in positions.tolist()}) > 40, "the query rows are not shuffled"


def test_generator_is_seeded_and_refuses_bad_settings() -> None:
    a, b, c = table_lookup(4, seed=1), table_lookup(4, seed=1), table_lookup(4, seed=2)
    assert torch.equal(a.values, b.values) and torch.equal(a.duplicate, b.duplicate)
    assert not torch.equal(a.values, c.values)
    with pytest.raises(ValueError, match=r"^pairs: expected <= categories\^\(attributes − 1\) = 4"):
        table_lookup(2, pairs=5, attributes=3, categories=2)
    with pytest.raises(ValueError, match="^attributes: expected an int >= 2, got 1"):
        table_lookup(2, attributes=1)
    assert attnlab.get("table-lookup", "task").factory is table_lookup


def test_a_tiny_npt_learns_the_lookup_and_follows_the_duplicate() -> None:
    script = _script()
    torch.set_num_threads(1)
    recipe = script.Recipe(steps=150, test_tables=256, seed=0)
    model, acc = script.train(recipe)
    assert acc >= 0.9, f"lookup accuracy {acc:.3f} after 150 steps (chance 0.125)"
    # give every visible copy a new target (the query's own target then appears nowhere): the model follows it
    data = table_lookup(256, recipe.pairs, recipe.attributes, recipe.categories, seed=77)
    values = data.values.clone()
    visible = ~data.query_rows
    values[..., -1][visible] = (values[..., -1][visible] + 1 + torch.randint(0, 7, (int(visible.sum()),))) % 8
    with torch.no_grad():
        predicted = model(values, data.masked)[-1].argmax(-1)
    query = data.query_rows
    new_target = values[..., -1].gather(1, data.duplicate)  # the duplicate's (new) visible target
    old_target = data.values[..., -1]
    assert (predicted[query] == new_target[query]).double().mean() >= 0.9, "the model does not read the duplicate"
    assert (predicted[query] == old_target[query]).double().mean() <= 0.25, "the model knows a target it cannot see"
