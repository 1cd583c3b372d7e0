"""Inter- and intra-model similarity (P025): neuron, representation and attention level.

Representations are compared over the same samples (tokens): x (samples, d_x) and y (samples, d_y),
or hidden states (batch, n, d) whose real tokens `attention_mask` (batch, n) selects. x̃ is x with
the mean over the samples taken off; ρ is Pearson's correlation over the samples.

* neuronsim(x, y) = (1/d_x) Σ_k max_k' |ρ(x_k, y_k')|: does each neuron of x have a twin in y?
* mixedsim(x, y) = (1/d_x) Σ_k ‖P_y x̃_k‖ / ‖x̃_k‖, P_y the projection on the span of ỹ's columns: the
  multiple correlation R_k of neuron k of x regressed linearly (with intercept) on all of y, as the
  official code's `pred_power` (R_k² is the share of the variance explained). Fits every neuron
  exactly when samples ≤ d_y + 1: meaningful with more samples than neurons.
* linear_cka(x, y) = ‖ỹᵀx̃‖²_F / (‖x̃ᵀx̃‖_F ‖ỹᵀỹ‖_F) (Kornblith et al. 2019): invariant to orthogonal
  maps and isotropic scaling of either side, not to other linear maps.
* svcca(x, y, variance): neurons z-scored, each side cut to its top principal directions that
  explain `variance` of its variance (the smallest such number; the official code keeps the ones
  strictly below the mark, one fewer), then CCA: the canonical correlations ρ_i are the singular
  values of U_xᵀU_y (U: orthonormal bases of the kept directions in sample space); svcca = mean ρ_i.
  Invariant to invertible linear maps of either side when nothing is cut (variance = 1).
* pwcca(x, y, variance) = Σ_i α_i ρ_i / Σ_i α_i (Morcos et al. 2018), α_i = Σ_j |⟨h_i, x̃_j⟩|: h_i the
  i-th canonical variate of x in sample space, x̃_j the neurons of x. Asymmetric: the weights come
  from x.

Attention maps a (batch, H_a, n_q, n_k) and b (batch, H_b, n_q, n_k) of the same inputs (two layers
or two models), queries bottom-right aligned with keys; W = the number of real query rows over the
batch; a row holds the weights of the real keys:

* head_similarity(a, b, "js")[h, h'] = 1 − (1/W) Σ_rows JS(a_h[i], b_h'[i]), JS(p, q) = ½KL(p‖m) +
  ½KL(q‖m), m = (p + q)/2, natural log (0 ≤ JS ≤ ln 2). Rows must be distributions.
* head_similarity(a, b, "pearson")[h, h'] = (1/W) Σ_rows ρ(a_h[i], b_h'[i]) over the real keys; a row
  of constant weights correlates 0 (as the official code's second Pearson variant).
* attnsim(a, b) = (1/H_a) Σ_h max_h' head_similarity(a, b, "js")[h, h']: each head of a matched to its
  most similar head of b (the official `jsmaxcorr`); attncorr likewise with "pearson"
  (`pearsonmaxcorr`). Both asymmetric, 1 for identical maps, and blind to the order of the heads.

Attention-level representations (the official code's attention CKA/CCA): each visible (query,
key) pair of real tokens is a sample and each head a neuron, `attention_representations`;
`layer_similarity` uses them when given maps with a representation measure.

`layer_similarity(layers, measure)` gives the matrix over layers (and `other=` for two models).
A quantity with nothing to compare (a constant representation, no real row) is 0, never NaN.
Computed in float64 on the inputs' device.

    from attnlab.analysis.similarity import layer_similarity, attnsim
    out = model(**batch, output_hidden_states=True)
    cka = layer_similarity(out.hidden_states, "cka", attention_mask=batch["attention_mask"])  # (7, 7)
    with capture(model) as att:
        model(**batch)
    js = layer_similarity(att, "attnsim")              # (6, 6): matched-head JS similarity
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add
from .capture import Attentions

P025 = Paper("P025", "Speech Representation Analysis based on Inter- and Intra-Model Similarities", 2024, "2406.16099")

REPRESENTATION_MEASURES: tuple[str, ...] = ("neuronsim", "mixedsim", "cka", "svcca", "pwcca")
ATTENTION_MEASURES: tuple[str, ...] = ("attnsim", "attncorr")
Maps = Attentions | Sequence[Tensor]


# -- representations ----------------------------------------------------------------------------
def _samples(x: Tensor, name: str, attention_mask: Tensor | None) -> Tensor:
    """(samples, d) float64: x as given, or the real tokens of hidden states (batch, n, d)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor (samples, d) or (batch, n, d), got {type(x).__name__}")
    if x.dim() == 2:
        if attention_mask is not None:
            raise ValueError(f"attention_mask: expected None for {name} of shape (samples, d), got a mask")
        return x.detach().to(torch.float64)
    if x.dim() != 3:
        raise ValueError(f"{name}: expected a tensor (samples, d) or (batch, n, d), got shape {tuple(x.shape)}")
    if attention_mask is None:
        return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if attention_mask.shape != x.shape[:2]:
        raise ValueError(f"attention_mask: expected a bool mask of shape {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}")
    return x.detach()[attention_mask.to(device=x.device, dtype=torch.bool)].to(torch.float64)


def _pair(x: Tensor, y: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """x and y as centred samples on x's device; the same number of samples."""
    xs, ys = _samples(x, "x", attention_mask), _samples(y, "y", attention_mask).to(x.device)
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"y: expected the {xs.shape[0]} samples of x, got {ys.shape[0]}")
    return xs - xs.mean(0), ys - ys.mean(0)


def _unit_columns(x: Tensor) -> Tensor:
    """Columns scaled to unit norm; zero columns stay zero."""
    norm = x.norm(dim=0)
    return x / torch.where(norm > 0, norm, 1.0)


def _basis(x: Tensor) -> tuple[Tensor, Tensor]:
    """(orthonormal basis (samples, rank) of the span of x's columns, its singular values (rank,))."""
    if x.shape[1] == 0:
        return x, x.new_zeros(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    keep = s > s.max() * max(x.shape) * torch.finfo(x.dtype).eps
    return u[:, keep], s[keep]


def neuronsim(x: Tensor, y: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """(1/d_x) Σ_k max_k' |ρ(x_k, y_k')|: the mean over x's neurons of the best |correlation| with a neuron of y."""
    xc, yc = _pair(x, y, attention_mask)
    corr = (_unit_columns(xc).T @ _unit_columns(yc)).abs()
    return corr.max(1).values.mean()


def mixedsim(x: Tensor, y: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """(1/d_x) Σ_k ‖P_y x̃_k‖/‖x̃_k‖: the mean multiple correlation of x's neurons regressed on all of y."""
    xc, yc = _pair(x, y, attention_mask)
    norm = xc.norm(dim=0)
    explained = (_basis(yc)[0].T @ xc).norm(dim=0)
    return torch.where(norm > 0, explained / torch.where(norm > 0, norm, 1.0), 0.0).mean()


def linear_cka(x: Tensor, y: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """‖ỹᵀx̃‖²_F / (‖x̃ᵀx̃‖_F ‖ỹᵀỹ‖_F); 0 when either side is constant over the samples."""
    xc, yc = _pair(x, y, attention_mask)
    return _cka_centred(xc, yc)


def _cka_centred(xc: Tensor, yc: Tensor) -> Tensor:
    if xc.shape[0] <= max(xc.shape[1], yc.shape[1]):  # the (samples × samples) Grams are the smaller products
        k, g = xc @ xc.T, yc @ yc.T
        cross, kk, gg = (k * g).sum(), k.norm(), g.norm()
    else:
        cross, kk, gg = (yc.T @ xc).norm() ** 2, (xc.T @ xc).norm(), (yc.T @ yc).norm()
    denom = kk * gg
    return torch.where(denom > 0, cross / torch.where(denom > 0, denom, 1.0), 0.0)


def _check_variance(variance: float) -> float:
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance <= 1:
        raise ValueError(f"variance: expected a share of the variance in (0, 1], got {variance!r}")
    return float(variance)


def _kept_directions(xc: Tensor, variance: float) -> Tensor:
    """Orthonormal (samples, k) basis of the top principal directions of the z-scored neurons explaining `variance`."""
    norm = xc.norm(dim=0)
    u, s = _basis(xc[:, norm > 0] / norm[norm > 0])
    if s.numel() == 0:
        return u
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    mark = torch.tensor(variance - 1e-12, dtype=share.dtype, device=share.device)  # variance = 1 despite rounding
    return u[:, : int(torch.searchsorted(share, mark)) + 1]


def _cca(x: Tensor, y: Tensor, variance: float, attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(canonical correlations ρ (m,), canonical variates of x (samples, m), centred x)."""
    xc, yc = _pair(x, y, attention_mask)
    ux, uy = _kept_directions(xc, variance), _kept_directions(yc, variance)
    u, rho, _ = torch.linalg.svd(ux.T @ uy, full_matrices=False)
    return rho.clamp(0.0, 1.0), ux @ u, xc


def svcca(x: Tensor, y: Tensor, *, variance: float = 0.99, attention_mask: Tensor | None = None) -> Tensor:
    """Mean canonical correlation of the principal directions of x and y that explain `variance` (module docstring)."""
    rho, _, _ = _cca(x, y, _check_variance(variance), attention_mask)
    return rho.mean() if rho.numel() else rho.new_zeros(())


def pwcca(x: Tensor, y: Tensor, *, variance: float = 0.99, attention_mask: Tensor | None = None) -> Tensor:
    """Σ α_i ρ_i / Σ α_i, α_i = Σ_j |⟨h_i, x̃_j⟩| with h_i the canonical variates of x (weights from x)."""
    rho, variates, xc = _cca(x, y, _check_variance(variance), attention_mask)
    alpha = (variates.T @ xc).abs().sum(1)
    total = alpha.sum()
    return torch.where(total > 0, (alpha * rho).sum() / torch.where(total > 0, total, 1.0), 0.0)


# -- attention maps ----------------------------------------------------------------------------
def _map(a: Tensor, name: str) -> Tensor:
    if not isinstance(a, Tensor) or a.dim() != 4:
        raise ValueError(f"{name}: expected attention maps (batch, heads, n_q, n_k), got {getattr(a, 'shape', type(a).__name__)}")
    return a.detach().to(torch.float64)


def _map_masks(a: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """bool query mask (batch, n_q) and key mask (batch, n_k) of a map; queries bottom-right aligned."""
    batch, _, n_q, n_k = a.shape
    if attention_mask is None:
        keys = torch.ones(batch, n_k, dtype=torch.bool, device=a.device)
    elif attention_mask.shape != (batch, n_k):
        raise ValueError(f"attention_mask: expected a bool mask of shape ({batch}, {n_k}), got {tuple(attention_mask.shape)}")
    else:
        keys = attention_mask.to(device=a.device, dtype=torch.bool)
    return keys[:, n_k - n_q:], keys


def _check_distributions(a: Tensor, name: str, rows: Tensor) -> None:
    """ValueError unless every entry is >= 0 and every real query row sums to 1 (or 0: no weight at all)."""
    tol = max(1e-4, 10 * torch.finfo(a.dtype).eps)
    sums = a.sum(-1)[rows[:, None, :].expand(-1, a.shape[1], -1)]
    negative = a.numel() > 0 and a.min().item() < -tol
    if negative or bool((((sums - 1).abs() > tol) & (sums.abs() > tol)).any()):
        low, high = (sums.min().item(), sums.max().item()) if sums.numel() else (0.0, 0.0)
        raise ValueError(f"{name}: expected attention probabilities (non-negative rows summing to 1 over the keys) for "
                         f"the JS similarity, got entries in [{a.min().item():.3g}, {a.max().item():.3g}] and row sums in "
                         f"[{low:.3g}, {high:.3g}]; attncorr (measure 'pearson') takes any weights")


def _xlogy_ratio(p: Tensor, m: Tensor) -> Tensor:
    """p·log(p/m) with 0·log 0 = 0."""
    return torch.where(p > 0, p * (torch.log(torch.where(p > 0, p, 1.0)) - torch.log(torch.where(p > 0, m, 1.0))), 0.0)


def head_similarity(a: Tensor, b: Tensor, measure: str = "js", *, attention_mask: Tensor | None = None) -> Tensor:
    """(H_a, H_b): per pair of heads, 1 − mean JS divergence ("js") or mean Pearson correlation ("pearson") of the
    rows of the real queries, over the real keys (module docstring)."""
    if measure not in ("js", "pearson"):
        raise ValueError(f"measure: expected 'js' or 'pearson', got {measure!r}")
    a, b = _map(a, "a"), _map(b, "b").to(a.device)
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"b: expected maps of the same inputs as a, (batch, heads, n_q, n_k) = "
                         f"({a.shape[0]}, *, {a.shape[2]}, {a.shape[3]}), got {tuple(b.shape)}")
    rows, keys = _map_masks(a, attention_mask)
    keep = keys[:, None, None, :].to(a.dtype)
    a, b = a * keep, b * keep  # padded keys carry no weight
    count = rows.sum()
    if measure == "js":
        _check_distributions(a, "a", rows)
        _check_distributions(b, "b", rows)
    else:
        n_real = keys.sum(-1).clamp(min=1).to(a.dtype)[:, None, None, None]

        def standard(t: Tensor) -> Tensor:  # centred over the real keys, unit norm; constant rows -> 0
            centred = (t - t.sum(-1, keepdim=True) / n_real) * keep
            norm = centred.norm(dim=-1, keepdim=True)
            return centred / torch.where(norm > 0, norm, 1.0)

        a, b = standard(a), standard(b)
    weight = rows[:, None, :].to(a.dtype)  # (batch, 1, n_q)
    out = a.new_zeros(a.shape[1], b.shape[1])
    for h in range(a.shape[1]):
        p = a[:, h : h + 1]  # (batch, 1, n_q, n_k) against every head of b
        if measure == "js":
            m = (p + b) / 2
            per_row = 0.5 * (_xlogy_ratio(p, m) + _xlogy_ratio(b, m)).sum(-1)
        else:
            per_row = (p * b).sum(-1)
        out[h] = (per_row * weight).sum((0, 2))
    mean = out / count.clamp(min=1).to(out.dtype)
    if measure == "js":
        return torch.where(count > 0, 1 - mean, torch.zeros_like(mean))
    return mean


def attnsim(a: Tensor, b: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """(1/H_a) Σ_h max_h' (1 − mean JS(a_h, b_h')): each head of a against its best match in b."""
    return head_similarity(a, b, "js", attention_mask=attention_mask).max(1).values.mean()


def attncorr(a: Tensor, b: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """(1/H_a) Σ_h max_h' mean ρ(a_h[i], b_h'[i]): Pearson correlation of the rows, best-matched heads."""
    return head_similarity(a, b, "pearson", attention_mask=attention_mask).max(1).values.mean()


def _layers(layers: Maps | Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(layers, Attentions):
        return layers.layers
    if isinstance(layers, Tensor) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"{name}: expected a capture or a non-empty list of tensors, one per layer, got {type(layers).__name__}")
    if not all(isinstance(t, Tensor) for t in layers):
        raise TypeError(f"{name}: expected tensors, got {[type(t).__name__ for t in layers]}")
    return list(layers)


def _mask_of(layers: Maps | Sequence[Tensor], attention_mask: Tensor | None) -> Tensor | None:
    """The mask given, else a capture's real tokens."""
    if attention_mask is None and isinstance(layers, Attentions):
        return layers.attention_mask
    return attention_mask


def attention_representations(layers: Maps, *, attention_mask: Tensor | None = None) -> list[Tensor]:
    """Per layer (pairs, heads): each visible (query, key) pair of real tokens a sample, each head a neuron; a pair
    is visible when some head of some layer gives it weight (the official code's attention representation)."""
    maps = [_map(a, f"layers[{i}]") for i, a in enumerate(_layers(layers, "layers"))]
    if any(a.shape[0] != maps[0].shape[0] or a.shape[2:] != maps[0].shape[2:] for a in maps):
        raise ValueError(f"layers: expected maps of one shape (batch, *, n_q, n_k), got {[tuple(a.shape) for a in maps]}")
    rows, keys = _map_masks(maps[0], _mask_of(layers, attention_mask))
    visible = rows[:, :, None] & keys[:, None, :]
    visible = visible & torch.stack([a.abs().amax(1) > 0 for a in maps]).any(0)
    return [a.permute(0, 2, 3, 1)[visible] for a in maps]


def layer_similarity(layers: Maps | Sequence[Tensor], measure: str = "cka", *, other: Maps | Sequence[Tensor] | None = None,
                     attention_mask: Tensor | None = None, variance: float = 0.99) -> Tensor:
    """(L, L') with entry [l, m] = measure(layers[l], other[m]) (other = layers by default: intra-model).

    measure: a representation measure (REPRESENTATION_MEASURES) over hidden states ((samples, d) or (batch, n, d)
    with `attention_mask`) or, given maps ((batch, heads, n_q, n_k) or a capture), over their attention
    representations (the pairs visible in either model); or an attention measure (ATTENTION_MEASURES) over maps.
    The mask defaults to the real tokens of a capture `layers`."""
    if measure not in REPRESENTATION_MEASURES + ATTENTION_MEASURES:
        raise ValueError(f"measure: expected one of {', '.join(REPRESENTATION_MEASURES + ATTENTION_MEASURES)}, got {measure!r}")
    _check_variance(variance)
    first = _layers(layers, "layers")
    second = first if other is None else _layers(other, "other")
    maps = first[0].dim() == 4
    if any((t.dim() == 4) != maps for t in first + second):
        raise ValueError("layers, other: expected attention maps (batch, heads, n_q, n_k) only, or representations only, "
                         f"got shapes {[tuple(t.shape) for t in first + second]}")
    mask = _mask_of(layers, attention_mask)
    symmetric = other is None and measure in ("cka", "svcca")
    fn: Callable[..., Tensor]
    if measure in ATTENTION_MEASURES:
        if not maps:
            raise ValueError(f"measure: {measure!r} compares attention maps (batch, heads, n_q, n_k), got representations")
        fn = attnsim if measure == "attnsim" else attncorr
        return _matrix(first, second, lambda a, b: fn(a, b, attention_mask=mask), symmetric)
    if maps:
        reps = attention_representations(first if other is None else first + second, attention_mask=mask)
        first, second, mask = reps[: len(first)], reps[-len(second):], None
    if measure == "cka":
        return _cka_matrix(first, second, mask, other is None)
    fn = {"neuronsim": neuronsim, "mixedsim": mixedsim, "svcca": svcca, "pwcca": pwcca}[measure]
    extra = {"variance": variance} if measure in ("svcca", "pwcca") else {}
    return _matrix(first, second, lambda x, y: fn(x, y, attention_mask=mask, **extra), symmetric)


def _cka_matrix(left: list[Tensor], right: list[Tensor], mask: Tensor | None, same: bool) -> Tensor:
    """linear CKA of every pair; through the normalised centred Grams K/‖K‖ of each layer, computed once, when there
    are no more samples than neurons (⟨K, L⟩ = ‖ỹᵀx̃‖²_F), else pair by pair. same: right is left."""
    def centred(reps: list[Tensor], name: str) -> list[Tensor]:
        out = [_samples(t, f"{name}[{i}]", mask).to(left[0].device) for i, t in enumerate(reps)]
        return [t - t.mean(0) for t in out]

    xs = centred(left, "layers")
    ys = xs if same else centred(right, "other")
    if any(t.shape[0] != xs[0].shape[0] for t in xs + ys):
        raise ValueError(f"layers, other: expected the same samples in every layer, got {[t.shape[0] for t in xs + ys]}")
    if xs[0].shape[0] > min(t.shape[1] for t in xs + ys):
        return _matrix(xs, ys, _cka_centred, same)

    def grams(reps: list[Tensor]) -> Tensor:
        flat = torch.stack([(t @ t.T).flatten() for t in reps])
        norm = flat.norm(dim=1, keepdim=True)
        return flat / torch.where(norm > 0, norm, 1.0)

    gx = grams(xs)
    return gx @ (gx if same else grams(ys)).T


def _matrix(left: list[Tensor], right: list[Tensor], fn: Callable[[Tensor, Tensor], Tensor], symmetric: bool) -> Tensor:
    out = torch.zeros(len(left), len(right), dtype=torch.float64, device=left[0].device)
    for i, x in enumerate(left):
        for j, y in enumerate(right):
            out[i, j] = out[j, i] if symmetric and j < i else fn(x, y).to(out.device)
    return out


_X = Param("x", Tensor, doc="representations (samples, d) or hidden states (batch, n, d)")
_Y = Param("y", Tensor, doc="representations of the same samples (samples, d') or (batch, n, d')")
_REP_MASK = Param("attention_mask", Tensor, None, "bool (batch, n) real tokens of hidden states", optional=True)
_VARIANCE = Param("variance", float, 0.99, "share of the variance the kept principal directions explain", low=0.0, high=1.0)
_A = Param("a", Tensor, doc="attention maps (batch, heads, n_q, n_k)")
_B = Param("b", Tensor, doc="attention maps of the same inputs (batch, heads', n_q, n_k)")
_MAP_MASK = Param("attention_mask", Tensor, None, "bool (batch, n_k), True = real token", optional=True)

for _name, _fn, _summary, _params in (
    ("neuronsim", neuronsim, "mean over neurons of the best |Pearson correlation| with a neuron of the other model",
     (_X, _Y, _REP_MASK)),
    ("mixedsim", mixedsim, "mean multiple correlation of each neuron regressed linearly on the other representation",
     (_X, _Y, _REP_MASK)),
    ("linear-cka", linear_cka, "linear centred kernel alignment of two representations", (_X, _Y, _REP_MASK)),
    ("svcca", svcca, "mean canonical correlation of the principal directions explaining 99% of the variance",
     (_X, _Y, _VARIANCE, _REP_MASK)),
    ("pwcca", pwcca, "projection-weighted mean canonical correlation (weights from the first representation)",
     (_X, _Y, _VARIANCE, _REP_MASK)),
    ("attnsim", attnsim, "1 − mean Jensen–Shannon divergence of each head's rows and its best-matched head's",
     (_A, _B, _MAP_MASK)),
    ("attncorr", attncorr, "mean Pearson correlation of each head's rows and its best-matched head's", (_A, _B, _MAP_MASK)),
    ("layer-similarity", layer_similarity, "a similarity measure between every pair of layers (hidden states, "
     "attention representations or maps), within one model or between two", (
         Param("layers", (Attentions, list, tuple), doc="a capture, or one tensor per layer"),
         Param("measure", str, "cka", "the measure", choices=REPRESENTATION_MEASURES + ATTENTION_MEASURES),
         Param("other", (Attentions, list, tuple), None, "the other model's layers (default: layers)", optional=True),
         Param("attention_mask", Tensor, None, "bool (batch, n), True = real token", optional=True), _VARIANCE)),
):
    add(Spec(name=_name, kind="analysis", paper=P025, factory=_fn, family="E", summary=_summary, params=_params))
