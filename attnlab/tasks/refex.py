"""RefEx: referring expressions on a grid world with held-out attribute combinations (P053, Sikarwar et al. 2022).

The world. A g×g grid holds `num_objects` objects in distinct uniform cells; an object has K attributes
(e.g. colour and shape, with sizes (3, 3) as in the official `TwoAttr_RefExp_Small` vocabulary: red, green,
blue × circle, square, cylinder), its attribute tuple uniform over the allowed tuples. A referring
expression names some attributes of the target object, a value or "unspecified" per attribute kind; its
referent is the unique object whose attributes match every named value, and the answer is that object's
cell (one of g² classes).

The split. `held_out` attribute tuples (combinations) are chosen at random such that every single value
still occurs in some training tuple. Training worlds contain no object with a held-out tuple (so neither
the combination nor an expression naming it is ever seen); the target's expression there is uniform
over the non-empty attribute subsets that identify it uniquely in its world. A test example's target has
a held-out tuple, named in full (the novel conjunction), its other objects any tuple; worlds without a
unique referent are redrawn.

The model (the official `SimpleTransformer`): fixed embeddings, the one-hot of a value for an expression
word and the sum of its attributes' one-hots for a cell (zero for an empty cell or an unspecified
attribute), so the model dimension is Σ_k |values_k|; `layers` bias-free multi-head softmax attention
layers over [expression; cells] with a residual, no positions; the logit of a cell is the sum of its
final residual vector; cross-entropy over the g² cells, accuracy on the held-out split (`refex_accuracy`).
The official repository ships the data as JSON without its generator; this generator follows the paper.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ._checks import check_count

GROUND_AND_COMPOSE = Paper(
    "P053", "When Can Transformers Ground and Compose: Insights from Compositional Generalization Benchmarks", 2022,
    "2210.12786",
)


@dataclass(frozen=True)
class RefExData:
    """`expression` (examples, K) LongTensor, a value per attribute kind or −1 (unspecified); `world`
    (examples, g², K), each cell's attribute values or −1 for an empty cell; `target` (examples,) the
    referent's cell; `attribute_sizes` the number of values of each kind."""

    expression: Tensor
    world: Tensor
    target: Tensor
    attribute_sizes: tuple[int, ...]

    def __len__(self) -> int:
        return self.target.shape[0]

    def features(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(examples, K + g², Σ sizes): the fixed embeddings of the expression words then of the cells."""
        offsets = np.cumsum((0,) + self.attribute_sizes[:-1])
        width = sum(self.attribute_sizes)

        def one_hot(values: Tensor) -> Tensor:  # values (..., K) with −1 for absent → (..., width)
            out = torch.zeros(values.shape[:-1] + (width,), dtype=dtype)
            for k, offset in enumerate(offsets):
                present = values[..., k] >= 0
                out[..., int(offset):int(offset) + self.attribute_sizes[k]] += (
                    nn.functional.one_hot(values[..., k].clamp(min=0), self.attribute_sizes[k]).to(dtype) * present[..., None]
                )
            return out

        k = len(self.attribute_sizes)
        words = torch.full(self.expression.shape + (k,), -1, dtype=torch.long)
        for i in range(k):
            words[:, i, i] = self.expression[:, i]
        return torch.cat([one_hot(words), one_hot(self.world)], 1)


def held_out_combinations(attribute_sizes: tuple[int, ...], held_out: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`held_out` random attribute tuples such that every value of every kind remains in some other tuple."""
    tuples = list(itertools.product(*(range(s) for s in attribute_sizes)))
    held_out = check_count("held_out", held_out, 1)
    if held_out >= len(tuples):
        raise ValueError(f"held_out: expected fewer than the {len(tuples)} attribute tuples, got {held_out}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        chosen = [tuples[i] for i in rng.choice(len(tuples), held_out, replace=False)]
        kept = [t for t in tuples if t not in chosen]
        if all({t[k] for t in kept} == set(range(s)) for k, s in enumerate(attribute_sizes)):
            return sorted(chosen)
    raise ValueError(f"held_out: expected a count that leaves every value in training, got {held_out}")


def _matches(objects: np.ndarray, expression: np.ndarray) -> np.ndarray:
    named = expression >= 0
    return (objects[:, named] == expression[named]).all(1)


def _examples(
    rng: np.random.Generator, n: int, grid: int, sizes: tuple[int, ...], num_objects: int,
    distractors: list[tuple[int, ...]], targets: list[tuple[int, ...]], full_expression: bool,
) -> RefExData:
    k = len(sizes)
    subsets = [s for r in range(1, k + 1) for s in itertools.combinations(range(k), r)]
    expression = np.full((n, k), -1)
    world = np.full((n, grid * grid, k), -1)
    target = np.zeros(n, dtype=np.int64)
    for i in range(n):
        while True:
            objects = np.array([targets[rng.integers(len(targets))]]
                               + [distractors[j] for j in rng.integers(len(distractors), size=num_objects - 1)])
            usable = []
            for subset in ((tuple(range(k)),) if full_expression else subsets):
                e = np.full(k, -1)
                e[list(subset)] = objects[0, list(subset)]
                if _matches(objects, e).sum() == 1:
                    usable.append(e)
            if usable:
                break
        cells = rng.choice(grid * grid, num_objects, replace=False)
        world[i, cells] = objects
        expression[i] = usable[rng.integers(len(usable))]
        target[i] = cells[0]
    return RefExData(torch.from_numpy(expression), torch.from_numpy(world), torch.from_numpy(target), sizes)


def refex_split(
    num_train: int,
    num_test: int,
    grid: int = 6,
    attribute_sizes: tuple[int, ...] = (3, 3),
    num_objects: int = 5,
    held_out: int = 2,
    seed: int = 0,
) -> tuple[RefExData, RefExData, list[tuple[int, ...]]]:
    """(train, test, held-out tuples) of the RefEx task (module doc), deterministic in `seed`."""
    n_train, n_test = check_count("num_train", num_train, 1), check_count("num_test", num_test, 1)
    grid = check_count("grid", grid, 1)
    sizes = tuple(check_count("attribute_sizes", s, 1) for s in attribute_sizes)
    if not sizes:
        raise ValueError("attribute_sizes: expected at least one attribute kind, got none")
    num_objects = check_count("num_objects", num_objects, 1)
    if num_objects > grid * grid:
        raise ValueError(f"num_objects: expected at most grid² = {grid * grid}, got {num_objects}")
    hidden = held_out_combinations(sizes, held_out, seed)
    everything = list(itertools.product(*(range(s) for s in sizes)))
    seen = [t for t in everything if t not in hidden]
    rng = np.random.default_rng(seed + 1)
    train = _examples(rng, n_train, grid, sizes, num_objects, seen, seen, full_expression=False)
    test = _examples(rng, n_test, grid, sizes, num_objects, everything, hidden, full_expression=True)
    return train, test, hidden


class RefExAttention(nn.Module):
    """The official model (module doc): `layers` bias-free `heads`-head attention layers with a residual on
    the fixed embeddings; a cell's logit is the sum of its final residual vector."""

    def __init__(self, attribute_sizes: tuple[int, ...] = (3, 3), heads: int = 1, layers: int = 1) -> None:
        super().__init__()
        self.attribute_sizes = tuple(check_count("attribute_sizes", s, 1) for s in attribute_sizes)
        dim = sum(self.attribute_sizes)
        heads = check_count("heads", heads, 1)
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of the model dimension {dim}, got {heads}")
        self.layers = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, bias=False, batch_first=True) for _ in range(check_count("layers", layers, 1))
        )

    def forward(self, data: RefExData) -> Tensor:
        """Cell logits (examples, g²)."""
        weight = self.layers[0].in_proj_weight
        h = data.features(weight.dtype).to(weight.device)
        for layer in self.layers:
            h = h + layer(h, h, h, need_weights=False)[0]
        return h[:, len(self.attribute_sizes):].sum(-1)


def refex_accuracy(model: RefExAttention, data: RefExData) -> float:
    """The fraction of examples whose argmax cell is the referent's."""
    with torch.no_grad():
        return float((model(data).argmax(-1).cpu() == data.target).double().mean())


def train_refex(model: RefExAttention, data: RefExData, steps: int, lr: float = 0.01, batch_size: int = 64,
                seed: int = 0) -> list[float]:
    """Adam on the cross-entropy over cells, seeded minibatches; the losses."""
    steps, batch_size = check_count("steps", steps, 1), check_count("batch_size", batch_size, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch_size,), generator=generator)
        batch = RefExData(data.expression[rows], data.world[rows], data.target[rows], data.attribute_sizes)
        logits = model(batch)
        loss = nn.functional.cross_entropy(logits, batch.target.to(logits.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


add(
    Spec(
        name="refex",
        kind="task",
        paper=GROUND_AND_COMPOSE,
        factory=refex_split,
        family="G",
        summary="RefEx grid world: referring expressions over object attributes, target = the referent's cell; "
        "attribute combinations held out of training; 1-layer attention model on fixed attribute embeddings",
        params=(
            Param("num_train", int, doc="training examples", low=1),
            Param("num_test", int, doc="held-out-combination examples", low=1),
            Param("grid", int, 6, "grid side g (g² cells)", low=1),
            Param("attribute_sizes", tuple, (3, 3), "number of values of each attribute kind"),
            Param("num_objects", int, 5, "objects per world", low=1),
            Param("held_out", int, 2, "attribute tuples held out of training", low=1),
            Param("seed", int, 0, "seed of the split and the examples"),
        ),
    )
)
