"""Attention knockout between token groups inside a window of layers (P033), and the mask-editing context it rests on.

P033 (Kaduri, Bagon, Dekel: What's in the Image?) blocks the attention edges from a source group of tokens S (e.g. the
image tokens) to a target group T (the question tokens, or the last token) in a window W of consecutive layers by
setting their logits to −∞, and reads the change in the probability of the answer per window:

    s^l_ij = −∞   for l ∈ W, i ∈ T (query), j ∈ S (key),   otherwise the model's own scores
    drop(W) = mean_x [p(y | x) − p_W(y | x)],    relative(W) = mean_x [(p_W(y | x) − p(y | x)) / p(y | x)]

with p_W the answer probability under the knockout; the windows slide one layer at a time over the L layers
(starts 0 … L − w). A window whose drop is large carries the flow from S to T.

    from attnlab.analysis.knockout import knockout, group_keep, window_knockout
    keep = group_keep(n, sources=range(0, 4), targets=[n - 1])     # (n, n) bool, False = edge knocked out
    with knockout(model, {3: keep, 4: keep}):                      # layer -> keep mask (True = attend)
        logits = model(ids)
    curve = window_knockout(model, lambda: answer_probability(model), keep, window=2)
    curve.drop                                                      # (windows,) mean drop per window

`knockout(model, keep)` is the shared mask editor (P042's attention-based peeking uses it too). Layers are the
attention layers of the model in module order: for attnlab models its outermost registered mechanisms (the order
`capture` records them in), for transformers models its attention modules (those with `scaling` and `is_causal`).

* attnlab models: a forward pre-hook on each chosen mechanism narrows the call's `attn_mask` to `keep`
  (`core.masks.restrict`: bool masks are and-ed, additive ones get −∞), so the mechanism applies it with its own
  masks (causality, padding) on its fast and its reference path alike. Mechanisms that take no arbitrary attention
  mask (`Supports.attn_mask` false, or a mask form other than "dense") are refused by name.
* transformers models (those that dispatch through `AttentionInterface`): inside the context the model runs the
  eager "attnlab_capture" implementation (`capture.transformers_implementation`), and the attention function each
  chosen module receives is its own eager function called with the mask the model built, knocked-out entries set
  to the dtype's minimum (what transformers itself uses for −∞; exp underflows to exactly 0). A `capture` opened
  inside the context records the knocked-out maps. A forward of the model that did not reach a chosen module through
  `AttentionInterface.get_interface` raises (its edges would silently stay).

In both, a query left with no key to attend to (every visible key knocked out) gets a zero output and a zero row
of weights, never NaN — attnlab's contract for fully masked rows.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.masks import restrict
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int
from .capture import (
    attnlab_modules,
    dispatches,
    is_transformers_model,
    transformers_attention_modules,
    transformers_implementation,
)

P033 = Paper("P033", "What's in the Image? A Deep-Dive into the Vision of Vision Language Models", 2024, "2411.17491")

Group = Tensor | Sequence[int] | range


# -- which layers a model has ---------------------------------------------------------------------------------
def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention layer `knockout` indexes: a transformers model's attention modules, else
    the outermost attnlab mechanisms, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if is_transformers_model(model):
        return transformers_attention_modules(model)
    found = attnlab_modules(model)
    if not found:
        raise TypeError(f"model: {type(model).__name__} holds no attnlab mechanism and is not a transformers model")
    return found


def _checked_keep(keep: Mapping[int, Tensor], layers: int) -> dict[int, Tensor]:
    if not isinstance(keep, Mapping):
        raise TypeError(f"keep: expected a mapping layer -> bool mask (True = attend), got {type(keep).__name__}")
    out = {}
    for layer, mask in keep.items():
        if not is_int(layer) or not 0 <= layer < layers:
            raise ValueError(f"keep: expected layer indices in [0, {layers}), got {layer!r}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 4):
            got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"keep[{layer}]: expected a bool tensor (n_q, n_k) or (batch|1, heads|1, n_q, n_k), got {got}")
        out[layer] = mask
    return out


def _fits(layer: int, keep: Tensor, batch: int, heads: int, n_q: int, n_k: int, name: str) -> Tensor:
    """keep as (batch|1, heads|1, n_q, n_k), checked against the call of layer `layer`."""
    full = keep if keep.dim() == 4 else keep[None, None]
    if tuple(full.shape[-2:]) != (n_q, n_k) or full.shape[0] not in (1, batch) or full.shape[1] not in (1, heads):
        raise ValueError(f"keep[{layer}]: expected (n_q, n_k) = {(n_q, n_k)} or broadcastable to (batch, heads, n_q, n_k) "
                         f"= {(batch, heads, n_q, n_k)} for {name!r}, got {tuple(keep.shape)}")
    return full


# -- attnlab mechanisms: narrow attn_mask ---------------------------------------------------------------------
def _attnlab_hook(layer: int, name: str, keep: Tensor) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = args[0] if args else kwargs["x"]
        x, context = module.batch_major(x, kwargs.get("context"))  # type: ignore[operator]
        n_k = x.shape[1] if context is None else context.shape[1]
        full = _fits(layer, keep, x.shape[0], module.heads, x.shape[1], n_k, name)  # type: ignore[arg-type]
        return args, {**kwargs, "attn_mask": restrict(kwargs.get("attn_mask"), full.to(x.device))}

    return hook


@contextmanager
def _knockout_attnlab(found: list[tuple[str, nn.Module]], keep: dict[int, Tensor]) -> Iterator[list[str]]:
    for layer in keep:
        name, module = found[layer]
        supports = module.spec.supports  # type: ignore[union-attr]
        if supports is None or not supports.attn_mask or getattr(module, "mask_form", "dense") != "dense":
            raise ValueError(f"model: layer {layer} ({name or type(module).__name__}, {module.spec.name}) takes no "  # type: ignore[union-attr]
                             "arbitrary attention mask (attn_mask), so its attention edges cannot be knocked out")
    handles = [found[layer][1].register_forward_pre_hook(_attnlab_hook(layer, found[layer][0], mask), with_kwargs=True)
               for layer, mask in keep.items()]
    try:
        yield [found[layer][0] for layer in sorted(keep)]
    finally:
        for h in handles:
            h.remove()


# -- transformers models: the mask handed to the model's own eager function --------------------------------
@dataclass
class _Edit:
    """One open knockout of a transformers model: id(module) -> (layer, name, keep); the layers a forward reached."""

    modules: dict[int, tuple[int, str, Tensor]]
    reached: set[int] = field(default_factory=set)


_OPEN: list[_Edit] = []
_EDITING: dict[Callable[..., Any], Callable[..., Any]] = {}  # eager function -> its editing wrapper
_SAVED: list[Callable[..., Any]] = []  # AttentionInterface.get_interface under the patch
_DEPTH = [0]


def _blocked(attention_mask: Tensor | None, keep: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """(the mask with knocked-out entries blocked, bool (…, n_q, n_k) of the entries a query may still attend)."""
    if attention_mask is not None and attention_mask.shape[-1] > keep.shape[-1]:  # a longer mask the model slices
        extra = keep.new_ones(*keep.shape[:-1], attention_mask.shape[-1] - keep.shape[-1])
        keep = torch.cat([keep, extra], dim=-1)
    if attention_mask is None:
        low = torch.finfo(query.dtype).min
        return torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(~keep, low), keep
    if attention_mask.dtype == torch.bool:
        return attention_mask & keep, attention_mask & keep
    low = torch.finfo(attention_mask.dtype).min
    visible = attention_mask > low / 2
    return torch.where(keep, attention_mask, torch.full((), low, dtype=attention_mask.dtype, device=keep.device)), visible & keep


def _editing(eager: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
    """`eager` calling the chosen modules with their knocked-out mask (one wrapper per eager function)."""
    wrapped = _EDITING.get(eager)
    if wrapped is not None:
        return wrapped

    def forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        edit = next((e for e in reversed(_OPEN) if id(module) in e.modules), None)
        if edit is None:
            return eager(module, query, key, value, attention_mask, *args, **kwargs)
        layer, name, keep = edit.modules[id(module)]
        full = _fits(layer, keep, query.shape[0], query.shape[1], query.shape[-2], key.shape[-2], name).to(query.device)
        mask, allowed = _blocked(attention_mask, full, query)
        out, probs = eager(module, query, key, value, mask, *args, **kwargs)
        edit.reached.add(layer)
        empty = ~allowed.any(-1)  # (batch|1, heads|1, n_q): every key of the row knocked out
        if bool(empty.any()):
            probs = probs.masked_fill(empty[..., None], 0.0)
            out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)  # out: (batch, n_q, heads, head_dim)
        return out, probs

    _EDITING[eager] = forward
    return forward


@contextmanager
def _editing_interface() -> Iterator[None]:
    """AttentionInterface.get_interface hands every caller its default eager function wrapped by `_editing`
    (installed over capture's routing, so a capture opened inside records the edited maps)."""
    from transformers import AttentionInterface

    if _DEPTH[0] == 0:
        previous = AttentionInterface.get_interface
        _SAVED.append(previous)

        def get_interface(self: Any, attn_implementation: str, default: Callable[..., Any]) -> Callable[..., Any]:
            return previous(self, attn_implementation, _editing(default))

        AttentionInterface.get_interface = get_interface  # type: ignore[method-assign]
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            AttentionInterface.get_interface = _SAVED.pop()  # type: ignore[method-assign]


@contextmanager
def _knockout_transformers(model: nn.Module, found: list[tuple[str, nn.Module]], keep: dict[int, Tensor]) -> Iterator[list[str]]:
    if not dispatches(model):
        raise TypeError(f"model: {type(model).__name__} does not dispatch attention through transformers' "
                        "AttentionInterface, so no mask can be injected into its attention")
    edit = _Edit({id(found[layer][1]): (layer, found[layer][0], mask) for layer, mask in keep.items()})

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        edit.reached.clear()

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        missed = sorted(set(keep) - edit.reached)
        if missed:
            names = ", ".join(repr(found[layer][0]) for layer in missed)
            raise ValueError(f"keep: layer(s) {missed} ({names}) did not call attention through "
                             "AttentionInterface.get_interface in this forward, so their edges were not knocked out")

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        with transformers_implementation(model), _editing_interface():
            _OPEN.append(edit)
            try:
                yield [found[layer][0] for layer in sorted(keep)]
            finally:
                _OPEN.remove(edit)
    finally:
        for h in handles:
            h.remove()


@contextmanager
def knockout(model: nn.Module, keep: Mapping[int, Tensor]) -> Iterator[list[str]]:
    """Inside the context, attention layer l of `model` attends only where `keep[l]` is True (bool (n_q, n_k) or
    broadcastable to (batch, heads, n_q, n_k)), on top of its own masks; yields the names of the edited layers.

    Layers: `attention_layers(model)` (module docstring). Rows left without any key give zeros."""
    found = attention_layers(model)
    chosen = _checked_keep(keep, len(found))
    if is_transformers_model(model):
        with _knockout_transformers(model, found, chosen) as names:
            yield names
        return
    with _knockout_attnlab(found, chosen) as names:
        yield names


# -- groups and windows ----------------------------------------------------------------------------------------
def _positions(name: str, group: Group, n: int, device: torch.device | None) -> Tensor:
    """A group of token positions as bool (n,) or (batch, n)."""
    if isinstance(group, Tensor):
        if group.dtype == torch.bool:
            if group.dim() not in (1, 2) or group.shape[-1] != n:
                raise ValueError(f"{name}: expected a bool mask (n,) or (batch, n) with n={n}, got shape {tuple(group.shape)}")
            return group.to(device)
        if group.is_floating_point() or group.dim() > 1:
            raise ValueError(f"{name}: expected positions as a bool mask or a 1-D int tensor, got {group.dtype} "
                             f"of shape {tuple(group.shape)}")
        index = [int(i) for i in group.tolist()]
    elif isinstance(group, (range, Sequence)) and not isinstance(group, str) and all(is_int(i) for i in group):
        index = list(group)
    else:
        raise TypeError(f"{name}: expected positions (a bool mask, int tensor, list or range), got {type(group).__name__}")
    wrong = [i for i in index if not -n <= i < n]
    if wrong:
        raise ValueError(f"{name}: expected positions in [-{n}, {n}), got {wrong}")
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[torch.tensor(index, dtype=torch.long, device=device)] = True
    return mask


def group_keep(n: int, sources: Group, targets: Group, *, device: torch.device | str | None = None) -> Tensor:
    """keep (n, n) bool, False at [i, j] for every query i in `targets` and key j in `sources` (the edges S → T);
    (batch, 1, n, n) when a group is given per sequence as bool (batch, n)."""
    if not is_int(n) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    dev = None if device is None else torch.device(device)
    src, tgt = _positions("sources", sources, n, dev), _positions("targets", targets, n, dev)
    blocked = tgt[..., :, None] & src[..., None, :]
    return ~blocked if blocked.dim() == 2 else (~blocked)[:, None]


@dataclass
class WindowKnockout:
    """Answer probabilities without (`base`, (batch,)) and with the knockout in each window (`knocked`,
    (windows, batch)); window k covers layers starts[k] … starts[k] + window − 1."""

    starts: list[int]
    window: int
    base: Tensor
    knocked: Tensor

    @property
    def drop(self) -> Tensor:
        """(windows,): mean over examples of p − p_W."""
        return (self.base[None] - self.knocked).mean(-1)

    @property
    def relative(self) -> Tensor:
        """(windows,): mean over examples of (p_W − p) / p (p = 0 counts as no change)."""
        base = self.base[None]
        change = torch.where(base > 0, (self.knocked - base) / base.clamp(min=torch.finfo(base.dtype).tiny),
                             torch.zeros_like(self.knocked))
        return change.mean(-1)


def _probabilities(answer_probability: Callable[[], Tensor], what: str) -> Tensor:
    with torch.no_grad():
        p = answer_probability()
    if not isinstance(p, Tensor) or p.dim() != 1 or not p.is_floating_point():
        got = f"{p.dtype} of shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
        raise ValueError(f"answer_probability: expected a float tensor (batch,) of answer probabilities ({what}), got {got}")
    return p.detach()


def window_knockout(
    model: nn.Module,
    answer_probability: Callable[[], Tensor],
    keep: Tensor,
    *,
    window: int = 1,
    layers: int | None = None,
) -> WindowKnockout:
    """P033's sweep: the answer probability (`answer_probability()` runs the model, returns (batch,)) without a
    knockout and with `keep` applied in each window of `window` consecutive layers, sliding by one."""
    total = len(attention_layers(model)) if layers is None else layers
    if not is_int(total) or total < 1:
        raise ValueError(f"layers: expected a positive int, got {layers!r}")
    if not is_int(window) or not 1 <= window <= total:
        raise ValueError(f"window: expected an int in [1, layers={total}], got {window!r}")
    base = _probabilities(answer_probability, "without knockout")
    starts = list(range(total - window + 1))
    knocked = []
    for start in starts:
        with knockout(model, dict.fromkeys(range(start, start + window), keep)):
            p = _probabilities(answer_probability, f"knockout in layers {start}..{start + window - 1}")
        if p.shape != base.shape:
            raise ValueError(f"answer_probability: expected the shape {tuple(base.shape)} of the first call, got {tuple(p.shape)}")
        knocked.append(p)
    return WindowKnockout(starts, window, base, torch.stack(knocked))


# -- a planted copy path: "image" → question → last token, on a ToyLM ------------------------------------------
@dataclass(frozen=True)
class ImageQASettings:
    """A ToyLM that answers which of `classes` classes p "image" prefix vectors show, at the last token, from
    `question` filler tokens before it. Planted path: the last token never attends to the image, the question tokens
    attend to it only in layer `via`; the answer must go image → question (layer via) → last (later layers)."""

    classes: int = 8
    image: int = 4  # prefix vectors
    question: int = 4  # filler tokens between the image and the last token
    noise: float = 0.5  # std of the noise added to the class vector of each prefix vector
    layers: int = 6
    via: int = 2
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("classes", "image", "question", "layers", "dim", "heads", "steps", "batch"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not is_int(self.via) or not 0 <= self.via < self.layers - 1:
            raise ValueError(f"via: expected a layer in [0, layers - 1 = {self.layers - 1}) (later layers carry it to "
                             f"the last token), got {self.via!r}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise < math.inf:
            raise ValueError(f"noise: expected a float >= 0, got {self.noise!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")

    @property
    def vocab(self) -> int:  # class ids, the last token's id, 8 filler ids
        return self.classes + 1 + 8

    @property
    def length(self) -> int:  # positions, prefix included
        return self.image + self.question + 1


@dataclass
class ImageQA:
    """A planted image-QA model: the ToyLM, its settings, its class vectors and the structure masks it runs with."""

    model: nn.Module
    settings: ImageQASettings
    class_vectors: Tensor  # (classes, dim)
    record: dict[str, Any]

    def groups(self) -> dict[str, list[int]]:
        s = self.settings
        return {"image": list(range(s.image)), "question": list(range(s.image, s.image + s.question)),
                "last": [s.length - 1]}

    def structure(self) -> dict[int, Tensor]:
        return planted_structure(self.settings)

    def sample(self, generator: torch.Generator, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        return image_qa_batch(self.settings, self.class_vectors, generator, batch)

    def answer_probability(self, ids: Tensor, prefix: Tensor, labels: Tensor) -> Tensor:
        """p(label | image, question) at the last token, (batch,), under the planted structure."""
        logits = self.model(ids, prefix=prefix, attn_masks=self.structure())[:, -1]
        return logits.softmax(-1).gather(-1, labels[:, None])[:, 0]


def planted_structure(settings: ImageQASettings) -> dict[int, Tensor]:
    """Layer -> keep (n, n): the last token never sees the image; question tokens see it only in layer `via`."""
    s = settings
    n, image = s.length, range(s.image)
    never = group_keep(n, image, [n - 1])
    elsewhere = never & group_keep(n, image, range(s.image, n - 1))
    return {layer: never if layer == s.via else elsewhere for layer in range(s.layers)}


def image_qa_batch(settings: ImageQASettings, class_vectors: Tensor, generator: torch.Generator,
                   batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids (batch, question + 1), prefix (batch, image, dim), labels (batch,)): prefix = class vector + noise,
    question = random filler ids, the last id = `classes` (the "?" token)."""
    s = settings
    labels = torch.randint(0, s.classes, (batch,), generator=generator)
    prefix = class_vectors[labels][:, None] + s.noise * torch.randn(batch, s.image, s.dim, generator=generator)
    fillers = torch.randint(s.classes + 1, s.vocab, (batch, s.question), generator=generator)
    ids = torch.cat([fillers, torch.full((batch, 1), s.classes)], dim=1)
    return ids, prefix, labels


def train_image_qa(settings: ImageQASettings = ImageQASettings(), *, cache_dir: str | None = None,
                   use_cache: bool = True, progress: str | None = None) -> ImageQA:
    """The planted image-QA ToyLM of `settings`, trained under its structure masks (cached under the results folder
    as knockout-image-qa/<key>.pt when `use_cache`)."""
    from .toy_lm import ToyLM, ToyLMSettings, cached, settings_key, train_toy_lm

    if not isinstance(settings, ImageQASettings):
        raise TypeError(f"settings: expected ImageQASettings, got {type(settings).__name__}")
    s = settings
    # class vectors of norm ~4, from their own seeded generator (part of the recipe)
    vectors = torch.randn(s.classes, s.dim, generator=torch.Generator().manual_seed(s.seed + 1)) * (4 / math.sqrt(s.dim))
    structure = planted_structure(s)
    lm_settings = ToyLMSettings(vocab=s.vocab, dim=s.dim, heads=s.heads, layers=s.layers, context=s.length,
                                mlp_ratio=s.mlp_ratio)

    def build() -> nn.Module:
        torch.manual_seed(s.seed)
        return ToyLM(lm_settings)

    def fit(model: nn.Module) -> dict[str, Any]:
        prefixes: list[Tensor] = []  # train_toy_lm calls sample, then forward, once per step: the prefix passes here

        def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
            ids, prefix, labels = image_qa_batch(s, vectors, generator, s.batch)
            prefixes.append(prefix)
            targets = torch.full((s.batch, s.length), -100)
            targets[:, -1] = labels
            return ids, targets

        def forward(m: nn.Module, ids: Tensor) -> Tensor:
            return m(ids, prefix=prefixes.pop(), attn_masks=structure)

        losses = train_toy_lm(model, sample, steps=s.steps, lr=s.lr, seed=s.seed, forward=forward, progress=progress)
        return {"final_loss": sum(losses[-20:]) / len(losses[-20:])}

    if use_cache:
        got = cached("knockout-image-qa", settings_key(s), build, fit, cache_dir=cache_dir)
        model, record = got.model, got.record
    else:
        model = build()
        record = dict(fit(model))
        model.eval()
    return ImageQA(model, s, vectors, record)


def knockout_demo(settings: ImageQASettings = ImageQASettings(), *, examples: int = 512, window: int = 1,
                  seed: int = 1234, cache_dir: str | None = None, progress: str | None = None) -> dict[str, Any]:
    """P033 on the planted image-QA model: the per-window drop curves of image → question, image → last and
    question → last knockouts, with the base accuracy. The image → question drop is expected in the windows that hold
    layer `via` only; image → last drops nothing (the planted model never reads the image there)."""
    qa = train_image_qa(settings, cache_dir=cache_dir, progress=progress)
    ids, prefix, labels = qa.sample(torch.Generator().manual_seed(seed), examples)
    g, n = qa.groups(), settings.length
    with torch.no_grad():
        logits = qa.model(ids, prefix=prefix, attn_masks=qa.structure())[:, -1]
    curves = {}
    for name, (src, tgt) in {"image->question": ("image", "question"), "image->last": ("image", "last"),
                             "question->last": ("question", "last")}.items():
        curve = window_knockout(qa.model, lambda: qa.answer_probability(ids, prefix, labels),
                                group_keep(n, g[src], g[tgt]), window=window)
        curves[name] = {"starts": curve.starts, "drop": curve.drop.tolist(), "relative": curve.relative.tolist()}
    return {"settings": asdict(settings), "record": qa.record, "window": window, "examples": examples,
            "accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "base_probability": float(qa.answer_probability(ids, prefix, labels).mean().detach()), "curves": curves}


_MODEL = Param("model", nn.Module, doc="an attnlab model (mechanisms taking attn_mask) or a transformers model")
add(Spec(name="attention-knockout", kind="analysis", paper=P033, factory=knockout, family="E",
         summary="context manager: attention layer l attends only where keep[l] is True (edges set to −inf), "
                 "attnlab mechanisms and transformers models", params=(
             _MODEL, Param("keep", dict, doc="layer -> bool keep mask (n_q, n_k) or (batch|1, heads|1, n_q, n_k)"))))
add(Spec(name="window-knockout", kind="analysis", paper=P033, factory=window_knockout, family="E",
         summary="answer-probability drop when the edges source group → target group are knocked out in each "
                 "sliding window of layers", params=(
             _MODEL, Param("answer_probability", object, doc="callable running the model -> (batch,) probabilities"),
             Param("keep", Tensor, doc="bool (n, n) from group_keep: False on the knocked-out edges"),
             Param("window", int, 1, "layers per window", low=1),
             Param("layers", int, None, "number of layers (default: the model's attention layers)", optional=True))))
