"""Attention patterns a person can name: finding the heads that follow them, and injecting them into chosen heads (P156).

Li et al. (EMNLP 2022) look at the attention maps of fine-tuned BERT models, name the patterns important heads
follow — attend to the other copies of the token, to the tokens of the same sentence, to the neighbouring positions,
to the first token — score each head against each pattern over a data set, and inject the patterns into heads,
replacing their attention by the normalised pattern matrix (or guiding it). Here:

Patterns: a matrix P (batch, n, n), P_ij = 1 when query i "should look at" key j, from the token ids alone:

* matching-token: tok_j = tok_i and j ≠ i (`include_self=True` keeps j = i);
* same-sentence: s_j = s_i, where s_i counts the sentence-ending tokens (ids in `sentence_ends`) strictly before i,
  so an ending token belongs to the sentence it ends (`sentence_end_ids(tokenizer)`: the ids of ".", "!", "?");
* neighbours: 0 < |i − j| ≤ w; previous: i − w ≤ j < i; next: i < j ≤ i + w (w = `window`);
* first-token: j = the first real token of the sequence.

Every pattern leaves out padded queries and keys (`attention_mask`) and, with `causal=True`, keys after the query.
normalise_pattern(P)_ij = P_ij / Σ_k P_ik — each row a distribution over its pattern; a row without entries stays 0.

Discovery (the paper's global relevance of a pattern for a head: the mean attention mass on the pattern). For one map
A, over the real queries i whose pattern row is not empty and that give some mass (Â_i = A_i / Σ_j A_ij):

    match_i      = Σ_j Â_ij P_ij                               the share of the mass on the pattern (the paper's score)
    similarity_i = 1 − ½ Σ_j |Â_ij − P̂_ij|                     1 − total variation between the row and the pattern row
    match, similarity = their means over those rows           (layers, batch, heads)

similarity is 1 when the head attends exactly as the injected pattern would make it, and it compares patterns of
different sizes (a same-sentence pattern that covers most keys of a one-sentence text has a high share for almost
any head, but only a head spreading its attention over the sentence is similar to it), so `pattern_scores` names,
per layer and head, the most similar pattern — what an `attnlab explain` panel shows for one text.

Injection, `with inject_patterns(model, {(layer, head): P}, mode=...)`: inside the context

* mode "replace": head h of module `layer` attends with P̃ = normalise_pattern(P restricted to the keys the call lets
  each query see: padding, the call's attn_mask, causality) and outputs P̃ v_h;
* mode "bias": the pattern is added to the head's scores, λ·P (λ = `strength`); for softmax attention that is
  A_ij·exp(λ P_ij) / Σ_k A_ik·exp(λ P_ik) on its probabilities A (softmax(s + b) = softmax(s) ⊙ e^b / Z), so it needs
  a softmax-normalised head (spec.normalized; any transformers model).

`layer` counts the model's attention modules in `named_modules` order — those `capture` records (attnlab mechanisms
with `materialize`; the attention modules of a transformers model), so `att.layers[layer][:, head]` reads it back.
On attnlab modules the core (`attend`) and `materialize` are wrapped for the duration: the fast path, the reference
and `capture` (which records through `materialize`) all see the injected heads; a module whose forward does not
run its core through `attend` is refused when it runs (TypeError), not skipped. Any mechanism whose output is its
attention times v qualifies (the conformance suite checks out = A v). On transformers models the chosen modules
run the eager "attnlab_capture" attention and their probabilities are changed before A·v (`capture.MODIFIERS`);
visibility there is padding and the module's `is_causal`. A pattern (bool or non-negative float) is (n_q, n_k) or
(batch, n_q, n_k) of the call; one of another shape raises ValueError when the module runs.

    from attnlab.analysis import capture, load_minilm
    from attnlab.analysis.patterns import pattern_scores, sentence_end_ids, token_patterns, inject_patterns
    model, tok = load_minilm()
    batch = tok(["The cat sat. It slept."], return_tensors="pt")
    with capture(model) as att:
        model(**batch)
    panel = pattern_scores(att, batch["input_ids"], sentence_ends=sentence_end_ids(tok))
    panel["best"][0][2]                                     # "previous": MiniLM's layer 0, head 2
    P = token_patterns(batch["input_ids"], names=("matching-token",))["matching-token"]
    with inject_patterns(model, {(0, 3): P}), capture(model) as att:
        model(**batch)                                      # att.layers[0][:, 3] == normalise_pattern(P)

Deviations: the paper finds its patterns by looking at maps in a visual interface and injects them before
fine-tuning; here the six patterns are fixed predicates (no official code was found: the score follows the
paper's description, the mean attention on the pattern), discovery is the score, and injection changes a trained
model's heads at run time (training with them injected is the caller's loop inside the context).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int
from .capture import MODIFIERS, Attentions, attnlab_modules, is_transformers_model, transformers_implementation
from .heads import _prepare

P156 = Paper("P156", "Human Guided Exploitation of Interpretable Attention Patterns in Summarization and Topic "
             "Segmentation", 2022, "2112.05364")

PATTERNS = ("matching-token", "same-sentence", "neighbours", "previous", "next", "first-token")
DIRECTIONS = ("both", "previous", "next")
MODES = ("replace", "bias")
SENTENCE_MARKS = (".", "!", "?")
Maps = Attentions | Sequence[Tensor] | Tensor


# -- patterns from the tokens -----------------------------------------------------------------------------------
def _check_tokens(tokens: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """Token ids as (batch, n) and the real-token mask (batch, n) bool; whether a single sequence (n,) came."""
    if not isinstance(tokens, Tensor) or tokens.dim() not in (1, 2) or tokens.is_floating_point() or tokens.is_complex():
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: expected integer token ids (batch, n) or (n,), got {got}")
    single = tokens.dim() == 1
    ids = tokens[None] if single else tokens
    if attention_mask is None:
        real = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    else:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask: expected a mask of the tokens' shape {tuple(tokens.shape)}, got {got}")
        real = (attention_mask[None] if single else attention_mask).to(device=ids.device, dtype=torch.bool)
    return ids, real, single


def _finish_pattern(p: Tensor, real: Tensor, causal: bool, single: bool) -> Tensor:
    """p (batch, n, n) bool restricted to real queries and keys (and j ≤ i when causal)."""
    if not isinstance(causal, bool):
        raise ParameterError(f"causal: expected a bool, got {causal!r}")
    p = p & real[:, :, None] & real[:, None, :]
    if causal:
        n = p.shape[-1]
        p = p & torch.ones(n, n, dtype=torch.bool, device=p.device).tril()
    return p[0] if single else p


def matching_token_pattern(tokens: Tensor, *, attention_mask: Tensor | None = None, include_self: bool = False,
                           causal: bool = False) -> Tensor:
    """P_ij = [tok_j = tok_i] (j ≠ i unless include_self): bool (batch, n, n), or (n, n) for tokens (n,)."""
    ids, real, single = _check_tokens(tokens, attention_mask)
    if not isinstance(include_self, bool):
        raise ParameterError(f"include_self: expected a bool, got {include_self!r}")
    same = ids[:, :, None] == ids[:, None, :]
    if not include_self:
        same = same & ~torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
    return _finish_pattern(same, real, causal, single)


def sentence_ids(tokens: Tensor, sentence_ends: Collection[int]) -> Tensor:
    """s_i = the number of sentence-ending tokens strictly before position i (an ending token closes its sentence)."""
    if isinstance(sentence_ends, (str, bytes)) or not isinstance(sentence_ends, Collection) or \
            not all(is_int(t) for t in sentence_ends):
        raise ParameterError(f"sentence_ends: expected a collection of token ids (ints), got {sentence_ends!r}")
    ends = torch.tensor(sorted(sentence_ends), dtype=tokens.dtype, device=tokens.device)
    is_end = torch.isin(tokens, ends).to(torch.int64)
    return is_end.cumsum(-1) - is_end


def same_sentence_pattern(tokens: Tensor, sentence_ends: Collection[int], *, attention_mask: Tensor | None = None,
                          causal: bool = False) -> Tensor:
    """P_ij = [s_j = s_i], sentences cut after each token of `sentence_ends`: bool (batch, n, n) or (n, n)."""
    ids, real, single = _check_tokens(tokens, attention_mask)
    s = sentence_ids(ids, sentence_ends)
    return _finish_pattern(s[:, :, None] == s[:, None, :], real, causal, single)


def neighbour_pattern(tokens: Tensor, *, window: int = 1, direction: str = "both",
                      attention_mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """P_ij = [0 < |i − j| ≤ window] ("previous": j < i only, "next": j > i only): bool (batch, n, n) or (n, n)."""
    ids, real, single = _check_tokens(tokens, attention_mask)
    if not is_int(window) or window < 1:
        raise ParameterError(f"window: expected an int >= 1, got {window!r}")
    if direction not in DIRECTIONS:
        raise ParameterError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    pos = torch.arange(ids.shape[1], device=ids.device)
    offset = pos[None, :] - pos[:, None]  # j − i
    near = (offset != 0) & (offset.abs() <= window)
    if direction == "previous":
        near = near & (offset < 0)
    elif direction == "next":
        near = near & (offset > 0)
    return _finish_pattern(near[None].expand(ids.shape[0], -1, -1), real, causal, single)


def first_token_pattern(tokens: Tensor, *, attention_mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """P_ij = [j = first real token of the sequence]: bool (batch, n, n) or (n, n)."""
    ids, real, single = _check_tokens(tokens, attention_mask)
    n = ids.shape[1]
    first = torch.where(real.any(-1), real.to(torch.int8).argmax(-1), n)  # n: a sequence without real tokens
    column = torch.arange(n, device=ids.device)[None, :] == first[:, None]  # (batch, n)
    return _finish_pattern(column[:, None, :].expand(-1, n, -1), real, causal, single)


def token_patterns(
    tokens: Tensor,
    *,
    names: Sequence[str] = PATTERNS,
    attention_mask: Tensor | None = None,
    sentence_ends: Collection[int] = (),
    window: int = 1,
    causal: bool = False,
) -> dict[str, Tensor]:
    """The patterns `names` (of `PATTERNS`) of the tokens: name -> bool (batch, n, n) ((n, n) for tokens (n,)).
    Without `sentence_ends` the whole text is one sentence."""
    if isinstance(names, str) or not all(name in PATTERNS for name in names):
        raise ParameterError(f"names: expected pattern names from {PATTERNS}, got {names!r}")
    directions = {"neighbours": "both", "previous": "previous", "next": "next"}

    def build(name: str) -> Tensor:
        if name == "matching-token":
            return matching_token_pattern(tokens, attention_mask=attention_mask, causal=causal)
        if name == "same-sentence":
            return same_sentence_pattern(tokens, sentence_ends, attention_mask=attention_mask, causal=causal)
        if name == "first-token":
            return first_token_pattern(tokens, attention_mask=attention_mask, causal=causal)
        return neighbour_pattern(tokens, window=window, direction=directions[name], attention_mask=attention_mask,
                                 causal=causal)

    return {name: build(name) for name in names}


def normalise_pattern(pattern: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """P̂_ij = P_ij / Σ_k P_ik over the last axis (float, `dtype` or the default); rows without entries stay 0."""
    if not isinstance(pattern, Tensor) or pattern.dim() < 2:
        raise ValueError(f"pattern: expected a tensor (..., n_q, n_k), got "
                         f"{tuple(pattern.shape) if isinstance(pattern, Tensor) else type(pattern).__name__}")
    p = pattern.to(dtype or (pattern.dtype if pattern.is_floating_point() else torch.get_default_dtype()))
    if bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
        raise ValueError("pattern: expected finite non-negative entries (a bool or weighted pattern), got negative or "
                         "non-finite values")
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / torch.where(total > 0, total, 1), torch.zeros_like(p))


def sentence_end_ids(tokenizer: Any, marks: Sequence[str] = SENTENCE_MARKS) -> set[int]:
    """Ids of the tokenizer's vocabulary entries that are a sentence mark ("." "!" "?"), with or without a word-start
    or continuation marker ("Ġ.", "▁.", "##.")."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(vocab):
        raise TypeError(f"tokenizer: expected a tokenizer with get_vocab(), got {type(tokenizer).__name__}")
    found = {int(i) for token, i in vocab().items() if token.lstrip("Ġ▁").removeprefix("##") in marks}
    if not found:
        raise ValueError(f"tokenizer: none of the marks {tuple(marks)} is a token of its vocabulary")
    return found


# -- discovery: how much of each head's attention falls on a pattern -------------------------------------------
def _row_scores(a: Tensor, p: Tensor, queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """a (batch, heads, n, n) float64, p (batch, n, n) bool, queries (batch, n) bool -> per row (batch, heads, n):
    the share of the row's mass on p, 1 − total variation between the row and normalise_pattern(p), and the rows
    that count (real queries with a non-empty pattern row and some mass)."""
    mass = a.sum(-1, keepdim=True)
    rows_a = a / torch.where(mass > 0, mass, 1.0)
    share = (rows_a * p[:, None].to(a.dtype)).sum(-1)
    similarity = 1 - 0.5 * (rows_a - normalise_pattern(p, a.dtype)[:, None]).abs().sum(-1)
    rows = (queries & p.any(-1))[:, None] & (mass[..., 0] > 0)
    return share, similarity, rows


def _mean(values: Tensor, rows: Tensor) -> Tensor:
    count = rows.sum(-1).to(values.dtype)
    return (values * rows.to(values.dtype)).sum(-1) / torch.where(count > 0, count, 1.0)


def pattern_match(
    attentions: Maps,
    pattern: Tensor,
    *,
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """How much each head's attention follows `pattern` (bool (batch, n, n) or (n, n)), per layer and head.

    Returns "match" (mean share of each real query's mass on the pattern), "similarity" (mean 1 − TV(A_i, P̂_i)),
    "rows" (queries averaged: real, with a non-empty pattern row) — each (layers, batch, heads), (batch, heads) for
    one 4-D map. Padded keys never count as pattern keys."""
    maps, qmasks, kmasks, single = _prepare(attentions, attention_mask)
    match, similarity, rows_out = [], [], []
    for index, (a, q, k) in enumerate(zip(maps, qmasks, kmasks)):
        batch, _, n_q, n_k = a.shape
        if n_q != n_k:
            raise ValueError(f"attentions[{index}]: expected self-attention maps (n_q = n_k) for token patterns, "
                             f"got n_q={n_q}, n_k={n_k}")
        if not isinstance(pattern, Tensor) or pattern.shape[-2:] != (n_k, n_k) or pattern.dim() not in (2, 3) or \
                (pattern.dim() == 3 and pattern.shape[0] != batch):
            got = tuple(pattern.shape) if isinstance(pattern, Tensor) else type(pattern).__name__
            raise ValueError(f"pattern: expected a bool pattern ({batch}, {n_k}, {n_k}) or ({n_k}, {n_k}), got {got}")
        p = (pattern.detach().cpu() != 0).expand(batch, n_k, n_k) & k[:, None, :] & q[:, :, None]
        share, sim, rows = _row_scores(a, p, q)
        match.append(_mean(share, rows))
        similarity.append(_mean(sim, rows))
        rows_out.append(rows.sum(-1))
    stack = (lambda t: t[0]) if single else torch.stack
    return {"match": stack(match), "similarity": stack(similarity), "rows": stack(rows_out)}


def pattern_scores(
    attentions: Maps,
    tokens: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    sentence_ends: Collection[int] = (),
    window: int = 1,
    causal: bool = False,
    names: Sequence[str] = PATTERNS,
) -> dict[str, Any]:
    """Every pattern of `names` against every head of a capture: what an `attnlab explain` panel shows for one text.

    tokens (batch, n): ids (default: the capture's); the patterns come from `token_patterns` with the same
    arguments. Returns {"patterns": names, "match": {name: (layers, batch, heads)}, "similarity": {name: ...},
    "rows": {name: ...}, "best": [[name per head] per layer], "best_similarity": [[float]], "best_match": [[float]]}:
    best = the pattern of the highest similarity averaged over the sequences where it occurs (`rows` > 0; a pattern
    that occurs in none, e.g. matching-token without a repeated token, is never best); "best_match" its mass share."""
    if tokens is None and isinstance(attentions, Attentions):
        tokens = attentions.tokens
    if tokens is None:
        raise ValueError("tokens: expected the token ids (batch, n); the capture holds none")
    _, _, kmasks, single = _prepare(attentions, attention_mask)
    real = kmasks[0]
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape != real.shape:
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: expected token ids of shape {tuple(real.shape)} (batch, n), got {got}")
    patterns = token_patterns(tokens.cpu(), names=names, attention_mask=real, sentence_ends=sentence_ends,
                              window=window, causal=causal)
    scored = {name: pattern_match(attentions, p, attention_mask=attention_mask) for name, p in patterns.items()}

    def per_layer(key: str) -> Tensor:  # (names, layers, batch, heads)
        return torch.stack([scored[name][key][None] if single else scored[name][key] for name in names])

    seen = per_layer("rows") > 0
    counts = seen.sum(2)
    similarity = torch.where(counts > 0, (per_layer("similarity") * seen).sum(2) / counts.clamp(min=1), -math.inf)
    match = (per_layer("match") * seen).sum(2) / counts.clamp(min=1)
    best = similarity.argmax(0)  # (layers, heads)
    return {
        "patterns": list(names),
        "match": {name: s["match"] for name, s in scored.items()},
        "similarity": {name: s["similarity"] for name, s in scored.items()},
        "rows": {name: s["rows"] for name, s in scored.items()},
        "best": [[names[int(i)] for i in row] for row in best],
        "best_similarity": similarity.gather(0, best[None])[0].clamp(min=0.0).tolist(),
        "best_match": match.gather(0, best[None])[0].tolist(),
    }


# -- injection --------------------------------------------------------------------------------------------------
def _check_injection(patterns: Mapping[tuple[int, int], Tensor], mode: str, strength: float) -> dict[int, dict[int, Tensor]]:
    """{module index: {head: pattern}} from `patterns`, checked (index bounds are checked against the model)."""
    if mode not in MODES:
        raise ParameterError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ParameterError(f"strength: expected a finite float (the bias λ on the pattern), got {strength!r}")
    if not isinstance(patterns, Mapping) or not patterns:
        raise TypeError(f"patterns: expected a non-empty mapping (layer, head) -> pattern, got {type(patterns).__name__}")
    by_module: dict[int, dict[int, Tensor]] = {}
    for key, p in patterns.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(is_int(i) and i >= 0 for i in key)):
            raise ValueError(f"patterns: expected keys (layer, head) of ints >= 0, got {key!r}")
        if not isinstance(p, Tensor) or p.dim() not in (2, 3) or p.is_complex():
            got = f"shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"patterns[{key}]: expected a bool or non-negative pattern (n_q, n_k) or (batch, n_q, n_k), "
                             f"got {got}")
        if bool((p.to(torch.float64) < 0).any()) or not bool(torch.isfinite(p.to(torch.float64)).all()):
            raise ValueError(f"patterns[{key}]: expected finite non-negative entries, got negative or non-finite ones")
        by_module.setdefault(key[0], {})[key[1]] = p
    return by_module


def _for_call(key: tuple[int, int], p: Tensor, batch: int, n_q: int, n_k: int, like: Tensor) -> Tensor:
    """The pattern of (layer, head) as (batch, n_q, n_k) in like's dtype and device, checked against the call."""
    if p.shape[-2:] != (n_q, n_k) or (p.dim() == 3 and p.shape[0] != batch):
        raise ValueError(f"patterns[{key}]: expected ({n_q}, {n_k}) or ({batch}, {n_q}, {n_k}) for this call of the "
                         f"module, got {tuple(p.shape)}")
    return p.to(device=like.device, dtype=like.dtype).expand(batch, n_q, n_k)


def _new_heads(probs: Tensor | None, visible: Tensor, heads: Mapping[int, Tensor], layer: int, mode: str,
               strength: float, like: Tensor) -> Tensor:
    """The chosen heads' attention (batch, len(heads), n_q, n_k), heads in increasing order: the pattern restricted to
    the visible keys and normalised ("replace"), or probs ⊙ exp(λP) renormalised ("bias"; probs (batch, heads, n_q,
    n_k) given). visible: bool (batch, 1 or heads, n_q, n_k); like: the dtype, device and shape to build."""
    batch, n_q, n_k = visible.shape[0], like.shape[-2], like.shape[-1]
    out = []
    for head in sorted(heads):
        pattern = _for_call((layer, head), heads[head], batch, n_q, n_k, like)
        if mode == "replace":
            seen = visible[:, 0] if visible.shape[1] == 1 else visible[:, head]
            out.append(normalise_pattern(pattern * seen.to(like.dtype)))
        else:
            assert probs is not None
            weighted = probs[:, head] * torch.exp(strength * pattern)
            total = weighted.sum(-1, keepdim=True)
            out.append(torch.where(total > 0, weighted / torch.where(total > 0, total, 1), torch.zeros_like(weighted)))
    return torch.stack(out, 1)


def _head_index(heads: Mapping[int, Tensor], device: torch.device) -> Tensor:
    return torch.tensor(sorted(heads), dtype=torch.int64, device=device)


def _visible_attnlab(module: nn.Module, q: Tensor, k: Tensor, keep: Tensor | None, attn_mask: Tensor | None) -> Tensor:
    """bool broadcastable to (batch, heads, n_q, n_k): the keys the call lets each query see (padding, attn_mask,
    causality), read from the mask the module's reference path takes."""
    n_q, n_k = q.shape[2], k.shape[2]
    mask = module.combined_mask(q, k, keep, attn_mask)  # type: ignore[operator]
    visible = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=q.device)
    if mask is not None:
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask  # the padding form's keep-mask (batch, n_k)
        visible = visible & (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2)
    if module.causal and module.mask_form != "dense":  # type: ignore[union-attr]
        visible = visible & torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    return visible.expand(q.shape[0], -1, n_q, n_k)


@contextmanager
def _inject_attnlab(found: list[tuple[str, nn.Module]], by_module: dict[int, dict[int, Tensor]], mode: str,
                    strength: float) -> Iterator[list[str]]:
    patched: list[tuple[nn.Module, list[Any]]] = []
    try:
        for layer, heads in sorted(by_module.items()):
            name, module = found[layer]
            ran: list[bool] = []

            def new_heads(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, attn_mask: Tensor | None,
                          side: Tensor | None, _m: nn.Module = module, _layer: int = layer,
                          _heads: dict[int, Tensor] = heads) -> Tensor:
                """The chosen heads' injected attention (batch, len(heads), n_q, n_k) for this call."""
                like = q.new_empty(q.shape[0], 1, q.shape[2], k.shape[2])
                probs = None
                if mode == "bias":
                    extra = {} if side is None else {"side": side}
                    probs = _m.attend_reference(q, k, v, _m.combined_mask(q, k, keep, attn_mask), **extra)[1]  # type: ignore[operator]
                    like = probs
                return _new_heads(probs, _visible_attnlab(_m, q, k, keep, attn_mask), _heads, _layer, mode, strength, like)

            def attend(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None,
                       attn_mask: Tensor | None = None, impl: str = "fast", grid: Any = None, side: Tensor | None = None,
                       _m: nn.Module = module, _attend: Any = module.attend, _new: Any = new_heads,
                       _ran: list[bool] = ran, _heads: dict[int, Tensor] = heads, _name: str = name) -> Tensor:
                out = _attend(q, k, v, attention_mask=attention_mask, attn_mask=attn_mask, impl=impl, grid=grid, side=side)
                if grid is not None or q.dim() != 4 or out.shape[:3] != q.shape[:3] or out.shape[-1] != v.shape[-1]:
                    raise TypeError(f"model: module {_name!r} ({_m.spec.name}) attends over a grid or returns no per-head "  # type: ignore[union-attr]
                                    "A·v over the tokens, so no pattern can be injected into its heads")
                w = _new(q, k, v, attention_mask, attn_mask, side)
                index = _head_index(_heads, out.device)
                _ran.append(True)
                return out.index_copy(1, index, (w @ v.index_select(1, index).to(w.dtype)).to(out.dtype))

            def materialize(x: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None,
                            key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                            _m: nn.Module = module, _materialize: Any = module.materialize, _new: Any = new_heads,
                            _heads: dict[int, Tensor] = heads) -> Tensor:
                base = _materialize(x, context=context, attention_mask=attention_mask, key_padding_mask=key_padding_mask,
                                    attn_mask=attn_mask)
                xb, cb = _m.batch_major(x, context)  # type: ignore[operator]
                keep = _m.keep_mask(xb, cb, attention_mask, key_padding_mask)  # type: ignore[operator]
                q, k, v = _m.project(xb, cb)  # type: ignore[operator]
                w = _new(q, k, v, keep, attn_mask, _m.side_input(xb, cb))  # type: ignore[operator]
                return base.index_copy(1, _head_index(_heads, base.device), w.to(base.dtype))

            def before(_module: nn.Module, _args: Any, _ran: list[bool] = ran) -> None:
                _ran.clear()

            def after(_module: nn.Module, _args: Any, _output: Any, _ran: list[bool] = ran, _name: str = name) -> None:
                if not _ran:
                    raise TypeError(f"model: module {_name!r} ({_module.spec.name}) does not run its attention core "  # type: ignore[union-attr]
                                    "through `attend`, so no pattern can be injected into its heads")

            handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
            module.attend = attend  # type: ignore[method-assign]
            module.materialize = materialize  # type: ignore[method-assign]
            patched.append((module, handles))
        yield [found[layer][0] or found[layer][1].spec.name for layer in sorted(by_module)]  # type: ignore[union-attr]
    finally:
        for module, handles in patched:
            del module.attend, module.materialize
            for h in handles:
                h.remove()


@contextmanager
def _inject_transformers(model: nn.Module, by_module: dict[int, dict[int, Tensor]], mode: str,
                         strength: float) -> Iterator[list[str]]:
    found = [(n, m) for n, m in model.named_modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]
    _check_layers(by_module, found, "attention modules (with `scaling` and `is_causal`)", model)
    for layer, heads in by_module.items():
        module = found[layer][1]
        _check_heads(heads, layer, getattr(module, "num_heads", None) or getattr(getattr(module, "config", None),
                                                                                  "num_attention_heads", None))

        def modify(probs: Tensor, key_mask: Tensor, _m: nn.Module = module, _layer: int = layer,
                   _heads: dict[int, Tensor] = heads) -> Tensor:
            n_q, n_k = probs.shape[-2:]
            visible = key_mask[:, None, None, :].to(probs.device)
            if bool(getattr(_m, "is_causal", False)):
                visible = visible & torch.ones(n_q, n_k, dtype=torch.bool, device=probs.device).tril(n_k - n_q)
            new = _new_heads(probs, visible.expand(probs.shape[0], 1, n_q, n_k), _heads, _layer, mode, strength, probs)
            return probs.index_copy(1, _head_index(_heads, probs.device), new)

        MODIFIERS[id(module)] = modify
    try:
        with transformers_implementation(model):
            yield [found[layer][0] for layer in sorted(by_module)]
    finally:
        for layer in by_module:
            MODIFIERS.pop(id(found[layer][1]), None)


def _check_layers(by_module: Mapping[int, Any], found: list[tuple[str, nn.Module]], what: str, model: nn.Module) -> None:
    wrong = sorted(layer for layer in by_module if layer >= len(found))
    if wrong:
        raise ValueError(f"patterns: expected layers in [0, {len(found)}) ({type(model).__name__} has {len(found)} "
                         f"{what}), got layer {wrong[0]}")


def _check_heads(heads: Mapping[int, Any], layer: int, count: int | None) -> None:
    if count is None:
        return
    wrong = sorted(h for h in heads if h >= count)
    if wrong:
        raise ValueError(f"patterns: expected heads in [0, {count}) for layer {layer}, got head {wrong[0]}")


@contextmanager
def inject_patterns(
    model: nn.Module,
    patterns: Mapping[tuple[int, int], Tensor],
    *,
    mode: str = "replace",
    strength: float = 1.0,
) -> Iterator[list[str]]:
    """Inside the context, the heads `patterns` names ((layer, head) -> pattern) attend by their pattern (module
    docstring): mode "replace" puts normalise_pattern(P ∧ visible) in place of the head's attention, "bias" adds
    strength·P to a softmax head's scores. Yields the names of the modules changed; everything comes back on exit."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    by_module = _check_injection(patterns, mode, strength)
    with ExitStack() as stack:
        if is_transformers_model(model):
            yield stack.enter_context(_inject_transformers(model, by_module, mode, strength))
            return
        found = [(n, m) for n, m in attnlab_modules(model) if m.spec.supports and m.spec.supports.materialize]  # type: ignore[union-attr]
        if not found:
            raise TypeError(f"model: {type(model).__name__} holds no attnlab mechanism with `materialize` and is not a "
                            "transformers model; nothing to inject into")
        _check_layers(by_module, found, "attention modules that capture records", model)
        for layer, heads in by_module.items():
            module = found[layer][1]
            _check_heads(heads, layer, getattr(module, "heads", None))
            if not callable(getattr(module, "attend", None)):
                raise TypeError(f"model: module {found[layer][0]!r} ({module.spec.name}) has no attention core `attend` "  # type: ignore[union-attr]
                                "to inject a pattern into")
            if mode == "bias" and not module.spec.normalized:  # type: ignore[union-attr]
                raise TypeError(f"mode: 'bias' adds the pattern to softmax scores; module {found[layer][0]!r} "
                                f"({module.spec.name}) is not softmax-normalised, use mode='replace'")  # type: ignore[union-attr]
        yield stack.enter_context(_inject_attnlab(found, by_module, mode, strength))


_ATT = Param("attentions", (Attentions, list, tuple, Tensor), doc="a capture, or maps (batch, heads, n, n)")
add(Spec(name="attention-patterns", kind="analysis", paper=P156, factory=pattern_scores, family="E",
         summary="per layer and head: attention share on and similarity to named token patterns (matching token, "
                 "same sentence, neighbours, previous, next, first token), and the most similar one", params=(
             _ATT, Param("tokens", Tensor, None, "token ids (batch, n); default: the capture's", optional=True),
             Param("sentence_ends", (set, frozenset, tuple, list), (), "ids of sentence-ending tokens"),
             Param("window", int, 1, "neighbours / previous / next within this distance", low=1),
             Param("causal", bool, False, "patterns of a causal model: keys up to the query only"),
             Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True))))
add(Spec(name="pattern-injection", kind="analysis", paper=P156, factory=inject_patterns, family="E",
         summary="replace chosen heads' attention by a normalised pattern matrix, or add it to their scores, at run time",
         params=(
             Param("model", nn.Module, doc="a model of attnlab mechanisms, or a transformers model"),
             Param("patterns", dict, doc="(layer, head) -> pattern (n, n) or (batch, n, n)"),
             Param("mode", str, "replace", "replace the attention, or add strength·P to the scores", choices=MODES),
             Param("strength", float, 1.0, "λ of mode 'bias'"))))
