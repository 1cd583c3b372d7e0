"""Miras (P157) deep memories: an MLP per head trained online by the ℓ2 / ℓp / Huber bias with weight decay."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab import testing
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.kernels.linear_scan import linear_attention_reference
from attnlab.mechanisms.linear.deep_memory import (
    DeepMemoryAttention,
    deep_memory_attention,
    deep_memory_attention_reference,
    deep_memory_scan,
)
from attnlab.mechanisms.linear.memora import memory_features

F64 = torch.float64


def _inputs(b: int = 2, h: int = 2, n: int = 6, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=F64) for _ in range(3))
    fq, fk = memory_features(q, k)
    eta = torch.rand(b, h, n, generator=gen, dtype=F64)
    alpha = 0.5 + 0.5 * torch.rand(b, h, n, generator=gen, dtype=F64)
    return fq, fk, v, eta, alpha


def _weights(layers: int, b: int = 2, h: int = 2, d: int = 4, d_h: int = 6, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    if layers == 1:
        return (0.5 * torch.randn(b, h, d, d, generator=gen, dtype=F64),)
    return (torch.randn(b, h, d_h, d, generator=gen, dtype=F64) / 2, torch.randn(b, h, d, d_h, generator=gen, dtype=F64) / 2)


def test_one_linear_layer_without_retention_is_the_delta_rule() -> None:
    q, k, v, eta, _ = _inputs(n=9)
    w0 = (torch.zeros(2, 2, 4, 4, dtype=F64),)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 5:] = False
    out = deep_memory_attention(q, k, v, w0, eta=eta, bias="l2", activation="identity", residual=False,
                                attention_mask=keep)
    delta, _ = linear_attention_reference(q, k, v, causal=True, beta=eta, normalize=False, attention_mask=keep)
    torch.testing.assert_close(out, delta)


def test_the_module_with_one_linear_layer_is_the_delta_rule_on_its_gates() -> None:
    torch.manual_seed(0)
    m = DeepMemoryAttention(16, heads=2, layers=1, residual=False, retention="none").double()
    x = torch.randn(2, 7, 16, dtype=F64)
    q, k, v = m.project(x)
    eta, alpha = m.gates(k)
    assert alpha is None
    fq, fk = memory_features(q, k)
    delta, _ = linear_attention_reference(fq, fk, v, causal=True, beta=eta, normalize=False)
    torch.testing.assert_close(m.attend(q, k, v), delta)


@pytest.mark.parametrize(("bias", "activation", "scale"), [
    ("l2", "gelu", 1.0), ("lp", "silu", 1.0), ("huber", "gelu", 0.1), ("huber", "gelu", 10.0),
])
def test_one_step_is_the_autograd_gradient_of_the_bias(bias: str, activation: str, scale: float) -> None:
    # one token: W_1 = α W_0 − η ∇_W ℓ(M_{W_0}(k), v), the gradient taken here by autograd of the loss
    q, k, v, eta, alpha = _inputs(n=1)
    w0 = _weights(2)
    v = scale * v
    p, delta = 3.0, 1.0
    probes = [w.clone().requires_grad_(True) for w in w0]
    pre = torch.einsum("bhmk,bhk->bhm", probes[0], k[:, :, 0])
    act = torch.nn.functional.gelu(pre) if activation == "gelu" else torch.nn.functional.silu(pre)
    err = torch.einsum("bhvm,bhm->bhv", probes[1], act) + k[:, :, 0] - v[:, :, 0]
    norm = err.norm(dim=-1)
    if bias == "l2":
        loss = 0.5 * (err**2).sum()
    elif bias == "lp":
        loss = (err.abs() ** p).sum()
    else:
        assert ((norm <= delta).all() or (norm > delta).all()), "the case tests one Huber branch"
        loss = torch.where(norm <= delta, 0.5 * norm**2, delta * (err.abs().sum(-1) - delta / 2)).sum()
    grads = torch.autograd.grad(loss, probes)
    _, state = deep_memory_scan(q, k, v, w0, eta=eta, alpha=alpha, bias=bias, activation=activation, p=p, delta=delta)
    for got, w, g in zip(state.memory, w0, grads):
        torch.testing.assert_close(got, alpha[:, :, 0, None, None] * w - eta[:, :, 0, None, None] * g)


@pytest.mark.parametrize(("layers", "bias", "residual", "retention"), [
    (2, "l2", True, True), (2, "lp", True, False), (2, "huber", False, True), (1, "lp", True, True),
])
def test_fast_equals_reference_forward_and_backward_with_padding(layers: int, bias: str, residual: bool,
                                                                 retention: bool) -> None:
    q, k, v, eta, alpha = _inputs()
    alpha = alpha if retention else None
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False
    keep[1, 3] = False
    w0 = [w.requires_grad_(True) for w in _weights(layers)]
    args = [t.clone().requires_grad_(True) for t in (q, k, v, eta)]
    kw = {"bias": bias, "residual": residual, "attention_mask": keep, "delta": 0.5 if bias == "huber" else 1.0}
    fast = deep_memory_attention(*args[:3], tuple(w0), eta=args[3], alpha=alpha, **kw)
    ref = deep_memory_attention_reference(*args[:3], tuple(w0), eta=args[3], alpha=alpha, **kw)[0]
    torch.testing.assert_close(fast, ref)
    assert fast[0, :, :2].abs().max() == 0  # no real key yet: zero
    w = torch.randn(fast.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    inputs = args + w0
    for gf, gr in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(gf, gr)


def test_retention_is_weight_decay_and_lp_2_huber_wide_are_l2() -> None:
    q, k, v, eta, alpha = _inputs(n=4)
    w0 = _weights(2)
    _, decayed = deep_memory_scan(q, k, v, w0, eta=torch.zeros_like(eta), alpha=alpha)
    total = alpha.prod(-1)[..., None, None]
    for got, w in zip(decayed.memory, w0):
        torch.testing.assert_close(got, total * w)
    l2 = deep_memory_attention(q, k, v, w0, eta=eta, alpha=alpha, bias="l2")
    torch.testing.assert_close(deep_memory_attention(q, k, v, w0, eta=eta / 2, alpha=alpha, bias="lp", p=2.0), l2)
    torch.testing.assert_close(deep_memory_attention(q, k, v, w0, eta=eta, alpha=alpha, bias="huber", delta=1e6), l2)


@pytest.mark.parametrize("config", [{"bias": "lp"}, {"bias": "huber", "activation": "silu"},
                                    {"layers": 1, "retention": "none"}])
def test_other_configurations_pass_the_conformance_suite(config: dict) -> None:
    spec = attnlab.get("miras-mlp")
    params = {"expansion": 2} if config.get("layers", 2) == 2 else {}
    patched = type(spec)(**{**spec.__dict__, "test_params": {**params, **config}})
    for check in (testing.check_fast_matches_reference, testing.check_key_padding, testing.check_settings):
        check(patched)


def test_registry_entry_and_errors() -> None:
    spec = attnlab.get("miras-mlp")
    assert spec.paper.id == "P157" and spec.supports.causal_only and not spec.supports.materialize
    m = attnlab.build("miras-mlp", dim=8, heads=2, expansion=2)
    assert [tuple(w.shape) for w in m.init_weights] == [(2, 8, 4), (2, 4, 8)]
    with pytest.raises(ParameterError, match="materialize"):
        m.materialize(torch.randn(1, 3, 8))
    for bad, match in (({"layers": 3}, "layers"), ({"bias": "dot"}, "bias"), ({"activation": "relu"}, "activation"),
                       ({"p": 2.0}, "p"), ({"bias": "lp", "p": 0.5}, "p"), ({"causal": False}, "causal"),
                       ({"layers": 1, "expansion": 2}, "expansion")):
        with pytest.raises(ParameterError, match=match):
            DeepMemoryAttention(8, heads=2, **bad)
    q, k, v, eta, _ = _inputs()
    with pytest.raises(ShapeError, match=r"weights\[1\]"):
        deep_memory_attention(q, k, v, (_weights(2)[0], _weights(2)[0]), eta=eta)
    with pytest.raises(ShapeError, match="v: residual"):
        deep_memory_attention(q, k, v[..., :3], _weights(1)[:1], eta=eta)
    with pytest.raises(ShapeError, match="state"):
        m.step(torch.randn(1, 1, 8), DeepMemoryAttention(8, heads=2).step(torch.randn(1, 1, 8))[1])
