"""Context broadcasting (CB, CB_dim): x + mean of the real tokens by hand, the uniform map, no parameters."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.mechanisms.mixers.context_broadcasting import (
    context_broadcasting_attention,
    context_broadcasting_attention_reference,
)

X = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [100.0, -100.0]]], dtype=torch.float64)
KEEP = torch.tensor([[True, True, True, False]])  # the last token is padding: the real mean is (3, 4)


def cb(**kw):
    return attnlab.build("context-broadcasting", dim=2, heads=kw.pop("heads", 1), **kw).double()


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_equals_x_plus_the_mean_of_the_real_tokens_by_hand(impl):
    want = torch.tensor([[[4.0, 6.0], [6.0, 8.0], [8.0, 10.0], [103.0, -96.0]]], dtype=torch.float64)
    torch.testing.assert_close(cb()(X, attention_mask=KEEP, impl=impl), want)
    # without padding the last token counts: mean (27.25, -22)
    torch.testing.assert_close(cb()(X, impl=impl), X + torch.tensor([27.25, -22.0], dtype=torch.float64))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_per_channel_scale_by_hand(impl):
    m = cb(learned_scale=True)
    with torch.no_grad():
        m.scale.copy_(torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(m(X, attention_mask=KEEP, impl=impl), X + torch.tensor([6.0, 2.0], dtype=torch.float64))


def test_materialize_is_uniform_over_the_real_keys_in_every_head():
    m = cb(heads=2)
    x = torch.cat([X, X + 1], 0)
    keep = torch.tensor([[True, True, True, False], [True, False, True, True]])
    a = m.materialize(x, attention_mask=keep)
    want = (keep[:, None, None, :] / 3.0).to(torch.float64).expand(2, 2, 4, 4)
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(m.materialize(x), torch.full((2, 2, 4, 4), 0.25, dtype=torch.float64))


def test_functional_rows_are_the_mean_and_a_row_without_keys_is_zero():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True, False], [False] * 5])
    for fn in (context_broadcasting_attention, lambda *a, **kw: context_broadcasting_attention_reference(*a, **kw)[0]):
        out = fn(v, v, v, attention_mask=keep)
        torch.testing.assert_close(out[0], v[0, :, [0, 2, 3]].mean(1, keepdim=True).expand(3, 5, 4))
        assert out[1].abs().max() == 0.0


def test_no_parameters_and_heads_change_nothing():
    assert sum(p.numel() for p in cb().parameters()) == 0
    assert sum(p.numel() for p in cb(learned_scale=True).parameters()) == 2
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    one = attnlab.build("context-broadcasting", dim=8, heads=1).double()
    four = attnlab.build("context-broadcasting", dim=8, heads=4).double()
    torch.testing.assert_close(four(x), one(x))


def test_attention_path_is_the_broadcast_term():
    """capture(grads=True) routes d loss / dA through attention_path: it must be y − x at A = materialize."""
    m = cb(learned_scale=True, heads=2)
    with torch.no_grad():
        m.scale.copy_(torch.tensor([2.0, -1.0]))
    a = m.materialize(X, attention_mask=KEEP)
    torch.testing.assert_close(m.attention_path(X, a), m(X, attention_mask=KEEP) - X)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="^context: "):
        cb()(X, context=X)
    with pytest.raises(ParameterError, match="learned_scale"):
        attnlab.build("context-broadcasting", dim=2, heads=1, learned_scale=1)
