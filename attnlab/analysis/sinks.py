"""Attention sinks: which keys soak up attention (P068, P248), and ACT's calibration (P248).

* sink_scores: the mass each key receives, averaged over the real queries of its sequence,
  a_j = (1/N_q) Σ_i A_ij, per layer, sequence and head: (layers, batch, heads, n_k). Padded
  queries are left out of the average and padded keys score 0.
* sink_tokens: a key is a sink in a head when a_j > ε. ε is given (`threshold`, P068's fixed ε)
  or, by default, ε = α/N with N the number of real keys (P248: α = 5, i.e. five times the uniform
  share).
* calibrate (P248, ACT): in the chosen heads, for the sinks other than the first real token,
  A[:, j] ← β·A[:, j] (β < 1) and the removed mass of each row, (1 − β)·Σ_{j∈S} A_ij, goes to the
  other keys in proportion to their weight, A_ik ← A_ik·(1 + removed_i / Σ_{k∉S} A_ik); rows still
  sum to what they summed to, masked (zero) entries stay zero. Rows with no mass outside S are kept.
* calibration(model, ...): the same as a runtime modifier. On attnlab models, inside the context
  every softmax-normalised mechanism (spec.normalized, with materialize) runs its reference path,
  calibrates the weights A and returns A v (the conformance suite checks out = A v), on the fast
  and the reference path alike; the original methods come back on exit, also after an error. On
  Hugging Face models, the attention modules run the eager "attnlab_capture" implementation,
  which calibrates the probabilities of the chosen heads before A v (`capture.MODIFIERS`).
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from .capture import (
    MODIFIERS,
    Attentions,
    attnlab_modules,
    is_transformers_model,
    transformers_attention_modules,
    transformers_implementation,
)
from .heads import _finish, _prepare

P068 = Paper("P068", "Geometric View of Attention Sinks (reference frames)", 2025, None)
P248 = Paper("P248", "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training through Attention Calibration", 2024, "2406.15765")

Maps = Attentions | Sequence[Tensor] | Tensor


def _scores(a: Tensor, query_mask: Tensor) -> Tensor:
    """a (batch, heads, n_q, n_k) with padding zeroed, query_mask bool (batch, n_q) -> (batch, heads, n_k)."""
    count = query_mask.sum(-1).clamp(min=1).to(a.dtype)
    return (a * query_mask[:, None, :, None].to(a.dtype)).sum(-2) / count[:, None, None]


def sink_scores(attentions: Maps, attention_mask: Tensor | None = None) -> Tensor:
    """Mean attention each key receives over the real queries: (layers, batch, heads, n_k) (no layers for one map)."""
    maps, qmasks, _, single = _prepare(attentions, attention_mask)
    return _finish([_scores(a, q) for a, q in zip(maps, qmasks)], single)


def sink_tokens(
    attentions: Maps, *, threshold: float | None = None, alpha: float = 5.0, attention_mask: Tensor | None = None
) -> Tensor:
    """bool (layers, batch, heads, n_k): keys whose mean received attention exceeds ε (threshold, else α/N)."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold: expected a share in [0, 1], got {threshold!r}")
    if alpha <= 0:
        raise ValueError(f"alpha: expected a positive multiple of the uniform share, got {alpha!r}")
    maps, qmasks, kmasks, single = _prepare(attentions, attention_mask)
    out = []
    for a, q, k in zip(maps, qmasks, kmasks):
        s = _scores(a, q)
        eps = torch.full_like(s[..., :1], threshold) if threshold is not None else alpha / k.sum(-1).clamp(min=1)[:, None, None]
        out.append((s > eps) & k[:, None, :])
    return _finish(out, single)


def calibrate(
    weights: Tensor,
    *,
    beta: float = 0.4,
    alpha: float = 5.0,
    threshold: float | None = None,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    heads: Collection[int] | None = None,
) -> Tensor:
    """ACT on one attention map (batch, heads, n_q, n_k): scale non-initial sinks by β, give the mass to the rest.

    key_mask / query_mask: bool (batch, n_k) / (batch, n_q), True = real token (default all);
    the first real key of each sequence is never calibrated. heads: indices to calibrate (default all).
    """
    if not isinstance(weights, Tensor) or weights.dim() != 4:
        raise ValueError(f"weights: expected (batch, heads, n_q, n_k), got {getattr(weights, 'shape', type(weights).__name__)}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta: expected a factor in [0, 1], got {beta!r}")
    b, h, n_q, n_k = weights.shape
    km = torch.ones(b, n_k, dtype=torch.bool, device=weights.device) if key_mask is None else key_mask.to(torch.bool)
    qm = km[:, n_k - n_q :] if query_mask is None and n_q <= n_k else query_mask
    if qm is None:
        qm = torch.ones(b, n_q, dtype=torch.bool, device=weights.device)
    if km.shape != (b, n_k) or qm.shape != (b, n_q):
        raise ValueError(f"key_mask/query_mask: expected ({b}, {n_k}) and ({b}, {n_q}), got {tuple(km.shape)} and {tuple(qm.shape)}")
    real = km[:, None, None, :] & qm[:, None, :, None]
    a = torch.where(real, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))  # NaN rows of padding too
    eps = alpha / km.sum(-1).clamp(min=1)[:, None, None] if threshold is None else threshold  # α/N over real keys
    sinks = (_scores(a, qm) > eps) & km[:, None, :]
    first = km.to(torch.int64).argmax(-1)  # first real key
    sinks[torch.arange(b), :, first] = False
    if heads is not None:
        chosen = torch.zeros(h, dtype=torch.bool, device=weights.device)
        chosen[list(heads)] = True
        sinks = sinks & chosen[None, :, None]
    s = sinks[:, :, None, :].to(weights.dtype)
    removed = (1 - beta) * (a * s).sum(-1, keepdim=True)
    rest = (a * (1 - s)).sum(-1, keepdim=True)
    gain = torch.where(rest > 0, removed / rest.clamp(min=torch.finfo(weights.dtype).tiny), torch.zeros_like(rest))
    keep = (rest > 0).to(weights.dtype)  # rows with nothing outside S are left as they were
    scale = s * (1 - (1 - beta) * keep) + (1 - s) * (1 + gain)
    return weights * scale


def _visible_keys(mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor:
    b, h, n_k = q.shape[0], q.shape[1], k.shape[2]
    if mask is None:
        return torch.ones(b, n_k, dtype=torch.bool, device=q.device)
    vis = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    vis = vis.expand(b, h, q.shape[2], n_k)
    return vis.any(-2).any(1)


def _chosen_heads(heads: Collection[tuple[int, int]] | None, index: int) -> set[int] | None:
    return None if heads is None else {hd for m, hd in heads if m == index}


@contextmanager
def _calibrate_attnlab(found: list[tuple[str, nn.Module]], heads: Collection[tuple[int, int]] | None,
                       **act: float | None) -> Iterator[list[str]]:
    patched = []
    try:
        for idx, (_, module) in enumerate(found):
            chosen = _chosen_heads(heads, idx)
            if chosen is not None and not chosen:
                continue
            reference = module.attend_reference

            def attend_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, _ref=reference, _heads=chosen) -> tuple[Tensor, Tensor]:
                _, w = _ref(q, k, v, mask)
                w = calibrate(w, key_mask=_visible_keys(mask, q, k), heads=_heads, **act)  # type: ignore[arg-type]
                return (w @ v.to(w.dtype)).to(v.dtype), w

            def attend_fast(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, _attend=attend_reference) -> Tensor:
                return _attend(q, k, v, mask)[0]

            module.attend_reference = attend_reference  # type: ignore[method-assign]
            module.attend_fast = attend_fast  # type: ignore[method-assign]
            module.causal_in_kernel = False  # the patched fast path is the reference: it needs the full mask
            patched.append(module)
        yield [n or m.spec.name for n, m in found if m in patched]  # type: ignore[union-attr]
    finally:
        for module in patched:
            del module.attend_reference, module.attend_fast, module.causal_in_kernel


@contextmanager
def _calibrate_transformers(model: nn.Module, heads: Collection[tuple[int, int]] | None,
                            **act: float | None) -> Iterator[list[str]]:
    found = transformers_attention_modules(model)
    if not found:
        raise TypeError(f"model: {type(model).__name__} has no attention module (with `scaling` and `is_causal`) to calibrate")
    chosen = {id(m): (n, _chosen_heads(heads, idx)) for idx, (n, m) in enumerate(found)}
    chosen = {k: v for k, v in chosen.items() if v[1] is None or v[1]}
    for key, (_, hd) in chosen.items():
        MODIFIERS[key] = lambda probs, key_mask, _hd=hd: calibrate(probs, key_mask=key_mask, heads=_hd, **act)  # type: ignore[arg-type, misc]
    try:
        with transformers_implementation(model):
            yield [n for n, _ in chosen.values()]
    finally:
        for key in chosen:
            MODIFIERS.pop(key, None)


@contextmanager
def calibration(
    model: nn.Module,
    *,
    beta: float = 0.4,
    alpha: float = 5.0,
    threshold: float | None = None,
    heads: Collection[tuple[int, int]] | None = None,
) -> Iterator[list[str]]:
    """Apply ACT (P248) inside the context to every softmax-normalised attnlab mechanism of `model`,
    or to every attention module of a transformers model.

    heads: (module index, head) pairs to calibrate, modules in `named_modules` order (default: all).
    Yields the names of the calibrated modules. A transformers model runs with the eager
    "attnlab_capture" attention inside the context (its previous implementation comes back on exit);
    its probabilities are calibrated before A·v, and a `capture` opened inside records them calibrated.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    act = {"beta": beta, "alpha": alpha, "threshold": threshold}
    if is_transformers_model(model):
        with _calibrate_transformers(model, heads, **act) as names:
            yield names
        return
    found = [(n, m) for n, m in attnlab_modules(model) if m.spec.normalized and m.spec.supports and m.spec.supports.materialize]  # type: ignore[union-attr]
    if not found:
        raise TypeError(f"model: {type(model).__name__} holds no softmax-normalised attnlab mechanism to calibrate")
    with _calibrate_attnlab(found, heads, **act) as names:
        yield names


_ATT = Param("attentions", (Attentions, list, tuple, Tensor), doc="a capture, or maps (batch, heads, n_q, n_k)")
_MASK = Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True)
add(Spec(name="sink-scores", kind="analysis", paper=P068, factory=sink_scores, family="E",
         summary="mean attention each key receives over the real queries, per layer and head", params=(_ATT, _MASK)))
add(Spec(name="sink-tokens", kind="analysis", paper=P248, factory=sink_tokens, family="E",
         summary="keys whose mean received attention exceeds ε (default α/N)", params=(
             _ATT, Param("threshold", float, None, "fixed ε (P068)", optional=True),
             Param("alpha", float, 5.0, "ε = α/N when no threshold (P248)", low=0.0), _MASK)))
add(Spec(name="attention-calibration", kind="analysis", paper=P248, factory=calibration, family="E",
         summary="ACT: scale non-initial sinks by β and give the mass to the other keys, at run time", params=(
             Param("model", nn.Module, doc="a model holding attnlab mechanisms, or a transformers model"),
             Param("beta", float, 0.4, "factor on the sinks' columns", low=0.0, high=1.0),
             Param("alpha", float, 5.0, "ε = α/N", low=0.0),
             Param("threshold", float, None, "fixed ε instead of α/N", optional=True))))
