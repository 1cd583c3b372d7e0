"""P025 similarity measures on cases with a known answer (invariances, planted relations, hand-computed values,
the HSIC form of CKA and numpy regressions written here), on a model of attnlab mechanisms through capture, on
MiniLM (adjacent layers more alike than far ones), and the layer-similarity panel of `attnlab explain`."""
from __future__ import annotations

import copy
import importlib
import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis import capture
from attnlab.analysis.explain import explain
from attnlab.analysis.page import render
from attnlab.analysis.similarity import (
    attncorr,
    attnsim,
    head_similarity,
    layer_similarity,
    linear_cka,
    mixedsim,
    neuronsim,
    pwcca,
    svcca,
)
from attnlab.core.registry import get

F64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_rand(d, d, seed=seed))[0]


def _cka_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as HSIC(K, L)/√(HSIC(K, K)·HSIC(L, L)) with K = xxᵀ, L = yyᵀ and the centring matrix H (Kornblith 2019)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, g = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * g) / math.sqrt(np.sum(k * k) * np.sum(g * g)))


@pytest.mark.parametrize("samples, d", [(60, 6), (5, 12)])  # more samples than neurons, and fewer (Gram path)
def test_cka_is_one_under_orthogonal_maps_and_isotropic_scaling(samples, d):
    x, other = _rand(samples, d, seed=1), _rand(samples, d, seed=2)
    q = _orthogonal(d, 3)
    assert linear_cka(x, 3.5 * x @ q).item() == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x + 7.0).item() == pytest.approx(1.0, abs=1e-12)  # centred: a shift changes nothing
    stretched = x * torch.linspace(0.2, 5.0, d, dtype=F64)  # not an orthogonal map: CKA drops
    assert linear_cka(x, stretched).item() < 0.99
    assert linear_cka(x, other).item() == pytest.approx(_cka_hsic(x.numpy(), other.numpy()), abs=1e-12)
    layers = [x, x @ q, other, stretched]
    want = np.array([[_cka_hsic(a.numpy(), b.numpy()) for b in layers] for a in layers])
    np.testing.assert_allclose(layer_similarity(layers, "cka").numpy(), want, atol=1e-12)


def _orthonormal_columns(samples: int, k: int, seed: int) -> torch.Tensor:
    """k centred columns, orthonormal in sample space."""
    z = _rand(samples, k, seed=seed)
    return torch.linalg.qr(z - z.mean(0))[0]


def test_svcca_and_pwcca_on_known_cases_and_their_invariances():
    q = _orthonormal_columns(40, 4, seed=4)
    x = torch.stack([2 * q[:, 0], 5 * q[:, 1]], 1)  # neuron 0 shared with y, neuron 1 not
    y = torch.stack([q[:, 0], q[:, 2]], 1)
    # canonical correlations 1 and 0: svcca = 1/2; pwcca weights them by x's neurons' alignment: 2 and 5
    assert svcca(x, y, variance=1.0).item() == pytest.approx(0.5, abs=1e-12)
    assert pwcca(x, y, variance=1.0).item() == pytest.approx(2 / 7, abs=1e-12)
    assert pwcca(y, x, variance=1.0).item() == pytest.approx(1 / 2, abs=1e-12)  # weights from y: 1 and 1
    a, b = _rand(2, 2, seed=5) + 2 * torch.eye(2, dtype=F64), _rand(2, 2, seed=6) + 2 * torch.eye(2, dtype=F64)
    assert svcca(x @ a, y @ b, variance=1.0).item() == pytest.approx(0.5, abs=1e-10)  # any invertible maps
    assert pwcca(x, y @ b, variance=1.0).item() == pytest.approx(2 / 7, abs=1e-10)  # y's basis does not matter
    assert pwcca(-3 * x, y, variance=1.0).item() == pytest.approx(2 / 7, abs=1e-10)
    # the 99% cut: a third neuron whose own direction (q3) holds ~1e-4 of the variance is cut away
    x3 = torch.stack([q[:, 0], q[:, 1], q[:, 0] + 0.01 * q[:, 3]], 1)
    assert svcca(x3, q[:, 3:4], variance=1.0).item() == pytest.approx(1.0, abs=1e-9)
    assert svcca(x3, q[:, 3:4]).item() < 0.05
    r = _rand(200, 5, seed=7)
    assert svcca(r, r @ _rand(5, 5, seed=8)).item() == pytest.approx(1.0, abs=1e-9)


def test_neuronsim_and_mixedsim_on_planted_relations():
    x = _rand(300, 6, seed=9)
    twins = x[:, [3, 0, 5, 1, 4, 2]] * torch.tensor([2.0, -1.0, 0.5, 3.0, -4.0, 1.0], dtype=F64) + 1.0
    assert neuronsim(x, twins).item() == pytest.approx(1.0, abs=1e-12)  # every neuron has a (scaled) twin
    assert mixedsim(x, twins).item() == pytest.approx(1.0, abs=1e-12)
    rotated = x @ _orthogonal(6, 10)  # the same information, spread over the neurons
    assert mixedsim(x, rotated).item() == pytest.approx(1.0, abs=1e-12)
    assert neuronsim(x, rotated).item() < 0.9
    assert linear_cka(x, rotated).item() == pytest.approx(1.0, abs=1e-12)
    # by hand: stdlib Pearson in loops, numpy least squares with an intercept
    y = torch.cat([x[:, :2] + 0.5 * _rand(300, 2, seed=11), _rand(300, 3, seed=12)], 1)
    xs, ys = x.numpy(), y.numpy()
    best = [max(abs(statistics.correlation(list(xs[:, k]), list(ys[:, j]))) for j in range(ys.shape[1])) for k in range(6)]
    assert neuronsim(x, y).item() == pytest.approx(sum(best) / 6, abs=1e-10)
    design = np.column_stack([ys, np.ones(300)])
    r = []
    for k in range(6):
        fit = design @ np.linalg.lstsq(design, xs[:, k], rcond=None)[0]
        r.append(math.sqrt(1 - np.sum((xs[:, k] - fit) ** 2) / np.sum((xs[:, k] - xs[:, k].mean()) ** 2)))
    assert mixedsim(x, y).item() == pytest.approx(sum(r) / 6, abs=1e-10)
    # hidden states with padding: only the real tokens count
    hidden = torch.stack([x[:10], x[10:20]])
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    padded = hidden.clone()
    padded[1, 6:] = 1e3  # garbage at the padded positions
    real = torch.cat([x[:10], x[10:16]])
    assert linear_cka(padded, padded @ _orthogonal(6, 13), attention_mask=mask).item() == pytest.approx(1.0, abs=1e-12)
    assert neuronsim(padded, hidden, attention_mask=mask).item() == pytest.approx(neuronsim(real, real).item(), abs=1e-12)


def _js(p: list[float], q: list[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda u: sum(a * math.log(a / c) for a, c in zip(u, m) if a > 0)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def test_js_of_identical_maps_is_zero_and_a_case_by_hand():
    a = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(14), dtype=F64).softmax(-1)
    sim = head_similarity(a, a, "js")
    assert torch.diagonal(sim).tolist() == pytest.approx([1.0] * 3, abs=1e-15)
    assert attnsim(a, a).item() == pytest.approx(1.0, abs=1e-15) and attncorr(a, a).item() == pytest.approx(1.0, abs=1e-12)
    assert attnsim(a, a[:, [2, 0, 1]]).item() == pytest.approx(1.0, abs=1e-15)  # matched heads: order does not matter
    assert attnsim(a, a[:, [0, 0, 0]]).item() < 1.0  # heads 1 and 2 of a have no twin left
    # by hand, with padding: sequence 1 has 2 real tokens of 3 (the padded row and column must not count)
    p = torch.tensor([[[[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.2, 0.3, 0.5]]],
                      [[[0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [9.0, 9.0, 9.0]]]], dtype=F64)
    q = torch.tensor([[[[0.5, 0.5, 0.0], [0.3, 0.7, 0.0], [0.1, 0.1, 0.8]]],
                      [[[0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 9.0]]]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rows = [(p[0, 0, i, :3], q[0, 0, i, :3]) for i in range(3)] + [(p[1, 0, i, :2], q[1, 0, i, :2]) for i in range(2)]
    want_js = 1 - sum(_js(u.tolist(), v.tolist()) for u, v in rows) / 5
    want_r = sum(statistics.correlation(u.tolist(), v.tolist()) if len(set(u.tolist())) > 1 and len(set(v.tolist())) > 1
                 else 0.0 for u, v in rows) / 5
    assert head_similarity(p, q, "js", attention_mask=mask).item() == pytest.approx(want_js, abs=1e-12)
    assert head_similarity(p, q, "pearson", attention_mask=mask).item() == pytest.approx(want_r, abs=1e-12)
    assert _js([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2))


def _permuted_copy(layer: nn.Module, order: list[int], heads: int) -> nn.Module:
    """The same mechanism with its heads reordered: blocks of the q, k, v rows and of the output's columns."""
    moved = copy.deepcopy(layer)
    d = moved.q_proj.weight.shape[0] // heads
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in order])
    with torch.no_grad():
        for proj in (moved.q_proj, moved.k_proj, moved.v_proj):
            proj.weight.copy_(proj.weight[idx])
            proj.bias.copy_(proj.bias[idx])
        moved.out_proj.weight.copy_(moved.out_proj.weight[:, idx])
    return moved


class SideBySide(nn.Module):
    """Every layer reads the same input (so that a layer and its head-permuted copy see the same tokens)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sum(layer(x, attention_mask=attention_mask) for layer in self.layers)


@pytest.mark.parametrize("name", ["softmax", "linear"])
def test_layers_of_an_attnlab_model_through_capture(name):
    torch.manual_seed(15)
    first = attnlab.build(name, dim=16, heads=4).double()
    model = SideBySide(first, _permuted_copy(first, [2, 3, 0, 1], 4), attnlab.build(name, dim=16, heads=4).double())
    x = _rand(2, 9, 16, seed=16)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    with torch.no_grad(), capture(model) as att:
        model(x, mask)
    for measure in ("attnsim", "attncorr"):
        m = layer_similarity(att, measure)
        assert m.shape == (3, 3) and torch.diagonal(m).tolist() == pytest.approx([1.0] * 3, abs=1e-12)
        assert m[0, 1].item() == pytest.approx(1.0, abs=1e-12)  # the permuted copy: every head has its twin
        assert m[0, 2].item() < 1 - 1e-3  # an unrelated layer (linear attention at init is near uniform: JS is small)
    cka = layer_similarity(att, "cka")  # attention representations: pairs × heads, heads in another order
    assert cka[0, 1].item() == pytest.approx(1.0, abs=1e-12) and cka[0, 2].item() < 0.99
    # the padded query row and key column of sequence 1 hold no weight, whatever the captured values
    assert all(a[1, :, 6:].abs().sum() == 0 and a[1, :, :, 6:].abs().sum() == 0 for a in att.layers)


def test_minilm_adjacent_layers_are_more_alike_than_far_ones(minilm, minilm_capture):
    model, _, batch = minilm
    att, _, mask = minilm_capture
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states  # embeddings + 6 layers
    for matrix in (layer_similarity(list(hidden), "cka", attention_mask=mask), layer_similarity(att, "cka")):
        n = matrix.shape[0]
        adjacent = [matrix[i, i + 1].item() for i in range(n - 1)]
        far = [matrix[i, j].item() for i in range(n) for j in range(n) if abs(i - j) >= 3]
        assert sum(adjacent) / len(adjacent) > sum(far) / len(far) + 0.05
        torch.testing.assert_close(matrix, matrix.T)
        assert torch.diagonal(matrix).tolist() == pytest.approx([1.0] * n, abs=1e-12)
    js = layer_similarity(att, "attnsim")
    assert torch.diagonal(js).tolist() == pytest.approx([1.0] * 6, abs=1e-12) and bool((js < 1 + 1e-12).all())


def test_explain_panel_is_the_cka_of_the_inputs_of_each_attention_layer(minilm):
    model, tokenizer, batch = minilm
    texts = ["The cat sat on the mat.", "Because it was tired, the small cat slept all afternoon."]
    ex = explain(texts, model, tokenizer=tokenizer, methods=("layer-similarity",))
    data = ex.methods["layer-similarity"]
    assert data["source"].startswith("hidden states") and ex.method_info["layer-similarity"]["papers"] == ["P025"]
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[:-1]  # what layer l reads: hidden_states[l]
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        want = [[_cka_hsic(x[b][real].double().numpy(), y[b][real].double().numpy()) for y in hidden] for x in hidden]
        np.testing.assert_allclose(np.array(data["cka"][b]), want, atol=1e-9)
    page = render(ex)
    assert page.count("class='similarity'") == 2 and "<h3>Layer similarity</h3>" in page


def test_explain_panel_without_the_layers_inputs_uses_attention_representations(minilm, minilm_capture, monkeypatch):
    explain_module = importlib.import_module("attnlab.analysis.explain")  # the module (the package exports a function of that name)

    model, tokenizer, _ = minilm
    _, eager, mask = minilm_capture
    monkeypatch.setattr(explain_module, "_attention_inputs", lambda ctx: None)  # as for maps read off the outputs
    texts = ["The cat sat on the mat.", "Because it was tired, the small cat slept all afternoon."]
    data = explain(texts, model, tokenizer=tokenizer, methods=("layer-similarity",)).methods["layer-similarity"]
    assert data["source"].startswith("attention representations")
    for b in range(2):
        real = mask[b]
        reps = [a[b][:, real][:, :, real].permute(1, 2, 0).reshape(-1, a.shape[1]).double().numpy() for a in eager]
        want = [[_cka_hsic(x, y) for y in reps] for x in reps]  # every (query, key) pair of real tokens, heads as neurons
        np.testing.assert_allclose(np.array(data["cka"][b]), want, atol=1e-9)


def test_bad_inputs_name_the_argument():
    x = _rand(10, 3)
    with pytest.raises(ValueError, match=r"^y: expected the 10 samples of x, got 9"):
        linear_cka(x, x[:9])
    with pytest.raises(ValueError, match=r"^x: expected a tensor \(samples, d\) or \(batch, n, d\), got shape"):
        neuronsim(x[None, None], x)
    with pytest.raises(ValueError, match=r"^attention_mask: expected a bool mask of shape \(2, 5\)"):
        mixedsim(x.view(2, 5, 3), x.view(2, 5, 3), attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^variance: expected a share of the variance in \(0, 1\], got 0"):
        svcca(x, x, variance=0)
    a = torch.full((1, 1, 2, 2), 0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"^a: expected attention probabilities .* attncorr"):
        attnsim(a * 3, a)
    with pytest.raises(ValueError, match=r"^b: expected maps of the same inputs as a"):
        attnsim(a, torch.full((1, 1, 3, 3), 1 / 3, dtype=F64))
    with pytest.raises(ValueError, match=r"^measure: expected one of neuronsim, .*got 'cca'"):
        layer_similarity([x, x], "cca")
    with pytest.raises(ValueError, match=r"^measure: 'attnsim' compares attention maps"):
        layer_similarity([x, x], "attnsim")
    with pytest.raises(ValueError, match=r"^layers, other: expected attention maps .* only, or representations only"):
        layer_similarity([x], other=[a])
    assert get("linear-cka", "analysis").build(x=x, y=x).item() == pytest.approx(1.0)
    assert {get(n, "analysis").paper.id for n in ("neuronsim", "mixedsim", "svcca", "pwcca", "attnsim", "attncorr",
                                                  "layer-similarity")} == {"P025"}
