"""MAPS: what an attention head does, read from its parameters as vocabulary-to-vocabulary maps (P173).

Elhelo & Geva (2024) project a head's output-value and query-key circuits onto the vocabulary. With E (V, d) the
token embeddings, U (d, V) the unembedding and W_V^h (d, d_h), W_O^h (d_h, d) the head's value and output matrices
(row vectors: x ↦ x W):

    M_h = E W_V^h W_O^h U            (V, V): row s = the logits the head writes when it attends to token s
    Q_h = E W_Q^h (E W_K^h)ᵀ         (V, V): row s = the scores query token s gives each key token (positions left out)

relation score of a head for a relation R = {(s, t)} (the official code, `MAPS.calc_relation_score`): the share of
pairs whose target is among the k largest entries of the source's row,

    score_h(R) = 1/|R| Σ_{(s,t)∈R} 1[t ∈ top-k(M_h[s, :])]        suppression score: the same on −M_h,

and salient mappings (`MAPS.get_salient_operations`): the tokens the head amplifies most, ‖e_s W_V W_O‖ / ‖e_s‖,
each with the top entries of its row of M_h. The official code projects the raw embedding matrix (for layers past
the first, through the first MLP) and the raw W_U. Here a pre-norm model can instead read the map through its norms
(`fold_norms=True`, the default for `ToyLM`): E is replaced by each layer's pre-norm applied to the embeddings,
LN_l(E) — what the head reads when the residual of a token is its embedding — and U by the final LayerNorm's
gain and centring folded into it, (I − 11ᵀ/d) diag(γ) U (its division by the norm is a positive factor per row and
leaves a row's ranking unchanged; its bias and the unembedding's bias are the same for every source and are left
out, as MAPS leaves out biases). `fold_norms=False` gives the official, unfolded M_h.

The measured contribution (MAPS' causal experiment): `head_ablation_effects` zeroes one head at a time — its
attention set to 0 by `patterns.inject_patterns` with the empty pattern, so A·v = 0 at every position, on any
mechanism whose core runs through `attend` — and measures the drop of the target's logit and of the accuracy at
the last position. MAPS reports that static relation scores correlate with such inference-time measurements.

The demonstration (`successor_lm`): an attention-only `ToyLM` trained here on a planted relation — a prompt holds
one content token c among filler tokens and ends with a query token; the answer is succ(c) = the next content
token (cyclic). Only one head, `SuccessorRecipe.planted`, may attend to other positions (every other head sees its
own position alone, through a per-head attn_mask), so the successor of the earlier token must come through it —
without that, the heads share the job and no single head carries the relation. The planted head's M_h has the
successor relation; over all heads the static scores follow the ablation drops (Pearson r, as MAPS reports). The
full recipe (2 layers × 4 heads, 1500 steps, about 2 minutes on one loaded core): accuracy 1.00, relation score
1.00 for the planted head and at most 0.12 for the others, its ablation drops the answer's logit by 11.3 (others
at most 0.4), r = 0.99.

    from attnlab.analysis.vocabulary_maps import SuccessorRecipe, SuccessorTask, successor_lm, relation_scores
    from attnlab.analysis.vocabulary_maps import head_ablation_effects
    task, recipe = SuccessorTask(), SuccessorRecipe()
    lm = successor_lm(task, recipe).model                # trained once, then read from attnlab-results/successor_lm
    scores = relation_scores(lm, task.pairs, k=1)        # (layers, heads): 1.0 at recipe.planted
    ids, targets = task.sample(torch.Generator().manual_seed(1), 512)
    drops = head_ablation_effects(lm, ids, targets[:, -1], forward=recipe.forward)["logit_drop"]   # (layers, heads)

Model requirements: attention modules with per-head q/k/v/out projections (`attnlab.core.module.Attention`:
q_proj, k_proj, v_proj (heads·head_dim, d), out_proj (d, heads·head_dim)); E from `model.embed` (an
nn.Embedding) and U from `model.unembed` (an nn.Linear), or given; the norms to fold from a `ToyLM`
(`blocks[l].norm1`, `norm`) or given.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.module import Attention
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int
from .capture import attnlab_modules
from .patterns import inject_patterns
from .toy_lm import Cached, ToyLM, ToyLMSettings, cached, settings_key, train_toy_lm

P173 = Paper("P173", "Inferring Functionality of Attention Heads from their Parameters (MAPS)", 2024, "2412.11965")


# -- the matrices ---------------------------------------------------------------------------------------------
@dataclass
class HeadWeights:
    """Per-layer, per-head matrices in the row-vector convention x ↦ x W: w_q, w_k, w_v (layers, heads, d, d_h),
    w_o (layers, heads, d_h, d); embeddings (layers, V, d): the embeddings as each layer's heads read them;
    unembedding (d, V)."""

    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    w_o: Tensor
    embeddings: Tensor
    unembedding: Tensor

    @property
    def layers(self) -> int:
        return self.w_v.shape[0]

    @property
    def heads(self) -> int:
        return self.w_v.shape[1]


def head_matrices(module: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_Q, W_K, W_V (heads, d, d_h), W_O (heads, d_h, d)) of an attnlab attention module: x W_V^h is head h's value,
    and the module's output is Σ_h (A_h v_h) W_O^h + bias."""
    if not isinstance(module, Attention) or not all(isinstance(getattr(module, n, None), nn.Linear)
                                                     for n in ("q_proj", "k_proj", "v_proj", "out_proj")):
        raise TypeError(f"module: expected an attnlab Attention with q_proj, k_proj, v_proj, out_proj linear maps, got "
                        f"{type(module).__name__}")
    heads, d_h = module.heads, module.head_dim

    def split_in(linear: nn.Linear) -> Tensor:  # weight (heads·d_h, d) -> (heads, d, d_h)
        return linear.weight.detach().reshape(heads, d_h, -1).transpose(1, 2)

    w_o = module.out_proj.weight.detach().reshape(-1, heads, d_h).permute(1, 2, 0)  # (d, heads·d_h) -> (heads, d_h, d)
    return split_in(module.q_proj), split_in(module.k_proj), split_in(module.v_proj), w_o


def fold_final_norm(unembedding: Tensor, norm: nn.Module) -> Tensor:
    """U read through a final norm: (I − 11ᵀ/d) diag(γ) U for a LayerNorm, diag(γ) U for an RMSNorm (module docstring)."""
    if isinstance(norm, nn.LayerNorm):
        gained = unembedding if norm.weight is None else norm.weight.detach()[:, None].to(unembedding.dtype) * unembedding
        return gained - gained.mean(0, keepdim=True)
    if isinstance(norm, nn.RMSNorm):
        return unembedding if norm.weight is None else norm.weight.detach()[:, None].to(unembedding.dtype) * unembedding
    raise TypeError(f"final_norm: expected an nn.LayerNorm or nn.RMSNorm to fold into the unembedding, got "
                    f"{type(norm).__name__}")


def model_weights(
    model: nn.Module,
    *,
    fold_norms: bool | None = None,
    embedding: Tensor | None = None,
    unembedding: Tensor | None = None,
    input_norms: Sequence[nn.Module] | None = None,
    final_norm: nn.Module | None = None,
) -> HeadWeights:
    """The MAPS matrices of every attention module of `model` (`HeadWeights`), in float64.

    embedding (V, d) / unembedding (d, V): default `model.embed.weight` / `model.unembed.weight`ᵀ. fold_norms
    (default: True for a `ToyLM`, else False): read E through each layer's pre-norm (`input_norms`, default a ToyLM's
    `blocks[l].norm1`) and U through the final norm (`final_norm`, default a ToyLM's `norm`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = [m for _, m in attnlab_modules(model)]
    if not modules:
        raise TypeError(f"model: {type(model).__name__} holds no attnlab attention module")
    fold = isinstance(model, ToyLM) if fold_norms is None else fold_norms
    if not isinstance(fold, bool):
        raise ParameterError(f"fold_norms: expected a bool or None, got {fold_norms!r}")
    e = _matrix("embedding", embedding, getattr(getattr(model, "embed", None), "weight", None), "model.embed")
    u_default = getattr(getattr(model, "unembed", None), "weight", None)
    u = _matrix("unembedding", unembedding, None if u_default is None else u_default.T, "model.unembed")
    if e.shape[1] != u.shape[0]:
        raise ValueError(f"unembedding: expected ({e.shape[1]}, V) to match the embedding's width, got {tuple(u.shape)}")
    q, k, v, o = zip(*(head_matrices(m) for m in modules))
    embeddings = e[None].expand(len(modules), -1, -1)
    if fold:
        norms = input_norms if input_norms is not None else [b.norm1 for b in getattr(model, "blocks", [])]
        if len(norms) != len(modules):
            raise ValueError(f"input_norms: expected one pre-norm per attention module ({len(modules)}), got {len(norms)}")
        with torch.no_grad():
            embeddings = torch.stack([norm(e.to(next(iter(norm.parameters()), e).dtype)).to(torch.float64)
                                      for norm in norms])
        final = final_norm if final_norm is not None else getattr(model, "norm", None)
        if final is None:
            raise ValueError("final_norm: expected the final norm to fold (fold_norms=True), the model has no `norm`")
        u = fold_final_norm(u, final)
    return HeadWeights(*(torch.stack(w).to(torch.float64) for w in (q, k, v, o)), embeddings.to(torch.float64),
                       u.to(torch.float64))


def _matrix(name: str, given: Tensor | None, default: Tensor | None, where: str) -> Tensor:
    t = given if given is not None else default
    if t is None:
        raise ValueError(f"{name}: expected a (V, d) / (d, V) matrix, and the model has no {where} to read it from")
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a 2-D float matrix, got {got}")
    return t.detach().to(torch.float64)


def ov_map(embedding: Tensor, w_v: Tensor, w_o: Tensor, unembedding: Tensor) -> Tensor:
    """M = E W_V W_O U: (..., V_in, V_out) for embedding (..., V_in, d), w_v (..., d, d_h), w_o (..., d_h, d),
    unembedding (d, V_out); leading axes broadcast (layers, heads)."""
    return embedding @ w_v @ w_o @ unembedding


def qk_map(embedding: Tensor, w_q: Tensor, w_k: Tensor, key_embedding: Tensor | None = None) -> Tensor:
    """Q = E W_Q (E' W_K)ᵀ: (..., V_q, V_k), E' = key_embedding (default E); positions left out."""
    keys = embedding if key_embedding is None else key_embedding
    return (embedding @ w_q) @ (keys @ w_k).transpose(-1, -2)


def vocabulary_maps(model: nn.Module, **weights: Any) -> dict[str, Tensor]:
    """{"ov": M (layers, heads, V, V), "qk": Q (layers, heads, V, V)} of every head (float64; V² per head: for small
    vocabularies — `relation_scores` reads only the rows it needs). Keywords as `model_weights`."""
    w = model_weights(model, **weights)
    e = w.embeddings[:, None]
    return {"ov": ov_map(e, w.w_v, w.w_o, w.unembedding), "qk": qk_map(e, w.w_q, w.w_k)}


# -- scores ---------------------------------------------------------------------------------------------------
def _pairs(pairs: Any, vocab: int) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(pairs) if not isinstance(pairs, Tensor) else pairs
    if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] == 0 or t.is_floating_point():
        raise ValueError(f"pairs: expected (source, target) token id pairs, shape (R, 2), got shape {tuple(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= vocab:
        raise ValueError(f"pairs: expected token ids in [0, {vocab}), got values in [{int(t.min())}, {int(t.max())}]")
    return t[:, 0].long(), t[:, 1].long()


def topk_membership(rows: Tensor, targets: Tensor, k: int) -> Tensor:
    """1[t_r ∈ top-k(rows[r])] averaged over r: rows (..., R, V), targets (R,) -> (...)."""
    if not is_int(k) or not 1 <= k <= rows.shape[-1]:
        raise ParameterError(f"k: expected an int in [1, {rows.shape[-1]}] (the vocabulary), got {k!r}")
    top = rows.topk(k, dim=-1).indices
    return (top == targets[:, None].to(top.device)).any(-1).to(torch.float64).mean(-1)


def relation_scores(model: nn.Module, pairs: Any, *, k: int = 1, suppression: bool = False,
                    **weights: Any) -> Tensor:
    """MAPS relation score of every head for R = `pairs` ((R, 2) source, target ids): the share of pairs with t among
    the k largest entries of row s of M_h (of −M_h with `suppression`): (layers, heads). Keywords as `model_weights`."""
    w = model_weights(model, **weights)
    src, dst = _pairs(pairs, w.embeddings.shape[1])
    if not isinstance(suppression, bool):
        raise ParameterError(f"suppression: expected a bool, got {suppression!r}")
    rows = ov_map(w.embeddings[:, None, src], w.w_v, w.w_o, w.unembedding)  # (layers, heads, R, V)
    return topk_membership(-rows if suppression else rows, dst, k)


def salient_mappings(model: nn.Module, layer: int, head: int, *, tokens: int = 10, mappings: int = 5,
                     **weights: Any) -> list[tuple[int, float, list[int]]]:
    """The `tokens` source tokens head (layer, head) amplifies most, ‖e_s W_V W_O‖ / ‖e_s‖, as (source, amplification,
    its `mappings` top targets in M_h), largest amplification first. Keywords as `model_weights`."""
    w = model_weights(model, **weights)
    if not is_int(layer) or not 0 <= layer < w.layers or not is_int(head) or not 0 <= head < w.heads:
        raise ValueError(f"layer, head: expected a head in [0, {w.layers}) × [0, {w.heads}), got ({layer!r}, {head!r})")
    vocab = w.embeddings.shape[1]
    for name, value, high in (("tokens", tokens, vocab), ("mappings", mappings, w.unembedding.shape[1])):
        if not is_int(value) or not 1 <= value <= high:
            raise ParameterError(f"{name}: expected an int in [1, {high}], got {value!r}")
    e = w.embeddings[layer]
    moved = e @ w.w_v[layer, head] @ w.w_o[layer, head]
    norm = e.norm(dim=-1)
    gain = moved.norm(dim=-1) / torch.where(norm > 0, norm, 1.0)
    top = gain.topk(tokens).indices
    targets = (moved[top] @ w.unembedding).topk(mappings, dim=-1).indices
    return [(int(s), float(gain[s]), [int(t) for t in row]) for s, row in zip(top, targets)]


# -- the measured contribution ---------------------------------------------------------------------------------
def head_ablation_effects(model: nn.Module, ids: Tensor, targets: Tensor, *, position: int = -1,
                          forward: Callable[[nn.Module, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Zero each head in turn (its attention set to 0 at every position) and measure, at `position`, the drop of the
    target's logit (mean over prompts) and of the accuracy: {"logit_drop", "accuracy_drop"} (layers, heads), and the
    unablated "logit" and "accuracy". forward(model, ids) -> logits (batch, n, V) (default model(ids)); targets
    (batch,) token ids."""
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"ids: expected token ids (batch, n), got {getattr(ids, 'shape', type(ids).__name__)}")
    if not isinstance(targets, Tensor) or targets.shape != ids.shape[:1]:
        raise ValueError(f"targets: expected one target id per prompt, shape ({ids.shape[0]},), got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    if not is_int(position) or not -ids.shape[1] <= position < ids.shape[1]:
        raise ParameterError(f"position: expected a position of the prompts (n = {ids.shape[1]}), got {position!r}")
    modules = [m for _, m in attnlab_modules(model) if m.spec.supports and m.spec.supports.materialize]  # type: ignore[union-attr]
    if not modules:
        raise TypeError(f"model: {type(model).__name__} holds no attnlab attention module to ablate")

    run = forward or (lambda m, x: m(x))

    def measure() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = run(model, ids)[:, position].to(torch.float64)
        picked = logits.gather(-1, targets[:, None].to(logits.device))[:, 0]
        return picked.mean(), (logits.argmax(-1) == targets.to(logits.device)).to(torch.float64).mean()

    base_logit, base_accuracy = measure()
    empty = torch.zeros(ids.shape[1], ids.shape[1], dtype=torch.bool)
    logit_drop = torch.zeros(len(modules), max(m.heads for m in modules), dtype=torch.float64)
    accuracy_drop = torch.zeros_like(logit_drop)
    for layer, module in enumerate(modules):
        for head in range(module.heads):
            with inject_patterns(model, {(layer, head): empty}):
                logit, accuracy = measure()
            logit_drop[layer, head] = base_logit - logit
            accuracy_drop[layer, head] = base_accuracy - accuracy
    return {"logit_drop": logit_drop, "accuracy_drop": accuracy_drop, "logit": base_logit, "accuracy": base_accuracy}


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equally shaped tensors (flattened); 0 when either is constant."""
    a, b = x.flatten().to(torch.float64), y.flatten().to(torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


# -- the planted relation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuccessorTask:
    """Prompts of `length` tokens: `length` − 2 fillers and one content token c at a random place among the first
    `length` − 1 positions, then the query token; the answer is succ(c) = content token (c + 1) mod `content`.
    Token ids: content 0..content−1, fillers content..content+fillers−1, the query last."""

    content: int = 24
    fillers: int = 16
    length: int = 10

    def __post_init__(self) -> None:
        for name, low in (("content", 2), ("fillers", 1), ("length", 3)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ParameterError(f"{name}: expected an int >= {low}, got {value!r}")

    @property
    def vocab(self) -> int:
        return self.content + self.fillers + 1

    @property
    def query(self) -> int:
        return self.content + self.fillers

    @property
    def pairs(self) -> Tensor:
        """The relation R = {(c, succ c)}: (content, 2)."""
        c = torch.arange(self.content)
        return torch.stack([c, (c + 1) % self.content], 1)

    def sample(self, generator: torch.Generator, batch: int = 64) -> tuple[Tensor, Tensor]:
        """(ids (batch, length), targets (batch, length)): the answer at the last position, -100 elsewhere."""
        n = self.length
        ids = self.content + torch.randint(0, self.fillers, (batch, n), generator=generator)
        c = torch.randint(0, self.content, (batch,), generator=generator)
        ids[torch.arange(batch), torch.randint(0, n - 1, (batch,), generator=generator)] = c
        ids[:, -1] = self.query
        targets = torch.full_like(ids, -100)
        targets[:, -1] = (c + 1) % self.content
        return ids, targets


@dataclass(frozen=True)
class SuccessorRecipe:
    """An attention-only ToyLM of `dim`, `layers` × `heads` in which only head `planted` = (layer, head) sees other
    positions (every other head attends to its own position alone: a per-head attn_mask), so the successor of the
    earlier token can only come through that head; `steps` steps of `batch` prompts."""

    dim: int = 64
    heads: int = 4
    layers: int = 2
    planted: tuple[int, int] = (1, 2)
    steps: int = 1500
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        layer, head = self.planted
        if not (is_int(layer) and is_int(head) and 0 <= layer < self.layers and 0 <= head < self.heads):
            raise ParameterError(f"planted: expected a (layer, head) of the model ({self.layers} × {self.heads}), got "
                                 f"{self.planted!r}")

    def settings(self, task: SuccessorTask) -> ToyLMSettings:
        return ToyLMSettings(vocab=task.vocab, dim=self.dim, heads=self.heads, layers=self.layers, context=task.length,
                             mlp_ratio=0.0)

    def attn_masks(self, n: int) -> dict[int, Tensor]:
        """layer -> bool (1, heads, n, n), True = attend: the identity for every head but the planted one."""
        masks = {}
        for layer in range(self.layers):
            keep = torch.eye(n, dtype=torch.bool).expand(1, self.heads, n, n).clone()
            if layer == self.planted[0]:
                keep[:, self.planted[1]] = True
            masks[layer] = keep
        return masks

    def forward(self, model: nn.Module, ids: Tensor) -> Tensor:
        """The model's logits with the recipe's per-head masks (how it was trained, and how to run it)."""
        return model(ids, attn_masks=self.attn_masks(ids.shape[1]))


def train_successor_lm(task: SuccessorTask, recipe: SuccessorRecipe = SuccessorRecipe(), *,
                       progress: str | None = None, threads: int | None = 1) -> ToyLM:
    """A ToyLM fitted to `task` by `recipe` (seeded, not cached). threads: torch's CPU threads while training
    (restored after; None: as they are) — one is fastest for a model this small."""
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ParameterError(f"threads: expected a positive int or None, got {threads!r}")
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = ToyLM(recipe.settings(task))
        train_toy_lm(model, lambda g: task.sample(g, recipe.batch), steps=recipe.steps, lr=recipe.lr, seed=recipe.seed,
                     progress=progress, forward=recipe.forward)
    finally:
        torch.set_num_threads(before)
    return model


def successor_lm(task: SuccessorTask = SuccessorTask(), recipe: SuccessorRecipe = SuccessorRecipe(), *,
                 cache_dir: str | Path | None = None, retrain: bool = False) -> Cached:
    """The model of `train_successor_lm`, from attnlab-results/successor_lm (or `cache_dir`) or trained (minutes
    on one core) and saved; the record is its `maps_summary`. Run it with `recipe.forward(model, ids)`."""
    key: dict[str, Any] = {"task": asdict(task), "recipe": asdict(recipe), "model": settings_key(recipe.settings(task))}

    def fit(model: nn.Module) -> dict[str, Any]:
        trained = train_successor_lm(task, recipe, progress="successor_lm")
        model.load_state_dict(trained.state_dict())
        return maps_summary(trained, task, recipe)

    return cached("successor_lm", key, lambda: ToyLM(recipe.settings(task)), fit, cache_dir=cache_dir, retrain=retrain)


def maps_summary(model: nn.Module, task: SuccessorTask, recipe: SuccessorRecipe, *, k: int = 1, prompts: int = 512,
                 seed: int = 12345) -> dict[str, Any]:
    """On `prompts` held-out prompts (drawn with `seed`): the accuracy, the MAPS relation scores (layers, heads), the
    ablation drops of the answer's logit and of the accuracy, and the Pearson r of scores and logit drops."""
    ids, targets = task.sample(torch.Generator().manual_seed(seed), prompts)
    scores = relation_scores(model, task.pairs, k=k)
    effects = head_ablation_effects(model, ids, targets[:, -1], forward=recipe.forward)
    return {
        "accuracy": float(effects["accuracy"]),
        "relation_scores": scores.tolist(),
        "logit_drop": effects["logit_drop"].tolist(),
        "accuracy_drop": effects["accuracy_drop"].tolist(),
        "pearson": pearson(scores, effects["logit_drop"]),
        "top_head": list(divmod(int(scores.argmax()), scores.shape[1])),
        "planted": list(recipe.planted),
    }


_MODEL = Param("model", nn.Module, doc="a model of attnlab attention modules with model.embed / model.unembed")
_FOLD = Param("fold_norms", bool, None, "read E and U through the pre-norms and final norm (default: for a ToyLM)",
              optional=True)
add(Spec(name="maps-relation-scores", kind="analysis", paper=P173, factory=relation_scores, family="E",
         summary="MAPS: share of a relation's pairs (s, t) with t in the top-k of row s of M_h = E W_V W_O U, per head",
         params=(_MODEL, Param("pairs", (Tensor, list, tuple), doc="(R, 2) source, target token ids"),
                 Param("k", int, 1, "top-k of the row", low=1), Param("suppression", bool, False, "score −M_h"), _FOLD)))
add(Spec(name="vocabulary-maps", kind="analysis", paper=P173, factory=vocabulary_maps, family="E",
         summary="MAPS: per head the vocabulary-to-vocabulary maps E W_V W_O U (OV) and E W_Q (E W_K)ᵀ (QK)",
         params=(_MODEL, _FOLD)))
add(Spec(name="maps-salient-mappings", kind="analysis", paper=P173, factory=salient_mappings, family="E",
         summary="MAPS: the tokens a head amplifies most (‖e W_V W_O‖/‖e‖) and their top targets in M_h",
         params=(_MODEL, Param("layer", int, doc="attention module index"), Param("head", int, doc="head index"),
                 Param("tokens", int, 10, "source tokens", low=1), Param("mappings", int, 5, "targets per source", low=1),
                 _FOLD)))
