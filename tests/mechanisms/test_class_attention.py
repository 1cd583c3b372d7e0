"""Class-attention pooling (P097, PatchConvNet): the weights are the patch map of one class query over
[class token; tokens], and the pooled vector is c + γ₁·W_o(Σ a v), then + γ₂·FFN(LN ·), checked against a
hand-written single-query softmax attention run sample by sample on the real tokens only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab.core.errors import ParameterError

DIM = 8


def build(**params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build("class-attention", dim=DIM, layer_scale=0.7, **params).double().eval()


def by_hand(m: torch.nn.Module, x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(pooled (batch, 1, dim), patch weights (batch, heads, n), class-slot weight (batch, heads)) of one class query,
    sample by sample over its real tokens."""
    b, n, d = x.shape
    h, dh = m.heads, d // m.heads
    ln1 = lambda t: F.layer_norm(t, (d,), m.norm1.weight, m.norm1.bias, m.norm1.eps)  # noqa: E731
    pooled, patch, slot = torch.zeros(b, 1, d, dtype=x.dtype), torch.zeros(b, h, n, dtype=x.dtype), torch.zeros(b, h, dtype=x.dtype)
    for i in range(b):
        real = torch.arange(n) if keep is None else keep[i].nonzero().flatten()
        c = m.cls_token
        tokens = ln1(x[i, real])
        if m.cls_in_keys:
            tokens = torch.cat([ln1(c)[None], tokens])
        q = m.q(ln1(c))
        k, v = m.k(tokens), m.v(tokens)
        heads_out = []
        for j in range(h):
            part = slice(j * dh, (j + 1) * dh)
            a = torch.softmax(k[:, part] @ q[part] / dh**0.5, 0)
            heads_out.append(a @ v[:, part])
            weights = a[1:] if m.cls_in_keys else a
            patch[i, j, real] = weights
            slot[i, j] = a[0] if m.cls_in_keys else 0.0
        c1 = c + m.gamma1 * m.proj(torch.cat(heads_out))
        if m.ffn is not None:
            z = F.layer_norm(c1, (d,), m.norm2.weight, m.norm2.bias, m.norm2.eps)
            c1 = c1 + m.gamma2 * (m.ffn[2](F.gelu(m.ffn[0](z))))
        pooled[i, 0] = c1
    return pooled, patch, slot


def grid_tokens() -> Tensor:
    return torch.randn(2, 3, 4, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("cls_in_keys", [True, False])
def test_the_weights_are_the_patch_map_by_hand(cls_in_keys: bool) -> None:
    m = build(cls_in_keys=cls_in_keys)
    x = grid_tokens()
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 8:] = False
    for mask in (None, keep):
        kw = {} if mask is None else {"attention_mask": mask.reshape(2, 3, 4)}
        _, patch, slot = by_hand(m, x.reshape(2, 12, DIM), mask)
        got = m.materialize(x, **kw)  # (batch, heads, 1, h·w): the map over the 3×4 patches
        torch.testing.assert_close(got[:, :, 0], patch)
        torch.testing.assert_close(got.sum(-1)[:, :, 0] + slot, torch.ones(2, 1, dtype=x.dtype))
        assert (slot > 0).all() if cls_in_keys else (slot == 0).all()


@pytest.mark.parametrize(("heads", "cls_in_keys", "mlp_ratio"), [(1, True, 3.0), (2, True, 3.0), (2, False, 2.0), (1, True, 0.0)])
def test_equals_one_class_query_over_the_tokens(heads: int, cls_in_keys: bool, mlp_ratio: float) -> None:
    m = build(heads=heads, cls_in_keys=cls_in_keys, mlp_ratio=mlp_ratio)
    x = grid_tokens().reshape(2, 12, DIM)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, :5] = False
    for mask in (None, keep):
        want, _, _ = by_hand(m, x, mask)
        for impl in ("fast", "reference"):
            torch.testing.assert_close(m(x, attention_mask=mask, impl=impl), want)


def test_no_slot_and_no_token_leaves_the_class_token_plus_the_output_bias() -> None:
    m = build(cls_in_keys=False, mlp_ratio=0.0)
    x = grid_tokens().reshape(2, 12, DIM)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    want = (m.cls_token + m.gamma1 * m.proj.bias).expand(2, 1, DIM)
    for impl in ("fast", "reference"):
        torch.testing.assert_close(m(x, attention_mask=keep, impl=impl), want)


def test_bad_parameters_raise() -> None:
    with pytest.raises(ParameterError, match="mlp_ratio"):
        attnlab.build("class-attention", dim=DIM, mlp_ratio=-1.0)
    with pytest.raises(ParameterError, match="heads"):
        attnlab.build("class-attention", dim=DIM, heads=3)
    with pytest.raises(ParameterError, match="mlp_ratio"):
        attnlab.build("class-attention", dim=DIM, mlp_ratio=0.01)
