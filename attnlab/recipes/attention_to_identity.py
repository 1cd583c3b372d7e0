"""Entropy-guided conversion of attention layers to identity (P018, "MLP Can Be A Good Transformer Learner").

Feature entropy, under a Gaussian approximation per channel c over the calibration samples:

    H(X) = Σ_c ½ log(2πe σ_c²)                                  (the official code prints Σ_c log σ_c)

The selection rule (the paper's entropy-based selection, NOSE): attention layers are chosen one at a
time; at each step the candidate whose conversion to identity, together with the layers chosen
before, changes the entropy of the model's final features the least is taken,

    ℓ* = argmin_{ℓ ∉ S} | H(f_{S ∪ {ℓ}}(X)) − H(f(X)) |         (f_S: the model with S converted)

ties going to the lower layer. The paper finds the chosen layers among the bottom blocks (e.g. DeiT-T:
0, 2, 4, 6); `candidates` restricts the search (e.g. to the bottom half).

Conversion: the attention sublayer is replaced by the identity, its output equals its input. During
fine-tuning the paper dilutes the branch gradually (official code: x ← (2 − λ)x + λ·Attn(LN x),
λ_t = max(0, 1 − t/T)); `DilutedAttention` does this at the sublayer, y = λ·Attn(h) + (1 − λ)·h with h
the sublayer's input. Deviation: in an attnlab pre-norm block h = LN(x), so λ = 0 gives x + LN(x)
rather than the official 2x; in a BERT layer the sublayer holds the residual and the norm
(LN(x + W_o·Attn(x))), so λ = 0 passes x through. `attention_entropies` gives each attention
sublayer's output entropy (the per-layer quantity the paper plots).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.module import Attention
from ..core.registry import Paper, Param, Spec, add
from .projections import AttentionLayer, attention_layers

MLP_LEARNER = Paper("P018", "MLP Can Be A Good Transformer Learner", 2024, "2404.05657")


def gaussian_entropy(features: Tensor) -> Tensor:
    """Σ_c ½ log(2πe σ_c²) of features (..., C): σ_c the standard deviation of channel c over all samples
    (the leading dimensions), in float64; a constant channel gives −inf."""
    if not isinstance(features, Tensor) or features.dim() < 2:
        raise ValueError(f"features: expected a tensor (..., channels) with samples, got {features!r:.60}")
    flat = features.detach().reshape(-1, features.shape[-1]).double()
    if flat.shape[0] < 2:
        raise ValueError(f"features: expected at least 2 samples, got shape {tuple(features.shape)}")
    variance = flat.var(dim=0, correction=0)
    return 0.5 * torch.log(2 * math.pi * math.e * variance).sum()


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


class IdentityAttention(nn.Module):
    """An attention sublayer converted to identity: returns its input (as `(x, None)` for a transformers
    sublayer, which returns (output, weights))."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, None]:
        return (x, None) if self.returns_tuple else x


class DilutedAttention(nn.Module):
    """λ·Attn(h) + (1 − λ)·h around an attention sublayer; λ = 0 skips the attention (identity)."""

    def __init__(self, attention: nn.Module, lam: float = 1.0) -> None:
        super().__init__()
        self.attention = attention
        self.returns_tuple = not isinstance(attention, Attention)
        self.lam = _check_lambda(lam)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.lam == 0.0:
            return (x, None) if self.returns_tuple else x
        out = self.attention(x, *args, **kwargs)
        mixed = self.lam * _first(out) + (1.0 - self.lam) * x
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


def _check_lambda(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a float in [0, 1], got {lam!r}")
    return float(lam)


def dilution_lambda(step: int, zero_at: int) -> float:
    """λ_t = max(0, 1 − t / T): the official schedule (T = 299 epochs), 1 at the start, 0 from step T on."""
    if isinstance(zero_at, bool) or not isinstance(zero_at, int) or zero_at < 1:
        raise ValueError(f"zero_at: expected an int >= 1, got {zero_at!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    return max(0.0, 1.0 - step / zero_at)


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    if not child:
        raise ValueError("model: expected attention layers inside the model, got a model that is one")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def _check_layers(layers: Sequence[int], count: int, argument: str) -> list[int]:
    if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"{argument}: expected a sequence of layer indices, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < count]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"{argument}: expected distinct indices in [0, {count}), got {list(layers)}")
    return list(layers)


def convert_to_identity(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """Replace the attention sublayers number `layers` (in `attention_layers` order) by `IdentityAttention`,
    in place; returns their names."""
    found = attention_layers(model)
    chosen = _check_layers(layers, len(found), "layers")
    for i in chosen:
        _swap(model, found[i].name, IdentityAttention(not isinstance(found[i].module, Attention)))
    return [found[i].name for i in chosen]


def dilute(model: nn.Module, layers: Sequence[int], lam: float = 1.0) -> list[DilutedAttention]:
    """Wrap the attention sublayers number `layers` in `DilutedAttention` (set `.lam` as training goes)."""
    found = attention_layers(model)
    chosen = _check_layers(layers, len(found), "layers")
    wrapped = [DilutedAttention(found[i].module, lam) for i in chosen]
    for i, module in zip(chosen, wrapped):
        _swap(model, found[i].name, module)
    return wrapped


def attention_entropies(model: nn.Module, run: Callable[[nn.Module], Any]) -> Tensor:
    """The Gaussian entropy of each attention sublayer's output during `run(model)` (the calibration pass),
    (layers,) in `attention_layers` order."""
    found = attention_layers(model)
    outputs: list[list[Tensor]] = [[] for _ in found]

    def keep(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[i].append(_first(output))

        return hook

    hooks = [layer.module.register_forward_hook(keep(i)) for i, layer in enumerate(found)]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    for layer, seen in zip(found, outputs):
        if not seen:
            raise ValueError(f"run: expected a forward pass through every attention layer, {layer.name!r} was not called")
    return torch.stack([gaussian_entropy(torch.cat([t.reshape(-1, t.shape[-1]) for t in seen])) for seen in outputs])


def select_identity_layers(
    model: nn.Module,
    run: Callable[[nn.Module], Tensor],
    count: int,
    *,
    candidates: Sequence[int] | None = None,
) -> list[int]:
    """The `count` attention layers to convert, in the order chosen by the entropy rule (module docstring);
    `run(model)` returns the final features (..., C) on the calibration data. The model is left unchanged."""
    found: list[AttentionLayer] = attention_layers(model)
    pool = _check_layers(range(len(found)) if candidates is None else list(candidates), len(found), "candidates")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(pool):
        raise ValueError(f"count: expected an int in [1, {len(pool)}] (the candidates), got {count!r}")
    with torch.no_grad():
        reference = gaussian_entropy(run(model))
        chosen: list[int] = []
        for _ in range(count):
            best, best_gap = -1, math.inf
            for i in pool:
                if i in chosen:
                    continue
                trial = chosen + [i]
                originals = {j: _swap(model, found[j].name, IdentityAttention(not isinstance(found[j].module, Attention)))
                             for j in trial}
                try:
                    gap = abs(gaussian_entropy(run(model)) - reference).item()
                finally:
                    for j, module in originals.items():
                        _swap(model, found[j].name, module)
                if gap < best_gap:
                    best, best_gap = i, gap
            chosen.append(best)
    return chosen


add(
    Spec(
        name="attention-to-identity",
        kind="recipe",
        paper=MLP_LEARNER,
        factory=select_identity_layers,
        family="D",
        summary="entropy-guided choice of attention layers to turn into identity (final-feature entropy kept), "
        "with convert_to_identity and the λ dilution schedule",
        params=(
            Param("count", int, doc="how many attention layers to convert", low=1),
            Param("candidates", tuple, None, "layer indices to choose from (default all)", optional=True),
        ),
    )
)
