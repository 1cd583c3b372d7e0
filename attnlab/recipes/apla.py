"""APLA, attention projection layer adaptation (P021): fine-tune only the attention output projection.

Every parameter of the model is frozen except, in each attention layer, the output projection W_o
(the linear after the heads; weight and bias), plus the parameters named in `train` (e.g. the task
head). The random-column variant trains only r of W_o's output columns per layer (papers' x W
notation, W_o: inner × dim; rows of the (dim, inner) torch weight and their bias entries), chosen
uniformly at random once, by a gradient mask: the other columns get zero gradient, as the official
code's split into a trainable and a frozen part does. No new parameters, nothing changes at inference.

An optimizer with decoupled weight decay (AdamW's default 0.01) still shrinks the masked columns,
whose gradient is zero: use weight_decay=0 for the W_o parameters with the column variant.

`training_cost(model, loss, optimizer)` measures what the paper reports: trainable parameters,
training memory and step time.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..core.registry import Paper, Param, Spec, add
from .projections import attention_layers

APLA_PAPER = Paper("P021", "APLA: A Simple Adaptation Method for Vision Transformers", 2025, "2503.11335")


@dataclass
class APLA:
    """The result of `apla`: which columns of each W_o train (`columns[name]`, None = all), the names of
    the trainable parameters, and the gradient-mask hooks (`remove()` takes them off)."""

    columns: dict[str, Tensor | None]
    trainable: tuple[str, ...]
    trainable_count: int
    hooks: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def apla(
    model: nn.Module,
    *,
    columns: int | None = None,
    train: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> APLA:
    """Freeze `model` except W_o of every attention layer (and the parameters whose names start with an
    entry of `train`); `columns` = r trains r random output columns of each W_o (module docstring).

    `trainable_count` counts the entries an optimizer can change: r·(inner + 1) per layer with `columns`,
    the whole W_o (weight and bias) otherwise, plus the `train` parameters.
    """
    if isinstance(train, str) or not all(isinstance(t, str) for t in train):
        raise TypeError(f"train: expected a sequence of parameter-name prefixes, got {train!r}")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ValueError(f"columns: expected an int >= 1 or None, got {columns!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    layers = attention_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    out = APLA({}, (), 0)
    count = 0
    for layer in layers:
        o = layer.o
        if columns is not None and columns > o.out_features:
            raise ValueError(f"columns: expected <= {o.out_features} (the width of W_o in {layer.name!r}), got {columns}")
        for p in o.parameters():
            p.requires_grad_(True)
        if columns is None:
            out.columns[layer.name] = None
            count += sum(p.numel() for p in o.parameters())
            continue
        chosen = torch.randperm(o.out_features, generator=generator)[:columns].sort().values
        keep = torch.zeros(o.out_features, dtype=torch.bool)
        keep[chosen] = True
        out.columns[layer.name] = chosen
        out.hooks.append(o.weight.register_hook(_masked(keep[:, None])))
        count += columns * o.in_features
        if o.bias is not None:
            out.hooks.append(o.bias.register_hook(_masked(keep)))
            count += columns
    names = []
    matched = set()
    for name, p in model.named_parameters():
        hit = [t for t in train if name == t or name.startswith(t + ".")]
        matched.update(hit)
        if hit and not p.requires_grad:
            p.requires_grad_(True)
            count += p.numel()
        if p.requires_grad:
            names.append(name)
    missing = sorted(set(train) - matched)
    if missing:
        raise ValueError(f"train: expected prefixes of parameter names of the model, got {missing} matching none")
    out.trainable, out.trainable_count = tuple(names), count
    return out


def _masked(keep: Tensor) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        return grad * keep.to(grad.device)

    return hook


@dataclass(frozen=True)
class TrainingCost:
    """What one training step costs: parameters (all, trainable), memory in bytes (activations saved for the
    backward pass, gradients, optimizer state; `peak_device` = torch.cuda's peak on a GPU, else None) and
    the median wall time of a step in seconds."""

    parameters: int
    trainable: int
    saved_activations: int
    gradients: int
    optimizer_state: int
    peak_device: int | None
    step_seconds: float

    @property
    def memory(self) -> int:
        """Training memory beyond the weights: activations saved for backward + gradients + optimizer state."""
        return self.saved_activations + self.gradients + self.optimizer_state


def _bytes(tensors: Sequence[Tensor]) -> int:
    seen: dict[tuple[int, str], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
    return sum(seen.values())


def _keeper(saved: list[Tensor]) -> Callable[[Tensor], Tensor]:
    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    return pack


def training_cost(
    model: nn.Module, loss: Callable[[nn.Module], Tensor], optimizer: torch.optim.Optimizer, *, steps: int = 3
) -> TrainingCost:
    """Run `steps` optimizer steps of `loss(model)` and measure them (`TrainingCost`); counts over the
    parameters with requires_grad. The model's weights change (it trains)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, saved_bytes = [], 0
    for _ in range(steps):
        saved: list[Tensor] = []
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(_keeper(saved), lambda t: t):
            value = loss(model)
        value.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        weights = {p.untyped_storage().data_ptr() for p in params}
        saved_bytes = max(saved_bytes, _bytes([t for t in saved if t.untyped_storage().data_ptr() not in weights]))
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor) and v.dim() > 0]
    return TrainingCost(
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        saved_activations=saved_bytes,
        gradients=_bytes(grads),
        optimizer_state=_bytes(state),
        peak_device=torch.cuda.max_memory_allocated(device) if cuda else None,
        step_seconds=sorted(times)[len(times) // 2],
    )


add(
    Spec(
        name="apla",
        kind="recipe",
        paper=APLA_PAPER,
        factory=apla,
        family="D",
        summary="APLA: fine-tune only the attention output projection W_o (or r random columns of it); "
        "training_cost() reports parameters, memory, step time",
        params=(
            Param("columns", int, None, "train r random output columns of each W_o (None: all of W_o)", low=1,
                  optional=True),
            Param("train", tuple, (), "prefixes of further parameters to train, e.g. the task head"),
        ),
    )
)
