"""Normalized attention (NAP, NON, pooling baselines): row statistics, padding, hand values, the hidden block."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.dense.normalized_attention import normalized_attention, normalized_attention_reference


def hand_case():
    """One head, one query q = e_1; keys with logits 1, 2, 3 and a padded fourth key of logit 100."""
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 0.0], [2.0, 5.0], [3.0, -1.0], [100.0, 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1000.0, -1000.0]]]], dtype=torch.float64)
    keep = torch.tensor([[True, True, True, False]])
    return q, k, v, keep


def both(q, k, v, **kw):
    fast = normalized_attention(q, k, v, **kw)
    ref, a = normalized_attention_reference(q, k, v, **kw)
    return fast, ref, a


def test_nap_by_hand_padding_excluded_from_the_statistics():
    """Real logits 1, 2, 3: μ = 2, σ = √(2/3) (population), a = g·(s − μ)/(σ + ε) + b; the padded key's logit
    100 enters neither μ nor σ and gets weight 0."""
    q, k, v, keep = hand_case()
    g, b, eps = 1.5, 0.25, 1e-3
    sigma = math.sqrt(2.0 / 3.0)
    want_a = torch.tensor([g * (s - 2.0) / (sigma + eps) + b for s in (1.0, 2.0, 3.0)] + [0.0], dtype=torch.float64)
    fast, ref, a = both(q, k, v, gain=g, shift=b, eps=eps, attention_mask=keep)
    torch.testing.assert_close(a[0, 0, 0], want_a)
    for out in (fast, ref):
        torch.testing.assert_close(out[0, 0, 0], want_a @ v[0, 0])


def test_a_padded_key_changes_nothing():
    q, k, v, keep = hand_case()
    k2, v2 = k.clone(), v.clone()
    k2[..., 3, :] = torch.tensor([-7.0, 3.0])
    v2[..., 3, :] = torch.tensor([5.0, 9.0])
    for variant in ("nap", "non", "sum", "mean"):
        for fn in (normalized_attention, lambda *a, **kw: normalized_attention_reference(*a, **kw)[0]):
            torch.testing.assert_close(fn(q, k, v, variant=variant, attention_mask=keep),
                                       fn(q, k2, v2, variant=variant, attention_mask=keep))
        # and equals the three real keys alone
        torch.testing.assert_close(normalized_attention(q, k, v, variant=variant, attention_mask=keep),
                                   normalized_attention(q, k[..., :3, :], v[..., :3, :], variant=variant))


def test_non_sum_and_mean_by_hand():
    """NON: s / (√d √n) with d = 2, n = 3 real keys; sum: Σ v over the real keys; mean: their average."""
    q, k, v, keep = hand_case()
    real_v = v[0, 0, :3]
    non = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / (math.sqrt(2.0) * math.sqrt(3.0))
    cases = {"non": non @ real_v, "sum": real_v.sum(0), "mean": real_v.mean(0)}
    for variant, want in cases.items():
        fast, ref, _ = both(q, k, v, variant=variant, attention_mask=keep)
        torch.testing.assert_close(fast[0, 0, 0], want)
        torch.testing.assert_close(ref[0, 0, 0], want)


def module_with_gains(**kw):
    torch.manual_seed(0)
    m = attnlab.build("normalized-attention", dim=12, heads=3, **kw).double()
    with torch.no_grad():
        m.gain.copy_(torch.tensor([0.5, 2.0, -1.0]))
        m.shift.copy_(torch.tensor([0.3, -0.2, 0.0]))
    return m


@pytest.mark.parametrize("causal", [False, True])
def test_weights_before_gain_are_zero_mean_unit_variance_over_the_real_keys(causal):
    """(a − b_h) / g_h has mean 0 and population variance 1 over each row's real keys (ε = 0); the weights are
    negative somewhere and each row sums to n_i·b_h, not 1."""
    m = module_with_gains(eps=0.0, causal=causal)
    x = torch.randn(2, 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = False
    q, k, _ = m.project(x)
    eye = torch.eye(9, dtype=torch.float64).expand(2, 3, 9, 9)  # A @ I = A: the weights of either path
    weights = {"materialize": m.materialize(x, attention_mask=keep)}
    for impl in ("fast", "reference"):
        weights[impl] = m.attend(q, k, eye, attention_mask=keep, impl=impl).detach()
    g, b = m.gain.detach().view(1, 3, 1, 1), m.shift.detach().view(1, 3, 1, 1)
    real = keep[:, None, None, :].expand(2, 3, 9, 9).clone()
    if causal:
        real &= torch.ones(9, 9, dtype=torch.bool).tril()
    n = real.sum(-1)
    several = n > 1  # a row with one real key has σ = 0: its weight is the shift alone
    for a in weights.values():
        z = ((a - b) / g) * real
        mean = z.sum(-1) / n
        var = (z - mean[..., None]).square().mul(real).sum(-1) / n
        torch.testing.assert_close(mean, torch.zeros_like(mean))
        torch.testing.assert_close(var[several], torch.ones_like(var[several]))
        torch.testing.assert_close(a.sum(-1), n * b[..., 0])
        assert (a < 0).any()
        assert (a * ~real).abs().max() == 0.0
        if causal:
            torch.testing.assert_close(a[:, :, 0, 0], b.view(1, 3).expand(2, 3))


def test_module_is_out_proj_of_gelu_of_layernorm_of_the_weighted_sum():
    x = torch.randn(2, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for hidden_norm, activation in ((True, True), (False, False), (True, False)):
        m = module_with_gains(hidden_norm=hidden_norm, activation=activation)
        v = m.project(x)[2]
        merged = m.merge_heads(m.materialize(x) @ v)
        if hidden_norm:
            merged = F.layer_norm(merged, (12,), m.hidden_norm.weight, m.hidden_norm.bias)
        if activation:
            merged = F.gelu(merged)
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, impl=impl), m.out_proj(merged))


def test_bad_arguments_name_themselves():
    q, k, v, _ = hand_case()
    with pytest.raises(ParameterError, match="^variant: "):
        normalized_attention(q, k, v, variant="softmax")
    with pytest.raises(ParameterError, match="^eps: "):
        normalized_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="^gain: "):
        normalized_attention(q, k, v, gain=torch.ones(2))
    with pytest.raises(ParameterError, match="variant"):
        attnlab.build("normalized-attention", dim=4, heads=1, variant="max")
