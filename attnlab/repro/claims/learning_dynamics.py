"""Claims about what small attention models learn on the family G synthetic tasks (P020, P048, P053, P131, P186).

Each claim trains the model its task module ships (`attnlab.tasks.*`) for a fixed, seeded number of steps and
measures one statistic of the trained model; the seed sets the data, the initialisation and the minibatches.

  P020  scan and snap: the share of the query's attention on the distinct tokens of its next token, after
        training over at the start (uniform attention): the attention "scans" toward the distinct tokens.
  P048  JoMA: attention entropy (mean over layers and query rows) over training with a ReLU MLP; its U-depth
        min(H_start − H_min, H_end − H_min) / H_start, on the entropy curve smoothed over 5 log points, is
        positive only when the curve first falls and then rises (a linear-MLP model is trained alongside for the
        figure).
  P053  RefEx: accuracy of a 1-layer, 1-head attention model on expressions naming attribute combinations that
        never occur in training.
  P131  hierarchical filtering: root-classification accuracy of the trained encoder over that of the exact
        belief-propagation posterior on the same held-out trees (full model, filtering k = 0).
  P186  LDA topics: (within − across)-topic mean embedding inner product over the mean squared embedding norm,
        and within- over across-topic mean attention weight, after masked-LM training.

The functions named `*_statistic` compute a claim's value from what a run measured; the tests check them on
planted inputs.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...tasks.hierarchical_filtering import (
    HIERARCHICAL_FILTERING,
    TreeData,
    TreeEncoder,
    bp_accuracy,
    filtered_tree_data,
)
from ...tasks.latent_hierarchy import JOMA, HierarchyTransformer, random_hierarchy, train_with_entropy
from ...tasks.lda_topics import (
    TOPIC_STRUCTURE,
    TopicMLM,
    attention_topic_similarity,
    embedding_topic_similarity,
    lda_documents,
    train_topic_mlm,
    word_topics,
)
from ...tasks.refex import GROUND_AND_COMPOSE, RefExAttention, refex_accuracy, refex_split, train_refex
from ...tasks.scan_snap import SCAN_AND_SNAP, ScanSnapModel, scan_snap_data, train_scan_snap
from ..claim import Claim, Measurement, Rule, Series, register_claim

# ---------------------------------------------------------------- P020 scan and snap

SCAN_SNAP = {"smoke": {"examples": 256, "steps": 4, "log_every": 2},
             "full": {"examples": 20000, "steps": 3000, "log_every": 100}}
SCAN_SNAP_LR = {"lr_decoder": 1.0, "lr_attention": 1.0}


def share_ratio_statistic(final_share: float, initial_share: float) -> float:
    """The attention share after training over the share at the start; ValueError for a share outside (0, 1]."""
    for name, share in (("final_share", final_share), ("initial_share", initial_share)):
        if not 0 <= share <= 1 or math.isnan(share):
            raise ValueError(f"{name}: expected an attention share in [0, 1], got {share!r}")
    if initial_share == 0:
        raise ValueError("initial_share: expected > 0 (the distinct tokens present at the start), got 0")
    return final_share / initial_share


@functools.lru_cache(maxsize=4)
def scan_snap_run(seed: int, size: str) -> tuple[dict[str, float], ...]:
    """The training log of the P020 model (attention share per token type every `log_every` steps)."""
    setting = SCAN_SNAP[size]
    data = scan_snap_data(setting["examples"], seed=seed)
    torch.manual_seed(seed)
    model = ScanSnapModel(data.vocab_size)
    return tuple(train_scan_snap(model, data, setting["steps"], batch_size=128, log_every=setting["log_every"],
                                 seed=seed, **SCAN_SNAP_LR))


def distinct_share(seed: int, size: str) -> Measurement:
    log = scan_snap_run(seed, size)
    steps = tuple(e["step"] for e in log)
    series = tuple(Series(kind, steps, tuple(e[kind] for e in log)) for kind in ("common", "common_per_last", "distinct"))
    value = share_ratio_statistic(log[-1]["distinct"], log[0]["distinct"])
    return Measurement(value, series, {"initial distinct share": log[0]["distinct"],
                                       "final distinct share": log[-1]["distinct"],
                                       "final common share": log[-1]["common"], "final loss": log[-1]["loss"]})


register_claim(Claim(
    id="P020-scan-to-distinct", paper=SCAN_AND_SNAP,
    statement="In a 1-layer transformer trained on next-token prediction, attention starts uniform and moves to "
    "the distinct tokens (those specific to the next token), away from the common tokens",
    statistic="attention share on the next token's distinct tokens after training / its share at step 0",
    direction="> 1 (≥ 1.2: a fifth more)", rule=Rule(1.2, math.inf),
    run=distinct_share, budget_s=120, method="train", xlabel="SGD step", ylabel="attention share", logx=False,
    logy=False,
    note="official data defaults (K=2 last tokens, J=2 next tokens each, 10 common, 5 common per last token, 10 "
    "distinct with weights 0.1..1, 5 context tokens), 20000 sequences; the official Model2 (one-hot tokens, Z and Y "
    "zero at init); plain SGD, batch 128, 3000 steps, η_Y = η_Z = 1. Margin 1.2: at init the distinct tokens hold "
    "≈ 27% of the attention, the claim is a move of the attention, so a fifth more is asked, not any increase",
))

# ---------------------------------------------------------------- P048 JoMA

JOMA_SETTING = {"smoke": {"steps": 4, "log_every": 1, "batch": 16},
                "full": {"steps": 1000, "log_every": 10, "batch": 64}}
SMOOTH = 5


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """The means of the `window` consecutive values (len(values) − window + 1 of them)."""
    x = np.asarray(values, dtype=float)
    if window < 1 or len(x) < window:
        raise ValueError(f"values: expected at least window = {window} values, got {len(x)}")
    return np.convolve(x, np.full(window, 1.0 / window), mode="valid")


def u_depth_statistic(entropy: Sequence[float], window: int = SMOOTH) -> float:
    """min(H_start − H_min, H_end − H_min) / H_start on the curve smoothed over `window` points: > 0 only when the
    minimum lies strictly inside and the curve falls to it and rises from it; 0 for a monotone curve."""
    h = moving_average(entropy, window)
    if h[0] <= 0:
        raise ValueError(f"entropy: expected a positive start, got {h[0]!r}")
    low = h.min()
    return float(min(h[0] - low, h[-1] - low) / h[0])


@functools.lru_cache(maxsize=4)
def joma_run(seed: int, size: str) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """(steps, mean-over-layers attention entropy) over training for a ReLU and a linear MLP."""
    setting = JOMA_SETTING[size]
    hierarchy = random_hierarchy(seed=seed)
    out = {}
    for activation in ("relu", "linear"):
        torch.manual_seed(seed)
        model = HierarchyTransformer(hierarchy.num_tokens, hierarchy.num_classes, dim=64, layers=2,
                                     activation=activation)
        log = train_with_entropy(model, hierarchy, setting["steps"], batch_size=setting["batch"],
                                 log_every=setting["log_every"], seed=seed)
        out[activation] = (tuple(e["step"] for e in log), tuple((e["entropy_0"] + e["entropy_1"]) / 2 for e in log))
    return out


def entropy_u_shape(seed: int, size: str) -> Measurement:
    runs = joma_run(seed, size)
    window = SMOOTH if size == "full" else 2
    series = tuple(Series(f"{a} MLP", *runs[a]) for a in ("relu", "linear"))
    return Measurement(u_depth_statistic(runs["relu"][1], window), series,
                       {"U-depth, linear MLP": u_depth_statistic(runs["linear"][1], window),
                        "entropy start, relu": runs["relu"][1][0], "entropy end, relu": runs["relu"][1][-1]})


register_claim(Claim(
    id="P048-entropy-u-shape", paper=JOMA,
    statement="With a nonlinear MLP the attention entropy first falls (attention becomes sparse) and then rises "
    "(dense again); with a linear MLP it only falls",
    statistic="U-depth of the ReLU model's attention entropy: min(H_start − H_min, H_end − H_min) / H_start "
    "(5-point smoothing, mean over 2 layers)",
    direction="> 0 (≥ 0.02 of the starting entropy on both sides)", rule=Rule(0.02, math.inf),
    run=entropy_u_shape, budget_s=240, method="train", xlabel="SGD step", ylabel="attention entropy (nats)",
    logx=False, logy=False,
    note="official generator (19 tokens, 20 latents, 10 classes, 3 children each, keep 1, length 20, hierarchy "
    "seeded by the seed); the official model in small: 2 post-LN layers, width 64, 1 head, SGD momentum 0.9, lr "
    "0.01, weight decay 5e-3, batch 64, 1000 steps; the linear-MLP curve is drawn and its U-depth is in the table. "
    "Margin 0.02: a dip and a rebound each of at least 2% of the entropy, above the batch-to-batch noise left "
    "after smoothing. H is the mean over every query row, the PAD-only prefix rows included (identical PAD keys: "
    "their attention stays uniform, a constant part of H that damps the dip and the rebound)",
))

# ---------------------------------------------------------------- P053 RefEx

REFEX = {"smoke": {"train": 64, "test": 32, "steps": 3}, "full": {"train": 5000, "test": 1000, "steps": 3000}}
NUM_OBJECTS = 5


@functools.lru_cache(maxsize=4)
def refex_run(seed: int, size: str) -> dict[str, float]:
    setting = REFEX[size]
    train, test, _ = refex_split(setting["train"], setting["test"], num_objects=NUM_OBJECTS, seed=seed)
    torch.manual_seed(seed)
    model = RefExAttention(heads=1, layers=1)
    losses = train_refex(model, train, setting["steps"], lr=0.01, batch_size=64, seed=seed)
    return {"held-out accuracy": refex_accuracy(model, test), "train accuracy": refex_accuracy(model, train),
            "final loss": float(np.mean(losses[-50:]))}


def held_out_accuracy(seed: int, size: str) -> Measurement:
    r = refex_run(seed, size)
    series = (Series("accuracy", (0.0, 1.0), (r["train accuracy"], r["held-out accuracy"])),
              Series("chance among the objects", (0.0, 1.0), (1 / NUM_OBJECTS, 1 / NUM_OBJECTS)))
    return Measurement(r["held-out accuracy"], series, dict(r))


register_claim(Claim(
    id="P053-held-out-combinations", paper=GROUND_AND_COMPOSE,
    statement="A single self-attention layer with a single head generalises to novel attribute combinations on RefEx",
    statistic="accuracy of a 1-layer 1-head attention model on expressions naming held-out attribute combinations",
    direction="high (≥ 0.5; chance among the 5 objects is 0.2)", rule=Rule(0.5, math.inf),
    run=held_out_accuracy, budget_s=180, method="train", xlabel="split (0 train, 1 held-out)", ylabel="accuracy",
    logx=False, logy=False,
    note="6×6 grid, 5 objects, colour × shape (3 × 3), 2 held-out combinations, 5000 training and 1000 held-out "
    "examples; the official SimpleTransformer (fixed one-hot attribute embeddings, 1 bias-free layer, 1 head, "
    "residual); Adam lr 0.01, batch 64, 3000 steps. Margin: the paper reports high accuracy; 0.5 is 2.5× the chance "
    "of picking one of the objects",
))

# ---------------------------------------------------------------- P131 hierarchical filtering

TREES = {"smoke": {"steps": 3, "batch": 16, "test": 64}, "full": {"steps": 1000, "batch": 64, "test": 2000}}
TREE_DEPTH, TREE_Q, TREE_FILTERING = 4, 4, 0


def bp_ratio_statistic(model_accuracy: float, bp_accuracy: float) -> float:
    """The model's accuracy over the Bayes-optimal (BP) accuracy on the same examples."""
    if not 0 < bp_accuracy <= 1 or not 0 <= model_accuracy <= 1:
        raise ValueError(f"accuracies: expected model in [0, 1] and BP in (0, 1], got {model_accuracy!r}, "
                         f"{bp_accuracy!r}")
    return model_accuracy / bp_accuracy


@functools.lru_cache(maxsize=4)
def tree_run(seed: int, size: str) -> dict[str, object]:
    setting = TREES[size]

    def trees(count: int, data_seed: int) -> TreeData:
        return filtered_tree_data(count, depth=TREE_DEPTH, q=TREE_Q, filtering=TREE_FILTERING, grammar_seed=seed,
                                  seed=data_seed)

    test = trees(setting["test"], 2**31 - 1 - seed)
    torch.manual_seed(seed)
    model = TreeEncoder(TREE_Q, 2**TREE_DEPTH, dim=32, heads=4, layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoints, accuracies = [], []

    def test_accuracy() -> float:
        with torch.no_grad():
            return float((model.root_logits(test.leaves).argmax(-1) == test.roots).double().mean())

    for step in range(setting["steps"]):
        if step % max(1, setting["steps"] // 5) == 0:
            checkpoints.append(float(step))
            accuracies.append(test_accuracy())
        batch = trees(setting["batch"], seed * 1_000_003 + step)
        loss = nn.functional.cross_entropy(model.root_logits(batch.leaves), batch.roots)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoints.append(float(setting["steps"]))
    accuracies.append(test_accuracy())
    return {"steps": tuple(checkpoints), "accuracy": tuple(accuracies), "bp": bp_accuracy(test)}


def bp_ratio(seed: int, size: str) -> Measurement:
    r = tree_run(seed, size)
    steps, acc, bp = r["steps"], r["accuracy"], float(r["bp"])  # type: ignore[arg-type]
    series = (Series("encoder", steps, acc), Series("BP optimum", steps, tuple(bp for _ in steps)))  # type: ignore[arg-type]
    return Measurement(bp_ratio_statistic(acc[-1], bp), series,  # type: ignore[index]
                       {"encoder accuracy": acc[-1], "BP accuracy": bp})  # type: ignore[index]


register_claim(Claim(
    id="P131-root-near-bp", paper=HIERARCHICAL_FILTERING,
    statement="A transformer encoder trained on the tree data reaches the Belief-Propagation-optimal accuracy",
    statistic="root-classification accuracy of the trained encoder / exact BP accuracy, same held-out trees "
    "(full model, k = 0)",
    direction="≈ 1 (≥ 0.9)", rule=Rule(0.9, math.inf),
    run=bp_ratio, budget_s=240, method="train", xlabel="AdamW step", ylabel="root accuracy", logx=False,
    logy=False,
    note="q = 4 symbols, depth L = 4 (16 leaves), σ = 1, filtering k = 0, the grammar seeded by the seed; "
    "TreeEncoder width 32, 4 heads, 2 pre-LN layers (the paper's is larger; CPU budget), mean-pooled root head; AdamW "
    "lr 1e-3, 1000 steps of 64 fresh trees; 2000 held-out trees. Margin: 'close to the BP optimum', read as within 10%",
))

# ---------------------------------------------------------------- P186 LDA topics

LDA = {"smoke": {"documents": 16, "steps": 3, "eval": 8}, "full": {"documents": 2000, "steps": 500, "eval": 200}}


def similarity_gap_statistic(within: float, across: float, scale: float) -> float:
    """(within − across) / scale (the scale: the mean squared embedding norm)."""
    if not scale > 0:
        raise ValueError(f"scale: expected > 0, got {scale!r}")
    return (within - across) / scale


def attention_ratio_statistic(within: float, across: float) -> float:
    """Mean within-topic attention weight over the mean across-topic weight."""
    if not across > 0 or within < 0:
        raise ValueError(f"across, within: expected across > 0 and within >= 0, got {across!r}, {within!r}")
    return within / across


@functools.lru_cache(maxsize=4)
def lda_run(seed: int, size: str) -> dict[str, float]:
    setting = LDA[size]
    data = lda_documents(setting["documents"], seed=seed)
    held_out = lda_documents(setting["eval"], seed=2**31 - 1 - seed)
    torch.manual_seed(seed)
    model = TopicMLM(data.num_words, dim=32)
    losses = train_topic_mlm(model, data, setting["steps"], lr=0.01, batch_size=16, seed=seed)
    topics = word_topics(data.topic_word)
    with torch.no_grad():
        embeddings = model.embed.weight[: data.num_words]
        e_within, e_across = embedding_topic_similarity(embeddings, topics)
        scale = float((embeddings.double() ** 2).sum(1).mean())
        attention = model.attention(held_out.words, held_out.padding)
        a_within, a_across = attention_topic_similarity(attention, held_out.words, topics, held_out.padding)
    return {"embedding within": e_within, "embedding across": e_across, "mean squared norm": scale,
            "attention within": a_within, "attention across": a_across, "first loss": losses[0],
            "final loss": float(np.mean(losses[-20:]))}


def embedding_gap(seed: int, size: str) -> Measurement:
    r = lda_run(seed, size)
    series = (Series("mean ⟨e_w, e_w'⟩ / mean ‖e‖²", (0.0, 1.0),
                     (r["embedding within"] / r["mean squared norm"], r["embedding across"] / r["mean squared norm"])),)
    return Measurement(similarity_gap_statistic(r["embedding within"], r["embedding across"], r["mean squared norm"]),
                       series, dict(r))


def attention_ratio(seed: int, size: str) -> Measurement:
    r = lda_run(seed, size)
    series = (Series("mean attention weight", (0.0, 1.0), (r["attention within"], r["attention across"])),)
    return Measurement(attention_ratio_statistic(r["attention within"], r["attention across"]), series, dict(r))


LDA_NOTE = ("the official setting: T = 10 topics on disjoint blocks of 10 of V = 100 words, α = 0.1, 100-150 words "
            "a document; 2000 training documents, 200 held-out ones for the attention; 1 layer, 1 head, width 32, "
            "learned embeddings; masked LM (15%, 80/10/10), Adam lr 0.01, batch 16, 500 steps. x axis: 0 within, "
            "1 across topics. ")
register_claim(Claim(
    id="P186-embedding-topics", paper=TOPIC_STRUCTURE,
    statement="After masked-LM training on LDA data, words of the same topic have larger embedding inner products "
    "than words of different topics",
    statistic="(mean ⟨e_w, e_w'⟩ within topics − across topics) / mean ‖e_w‖²",
    direction="> 0 (≥ 0.1)", rule=Rule(0.1, math.inf), run=embedding_gap, budget_s=180, method="train",
    xlabel="pairs (0 within, 1 across topics)", ylabel="inner product / mean ‖e‖²", logx=False, logy=False,
    note=LDA_NOTE + "Margin 0.1: a within-topic excess of a tenth of the squared norm (≈ 0 at init)",
))
register_claim(Claim(
    id="P186-attention-topics", paper=TOPIC_STRUCTURE,
    statement="After masked-LM training on LDA data, attention weights between words of the same topic are larger "
    "than between words of different topics",
    statistic="mean attention weight A(i → j), i ≠ j, within topics / across topics, on held-out documents",
    direction="> 1 (≥ 1.1)", rule=Rule(1.1, math.inf), run=attention_ratio, budget_s=180, method="train",
    xlabel="pairs (0 within, 1 across topics)", ylabel="mean attention weight", logx=False, logy=False,
    note=LDA_NOTE + "The same trained model as P186-embedding-topics. Margin 1.1: a tenth more weight within topics",
))
