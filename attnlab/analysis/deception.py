"""Attention-deception penalty (P046): train a model to put no attention on tokens it still relies on.

Pruthi et al. (Learning to Deceive with Attention-Based Explanations) add to the task loss a penalty on the
attention the classifying position gives to impermissible tokens (mask m over the input tokens):

    L = L_task + R,    R = −(λ/|H|) Σ_{h∈H} log(1 − α_hᵀ m)      ("mean" over the heads H)
                       R = −λ min_{h∈H} log(1 − α_hᵀ m)         ("max": the head with the most mass on m)

α_h is head h's attention row of the classifying position. Where α is read follows the official code for BERT:
the [CLS] row (`position`) of every head in the LAST layer (`layers`, default (−1,)); any set of layers may be
given. Here "mean" averages over heads, chosen layers and the batch (the official `torch.mean`), "max" takes per
example the largest mass over heads and layers, then the batch mean. 1 − α·m is floored at the dtype's `tiny`
(deviation: a row with all its mass on m gives a large finite penalty instead of inf).

With two or more layers the model can keep using the impermissible token while the penalised row ignores it:
other tokens read it in a lower layer and the classifying position reads them (the paper's point). The synthetic
task here (`MarkedTokenSettings`): [CLS] followed by filler tokens, one position holding a marked token A or B
that alone decides the label; m marks that position. Trained with the penalty, the last-layer [CLS] attention mass
on the marked token goes to ~0 while the accuracy stays high, and replacing the marked token by a filler still
breaks the predictions (chance).

    from attnlab.analysis.deception import attention_in_graph, deception_penalty
    with attention_in_graph(model) as maps:            # attnlab or transformers model
        logits = model(ids)
    loss = task_loss(logits) + deception_penalty(maps.layers, impermissible, position=0, strength=1.0)

`attention_in_graph` gives maps that are differentiable functions of the parameters: for attnlab mechanisms their
`materialize` on the same inputs and masks (its reference path, computed with gradients; mechanisms without it
are refused by name), for transformers models the probabilities their eager attention returns
(`capture(model, grads=True)`, padded rows and columns zero).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int
from .capture import Attentions, attnlab_modules, capture, is_transformers_model

P046 = Paper("P046", "Learning to Deceive with Attention-Based Explanations", 2020, "1909.07913")
REDUCTIONS = ("mean", "max")


# -- maps that keep their graph ----------------------------------------------------------------------------------
@dataclass
class GraphMaps:
    """The attention maps (batch, heads, n_q, n_k) of every attention layer of the last forward, in call order,
    differentiable with respect to the model's parameters."""

    records: list[Tensor] = field(default_factory=list)
    capture: Attentions | None = None  # transformers models: the capture holding the maps

    @property
    def layers(self) -> list[Tensor]:
        return self.capture.layers if self.capture is not None else list(self.records)


@contextmanager
def attention_in_graph(model: nn.Module) -> Iterator[GraphMaps]:
    """Inside the context, every forward of `model` appends its attention maps, with their autograd graph, to
    the yielded `GraphMaps` (module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if is_transformers_model(model):
        with capture(model, grads=True) as att:
            yield GraphMaps(capture=att)
        return
    found = attnlab_modules(model)
    if not found:
        raise TypeError(f"model: {type(model).__name__} holds no attnlab mechanism and is not a transformers model")
    for name, module in found:
        supports = module.spec.supports  # type: ignore[union-attr]
        if supports is None or not supports.materialize:
            raise TypeError(f"model: {name or type(module).__name__} ({module.spec.name}) has no materialize, so its "  # type: ignore[union-attr]
                            "attention maps cannot be read with their graph")
    maps = GraphMaps()

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
        x = args[0] if args else kwargs["x"]
        given = {k: kwargs[k] for k in ("context", "attention_mask", "key_padding_mask", "attn_mask")
                 if kwargs.get(k) is not None}
        maps.records.append(module.materialize(x, **given).to(x.dtype))  # type: ignore[operator]

    handles = [module.register_forward_hook(hook, with_kwargs=True) for _, module in found]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


# -- the penalty ---------------------------------------------------------------------------------------------
def _impermissible(mask: Tensor, batch: int, n_k: int) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() not in (1, 2) or mask.shape[-1] != n_k \
            or (mask.dim() == 2 and mask.shape[0] not in (1, batch)):
        got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"impermissible: expected a bool mask (n_k,) or (batch, n_k) with n_k={n_k}, got {got}")
    return mask if mask.dim() == 2 else mask[None]


def impermissible_mass(maps: Sequence[Tensor] | Tensor, impermissible: Tensor, *, position: int = 0) -> Tensor:
    """α_hᵀ m: the attention the query at `position` gives the impermissible keys, (batch, layers, heads)."""
    layers = [maps] if isinstance(maps, Tensor) else list(maps)
    if not layers or not all(isinstance(t, Tensor) and t.dim() == 4 for t in layers):
        raise ValueError("maps: expected attention maps (batch, heads, n_q, n_k), one or a list of them")
    batch, _, n_q, n_k = layers[0].shape
    if not is_int(position) or not -n_q <= position < n_q:
        raise ValueError(f"position: expected a query index in [-{n_q}, {n_q}), got {position!r}")
    m = _impermissible(impermissible, batch, n_k)
    rows = torch.stack([t[:, :, position, :] for t in layers], dim=1)  # (batch, layers, heads, n_k)
    return (rows * m[:, None, None, :].to(rows.dtype)).sum(-1)


def deception_penalty(maps: Sequence[Tensor] | Tensor, impermissible: Tensor, *, position: int = 0,
                      strength: float = 1.0, reduce: str = "mean") -> Tensor:
    """R = −λ·reduce_h log(1 − α_hᵀ m) over the given maps' heads (module docstring); a scalar with gradients."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength < math.inf:
        raise ValueError(f"strength: expected a float λ >= 0, got {strength!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
    mass = impermissible_mass(maps, impermissible, position=position)
    log_rest = torch.log((1 - mass).clamp(min=torch.finfo(mass.dtype).tiny))  # (batch, layers, heads)
    if reduce == "mean":
        return -strength * log_rest.mean()
    return -strength * log_rest.flatten(1).amin(-1).mean()


# -- the synthetic task: a marked token decides the label --------------------------------------------------------
CLS, MARK_A, MARK_B = 0, 1, 2


@dataclass(frozen=True)
class MarkedTokenSettings:
    """[CLS] + `length` − 1 tokens: fillers (ids 3 … 2 + fillers) and, at one random position, the marked token A
    (label 0) or B (label 1); a bidirectional ToyLM classifies at [CLS] (its logits over ids A, B)."""

    length: int = 12
    fillers: int = 32
    layers: int = 2
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    steps: int = 800
    batch: int = 64
    lr: float = 3e-3
    strength: float = 1.0
    penalised: tuple[int, ...] = (-1,)  # layers whose [CLS] row is penalised
    reduce: str = "mean"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("length", "fillers", "layers", "dim", "heads", "steps", "batch"):
            value, low = getattr(self, name), 2 if name == "length" else 1
            if not is_int(value) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if not isinstance(self.penalised, tuple) or not self.penalised or not all(
                is_int(i) and -self.layers <= i < self.layers for i in self.penalised):
            raise ValueError(f"penalised: expected a non-empty tuple of layer indices in [-{self.layers}, {self.layers}), "
                             f"got {self.penalised!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {self.reduce!r}")
        for name, low in (("lr", 0.0), ("strength", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf \
                    or (name == "lr" and value == 0):
                raise ValueError(f"{name}: expected a float {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")

    @property
    def vocab(self) -> int:
        return 3 + self.fillers


def marked_batch(settings: MarkedTokenSettings, generator: torch.Generator, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids (batch, length), labels (batch,) in {0, 1}, impermissible bool (batch, length): the marked position)."""
    s = settings
    ids = torch.randint(3, s.vocab, (batch, s.length), generator=generator)
    ids[:, 0] = CLS
    labels = torch.randint(0, 2, (batch,), generator=generator)
    where = torch.randint(1, s.length, (batch,), generator=generator)
    rows = torch.arange(batch)
    ids[rows, where] = MARK_A + labels
    impermissible = torch.zeros(batch, s.length, dtype=torch.bool)
    impermissible[rows, where] = True
    return ids, labels, impermissible


def _class_logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids)[:, 0, MARK_A:MARK_B + 1]  # (batch, 2): the [CLS] logits of A and B


@dataclass
class DeceptionRun:
    """A model trained on the marked-token task and its training curve (every `every` steps)."""

    model: nn.Module
    settings: MarkedTokenSettings
    curve: list[dict[str, float]]


def train_deceptive(settings: MarkedTokenSettings = MarkedTokenSettings(), *, every: int = 50,
                    use_cache: bool = False, cache_dir: str | None = None, progress: bool = False) -> DeceptionRun:
    """Train a bidirectional ToyLM on the marked-token task with L_task + R (R from `deception_penalty` on the
    [CLS] row of the `penalised` layers). The curve holds, every `every` steps, the batch's task loss, penalty,
    accuracy and [CLS] attention mass on the marked token (mean over heads, penalised layers). `use_cache`: keep the
    model and its curve under the results folder (deception-marked-token/<key>.pt)."""
    from .toy_lm import ToyLM, ToyLMSettings, cached, lr_factor, settings_key

    if not isinstance(settings, MarkedTokenSettings):
        raise TypeError(f"settings: expected MarkedTokenSettings, got {type(settings).__name__}")
    if not is_int(every) or every < 1:
        raise ValueError(f"every: expected a positive int, got {every!r}")
    s = settings

    def build() -> nn.Module:
        torch.manual_seed(s.seed)
        return ToyLM(ToyLMSettings(vocab=s.vocab, dim=s.dim, heads=s.heads, layers=s.layers, context=s.length,
                                   mlp_ratio=s.mlp_ratio, causal=False))

    def fit(model: nn.Module) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(s.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, s.steps))
        curve: list[dict[str, float]] = []
        model.train()
        for step in range(1, s.steps + 1):
            ids, labels, impermissible = marked_batch(s, generator, s.batch)
            with attention_in_graph(model) as maps:
                logits = _class_logits(model, ids)
            chosen = [maps.layers[i] for i in s.penalised]
            task = nn.functional.cross_entropy(logits, labels)
            penalty = deception_penalty(chosen, impermissible, position=0, strength=s.strength, reduce=s.reduce)
            optimizer.zero_grad()
            (task + penalty).backward()
            optimizer.step()
            schedule.step()
            if step % every == 0 or step == s.steps:
                mass = impermissible_mass([t.detach() for t in chosen], impermissible, position=0).mean()
                curve.append({"step": step, "task_loss": float(task.detach()), "penalty": float(penalty.detach()),
                              "accuracy": float((logits.argmax(-1) == labels).float().mean()), "mass": float(mass)})
                if progress:
                    print(f"deception: {curve[-1]}", flush=True)
        model.eval()
        return {"curve": curve}

    if use_cache:
        got = cached("deception-marked-token", {**settings_key(s), "every": every}, build, fit, cache_dir=cache_dir)
        return DeceptionRun(got.model, s, got.record["curve"])
    model = build()
    return DeceptionRun(model, s, fit(model)["curve"])


def evaluate_deception(run: DeceptionRun, *, examples: int = 1024, seed: int = 4321) -> dict[str, float]:
    """On fresh examples: accuracy, [CLS] mass on the marked token per layer (mean over heads) and in the penalised
    layers, and the accuracy with the marked token replaced by a filler (the first filler id)."""
    s = run.settings
    ids, labels, impermissible = marked_batch(s, torch.Generator().manual_seed(seed), examples)
    with torch.no_grad(), attention_in_graph(run.model) as maps:
        logits = _class_logits(run.model, ids)
    mass = impermissible_mass(maps.layers, impermissible, position=0).mean((0, 2))  # (layers,)
    ablated = ids.masked_fill(impermissible, 3)
    with torch.no_grad():
        ablated_logits = _class_logits(run.model, ablated)
    penalised = sorted({i % s.layers for i in s.penalised})
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "ablated_accuracy": float((ablated_logits.argmax(-1) == labels).float().mean()),
            "mass_penalised": float(mass[penalised].mean()), **{f"mass_layer_{i}": float(m) for i, m in enumerate(mass)}}


def deception_demo(settings: MarkedTokenSettings = MarkedTokenSettings(), *, every: int = 50,
                   cache_dir: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The training curve and the evaluation with the penalty (λ = settings.strength) and without (λ = 0), the
    models cached under the results folder."""
    out: dict[str, Any] = {"settings": asdict(settings)}
    for label, strength in (("penalised", settings.strength), ("baseline", 0.0)):
        run = train_deceptive(MarkedTokenSettings(**{**asdict(settings), "strength": strength}), every=every,
                              use_cache=True, cache_dir=cache_dir, progress=progress)
        out[label] = {"curve": run.curve, "evaluation": evaluate_deception(run)}
    return out


_MAPS = Param("maps", (list, tuple, Tensor), doc="attention maps (batch, heads, n_q, n_k) of the penalised layers, with graph")
_IMP = Param("impermissible", Tensor, doc="bool (n_k,) or (batch, n_k): the impermissible tokens m")
_POS = Param("position", int, 0, "the classifying query position")
add(Spec(name="deception-penalty", kind="analysis", paper=P046, factory=deception_penalty, family="E",
         summary="training penalty −λ·mean_h log(1 − α_h·m) on the classifying position's attention to impermissible tokens",
         params=(_MAPS, _IMP, _POS, Param("strength", float, 1.0, "λ", low=0.0),
                 Param("reduce", str, "mean", "over heads: mean, or max (the head with most mass)", choices=REDUCTIONS))))
add(Spec(name="impermissible-mass", kind="analysis", paper=P046, factory=impermissible_mass, family="E",
         summary="α_h·m: attention mass of the classifying position on the impermissible tokens, per layer and head",
         params=(_MAPS, _IMP, _POS)))
