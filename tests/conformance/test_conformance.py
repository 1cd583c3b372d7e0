"""The conformance suite over every registered mechanism (see attnlab/testing.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import testing
from attnlab.core.errors import ShapeError
from attnlab.core.module import Attention

NAMES = [spec.name for spec in attnlab.list_mechanisms()]
KNOWN_FAILURES: dict[tuple[str, str], str] = {}  # (mechanism, check) -> why, run as xfail(strict=True)


def _cases() -> list:
    out = []
    for name in NAMES:
        for check in sorted(testing.CHECKS):
            why = KNOWN_FAILURES.get((name, check))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=why)] if why else []
            out.append(pytest.param(name, check, marks=marks, id=f"{name}-{check}"))
    return out


@pytest.mark.parametrize(("name", "check"), _cases())
def test_conformance(name: str, check: str) -> None:
    testing.CHECKS[check](attnlab.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_complete(name: str) -> None:
    spec = attnlab.get(name)
    assert spec.paper.title and spec.paper.year >= 1990
    assert spec.paper.id is None or (spec.paper.id.startswith("P") and len(spec.paper.id) == 4)
    assert spec.family in "ABCDEFG"
    assert spec.cost and spec.cost.startswith("O(") and spec.exponent is not None and 0 < spec.exponent <= 3
    assert spec.supports is not None and spec.supports.grids


@pytest.mark.parametrize("name", [n for n in NAMES if 1 in attnlab.get(n).supports.grids])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), n=st.integers(1, 12), heads=st.integers(1, 3), head_dim=st.sampled_from([2, 4, 6]))
def test_property_shapes(name: str, batch: int, n: int, heads: int, head_dim: int) -> None:
    """Random small shapes: output shape, fast == reference, rows of materialize sum to 1."""
    spec = attnlab.get(name)
    params = {"dim": 8, "heads": heads, "head_dim": head_dim, **spec.test_params}
    for key in testing.PER_HEAD:  # one value per head: cycled to this head count
        if isinstance(params.get(key), tuple):
            params[key] = tuple(params[key][i % len(params[key])] for i in range(heads))
    m = spec.build(**params).double()  # every head count and head_dim drawn here is in range
    x = torch.randn(batch, n, 8, dtype=torch.float64)
    try:
        fast = m(x)
    except ShapeError as exc:  # a length the mechanism's window or group cannot cut: the message names that size
        named = str(exc).split(":")[0]
        assert named in spec.test_params and str(n) in str(exc), str(exc)
        return
    assert fast.shape == x.shape
    torch.testing.assert_close(fast, m(x, impl="reference"), atol=testing.ATOL64, rtol=testing.RTOL64)
    if spec.normalized and spec.supports.materialize:
        a = m.materialize(x)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


class _LeakyAttention(Attention):
    """Planted fault: the causal mask lets each query see the next token (fast and reference agree)."""

    def _leaky(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if not self.causal:
            return mask
        n_q, n_k = q.shape[2], k.shape[2]
        return torch.ones(n_q, n_k, dtype=torch.bool).triu(2).logical_not()[None, None]

    def attend_fast(self, q, k, v, mask):  # type: ignore[no-untyped-def]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self._leaky(q, k, mask))

    def attend_reference(self, q, k, v, mask):  # type: ignore[no-untyped-def]
        from attnlab.core.reference import softmax_attention_reference

        return softmax_attention_reference(q, k, v, mask=self._leaky(q, k, mask))


def test_suite_catches_a_mechanism_that_leaks_the_future() -> None:
    from attnlab.core.registry import Paper, Supports, register, remove

    register(
        name="planted-leak", paper=Paper(None, "planted fault", 2026), family="A", cost="O(N²d)", exponent=2.0,
        supports=Supports(causal=True, key_padding=False),
    )(_LeakyAttention)
    try:
        spec = attnlab.get("planted-leak")
        testing.check_fast_matches_reference(spec)  # the fault is consistent, so this passes ...
        with pytest.raises(AssertionError, match="leaks the future"):
            testing.check_no_future_leakage(spec)  # ... and the leakage check catches it
    finally:
        remove("planted-leak")
    assert "planted-leak" not in [s.name for s in attnlab.list_mechanisms()]


def test_suite_catches_a_fast_path_that_differs_from_its_reference() -> None:
    from attnlab.core.registry import Paper, Supports, register, remove
    from attnlab.mechanisms.dense.softmax import SoftmaxAttention

    class OffByScale(SoftmaxAttention):
        def attend_fast(self, q, k, v, mask):  # type: ignore[no-untyped-def]
            return super().attend_fast(q * 1.001, k, v, mask)

    register(name="planted-drift", paper=Paper(None, "planted fault", 2026), family="A", cost="O(N²d)",
             exponent=2.0, supports=Supports(causal=True, key_padding=True))(OffByScale)
    try:
        with pytest.raises(AssertionError, match="forward"):
            testing.check_fast_matches_reference(attnlab.get("planted-drift"))
    finally:
        remove("planted-drift")
