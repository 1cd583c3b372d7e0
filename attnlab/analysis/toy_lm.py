"""A small token LM for the analysis methods that need a model trained here on planted data, and its cache.

    from attnlab.analysis.toy_lm import ToyLM, ToyLMSettings, train_toy_lm, cached
    settings = ToyLMSettings(vocab=32, dim=64, heads=4, layers=2, mlp_ratio=0.0)   # attention only
    model = ToyLM(settings)
    logits = model(ids)                                  # ids (batch, n) int64 -> (batch, n, vocab)
    trace = model.trace(ids)                             # residual stream and each sublayer's update
    knocked = model(ids, attn_masks={1: keep})           # layer 1 attends only where keep (n, n) is True
    image = model(ids, prefix=features)                  # features (batch, p, dim) before the tokens

The model: token embedding (+ learned absolute positions over prefix and tokens), `layers` pre-norm blocks
x + Attn(LN x), then + MLP(LN ·) (no MLP when mlp_ratio = 0: attention only), a final LayerNorm and an
unembedding. The attention is any registered mechanism (`mechanism`, built by the registry, causal when `causal`),
so `attnlab.analysis.capture` records its maps through `materialize`, and a per-layer `attn_masks` (bool, True =
attend; (n, n) or broadcastable to (batch, heads, n, n)) knocks out edges where the mechanism takes an arbitrary
mask. `trace` returns, for every layer l, the residual stream entering it and the updates its attention and MLP
add, so x_{l+1} = x_l + attention_l + mlp_l exactly, and the logits read the final state.

`train_toy_lm` fits a model to batches a seeded sampler draws (next-token or any per-position targets, -100 =
ignored) with AdamW and a warm-up-then-cosine learning rate. `cached(folder, key, build, fit)` keeps any trained
module under the results folder: <cache_dir>/<folder>/<hash of key>.pt with a JSON record beside it; a changed
key misses, so a recipe's every setting belongs in `key`.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.registry import build as build_entry
from ..core.validate import is_int
from .char_lm import lr_factor

DEFAULT_RESULTS = Path("attnlab-results")  # the folder of attnlab.bench.store.DEFAULT_DB
CACHE_FORMAT = 1
Sampler = Callable[[torch.Generator], tuple[Tensor, Tensor]]  # generator -> (ids (batch, n), targets (batch, n))


@dataclass(frozen=True)
class ToyLMSettings:
    """The architecture of a `ToyLM`."""

    vocab: int
    dim: int = 64
    heads: int = 4
    layers: int = 2
    context: int = 64  # positions, prefix included
    mlp_ratio: float = 4.0  # MLP width / dim; 0: attention-only blocks
    mechanism: str = "softmax"
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab", "dim", "heads", "layers", "context"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ParameterError(f"{name}: expected a positive int, got {value!r}")
        if self.dim % self.heads:
            raise ParameterError(f"heads: expected a divisor of dim={self.dim}, got {self.heads}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not 0 <= self.mlp_ratio < math.inf:
            raise ParameterError(f"mlp_ratio: expected a float >= 0 (0: no MLP), got {self.mlp_ratio!r}")
        if not isinstance(self.mechanism, str):
            raise ParameterError(f"mechanism: expected a registered mechanism name, got {self.mechanism!r}")
        if not isinstance(self.causal, bool):
            raise ParameterError(f"causal: expected a bool, got {self.causal!r}")


@dataclass
class ToyTrace:
    """One forward pass, layer by layer: residual[l] enters layer l (residual[0]: embeddings, residual[-1]: the
    final state before LayerNorm); residual[l + 1] = residual[l] + attention[l] + mlp[l]."""

    residual: list[Tensor]
    attention: list[Tensor]
    mlp: list[Tensor]  # zeros in an attention-only model
    logits: Tensor


class ToyBlock(nn.Module):
    """x + Attn(LN x) = h, then h + MLP(LN h); forward returns (attention update, MLP update)."""

    def __init__(self, settings: ToyLMSettings) -> None:
        super().__init__()
        causal = {"causal": True} if settings.causal else {}
        self.norm1 = nn.LayerNorm(settings.dim)
        self.attn = build_entry(settings.mechanism, dim=settings.dim, heads=settings.heads, **causal)
        hidden = round(settings.mlp_ratio * settings.dim)
        self.norm2 = nn.LayerNorm(settings.dim) if hidden else None
        self.mlp = nn.Sequential(nn.Linear(settings.dim, hidden), nn.GELU(), nn.Linear(hidden, settings.dim)) if hidden else None

    def forward(self, x: Tensor, keep: Tensor | None = None, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a = self.attn(self.norm1(x), attention_mask=keep, attn_mask=attn_mask)
        if self.mlp is None or self.norm2 is None:
            return a, torch.zeros_like(x)
        return a, self.mlp(self.norm2(x + a))


class ToyLM(nn.Module):
    """Token LM: embedding + positions, `layers` `ToyBlock`s, LayerNorm, unembedding (see the module docstring)."""

    def __init__(self, settings: ToyLMSettings) -> None:
        super().__init__()
        if not isinstance(settings, ToyLMSettings):
            raise TypeError(f"settings: expected ToyLMSettings, got {type(settings).__name__}")
        self.settings = settings
        self.embed = nn.Embedding(settings.vocab, settings.dim)
        self.position = nn.Embedding(settings.context, settings.dim)
        self.blocks = nn.ModuleList(ToyBlock(settings) for _ in range(settings.layers))
        self.norm = nn.LayerNorm(settings.dim)
        self.unembed = nn.Linear(settings.dim, settings.vocab)

    def embed_inputs(self, ids: Tensor, prefix: Tensor | None = None) -> Tensor:
        """[prefix; token embeddings] + positions: (batch, p + n, dim)."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"ids: expected an int64 tensor (batch, n), got {getattr(ids, 'dtype', type(ids).__name__)} "
                             f"{tuple(getattr(ids, 'shape', ()))}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.settings.vocab):
            raise ValueError(f"ids: expected token ids in [0, {self.settings.vocab}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        x = self.embed(ids)
        if prefix is not None:
            if not isinstance(prefix, Tensor) or prefix.dim() != 3 or prefix.shape[0] != ids.shape[0] \
                    or prefix.shape[2] != self.settings.dim:
                raise ValueError(f"prefix: expected a tensor (batch={ids.shape[0]}, p, dim={self.settings.dim}), got "
                                 f"{tuple(getattr(prefix, 'shape', ())) or type(prefix).__name__}")
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        n = x.shape[1]
        if n > self.settings.context:
            raise ValueError(f"ids: expected at most context={self.settings.context} positions (prefix included), got {n}")
        return x + self.position(torch.arange(n, device=x.device))

    def trace(self, ids: Tensor, *, prefix: Tensor | None = None, attention_mask: Tensor | None = None,
              attn_masks: Mapping[int, Tensor] | None = None) -> ToyTrace:
        """The forward pass with every layer's residual stream and sublayer updates (`ToyTrace`).

        attention_mask: (batch, p + n) True = real position; attn_masks: layer -> bool mask, True = attend."""
        masks = dict(attn_masks or {})
        wrong = [k for k in masks if not is_int(k) or not 0 <= k < self.settings.layers]
        if wrong:
            raise ValueError(f"attn_masks: expected layer indices in [0, {self.settings.layers}), got {wrong}")
        x = self.embed_inputs(ids, prefix)
        residual, attention, mlp = [x], [], []
        for layer, block in enumerate(self.blocks):
            a, m = block(x, attention_mask, masks.get(layer))
            x = x + a + m
            attention.append(a)
            mlp.append(m)
            residual.append(x)
        return ToyTrace(residual, attention, mlp, self.unembed(self.norm(x)))

    def forward(self, ids: Tensor, *, prefix: Tensor | None = None, attention_mask: Tensor | None = None,
                attn_masks: Mapping[int, Tensor] | None = None) -> Tensor:
        """ids (batch, n) -> logits (batch, p + n, vocab)."""
        return self.trace(ids, prefix=prefix, attention_mask=attention_mask, attn_masks=attn_masks).logits


def train_toy_lm(
    model: nn.Module,
    sample: Sampler,
    *,
    steps: int,
    lr: float = 3e-3,
    seed: int = 0,
    weight_decay: float = 0.01,
    progress: str | None = None,
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
) -> list[float]:
    """Fit `model` to `sample(generator) -> (ids, targets)` by cross-entropy over positions with target != -100,
    with AdamW and `char_lm.lr_factor`'s warm-up and cosine.

    forward(model, ids) -> logits (default `model(ids)`; logits (batch, n, vocab) line up with targets (batch, n),
    or (batch, classes) with (batch,)); loss(model, ids, targets) -> the loss, instead of that cross-entropy.
    progress: a label to print ten progress lines on stderr with (None: quiet). Returns the loss of every step;
    the model is left in eval mode."""
    if not is_int(steps) or steps < 1:
        raise ParameterError(f"steps: expected a positive int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ParameterError(f"lr: expected a positive learning rate, got {lr!r}")
    if not is_int(seed) or seed < 0:
        raise ParameterError(f"seed: expected an int >= 0, got {seed!r}")
    run = forward or (lambda m, ids: m(ids))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, steps))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        ids, targets = sample(generator)
        if loss is None:
            value = nn.functional.cross_entropy(run(model, ids).flatten(0, -2), targets.flatten(), ignore_index=-100)
        else:
            value = loss(model, ids, targets)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(value.detach()))
        if progress and (step % max(1, steps // 10) == 0 or step == steps):
            print(f"{progress}: step {step}/{steps}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    model.eval()
    return losses


@dataclass
class Cached:
    """A module from `cached`: the record its fit returned (+ "seconds"), whether it came from disk, its file."""

    model: nn.Module
    record: dict[str, Any]
    hit: bool
    path: Path


def cache_file(folder: str, key: Mapping[str, Any], cache_dir: str | Path | None = None) -> Path:
    """<cache_dir or attnlab-results>/<folder>/<16 hex digits of SHA-256 over the format and key>.pt"""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "key": key}, sort_keys=True, default=str).encode())
    return (DEFAULT_RESULTS if cache_dir is None else Path(cache_dir)) / folder / f"{digest.hexdigest()[:16]}.pt"


def cached(
    folder: str,
    key: Mapping[str, Any],
    build: Callable[[], nn.Module],
    fit: Callable[[nn.Module], Mapping[str, Any]],
    *,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
) -> Cached:
    """The module `build()` trained by `fit(module)` (which returns a JSON-able record), from the cache when the
    file of `key` exists (unless `retrain`), else trained, saved and returned. `key` holds every setting of the
    recipe (JSON-able; dataclasses through `settings_key`), so a changed recipe misses."""
    if not isinstance(folder, str) or not folder or "/" in folder or folder.startswith("."):
        raise ParameterError(f"folder: expected a plain folder name, got {folder!r}")
    if not isinstance(key, Mapping):
        raise TypeError(f"key: expected a mapping of the recipe's settings, got {type(key).__name__}")
    path = cache_file(folder, key, cache_dir)
    model = build()
    if path.is_file() and not retrain:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state"])
        return Cached(model.eval(), json.loads(saved["record"]), True, path)
    start = time.perf_counter()
    record = {**dict(fit(model)), "seconds": time.perf_counter() - start, "key": json.loads(json.dumps(key, default=str))}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True)
    torch.save({"state": model.state_dict(), "record": text}, path)
    path.with_suffix(".json").write_text(text + "\n")
    return Cached(model.eval(), record, False, path)


def settings_key(settings: Any) -> dict[str, Any]:
    """A dataclass of settings as a JSON-able dict with its class name, for `cached`'s key."""
    return {"class": type(settings).__name__, **asdict(settings)}
