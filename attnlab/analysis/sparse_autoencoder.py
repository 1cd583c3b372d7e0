"""Sparse autoencoders on the residual stream, the separation score of their latents, and steering by a latent (P103).

    from attnlab.analysis.sparse_autoencoder import train_sae, reconstruction_metrics, separation_scores, steer_residual
    sae = train_sae(acts, latents=64, activation="topk", k=4)     # acts (N, dim): residual vectors
    reconstruction_metrics(sae, acts)                              # {"fve": .., "l0": .., "dead": ..}
    sep = separation_scores(sae.encode(known_acts), sae.encode(unknown_acts))
    j = int(sep.unknown.argmax())                                  # the most "unknown entity" latent
    with steer_residual(model, layer=1, direction=sae.decoder[j], coefficient=8.0, positions=[2]):
        logits = model(ids)                                        # residual entering layer 1 += 8 d_j at position 2

The autoencoder (`SparseAutoencoder`), for residual vectors x (..., dim) and `latents` dictionary directions:

    f(x) = σ(W_enc (x − b_dec) + b_enc)            codes (..., latents), f ≥ 0
    x̂(f) = f W_dec + b_dec = Σ_j f_j d_j + b_dec   W_dec = `decoder` (latents, dim), rows d_j of unit norm

with σ = ReLU ("relu", sparsity from an L1 penalty) or TopK ("topk": ReLU of the k largest pre-activations, the
others 0; L0 ≤ k by construction). Training (`train_sae`) minimises, over minibatches of the activations,

    ‖x − x̂‖² / v  +  λ · Σ_j f_j ‖d_j‖ / √v          v = mean ‖x − mean(x)‖² of the training set

(the L1 term only for "relu"; dividing by v and √v makes λ independent of the scale of the activations), with
Adam, the decoder rows renormalised to unit norm after every step, b_dec initialised to the mean and W_enc to
W_decᵀ. Measured (`reconstruction_metrics`): the fraction of variance explained FVE = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²,
L0 = mean number of nonzero codes per vector, and the share of dead latents (never nonzero on the data).

Separation score (P103, Ferrando et al. 2025, §3): for latent j, the share of known entities whose last token's
code is active, f_j^known = |{i : f_j(x_i^known) > τ}| / N^known, likewise f_j^unknown, and

    s_j^known = f_j^known − f_j^unknown,      s_j^unknown = f_j^unknown − f_j^known     (τ = 0)

Steering (P103 §4): the residual stream entering layer l gets α·d_j added at chosen positions (or all), so every
later layer reads x_l + α d_j there. `steer_residual` does this on a `ToyLM` (attnlab.analysis.toy_lm): the
vector is added to the position embeddings (layer 0) or to the MLP update of block l − 1 (layer l ≥ 1), so the
trace's residual[l] and all that follows are the steered ones (trace.mlp[l − 1] carries the added vector).

Deviations from the paper: the paper reads Gemma Scope's pretrained JumpReLU SAEs on Gemma 2; here the SAE is a
ReLU (L1) or TopK SAE trained on the given activations (a small model trained here on planted known/unknown
names: attnlab.analysis.entity_lm; or MiniLM's hidden states). The paper also drops latents that fire on more than
2% of generic text tokens before ranking; `separation_scores` returns the raw scores, filtering is the caller's.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import check_choice, check_floating, check_int, check_rank, check_tensor, is_int

P103 = Paper("P103", "Do I Know This Entity? Knowledge Awareness and Hallucinations in Language Models", 2024, "2411.14257")
ACTIVATIONS = ("relu", "topk")


def _check_rows(name: str, x: object, dim: int | None = None) -> Tensor:
    """x: a floating (N, dim) tensor with N >= 1 (dim checked when given)."""
    t = check_tensor(name, x)
    check_rank(name, t, 2, "(vectors, dim)")
    check_floating(name, t)
    if t.shape[0] < 1:
        raise ShapeError(f"{name}: expected at least one vector, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ShapeError(f"{name}: expected last dimension dim={dim}, got shape {tuple(t.shape)}")
    return t


class SparseAutoencoder(nn.Module):
    """f(x) = σ(W_enc (x − b_dec) + b_enc), x̂ = f W_dec + b_dec; `decoder` (latents, dim), unit-norm rows."""

    def __init__(self, dim: int, latents: int, *, activation: str = "relu", k: int | None = None) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("latents", latents)
        check_choice("activation", activation, ACTIVATIONS)
        if activation == "topk":
            check_int("k", k, 1, latents, meaning="(active latents per vector)")
        elif k is not None:
            raise ParameterError(f"k: expected None with activation 'relu' (k is TopK's), got {k!r}")
        self.dim, self.latents, self.activation, self.k = dim, latents, activation, k
        directions = torch.randn(latents, dim)
        directions = directions / directions.norm(dim=1, keepdim=True)
        self.decoder = nn.Parameter(directions)  # W_dec: row j is latent j's direction d_j in the residual stream
        self.decoder_bias = nn.Parameter(torch.zeros(dim))  # b_dec
        self.encoder = nn.Parameter(directions.clone())  # W_enc (latents, dim)
        self.encoder_bias = nn.Parameter(torch.zeros(latents))  # b_enc

    def pre_activations(self, x: Tensor) -> Tensor:
        """W_enc (x − b_dec) + b_enc: (..., latents)."""
        if not isinstance(x, Tensor) or x.shape[-1:] != (self.dim,) or not x.is_floating_point():
            raise ShapeError(f"x: expected a floating tensor (..., dim={self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return (x - self.decoder_bias) @ self.encoder.T + self.encoder_bias

    def encode(self, x: Tensor) -> Tensor:
        """Codes f(x) >= 0, (..., latents); at most k nonzero per vector with TopK."""
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return torch.relu(pre)
        top = pre.topk(int(self.k or 1), dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, codes: Tensor) -> Tensor:
        """x̂ = f W_dec + b_dec: (..., dim)."""
        if not isinstance(codes, Tensor) or codes.shape[-1:] != (self.latents,):
            raise ShapeError(f"codes: expected a tensor (..., latents={self.latents}), got "
                             f"{tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__}")
        return codes @ self.decoder + self.decoder_bias

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x̂(f(x)), (..., dim)."""
        return self.decode(self.encode(x))


def _centered_variance(x: Tensor) -> Tensor:
    """mean ‖x − x̄‖² over the rows."""
    return (x - x.mean(0)).pow(2).sum(1).mean()


def train_sae(
    activations: Tensor,
    latents: int,
    *,
    activation: str = "relu",
    k: int | None = None,
    l1: float = 1e-2,
    steps: int = 2000,
    batch: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> SparseAutoencoder:
    """A `SparseAutoencoder` fitted to `activations` (N, dim) (see the module docstring for the loss).

    l1: λ of the ReLU SAE's L1 penalty (a TopK SAE has none: its sparsity is k, and l1 is not used). Seeded: the
    initialisation and the minibatches come from `seed`. Returned in eval mode, in the activations' dtype/device."""
    x = _check_rows("activations", activations).detach()
    check_int("steps", steps)
    check_int("batch", batch)
    if not is_int(seed) or seed < 0:
        raise ParameterError(f"seed: expected an int >= 0, got {seed!r}")
    for name, value in (("l1", l1), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ParameterError(f"{name}: expected a finite float >= 0, got {value!r}")
    if lr == 0:
        raise ParameterError(f"lr: expected a positive learning rate, got {lr!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = SparseAutoencoder(x.shape[1], latents, activation=activation, k=k)
    sae = sae.to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        sae.decoder_bias.copy_(x.mean(0))
    variance = _centered_variance(x).clamp(min=torch.finfo(x.dtype).tiny)
    penalty = l1 if activation == "relu" else 0.0
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    for _ in range(steps):
        rows = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=generator).to(x.device)
        sample = x[rows]
        codes = sae.encode(sample)
        error = (sae.decode(codes) - sample).pow(2).sum(1).mean() / variance
        sparsity = (codes * sae.decoder.norm(dim=1)).sum(1).mean() / variance.sqrt()
        loss = error + penalty * sparsity
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.decoder.div_(sae.decoder.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny))
    return sae.eval()


def reconstruction_metrics(sae: SparseAutoencoder, activations: Tensor) -> dict[str, float]:
    """{"fve": 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², "l0": mean nonzero codes per vector, "dead": share of latents never
    nonzero on these activations, "mse": mean ‖x − x̂‖²}."""
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae: expected a SparseAutoencoder, got {type(sae).__name__}")
    x = _check_rows("activations", activations, sae.dim)
    with torch.no_grad():
        codes = sae.encode(x)
        error = (sae.decode(codes) - x).pow(2).sum(1)
        total = (x - x.mean(0)).pow(2).sum()
        active = codes > 0
    return {
        "fve": float(1 - error.sum() / total) if total > 0 else float("nan"),
        "l0": float(active.sum(1).double().mean()),
        "dead": float((~active.any(0)).double().mean()),
        "mse": float(error.mean()),
    }


@dataclass
class Separation:
    """Per latent (latents,): activation frequencies on known and unknown entities and the two scores."""

    freq_known: Tensor
    freq_unknown: Tensor

    @property
    def known(self) -> Tensor:
        """s^known = f^known − f^unknown."""
        return self.freq_known - self.freq_unknown

    @property
    def unknown(self) -> Tensor:
        """s^unknown = f^unknown − f^known."""
        return self.freq_unknown - self.freq_known


def separation_scores(known_codes: Tensor, unknown_codes: Tensor, *, threshold: float = 0.0) -> Separation:
    """Activation frequencies f_j = share of rows with code_j > threshold on known and unknown entities' last tokens
    (codes (N, latents) each) and the separation scores s^known = f^known − f^unknown, s^unknown = −s^known."""
    known = _check_rows("known_codes", known_codes)
    unknown = _check_rows("unknown_codes", unknown_codes, known.shape[1])
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ParameterError(f"threshold: expected a finite float, got {threshold!r}")
    return Separation((known > threshold).double().mean(0), (unknown > threshold).double().mean(0))


def _positions_mask(positions: Sequence[int] | Tensor | None, n: int, device: torch.device) -> Tensor:
    """bool (n,): True where the vector is added (all positions for None)."""
    if positions is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    index = positions if isinstance(positions, Tensor) else torch.tensor(list(positions), dtype=torch.long)
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32) or index.numel() == 0:
        raise ParameterError(f"positions: expected a non-empty sequence of position indices or None, got {positions!r}")
    if int(index.min()) < -n or int(index.max()) >= n:
        raise ParameterError(f"positions: expected indices in [-{n}, {n}) (the input's positions), got {index.tolist()}")
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[index.to(device)] = True
    return mask


@contextmanager
def steer_residual(
    model: nn.Module, layer: int, direction: Tensor, coefficient: float, positions: Sequence[int] | Tensor | None = None
) -> Iterator[None]:
    """Inside the context, the residual stream entering `layer` of a `ToyLM` gets coefficient·direction added at
    `positions` (indices over prefix + tokens, the same in every sequence; None: all positions). Layer 0 is the
    embedding sum; layer = layers is the final state before the last LayerNorm. The hooks go on exit."""
    from .toy_lm import ToyLM

    if not isinstance(model, ToyLM):
        raise TypeError(f"model: expected a ToyLM (attnlab.analysis.toy_lm), got {type(model).__name__}")
    check_int("layer", layer, 0, model.settings.layers, meaning="(0: the embeddings, layers: the final state)")
    vector = check_tensor("direction", direction)
    if vector.shape != (model.settings.dim,) or not vector.is_floating_point():
        raise ShapeError(f"direction: expected a floating tensor (dim={model.settings.dim},), got {tuple(vector.shape)}")
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not math.isfinite(coefficient):
        raise ParameterError(f"coefficient: expected a finite float, got {coefficient!r}")
    if positions is not None:
        _positions_mask(positions, model.settings.context, vector.device)  # checks the indices early

    def added(n: int, like: Tensor) -> Tensor:
        mask = _positions_mask(positions, n, like.device)
        return mask[:, None].to(like.dtype) * (coefficient * vector.detach().to(like))

    if layer == 0:
        handle = model.position.register_forward_hook(lambda _m, _a, out: out + added(out.shape[0], out))
    else:
        def after_block(_module: nn.Module, _args: object, out: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            attention, mlp = out
            return attention, mlp + added(mlp.shape[-2], mlp)

        handle = model.blocks[layer - 1].register_forward_hook(after_block)
    try:
        yield
    finally:
        handle.remove()


def residual_activations(model: nn.Module, ids: Tensor, layer: int, positions: Sequence[int] | Tensor | None = None,
                         *, prefix: Tensor | None = None) -> Tensor:
    """The residual stream entering `layer` of a `ToyLM` at `positions` (None: all), as rows (vectors, dim)."""
    from .toy_lm import ToyLM

    if not isinstance(model, ToyLM):
        raise TypeError(f"model: expected a ToyLM (attnlab.analysis.toy_lm), got {type(model).__name__}")
    check_int("layer", layer, 0, model.settings.layers, meaning="(0: the embeddings, layers: the final state)")
    with torch.no_grad():
        residual = model.trace(ids, prefix=prefix).residual[layer]
    mask = _positions_mask(positions, residual.shape[1], residual.device)
    return residual[:, mask].reshape(-1, residual.shape[-1])


_ACTS = Param("activations", Tensor, doc="residual vectors (N, dim)")
add(Spec(name="sparse-autoencoder", kind="analysis", paper=P103, factory=train_sae, family="E",
         summary="a ReLU (L1) or TopK sparse autoencoder trained on residual-stream vectors; decoder (latents, dim)",
         params=(_ACTS, Param("latents", int, doc="dictionary size", low=1),
                 Param("activation", str, "relu", "ReLU with an L1 penalty or TopK", choices=ACTIVATIONS),
                 Param("k", int, None, "active latents per vector (TopK)", low=1, optional=True),
                 Param("l1", float, 1e-2, "L1 coefficient λ (ReLU)", low=0.0),
                 Param("steps", int, 2000, "Adam steps", low=1), Param("batch", int, 128, "vectors per step", low=1),
                 Param("lr", float, 3e-3, "learning rate", low=0.0), Param("seed", int, 0, "seed", low=0))))
add(Spec(name="sae-separation-score", kind="analysis", paper=P103, factory=separation_scores, family="E",
         summary="activation frequency of each SAE latent on known minus unknown entities' last tokens (and reverse)",
         params=(Param("known_codes", Tensor, doc="SAE codes (N_known, latents) at known entities' last tokens"),
                 Param("unknown_codes", Tensor, doc="SAE codes (N_unknown, latents) at unknown entities' last tokens"),
                 Param("threshold", float, 0.0, "a code is active above this value"))))
add(Spec(name="residual-steering", kind="analysis", paper=P103, factory=steer_residual, family="E",
         summary="context manager adding α·d (e.g. an SAE latent's decoder row) to a ToyLM's residual stream",
         params=(Param("model", nn.Module, doc="a ToyLM"), Param("layer", int, doc="residual entering this layer", low=0),
                 Param("direction", Tensor, doc="(dim,)"), Param("coefficient", float, doc="α"),
                 Param("positions", (list, tuple, Tensor), None, "positions to steer (None: all)", optional=True))))
