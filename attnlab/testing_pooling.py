"""The conformance suite of the `pooling` kind: checks every registered pooling must pass.

A pooling (`attnlab.mechanisms.pooling.base.AttentionPooling`) maps tokens (batch, n, dim) to m
pooled vectors (batch, m, dim) with weights (batch, heads, m, n) from `materialize`; padding comes
as `attention_mask` (True/1 = attend) or `key_padding_mask` (True = padding), never both. Each
`check_*` takes the entry and raises AssertionError on a failure; tests/conformance runs them over
every pooling entry, a user can run them on their own (`run_all(attnlab.get("mine", "pooling"))`).
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


def build(spec: Spec, *, seed: int = 0, dtype: torch.dtype = torch.float64, **over: Any) -> nn.Module:
    """The entry at the suite's small size (dim 16 and its test parameters), in `dtype`, eval mode."""
    torch.manual_seed(seed)
    return spec.build(**{"dim": DIM, **spec.test_params, **over}).to(dtype).eval()


def tokens(*, batch: int = BATCH, n: int = N, dim: int = DIM, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padding(batch: int = BATCH, n: int = N) -> Tensor:
    """Keep-mask: element 0 has its last PAD tokens padded, element 1 its first one, the rest are whole."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[0, n - PAD :] = False
    keep[1, 0] = False
    return keep


def _grad(module: nn.Module, x: Tensor, weight: Tensor, **kw: Any) -> list[Tensor]:
    """Gradients of Σ weight·module(x, **kw) with respect to x and the parameters."""
    x = x.clone().requires_grad_(True)
    out = module(x, **kw)
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def check_shapes(spec: Spec) -> None:
    """Output (batch, m, dim) with m = module.queries, in the input's dtype; materialize (batch, heads, m, n), rows
    summing to 1 where the entry normalises; a grid input (batch, h, w, dim) pools its h·w tokens."""
    m = build(spec)
    x = tokens()
    y = m(x)
    q, heads = m.queries, m.heads
    assert y.shape == (BATCH, q, DIM), f"forward: expected {(BATCH, q, DIM)}, got {tuple(y.shape)}"
    assert y.dtype == x.dtype, f"forward: expected dtype {x.dtype}, got {y.dtype}"
    a = m.materialize(x)
    assert a.shape == (BATCH, heads, q, N), f"materialize: expected {(BATCH, heads, q, N)}, got {tuple(a.shape)}"
    assert torch.isfinite(a).all(), f"{spec.name}: materialize has NaN/Inf"
    if spec.normalized:
        _close(a.sum(-1), torch.ones_like(a.sum(-1)), f"{spec.name}: materialize rows do not sum to 1")
    grid = tokens(n=12).reshape(BATCH, 3, 4, DIM)
    _close(m(grid), m(grid.reshape(BATCH, 12, DIM)), f"{spec.name}: a (batch, 3, 4, dim) grid differs from its 12 tokens")


def check_fast_matches_reference(spec: Spec) -> None:
    """Fast path == reference in float64, forward and backward (input and parameters), with and without padding;
    also at 3 and 6 heads when the entry has a `heads` parameter."""
    cases: list[tuple[str, dict[str, Any], int]] = [("default", {}, DIM)]
    if any(p.name == "heads" for p in spec.params):
        cases += [(f"heads={h}", {"heads": h, "dim": SETTINGS_DIM}, SETTINGS_DIM) for h in HEADS_SETTINGS]
    for label, over, dim in cases:
        m = build(spec, **over)
        x = tokens(dim=dim)
        for mask_label, kw in (("no mask", {}), ("attention_mask", {"attention_mask": padding()})):
            what = f"{spec.name} ({label}, {mask_label})"
            fast, ref = m(x, **kw), m(x, impl="reference", **kw)
            _close(fast, ref, f"{what} forward")
            w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
            gf, gr = _grad(m, x, w, **kw), _grad(m, x, w, impl="reference", **kw)
            for i, (a, b) in enumerate(zip(gf, gr)):
                _close(a, b, f"{what} backward, input {i}")


def check_key_padding(spec: Spec) -> None:
    """Padded tokens change nothing (forward, both paths); materialize puts no weight on them; the padding as
    attention_mask (bool, 0/1 ints) and as key_padding_mask (True = padding) agree."""
    m = build(spec)
    x, keep = tokens(), padding()
    changed = x.clone()
    changed[~keep] = 100 * torch.randn(int((~keep).sum()), DIM, dtype=x.dtype)
    for impl in ("fast", "reference"):
        a = m(x, attention_mask=keep, impl=impl)
        _close(m(changed, attention_mask=keep, impl=impl), a, f"{spec.name} ({impl}): padded tokens change the result")
        _close(m(x, key_padding_mask=~keep, impl=impl), a, f"{spec.name} ({impl}): key_padding_mask=~keep differs")
        _close(m(x, attention_mask=keep.long(), impl=impl), a, f"{spec.name} ({impl}): a 0/1 attention_mask differs")
    w = m.materialize(x, attention_mask=keep)
    assert w.permute(0, 3, 1, 2)[~keep].abs().max().item() == 0.0, f"{spec.name}: materialize puts weight on padded tokens"


def check_padding_is_removal(spec: Spec) -> None:
    """A sample padded after its real tokens (and before them, when the entry is order-invariant) pools as the
    unpadded sample run alone, both paths."""
    assert spec.supports is not None
    m = build(spec)
    real = tokens(batch=1, n=6)
    junk = 10 * tokens(batch=1, n=PAD, seed=9)
    places = ("after", "before") if spec.supports.order_invariant else ("after",)
    for place in places:
        x = torch.cat([real, junk] if place == "after" else [junk, real], 1)
        keep = torch.ones(1, x.shape[1], dtype=torch.bool)
        if place == "after":
            keep[:, 6:] = False
        else:
            keep[:, :PAD] = False
        for impl in ("fast", "reference"):
            _close(m(x, attention_mask=keep, impl=impl), m(real, impl=impl),
                   f"{spec.name} ({impl}): padding {place} the real tokens changes the result (!= the unpadded sample)")


def check_batch_independence(spec: Spec) -> None:
    """Each sample's result depends on that sample alone (both paths, with padding too): a pooling that mixes
    the samples of a batch (a batch-wide statistic) fails here."""
    m = build(spec)
    x, keep = tokens(), padding()
    for impl in ("fast", "reference"):
        for kw in ({}, {"attention_mask": keep}):
            whole = m(x, impl=impl, **kw)
            for i in range(BATCH):
                one = {k: v[i : i + 1] for k, v in kw.items()}
                _close(whole[i : i + 1], m(x[i : i + 1], impl=impl, **one),
                       f"{spec.name} ({impl}, {'padded' if kw else 'no mask'}): sample {i} depends on the other samples")
        scaled = x.clone()
        scaled[1:] = 7 * scaled[1:] - 3
        _close(m(scaled, impl=impl)[:1], m(x, impl=impl)[:1],
               f"{spec.name} ({impl}): sample 0 changes when the other samples are rescaled")


def check_order(spec: Spec) -> None:
    """An order-invariant entry (Supports.order_invariant): permuting the tokens leaves the result unchanged and
    permutes the weights alike."""
    assert spec.supports is not None
    if not spec.supports.order_invariant:
        return
    m = build(spec)
    x = tokens()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    for impl in ("fast", "reference"):
        _close(m(x[:, perm], impl=impl), m(x, impl=impl), f"{spec.name} ({impl}): permuting the tokens changes the result")
    _close(m.materialize(x[:, perm]), m.materialize(x)[..., perm], f"{spec.name}: materialize does not follow a permutation")


def check_fully_masked(spec: Spec) -> None:
    """A sample with no real token: finite result and gradients (no NaN), zero weights, a result that does not
    depend on its tokens; the other samples unchanged."""
    m = build(spec)
    x = tokens()
    keep = torch.ones(BATCH, N, dtype=torch.bool)
    keep[1] = False
    for impl in ("fast", "reference"):
        xg = x.clone().requires_grad_(True)
        y = m(xg, attention_mask=keep, impl=impl)
        assert torch.isfinite(y).all(), f"{spec.name} ({impl}): NaN/Inf for a sample with no real token"
        (g,) = torch.autograd.grad(y.sum(), xg)
        assert torch.isfinite(g).all(), f"{spec.name} ({impl}): NaN/Inf gradient for a sample with no real token"
        assert g[1].abs().max().item() == 0.0, f"{spec.name} ({impl}): a sample with no real token depends on its tokens"
    w = m.materialize(x, attention_mask=keep)
    assert w[1].abs().max().item() == 0.0, f"{spec.name}: materialize of a sample with no real token is not zero"


def check_bad_inputs(spec: Spec) -> None:
    """Bad inputs raise ValueError/TypeError naming the argument."""
    m = build(spec)
    x = tokens()
    ones = torch.ones(BATCH, N, dtype=torch.bool)
    _raises(lambda: m(x[0]), (ValueError,), "input of the wrong rank", "x: expected a ")
    _raises(lambda: m(tokens(dim=DIM + 1)), (ValueError,), "wrong model width", "x: expected last dimension dim=")
    _raises(lambda: m(x.to(torch.int64)), (TypeError,), "integer input", "x: expected a floating-point")
    nan = x.clone()
    nan[0, 2, 3] = float("nan")
    _raises(lambda: m(nan), (ValueError,), "NaN input", "x: expected finite")
    _raises(lambda: m(x.float()), (TypeError,), "dtype other than the module's", "x: ")
    _raises(lambda: m(x, attention_mask=torch.ones(BATCH, N + 1, dtype=torch.bool)), (ValueError,), "attention_mask of the wrong shape", "attention_mask: ")
    _raises(lambda: m(x, attention_mask=ones.double()), (TypeError,), "a float attention_mask", "attention_mask: ")
    _raises(lambda: m(x, attention_mask=2 * ones.long()), (ValueError,), "attention_mask values other than 0/1", "attention_mask: ")
    _raises(lambda: m(x, key_padding_mask=~ones[:, :-1]), (ValueError,), "key_padding_mask of the wrong shape", "key_padding_mask: ")
    _raises(lambda: m(x, attention_mask=ones, key_padding_mask=~ones), (ValueError,), "both padding masks", "attention_mask, key_padding_mask: expected one of them")
    _raises(lambda: m(x, impl="slow"), (ValueError,), "unknown impl", "impl: expected")


def check_state_dict(spec: Spec) -> None:
    """A state_dict loaded into a fresh module reproduces the result exactly."""
    a, b = build(spec, seed=0), build(spec, seed=1)
    b.load_state_dict(a.state_dict())
    x = tokens()
    _close(a(x), b(x), f"{spec.name}: state_dict round trip changes the result", atol=0.0, rtol=0.0)


def check_float32(spec: Spec) -> None:
    """A float32 module (fast, reference and materialize) is within 1e-4 of float64."""
    m64, m32 = build(spec), build(spec, dtype=torch.float32)
    x, keep = tokens(), padding()
    for impl in ("fast", "reference"):
        _close(m32(x.float(), attention_mask=keep, impl=impl).double(), m64(x, attention_mask=keep, impl=impl),
               f"{spec.name}: float32 {impl}", atol=1e-4, rtol=1e-3)
    _close(m32.materialize(x.float()).double(), m64.materialize(x), f"{spec.name}: float32 materialize", atol=1e-4, rtol=1e-3)


CHECKS: dict[str, Callable[[Spec], None]] = {
    "shapes": check_shapes,
    "fast_matches_reference": check_fast_matches_reference,
    "key_padding": check_key_padding,
    "padding_is_removal": check_padding_is_removal,
    "batch_independence": check_batch_independence,
    "order": check_order,
    "fully_masked": check_fully_masked,
    "bad_inputs": check_bad_inputs,
    "state_dict": check_state_dict,
    "float32": check_float32,
}

def run_all(spec: Spec) -> None:
    """Run every pooling check on one entry; the first failure raises AssertionError."""
    for check in CHECKS.values():
        check(spec)
