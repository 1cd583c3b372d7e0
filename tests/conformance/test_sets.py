"""The conformance suite of the set kind over every registered set entry, and planted faults it catches."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import attnlab
from attnlab import testing_sets
from attnlab.core.registry import Paper, Supports, entries, register, remove
from attnlab.mechanisms.sets.base import SetAttention

SETS = [s.name for s in entries("set")]


@pytest.mark.parametrize(("name", "check"), [(n, c) for n in SETS for c in sorted(testing_sets.CHECKS)])
def test_set_conformance(name: str, check: str) -> None:
    testing_sets.CHECKS[check](attnlab.get(name, "set"))


class _DistanceSoftmax(SetAttention):
    """A correct set module for the planted faults: one head, softmax over the real points of
    q_iᵀk_j/√d − |p_i − p_j|², values v_j (translation invariant)."""

    translation_invariant = True

    def __init__(self, dim: int, heads: int = 1) -> None:
        super().__init__(dim, 1, 3)
        self.qkv = nn.Linear(dim, 3 * dim)

    def logits(self, x: Tensor, pos: Tensor) -> Tensor:
        q, k, _ = self.qkv(x).chunk(3, -1)
        return q @ k.transpose(1, 2) / self.dim**0.5 - torch.cdist(pos, pos) ** 2

    def set_fast(self, x: Tensor, pos: Tensor, keep: Tensor | None) -> Tensor:
        return self.set_reference(x, pos, keep)[0]

    def set_reference(self, x: Tensor, pos: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.logits(x, pos)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
        w = torch.softmax(logits, -1).nan_to_num(0.0)
        return w @ self.qkv(x).chunk(3, -1)[2], w[:, None]


class _OrderDependent(_DistanceSoftmax):
    """Planted fault: the logits carry a bias by point index (j − i)/n, as a sequence model's relative position
    would: consistent on both paths, the padding respected, but the output depends on the order of the points."""

    def logits(self, x: Tensor, pos: Tensor) -> Tensor:
        index = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)
        return super().logits(x, pos) + (index[None, :] - index[:, None]) / x.shape[1]


class _TranslationDependent(_DistanceSoftmax):
    """Planted fault: declared translation invariant, but the logits see the absolute coordinates (p_i·p_j)."""

    def logits(self, x: Tensor, pos: Tensor) -> Tensor:
        return super().logits(x, pos) + pos @ pos.transpose(1, 2)


def _planted(cls: type, name: str) -> attnlab.Spec:
    register(name=name, kind="set", paper=Paper(None, "planted fault", 2026), family="A", cost="O(N² d)",
             exponent=2.0, supports=Supports(key_padding=True, order_invariant=True))(cls)
    return attnlab.get(name, "set")


def test_set_suite_passes_a_correct_set_module() -> None:
    try:
        testing_sets.run_all(_planted(_DistanceSoftmax, "planted-distance-softmax"))
    finally:
        remove("planted-distance-softmax", "set")


def test_set_suite_catches_a_module_that_depends_on_the_order_of_the_points() -> None:
    spec = _planted(_OrderDependent, "planted-order-dependent")
    try:
        testing_sets.check_fast_matches_reference(spec)  # consistent on both paths ...
        testing_sets.check_key_padding(spec)  # ... the padding respected ...
        with pytest.raises(AssertionError, match="depends on their order"):
            testing_sets.check_permutation_equivariance(spec)  # ... caught here
    finally:
        remove("planted-order-dependent", "set")
    assert "planted-order-dependent" not in [s.name for s in entries("set")]


def test_set_suite_catches_a_module_declared_translation_invariant_that_is_not() -> None:
    spec = _planted(_TranslationDependent, "planted-translation-dependent")
    try:
        testing_sets.check_permutation_equivariance(spec)
        with pytest.raises(AssertionError, match="declared translation invariant"):
            testing_sets.check_translation_invariance(spec)
    finally:
        remove("planted-translation-dependent", "set")
