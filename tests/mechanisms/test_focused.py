"""Focused linear attention (FLatten, P034): focusing map, normalised linear attention, depthwise conv on V."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.linear.focused import (
    depthwise_conv,
    focused_linear_attention,
    focused_linear_attention_reference,
    focusing_map,
)

DIM, HEADS = 16, 2


def build(seed: int = 0, dtype: torch.dtype = torch.float64, **params):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    m = attnlab.build("focused-linear", dim=DIM, heads=HEADS, **params).to(dtype)
    with torch.no_grad():  # a scale away from its initial constant, so a wrong broadcast shows
        m.scale.copy_(torch.randn(m.scale.shape, dtype=torch.float64))
    return m


def tokens(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_focusing_map_by_hand() -> None:
    """x = (1, 2), s = 1, p = 3: f_p = ‖x‖/‖x³‖ · x³ = √5/√65 · (1, 8) (up to the ε = 1e-6 shift)."""
    x = torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    phi = focusing_map(x, torch.ones(1, 2, dtype=torch.float64), power=3.0)
    want = (5**0.5 / 65**0.5) * torch.tensor([1.0, 8.0], dtype=torch.float64)
    torch.testing.assert_close(phi.reshape(2), want, atol=1e-5, rtol=0)
    negative = focusing_map(-x, torch.ones(1, 2, dtype=torch.float64))  # ReLU: only the ε shift is left
    torch.testing.assert_close(negative, torch.full_like(x, 1e-6), atol=1e-12, rtol=0)


def test_focusing_map_keeps_the_norm_over_the_whole_token() -> None:
    """f_p on each token's heads × channels: ‖φ‖ = ‖u‖ and φ ∝ u^p, u = (ReLU(x) + ε)/s (official code's layout)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) * 3
    s = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.2
    phi = focusing_map(x, s, power=3.0)
    u = ((torch.relu(x) + 1e-6) / s[:, None, :]).transpose(1, 2).reshape(2, 5, 12)  # token-major, all heads
    want = u**3 * (u.norm(dim=-1, keepdim=True) / (u**3).norm(dim=-1, keepdim=True))
    torch.testing.assert_close(phi.transpose(1, 2).reshape(2, 5, 12), want)


def test_focusing_sharpens_the_attention() -> None:
    """The paper's claim: p > 1 focuses — rows of the attention have lower entropy than with p = 1."""
    x = tokens(2, 24)
    entropies = []
    for p in (1.0, 3.0):
        a = build(power=p).materialize(x)
        entropies.append(-(a * a.clamp_min(1e-300).log()).sum(-1).mean().item())
    assert entropies[1] < entropies[0] - 0.05, entropies


def official_pipeline(m, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The FLatten layer written out: features on the whole token, z-normalised linear attention, DWC by shifts."""
    b, hh, ww, dim = x.shape
    n, c, hd = hh * ww, HEADS * m.head_dim, m.head_dim
    flat = x.reshape(b, n, dim)
    q, k, v = m.q_proj(flat), m.k_proj(flat), m.v_proj(flat)  # (b, n, C)
    s = F.softplus(m.scale).reshape(c)

    def feat(t: torch.Tensor) -> torch.Tensor:
        t = (torch.relu(t) + 1e-6) / s
        return t**m.power / (t**m.power).norm(dim=-1, keepdim=True) * t.norm(dim=-1, keepdim=True)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n, HEADS, -1).transpose(1, 2)

    fq, fk, vh = heads(feat(q)), heads(feat(k)), heads(v)
    z = 1.0 / (fq @ fk.mean(dim=2, keepdim=True).transpose(-1, -2))
    att = fq @ (fk.transpose(-1, -2) @ vh / n) * z
    grid = vh.reshape(b, HEADS, hh, ww, hd)
    conv = torch.zeros_like(grid) + m.dwc.bias
    kk, r = m.kernel_size, m.kernel_size // 2
    padded = F.pad(grid, (0, 0, r, r, r, r))
    for dy in range(kk):
        for dx in range(kk):
            conv = conv + padded[:, :, dy : dy + hh, dx : dx + ww] * m.dwc.weight[:, 0, dy, dx]
    out = att + conv.reshape(b, HEADS, n, hd)
    return m.out_proj(out.transpose(1, 2).reshape(b, n, c)).reshape(b, hh, ww, dim)


def test_module_on_a_grid_matches_the_written_out_layer() -> None:
    m = build(grid=2, kernel_size=5)
    x = tokens(2, 4, 6)
    want = official_pipeline(m, x)
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m(x, impl="reference"), want)


def test_causal_conv_by_hand_and_banded_matrix() -> None:
    """Causal 1-D DWC: out_t = Σ_j w_j v_{t−k+1+j} + b; the banded matrices reproduce the conv; D is lower triangular."""
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 1, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    out = depthwise_conv(v, w, bias, causal=True)
    for t in range(7):
        want = bias.clone()
        for j in range(3):
            src = t - 2 + j
            if src >= 0:
                want = want + w[:, 0, j] * v[:, :, src]
        torch.testing.assert_close(out[:, :, t], want.expand_as(out[:, :, t]))
    m = build(causal=True, kernel_size=3)
    d = m.dwc_matrix(7)
    assert d.shape == (m.head_dim, 7, 7)
    assert d.triu(1).abs().max().item() == 0.0
    with torch.no_grad():
        v = torch.randn(2, HEADS, 7, m.head_dim, dtype=torch.float64)
        conv = depthwise_conv(v, m.dwc.weight, m.dwc.bias, causal=True)
        torch.testing.assert_close(conv, torch.einsum("cij,bhjc->bhic", d, v) + m.dwc.bias)


def test_dwc_restores_the_rank() -> None:
    """Linear attention's matrix has rank ≤ head_dim; adding the DWC's banded matrix makes it full rank (P034)."""
    m = build(head_dim=3, kernel_size=5)
    x = tokens(1, 20)
    with torch.no_grad():
        a = m.materialize(x)[0, 0]
        d = m.dwc_matrix(20)
    assert torch.linalg.matrix_rank(a).item() <= 3
    assert torch.linalg.matrix_rank(a + d[0]).item() == 20


def test_power_one_is_relu_linear_attention() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    s = torch.ones(2, 4, dtype=torch.float64)
    fq, fk = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    w = fq @ fk.transpose(-1, -2)
    want = (w / w.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(focused_linear_attention(q, k, v, scale=s, power=1.0), want)
    out, weights = focused_linear_attention_reference(q, k, v, scale=s, power=1.0)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(weights @ v, want)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 12, 16])
def test_chunked_causal_equals_recurrent_and_reference(chunk_size: int, causal_paths_agree) -> None:
    m = build(causal=True, kernel_size=3, chunk_size=chunk_size)
    x = tokens(2, 12).requires_grad_(True)
    causal_paths_agree(m, x)


def test_step_reproduces_the_causal_forward_in_float32(stepped) -> None:
    m = build(causal=True, dtype=torch.float32, chunk_size=8)
    x = tokens(2, 40, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(stepped(m, x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_finite_and_accurate_at_input_scale_1e3(causal: bool, float32_accurate) -> None:
    m32 = build(causal=causal, dtype=torch.float32, chunk_size=8)
    m64 = build(causal=causal, dtype=torch.float64, chunk_size=8)
    x = (tokens(2, 33) * 1e3).float().requires_grad_(True)
    float32_accurate(m32, m64, x)


def test_grid_attention_mask_may_be_given_per_cell() -> None:
    m = build(grid=2, kernel_size=3)
    x = tokens(2, 3, 4)
    keep = torch.ones(2, 3, 4, dtype=torch.bool)
    keep[1, 2] = False
    changed = x.clone()
    changed[1, 2] = 50.0
    y1, y2 = m(x, attention_mask=keep), m(changed, attention_mask=keep.reshape(2, 12))
    torch.testing.assert_close(y1[1, :1], y2[1, :1])  # row 0 is beyond the kernel's reach of row 2
    torch.testing.assert_close(m.materialize(x, attention_mask=keep)[..., 8:].sum(-1)[1], torch.zeros(2, 12, dtype=x.dtype))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ParameterError, match="kernel_size"):
        attnlab.build("focused-linear", dim=DIM, heads=HEADS, kernel_size=4)
    with pytest.raises(ParameterError, match="grid"):
        attnlab.build("focused-linear", dim=DIM, heads=HEADS, grid=2, causal=True)
    with pytest.raises(ParameterError, match="power"):
        attnlab.build("focused-linear", dim=DIM, heads=HEADS, power=0.5)
    m = build(grid=2)
    with pytest.raises(ValueError, match="x"):
        m(tokens(2, 12))
    with pytest.raises(ValueError, match="context"):
        build()(tokens(2, 5), context=tokens(2, 5))
