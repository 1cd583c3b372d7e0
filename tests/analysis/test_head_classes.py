"""P137 head classes: NMI of a uniform map is 0 and of a permutation map 1 (padding left out), the classes of a
constructed local / hybrid / global set and NMI-HAD's choice of layer (recipe nmi-hybrid-distillation), heads of
attnlab mechanisms through capture, MiniLM's heads (global heads' rows alike, local heads' rows not), and the
head-classes panel of `attnlab explain` in headless Chromium next to the layer-similarity one."""
from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis import capture, previous_token_score
from attnlab.analysis.explain import explain
from attnlab.analysis.head_classes import CLASSES, classify_nmi, head_classes, hybrid_layer
from attnlab.analysis.page import write_page
from attnlab.core.registry import get
from attnlab.recipes.nmi_hybrid_distillation import nmi_hybrid_distillation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from browser import open_page  # noqa: E402  (tests/browser.py)

F64 = torch.float64
N = 64


def _uniform(n: int) -> torch.Tensor:
    return torch.full((n, n), 1 / n, dtype=F64)


def _constructed() -> list[torch.Tensor]:
    """Three one-head layers over N tokens: local (each query its own key), hybrid (0.2·local + 0.8·uniform: NMI
    0.091 by the formula), global (every query the same non-uniform distribution)."""
    local = torch.eye(N, dtype=F64)
    hybrid = 0.2 * local + 0.8 * _uniform(N)
    row = torch.arange(1, N + 1, dtype=F64)
    glob = (row / row.sum()).expand(N, N)
    return [m[None, None] for m in (local, hybrid, glob)]


def _nmi_of_mixture(alpha: float, n: int) -> float:
    """NMI of alpha·I + (1 − alpha)·uniform by hand: p(k) uniform, so I = log n − H(row) and H(Q) = H(K) = log n."""
    import math

    top, rest = alpha + (1 - alpha) / n, (1 - alpha) / n
    row_entropy = -top * math.log(top) - (n - 1) * rest * math.log(rest)
    return (math.log(n) - row_entropy) / math.log(n)


def test_nmi_of_uniform_and_permutation_maps_padding_left_out():
    perm = torch.eye(5, dtype=F64)[torch.tensor([3, 0, 4, 1, 2])]
    maps = torch.zeros(2, 2, 7, 7, dtype=F64)
    maps[0, 0], maps[0, 1] = _uniform(7), torch.eye(7, dtype=F64)[torch.randperm(7, generator=torch.Generator().manual_seed(0))]
    maps[1, 0, :5, :5], maps[1, 1, :5, :5] = _uniform(5), perm
    maps[1, :, 5:, :] = 0.3  # garbage in the padded rows: must be ignored
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    hc = head_classes(maps, attention_mask=mask)
    assert hc.nmi.shape == (1, 2, 2)
    assert hc.nmi[0, :, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert hc.nmi[0, :, 1].tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert hc.labels() == [[["global", "local"], ["global", "local"]]]


def test_classes_of_a_constructed_local_hybrid_global_set_and_the_layer_nmi_had_distils():
    layers = _constructed()
    hc = head_classes(layers)
    assert hc.nmi[:, 0, 0].tolist() == pytest.approx([1.0, _nmi_of_mixture(0.2, N), 0.0], abs=1e-12)
    assert 0.06 < _nmi_of_mixture(0.2, N) < 0.12
    assert hc.codes.flatten().tolist() == [2, 1, 0] and [CLASSES[c] for c in hc.codes.flatten()] == ["local", "hybrid", "global"]
    assert hc.counts().tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    assert hybrid_layer(layers) == 1 and hybrid_layer(hc, target=0.9) == 0 and hybrid_layer(hc, target=0.0) == 2
    # the bounds are parameters: with "local" from 0.05 the hybrid head (0.091) is local
    assert classify_nmi(hc.nmi, global_below=0.001, local_above=0.05).flatten().tolist() == [2, 2, 0]
    # NMI-HAD: the hybrid layer is the teacher; the loss is 0 for a student equal to it, positive for the others
    target = nmi_hybrid_distillation(layers, student_heads=1)
    assert target.layer == 1 and target.classes == ["local", "hybrid", "global"]
    assert target.loss(layers[1], layers[target.layer]).item() == pytest.approx(0.0, abs=1e-12)
    assert target.loss(layers[2], layers[target.layer]).item() > 0.1
    two_heads = nmi_hybrid_distillation(layers, student_heads=2)  # other head counts: the adapter maps them
    assert two_heads.loss.mixing() is not None and two_heads.loss.mixing().shape == (1, 2)
    assert get("nmi-hybrid-distillation", "recipe").paper.id == "P137"


class Stack(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _blind(layer: nn.Module) -> nn.Module:
    """No keys to tell apart: every query sees the same scores, so every row is the same."""
    with torch.no_grad():
        layer.k_proj.weight.zero_()
        layer.k_proj.bias.zero_()
    return layer


def test_heads_of_attnlab_mechanisms_through_capture():
    torch.manual_seed(1)
    model = Stack(attnlab.build("sliding-window", dim=16, heads=2, radius=1), _blind(attnlab.build("softmax", dim=16, heads=2)),
                  _blind(attnlab.build("linear", dim=16, heads=2))).double()
    with torch.no_grad(), capture(model) as att:
        model(torch.randn(1, 32, 16, dtype=F64))
    hc = head_classes(att)
    # banded rows of 3 keys over 32: NMI ≥ 1 − log 3 / log 32 ≈ 0.68 ; identical rows: NMI 0 (softmax and linear)
    assert hc.nmi[0].min().item() > 0.6 and hc.nmi[1:].abs().max().item() < 1e-9
    assert hc.labels() == [[["local", "local"]], [["global", "global"]], [["global", "global"]]]
    assert hybrid_layer(att, target=0.5) == 0


def test_minilm_heads_global_rows_alike_local_rows_apart(minilm_capture):
    att, eager, mask = minilm_capture
    hc = head_classes(att)
    assert hc.nmi.shape == (6, 2, 12) and set(hc.codes.unique().tolist()) == {0, 1, 2}
    # query dependence measured without NMI: the mean total variation between each row and the head's mean row
    spread = torch.zeros_like(hc.nmi)
    for layer, a in enumerate(eager):
        for b in range(2):
            real = mask[b]
            rows = a[b][:, real][:, :, real].double()
            spread[layer, b] = 0.5 * (rows - rows.mean(1, keepdim=True)).abs().sum(-1).mean(-1)
    by_class = [spread[hc.codes == c].mean().item() for c in range(3)]
    assert by_class[0] + 0.05 < by_class[1] and by_class[1] + 0.05 < by_class[2], by_class
    prev = previous_token_score(att).flatten().argmax()  # the previous-token head attends by position: local
    assert CLASSES[hc.codes.flatten()[prev]] == "local"
    assert hc.counts()[-1, 0] > hc.counts()[0, 0]  # the last layer has more global heads than the first


PROBE = """
window.addEventListener('load', () => {
  const probe = document.createElement('div');
  probe.id = 'attnlab-probe';
  probe.textContent = JSON.stringify({
    pwned: typeof window.__pwned,
    classes: Array.from(document.querySelectorAll('table.classes tbody tr')).map(r => r.cells.length),
    similarity: Array.from(document.querySelectorAll('table.similarity tbody tr')).map(r => r.cells.length),
    first: document.querySelector('table.classes tbody td:nth-child(2) span').textContent,
  });
  document.body.appendChild(probe);
});
"""


def test_explain_panel_and_page(minilm, minilm_capture, tmp_path):
    model, tokenizer, _ = minilm
    evil = ['<script>window.__pwned=1</script> The cat sat.', 'It was "tired" & <b>slept</b>.']
    ex = explain(evil, model, tokenizer=tokenizer, methods=("head-classes", "layer-similarity"))
    data = ex.methods["head-classes"]
    assert ex.method_info["head-classes"]["papers"] == ["P137"]
    with torch.no_grad(), capture(model) as att:
        model(**tokenizer(evil, return_tensors="pt", padding=True))
    hc = head_classes(att)
    torch.testing.assert_close(torch.tensor(data["nmi"], dtype=F64), hc.nmi)
    assert data["classes"] == hc.labels()
    layer_nmi = hc.nmi.mean(-1)
    assert data["hybrid_layer"] == [int((layer_nmi[:, b] - 0.09).abs().argmin()) for b in range(2)]
    page = write_page(ex, tmp_path / "index.html")
    text = page.read_text(encoding="utf-8")
    assert "<script>window" not in text and "<b>slept</b>" not in text
    seen = open_page(page, probe=PROBE)
    assert seen.errors == [] and seen.remote_requests == []
    found = re.search(r'<div id="attnlab-probe">(.*?)</div>', seen.dom)
    assert found, "the probe did not run"
    result = json.loads(html.unescape(found.group(1)))
    assert result["pwned"] == "undefined"
    assert result["classes"] == [1 + 12 + 1] * 12  # 6 layers × 2 texts: layer, 12 heads, mean NMI
    assert result["similarity"] == [1 + 6] * 12
    first = hc.labels()[0][0][0]
    assert result["first"] == f"{first[0].upper()} {hc.nmi[0, 0, 0].item():.2f}"


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"^local_above: expected a bound >= global_below=0.2, got 0.1"):
        head_classes(_constructed(), global_below=0.2, local_above=0.1)
    with pytest.raises(ValueError, match=r"^global_below: expected an NMI in \[0, 1\], got -1"):
        classify_nmi(torch.zeros(2, dtype=F64), global_below=-1)
    with pytest.raises(TypeError, match=r"^nmi: expected a floating tensor"):
        classify_nmi(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^target: expected an NMI in \[0, 1\], got 2"):
        hybrid_layer(_constructed(), target=2)
    with pytest.raises(ValueError, match=r"^attentions\[0\]: expected a \(batch, heads, n_q, n_k\) tensor"):
        head_classes([torch.zeros(3, 3)])
