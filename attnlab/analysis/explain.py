"""`explain`: run the analysis methods on a few texts and return every number as plain data.

    from attnlab.analysis.explain import explain
    ex = explain(["The cat sat on the mat.", "It was tired."], model="minilm", methods=("rollout", "attention-flow"))
    ex.tokens[0]                                  # the token strings of text 0 (padded to the batch's length)
    ex.methods["rollout"]["token_scores"][0]      # one score per token: how much each reaches the target token
    ex.to_dict()                                  # lists, floats, strings: what `explain.json` holds

    ex = explain(model=my_model, tokens=["the", "cat", "sat", "on", "the", "mat"])  # any model of attnlab mechanisms

The texts go through the model as one padded batch, inside `capture` (attnlab/analysis/capture.py).
Every method is an analysis entry of the catalogue, under its catalogue name (`attnlab list`,
`attnlab info NAME` for its paper, parameters and source): `METHODS` maps that name to a `Method`,
a function of the `Context` (model, tokenizer, inputs, the capture) returning a dict of plain data,
with its cost estimate; `Method.entry` is the catalogue entry, `method_for(name)` the method that
runs an entry or reports its numbers. A method that scores tokens puts
`token_scores` (batch, n) in it — the page colours the tokens with it. The target token, whose
explanation is coloured, is the first real token ([CLS]) of an encoder and the last real token of a
causal model (causal = no real query attends to a later real key, in any layer). Padded positions
keep their place in every array (n = the batch's padded length) and hold 0 in every score.

A model of attnlab mechanisms needs no tokenizer: give `tokens` (token strings, one list per
sequence) and either nothing else or the model's `inputs`.

* Without `inputs`, the strings become token ids through a vocabulary built from them: id 0 is
  padding, then each distinct string in order of first appearance (`Explanation.vocabulary`). The
  model is called as `model(ids)` with ids (batch, n) int64; when the lists differ in length the
  batch is right-padded and the call is `model(ids, attention_mask=mask)`, mask (batch, n) bool with
  True = real token, which the model must hand on to its attention modules (checked: the padded
  keys must be invisible in the captured maps).
* With `inputs` (a tensor, e.g. embeddings (batch, n, dim), or a mapping of keyword inputs), the
  model is called as `model(inputs)` / `model(**inputs)`; the real tokens are those the capture
  saw (queries not padded), and sequence b must have exactly len(tokens[b]) of them.

Token identity for the head statistics (duplicate, induction) always comes from the strings.

`methods=None` (the default) runs every method that applies to the model and leaves out, with
the reason in `Explanation.skipped`, those that do not: a method that raises ValueError or TypeError
for this model (relevance-lrp needs softmax probabilities computed by F.softmax or SDPA;
qk-embedding needs the modules' `project`; rollout and attention-flow need token × token maps).
Methods named explicitly raise instead. The names explain used before it took the catalogue's
(flow, relevance, lrp, heads, sinks, qk) are refused: ParameterError naming the new one (`RENAMED`).

Methods here: rollout and attention-flow (P008), relevance-generic (P035 gradient-weighted
relevance), relevance-lrp (P111 LRP relevance of the attention maps, gradient-weighted and rolled
out; also `input_relevance`, the LRP relevance reaching each input token, and
`attention_relevance` R^(A)), head-statistics (its `stats` keyed by the catalogue names of
`heads.HEAD_STATISTICS`: attention-entropy, P051 mean-attention-distance, P058 qk-nmi,
previous-token / duplicate-token / induction scores), sink-scores (P068 scores, P248 sink tokens),
qk-embedding (P093 joint query–key embedding per head, PCA over all texts; points only for real
tokens, `position` = index among the real tokens of its text). rollout, attention-flow and the two
relevances also give `matrix` (batch, n, n): row i explains output token i (the page recolours the
tokens for any row); a relevance's matrix is R − I, as its scores. layer-similarity (P025): per text the linear
CKA between every pair of layers (`cka`, (batch, layers, layers)) of the hidden states each attention layer reads
(one more forward pass, pre-hooks on the captured modules), or of the attention representations when the
modules' inputs are not at hand (`source` says which). head-classes (P137): each head's NMI and class (local /
hybrid / global) per text, the layers' mean NMI and `hybrid_layer`, the layer NMI-HAD would distil.
attention-patterns (P156): per text, layer and head the pattern of `patterns.PATTERNS` the head's map is closest to
(`best`; similarity = 1 − total variation between its rows and the normalised pattern, `best_similarity`) and the
share of its attention on that pattern (`best_match`); sentence ends are the tokenizer's ".", "!", "?".
qk-decomposition (P190): per layer and head the rank of W_Q W_Kᵀ (biases in homogeneous coordinates), its singular
values and, for each text's three strongest query–key pairs, how many singular terms reach 90% of the score and the
largest terms (`qk_decomposition.score_decomposition_summary`); `terms_needed_by_text` (batch, layers, heads). Models
whose scores are not a bilinear form of one token each (rope, linear attention) are skipped with the reason.

Limits (`Explanation.notes` says what was cut; a `UserWarning` too):

* Length: texts are truncated to the model's maximum number of tokens (the smallest of the config's
  `max_position_embeddings` / `n_positions` / `max_seq_len` and the tokenizer's `model_max_length`),
  or to `max_tokens` when smaller.
* Cost: after the capture, `estimate_seconds` predicts each method's time on one core from the
  shapes (layers, heads, batch, tokens, model size) with the rates in `RATES` (measured on one core
  of a loaded 2-core machine, rounded down: estimates err on the slow side). A method whose estimate
  exceeds `budget` (seconds, default `BUDGET`) is downsampled or left out: attention-flow is
  computed for the target token of each text only (its other matrix rows are 0) when that fits,
  anything else is left out with the estimate as the reason (`skipped`); a method named in
  `methods=` that does not fit raises ValueError instead. `budget=None` runs everything.
* Size: the per-head maps (`attention`, relevance-lrp's `attention_relevance`; layers·batch·heads·n²
  numbers each) are kept only up to `max_map_values` numbers (default `MAX_MAP_VALUES`); beyond it
  `attention` is empty and `attention_relevance` is left out, so that the page and JSON stay small
  (the PNG figures then leave out the attention grid too).
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.registry import Spec, get
from .capture import Attentions, capture
from .head_classes import HYBRID_TARGET, head_classes
from .heads import HEAD_STATISTICS, head_statistics
from .patterns import pattern_scores, sentence_end_ids
from .qk_decomposition import score_decomposition_summary
from .qk_embedding import qk_embedding
from .relevance import generic_relevance, lrp_relevance
from .rollout import attention_flow, rollout
from .similarity import layer_similarity
from .sinks import sink_scores, sink_tokens

MINILM = "minilm"
BUDGET = 60.0  # seconds a method may take by its estimate (explain(budget=...), attnlab explain --budget)
MAX_MAP_VALUES = 2_000_000  # numbers of the per-head maps kept in an Explanation (explain(max_map_values=...))
# work units per second on one core (see estimate_seconds); measured under load and rounded down
RATES = {
    "max_flow": 1.0e8,  # layered max-flow: layers · n² edges per (output, input) pair
    "model": 2.0e9,  # FLOPs of a forward pass of the model
    "matmul": 1.0e9,  # float64 multiply-adds of the (batch, n, n) products of rollout / relevance
    "maps": 5.0e6,  # per-head map entries handled in Python-level loops (head statistics, sinks, qk, plain data)
}
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length")
# explain's method names before they became the catalogue's: refused, the error names the new one
RENAMED = {"flow": "attention-flow", "relevance": "relevance-generic", "lrp": "relevance-lrp",
           "heads": "head-statistics", "sinks": "sink-scores", "qk": "qk-embedding"}


@dataclass
class Context:
    """What a method may read: the model, its inputs and the capture of its forward pass."""

    model: nn.Module
    tokenizer: Any
    inputs: Mapping[str, Any] | Tensor  # what the model is called with: model(**inputs) or model(inputs)
    att: Attentions
    mask: Tensor  # bool (batch, n), True = real token
    targets: list[int]  # per sequence: the output token whose explanation colours the tokens
    causal: bool
    flow_rows: list[int] | None = None  # output rows attention-flow computes (None = all): set when over the budget

    def zero_padding(self, t: Tensor) -> Tensor:
        """t (batch, ..., n) with the entries of padded tokens (last axis) set to 0."""
        m = self.mask.to(t.device, t.dtype)
        return t * m.reshape(m.shape[0], *([1] * (t.dim() - 2)), m.shape[1])


@dataclass(frozen=True)
class Shape:
    """What a method's cost depends on: `layers` captured maps of `heads` heads over `batch` sequences of `n` (padded)
    tokens, a model of `params` parameters, and `rows` output tokens attention-flow computes (None = all n)."""

    layers: int
    heads: int
    batch: int
    n: int
    params: int = 0
    rows: int | None = None

    @property
    def maps(self) -> int:
        """Entries of the per-head maps: layers · batch · heads · n²."""
        return self.layers * self.batch * self.heads * self.n**2

    @property
    def forward(self) -> float:
        """Seconds of a forward pass: the weights, plus q·k and A·v at head_dim ~64."""
        return (2 * self.params * self.batch * self.n + 4 * self.maps * 64) / RATES["model"]

    @property
    def products(self) -> float:
        """Seconds of the (batch, n, n) products over the layers (rollout, relevance)."""
        return self.layers * self.batch * self.n**3 / RATES["matmul"]


Run = Callable[[Context], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """A method of `explain`: the catalogue's analysis entry `name` run on a capture. `run(ctx)` returns its data
    (a plain dict, tensors allowed), `cost(shape)` its estimated seconds on one core; `covers` names the other
    catalogue entries whose numbers it reports too (the statistics of head-statistics, sink-scores' sink tokens)."""

    name: str
    summary: str
    run: Run
    cost: Callable[[Shape], float]
    covers: tuple[str, ...] = ()
    capture_qk: bool = False  # the capture must record per-head queries and keys

    @property
    def entry(self) -> Spec:
        """The catalogue entry (kind "analysis") of the same name: its paper, parameters and source."""
        return get(self.name, "analysis")

    @property
    def papers(self) -> tuple[str, ...]:
        """Paper ids (Pnnn) of the entry and of the entries it covers."""
        specs = (self.entry, *(get(name, "analysis") for name in self.covers))
        return tuple(dict.fromkeys(s.paper.id for s in specs if s.paper.id))


METHODS: dict[str, Method] = {}  # catalogue name -> Method


def method(name: str, summary: str, cost: Callable[[Shape], float], *, covers: tuple[str, ...] = (),
           capture_qk: bool = False) -> Callable[[Run], Run]:
    """Decorator adding a function of the context to `METHODS` as the method of the catalogue entry `name`."""

    def add(fn: Run) -> Run:
        METHODS[name] = Method(name, summary, fn, cost, covers, capture_qk)
        return fn

    return add


def method_for(entry: str) -> Method | None:
    """The method of `explain` that runs the catalogue's analysis entry `entry`, or reports its numbers among
    others (head-statistics for attention-entropy); None when explain does not compute it."""
    return METHODS.get(entry) or next((m for m in METHODS.values() if entry in m.covers), None)


def _target_rows(matrix: Tensor, targets: list[int]) -> Tensor:
    """matrix (batch, n, n) -> (batch, n): row targets[b] of sequence b."""
    return torch.stack([matrix[b, t] for b, t in enumerate(targets)])


@method("rollout", "attention rollout: share of each input token in the target token (residual-mixed, head mean)",
        lambda s: s.products + s.maps / RATES["maps"])
def _rollout(ctx: Context) -> dict[str, Any]:
    r = rollout(ctx.att)
    return {"matrix": r, "token_scores": _target_rows(r, ctx.targets)}


@method("attention-flow", "attention flow: exact max-flow from each input token to the target token",
        lambda s: s.batch * (s.n if s.rows is None else s.rows) * s.n * s.layers * s.n**2 / RATES["max_flow"]
        + s.products)
def _attention_flow(ctx: Context) -> dict[str, Any]:
    f = attention_flow(ctx.att, outputs=ctx.flow_rows)
    return {"matrix": f, "token_scores": _target_rows(f, ctx.targets)}


@method("relevance-generic", "gradient-weighted relevance (Chefer 2021) of each input token for the target token; "
        "y = predicted logit, or the norm of the mean-pooled embedding for an encoder without head",
        lambda s: 3 * s.forward + 2 * s.products + s.maps / RATES["maps"])
def _relevance_generic(ctx: Context) -> dict[str, Any]:
    rel = generic_relevance(ctx.model, ctx.inputs, position=ctx.targets)
    r = rel.matrix(rel.output, rel.input)
    eye = torch.diag_embed(ctx.mask.to(r.dtype))  # R starts from I on the real tokens: a token's own 1 is no relevance
    return {"matrix": r - eye, "token_scores": rel.scores, "target_value": rel.target}


@method("relevance-lrp", "LRP relevance (Chefer 2021, P111): C = Π (I + E_h[(∇A ⊙ R^(A))^+]) with R^(A) the LRP "
        "relevance of each attention map; also the LRP relevance reaching each input token",
        lambda s: 12 * s.forward + 2 * s.products + 3 * s.maps / RATES["maps"])
def _relevance_lrp(ctx: Context) -> dict[str, Any]:
    rel = lrp_relevance(ctx.model, ctx.inputs, position=ctx.targets)
    r = rel.matrix(rel.output, rel.input)
    eye = torch.diag_embed(ctx.mask.to(r.dtype))
    return {"matrix": r - eye, "token_scores": rel.scores, "input_relevance": rel.input_relevance,
            "attention_relevance": torch.stack(rel.attention_relevance or []), "target_value": rel.target}


@method("head-statistics", "per layer and head: " + ", ".join(HEAD_STATISTICS),
        lambda s: 2 * s.maps / RATES["maps"], covers=HEAD_STATISTICS)
def _head_statistics(ctx: Context) -> dict[str, Any]:
    return {
        "stats": head_statistics(ctx.att),  # catalogue name -> (layers, batch, heads)
        "descriptions": {name: get(name, "analysis").summary for name in HEAD_STATISTICS},
    }


@method("sink-scores", "attention sinks: mean attention each key receives, sink tokens (> 5/N)",
        lambda s: 2 * s.maps / RATES["maps"], covers=("sink-tokens",))
def _sink_scores(ctx: Context) -> dict[str, Any]:
    scores = sink_scores(ctx.att)  # (layers, batch, heads, n)
    is_sink = sink_tokens(ctx.att)  # bool, same shape
    layers, batch, heads, n = scores.shape
    table = []
    for b in range(batch):
        count = is_sink[:, b].sum((0, 1))  # (n,) heads in which key j is a sink
        for j in count.nonzero().flatten().tolist():
            where = is_sink[:, b, :, j]
            table.append({
                "text": b,
                "token": j,
                "heads": int(count[j]),
                "share_of_heads": float(count[j]) / (layers * heads),
                "mean_score": float(scores[:, b, :, j][where].mean()),
                "layer_heads": [[int(l_), int(h)] for l_, h in where.nonzero().tolist()],
            })
    table.sort(key=lambda row: (row["text"], -row["heads"], row["token"]))
    return {
        "scores": scores,
        "is_sink": is_sink,
        "token_scores": ctx.zero_padding(scores.mean((0, 2))),  # mean over layers and heads: (batch, n)
        "table": table,
    }


@method("qk-embedding", "AttentionViz: queries and keys of each head, keys translated and q/k scaled, "
        "embedded jointly over all texts with PCA",
        lambda s: s.forward + s.layers * s.heads * 2 * s.batch * s.n * 64 * 64 / RATES["matmul"] + s.maps / RATES["maps"],
        capture_qk=True)
def _qk_embedding(ctx: Context) -> dict[str, Any]:
    heads = []
    for layer in range(len(ctx.att.records)):
        row = []
        for head in range(ctx.att.records[layer].weights.shape[1]):
            e = qk_embedding(ctx.att, layer, head, method="pca", tokenizer=ctx.tokenizer)
            x, y = e.coords.T.tolist()
            row.append({"x": x, "y": y, "kind": e.kind, "sequence": e.sequence, "position": e.position, "scale": e.scale})
        heads.append(row)
    return {"method": "pca", "heads": heads}


def _attention_inputs(ctx: Context) -> list[Tensor] | None:
    """The hidden states (batch, n, dim) each captured attention layer reads (its first input), in the capture's
    order, from one more forward pass; None when a layer's module is not found (maps taken from the model's outputs)
    or its input is not (batch, n, dim) over the tokens."""
    try:
        modules = [ctx.model.get_submodule(name) for name in ctx.att.names]
    except AttributeError:
        return None
    seen: dict[int, list[Any]] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault(id(module), []).append(args[0] if args else kwargs.get("hidden_states", kwargs.get("x")))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in dict.fromkeys(modules)]
    try:
        with torch.no_grad():
            ctx.model(**ctx.inputs) if isinstance(ctx.inputs, Mapping) else ctx.model(ctx.inputs)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for module in modules:
        calls = seen.get(id(module), [])
        x = calls.pop(0) if calls else None
        if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != tuple(ctx.mask.shape):
            return None
        out.append(x)
    return out


@method("layer-similarity", "linear CKA between every pair of layers, per text: of the hidden states each attention "
        "layer reads, or of the attention representations when those are not at hand (P025)",
        lambda s: s.forward + (s.layers * s.batch * s.n**2 * 64 * s.heads + s.layers**2 * s.batch * s.n**2)
        / RATES["matmul"] + s.maps / RATES["maps"])
def _layer_similarity(ctx: Context) -> dict[str, Any]:
    inputs = _attention_inputs(ctx)
    matrices = []
    for b, keep in enumerate(ctx.mask):
        if inputs is not None:
            matrices.append(layer_similarity([x[b][keep.to(x.device)] for x in inputs], "cka"))
        else:
            matrices.append(layer_similarity([a[b : b + 1] for a in ctx.att.layers], "cka", attention_mask=keep[None]))
    source = ("hidden states: the input of each attention layer" if inputs is not None else
              "attention representations: each visible (query, key) pair a sample, each head a neuron")
    return {"measure": "linear CKA", "source": source, "cka": torch.stack(matrices)}  # (batch, layers, layers)


@method("head-classes", "local / hybrid / global pattern of each head from its query-key NMI (P137 UNIP)",
        lambda s: s.maps / RATES["maps"])
def _head_classes(ctx: Context) -> dict[str, Any]:
    hc = head_classes(ctx.att)
    layer_nmi = hc.nmi.mean(-1)  # (layers, batch)
    return {
        "nmi": hc.nmi,  # (layers, batch, heads)
        "classes": hc.labels(),  # (layers, batch, heads) "global" / "hybrid" / "local"
        "layer_nmi": layer_nmi,
        "hybrid_layer": (layer_nmi - HYBRID_TARGET).abs().argmin(0).tolist(),  # per text: NMI-HAD's teacher layer
        "global_below": hc.global_below, "local_above": hc.local_above, "hybrid_target": HYBRID_TARGET,
    }


def _token_ids(ctx: Context) -> Tensor:
    """The token ids (batch, n) of the explained call."""
    ids = ctx.att.tokens if ctx.att.tokens is not None else (
        ctx.inputs.get("input_ids") if isinstance(ctx.inputs, Mapping) else ctx.inputs)
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("tokens: expected the model to be called with token ids, got inputs without them")
    return ids


@method("attention-patterns", "the human-readable pattern each head follows best: matching token, same sentence, "
        "neighbours, previous, next or first token (P156)",
        lambda s: 12 * s.maps / RATES["maps"])
def _attention_patterns(ctx: Context) -> dict[str, Any]:
    ids, ends = _token_ids(ctx), sentence_end_ids(ctx.tokenizer) if ctx.tokenizer is not None else set()
    texts = [pattern_scores([a[b : b + 1] for a in ctx.att.layers], ids[b : b + 1].cpu(),
                            attention_mask=ctx.mask[b : b + 1], sentence_ends=ends, causal=ctx.causal)
             for b in range(ctx.mask.shape[0])]
    return {  # best, best_similarity, best_match: (batch, layers, heads)
        "patterns": texts[0]["patterns"],
        "best": [t["best"] for t in texts],
        "best_similarity": [t["best_similarity"] for t in texts],
        "best_match": [t["best_match"] for t in texts],
        "sentence_ends": sorted(ends),
    }


@method("qk-decomposition", "each head's score as a sum of singular terms of W_Q W_Kᵀ: how many terms carry 90% of "
        "the score of its strongest query–key pairs (P190)",
        lambda s: 2 * s.forward + s.layers * s.heads * s.batch * s.n**2 * 64 * 4 / RATES["matmul"] + s.maps / RATES["maps"])
def _qk_decomposition(ctx: Context) -> dict[str, Any]:
    summary = score_decomposition_summary(ctx.model, ctx.inputs)
    batch = ctx.mask.shape[0]
    by_text = [[[0.0] * len(layer["heads"]) for layer in summary["layers"]] for _ in range(batch)]
    for l_, layer in enumerate(summary["layers"]):
        for h, head in enumerate(layer["heads"]):
            for b in range(batch):
                needed = [p["terms_needed"] for p in head["pairs"] if p["text"] == b]
                by_text[b][l_][h] = sum(needed) / max(1, len(needed))
    return {**summary, "terms_needed_by_text": by_text}  # (batch, layers, heads): mean over the text's top pairs


DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)  # methods=None: every one, in this order


# -- the explanation ----------------------------------------------------------------------------
@dataclass
class Explanation:
    """Everything `explain` computed, as plain data (lists, floats, strings); `to_dict()` for JSON."""

    model: str
    texts: list[str]
    tokens: list[list[str]]  # (batch, n) token strings, padded positions included (see mask)
    mask: list[list[bool]]  # (batch, n) True = real token
    layer_names: list[str]
    heads: int
    causal: bool
    targets: list[int]  # per text: the token whose explanation colours the tokens
    attention: list[Any]  # (layers, batch, heads, n, n): the captured probabilities, padding 0
    methods: dict[str, dict[str, Any]]
    method_info: dict[str, dict[str, Any]]  # name -> {"papers": [...], "summary": ...}
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of loading, capture, each method
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it does not apply (methods=None only)
    vocabulary: list[str] = field(default_factory=list)  # token id -> string when ids were built from `tokens`
    notes: list[str] = field(default_factory=list)  # what the limits cut: truncation, downsampling, maps left out
    estimates: dict[str, float] = field(default_factory=dict)  # method -> estimated seconds (estimate_seconds)

    @property
    def layers(self) -> int:
        return len(self.layer_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plain(value: Any) -> Any:
    """Tensors, numpy arrays, tuples and dicts as nested lists / dicts of Python numbers."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return value.tolist() if value.dtype == torch.bool else value.to(torch.float64).tolist()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def resolve_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """Method names (the catalogue's) from a sequence or a comma-separated string; ParameterError names an unknown one,
    with the new name of a name explain used before (`RENAMED`) or the close matches."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [m for m in names if m]
    if not names:
        raise ParameterError(f"methods: expected at least one of {', '.join(METHODS)}, got none")
    for name in names:
        if name not in METHODS:
            raise _unknown_method("methods", name)
    return tuple(dict.fromkeys(names))


def _unknown_method(argument: str, name: str) -> ParameterError:
    if name in RENAMED:
        hint = f"; did you mean {RENAMED[name]!r}? (explain's methods are named as in the catalogue, `attnlab list`)"
    else:
        close = difflib.get_close_matches(name, list(METHODS), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ParameterError(f"{argument}: expected one of {', '.join(METHODS)}, got {name!r}{hint}")


def load_model(model: str | os.PathLike[str]) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, label) for "minilm" or a local Hugging Face model directory (offline)."""
    if str(model) == MINILM:
        from .models import load_minilm

        m, tok = load_minilm()
        return m, tok, MINILM
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model: no directory {str(model)!r}; expected {MINILM!r} or a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {str(model)!r} has no config.json; expected {MINILM!r} or a local Hugging Face model directory")
    check_no_remote_code(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    m = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False, attn_implementation="eager")
    return m.eval(), tok, str(path)


REMOTE_CODE_FILES: tuple[str, ...] = ("config.json", "tokenizer_config.json", "processor_config.json",
                                      "preprocessor_config.json")


def check_no_remote_code(path: str | os.PathLike[str]) -> None:
    """ValueError when the model directory asks to run its own code (`auto_map` in a config file).

    attnlab never runs a model directory's code: models load with trust_remote_code=False, and a
    directory whose config maps an Auto class to its own module is refused before transformers reads it.
    """
    for name in REMOTE_CODE_FILES:
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"model: expected {file} to be JSON, got {type(err).__name__}: {err}") from None
        if isinstance(config, dict) and "auto_map" in config:
            raise ValueError(
                f"model: {file} has an auto_map (code shipped in the model directory); attnlab does not run a "
                "model's own code (trust_remote_code=False): use a model transformers implements"
            )


def estimate_seconds(method: str, *, layers: int, heads: int, batch: int, n: int, params: int = 0,
                     rows: int | None = None) -> float:
    """Estimated seconds of `method` on one core for a capture of `layers` maps of `heads` heads over a batch of
    `batch` sequences of `n` tokens, a model of `params` parameters; rows: output tokens attention-flow computes
    (None = all n). Each method's `cost` with the rates in `RATES`; meant to be within a few times of the real cost."""
    if method not in METHODS:
        raise _unknown_method("method", method)
    for name, value in (("layers", layers), ("heads", heads), ("batch", batch), ("n", n), ("params", params)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return METHODS[method].cost(Shape(layers, heads, batch, n, params, rows))


def model_max_tokens(model: nn.Module, tokenizer: Any = None) -> tuple[int, str] | None:
    """(largest number of tokens the model takes, where that limit comes from), or None when nothing says."""
    found: list[tuple[int, str]] = []
    config = getattr(model, "config", None)
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append((value, f"config.{name}"))
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:  # transformers puts a huge number when the tokenizer has none
        found.append((value, "tokenizer.model_max_length"))
    return min(found) if found else None


def _note(notes: list[str], message: str, quiet: bool) -> None:
    notes.append(message)
    warnings.warn(f"explain: {message}", UserWarning, stacklevel=4)
    _say(message, quiet)


def _is_causal(att: Attentions, mask: Tensor) -> bool:
    """True when no real query attends to a later real key in any layer."""
    for a in att.layers:
        n_q, n_k = a.shape[-2:]
        later = torch.ones(n_q, n_k, dtype=torch.bool, device=a.device).triu(n_k - n_q + 1)
        if (a.detach().abs() * later).sum() > 0:
            return False
    return True


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"explain: {message}", file=sys.stderr, flush=True)


def explain(
    texts: Sequence[str] | str | None = None,
    model: str | os.PathLike[str] | nn.Module = MINILM,
    *,
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    inputs: Tensor | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    methods: Sequence[str] | str | None = None,
    quiet: bool = True,
    threads: int | None = 1,
    max_tokens: int | None = None,
    budget: float | None = BUDGET,
    max_map_values: int = MAX_MAP_VALUES,
) -> Explanation:
    """Run `methods` on `texts` (one padded batch) through `model` and return all their numbers.

    model: "minilm" (the packaged MiniLM encoder), a local Hugging Face model directory
    (AutoModel + AutoTokenizer, local_files_only, never the directory's own code), or a loaded
    transformers model together with its `tokenizer`. Or, instead of texts, any nn.Module holding
    attnlab mechanisms with `tokens` (one list of token strings per sequence, or one list) and
    optionally its `inputs` (module docstring). methods: names or "a,b"; None = every method that
    applies (the others in `skipped`). quiet=False reports progress on stderr. threads: torch
    threads while it runs (restored after; None = leave as is). The default 1 is the fastest for a
    few sentences: the matrices are small, and on a busy machine the hand-offs between threads
    cost far more than they save (MiniLM, one sentence, all methods: 0.4 s with 1 thread against
    8 s with 2 here). max_tokens, budget (seconds per method, None = no limit), max_map_values: the
    limits of the module docstring; what they cut is in `Explanation.notes`.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected a positive number of torch threads or None, got {threads!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens: expected a positive int or None, got {max_tokens!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"budget: expected a positive finite number of seconds or None, got {budget!r}")
    if isinstance(max_map_values, bool) or not isinstance(max_map_values, int) or max_map_values < 0:
        raise ValueError(f"max_map_values: expected a non-negative int, got {max_map_values!r}")
    limits = Limits(max_tokens, None if budget is None else float(budget), max_map_values)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if tokens is not None or inputs is not None:
            if texts is not None:
                raise ValueError("texts: expected texts or tokens=, not both")
            return _explain_tokens(model, tokens, inputs, tokenizer, methods, quiet, limits)
        return _explain(texts, model, tokenizer, methods, quiet, limits)
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Limits:
    """The limits of `explain` (module docstring)."""

    max_tokens: int | None = None
    budget: float | None = BUDGET
    max_map_values: int = MAX_MAP_VALUES


class _TokenIds(nn.Module):
    """The user's model called as model(ids) or, for a padded batch, model(ids, attention_mask=mask)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        if attention_mask is None:
            return self.model(input_ids)
        return self.model(input_ids, attention_mask=attention_mask)


def _token_lists(tokens: Any) -> list[list[str]]:
    """One list of strings per sequence, from a list of strings or a list of such lists."""
    if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens):
        tokens = [tokens]
    ok = isinstance(tokens, (list, tuple)) and tokens and all(
        isinstance(seq, (list, tuple)) and seq and all(isinstance(t, str) for t in seq) for seq in tokens
    )
    if not ok:
        raise TypeError(
            f"tokens: expected a non-empty list of token strings, or a list of such lists, got {tokens!r:.200}"
        )
    return [list(seq) for seq in tokens]


def token_vocabulary(tokens: Sequence[str] | Sequence[Sequence[str]]) -> list[str]:
    """id -> string of the ids `explain(tokens=...)` builds: 0 is padding ("<pad>"), then each distinct
    string in order of first appearance, a string "<pad>" included (an embedding needs len(...) rows)."""
    return ["<pad>", *dict.fromkeys(t for seq in _token_lists(tokens) for t in seq)]


def _takes_attention_mask(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters.values()
    return any(p.name == "attention_mask" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _explain_tokens(model: Any, tokens: Any, inputs: Tensor | Mapping[str, Any] | None, tokenizer: Any,
                    methods: Sequence[str] | str | None, quiet: bool, limits: Limits) -> Explanation:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: tokens= needs a torch.nn.Module holding attnlab mechanisms, got {model!r:.100}")
    if tokenizer is not None:
        raise ValueError("tokenizer: tokens= are token strings already; pass no tokenizer")
    if tokens is None:
        raise ValueError("tokens: inputs= needs the token strings of its positions (tokens=...)")
    seqs = _token_lists(tokens)
    notes: list[str] = []
    if inputs is None and limits.max_tokens is not None:
        for b, seq in enumerate(seqs):
            if len(seq) > limits.max_tokens:
                _note(notes, f"sequence {b + 1}: {len(seq)} tokens, truncated to max_tokens={limits.max_tokens}", quiet)
        seqs = [seq[: limits.max_tokens] for seq in seqs]
    vocabulary = token_vocabulary(seqs)
    index = {t: i for i, t in enumerate(vocabulary)}
    n = max(map(len, seqs))
    mask = torch.tensor([[i < len(seq) for i in range(n)] for seq in seqs])
    given = inputs
    if inputs is None:
        ids = torch.tensor([[index[t] for t in seq] + [0] * (n - len(seq)) for seq in seqs])
        padded = not bool(mask.all())
        if padded and not _takes_attention_mask(model):
            raise ValueError(
                f"model: the token lists have different lengths ({sorted({len(s) for s in seqs})}), so the batch is "
                f"padded and {type(model).__name__}.forward must take attention_mask (bool (batch, n), True = real token)"
            )
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        run_model: nn.Module = _TokenIds(model)
        run_inputs: Mapping[str, Any] | Tensor = {"input_ids": ids.to(device), **({"attention_mask": mask.to(device)} if padded else {})}
    elif isinstance(inputs, (Tensor, Mapping)):
        run_model, run_inputs = model, inputs
    else:
        raise TypeError(f"inputs: expected a tensor or a mapping of keyword inputs, got {type(inputs).__name__}")
    label = type(model).__name__
    seconds: dict[str, float] = {}
    names, skipped, att, seconds["capture"] = _capture(run_model, run_inputs, methods, label, quiet)
    seen = att.attention_mask.cpu()
    if given is None:
        keys = [r.key_mask.cpu() for r in att.records if r.key_mask.shape == mask.shape]
        if not all(torch.equal(k, mask) for k in keys):
            raise ValueError(
                f"model: {label} was given attention_mask but its attention still sees the padded keys; "
                "hand the mask on to its attention modules"
            )
    else:
        counts = seen.sum(-1).tolist()
        if len(seqs) != seen.shape[0] or counts != [len(seq) for seq in seqs]:
            raise ValueError(
                f"tokens: expected one list per sequence with one string per real token, {counts} real tokens in "
                f"{seen.shape[0]} sequence(s) of the inputs, got lists of {[len(seq) for seq in seqs]}"
            )
        mask, n = seen, seen.shape[1]
    strings = []
    for b, seq in enumerate(seqs):
        row, it = [""] * n, iter(seq)
        for i in mask[b].nonzero().flatten().tolist():
            row[i] = next(it)
        strings.append(row)
    if att.tokens is None:  # token identity for the head statistics: the vocabulary ids of the strings
        att.tokens = torch.tensor([[index[t] if m else 0 for t, m in zip(row, keep)] for row, keep in zip(strings, mask.tolist())])
    ex = _run_methods(Context(run_model, None, run_inputs, att, mask, [], False), names, skipped, methods is None,
                      seconds, quiet, limits, notes)
    prefix = "model." if given is None else ""
    ex.layer_names = [name.removeprefix(prefix) for name in ex.layer_names]
    return replace(ex, model=label, texts=[" ".join(seq) for seq in seqs], tokens=strings,
                   vocabulary=vocabulary if given is None else [])


def _capture(model: nn.Module, inputs: Mapping[str, Any] | Tensor, methods: Sequence[str] | str | None, label: str,
             quiet: bool) -> tuple[tuple[str, ...], dict[str, str], Attentions, float]:
    """Run the model once under capture: (methods to run, skipped methods with reasons, the capture, seconds)."""
    names = resolve_methods(DEFAULT_METHODS if methods is None else methods)
    skipped: dict[str, str] = {}
    qk = any(METHODS[n].capture_qk for n in names)
    t0 = time.perf_counter()
    try:
        att = _call(model, inputs, qk)
    except TypeError as err:
        if not qk or methods is not None or not str(err).startswith("qk:"):
            raise
        skipped.update({n: str(err) for n in names if METHODS[n].capture_qk})
        names = tuple(n for n in names if n not in skipped)
        att = _call(model, inputs, False)
    seconds = time.perf_counter() - t0
    if not att.records:
        raise ValueError(f"model: {label} made no attention call on the inputs; nothing to explain")
    if att.skipped:
        raise ValueError(
            f"model: {label} has attention calls whose token × token matrix cannot be captured (no materialize, or maps "
            f"that are not (batch, heads, n_q, n_k)): "
            f"{', '.join(att.skipped)}; every attention layer must be captured to explain the model"
        )
    return names, skipped, att, seconds


def _call(model: nn.Module, inputs: Mapping[str, Any] | Tensor, qk: bool) -> Attentions:
    with torch.no_grad(), capture(model, qk=qk) as att:
        model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return att


def _explain(texts: Sequence[str] | str | None, model: str | os.PathLike[str] | nn.Module, tokenizer: Any,
             methods: Sequence[str] | str | None, quiet: bool, limits: Limits) -> Explanation:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts or [])
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts: expected one or more strings (or tokens= for a model of attnlab mechanisms), got {texts!r}")
    resolve_methods(DEFAULT_METHODS if methods is None else methods)  # an unknown name fails before loading
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise TypeError("tokenizer: a model given as an nn.Module needs its tokenizer (tokenizer=...), "
                            "or token strings (tokens=...) for a model of attnlab mechanisms")
        label = type(model).__name__
    else:
        _say(f"loading {model} …", quiet)
        model, tokenizer, label = load_model(model)
        seconds["load"] = time.perf_counter() - start
        _say(f"loaded {label} in {seconds['load']:.1f} s", quiet)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    notes: list[str] = []
    inputs = dict(_tokenize(texts, model, tokenizer, limits.max_tokens, notes, quiet))
    names, skipped, att, seconds["capture"] = _capture(model, inputs, methods, label, quiet)
    mask = inputs["attention_mask"].to(torch.bool)
    ex = _run_methods(Context(model, tokenizer, inputs, att, mask, [], False), names, skipped, methods is None,
                      seconds, quiet, limits, notes)
    return replace(ex, model=label, texts=texts,
                   tokens=[tokenizer.convert_ids_to_tokens(row.tolist()) for row in inputs["input_ids"]])


def _tokenize(texts: list[str], model: nn.Module, tokenizer: Any, max_tokens: int | None, notes: list[str],
              quiet: bool) -> Mapping[str, Any]:
    """The padded batch of `texts`, each truncated to the model's maximum (or max_tokens) with a note."""
    limit = model_max_tokens(model, tokenizer)
    if max_tokens is not None and (limit is None or max_tokens < limit[0]):
        limit = (max_tokens, "max_tokens")
    if limit is None:
        return tokenizer(texts, return_tensors="pt", padding=True)
    cap, source = limit
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    for t, length in enumerate(lengths):
        if length > cap:
            _note(notes, f"text {t + 1}: {length} tokens, truncated to {cap} (the model's maximum, {source})"
                  if source != "max_tokens" else f"text {t + 1}: {length} tokens, truncated to max_tokens={cap}", quiet)
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=cap)


def _plan(ctx: Context, names: tuple[str, ...], skipped: dict[str, str], defaulted: bool, limits: Limits,
          notes: list[str], quiet: bool) -> tuple[tuple[str, ...], Context, dict[str, float]]:
    """The methods that fit the budget (attention-flow downsampled to the target rows if that fits), the context, the estimates."""
    batch, n = ctx.mask.shape
    shape = {"layers": len(ctx.att.records), "heads": ctx.att.num_heads, "batch": batch, "n": n,
             "params": sum(p.numel() for p in ctx.model.parameters())}
    estimates = {name: estimate_seconds(name, **shape) for name in names}
    if limits.budget is None:
        return names, ctx, estimates
    kept = []
    for name in names:
        if estimates[name] <= limits.budget:
            kept.append(name)
            continue
        if name == "attention-flow":
            rows = estimate_seconds(name, **shape, rows=1)
            if rows <= limits.budget:
                ctx = replace(ctx, flow_rows=sorted(set(ctx.targets)))
                _note(notes, f"{name}: all {n} output tokens would take ~{estimates[name]:.0f} s (budget {limits.budget:g} s): "
                      f"computed for the target token of each text only (~{rows:.1g} s); other matrix rows are 0", quiet)
                estimates[name] = rows
                kept.append(name)
                continue
        why = (f"{name}: estimated ~{estimates[name]:.0f} s on {batch} × {n} tokens, over the budget of {limits.budget:g} s; "
               "shorten the texts or raise budget= (attnlab explain --budget)")
        if not defaulted:
            raise ValueError(why)
        skipped[name] = why
        _note(notes, why, quiet)
    return tuple(kept), ctx, estimates


def _run_methods(ctx: Context, names: tuple[str, ...], skipped: dict[str, str], defaulted: bool,
                 seconds: dict[str, float], quiet: bool, limits: Limits, notes: list[str]) -> Explanation:
    """Run each method on the capture (ctx: targets and causal are set here) within the limits; the
    Explanation without the model's label, the texts and the token strings. defaulted: a method that
    raises ValueError or TypeError, or does not fit the budget, is skipped with its reason instead of failing."""
    att, mask = ctx.att, ctx.mask.cpu()
    causal = _is_causal(att, mask)
    positions = torch.arange(mask.shape[1])
    targets = [int(positions[m].max() if causal else positions[m].min()) for m in mask]
    ctx = replace(ctx, mask=mask, targets=targets, causal=causal)
    n_layers, n_heads = len(att.records), att.num_heads
    _say(f"captured {n_layers} layers × {n_heads} heads on {mask.shape[0]} sequence(s) of ≤ {mask.shape[1]} tokens", quiet)
    names, ctx, estimates = _plan(ctx, names, skipped, defaulted, limits, notes, quiet)
    map_values = n_layers * mask.shape[0] * n_heads * mask.shape[1] ** 2
    keep_maps = map_values <= limits.max_map_values
    if not keep_maps:
        _note(notes, f"per-head maps not kept: {n_layers} layers × {mask.shape[0]} texts × {n_heads} heads × "
              f"{mask.shape[1]}² tokens = {map_values:,} numbers > max_map_values={limits.max_map_values:,}", quiet)
    seconds = dict(seconds)
    results: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names, 1):
        _say(f"[{i}/{len(names)}] {name} …", quiet)
        t0 = time.perf_counter()
        try:
            data = METHODS[name].run(ctx)
            if not keep_maps:
                data.pop("attention_relevance", None)
            results[name] = plain(data)
        except (ValueError, TypeError) as err:
            if not defaulted:
                raise
            skipped[name] = f"{type(err).__name__}: {err}"
            _say(f"[{i}/{len(names)}] {name} does not apply: {err}", quiet)
            continue
        seconds[name] = time.perf_counter() - t0
        _say(f"[{i}/{len(names)}] {name} done in {seconds[name]:.1f} s", quiet)
    skipped = {n: skipped[n] for n in DEFAULT_METHODS if n in skipped}
    ran = [n for n in names if n in results]
    return Explanation(
        model="",
        texts=[],
        tokens=[],
        mask=mask.tolist(),
        layer_names=att.names,
        heads=n_heads,
        causal=causal,
        targets=targets,
        attention=plain(att.stack()) if keep_maps else [],
        methods=results,
        method_info={n: {"papers": list(METHODS[n].papers), "summary": METHODS[n].summary} for n in ran},
        seconds=seconds,
        skipped=skipped,
        notes=notes,
        estimates={n: estimates[n] for n in ran},
    )
