"""Galerkin- and Fourier-type attention (P044): layer-normalised K, V (or Q, K), no softmax, 1/n scaling."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.mechanisms.linear.galerkin import (
    fourier_attention,
    fourier_attention_reference,
    galerkin_attention,
    galerkin_attention_reference,
)

DIM, HEADS = 16, 2


def build(name: str = "galerkin", seed: int = 0, dtype: torch.dtype = torch.float64, **params):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    m = attnlab.build(name, dim=DIM, heads=HEADS, **params).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # affine weights away from (1, 0), so a per-head mix-up shows
        for norm in (getattr(m, a) for a in ("q_norm", "k_norm", "v_norm") if hasattr(m, a)):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g, dtype=torch.float64))
            norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g, dtype=torch.float64))
    return m


def tokens(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def layer_norm(t: torch.Tensor, norm) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(x − mean) / √(var + 1e-5) over the head dim, then the head's own affine."""
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + 1e-5) * norm.weight[:, None, :] + norm.bias[:, None, :]


def heads(m, t: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)


def by_formula(m, x: torch.Tensor, causal: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Galerkin z = Q (K̃ᵀ Ṽ) / n or Fourier z = (Q̃ K̃ᵀ) V / n, token by token; causal: the prefix and its length."""
    q, k, v = heads(m, m.q_proj(x)), heads(m, m.k_proj(x)), heads(m, m.v_proj(x))
    if hasattr(m, "v_norm"):
        k, v = layer_norm(k, m.k_norm), layer_norm(v, m.v_norm)
    else:
        q, k = layer_norm(q, m.q_norm), layer_norm(k, m.k_norm)
    b, _, n, _ = q.shape
    out = torch.zeros_like(v)
    for bi in range(b):
        for i in range(n):
            seen = [j for j in range(n) if (not causal or j <= i) and (keep is None or bool(keep[bi, j]))]
            if not seen:
                continue
            ks, vs = k[bi][:, seen], v[bi][:, seen]
            if hasattr(m, "v_norm"):
                out[bi, :, i] = (q[bi, :, i, None, :] @ (ks.transpose(-1, -2) @ vs))[:, 0] / len(seen)
            else:
                out[bi, :, i] = ((q[bi, :, i, None, :] @ ks.transpose(-1, -2)) @ vs)[:, 0] / len(seen)
    return m.out_proj(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("name", ["galerkin", "fourier"])
@pytest.mark.parametrize("causal", [False, True])
def test_module_matches_the_paper_formula(name: str, causal: bool) -> None:
    m = build(name, causal=causal, **({"chunk_size": 4} if name == "galerkin" else {}))
    x = tokens(2, 9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = False
    keep[1, 2] = False
    for kpm in (None, keep):
        want = by_formula(m, x, causal, kpm)
        for impl in ("fast", "reference"):
            got = m(x, attention_mask=kpm, impl=impl)
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["galerkin", "fourier"])
def test_padding_counts_only_the_real_tokens(name: str) -> None:
    """With padding, n is the number of real tokens: the real tokens' outputs equal those of the unpadded sequence."""
    m = build(name)
    x = tokens(1, 10)
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 7:] = False
    torch.testing.assert_close(m(x, attention_mask=keep)[:, :7], m(x[:, :7]))


def test_galerkin_is_independent_of_the_ordering_of_tokens() -> None:
    """K̃ᵀṼ is a sum over tokens: permuting the key/value tokens leaves every query's output unchanged."""
    m = build("galerkin")
    x, ctx = tokens(2, 8), tokens(2, 11, seed=4)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(m(x, context=ctx[:, perm]), m(x, context=ctx))
    q, k, v = m.project(x)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(m.attend(q, k[:, :, order], v[:, :, order]), m.attend(q, k, v))
    # and the output is not trivially constant: changing one token's value does change it
    changed = ctx.clone()
    changed[:, 3] += 1.0
    assert (m(x, context=changed) - m(x, context=ctx)).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["galerkin", "fourier"])
def test_one_over_n_makes_constant_inputs_scale_stable_in_n(name: str) -> None:
    """A constant sequence gives the same output at every length n (Σ_j over n equal terms, divided by n)."""
    m = build(name)
    token = tokens(1, 1)
    short, long = m(token.expand(1, 3, DIM)), m(token.expand(1, 60, DIM))
    torch.testing.assert_close(short[:, :1].expand(1, 60, DIM), long)
    torch.testing.assert_close(short[:, :1].expand(1, 3, DIM), short)
    causal = build(name, causal=True)
    torch.testing.assert_close(causal(token.expand(1, 60, DIM)), long)


def test_functional_forms_agree_with_their_references() -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 4:] = False
    for causal in (False, True):
        out, weights = galerkin_attention_reference(q, k, v, causal=causal, attention_mask=keep)
        torch.testing.assert_close(galerkin_attention(q, k, v, causal=causal, attention_mask=keep, chunk_size=3), out)
        torch.testing.assert_close(weights @ v, out)
        out, weights = fourier_attention_reference(q, k, v, causal=causal, attention_mask=keep)
        torch.testing.assert_close(fourier_attention(q, k, v, causal=causal, attention_mask=keep), out)
        n = keep.sum(-1).clamp_min(1)[:, None, None, None] if not causal else keep.cumsum(-1).clamp_min(1)[:, None, :, None]
        mask = keep[:, None, None, :] & (torch.ones(10, 10, dtype=torch.bool).tril() if causal else True)
        torch.testing.assert_close(weights, (q @ k.transpose(-1, -2)).masked_fill(~mask, 0) / n)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 12, 16])
def test_chunked_causal_equals_recurrent_and_reference(chunk_size: int, causal_paths_agree) -> None:
    m = build("galerkin", causal=True, chunk_size=chunk_size)
    x = tokens(2, 12).requires_grad_(True)
    causal_paths_agree(m, x)


@pytest.mark.parametrize("name", ["galerkin", "fourier"])
def test_step_reproduces_the_causal_forward_in_float32(name: str, stepped) -> None:
    m = build(name, causal=True, dtype=torch.float32)
    x = tokens(2, 40, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(stepped(m, x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["galerkin", "fourier"])
@pytest.mark.parametrize("causal", [False, True])
def test_finite_and_accurate_at_input_scale_1e3(name: str, causal: bool, float32_accurate) -> None:
    m32 = build(name, causal=causal, dtype=torch.float32)
    m64 = build(name, causal=causal, dtype=torch.float64)
    x = (tokens(2, 33) * 1e3).float().requires_grad_(True)
    float32_accurate(m32, m64, x)


def test_materialize_acts_on_the_normalised_values() -> None:
    """Galerkin: out = A Ṽ with A = Q K̃ᵀ / n (Ṽ = LN(V) from `project`); Fourier: A = Q̃ K̃ᵀ / n on V."""
    x = tokens(2, 7)
    g = build("galerkin")
    q, k, v = g.project(x)
    a = g.materialize(x)
    torch.testing.assert_close(a, q @ layer_norm(heads(g, g.k_proj(x)), g.k_norm).transpose(-1, -2) / 7)
    torch.testing.assert_close(v, layer_norm(heads(g, g.v_proj(x)), g.v_norm))
    f = build("fourier")
    a = f.materialize(x)
    qt, kt = layer_norm(heads(f, f.q_proj(x)), f.q_norm), layer_norm(heads(f, f.k_proj(x)), f.k_norm)
    torch.testing.assert_close(a, qt @ kt.transpose(-1, -2) / 7)


@pytest.mark.parametrize("name", ["galerkin", "fourier"])
def test_projections_start_as_the_official_code(name: str) -> None:
    """SimpleAttention's init: W = xavier_uniform(gain 1e-2) + 1e-2·I, bias 0 — so W − 0.01·I lies within
    the xavier bound 1e-2·√(6 / (fan_in + fan_out)); a rectangular projection gets the rectangular identity."""
    torch.manual_seed(0)
    for dim, heads, head_dim in ((16, 2, None), (8, 2, 6)):
        m = attnlab.build(name, dim=dim, heads=heads, head_dim=head_dim)
        for layer in (m.q_proj, m.k_proj, m.v_proj):
            out, inp = layer.weight.shape
            rest = layer.weight.detach() - 0.01 * torch.eye(out, inp)
            bound = 1e-2 * (6.0 / (inp + out)) ** 0.5
            assert rest.abs().max() <= bound and rest.abs().max() > bound / 2  # xavier's spread, no diagonal left
            assert torch.equal(layer.bias.detach(), torch.zeros(out))
