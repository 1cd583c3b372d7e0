"""Bad input and hazards: cost follows the input, bad values get named errors (issue 11)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab

N, HUGE = 16, 4096


class _Peak(TorchDispatchMode):
    """Records the largest tensor any op returns (elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


# (entry, knob, extra parameters): every chunk or block knob of a sequence mechanism
KNOBS = [
    ("delta", "chunk_size", {}), ("retention", "chunk_size", {}), ("gated-linear", "chunk_size", {}),
    ("linear", "chunk_size", {"causal": True}), ("miras", "chunk_size", {"causal": True}),
    ("dhsa", "chunk_size", {"top_chunks": 1}), ("power-attention", "block_size", {}),
    ("sliding-window", "block_size", {"radius": 3}), ("mra", "block_size", {"blocks": 2}),
    ("combiner", "block_size", {}), ("mamba", "chunk_size", {}),
]


@pytest.mark.parametrize(("name", "knob", "extra"), KNOBS, ids=[k[0] for k in KNOBS])
def test_chunk_and_block_capped_by_the_input(name: str, knob: str, extra: dict[str, Any]) -> None:
    """At 16 tokens a chunk or block of 4096 builds nothing larger than a chunk of 16 does, and gives the same output."""
    torch.manual_seed(0)
    x = torch.randn(2, N, 16, dtype=torch.float64)
    outs, peaks = [], []
    for size in (N, HUGE):
        torch.manual_seed(1)
        m = attnlab.build(name, dim=16, heads=2, **{knob: size}, **extra).double().eval()
        for impl in ("fast", "reference"):
            peak = _Peak()
            with torch.no_grad(), peak:
                out = m(x, impl=impl)
            outs.append(out)
            peaks.append(peak.peak)
    torch.testing.assert_close(outs[2], outs[0])  # fast, knob 4096 vs knob 16
    torch.testing.assert_close(outs[3], outs[1])
    assert peaks[2] <= max(peaks[0], 4 * N * N * 16), (peaks, name)
    assert peaks[3] <= max(peaks[1], 4 * N * N * 16), (peaks, name)


def _float_params() -> list[tuple[str, str]]:
    out = []
    for spec in attnlab.list_mechanisms():
        for p in spec.params:
            types = p.type if isinstance(p.type, tuple) else (p.type,)
            if float in types and not p.allow_inf:
                out.append((spec.name, p.name))
    return out


FLOAT_PARAMS = _float_params()


def test_float_params_found() -> None:
    assert ("mamba", "dt_max") in FLOAT_PARAMS and len(FLOAT_PARAMS) >= 15


@pytest.mark.parametrize(("name", "param"), FLOAT_PARAMS, ids=[f"{n}-{p}" for n, p in FLOAT_PARAMS])
def test_non_finite_float_parameters_refused(name: str, param: str) -> None:
    """inf, -inf and NaN are refused by name for every float parameter (mamba dt_max=inf gave NaN outputs)."""
    spec = attnlab.get(name)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(attnlab.core.errors.ParameterError, match=rf"'{param}' expected a finite float, got"):
            spec.build(dim=16, heads=2, **{**spec.test_params, param: bad})


ATTN_MASK = [s.name for s in attnlab.list_mechanisms() if s.supports is not None and s.supports.attn_mask]


def test_attn_mask_entries_found() -> None:
    assert "softmax" in ATTN_MASK and len(ATTN_MASK) >= 5


@pytest.mark.parametrize("name", ATTN_MASK)
def test_additive_attn_mask_with_plus_inf_refused(name: str) -> None:
    """An additive attn_mask holding +inf (it gave NaN outputs) or NaN is a MaskError; -inf still blocks."""
    spec = attnlab.get(name)
    m = spec.build(dim=16, heads=2, **spec.test_params).double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    for bad, needle in ((float("inf"), r"attn_mask: expected .*got \+inf"), (float("nan"), "attn_mask: expected no NaN")):
        mask = torch.zeros(6, 6, dtype=torch.float64)
        mask[2, 3] = bad
        with pytest.raises(attnlab.core.errors.MaskError, match=needle):
            m(x, attn_mask=mask)
    blocked = torch.zeros(6, 6, dtype=torch.float64)
    blocked[2, 3] = float("-inf")
    assert bool(torch.isfinite(m(x, attn_mask=blocked)).all())
    assert m.materialize(x, attn_mask=blocked)[:, :, 2, 3].abs().max().item() == 0.0


def _decoder(spec: Any) -> torch.nn.Module:
    kw: dict[str, Any] = {"dim": 16, "heads": 2, **spec.test_params}
    if any(p.name == "causal" for p in spec.params):
        kw["causal"] = True
    return spec.build(**kw).eval()


DECODERS = [s.name for s in attnlab.list_mechanisms() if s.supports is not None and s.supports.decode]


def test_decoders_found() -> None:
    assert {"softmax", "rope", "alibi", "mamba", "delta"} <= set(DECODERS)


@pytest.mark.parametrize("name", DECODERS)
def test_step_refuses_non_finite_x_t_and_keeps_the_state(name: str) -> None:
    """A NaN/Inf in x_t is refused by name before it reaches the cache or state; decoding then goes on unchanged."""
    m = _decoder(attnlab.get(name))
    torch.manual_seed(0)
    xs = torch.randn(2, 3, 16)
    with torch.no_grad():
        y0, state = m.step(xs[:, :1], None)
        for bad in (float("nan"), float("inf")):
            poisoned = xs[:, 1:2].clone()
            poisoned[1, 0, 5] = bad
            with pytest.raises(ValueError, match=r"x_t: expected finite values, got 1 NaN/Inf"):
                m.step(poisoned, state)
        y1, state = m.step(xs[:, 1:2], state)
        y2, _ = m.step(xs[:, 2:3], state)
        torch.testing.assert_close(torch.cat([y0, y1, y2], 1), m(xs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_step_state_of_another_batch_refused(name: str) -> None:
    """A state decoded at batch 2 given with x_t of batch 3: a ShapeError naming the state and both batches."""
    m = _decoder(attnlab.get(name))
    with torch.no_grad():
        _, state = m.step(torch.randn(2, 1, 16), None)
        with pytest.raises(attnlab.core.errors.ShapeError, match=r"state: expected .*3.*got .*2"):
            m.step(torch.randn(3, 1, 16), state)


@pytest.mark.parametrize("name", DECODERS)
def test_step_wrong_dtype_refused(name: str) -> None:
    m = _decoder(attnlab.get(name))
    with pytest.raises(attnlab.core.errors.DTypeError, match=r"x_t: expected dtype torch.float32 .*got torch.float64"):
        m.step(torch.randn(2, 1, 16, dtype=torch.float64), None)


@pytest.mark.parametrize("name", [s.name for s in attnlab.list_mechanisms()])
def test_forward_wrong_dtype_refused(name: str) -> None:
    """float64 tokens into a float32 module: a DTypeError naming x and the module's dtype (was torch's own error);
    under autocast the module casts, so nothing is refused."""
    from attnlab import testing

    spec = attnlab.get(name)
    m = testing.build(spec, dtype=torch.float32)
    x = testing.tokens(spec)
    for call in (lambda: m(x), lambda: m(x, impl="reference")):
        with pytest.raises(attnlab.core.errors.DTypeError, match=r"x: expected dtype torch.float32 .*got torch.float64"):
            call()


@pytest.mark.parametrize("name", [s.name for s in attnlab.list_mechanisms()])
def test_empty_inputs_refused_by_name(name: str) -> None:
    """No positions, an empty batch or an empty cross-attention context: a ShapeError naming the argument and its
    shape (they crashed with raw torch errors in reshape, conv or amax)."""
    from attnlab import testing

    spec = attnlab.get(name)
    assert spec.supports is not None
    m = testing.build(spec)
    pos = testing.positions(spec)
    needle = r"expected at least one batch element and one position on every axis, got shape \({}\)"
    for x in (torch.randn(2, 0, *pos[1:], 16, dtype=torch.float64), torch.randn(0, *pos, 16, dtype=torch.float64)):
        shape = ", ".join(str(s) for s in x.shape)
        with pytest.raises(attnlab.core.errors.ShapeError, match="x: " + needle.format(shape)):
            m(x)
        if spec.supports.materialize:
            with pytest.raises(attnlab.core.errors.ShapeError, match="x: " + needle.format(shape)):
                m.materialize(x)
    if spec.supports.cross:
        with pytest.raises(attnlab.core.errors.ShapeError, match="context: " + needle.format("2, 0, 16")):
            m(testing.tokens(spec), context=torch.randn(2, 0, 16, dtype=torch.float64))


@pytest.fixture
def memory_limit() -> Any:
    yield attnlab.set_memory_limit
    attnlab.set_memory_limit(None)


NO_DENSE_REFERENCE = {"mamba", "swiftformer", "han-layer-attention", "pkcam"}
"""Their references form no (n, n) matrix: a scan, an O(N) pool, an L × L layer map or channel scales."""


@pytest.mark.parametrize("name", [s.name for s in attnlab.list_mechanisms()])
def test_dense_paths_refused_above_the_memory_limit(name: str, memory_limit: Any) -> None:
    """materialize and impl='reference' estimate their float64 (batch, heads, n_q, n_k) matrix first and refuse it
    above the limit, naming the estimate; at a limit just above the estimate they run."""
    from attnlab import testing

    spec = attnlab.get(name)
    assert spec.supports is not None
    m, x = testing.build(spec), testing.tokens(spec)
    calls = ([m.materialize] if spec.supports.materialize else []) + ([] if name in NO_DENSE_REFERENCE else [
        lambda t: m(t, impl="reference")])
    n = int(torch.tensor(x.shape[1:-1]).prod())
    n_k = min(n, m.key_count(x.shape[1:-1])) if spec.supports.summary_keys else n  # keys the estimate counts
    heads = getattr(m, "heads", testing.HEADS)  # a convolutional mixer's maps are per channel: heads = dim
    memory_limit(8 * testing.BATCH * heads * n * n_k - 1)  # one byte short of the estimate
    for call in calls:
        with pytest.raises(attnlab.MemoryLimitError, match=r"expected at most .* GiB \(attnlab.set_memory_limit or "
                           r"ATTNLAB_MEMORY_LIMIT raises it\), got an estimate of .* GiB"):
            call(x)
    memory_limit(8 * testing.BATCH * heads * n * (n + 64))
    for call in calls:
        call(x)


def test_materialize_at_200k_tokens_refused_before_allocating(memory_limit: Any, monkeypatch: Any) -> None:
    """The issue's case: softmax materialize at N = 200k was OOM-killed; now refused with its 596 GiB estimate,
    under a limit set in code or in ATTNLAB_MEMORY_LIMIT."""
    m = attnlab.build("softmax", dim=16, heads=2)
    x = torch.randn(1, 200_000, 16)
    memory_limit(1 << 30)
    with pytest.raises(attnlab.MemoryLimitError, match=r"materialize: expected at most 1 GiB .*got an estimate of 596 GiB"):
        m.materialize(x)
    memory_limit(None)
    monkeypatch.setenv("ATTNLAB_MEMORY_LIMIT", str(2 << 30))
    assert attnlab.memory_limit() == 2 << 30
    with pytest.raises(attnlab.MemoryLimitError, match=r"impl='reference': expected at most 2 GiB .*596 GiB"):
        m(x, impl="reference")
    monkeypatch.setenv("ATTNLAB_MEMORY_LIMIT", "lots")
    with pytest.raises(attnlab.ParameterError, match="ATTNLAB_MEMORY_LIMIT: expected an int of bytes, got 'lots'"):
        attnlab.memory_limit()


def test_capture_of_a_float32_aggregated_module() -> None:
    """capture() on aggregated in float32, the default (the cpb MLP ran in float32 on a float64 table and raised):
    the recorded map equals the float64 materialize of the same weights."""
    from attnlab.analysis.capture import capture

    torch.manual_seed(0)
    m = attnlab.build("aggregated", dim=16, heads=2, kernel_size=3, pool_size=2, cpb_hidden=16).eval()
    x = torch.randn(1, 6, 6, 16)
    with capture(m) as att:
        m(x)
    assert att.num_layers == 1 and att.layers[0].dtype == torch.float32
    torch.testing.assert_close(att.layers[0].double(), m.double().materialize(x.double()), atol=1e-5, rtol=1e-4)
