"""Mamba's selective SSM (P065 / P031): chunked scan, recurrence, hidden attention, padding."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.linear.selective_ssm import hidden_attention, selective_scan, selective_scan_reference

DIM = 16


def naive_scan(u, delta, A, B, C, D):  # type: ignore[no-untyped-def]
    """The recurrence written out channel by channel and state by state (independent of the library)."""
    b, n, d = u.shape
    s = A.shape[1]
    out = torch.zeros(b, n, d, dtype=u.dtype)
    h = [[[u.new_zeros(()) for _ in range(s)] for _ in range(d)] for _ in range(b)]
    rows = []
    for t in range(n):
        row = []
        for i in range(b):
            chans = []
            for c in range(d):
                acc = D[c] * u[i, t, c]
                for k in range(s):
                    h[i][c][k] = torch.exp(delta[i, t, c] * A[c, k]) * h[i][c][k] + delta[i, t, c] * B[i, t, k] * u[i, t, c]
                    acc = acc + C[i, t, k] * h[i][c][k]
                chans.append(acc)
            row.append(torch.stack(chans))
        rows.append(torch.stack(row))
    out = torch.stack(rows, dim=1)
    return out


def scan_inputs(b: int, n: int, d: int, s: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, n, d, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(b, n, d, generator=g, dtype=dtype))
    A = -torch.rand(d, s, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(b, n, s, generator=g, dtype=dtype)
    C = torch.randn(b, n, s, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    return [t.requires_grad_(True) for t in (u, delta, A, B, C, D)]


def build(seed: int = 0, dtype: torch.dtype = torch.float64, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    params = {"dim": DIM, "heads": 2, "d_state": 4, "d_conv": 3, **kw}
    return attnlab.build("mamba", **params).to(dtype).eval()


def tokens(n: int, batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_two_tokens_by_hand() -> None:
    """u = (1, 2), Δ = (0.5, 0.25), A = −1, B = (2, 3), C = (1, −1), D = 0.5, one channel, N_s = 1."""
    u = torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5], [0.25]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[2.0], [3.0]]], dtype=torch.float64)
    C = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    # h1 = Δ1 B1 u1 = 1, y1 = C1 h1 + D u1 = 1.5; h2 = e^{−0.25} h1 + Δ2 B2 u2 = e^{−0.25} + 1.5, y2 = −h2 + 1
    want_y = torch.tensor([[[1.5], [-math.exp(-0.25) - 0.5]]], dtype=torch.float64)
    # α11 = C1 Δ1 B1 = 1, α21 = C2 e^{Δ2 A} Δ1 B1 = −e^{−0.25}, α22 = C2 Δ2 B2 = −0.75, α12 = 0
    want_alpha = torch.tensor([[[[1.0, 0.0], [-math.exp(-0.25), -0.75]]]], dtype=torch.float64)
    for chunk in (1, 2, None):
        torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, chunk_size=chunk), want_y)
    y, alpha = selective_scan_reference(u, delta, A, B, C, D)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(alpha, want_alpha)


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 7, 12, 13, None])
def test_chunked_scan_equals_the_recurrence_forward_and_backward(chunk: int | None) -> None:
    """n = 12: chunks that divide it (1, 3, 4, 12), that do not (5, 7), longer than it (13), and ⌈√n⌉."""
    inputs = scan_inputs(2, 12, 3, 2)
    fast = selective_scan(*inputs, chunk_size=chunk)
    slow = naive_scan(*inputs)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-10)
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
    g_fast = torch.autograd.grad((fast * w).sum(), inputs)
    g_slow = torch.autograd.grad((slow * w).sum(), inputs)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D"), g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"gradient of {name}")


def test_reference_scan_and_hidden_attention_match_the_recurrence() -> None:
    inputs = scan_inputs(2, 9, 3, 2, seed=4)
    y, alpha = selective_scan_reference(*inputs)
    slow = naive_scan(*inputs)
    torch.testing.assert_close(y, slow, atol=1e-12, rtol=1e-10)
    u, _, _, _, _, D = inputs
    torch.testing.assert_close(torch.einsum("bcij,bjc->bic", alpha, u) + u * D, slow, atol=1e-12, rtol=1e-10)
    assert alpha.triu(1).abs().max().item() == 0.0


def test_long_sequence_chunked_scan_float32() -> None:
    inputs = [t.detach() for t in scan_inputs(1, 300, 8, 4, seed=5)]
    ref = selective_scan_reference(*inputs)[0]
    fast = selective_scan(*[t.float() for t in inputs])
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-4)


def test_step_reproduces_the_forward_in_float32() -> None:
    m = build(dtype=torch.float32, chunk_size=8)
    x = tokens(40, dtype=torch.float32)
    with torch.no_grad():
        full = m(x)
        state, outs = None, []
        for t in range(x.shape[1]):
            y, state = m.step(x[:, t : t + 1], state)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert state.conv.shape == (2, m.inner, 2) and state.ssm.shape == (2, m.inner, 4)


def test_materialize_explains_the_output_per_channel() -> None:
    """y_i^c = Σ_j α_ij^c x̃_j^c + D^c x̃_i^c, then the gate and out_proj give the forward."""
    m = build()
    x = tokens(11)
    p = m.ssm_inputs(x)
    alpha = m.materialize_channels(x)  # (b, d_inner, n, n)
    assert alpha.shape == (2, m.inner, 11, 11)
    y = torch.einsum("bcij,bjc->bic", alpha, p.x) + p.x * m.D
    torch.testing.assert_close(m.out_proj(y * F.silu(p.z)), m(x), atol=1e-10, rtol=1e-8)
    heads = m.materialize(x)
    torch.testing.assert_close(heads, alpha.view(2, 2, m.inner // 2, 11, 11).mean(2))


def test_key_padding_skips_positions() -> None:
    """Left padding: the real tokens' outputs equal the unpadded sequence's; padded keys get no weight."""
    m = build()
    real = tokens(7, batch=1)
    junk = 50 * tokens(3, batch=1, seed=9)
    padded = torch.cat([junk, real], dim=1)
    kpm = torch.tensor([[False] * 3 + [True] * 7])
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(padded, attention_mask=kpm, impl=impl)[:, 3:], m(real, impl=impl), atol=1e-10, rtol=1e-8)
    a = m.materialize(padded, attention_mask=kpm)
    assert a[..., :3].abs().max().item() == 0.0
    torch.testing.assert_close(a[..., 3:, 3:], m.materialize(real))


def test_unified_attention_explains_the_gated_output() -> None:
    """P031: y ⊙ SiLU(z) = α̃ x + SiLU(z) ⊙ (D x̃ + α (σ(conv) · bias)), here with interior padding."""
    m = build()
    x = tokens(10)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 4:6] = False
    spec = attnlab.get("unified-implicit-attention", kind="analysis")
    assert spec.paper.id == "P031"
    unified = spec.build(module=m, x=x, attention_mask=kpm, per_channel=True)
    xs = m.in_proj(x).chunk(2, dim=-1)[0].masked_fill(~kpm[..., None], 0.0)
    p = m.ssm_inputs(x, kpm)
    alpha = m.materialize_channels(x, attention_mask=kpm)
    bias_path = torch.einsum("bcij,bjc->bic", alpha, torch.sigmoid(p.conv) * m.conv.bias)
    gated = torch.einsum("bcij,bjc->bic", unified, xs) + F.silu(p.z) * (m.D * p.x + bias_path)
    torch.testing.assert_close(m.out_proj(gated), m(x, attention_mask=kpm), atol=1e-10, rtol=1e-8)
    mean = spec.build(module=m, x=x, attention_mask=kpm)
    torch.testing.assert_close(mean, unified.view(2, 2, m.inner // 2, 10, 10).mean(2))
    assert unified.triu(1).abs().max().item() == 0.0


def test_large_inputs_stay_finite() -> None:
    m = build(dtype=torch.float32)
    x = (1e3 * tokens(64, dtype=torch.float32)).requires_grad_(True)
    y = m(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    # the values: the float64 reference's (the same weights) on the same input, to float32 accuracy
    m64 = copy.deepcopy(m).double()
    want = m64(x.detach().double(), impl="reference")
    assert (y.double() - want).abs().max() <= 1e-4 * want.abs().max()
    a, a64 = m.materialize(x.detach()), m64.materialize(x.detach().double())
    assert (a.double() - a64).abs().max() <= 1e-4 * a64.abs().max()


def test_hidden_attention_heads_average() -> None:
    inputs = [t.detach() for t in scan_inputs(1, 6, 4, 3, seed=6)]
    _, delta, A, B, C, _ = inputs
    per_channel = hidden_attention(delta, A, B, C)
    torch.testing.assert_close(hidden_attention(delta, A, B, C, heads=2), per_channel.view(1, 2, 2, 6, 6).mean(2))


def test_bad_parameters_and_inputs() -> None:
    with pytest.raises(ParameterError, match="causal"):
        attnlab.build("mamba", dim=DIM, heads=2, causal=False)
    with pytest.raises(ParameterError, match="heads"):
        attnlab.build("mamba", dim=DIM, heads=3)
    with pytest.raises(ParameterError, match="chunk_size"):
        attnlab.build("mamba", dim=DIM, heads=2, chunk_size=0)
    u, delta, A, B, C, D = [t.detach() for t in scan_inputs(1, 5, 3, 2)]
    with pytest.raises(ShapeError, match="B"):
        selective_scan(u, delta, A, B[:, :4], C, D)
    with pytest.raises(TypeError, match="delta"):
        selective_scan(u, delta.float(), A, B, C, D)
    m = build()
    with pytest.raises(ValueError, match="context"):
        m(tokens(5), context=tokens(5))
    with pytest.raises(ValueError, match="attn_mask"):
        m(tokens(5), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ShapeError, match="x_t"):
        m.step(tokens(2))
    with pytest.raises(ShapeError, match="state"):
        m.step(tokens(1), m.initial_state(3, dtype=torch.float64))


def test_parameters_are_mambas() -> None:
    """Mamba's block (mamba_simple.Mamba defaults: bias=False, conv_bias=True): in_proj without bias, conv with
    bias, x_proj, dt_proj with bias, A_log, D, out_proj without bias — counted from that list."""
    dim, expand, d_state, d_conv = 16, 2, 16, 4
    inner, dt_rank = expand * dim, math.ceil(dim / 16)
    want = (dim * 2 * inner + inner * d_conv + inner + inner * (dt_rank + 2 * d_state) + dt_rank * inner + inner
            + inner * d_state + inner + inner * dim)
    m = attnlab.build("mamba", dim=dim, heads=2)
    assert m.in_proj.bias is None and m.out_proj.bias is None
    assert sum(p.numel() for p in m.parameters()) == want
    assert attnlab.build("mamba", dim=dim, heads=2, qkv_bias=True).in_proj.bias.shape == (2 * inner,)  # the option
