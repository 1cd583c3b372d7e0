"""Softmax attention's fast path hands SDPA its fastest causal form, never an N × N causal mask.

A spy on `F.scaled_dot_product_attention` records what attnlab passes and runs the real SDPA with the
real function back in place (torch's lower-right `CausalBias` dispatches on it and may call SDPA again
inside); the values are checked against a plain float64 computation written here.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias

import attnlab
from attnlab.mechanisms.dense.softmax import softmax_attention

REAL_SDPA = F.scaled_dot_product_attention


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The (attn_mask, is_causal, n_q, n_k) of every SDPA call attnlab makes while the test runs."""
    calls: list[dict[str, Any]] = []

    def spy(q: Tensor, k: Tensor, v: Tensor, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False, **kw: Any) -> Tensor:
        calls.append({"attn_mask": attn_mask, "is_causal": is_causal, "n_q": q.shape[-2], "n_k": k.shape[-2]})
        F.scaled_dot_product_attention = REAL_SDPA
        try:
            return REAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        finally:
            F.scaled_dot_product_attention = spy

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    yield calls


def plain_causal(q: Tensor, k: Tensor, v: Tensor, keep_keys: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ/√d) v in float64, query i (bottom-right aligned) seeing keys j <= i + n_k − n_q; rows with no key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    n_q, n_k = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    for i in range(n_q):
        s[:, :, i, max(i + n_k - n_q + 1, 0) :] = float("-inf")
    if keep_keys is not None:
        s = s.masked_fill(~keep_keys[:, None, None, :], float("-inf"))
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return a @ v


def qkv(n_q: int, n_k: int, *, heads: int = 2, d: int = 8, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, n_q, d, generator=g), torch.randn(2, heads, n_k, d, generator=g),
            torch.randn(2, heads, n_k, d, generator=g))


def assert_no_tensor_mask(calls: list[dict[str, Any]], *, is_causal: bool | None = None) -> None:
    assert calls, "SDPA was not called"
    for c in calls:
        mask = c["attn_mask"]
        assert mask is None or isinstance(mask, CausalBias), f"SDPA got a materialised mask of shape {tuple(mask.shape)}"
        if is_causal is not None:
            assert c["is_causal"] is is_causal, c


@pytest.mark.parametrize("name", ["softmax", "rope", "coca"])
def test_causal_module_forward_uses_is_causal(name: str, sdpa_calls: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    m = attnlab.build(name, dim=16, heads=2, causal=True)
    x = torch.randn(2, 12, 16)
    y = m(x)
    assert_no_tensor_mask(sdpa_calls, is_causal=True)
    torch.testing.assert_close(y, m.double()(x.double(), impl="reference").float(), atol=1e-5, rtol=1e-5)


def test_causal_attend_and_functional_use_is_causal(sdpa_calls: list[dict[str, Any]]) -> None:
    m = attnlab.build("softmax", dim=16, heads=2, causal=True)
    q, k, v = qkv(10, 10)
    want = plain_causal(q, k, v).float()
    torch.testing.assert_close(m.attend(q, k, v), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(softmax_attention(q, k, v, causal=True), want, atol=1e-5, rtol=1e-5)
    assert len(sdpa_calls) == 2
    assert_no_tensor_mask(sdpa_calls, is_causal=True)


def test_fewer_queries_than_keys_use_the_lower_right_bias(sdpa_calls: list[dict[str, Any]]) -> None:
    m = attnlab.build("softmax", dim=16, heads=2, causal=True)
    q, k, v = qkv(4, 11)
    want = plain_causal(q, k, v).float()
    torch.testing.assert_close(m.attend(q, k, v), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(softmax_attention(q, k, v, causal=True), want, atol=1e-5, rtol=1e-5)
    assert all(isinstance(c["attn_mask"], CausalBias) for c in sdpa_calls), sdpa_calls


def test_step_decoding_hands_sdpa_no_mask(sdpa_calls: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    m = attnlab.build("softmax", dim=16, heads=2, causal=True).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    state, outs = None, []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t : t + 1], state)
        outs.append(y)
    assert [c["n_q"] for c in sdpa_calls] == [1] * 6
    assert_no_tensor_mask(sdpa_calls)
    assert not any(c["is_causal"] for c in sdpa_calls[1:])  # the last query sees every key
    q, k, v = m.project(x)
    want = m.out_proj(m.merge_heads(plain_causal(q, k, v)))
    torch.testing.assert_close(torch.cat(outs, dim=1), want)


def test_padding_still_materialises_and_fully_masked_rows_give_zeros(sdpa_calls: list[dict[str, Any]]) -> None:
    m = attnlab.build("softmax", dim=16, heads=2, causal=True)
    q, k, v = qkv(9, 9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :3] = False  # sequence 1: queries 0..2 see no key
    out = m.attend(q, k, v, attention_mask=keep)
    torch.testing.assert_close(out, plain_causal(q, k, v, keep).float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1, :, :3], torch.zeros_like(out[1, :, :3]))
    assert isinstance(sdpa_calls[0]["attn_mask"], Tensor) and not sdpa_calls[0]["is_causal"]


def test_more_queries_than_keys_gives_zeros_for_rows_before_the_first_key() -> None:
    q, k, v = qkv(7, 3)
    out = softmax_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, plain_causal(q, k, v).float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))


def test_causal_gradients_equal_the_reference() -> None:
    m = attnlab.build("softmax", dim=16, heads=2, causal=True).double()
    for n_q, n_k in ((8, 8), (3, 8), (1, 8)):
        q, k, v = (t.double().requires_grad_() for t in qkv(n_q, n_k))
        fast = m.attend(q, k, v)
        want = plain_causal(q, k, v)
        g_fast = torch.autograd.grad(fast.square().sum(), (q, k, v))
        g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
        for a, b in zip(g_fast, g_want):
            torch.testing.assert_close(a, b)
