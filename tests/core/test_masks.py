"""Masks: bottom-right causal alignment, combination of bool/additive/padding, fully masked rows."""
import pytest
import torch

from attnlab.core.errors import DTypeError, MaskError
from attnlab.core.masks import band_mask, causal_mask, combine_masks, keep_of, relative_positions, to_additive
from attnlab.core.reference import masked_softmax, softmax_attention_reference


def test_causal_mask_is_bottom_right_aligned() -> None:
    # 2 queries at the end of 4 keys (a KV cache): query 0 sits at position 2, query 1 at 3
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 4), expected)
    assert torch.equal(causal_mask(3, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))


def test_relative_positions_and_band() -> None:
    assert relative_positions(2, 3).tolist() == [[1, 0, -1], [2, 1, 0]]
    assert band_mask(4, 4, 1).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert band_mask(3, 3, 1, causal=True).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_combine_bool_masks_intersects() -> None:
    kpm = torch.tensor([[True, True, False]])
    attn = torch.tensor([[True, False, True]] * 3)
    m = combine_masks(batch=1, heads=2, n_q=3, n_k=3, causal=True, attention_mask=kpm, attn_mask=attn)
    assert m is not None and m.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(m.expand(1, 2, 3, 3)[0, 1], expected)


def test_combine_additive_with_bool_gives_additive() -> None:
    add = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    kpm = torch.tensor([[True, False]])
    m = combine_masks(batch=1, heads=1, n_q=2, n_k=2, attention_mask=kpm, attn_mask=add)
    assert m is not None and m.dtype == torch.float32
    assert m[0, 0, 0, 0].item() == 0.5 and m[0, 0, 1, 0].item() == 2.0
    assert torch.isneginf(m[0, 0, :, 1]).all()
    assert torch.equal(keep_of(m)[0, 0], torch.tensor([[True, False], [True, False]]))


def test_no_mask_is_none() -> None:
    assert combine_masks(batch=2, heads=2, n_q=3, n_k=3) is None


def test_to_additive() -> None:
    a = to_additive(torch.tensor([True, False]), torch.float64)
    assert a[0].item() == 0.0 and torch.isneginf(a[1])


def test_masked_softmax_fully_masked_row_is_zero() -> None:
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    keep = torch.tensor([[True, True], [False, False]])
    w = masked_softmax(scores, keep)
    e = torch.exp(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(w[0], e / e.sum())
    assert torch.equal(w[1], torch.zeros(2))


def test_reference_value_by_hand() -> None:
    # one head, two keys: scores q·k/√d with d = 1
    q = torch.tensor([[[[1.0]]]])
    k = torch.tensor([[[[0.0], [2.0]]]])
    v = torch.tensor([[[[10.0], [20.0]]]])
    out, w = softmax_attention_reference(q, k, v)
    p = torch.tensor([1.0, torch.e**2]) / (1 + torch.e**2)
    torch.testing.assert_close(w[0, 0, 0], p)
    torch.testing.assert_close(out[0, 0, 0, 0], 10 * p[0] + 20 * p[1])


def test_reference_grad_finite_with_fully_masked_rows() -> None:
    q = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    v = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[1] = False
    out, _ = softmax_attention_reference(q, k, v, mask=keep[None, None])
    assert torch.equal(out[0, 0, 1], torch.zeros(2, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    ("kw", "kind", "needle"),
    [
        ({"attention_mask": torch.ones(2, 4, dtype=torch.bool)}, MaskError, "(batch, n_k) = (1, 3)"),
        ({"attention_mask": torch.ones(1, 3)}, DTypeError, "torch.bool"),
        ({"attn_mask": torch.ones(3, 4, dtype=torch.bool)}, MaskError, "got (3, 4)"),
        ({"attn_mask": torch.ones(3, 3, dtype=torch.int64)}, DTypeError, "torch.int64"),
        ({"attn_mask": torch.full((3, 3), float("nan"))}, MaskError, "NaN"),
        ({"attn_mask": torch.ones(2, 1, 3, 3, dtype=torch.bool)}, MaskError, "broadcastable"),
    ],
)
def test_bad_masks_name_the_argument(kw: dict, kind: type, needle: str) -> None:
    name = next(iter(kw))
    with pytest.raises(kind) as info:
        combine_masks(batch=1, heads=2, n_q=3, n_k=3, **kw)
    assert name in str(info.value) and needle in str(info.value)
    assert isinstance(info.value, (ValueError, TypeError))
