"""Relevance of input tokens through attention: P035 (generic, gradient-weighted) and P111 (LRP).

* `generic_relevance(model, inputs)` — P035, Chefer, Gur & Wolf 2021 (below): self-attention,
  cross-attention and encoder–decoder models, any model `capture` records.
* `lrp_relevance(model, inputs)` — P111, Chefer, Gur & Wolf 2021: the same rollout over
  self-attention layers with Ā = E_h[(∇A ⊙ R^(A))^+], R^(A) the LRP relevance of the attention map,
  propagated by the paper's rules without editing model code (see its docstring for the rules).
* `propagate_relevance(cams, calls, masks)` — the update rules on given maps Ā.

`generic_relevance(model, inputs)` explains a scalar y per sequence (the target, below) by
relevance maps between tokens, built from every attention call of the model in call order:

    Ā = E_h[(∇_A y ⊙ A)^+]                                   (eq. 5: per call, heads averaged)

where A (batch, heads, n_q, n_k) and ∇_A y come from `capture(model, grads=True)` and belong to
the same call (`att.layers[l]`, `att.grads[l]`, one `Record` each: never shifted by a layer).
Tokens belong to streams (modalities): "tokens" for an encoder or a causal LM; "encoder" and
"decoder" for an encoder–decoder. R^{xy}[i, j] is the relevance of token j of stream y for token i
of stream x; R^{xx} = I and R^{xy} = 0 (x ≠ y) at the start. For each call, in call order:

* self-attention in stream s (eq. 6, 7):      R^{sy} ← R^{sy} + Ā·R^{sy}   for every stream y
* cross-attention, queries s, keys q (eq. 10, 11), both additions from the state before the call:
      R^{sq} ← R^{sq} + (R̄^{ss})ᵀ·Ā·R̄^{qq}        R^{ss} ← R^{ss} + Ā·R^{qs}
  with R̄^{xx} = row_normalise(R^{xx} − I) + I (eq. 8, 9); a row of R^{xx} − I that sums to 0
  stays 0 (the official code would divide by zero there).

In an encoder–decoder R^{ed} stays 0 (the encoder never sees the decoder), so the cross-attention
adds nothing to R^{dd}; R^{de} gathers the relevance of the source tokens for every decoder token.

Streams of the calls: by default, in a capture without cross-attention every call is
self-attention in "tokens"; with cross-attention (a transformers module with
`is_cross_attention`, or named "encoder_attn", "EncDecAttention", "encoder_decoder_attention" or with a part containing
"cross", as `capture` decides) the cross calls are ("decoder", "encoder") and a self-attention
call is in "decoder" when a part of its module name starts with "decoder", else in "encoder".
Other layouts (a bi-modal model, attnlab modules called with `context=`) pass
`streams(name, is_cross) -> (query stream, key stream)`.

Target y (one scalar per sequence; `target=` takes any callable outputs -> (batch,) tensor):

* outputs with logits (batch, n, vocab) — a causal LM or an encoder–decoder: the logit of the
  predicted (argmax) next token at the explained position;
* logits (batch, classes) — a classifier: the logit of the predicted class;
* no logits (an encoder without a head, e.g. MiniLM; or a plain tensor (batch, n, d)): the norm
  of the mean-pooled embedding over the real tokens, ‖Σ_i m_i h_i / Σ_i m_i‖ — the sentence
  embedding MiniLM is trained to produce.

The explained position (`position=`, an int or one per sequence): by default 0 ([CLS]) for an
encoder, the last real token for a causal LM and the last real decoder token for an
encoder–decoder. `scores[b, j] = R^{oi}[b, p_b, j] − [o = i, j = p_b]`: the row of the position in
the map from the output stream o to the input stream i ("encoder" for an encoder–decoder), without
the identity R starts from (a token's own 1 is no relevance). The sequences of a batch must not
interact (any model in eval mode): y is summed over the batch before the backward pass.

Padding: padded tokens of every stream have no row and no column in any R (the identity is only
put on real tokens), so they score 0. Cross-attention rows of padded decoder tokens are dropped too.
Everything is float64 on CPU.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from .capture import Attentions, capture, is_cross_attention

P035 = Paper(
    "P035",
    "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers",
    2021,
    "2103.15679",
)

Streams = Callable[[str, bool], tuple[str, str]]
Target = Callable[[Any], Tensor]
_CROSS_PARTS = ("encoder_attn", "EncDecAttention", "encoder_decoder_attention")


@dataclass
class Relevance:
    """Relevance maps between the tokens of every stream, and the scores of the explained position."""

    matrices: dict[tuple[str, str], Tensor]  # (x, y) -> R^{xy} (batch, n_x, n_y) float64
    masks: dict[str, Tensor]  # stream -> bool (batch, n), True = real token
    cams: list[Tensor]  # Ā of every call (batch, n_q, n_k) float64, in call order
    names: list[str]  # the module of every call, in the same order
    calls: list[tuple[str, str]]  # (query stream, key stream) of every call
    output: str  # the stream of the explained position
    input: str  # the stream whose tokens are scored
    position: Tensor  # (batch,) explained position in the output stream
    target: Tensor | None = None  # y per sequence, when computed here
    attention_relevance: list[Tensor] | None = None  # P111: R^(A) (batch, heads, n_q, n_k) per call
    input_relevance: Tensor | None = None  # P111: LRP relevance of every input token (batch, n)

    def matrix(self, rows: str, cols: str) -> Tensor:
        """R^{rows, cols} (batch, n_rows, n_cols)."""
        if (rows, cols) not in self.matrices:
            raise ValueError(f"matrix: expected two of the streams {sorted(self.masks)}, got ({rows!r}, {cols!r})")
        return self.matrices[(rows, cols)]

    @property
    def scores(self) -> Tensor:
        """(batch, n_input): relevance of every input token for the explained position; padding 0."""
        r = self.matrices[(self.output, self.input)]
        rows = r[torch.arange(r.shape[0]), self.position].clone()
        if self.output == self.input:
            rows[torch.arange(r.shape[0]), self.position] -= self.masks[self.input][torch.arange(r.shape[0]), self.position].to(rows.dtype)
        return rows


# -- Ā and the update rules --------------------------------------------------------------------
def weighted_attention(attn: Tensor, grad: Tensor) -> Tensor:
    """Ā = E_h[(∇_A y ⊙ A)^+] (eq. 5): (batch, heads, n_q, n_k) twice -> (batch, n_q, n_k) float64."""
    if attn.dim() != 4 or attn.shape != grad.shape:
        raise ValueError(
            f"grad: expected the shape of attn, (batch, heads, n_q, n_k) = {tuple(attn.shape)}, got {tuple(grad.shape)}"
        )
    a = attn.detach().to("cpu", torch.float64)
    g = grad.detach().to("cpu", torch.float64)
    return (g * a).clamp(min=0).mean(dim=1)


def _residual_normalised(r: Tensor, eye: Tensor) -> Tensor:
    """R̄ = row_normalise(R − I) + I (eq. 8, 9); zero rows of R − I stay zero."""
    hat = r - eye
    total = hat.sum(-1, keepdim=True)
    return torch.where(total > 0, hat / torch.where(total > 0, total, 1.0), 0.0) + eye


def propagate_relevance(
    cams: Sequence[Tensor], calls: Sequence[tuple[str, str]], masks: Mapping[str, Tensor]
) -> dict[tuple[str, str], Tensor]:
    """Apply the update rules (module docstring) to the maps Ā of every call, in order.

    cams: Ā (batch, n_q, n_k) per call; calls: (query stream, key stream) per call, equal streams
    = self-attention; masks: bool (batch, n) real tokens per stream. Returns R^{xy} for every pair.
    """
    if len(cams) != len(calls):
        raise ValueError(f"calls: expected one (query stream, key stream) per map, {len(cams)}, got {len(calls)}")
    keep = {s: torch.as_tensor(m).to("cpu", torch.bool) for s, m in masks.items()}
    for i, (s, q) in enumerate(calls):
        for stream in (s, q):
            if stream not in keep:
                raise ValueError(f"calls[{i}]: stream {stream!r} has no mask; masks has {sorted(keep)}")
        shape = (keep[s].shape[0], keep[s].shape[1], keep[q].shape[1])
        if tuple(cams[i].shape) != shape:
            raise ValueError(f"cams[{i}]: expected shape {shape} (batch, n_{s}, n_{q}), got {tuple(cams[i].shape)}")
    eye = {s: torch.diag_embed(m.to(torch.float64)) for s, m in keep.items()}
    r = {(x, y): eye[x].clone() if x == y else torch.zeros(m.shape[0], m.shape[1], keep[y].shape[1], dtype=torch.float64)
         for x, m in keep.items() for y in keep}
    for cam, (s, q) in zip(cams, calls):
        a = cam.detach().to("cpu", torch.float64) * (keep[s][:, :, None] & keep[q][:, None, :])
        if s == q:
            for y in keep:
                r[(s, y)] = r[(s, y)] + a @ r[(s, y)]
            continue
        bar_s = _residual_normalised(r[(s, s)], eye[s])
        bar_q = _residual_normalised(r[(q, q)], eye[q])
        add_sq = bar_s.transpose(-1, -2) @ a @ bar_q
        add_ss = a @ r[(q, s)]
        r[(s, q)] = r[(s, q)] + add_sq
        r[(s, s)] = r[(s, s)] + add_ss
    return r


# -- streams, masks, positions, targets ----------------------------------------------------------
def _named_cross(name: str) -> bool:
    return any("cross" in p.lower() or p in _CROSS_PARTS for p in name.split("."))


def _calls(att: Attentions, model: nn.Module | None, streams: Streams | None) -> list[tuple[str, str]]:
    modules = dict(model.named_modules()) if model is not None else {}
    cross = [is_cross_attention(modules[n], n) if n in modules else _named_cross(n) for n in att.names]
    if streams is not None:
        out = []
        for n, c in zip(att.names, cross):
            pair = streams(n, c)
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise TypeError(f"streams: expected (query stream, key stream) strings for {n!r}, got {pair!r}")
            out.append(pair)
        return out
    if not any(cross):
        return [("tokens", "tokens")] * len(att.names)
    out = []
    for n, c in zip(att.names, cross):
        if c:
            out.append(("decoder", "encoder"))
        else:
            side = "decoder" if any(re.match("decoder", p) for p in n.split(".")) else "encoder"
            out.append((side, side))
    return out


def _stream_masks(att: Attentions, calls: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
    """Real tokens of every stream: the queries of its first self-attention call, else the keys of a call."""
    masks: dict[str, Tensor] = {}
    for rec, (s, q) in zip(att.records, calls):
        if s == q and s not in masks:
            masks[s] = rec.query_mask.to("cpu", torch.bool)
    for rec, (s, q) in zip(att.records, calls):
        if q not in masks:
            masks[q] = rec.key_mask.to("cpu", torch.bool)
        if s not in masks:
            masks[s] = rec.query_mask.to("cpu", torch.bool)
    return masks


def _last_real(mask: Tensor) -> Tensor:
    n = mask.shape[1]
    return torch.where(mask.any(-1), n - 1 - mask.flip(-1).to(torch.int8).argmax(-1), 0)


def _positions(position: int | Sequence[int] | Tensor | None, mask: Tensor, causal: bool) -> Tensor:
    batch, n = mask.shape
    if position is None:
        return _last_real(mask) if causal else torch.zeros(batch, dtype=torch.long)
    p = torch.as_tensor(position, dtype=torch.long).reshape(-1).cpu()
    if p.numel() == 1:
        p = p.expand(batch)
    if p.shape != (batch,) or (p < 0).any() or (p >= n).any():
        raise ValueError(f"position: expected one index in [0, {n}) or {batch} of them, got {position!r}")
    return p.clone()


def _logits(outputs: Any) -> Tensor | None:
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, Tensor) and outputs.dim() == 2:
        return outputs
    return None


def default_target(outputs: Any, position: Tensor, mask: Tensor) -> Tensor:
    """The documented default y per sequence (module docstring): predicted logit or embedding norm."""
    logits = _logits(outputs)
    if logits is not None:
        rows = logits[torch.arange(logits.shape[0]), position.to(logits.device)] if logits.dim() == 3 else logits
        return rows.gather(-1, rows.detach().argmax(-1, keepdim=True)).squeeze(-1)
    hidden = getattr(outputs, "last_hidden_state", outputs)
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise TypeError(
            f"target: outputs of type {type(outputs).__name__} have no logits nor hidden states (batch, n, d); pass target="
        )
    m = mask.to(hidden.device, hidden.dtype)[..., None]
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).norm(dim=-1)


def _check_batches(att: Attentions) -> None:
    """ValueError when the records disagree on the batch: maps per window (Swin) are not token × token maps."""
    batches = {r.weights.shape[0]: r.name for r in att.records}
    if len(batches) > 1:
        shown = ", ".join(f"{name} ({b})" for b, name in batches.items())
        raise ValueError(
            f"model: the attention calls have different batch sizes ({shown}): maps per window (e.g. Swin's windowed "
            "attention) are not token × token maps of the sequence, so relevance does not apply"
        )


def _pool_mask(att: Attentions, masks: Mapping[str, Tensor], output: str, calls: Sequence[tuple[str, str]]) -> Tensor:
    """Real tokens pooled by the default target: the model call's mask when the explained stream is the one
    the input enters (first call) and the shapes agree, else that stream's own mask (the decoder of an
    encoder–decoder without LM head, the frames of an audio model whose call mask is per sample)."""
    given = att.input_mask
    own = masks[output]
    return given if given is not None and output == calls[0][0] and given.shape == own.shape else own


def _run(model: nn.Module, inputs: Mapping[str, Any] | Tensor, target: Target | None, position: Any,
         streams: Streams | None) -> tuple[Attentions, Tensor, list[tuple[str, str]], dict[str, Tensor], str, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, (Mapping, Tensor)):
        raise TypeError(f"inputs: expected a mapping of model inputs or a tensor, got {type(inputs).__name__}")
    with torch.enable_grad(), capture(model, grads=True) as att:
        outputs = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
        if not att.records:
            raise ValueError("model: no attention call was captured")
        _check_batches(att)
        calls = _calls(att, model, streams)
        masks = _stream_masks(att, calls)
        output = "decoder" if "decoder" in masks and streams is None else calls[-1][0]
        logits = _logits(outputs)
        causal = logits is not None and logits.dim() == 3
        pos = _positions(position, masks[output], causal)
        pool = _pool_mask(att, masks, output, calls)
        y = target(outputs) if target is not None else default_target(outputs, pos, pool)
        batch = masks[output].shape[0]
        if not isinstance(y, Tensor) or y.shape != (batch,):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"target: expected one scalar per sequence, shape ({batch},), got {got}")
        leaves = [r.weights for r in att.records if r.weights.requires_grad]
        if len(leaves) != len(att.records):
            raise ValueError("model: some attention calls are not in the autograd graph (run without torch.no_grad)")
        y.sum().backward(inputs=leaves)
    return att, y.detach(), calls, masks, output, pos


def _input_stream(masks: Mapping[str, Tensor], output: str) -> str:
    return "encoder" if output == "decoder" and "encoder" in masks else output


def generic_relevance_from(
    att: Attentions,
    *,
    position: int | Sequence[int] | Tensor | None = None,
    streams: Streams | None = None,
    output: str | None = None,
    input: str | None = None,
) -> Relevance:
    """P035 from a capture with grads whose backward pass has run (`capture(model, grads=True)`).

    output / input: the streams of the explained position and of the scored tokens (defaults as
    in `generic_relevance`); position: default 0.
    """
    if not isinstance(att, Attentions):
        raise TypeError(f"att: expected the Attentions of a capture, got {type(att).__name__}")
    calls = _calls(att, None, streams)
    masks = _stream_masks(att, calls)
    out_stream = output or ("decoder" if "decoder" in masks and streams is None else calls[-1][0])
    in_stream = input or _input_stream(masks, out_stream)
    for name, s in (("output", out_stream), ("input", in_stream)):
        if s not in masks:
            raise ValueError(f"{name}: expected one of the streams {sorted(masks)}, got {s!r}")
    cams = [weighted_attention(a, g) for a, g in zip(att.layers, att.grads)]
    pos = _positions(position, masks[out_stream], False)
    return Relevance(propagate_relevance(cams, calls, masks), masks, cams, att.names, calls, out_stream, in_stream, pos)


def generic_relevance(
    model: nn.Module,
    inputs: Mapping[str, Any] | Tensor,
    *,
    target: Target | None = None,
    position: int | Sequence[int] | Tensor | None = None,
    streams: Streams | None = None,
) -> Relevance:
    """P035 gradient-weighted relevance of `model` on `inputs` (a dict of keyword inputs, or one tensor).

    Runs the model once under `capture(model, grads=True)`, back-propagates y = target(outputs)
    (default in the module docstring) to the attention maps only (no parameter .grad is touched),
    and applies the update rules. Returns `Relevance`: `scores` (batch, n), `matrices`, `cams`.
    """
    att, y, calls, masks, output, pos = _run(model, inputs, target, position, streams)
    cams = [weighted_attention(a, g) for a, g in zip(att.layers, att.grads)]
    return Relevance(propagate_relevance(cams, calls, masks), masks, cams, att.names, calls, output,
                     _input_stream(masks, output), pos, y)


_MODEL = Param("model", nn.Module, doc="a transformers model or a model holding attnlab mechanisms")
_INPUTS = Param("inputs", (Mapping, Tensor), doc="keyword inputs of the model (e.g. a tokenizer's batch) or one tensor")
_COMMON = (
    _MODEL,
    _INPUTS,
    Param("target", object, None, "callable outputs -> (batch,) scalar to explain (default: predicted logit, "
          "or norm of the mean-pooled embedding for an encoder without head)", optional=True),
    Param("position", (int, list, tuple, Tensor), None, "explained position (default CLS / last real token)", optional=True),
    Param("streams", object, None, "callable (module name, is_cross) -> (query stream, key stream)", optional=True),
)

add(
    Spec(
        name="relevance-generic",
        kind="analysis",
        paper=P035,
        factory=generic_relevance,
        family="E",
        summary="gradient-weighted relevance propagated through self-, cross- and encoder-decoder attention",
        params=_COMMON,
    )
)


# == P111: LRP relevance of the attention maps (Chefer, Gur & Wolf 2021) ============================
P111 = Paper("P111", "Transformer Interpretability Beyond Attention Visualization", 2021, "2012.09838")


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _reduce_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to an operand's shape."""
    while g.dim() > len(shape):
        g = g.sum(0)
    for d, size in enumerate(shape):
        if size == 1 and g.shape[d] != 1:
            g = g.sum(d, keepdim=True)
    return g


class _LinearAlphaBeta(torch.autograd.Function):
    """y = x Wᵀ + b; backward carries s = R/· with LRP-α1β0: R_x = x⁺·W⁺ᵀ(R_y/Z) + x⁻·W⁻ᵀ(R_y/Z), Z = W⁺x⁺ + W⁻x⁻."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = nn.functional.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx: Any, s: Tensor) -> tuple[Tensor, None, None]:
        x, weight, y = ctx.saved_tensors
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        z = nn.functional.linear(x.clamp(min=0), wp) + nn.functional.linear(x.clamp(max=0), wn)
        q = _safe_div(s * y, z)
        gx = torch.where(x > 0, q @ wp, torch.where(x < 0, q @ wn, torch.zeros_like(x)))
        return gx, None, None


class _PassThrough(torch.autograd.Function):
    """y = f(x) elementwise-shaped (softmax, norms, activations): relevance passes unchanged, R_x = R_y."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(x, y)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, s: Tensor) -> tuple[Tensor, None]:
        x, y = ctx.saved_tensors
        return _safe_div(s.to(x.dtype) * y.to(x.dtype), x), None


class _NormalisedAdd(torch.autograd.Function):
    """y = a + b with P111's normalised addition, per sequence (dim 0): the z-rule shares a_r = a·R/y,
    b_r = b·R/y are rescaled so that a receives |Σa_r|/(|Σa_r| + |Σb_r|) of ΣR, b the rest."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx: Any, s: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        dims = tuple(range(1, s.dim())) if s.dim() >= 2 else tuple(range(s.dim()))
        sa = (a * s).sum(dims, keepdim=True)
        sb = (b * s).sum(dims, keepdim=True)
        total, both = sa + sb, sa.abs() + sb.abs()
        fa = _safe_div(sa.abs() * total, both * sa)
        fb = _safe_div(sb.abs() * total, both * sb)
        return _reduce_to(fa * s, a.shape), _reduce_to(fb * s, b.shape)


def _halved(out: Tensor) -> Tensor:
    """A product of two activations: each operand gets its gradient-times-input share, halved (conservation)."""
    return 0.5 * out + 0.5 * out.detach()


def _is_act(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()


def _norm_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """A normalisation module written out in ops (e.g. RMSNorm) passes relevance through as a whole."""
    x = args[0] if args else None
    if _is_act(x) and isinstance(output, Tensor) and output.shape == x.shape:
        return _PassThrough.apply(x, output.detach())
    return None


_F = nn.functional
_PASS = {torch.softmax, _F.softmax, Tensor.softmax, _F.layer_norm, _F.gelu, _F.silu, _F.relu, torch.relu, Tensor.relu,
         torch.tanh, Tensor.tanh, torch.sigmoid, Tensor.sigmoid, _F.group_norm, _F.rms_norm}
_NORMS = ("RMSNorm", "LayerNorm")
_SOFTMAX = {torch.softmax, _F.softmax, Tensor.softmax}
_ADD = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}
_PRODUCT = {torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm, torch.mul, Tensor.mul,
            Tensor.__mul__, Tensor.__rmul__}


class _LRPMode(torch.overrides.TorchFunctionMode):
    """Runs a forward pass whose backward pass carries LRP relevance ratios s = R / activation."""

    def __init__(self) -> None:
        super().__init__()
        self.attentions: list[Tensor] = []  # softmax outputs (batch, heads, n_q, n_k), call order
        self.leaves: list[Tensor] = []  # embedding outputs and float inputs: where relevance arrives
        self.inputs: list[Tensor] = []  # the leaves that stand for the input tokens
        self.lookups: list[tuple[Tensor, Tensor]] = []  # (indices, embedding leaf) of every lookup

    def _softmax(self, scores: Tensor, y: Tensor) -> Tensor:
        a = _PassThrough.apply(scores, y)
        if a.dim() == 4:
            a.retain_grad()
            self.attentions.append(a)
        return a

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores = (_halved(scores) if _is_act(q) and _is_act(k) else scores) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            n_q, n_k = scores.shape[-2:]
            keep = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = torch.nan_to_num(torch.softmax(scores.detach(), dim=-1), nan=0.0)
        a = self._softmax(scores, probs) if _is_act(scores) else probs
        out = torch.matmul(a, v)
        return _halved(out) if _is_act(a) and _is_act(v) else out

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _PASS and args and _is_act(args[0]):
            with torch.no_grad():
                y = func(args[0].detach(), *args[1:], **kwargs)
            return self._softmax(args[0], y) if func in _SOFTMAX else _PassThrough.apply(args[0], y)
        if func is _F.linear and _is_act(args[0]):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if not _is_act(weight) and not _is_act(bias):
                return _LinearAlphaBeta.apply(args[0], weight, bias)
        if func is _F.embedding:
            leaf = func(*args, **kwargs).detach().requires_grad_()
            self.leaves.append(leaf)
            self.lookups.append((args[0] if args else kwargs["input"], leaf))
            return leaf
        if func is _F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func in _ADD and len(args) == 2 and _is_act(args[0]) and _is_act(args[1]) and kwargs.get("alpha", 1) == 1:
            return _NormalisedAdd.apply(args[0], args[1])
        out = func(*args, **kwargs)
        if func in _PRODUCT and len(args) == 2 and _is_act(args[0]) and _is_act(args[1]):
            return _halved(out)
        if func is torch.einsum and sum(_is_act(t) for t in (args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])) == 2:
            return _halved(out)
        return out


def _leaf_inputs(inputs: Mapping[str, Any] | Tensor, mode: _LRPMode) -> Mapping[str, Any] | Tensor:
    """Floating-point inputs become leaves whose relevance is read after the backward pass."""
    def leaf(t: Any) -> Any:
        if isinstance(t, Tensor) and t.is_floating_point():
            t = t.detach().requires_grad_()
            mode.leaves.append(t)
            mode.inputs.append(t)
        return t

    return {k: leaf(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else leaf(inputs)


def lrp_relevance(
    model: nn.Module,
    inputs: Mapping[str, Any] | Tensor,
    *,
    target: Target | None = None,
    position: int | Sequence[int] | Tensor | None = None,
) -> Relevance:
    """P111: C = Π_b (I + E_h[(∇A ⊙ R^(A))^+]) with R^(A) the LRP relevance of every attention map.

    Two passes over `inputs`. The first, under `capture(model, grads=True)`, gives ∇_A y for the
    target y (the defaults of `generic_relevance`). The second propagates relevance by LRP: the
    forward pass runs under a torch function mode that gives every operation its P111 rule for the
    backward pass, which then carries the ratios s = R / activation, so that the relevance of any
    tensor t is t ⊙ s_t. It starts from R_y = 1 for every sequence (s_y = 1 / y); the rules, as
    in the paper's official code:

    * `F.linear` (weights and biases constant): LRP-α1β0, R_x = x⁺·W⁺ᵀ(R_y/Z) + x⁻·W⁻ᵀ(R_y/Z),
      Z = W⁺x⁺ + W⁻x⁻ (bias not in Z, no ε: a zero Z passes nothing);
    * softmax, layer_norm, rms_norm, group_norm, gelu, silu, relu, tanh, sigmoid: relevance passes
      unchanged element by element, R_x = R_y;
    * a product of two activations (matmul, bmm, mul, einsum — A·V and Q·Kᵀ in attention): each
      operand gets its gradient-times-input share x ⊙ ∂y/∂x·(R_y/y), halved so the sum is conserved;
    * the sum of two activations (skip connections, embeddings): normalised addition, the z-rule
      shares rescaled per sequence so that each operand keeps |its share| / (sum of |shares|) of ΣR;
    * `F.scaled_dot_product_attention` (attnlab's fast path, transformers' "sdpa") is decomposed
      into the products and the softmax above, so its A is recorded too;
    * every other operation (reshapes, scaling or masking by constants, indexing, the target's own
      ops) carries s as a plain gradient — the z-rule for a linear map of one activation.
    Model parameters are constants in this pass (their requires_grad is restored after);
    relevance arrives at the embedding lookups (`F.embedding`) and at the floating-point inputs.

    R^(A) = A ⊙ s_A is the relevance of each softmax output of shape (batch, heads, n_q, n_k), in
    call order; they are paired with the captured calls by order and shape (a mismatch, e.g. a
    mechanism without softmax, raises ValueError). Results: `attention_relevance` (R^(A), padding
    0), `cams` (Ā), `matrices[("tokens", "tokens")]` = C, `scores` its row at the explained
    position without the identity, and `input_relevance` (batch, n): the relevance of each input
    token: what reaches the embedding lookup of `input_ids` (or the floating-point inputs of shape
    (batch, n, ·)), summed over features. Relevance is conserved: over all lookups and inputs it
    sums to 1 per sequence (up to constants added to activations outside `F.linear`), but the
    position and token-type embeddings added to the token embeddings take their share by the
    normalised addition, as in the paper's code. Covers self-attention models (encoders, causal LMs, stacks of
    attnlab modules); for cross-attention use `generic_relevance`. Normalisation modules written out
    as ops in model code (class names ending in "RMSNorm" or "LayerNorm", e.g. Llama's) pass
    relevance through as a whole, like `F.layer_norm`; other such code gets the rules of its ops.
    The ratios divide by activations and by the Z of the rules, so the values follow the model's
    rounding: on MiniLM in float32 R^(A) differs from the float64 model's by a few per cent and
    `input_relevance` more; run a float64 copy (`model.double()`) for stable numbers.
    """
    att, y, calls, masks, output, pos = _run(model, inputs, target, position, None)
    if any(s != q for s, q in calls):
        raise ValueError("model: relevance-lrp (P111) covers self-attention only; use generic_relevance for cross-attention")
    grads, records = att.grads, list(att.records)
    params = [p for p in model.parameters() if p.requires_grad]
    mode = _LRPMode()
    hooks: list[Any] = []
    try:
        for p in params:
            p.requires_grad_(False)
        hooks = [m.register_forward_hook(_norm_hook) for m in model.modules() if type(m).__name__.endswith(_NORMS)]
        with torch.enable_grad():
            with mode:
                given = _leaf_inputs(inputs, mode)
                outputs = model(**given) if isinstance(given, Mapping) else model(given)
            pool = _pool_mask(att, masks, output, calls)
            y2 = target(outputs) if target is not None else default_target(outputs, pos, pool)
            reached = [t for t in mode.attentions + mode.leaves if t.requires_grad]
            if y2.requires_grad and reached:
                (y2 * _safe_div(torch.ones_like(y2), y2.detach())).sum().backward(inputs=reached)
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    found = [tuple(a.shape) for a in mode.attentions]
    wanted = [tuple(r.weights.shape) for r in records]
    if found != wanted:
        raise ValueError(
            f"model: the LRP pass met softmax attention maps of shapes {found}, the capture recorded {wanted}; "
            "relevance-lrp needs every attention call to compute softmax probabilities (or use SDPA)"
        )
    rel_a = []
    for a, r in zip(mode.attentions, records):
        s = a.grad if a.grad is not None else torch.zeros_like(a)
        rel_a.append(r.masked((a.detach() * s).to("cpu", torch.float64)))
    cams = [(g.detach().to("cpu", torch.float64) * ra).clamp(min=0).mean(dim=1) for g, ra in zip(grads, rel_a)]
    keep = masks[output]
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    if isinstance(ids, Tensor) and not ids.is_floating_point():
        mode.inputs += [leaf for idx, leaf in mode.lookups if idx is ids or (idx.shape == ids.shape and torch.equal(idx, ids))]
    tokens = torch.zeros(keep.shape, dtype=torch.float64)
    for leaf in mode.inputs:
        if leaf.grad is not None and tuple(leaf.shape[:2]) == tuple(keep.shape):
            tokens += (leaf.detach() * leaf.grad).reshape(*keep.shape, -1).sum(-1).to("cpu", torch.float64)
    return Relevance(propagate_relevance(cams, calls, masks), masks, cams, att.names, calls, output, output, pos, y,
                     rel_a, tokens * keep)


add(
    Spec(
        name="relevance-lrp",
        kind="analysis",
        paper=P111,
        factory=lrp_relevance,
        family="E",
        summary="LRP relevance of each attention map, weighted by its gradient and rolled out over layers",
        params=_COMMON[:4],
    )
)
