"""A planted known/unknown-entity task and the small LM trained on it, for the SAE entity-recognition study (P103).

    from attnlab.analysis.entity_lm import EntityTask, entity_lm
    task = EntityTask(names=96, known=48)
    lm = entity_lm(task)                          # a ToyLM trained on the task (cached under attnlab-results/entity_lm)
    ids = task.prompts(task.known_names, relation=0)  # [BOS, name, REL_0] per name
    p = lm.model(ids)[:, -1].softmax(-1)          # the attribute of a known name, IDK for an unknown one

The task: `names` one-token names; the first `known` of a seeded permutation are known and have one attribute
token (of `attributes`) per relation (of `relations`), drawn from the seed; the others are unknown. A prompt is
[BOS, name, REL_r]; the answer at its last position is the name's attribute under r for a known name and the
"don't know" token IDK for an unknown one (unknown names are never seen with an attribute). The name is the
entity's last token (position `NAME_POSITION`), where P103 reads the SAE latents; the relation comes after it, so
whatever the name position carries about the name is independent of the question asked.

The model (`entity_lm`): a `ToyLM` (softmax attention, MLP) fitted with `train_toy_lm` to random prompts of
known and unknown names with cross-entropy on the answer only; seeded, cached with `toy_lm.cached` (key: the
task, the architecture and the recipe).

The study (`entity_recognition`, P103 on this model): a ReLU SAE (attnlab.analysis.sparse_autoencoder) trained on
the residual stream entering `layer` at every position of every prompt; the separation scores of its latents at
the name position, known vs unknown names, and as a null the largest |score| with the known/unknown labels
shuffled; steering: the top unknown latent's decoder row times α = `coefficient` · mean ‖x‖ (x the residual at the
names) added at the name position, P(IDK) on known names before and after, against the mean over `controls`
random unit directions at the same α; the top known latent likewise on unknown names; and the attention the last
position pays the name in each head of the layers from `layer` on, before and after the unknown-latent steering
(the paper sees attribute-extraction heads look away from the entity). `entity_demo` runs it on the preset
model (trained in about a minute on first use, then read from the cache).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ParameterError
from ..core.validate import check_int, is_int
from .capture import capture
from .sparse_autoencoder import (
    SparseAutoencoder,
    reconstruction_metrics,
    residual_activations,
    separation_scores,
    steer_residual,
    train_sae,
)
from .toy_lm import Cached, ToyLM, ToyLMSettings, cached, settings_key, train_toy_lm

BOS, IDK = 0, 1
NAME_POSITION = 1  # [BOS, name, REL]
CURVE = (0.5, 1.0, 2.0, 4.0, 8.0)  # steering sizes of the study's curve, in multiples of the mean residual norm


@dataclass(frozen=True)
class EntityTask:
    """Names, which are known, and their attributes (see the module docstring); everything drawn from `seed`."""

    names: int = 96
    known: int = 48
    relations: int = 3
    attributes: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("names", "relations", "attributes"):
            check_int(name, getattr(self, name))
        check_int("known", self.known, 1, self.names - 1, meaning="(known names; the rest are unknown)")
        if not is_int(self.seed) or self.seed < 0:
            raise ParameterError(f"seed: expected an int >= 0, got {self.seed!r}")

    @property
    def first_relation(self) -> int:
        return 2

    @property
    def first_attribute(self) -> int:
        return self.first_relation + self.relations

    @property
    def first_name(self) -> int:
        return self.first_attribute + self.attributes

    @property
    def vocab(self) -> int:
        return self.first_name + self.names

    def _draw(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.names, generator=generator)
        table = torch.randint(0, self.attributes, (self.names, self.relations), generator=generator)
        return order, table

    @property
    def known_names(self) -> Tensor:
        """Indices (known,) of the known names (0-based among the names)."""
        return self._draw()[0][: self.known].sort().values

    @property
    def unknown_names(self) -> Tensor:
        """Indices (names − known,) of the unknown names."""
        return self._draw()[0][self.known:].sort().values

    def is_known(self, names: Tensor) -> Tensor:
        """bool, per name index."""
        return torch.isin(names, self.known_names.to(names.device))

    def prompts(self, names: Tensor, relation: int | Tensor) -> Tensor:
        """[BOS, name, REL_r] per name: int64 (len(names), 3); relation an int or one per name."""
        if not isinstance(names, Tensor) or names.dim() != 1 or names.dtype != torch.int64:
            raise ValueError(f"names: expected an int64 tensor (n,) of name indices, got {names!r}")
        if names.numel() and (int(names.min()) < 0 or int(names.max()) >= self.names):
            raise ValueError(f"names: expected indices in [0, {self.names}), got [{int(names.min())}, {int(names.max())}]")
        rel = torch.as_tensor(relation, dtype=torch.int64, device=names.device).expand_as(names)
        if rel.numel() and (int(rel.min()) < 0 or int(rel.max()) >= self.relations):
            raise ValueError(f"relation: expected values in [0, {self.relations}), got {relation!r}")
        return torch.stack([torch.full_like(names, BOS), self.first_name + names, self.first_relation + rel], 1)

    def answers(self, names: Tensor, relation: int | Tensor) -> Tensor:
        """The answer token per prompt: the attribute of a known name under the relation, IDK for an unknown one."""
        rel = torch.as_tensor(relation, dtype=torch.int64, device=names.device).expand_as(names)
        table = self._draw()[1].to(names.device)
        attribute = self.first_attribute + table[names, rel]
        return torch.where(self.is_known(names), attribute, torch.full_like(names, IDK))

    def sample(self, generator: torch.Generator, batch: int = 64) -> tuple[Tensor, Tensor]:
        """(ids (batch, 3), targets (batch, 3)): random names and relations, target only at the last position."""
        names = torch.randint(0, self.names, (batch,), generator=generator)
        relation = torch.randint(0, self.relations, (batch,), generator=generator)
        ids = self.prompts(names, relation)
        targets = torch.full_like(ids, -100)
        targets[:, -1] = self.answers(names, relation)
        return ids, targets

    def accuracy(self, model: ToyLM) -> dict[str, float]:
        """Share of right answers over every (name, relation), for known and unknown names."""
        out = {}
        with torch.no_grad():
            for label, names in (("known", self.known_names), ("unknown", self.unknown_names)):
                right = [(model(self.prompts(names, r))[:, -1].argmax(-1) == self.answers(names, r)).double().mean()
                         for r in range(self.relations)]
                out[label] = float(torch.stack(right).mean())
        return out


@dataclass(frozen=True)
class EntityRecipe:
    """The model and its training: a ToyLM of `dim`, `layers` (heads 2, MLP ratio 4), `steps` of `batch` prompts."""

    dim: int = 32
    layers: int = 2
    steps: int = 600
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0

    def settings(self, task: EntityTask) -> ToyLMSettings:
        return ToyLMSettings(vocab=task.vocab, dim=self.dim, heads=2, layers=self.layers, context=3, mlp_ratio=4.0)


def train_entity_lm(task: EntityTask, recipe: EntityRecipe = EntityRecipe()) -> ToyLM:
    """A ToyLM fitted to `task` by `recipe` (not cached; seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = ToyLM(recipe.settings(task))
    train_toy_lm(model, lambda g: task.sample(g, recipe.batch), steps=recipe.steps, lr=recipe.lr, seed=recipe.seed)
    return model


def entity_lm(task: EntityTask = EntityTask(), recipe: EntityRecipe = EntityRecipe(), *,
              cache_dir: str | Path | None = None, retrain: bool = False) -> Cached:
    """The model of `train_entity_lm`, from attnlab-results/entity_lm (or `cache_dir`) or trained and saved."""
    key: dict[str, Any] = {"task": asdict(task), "recipe": asdict(recipe), "model": settings_key(recipe.settings(task))}

    def build() -> ToyLM:
        return ToyLM(recipe.settings(task))

    def fit(model: torch.nn.Module) -> dict[str, Any]:
        trained = train_entity_lm(task, recipe)
        model.load_state_dict(trained.state_dict())
        return {"accuracy": task.accuracy(trained)}

    return cached("entity_lm", key, build, fit, cache_dir=cache_dir, retrain=retrain)


@dataclass
class EntityStudy:
    """What `entity_recognition` measured (see the module docstring); `sae` is the trained autoencoder."""

    sae: SparseAutoencoder
    record: dict[str, Any]


def _p_idk(model: ToyLM, ids: Tensor) -> float:
    with torch.no_grad():
        return float(model(ids)[:, -1].softmax(-1)[:, IDK].mean())


def _attention_to_name(model: ToyLM, ids: Tensor, first_layer: int) -> list[list[float]]:
    """Mean attention of the last position to the name, per layer >= first_layer and head."""
    with torch.no_grad(), capture(model) as att:
        model(ids)
    return [maps[:, :, -1, NAME_POSITION].mean(0).tolist() for maps in att.layers[first_layer:]]


def entity_recognition(model: ToyLM, task: EntityTask, *, layer: int = 1, latents: int = 64, l1: float = 0.2,
                       sae_steps: int = 600, coefficient: float = 2.0, controls: int = 8, seed: int = 0) -> EntityStudy:
    """P103 on a model trained on `task`: SAE, separation scores, steering, attention to the name (module docstring)."""
    if not isinstance(model, ToyLM) or model.settings.vocab != task.vocab:
        raise TypeError(f"model: expected a ToyLM trained on the task (vocab {task.vocab}), got {type(model).__name__}")
    check_int("layer", layer, 1, model.settings.layers, meaning="(the residual entering it; 1: after the first block)")
    check_int("controls", controls)
    names = torch.arange(task.names)
    vectors = torch.cat([residual_activations(model, task.prompts(names, r), layer) for r in range(task.relations)])
    sae = train_sae(vectors, latents, activation="relu", l1=l1, steps=sae_steps, seed=seed)
    known_ids, unknown_ids = task.prompts(task.known_names, 0), task.prompts(task.unknown_names, 0)
    known_x = residual_activations(model, known_ids, layer, [NAME_POSITION])
    unknown_x = residual_activations(model, unknown_ids, layer, [NAME_POSITION])
    with torch.no_grad():
        known_codes, unknown_codes = sae.encode(known_x), sae.encode(unknown_x)
        both = torch.cat([known_codes, unknown_codes])
        shuffled = both[torch.randperm(len(both), generator=torch.Generator().manual_seed(seed))]
    separation = separation_scores(known_codes, unknown_codes)
    null = separation_scores(shuffled[: len(known_codes)], shuffled[len(known_codes):])
    known_latent, unknown_latent = int(separation.known.argmax()), int(separation.unknown.argmax())
    norm = float(known_x.norm(dim=1).mean())
    alpha = coefficient * norm
    controls_dirs = torch.randn(controls, model.settings.dim, generator=torch.Generator().manual_seed(seed + 1))
    controls_dirs = controls_dirs / controls_dirs.norm(dim=1, keepdim=True)

    def steered_at(ids: Tensor, direction: Tensor, size: float) -> float:
        with steer_residual(model, layer, direction.detach(), size, [NAME_POSITION]):
            return _p_idk(model, ids)

    def steered(ids: Tensor, direction: Tensor) -> float:
        return steered_at(ids, direction, alpha)

    def control(ids: Tensor) -> float:
        return sum(steered(ids, d) for d in controls_dirs) / controls

    with steer_residual(model, layer, sae.decoder[unknown_latent].detach(), alpha, [NAME_POSITION]):
        attention_steered = _attention_to_name(model, known_ids, layer)
    record = {
        "accuracy": task.accuracy(model),
        "sae": reconstruction_metrics(sae, vectors),
        "known_latent": known_latent, "unknown_latent": unknown_latent,
        "separation_known": float(separation.known[known_latent]),
        "separation_unknown": float(separation.unknown[unknown_latent]),
        "freq_known_of_unknown_latent": float(separation.freq_known[unknown_latent]),
        "freq_unknown_of_unknown_latent": float(separation.freq_unknown[unknown_latent]),
        "separation_null": float(null.known.abs().max()),
        "alpha": alpha,
        "p_idk_known": _p_idk(model, known_ids),
        "p_idk_known_steered_unknown_latent": steered(known_ids, sae.decoder[unknown_latent]),
        "p_idk_known_steered_random": control(known_ids),
        "p_idk_unknown": _p_idk(model, unknown_ids),
        "p_idk_unknown_steered_known_latent": steered(unknown_ids, sae.decoder[known_latent]),
        "p_idk_unknown_steered_random": control(unknown_ids),
        "steering_curve": [  # (multiple of mean ‖x‖, P(IDK) on known names with the unknown latent, with random)
            (m, steered_at(known_ids, sae.decoder[unknown_latent], m * norm),
             sum(steered_at(known_ids, d, m * norm) for d in controls_dirs) / controls) for m in CURVE],
        "attention_to_name_known": _attention_to_name(model, known_ids, layer),
        "attention_to_name_known_steered": attention_steered,
    }
    return EntityStudy(sae, record)


DEMO_TASK = EntityTask(names=256, known=128, relations=2, attributes=3, seed=0)
DEMO_RECIPE = EntityRecipe(dim=32, layers=2, steps=1500, batch=128, lr=5e-3, seed=0)


def entity_demo(*, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """P103 on the preset: 256 names (128 known), 2 relations, 3 attributes, a 2-layer ToyLM of width 32 (trained
    once, ~1/2 minute, then cached); a 64-latent ReLU SAE on the residual entering layer 1 (`entity_recognition`).
    Measured here (seed 0): separation of the top unknown latent 0.85 (null 0.10), P(IDK) on known names 0.00 →
    0.57 steered by it at 2‖x‖ (random directions: 0.003; 0.69 at 8‖x‖), FVE 0.93 at L0 7. Unlike the paper, the
    top known latent (separation 0.44) barely makes unknown names answer (P(IDK) 1.00 → 0.98), and the unknown-latent
    steering raises the last position's attention to the name (heads 0.34, 0.82 → 0.66, 1.00) instead of lowering
    it: in this model the IDK answer is read from the name position, not by looking away from it."""
    lm = entity_lm(DEMO_TASK, DEMO_RECIPE, cache_dir=cache_dir)
    study = entity_recognition(lm.model, DEMO_TASK, layer=1, latents=64, sae_steps=2000)
    return {**study.record, "model": {"file": str(lm.path), "from_cache": lm.hit, **lm.record}}
