"""Head relevance vectors of cross-attention heads and ordered weakening (P077, Park et al. 2024).

Which cross-attention heads of a text-to-image model serve which visual concept? During ordinary generations (any
prompts, every denoising step), every cross-attention call is probed with a second context: one word of each
concept, drawn at random at each call, concatenated (the concept-word context). Its attention map (the module's
own queries — the image tokens of that generation — against the concept words' keys) is averaged over the image
queries and, per concept, over that word's tokens; the head "votes" for the concept with the highest mean:

    a_h(c) = mean_{tokens j of c's word} mean_{image queries i} A_h[i, j]      (one call, one head h)
    N_h(c) = #{calls (prompts × steps × batch) with argmax_c' a_h(c') = c}
    p_h(c) = N_h(c) / Σ_c' N_h(c')                       (normalised per head over concepts)
    HRV_c[h] = H · p_h(c) / Σ_h' p_h'(c)                (normalised per concept over the H heads; mean 1)

as the official code (SNU-DRL/HRV, head_relevance_calculation.py and extract_head_relevance_vectors.ipynb) does it.
Deviation: the official context also holds CLIP's start token before the first word (it takes part in the softmax,
not in the means); attnlab's probe context holds the concept words only. The probe reads the map through
`capture` on the cross-attention module (`materialize`), so every registered mechanism with cross-attention and
`materialize` serves; the generation itself runs unchanged (the probe's output is thrown away).

Ordered weakening (the paper's "ordered weakening analysis"): the heads are weakened one after another in decreasing
HRV_c order (most relevant first; "reverse" = least relevant first, "random" = a seeded order) and a concept score
is measured after each count. Weakening a head multiplies its cross-attention weights on the prompt's words by
`factor` (−2, the official default) — A'[:, h, :, j] = factor·A[:, h, :, j] for the context tokens j chosen — and the
layer's output becomes out + path(A') − path(A), with path(A) = W_o·merge_heads(A v) (the module's
`attention_path`), exactly the output computed with A' for a mechanism whose output is A v (checked by the
conformance suite for every mechanism that has `attention_path`).

    from attnlab.analysis.cross_attention_heads import head_relevance_vectors, ordered_weakening
    rel = head_relevance_vectors(model, lambda: generate(model, prompts), words)   # words[c] = embeddings of c's words
    rel.vectors          # (concepts, heads): HRV_c over all cross-attention heads (module name, head) = rel.heads[i]
    rel.order(c)         # the heads by decreasing HRV_c
    scores = ordered_weakening(model, rel, c, score=lambda: presence_of_c(), counts=range(0, 13))

MiniLM has no cross-attention, so there is no MiniLM version. Given maps already captured with the concept words
as the keys (any capture: attnlab or transformers cross-attention), `head_relevance_from_maps` does the counting.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import check_choice, check_int
from .capture import Attentions, capture

P077 = Paper("P077", "Cross-Attention Head Position Patterns Can Align with Human Visual Concepts in Text-to-Image "
             "Generative Models", 2024, "2412.02237")
ORDERS = ("hrv", "reverse", "random")

Head = tuple[str, int]  # (module name in the model, head index)


@dataclass
class HeadRelevance:
    """HRVs of every cross-attention head: `vectors` (concepts, heads), column i is head `heads[i]`."""

    vectors: Tensor  # (concepts, heads) float64, each non-empty row sums to the number of heads
    counts: Tensor  # (heads, concepts) float64: N_h(c), the votes
    heads: list[Head]

    def order(self, concept: int) -> list[Head]:
        """The heads by decreasing HRV_concept (ties: in `heads` order)."""
        c = check_int("concept", concept, 0, self.vectors.shape[0] - 1)
        ranks = torch.sort(-self.vectors[c], stable=True).indices
        return [self.heads[int(i)] for i in ranks]


def _is_mechanism(module: nn.Module) -> bool:
    spec = getattr(module, "spec", None)
    return isinstance(spec, Spec) and spec.kind == "mechanism"


def _cross_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost attnlab mechanisms of `model`, with their names."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _is_mechanism(module) and not any(name.startswith(outer + ".") or outer == "" for outer, _ in found):
            found.append((name, module))
    return found


def concept_votes(maps: Tensor, spans: Sequence[tuple[int, int]]) -> Tensor:
    """(batch, heads) index of the concept each head attends to most in one call: maps (batch, heads, n_q, n_k) whose
    keys are concept words, word c at key positions spans[c] = (start, end); mean over queries, then over the span."""
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        raise ShapeError(f"maps: expected (batch, heads, n_q, n_k), got {getattr(maps, 'shape', type(maps).__name__)}")
    n_k = maps.shape[-1]
    if not spans or any(not (0 <= a < b <= n_k) for a, b in spans):
        raise ValueError(f"spans: expected non-empty (start, end) key ranges inside [0, {n_k}], got {list(spans)!r}")
    per_key = maps.to(torch.float64).mean(2)  # (batch, heads, n_k)
    per_concept = torch.stack([per_key[..., a:b].mean(-1) for a, b in spans], -1)
    return per_concept.argmax(-1)


def relevance_from_counts(counts: Tensor) -> Tensor:
    """HRV (concepts, heads) from the votes N (heads, concepts): p = N / Σ_c N, HRV_c = H·p(c) / Σ_h p_h(c); a head
    with no votes has p = 0, a concept no head votes for has HRV 0."""
    if counts.dim() != 2:
        raise ShapeError(f"counts: expected (heads, concepts), got {tuple(counts.shape)}")
    counts = counts.to(torch.float64)
    total = counts.sum(-1, keepdim=True)
    p = counts / torch.where(total > 0, total, 1.0)
    mass = p.sum(0, keepdim=True)
    return (p / torch.where(mass > 0, mass, 1.0) * counts.shape[0]).T.contiguous()


class _Votes:
    """N_h(c) accumulated per (module name, head), heads in order of first appearance."""

    def __init__(self, concepts: int) -> None:
        self.concepts = concepts
        self.by_module: dict[str, Tensor] = {}

    def add(self, name: str, votes: Tensor) -> None:
        onehot = nn.functional.one_hot(votes.cpu(), self.concepts).to(torch.float64).sum(0)  # (heads, concepts)
        if name in self.by_module and self.by_module[name].shape != onehot.shape:
            raise ValueError(f"maps: module {name!r} had {self.by_module[name].shape[0]} heads, now {onehot.shape[0]}")
        self.by_module[name] = self.by_module.get(name, torch.zeros_like(onehot)) + onehot

    def result(self) -> HeadRelevance:
        if not self.by_module:
            raise ValueError("model: no cross-attention call was probed (an attnlab mechanism called with context=)")
        heads = [(name, h) for name, c in self.by_module.items() for h in range(c.shape[0])]
        counts = torch.cat(list(self.by_module.values()))
        return HeadRelevance(relevance_from_counts(counts), counts, heads)


def head_relevance_from_maps(calls: Attentions | Iterable[tuple[str, Tensor]], spans: Sequence[tuple[int, int]]
                             ) -> HeadRelevance:
    """HRVs from maps whose keys are concept words (word c at key positions spans[c]): a capture (records named by
    module) or (name, maps (batch, heads, n_q, n_k)) pairs; calls of one name are one layer (prompts × steps)."""
    pairs = ((r.name, r.masked(r.weights)) for r in calls.records) if isinstance(calls, Attentions) else calls
    votes = _Votes(len(spans))
    for name, maps in pairs:
        votes.add(name, concept_votes(maps, spans))
    return votes.result()


def _check_words(words: object) -> list[list[Tensor]]:
    if not isinstance(words, Sequence) or len(words) < 2:
        raise TypeError(f"words: expected a list (one per concept, >= 2 concepts) of lists of word embeddings, got {words!r}")
    out = []
    for c, group in enumerate(words):
        if not isinstance(group, Sequence) or not group or not all(isinstance(w, Tensor) for w in group):
            raise TypeError(f"words: expected concept {c} as a non-empty list of tensors (tokens, dim), got {group!r}")
        out.append([w[None] if w.dim() == 1 else w for w in group])
        for w in out[-1]:
            if w.dim() != 2 or w.shape[-1] != out[0][0].shape[-1] or w.shape[0] < 1:
                raise ShapeError(f"words: expected each word as (tokens, dim) with one dim, got {tuple(w.shape)} in concept {c}")
    return out


def head_relevance_vectors(model: nn.Module, run: Callable[[], Any], words: Sequence[Sequence[Tensor]], *,
                           generator: torch.Generator | None = None) -> HeadRelevance:
    """P077: HRVs of every cross-attention head of `model` over the generations `run()` makes.

    words[c]: the words of concept c, each its context embeddings (tokens, dim) (or (dim,) for one token), in the
    space the cross-attention modules take as `context`. Every attnlab mechanism of `model` called with `context=`
    during `run()` is probed once per call with one word of each concept (drawn with `generator`), through `capture`.
    """
    groups = _check_words(words)
    if not callable(run):
        raise TypeError(f"run: expected a callable that runs the model's generations, got {type(run).__name__}")
    modules = _cross_modules(model)
    if not modules:
        raise ValueError(f"model: expected attnlab attention modules (cross-attention), found none in {type(model).__name__}")
    votes = _Votes(len(groups))
    probing = [False]

    def probe(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
            if probing[0] or kwargs.get("context") is None:
                return
            x = args[0] if args else kwargs["x"]
            picks = [group[int(torch.randint(len(group), (1,), generator=generator))] for group in groups]
            spans, start = [], 0
            for w in picks:
                spans.append((start, start + w.shape[0]))
                start += w.shape[0]
            batch = x.shape[0] if getattr(module, "batch_first", True) else x.shape[1]
            ctx = torch.cat(picks).to(device=x.device, dtype=x.dtype)[None].expand(batch, -1, -1)
            if not getattr(module, "batch_first", True):
                ctx = ctx.transpose(0, 1)
            probing[0] = True
            try:
                with torch.no_grad(), capture(module) as att:
                    module(x, context=ctx)
            finally:
                probing[0] = False
            votes.add(name, concept_votes(att.layers[0], spans))

        return hook

    handles = [m.register_forward_hook(probe(name), with_kwargs=True) for name, m in modules]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return votes.result()


@contextmanager
def weakened_heads(model: nn.Module, heads: Iterable[Head], *, factor: float = -2.0,
                   tokens: Tensor | None = None) -> Iterator[None]:
    """Inside the context, each listed (module name, head) of `model` runs its cross-attention (calls with `context=`)
    with A'[:, h, :, j] = factor·A[:, h, :, j] on the context tokens j of `tokens` (bool (n_k,) or (batch, n_k);
    default all): the output gets path(A') − path(A) added (module docstring)."""
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise TypeError(f"factor: expected a float, got {type(factor).__name__}")
    modules = dict(_cross_modules(model))
    chosen: dict[str, list[int]] = {}
    for head in heads:
        if not (isinstance(head, tuple) and len(head) == 2 and head[0] in modules and isinstance(head[1], int)
                and 0 <= head[1] < modules[head[0]].heads):
            raise ValueError(f"heads: expected (module name, head index) of the model's attention modules "
                             f"{sorted(modules)}, got {head!r}")
        chosen.setdefault(head[0], []).append(head[1])

    def weaken(hs: list[int]) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
            context = kwargs.get("context")
            if context is None:
                return None
            x = args[0] if args else kwargs["x"]
            masks = {k: kwargs[k] for k in ("attention_mask", "key_padding_mask", "attn_mask") if kwargs.get(k) is not None}
            with torch.no_grad():
                a = module.materialize(x, context=context, **masks)  # type: ignore[operator]
            scale = torch.ones(a.shape[1], a.shape[-1], dtype=a.dtype, device=a.device)
            keys = torch.ones(a.shape[-1], dtype=torch.bool, device=a.device) if tokens is None else tokens.to(a.device)
            if keys.dim() == 2:
                if keys.shape != (a.shape[0], a.shape[-1]):
                    raise ShapeError(f"tokens: expected (n_k,) or ({a.shape[0]}, {a.shape[-1]}), got {tuple(keys.shape)}")
                scale = scale.expand(a.shape[0], -1, -1).clone()
                for h in hs:
                    scale[:, h] = torch.where(keys, factor, 1.0)
                scale = scale[:, :, None]
            else:
                if keys.shape != (a.shape[-1],):
                    raise ShapeError(f"tokens: expected (n_k,) = ({a.shape[-1]},) or (batch, n_k), got {tuple(keys.shape)}")
                for h in hs:
                    scale[h] = torch.where(keys, factor, 1.0)
                scale = scale[None, :, None]
            keep = masks.get("attention_mask")
            if "key_padding_mask" in masks:
                keep = ~masks["key_padding_mask"]
            path = module.attention_path  # type: ignore[attr-defined]
            delta = path(x, a * scale, context=context, attention_mask=keep) - path(x, a, context=context, attention_mask=keep)
            return output + delta.to(output.dtype).reshape(output.shape)

        return hook

    if tokens is not None and (not isinstance(tokens, Tensor) or tokens.dtype != torch.bool):
        raise TypeError(f"tokens: expected a bool tensor of the context tokens to weaken, got {tokens!r}")
    handles = [modules[name].register_forward_hook(weaken(hs), with_kwargs=True) for name, hs in chosen.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def ordered_weakening(model: nn.Module, relevance: HeadRelevance, concept: int, score: Callable[[], float | Tensor], *,
                      counts: Iterable[int] | None = None, order: str = "hrv", factor: float = -2.0,
                      tokens: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """P077: score() after weakening the first k heads (k in `counts`, default 0..all) of an order of the heads: "hrv"
    = decreasing HRV_concept (most relevant first), "reverse" = least relevant first, "random" = a `generator`
    permutation. Returns the scores (len(counts),) float64."""
    check_choice("order", order, ORDERS)
    if not callable(score):
        raise TypeError(f"score: expected a callable returning the concept's score, got {type(score).__name__}")
    ranked = relevance.order(concept)
    if order == "reverse":
        ranked = ranked[::-1]
    elif order == "random":
        ranked = [relevance.heads[int(i)] for i in torch.randperm(len(relevance.heads), generator=generator)]
    ks = list(range(len(ranked) + 1)) if counts is None else list(counts)
    for k in ks:
        check_int("counts", k, 0, len(ranked))
    out = []
    for k in ks:
        with weakened_heads(model, ranked[:k], factor=factor, tokens=tokens):
            out.append(float(score()))
    return torch.tensor(out, dtype=torch.float64)


_MODEL = Param("model", nn.Module, doc="a model with attnlab cross-attention modules (called with context=)")
add(Spec(name="head-relevance-vectors", kind="analysis", paper=P077, factory=head_relevance_vectors, family="E",
         summary="per-concept relevance of every cross-attention head: how often it attends most to the concept's "
                 "word among concept words, over generations (HRV)",
         params=(_MODEL, Param("run", object, doc="a callable that runs the generations"),
                 Param("words", (list, tuple), doc="per concept, the context embeddings (tokens, dim) of its words"),
                 Param("generator", torch.Generator, None, "draws one word per concept per call", optional=True))))
add(Spec(name="ordered-weakening", kind="analysis", paper=P077, factory=ordered_weakening, family="E",
         summary="a concept's score as cross-attention heads are weakened one by one in HRV order (or reverse, random)",
         params=(_MODEL, Param("relevance", HeadRelevance, doc="head_relevance_vectors' result"),
                 Param("concept", int, doc="the concept's index", low=0),
                 Param("score", object, doc="a callable returning the concept's score"),
                 Param("counts", (list, tuple, range), None, "numbers of weakened heads; default 0..all", optional=True),
                 Param("order", str, "hrv", "head order", choices=ORDERS),
                 Param("factor", float, -2.0, "the weight on the prompt's words in a weakened head"),
                 Param("tokens", Tensor, None, "bool: the context tokens to reweight; default all", optional=True),
                 Param("generator", torch.Generator, None, "the random order's generator", optional=True))))
