"""Miras (P157) memories: linear attention, delta rule, retention, gated linear attention, the general recurrence."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import testing
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.linear.miras import (
    EluLinearAttention,
    GatedLinearAttention,
    MemoryAttention,
    RetentionAttention,
    memory_attention,
    memory_attention_reference,
    retnet_gammas,
)

F64 = torch.float64
NAMES = ["linear", "delta", "retention", "gated-linear", "miras"]
CONFIGS = [  # the general recurrence beyond its defaults
    {"bias": "l2", "retention": "scalar", "feature_map": "silu", "normalize": False},
    {"bias": "l2", "retention": "fixed", "feature_map": "identity", "normalize": False, "gamma": 0.9},
    {"bias": "dot", "retention": "channel", "feature_map": "elu+1", "normalize": True},
    {"bias": "dot", "retention": "scalar", "feature_map": "identity", "normalize": False},
]


def seq(*rows):
    return torch.tensor(rows, dtype=F64).reshape(1, 1, len(rows), -1)


def close(a, b, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -- each instance by hand on two tokens -----------------------------------------------------------
def test_linear_attention_by_hand():
    q, k, v = seq(0.5, -1.0), seq(1.0, -0.5), seq(2.0, 3.0)
    phi_k = [2.0, math.exp(-0.5)]  # elu(x) + 1: x + 1 above 0, e^x below
    mean = (phi_k[0] * 2.0 + phi_k[1] * 3.0) / (phi_k[0] + phi_k[1])  # d = 1: φ(q) cancels
    close(memory_attention(q, k, v, causal=True).flatten(), torch.tensor([2.0, mean], dtype=F64))
    close(memory_attention(q, k, v).flatten(), torch.tensor([mean, mean], dtype=F64))


def test_delta_rule_by_hand():
    q, k, v = seq([1.0, 2.0], [-1.0, 0.5]), seq([2.0, 0.0], [1.0, 1.0]), seq([3.0], [-2.0])
    beta = torch.tensor([[[0.5, 0.75]]], dtype=F64)

    def phi(x):  # SiLU, then L2 normalisation
        s = [a / (1 + math.exp(-a)) for a in x]
        norm = math.sqrt(sum(a * a for a in s))
        return torch.tensor([a / norm for a in s], dtype=F64)

    k0, k1, q0, q1 = phi([2.0, 0.0]), phi([1.0, 1.0]), phi([1.0, 2.0]), phi([-1.0, 0.5])
    s0 = 0.5 * k0 * 3.0  # M_0 = β0 v0 k0ᵀ (stored as a column)
    s1 = s0 + 0.75 * k1 * (-2.0 - k1 @ s0)  # M_1 = M_0 − β1 (M_0 k1 − v1) k1ᵀ
    out = memory_attention(q, k, v, feature_map="silu", bias="l2", beta=beta, normalize=False, causal=True)
    close(out.flatten(), torch.stack([q0 @ s0, q1 @ s1]))


def test_retention_by_hand():
    q, k, v = seq([1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 1.0, 2.0]), seq([1.0, 0.0, 1.0, 0.0], [2.0, 1.0, 0.0, 1.0]), seq([1.0], [4.0])
    gamma = 0.8
    log_decay = torch.full((1, 1, 2), math.log(gamma), dtype=F64)
    out = memory_attention(q, k, v, feature_map="identity", log_decay=log_decay, normalize=False, causal=True)
    # (q·k / √4) γ^(i − j) v
    first = (1 + 0 + 0 + 0) / 2 * 1.0
    second = ((0.5 + 0 + 1 + 0) / 2 * gamma * 1.0) + ((1 + 0.5 + 0 + 2) / 2 * 4.0)
    close(out.flatten(), torch.tensor([first, second], dtype=F64))


def test_gated_linear_attention_by_hand():
    q, k, v = seq([2.0, -1.0], [1.0, 3.0]), seq([0.5, 1.0], [1.0, -1.0]), seq([2.0], [1.0])
    alpha1 = [0.5, 0.9]
    log_decay = torch.log(torch.tensor([[[[1.0, 1.0], alpha1]]], dtype=F64))
    out = memory_attention(q, k, v, feature_map="identity", log_decay=log_decay, normalize=False, causal=True)
    r2 = math.sqrt(2)
    first = (2 * 0.5 + -1 * 1.0) / r2 * 2.0
    second = sum(q[0, 0, 1, c] / r2 * (alpha1[c] * k[0, 0, 0, c] * 2.0 + k[0, 0, 1, c] * 1.0) for c in range(2))
    close(out.flatten(), torch.tensor([first, second.item()], dtype=F64))


# -- paper properties -------------------------------------------------------------------------------
def projected(m, x):
    q, k, v = m.project(x)
    return q, k, v


def test_retention_with_gamma_one_is_unnormalised_causal_linear_attention():
    torch.manual_seed(0)
    m = RetentionAttention(8, 2, gamma=1.0, causal=True, chunk_size=3).double()
    x = torch.randn(2, 7, 8, dtype=F64)
    q, k, v = projected(m, x)
    by_hand = torch.zeros_like(v)
    for i in range(7):
        for j in range(i + 1):
            by_hand[:, :, i] += (q[:, :, i] * k[:, :, j]).sum(-1, keepdim=True) / 2 * v[:, :, j]  # √head_dim = 2
    close(m.attend(q, k, v), by_hand)


def test_retnet_decays_and_bidirectional_retention_is_gamma_to_the_distance():
    close(retnet_gammas(4), torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], dtype=F64))
    torch.manual_seed(0)
    m = RetentionAttention(8, 2).double()
    x = torch.randn(1, 6, 8, dtype=F64)
    q, k, _ = projected(m, x)
    distance = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs().to(F64)
    for h, gamma in enumerate([1 - 1 / 32, 1 - 1 / 64]):
        by_hand = (q[0, h] @ k[0, h].T) / 2 * gamma**distance
        close(m.materialize(x)[0, h], by_hand)


def test_gates_follow_their_formulas():
    torch.manual_seed(0)
    gla = GatedLinearAttention(8, 2, gate_temperature=16.0)
    delta = attnlab.build("delta", dim=8, heads=2)
    with torch.no_grad():
        gla.decay_weight.zero_()
        gla.decay_bias.fill_(math.log(3.0))  # σ = 3/4
        delta.beta_weight.zero_()
        delta.beta_bias.fill_(math.log(4.0))  # σ = 4/5
    k = torch.randn(1, 2, 5, 4)
    log_decay, beta = gla.gates(k)
    assert log_decay.shape == (1, 2, 5, 4) and beta is None
    torch.testing.assert_close(log_decay.exp(), torch.full_like(log_decay, 0.75 ** (1 / 16)))
    log_decay, beta = delta.gates(k)
    assert log_decay is None
    torch.testing.assert_close(beta, torch.full((1, 2, 5), 0.8))


def test_the_defaults_of_the_general_recurrence_are_linear_attention():
    torch.manual_seed(0)
    general, linear = MemoryAttention(8, 2, causal=True).double(), EluLinearAttention(8, 2, causal=True).double()
    linear.load_state_dict(general.state_dict())
    x = torch.randn(2, 9, 8, dtype=F64)
    close(general(x), linear(x))
    close(general.materialize(x), linear.materialize(x))


@pytest.mark.parametrize("name", ["delta", "gated-linear", "retention"])
def test_padding_equals_removing_the_padded_tokens(name):
    torch.manual_seed(0)
    m = attnlab.build(name, dim=8, heads=2, causal=True, chunk_size=4).double()
    x = torch.randn(1, 11, 8, dtype=F64)
    keep = torch.ones(1, 11, dtype=torch.bool)
    keep[0, [0, 4, 5, 9]] = False
    close(m(x, attention_mask=keep)[:, keep[0]], m(x[:, keep[0]]))


# -- the three computations, decoding, numerics --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_multi_chunk_configuration_passes_the_conformance_suite(name):
    """The suite's 9 tokens fit one chunk of 64; with chunk_size 4 they span three, one of them partial."""
    spec = attnlab.get(name)
    testing.run_all(dataclasses.replace(spec, test_params={**spec.test_params, "chunk_size": 4}))


@pytest.mark.parametrize("config", CONFIGS)
def test_other_configurations_pass_the_conformance_suite(config):
    spec = attnlab.get("miras")
    testing.run_all(dataclasses.replace(spec, test_params={**config, "chunk_size": 4}, normalized=config["normalize"]))


@pytest.mark.parametrize("config", [{"name": n} for n in NAMES] + [{"name": "miras", **c} for c in CONFIGS])
def test_step_reproduces_the_causal_forward_in_float32(config, stepped):
    config = dict(config)
    name = config.pop("name")
    torch.manual_seed(0)
    m = attnlab.build(name, dim=16, heads=2, causal=True, chunk_size=4, **config).eval()
    x = torch.randn(2, 13, 16)
    full = m(x)
    torch.testing.assert_close(stepped(m, x), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_module_equals_reference_forward_and_backward(name, causal):
    torch.manual_seed(0)
    m = attnlab.build(name, dim=8, heads=2, causal=causal, chunk_size=5).double()
    x = torch.randn(2, 12, 8, dtype=F64, requires_grad=True)
    w = torch.randn(2, 12, 8, dtype=F64)
    inputs = [x, *m.parameters()]
    fast = m(x)
    ref = m(x, impl="reference")
    close(fast, ref)
    for gf, gr in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        close(gf, gr)
    q, k, v = projected(m, x)
    close(m.materialize(x).reshape(2, 2, 12, 12) @ v, m.attend(q, k, v))  # materialize @ v == output


@pytest.mark.parametrize("name", NAMES)
def test_inputs_of_scale_1e3_give_finite_outputs_and_gradients(name):
    for causal in (False, True):
        torch.manual_seed(0)
        m = attnlab.build(name, dim=16, heads=2, causal=causal, chunk_size=8)
        x = (1e3 * torch.randn(2, 20, 16)).requires_grad_()
        y = m(x)
        grads = torch.autograd.grad(y.square().mean(), [x, *m.parameters()])
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads), (name, causal)


def test_reference_function_matches_the_fast_one_with_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 3, generator=g, dtype=F64) for _ in range(3))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, :4] = False
    log_decay = F.logsigmoid(torch.randn(2, 2, 10, 3, generator=g, dtype=F64))
    for causal in (False, True):
        kw = dict(feature_map="elu+1", log_decay=log_decay, normalize=True, causal=causal, attention_mask=keep)
        out, weights = memory_attention_reference(q, k, v, **kw)
        close(memory_attention(q, k, v, chunk_size=3, **kw), out)
        close(weights @ v, out)


# -- registry and errors ---------------------------------------------------------------------------------
def test_registry_entries():
    assert attnlab.get("miras").paper.id == "P157" and attnlab.get("miras").paper.arxiv == "2504.13173"
    assert attnlab.get("linear").paper.arxiv == "2006.16236" and attnlab.get("linear").normalized
    assert attnlab.get("retention").paper.arxiv == "2307.08621" and not attnlab.get("retention").normalized
    assert attnlab.get("gated-linear").paper.arxiv == "2312.06635"
    for name in NAMES:
        spec = attnlab.get(name)
        assert spec.exponent == 1.0 and spec.supports.causal and spec.supports.decode and not spec.supports.attn_mask
        assert spec.supports.cross == (name == "linear")
        assert spec.flops(1024, 8, 64, True) > 0 and spec.flops(1024, 8, 64, False) > 0


def test_bad_configurations_name_the_parameter():
    with pytest.raises(ParameterError, match="normalize"):
        attnlab.build("miras", dim=8, heads=2, feature_map="identity")  # normalize=True needs φ >= 0
    with pytest.raises(ParameterError, match="normalize"):
        attnlab.build("miras", dim=8, heads=2, bias="l2")
    with pytest.raises(ParameterError, match="retention"):
        attnlab.build("miras", dim=8, heads=2, bias="l2", retention="channel", normalize=False)
    with pytest.raises(ParameterError, match="gamma"):
        attnlab.build("miras", dim=8, heads=2, gamma=0.5)
    with pytest.raises(ParameterError, match="gamma"):
        attnlab.build("retention", dim=8, heads=2, gamma=0.0)
    with pytest.raises(ParameterError, match="bias"):
        attnlab.build("miras", dim=8, heads=2, bias="huber")
    with pytest.raises(ValueError, match="beta"):
        memory_attention(*(torch.randn(1, 1, 3, 2) for _ in range(3)), bias="l2", normalize=False)
    m = attnlab.build("gated-linear", dim=8, heads=2)
    with pytest.raises(ValueError, match="context"):
        m(torch.randn(1, 4, 8), context=torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="causal"):
        m.step(torch.randn(1, 1, 8))
