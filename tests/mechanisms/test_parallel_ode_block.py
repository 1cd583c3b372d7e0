"""The parallel ODE block: one Euler step is x + MHA(LN x) + MLP(LN x) by hand; each Runge–Kutta solver converges at its
order on a smooth float64 case (error against many RK4 steps); steps compose; the per-branch norm option; timm's
ParallelScalingBlock with its fused projections mapped onto the block agrees."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.blocks.parallel_ode_block import ORDERS

F64 = torch.float64
DIM, HEADS, N = 8, 2, 5


def _block(**kw):
    torch.manual_seed(0)
    return attnlab.build("parallel-ode-block", dim=DIM, heads=HEADS, **kw).double().eval()


def _tokens(batch=2, seed=1):
    return torch.randn(batch, N, DIM, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _mha(h, att, keep):
    """Multi-head softmax attention by hand from the mixer's weights, padded keys excluded."""
    b, n, _ = h.shape
    d = DIM // HEADS
    q, k, v = ((h @ p.weight.T + p.bias).reshape(b, n, HEADS, d) for p in (att.q_proj, att.k_proj, att.v_proj))
    out = torch.zeros(b, n, HEADS, d, dtype=h.dtype)
    for z in range(b):
        for hd in range(HEADS):
            for i in range(n):
                logits = torch.stack([q[z, i, hd] @ k[z, j, hd] for j in range(n)]) / math.sqrt(d)
                logits[~keep[z]] = -math.inf
                w = torch.softmax(logits, 0)
                out[z, i, hd] = sum(w[j] * v[z, j, hd] for j in range(n))
    return out.reshape(b, n, DIM) @ att.out_proj.weight.T + att.out_proj.bias


def _mlp(h, mlp):
    u = h @ mlp[0].weight.T + mlp[0].bias
    return (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ mlp[2].weight.T + mlp[2].bias


def _field_by_hand(m, x, keep):
    h = _layer_norm(x, m.norm)
    return _mha(h, m.mixer, keep) + _mlp(h if m.mlp_norm is None else _layer_norm(x, m.mlp_norm), m.mlp)


def test_euler_step_is_the_parallel_block_by_hand():
    m = _block()
    x = _tokens()
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, 3:] = False
    want = x + _field_by_hand(m, x, keep)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), want, rtol=1e-12, atol=1e-12)


def test_separate_norms_by_hand():
    m = _block(shared_norm=False)
    with torch.no_grad():
        m.mlp_norm.weight.uniform_(0.5, 2.0)
        m.mlp_norm.bias.uniform_(-1.0, 1.0)
    x = _tokens()
    keep = torch.ones(2, N, dtype=torch.bool)
    torch.testing.assert_close(m(x), x + _field_by_hand(m, x, keep), rtol=1e-12, atol=1e-12)
    shared = _block()
    shared.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("mlp_norm")})
    assert (shared(x) - m(x)).abs().max() > 1e-3  # the MLP's own norm is used


def test_steps_compose_and_step_size():
    one = _block()  # euler, 1 step of size 1
    x = _tokens()
    twice = _block(steps=2, step_size=1.0)
    torch.testing.assert_close(twice(x), one(one(x)), rtol=1e-12, atol=1e-12)
    half = _block(steps=2)  # h = 1/2 by default
    torch.testing.assert_close(half(x), _block(steps=2, step_size=0.5)(x), rtol=0, atol=0)
    x1 = x + 0.5 * one.field(x, None, "fast")
    torch.testing.assert_close(half(x), x1 + 0.5 * one.field(x1, None, "fast"), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def flow():
    """Tokens and their flow map at t = 1 from RK4 with 512 steps."""
    x = _tokens(batch=1, seed=4)
    with torch.no_grad():
        return x, _block(solver="rk4", steps=512)(x)


@pytest.mark.parametrize("solver", sorted(ORDERS))
def test_solver_converges_at_its_order(solver, flow):
    """Global error at t = 1 against RK4 with 512 steps: log2(err(N) / err(2N)) ≈ the order."""
    x, exact = flow
    counts = (2, 4, 8) if solver == "rk4" else (4, 8, 16, 32)
    for impl in ("fast", "reference"):
        errors = [(_block(solver=solver, steps=s)(x, impl=impl) - exact).abs().max().item() for s in counts]
        slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        assert abs(slopes[-1] - ORDERS[solver]) < 0.25, (solver, impl, errors, slopes)
        assert all(abs(s - ORDERS[solver]) < 0.6 for s in slopes), (solver, impl, errors, slopes)


def test_bad_solver_settings():
    with pytest.raises(ParameterError, match="solver"):
        _block(solver="rk5")
    with pytest.raises(ParameterError, match="steps"):
        _block(steps=0)
    with pytest.raises(ParameterError, match="step_size"):
        _block(step_size=-0.5)


@pytest.mark.parametrize(("qkv_bias", "causal"), [(True, False), (False, False), (True, True)])
def test_timm_parallel_scaling_block_agrees(qkv_bias, causal):
    vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(5)
    peer = vit.ParallelScalingBlock(DIM, HEADS, mlp_ratio=4.0, qkv_bias=qkv_bias).double().eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.3)
    m = _block(causal=causal, mixer_params={"qkv_bias": qkv_bias})
    hidden = 4 * DIM
    w, b = peer.in_proj.weight, peer.in_proj.bias
    with torch.no_grad():
        m.norm.load_state_dict(peer.in_norm.state_dict())
        m.norm.eps = peer.in_norm.eps  # timm's LayerNorm: eps 1e-6
        m.mlp[0].weight.copy_(w[:hidden])
        m.mlp[0].bias.copy_(b[:hidden] if qkv_bias else peer.mlp_bias)
        for i, proj in enumerate((m.mixer.q_proj, m.mixer.k_proj, m.mixer.v_proj)):
            proj.weight.copy_(w[hidden + i * DIM : hidden + (i + 1) * DIM])
            if qkv_bias:
                proj.bias.copy_(b[hidden + i * DIM : hidden + (i + 1) * DIM])
        m.mixer.out_proj.load_state_dict(peer.attn_out_proj.state_dict())
        m.mlp[2].load_state_dict(peer.mlp_out_proj.state_dict())
    x = torch.randn(3, 7, DIM, dtype=F64, generator=torch.Generator().manual_seed(6))
    want = peer(x, is_causal=causal)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, impl=impl), want, rtol=1e-12, atol=1e-12)
