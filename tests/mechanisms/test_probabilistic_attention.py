"""Probabilistic attention (P207): dot-product softmax as a special case, EM key adaptation raising the mixture
likelihood, value propagation, and the official code's formulas (apple/ml-probabilistic-attention)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import attnlab
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.mechanisms.dense.probabilistic_attention import (
    probabilistic_attention,
    probabilistic_attention_reference,
    probabilistic_key_adaptation,
)

PATHS = (
    lambda *a, **kw: probabilistic_attention(*a, **kw),
    lambda *a, **kw: probabilistic_attention_reference(*a, **kw)[0],
)


def qkv(b=2, h=3, n=7, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))


def dot_softmax(q, k, v, scale):
    """softmax_j(scale · q_i·k_j) v by exp and sum."""
    logits = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("path", PATHS)
def test_constant_norm_keys_and_equal_priors_are_dot_product_softmax(path):
    q, k, v = qkv()
    alpha = 0.8  # precision 1/σ² plays the softmax scale
    unit = 2.5 * k / k.norm(dim=-1, keepdim=True)  # every key of norm 2.5
    want = dot_softmax(q, unit, v, alpha)
    torch.testing.assert_close(path(q, unit, v, precision=alpha, priors="uniform"), want)
    # magnitude priors cancel the key norm: dot-product softmax for any keys
    torch.testing.assert_close(path(q, k, v, precision=alpha, priors="magnitude"), dot_softmax(q, k, v, alpha))
    # the Gaussian posterior with keys of different norms is not the dot product
    assert (path(q, k, v, precision=alpha, priors="uniform") - dot_softmax(q, k, v, alpha)).abs().max() > 1e-2


def test_module_default_is_softmax_attention():
    """precision None = 1/√head_dim and magnitude priors, no EM: the module is attnlab's softmax (SDPA) exactly."""
    prob = attnlab.build("probabilistic-attention", dim=12, heads=3).double()
    soft = attnlab.build("softmax", dim=12, heads=3).double()
    soft.load_state_dict(prob.state_dict())
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    torch.testing.assert_close(prob(x, attention_mask=keep), soft(x, attention_mask=keep))


def log_likelihood(q, keys, alpha, log_priors, keep):
    """Σ_i log Σ_j π_j N(q_i; ζ_j, α⁻¹I) over the real queries and components, with torch.distributions."""
    d = q.shape[-1]
    gauss = MultivariateNormal(keys[:, :, None, :, :], covariance_matrix=torch.eye(d, dtype=q.dtype) / alpha)
    log_pdf = gauss.log_prob(q[:, :, :, None, :])  # (b, h, i, j)
    log_pi = log_priors.masked_fill(~keep[:, None, :], -math.inf).log_softmax(-1)[:, :, None, :]
    per_query = torch.logsumexp(log_pi + log_pdf, dim=-1)
    return (per_query * keep[:, None, :]).sum()


@pytest.mark.parametrize("prior_kind", ["uniform", "fixed"])
def test_em_steps_increase_the_mixture_likelihood(prior_kind):
    q, k, _ = qkv(n=12, d=3, seed=1)
    k = 1.5 * k  # keys away from the queries: the first steps have work to do
    alpha = 1.3
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 9:] = False
    log_priors = torch.zeros(2, 3, 12, dtype=torch.float64) if prior_kind == "uniform" else torch.randn(
        2, 3, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    priors = "uniform" if prior_kind == "uniform" else log_priors
    values = []
    for t in range(6):
        keys = probabilistic_key_adaptation(q, k, precision=alpha, priors=priors, key_iterations=t, attention_mask=keep)
        values.append(log_likelihood(q, keys, alpha, log_priors, keep).item())
    assert values[1] > values[0] + 1.0, values  # the first EM step is a clear gain
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:])), values


def test_em_step_is_the_responsibility_weighted_mean_of_the_queries():
    """One M-step by hand: r_ij ∝ π_j N(q_i; ζ_j, α⁻¹I) (torch.distributions), ζ_j = Σ_i r_ij q_i / Σ_i r_ij over the
    real queries; padded keys keep no weight and padded queries pull no key."""
    q, k, _ = qkv(n=8, d=3, seed=2)
    alpha = 0.9
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 5:] = False
    gauss = MultivariateNormal(k[:, :, None], covariance_matrix=torch.eye(3, dtype=torch.float64) / alpha)
    log_joint = gauss.log_prob(q[:, :, :, None]).masked_fill(~keep[:, None, None, :], -math.inf)
    r = log_joint.softmax(-1) * keep[:, None, :, None]
    want = torch.einsum("bhij,bhid->bhjd", r, q) / r.sum(-2)[..., None]
    got = probabilistic_key_adaptation(q, k, precision=alpha, priors="uniform", key_iterations=1, attention_mask=keep)
    torch.testing.assert_close(got[1, :, :5], want[1, :, :5])
    torch.testing.assert_close(got[0], want[0])
    # the prior pulls toward the network's key: ρ = 2 queries' worth of weight at ζ⁰
    with_prior = probabilistic_key_adaptation(q, k, precision=alpha, priors="uniform", key_iterations=1,
                                              key_prior_weight=2.0, attention_mask=keep)
    mass = r.sum(-2)[..., None]
    torch.testing.assert_close(with_prior[0], (2.0 * k[0] + want[0] * mass[0]) / (2.0 + mass[0]))


def apple_forward(q, zeta, mu, alpha, beta, *, magnitude, iters, zeta_prec=None, v_fixed=None, mu_prec=None):
    """The formulas of apple/ml-probabilistic-attention, probabilisticattention.py, ProbabilisticAttention.forward
    (uniform precisions, pi=None, no v_init, no positional embeddings), in its layout (N, G, C, H), tokens last:

        log p_ij = −α/2 (‖q_i‖² + ‖ζ_j‖² − 2 q_i·ζ_j) [+ α/2 ‖ζ_j‖² + β/2 ‖μ_j‖² with magnitude priors]
        w_ij = exp(log p_ij − max_j) / (Σ_j exp(·) + 1e-20)                       (update_weights)
        ζ_j ← (λ_ζ ζ_j + α Σ_i w_ij q_i) / (λ_ζ + α Σ_i w_ij)   (or Σ_i w_ij q_i / Σ_i w_ij)  (key adaptation loop)
        μ_j ← (λ_μ μ_j + β Σ_i w_ij u_i) / (λ_μ + β Σ_i w_ij f_i)                  (value belief propagation, 1 step)
        out_i = Σ_j w_ij μ_j
    """
    def weights():
        lp = -0.5 * alpha * ((q**2).sum(-2)[..., :, None] + (zeta**2).sum(-2)[..., None, :]
                             - 2 * torch.einsum("bgci,bgcj->bgij", q, zeta))
        if magnitude:
            lp = lp + 0.5 * alpha * (zeta**2).sum(-2)[..., None, :] + 0.5 * beta * (mu**2).sum(-2)[..., None, :]
        e = (lp - lp.amax(-1, keepdim=True)).exp()
        return e / (e.sum(-1, keepdim=True) + 1e-20)

    w = weights()
    for _ in range(iters):
        pulled, mass = torch.einsum("bgij,bgci->bgcj", w, q), w.sum(-2, keepdim=True)
        zeta = pulled / mass if zeta_prec is None else (zeta_prec * zeta + alpha * pulled) / (zeta_prec + alpha * mass)
        w = weights()
    if v_fixed is not None:
        c = mu.shape[-2]
        pulled = torch.einsum("bgij,bgci->bgcj", w, v_fixed[:, :, :c])
        mass = torch.einsum("bgij,bgi->bgj", w, v_fixed[:, :, -1])[:, :, None] + 1e-20
        mu = pulled / mass if mu_prec is None else (mu_prec * mu + beta * pulled) / (mu_prec + beta * mass)
        w = weights()
    return torch.einsum("bgij,bgcj->bgci", w, mu)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("magnitude", [True, False])
def test_matches_the_official_formulas(path, magnitude):
    q, k, v = qkv(seed=3)
    tl = lambda t: t.transpose(-1, -2)  # noqa: E731 — (b, h, n, d) <-> the code's (N, G, C, H)
    alpha, beta, lam_zeta, lam_mu = 0.7, 2.0 if not magnitude else 0.0, 0.35, 0.5
    priors = "magnitude" if magnitude else "uniform"
    # maximum-likelihood key adaptation, three EM steps
    want = apple_forward(tl(q), tl(k), tl(v), alpha, 0.0, magnitude=magnitude, iters=3)
    torch.testing.assert_close(path(q, k, v, precision=alpha, priors=priors, key_iterations=3), tl(want))
    # MAP key steps: the code's prior on the previous iterate is key_prior_mean='previous', ρ_ζ = λ_ζ / α
    want = apple_forward(tl(q), tl(k), tl(v), alpha, 0.0, magnitude=magnitude, iters=3, zeta_prec=lam_zeta)
    got = path(q, k, v, precision=alpha, priors=priors, key_iterations=3, key_prior_weight=lam_zeta / alpha,
               key_prior_mean="previous")
    torch.testing.assert_close(got, tl(want))
    # ... which differs from the fixed prior on the network's key after more than one step
    fixed = path(q, k, v, precision=alpha, priors=priors, key_iterations=3, key_prior_weight=lam_zeta / alpha)
    assert (fixed - got).abs().max() > 1e-3
    # value propagation from annotated tokens (u = 0 elsewhere, as the code expects), MAP with ρ_v = λ_μ / β
    f = torch.zeros(2, 1, 7, dtype=torch.float64)
    f[0, 0, [0, 3]] = 1.0
    f[1, 0, [5]] = 1.0
    u = torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * f[..., None]
    feedback = torch.cat([u, f[..., None].expand(2, 3, 7, 1)], dim=-1)
    want = apple_forward(tl(q), tl(k), tl(v), alpha, beta, magnitude=magnitude, iters=1, v_fixed=tl(feedback),
                         mu_prec=None if magnitude else lam_mu)
    got = path(q, k, v, precision=alpha, priors=priors, key_iterations=1, feedback=feedback,
               value_prior_weight=0.0 if magnitude else lam_mu / beta)
    torch.testing.assert_close(got, tl(want))


def test_one_annotated_token_propagates_its_value_everywhere():
    """With one annotated token and no value prior, every component's value mean is that token's value u
    (μ_j = w_aj u / w_aj), so every output is u; a value prior pulls back toward plain attention."""
    m = attnlab.build("probabilistic-attention", dim=8, heads=2, priors="uniform", key_iterations=1).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    values = torch.randn(1, 5, 8, dtype=torch.float64)
    annotated = torch.zeros(1, 5, dtype=torch.bool)
    annotated[0, 2] = True
    for impl in ("fast", "reference"):
        out = m.propagate(x, values, annotated, impl=impl)
        torch.testing.assert_close(out, m.out_proj(values[:, 2:3]).expand(1, 5, 8))
    heavy = attnlab.build("probabilistic-attention", dim=8, heads=2, priors="uniform", key_iterations=1,
                          value_prior_weight=1e9).double()
    heavy.load_state_dict(m.state_dict())
    torch.testing.assert_close(heavy.propagate(x, values, annotated), heavy(x), atol=1e-6, rtol=1e-6)


def test_padding_is_no_observation_of_the_em():
    """Padded tokens neither pull the keys nor count as components: the real keys adapt as without them."""
    q, k, _ = qkv(b=1, n=9, seed=6)
    keep = torch.ones(1, 9, dtype=torch.bool)
    keep[0, 6:] = False
    junk_q = q.clone()
    junk_q[:, :, 6:] = 50.0
    padded = probabilistic_key_adaptation(junk_q, k, priors="uniform", key_iterations=3, attention_mask=keep)
    alone = probabilistic_key_adaptation(q[:, :, :6], k[:, :, :6], priors="uniform", key_iterations=3)
    torch.testing.assert_close(padded[:, :, :6], alone)


def test_bad_inputs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^priors: expected one of"):
        probabilistic_attention(q, k, v, priors="flat")
    with pytest.raises(ShapeError, match=r"^priors: expected log-priors of shape"):
        probabilistic_attention(q, k, v, priors=torch.zeros(2, 3, 6, dtype=torch.float64))
    with pytest.raises(ParameterError, match="^precision: expected a float > 0"):
        probabilistic_attention(q, k, v, precision=-1.0)
    with pytest.raises(ParameterError, match="^key_prior_weight: expected a finite float >= 0"):
        probabilistic_attention(q, k, v, key_prior_weight=-0.1)
    with pytest.raises(ValueError, match="^key_prior_mean: expected one of"):
        probabilistic_attention(q, k, v, key_prior_mean="initial")
    with pytest.raises(ShapeError, match=r"^feedback: expected \(batch, \[heads,\] n, head_dim \+ 1\)"):
        probabilistic_attention(q, k, v, feedback=torch.zeros(2, 3, 7, 4, dtype=torch.float64))
    bad = torch.zeros(2, 3, 7, 5, dtype=torch.float64)
    bad[..., -1] = 0.5
    with pytest.raises(ValueError, match="^feedback: expected the last channel"):
        probabilistic_attention(q, k, v, feedback=bad)
    with pytest.raises(ShapeError, match="^k: this mechanism needs as many keys as queries"):
        probabilistic_attention(q, k[:, :, :5], v[:, :, :5])
    m = attnlab.build("probabilistic-attention", dim=8, heads=2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="^annotated: expected a bool tensor"):
        m.propagate(x, torch.zeros(1, 5, 8, dtype=torch.float64), torch.zeros(1, 5))
    with pytest.raises(ShapeError, match=r"^values: expected \(batch, n, heads·head_dim\)"):
        m.propagate(x, torch.zeros(1, 5, 6, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        attnlab.build("probabilistic-attention", dim=8, heads=2, causal=True)


@pytest.mark.parametrize("path", PATHS)
def test_values_of_unannotated_tokens_are_ignored(path):
    q, k, v = qkv(seed=7)
    f = torch.zeros(2, 1, 7, 1, dtype=torch.float64)
    f[:, :, [1, 4]] = 1.0
    u = torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    noisy = torch.cat([u, f.expand(2, 3, 7, 1)], -1)
    clean = torch.cat([u * f, f.expand(2, 3, 7, 1)], -1)
    torch.testing.assert_close(path(q, k, v, feedback=noisy), path(q, k, v, feedback=clean))
    assert (path(q, k, v, feedback=clean) - path(q, k, v)).abs().max() > 1e-2  # the feedback does act
