"""The conformance suites of the pooling and block kinds over every registered entry, and planted faults they catch."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import attnlab
from attnlab import testing_blocks, testing_pooling
from attnlab.core.registry import Paper, Supports, entries, register, remove
from attnlab.mechanisms.pooling.base import AttentionPooling

POOLINGS = [s.name for s in entries("pooling")]
BLOCKS = [s.name for s in entries("block")]


@pytest.mark.parametrize(("name", "check"), [(n, c) for n in POOLINGS for c in sorted(testing_pooling.CHECKS)])
def test_pooling_conformance(name: str, check: str) -> None:
    testing_pooling.CHECKS[check](attnlab.get(name, "pooling"))


@pytest.mark.parametrize(("name", "check"), [(n, c) for n in BLOCKS for c in sorted(testing_blocks.CHECKS)])
def test_block_conformance(name: str, check: str) -> None:
    testing_blocks.CHECKS[check](attnlab.get(name, "block"))


class _QueryPooling(AttentionPooling):
    """A correct pooling for the planted faults: one learned query, softmax over the real tokens (single head)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1)
        self.query = nn.Parameter(torch.randn(dim))
        self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim)

    @property
    def queries(self) -> int:
        return 1

    def logits(self, x: Tensor) -> Tensor:
        return self.key(x) @ self.query / self.dim**0.5  # (batch, n)

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self.pool_reference(x, keep)[0]

    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.logits(x)
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        w = torch.softmax(logits, -1).nan_to_num(0.0)
        return (w.unsqueeze(1) @ self.value(x)), w[:, None, None, :]


class _BatchMinPooling(_QueryPooling):
    """Planted fault: logits shifted by the batch-wide minimum of the tokens (SimPool's official code normalises
    by a minimum over the whole batch) and scaled by it: a sample's result depends on the other samples."""

    def logits(self, x: Tensor) -> Tensor:
        return super().logits(x) * (1 + x.min().abs())


class _PaddingBlindPooling(_QueryPooling):
    """Planted fault: the fast path ignores the padding (the reference is right)."""

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self.pool_reference(x, None)[0]


def _planted(cls: type, name: str) -> attnlab.Spec:
    register(name=name, kind="pooling", paper=Paper(None, "planted fault", 2026), family="C", cost="O(N d)",
             exponent=1.0, supports=Supports(key_padding=True, order_invariant=True))(cls)
    return attnlab.get(name, "pooling")


def test_pooling_suite_passes_a_correct_pooling() -> None:
    try:
        testing_pooling.run_all(_planted(_QueryPooling, "planted-query-pooling"))
    finally:
        remove("planted-query-pooling", "pooling")


def test_pooling_suite_catches_a_pooling_that_mixes_the_samples_of_a_batch() -> None:
    spec = _planted(_BatchMinPooling, "planted-batch-min")
    try:
        testing_pooling.check_fast_matches_reference(spec)  # consistent on both paths ...
        with pytest.raises(AssertionError, match="depends on the other samples"):
            testing_pooling.check_batch_independence(spec)  # ... caught here
    finally:
        remove("planted-batch-min", "pooling")
    assert "planted-batch-min" not in [s.name for s in entries("pooling")]


def test_pooling_suite_catches_a_fast_path_that_ignores_padding() -> None:
    spec = _planted(_PaddingBlindPooling, "planted-padding-blind")
    try:
        for check in (testing_pooling.check_fast_matches_reference, testing_pooling.check_key_padding,
                      testing_pooling.check_padding_is_removal):
            with pytest.raises(AssertionError):
                check(spec)
    finally:
        remove("planted-padding-blind", "pooling")


def test_block_suite_catches_a_block_that_leaks_the_future() -> None:
    from attnlab.mechanisms.blocks.pre_norm import PreNormBlock

    class Leaky(PreNormBlock):
        def block(self, x, keep, impl):  # type: ignore[no-untyped-def]
            return super().block(x, keep, impl) + 0.1 * x.roll(-1, 1)  # each token sees the next one

    register(name="planted-leaky-block", kind="block", paper=Paper(None, "planted fault", 2026), family="C",
             cost="O(N²d)", exponent=2.0, supports=Supports(causal=True, key_padding=True, materialize=False))(Leaky)
    try:
        spec = attnlab.get("planted-leaky-block", "block")
        testing_blocks.check_fast_matches_reference(spec)
        with pytest.raises(AssertionError, match="leaks the future"):
            testing_blocks.check_no_future_leakage(spec)
    finally:
        remove("planted-leaky-block", "block")


def test_block_takes_any_mechanism_and_refuses_bad_mixers_by_name() -> None:
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    block = attnlab.build("pre-norm-block", dim=16, heads=2, mixer="alibi").double()
    assert isinstance(block.mixer, attnlab.get("alibi").factory)
    want = x + block.mixer(block.norm1(x))
    want = want + block.mlp(block.norm2(want))
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^causal: the mixer 'xcit' has no causal mode"):
        attnlab.build("pre-norm-block", dim=16, heads=2, mixer="xcit", causal=True)
    with pytest.raises(ValueError, match="^mixer: expected a mechanism over sequences"):
        attnlab.build("pre-norm-block", dim=16, heads=2, mixer="twins-lsa")
