"""The conformance suite of the `block` kind: checks every registered block must pass.

A block (`attnlab.mechanisms.blocks.base.Block`) maps tokens (batch, n, dim) to (batch, n, dim)
around a token mixer that is any registered mechanism (`mixer`, `mixer_params`). Each `check_*`
takes the entry and raises AssertionError on a failure; tests/conformance runs them over every
block entry, with its default mixer and with mixers of every mask form (dense, linear, local, sparse).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .core.registry import Spec, get
from .testing import _close, _raises

DIM, HEADS, BATCH, N, PAD = 16, 2, 2, 9, 3
MIXERS = ("softmax", "linear", "neighborhood", "sliding-window")
"""Mixers of each mask form the blocks are checked with: dense, linear (padding), local, sparse."""


def build(spec: Spec, *, causal: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64, **over: Any) -> nn.Module:
    """The entry at the suite's small size, in `dtype`, eval mode; `over` replaces test parameters (e.g. mixer)."""
    torch.manual_seed(seed)
    params: dict[str, Any] = {"dim": DIM, "heads": HEADS, **spec.test_params, **over}
    if "mixer" in over and "mixer_params" not in over:
        params["mixer_params"] = dict(get(over["mixer"]).test_params)
    if causal:
        params["causal"] = True
    return spec.build(**params).to(dtype).eval()


def tokens(*, batch: int = BATCH, n: int = N, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _variants(spec: Spec) -> list[bool]:
    assert spec.supports is not None
    return [False, True] if spec.supports.causal else [False]


def _mixers(spec: Spec, causal: bool) -> list[dict[str, Any]]:
    """The default mixer, then each of MIXERS (those with a causal mode when causal)."""
    out: list[dict[str, Any]] = [{}]
    for name in MIXERS:
        supports = get(name).supports
        assert supports is not None
        if not causal or supports.causal:
            out.append({"mixer": name})
    return out


def check_shapes(spec: Spec) -> None:
    """Output of the input's shape and dtype, with every mixer of MIXERS."""
    for causal in _variants(spec):
        for over in _mixers(spec, causal):
            m, x = build(spec, causal=causal, **over), tokens()
            y = m(x)
            assert y.shape == x.shape and y.dtype == x.dtype, f"{spec.name} {over}: expected {tuple(x.shape)} {x.dtype}, got {tuple(y.shape)} {y.dtype}"


def check_fast_matches_reference(spec: Spec) -> None:
    """Fast path == reference in float64 (the mixer's paths), forward and backward, with and without padding,
    with every mixer of MIXERS."""
    for causal in _variants(spec):
        for over in _mixers(spec, causal):
            m, x0 = build(spec, causal=causal, **over), tokens()
            keep = torch.ones(BATCH, N, dtype=torch.bool)
            keep[0, N - PAD :] = False
            for label, kw in (("no mask", {}), ("attention_mask", {"attention_mask": keep})):
                what = f"{spec.name} (mixer {over.get('mixer', 'default')}, causal={causal}, {label})"
                x = x0.clone().requires_grad_(True)
                fast, ref = m(x, **kw), m(x, impl="reference", **kw)
                _close(fast, ref, f"{what} forward")
                w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
                (gf,), (gr,) = torch.autograd.grad((fast * w).sum(), x), torch.autograd.grad((ref * w).sum(), x)
                _close(gf, gr, f"{what} input gradient")


def check_no_future_leakage(spec: Spec) -> None:
    """Causal: perturbing positions >= t changes neither the outputs before t nor their input gradients."""
    assert spec.supports is not None
    if not spec.supports.causal:
        return
    for over in _mixers(spec, True):
        m, x = build(spec, causal=True, **over), tokens()
        for t in (1, N // 2, N - 1):
            later = x.clone()
            later[:, t:] += torch.randn(later[:, t:].shape, generator=torch.Generator().manual_seed(t), dtype=x.dtype)
            for impl in ("fast", "reference"):
                outs, grads = [], []
                for inp in (x, later):
                    xi = inp.clone().requires_grad_(True)
                    y = m(xi, impl=impl)[:, :t]
                    (g,) = torch.autograd.grad(y.sum(), xi)
                    outs.append(y.detach())
                    grads.append(g)
                what = f"{spec.name} ({impl}, mixer {over.get('mixer', 'default')}) leaks the future"
                _close(outs[0], outs[1], f"{what}: outputs before {t} changed")
                assert grads[0][:, t:].abs().max().item() == 0.0, f"{what}: outputs before {t} depend on later inputs"


def check_key_padding(spec: Spec) -> None:
    """Changing padded tokens changes nothing at the real tokens; attention_mask and key_padding_mask agree."""
    for causal in _variants(spec):
        for over in _mixers(spec, causal):
            m, x = build(spec, causal=causal, **over), tokens()
            keep = torch.ones(BATCH, N, dtype=torch.bool)
            keep[:, N - PAD :] = False
            changed = x.clone()
            changed[:, N - PAD :] = 100 * torch.randn(BATCH, PAD, DIM, dtype=x.dtype)
            for impl in ("fast", "reference"):
                a = m(x, attention_mask=keep, impl=impl)
                what = f"{spec.name} ({impl}, mixer {over.get('mixer', 'default')}, causal={causal})"
                _close(m(changed, attention_mask=keep, impl=impl)[:, : N - PAD], a[:, : N - PAD], f"{what}: padded tokens change real outputs")
                _close(m(x, key_padding_mask=~keep, impl=impl), a, f"{what}: key_padding_mask=~keep differs from attention_mask=keep")


def check_batch_independence(spec: Spec) -> None:
    """Each sample's output depends on that sample alone."""
    m, x = build(spec), tokens(batch=3)
    for impl in ("fast", "reference"):
        whole = m(x, impl=impl)
        for i in range(3):
            _close(whole[i : i + 1], m(x[i : i + 1], impl=impl), f"{spec.name} ({impl}): sample {i} depends on the others")


def check_bad_inputs(spec: Spec) -> None:
    """Bad inputs and a bad mixer raise ValueError/TypeError naming the argument."""
    m, x = build(spec), tokens()
    _raises(lambda: m(x[0]), (ValueError,), "input of the wrong rank", "x: expected a ")
    _raises(lambda: m(torch.randn(BATCH, N, DIM + 1, dtype=x.dtype)), (ValueError,), "wrong model width", "x: expected last dimension dim=")
    _raises(lambda: m(x.to(torch.int64)), (TypeError,), "integer input", "x: expected a floating-point")
    nan = x.clone()
    nan[0, 1, 2] = float("nan")
    _raises(lambda: m(nan), (ValueError,), "NaN input", "x: expected finite")
    _raises(lambda: m(x, attention_mask=torch.ones(BATCH, N + 1, dtype=torch.bool)), (ValueError,), "attention_mask of the wrong shape", "attention_mask: ")
    _raises(lambda: m(x, impl="slow"), (ValueError,), "unknown impl", "impl: expected")
    _raises(lambda: build(spec, mixer="sofmax", mixer_params={}), (ValueError,), "unknown mixer", "mixer: unknown mechanism 'sofmax'")
    _raises(lambda: build(spec, mixer_params={"dim": 8}), (ValueError,), "mixer_params setting dim", "mixer_params: ")


def check_state_dict(spec: Spec) -> None:
    """A state_dict loaded into a fresh block reproduces the output exactly."""
    a, b = build(spec, seed=0), build(spec, seed=1)
    b.load_state_dict(a.state_dict())
    x = tokens()
    _close(a(x), b(x), f"{spec.name}: state_dict round trip changes the output", atol=0.0, rtol=0.0)


def check_float32(spec: Spec) -> None:
    """float32 runs (both paths) within 1e-4 of float64."""
    m64, m32 = build(spec), build(spec, dtype=torch.float32)
    x = tokens()
    for impl in ("fast", "reference"):
        _close(m32(x.float(), impl=impl).double(), m64(x, impl=impl), f"{spec.name}: float32 {impl}", atol=1e-4, rtol=1e-3)


CHECKS: dict[str, Callable[[Spec], None]] = {
    "shapes": check_shapes,
    "fast_matches_reference": check_fast_matches_reference,
    "no_future_leakage": check_no_future_leakage,
    "key_padding": check_key_padding,
    "batch_independence": check_batch_independence,
    "bad_inputs": check_bad_inputs,
    "state_dict": check_state_dict,
    "float32": check_float32,
}


def run_all(spec: Spec) -> None:
    """Run every block check on one entry; the first failure raises AssertionError."""
    for check in CHECKS.values():
        check(spec)
