"""The lookup task of Non-Parametric Transformers (P030): a masked target is found in the row's duplicate.

Each table holds `pairs` datapoints and an exact copy of each, 2·pairs rows in a random order. A row
has `attributes` categorical cells, classes 0 … categories − 1: the first attributes − 1 are features,
the last is the target. Features and targets are uniform and independent, so a row's own features say
nothing about its target (accuracy 1/categories, chance). In one copy of each pair (the query) the
target is masked; in the other it is visible:

    row q (query)       x₁ … x_{f−1}  [MASK]
    row d (duplicate)   x₁ … x_{f−1}  y          predict y at q: look up the row with the same features

Within a table the feature vectors of the pairs are distinct (drawn without replacement from the
categories^(f−1) possible ones), so the duplicate is the only row with the query's features. A model
that attends between datapoints can solve it exactly; one that sees each row alone stays at chance.
This is the paper's lookup experiment in synthetic form (the paper duplicates a real dataset).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add

NPT_PAPER = Paper(
    "P030", "Self-Attention Between Datapoints: Going Beyond Individual Input-Output Pairs in Deep Learning", 2021,
    "2106.02584",
)


@dataclass(frozen=True)
class TableLookupData:
    """`values` (tables, 2·pairs, attributes) long classes; `masked` the same shape, True = hidden cell (the query
    rows' targets); `duplicate` (tables, 2·pairs) long: the index of each row's copy in its table."""

    values: Tensor
    masked: Tensor
    duplicate: Tensor

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def query_rows(self) -> Tensor:
        """(tables, 2·pairs) bool: True at the rows whose target is masked."""
        return self.masked[..., -1]


def _check_positive(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def table_lookup(num_tables: int, pairs: int = 8, attributes: int = 4, categories: int = 8, seed: int = 0) -> TableLookupData:
    """`num_tables` lookup tables of 2·`pairs` rows (see the module doc); deterministic in `seed` (numpy)."""
    t = _check_positive("num_tables", num_tables, 1)
    p = _check_positive("pairs", pairs, 1)
    f = _check_positive("attributes", attributes, 2)
    c = _check_positive("categories", categories, 2)
    space = c ** (f - 1)
    if space < p:
        raise ValueError(f"pairs: expected <= categories^(attributes − 1) = {space} distinct feature rows, got {p}")
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.choice(space, size=p, replace=False) for _ in range(t)])  # (t, p) distinct per table
    digits = (codes[..., None] // c ** np.arange(f - 1)) % c  # (t, p, f − 1)
    targets = rng.integers(0, c, size=(t, p, 1))
    rows = np.concatenate([digits, targets], -1)
    values = np.concatenate([rows, rows], 1)  # rows 0 … p−1 the queries, p … 2p−1 their duplicates
    masked = np.zeros(values.shape, dtype=bool)
    masked[:, :p, -1] = True
    duplicate = np.concatenate([np.arange(p, 2 * p), np.arange(p)])
    order = rng.permuted(np.tile(np.arange(2 * p), (t, 1)), axis=1)  # new row r holds old row order[r]
    where = np.argsort(order, axis=1)  # old row -> new row
    values = np.take_along_axis(values, order[..., None], 1)
    masked = np.take_along_axis(masked, order[..., None], 1)
    duplicate = np.take_along_axis(where, duplicate[order], 1)
    return TableLookupData(torch.from_numpy(values), torch.from_numpy(masked), torch.from_numpy(duplicate))


add(
    Spec(
        name="table-lookup",
        kind="task",
        paper=NPT_PAPER,
        factory=table_lookup,
        family="G",
        summary="NPT's lookup: duplicated rows, the target masked in one copy, recovered only by attending between rows",
        params=(
            Param("num_tables", int, doc="number of tables", low=1),
            Param("pairs", int, 8, "datapoints per table, each present twice (2·pairs rows)", low=1),
            Param("attributes", int, 4, "cells per row: attributes − 1 features and the target", low=2),
            Param("categories", int, 8, "classes of every cell (chance = 1/categories)", low=2),
            Param("seed", int, 0, "seed of the numpy Generator"),
        ),
    )
)
