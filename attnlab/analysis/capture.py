"""Capture the attention probabilities of a model, per layer and head, without editing its code.

    with capture(model) as att:            # any nn.Module: attnlab layers and/or a transformers model
        model(**inputs)
    att.layers        # list of (batch, heads, n_q, n_k) tensors, one per attention call, in call order
    att.attention_mask  # (batch, n) bool, True = real token
    att.names         # the module that made each record, e.g. "encoder.layer.3.attention.self"

    with capture(model, grads=True) as att:
        loss = model(**inputs).logits[0, label]
        loss.backward()
    att.grads         # d loss / d attention, same shapes as att.layers

    with capture(model, qk=True) as att:
        model(**inputs)
    att.queries, att.keys  # per-head queries / keys (batch, heads, n, head_dim) of every record

Two sources are recorded, both at once when a model mixes them:

* attnlab mechanisms — every submodule whose `spec` is a catalogue mechanism that supports
  `materialize` (the outermost one when they nest). A forward hook calls
  `module.materialize(x, context=..., attention_mask=..., key_padding_mask=..., attn_mask=...)` on the same inputs
  and masks as the forward: every argument of the forward call that `materialize` takes by name is passed on
  (so also a mechanism's own extra inputs, e.g. decoupled-attention's `embeddings`). Cost: a second projection of the inputs and the reference path of the
  mechanism, i.e. O(n_q·n_k) memory per layer and head whatever the fast path costs. Mechanisms
  without `materialize` are listed in `Attentions.skipped`. With `grads=True` the matrix A must
  reach the loss: the recorded A is a fresh leaf and the hook adds
  `path(A) − path(stop_grad(A))` to the module's output, with `path = module.attention_path`, the
  part of the output linear in A — exactly zero, so outputs and all other gradients are
  unchanged. For `attnlab.core.module.Attention` the path is `W_out·merge_heads(A·v)`, which makes
  d loss / dA the gradient A would get were the core output computed as A v (the conformance
  suite checks out = A v); a mixer defines its own (mamba: the head's matrix applied to every
  channel of the head, then the gate and W_out). Modules without `attention_path` raise
  TypeError under `grads=True`.
* Hugging Face `transformers` models — an attention implementation named "attnlab_capture" is
  registered in `transformers.AttentionInterface`, together with the mask builder of "eager" in
  `AttentionMaskInterface` (without it transformers builds no padding mask for an unknown
  implementation and the probabilities would include padded keys). Inside the context the model
  (and its sub-models) run with `attn_implementation="attnlab_capture"`, and every call of that
  implementation runs the model's OWN eager attention function — the `default` its attention
  module hands to `AttentionInterface.get_interface` (wrapped for the duration of the context), or
  for the few modules that index the interface directly, the `eager_attention_forward` of the
  module's file — and records the probabilities it returns. So every keyword the model passes
  (T5's `position_bias`, soft-capping, sink logits, relative positions of conformers, ...) reaches
  the code written for it: the maps equal `output_attentions=True` under "eager" and the model
  computes exactly what it computes under "eager". A file without an eager function (none in
  transformers 5) gets a generic eager softmax(q kᵀ·scale + mask) v (float32 softmax, GQA heads
  repeated, `softcap` and `s_aux` sinks honoured). The previous implementation of every config
  comes back on exit, also after an error. `transformers` is imported only when the model is a
  transformers model.
* transformers models that do not dispatch through `AttentionInterface` (bloom, gpt_neo, mpt,
  xglm, deberta_v2, mpnet, ... : `model._can_set_attn_implementation()` is False): the maps they
  return with `output_attentions=True` are recorded instead. The top-level call gets
  `output_attentions=True` (a forward pre-hook) and the maps are taken from the outputs
  (`attentions`, `encoder_attentions`, `decoder_attentions`, `cross_attentions`, and those of nested
  outputs), then removed from the outputs unless the caller asked for them. Reported, not silent:
  `Attentions.fallback` says so and a one-line `UserWarning` is issued. Records are named after the
  output field ("attentions.3", "decoder_attentions.0", "cross_attentions.0"); their masks come from
  the call's `attention_mask` / `decoder_attention_mask` (else: keys some query gives weight). This
  path has no queries/keys (`qk=True` raises TypeError) and no run-time calibration.
* LongT5's local encoder attention (its own code, outside `AttentionInterface`) computes per block of
  ℓ = local_radius + 1 queries a softmax over 3ℓ keys (the block and its two neighbours) and returns
  maps of shape (batch, blocks, heads, ℓ, 3ℓ). A forward hook on each `LongT5LocalAttention` calls it
  with output_attentions=True and records the (batch, heads, n, n) token map they stand for
  (`scatter_local_blocks`: A[j·ℓ + r, (j − 1)·ℓ + c] = blocked[j, r, c], 0 elsewhere; the columns that
  fall outside the sequence hold zero keys and values and no weight of a real query). It is the dense
  banded softmax(q kᵀ + bias) over |i − t| ≤ local_radius, and W_o·merge_heads(A·v) is the layer's
  output; the blocked maps are taken off the outputs again unless asked for, and the model's returned
  maps are matched with these records (no fallback). With `grads=True` the map is a fresh leaf that
  reaches the loss through the zero term W_o(A·v) − W_o(stop_grad(A)·v); `qk=True` gives q, k with
  scale 1 (T5 does not scale). Transient-global attention is refused with `BlockedAttentionError`:
  its extra keys are layer-normed sums of blocks of tokens, whose values W_v·diag(w)·Σx/rms are no
  combination of the tokens' values, so no (n, n) map carries its output (`capture(model.decoder)`
  records the decoder alone).

With `qk=True` every record also keeps the per-head queries and keys that made its scores
(`Record.query`, `Record.key`, detached): for transformers models the `query`/`key` handed to the
attention implementation (after RoPE or any other rotation, keys of grouped-query attention
repeated to the query heads) with the `scaling` used, so that softmax(q kᵀ·scale + mask) is the
recorded map (up to what the model adds besides: soft-capping, sink logits, T5's position bias);
for attnlab modules the output of
`module.project(x, context)` — the heads before the mechanism's own core (for the softmax family
softmax(q kᵀ·scale + mask), `scale` read from the module when it has one; mechanisms that map or
rotate q and k inside their core give the projections before that step).

Padding convention: in every result padded positions carry no mass — rows of padded queries and
columns of padded keys are zero. Padded keys are the keys no query may see (read from the mask the
model applies); padded queries are the padded keys of the same sequence for self-attention
(queries bottom-right aligned with the keys, as with a KV cache). Cross-attention queries are never
treated as padding: for attnlab modules a call with `context=` is cross-attention; for transformers
a module with `is_cross_attention = True`, or whose name has a part containing "cross", or named
"encoder_attn" / "EncDecAttention" / "encoder_decoder_attention". Recorded tensors keep their raw values in `Record.weights`.

Building on the capture (relevance, sinks, lookback, explain, ...): take `Attentions` or plain maps
and turn them into a list with `as_layers`; `att.layers[l]` / `att.grads[l]` belong to the same
call l (gradients are never shifted by a layer); `att.query_masks` / `att.key_masks` give the real
tokens of each call, `att.attention_mask` and `att.tokens` those of the model input,
`att.sequence(b)` crops sequence b to its real tokens (`att.attention_mask` is the call's mask only
when it has the length of the first record's keys — else, e.g. audio models whose mask is per sample
while attention runs over frames, or `select` of a tower the mask does not belong to, the first
record's real queries), `att.select(regex)` keeps some modules
(e.g. the cross-attention of an encoder–decoder), `att.stack()` gives (layers, batch, heads, n, n).
Without `grads` the records are detached; with it they are the tensors of the forward pass.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import Spec

IMPLEMENTATION = "attnlab_capture"
_CROSS_NAMES = ("encoder_attn", "EncDecAttention", "encoder_decoder_attention")


@dataclass
class Record:
    """One attention call: raw probabilities and which queries/keys are real tokens."""

    name: str
    weights: Tensor  # (batch, heads, n_q, n_k) as the model computed them
    query_mask: Tensor  # bool (batch, n_q), True = real query
    key_mask: Tensor  # bool (batch, n_k), True = real key
    source: str  # "attnlab" or "transformers"
    query: Tensor | None = None  # (batch, heads, n_q, head_dim) with capture(qk=True)
    key: Tensor | None = None  # (batch, heads, n_k, head_dim), repeated to the query heads
    scale: float | None = None  # the factor on q·k, when known

    def masked(self, t: Tensor) -> Tensor:
        keep = self.query_mask[:, None, :, None] & self.key_mask[:, None, None, :]
        return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))  # NaN rows of padded queries -> 0


@dataclass
class Attentions:
    """What `capture` recorded: one `Record` per attention call, in call order."""

    records: list[Record] = field(default_factory=list)
    tokens: Tensor | None = None  # input ids of the model call, when given (transformers)
    input_mask: Tensor | None = None  # bool (batch, n) from the model call's attention_mask
    skipped: list[str] = field(default_factory=list)  # attnlab modules without materialize, maps not token × token
    grads_requested: bool = False
    qk_requested: bool = False
    fallback: str | None = None  # why the maps came from output_attentions=True instead of the recorder, if so

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> Tensor:
        return self.records[i].masked(self.records[i].weights)

    @property
    def layers(self) -> list[Tensor]:
        """Attention probabilities (batch, heads, n_q, n_k) per call; padded rows/columns are 0."""
        return [r.masked(r.weights) for r in self.records]

    @property
    def grads(self) -> list[Tensor]:
        """d loss / d attention per call (after `backward`), same shapes and padding rule as `layers`."""
        if not self.grads_requested:
            raise ValueError("grads: capture(model, grads=True) records gradients; this capture had grads=False")
        out = []
        for r in self.records:
            if r.weights.grad is None:
                raise ValueError(f"grads: no gradient reached {r.name!r}; call backward() on a loss inside or after the context")
            out.append(r.masked(r.weights.grad))
        return out

    def _qk(self, name: str) -> list[tuple[Record, Tensor, Tensor]]:
        if not self.qk_requested:
            raise ValueError(f"{name}: capture(model, qk=True) records queries and keys; this capture had qk=False")
        return [(r, r.query, r.key) for r in self.records if r.query is not None and r.key is not None]

    @property
    def queries(self) -> list[Tensor]:
        """Per-head queries (batch, heads, n_q, head_dim) per call (capture(qk=True)); padded queries are 0."""
        return [q * r.query_mask[:, None, :, None].to(q.dtype) for r, q, _ in self._qk("queries")]

    @property
    def keys(self) -> list[Tensor]:
        """Per-head keys (batch, heads, n_k, head_dim) per call (capture(qk=True)); padded keys are 0."""
        return [k * r.key_mask[:, None, :, None].to(k.dtype) for r, _, k in self._qk("keys")]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    @property
    def query_masks(self) -> list[Tensor]:
        return [r.query_mask for r in self.records]

    @property
    def key_masks(self) -> list[Tensor]:
        return [r.key_mask for r in self.records]

    @property
    def attention_mask(self) -> Tensor:
        """bool (batch, n): the real tokens of the input — the model call's mask when it has the length of the
        first record's keys, else the first record's real queries (module docstring)."""
        if self.records:
            first = self.records[0]
            if self.input_mask is not None and self.input_mask.shape == first.key_mask.shape:
                return self.input_mask
            return first.query_mask
        if self.input_mask is not None:
            return self.input_mask
        raise ValueError("attention_mask: nothing was captured")

    @property
    def num_layers(self) -> int:
        return len(self.records)

    @property
    def num_heads(self) -> int:
        heads = {r.weights.shape[1] for r in self.records}
        if len(heads) != 1:
            raise ValueError(f"num_heads: the records have different head counts {sorted(heads)}")
        return heads.pop()

    @property
    def lengths(self) -> Tensor:
        """Number of real tokens per sequence, (batch,)."""
        return self.attention_mask.sum(-1)

    def stack(self) -> Tensor:
        """All records as one tensor (layers, batch, heads, n_q, n_k); they must share a shape."""
        layers = self.layers
        shapes = {tuple(t.shape) for t in layers}
        if len(shapes) != 1:
            raise ValueError(f"stack: records have different shapes {sorted(shapes)}; use select() first")
        return torch.stack(layers)

    def select(self, pattern: str) -> Attentions:
        """The records whose module name matches the regular expression `pattern` (re.search)."""
        rx = re.compile(pattern)
        return replace(self, records=[r for r in self.records if rx.search(r.name)], skipped=list(self.skipped))

    def sequence(self, b: int) -> list[Tensor]:
        """The records of sequence `b` cropped to its real queries and keys: (heads, n_q_real, n_k_real) each."""
        out = []
        for r in self.records:
            w = r.masked(r.weights)[b]
            out.append(w[:, r.query_mask[b]][:, :, r.key_mask[b]])
        return out


# -- attnlab modules -------------------------------------------------------------------------
def _is_mechanism(module: nn.Module) -> bool:
    spec = getattr(module, "spec", None)
    return isinstance(spec, Spec) and spec.kind == "mechanism"


def attnlab_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost attnlab mechanisms in `model`, in `named_modules` order (a mechanism inside
    another is left out, so that it is not hooked twice); those without `materialize` included."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not _is_mechanism(module):
            continue
        if any(name.startswith(outer + ".") or outer == "" for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _flat_mask(mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return mask.reshape(batch, -1).to(torch.bool)


def _attnlab_qk(module: nn.Module, x: Tensor, context: Tensor | None, batch: int,
                given: dict[str, Any]) -> tuple[Tensor, Tensor, float | None]:
    """Per-head q, k of an attnlab module from its own `project` (k from `key_values` when its keys are
    summaries of the tokens), with the call's other inputs that `project` takes by name (decoupled-attention's
    `embeddings`), and its `scale` when it has one."""
    takes = inspect.signature(module.project).parameters  # type: ignore[arg-type]
    extra = {k: v for k, v in given.items() if k in takes and k not in ("x", "context")}
    with torch.no_grad():
        q, k, _ = module.project(x.reshape(batch, -1, x.shape[-1]), context, **extra)  # type: ignore[operator]
        if module.spec.supports.summary_keys:  # type: ignore[union-attr]
            k = module.key_values(x)[0]  # type: ignore[operator]
    scale = getattr(module, "scale", None)
    return q.detach(), k.detach(), float(scale) if isinstance(scale, (int, float)) else None


def _materialize_parameters(module: nn.Module) -> set[str]:
    """Names of the keywords `module.materialize` takes after x: those of the first definition along the class's
    method resolution order that names them (a `materialize(x, **kwargs)` that hands them on is looked through)."""
    for cls in type(module).__mro__:
        method = cls.__dict__.get("materialize")
        if method is None:
            continue
        parameters = list(inspect.signature(method).parameters.values())[2:]  # after self and x
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    return set()


def _materialize_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """x and, by name, every other argument of this forward call that `module.materialize` takes and that is not None
    (masks, context, and the module's own extra inputs such as decoupled-attention's `embeddings`)."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    first, *rest = bound.signature.parameters.values()
    given: dict[str, Any] = {}
    for p in rest:
        if p.name not in bound.arguments:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            given.update(bound.arguments[p.name])
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            given[p.name] = bound.arguments[p.name]
    accepted = _materialize_parameters(module)
    return bound.arguments[first.name], {k: v for k, v in given.items() if k in accepted and v is not None}


def _attnlab_hook(att: Attentions, name: str, grads: bool) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
        x, given = _materialize_arguments(module, args, kwargs)
        with torch.no_grad():
            weights = module.materialize(x, **given)  # type: ignore[operator]
        batch, _, n_q, n_k = weights.shape
        # the keep-mask (True = attend) of either padding argument (key_padding_mask: True = padding, as in PyTorch)
        pad = given.get("key_padding_mask")
        keep = given.get("attention_mask") if pad is None else ~pad.reshape(batch, -1)
        key_mask = _flat_mask(keep, batch, n_k, weights.device)
        # cross-attention, or keys that are summaries of the tokens (Supports.summary_keys): no query is padding
        own_keys = "context" not in given and not module.spec.supports.summary_keys  # type: ignore[union-attr]
        query_mask = key_mask[:, n_k - n_q :] if own_keys else _flat_mask(None, batch, n_q, weights.device)
        if att.qk_requested:  # project from batch-major tokens (a module built with batch_first=False takes (n, batch, dim))
            major = getattr(module, "batch_major", None)
            xb, cb = major(x, given.get("context")) if major is not None else (x, given.get("context"))
            qk = _attnlab_qk(module, xb, cb, batch, given)
        else:
            qk = (None, None, None)
        if not grads:
            att.records.append(Record(name, weights, query_mask, key_mask, "attnlab", *qk))
            return None
        leaf = weights.requires_grad_()
        att.records.append(Record(name, leaf, query_mask, key_mask, "attnlab", *qk))
        # a zero term through which d loss / dA reaches `leaf` along the module's attention path
        # (module docstring); A is a fresh leaf so that no second gradient path runs through q, k or v
        path = {"context": given.get("context"), "attention_mask": keep}
        delta = module.attention_path(x, leaf, **path) - module.attention_path(x, leaf.detach(), **path)  # type: ignore[operator]
        delta = delta.to(output.dtype)
        return output + delta.reshape(output.shape)

    return hook


# -- transformers models ---------------------------------------------------------------------
_ACTIVE: list[tuple[Attentions, dict[int, str]]] = []  # open captures: (result, id(module) -> name)
# runtime modifiers of the probabilities, id(module) -> f(probs, key_mask) -> probs (e.g. sinks.calibration)
MODIFIERS: dict[int, Callable[[Tensor, Tensor], Tensor]] = {}


def _find_capture(module: nn.Module) -> tuple[Attentions, str] | None:
    for att, names in reversed(_ACTIVE):
        name = names.get(id(module))
        if name is not None:
            return att, name
    return None


def is_cross_attention(module: nn.Module, name: str) -> bool:
    """True when the transformers attention module `module`, named `name` in its model, is cross-attention: it says
    so (`is_cross_attention`), or a part of its name contains "cross" or is "encoder_attn" / "EncDecAttention" /
    "encoder_decoder_attention"."""
    if getattr(module, "is_cross_attention", False) is True:
        return True
    parts = name.split(".")
    return any("cross" in p.lower() or p in _CROSS_NAMES for p in parts)


def _visible_keys(mask: Tensor | None, batch: int, n_k: int, device: torch.device) -> Tensor:
    """bool (batch, n_k): keys that at least one query may see under the 4-D mask transformers built."""
    if mask is None:
        return torch.ones(batch, n_k, dtype=torch.bool, device=device)
    mask = mask[..., :n_k]
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    visible = visible.any(dim=-2).any(dim=1)  # over queries, then heads
    return visible.expand(batch, n_k)


def _record(module: nn.Module, probs: Tensor, attention_mask: Tensor | None, query: Tensor, key: Tensor,
            scale: float) -> None:
    """Append `probs` (batch, heads, n_q, n_k) to the open capture that knows `module`, if any."""
    found = _find_capture(module)
    if found is None:
        return
    att, name = found
    batch, _, n_q, n_k = probs.shape
    key_mask = _visible_keys(attention_mask, batch, n_k, probs.device)
    if is_cross_attention(module, name):
        query_mask = torch.ones(batch, n_q, dtype=torch.bool, device=probs.device)
    else:
        query_mask = key_mask[:, n_k - n_q :]
    if att.qk_requested:
        rep = query.shape[1] // key.shape[1]
        keys = key.repeat_interleave(rep, dim=1) if rep > 1 else key
        qk: tuple[Tensor | None, Tensor | None, float | None] = (query.detach(), keys.detach(), float(scale))
    else:
        qk = (None, None, None)
    if att.grads_requested and probs.requires_grad:
        probs.retain_grad()
        att.records.append(Record(name, probs, query_mask, key_mask, "transformers", *qk))
    else:
        att.records.append(Record(name, probs.detach(), query_mask, key_mask, "transformers", *qk))


def _recording(eager: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
    """The model's own eager attention function `eager`, recording the probabilities it returns and applying
    the module's runtime modifier (`MODIFIERS`) before A·v. Every argument reaches `eager` unchanged."""
    def forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        out, probs = eager(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.get("scaling", args[0] if args else None)
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        modify = MODIFIERS.get(id(module))
        if modify is not None:
            out, probs = _modified(module, modify, out, probs, value, attention_mask)
        _record(module, probs, attention_mask, query, key, scale)
        return out, probs

    return forward


def _modified(module: nn.Module, modify: Callable[[Tensor, Tensor], Tensor], out: Tensor, probs: Tensor,
              value: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out, probs) with probs changed by `modify` and out recomputed as probs·v (checked to be the model's rule)."""
    rep = probs.shape[1] // value.shape[1]
    v = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    if not torch.allclose(torch.matmul(probs, v).transpose(1, 2), out, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise ValueError(
            f"model: the attention of {type(module).__name__} does not compute its output as probabilities · values, "
            "so its probabilities cannot be changed at run time"
        )
    batch, _, _, n_k = probs.shape
    probs = modify(probs, _visible_keys(attention_mask, batch, n_k, probs.device))
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def generic_eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager attention for a module whose file has no eager function of its own: softmax(q kᵀ·scale + mask) v,
    softmax in float32, GQA heads repeated, `softcap` and `s_aux` sink logits honoured.

    query (batch, heads, n_q, d), key/value (batch, kv_heads, n_k, d) -> (out (batch, n_q, heads, d), probs).
    """
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        extra = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1).to(scores.dtype)
        scores = torch.cat([scores, extra], dim=-1)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    weights = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def capture_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The "attnlab_capture" implementation as registered (reached by modules that index the interface
    directly): the `eager_attention_forward` of the module's file, recorded; `generic_eager_attention` if none."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    run = _recording(eager if callable(eager) else generic_eager_attention)
    return run(module, query, key, value, attention_mask, *args, **kwargs)


_WRAPPED: dict[Callable[..., Any], Callable[..., Any]] = {}  # eager function -> its recording wrapper
_ORIGINAL: list[Callable[..., Any]] = []  # AttentionInterface.get_interface while wrapped
_DEPTH = [0]  # open contexts that need the wrapping


def _get_interface(self: Any, attn_implementation: str, default: Callable[..., Any]) -> Callable[..., Any]:
    """AttentionInterface.get_interface inside a capture: "attnlab_capture" resolves to the caller's own
    eager function (`default`), recorded."""
    if attn_implementation == IMPLEMENTATION:
        wrapped = _WRAPPED.get(default)
        if wrapped is None:
            wrapped = _WRAPPED[default] = _recording(default)
        return wrapped
    return _ORIGINAL[0](self, attn_implementation, default)


@contextmanager
def _own_eager() -> Iterator[None]:
    """Route "attnlab_capture" to each call site's own eager function for the duration (nesting allowed)."""
    from transformers import AttentionInterface

    if _DEPTH[0] == 0:
        _ORIGINAL[:] = [AttentionInterface.get_interface]
        AttentionInterface.get_interface = _get_interface  # type: ignore[method-assign]
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            AttentionInterface.get_interface = _ORIGINAL.pop()  # type: ignore[method-assign]


def _register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def is_transformers_model(model: nn.Module) -> bool:
    """True when `model` is a Hugging Face `transformers.PreTrainedModel` (transformers is not imported to decide:
    a model of that class can only exist once it is)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def transformers_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the attention modules of a transformers model, in `named_modules` order: those with
    `scaling` and `is_causal`, as its attention classes have (cross-attention included)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]


def dispatches(model: nn.Module) -> bool:
    """True when the transformers model runs its attention through `AttentionInterface` (it can be captured by
    the recording implementation), False when only `output_attentions=True` gives its maps."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    return bool(can_set()) if callable(can_set) else True


def _configs(model: nn.Module) -> list[Any]:
    """Every config of the model and its sub-models, with their sub-configs, each once."""
    seen: dict[int, Any] = {}
    todo = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "sub_configs")]
    while todo:
        cfg = todo.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        todo.extend(sub for key in cfg.sub_configs if (sub := getattr(cfg, key, None)) is not None)
    return list(seen.values())


def _input_hook(att: Attentions) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        mask = kwargs.get("attention_mask")
        if att.tokens is None and isinstance(ids, Tensor) and not ids.is_floating_point():
            att.tokens = ids
        if att.input_mask is None and isinstance(mask, Tensor) and mask.dim() == 2:
            att.input_mask = mask.to(torch.bool)

    return hook


# -- LongT5's blocked local attention ------------------------------------------------------------------------
class BlockedAttentionError(TypeError):
    """A layer's attention has keys that are not tokens, so it has no (n_q, n_k) token map to record."""


def scatter_local_blocks(blocked: Tensor, n: int) -> Tensor:
    """LongT5's blocked local map as the token matrix: (batch, blocks, heads, ℓ, 3ℓ) -> (batch, heads, n, n).

    Query r of block j is token i = j·ℓ + r and key column c of that block is token t = (j − 1)·ℓ + c
    (the block and its two neighbours), so A[i, t] = blocked[j, r, c]; every other entry is 0. Columns
    outside [0, n) hold the zero-padded keys (value 0, no weight under the model's mask) and are dropped.
    """
    if blocked.dim() != 5 or blocked.shape[-1] != 3 * blocked.shape[-2]:
        raise ValueError(f"blocked: expected (batch, blocks, heads, block, 3·block), got shape {tuple(blocked.shape)}")
    batch, blocks, heads, ell, width = blocked.shape
    if not 0 < n <= blocks * ell:
        raise ValueError(f"n: expected a length in [1, {blocks * ell}] for {blocks} blocks of {ell}, got {n}")
    rows = torch.arange(blocks * ell, device=blocked.device).view(blocks, ell, 1).expand(blocks, ell, width)
    cols = (torch.arange(blocks, device=blocked.device).view(blocks, 1, 1) - 1) * ell + torch.arange(width, device=blocked.device)
    cols = cols.expand(blocks, ell, width)
    keep = (rows < n) & (cols >= 0) & (cols < n)
    dense = blocked.new_zeros(batch, heads, n, n)
    dense[:, :, rows[keep], cols[keep]] = blocked.permute(0, 2, 1, 3, 4)[:, :, keep]
    return dense


def _longt5_local_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LongT5 local attention modules of `model`; a transient-global one raises BlockedAttentionError."""
    longt5 = sys.modules.get("transformers.models.longt5.modeling_longt5")
    if longt5 is None:
        return []
    found = []
    for name, module in model.named_modules():
        if isinstance(module, longt5.LongT5TransientGlobalAttention):
            raise BlockedAttentionError(
                f"model: expected attention whose keys are tokens, got LongT5 transient-global attention at {name!r}: "
                "each query also attends to one key per block of global_block_size tokens, made from the "
                "layer-normed sum of the block, whose value is no combination of the tokens' values, so no (n, n) "
                "map carries its output; capture(model.decoder) records the decoder alone"
            )
        if isinstance(module, longt5.LongT5LocalAttention):
            found.append((name, module))
    return found


def _heads(module: nn.Module, linear: nn.Module, hidden: Tensor) -> Tensor:
    """(batch, heads, n, d_kv) of a T5-style projection."""
    batch, n = hidden.shape[:2]
    return linear(hidden).view(batch, n, module.n_heads, module.key_value_proj_dim).transpose(1, 2)  # type: ignore[arg-type]


def _local_path(module: nn.Module, hidden: Tensor, probs: Tensor) -> Tensor:
    """W_o·merge_heads(A·v) of a LongT5 local layer for the token matrix A (batch, heads, n, n)."""
    v = _heads(module, module.v, hidden)  # type: ignore[arg-type]
    out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2)
    return module.o(out.reshape(hidden.shape[0], hidden.shape[1], -1))  # type: ignore[operator]


def _longt5_local_hooks(att: Attentions, modules: list[tuple[str, nn.Module]],
                        blocked_records: dict[tuple[int, int, tuple[int, ...]], tuple[Tensor, Record]]) -> list[Any]:
    """Hooks recording each LongT5 local attention call as its (n, n) token map (`scatter_local_blocks`).

    The call is made with output_attentions=True (the blocked map is taken off the module's output again
    unless the caller asked for it); `blocked_records` maps the blocked tensor to its record, so the maps the
    model returns are matched with the records. With grads=True the recorded matrix is a fresh leaf that
    reaches the loss through the zero term W_o(A·v) − W_o(stop_grad(A)·v) added to the layer's output.
    """
    asked: list[bool] = []

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        asked.append(bool(kwargs.get("output_attentions")))
        return args, {**kwargs, "output_attentions": True}

    def hook_for(name: str) -> Callable[..., Any]:
        def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: tuple[Tensor, ...]) -> Any:
            user_asked = asked.pop()
            hidden = args[0] if args else kwargs["hidden_states"]
            blocked = output[-1]
            batch, n = hidden.shape[:2]
            probs = scatter_local_blocks(blocked.detach(), n)
            mask = kwargs.get("mask")
            if mask is None:
                key_mask = torch.ones(batch, n, dtype=torch.bool, device=probs.device)
            else:  # (batch, 1, blocks, ℓ, 3ℓ): token j·ℓ + r is real iff it may see itself, column ℓ + r of row r
                ell = blocked.shape[-2]
                key_mask = (mask[:, 0] > 0).diagonal(offset=ell, dim1=-2, dim2=-1).reshape(batch, -1)[:, :n]
            qk: tuple[Tensor | None, Tensor | None, float | None] = (None, None, None)
            if att.qk_requested:  # T5 scores are q·k without a scale
                with torch.no_grad():
                    qk = (_heads(module, module.q, hidden).detach(), _heads(module, module.k, hidden).detach(), 1.0)
            out = output if user_asked else output[:-1]
            if att.grads_requested and torch.is_grad_enabled():
                probs = probs.requires_grad_()
                delta = _local_path(module, hidden, probs) - _local_path(module, hidden, probs.detach())
                out = (out[0] + delta.to(out[0].dtype), *out[1:])
            record = Record(name, probs, key_mask, key_mask, "transformers", *qk)
            att.records.append(record)
            blocked_records[_storage(blocked)] = (blocked, record)
            return out

        return after

    handles = []
    for name, module in modules:
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True))
    return handles


# -- transformers models without AttentionInterface: the maps of output_attentions=True ---------------------
_MAP_FIELDS = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")


def _returned_maps(output: Any) -> list[tuple[str, list[Tensor]]]:
    """(field, maps) of every attention field of a model output, nested outputs included (prefixed)."""
    items = output.items() if hasattr(output, "items") else []
    found: list[tuple[str, list[Tensor]]] = []
    for key, value in items:
        if key in _MAP_FIELDS and isinstance(value, (tuple, list)):
            found.append((key, [t for t in value if isinstance(t, Tensor)]))
        elif hasattr(value, "items") and not isinstance(value, Tensor):
            found += [(f"{key}.{name}", maps) for name, maps in _returned_maps(value)]
    return found


def _call_order(found: list[tuple[str, list[Tensor]]]) -> list[tuple[str, Tensor]]:
    """(name, map) in the order the model ran them: encoder layers, then decoder self and cross per layer."""
    by_field = dict(found)
    order: list[tuple[str, Tensor]] = []
    for name, maps in found:
        if name.endswith(("decoder_attentions", "cross_attentions")):
            continue
        order += [(f"{name}.{i}", t) for i, t in enumerate(maps)]
    for prefix in dict.fromkeys(n.rpartition(".")[0] for n, _ in found if n.endswith(("decoder_attentions", "cross_attentions"))):
        dot = f"{prefix}." if prefix else ""
        own, cross = by_field.get(f"{dot}decoder_attentions", []), by_field.get(f"{dot}cross_attentions", [])
        for i in range(max(len(own), len(cross))):
            order += [(f"{dot}decoder_attentions.{i}", own[i])] if i < len(own) else []
            order += [(f"{dot}cross_attentions.{i}", cross[i])] if i < len(cross) else []
    return order


def _mask_for(given: Tensor | None, probs: Tensor) -> Tensor:
    """bool (batch, n_k): the call's 2-D mask when it covers the keys, else the keys some query gives weight."""
    batch, _, _, n_k = probs.shape
    if isinstance(given, Tensor) and given.dim() == 2 and tuple(given.shape) == (batch, n_k):
        return given.to(device=probs.device, dtype=torch.bool)
    return (probs.detach() > 0).any(dim=-2).any(dim=1)


def _takes(model: nn.Module, name: str) -> bool:
    """Whether model.forward accepts the keyword `name` (by name or through **kwargs)."""
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _storage(t: Tensor) -> tuple[int, int, tuple[int, ...]]:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def _output_hooks(att: Attentions, model: nn.Module,
                  blocked_records: dict[tuple[int, int, tuple[int, ...]], tuple[Tensor, Record]]) -> list[Any]:
    """Hooks asking the top-level call for output_attentions=True and completing the records with the returned
    maps the recorder did not see (all of them for a model outside AttentionInterface); LongT5's blocked local
    maps are matched with the token maps their hooks recorded (`blocked_records`). The maps are removed from
    the outputs unless asked for."""
    calls: list[tuple[bool, bool, int, Tensor | None, Tensor | None]] = []

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        as_tuple = kwargs.get("return_dict") is False  # read the maps by name, give the tuple back after
        calls.append((bool(kwargs.get("output_attentions")), as_tuple, len(att.records), kwargs.get("attention_mask"),
                      kwargs.get("decoder_attention_mask")))
        return args, {**kwargs, "output_attentions": True, **({"return_dict": True} if as_tuple else {})}

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        user_asked, as_tuple, start, encoder_mask, decoder_mask = calls.pop()
        found = _returned_maps(output)
        recorded = {_storage(r.weights): r for r in att.records[start:]}
        partly = bool(recorded)
        ordered, unseen = [], []
        for name, probs in _call_order(found):
            blocked = blocked_records.pop(_storage(probs), None)
            if blocked is not None:  # LongT5's local map (batch, blocks, heads, ℓ, 3ℓ), recorded as (n, n)
                ordered.append(recorded.pop(_storage(blocked[1].weights), blocked[1]))
                continue
            if probs.dim() != 4:
                why = f"{name}: returned maps of shape {tuple(probs.shape)}, not (batch, heads, n_q, n_k)"
                att.skipped += [why] if why not in att.skipped else []
                unseen.append(name)
                continue
            rec = recorded.pop(_storage(probs), None)
            if rec is None:
                rec = _returned_record(att, name, probs, decoder_mask if "decoder_attentions" in name else encoder_mask)
                unseen.append(name)
            ordered.append(rec)
        if unseen:
            att.records[start:] = ordered + [r for r in att.records[start:] if _storage(r.weights) in recorded]
            if att.fallback is None:
                att.fallback = (
                    f"{len(unseen)} attention call(s) of {type(model).__name__} ({', '.join(unseen[:3])}"
                    f"{', …' if len(unseen) > 3 else ''}) do not dispatch through transformers' AttentionInterface: "
                    "their maps are those it returns with output_attentions=True"
                )
                if partly:  # the recorder saw the others (a model outside it entirely was reported up front)
                    warnings.warn(f"capture: {att.fallback}", UserWarning, stacklevel=2)
        blocked_records.clear()
        if not user_asked and found and hasattr(output, "keys"):
            output = _without(output, {name.partition(".")[0] for name, _ in found})
        return output.to_tuple() if as_tuple and hasattr(output, "to_tuple") else output

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True)]


def _returned_record(att: Attentions, name: str, probs: Tensor, given: Tensor | None) -> Record:
    """A record of a map the model returned (output field `name`), masks from the call's 2-D mask."""
    key_mask = _mask_for(given, probs)
    batch, _, n_q, n_k = probs.shape
    cross = "cross_attentions" in name
    query_mask = torch.ones(batch, n_q, dtype=torch.bool, device=probs.device) if cross else key_mask[:, n_k - n_q:]
    if att.grads_requested and probs.requires_grad:
        probs.retain_grad()
        return Record(name, probs, query_mask, key_mask, "transformers")
    return Record(name, probs.detach(), query_mask, key_mask, "transformers")


def _without(output: Any, fields: set[str]) -> Any:
    """A copy of a model output without `fields` (at the top level, or inside the nested outputs named)."""
    kept = {}
    for key, value in output.items():
        if key in fields and key in _MAP_FIELDS:
            continue
        if key in fields and hasattr(value, "items"):
            value = _without(value, set(_MAP_FIELDS))
        kept[key] = value
    return type(output)(**kept)


@contextmanager
def capture(model: nn.Module, *, grads: bool = False, qk: bool = False) -> Iterator[Attentions]:
    """Record the attention probabilities of every attention call of `model` inside the context.

    grads: keep the probabilities in the autograd graph with `retain_grad`, so that after a
    `backward()` `Attentions.grads` holds d loss / d attention (module docstring).
    qk: also record the per-head queries and keys of every call (`Attentions.queries` / `.keys`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    att = Attentions(grads_requested=grads, qk_requested=qk)
    hf = is_transformers_model(model)
    recorder = hf and dispatches(model)
    longt5_local = _longt5_local_modules(model) if hf else []
    blocked_records: dict[tuple[int, int, tuple[int, ...]], tuple[Tensor, Record]] = {}
    hooked: list[tuple[str, nn.Module]] = []  # checked before any hook is registered: an error leaves none behind
    mechanisms = attnlab_modules(model)
    for name, module in mechanisms:
        spec = module.spec  # type: ignore[union-attr]
        if spec.supports is None or not spec.supports.materialize:
            att.skipped.append(name or type(module).__name__)
            continue
        if grads and not callable(getattr(module, "attention_path", None)):
            raise TypeError(
                f"grads: module {name or type(module).__name__!r} ({spec.name}) has no `attention_path` (the part of "
                "its output linear in its attention matrix), so the matrix has no path to the loss; use grads=False"
            )
        if qk and not callable(getattr(module, "project", None)):
            raise TypeError(
                f"qk: module {name or type(module).__name__!r} ({spec.name}) has no project(x, context) giving its "
                "per-head queries and keys; use qk=False"
            )
        hooked.append((name or spec.name, module))
    if hf and not recorder:
        if qk:
            raise TypeError(
                f"qk: {type(model).__name__} does not dispatch attention through transformers' AttentionInterface; "
                "its maps come from output_attentions=True, without queries and keys; use qk=False"
            )
        att.fallback = (
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface: "
            "recording the maps it returns with output_attentions=True"
        )
        warnings.warn(f"capture: {att.fallback}", UserWarning, stacklevel=3)
    handles = [module.register_forward_hook(_attnlab_hook(att, name, grads), with_kwargs=True) for name, module in hooked]
    with contextlib.ExitStack() as stack:
        try:
            if recorder:
                stack.enter_context(transformers_implementation(model))
                names = {id(m): n for n, m in model.named_modules()}
                _ACTIVE.append((att, names))
            handles += _longt5_local_hooks(att, longt5_local, blocked_records)
            if hf and _takes(model, "output_attentions"):
                handles += _output_hooks(att, model, blocked_records)
            elif not mechanisms and not hf:
                raise TypeError(
                    f"model: {type(model).__name__} holds no attnlab mechanism and is not a transformers model; "
                    "nothing to capture"
                )
            if hf:
                handles.append(model.register_forward_pre_hook(_input_hook(att), with_kwargs=True))
            yield att
        finally:
            for h in handles:
                h.remove()
            if recorder:
                _ACTIVE[:] = [entry for entry in _ACTIVE if entry[0] is not att]


@contextmanager
def transformers_implementation(model: nn.Module) -> Iterator[None]:
    """Run a transformers model (and its sub-models) with the "attnlab_capture" attention inside the
    context — each attention call runs the model's own eager function, recorded (module docstring);
    every config's previous implementation comes back on exit, also after an error."""
    if not dispatches(model):
        raise TypeError(
            f"model: {type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so its attention cannot be changed at run time"
        )
    _register_with_transformers()
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in _configs(model)]
    try:
        with _own_eager():
            model.set_attn_implementation(IMPLEMENTATION)  # type: ignore[operator]
            if model.config._attn_implementation != IMPLEMENTATION:  # type: ignore[union-attr]
                raise TypeError(
                    f"model: {type(model).__name__} does not dispatch attention through transformers' "
                    "AttentionInterface, so its attention cannot be changed at run time"
                )
            yield
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl


def as_layers(attentions: Attentions | Sequence[Tensor] | Tensor) -> list[Tensor]:
    """Attention maps as a list of (batch, heads, n_q, n_k) tensors, from a capture or given directly."""
    if isinstance(attentions, Attentions):
        return attentions.layers
    if isinstance(attentions, Tensor):
        if attentions.dim() == 4:
            return [attentions]
        if attentions.dim() == 5:
            return list(attentions.unbind(0))
        raise ValueError(
            f"attentions: expected (batch, heads, n_q, n_k) or (layers, batch, heads, n_q, n_k), got shape {tuple(attentions.shape)}"
        )
    layers = list(attentions)
    for i, t in enumerate(layers):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"attentions[{i}]: expected a (batch, heads, n_q, n_k) tensor, got {shape}")
    return layers
