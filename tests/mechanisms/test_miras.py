"""Miras (P157) memories: linear attention, delta rule, retention, gated linear attention, the general recurrence."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import testing
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.linear.miras import (
    EluLinearAttention,
    GatedLinearAttention,
    MemoryAttention,
    RetentionAttention,
    feature_map_qk,
    gradient_memory_reference,
    memory_attention,
    memory_attention_reference,
    memory_scan,
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
    gla = GatedLinearAttention(8, 2, gate_temperature=16.0, gate_source="key")
    delta = attnlab.build("delta", dim=8, heads=2, gate_source="key")
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
    core = m.attend(q, k, v, side=m.side_input(x))  # delta, gated-linear: the gate logits from x
    close(m.materialize(x).reshape(2, 2, 12, 12) @ v, core)  # materialize @ v == output


@pytest.mark.parametrize("name", NAMES)
def test_inputs_of_scale_1e3_give_finite_outputs_and_gradients(name):
    for causal in (False, True):
        torch.manual_seed(0)
        m = attnlab.build(name, dim=16, heads=2, causal=causal, chunk_size=8)
        x = (1e3 * torch.randn(2, 20, 16)).requires_grad_()
        y = m(x)
        grads = torch.autograd.grad(y.square().mean(), [x, *m.parameters()])
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads), (name, causal)
        # the values: the float64 reference's (the same weights) on the same input, to float32 accuracy
        want = copy.deepcopy(m).double()(x.detach().double(), impl="reference")
        assert (y.double() - want).abs().max() <= 1e-3 * want.abs().max(), (name, causal)


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
        attnlab.build("miras", dim=8, heads=2, bias="kl")  # Memora's KL bias is not implemented
    with pytest.raises(ValueError, match="beta"):
        memory_attention(*(torch.randn(1, 1, 3, 2) for _ in range(3)), bias="l2", normalize=False)
    m = attnlab.build("gated-linear", dim=8, heads=2)
    with pytest.raises(ValueError, match="context"):
        m(torch.randn(1, 4, 8), context=torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="causal"):
        m.step(torch.randn(1, 1, 8))


# -- the ℓp and Huber memories (Moneta's and Yaad's attentional biases on a matrix memory) ---------------
def _hand_memory(keys, values, queries, betas, grad_of_error):
    """W (d_v × d_k) ← W − β ∇(W k − v) kᵀ in plain Python lists; the causal reads W_t q_t."""
    d_v, d_k = len(values[0]), len(keys[0])
    w = [[0.0] * d_k for _ in range(d_v)]
    reads = []
    for k, v, q, beta in zip(keys, values, queries, betas):
        err = [sum(w[i][j] * k[j] for j in range(d_k)) - v[i] for i in range(d_v)]
        g = grad_of_error(err)
        w = [[w[i][j] - beta * g[i] * k[j] for j in range(d_k)] for i in range(d_v)]
        reads.append([sum(w[i][j] * q[j] for j in range(d_k)) for i in range(d_v)])
    return reads


# unit keys and queries: the identity map followed by the L2 normalisation leaves them as they are
KEYS = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
QUERIES = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
VALUES = [[2.0, -0.5], [0.25, 1.5], [-1.0, 0.1]]
BETAS = [0.5, 0.25, 0.75]


def _unit_inputs():
    return seq(*QUERIES), seq(*KEYS), seq(*VALUES), torch.tensor([[BETAS]], dtype=F64)


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0])
def test_lp_memory_by_hand(p):
    def grad(err):  # ∂/∂e Σ|e|^p = p Sign(e) |e|^(p−1)
        return [p * math.copysign(abs(e) ** (p - 1), e) if e else 0.0 for e in err]

    want = torch.tensor(_hand_memory(KEYS, VALUES, QUERIES, BETAS, grad), dtype=F64)
    q, k, v, beta = _unit_inputs()
    kw = dict(feature_map="identity", bias="lp", p=p, beta=beta, normalize=False)
    close(memory_attention(q, k, v, causal=True, **kw)[0, 0], want)
    close(memory_attention_reference(q, k, v, causal=True, **kw)[0][0, 0], want)
    # non-causal: every query reads the memory written over the whole sequence
    close(memory_attention(q, k, v, **kw)[0, 0], torch.tensor(QUERIES, dtype=F64) @ _final_matrix(p).T)


def _final_matrix(p):
    """W_3 of the ℓp memory on the unit inputs, by hand (columns read with the basis queries)."""
    def grad(err):
        return [p * math.copysign(abs(e) ** (p - 1), e) if e else 0.0 for e in err]

    d_v, d_k = 2, 2
    w = [[0.0] * d_k for _ in range(d_v)]
    for k, v, beta in zip(KEYS, VALUES, BETAS):
        err = [sum(w[i][j] * k[j] for j in range(d_k)) - v[i] for i in range(d_v)]
        g = grad(err)
        w = [[w[i][j] - beta * g[i] * k[j] for j in range(d_k)] for i in range(d_v)]
    return torch.tensor(w, dtype=F64)


def test_huber_memory_by_hand_takes_both_branches():
    delta = 1.0
    taken = []

    def grad(err):  # ℓ2's gradient e within δ of the target, δ Sign(e) beyond
        norm = math.sqrt(sum(e * e for e in err))
        taken.append(norm <= delta)
        return list(err) if norm <= delta else [math.copysign(delta, e) if e else 0.0 for e in err]

    want = torch.tensor(_hand_memory(KEYS, VALUES, QUERIES, BETAS, grad), dtype=F64)
    assert False in taken and True in taken, taken  # the inputs exercise both branches
    q, k, v, beta = _unit_inputs()
    kw = dict(feature_map="identity", bias="huber", delta=delta, beta=beta, normalize=False, causal=True)
    close(memory_attention(q, k, v, **kw)[0, 0], want)
    close(memory_attention_reference(q, k, v, **kw)[0][0, 0], want)


def test_lp_with_p_2_and_huber_with_a_large_delta_are_the_delta_rule():
    """‖e‖₂² has gradient 2e, so ℓp with p = 2 and step β is the delta rule with step 2β; Huber never leaves
    its quadratic branch when δ is larger than every error — checked against the chunked delta-rule engine."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 11, 4, generator=g, dtype=F64) for _ in range(3))
    beta = 0.45 * torch.rand(2, 3, 11, generator=g, dtype=F64)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 7:] = False
    common = dict(feature_map="silu", normalize=False, causal=True, attention_mask=keep)
    delta_rule = memory_attention(q, k, v, bias="l2", beta=2 * beta, chunk_size=4, **common)
    close(memory_attention(q, k, v, bias="lp", p=2.0, beta=beta, **common), delta_rule)
    close(memory_attention(q, k, v, bias="huber", delta=1e6, beta=2 * beta, **common), delta_rule)
    # non-causal, the delta rule reads forwards and backwards; the gradient memories read the final memory
    final = memory_scan(*feature_map_qk(q, k, "silu", "lp"), v, bias="lp", p=2.0, beta=beta, attention_mask=keep)[1]
    close(memory_attention(q, k, v, bias="lp", p=2.0, beta=beta, **{**common, "causal": False}),
          feature_map_qk(q, k, "silu", "lp")[0] @ final)


@pytest.mark.parametrize("retention", ["none", "fixed", "scalar", "channel"])
@pytest.mark.parametrize("bias", ["lp", "huber"])
def test_gradient_memories_fast_equals_reference_forward_and_backward(bias, retention):
    torch.manual_seed(0)
    for causal in (False, True):
        kw = {"p": 2.5} if bias == "lp" else {"delta": 0.3}
        m = attnlab.build("miras", dim=8, heads=3, head_dim=2, causal=causal, bias=bias, retention=retention,
                          feature_map="silu", normalize=False, **kw).double()
        x = torch.randn(2, 6, 8, dtype=F64, requires_grad=True)
        keep = torch.ones(2, 6, dtype=torch.bool)
        keep[0, [1, 4]] = False
        w = torch.randn(2, 6, 8, dtype=F64)
        inputs = [x, *m.parameters()]
        fast, ref = m(x, attention_mask=keep), m(x, attention_mask=keep, impl="reference")
        close(fast, ref)
        for gf, gr in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
            close(gf, gr)


@pytest.mark.parametrize("name", ["miras-lp", "miras-huber"])
def test_gradient_memory_padding_equals_removing_the_padded_tokens(name):
    torch.manual_seed(0)
    m = attnlab.build(name, dim=8, heads=2, causal=True).double()
    x = torch.randn(1, 9, 8, dtype=F64)
    keep = torch.ones(1, 9, dtype=torch.bool)
    keep[0, [0, 4, 5]] = False
    close(m(x, attention_mask=keep)[:, keep[0]], m(x[:, keep[0]]))


@pytest.mark.parametrize("name", ["miras-lp", "miras-huber"])
def test_gradient_memory_step_continues_the_scan(name, stepped):
    torch.manual_seed(0)
    m = attnlab.build(name, dim=8, heads=2, causal=True).double()
    x = torch.randn(2, 7, 8, dtype=F64)
    close(stepped(m, x), m(x))
    q, k, v = (torch.randn(1, 1, 6, 3, dtype=F64) for _ in range(3))
    beta = torch.full((1, 1, 6), 0.5, dtype=F64)
    whole, memory = memory_scan(q, k, v, bias="lp", beta=beta, causal=True)
    first, half = memory_scan(q[:, :, :3], k[:, :, :3], v[:, :, :3], bias="lp", beta=beta[..., :3], causal=True)
    second, end = memory_scan(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], bias="lp", beta=beta[..., 3:], causal=True,
                              memory=half)
    close(torch.cat([first, second], dim=2), whole)
    close(end, memory)
    close(gradient_memory_reference(q, k, v, bias="lp", beta=beta)[1], memory.transpose(-2, -1))


def test_gradient_memory_entries_and_errors():
    for name in ("miras-lp", "miras-huber"):
        spec = attnlab.get(name)
        assert spec.paper.id == "P157" and spec.supports.causal and spec.supports.decode
        assert not spec.supports.materialize and not spec.normalized
        with pytest.raises(ParameterError, match="materialize"):
            attnlab.build(name, dim=8, heads=2).materialize(torch.randn(1, 4, 8))
    assert attnlab.build("miras-lp", dim=8, heads=2).p == 1.5
    with pytest.raises(ParameterError, match="p"):
        attnlab.build("miras-lp", dim=8, heads=2, p=0.5)
    with pytest.raises(ParameterError, match="delta"):
        attnlab.build("miras-huber", dim=8, heads=2, delta=0.0)
    with pytest.raises(ParameterError, match="p: only used with bias='lp'"):
        attnlab.build("miras", dim=8, heads=2, p=2.0)
    with pytest.raises(ParameterError, match="normalize"):
        attnlab.build("miras", dim=8, heads=2, bias="lp")
    with pytest.raises(ValueError, match="beta"):
        memory_attention(*(torch.randn(1, 1, 3, 2) for _ in range(3)), bias="huber", normalize=False)


# -- gates from x (GLA, DeltaNet), the default ------------------------------------------------------------
def test_gates_read_x_by_default():
    """delta: β_t = σ(x_t w_h + b_h); gated-linear: α_t = σ(x_t W₁ W₂ + b)^(1/τ), rank 16 — the module equals
    the functional memory fed with the gates computed here from x by hand."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8, dtype=F64)
    delta = attnlab.build("delta", dim=8, heads=2, causal=True).double()
    gla = attnlab.build("gated-linear", dim=8, heads=2, causal=True).double()
    assert not hasattr(delta, "beta_weight") and gla.decay_proj[0].weight.shape == (16, 8)

    def heads(t):  # (batch, n, heads·w) -> (batch, heads, n, w)
        return t.view(2, 7, 2, -1).transpose(1, 2)

    q, k, v = (heads(lin(x)) for lin in (delta.q_proj, delta.k_proj, delta.v_proj))
    beta = torch.sigmoid(x @ delta.beta_proj.weight.T + delta.beta_proj.bias).transpose(1, 2)  # (batch, heads, n)
    core = memory_attention(q, k, v, feature_map="silu", bias="l2", beta=beta, normalize=False, causal=True)
    close(delta(x), delta.out_proj(core.transpose(1, 2).reshape(2, 7, 8)))

    q, k, v = (heads(lin(x)) for lin in (gla.q_proj, gla.k_proj, gla.v_proj))
    low, up = gla.decay_proj[0], gla.decay_proj[1]
    log_alpha = heads(F.logsigmoid(x @ low.weight.T @ up.weight.T + up.bias) / 16.0)  # per channel
    core = memory_attention(q, k, v, feature_map="identity", log_decay=log_alpha, normalize=False, causal=True)
    close(gla(x), gla.out_proj(core.transpose(1, 2).reshape(2, 7, 8)))


@pytest.mark.parametrize("name", ["delta", "gated-linear", "miras-lp"])
def test_gates_from_x_pass_the_conformance_suite_and_key_gates_remain(name):
    spec = attnlab.get(name)
    testing.run_all(dataclasses.replace(spec, test_params={**spec.test_params, "gate_source": "key"}))
    m = attnlab.build(name, dim=8, heads=2)
    assert m.gate_source == "x" and m.gate_width > 0
    assert attnlab.build(name, dim=8, heads=2, gate_source="key").side_input(torch.randn(1, 5, 8)) is None


@pytest.mark.parametrize("name", ["delta", "gated-linear", "miras-lp", "miras-huber"])
def test_gates_from_x_reach_the_core_through_the_side_input(name):
    """attend(q, k, v, side=side_input(x)) on the heads of project(x) is the module's core; the gate logits are
    x's (changing them changes the output), a missing or misshapen side input is refused naming `side`, and the
    per-head-key form takes none."""
    torch.manual_seed(0)
    m = attnlab.build(name, dim=8, heads=2, causal=True).double()
    x = torch.randn(2, 6, 8, dtype=F64)
    q, k, v = m.project(x)
    assert q.shape == k.shape == (2, 2, 6, 4)  # the gates travel beside the heads, not in extra channels of k
    side = m.side_input(x)
    assert side.shape == (2, 2, 6, m.gate_width)
    for impl in ("fast", "reference"):
        close(m.out_proj(m.merge_heads(m.attend(q, k, v, side=side, impl=impl))), m(x))
    assert (m.attend(q, k, v, side=side + 3.0) - m.attend(q, k, v, side=side)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="side: .* reads its gates from x"):
        m.attend(q, k, v)
    with pytest.raises(ShapeError, match=r"side: expected the gate logits"):
        m.attend(q, k, v, side=side[..., :0])
    with pytest.raises(ShapeError, match=r"side: expected \(batch, n_k, s\)"):
        m.attend(q, k, v, side=side[:, :, :5])
    keyed = attnlab.build(name, dim=8, heads=2, gate_source="key").double()
    with pytest.raises(ValueError, match="side: .* takes no side input \\(gate_source='key'"):
        keyed.attend(q, k, v, side=side)


@pytest.mark.parametrize("name", ["linear", "retention"])
def test_entries_without_learned_gates_refuse_a_side_input(name):
    m = attnlab.build(name, dim=8, heads=2)
    assert not m.takes_side_input and m.side_input(torch.randn(1, 5, 8)) is None
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    with pytest.raises(ValueError, match=f"side: {name} takes no side input"):
        m.attend(q, k, v, side=torch.randn(1, 2, 5, 1))
    with pytest.raises(ValueError, match="side: miras takes no side input \\(no learned gates"):
        attnlab.build("miras", dim=8, heads=2).attend(q, k, v, side=torch.randn(1, 2, 5, 1))


@pytest.mark.parametrize("name", ["miras-lp", "miras-huber"])
def test_gradient_memory_reference_runs_under_no_grad(name: str) -> None:
    """The reference takes each step's gradient by autograd: under no_grad (as capture and the bench call it) it
    still runs, equals the fast path, and hands back no graph."""
    torch.manual_seed(0)
    module = attnlab.build(name, dim=16, heads=2, causal=True).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        reference, fast = module(x, impl="reference"), module(x)
    assert not reference.requires_grad
    torch.testing.assert_close(reference, fast, rtol=1e-10, atol=1e-10)
