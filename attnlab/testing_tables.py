"""The conformance suite of the `table` kind: checks every registered table module must pass.

A table module (`attnlab.mechanisms.tables.base.TableAttention`) maps a table (batch, rows, attributes, dim) to
the same shape, with `row_mask` (batch, rows), True = real row; `materialize(x, layer=)` gives the row attention
(batch, heads, rows, rows) of a layer, `materialize_attributes(x, layer=)` the attention between the attributes of
each row (batch, rows, heads, attributes, attributes). Each `check_*` takes the entry and raises AssertionError on
a failure; tests/conformance/test_tables.py runs them over every table entry (`run_all(spec)` for one's own).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from .core.registry import Spec
from .mechanisms.tables.base import TableAttention
from .testing import _close, _raises

DIM, BATCH, ROWS = 16, 3, 7
SETTINGS_DIM = 12  # divisible by 3 and 6 heads
HEADS_SETTINGS = (3, 6)


def build(spec: Spec, *, seed: int = 0, dtype: torch.dtype = torch.float64, **over: Any) -> TableAttention:
    """The entry at the suite's small size (dim 16, 2 heads, its test parameters), in `dtype`, eval mode."""
    torch.manual_seed(seed)
    return cast(TableAttention, spec.build(**{"dim": DIM, "heads": 2, **spec.test_params, **over}).to(dtype).eval())


def table(m: TableAttention, *, batch: int = BATCH, rows: int = ROWS, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    """A random table (batch, rows, m.attributes, m.dim)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, rows, m.attributes, m.dim, generator=gen, dtype=dtype)


def padding(batch: int = BATCH, rows: int = ROWS) -> Tensor:
    """Row keep-mask: table 0 has its last 3 rows padded, table 1 its first one, the rest are whole."""
    keep = torch.ones(batch, rows, dtype=torch.bool)
    keep[0, rows - 3 :] = False
    keep[1, 0] = False
    return keep


def _grad(module: nn.Module, x: Tensor, weight: Tensor, **kw: Any) -> list[Tensor]:
    """Gradients of Σ weight·module(x, **kw) with respect to x and the parameters."""
    x = x.clone().requires_grad_(True)
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((module(x, **kw) * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _layers(read: Callable[..., Tensor], x: Tensor, **kw: Any) -> list[Tensor]:
    """The weights of every layer of a materialize method (layer 0, 1, … until it refuses the index)."""
    found: list[Tensor] = []
    while True:
        try:
            found.append(read(x, layer=len(found), **kw))
        except ValueError:
            return found


def check_shapes(spec: Spec) -> None:
    """Output of the input's shape and dtype; every row attention layer (batch, heads, rows, rows) and attribute
    layer (batch, rows, heads, f, f) with rows summing to 1 where the entry normalises; an index past the layers
    is refused naming `layer`."""
    m = build(spec)
    x = table(m)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype, f"forward: expected {tuple(x.shape)} {x.dtype}, got {tuple(y.shape)} {y.dtype}"
    f = m.attributes
    row_layers, attribute_layers = _layers(m.materialize, x), _layers(m.materialize_attributes, x)
    assert row_layers, f"{spec.name}: materialize gives no row attention layer"
    for w in row_layers:
        assert w.shape == (BATCH, m.heads, ROWS, ROWS), f"materialize: expected {(BATCH, m.heads, ROWS, ROWS)}, got {tuple(w.shape)}"
    for w in attribute_layers:
        assert w.shape == (BATCH, ROWS, m.heads, f, f), f"materialize_attributes: expected {(BATCH, ROWS, m.heads, f, f)}, got {tuple(w.shape)}"
    if spec.normalized:
        for w in row_layers + attribute_layers:
            _close(w.sum(-1), torch.ones_like(w.sum(-1)), f"{spec.name}: attention rows do not sum to 1")
    _raises(lambda: m.materialize(x, layer=len(row_layers)), (ValueError,), "a layer past the last", "layer: expected")


def check_fast_matches_reference(spec: Spec) -> None:
    """Fast path == reference in float64, forward and backward (input and parameters), with and without padding;
    also at 3 and 6 heads (dim 12)."""
    cases: list[tuple[str, dict[str, Any]]] = [("default", {})]
    cases += [(f"heads={h}", {"heads": h, "dim": SETTINGS_DIM}) for h in HEADS_SETTINGS]
    for label, over in cases:
        m = build(spec, **over)
        x = table(m)
        for mask_label, kw in (("no mask", {}), ("row_mask", {"row_mask": padding()})):
            what = f"{spec.name} ({label}, {mask_label})"
            fast, ref = m(x, **kw), m(x, impl="reference", **kw)
            _close(fast, ref, f"{what} forward")
            w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
            for i, (a, b) in enumerate(zip(_grad(m, x, w, **kw), _grad(m, x, w, impl="reference", **kw))):
                _close(a, b, f"{what} backward, input {i}")


def check_row_permutation(spec: Spec) -> None:
    """Permuting the rows (and the row_mask alike) permutes the output alike, both paths; every layer's row
    weights follow the permutation on both axes, the attribute weights on their row axis."""
    m = build(spec)
    x, keep = table(m), padding()
    perm = torch.randperm(ROWS, generator=torch.Generator().manual_seed(4))
    for impl in ("fast", "reference"):
        for kw, kw_perm in (({}, {}), ({"row_mask": keep}, {"row_mask": keep[:, perm]})):
            _close(m(x[:, perm], impl=impl, **kw_perm), m(x, impl=impl, **kw)[:, perm],
                   f"{spec.name} ({impl}{', padded' if kw else ''}): permuting the rows does not permute the output alike")
    for a, b in zip(_layers(m.materialize, x[:, perm]), _layers(m.materialize, x)):
        _close(a, b[:, :, perm][..., perm], f"{spec.name}: materialize does not follow a permutation of the rows")
    for a, b in zip(_layers(m.materialize_attributes, x[:, perm]), _layers(m.materialize_attributes, x)):
        _close(a, b[:, perm], f"{spec.name}: materialize_attributes does not follow a permutation of the rows")


def check_row_padding(spec: Spec) -> None:
    """Padded rows change nothing at the real rows and come out as zeros (both paths); the row_mask as bool and as
    0/1 integers agree; a table padded after (and before) its real rows equals the real rows run alone; the
    weights are zero on padded rows (as keys and as queries)."""
    m = build(spec)
    x, keep = table(m), padding()
    changed = x.clone()
    changed[~keep] = 100 * torch.randn(int((~keep).sum()), m.attributes, m.dim, dtype=x.dtype)
    for impl in ("fast", "reference"):
        a = m(x, row_mask=keep, impl=impl)
        _close(m(changed, row_mask=keep, impl=impl), a, f"{spec.name} ({impl}): padded rows change the real rows")
        assert a[~keep].abs().max().item() == 0.0, f"{spec.name} ({impl}): padded rows do not come out as zeros"
        _close(m(x, row_mask=keep.long(), impl=impl), a, f"{spec.name} ({impl}): a 0/1 row_mask differs from the bool one")
    real = table(m, batch=1, rows=4)
    junk = 10 * table(m, batch=1, rows=3, seed=9)
    for place, x2 in (("after", torch.cat([real, junk], 1)), ("before", torch.cat([junk, real], 1))):
        rows = slice(0, 4) if place == "after" else slice(3, 7)
        keep2 = torch.zeros(1, 7, dtype=torch.bool)
        keep2[:, rows] = True
        for impl in ("fast", "reference"):
            _close(m(x2, row_mask=keep2, impl=impl)[:, rows], m(real, impl=impl),
                   f"{spec.name} ({impl}): padding {place} the real rows changes them (!= the real rows alone)")
    for w in _layers(m.materialize, x, row_mask=keep):
        assert w.permute(0, 3, 1, 2)[~keep].abs().max().item() == 0.0, f"{spec.name}: row weights on padded keys"
        assert w.permute(0, 2, 1, 3)[~keep].abs().max().item() == 0.0, f"{spec.name}: row weights of padded queries"
    for w in _layers(m.materialize_attributes, x, row_mask=keep):
        assert w[~keep].abs().max().item() == 0.0, f"{spec.name}: attribute weights of padded rows"


def check_fully_masked(spec: Spec) -> None:
    """A table with no real row: zeros, finite gradients (no NaN) that do not reach its cells, zero weights; the
    other tables unchanged."""
    m = build(spec)
    x = table(m)
    keep = torch.ones(BATCH, ROWS, dtype=torch.bool)
    keep[1] = False
    for impl in ("fast", "reference"):
        xg = x.clone().requires_grad_(True)
        y = m(xg, row_mask=keep, impl=impl)
        assert torch.isfinite(y).all(), f"{spec.name} ({impl}): NaN/Inf for a table with no real row"
        assert y[1].abs().max().item() == 0.0, f"{spec.name} ({impl}): a table with no real row is not zero"
        (g,) = torch.autograd.grad(y.sum(), xg)
        assert torch.isfinite(g).all(), f"{spec.name} ({impl}): NaN/Inf gradient for a table with no real row"
        assert g[1].abs().max().item() == 0.0, f"{spec.name} ({impl}): a table with no real row depends on its cells"
        _close(y[[0, 2]], m(x[[0, 2]], impl=impl), f"{spec.name} ({impl}): an empty table changes the others")
    for w in _layers(m.materialize, x, row_mask=keep):
        assert torch.isfinite(w).all() and w[1].abs().max().item() == 0.0, f"{spec.name}: weights of an empty table"


def check_batch_independence(spec: Spec) -> None:
    """Each table's result depends on that table alone (both paths, with padding too)."""
    m = build(spec)
    x, keep = table(m), padding()
    for impl in ("fast", "reference"):
        for kw in ({}, {"row_mask": keep}):
            whole = m(x, impl=impl, **kw)
            for i in range(BATCH):
                one = {k: v[i : i + 1] for k, v in kw.items()}
                _close(whole[i : i + 1], m(x[i : i + 1], impl=impl, **one),
                       f"{spec.name} ({impl}, {'padded' if kw else 'no mask'}): table {i} depends on the other tables")
        scaled = x.clone()
        scaled[1:] = 7 * scaled[1:] - 3
        _close(m(scaled, impl=impl)[:1], m(x, impl=impl)[:1],
               f"{spec.name} ({impl}): table 0 changes when the other tables are rescaled")


def check_bad_inputs(spec: Spec) -> None:
    """Bad inputs raise ValueError/TypeError naming the argument."""
    m = build(spec)
    x = table(m)
    ones = torch.ones(BATCH, ROWS, dtype=torch.bool)
    _raises(lambda: m(x[0]), (ValueError,), "input of the wrong rank", "x: expected a 4-D tensor")
    _raises(lambda: m(x[:, :, :1]), (ValueError,), "wrong number of attributes", "x: expected attributes=")
    _raises(lambda: m(torch.cat([x, x[..., :1]], -1)), (ValueError,), "wrong width", "x: expected last dimension dim=")
    _raises(lambda: m(x.to(torch.int64)), (TypeError,), "integer input", "x: expected a floating-point")
    nan = x.clone()
    nan[0, 2, 0, 3] = float("nan")
    _raises(lambda: m(nan), (ValueError,), "NaN input", "x: expected finite")
    _raises(lambda: m(x.float()), (TypeError,), "dtype other than the module's", "x: ")
    _raises(lambda: m(x, row_mask=ones[:, :-1]), (ValueError,), "row_mask of the wrong shape", "row_mask: expected shape")
    _raises(lambda: m(x, row_mask=ones.double()), (TypeError,), "a float row_mask", "row_mask: expected dtype")
    _raises(lambda: m(x, row_mask=2 * ones.long()), (ValueError,), "row_mask values other than 0/1", "row_mask: expected 0/1")
    _raises(lambda: m(x, row_mask=[[True] * ROWS] * BATCH), (TypeError,), "a list row_mask", "row_mask: expected a torch.Tensor")
    _raises(lambda: m(x, impl="slow"), (ValueError,), "unknown impl", "impl: expected")


def check_state_dict(spec: Spec) -> None:
    """A state_dict loaded into a fresh module reproduces the result exactly."""
    a, b = build(spec, seed=0), build(spec, seed=1)
    b.load_state_dict(a.state_dict())
    x = table(a)
    _close(a(x), b(x), f"{spec.name}: state_dict round trip changes the result", atol=0.0, rtol=0.0)


def check_float32(spec: Spec) -> None:
    """A float32 module (fast, reference, materialize) is within 1e-4 of float64."""
    m64, m32 = build(spec), build(spec, dtype=torch.float32)
    x, keep = table(m64), padding()
    for impl in ("fast", "reference"):
        y32 = m32(x.float(), row_mask=keep, impl=impl)
        assert y32.dtype == torch.float32, f"{spec.name}: float32 {impl} returns {y32.dtype}"
        _close(y32.double(), m64(x, row_mask=keep, impl=impl), f"{spec.name}: float32 {impl}", atol=1e-4, rtol=1e-3)
    _close(m32.materialize(x.float()).double(), m64.materialize(x), f"{spec.name}: float32 materialize", atol=1e-4, rtol=1e-3)


CHECKS: dict[str, Callable[[Spec], None]] = {
    "shapes": check_shapes,
    "fast_matches_reference": check_fast_matches_reference,
    "row_permutation": check_row_permutation,
    "row_padding": check_row_padding,
    "fully_masked": check_fully_masked,
    "batch_independence": check_batch_independence,
    "bad_inputs": check_bad_inputs,
    "state_dict": check_state_dict,
    "float32": check_float32,
}


def run_all(spec: Spec) -> None:
    """Run every table check on one entry; the first failure raises AssertionError."""
    for check in CHECKS.values():
        check(spec)
