"""The conformance suite: checks every registered mechanism must pass.

Each `check_*` function takes a registry entry and raises AssertionError on a
failure; tests/conformance runs them over the whole registry, and a user can run them
on a mechanism of their own (`run_all(attnlab.get("mine"))`). The module contract the
checks rely on:

* `forward(x, *, context=None, attention_mask=None, key_padding_mask=None, attn_mask=None,
  impl="fast"|"reference")` with x (batch, *positions, dim) -> same shape; padding comes as
  `attention_mask` (batch, n), True = attend, or `key_padding_mask` (batch, n), True = padding
  (PyTorch's convention), never both;
* with a `batch_first` parameter in the entry: `batch_first=False` takes and returns (n, batch, dim);
* `materialize(x, ...)` -> (batch, heads, n_q, n_k), n = product of the positions;
* with `Supports(summary_keys=True)` (keys that are summaries of the tokens): `key_count(positions)`
  -> m and `key_values(x)` -> (k, v) of (batch, heads, m, ·); materialize is then (batch, heads,
  n_q, m), the output is out_proj(merge_heads(A v)) and `attend(q, k, v)` takes those k, v;
* `step(x_t, state) -> (y_t, state)` when the entry supports decoding;
* `attend(q, k, v, ...)` on projected heads when the module is a `core.module.Attention`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .core.module import Attention
from .core.registry import Spec

DIM, HEADS, BATCH = 16, 2, 2
ATOL64 = 1e-8  # fast path vs reference, float64
RTOL64 = 1e-6


def positions(spec: Spec) -> tuple[int, ...]:
    """The suite's input positions: the entry's `test_positions`, else 9 tokens."""
    if spec.test_positions is not None:
        return spec.test_positions
    assert spec.supports is not None
    rank = 1 if 1 in spec.supports.grids else min(spec.supports.grids)
    return (9,) if rank == 1 else (5,) * rank


HEADS_SETTINGS = (3, 6)  # head counts that are not powers of two (ALiBi's slope recipe changes there)
SETTINGS_HEAD_DIM = 4
PER_HEAD = ("radii", "tile_sizes")  # test_params holding one value per head: cycled to another head count
DILATION = 2


def build(
    spec: Spec, *, causal: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64, heads: int = HEADS,
    **over: Any,
) -> nn.Module:
    """The entry at the suite's small size, in `dtype`, eval mode; another head count gets head_dim 4 and its
    per-head test parameters cycled; `over` replaces test parameters (e.g. dilation)."""
    torch.manual_seed(seed)
    params: dict[str, Any] = {"dim": DIM, "heads": heads, **spec.test_params, **over}
    if heads != HEADS:
        params["head_dim"] = SETTINGS_HEAD_DIM
        for name in PER_HEAD:
            value = params.get(name)
            if isinstance(value, tuple):
                params[name] = tuple(value[i % len(value)] for i in range(heads))
    if causal:
        params["causal"] = True
    return spec.build(**params).to(dtype).eval()


def settings(spec: Spec) -> list[tuple[str, dict[str, Any]]]:
    """Settings beyond the default build, as (label, build keywords): 3 and 6 heads, and dilation 2 (with 3
    heads too) where the entry has a dilation parameter its test parameters leave unset, on a sequence."""
    out: list[tuple[str, dict[str, Any]]] = [(f"heads={h}", {"heads": h}) for h in HEADS_SETTINGS]
    dilated = any(p.name == "dilation" for p in spec.params) and "dilation" not in spec.test_params
    if dilated and len(positions(spec)) == 1:
        out += [(f"dilation={DILATION}", {"dilation": DILATION}), (f"heads=3, dilation={DILATION}", {"heads": 3, "dilation": DILATION})]
    return out


def tokens(spec: Spec, *, batch: int = BATCH, seed: int = 1, dtype: torch.dtype = torch.float64, n: int | None = None) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    pos = positions(spec) if n is None else (n,)
    return torch.randn(batch, *pos, DIM, generator=gen, dtype=dtype)


def n_tokens(x: Tensor) -> int:
    return math.prod(x.shape[1:-1])


def _close(a: Tensor, b: Tensor, what: str, atol: float = ATOL64, rtol: float = RTOL64) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {err:.3e} > atol {atol:.1e}")


def _grads(module: nn.Module, x: Tensor, out: Tensor, weight: Tensor) -> list[Tensor]:
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _mask_cases(spec: Spec, x: Tensor) -> list[tuple[str, dict[str, Tensor]]]:
    """Masks the entry supports, on input x: (label, forward kwargs)."""
    assert spec.supports is not None
    b, n = x.shape[0], n_tokens(x)
    cases: list[tuple[str, dict[str, Tensor]]] = [("no mask", {})]
    if spec.supports.key_padding:
        kpm = torch.ones(b, n, dtype=torch.bool)
        kpm[0, n - 3 :] = False
        cases.append(("attention_mask", {"attention_mask": kpm}))
    if spec.supports.attn_mask:
        gen = torch.Generator().manual_seed(7)
        keep = torch.rand(n, n, generator=gen) > 0.3
        keep[:, 0] = True
        cases.append(("bool attn_mask", {"attn_mask": keep}))
        additive = torch.randn(b, 1, n, n, generator=gen, dtype=x.dtype)
        cases.append(("additive attn_mask", {"attn_mask": additive}))
    return cases


def _variants(spec: Spec) -> list[bool]:
    """The causal settings to check: both, only True for causal-only entries, only False otherwise."""
    assert spec.supports is not None
    if spec.supports.causal_only:
        return [True]
    return [False, True] if spec.supports.causal else [False]


def check_shapes(spec: Spec) -> None:
    """Output has the input's shape; materialize is (batch, heads, n_q, n_k); cross-attention keeps n_q."""
    for causal in _variants(spec):
        m = build(spec, causal=causal)
        x = tokens(spec)
        y = m(x)
        assert y.shape == x.shape, f"forward: expected shape {tuple(x.shape)}, got {tuple(y.shape)}"
        assert y.dtype == x.dtype, f"forward: expected dtype {x.dtype}, got {y.dtype}"
        n = n_tokens(x)
        assert spec.supports is not None
        if not spec.supports.materialize:
            continue
        a = m.materialize(x)
        heads = getattr(m, "heads", HEADS)
        n_k = n
        if spec.supports.summary_keys:
            summary: Any = m  # key_count / key_values: the summary-key contract (module docstring)
            n_k = summary.key_count(tuple(x.shape[1:-1]))
            for name, t in zip(("k", "v"), summary.key_values(x)):
                assert t.shape[:3] == (x.shape[0], heads, n_k), (
                    f"key_values: expected {name} of shape {(x.shape[0], heads, n_k)} + (head_dim,) "
                    f"(key_count {n_k}), got {tuple(t.shape)}"
                )
        assert a.shape == (x.shape[0], heads, n, n_k), f"materialize: expected {(x.shape[0], heads, n, n_k)}, got {tuple(a.shape)}"
        if spec.supports.cross and not causal:
            ctx = tokens(spec, seed=5, n=n + 3)
            y = m(x, context=ctx)
            assert y.shape == x.shape, f"cross-attention: expected shape {tuple(x.shape)}, got {tuple(y.shape)}"
            a = m.materialize(x, context=ctx)
            assert a.shape[-2:] == (n, n + 3), f"cross materialize: expected (..., {n}, {n + 3}), got {tuple(a.shape)}"


def check_fast_matches_reference(spec: Spec) -> None:
    """Fast path == reference in float64, forward and backward, under every supported mask."""
    for causal in _variants(spec):
        m = build(spec, causal=causal)
        x0 = tokens(spec)
        for label, kw in _mask_cases(spec, x0):
            x = x0.clone().requires_grad_(True)
            fast = m(x, impl="fast", **kw)
            ref = m(x, impl="reference", **kw)
            what = f"{spec.name} (causal={causal}, {label})"
            _close(fast, ref, f"{what} forward")
            w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
            for i, (gf, gr) in enumerate(zip(_grads(m, x, fast, w), _grads(m, x, ref, w))):
                _close(gf, gr, f"{what} backward, input {i}")


def check_no_future_leakage(spec: Spec) -> None:
    """Causal: perturbing positions >= t changes neither outputs before t nor their gradients."""
    assert spec.supports is not None
    if not spec.supports.causal:
        return
    m = build(spec, causal=True)
    x = tokens(spec)
    flat = x.reshape(x.shape[0], -1, DIM)
    n = flat.shape[1]
    for t in (1, n // 2, n - 1):
        later = flat.clone()
        later[:, t:] += torch.randn(later[:, t:].shape, generator=torch.Generator().manual_seed(t), dtype=x.dtype)
        for impl in ("fast", "reference"):
            outs, grads = [], []
            for inp in (flat, later):
                xi = inp.reshape(x.shape).clone().requires_grad_(True)
                y = m(xi, impl=impl).reshape(x.shape[0], -1, DIM)[:, :t]
                (g,) = torch.autograd.grad(y.sum(), xi)
                outs.append(y.detach())
                grads.append(g.reshape(x.shape[0], -1, DIM))
            _close(outs[0], outs[1], f"{spec.name} ({impl}) leaks the future: outputs before {t} changed")
            _close(grads[0][:, :t], grads[1][:, :t], f"{spec.name} ({impl}) leaks the future: gradients before {t} changed")
            future = grads[0][:, t:].abs().max().item()
            assert future == 0.0, f"{spec.name} ({impl}) leaks the future: outputs before {t} depend on later inputs (grad {future:.2e})"
        if not spec.supports.materialize:
            continue
        a = m.materialize(x)
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        assert a[..., upper].abs().max().item() == 0.0, f"{spec.name}: materialize has weight on future positions"


def check_key_padding(spec: Spec) -> None:
    """Changing padded tokens changes nothing at the real tokens; the padding given as attention_mask (bool or 0/1
    integers, True = attend) and as key_padding_mask (True = padding, PyTorch's convention) gives the same result."""
    assert spec.supports is not None
    if not spec.supports.key_padding:
        return
    for causal in _variants(spec):
        m = build(spec, causal=causal)
        x = tokens(spec)
        n = n_tokens(x)
        keep = torch.ones(x.shape[0], n, dtype=torch.bool)
        keep[:, n - 3 :] = False
        flat = x.reshape(x.shape[0], n, DIM).clone()
        flat[:, n - 3 :] = 100 * torch.randn(flat[:, n - 3 :].shape, dtype=x.dtype)
        changed = flat.reshape(x.shape)
        for impl in ("fast", "reference"):
            a = m(x, attention_mask=keep, impl=impl)
            b = m(changed, attention_mask=keep, impl=impl).reshape(x.shape[0], n, DIM)[:, : n - 3]
            _close(a.reshape(x.shape[0], n, DIM)[:, : n - 3], b, f"{spec.name} ({impl}, causal={causal}) ignores attention_mask")
            _close(m(x, key_padding_mask=~keep, impl=impl), a, f"{spec.name} ({impl}): key_padding_mask=~keep differs from attention_mask=keep")
            _close(m(x, attention_mask=keep.long(), impl=impl), a, f"{spec.name} ({impl}): a 0/1 attention_mask differs from the bool one")
        if not spec.supports.materialize:
            continue
        w = m.materialize(x, attention_mask=keep)
        assert w[..., n - 3 :].abs().max().item() == 0.0, f"{spec.name}: materialize puts weight on padded keys"
        _close(m.materialize(x, key_padding_mask=~keep), w, f"{spec.name}: materialize with key_padding_mask differs")


def check_batch_first(spec: Spec) -> None:
    """With batch_first=False (entries that have the parameter) the module takes and returns (n, batch, dim) and
    equals the batch-first module on the transposed input (with padding, and context when supported)."""
    if not any(p.name == "batch_first" for p in spec.params):
        return
    assert spec.supports is not None
    first, second = build(spec), build(spec)
    second.load_state_dict(first.state_dict())
    second.batch_first = False  # the same weights; the constructor argument is checked by tests/core
    x = tokens(spec)
    n = n_tokens(x)
    kw: dict[str, Tensor] = {}
    if spec.supports.key_padding:
        kw["key_padding_mask"] = torch.zeros(x.shape[0], n, dtype=torch.bool)
        kw["key_padding_mask"][0, n - 2 :] = True
    _close(second(x.transpose(0, 1), **kw), first(x, **kw).transpose(0, 1), f"{spec.name}: batch_first=False differs from transposing")
    if spec.supports.materialize:
        _close(second.materialize(x.transpose(0, 1), **kw), first.materialize(x, **kw), f"{spec.name}: batch_first=False materialize")
    if spec.supports.cross:
        ctx = tokens(spec, seed=5, n=n + 2)
        _close(second(x.transpose(0, 1), context=ctx.transpose(0, 1)), first(x, context=ctx).transpose(0, 1),
               f"{spec.name}: batch_first=False cross-attention differs from transposing")
    if spec.supports.decode:
        first, second = build(spec, causal=True), build(spec, causal=True)
        second.load_state_dict(first.state_dict())
        second.batch_first = False
        state, outs = None, []
        for t in range(n):  # x_t of shape (1, batch, dim)
            y, state = second.step(x.transpose(0, 1)[t : t + 1], state)
            outs.append(y)
        _close(torch.cat(outs, 0), first(x).transpose(0, 1), f"{spec.name}: batch_first=False step-by-step decoding differs")


def check_batch_independence(spec: Spec) -> None:
    """Each batch element's output depends on that element alone."""
    for causal in _variants(spec):
        m = build(spec, causal=causal)
        x = tokens(spec, batch=3)
        for impl in ("fast", "reference"):
            whole = m(x, impl=impl)
            for i in range(3):
                _close(whole[i : i + 1], m(x[i : i + 1], impl=impl), f"{spec.name} ({impl}): batch element {i} depends on the others")


MIXES_OUTSIDE_ATTENTION = {"mamba": "its causal depthwise convolution before the scan mixes neighbouring tokens"}
"""Modules that are not an `Attention` whose output mixes tokens outside the attention: (name: why)."""


def _check_no_mixing(name: str, impl: str, m: nn.Module, x: Tensor, kw: dict[str, Tensor], bsel: slice, qsel: slice) -> None:
    """A module that is not an `Attention`: the output at a query with no visible key depends on no other token."""
    b, n = x.shape[0], n_tokens(x)
    rows = range(n)[qsel]
    for z in range(b)[bsel]:
        for i in rows:
            y = m(x, impl=impl, **kw).reshape(b, n, -1)
            (g,) = torch.autograd.grad(y[z, i].sum(), x)
            g = g.reshape(b, n, -1)
            others = torch.cat([g[:, :i], g[:, i + 1 :]], 1)
            assert others.abs().max().item() == 0.0 and g[torch.arange(b) != z].abs().max().item() == 0.0, (
                f"{name} ({impl}): the output at fully masked query {i} (batch element {z}) depends on other tokens"
            )


def _side(m: Attention, x: Tensor) -> dict[str, Tensor]:
    """The keyword of `attend` carrying the side input of the tokens x (batch, n, DIM), for a mechanism that takes one."""
    side = m.side_input(x) if m.takes_side_input else None
    return {} if side is None else {"side": side}


def check_fully_masked_rows(spec: Spec) -> None:
    """A query with no visible key gives zeros (no NaN), forward and backward: the core on an `Attention`, the rows
    of materialize, and on other modules an output that depends on no other token (MIXES_OUTSIDE_ATTENTION aside)."""
    assert spec.supports is not None
    m = build(spec)
    x = tokens(spec).requires_grad_(True)
    n = n_tokens(x)
    cases = []
    if spec.supports.key_padding:
        kpm = torch.ones(x.shape[0], n, dtype=torch.bool)
        kpm[1] = False  # every key of element 1 is padding
        cases.append(({"attention_mask": kpm}, (slice(1, 2), slice(None))))
    if spec.supports.attn_mask:
        keep = torch.ones(n, n, dtype=torch.bool)
        keep[2] = False
        cases.append(({"attn_mask": keep}, (slice(None), slice(2, 3))))
    for kw, (bsel, qsel) in cases:
        for impl in ("fast", "reference"):
            if isinstance(m, Attention):
                q, k, v = m.project(x.reshape(x.shape[0], n, DIM))
                core = m.attend(q, k, v, impl=impl, **_side(m, x.reshape(x.shape[0], n, DIM)), **kw)
                blocked = core[bsel][:, :, qsel]
                assert blocked.abs().max().item() == 0.0, f"{spec.name} ({impl}): fully masked rows are not zero"
                (g,) = torch.autograd.grad(core.sum(), x)
            else:
                y = m(x, impl=impl, **kw)
                (g,) = torch.autograd.grad(y.sum(), x)
                assert torch.isfinite(y).all(), f"{spec.name} ({impl}): NaN/Inf with fully masked rows"
                if spec.name not in MIXES_OUTSIDE_ATTENTION:
                    _check_no_mixing(spec.name, impl, m, x, kw, bsel, qsel)
            assert torch.isfinite(g).all(), f"{spec.name} ({impl}): NaN/Inf gradient with fully masked rows"
        if not spec.supports.materialize:
            continue
        w = m.materialize(x, **kw)
        assert w[bsel][:, :, qsel].abs().max().item() == 0.0, f"{spec.name}: materialize rows of masked queries are not zero"


def check_settings(spec: Spec) -> None:
    """Under each of `settings` (3 and 6 heads, dilation 2): fast == reference in float64, forward and input
    gradient, without a mask and with key padding; step-by-step decoding == the causal forward."""
    assert spec.supports is not None
    for label, over in settings(spec):
        for causal in _variants(spec):
            m = build(spec, causal=causal, **over)
            x0 = tokens(spec)
            cases: list[tuple[str, dict[str, Tensor]]] = [("no mask", {})]
            if spec.supports.key_padding:
                keep = torch.ones(x0.shape[0], n_tokens(x0), dtype=torch.bool)
                keep[0, -3:] = False
                cases.append(("attention_mask", {"attention_mask": keep}))
            for case, kw in cases:
                what = f"{spec.name} ({label}, causal={causal}, {case})"
                x = x0.clone().requires_grad_(True)
                fast, ref = m(x, impl="fast", **kw), m(x, impl="reference", **kw)
                _close(fast, ref, f"{what} forward")
                w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
                (gf,), (gr,) = torch.autograd.grad((fast * w).sum(), x), torch.autograd.grad((ref * w).sum(), x)
                _close(gf, gr, f"{what} input gradient")
            if causal and spec.supports.decode and len(x0.shape) == 3:
                with torch.no_grad():
                    _close(_decoded(m, x0), m(x0), f"{spec.name} ({label}): step-by-step decoding differs from the causal forward")


def _alibi_slopes(heads: int) -> list[float]:
    """ALiBi's slopes by the official recipe (ofirpress/attention_with_linear_biases): 2^(-8h/n) for n = heads a
    power of two; otherwise those of the largest power of two p below, then every other slope of 2p heads."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** math.floor(math.log2(heads))
    return geometric(heads) if p == heads else geometric(p) + geometric(2 * p)[0::2][: heads - p]


def _alibi_oracle(m: Any, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n_q, n_k = q.shape[2], k.shape[2]
    i = torch.arange(n_q, dtype=torch.float64)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, dtype=torch.float64)[None, :]
    slopes = torch.tensor(_alibi_slopes(q.shape[1]), dtype=torch.float64)
    return q, k, -slopes[:, None, None] * (i - j).abs()


def _rope_oracle(m: Any, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RoPE in its rotate-half form: channel m pairs with m + d/2 and turns by p·base^(-2m/d) at position p."""
    d = q.shape[-1]
    theta = float(m.base) ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2.0 / d)

    def turn(t: Tensor, start: int) -> Tensor:
        angle = (torch.arange(t.shape[2], dtype=torch.float64) + start)[:, None] * theta
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat((t1 * angle.cos() - t2 * angle.sin(), t2 * angle.cos() + t1 * angle.sin()), -1)

    return turn(q, k.shape[2] - q.shape[2]), turn(k, 0), torch.zeros(())


ORACLES: dict[str, Callable[[Any, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]] = {
    "softmax": lambda m, q, k: (q, k, torch.zeros(())),
    "alibi": _alibi_oracle,
    "rope": _rope_oracle,
}
"""Dense entries with an oracle written here from the formula, sharing no helper with the library:
(module, q, k) -> (q', k', score bias (heads, n_q, n_k)) for softmax(q'k'ᵀ/√d + bias) v."""


def _softmax_oracle(q: Tensor, k: Tensor, bias: Tensor, keep: Tensor) -> Tensor:
    """softmax(q kᵀ/√d + bias) over the kept keys, float64, by exp and sum; rows with no kept key are 0."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    scores = scores.masked_fill(~keep, -math.inf)
    top = scores.amax(-1, keepdim=True).clamp_min(-1e300)
    e = (scores - top).exp()
    return e / e.sum(-1, keepdim=True).clamp_min(1e-300)


def check_dense_oracle(spec: Spec) -> None:
    """Entries in ORACLES: the core, the module's output and materialize equal softmax(q kᵀ/√d + bias) v computed
    here (scale 1/√head_dim, the paper's bias), at 2, 3 and 6 heads, causal or not, with and without padding."""
    if spec.name not in ORACLES:
        return
    assert spec.supports is not None
    for heads in (HEADS, *HEADS_SETTINGS):
        for causal in _variants(spec):
            m: Any = build(spec, causal=causal, heads=heads)
            x = tokens(spec)
            b, n = x.shape[0], n_tokens(x)
            q, k, v = m.project(x)
            q2, k2, bias = ORACLES[spec.name](m, q.detach(), k.detach())
            pad = torch.ones(b, n, dtype=torch.bool)
            pad[0, -3:] = False
            for label, keep in (("no mask", None), ("attention_mask", pad)):
                allowed = torch.ones(b, 1, n, n, dtype=torch.bool) if keep is None else keep[:, None, None, :].clone()
                if causal:
                    allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
                weights = _softmax_oracle(q2, k2, bias, allowed)
                what = f"{spec.name} (heads={heads}, causal={causal}, {label})"
                kw = {} if keep is None else {"attention_mask": keep}
                for impl in ("fast", "reference"):
                    _close(m.attend(q, k, v, impl=impl, **kw), weights @ v.double(), f"{what}: attend ({impl}) != the oracle's A v")
                with torch.no_grad():
                    _close(m(x, **kw), m.out_proj(m.merge_heads(weights @ v.double())), f"{what}: forward != out_proj(A v) of the oracle")
                    _close(m.materialize(x, **kw), weights, f"{what}: materialize != the oracle's A")


PAD = 12  # padded tokens: a multiple of every block, chunk and window size in the entries' test parameters
PADDING_ANYWHERE = ("softmax", "linear", "efficient", "galerkin", "delta", "gated-linear", "retention", "miras",
                    "miras-lp", "miras-huber", "local-linear", "fourier", "xcit", "channel-group", "swiftformer")
"""Entries with no position in their maths (or a decay that skips padded keys): padding between real tokens
is checked too, not only before and after them."""
PADDING_MOVES = {
    # P019: "window start s(i) clamped so the window stays inside the sequence/image per axis"
    "neighborhood": (("after", "before"), "a window is clamped at the sequence's ends, not at its real tokens (NAT)"),
    # P223: "block i attends to block j iff i−j = 0 or i−j is a power of 2 (plus local sliding window / sink)"
    "power-attention": (("before",), "the sink blocks are the sequence's first blocks"),
    # P200: "split token grid into spatial(-temporal) windows of size w; sample 1 random token per window as proxy"
    "proxy-token": (("before",), "a window's random proxy is drawn by the window's position"),
}
"""Entries whose pattern sits at absolute positions: (placements not checked, why). Each is true to its
paper (the statement quoted from shared/PAPERS.md above it, and in the mechanism's docstring)."""


def check_padding_is_removal(spec: Spec) -> None:
    """Padding a sequence (1-D entries with key padding) does not change the real tokens' outputs: the padded
    input (PAD tokens of large random values after the real ones, before them, and between them for
    PADDING_ANYWHERE; PADDING_MOVES lists the exceptions) equals the unpadded sequence run without a mask, fast
    and reference."""
    assert spec.supports is not None
    if not spec.supports.key_padding or len(positions(spec)) != 1:
        return
    gen = torch.Generator().manual_seed(11)
    real = torch.randn(BATCH, positions(spec)[0], DIM, generator=gen, dtype=torch.float64)
    junk = 10 * torch.randn(BATCH, PAD, DIM, generator=gen, dtype=torch.float64)
    n, cut = real.shape[1], real.shape[1] // 2
    places = {"after": [real, junk], "before": [junk, real]}
    if spec.name in PADDING_ANYWHERE:
        places["between"] = [real[:, :cut], junk, real[:, cut:]]
    for place in PADDING_MOVES.get(spec.name, ((), ""))[0]:
        del places[place]
    for causal in _variants(spec):
        m = build(spec, causal=causal)
        for place, parts in places.items():
            x = torch.cat(parts, 1)
            keep = torch.cat([torch.full(p.shape[:2], p is not junk) for p in parts], 1)
            for impl in ("fast", "reference"):
                got = m(x, attention_mask=keep, impl=impl)[keep].reshape(BATCH, n, DIM)
                _close(got, m(real, impl=impl), f"{spec.name} ({impl}, causal={causal}): padding {place} the real tokens "
                       "changes their outputs (!= the unpadded sequence)")


def _raises(fn: Callable[[], Any], kinds: tuple[type[Exception], ...], what: str, needle: str) -> None:
    try:
        fn()
    except kinds as exc:
        assert str(exc).startswith(needle), f"{what}: message does not start with {needle!r}: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 — a wrong kind of error is a failure
        raise AssertionError(f"{what}: expected {[k.__name__ for k in kinds]}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: no error raised")


def check_bad_inputs(spec: Spec) -> None:
    """Documented bad inputs raise ValueError/TypeError naming the argument."""
    assert spec.supports is not None
    m = build(spec)
    x = tokens(spec)
    n = n_tokens(x)
    _raises(lambda: m(x[0]), (ValueError,), "input of the wrong rank", "x: expected a ")
    _raises(lambda: m(torch.randn(*x.shape[:-1], DIM + 1, dtype=x.dtype)), (ValueError,), "wrong model width", "x: expected last dimension dim=")
    _raises(lambda: m(x.to(torch.int64)), (TypeError,), "integer input", "x: expected a floating-point")
    nan = x.clone()
    nan.reshape(-1)[5] = float("nan")
    _raises(lambda: m(nan), (ValueError,), "NaN input", "x: expected finite")
    ones = torch.ones(x.shape[0], n, dtype=torch.bool)
    if spec.supports.key_padding:
        _raises(lambda: m(x, attention_mask=torch.ones(x.shape[0], n + 1, dtype=torch.bool)), (ValueError,), "attention_mask of the wrong shape", "attention_mask: ")
        _raises(lambda: m(x, attention_mask=ones.to(x.dtype)), (TypeError,), "attention_mask of a float dtype", "attention_mask: ")
        _raises(lambda: m(x, attention_mask=2 * ones.long()), (ValueError,), "attention_mask with values other than 0/1", "attention_mask: ")
        _raises(lambda: m(x, key_padding_mask=(~ones).to(x.dtype)), (TypeError,), "a float key_padding_mask", "key_padding_mask: ")
        _raises(lambda: m(x, key_padding_mask=~ones[:, :-1]), (ValueError,), "key_padding_mask of the wrong shape", "key_padding_mask: ")
        _raises(lambda: m(x, attention_mask=ones, key_padding_mask=~ones), (ValueError,), "both padding masks", "attention_mask, key_padding_mask: expected one of them")
    else:
        _raises(lambda: m(x, attention_mask=ones), (ValueError,), "unsupported attention_mask", "attention_mask: ")
        _raises(lambda: m(x, key_padding_mask=~ones), (ValueError,), "unsupported key_padding_mask", "key_padding_mask: ")
    if spec.supports.attn_mask:
        _raises(lambda: m(x, attn_mask=torch.ones(n, n + 1, dtype=torch.bool)), (ValueError,), "attn_mask of the wrong shape", "attn_mask: ")
        _raises(lambda: m(x, attn_mask=torch.ones(n, n, dtype=torch.int32)), (TypeError,), "attn_mask of the wrong dtype", "attn_mask: ")
    if isinstance(m, Attention):
        q, k, v = m.project(x.reshape(x.shape[0], n, DIM))
        _raises(lambda: m.attend(q, k[:, :1], v[:, :1]), (ValueError,), "head-count mismatch", "q, k, v: head counts differ")
        _raises(lambda: m.attend(q, k.float(), v), (TypeError,), "dtype mismatch between q, k, v", "q, k, v: expected one dtype")
        _raises(lambda: m.attend(q[0], k[0], v[0]), (ValueError,), "q of the wrong rank", "q: expected ")


def _check_summary_keys(spec: Spec, m: Any, x: Tensor, causal: bool) -> None:
    """Keys that are summaries: with (k, v) = key_values(x), A = materialize(x) explains the output,
    out = out_proj(merge_heads(A v)), under every supported mask, and the core `attend(q, k, v)` on
    those keys is A v for both paths."""
    b, n = x.shape[0], n_tokens(x)
    k, v = m.key_values(x)
    for label, kw in _mask_cases(spec, x):
        what = f"{spec.name} (causal={causal}, {label})"
        a = m.materialize(x, **kw)
        want = m.out_proj(m.merge_heads(a @ v)).reshape(x.shape)
        _close(m(x, **kw), want, f"{what}: materialize does not explain the output (out != out_proj(A v_keys))")
        q = m.project(x.reshape(b, n, DIM))[0]
        q = q.reshape(*q.shape[:2], *x.shape[1:-1], q.shape[-1])
        for impl in ("fast", "reference"):
            core = m.attend(q, k, v, impl=impl, **kw).reshape(b, q.shape[1], n, -1)
            _close(core, a @ v, f"{what}: attend(q, *key_values(x), impl={impl!r}) != A v_keys")


def check_materialize(spec: Spec) -> None:
    """materialize is finite; its rows sum to 1 where the entry normalises with softmax; and for
    attention cores the matrix explains the output: out = A v, under every supported mask (A v_keys
    with the module's own `key_values` when its keys are summaries)."""
    assert spec.supports is not None
    if not spec.supports.materialize:
        return
    for causal in _variants(spec):
        m = build(spec, causal=causal)
        x = tokens(spec)
        a = m.materialize(x)
        assert torch.isfinite(a).all(), f"{spec.name}: materialize has NaN/Inf"
        if spec.normalized:
            _close(a.sum(-1), torch.ones_like(a.sum(-1)), f"{spec.name} (causal={causal}): materialize rows do not sum to 1")
        if not isinstance(m, Attention):
            continue
        if spec.supports.summary_keys:
            _check_summary_keys(spec, m, x, causal)
            continue
        for label, kw in _mask_cases(spec, x):
            q, k, v = m.project(x.reshape(x.shape[0], n_tokens(x), DIM))
            out = m.attend(q, k, v, impl="fast", **_side(m, x.reshape(x.shape[0], n_tokens(x), DIM)), **kw)
            w = m.materialize(x, **kw)
            _close(out, w @ v, f"{spec.name} (causal={causal}, {label}): materialize does not explain the output (out != A v)")


def check_state_dict(spec: Spec) -> None:
    """A state_dict loaded into a fresh module reproduces the output."""
    a, b = build(spec, seed=0), build(spec, seed=1)
    x = tokens(spec)
    b.load_state_dict(a.state_dict())
    _close(a(x), b(x), f"{spec.name}: state_dict round trip changes the output", atol=0.0, rtol=0.0)


DECODE_TOKENS_32 = 67  # float32 decoding: long enough to cross the chunks of chunked causal forms
DECODE_ATOL_32 = 1e-5


def _decoded(m: nn.Module, x: Tensor) -> Tensor:
    state = None
    outs = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t : t + 1], state)
        outs.append(y)
    return torch.cat(outs, dim=1)


def check_decode(spec: Spec) -> None:
    """Decoding token by token with `step` reproduces the causal forward: float64 to 1e-8, and
    float32 on 67 tokens to 1e-5 (the fast causal form, chunked where it is, against the recurrence)."""
    assert spec.supports is not None
    if not spec.supports.decode:
        return
    m = build(spec, causal=True)
    x = tokens(spec, n=positions(spec)[0] if len(positions(spec)) == 1 else 9)
    _close(_decoded(m, x), m(x), f"{spec.name}: step-by-step decoding differs from the causal forward")
    m32 = build(spec, causal=True, dtype=torch.float32)
    x32 = tokens(spec, n=DECODE_TOKENS_32, dtype=torch.float32)
    with torch.no_grad():
        _close(_decoded(m32, x32), m32(x32), f"{spec.name}: float32 step-by-step decoding differs from the causal forward",
               atol=DECODE_ATOL_32, rtol=DECODE_ATOL_32)


def check_float32(spec: Spec) -> None:
    """float32 runs and stays within 1e-4 of float64, forward and backward."""
    m64 = build(spec)
    m32 = build(spec, dtype=torch.float32)
    x = tokens(spec)
    _close(m32(x.float()).double(), m64(x), f"{spec.name}: float32 forward", atol=1e-4, rtol=1e-3)


def check_float32_reference(spec: Spec) -> None:
    """A float32 module (the default dtype) runs its reference and `materialize` (what capture() calls), within
    1e-4 of float64."""
    assert spec.supports is not None
    m64 = build(spec)
    m32 = build(spec, dtype=torch.float32)
    x = tokens(spec)
    _close(m32(x.float(), impl="reference").double(), m64(x, impl="reference"), f"{spec.name}: float32 reference",
           atol=1e-4, rtol=1e-3)
    if spec.supports.materialize:
        _close(m32.materialize(x.float()).double(), m64.materialize(x), f"{spec.name}: float32 materialize",
               atol=1e-4, rtol=1e-3)


CHECKS: dict[str, Callable[[Spec], None]] = {
    "shapes": check_shapes,
    "fast_matches_reference": check_fast_matches_reference,
    "no_future_leakage": check_no_future_leakage,
    "key_padding": check_key_padding,
    "batch_first": check_batch_first,
    "batch_independence": check_batch_independence,
    "fully_masked_rows": check_fully_masked_rows,
    "bad_inputs": check_bad_inputs,
    "materialize": check_materialize,
    "state_dict": check_state_dict,
    "settings": check_settings,
    "dense_oracle": check_dense_oracle,
    "padding_is_removal": check_padding_is_removal,
    "decode": check_decode,
    "float32": check_float32,
    "float32_reference": check_float32_reference,
}


def run_all(spec: Spec) -> None:
    """Run every check on one entry; the first failure raises AssertionError."""
    for check in CHECKS.values():
        check(spec)


class LargestStorage(TorchDispatchMode):
    """While active, records the largest storage (bytes) any op returns: every allocation a call makes
    (used to check that a kernel never builds an N × N tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out
