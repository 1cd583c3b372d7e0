"""`attnlab bench recall`: multi-query associative recall (MQAR, Zoology P243) for every causal mechanism.

    attnlab bench recall                               the CPU-scale default grid, every causal mechanism
    attnlab bench recall --grid panel                  the small panel of `make bench`
    attnlab bench recall --grid zoology --mechanisms softmax     Zoology's Figure 2 grid (GPU scale)
    attnlab bench recall --mechanisms softmax,rope --seq-lens 64 --kv 4 --d-models 64 --json -

The model is a 2-layer causal language model: token embedding plus a learned absolute
position embedding (as Zoology's attention models), then twice a pre-norm residual
mixer — the mechanism, built with `attnlab.build(name, dim=d_model, heads=HEADS,
causal=True, **params)` — and a pre-norm residual MLP (4·d_model, GELU), a final
LayerNorm and a linear LM head. (Zoology ties the head to the embedding; untied, with
PyTorch's default initialisation, the dense baseline leaves the "any value of the
prefix" plateau at 25 % accuracy several times sooner, which is what makes a CPU-sized
run possible.) The loss is the cross-entropy on the queried positions (the only
labelled ones), the accuracy the fraction of queried positions whose arg-max is the
paired value, on a held-out set drawn with another seed (seed + 10, as Zoology). AdamW
(weight decay 0.1), linear warm-up over 10 % of the steps, then cosine decay to 0 at
`max_epochs`; training stops once the validation accuracy, measured after every epoch,
reaches 0.99. Model, data and batch order are seeded from the configuration's seed; the
batch size is 64, or Zoology's (512 for L ≤ 128, 256, 128 for L = 512) for Zoology's
data size; both it and the rest of the recipe are recorded in the metrics ("recipe").
The non-query positions of the inputs are 0 (`random_non_queries=False`, as Zoology's
Figure 2 runs).

A mechanism without a causal mode is recorded as "unsupported" (a bidirectional mixer
would see the answer), as is one without 1-D token sequences. A configuration already in
the store is skipped (resume); its stored result is reported; `--rerun` trains it again,
the stored result being replaced only once the new one is recorded. The budgets that can
change a result (the epoch cap, the data size, the time cap "cell_seconds") are part of
the configuration; the metrics say why training stopped ("stopped": converged, step
budget, time cap, diverged) and how many of the step budget's steps it took.

Grids (4·kv > L cells are skipped): "default" L ∈ {64, 128, 256}, kv ∈ {4, 8, 16, 32},
d_model ∈ {64, 128}, CPU-sized: vocabulary 512, 8 000 training and 1 000 test examples,
lr 3e-3, at most 16 epochs and 60 s of training per configuration; "zoology" Zoology's Figure 2 — (L, kv) ∈ {(64, 4),
(128, 8), (256, 16), (512, 64)}, d_model ∈ {64, 128, 256, 512}, learning rates
logspace(-4, -2, 4), vocabulary 8192, 100 000 training and 3 000 test examples, 64
epochs, batch 512/512/256/128 by L (each learning rate is its own configuration: the
report takes the best, as Zoology does); "panel" the `make bench` comparison: every causal
mechanism at L=32, kv=4, d_model=64 with one budget, 8 epochs of 4 000 examples (504 steps;
a time cap of 240 s only as a safety, marked "time cap" when it stops one), sliding-window
with window 8 and DHSA with chunks of 8 (PANEL_PARAMS: their defaults would be full
attention at L=32), dense softmax first, then one of each kind (PANEL_FIRST), two at a time
(PANEL_WORKERS processes), starting nothing after 120 s once 6 have started; the cells left
are trained by the next run.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..catalogue import imported_modules
from ..core.errors import ParameterError
from ..core.registry import Spec, get, list_mechanisms
from ..tasks.mqar import IGNORE_INDEX, check_mqar, mqar
from .env import load_average, run_environment
from .progress import progress, say
from .speed import bench_params as mechanism_params  # defaults, and the test value of required parameters
from .speed import import_user_modules, parse_params
from .store import DEFAULT_DB, ResultStore, canonical

SUITE = "recall"
LAYERS = 2
HEADS = 1  # Zoology's attention baseline is single-headed
MLP_RATIO = 4
WARMUP_FRACTION = 0.1
TARGET_ACCURACY = 0.99
WEIGHT_DECAY = 0.1
THREADS = 1  # these models are small: one thread wastes nothing waiting on another, and suffers least from load
TEST_SEED_OFFSET = 10  # the held-out set's seed is the training seed + 10, as Zoology's


# -- the model --------------------------------------------------------------------------------
class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, mixer: nn.Module, d_model: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, MLP_RATIO * d_model), nn.GELU(), nn.Linear(MLP_RATIO * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RecallModel(nn.Module):
    """A causal language model with `layers` blocks whose mixer is the mechanism `mechanism`."""

    def __init__(
        self,
        mechanism: str,
        params: dict[str, Any],
        *,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        layers: int = LAYERS,
        heads: int = HEADS,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(get(mechanism).build(dim=d_model, heads=heads, causal=True, **params), d_model) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def hidden(self, tokens: Tensor) -> Tensor:
        """(batch, n) token ids -> (batch, n, d_model) final-norm states."""
        n = tokens.shape[1]
        if n > self.seq_len:
            raise ValueError(f"tokens: expected at most seq_len={self.seq_len} positions, got {n}")
        h = self.embed(tokens) + self.position[:n]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(self, tokens: Tensor) -> Tensor:
        """(batch, n) token ids -> (batch, n, vocab_size) next-token logits."""
        return self.head(self.hidden(tokens))

    def query_logits(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and labels at the queried positions only, (q, vocab_size) and (q,)."""
        mask = labels != IGNORE_INDEX
        return self.head(self.hidden(tokens)[mask]), labels[mask]


# -- configurations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A family of configurations: (seq_len, kv) cells × d_models × learning rates, one data recipe."""

    cells: tuple[tuple[int, int], ...]
    d_models: tuple[int, ...]
    lrs: tuple[float, ...]
    vocab_size: int
    max_epochs: int
    train_examples: int
    test_examples: int
    cell_seconds: float | None  # time cap of one configuration's training, None for none


def _product(seq_lens: Iterable[int], kvs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    return tuple((n, kv) for n in seq_lens for kv in kvs if 4 * kv <= n)


GRIDS: dict[str, Grid] = {
    "default": Grid(_product((64, 128, 256), (4, 8, 16, 32)), (64, 128), (3e-3,), 512, 16, 8_000, 1_000, 60.0),
    "zoology": Grid(
        ((64, 4), (128, 8), (256, 16), (512, 64)),
        (64, 128, 256, 512),
        tuple(float(f"{x:.6g}") for x in torch.logspace(-4, -2, 4, dtype=torch.float64).tolist()),
        8192, 64, 100_000, 3_000, None,
    ),
    # the `make bench` comparison at 504 steps (20 s on an idle core; dense softmax reaches about 0.9, it
    # needs about 380 steps of a 756-step schedule to pass 0.99)
    "panel": Grid(((32, 4),), (64,), (3e-3,), 512, 8, 4_000, 1_000, 240.0),
}
# the panel's first mechanisms (dense softmax, then one of each kind, the quicker to train first), so that a run
# cut short compares kinds; the scans (delta, gated-linear, mamba: 10-20x softmax's time a step) come later
PANEL_FIRST = ("softmax", "sliding-window", "linear", "retention", "based", "rope", "alibi", "delta", "gated-linear",
               "mamba")
PANEL_SECONDS = 120.0  # the panel starts no configuration after this (the next run does the rest) ...
PANEL_MIN = 6  # ... once it has started this many (a comparison, however loaded the machine)
PANEL_CAP = GRIDS["panel"].cell_seconds
PANEL_WORKERS = 2  # training processes at once (one thread each)
# parameters that keep a mechanism's character at the panel's L = 32 (the default 256-wide window, or DHSA's
# 64-token chunks, would be full attention there)
PANEL_PARAMS: dict[str, dict[str, Any]] = {"sliding-window": {"radius": 8}, "dhsa": {"chunk_size": 8, "top_chunks": 1}}
CPU_BATCH = 64
ZOOLOGY_TRAIN_EXAMPLES = 100_000


def batch_size(config: dict[str, Any]) -> int:
    """The batch size of a configuration: Zoology's (by L) at Zoology's data size, else 64 (CPU scale)."""
    if config["train_examples"] >= ZOOLOGY_TRAIN_EXAMPLES:
        n = config["seq_len"]
        return 512 if n <= 128 else 256 if n <= 256 else 128 if n <= 512 else 64
    return min(CPU_BATCH, config["train_examples"])


def make_config(
    mechanism: str,
    params: dict[str, Any],
    *,
    seq_len: int,
    num_kv_pairs: int,
    d_model: int,
    vocab_size: int,
    seed: int,
    lr: float,
    max_epochs: int,
    train_examples: int,
    test_examples: int,
    layers: int = LAYERS,
    cell_seconds: float | None = None,
) -> dict[str, Any]:
    """A recall configuration with the agreed keys (see the store's formats); checks the MQAR setting.

    The budgets that can change a result are part of it: `max_epochs` (with the data size
    and batch, the step budget) and `cell_seconds` (a wall-clock cap on training, None for none).
    """
    check_mqar(seq_len, num_kv_pairs, vocab_size)
    for name, value in (("d_model", d_model), ("max_epochs", max_epochs), ("train_examples", train_examples),
                        ("test_examples", test_examples), ("layers", layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr!r}")
    if cell_seconds is not None and not cell_seconds > 0:
        raise ValueError(f"cell_seconds: expected > 0 or None, got {cell_seconds!r}")
    return {
        "mechanism": mechanism, "params": params, "seq_len": seq_len, "num_kv_pairs": num_kv_pairs,
        "d_model": d_model, "vocab_size": vocab_size, "seed": seed, "lr": float(lr), "max_epochs": max_epochs,
        "train_examples": train_examples, "test_examples": test_examples, "layers": layers,
        "cell_seconds": None if cell_seconds is None else float(cell_seconds),
    }


def grid_configs(
    grid: Grid,
    mechanisms: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    seq_lens: Sequence[int] | None = None,
    kvs: Sequence[int] | None = None,
    d_models: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    max_epochs: int | None = None,
    vocab_size: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    cell_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """The configurations of `grid` for `mechanisms`, with any dimension overridden; 4·kv > L cells skipped.

    `params` maps a mechanism to parameter values of its own (`--param`, checked by `speed.parse_params`);
    `cell_seconds` overrides the grid's time cap.
    """
    cells = grid.cells
    if seq_lens is not None or kvs is not None:
        cells = _product(seq_lens or sorted({n for n, _ in grid.cells}), kvs or sorted({kv for _, kv in grid.cells}))
    out = []
    for name in mechanisms:
        mech_params = mechanism_params(get(name), (params or {}).get(name))
        for n, kv in cells:
            for d in d_models or grid.d_models:
                for lr in lrs or grid.lrs:
                    for seed in seeds:
                        out.append(make_config(
                            name, mech_params, seq_len=n, num_kv_pairs=kv, d_model=d, vocab_size=vocab_size or grid.vocab_size,
                            seed=seed, lr=lr, max_epochs=max_epochs or grid.max_epochs,
                            train_examples=grid.train_examples, test_examples=grid.test_examples,
                            cell_seconds=cell_seconds if cell_seconds is not None else grid.cell_seconds,
                        ))
    return out


# -- training ---------------------------------------------------------------------------------
def unsupported_reason(spec: Spec) -> str | None:
    """Why `spec` cannot be the mixer of a causal language model, or None."""
    supports = spec.supports
    if supports is None:
        return None
    if not supports.causal:
        return f"{spec.name} has no causal mode: a bidirectional mixer would see the answers"
    if 1 not in supports.grids:
        return f"{spec.name} runs on {'/'.join(f'{g}-D' for g in supports.grids)} grids, not token sequences"
    return None


def empty_metrics(note: str) -> dict[str, Any]:
    return {"accuracy": None, "best_accuracy": None, "epochs": 0, "train_seconds": 0.0, "converged": False, "note": note}


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at `step`: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@torch.no_grad()
def accuracy(model: RecallModel, inputs: Tensor, labels: Tensor, *, batch: int = 256) -> float:
    """The fraction of queried positions whose arg-max prediction is the paired value."""
    model.eval()
    right = total = 0
    for i in range(0, inputs.shape[0], batch):
        logits, target = model.query_logits(inputs[i : i + batch], labels[i : i + batch])
        right += int((logits.argmax(-1) == target).sum())
        total += target.numel()
    return right / max(total, 1)


def _label(config: dict[str, Any]) -> str:
    return (f"{config['mechanism']} L={config['seq_len']} kv={config['num_kv_pairs']} "
            f"d={config['d_model']} lr={config['lr']:g}")


def train_recall(
    config: dict[str, Any], *, time_budget_s: float | None = None, quiet: bool = False
) -> tuple[str, dict[str, Any]]:
    """Train the configuration's model on MQAR; (status, metrics) in the agreed format.

    Stops at validation accuracy >= 0.99 (checked after every epoch), after `max_epochs`,
    or at the first step past the time cap (`time_budget_s`, default the configuration's
    "cell_seconds"; then evaluated, with a note). The metrics say why it stopped
    ("stopped": "converged", "step budget", "time cap" or "diverged"), and the steps taken
    of the step budget ("steps", "step_budget"). A mechanism that cannot run causally is
    "unsupported"; one the registry refuses to build with these parameters too; an
    exception while training is an "error".
    """
    if time_budget_s is None:
        time_budget_s = config.get("cell_seconds")
    spec = get(config["mechanism"])
    why = unsupported_reason(spec)
    if why:
        return "unsupported", empty_metrics(why)
    n, kv, vocab, seed = config["seq_len"], config["num_kv_pairs"], config["vocab_size"], config["seed"]
    train = mqar(config["train_examples"], n, kv, vocab_size=vocab, seed=seed, random_non_queries=False)
    test = mqar(config["test_examples"], n, kv, vocab_size=vocab, seed=seed + TEST_SEED_OFFSET, random_non_queries=False)
    bs = batch_size(config)
    steps_per_epoch = math.ceil(config["train_examples"] / bs)
    total_steps = steps_per_epoch * config["max_epochs"]
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    recipe = {"batch_size": bs, "heads": HEADS, "warmup_steps": warmup, "mlp_ratio": MLP_RATIO,
              "weight_decay": WEIGHT_DECAY, "random_non_queries": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = RecallModel(config["mechanism"], config["params"], vocab_size=vocab, seq_len=n,
                                d_model=config["d_model"], layers=config["layers"])
        except ParameterError as err:
            return "unsupported", empty_metrics(f"{spec.name} does not build here: {err}")
        except Exception as err:  # a broken mechanism is a result, not a crash of the run
            return "error", empty_metrics(f"building the model: {type(err).__name__}: {err}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup))
        order = torch.Generator().manual_seed(seed)
        history: list[float] = []
        note = None
        steps = 0
        stopped = "step budget"
        start = time.perf_counter()
        try:
            for epoch in range(config["max_epochs"]):
                model.train()
                perm = torch.randperm(config["train_examples"], generator=order)
                last = f"acc {history[-1]:.3f}" if history else "acc -"
                desc = f"{_label(config)} epoch {epoch + 1}/{config['max_epochs']} {last}"
                for i in progress(range(steps_per_epoch), total=steps_per_epoch, desc=desc, quiet=quiet):
                    idx = perm[i * bs : (i + 1) * bs]
                    logits, target = model.query_logits(train.inputs[idx], train.labels[idx])
                    loss = F.cross_entropy(logits, target)
                    if not torch.isfinite(loss):
                        note = f"the loss became {loss.item()} in epoch {epoch + 1}"
                        stopped = "diverged"
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    steps += 1
                    if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                        note = f"stopped at the time budget of {time_budget_s:g} s in epoch {epoch + 1}"
                        stopped = "time cap"
                        break
                history.append(accuracy(model, test.inputs, test.labels))
                if history[-1] >= TARGET_ACCURACY:
                    stopped = "converged"
                    break
                if note:
                    break
        except Exception as err:  # likewise a mechanism failing inside the model
            return "error", {**empty_metrics(f"{type(err).__name__}: {err}"), "epochs": len(history)}
    metrics: dict[str, Any] = {
        "accuracy": history[-1] if history else None,
        "best_accuracy": max(history) if history else None,
        "epochs": len(history),
        "train_seconds": round(time.perf_counter() - start, 3),
        "converged": bool(history) and history[-1] >= TARGET_ACCURACY,
        "stopped": stopped,
        "steps": steps,
        "step_budget": total_steps,
        "history": [round(a, 4) for a in history],
        "recipe": recipe,
    }
    if note:
        metrics["note"] = note
    return "ok", metrics


# -- runs ---------------------------------------------------------------------------------------
def _train_in_worker(config: dict[str, Any], imports: list[str], threads: int) -> tuple[str, dict[str, Any]]:
    """`train_recall` in a pool process (a fresh interpreter: the user's modules are imported first)."""
    import_user_modules(imports)
    torch.set_num_threads(threads)
    load = load_average()
    status, metrics = train_recall(config, quiet=True)
    return status, {**metrics, "load_1m": load}


def run_recall(
    store: ResultStore,
    configs: Sequence[dict[str, Any]],
    *,
    total_seconds: float | None = None,
    threads: int = THREADS,
    quiet: bool = False,
    rerun: bool = False,
    workers: int = 1,
    at_least: int = 0,
) -> list[dict[str, Any]]:
    """Train every configuration not in the store yet and record it; the results of `configs`, in order.

    A configuration already stored is not trained again (resume), unless `rerun`: then its
    stored result is replaced once the new one is recorded (in one transaction: a rerun
    stopped midway leaves it). After `total_seconds` no configuration is started (the next
    run does them); each trains for at most its "cell_seconds". Training uses `threads`
    torch threads (recorded in the environment; the caller's setting is restored), in this
    process or, with `workers` > 1, in that many processes at once (a result depends on the
    configuration's step budget, not on which process trained it). The deadline does not
    apply before `at_least` trainable configurations have a result or have started. Returns {"config",
    "status", "metrics"} for every configuration with a result, stored ones included.
    """
    deadline = None if total_seconds is None else time.monotonic() + total_seconds
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    env = {**run_environment(matmul=False), "threads": threads, "recall_workers": workers}
    todo = []
    have = 0  # trainable configurations with a result, or started
    try:
        for config in configs:
            if not rerun and store.done(SUITE, config):
                have += unsupported_reason(get(config["mechanism"])) is None
                continue
            why = unsupported_reason(get(config["mechanism"]))
            if why is not None:  # recorded at once: it costs nothing
                store.record(SUITE, config, "unsupported", empty_metrics(why), env, replace=rerun)
            else:
                todo.append(config)

        def record(config: dict[str, Any], status: str, metrics: dict[str, Any]) -> None:
            store.record(SUITE, config, status, metrics, env, replace=rerun)
            say(f"recall: {_label(config)}: {_summary(status, metrics)}", quiet=quiet)

        def open_(now: float) -> bool:
            return deadline is None or now <= deadline or have < at_least

        if workers <= 1:
            for config in progress(list(todo), total=len(todo), desc="recall", quiet=quiet):
                if not open_(time.monotonic()):
                    break
                todo.remove(config)
                have += 1
                load = load_average()
                status, metrics = train_recall(config, quiet=quiet)
                record(config, status, {**metrics, "load_1m": load})  # the load at the start of its training
        else:
            ctx = multiprocessing.get_context("spawn")  # not fork: the parent's thread pools are not fork-safe
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                pending: dict[Future[tuple[str, dict[str, Any]]], dict[str, Any]] = {}
                while todo or pending:
                    while todo and len(pending) < workers and open_(time.monotonic()):
                        config = todo.pop(0)
                        have += 1
                        pending[pool.submit(_train_in_worker, config, imported_modules(), threads)] = config
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        config = pending.pop(future)
                        try:
                            status, metrics = future.result()
                        except Exception as err:  # the pool process died: a result, not a crash of the run
                            status, metrics = "error", empty_metrics(f"{type(err).__name__}: {err}")
                        record(config, status, metrics)
    finally:
        torch.set_num_threads(before)
    if todo:
        say(f"recall: {len(todo)} configurations not reached within {total_seconds:g} s; run again to train them",
            quiet=quiet)
    wanted = {canonical(c): i for i, c in enumerate(configs)}
    found = [r for r in store.results(SUITE) if canonical(r.config) in wanted]
    found.sort(key=lambda r: wanted[canonical(r.config)])
    return [{"config": r.config, "status": r.status, "metrics": r.metrics} for r in found]


def _summary(status: str, metrics: dict[str, Any]) -> str:
    if status != "ok":
        return f"{status} ({metrics.get('note', '')})"
    done = "converged" if metrics["converged"] else "not converged"
    note = f"; {metrics['note']}" if metrics.get("note") else ""
    return (f"accuracy {metrics['accuracy']:.3f} after {metrics['epochs']} epochs, "
            f"{metrics['train_seconds']:.0f} s, {done}{note}")


def panel_order(mechanisms: Sequence[str]) -> list[str]:
    """The mechanisms without repeats: PANEL_FIRST (dense softmax, then one of each kind) first, then the rest."""
    rank = {name: i for i, name in enumerate(PANEL_FIRST)}
    return sorted(dict.fromkeys(mechanisms), key=lambda name: (rank.get(name, len(rank)), name))


def panel_configs(mechanisms: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The `make bench` panel: every causal mechanism (of `mechanisms`, default all) at one MQAR cell and
    one training budget (GRIDS["panel"]: the same steps and time cap for each), in `panel_order`."""
    names = mechanisms if mechanisms is not None else [s.name for s in list_mechanisms()]
    causal = [n for n in names if unsupported_reason(get(n)) is None]
    return grid_configs(GRIDS["panel"], panel_order(causal), params=PANEL_PARAMS)


def budget_text(config: dict[str, Any]) -> str:
    """The training budget of a configuration, as the tables and the report state it."""
    steps = math.ceil(config["train_examples"] / batch_size(config)) * config["max_epochs"]
    cap = "no time cap" if config.get("cell_seconds") is None else f"at most {config['cell_seconds']:g} s"
    return f"{steps} steps ({config['max_epochs']} epochs of {config['train_examples']} examples), {cap}"


def run_default_panel(store: ResultStore, quiet: bool = False, mechanisms: Sequence[str] | None = None,
                      total_seconds: float = PANEL_SECONDS) -> list[dict[str, Any]]:
    """The recall part of `make bench`: the panel (see `panel_configs`), starting nothing after `total_seconds`.

    Cells not reached in time are trained by the next run (the finished ones are kept).
    """
    configs = panel_configs(mechanisms)
    if not configs:
        return []
    c = configs[0]
    say(f"bench: recall (MQAR L={c['seq_len']}, kv={c['num_kv_pairs']}, d_model={c['d_model']}) of "
        f"{len(configs)} causal mechanisms, each {budget_text(c)}, {PANEL_WORKERS} at a time; starting none "
        f"after {total_seconds:g} s once {PANEL_MIN} have started",
        quiet=quiet)
    return run_recall(store, configs, total_seconds=total_seconds, quiet=quiet, workers=PANEL_WORKERS,
                      at_least=PANEL_MIN)


# -- command line -------------------------------------------------------------------------------
def _list_of(kind: type, what: str, minimum: float = 1) -> Any:
    """An argparse type: comma-separated values of `kind`, each >= minimum."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} >= {minimum:g}, got {text!r}")
        return values

    return parse


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def add_recall_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `attnlab bench recall`."""
    parser.add_argument("--mechanisms", default="all", metavar="A,B|all",
                        help="mechanisms to train (default all; one without a causal mode is recorded as unsupported)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default",
                        help="default: CPU scale, L 64/128/256 × kv 4/8/16/32 × d_model 64/128; zoology: Zoology's "
                        "Figure 2 grid (GPU scale); panel: the small panel of `make bench`")
    parser.add_argument("--seq-lens", type=_list_of(int, "lengths"), metavar="L,..", help="sequence lengths (even)")
    parser.add_argument("--kv", type=_list_of(int, "kv pair counts"), metavar="K,..", help="key-value pairs per example")
    parser.add_argument("--d-models", type=_list_of(int, "widths"), metavar="D,..", help="model widths")
    parser.add_argument("--lr", type=_list_of(float, "learning rates", 0.0), metavar="LR,..",
                        help="learning rates (each its own configuration)")
    parser.add_argument("--epochs", type=_positive(int), metavar="E", help="most epochs of training (default: the grid's)")
    parser.add_argument("--seed", type=_list_of(int, "seeds", 0), default=(0,), metavar="S,..",
                        help="seeds of data and model (default 0)")
    parser.add_argument("--vocab", type=_positive(int), metavar="V",
                        help="vocabulary size (must exceed L; default: the grid's, 512 or 8192 for zoology)")
    parser.add_argument("--cell-seconds", type=_positive(float), default=None, metavar="S",
                        help="time cap of one configuration's training, part of its configuration (default: the "
                        f"grid's: 60 s default, {PANEL_CAP:g} s panel, none zoology)")
    parser.add_argument("--workers", type=_positive(int), default=None, metavar="N",
                        help=f"training processes at once (default 1; {PANEL_WORKERS} for the panel)")
    parser.add_argument("--rerun", action="store_true",
                        help="train again configurations the database has (each replaced once its new result is in)")
    parser.add_argument("--total-seconds", type=_positive(float), default=None, metavar="S",
                        help="start no configuration after S seconds; the next run trains the rest "
                        f"(default: no limit, {PANEL_SECONDS:g} s for the panel)")
    parser.add_argument("--threads", type=_positive(int), default=THREADS, metavar="N",
                        help=f"torch threads for training (default {THREADS})")
    parser.add_argument("--param", dest="params", action="append", default=[], metavar="MECH.NAME=VALUE",
                        help="a mechanism's parameter, e.g. sliding-window.radius=16 (VALUE read as JSON, else a "
                        "string); repeatable")
    parser.add_argument("--json", metavar="PATH|-", help="write the results as JSON to PATH, or to stdout with -")
    parser.add_argument("--db", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                        help=f"the results database (default {DEFAULT_DB})")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or status lines (stderr)")


def _mechanisms(text: str) -> list[str]:
    if text.strip() == "all":
        return [s.name for s in list_mechanisms()]
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get(name)  # an unknown name raises UnknownNameError with the close matches
    return names


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain text table of recall results: accuracy, the steps taken of the step budget, and why training
    stopped ("step budget" or "time cap": stopped before converging); the budgets stated below it."""
    header = ("mechanism", "L", "kv", "d_model", "lr", "seed", "status", "accuracy", "steps", "stopped", "seconds")
    body = []
    for r in rows:
        c, m = r["config"], r["metrics"]
        acc = m.get("accuracy")
        steps = f"{m['steps']}/{m['step_budget']}" if m.get("step_budget") else str(m.get("epochs", "-"))
        body.append((c["mechanism"], str(c["seq_len"]), str(c["num_kv_pairs"]), str(c["d_model"]), f"{c['lr']:g}",
                     str(c["seed"]), r["status"] + ("" if r["status"] != "ok" or m.get("converged") else " (not conv.)"),
                     "-" if acc is None else f"{acc:.3f}", steps, m.get("stopped", "-") if r["status"] == "ok" else "-",
                     f"{m.get('train_seconds', 0):.0f}"))
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    budgets = sorted({budget_text(r["config"]) for r in rows})
    lines += [f"budget: {text}" for text in budgets]
    if len(budgets) > 1:
        lines.append("(rows of different budgets are not compared)")
    return "\n".join(lines)


def run_recall_command(args: argparse.Namespace) -> int:
    """`attnlab bench recall`: train the chosen grid, record it, print the table (or JSON)."""
    import_user_modules(getattr(args, "imports", []))
    quiet = getattr(args, "quiet", False)
    store = ResultStore(getattr(args, "db", DEFAULT_DB))
    grid = GRIDS[args.grid]
    mechanisms = _mechanisms(args.mechanisms)
    if args.grid == "panel":
        mechanisms = panel_order(mechanisms)
    try:
        configs = grid_configs(
            grid, mechanisms, seeds=args.seed, seq_lens=args.seq_lens, kvs=args.kv, d_models=args.d_models,
            lrs=args.lr, max_epochs=args.epochs, vocab_size=args.vocab,
            params=parse_params(args.params, mechanisms), cell_seconds=args.cell_seconds,
        )
    except ValueError as err:  # an invalid MQAR setting (vocabulary not above L, ...)
        raise ParameterError(str(err)) from None
    if not configs:
        say("recall: no configuration (every cell has 4·kv > L)", quiet=quiet)
    say(f"recall: {len(configs)} configurations ({args.grid} grid); results in {getattr(args, 'db', DEFAULT_DB)}",
        quiet=quiet)
    total = PANEL_SECONDS if args.total_seconds is None and args.grid == "panel" else args.total_seconds
    workers = args.workers or (PANEL_WORKERS if args.grid == "panel" else 1)
    rows = run_recall(store, configs, total_seconds=total, threads=args.threads, quiet=quiet, rerun=args.rerun,
                      workers=workers)
    if args.json:
        dump = json.dumps(rows, indent=2)
        if args.json == "-":
            print(dump)
            return 0
        Path(args.json).write_text(dump + "\n", encoding="utf-8")
    print(results_table(rows))
    return 0
