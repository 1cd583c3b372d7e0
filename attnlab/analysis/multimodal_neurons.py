"""Multimodal neurons (P119, Schwettmann et al. 2023): attribution × gradient of MLP neurons to a caption token,
decoding a neuron through the unembedding, and the ablation check.

    from attnlab.analysis.multimodal_neurons import neuron_attribution, decode_neurons, ablation_check
    att = neuron_attribution(lm, ids, target, prefix=image_prefix)     # lm: a ToyLM with MLPs
    scores = att.over(range(image_prefix.shape[1]))                    # (batch, layers, hidden), image tokens
    values, tokens = decode_neurons(lm, layer=1, neurons=[7, 3])       # top tokens of W_out[u] W_U
    check = ablation_check(lm, ids, target, prefix=image_prefix, k=8)  # top-k vs random-k neurons zeroed

The neurons of layer l are the outputs a = GELU(W_in LN(h) + b_in) of its MLP, whose update is W_out a + b_out.
For the log-probability of the caption token c at the caption position, log p(c | image, text), the score of
neuron u at position i is the attribution × gradient

    g_u,i = a_u,i · ∂ log p(c) / ∂ a_u,i

(the gradient is the total derivative through every later layer). Summed over positions P (the image tokens by
default, as in the paper, which scores neurons on the image prefix), Σ_{i∈P} g_u,i is the first-order change of
log p(c) when a_u is switched off at P, so top-scoring neurons are the ones whose zeroing should hurt the caption.
Identities (exact): per position, Σ_u g_u,i = ⟨W_out a_i, ∂ log p/∂ m_i⟩ with m_i the layer's MLP update; and
Σ_{u,i} g_u,i = d/dt log p(a → t·a)|_{t=1} (scaling the layer's neurons).

Decoding (P119 §4): the word a neuron writes is read off W_out[:, u] W_Uᵀ (vocab,), the unembedding of its output
weights (no final LayerNorm), top tokens first. The ablation check (P119 §5): for each image, zero its k top-scoring
neurons at the image positions and measure the drop of p(c); compare with k random neurons drawn from the same
layers (as many per layer as the top set has).

Deviations: the paper uses GPT-J with a BEIT encoder and a linear projection (LiMBeR), attributing to the caption's
tokens; here the LM is a `ToyLM` (attnlab.analysis.toy_lm) with any registered attention and the image prefix any
(batch, p, dim) tensor — a tiny digit captioner trained here is in attnlab.analysis.digit_captioner. Ablation sets
activations to 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import check_int, check_tensor

P119 = Paper("P119", "Multimodal Neurons in Pretrained Text-Only Transformers", 2023, "2308.01544")


def _check_model(model: object) -> nn.Module:
    """A ToyLM whose blocks all have an MLP."""
    from .toy_lm import ToyLM

    if not isinstance(model, ToyLM):
        raise TypeError(f"model: expected a ToyLM (attnlab.analysis.toy_lm), got {type(model).__name__}")
    if any(block.mlp is None for block in model.blocks):
        raise ValueError(f"model: expected MLP blocks (mlp_ratio > 0), got mlp_ratio={model.settings.mlp_ratio}")
    return model


def _neurons(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is layer `layer`'s neuron activations a (the MLP's nonlinearity)."""
    return model.blocks[layer].mlp[1]


def _output_weight(model: nn.Module, layer: int) -> Tensor:
    """W_out of layer `layer`: (dim, hidden)."""
    return model.blocks[layer].mlp[2].weight


@dataclass
class NeuronAttribution:
    """Per layer, image and position: activations a, gradients ∂ log p(target)/∂a, both (layers, batch, n, hidden);
    log_prob (batch,) of the target token."""

    activations: Tensor
    gradients: Tensor
    log_prob: Tensor

    @property
    def scores(self) -> Tensor:
        """a · ∂ log p / ∂ a, (layers, batch, n, hidden)."""
        return self.activations * self.gradients

    def over(self, positions: Iterable[int] | None = None) -> Tensor:
        """Scores summed over `positions` (None: all): (batch, layers, hidden)."""
        scores = self.scores
        if positions is not None:
            index = torch.tensor(list(positions), dtype=torch.long, device=scores.device)
            n = scores.shape[2]
            if index.numel() == 0 or int(index.min()) < -n or int(index.max()) >= n:
                raise ParameterError(f"positions: expected non-empty indices in [-{n}, {n}), got {index.tolist()}")
            scores = scores.index_select(2, index % n)
        return scores.sum(2).transpose(0, 1)


def _check_target(target: object, batch: int, vocab: int) -> Tensor:
    t = check_tensor("target", target)
    if t.shape != (batch,) or t.dtype != torch.int64:
        raise ShapeError(f"target: expected int64 token ids ({batch},), got dtype {t.dtype} shape {tuple(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= vocab:
        raise ValueError(f"target: expected ids in [0, {vocab}), got values in [{int(t.min())}, {int(t.max())}]")
    return t


def neuron_attribution(model: nn.Module, ids: Tensor, target: Tensor, *, prefix: Tensor | None = None,
                       position: int = -1) -> NeuronAttribution:
    """Attribution × gradient of every MLP neuron at every position to log p(target) at `position` (index over
    prefix + tokens; default the last): see the module docstring. model: a ToyLM with MLPs."""
    _check_model(model)
    layers = model.settings.layers
    captured: list[Tensor | None] = [None] * layers

    def keep(layer: int):  # noqa: ANN202 - a forward hook
        def hook(_module: nn.Module, _args: object, out: Tensor) -> Tensor:
            if not out.requires_grad:  # frozen model and input: make the first neurons a leaf to differentiate by
                out = out.detach().requires_grad_(True)
            captured[layer] = out
            return out
        return hook

    handles = [_neurons(model, layer).register_forward_hook(keep(layer)) for layer in range(layers)]
    try:
        with torch.enable_grad():
            logits = model(ids, prefix=prefix)
            n = logits.shape[1]
            if not -n <= position < n:
                raise ParameterError(f"position: expected an index in [-{n}, {n}) (prefix + tokens), got {position!r}")
            t = _check_target(target, logits.shape[0], logits.shape[-1]).to(logits.device)
            log_prob = torch.log_softmax(logits[:, position], -1).gather(-1, t[:, None])[:, 0]
            acts = [a for a in captured if a is not None]
            grads = torch.autograd.grad(log_prob.sum(), acts, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    gradients = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
    return NeuronAttribution(torch.stack([a.detach() for a in acts]), torch.stack(gradients).detach(),
                             log_prob.detach())


def decode_neurons(model: nn.Module, layer: int, neurons: Sequence[int] | Tensor, *, top: int = 5) -> tuple[Tensor, Tensor]:
    """(values, token ids), each (len(neurons), top): the largest entries of W_out[:, u] W_Uᵀ per neuron u."""
    _check_model(model)
    check_int("layer", layer, 0, model.settings.layers - 1)
    w_out = _output_weight(model, layer)
    index = torch.as_tensor(neurons, dtype=torch.long, device=w_out.device).reshape(-1)
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= w_out.shape[1]:
        raise ParameterError(f"neurons: expected indices in [0, {w_out.shape[1]}), got {neurons!r}")
    check_int("top", top, 1, model.settings.vocab)
    with torch.no_grad():
        logits = w_out[:, index].T @ model.unembed.weight.T  # (neurons, vocab)
    return logits.topk(top, dim=-1)


@contextmanager
def ablate_neurons(model: nn.Module, masks: Mapping[int, Tensor]) -> Iterator[None]:
    """Inside the context, neuron activations of layer l are set to 0 where masks[l] is True (bool, broadcastable
    to (batch, n, hidden)). The hooks go on exit."""
    _check_model(model)
    for layer, mask in masks.items():
        check_int("masks", layer, 0, model.settings.layers - 1, meaning="(layer keys)")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks: expected bool tensors, got {type(mask).__name__} for layer {layer}")

    def zero(mask: Tensor):  # noqa: ANN202 - a forward hook
        return lambda _m, _a, out: out.masked_fill(mask.to(out.device), 0.0)

    handles = [_neurons(model, layer).register_forward_hook(zero(mask)) for layer, mask in masks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class AblationCheck:
    """p(target) per image: unablated, with its top-k neurons zeroed, with k random neurons zeroed (batch,)."""

    base: Tensor
    top: Tensor
    random: Tensor

    @property
    def top_drop(self) -> float:
        """Mean drop of p(target) when the top-k neurons are zeroed."""
        return float((self.base - self.top).mean())

    @property
    def random_drop(self) -> float:
        """Mean drop of p(target) when k random neurons are zeroed."""
        return float((self.base - self.random).mean())

    @property
    def top_log_drop(self) -> float:
        """Mean drop of log p(target) when the top-k neurons are zeroed."""
        return float((self.base.log() - self.top.log()).mean())

    @property
    def random_log_drop(self) -> float:
        """Mean drop of log p(target) when k random neurons are zeroed."""
        return float((self.base.log() - self.random.log()).mean())


def ablation_check(model: nn.Module, ids: Tensor, target: Tensor, *, prefix: Tensor | None = None, k: int = 8,
                   positions: Iterable[int] | None = None, position: int = -1, seed: int = 0) -> AblationCheck:
    """P119's causal check: per image, zero the k neurons of largest attribution summed over `positions` (default:
    the prefix positions, else all) at those positions, and k random neurons (same count per layer, from `seed`)."""
    _check_model(model)
    att = neuron_attribution(model, ids, target, prefix=prefix, position=position)
    layers, batch, n, hidden = att.activations.shape
    check_int("k", k, 1, layers * hidden)
    where = list(positions) if positions is not None else list(range(prefix.shape[1] if prefix is not None else n))
    scores = att.over(where).reshape(batch, layers * hidden)
    chosen = scores.topk(k, dim=-1).indices  # (batch, k) flat (layer, neuron)
    generator = torch.Generator().manual_seed(seed)
    random = torch.empty_like(chosen)
    for b in range(batch):
        per_layer = torch.bincount(chosen[b] // hidden, minlength=layers)
        picks = [layer * hidden + torch.randperm(hidden, generator=generator)[: int(c)] for layer, c in enumerate(per_layer)]
        random[b] = torch.cat(picks).to(chosen.device)
    at = torch.zeros(n, dtype=torch.bool, device=chosen.device)
    at[torch.tensor(where, dtype=torch.long, device=chosen.device) % n] = True

    def probability(flat: Tensor | None) -> Tensor:
        masks = {}
        if flat is not None:
            hit = torch.zeros(batch, layers * hidden, dtype=torch.bool, device=flat.device).scatter(1, flat, True)
            hit = hit.reshape(batch, layers, hidden)
            masks = {layer: hit[:, None, layer, :] & at[None, :, None] for layer in range(layers)}
        with torch.no_grad(), ablate_neurons(model, masks):
            logits = model(ids, prefix=prefix)[:, position]
        return torch.softmax(logits, -1).gather(-1, target[:, None].to(logits.device))[:, 0]

    return AblationCheck(probability(None), probability(chosen), probability(random))


_MODEL = Param("model", nn.Module, doc="a ToyLM with MLP blocks")
_IDS = Param("ids", Tensor, doc="token ids (batch, n) after the prefix")
_TARGET = Param("target", Tensor, doc="caption token id per sequence (batch,)")
_PREFIX = Param("prefix", Tensor, None, "image prefix (batch, p, dim)", optional=True)
_POSITION = Param("position", int, -1, "the caption position (index over prefix + tokens)")
add(Spec(name="multimodal-neuron-attribution", kind="analysis", paper=P119, factory=neuron_attribution, family="E",
         summary="attribution × gradient a_u · ∂log p(caption token)/∂a_u of every MLP neuron at every position",
         params=(_MODEL, _IDS, _TARGET, _PREFIX, _POSITION)))
add(Spec(name="neuron-decoding", kind="analysis", paper=P119, factory=decode_neurons, family="E",
         summary="top tokens of a neuron's output weights read through the unembedding, W_out[:, u] W_Uᵀ",
         params=(_MODEL, Param("layer", int, doc="MLP layer", low=0),
                 Param("neurons", (list, tuple, Tensor), doc="neuron indices"),
                 Param("top", int, 5, "tokens per neuron", low=1))))
add(Spec(name="neuron-ablation-check", kind="analysis", paper=P119, factory=ablation_check, family="E",
         summary="caption-token probability with each image's top-k attributed neurons zeroed vs k random ones",
         params=(_MODEL, _IDS, _TARGET, _PREFIX, Param("k", int, 8, "neurons zeroed per image", low=1),
                 Param("positions", (list, tuple), None, "positions scored and ablated (default: the prefix)",
                       optional=True),
                 _POSITION, Param("seed", int, 0, "seed of the random neurons", low=0))))
