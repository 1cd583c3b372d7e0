"""JoMA latent-hierarchy token data and attention-entropy tracking (P048, Tian et al. 2023).

The hierarchy (the official generator, luckmatters `decoder_only_hier.py`, `Dataset`). Level 0 is the M
observable tokens; each latent of level l + 1 owns a random combination (a set, distinct from its
siblings') of p_l latents of level l; the top level's latents are the C classes. A sequence is drawn
top-down: the class c is uniform on [C] and active; an active latent activates each latent it owns
independently with probability `keep` (a latent is active if at least one active owner activated it);
the sequence is the active tokens in ascending order, pre-padded to length T with a PAD token (id M).
The label is the class. For `keep` = 1 this is the official generator (the token set is then a function
of the class); `keep` < 1 makes the latents random (an addition here). The paper's theory speaks of a
binary latent tree with flip probabilities; the data here follows the official experiment's generator. With two levels (tokens ← latents ← classes) a
token's marginal is, since the class's latents are activated independently,

    P(token v active | c) = 1 − Π_{j ∈ S_c, v ∈ S_j} (1 − keep²)

(`token_marginals`, S_x the set x owns); the joint law of the token set follows by enumerating the
activations of every ownership edge (the tests do that).

The model (the official `Model`): token embeddings, no positions, `layers` post-LN blocks with causal
softmax attention and an MLP whose activation is ReLU / GELU / identity (`linear`),

    h = LN(x + Attn(x)),    x' = LN(h + W₂ σ(W₁ h)),

then a linear classifier on the last position; SGD with momentum 0.9 and weight decay (the official
optimiser). The paper predicts that the attention entropy −Σ_j a_ij log a_ij (mean over heads and
query rows) first falls and then rises when σ is nonlinear, and only falls when σ is linear;
`attention_entropy` computes it and `train_with_entropy` logs it per layer over training.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..core.registry import Paper, Param, Spec, add
from ._checks import check_count
from ._training import train_logged

JOMA = Paper(
    "P048", "JoMA: Demystifying Multilayer Transformers via JOint Dynamics of MLP and Attention", 2023, "2310.00535"
)


def _probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a float in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LatentHierarchy:
    """`children[l][j]`: the sorted level-l indices owned by latent j of level l + 1 (level 0 = tokens, the
    last level = classes); `num_tokens` M."""

    children: tuple[tuple[tuple[int, ...], ...], ...]
    num_tokens: int

    @property
    def num_classes(self) -> int:
        return len(self.children[-1])

    def reachable_tokens(self, cls: int) -> set[int]:
        """The tokens below class `cls` (the sequence when keep = 1)."""
        nodes = {cls}
        for level in reversed(self.children):
            nodes = set().union(*(level[j] for j in nodes))
        return nodes


def random_hierarchy(
    num_tokens: int = 19, layer_sizes: tuple[int, ...] = (20, 10), combinations: tuple[int, ...] = (3, 3), seed: int = 0
) -> LatentHierarchy:
    """Latents of level l + 1 own distinct random `combinations[l]`-subsets of level l (official defaults:
    M = 19 tokens, 20 latents then 10 classes, each owning 3)."""
    m = check_count("num_tokens", num_tokens, 1)
    if len(layer_sizes) != len(combinations) or not layer_sizes:
        raise ValueError(f"combinations: expected one per level of layer_sizes {tuple(layer_sizes)}, got {tuple(combinations)}")
    rng = np.random.default_rng(seed)
    below, children = m, []
    for size, p in zip(layer_sizes, combinations):
        size, p = check_count("layer_sizes", size, 1), check_count("combinations", p, 1)
        if p > below or math.comb(below, p) < size:
            raise ValueError(f"layer_sizes: expected at most C({below}, {p}) distinct sets of {p}, got {size}")
        sets: list[tuple[int, ...]] = []
        while len(sets) < size:
            s = tuple(sorted(int(i) for i in rng.choice(below, p, replace=False)))
            if s not in sets:
                sets.append(s)
        children.append(tuple(sets))
        below = size
    return LatentHierarchy(tuple(children), m)


def token_marginals(hierarchy: LatentHierarchy, keep: float) -> np.ndarray:
    """P(token v active | class c), (C, M), for a two-level hierarchy (module doc)."""
    if len(hierarchy.children) != 2:
        raise ValueError(f"hierarchy: expected two levels for the closed form, got {len(hierarchy.children)}")
    keep = _probability("keep", keep)
    tokens_of, latents_of = hierarchy.children
    out = np.ones((len(latents_of), hierarchy.num_tokens))
    for c, latents in enumerate(latents_of):
        for j in latents:
            out[c, list(tokens_of[j])] *= 1 - keep * keep
    return 1 - out


@dataclass(frozen=True)
class HierarchyData:
    """`tokens` (examples, T) LongTensor (PAD = M before the active tokens), `labels` (examples,),
    `active` (examples, M) bool, the active tokens; `hierarchy`; `keep`."""

    tokens: Tensor
    labels: Tensor
    active: Tensor
    hierarchy: LatentHierarchy
    keep: float

    def __len__(self) -> int:
        return self.labels.shape[0]


def sample_sequences(hierarchy: LatentHierarchy, num_examples: int, length: int, keep: float = 1.0, seed: int = 0) -> HierarchyData:
    """`num_examples` sequences of the hierarchy (module doc), deterministic in `seed`."""
    n, length, keep = check_count("num_examples", num_examples, 1), check_count("length", length, 1), _probability("keep", keep)
    longest = max(len(hierarchy.reachable_tokens(c)) for c in range(hierarchy.num_classes))
    if length < longest:
        raise ValueError(f"length: expected at least {longest} (the largest token set of a class), got {length}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, hierarchy.num_classes, size=n)
    active = np.zeros((n, hierarchy.num_classes), dtype=bool)
    active[np.arange(n), labels] = True
    for index in reversed(range(len(hierarchy.children))):  # from the classes down to the tokens
        level = hierarchy.children[index]
        below = hierarchy.num_tokens if index == 0 else len(hierarchy.children[index - 1])
        owns = np.zeros((len(level), below), dtype=bool)
        for j, s in enumerate(level):
            owns[j, list(s)] = True
        fired = rng.random((n,) + owns.shape) < keep  # each ownership edge fires independently
        active = (active[:, :, None] & owns[None] & fired).any(1)
    tokens = np.full((n, length), hierarchy.num_tokens)
    for i in range(n):
        ids = np.flatnonzero(active[i])
        if len(ids):
            tokens[i, -len(ids):] = ids
    return HierarchyData(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(active), hierarchy, keep)


def latent_hierarchy_data(
    num_examples: int,
    num_tokens: int = 19,
    layer_sizes: tuple[int, ...] = (20, 10),
    combinations: tuple[int, ...] = (3, 3),
    keep: float = 1.0,
    length: int = 20,
    hierarchy_seed: int = 0,
    seed: int = 0,
) -> HierarchyData:
    """Sequences of `random_hierarchy(num_tokens, layer_sizes, combinations, hierarchy_seed)` (module doc)."""
    return sample_sequences(random_hierarchy(num_tokens, layer_sizes, combinations, hierarchy_seed), num_examples, length, keep, seed)


def attention_entropy(weights: Tensor) -> Tensor:
    """Mean over query rows of −Σ_j a_ij log a_ij (0 log 0 = 0) over the last axis of `weights` (..., Lq, Lk);
    rows that are all zero (fully masked) are left out. Returns a 0-d float64 tensor."""
    p = weights.double()
    terms = torch.where(p > 0, -p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p))
    rows = p.sum(-1) > 0
    if not bool(rows.any()):
        raise ValueError("weights: expected at least one row with nonzero attention, got none")
    return terms.sum(-1)[rows].mean()


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, activation: str) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "linear": nn.Identity()}[activation]
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(causal, float("-inf")).softmax(-1)
        h = self.ln1(x + (weights @ split(self.v(x))).transpose(1, 2).reshape(b, t, d))
        return self.ln2(h + self.down(self.act(self.up(h)))), weights


class HierarchyTransformer(nn.Module):
    """The official multi-layer model in small (module doc); `forward` returns (class logits at the last
    position, the attention weights (examples, heads, T, T) of every layer)."""

    def __init__(self, num_tokens: int, num_classes: int, dim: int = 64, layers: int = 2, heads: int = 1,
                 activation: str = "relu") -> None:
        super().__init__()
        if activation not in ("relu", "gelu", "linear"):
            raise ValueError(f"activation: expected 'relu', 'gelu' or 'linear', got {activation!r}")
        dim, heads = check_count("dim", dim, 1), check_count("heads", heads, 1)
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of dim = {dim}, got {heads}")
        self.embed = nn.Embedding(check_count("num_tokens", num_tokens, 1) + 1, dim)  # + PAD
        self.blocks = nn.ModuleList(_Block(dim, heads, activation) for _ in range(check_count("layers", layers, 1)))
        self.classify = nn.Linear(dim, check_count("num_classes", num_classes, 1))

    def forward(self, tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        x, maps = self.embed(tokens), []
        for block in self.blocks:
            x, weights = block(x)
            maps.append(weights)
        return self.classify(x[:, -1]), maps


def train_with_entropy(
    model: HierarchyTransformer,
    hierarchy: LatentHierarchy,
    steps: int,
    lr: float = 0.01,
    batch_size: int = 128,
    length: int = 20,
    keep: float = 1.0,
    weight_decay: float = 5e-3,
    log_every: int = 10,
    seed: int = 0,
) -> list[dict[str, float]]:
    """SGD (momentum 0.9, the official recipe) on fresh batches of the hierarchy; every `log_every` steps
    (and at step 0) {"step", "loss", "entropy_0", "entropy_1", …}: the loss and each layer's attention
    entropy on that step's batch, before the update."""
    steps, log_every = check_count("steps", steps, 1), check_count("log_every", log_every, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    device = model.classify.weight.device

    def step_loss(step: int) -> tuple[Tensor, Callable[[], dict[str, float]]]:
        batch = sample_sequences(hierarchy, batch_size, length, keep, seed=seed * 1_000_003 + step)
        logits, maps = model(batch.tokens.to(device))
        loss = nn.functional.cross_entropy(logits, batch.labels.to(device))
        return loss, lambda: {f"entropy_{i}": float(attention_entropy(w.detach())) for i, w in enumerate(maps)}

    return train_logged(optimizer, steps, log_every, step_loss)


add(
    Spec(
        name="latent-hierarchy",
        kind="task",
        paper=JOMA,
        factory=latent_hierarchy_data,
        family="G",
        summary="JoMA latent-hierarchy sequences (classes own latents own tokens, noisy top-down activation); "
        "multi-layer post-LN transformer with ReLU/GELU/linear MLP, attention entropy logged over training",
        params=(
            Param("num_examples", int, doc="number of sequences", low=1),
            Param("num_tokens", int, 19, "M observable tokens", low=1),
            Param("layer_sizes", tuple, (20, 10), "latents per level above the tokens (the last = classes)"),
            Param("combinations", tuple, (3, 3), "how many lower-level nodes each latent owns, per level"),
            Param("keep", float, 1.0, "probability that an active latent activates each node it owns", low=0.0, high=1.0),
            Param("length", int, 20, "sequence length T (pre-padded)", low=1),
            Param("hierarchy_seed", int, 0, "seed of the hierarchy"),
            Param("seed", int, 0, "seed of the sequences"),
        ),
    )
)
