"""The conformance suite of the `set` kind: checks every registered set module must pass.

A set module (`attnlab.mechanisms.sets.base.SetAttention`) maps points x (batch, n, dim) with coordinates
pos (batch, n, d_pos) to (batch, n, dim); padding comes as `attention_mask` (True/1 = real point) or
`key_padding_mask` (True = padding), never both; `materialize(x, pos)` gives (batch, heads, n, n). Each
`check_*` takes the entry and raises AssertionError on a failure; tests/conformance/test_sets.py runs them
over every set entry, a user can run them on their own (`run_all(attnlab.get("mine", "set"))`).
Translation invariance is checked where the module class declares `translation_invariant = True`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .core.registry import Spec
from .testing import _close, _raises

DIM, BATCH, N, PAD = 16, 3, 9, 3
SETTINGS_DIM = 12  # divisible by 3 and 6 heads
HEADS_SETTINGS = (3, 6)


def build(spec: Spec, *, seed: int = 0, dtype: torch.dtype = torch.float64, **over: Any) -> Any:
    """The entry at the suite's small size (dim 16 and its test parameters), in `dtype`, eval mode."""
    torch.manual_seed(seed)
    return spec.build(**{"dim": DIM, **spec.test_params, **over}).to(dtype).eval()


def points(module: Any, *, batch: int = BATCH, n: int = N, dim: int = DIM, seed: int = 1,
           dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Features (batch, n, dim) and coordinates (batch, n, d_pos): normal, distinct almost surely."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=gen, dtype=dtype)
    return x, torch.randn(batch, n, module.pos_dim, generator=gen, dtype=dtype)


def padding(batch: int = BATCH, n: int = N) -> Tensor:
    """Keep-mask: element 0 has its last PAD points padded, element 1 its first one and one in the middle."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[0, n - PAD :] = False
    keep[1, 0] = False
    keep[1, n // 2] = False
    return keep


def _grad(module: nn.Module, x: Tensor, pos: Tensor, weight: Tensor, **kw: Any) -> list[Tensor]:
    """Gradients of Σ weight·module(x, pos, **kw) with respect to x, pos and the parameters."""
    x, pos = x.clone().requires_grad_(True), pos.clone().requires_grad_(True)
    out = module(x, pos, **kw)
    inputs = [x, pos] + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def check_shapes(spec: Spec) -> None:
    """Output (batch, n, dim) in the input's dtype; materialize (batch, heads, n, n), rows summing to 1 where the
    entry normalises, zero rows and columns at padded points."""
    assert spec.supports is not None
    m = build(spec)
    x, pos = points(m)
    y = m(x, pos)
    assert y.shape == (BATCH, N, DIM), f"forward: expected {(BATCH, N, DIM)}, got {tuple(y.shape)}"
    assert y.dtype == x.dtype, f"forward: expected dtype {x.dtype}, got {y.dtype}"
    if not spec.supports.materialize:
        return
    keep = padding()
    a = m.materialize(x, pos, attention_mask=keep)
    assert a.shape == (BATCH, m.heads, N, N), f"materialize: expected {(BATCH, m.heads, N, N)}, got {tuple(a.shape)}"
    assert torch.isfinite(a).all(), f"{spec.name}: materialize has NaN/Inf"
    assert a.permute(0, 3, 1, 2)[~keep].abs().max().item() == 0.0, f"{spec.name}: materialize puts weight on padded points"
    assert a.permute(0, 2, 1, 3)[~keep].abs().max().item() == 0.0, f"{spec.name}: materialize has weights at padded points"
    if spec.normalized:
        rows = a.permute(0, 2, 1, 3)[keep].sum(-1)
        _close(rows, torch.ones_like(rows), f"{spec.name}: materialize rows of real points do not sum to 1")


def check_permutation_equivariance(spec: Spec) -> None:
    """Permuting the points (features, coordinates and padding alike) permutes the output and the weights alike."""
    m = build(spec)
    x, pos = points(m)
    keep = padding()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    for impl in ("fast", "reference"):
        for kw, kw_perm in (({}, {}), ({"attention_mask": keep}, {"attention_mask": keep[:, perm]})):
            what = f"{spec.name} ({impl}, {'padded' if kw else 'no mask'})"
            _close(m(x[:, perm], pos[:, perm], impl=impl, **kw_perm), m(x, pos, impl=impl, **kw)[:, perm],
                   f"{what}: permuting the points does not permute the output (the module depends on their order)")
    if spec.supports is not None and spec.supports.materialize:
        _close(m.materialize(x[:, perm], pos[:, perm]), m.materialize(x, pos)[:, :, perm][..., perm],
               f"{spec.name}: materialize does not follow a permutation of the points")


def check_key_padding(spec: Spec) -> None:
    """Padded points change nothing at the real points (features and coordinates, both paths) and give zero;
    the padding as attention_mask (bool, 0/1 ints) and as key_padding_mask (True = padding) agree."""
    m = build(spec)
    x, pos = points(m)
    keep = padding()
    x2, pos2 = x.clone(), pos.clone()
    x2[~keep] = 100 * torch.randn(int((~keep).sum()), DIM, dtype=x.dtype)
    pos2[~keep] = pos[keep][: int((~keep).sum())] + 1e-3  # moved next to real points: still never a neighbour
    for impl in ("fast", "reference"):
        a = m(x, pos, attention_mask=keep, impl=impl)
        _close(m(x2, pos2, attention_mask=keep, impl=impl), a, f"{spec.name} ({impl}): padded points change the result")
        assert a[~keep].abs().max().item() == 0.0, f"{spec.name} ({impl}): the output at padded points is not zero"
        _close(m(x, pos, key_padding_mask=~keep, impl=impl), a, f"{spec.name} ({impl}): key_padding_mask=~keep differs")
        _close(m(x, pos, attention_mask=keep.long(), impl=impl), a, f"{spec.name} ({impl}): a 0/1 attention_mask differs")


def check_padding_is_removal(spec: Spec) -> None:
    """A sample with padding before, among and after its real points gives, at the real points, what the real
    points give alone (both paths); a sample with no real point gives zeros, finite gradients, no NaN."""
    m = build(spec)
    real_x, real_pos = points(m, batch=1, n=6)
    junk_x, junk_pos = points(m, batch=1, n=PAD, seed=9)
    order = torch.tensor([6, 0, 1, 7, 2, 3, 4, 5, 8])  # junk at 0, 3 and 8
    x, pos = torch.cat([real_x, 10 * junk_x], 1)[:, order], torch.cat([real_pos, junk_pos], 1)[:, order]
    keep = order[None, :] < 6
    for impl in ("fast", "reference"):
        _close(m(x, pos, attention_mask=keep, impl=impl)[keep], m(real_x, real_pos, impl=impl)[0],
               f"{spec.name} ({impl}): padding changes the result at the real points (!= the real points alone)")
        xg = x.clone().requires_grad_(True)
        y = m(xg, pos, attention_mask=torch.zeros_like(keep), impl=impl)
        (g,) = torch.autograd.grad(y.sum(), xg)
        assert y.abs().max().item() == 0.0, f"{spec.name} ({impl}): a sample with no real point is not zero"
        assert torch.isfinite(g).all(), f"{spec.name} ({impl}): NaN/Inf gradient for a sample with no real point"


def check_batch_independence(spec: Spec) -> None:
    """Each sample's result depends on that sample alone (both paths, with padding too)."""
    m = build(spec)
    x, pos = points(m)
    keep = padding()
    for impl in ("fast", "reference"):
        for kw in ({}, {"attention_mask": keep}):
            whole = m(x, pos, impl=impl, **kw)
            for i in range(BATCH):
                one = {k: v[i : i + 1] for k, v in kw.items()}
                _close(whole[i : i + 1], m(x[i : i + 1], pos[i : i + 1], impl=impl, **one),
                       f"{spec.name} ({impl}, {'padded' if kw else 'no mask'}): sample {i} depends on the other samples")


def check_translation_invariance(spec: Spec) -> None:
    """Where the module class declares `translation_invariant = True`: out(x, pos + t) == out(x, pos)."""
    m = build(spec)
    if not getattr(m, "translation_invariant", False):
        return
    x, pos = points(m)
    shift = torch.randn(BATCH, 1, m.pos_dim, generator=torch.Generator().manual_seed(5), dtype=pos.dtype) * 3
    for impl in ("fast", "reference"):
        _close(m(x, pos + shift, impl=impl), m(x, pos, impl=impl),
               f"{spec.name} ({impl}): declared translation invariant, but translating the points changes the result")


def check_fast_matches_reference(spec: Spec) -> None:
    """Fast path == reference in float64, forward and backward (features, coordinates, parameters), with and
    without padding; also at 3 and 6 heads when the entry has a `heads` parameter."""
    cases: list[tuple[str, dict[str, Any], int]] = [("default", {}, DIM)]
    if any(p.name == "heads" for p in spec.params):
        cases += [(f"heads={h}", {"heads": h, "dim": SETTINGS_DIM}, SETTINGS_DIM) for h in HEADS_SETTINGS]
    for label, over, dim in cases:
        m = build(spec, **over)
        x, pos = points(m, dim=dim)
        for mask_label, kw in (("no mask", {}), ("attention_mask", {"attention_mask": padding()})):
            what = f"{spec.name} ({label}, {mask_label})"
            fast, ref = m(x, pos, **kw), m(x, pos, impl="reference", **kw)
            _close(fast, ref, f"{what} forward")
            w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
            gf, gr = _grad(m, x, pos, w, **kw), _grad(m, x, pos, w, impl="reference", **kw)
            for i, (a, b) in enumerate(zip(gf, gr)):
                _close(a, b, f"{what} backward, input {i}")


def check_bad_inputs(spec: Spec) -> None:
    """Bad inputs raise ValueError/TypeError naming the argument."""
    m = build(spec)
    x, pos = points(m)
    ones = torch.ones(BATCH, N, dtype=torch.bool)
    _raises(lambda: m(x[0], pos), (ValueError,), "features of the wrong rank", "x: expected a ")
    _raises(lambda: m(points(m, dim=DIM + 1)[0], pos), (ValueError,), "wrong model width", "x: expected last dimension dim=")
    _raises(lambda: m(x.to(torch.int64), pos), (TypeError,), "integer features", "x: expected a floating-point")
    nan = x.clone()
    nan[0, 2, 3] = float("nan")
    _raises(lambda: m(nan, pos), (ValueError,), "NaN features", "x: expected finite")
    _raises(lambda: m(x.float(), pos.float()), (TypeError,), "dtype other than the module's", "x: ")
    _raises(lambda: m(x, pos[0]), (ValueError,), "coordinates of the wrong rank", "pos: expected a 3-D")
    _raises(lambda: m(x, pos[:, :-1]), (ValueError,), "fewer coordinates than points", "pos: expected shape")
    _raises(lambda: m(x, torch.cat([pos, pos], -1)), (ValueError,), "wrong number of coordinates", "pos: expected shape")
    _raises(lambda: m(x, pos.to(torch.int64)), (TypeError,), "integer coordinates", "pos: expected a floating-point")
    _raises(lambda: m(x, pos.float()), (TypeError,), "coordinates of another dtype", "pos: expected dtype")
    inf = pos.clone()
    inf[1, 0, 0] = float("inf")
    _raises(lambda: m(x, inf), (ValueError,), "infinite coordinates", "pos: expected finite")
    _raises(lambda: m(x, pos, attention_mask=torch.ones(BATCH, N + 1, dtype=torch.bool)), (ValueError,), "attention_mask of the wrong shape", "attention_mask: ")
    _raises(lambda: m(x, pos, attention_mask=ones.double()), (TypeError,), "a float attention_mask", "attention_mask: ")
    _raises(lambda: m(x, pos, attention_mask=2 * ones.long()), (ValueError,), "attention_mask values other than 0/1", "attention_mask: ")
    _raises(lambda: m(x, pos, key_padding_mask=~ones[:, :-1]), (ValueError,), "key_padding_mask of the wrong shape", "key_padding_mask: ")
    _raises(lambda: m(x, pos, attention_mask=ones, key_padding_mask=~ones), (ValueError,), "both padding masks", "attention_mask, key_padding_mask: expected one of them")
    _raises(lambda: m(x, pos, impl="slow"), (ValueError,), "unknown impl", "impl: expected")


def check_state_dict(spec: Spec) -> None:
    """A state_dict loaded into a fresh module reproduces the result exactly."""
    a, b = build(spec, seed=0), build(spec, seed=1)
    b.load_state_dict(a.state_dict())
    x, pos = points(a)
    _close(a(x, pos), b(x, pos), f"{spec.name}: state_dict round trip changes the result", atol=0.0, rtol=0.0)


def check_float32(spec: Spec) -> None:
    """A float32 module (fast, reference and materialize) is within 1e-4 of float64."""
    assert spec.supports is not None
    m64, m32 = build(spec), build(spec, dtype=torch.float32)
    x, pos = points(m64)
    keep = padding()
    for impl in ("fast", "reference"):
        _close(m32(x.float(), pos.float(), attention_mask=keep, impl=impl).double(),
               m64(x, pos, attention_mask=keep, impl=impl), f"{spec.name}: float32 {impl}", atol=1e-4, rtol=1e-3)
    if spec.supports.materialize:
        _close(m32.materialize(x.float(), pos.float()).double(), m64.materialize(x, pos),
               f"{spec.name}: float32 materialize", atol=1e-4, rtol=1e-3)


def check_bench_inputs(spec: Spec) -> None:
    """`bench_inputs(batch, n, ...)` gives x (batch, n, dim) and pos (batch, n, d_pos) the module runs on."""
    m = build(spec)
    tensors, keywords = m.bench_inputs(2, 20, torch.float64, torch.Generator().manual_seed(0))
    x, pos = tensors
    assert x.shape == (2, 20, DIM) and pos.shape == (2, 20, m.pos_dim), f"{spec.name}: bench_inputs shapes"
    assert m(*tensors, **keywords).shape == x.shape


CHECKS: dict[str, Callable[[Spec], None]] = {
    "shapes": check_shapes,
    "permutation_equivariance": check_permutation_equivariance,
    "key_padding": check_key_padding,
    "padding_is_removal": check_padding_is_removal,
    "batch_independence": check_batch_independence,
    "translation_invariance": check_translation_invariance,
    "fast_matches_reference": check_fast_matches_reference,
    "bad_inputs": check_bad_inputs,
    "state_dict": check_state_dict,
    "float32": check_float32,
    "bench_inputs": check_bench_inputs,
}


def run_all(spec: Spec) -> None:
    """Run every set check on one entry; the first failure raises AssertionError."""
    for check in CHECKS.values():
        check(spec)
