"""A small real causal language model, trained here in minutes on text Python ships, cached under the results folder.

    from attnlab.analysis import capture
    from attnlab.analysis.char_lm import char_lm, encode
    lm = char_lm()                                   # loads attnlab-results/char_lm/default-<key>.pt, or trains it
    ids = encode("def read(path):\\n    return")[None]
    with capture(lm.model) as att:
        logits = lm.model(ids)                       # (1, n, VOCAB_SIZE); att.layers: one map per layer

The model (`CharLM`): characters -> embedding (+ learned absolute positions, or none), `layers` pre-norm blocks
(`pre-norm-block`: x + Mixer(LN x), then + MLP(LN ·)) around any registered causal mechanism (default "softmax"),
a final LayerNorm and a linear read-out. Positions: "learned" (absolute, up to `context`), "rope" (the blocks mix
with the "rope" mechanism: softmax attention with rotary q, k; only with mechanism "softmax") or "none" (NoPE: the
causal mask alone tells positions apart). Vocabulary: newline and printable ASCII (32..126), and one id for any
other character (`encode`).

The corpus (`corpus`): the docstrings (`inspect.getdoc`) of the standard-library modules `STDLIB_MODULES`, in that
order, each module's own docstring then those of its public members defined in it (sorted by name), each distinct
text once, joined by blank lines. No download: the text is what this Python ships, so it depends on the Python
version; its SHA-256 is stored with the weights and is part of the cache key. The last `heldout` share of the
characters (the last modules) is held out.

The recipe (`train_char_lm`): seeded init, AdamW (weight decay 0.01), peak learning rate `lr` with a linear warm-up over 5% of the steps
times a cosine down to 0 (`lr_factor`), `steps` steps of `batch` random windows of context + 1 characters from the training part, cross-entropy of
the next character. The held-out loss is the mean cross-entropy (nats/char) over non-overlapping held-out windows.

`char_lm(name)` returns the preset `name` (or given `CharLMSettings`) from `cache_dir` (default
attnlab-results/char_lm, beside the results store of `attnlab.bench.store.DEFAULT_DB`), training and saving it on a
miss; the file name holds a key over the settings and the corpus hash, so a changed setting or text misses. A JSON
file beside the weights states the settings, the corpus hash and modules, the Python version and the losses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.registry import build as build_entry
from ..core.validate import is_int

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(VOCAB)  # the id of every character outside VOCAB
VOCAB_SIZE = len(VOCAB) + 1
POSITIONAL = ("learned", "rope", "none")
DEFAULT_CACHE = Path("attnlab-results") / "char_lm"  # the folder of attnlab.bench.store.DEFAULT_DB, + char_lm
CACHE_FORMAT = 1  # raised when the file layout or the recipe's code changes, so older files miss

STDLIB_MODULES = (
    "argparse", "collections", "json", "textwrap", "pathlib", "logging", "subprocess", "typing", "functools",
    "itertools", "unittest", "string", "re", "os", "shutil", "tarfile", "zipfile", "csv", "datetime", "decimal",
    "fractions", "statistics", "random", "heapq", "bisect", "contextlib", "dataclasses", "enum", "abc", "io",
    "threading", "queue", "sqlite3", "pickle", "copy", "pprint", "inspect", "ast", "difflib", "calendar", "gettext",
    "configparser", "tempfile", "glob", "fnmatch", "hashlib", "hmac", "secrets", "uuid", "base64", "struct",
    "codecs", "math", "numbers", "operator", "weakref", "traceback", "warnings", "sched", "timeit", "doctest",
)
"""Pure, platform-independent modules of the standard library, in the corpus' fixed order."""


def corpus(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """The docstrings of `modules` and of their public members defined there, each distinct text once, in order."""
    if isinstance(modules, str) or not modules or not all(isinstance(m, str) for m in modules):
        raise ParameterError(f"modules: expected a non-empty tuple of module names, got {modules!r}")
    seen: set[str] = set()
    texts: list[str] = []
    with warnings.catch_warnings():  # reading typing.io / typing.re (deprecated aliases) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            module = importlib.import_module(name)
            members = [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in [module, *(m for m in members if getattr(m, "__module__", None) == module.__name__)]:
                doc = inspect.getdoc(obj)
                if doc and doc not in seen:
                    seen.add(doc)
                    texts.append(doc)
    return "\n\n".join(texts)


def corpus_sha256(text: str) -> str:
    """The SHA-256 (hex) of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode(text: str) -> Tensor:
    """Character ids (n,) int64: the index in VOCAB, UNKNOWN for any other character."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    index = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([index.get(c, UNKNOWN) for c in text], dtype=torch.int64)


def decode(ids: Tensor) -> str:
    """The text of ids (n,) ("\\ufffd" for UNKNOWN)."""
    return "".join(VOCAB[i] if i < len(VOCAB) else "\ufffd" for i in ids.tolist())


@dataclass(frozen=True)
class CharLMSettings:
    """The model and its recipe: everything the weights depend on besides the corpus text."""

    dim: int = 64
    heads: int = 4
    layers: int = 2
    context: int = 128
    mechanism: str = "softmax"
    positional: str = "learned"
    steps: int = 800
    batch: int = 16
    lr: float = 3e-3
    seed: int = 0
    heldout: float = 0.1
    modules: tuple[str, ...] = STDLIB_MODULES

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "layers", "context", "steps", "batch"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ParameterError(f"{name}: expected a positive int, got {value!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ParameterError(f"seed: expected an int >= 0, got {self.seed!r}")
        if self.dim % self.heads:
            raise ParameterError(f"heads: expected a divisor of dim={self.dim}, got {self.heads}")
        if self.positional not in POSITIONAL:
            raise ParameterError(f"positional: expected one of {list(POSITIONAL)}, got {self.positional!r}")
        if self.positional == "rope" and self.mechanism != "softmax":
            raise ParameterError(f"mechanism: positional 'rope' is the 'rope' mechanism (softmax with rotary q, k), "
                                 f"expected mechanism 'softmax' with it, got {self.mechanism!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ParameterError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, (int, float)) or not 0 < self.heldout < 1:
            raise ParameterError(f"heldout: expected a share in (0, 1), got {self.heldout!r}")
        if not isinstance(self.modules, tuple) or not self.modules:
            raise ParameterError(f"modules: expected a non-empty tuple of module names, got {self.modules!r}")

    @property
    def mixer(self) -> str:
        """The registered mechanism the blocks mix with."""
        return "rope" if self.positional == "rope" else self.mechanism


PRESETS: dict[str, CharLMSettings] = {
    "default": CharLMSettings(),
    "tiny": CharLMSettings(dim=64, heads=4, layers=2, context=64, steps=300, batch=16),
}
"""default: the LM of the claims and the analysis tools; tiny: the sink-emergence runs (one per seed)."""


class CharLM(nn.Module):
    """Causal character LM: embedding (+ learned positions), `layers` pre-norm blocks around a causal mechanism,
    LayerNorm, read-out. `forward(ids)` (batch, n) int64 -> logits (batch, n, VOCAB_SIZE)."""

    def __init__(self, settings: CharLMSettings) -> None:
        super().__init__()
        if not isinstance(settings, CharLMSettings):
            raise TypeError(f"settings: expected CharLMSettings, got {type(settings).__name__}")
        self.settings = settings
        self.embed = nn.Embedding(VOCAB_SIZE, settings.dim)
        self.position = nn.Embedding(settings.context, settings.dim) if settings.positional == "learned" else None
        self.blocks = nn.ModuleList(
            build_entry("pre-norm-block", dim=settings.dim, heads=settings.heads, mixer=settings.mixer, causal=True)
            for _ in range(settings.layers)
        )
        self.norm = nn.LayerNorm(settings.dim)
        self.head = nn.Linear(settings.dim, VOCAB_SIZE)

    def forward(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"ids: expected an int64 tensor (batch, n), got {getattr(ids, 'dtype', type(ids))} "
                             f"{tuple(getattr(ids, 'shape', ()))}")
        n = ids.shape[1]
        if self.position is not None and n > self.settings.context:
            raise ValueError(f"ids: expected at most context={self.settings.context} positions, got {n}")
        x = self.embed(ids)
        if self.position is not None:
            x = x + self.position(torch.arange(n, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass
class TrainedCharLM:
    """A trained `CharLM` (eval mode) with its settings, corpus hash and training record."""

    model: CharLM
    settings: CharLMSettings
    corpus_sha256: str
    heldout_loss: float  # nats/char on the held-out windows
    train_losses: tuple[float, ...]  # one per step
    train_seconds: float
    cached: bool = False
    path: Path | None = None


def split(text: str, heldout: float, context: int) -> tuple[Tensor, Tensor]:
    """(train ids, held-out ids): the text's ids cut at 1 − heldout; each part must hold a window of context + 1."""
    ids = encode(text)
    cut = int(round(len(ids) * (1 - heldout)))
    train, held = ids[:cut], ids[cut:]
    if min(len(train), len(held)) < context + 1:
        raise ValueError(f"text: expected at least {context + 1} characters in each part (heldout={heldout}), got "
                         f"{len(train)} and {len(held)}")
    return train, held


def windows(ids: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    """`count` windows (count, length) of `ids` at uniform random starts."""
    starts = torch.randint(0, len(ids) - length + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def heldout_windows(held: Tensor, context: int, limit: int = 64) -> Tensor:
    """Up to `limit` non-overlapping held-out windows (k, context + 1), evenly spread over the held-out part."""
    count = (len(held) - 1) // context
    starts = torch.linspace(0, (count - 1) * context, min(count, limit)).round().long()
    return torch.stack([held[s : s + context + 1] for s in starts.tolist()])


def lm_loss(model: CharLM, batch: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats/char) of windows (k, m + 1)."""
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def lr_factor(step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) of `steps` as a share of the peak: a linear warm-up over the first
    5% of the steps (at least one), times a cosine from 1 down to 0 over the run."""
    warmup = max(1, round(0.05 * steps))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_char_lm(
    text: str,
    settings: CharLMSettings | None = None,
    *,
    progress: bool = False,
    on_step: Callable[[int, CharLM], None] | None = None,
    threads: int | None = 1,
) -> TrainedCharLM:
    """Train a `CharLM` on `text` with the recipe of `settings` (default: the "default" preset).

    on_step(step, model) is called before the first step (step 0) and after each step (1..steps), in train mode;
    progress prints ten lines on stderr. threads: torch's CPU threads while training (restored after; None: as is).
    """
    settings = PRESETS["default"] if settings is None else settings
    if not isinstance(settings, CharLMSettings):
        raise TypeError(f"settings: expected CharLMSettings, got {type(settings).__name__}")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ParameterError(f"threads: expected a positive int or None, got {threads!r}")
    train, held = split(text, settings.heldout, settings.context)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(train, held, settings, progress, on_step, corpus_sha256(text))
    finally:
        torch.set_num_threads(before)


def _train(train: Tensor, held: Tensor, settings: CharLMSettings, progress: bool,
           on_step: Callable[[int, CharLM], None] | None, text_sha256: str) -> TrainedCharLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = CharLM(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, settings.steps))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    if on_step is not None:
        on_step(0, model)
    for step in range(1, settings.steps + 1):
        loss = lm_loss(model, windows(train, settings.batch, settings.context + 1, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, model)
        if progress and (step % max(1, settings.steps // 10) == 0 or step == settings.steps):
            print(f"char_lm: step {step}/{settings.steps}  train loss {losses[-1]:.3f} nats/char  "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        heldout = float(lm_loss(model, heldout_windows(held, settings.context)))
    return TrainedCharLM(model, settings, text_sha256, heldout, tuple(losses), seconds)


def cache_key(settings: CharLMSettings, text_sha256: str) -> str:
    """16 hex digits of SHA-256 over the cache format, every setting and the corpus hash."""
    payload = {"format": CACHE_FORMAT, "settings": dataclasses.asdict(settings), "corpus_sha256": text_sha256}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(name: str, settings: CharLMSettings, text_sha256: str, cache_dir: str | Path | None = None) -> Path:
    """The weights file of `settings` on the text with hash `text_sha256`: <cache_dir>/<name>-<key>.pt."""
    folder = DEFAULT_CACHE if cache_dir is None else Path(cache_dir)
    return folder / f"{name}-{cache_key(settings, text_sha256)}.pt"


def _describe(lm: TrainedCharLM) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(lm.settings), "corpus_sha256": lm.corpus_sha256,
            "heldout_loss_nats_per_char": lm.heldout_loss, "train_seconds": lm.train_seconds,
            "final_train_loss": lm.train_losses[-1], "python": platform.python_version(),
            "torch": str(torch.__version__), "format": CACHE_FORMAT}


def save(lm: TrainedCharLM, path: Path) -> None:
    """Write the weights and record to `path` and the record as JSON beside it (same name, .json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _describe(lm)
    torch.save({"state": lm.model.state_dict(), "record": record, "train_losses": list(lm.train_losses)}, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def load(path: Path, settings: CharLMSettings, text_sha256: str) -> TrainedCharLM | None:
    """The model saved at `path` if it was trained with `settings` on text of hash `text_sha256`, else None."""
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    record = saved["record"]
    stored = {**record["settings"], "modules": tuple(record["settings"]["modules"])}
    if stored != dataclasses.asdict(settings) or record["corpus_sha256"] != text_sha256:
        return None
    model = CharLM(settings)
    model.load_state_dict(saved["state"])
    return TrainedCharLM(model.eval(), settings, text_sha256, record["heldout_loss_nats_per_char"],
                         tuple(saved["train_losses"]), record["train_seconds"], cached=True, path=path)


def char_lm(
    name: str | CharLMSettings = "default",
    *,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    progress: bool = True,
    threads: int | None = 1,
) -> TrainedCharLM:
    """The char LM of preset `name` (PRESETS) or of the given settings, from the cache, else trained and cached.

    The file is <cache_dir>/<preset name, or "custom">-<key>.pt (`cache_path`).

    cache_dir: default attnlab-results/char_lm (relative to the working directory). retrain: train and overwrite
    even on a hit. progress: training progress on stderr. threads: torch's CPU threads while training.
    """
    if isinstance(name, CharLMSettings):  # a preset's settings keep the preset's file name
        label, settings = next((k for k, v in PRESETS.items() if v == name), "custom"), name
    elif isinstance(name, str) and name in PRESETS:
        label, settings = name, PRESETS[name]
    else:
        raise ValueError(f"name: expected a preset among {sorted(PRESETS)} or CharLMSettings, got {name!r}")
    text = corpus(settings.modules)
    text_hash = corpus_sha256(text)
    path = cache_path(label, settings, text_hash, cache_dir)
    if not retrain:
        found = load(path, settings, text_hash)
        if found is not None:
            return found
    if progress:
        print(f"char_lm: training {label} ({settings.layers} layers × {settings.heads} heads of {settings.mixer}, "
              f"dim {settings.dim}, {settings.steps} steps) -> {path}", file=sys.stderr, flush=True)
    lm = train_char_lm(text, settings, progress=progress, threads=threads)
    save(lm, path)
    lm.path = path
    return lm
