"""hierarchical-selection (P216): the high-res tokens chosen follow the text → low-res attention; all selected ==
dense attention over the union; explicit groups."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.errors import ShapeError
from attnlab.mechanisms.sparse.hierarchical_selection import (
    default_groups,
    guidance,
    hierarchical_selection_attention,
    hierarchical_selection_attention_reference,
)

# 4 low-res tokens (positions 0-3), 2 text tokens (4, 5), 8 high-res tokens (6-13), two under each low-res token
GROUPING = {"low_res_tokens": 4, "text_tokens": 2, "region_size": 2}
N = 14


def _qkv(batch: int = 2, heads: int = 2, d: int = 4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, heads, N, d, generator=gen, dtype=torch.float64) for _ in range(3))


def _attention_over(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """Softmax attention of the queries 0-5 (low-res and text) over the key positions `keys`, computed here."""
    a = torch.softmax(q[:, :, :6] @ k[:, :, keys].transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return a @ v[:, :, keys]


def test_selection_follows_the_previous_layers_text_to_low_res_attention() -> None:
    """A previous layer's weights whose text rows put (0.1, 0.7, 0.3, 0.9) in all on the low-res tokens: its guide is
    those sums; with ρ = 0.5 the top low-res tokens are 3 and 1, so the high-res tokens chosen are those under them,
    positions 8, 9 (region 1) and 12, 13 (region 3); the queries attend to [L; T; those four]."""
    previous = torch.zeros(1, 2, N, N, dtype=torch.float64)
    mass = torch.tensor([0.1, 0.7, 0.3, 0.9], dtype=torch.float64)
    previous[0, 0, 4, :4] = mass * 0.25  # text query 4, head 0
    previous[0, 1, 5, :4] = mass * 0.75  # text query 5, head 1
    previous[0, 0, 0, :4] = 5.0  # a low-res query's row: not text, ignored
    groups = default_groups(torch.ones(1, N, dtype=torch.bool), 4, 2)
    guide = guidance(previous, groups)
    torch.testing.assert_close(guide[0, :4], mass)
    assert guide[0, 4:].abs().max() == 0
    q, k, v = (t[:1] for t in _qkv())
    want_keys = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13]
    want = torch.zeros_like(v)
    want[:, :, :6] = _attention_over(q, k, v, want_keys)
    got = hierarchical_selection_attention(q, k, v, select_ratio=0.5, guide=guide, **GROUPING)
    torch.testing.assert_close(got, want)
    out, weights = hierarchical_selection_attention_reference(q, k, v, select_ratio=0.5, guide=guide, **GROUPING)
    torch.testing.assert_close(out, want)
    used = weights[0].abs().sum((0, 1)) > 0
    assert used.nonzero()[:, 0].tolist() == want_keys
    # the module takes the same guide in forward and materialize
    m = attnlab.build("hierarchical-selection", dim=8, heads=2, select_ratio=0.5, **GROUPING).double()
    x = torch.randn(1, N, 8, dtype=torch.float64)
    columns = m.materialize(x, guide=guide)[0].abs().sum((0, 1)) > 0
    assert columns.nonzero()[:, 0].tolist() == want_keys
    qm, km, vm = m.project(x)
    with torch.no_grad():
        torch.testing.assert_close(m(x, guide=guide)[:, :6], m.out_proj(m.merge_heads(_attention_over(qm, km, vm, want_keys))))


def test_without_a_guide_the_layer_follows_its_own_text_attention() -> None:
    """No guide: the scores are this layer's text queries' softmax over the keys L ∪ T (not the high-res keys), summed
    over heads and text queries (computed here); the chosen high-res tokens are those under the top ⌈ρ·4⌉ = 2 low-res
    tokens. On these inputs a softmax over all the keys would choose otherwise for some sample."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(12, 2, N, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    differs = False
    for b in range(12):
        logits = q[b, :, 4:6] @ k[b, :, :].transpose(-1, -2) / 2.0
        score = torch.softmax(logits[..., :6], dim=-1)[..., :4].sum((0, 1))
        top = sorted(score.argsort(descending=True)[:2].tolist())
        other = sorted(torch.softmax(logits, dim=-1)[..., :4].sum((0, 1)).argsort(descending=True)[:2].tolist())
        differs = differs or other != top
        keys = [0, 1, 2, 3, 4, 5] + [6 + 2 * t + c for t in top for c in (0, 1)]
        one = (q[b : b + 1], k[b : b + 1], v[b : b + 1])
        for impl in (hierarchical_selection_attention, lambda *a, **kw: hierarchical_selection_attention_reference(*a, **kw)[0]):
            got = impl(*one, select_ratio=0.5, **GROUPING)
            torch.testing.assert_close(got[:, :, :6], _attention_over(*one, keys))
            assert got[:, :, 6:].abs().max() == 0
    assert differs


def test_all_high_res_selected_equals_dense_attention_over_the_union() -> None:
    """ρ = 1: every high-res token is a key; the low-res and text queries get dense softmax attention over all the real
    tokens (padding too), the high-res tokens 0 — also after out_proj in the module."""
    q, k, v = _qkv()
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, 11:] = False
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    for impl in (hierarchical_selection_attention, lambda *a, **kw: hierarchical_selection_attention_reference(*a, **kw)[0]):
        got = impl(q, k, v, select_ratio=1.0, attention_mask=keep, **GROUPING)
        torch.testing.assert_close(got[:, :, :6], dense[:, :, :6])
        assert got[:, :, 6:].abs().max() == 0
    m = attnlab.build("hierarchical-selection", dim=8, heads=2, select_ratio=1.0, **GROUPING).double()
    x = torch.randn(2, N, 8, dtype=torch.float64)
    qm, km, vm = m.project(x)
    with torch.no_grad():
        full = m.out_proj(m.merge_heads(torch.nn.functional.scaled_dot_product_attention(qm, km, vm)))
        y = m(x)
    torch.testing.assert_close(y[:, :6], full[:, :6])
    assert y[:, 6:].abs().max() == 0


def test_explicit_groups_with_ragged_text() -> None:
    """Sample 1 has one text token fewer: with `groups` and its text slot padded in place, the result at the real
    tokens equals the default grouping (low_res 4, text 1) of the same tokens without the slot."""
    torch.manual_seed(0)
    m = attnlab.build("hierarchical-selection", dim=8, heads=2, select_ratio=0.5, **GROUPING).double()
    x = torch.randn(2, N, 8, dtype=torch.float64)
    groups = torch.tensor([[0] * 4 + [1] * 2 + [2] * 8] * 2)
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, 5] = False  # the missing text token of sample 1
    y = m(x, groups=groups, attention_mask=keep)
    short = attnlab.build("hierarchical-selection", dim=8, heads=2, select_ratio=0.5, low_res_tokens=4, text_tokens=1,
                          region_size=2).double()
    short.load_state_dict(m.state_dict())
    real = keep[1]
    torch.testing.assert_close(y[1, real], short(x[1:, real])[0])
    torch.testing.assert_close(y[0], m(x[:1])[0])  # sample 0: the default grouping
    torch.testing.assert_close(m(x, groups=groups, attention_mask=keep, impl="reference"), y)


def test_refusals() -> None:
    q, k, v = _qkv()
    with pytest.raises(ShapeError, match="region_size: the high-res tokens need 5 regions"):
        hierarchical_selection_attention(q, k, v, low_res_tokens=4, text_tokens=0, region_size=2)
    with pytest.raises(ValueError, match="guide: expected finite scores >= 0"):
        hierarchical_selection_attention(q, k, v, guide=-torch.ones(2, N, dtype=torch.float64), **GROUPING)
    with pytest.raises(ValueError, match="groups: expected 0 .low-res., 1 .text. or 2 .high-res. per token"):
        hierarchical_selection_attention(q, k, v, groups=torch.full((2, N), 3), **GROUPING)


def test_default_grouping_without_lengths() -> None:
    """Lengths unset: ⌈n/4⌉ low-res, ⌊n/4⌋ text, the rest high-res, counted over each sample's real tokens."""
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, :4] = False  # sample 1: five real tokens, padded before them
    assert default_groups(real).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [-1, -1, -1, -1, 0, 0, 1, 2, 2]]
