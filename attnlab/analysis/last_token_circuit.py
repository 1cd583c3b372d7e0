"""All-for-One (P042): context-aware mean ablation (CAMA) and attention-based peeking (ABP), and the three-stage test.

Mamidanna et al. (All for One: LLMs Solve Mental Math at the Last Token ...) test whether a model computes an answer
at the last token with information it gathers from the other tokens in a few middle layers. Over L layers, with
ℓ1 = `wait` and ℓ2 = wait + transfer − 1:

1. layers < ℓ1 (CAMA): the residual stream entering layer ℓ1 at each position t is replaced by its mean over the
   reference prompts x' that hold the same token at t (the operands elsewhere vary),
       x̃_t = E_{x' : x'_t = x_t} [ h_t^{(ℓ1)}(x') ],
   so each token keeps what it knows of itself and of the task, and nothing input-specific from other tokens;
2. layers ℓ1 … ℓ2 (ABP): only the last token attends to other tokens (causally, as the model does); every other
   token attends to itself alone;
3. layers > ℓ2: every token, the last one included, attends to itself alone.

The accuracy of the model under all three is the accuracy of the surviving subgraph (AF1 in the paper); wait = 0
skips stage 1 (nothing precedes layer 0: the embeddings already depend on the token alone), transfer = 0 skips
stage 2, and then the last token never reads another token after ℓ1, so every prompt gets the same prediction.

    from attnlab.analysis.last_token_circuit import all_for_one, peeking_masks
    result = all_for_one(model, ids, answers, reference=all_prompts, wait=1, transfer=1)
    result.accuracy, result.full_accuracy
    with knockout(model, peeking_masks(n, layers=L, wait=1, transfer=1)):   # ABP alone
        logits = model(ids)

Layers: the residual stream enters `blocks[l]` (default `model.blocks`, as in `ToyLM`; e.g. `model.encoder.layer`
for BERT) as its first argument; the attention masks go through `knockout.knockout`, whose layer l is the attention
of blocks[l]. Right-padded batches: `attention_mask` (batch, n) gives each sequence's last real token.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int
from .knockout import attention_layers, knockout

P042 = Paper("P042", "All for One: LLMs Solve Mental Math at the Last Token With Information Transferred From Other "
                     "Tokens", 2025, "2509.09650")

Run = Callable[[Tensor], Tensor]  # ids (batch, n) -> logits (batch, n, vocab)


def peeking_masks(n: int, *, layers: int, wait: int, transfer: int, attention_mask: Tensor | None = None,
                  device: torch.device | str | None = None) -> dict[int, Tensor]:
    """Layer -> keep mask of stages 2 and 3: layers wait … wait + transfer − 1 keep the diagonal and the last token's
    row (ABP); later layers keep the diagonal only. (n, n), or (batch, 1, n, n) with `attention_mask` (batch, n)
    (right padding: the last real token of each sequence is its last one)."""
    for name, value, low in (("n", n, 1), ("layers", layers, 1), ("wait", wait, 0), ("transfer", transfer, 0)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if wait + transfer > layers:
        raise ValueError(f"transfer: expected wait + transfer <= layers = {layers}, got wait={wait}, transfer={transfer}")
    dev = None if device is None else torch.device(device)
    diagonal = torch.eye(n, dtype=torch.bool, device=dev)
    if attention_mask is None:
        last_row = torch.zeros(n, n, dtype=torch.bool, device=dev)
        last_row[-1] = True
    else:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.shape[1] != n:
            raise ValueError(f"attention_mask: expected (batch, n={n}), got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__}")
        real = attention_mask.to(device=dev, dtype=torch.bool)
        if not bool(real.any(-1).all()):
            raise ValueError("attention_mask: expected at least one real token per sequence, got an empty one")
        last = real.sum(-1) - 1  # (batch,)
        last_row = (torch.arange(n, device=real.device)[None, :, None] == last[:, None, None]).expand(-1, n, n)
        diagonal, last_row = diagonal[None, None], last_row[:, None]
    peek = diagonal | last_row
    return {layer: peek if layer < wait + transfer else diagonal.expand_as(peek) for layer in range(wait, layers)}


# -- CAMA ------------------------------------------------------------------------------------------------------
def _blocks(model: nn.Module, blocks: Sequence[nn.Module] | None) -> list[nn.Module]:
    found = getattr(model, "blocks", None) if blocks is None else blocks
    if found is None or not all(isinstance(b, nn.Module) for b in found) or not len(found):
        raise TypeError(f"blocks: expected the model's layers (a sequence of modules taking the residual stream first), "
                        f"got {type(found).__name__}; pass blocks= (e.g. model.encoder.layer)")
    return list(found)


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    value = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    if not isinstance(value, Tensor):
        raise TypeError(f"blocks: expected a layer taking the residual stream as its first argument, got {type(value).__name__}")
    return value


def residual_entering(block: nn.Module, run: Callable[[], Any]) -> Tensor:
    """The residual stream (batch, n, dim) entering `block` during `run()` (its first call)."""
    seen: list[Tensor] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not seen:
            seen.append(_hidden(args, kwargs).detach())

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not seen:
        raise ValueError("blocks: the chosen layer never ran during the model call")
    return seen[0]


@contextmanager
def replaced_residual(block: nn.Module, values: Tensor) -> Iterator[None]:
    """Inside the context the residual stream entering `block` is `values` (same shape). A block that returns the
    new stream (transformers layers) just gets `values` as input; a `ToyBlock`, whose caller adds the updates it
    returns to the stream it handed in, also adds values − stream to its attention update."""
    from .toy_lm import ToyBlock

    shifts: list[Tensor] = []

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = _hidden(args, kwargs)
        if hidden.shape != values.shape:
            raise ValueError(f"values: expected the shape {tuple(hidden.shape)} of the residual stream, got {tuple(values.shape)}")
        new = values.to(device=hidden.device, dtype=hidden.dtype)
        shifts.append(new - hidden)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states" if "hidden_states" in kwargs else "x": new}

    def after(module: nn.Module, args: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        attention, mlp = output
        return attention + shifts.pop(), mlp

    handles = [block.register_forward_pre_hook(before, with_kwargs=True)]
    if isinstance(block, ToyBlock):
        handles.append(block.register_forward_hook(after))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def context_aware_means(ids: Tensor, reference: Tensor, states: Tensor) -> Tensor:
    """CAMA: (batch, n, dim), at [b, t] the mean of states[r, t] over the reference prompts r with
    reference[r, t] == ids[b, t] (reference (r, n) ids, states (r, n, dim) their residual stream at ℓ1)."""
    for name, t in (("ids", ids), ("reference", reference)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point():
            raise ValueError(f"{name}: expected integer token ids (batch, n), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not isinstance(states, Tensor) or states.dim() != 3 or tuple(states.shape[:2]) != tuple(reference.shape):
        raise ValueError(f"states: expected (r, n, dim) = ({reference.shape[0]}, {reference.shape[1]}, dim), got "
                         f"{tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__}")
    if ids.shape[1] != reference.shape[1]:
        raise ValueError(f"ids: expected n = {reference.shape[1]} positions (as reference), got {ids.shape[1]}")
    match = (ids[:, None, :] == reference.to(ids.device)[None, :, :]).to(states.dtype)  # (batch, r, n)
    count = match.sum(1)  # (batch, n)
    if bool((count == 0).any()):
        b, t = (count == 0).nonzero()[0].tolist()
        raise ValueError(f"reference: token {int(ids[b, t])} at position {t} (prompt {b}) never occurs there in the "
                         "reference prompts, so it has no context-aware mean")
    return torch.einsum("brn,rnd->bnd", match, states.to(ids.device)) / count[..., None]


@contextmanager
def cama(model: nn.Module, ids: Tensor, *, reference: Tensor, layer: int, blocks: Sequence[nn.Module] | None = None,
         run: Run | None = None) -> Iterator[None]:
    """Stage 1: inside the context the residual stream entering layer `layer` is, for the prompts `ids`, its
    context-aware mean over the `reference` prompts (read from run(reference), default `model(reference)`, before
    the context takes effect). layer 0 changes nothing (the embeddings depend on the token alone)."""
    layers = _blocks(model, blocks)
    if not is_int(layer) or not 0 <= layer < len(layers):
        raise ValueError(f"layer: expected an int in [0, {len(layers)}), got {layer!r}")
    if layer == 0:
        yield
        return
    call = run or (lambda x: model(x))
    states = residual_entering(layers[layer], lambda: call(reference))
    with replaced_residual(layers[layer], context_aware_means(ids, reference, states)):
        yield


# -- the three stages --------------------------------------------------------------------------------------------
@dataclass
class AllForOne:
    """The three-stage test at (wait, transfer): accuracy of the surviving subgraph and of the full model."""

    wait: int
    transfer: int
    accuracy: float
    full_accuracy: float
    predictions: Tensor  # (batch,) argmax at the last position under the three stages
    logits: Tensor  # (batch, vocab) at the last position under the three stages


def _last_logits(run: Run, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    logits = run(ids)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"run: expected logits (batch, n, vocab) = ({ids.shape[0]}, {ids.shape[1]}, vocab), got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if attention_mask is None:
        return logits[:, -1]
    last = attention_mask.to(torch.bool).sum(-1) - 1
    return logits[torch.arange(ids.shape[0], device=logits.device), last.to(logits.device)]


def all_for_one(
    model: nn.Module,
    ids: Tensor,
    answers: Tensor,
    *,
    reference: Tensor,
    wait: int,
    transfer: int,
    blocks: Sequence[nn.Module] | None = None,
    run: Run | None = None,
    attention_mask: Tensor | None = None,
) -> AllForOne:
    """P042's three-stage test on prompts `ids` (batch, n) with answer ids `answers` (batch,): CAMA at layer `wait`
    (means over `reference` (r, n) prompts), ABP in layers wait … wait + transfer − 1, self-only after.

    run(ids) -> logits (batch, n, vocab) (default `model(ids)`); the prediction is the argmax at the last token."""
    layers = _blocks(model, blocks)
    attention = attention_layers(model)
    if len(attention) != len(layers):
        raise ValueError(f"blocks: expected one block per attention layer ({len(attention)}), got {len(layers)}")
    if not isinstance(answers, Tensor) or answers.shape != ids.shape[:1]:
        raise ValueError(f"answers: expected answer ids (batch={ids.shape[0]},), got "
                         f"{tuple(answers.shape) if isinstance(answers, Tensor) else type(answers).__name__}")
    masks = peeking_masks(ids.shape[1], layers=len(layers), wait=wait, transfer=transfer, attention_mask=attention_mask,
                          device=ids.device)
    call = run or (lambda x: model(x))
    with torch.no_grad():
        full = _last_logits(call, ids, attention_mask).argmax(-1)
        with cama(model, ids, reference=reference, layer=wait, blocks=layers, run=call), knockout(model, masks):
            logits = _last_logits(call, ids, attention_mask)
    predictions = logits.argmax(-1)
    answers = answers.to(predictions.device)
    total = max(1, answers.numel())
    return AllForOne(wait, transfer, int((predictions == answers).sum()) / total, int((full == answers).sum()) / total,
                     predictions, logits)


def all_for_one_grid(model: nn.Module, ids: Tensor, answers: Tensor, *, reference: Tensor,
                     blocks: Sequence[nn.Module] | None = None, run: Run | None = None) -> list[dict[str, Any]]:
    """`all_for_one` at every (wait, transfer) with wait + transfer <= layers: one row per pair."""
    layers = len(_blocks(model, blocks))
    rows = []
    for wait in range(layers):
        for transfer in range(layers - wait + 1):
            r = all_for_one(model, ids, answers, reference=reference, wait=wait, transfer=transfer, blocks=blocks, run=run)
            rows.append({"wait": wait, "transfer": transfer, "accuracy": r.accuracy, "full_accuracy": r.full_accuracy})
    return rows


# -- a tiny arithmetic model: "a + b =" -> a + b ----------------------------------------------------------------
@dataclass(frozen=True)
class ArithmeticSettings:
    """A ToyLM trained on every prompt "a + b =" (a, b < `operands`) to give a + b at "=". `planted` = (wait,
    transfer) trains it under the All-for-One structure (self-only before wait, ABP, self-only after), so that the
    three-stage test at that placement keeps its accuracy by construction."""

    operands: int = 10
    layers: int = 4
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    steps: int = 1500
    lr: float = 3e-3
    seed: int = 0
    planted: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("operands", "layers", "dim", "heads", "steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        if self.planted is not None:
            ok = isinstance(self.planted, tuple) and len(self.planted) == 2 and all(is_int(v) and v >= 0 for v in self.planted)
            if not ok or self.planted[0] + self.planted[1] > self.layers:
                raise ValueError(f"planted: expected None or (wait, transfer) with wait + transfer <= layers = "
                                 f"{self.layers}, got {self.planted!r}")

    @property
    def plus(self) -> int:
        return 2 * self.operands - 1

    @property
    def vocab(self) -> int:  # sums 0 … 2(operands − 1), "+", "="
        return self.plus + 2


def arithmetic_prompts(settings: ArithmeticSettings) -> tuple[Tensor, Tensor]:
    """(ids (operands², 4) of every "a + b =", answers (operands²,) = a + b)."""
    m = settings.operands
    a, b = torch.arange(m).repeat_interleave(m), torch.arange(m).repeat(m)
    ids = torch.stack([a, torch.full_like(a, settings.plus), b, torch.full_like(a, settings.plus + 1)], dim=1)
    return ids, a + b


def planted_all_for_one(settings: ArithmeticSettings) -> dict[int, Tensor]:
    """The keep masks a planted model trains and runs with: self-only before wait, then `peeking_masks`."""
    if settings.planted is None:
        return {}
    wait, transfer = settings.planted
    masks = peeking_masks(4, layers=settings.layers, wait=wait, transfer=transfer)
    return {**dict.fromkeys(range(wait), torch.eye(4, dtype=torch.bool)), **masks}


@dataclass
class ArithmeticModel:
    """A trained arithmetic ToyLM, its settings and its training record (final loss, accuracy on all prompts)."""

    model: nn.Module
    settings: ArithmeticSettings
    record: dict[str, Any]

    def run(self, ids: Tensor) -> Tensor:
        """logits (batch, 4, vocab), under the planted structure if any."""
        return self.model(ids, attn_masks=planted_all_for_one(self.settings))


def train_arithmetic(settings: ArithmeticSettings = ArithmeticSettings(), *, cache_dir: str | None = None,
                     use_cache: bool = True, progress: str | None = None) -> ArithmeticModel:
    """The arithmetic ToyLM of `settings`, trained on all prompts each step (cached under the results folder as
    all-for-one-arithmetic/<key>.pt when `use_cache`)."""
    from .toy_lm import ToyLM, ToyLMSettings, cached, settings_key, train_toy_lm

    if not isinstance(settings, ArithmeticSettings):
        raise TypeError(f"settings: expected ArithmeticSettings, got {type(settings).__name__}")
    s = settings
    ids, answers = arithmetic_prompts(s)
    targets = torch.full_like(ids, -100)
    targets[:, -1] = answers
    structure = planted_all_for_one(s)

    def build() -> nn.Module:
        torch.manual_seed(s.seed)
        return ToyLM(ToyLMSettings(vocab=s.vocab, dim=s.dim, heads=s.heads, layers=s.layers, context=4, mlp_ratio=s.mlp_ratio))

    def fit(model: nn.Module) -> dict[str, Any]:
        losses = train_toy_lm(model, lambda g: (ids, targets), steps=s.steps, lr=s.lr, seed=s.seed,
                              forward=lambda m, x: m(x, attn_masks=structure), progress=progress)
        with torch.no_grad():
            correct = int((model(ids, attn_masks=structure)[:, -1].argmax(-1) == answers).sum())
        return {"final_loss": losses[-1], "accuracy": correct / answers.numel()}

    if use_cache:
        key = {**settings_key(s), "planted": list(s.planted) if s.planted else None}
        got = cached("all-for-one-arithmetic", key, build, fit, cache_dir=cache_dir)
        return ArithmeticModel(got.model, s, got.record)
    model = build()
    record = dict(fit(model))
    return ArithmeticModel(model.eval(), s, record)


def all_for_one_demo(settings: ArithmeticSettings = ArithmeticSettings(), *, cache_dir: str | None = None,
                     progress: str | None = None) -> dict[str, Any]:
    """The three-stage accuracy at every (wait, transfer) on the arithmetic ToyLM of `settings` (cached), and on
    the same recipe planted at (1, 1): there the planted placement keeps the full accuracy, transfer = 0 gives one
    answer to every prompt."""
    out: dict[str, Any] = {}
    for label, s in (("trained", settings), ("planted", ArithmeticSettings(**{**asdict(settings), "planted": (1, 1)}))):
        trained = train_arithmetic(s, cache_dir=cache_dir, progress=progress)
        ids, answers = arithmetic_prompts(s)
        out[label] = {"settings": asdict(s), "record": trained.record,
                      "grid": all_for_one_grid(trained.model, ids, answers, reference=ids, run=trained.run)}
    return out


_MODEL = Param("model", nn.Module, doc="a model whose attention `knockout` can restrict (attnlab or transformers)")
_BLOCKS = Param("blocks", (list, tuple, nn.ModuleList), None, "the layers taking the residual stream (default model.blocks)",
                optional=True)
add(Spec(name="attention-based-peeking", kind="analysis", paper=P042, factory=peeking_masks, family="E",
         summary="ABP keep masks: in layers wait … wait+transfer−1 only the last token attends to others, self-only "
                 "after (for `knockout`)", params=(
             Param("n", int, doc="sequence length", low=1), Param("layers", int, doc="number of layers", low=1),
             Param("wait", int, doc="first ABP layer (ℓ1)", low=0), Param("transfer", int, doc="ABP layers", low=0),
             Param("attention_mask", Tensor, None, "bool (batch, n), right-padded", optional=True))))
add(Spec(name="context-aware-mean-ablation", kind="analysis", paper=P042, factory=cama, family="E",
         summary="CAMA: the residual stream entering a layer replaced by its mean over reference prompts with the "
                 "same token at each position", params=(
             _MODEL, Param("ids", Tensor, doc="prompts (batch, n)"), Param("reference", Tensor, doc="reference prompts (r, n)"),
             Param("layer", int, doc="the layer whose input is replaced (ℓ1)", low=0), _BLOCKS)))
add(Spec(name="all-for-one", kind="analysis", paper=P042, factory=all_for_one, family="E",
         summary="three-stage test: CAMA before ℓ1, ABP in ℓ1…ℓ2, self-only after; accuracy of the surviving subgraph",
         params=(_MODEL, Param("ids", Tensor, doc="prompts (batch, n)"), Param("answers", Tensor, doc="answer ids (batch,)"),
                 Param("reference", Tensor, doc="reference prompts (r, n) for CAMA"),
                 Param("wait", int, doc="ℓ1", low=0), Param("transfer", int, doc="ℓ2 − ℓ1 + 1", low=0), _BLOCKS)))
