"""Lorsa (P187): a low-rank sparse attention dictionary trained to reconstruct the output of an attention layer.

Many more heads than the layer has (`heads` ≫ its heads), each with a one-dimensional OV circuit (w_V^i, w_O^i ∈ R^d)
and a QK circuit of low dimension `qk_dim` shared by a group of `heads / qk_heads` consecutive heads; per position
only the top-K heads write:

    A_g(t, s) = softmax_s( (W_Q^g x_t + b_Q^g)·(W_K^g x_s + b_K^g) / √qk_dim + M(t, s) )      M: causal / padding
    z_i(t)    = Σ_s A_g(i)(t, s) (w_V^i·x_s + b_V^i)                                             g(i) = i // (heads / qk_heads)
    ŷ_t       = Σ_{i ∈ TopK(t)} z_i(t) w_O^i + b_O,   TopK(t): the K heads of largest |z_i(t)|·‖w_O^i‖

trained to minimise ‖ŷ − MHSA(x)‖² over the tokens of a model's activations (x: the layer's input, after its
LayerNorm; y: what the attention adds to the residual). As in the official code (OpenMOSS/Lorsa,
src/models/lorsa.py and src/train.py): the top-K rule ranks |z_i|·‖w_O^i‖ and keeps every head at or above the K-th
value (ties kept), chosen without gradient; inputs and targets are scaled so that their mean norm is √d
(`in_scale`, `out_scale`, measured on the training data and kept as buffers so that `forward` takes and returns the
raw activations); b_O starts at the mean target; Adam with a warm-up-then-cosine learning rate; K decreases
linearly from `heads` to `top_k` over the first `k_warmup` share of the steps; the loss is the MSE of the scaled
output. Deviation: at initialisation only w_V and b_V are rescaled so that the mean output norm matches the
target's (the official code rescales W_Q, W_K too, which also sharpens the patterns; the output is linear in w_V).
No rotary embeddings (the ToyLMs and MiniLM have absolute positions; fitted to a RoPE model's layer, its patterns
see no positions) and no virtual keys. `attention_layer_io` reads x, y from a ToyLM or, through forward hooks, from
a transformers model's self-attention layer (input hidden states, output after W_O; padding zero).

    from attnlab.analysis.lorsa import Lorsa, attention_layer_io, fit_lorsa, lorsa_head_scores
    x, y = attention_layer_io(toy_lm, ids, layer=1)      # (batch, n, d) each
    x, y = attention_layer_io(minilm, batch["input_ids"], 0, attention_mask=batch["attention_mask"])  # transformers
    lorsa = Lorsa(dim=64, heads=128, qk_heads=32, qk_dim=8, top_k=8)
    record = fit_lorsa(lorsa, x, y, steps=500)             # {"losses": [...], "fvu": ...}
    scores = lorsa_head_scores(lorsa, x_probe, ids_probe)  # previous-token / induction score of every Lorsa head
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import is_int
from .capture import is_cross_attention, is_transformers_model, transformers_attention_modules
from .heads import induction_score, previous_token_score
from .induction_model import head_scores, induction_batch, induction_model, repeated_tokens
from .toy_lm import ToyLM, lr_factor

P187 = Paper("P187", "Towards Understanding the Nature of Attention with Low-Rank Sparse Decomposition", 2025, "2504.20938")


def _positive(name: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ParameterError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class Lorsa(nn.Module):
    """`heads` one-dimensional OV heads over `qk_heads` shared QK circuits of `qk_dim` dims, top-K per position."""

    in_scale: Tensor
    out_scale: Tensor

    def __init__(self, dim: int, heads: int, *, qk_heads: int, qk_dim: int, top_k: int, causal: bool = True) -> None:
        super().__init__()
        dim, heads, qk_heads, qk_dim, top_k = (_positive(n, v) for n, v in (
            ("dim", dim), ("heads", heads), ("qk_heads", qk_heads), ("qk_dim", qk_dim), ("top_k", top_k)))
        if heads % qk_heads:
            raise ParameterError(f"qk_heads: expected a divisor of heads={heads}, got {qk_heads}")
        if top_k > heads:
            raise ParameterError(f"top_k: expected an int in [1, heads={heads}], got {top_k}")
        if not isinstance(causal, bool):
            raise ParameterError(f"causal: expected a bool, got {causal!r}")
        self.dim, self.heads, self.qk_heads, self.qk_dim, self.top_k, self.causal = dim, heads, qk_heads, qk_dim, top_k, causal
        self.w_q = nn.Parameter(torch.randn(qk_heads, dim, qk_dim) / math.sqrt(dim))
        self.w_k = nn.Parameter(torch.randn(qk_heads, dim, qk_dim) / math.sqrt(dim))
        self.b_q = nn.Parameter(torch.zeros(qk_heads, qk_dim))
        self.b_k = nn.Parameter(torch.zeros(qk_heads, qk_dim))
        self.w_v = nn.Parameter(torch.randn(heads, dim) / math.sqrt(dim))
        self.b_v = nn.Parameter(torch.zeros(heads))
        self.w_o = nn.Parameter(torch.randn(heads, dim) / math.sqrt(dim))
        self.b_o = nn.Parameter(torch.zeros(dim))
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))

    def _check(self, x: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a tensor (batch, n, dim={self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not x.is_floating_point() or x.dtype != self.w_q.dtype:
            raise TypeError(f"x: expected dtype {self.w_q.dtype} (as the Lorsa), got {x.dtype}")
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"attention_mask: expected a bool mask {tuple(x.shape[:2])}, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__}")
        return attention_mask.to(device=x.device, dtype=torch.bool)

    def patterns(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """A_g of every QK group: x (batch, n, dim) raw -> (batch, qk_heads, n, n); rows with no visible key are 0."""
        keep = self._check(x, attention_mask)
        h = x * self.in_scale
        q = torch.einsum("bnd,gde->bgne", h, self.w_q) + self.b_q[None, :, None]
        k = torch.einsum("bnd,gde->bgne", h, self.w_k) + self.b_k[None, :, None]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.qk_dim)
        n = x.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed.tril()
        allowed = allowed[None, None]
        if keep is not None:
            allowed = allowed & keep[:, None, None, :]
        weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
        return torch.nan_to_num(weights, nan=0.0) * allowed  # fully masked rows: 0, not NaN

    def head_maps(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The attention map of every OV head (its group's pattern): (batch, heads, n, n)."""
        return self.patterns(x, attention_mask).repeat_interleave(self.heads // self.qk_heads, dim=1)

    def activations(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """z_i(t) = Σ_s A_g(i)(t, s)(w_V^i·x_s + b_V^i) of every head at every position: (batch, n, heads), scaled units."""
        self._check(x, attention_mask)
        values = (x * self.in_scale) @ self.w_v.T + self.b_v  # (batch, n, heads)
        b, n, _ = values.shape
        grouped = values.view(b, n, self.qk_heads, -1).transpose(1, 2)  # (batch, qk_heads, n, heads per group)
        z = self.patterns(x, attention_mask) @ grouped  # each group's pattern applied to its heads' values
        return z.transpose(1, 2).reshape(b, n, self.heads)

    def selection(self, z: Tensor, top_k: int | None = None) -> Tensor:
        """Bool (batch, n, heads): the heads of each position whose |z_i|·‖w_O^i‖ is at or above the K-th largest."""
        k = self.top_k if top_k is None else top_k
        if not is_int(k) or not 1 <= k <= self.heads:
            raise ParameterError(f"top_k: expected an int in [1, {self.heads}], got {k!r}")
        with torch.no_grad():
            strength = z.abs() * self.w_o.norm(dim=-1)
            threshold = strength.topk(k, dim=-1).values[..., -1:]
            return strength >= threshold

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, *, top_k: int | None = None) -> Tensor:
        """ŷ (batch, n, dim) in the units of the targets: Σ over the top-K heads of z_i w_O^i + b_O, / out_scale."""
        z = self.activations(x, attention_mask)
        z = z * self.selection(z, top_k)
        return (z @ self.w_o + self.b_o) / self.out_scale


def attention_layer_io(model: nn.Module, ids: Tensor, layer: int, *, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x, y) of the attention of `layer` on token ids (batch, n), each (batch, n, dim): x its input, y its output.

    ToyLM: x = LN(residual) entering the layer's attention, y = the update the attention adds to the residual.
    transformers model: the layer-th self-attention module (`transformers_attention_modules` in order, cross-attention
    left out), read through forward hooks during model(input_ids=ids, attention_mask=attention_mask): x = the hidden
    states it gets, y = the output of its output projection W_O — the module's own output when it holds the
    projection (o_proj, out_proj, dense, ...; Llama-style), else the sibling `output.dense` (BERT family, where
    `output` then adds the residual and normalises). Padded positions (attention_mask False) are 0 in x and y: pass
    the same mask to `fit_lorsa`. Run the model in eval mode for deterministic activations (dropout)."""
    if is_transformers_model(model):
        return _transformers_layer_io(model, ids, layer, attention_mask)
    if not isinstance(model, ToyLM):
        raise TypeError(f"model: expected a ToyLM or a transformers model, got {type(model).__name__}")
    if not is_int(layer) or not 0 <= layer < model.settings.layers:
        raise ParameterError(f"layer: expected an int in [0, {model.settings.layers}), got {layer!r}")
    with torch.no_grad():
        t = model.trace(ids, attention_mask=attention_mask)
        return model.blocks[layer].norm1(t.residual[layer]), t.attention[layer]


_OWN_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out")


def _output_projection(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """The module whose output is W_O applied to the heads of attention `module` (named `name` in `model`)."""
    if any(isinstance(getattr(module, child, None), nn.Module) for child in _OWN_OUTPUT_PROJECTIONS):
        return module
    parent = model.get_submodule(name.rpartition(".")[0])
    dense = getattr(getattr(parent, "output", None), "dense", None)
    if isinstance(dense, nn.Linear):
        return dense
    raise TypeError(f"model: attention module {name!r} ({type(module).__name__}) has no output projection of its own "
                    f"({', '.join(_OWN_OUTPUT_PROJECTIONS)}) nor a sibling output.dense; its attention output is unknown")


def _transformers_layer_io(model: nn.Module, ids: Tensor, layer: int, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    found = [(n, m) for n, m in transformers_attention_modules(model) if not is_cross_attention(m, n)]
    if not is_int(layer) or not 0 <= layer < len(found):
        raise ParameterError(f"layer: expected an int in [0, {len(found)}) (the model's self-attention layers), got {layer!r}")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise TypeError(f"ids: expected token ids (batch, n) of an integer dtype, got "
                        f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}"
                        f"{' of ' + str(ids.dtype) if isinstance(ids, Tensor) else ''}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != ids.shape):
        raise ValueError(f"attention_mask: expected a mask {tuple(ids.shape)} (as ids), got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__}")
    name, module = found[layer]
    projection = _output_projection(model, name, module)
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []

    def take_input(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append(args[0] if args else kwargs["hidden_states"])

    def take_output(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [module.register_forward_pre_hook(take_input, with_kwargs=True), projection.register_forward_hook(take_output)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) != 1 or len(outputs) != 1:
        raise TypeError(f"model: expected one call of {name!r} and of its output projection per forward, got "
                        f"{len(inputs)} and {len(outputs)}")
    x, y = inputs[0], outputs[0]
    if x.shape != y.shape or tuple(x.shape[:2]) != tuple(ids.shape):
        raise TypeError(f"model: expected the input and the projected output of {name!r} to be (batch, n, dim) "
                        f"{tuple(ids.shape)} + (dim,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if attention_mask is None:
        return x, y
    real = attention_mask.to(device=x.device, dtype=torch.bool)[..., None]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(real, x, zero), torch.where(real, y, zero)


def _check_pair(x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() != 3 or x.shape != y.shape:
        raise ValueError(f"y: expected the shape of x {tuple(getattr(x, 'shape', ()))} (batch, n, dim), got "
                         f"{tuple(getattr(y, 'shape', ())) or type(y).__name__}")
    real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device, torch.bool)
    if tuple(real.shape) != tuple(x.shape[:2]):
        raise ValueError(f"attention_mask: expected a bool mask {tuple(x.shape[:2])}, got {tuple(real.shape)}")
    return real


def fraction_unexplained(lorsa: Lorsa, x: Tensor, y: Tensor, *, attention_mask: Tensor | None = None,
                         top_k: int | None = None) -> float:
    """Σ‖ŷ − y‖² / Σ‖y − ȳ‖² over the real tokens (1 − explained variance; ȳ: the mean target)."""
    real = _check_pair(x, y, attention_mask)
    with torch.no_grad():
        err = (lorsa(x, attention_mask, top_k=top_k) - y)[real]
        spread = y[real] - y[real].mean(0)
    return float(err.pow(2).sum() / spread.pow(2).sum())


def fit_lorsa(lorsa: Lorsa, x: Tensor, y: Tensor, *, attention_mask: Tensor | None = None, steps: int = 500,
              batch: int = 16, lr: float = 3e-3, k_warmup: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Train `lorsa` to reconstruct y from x (both (sequences, n, dim); attention_mask (sequences, n) True = real
    token): scales measured, b_O and w_V initialised, then `steps` Adam steps on random batches of sequences (module
    docstring). Returns {"losses": per step (MSE of the scaled outputs), "fvu": `fraction_unexplained` at the end}."""
    real = _check_pair(x, y, attention_mask)
    steps, batch = _positive("steps", steps), _positive("batch", batch)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ParameterError(f"lr: expected a positive learning rate, got {lr!r}")
    if isinstance(k_warmup, bool) or not isinstance(k_warmup, (int, float)) or not 0 <= k_warmup <= 1:
        raise ParameterError(f"k_warmup: expected a share of the steps in [0, 1], got {k_warmup!r}")
    if not is_int(seed) or seed < 0:
        raise ParameterError(f"seed: expected an int >= 0, got {seed!r}")
    x, y = x.detach().to(lorsa.w_q.dtype), y.detach().to(lorsa.w_q.dtype)
    mask = None if attention_mask is None else real
    with torch.no_grad():
        lorsa.in_scale.fill_(math.sqrt(lorsa.dim) / float(x[real].norm(dim=-1).mean()))
        lorsa.out_scale.fill_(math.sqrt(lorsa.dim) / float(y[real].norm(dim=-1).mean()))
        target = y * lorsa.out_scale
        lorsa.b_o.copy_(target[real].mean(0))
        out = lorsa(x, mask, top_k=lorsa.heads) * lorsa.out_scale - lorsa.b_o
        factor = (target - lorsa.b_o)[real].norm(dim=-1).mean() / out[real].norm(dim=-1).mean().clamp_min(1e-12)
        lorsa.w_v.mul_(factor)
        lorsa.b_v.mul_(factor)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(lorsa.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, steps))
    warm = max(1, round(k_warmup * steps))
    losses = []
    lorsa.train()
    for step in range(steps):
        k = max(lorsa.top_k, round(lorsa.heads + (lorsa.top_k - lorsa.heads) * min(1.0, step / warm)))
        pick = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=generator).to(x.device)
        sub_mask = None if mask is None else mask[pick]
        out = lorsa(x[pick], sub_mask, top_k=k) * lorsa.out_scale
        keep = real[pick]
        loss = nn.functional.mse_loss(out[keep], target[pick][keep])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    lorsa.eval()
    return {"losses": losses, "fvu": fraction_unexplained(lorsa, x, y, attention_mask=mask)}


def lorsa_head_scores(lorsa: Lorsa, x: Tensor, ids: Tensor, *, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per Lorsa head on x (batch, n, dim) with token ids (batch, n): "previous_token" and "induction" scores of its
    map (`attnlab.analysis.heads`, averaged over the batch) and "active", the share of real positions where it is
    among the top-K. Each (heads,)."""
    if not isinstance(ids, Tensor) or tuple(ids.shape) != tuple(x.shape[:2]):
        raise ValueError(f"ids: expected token ids {tuple(x.shape[:2])}, got {tuple(getattr(ids, 'shape', ())) or type(ids).__name__}")
    with torch.no_grad():
        maps = lorsa.head_maps(x, attention_mask)
        active = lorsa.selection(lorsa.activations(x, attention_mask))
    real = torch.ones(ids.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    return {
        "previous_token": previous_token_score(maps, attention_mask=attention_mask).mean(0),
        "induction": induction_score(maps, ids, attention_mask=attention_mask).mean(0),
        "active": active.cpu()[real].double().mean(0),
    }


def lorsa_induction_demo(recipe: Any = None, *, cache_dir: str | Path | None = None, sizes: tuple[int, ...] = (8, 32, 128),
                         group: int = 4, top_k: int = 8, steps: int = 600, seed: int = 0) -> dict[str, Any]:
    """P187's two claims on the cached full-size induction model (`induction_model.induction_model(recipe)`): for each
    layer, the fraction of variance unexplained by Lorsas of `sizes` heads (same budget: `steps`, K = `top_k`, groups of
    `group` heads, qk_dim = the model's head_dim), and the best previous-token / induction scores among the active heads
    of the largest one next to the model's own heads. Minutes on one core (not for tests)."""
    trained = induction_model(recipe, cache_dir=cache_dir)
    model = trained.model
    assert isinstance(model, ToyLM)
    s = model.settings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.cat([induction_batch(generator, batch=192, length=s.context, vocab=s.vocab)[0],
                     repeated_tokens(generator, batch=64, half=s.context // 2, vocab=s.vocab)])
    probe = repeated_tokens(generator, batch=32, half=s.context // 2, vocab=s.vocab)
    layers = []
    for layer in range(s.layers):
        x, y = attention_layer_io(model, ids, layer)
        x_probe = attention_layer_io(model, probe, layer)[0]
        fvu = []
        for heads in sizes:
            torch.manual_seed(seed)
            lorsa = Lorsa(s.dim, heads, qk_heads=max(1, heads // group), qk_dim=s.dim // s.heads, top_k=min(top_k, heads))
            fvu.append(fit_lorsa(lorsa, x, y, steps=steps, batch=32, lr=0.01, seed=seed)["fvu"])
        scores = lorsa_head_scores(lorsa, x_probe, probe)
        active = scores["active"] > 0.01
        layers.append({"layer": layer, "heads": list(sizes), "fvu": fvu,
                       "best_previous_token": float(scores["previous_token"][active].max()),
                       "best_induction": float(scores["induction"][active].max())})
    return {"model": str(trained.path), "model_heads": head_scores(model, probe), "layers": layers}


add(Spec(name="lorsa", kind="analysis", paper=P187, factory=Lorsa, family="E",
         summary="low-rank sparse attention: many 1-D OV heads over shared low-dim QK circuits, top-K per position, "
                 "trained (fit_lorsa) to reconstruct an attention layer's output",
         params=(Param("dim", int, doc="width of the layer's input and output", low=1),
                 Param("heads", int, doc="OV heads (many more than the layer's)", low=1),
                 Param("qk_heads", int, doc="QK circuits, each shared by heads / qk_heads heads", low=1),
                 Param("qk_dim", int, doc="dimension of each QK circuit", low=1),
                 Param("top_k", int, doc="heads active per position", low=1),
                 Param("causal", bool, True, "causal patterns"))))
