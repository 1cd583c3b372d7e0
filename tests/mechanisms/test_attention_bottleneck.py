"""Attention bottleneck (P085, TAB): patch mass 1 − a_slot in [0, 1] by hand; mass 0 passes nothing of the image
(an image-independent output, no gradient to the patches); an intervention sets the output to W_o Σ w_i v_i + b_o
exactly; co-attention takes the query from the given context and the slot key from the given [CLS]."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab

DIM, N = 8, 6


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    m = attnlab.build("attention-bottleneck", dim=DIM).double().eval()
    with torch.no_grad():  # larger tokens than the 0.02 init, so the slot takes a visible share
        m.query_token.normal_()
        m.slot_token.normal_()
    return m


def tokens(seed: int = 1, batch: int = 2) -> Tensor:
    return torch.randn(batch, N, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def by_hand(m: torch.nn.Module, x: Tensor, c: Tensor, s: Tensor, w: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One sample: (out (dim,), patch weights (n,), slot weight) from the formula, or with the patch weights w."""
    ln = lambda t: F.layer_norm(t, (DIM,), m.norm.weight, m.norm.bias, m.norm.eps)  # noqa: E731
    q = m.q(ln(c))
    keys = torch.cat([m.k(ln(s))[None], m.k(ln(x))])
    a = torch.softmax(keys @ q / DIM**0.5, 0)
    patch = a[1:] if w is None else w
    return m.proj(patch @ m.v(ln(x))), patch, a[0]


def test_patch_mass_is_one_minus_the_slot_weight_by_hand() -> None:
    m = build()
    x = tokens()
    got = m.materialize(x)[:, 0, 0]
    for i in range(2):
        out, patch, slot = by_hand(m, x[i], m.query_token, m.slot_token)
        torch.testing.assert_close(got[i], patch)
        torch.testing.assert_close(got[i].sum(), 1 - slot)
        assert 0.05 < slot < 0.95  # strictly inside: a real share on both sides
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, impl=impl)[i, 0], out)


def test_mass_zero_gives_an_image_independent_output() -> None:
    m = build()
    zero = torch.zeros(2, N, dtype=torch.float64)
    for impl in ("fast", "reference"):
        x = tokens().requires_grad_(True)
        y = m(x, weights=zero, impl=impl)
        other = m(100 * tokens(seed=7), weights=zero, impl=impl)
        torch.testing.assert_close(y, other)
        torch.testing.assert_close(y, m.proj.bias.expand(2, 1, DIM))
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.abs().max().item() == 0.0
    # the learned weights reach mass ~0 when the slot's logit dominates (W_k = λ q̂ ûₛᵀ: the slot's key is the longest
    # along q): the output then barely depends on the image
    with torch.no_grad():
        ln = lambda t: F.layer_norm(t, (DIM,), m.norm.weight, m.norm.bias, m.norm.eps)  # noqa: E731
        q, u_s = m.q(ln(m.query_token)), ln(m.slot_token)
        m.k.weight.copy_(200 * torch.outer(q / q.norm(), u_s / u_s.norm()) / q.norm())
        m.k.bias.zero_()
    mass = m.materialize(tokens()).sum(-1)
    assert mass.max() < 1e-6
    torch.testing.assert_close(m(tokens()), m(tokens(seed=7)), atol=1e-5, rtol=0)


def test_an_intervention_sets_the_output_to_the_formula_with_the_set_weights() -> None:
    m = build()
    x = tokens()
    w = torch.rand(2, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = 0.6 * w / w.sum(-1, keepdim=True)  # mass 0.6
    w[1, 2] = 0.0
    for impl in ("fast", "reference"):
        got = m(x, weights=w, impl=impl)
        for i in range(2):
            torch.testing.assert_close(got[i, 0], by_hand(m, x[i], m.query_token, m.slot_token, w[i])[0])
        assert (got - m(x, impl=impl)).abs().max() > 1e-3  # the intervention changed the output
        torch.testing.assert_close(m(x, weights=m.materialize(x), impl=impl), m(x, impl=impl))  # round trip
    grid = x.reshape(2, 2, 3, DIM)
    torch.testing.assert_close(m(grid, weights=w.reshape(2, 2, 3)), m(x, weights=w))
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, 2] = False
    torch.testing.assert_close(m(x, weights=w, attention_mask=keep), m(x, weights=w))


def test_co_attention_takes_the_query_from_the_context_and_the_slot_from_the_cls_token() -> None:
    m = build()
    x = tokens()
    c, s = tokens(seed=4)[:, 0], tokens(seed=5)[:, 0]
    for impl in ("fast", "reference"):
        got = m(x, context=c, slot=s, impl=impl)
        for i in range(2):
            torch.testing.assert_close(got[i, 0], by_hand(m, x[i], c[i], s[i])[0])
    torch.testing.assert_close(m.materialize(x, context=c, slot=s)[1, 0, 0], by_hand(m, x[1], c[1], s[1])[1])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (-0.1 * torch.ones(2, N, dtype=torch.float64), "weights: expected weights >= 0"),
        (0.3 * torch.ones(2, N, dtype=torch.float64), "weights: expected a total patch mass <= 1"),
        (torch.zeros(2, N + 1, dtype=torch.float64), "weights: expected (batch, n)"),
        (torch.zeros(2, N, dtype=torch.float32), "weights: expected dtype torch.float64"),
    ],
)
def test_bad_weights_raise(weights: Tensor, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        build()(tokens(), weights=weights)


def test_weight_on_padding_raises() -> None:
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[0, -1] = False
    with pytest.raises(ValueError, match="weights: expected zero weight on padded tokens"):
        build()(tokens(), weights=torch.full((2, N), 0.1, dtype=torch.float64), attention_mask=keep)
    with pytest.raises(ValueError, match=r"context: expected shape \(batch, dim\)"):
        build()(tokens(), context=torch.zeros(2, DIM + 1, dtype=torch.float64))
