"""The conformance suite of the table kind over every registered table entry, and planted faults it catches."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import testing_tables
from attnlab.core.registry import Paper, Supports, entries, register, remove
from attnlab.mechanisms.tables.base import TableAttention, TableWeights

TABLES = [s.name for s in entries("table")]


@pytest.mark.parametrize(("name", "check"), [(n, c) for n in TABLES for c in sorted(testing_tables.CHECKS)])
def test_table_conformance(name: str, check: str) -> None:
    testing_tables.CHECKS[check](attnlab.get(name, "table"))


class _RowSoftmax(TableAttention):
    """A correct table module for the planted faults: one head of softmax attention between the flattened rows
    (q = k = v = the row), the real rows as keys."""

    def __init__(self, dim: int, heads: int = 1, *, attributes: int = 2) -> None:
        super().__init__(dim, heads, attributes=attributes)
        self.scale = torch.nn.Parameter(torch.tensor(0.1))

    def logits(self, rows: Tensor) -> Tensor:
        return self.scale * rows @ rows.transpose(1, 2)

    def table_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self.table_reference(x, keep).out.to(x.dtype)

    def table_reference(self, x: Tensor, keep: Tensor | None) -> TableWeights:
        rows = x.flatten(2)
        logits = self.logits(rows)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
        w = torch.softmax(logits, -1).nan_to_num(0.0)
        if keep is not None:
            w = w * keep[:, :, None]
        heads = w.unsqueeze(1).expand(-1, self.heads, -1, -1)
        return TableWeights((w @ rows).view_as(x), (heads,), ())


class _RowPositions(_RowSoftmax):
    """Planted fault: a bias by row index (the rows' order leaks in), on both paths."""

    def logits(self, rows: Tensor) -> Tensor:
        n = rows.shape[1]
        return super().logits(rows) + torch.arange(n, dtype=rows.dtype, device=rows.device)


class _PaddingBlindFast(_RowSoftmax):
    """Planted fault: the fast path lets padded rows be keys (the reference is right)."""

    def table_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self.table_reference(x, None).out.to(x.dtype)


def _planted(cls: type, name: str) -> attnlab.Spec:
    register(name=name, kind="table", paper=Paper(None, "planted fault", 2026), family="B", cost="O(n² f e)",
             exponent=2.0, supports=Supports(key_padding=True, order_invariant=True))(cls)
    return attnlab.get(name, "table")


def test_table_suite_passes_a_correct_module() -> None:
    try:
        testing_tables.run_all(_planted(_RowSoftmax, "planted-row-softmax"))
    finally:
        remove("planted-row-softmax", "table")


def test_table_suite_catches_a_module_that_depends_on_the_order_of_the_rows() -> None:
    spec = _planted(_RowPositions, "planted-row-positions")
    try:
        testing_tables.check_fast_matches_reference(spec)  # consistent on both paths ...
        with pytest.raises(AssertionError, match="permuting the rows does not permute the output alike"):
            testing_tables.check_row_permutation(spec)  # ... caught here
    finally:
        remove("planted-row-positions", "table")
    assert "planted-row-positions" not in [s.name for s in entries("table")]


def test_table_suite_catches_a_fast_path_that_ignores_padding() -> None:
    spec = _planted(_PaddingBlindFast, "planted-padding-blind-table")
    try:
        for check in (testing_tables.check_fast_matches_reference, testing_tables.check_row_padding):
            with pytest.raises(AssertionError):
                check(spec)
    finally:
        remove("planted-padding-blind-table", "table")


def test_row_mask_is_checked_by_name() -> None:
    m = attnlab.build("npt", dim=8, heads=2, attributes=2)
    x = torch.randn(2, 3, 2, 8)
    with pytest.raises(ValueError, match=r"^row_mask: expected shape \(batch, rows\) = \(2, 3\), got \(3, 2\)"):
        m(x, row_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^layer: expected an int in \[-1, 1\), got 1"):
        m.materialize(x, layer=1)
