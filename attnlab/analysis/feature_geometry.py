"""Geometry of sparse-autoencoder features (P179, "The Geometry of Concepts"): three metrics.

Atoms — crystal quality. Difference vectors of feature pairs that stand in one relation (man → woman,
king → queen; country → capital) should be equal, making parallelograms. Each difference is labelled
with its relation; the quality is the silhouette score of the relations' clusters of differences,

    s_i = (b_i − a_i) / max(a_i, b_i),  a_i = mean distance to its own cluster, b_i = smallest mean
    distance to another cluster (s_i = 0 in a cluster of one); quality = mean_i s_i ∈ [−1, 1],

after projecting out distractor directions (e.g. word length) with linear discriminant analysis:
the directions v solving S_b v = λ S_w v (S_b between-relation, S_w within-relation scatter; the top
min(C − 1, d) of them, scaled so that vᵀS_w v = 1), as the official code (sklearn's LDA, then
sklearn's silhouette). Perfect parallelograms score 1, with or without the projection. S_w is
regularised by `shrinkage`·tr(S_w + S_b)/d·I, so that it may be singular (a perfect crystal has
S_w = 0). The projection is fitted on the differences it scores, as in the paper.

Brain — spatial modularity. Features that fire together (in the same context window) should lie
together. Two clusterings of the features are compared by their adjusted mutual information (0 for
unrelated clusterings, whatever their sizes; 1 for equal ones):

* functional: spectral clustering of the co-occurrence affinity φ + 1 ∈ [0, 2], φ_ij the phi
  coefficient of the occurrences of features i and j over the context windows,
  (n11·n00 − n10·n01) / √(n1·n0·n·1·n·0) (0 when a feature never or always occurs);
* geometric: spectral clustering of the angular similarity 1 − arccos(cos θ_ij)/π of the decoder
  directions (official code; sklearn's SpectralClustering on the precomputed affinity, k-means labels).

Galaxy — the eigenvalue spectrum of the point cloud of decoder vectors (or any points) per layer:
λ_1 ≥ λ_2 ≥ ... of the covariance (n − 1 normalisation), fitted as a power law λ_r ∝ r^slope by least
squares of log10 λ_r on log10 r over the ranks start + 1 .. stop (official: 11 .. 150); the paper finds
the slope steepest (most negative) in the middle layers. Left out: the paper's k-NN clustering entropy.

    quality = crystal_quality(differences, relation_ids)          # 1 for perfect parallelograms
    mod = spatial_modularity(decoder, occurrences, n_clusters=4)  # mod.ami
    slopes = power_law_slopes([sae.decoder for sae in saes])     # one per layer

Computed in float64 on the inputs' device (the clusterings with sklearn, on the CPU).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.registry import Paper, Param, Spec, add

P179 = Paper("P179", "The Geometry of Concepts: Sparse Autoencoder Feature Structure", 2024, "2410.19750")


def _points(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{name}: expected points (samples, d), got {getattr(x, 'shape', type(x).__name__)}")
    return x.detach().to(torch.float64)


def _labels(labels: Tensor, n: int, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: expected one integer label per sample ({n},), got {getattr(labels, 'shape', type(labels).__name__)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name}: expected integer labels, got {labels.dtype}")
    return labels


def lda_directions(x: Tensor, labels: Tensor, components: int | None = None, *, shrinkage: float = 1e-6) -> Tensor:
    """(d, k) discriminant directions: the top k solutions of S_b v = λ (S_w + ε I) v, vᵀ(S_w + ε I)v = 1,
    ε = shrinkage·tr(S_w + S_b)/d; k = components (default and at most min(classes − 1, d))."""
    x = _points(x, "x")
    labels = _labels(labels, x.shape[0]).to(x.device)
    classes = labels.unique()
    most = min(len(classes) - 1, x.shape[1])
    if most < 1:
        raise ValueError(f"labels: expected at least 2 classes, got {len(classes)}")
    if components is None:
        components = most
    if isinstance(components, bool) or not isinstance(components, int) or not 1 <= components <= most:
        raise ValueError(f"components: expected an int in [1, {most}] (classes − 1, d), got {components!r}")
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not shrinkage > 0:
        raise ValueError(f"shrinkage: expected a positive float, got {shrinkage!r}")
    mean = x.mean(0)
    d = x.shape[1]
    within = torch.zeros(d, d, dtype=x.dtype, device=x.device)
    between = torch.zeros_like(within)
    for c in classes:
        members = x[labels == c]
        centred = members - members.mean(0)
        within += centred.T @ centred
        shift = (members.mean(0) - mean)[:, None]
        between += members.shape[0] * shift @ shift.T
    scale = (within.trace() + between.trace()) / d
    eps = shrinkage * (scale if scale > 0 else 1.0)
    chol = torch.linalg.cholesky(within + eps * torch.eye(d, dtype=x.dtype, device=x.device))
    inv = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=x.dtype, device=x.device), upper=False)  # L⁻¹
    values, vectors = torch.linalg.eigh(inv @ between @ inv.T)
    order = values.argsort(descending=True)[:components]
    return inv.T @ vectors[:, order]


def silhouette(points: Tensor, labels: Tensor) -> Tensor:
    """Mean silhouette s_i = (b_i − a_i)/max(a_i, b_i) over the points (Euclidean; 0 for a cluster of one point)."""
    x = _points(points, "points")
    labels = _labels(labels, x.shape[0]).to(x.device)
    classes, index = labels.unique(return_inverse=True)
    if not 2 <= len(classes) <= x.shape[0] - 1:
        raise ValueError(f"labels: expected 2 to samples − 1 = {x.shape[0] - 1} clusters, got {len(classes)}")
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # exact 0 for equal points
    member = torch.nn.functional.one_hot(index, len(classes)).to(x.dtype)  # (n, C)
    sizes = member.sum(0)
    sums = dist @ member  # (n, C): total distance of each point to each cluster
    own = sizes[index]
    a = sums.gather(1, index[:, None])[:, 0] / (own - 1).clamp(min=1)
    others = (sums / sizes).masked_fill(member.bool(), math.inf)
    b = others.min(1).values
    top = torch.maximum(a, b)
    s = torch.where(top > 0, (b - a) / torch.where(top > 0, top, 1.0), 0.0)
    return torch.where(own > 1, s, 0.0).mean()


def crystal_quality(differences: Tensor, labels: Tensor, *, project: bool = True, components: int | None = None,
                    shrinkage: float = 1e-6) -> Tensor:
    """Silhouette of the relations' clusters of difference vectors, after the LDA projection (project=False: raw)."""
    x = _points(differences, "differences")
    if project:
        x = (x - x.mean(0)) @ lda_directions(x, labels, components, shrinkage=shrinkage)
    return silhouette(x, labels)


def cooccurrence_affinity(occurrences: Tensor) -> Tensor:
    """(features, features) φ + 1: the phi coefficient of each pair's occurrences over the context windows, plus 1."""
    if not isinstance(occurrences, Tensor) or occurrences.dim() != 2:
        raise ValueError(f"occurrences: expected a bool matrix (contexts, features), got {getattr(occurrences, 'shape', type(occurrences).__name__)}")
    if occurrences.is_floating_point() and not bool(((occurrences == 0) | (occurrences == 1)).all()):
        raise ValueError("occurrences: expected 0/1 or bool entries (feature active in the context or not)")
    o = occurrences.to(torch.float64)
    total = float(o.shape[0])
    n1 = o.sum(0)
    n11 = o.T @ o
    n10 = n1[:, None] - n11
    n01 = n10.T
    n00 = total - n1[:, None] - n1[None, :] + n11
    denom = (n1[:, None] * (total - n1[:, None]) * n1[None, :] * (total - n1[None, :])).sqrt()
    phi = torch.where(denom > 0, (n11 * n00 - n10 * n01) / torch.where(denom > 0, denom, 1.0), 0.0)
    return phi + 1


def angular_affinity(decoder: Tensor) -> Tensor:
    """(features, features) 1 − arccos(cos θ_ij)/π of the decoder directions (rows), in [0, 1]."""
    w = _points(decoder, "decoder")
    norm = w.norm(dim=1, keepdim=True)
    if not bool((norm > 0).all()):
        raise ValueError("decoder: expected non-zero feature directions (rows), got a zero row")
    unit = w / norm
    return 1 - torch.arccos((unit @ unit.T).clamp(-1.0, 1.0)) / math.pi


def spectral_clusters(affinity: Tensor, n_clusters: int, *, seed: int = 0) -> Tensor:
    """Cluster labels (features,) from sklearn's spectral clustering of a precomputed affinity, k-means labels."""
    from sklearn.cluster import SpectralClustering

    if not isinstance(affinity, Tensor) or affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity: expected a square matrix (features, features), got {getattr(affinity, 'shape', affinity)}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or not 2 <= n_clusters <= affinity.shape[0]:
        raise ValueError(f"n_clusters: expected an int in [2, {affinity.shape[0]}] (features), got {n_clusters!r}")
    model = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", assign_labels="kmeans", random_state=seed)
    return torch.as_tensor(model.fit_predict(affinity.detach().cpu().double().numpy()), dtype=torch.int64)


def adjusted_mutual_information(first: Tensor, second: Tensor) -> float:
    """sklearn's adjusted mutual information of two labellings of the same items (arithmetic normalisation)."""
    from sklearn.metrics import adjusted_mutual_info_score

    for name, labels in (("first", first), ("second", second)):
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"{name}: expected integer labels (items,), got {getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
    if first.shape != second.shape:
        raise ValueError(f"second: expected one label per item of first {tuple(first.shape)}, got {tuple(second.shape)}")
    return float(adjusted_mutual_info_score(first.cpu().numpy(), second.cpu().numpy()))


@dataclass(frozen=True)
class Modularity:
    """Spatial modularity: the AMI of the functional (co-occurrence) and geometric clusterings, and both labellings."""

    ami: float
    functional: Tensor  # (features,) cluster of each feature by co-occurrence
    geometric: Tensor  # (features,) cluster of each feature by the angles of its decoder direction


def spatial_modularity(decoder: Tensor, occurrences: Tensor, n_clusters: int, *, seed: int = 0) -> Modularity:
    """P179: AMI between the spectral clusterings of co-occurrence (φ + 1) and of decoder angles, n_clusters each."""
    w = _points(decoder, "decoder")
    if not isinstance(occurrences, Tensor) or occurrences.dim() != 2 or occurrences.shape[1] != w.shape[0]:
        raise ValueError(f"occurrences: expected (contexts, {w.shape[0]}) with one column per feature of the decoder, "
                         f"got {getattr(occurrences, 'shape', type(occurrences).__name__)}")
    functional = spectral_clusters(cooccurrence_affinity(occurrences), n_clusters, seed=seed)
    geometric = spectral_clusters(angular_affinity(w), n_clusters, seed=seed)
    return Modularity(adjusted_mutual_information(functional, geometric), functional, geometric)


@dataclass(frozen=True)
class PowerLaw:
    """λ_r ≈ 10^intercept · r^slope over the fitted ranks; `eigenvalues` all of them, descending."""

    slope: float
    intercept: float
    eigenvalues: Tensor


def _check_range(start: int, stop: int) -> None:
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int (0-based rank index), got {value!r}")
    if stop - start < 2:
        raise ValueError(f"stop: expected at least 2 ranks after start={start}, got stop={stop}")


def eigenvalue_power_law(points: Tensor, *, start: int = 10, stop: int = 150) -> PowerLaw:
    """Covariance eigenvalues of the points (samples, d) and the least-squares slope of log10 λ_r on log10 r over
    the 0-based ranks [start, stop) (clipped to the positive eigenvalues)."""
    _check_range(start, stop)
    x = _points(points, "points")
    if x.shape[0] < 2:
        raise ValueError(f"points: expected at least 2 samples, got {x.shape[0]}")
    centred = x - x.mean(0)
    values = torch.linalg.eigvalsh(centred.T @ centred / (x.shape[0] - 1)).flip(0)
    positive = int((values > values[0] * max(x.shape) * torch.finfo(x.dtype).eps).sum()) if values[0] > 0 else 0
    end = min(stop, positive)
    if end - start < 2:
        raise ValueError(f"points: expected at least 2 positive eigenvalues in ranks [{start}, {stop}), got "
                         f"{max(end - start, 0)} ({positive} positive of {values.numel()}); lower start or give more points")
    log_rank = torch.log10(torch.arange(start + 1, end + 1, dtype=x.dtype, device=x.device))
    log_value = torch.log10(values[start:end])
    design = torch.stack([log_rank, torch.ones_like(log_rank)], 1)
    slope, intercept = torch.linalg.lstsq(design, log_value[:, None]).solution[:, 0].tolist()
    return PowerLaw(slope, intercept, values)


def power_law_slopes(layers: Sequence[Tensor], *, start: int = 10, stop: int = 150) -> Tensor:
    """(layers,) the eigenvalue power-law slope of each layer's point cloud (e.g. the SAE decoder of each layer)."""
    if isinstance(layers, Tensor) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers: expected a non-empty list of point clouds (samples, d), got {type(layers).__name__}")
    return torch.tensor([eigenvalue_power_law(p, start=start, stop=stop).slope for p in layers], dtype=torch.float64)


add(Spec(name="crystal-quality", kind="analysis", paper=P179, factory=crystal_quality, family="E",
         summary="silhouette of relation clusters of feature difference vectors after LDA (parallelogram quality)",
         params=(Param("differences", Tensor, doc="difference vectors (pairs, d)"),
                 Param("labels", Tensor, doc="relation of each difference (pairs,) int"),
                 Param("project", bool, True, "project out distractor directions with LDA first"),
                 Param("components", int, None, "LDA directions kept (default classes − 1)", optional=True, low=1),
                 Param("shrinkage", float, 1e-6, "ridge on the within-class scatter, relative", low=0.0))))
add(Spec(name="spatial-modularity", kind="analysis", paper=P179, factory=spatial_modularity, family="E",
         summary="adjusted mutual information of co-occurrence clusters and decoder-geometry clusters of SAE features",
         params=(Param("decoder", Tensor, doc="decoder directions (features, d)"),
                 Param("occurrences", Tensor, doc="bool (contexts, features): feature active in the context window"),
                 Param("n_clusters", int, doc="clusters of each clustering", low=2),
                 Param("seed", int, 0, "random state of the spectral clusterings"))))
add(Spec(name="eigenvalue-power-law", kind="analysis", paper=P179, factory=power_law_slopes, family="E",
         summary="power-law slope of the covariance eigenvalue spectrum of each layer's point cloud",
         params=(Param("layers", (list, tuple), doc="point clouds (samples, d), one per layer"),
                 Param("start", int, 10, "first fitted rank (0-based)", low=0),
                 Param("stop", int, 150, "end of the fitted ranks (exclusive)", low=2))))
