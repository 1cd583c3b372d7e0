"""Stochastically subsampled self-attention, SSA (P074, "The Information Pathways Hypothesis"), then a dense fine-tune.

During training each query attends to a random subset of the keys; the subsets are redrawn every step
(every forward), so the model trains an ensemble of sparse sub-networks ("information pathways"). At
test time attention is dense (`eval()`), optionally after a short dense fine-tune (`dense_finetune`).

Locally biased sampling (sequences): key j is kept for query i independently with a probability that
decays with the distance δ = |i − j| (queries aligned to the last keys when n_q < n_k),

    p(δ) = min(1, (w / δ)^γ)      δ ≥ 1;   p(0) = 1

so the query's own key and every key within the window w are always kept, and far keys are kept with
probability ~ δ^−γ. The expected kept fraction (`expected_keep_fraction`) sets the training cost cut:
e.g. n = 512, w = 8, γ = 1 keeps ≈ 1/6 of the pairs. Deviation (the paper's code was not released):
the decay law p(δ) is ours, written from the paper's description (nearby keys sampled more densely);
masks are drawn per sample and shared by the heads of a layer, each layer drawing its own.

The mask is applied as an attn_mask on the wrapped attnlab module (dense-form softmax attention and
any module that takes an arbitrary attn_mask), so it reproduces the training distribution, not the
memory saving: the pairs kept are reported (`last_kept_fraction`) for the cost accounting. Padding and a
caller's attn_mask still act; a fully masked row gives zeros (the module's contract).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core.masks import causal_mask, restrict
from ..core.module import Attention
from ..core.registry import Paper, Param, Spec, add
from .projections import attention_layers

INFORMATION_PATHWAYS = Paper(
    "P074", "The Information Pathways Hypothesis: Transformers are Dynamic Self-Ensembles", 2023, "2306.01705"
)


def _check_law(window: float, power: float) -> tuple[float, float]:
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not window >= 1:
        raise ValueError(f"window: expected a number >= 1 (keys this close are always kept), got {window!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power < float("inf"):
        raise ValueError(f"power: expected a finite number > 0 (the decay exponent γ), got {power!r}")
    return float(window), float(power)


def distances(n_q: int, n_k: int, device: torch.device | None = None) -> Tensor:
    """δ_ij = |i + (n_k − n_q) − j| (n_q, n_k), int64: queries aligned to the last keys."""
    i = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    return (i - torch.arange(n_k, device=device)[None]).abs()


def keep_probability(distance: Tensor, window: float, power: float) -> Tensor:
    """p(δ) = min(1, (w / δ)^γ), p(0) = 1, elementwise over distances δ >= 0 (float64)."""
    window, power = _check_law(window, power)
    d = distance.to(torch.float64)
    if bool((d < 0).any()):
        raise ValueError("distance: expected distances >= 0, got a negative one")
    return torch.where(d <= window, torch.ones_like(d), (window / d.clamp_min(1.0)) ** power)


def expected_keep_fraction(n: int, window: float, power: float, *, causal: bool = False) -> float:
    """Σ_ij p(δ_ij) over the allowed pairs (all, or j ≤ i) divided by their number: the expected share kept."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    p = keep_probability(distances(n, n), window, power)
    if causal:
        p = p.tril()
        return float(p.sum()) / (n * (n + 1) / 2)
    return float(p.sum()) / (n * n)


def subsample_mask(
    batch: int,
    n_q: int,
    n_k: int,
    window: float,
    power: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """A bool keep-mask (batch, 1, n_q, n_k), True = attend: key j kept for query i with probability p(δ_ij),
    independently per sample and pair (shared by the heads)."""
    for name, value in (("batch", batch), ("n_q", n_q), ("n_k", n_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if n_q > n_k:
        raise ValueError(f"n_q: expected at most n_k = {n_k} queries (self-attention, queries aligned to the last keys), got {n_q}")
    p = keep_probability(distances(n_q, n_k), window, power)
    u = torch.rand(batch, 1, n_q, n_k, generator=generator, dtype=torch.float64)
    return (u < p).to(device)


class SubsampledAttention(nn.Module):
    """An attnlab attention module whose keys are subsampled per query in training (module docstring);
    dense in eval mode, and in training once `subsample` is False (the dense fine-tune)."""

    def __init__(
        self, attention: Attention, window: float = 8.0, power: float = 1.0, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not isinstance(attention, Attention):
            raise TypeError(f"attention: expected an attnlab Attention module, got {type(attention).__name__}")
        supports = attention.spec.supports
        if supports is None or not supports.attn_mask or attention.mask_form != "dense":
            raise ValueError(
                f"attention: expected a module that takes an arbitrary attn_mask (dense softmax family), "
                f"got {attention.spec.name!r}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.attention = attention
        self.window, self.power = _check_law(window, power)
        self.generator = generator
        self.subsample = True
        self.last_mask: Tensor | None = None
        self.last_kept_fraction: float | None = None

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: str = "fast",
    ) -> Tensor:
        """Tokens (batch, n, dim) -> (batch, n, dim); the keyword arguments as `Attention.forward`."""
        call = {"attention_mask": attention_mask, "key_padding_mask": key_padding_mask, "impl": impl}
        if not (self.training and self.subsample):
            return self.attention(x, attn_mask=attn_mask, **call)
        batch, n = (x.shape[0], x.shape[1]) if self.attention.batch_first else (x.shape[1], x.shape[0])
        keep = subsample_mask(batch, n, n, self.window, self.power, generator=self.generator, device=x.device)
        allowed = causal_mask(n, n, x.device) if self.attention.causal else torch.ones(n, n, dtype=torch.bool, device=x.device)
        self.last_mask = keep
        self.last_kept_fraction = float((keep & allowed).sum()) / (batch * float(allowed.sum()))
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask[None, None]
        return self.attention(x, attn_mask=restrict(attn_mask, keep), **call)


def subsample_attention(
    model: nn.Module, window: float = 8.0, power: float = 1.0, *, generator: torch.Generator | None = None
) -> list[SubsampledAttention]:
    """Wrap every attnlab attention layer of `model` in `SubsampledAttention` (in place, `attention_layers`
    order); layers that cannot take an attn_mask, and non-attnlab layers, raise."""
    wrapped = []
    for layer in attention_layers(model):
        if not isinstance(layer.module, Attention):
            raise TypeError(f"model: expected attnlab Attention layers, got {type(layer.module).__name__} at {layer.name!r}")
        parent_name, _, child = layer.name.rpartition(".")
        if not child:
            raise ValueError("model: expected attention layers inside the model, got a model that is one")
        module = SubsampledAttention(layer.module, window, power, generator=generator)
        setattr(model.get_submodule(parent_name), child, module)
        wrapped.append(module)
    return wrapped


def dense_finetune(wrappers: Sequence[SubsampledAttention]) -> None:
    """Switch the wrappers to dense attention for the fine-tune (training mode, every key)."""
    for w in wrappers:
        if not isinstance(w, SubsampledAttention):
            raise TypeError(f"wrappers: expected SubsampledAttention modules, got {type(w).__name__}")
        w.subsample = False


add(
    Spec(
        name="subsampled-attention",
        kind="recipe",
        paper=INFORMATION_PATHWAYS,
        factory=subsample_attention,
        family="D",
        summary="SSA: in training each query keeps key j with probability min(1, (w/|i−j|)^γ) (locally biased, "
        "redrawn every step), dense at eval; dense_finetune for the final dense phase",
        params=(
            Param("window", float, 8.0, "w: keys within this distance are always kept", low=1.0),
            Param("power", float, 1.0, "γ: the decay exponent of the keep probability", low=0.0),
        ),
    )
)
