"""Handwritten digits (sklearn's 8×8 `load_digits`, shipped with scikit-learn: no download), a tiny ViT and a small
CNN trained on them here in a minute, cached under the results folder. The vision methods of family E run on these
(class lens P064, faithful masks P047, spatial shuffle P055, NormGrad P250).

    from attnlab.analysis.digits import digit_vit, digit_cnn, load_digits_split
    data = load_digits_split()                       # 1437 train / 360 test images (n, 8, 8) in [0, 1], labels
    vit = digit_vit()                                # attnlab-results/digit_vit/default-<key>.pt, or trains it
    logits = vit.model(data.test_images)             # (360, 10)
    trace = vit.model.trace(data.test_images[:8])    # residual stream + each block's attention / MLP update
    cnn = digit_cnn()                                # attnlab-results/digit_cnn/default-<key>.pt
    canvases = canvas_test_set(cnn.settings)           # digits pasted into 24×24 noisy canvases, boxes known

The data (`load_digits_split`): the 1797 images scaled to [0, 1] (pixel / 16), split by a fixed permutation
(seed 0) into the first 80 % for training and the rest for testing; its SHA-256 is part of every cache key.

The ViT (`DigitViT`): non-overlapping `patch`×`patch` patches (raster order) → linear embedding, a [CLS] token,
learned absolute positions (or none: `positions=False` makes the model a bag of patches, invariant to their
order), `layers` pre-norm blocks (`pre-norm-block`: x + Mixer(LN x), then + MLP(LN ·)) around ANY registered
mechanism (`mixer`), a final LayerNorm and a linear class head on [CLS]. `patch_mask` (batch, patches) bool keeps
the False patches out of every block's keys (the [CLS] key is always kept): the key-padding mask of the mechanism.
`trace` records the residual stream before the first block and after each, and each block's two residual updates
(attention: the mixer's output; MLP: the MLP's output), through forward hooks on the modules that compute them.

The CNN (`DigitCNN`) sees a digit pasted at a random place of a `canvas`×`canvas` image of uniform noise in
[0, noise], and (`distractor`) a second digit with its 2×2 patches shuffled elsewhere (no overlap), so the class
needs the digit's shape, not ink: conv3×3 → ReLU → maxpool 2 → conv3×3 → ReLU → maxpool 2 → conv3×3 → ReLU →
global max → linear (a global mean learns far slower here: the digit is a ninth of the canvas). Its test canvases (`canvas_test_set`) come from the test digits with a fixed generator, with
the digit's box: the ground truth of the pointing game (`attnlab.analysis.normgrad`).

The recipes (`train_digit_vit`, `train_digit_cnn`, `train_classifier`): seeded init, AdamW (weight decay 0.01),
peak learning rate `lr` with the warm-up and cosine of `char_lm.lr_factor`, `steps` steps of `batch` random train
examples (fresh canvases for the CNN), cross-entropy. `digit_vit(name)` / `digit_cnn(name)` return the preset (or
settings) from `cache_dir` (default attnlab-results/digit_vit, attnlab-results/digit_cnn), training and saving
on a miss; the file name holds a key over the settings, the data hash and `CACHE_FORMAT`, and a JSON beside the
weights states the settings, the test accuracy, the seconds and the versions.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from ..core.errors import DTypeError, ParameterError, ShapeError
from ..core.registry import build as build_entry
from ..core.validate import check_finite, check_floating, check_tensor, is_int
from .toy_lm import train_toy_lm

DIGIT_SIZE = 8
CLASSES = 10
RESULTS = Path("attnlab-results")  # the folder of attnlab.bench.store.DEFAULT_DB
CACHE_FORMAT = 1  # raised when the file layout or a recipe's code changes, so older files miss


@dataclass(frozen=True)
class Digits:
    """The split digits: images (n, 8, 8) float32 in [0, 1], labels (n,) int64, and the SHA-256 of the data."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    sha256: str


@functools.lru_cache(maxsize=2)
def load_digits_split(test_share: float = 0.2) -> Digits:
    """sklearn's digits / 16, permuted with seed 0; the last `test_share` of the permutation is the test set.
    The tensors are shared between calls: do not modify them in place."""
    if isinstance(test_share, bool) or not isinstance(test_share, float) or not 0 < test_share < 1:
        raise ParameterError(f"test_share: expected a float in (0, 1), got {test_share!r}")
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(round(len(labels) * (1 - test_share)))
    digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    train, test = order[:cut], order[cut:]
    return Digits(images[train], labels[train], images[test], labels[test], digest)


def check_images(name: str, images: object, size: int | None = None) -> Tensor:
    """images: a finite floating tensor (batch, H, W) (of H = W = size when given)."""
    t = check_tensor(name, images)
    check_floating(name, t)
    if t.dim() != 3 or 0 in t.shape or (size is not None and tuple(t.shape[1:]) != (size, size)):
        want = f"(batch, {size}, {size})" if size is not None else "(batch, H, W)"
        raise ShapeError(f"{name}: expected a tensor {want}, got shape {tuple(t.shape)}")
    check_finite(name, t)
    return t


def patchify(images: Tensor, patch: int) -> Tensor:
    """(batch, H, W) -> (batch, (H/patch)·(W/patch), patch²): non-overlapping patches in raster order, each
    patch's pixels in raster order."""
    images = check_images("images", images)
    b, h, w = images.shape
    if not is_int(patch) or patch < 1 or h % patch or w % patch:
        raise ParameterError(f"patch: expected a positive int dividing the image sides {h}×{w}, got {patch!r}")
    grid = images.reshape(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    return grid.reshape(b, (h // patch) * (w // patch), patch * patch)


def unpatchify(patches: Tensor, patch: int, height: int, width: int) -> Tensor:
    """The inverse of `patchify`: (batch, patches, patch²) -> (batch, height, width)."""
    check_tensor("patches", patches)
    if patches.dim() != 3 or tuple(patches.shape[1:]) != ((height // patch) * (width // patch), patch * patch):
        raise ShapeError(f"patches: expected (batch, {(height // patch) * (width // patch)}, {patch * patch}), "
                         f"got shape {tuple(patches.shape)}")
    b = patches.shape[0]
    grid = patches.reshape(b, height // patch, width // patch, patch, patch).permute(0, 1, 3, 2, 4)
    return grid.reshape(b, height, width)


def _check_recipe(settings: Any, positive: tuple[str, ...]) -> None:
    for name in positive:
        value = getattr(settings, name)
        if not is_int(value) or value < 1:
            raise ParameterError(f"{name}: expected a positive int, got {value!r}")
    if not is_int(settings.seed) or settings.seed < 0:
        raise ParameterError(f"seed: expected an int >= 0, got {settings.seed!r}")
    if isinstance(settings.lr, bool) or not isinstance(settings.lr, (int, float)) or not 0 < settings.lr < 1:
        raise ParameterError(f"lr: expected a learning rate in (0, 1), got {settings.lr!r}")


@dataclass(frozen=True)
class ViTSettings:
    """The digit ViT and its recipe. mixer_params: the mixer's further parameters as (name, value) pairs."""

    dim: int = 48
    heads: int = 4
    layers: int = 4
    patch: int = 2
    mixer: str = "softmax"
    mixer_params: tuple[tuple[str, Any], ...] = ()
    positions: bool = True
    mlp_ratio: float = 2.0
    steps: int = 1200
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_recipe(self, ("dim", "heads", "layers", "patch", "steps", "batch"))
        if DIGIT_SIZE % self.patch:
            raise ParameterError(f"patch: expected a divisor of the image side {DIGIT_SIZE}, got {self.patch}")
        if self.dim % self.heads:
            raise ParameterError(f"heads: expected a divisor of dim={self.dim}, got {self.heads}")
        if not isinstance(self.positions, bool):
            raise ParameterError(f"positions: expected a bool, got {self.positions!r}")
        if not isinstance(self.mixer_params, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.mixer_params
        ):
            raise ParameterError(f"mixer_params: expected a tuple of (name, value) pairs, got {self.mixer_params!r}")

    @property
    def patches(self) -> int:
        """Patches per image."""
        return (DIGIT_SIZE // self.patch) ** 2


VIT_PRESETS: dict[str, ViTSettings] = {
    "default": ViTSettings(),
    "tiny": ViTSettings(dim=32, heads=2, layers=3, steps=200, batch=64, lr=5e-3),
}
"""default: the ViT of the demos (about a minute on one core); tiny: a few seconds, for tests."""


@dataclass
class ResidualTrace:
    """The residual stream of a `DigitViT` and its updates, tokens [CLS] + patches (n = 1 + patches).

    residuals (layers + 1, batch, n, dim): before block 1 (the embedded tokens) and after each block;
    attention, mlp (layers, batch, n, dim): the updates of block l, residuals[l + 1] = residuals[l] + attention[l]
    + mlp[l]; logits (batch, classes): the model's output.
    """

    residuals: Tensor
    attention: Tensor
    mlp: Tensor
    logits: Tensor


class DigitViT(nn.Module):
    """ViT over 8×8 digits: patch embedding, [CLS], learned positions (optional), pre-norm blocks around a
    registered mechanism, LayerNorm, class head on [CLS]. forward(images (batch, 8, 8)) -> logits (batch, 10)."""

    def __init__(self, settings: ViTSettings) -> None:
        super().__init__()
        if not isinstance(settings, ViTSettings):
            raise TypeError(f"settings: expected ViTSettings, got {type(settings).__name__}")
        self.settings = settings
        d, n = settings.dim, settings.patches
        self.embed = nn.Linear(settings.patch**2, d)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.position = nn.Parameter(0.02 * torch.randn(1, 1 + n, d)) if settings.positions else None
        self.blocks = nn.ModuleList(
            build_entry("pre-norm-block", dim=d, heads=settings.heads, mixer=settings.mixer,
                        mixer_params=dict(settings.mixer_params), mlp_ratio=settings.mlp_ratio)
            for _ in range(settings.layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def _keep(self, patch_mask: Tensor | None, tokens: Tensor) -> Tensor | None:
        if patch_mask is None:
            return None
        check_tensor("patch_mask", patch_mask)
        want = (tokens.shape[0], self.settings.patches)
        if patch_mask.dtype != torch.bool:
            raise DTypeError(f"patch_mask: expected dtype torch.bool (True = keep the patch), got {patch_mask.dtype}")
        if tuple(patch_mask.shape) != want:
            raise ShapeError(f"patch_mask: expected shape (batch, patches) = {want}, got {tuple(patch_mask.shape)}")
        if patch_mask.device != tokens.device:
            raise ValueError(f"patch_mask: expected device {tokens.device} (the images'), got {patch_mask.device}")
        cls = torch.ones(want[0], 1, dtype=torch.bool, device=tokens.device)
        return torch.cat([cls, patch_mask], dim=1)

    def tokens(self, images: Tensor) -> Tensor:
        """The embedded tokens (batch, 1 + patches, dim): [CLS] then the patches, positions added."""
        images = check_images("images", images, DIGIT_SIZE)
        x = self.embed(patchify(images, self.settings.patch))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.position is None else x + self.position

    def encode(self, tokens: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """The blocks and the final LayerNorm on tokens (batch, 1 + patches, dim); patch_mask as in forward."""
        keep = self._keep(patch_mask, tokens)
        x = tokens
        for block in self.blocks:
            x = block(x, attention_mask=keep)
        return self.norm(x)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Class logits (batch, 10) of images (batch, 8, 8); patch_mask (batch, patches) bool: only the True
        patches (and [CLS]) are keys of the blocks."""
        return self.head(self.encode(self.tokens(images), patch_mask)[:, 0])

    def trace(self, images: Tensor, patch_mask: Tensor | None = None) -> ResidualTrace:
        """The residual stream before and after each block and each block's attention and MLP updates."""
        updates: dict[str, list[Tensor]] = {"attention": [], "mlp": [], "residuals": []}
        handles = []
        for block in self.blocks:
            for key, module in (("attention", block.mixer), ("mlp", block.mlp), ("residuals", block)):
                handles.append(module.register_forward_hook(lambda _m, _a, out, key=key: updates[key].append(out)))
        try:
            tokens = self.tokens(images)
            logits = self.head(self.encode(tokens, patch_mask)[:, 0])
        finally:
            for handle in handles:
                handle.remove()
        return ResidualTrace(torch.stack([tokens, *updates["residuals"]]), torch.stack(updates["attention"]),
                             torch.stack(updates["mlp"]), logits)


@dataclass(frozen=True)
class CNNSettings:
    """The canvas task, the digit CNN and its recipe."""

    canvas: int = 24
    noise: float = 0.3
    distractor: bool = True
    channels: tuple[int, int, int] = (16, 32, 32)
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_recipe(self, ("canvas", "steps", "batch"))
        least = 2 * DIGIT_SIZE if self.distractor else DIGIT_SIZE
        if self.canvas < least:
            raise ParameterError(f"canvas: expected a side >= {least} (room for the digits), got {self.canvas}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise <= 1:
            raise ParameterError(f"noise: expected a float in [0, 1], got {self.noise!r}")
        if not isinstance(self.distractor, bool):
            raise ParameterError(f"distractor: expected a bool, got {self.distractor!r}")
        if (not isinstance(self.channels, tuple) or len(self.channels) != 3
                or not all(is_int(c) and c >= 1 for c in self.channels)):
            raise ParameterError(f"channels: expected three positive ints, got {self.channels!r}")


CNN_PRESETS: dict[str, CNNSettings] = {
    "default": CNNSettings(),
    "tiny": CNNSettings(channels=(8, 16, 16), steps=400, batch=32, lr=5e-3),
}
"""default: the CNN of the demos (about a minute on one core); tiny: seconds, for tests."""


class DigitCNN(nn.Module):
    """conv3×3 → ReLU → maxpool 2 → conv3×3 → ReLU → maxpool 2 → conv3×3 → ReLU → global max → linear.
    forward(canvases (batch, 1, H, W)) -> logits (batch, 10); `convs` are the three convolutions."""

    def __init__(self, settings: CNNSettings) -> None:
        super().__init__()
        if not isinstance(settings, CNNSettings):
            raise TypeError(f"settings: expected CNNSettings, got {type(settings).__name__}")
        self.settings = settings
        c1, c2, c3 = settings.channels
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in ((1, c1), (c1, c2), (c2, c3)))
        self.head = nn.Linear(c3, CLASSES)

    def forward(self, canvases: Tensor) -> Tensor:
        check_tensor("canvases", canvases)
        if canvases.dim() != 4 or canvases.shape[1] != 1 or 0 in canvases.shape:
            raise ShapeError(f"canvases: expected a tensor (batch, 1, H, W), got shape {tuple(canvases.shape)}")
        x = canvases
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i < 2:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.amax(dim=(2, 3)))


@dataclass
class Canvases:
    """images (batch, 1, C, C); labels (batch,); boxes (batch, 4) int64 = (top, left, bottom, right), bottom and
    right exclusive: the pasted digit's 8×8 square."""

    images: Tensor
    labels: Tensor
    boxes: Tensor


def paste_digits(images: Tensor, labels: Tensor, settings: CNNSettings, generator: torch.Generator,
                 distractors: Tensor | None = None) -> Canvases:
    """Each digit pasted (pixel-wise max) at a uniform random place of a canvas of uniform noise in
    [0, settings.noise]; a distractor (its 2×2 patches shuffled) at a place that does not overlap it."""
    images = check_images("images", images, DIGIT_SIZE)
    b, side = images.shape[0], settings.canvas
    out = settings.noise * torch.rand(b, side, side, generator=generator)
    room = side - DIGIT_SIZE + 1
    corner = torch.randint(0, room, (b, 2), generator=generator)
    if settings.distractor:
        if distractors is None or distractors.shape != images.shape:
            raise ValueError(f"distractors: expected digits of shape {tuple(images.shape)} with distractor=True, got "
                             f"{None if distractors is None else tuple(distractors.shape)}")
        parts = patchify(distractors, 2)
        order = torch.argsort(torch.rand(parts.shape[:2], generator=generator), dim=1)
        shuffled = unpatchify(parts.gather(1, order[..., None].expand_as(parts)), 2, DIGIT_SIZE, DIGIT_SIZE)
        for i in range(b):
            while True:
                spot = torch.randint(0, room, (2,), generator=generator)
                if bool(((spot - corner[i]).abs() >= DIGIT_SIZE).any()):
                    break
            r, c = spot.tolist()
            out[i, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE] = torch.maximum(
                out[i, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE], shuffled[i])
    for i in range(b):
        r, c = corner[i].tolist()
        out[i, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE] = torch.maximum(
            out[i, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE], images[i])
    boxes = torch.cat([corner, corner + DIGIT_SIZE], dim=1)
    return Canvases(out[:, None], labels, boxes)


def canvas_test_set(settings: CNNSettings, count: int | None = None) -> Canvases:
    """The test digits (the first `count`, default all) pasted with a generator of seed 12345 (fixed, whatever
    the model's seed), distractors drawn from the other test digits."""
    data = load_digits_split()
    images, labels = data.test_images, data.test_labels
    if count is not None:
        if not is_int(count) or not 1 <= count <= len(labels):
            raise ParameterError(f"count: expected an int in [1, {len(labels)}], got {count!r}")
        images, labels = images[:count], labels[:count]
    generator = torch.Generator().manual_seed(12345)
    others = data.test_images[torch.randint(0, len(data.test_labels), (len(labels),), generator=generator)]
    return paste_digits(images, labels, settings, generator, others if settings.distractor else None)


Settings = TypeVar("Settings")
T = TypeVar("T")


@dataclass
class TrainedDigits(Generic[Settings]):
    """A trained digit model (eval mode) with its settings and record; `extra`: further figures of the record."""

    model: nn.Module
    settings: Settings
    test_accuracy: float
    train_losses: tuple[float, ...]
    train_seconds: float
    data_sha256: str
    cached: bool = False
    path: Path | None = None
    extra: dict[str, float] = field(default_factory=dict)


def train_classifier(
    model: nn.Module,
    batches: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float,
    seed: int,
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    label: str = "",
    progress: bool = False,
) -> tuple[float, ...]:
    """`steps` AdamW steps (weight decay 0.01, `char_lm.lr_factor` schedule) on the batches
    `batches(generator)` draws (generator seeded with `seed`; `toy_lm.train_toy_lm`); loss(model, inputs, labels)
    defaults to the cross-entropy of model(inputs). Returns the loss of each step; the model is left in eval mode."""
    return tuple(train_toy_lm(model, batches, steps=steps, lr=lr, seed=seed, loss=loss,
                              progress=label if progress else None))


def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    """Share of inputs whose argmax logit is the label."""
    with torch.no_grad():
        return float((model(inputs).argmax(-1) == labels).double().mean())


def with_threads(threads: int | None, run: Callable[[], T]) -> T:
    """run() with torch's CPU threads set to `threads` (restored after; None: as is)."""
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ParameterError(f"threads: expected a positive int or None, got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def train_digit_vit(settings: ViTSettings | None = None, *, progress: bool = False,
                    threads: int | None = 1) -> TrainedDigits[ViTSettings]:
    """Train a `DigitViT` on the train digits with the recipe of `settings` (default: the "default" preset).
    threads: torch's CPU threads while training (restored after; None: as is)."""
    settings = VIT_PRESETS["default"] if settings is None else settings
    if not isinstance(settings, ViTSettings):
        raise TypeError(f"settings: expected ViTSettings, got {type(settings).__name__}")
    data = load_digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = DigitViT(settings)

    def batches(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        pick = torch.randint(0, len(data.train_labels), (settings.batch,), generator=generator)
        return data.train_images[pick], data.train_labels[pick]

    start = time.perf_counter()
    losses = with_threads(threads, lambda: train_classifier(
        model, batches, steps=settings.steps, lr=settings.lr, seed=settings.seed, label="digit_vit",
        progress=progress))
    seconds = time.perf_counter() - start
    return TrainedDigits(model, settings, accuracy(model, data.test_images, data.test_labels), losses, seconds,
                         data.sha256)


def train_digit_cnn(settings: CNNSettings | None = None, *, progress: bool = False,
                    threads: int | None = 1) -> TrainedDigits[CNNSettings]:
    """Train a `DigitCNN` on fresh canvases of the train digits each step (default: the "default" preset);
    the test accuracy is on `canvas_test_set(settings)`."""
    settings = CNN_PRESETS["default"] if settings is None else settings
    if not isinstance(settings, CNNSettings):
        raise TypeError(f"settings: expected CNNSettings, got {type(settings).__name__}")
    data = load_digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = DigitCNN(settings)

    def batches(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        pick = torch.randint(0, len(data.train_labels), (2, settings.batch), generator=generator)
        others = data.train_images[pick[1]] if settings.distractor else None
        canvases = paste_digits(data.train_images[pick[0]], data.train_labels[pick[0]], settings, generator, others)
        return canvases.images, canvases.labels

    start = time.perf_counter()
    losses = with_threads(threads, lambda: train_classifier(
        model, batches, steps=settings.steps, lr=settings.lr, seed=settings.seed, label="digit_cnn",
        progress=progress))
    seconds = time.perf_counter() - start
    test = canvas_test_set(settings)
    return TrainedDigits(model, settings, accuracy(model, test.images, test.labels), losses, seconds, data.sha256)


def _plain(settings: Any) -> Any:
    """The settings as JSON values (tuples become lists), as stored and compared."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def cache_key(settings: Any, data_sha256: str) -> str:
    """16 hex digits of SHA-256 over the cache format, the model kind, every setting and the data hash."""
    payload = {"format": CACHE_FORMAT, "kind": type(settings).__name__, "settings": _plain(settings),
               "data_sha256": data_sha256}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def save(trained: TrainedDigits[Any], path: Path) -> None:
    """Write the weights and record to `path` and the record as JSON beside it (same name, .json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": _plain(trained.settings), "data_sha256": trained.data_sha256,
              "test_accuracy": trained.test_accuracy, "train_seconds": trained.train_seconds,
              "final_train_loss": trained.train_losses[-1], "python": platform.python_version(),
              "torch": str(torch.__version__), "format": CACHE_FORMAT, "extra": trained.extra}
    torch.save({"state": trained.model.state_dict(), "record": record, "train_losses": list(trained.train_losses)},
               path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def load(path: Path, settings: Settings, build: Callable[[Settings], nn.Module],
         data_sha256: str) -> TrainedDigits[Settings] | None:
    """The model saved at `path` if it was trained with `settings` on data of hash `data_sha256`, else None."""
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    record = saved["record"]
    if record["settings"] != _plain(settings) or record["data_sha256"] != data_sha256:
        return None
    model = build(settings)
    model.load_state_dict(saved["state"])
    return TrainedDigits(model.eval(), settings, record["test_accuracy"], tuple(saved["train_losses"]),
                         record["train_seconds"], data_sha256, cached=True, path=path, extra=record["extra"])


def cached_model(kind: str, name: Any, presets: dict[str, Settings], settings_type: type,
                 build: Callable[[Settings], nn.Module], train: Callable[..., TrainedDigits[Settings]],
                 cache_dir: str | Path | None, retrain: bool, progress: bool,
                 threads: int | None) -> TrainedDigits[Settings]:
    """The model of preset `name` (or of the given settings) from <cache_dir, default attnlab-results/<kind>>/
    <preset or "custom">-<key>.pt, else train(settings, progress=, threads=) and save it there."""
    if isinstance(name, settings_type):  # a preset's settings keep the preset's file name
        label, settings = next((k for k, v in presets.items() if v == name), "custom"), name
    elif isinstance(name, str) and name in presets:
        label, settings = name, presets[name]
    else:
        raise ValueError(f"name: expected a preset among {sorted(presets)} or {settings_type.__name__}, got {name!r}")
    data_sha = load_digits_split().sha256
    folder = RESULTS / kind if cache_dir is None else Path(cache_dir)
    path = folder / f"{label}-{cache_key(settings, data_sha)}.pt"
    if not retrain:
        found = load(path, settings, build, data_sha)
        if found is not None:
            return found
    if progress:
        print(f"{kind}: training {label} -> {path}", file=sys.stderr, flush=True)
    trained = train(settings, progress=progress, threads=threads)
    save(trained, path)
    trained.path = path
    return trained


def digit_vit(name: str | ViTSettings = "default", *, cache_dir: str | Path | None = None, retrain: bool = False,
              progress: bool = True, threads: int | None = 1) -> TrainedDigits[ViTSettings]:
    """The digit ViT of preset `name` (VIT_PRESETS) or of the given settings, from the cache, else trained and
    cached as <cache_dir>/<preset or "custom">-<key>.pt (default folder attnlab-results/digit_vit)."""
    return cached_model("digit_vit", name, VIT_PRESETS, ViTSettings, DigitViT, train_digit_vit, cache_dir, retrain,
                   progress, threads)


def digit_cnn(name: str | CNNSettings = "default", *, cache_dir: str | Path | None = None, retrain: bool = False,
              progress: bool = True, threads: int | None = 1) -> TrainedDigits[CNNSettings]:
    """The digit CNN of preset `name` (CNN_PRESETS) or of the given settings, from the cache, else trained and
    cached as <cache_dir>/<preset or "custom">-<key>.pt (default folder attnlab-results/digit_cnn)."""
    return cached_model("digit_cnn", name, CNN_PRESETS, CNNSettings, DigitCNN, train_digit_cnn, cache_dir, retrain,
                   progress, threads)
