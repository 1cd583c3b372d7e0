"""explain's methods are the catalogue's analysis entries: one name each (the catalogue's) in `explain`, the CLI,
the JSON and the page; every analysis entry is run by a method, reported by one, or named here with the reason it is
not; the names explain used before are refused with the new one; `attnlab info NAME` leads to the code."""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import attnlab
from attnlab.analysis.capture import capture
from attnlab.analysis.explain import METHODS, RENAMED, estimate_seconds, explain, method_for, resolve_methods
from attnlab.analysis.heads import HEAD_STATISTICS
from attnlab.cli import main
from attnlab.core.errors import ParameterError
from attnlab.core.registry import entries, get

# analysis entries explain does not compute, each with the reason; a new entry must be added to explain or here
NOT_IN_EXPLAIN = {
    "offset-attention": "needs an offset; previous-token-score is its offset −1",
    "lookback-ratio": "needs a generation: context tokens against generated ones",
    "lookback-features": "needs a generation: context tokens against generated ones",
    "lookback-detector": "a classifier trained on lookback features",
    "attention-calibration": "changes the model while it runs",
    "rank-collapse": "an experiment on random attention stacks, not on a model's capture",
    "rank-residual": "a property of token matrices, not of attention maps",
    "unified-implicit-attention": "the implicit attention of a gated selective-SSM layer, not a captured map",
    "attention-mass-by-distance": "a locality profile over image grids (P012); explain's pages are about text",
    "neuronsim": "compares two representations; layer-similarity reports linear CKA between the layers",
    "mixedsim": "compares two representations; layer-similarity reports linear CKA between the layers",
    "svcca": "compares two representations over more samples than one text's tokens",
    "pwcca": "compares two representations over more samples than one text's tokens",
    "linear-cka": "layer-similarity reports it for every pair of layers",
    "attnsim": "compares two layers' maps; layer-similarity reports linear CKA",
    "attncorr": "compares two layers' maps; layer-similarity reports linear CKA",
    "crystal-quality": "a metric of SAE decoder directions (P179), not of one text",
    "spatial-modularity": "a metric of SAE features and their co-occurrences (P179), not of one text",
    "eigenvalue-power-law": "a metric of point clouds per layer (P179), not of one text",
    "pattern-injection": "changes the model while it runs",
    "vocabulary-maps": "reads a head's weights through a model's own embedding and unembedding, not one text",
    "maps-relation-scores": "needs a relation (pairs of tokens) and a causal LM's unembedding",
    "maps-salient-mappings": "reads a head's weights through a model's own embedding and unembedding, not one text",
    "head-relevance-vectors": "needs a text-to-image model's cross-attention over many prompts",
    "ordered-weakening": "changes the model while it runs",
    "concept-attention": "needs an MM-DiT image stream",
    "attention-knockout": "changes the model while it runs",
    "window-knockout": "changes the model while it runs, and needs an answer to score",
    "attention-based-peeking": "changes the model while it runs",
    "context-aware-mean-ablation": "changes the model while it runs, and needs a set of reference prompts",
    "all-for-one": "a circuit test over many prompts with an answer each",
    "deception-penalty": "a training loss over labelled data",
    "impermissible-mass": "needs a mask of impermissible tokens from the task",
    "qk-term-trace": "traces a ToyLM's terms through its residual stream; qk-decomposition shows the terms",
    "lorsa": "a replacement model trained for minutes on one attention layer's inputs and outputs",
    "sparse-autoencoder": "trained on many texts' residual streams, not on one text",
    "sae-separation-score": "needs known and unknown entities and a trained SAE",
    "residual-steering": "changes the model while it runs",
    "neuron-decoding": "reads MLP neurons through the unembedding of a causal LM, not attention over one text",
    "multimodal-neuron-attribution": "scores MLP neurons for an image caption, not attention over one text",
    "neuron-ablation-check": "changes the model while it runs",
    "class-lens": "reads an image classifier, not a text",
    "class-identifiability": "reads an image classifier, not a text",
    "class-lens-attribution": "reads an image classifier, not a text",
    "faithful-mask-invariance": "reads an image classifier, not a text",
    "disrt-score": "reads an image classifier, not a text",
    "patch-shuffle": "reads an image classifier, not a text",
    "representation-shift": "reads an image classifier, not a text",
    "normgrad": "saliency of a convolutional network, not attention",
    "grad-cam": "saliency of a convolutional network, not attention",
    "saliency-class-sensitivity": "saliency of a convolutional network, not attention",
    "pointing-game": "saliency of a convolutional network, not attention",
    "faithful-masks": "a two-stage model trained on images",
}
OLD_NAMES = ("flow", "relevance", "lrp", "heads", "sinks", "qk")  # explain's names before it took the catalogue's


def test_every_method_is_a_catalogue_entry_and_back():
    analysis = {s.name for s in entries("analysis")}
    assert set(METHODS) <= analysis, set(METHODS) - analysis
    for name, m in METHODS.items():
        assert m.name == name and m.entry.kind == "analysis" and m.entry.name == name
        assert set(m.covers) <= analysis - set(METHODS), (name, m.covers)
    covered = {entry for m in METHODS.values() for entry in m.covers}
    # vice versa: an analysis entry explain can compute is a method, or reported by one; the rest are named above
    assert analysis - set(METHODS) - covered == set(NOT_IN_EXPLAIN)
    assert not set(NOT_IN_EXPLAIN) & (set(METHODS) | covered)
    assert method_for("attention-flow") is METHODS["attention-flow"]
    assert method_for("induction-score") is METHODS["head-statistics"]
    assert method_for("sink-tokens") is METHODS["sink-scores"] and method_for("offset-attention") is None


def test_papers_come_from_the_entries_and_those_they_cover():
    assert {name: m.papers for name, m in METHODS.items()} == {
        "rollout": ("P008",), "attention-flow": ("P008",), "relevance-generic": ("P035",), "relevance-lrp": ("P111",),
        "head-statistics": ("P051", "P058"), "sink-scores": ("P068", "P248"), "qk-embedding": ("P093",),
        "layer-similarity": ("P025",), "head-classes": ("P137",), "attention-patterns": ("P156",),
        "qk-decomposition": ("P190",),
    }


def test_head_statistics_holds_each_entry_under_its_name():
    """The statistic stored under catalogue name X is what the catalogue entry X computes, through the entry's build."""
    torch.manual_seed(0)
    layers = nn.ModuleList(attnlab.build("softmax", dim=16, heads=2, causal=True) for _ in range(2)).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    with torch.no_grad(), capture(layers) as att:
        for layer in layers:
            x = x + layer(x, attention_mask=mask)
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3, 4], [5, 5, 6, 5, 5, 0, 0]])
    stats = get("head-statistics", "analysis").build(attentions=att, tokens=tokens)
    assert tuple(stats) == HEAD_STATISTICS == METHODS["head-statistics"].covers
    for name, value in stats.items():
        spec = get(name, "analysis")
        want = spec.build(attentions=att, **({"tokens": tokens} if "tokens" in {p.name for p in spec.params} else {}))
        assert value.shape == (2, 2, 2), name
        torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)
    assert len({tuple(v.flatten().tolist()) for v in stats.values()}) == len(stats)  # six different numbers


@pytest.mark.parametrize("old", OLD_NAMES)
def test_old_names_are_refused_with_the_new_one(old, capsys):
    new = RENAMED[old]
    assert new in METHODS
    with pytest.raises(ParameterError, match=rf"^methods: expected one of .*, got '{old}'; did you mean '{new}'\?"):
        resolve_methods(f"rollout,{old}")
    with pytest.raises(ParameterError, match=f"did you mean '{new}'"):
        explain(model=nn.Identity(), tokens=["a", "b"], methods=[old])  # before the model runs
    with pytest.raises(ParameterError, match=rf"^method: expected one of .*, got '{old}'; did you mean '{new}'\?"):
        estimate_seconds(old, layers=1, heads=1, batch=1, n=4)
    assert main(["explain", "a text", "--methods", old, "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--methods: expected one of" in err and f"did you mean '{new}'?" in err


def test_renamed_lists_exactly_the_old_names():
    assert sorted(RENAMED) == sorted(OLD_NAMES) and not set(RENAMED) & set(METHODS)
    with pytest.raises(ParameterError, match=r"got 'rolout'; did you mean 'rollout'\?"):
        resolve_methods("rolout")


class Tiny(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab_size, 16)
        self.layers = nn.ModuleList(attnlab.build("softmax", dim=16, heads=2) for _ in range(2))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x, attention_mask=attention_mask)
        return x


MODEL_FILE = f"import torch\nfrom torch import nn\nimport attnlab\n\n\n{inspect.getsource(Tiny)}"


def test_cli_takes_catalogue_names_and_writes_them(tmp_path, capsys):
    path = tmp_path / "tiny_catalogue_model.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "out"
    argv = ["explain", "--model", f"{path}:Tiny", "--tokens", "the cat sat on the mat", "--tokens", "a cat",
            "--methods", "attention-flow,relevance-lrp,head-statistics", "--out", str(out)]
    assert main(argv) == 0
    assert "[1/3] attention-flow" in capsys.readouterr().err
    data = json.loads((out / "explain.json").read_text())
    assert list(data["methods"]) == list(data["method_info"]) == ["attention-flow", "relevance-lrp", "head-statistics"]
    assert data["method_info"]["head-statistics"]["papers"] == ["P051", "P058"]
    assert list(data["methods"]["head-statistics"]["stats"]) == list(HEAD_STATISTICS)
    assert data["methods"]["head-statistics"]["descriptions"]["qk-nmi"] == get("qk-nmi", "analysis").summary
    page = (out / "index.html").read_text()
    assert re.findall(r"class='strip' data-method='([\w-]+)' data-text='0'", page) == ["attention-flow", "relevance-lrp"]
    assert "<b>attention-entropy</b>" in page and "<b>entropy</b>" not in page


CODE = {  # the function of each method's catalogue entry
    "rollout": ("rollout.py", "rollout"), "attention-flow": ("rollout.py", "attention_flow"),
    "relevance-generic": ("relevance.py", "generic_relevance"), "relevance-lrp": ("relevance.py", "lrp_relevance"),
    "head-statistics": ("heads.py", "head_statistics"), "sink-scores": ("sinks.py", "sink_scores"),
    "qk-embedding": ("qk_embedding.py", "qk_embedding"),
    "layer-similarity": ("similarity.py", "layer_similarity"), "head-classes": ("head_classes.py", "head_classes"),
    "attention-patterns": ("patterns.py", "pattern_scores"),
    "qk-decomposition": ("qk_decomposition.py", "score_decomposition_summary"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_info_leads_to_the_code(name, capsys):
    assert sorted(CODE) == sorted(METHODS)
    assert main(["info", name]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{name} (analysis): ")
    path, line = re.search(r"^  source +(\S+):(\d+)$", text, re.M).groups()
    file, function = CODE[name]
    assert path.endswith(f"attnlab/analysis/{file}")
    assert Path(path).read_text(encoding="utf-8").splitlines()[int(line) - 1].startswith(f"def {function}(")
