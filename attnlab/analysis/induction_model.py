"""The tiny induction model: a 2-layer attention-only `ToyLM` trained on repeated random sequences, cached.

    from attnlab.analysis.induction_model import InductionRecipe, induction_model, repeated_tokens
    trained = induction_model()                        # attnlab-results/induction_model/<key>.pt, or trains it
    model = trained.model                              # a ToyLM (2 layers, mlp_ratio=0, softmax, causal)
    ids = repeated_tokens(torch.Generator().manual_seed(0), batch=8, half=16, vocab=32)   # [r r]: (8, 32)

The task (`induction_batch`): each sequence of `length` uniform random tokens from [0, vocab) holds one repeated
segment — L tokens r copied right after themselves, [ ... r r ... ], L uniform in [length // 4, length // 2], the
first copy starting at a uniform position that leaves room for the second. The targets are the next token at the
positions of the second copy but its last one (predicting r_{m+1} at the copy of r_m): the only predictable tokens,
and predictable only by looking back at the first copy — after the token that followed the earlier occurrence of
the current token, which is the induction mechanism (a previous-token head in layer 0 writes "my previous token is
t" into each position; an induction head in layer 1 matches its query, the current token, against those keys).
L and its position vary across sequences, so a fixed positional offset does not solve the task (with a fixed
[r r] layout, learned positions alone copy at offset L and no induction head forms).

The recipe (`InductionRecipe`): a `ToyLM` of `layers` attention-only pre-norm blocks (`mlp_ratio` = 0, softmax,
causal, learned positions), seeded init (torch.manual_seed(seed)), `train_toy_lm` (AdamW, warm-up then cosine)
for `steps` batches of `batch` sequences drawn from a generator seeded with `seed`. `induction_model(recipe)` keeps
it under the results folder with `toy_lm.cached` (key: every field of the recipe), with a JSON record of the final
loss, the accuracy on fresh sequences and the previous-token / induction scores of every head. `TINY` is the
seconds-size recipe the tests train; the default recipe takes about a minute on one core.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ParameterError
from ..core.validate import is_int
from .capture import capture
from .heads import induction_score, previous_token_score
from .toy_lm import Cached, ToyLM, ToyLMSettings, cached, train_toy_lm

FOLDER = "induction_model"


@dataclass(frozen=True)
class InductionRecipe:
    """Every setting of the induction model: architecture, task and training (all of it is the cache key)."""

    vocab: int = 32
    length: int = 32  # tokens per sequence (= the model's context)
    dim: int = 64
    heads: int = 4
    layers: int = 2
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab", "dim", "heads", "layers", "steps", "batch"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ParameterError(f"{name}: expected a positive int, got {value!r}")
        if not is_int(self.length) or self.length < 4:
            raise ParameterError(f"length: expected an int >= 4 (room for a repeated segment), got {self.length!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ParameterError(f"seed: expected an int >= 0, got {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ParameterError(f"lr: expected a positive learning rate, got {self.lr!r}")
        self.settings()  # dim / heads checked by ToyLMSettings

    def settings(self) -> ToyLMSettings:
        """The `ToyLMSettings` of the model: attention only, softmax, causal."""
        return ToyLMSettings(vocab=self.vocab, dim=self.dim, heads=self.heads, layers=self.layers,
                             context=self.length, mlp_ratio=0.0, mechanism="softmax", causal=True)


TINY = InductionRecipe(vocab=24, length=16, dim=32, heads=2, steps=300, batch=32, lr=0.01)


def _check_generator(generator: Any) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")


def _check_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if not is_int(value) or value < 1:
            raise ParameterError(f"{name}: expected a positive int, got {value!r}")


def induction_batch(generator: torch.Generator, *, batch: int, length: int, vocab: int) -> tuple[Tensor, Tensor]:
    """(ids, targets), both (batch, length) int64: random tokens with one segment r (length L in
    [length // 4, length // 2]) followed by its copy; targets[b, p] = ids[b, p + 1] at the positions p of the copy but
    its last one, -100 (ignored) elsewhere."""
    _check_generator(generator)
    _check_counts(batch=batch, vocab=vocab)
    if not is_int(length) or length < 4:
        raise ParameterError(f"length: expected an int >= 4, got {length!r}")
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    repeat = torch.randint(length // 4, length // 2 + 1, (batch, 1), generator=generator)  # L
    start = (torch.rand(batch, 1, generator=generator) * (length - 2 * repeat + 1)).long()  # first copy at [s, s + L)
    p = torch.arange(length)[None]
    copy = (p >= start + repeat) & (p < start + 2 * repeat)
    ids = torch.gather(ids, 1, torch.where(copy, p - repeat, p))
    predict = copy & (p < start + 2 * repeat - 1)
    targets = torch.where(predict, torch.roll(ids, -1, dims=1), torch.full_like(ids, -100))
    return ids, targets


def repeated_tokens(generator: torch.Generator, *, batch: int, half: int, vocab: int) -> Tensor:
    """[r r]: (batch, 2·half) int64, r uniform random tokens; every query of the second half has an induction target."""
    _check_generator(generator)
    _check_counts(batch=batch, half=half, vocab=vocab)
    r = torch.randint(0, vocab, (batch, half), generator=generator)
    return torch.cat([r, r], dim=1)


def head_scores(model: ToyLM, ids: Tensor) -> dict[str, list[list[float]]]:
    """Previous-token and induction scores (`attnlab.analysis.heads`) of every (layer, head) on ids, averaged over
    the batch: {"previous_token": [[...heads] per layer], "induction": ...}."""
    with torch.no_grad(), capture(model) as att:
        model(ids)
    return {"previous_token": previous_token_score(att.layers).mean(1).tolist(),
            "induction": induction_score(att.layers, ids).mean(1).tolist()}


def induction_accuracy(model: ToyLM, recipe: InductionRecipe, *, batches: int = 4, seed: int = 12345) -> float:
    """Share of the predictable tokens (the second copies) predicted exactly, over `batches` fresh batches."""
    generator = torch.Generator().manual_seed(seed)
    right = total = 0
    with torch.no_grad():
        for _ in range(batches):
            ids, targets = induction_batch(generator, batch=recipe.batch, length=recipe.length, vocab=recipe.vocab)
            keep = targets != -100
            right += int((model(ids).argmax(-1)[keep] == targets[keep]).sum())
            total += int(keep.sum())
    return right / total


def train_induction_model(recipe: InductionRecipe, *, progress: str | None = None) -> tuple[ToyLM, dict[str, Any]]:
    """A fresh model of `recipe` trained by it: (model in eval mode, record of losses, accuracy and head scores)."""
    torch.manual_seed(recipe.seed)
    model = ToyLM(recipe.settings())
    return model, _fit(model, recipe, progress)


def _fit(model: ToyLM, recipe: InductionRecipe, progress: str | None) -> dict[str, Any]:
    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return induction_batch(generator, batch=recipe.batch, length=recipe.length, vocab=recipe.vocab)

    losses = train_toy_lm(model, sample, steps=recipe.steps, lr=recipe.lr, seed=recipe.seed, progress=progress)
    probe = repeated_tokens(torch.Generator().manual_seed(54321), batch=16, half=recipe.length // 2, vocab=recipe.vocab)
    tail = losses[-max(1, len(losses) // 20):]
    return {"final_loss": sum(tail) / len(tail), "accuracy": induction_accuracy(model, recipe),
            "heads_on_repeats": head_scores(model, probe)}


def induction_model(recipe: InductionRecipe | None = None, *, cache_dir: str | Path | None = None,
                    retrain: bool = False, progress: bool = False) -> Cached:
    """The model of `recipe` (default `InductionRecipe()`) from <cache_dir or attnlab-results>/induction_model/, trained
    and saved on a miss (`toy_lm.cached`; the key is every field of the recipe)."""
    recipe = InductionRecipe() if recipe is None else recipe
    if not isinstance(recipe, InductionRecipe):
        raise TypeError(f"recipe: expected an InductionRecipe, got {type(recipe).__name__}")

    def build() -> ToyLM:
        torch.manual_seed(recipe.seed)
        return ToyLM(recipe.settings())

    return cached(FOLDER, {"recipe": "induction", **asdict(recipe)}, build,
                  lambda model: _fit(model, recipe, "induction model" if progress else None),  # type: ignore[arg-type]
                  cache_dir=cache_dir, retrain=retrain)
