"""Loki (P027): top-k sparse attention ranked by low-rank keys.

Offline, per layer and head, a PCA of the keys K (m, d) gives an orthonormal basis P (d, d), columns in
order of decreasing key variance (eigenvectors of the covariance of the keys, computed in float64). At
inference, for a query q and keys K,

    s̃ = (q P_{:, :r}) (K P_{:, :r})ᵀ / √d          approximate scores in r ≤ d dimensions (d the FULL head dim)
    S = top-k of s̃ over the visible keys          the causal (and padding) mask applied BEFORE the top-k
    o = softmax(q K_Sᵀ / √d + b_S) V_S              exact logits and values at the selected keys only

(the paper's `methods/pca_topk`, P027; cost O(N r + k d) per query instead of O(N d)). Since P is orthonormal,
(q P)(K P)ᵀ = q Kᵀ: with r = d the ranking is exact, and with k ≥ the number of visible keys Loki is dense
attention. The decode form keeps the cache rotated, K P, as the paper does, stored as two contiguous parts,
(K P)_{:, :r} (read in full to rank the keys: N·r numbers) and (K P)_{:, r:} (read at the k selected rows only);
the exact logits are the approximate ones plus the rest, s̃_S + (q P)_{r:} (K P)_{S, r:}ᵀ/√d = q K_Sᵀ/√d.

Deviations and choices: the basis is fitted on mean-centred keys (the PCA) but applied to the raw keys
(centring would change the scores; a rotation does not); an additive score term b of the wrapped module
(ALiBi, KERPLE) is added to both the approximate and the exact logits; positions whose query sees fewer than
k keys keep all they see. Rotary modules (RoPE, whose rotation happens inside the core) are refused by the
wrapper: fit and apply the basis to the rotated keys with the functions instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.core.errors import ShapeError
from attnlab.core.registry import Paper, Spec, add
from attnlab.core.validate import check_floating, check_int, check_rank, check_tensor
from attnlab.mechanisms.dense.softmax import SoftmaxAttention

LOKI = Paper("P027", "Loki: Low-Rank Keys for Efficient Sparse Attention", 2024, "2406.02542")


@dataclass(frozen=True)
class KeyBasis:
    """The PCA of one layer's keys: `components` (heads, d, d), column j the j-th principal direction of a head's
    keys (orthonormal columns), and `variance` (heads, d), the key variance along each, in decreasing order."""

    components: Tensor
    variance: Tensor

    @property
    def head_dim(self) -> int:
        return int(self.components.shape[-1])

    def explained(self) -> Tensor:
        """Cumulative fraction of the key variance captured by the first 1..d directions: (heads, d)."""
        total = self.variance.sum(-1, keepdim=True).clamp_min(torch.finfo(self.variance.dtype).tiny)
        return self.variance.cumsum(-1) / total

    def rank_for(self, fraction: float = 0.9) -> Tensor:
        """The smallest rank r per head whose first r directions hold `fraction` of the key variance: (heads,) long."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction: expected a float in (0, 1], got {fraction!r}")
        below = self.explained() < fraction - 1e-12
        return below.sum(-1) + 1


def fit_key_basis(keys: Tensor, keep: Tensor | None = None) -> KeyBasis:
    """PCA of the keys of one layer, per head: keys (batch, heads, n, d) or (heads, n, d); `keep` (batch, n) bool
    (True = a real token) leaves padded keys out. Returns the basis of eigenvectors of the keys' covariance."""
    check_tensor("keys", keys)
    check_rank("keys", keys, (3, 4), "(batch, heads, n, head_dim) or (heads, n, head_dim)")
    check_floating("keys", keys)
    k4 = keys if keys.dim() == 4 else keys.unsqueeze(0)
    b, h, n, d = k4.shape
    flat = k4.transpose(0, 1).reshape(h, b * n, d).double()
    if keep is not None:
        check_tensor("keep", keep)
        if keep.dtype != torch.bool or keep.shape != (b, n):
            raise ShapeError(f"keep: expected a bool tensor of shape {(b, n)}, got {tuple(keep.shape)} {keep.dtype}")
        flat = flat[:, keep.reshape(-1).to(flat.device)]
    m = flat.shape[1]
    if m < 2:
        raise ValueError(f"keys: expected at least 2 real keys per head to fit a PCA, got {m}")
    centred = flat - flat.mean(1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred / (m - 1)
    variance, vectors = torch.linalg.eigh(covariance)  # ascending
    variance = variance.flip(-1).clamp_min(0.0)
    vectors = vectors.flip(-1)
    return KeyBasis(vectors.to(keys.dtype), variance.to(keys.dtype))


def _check_selection(q: Tensor, k: Tensor, components: Tensor, rank: int, top_k: int) -> None:
    for name, t in (("q", q), ("k", k)):
        check_tensor(name, t)
        check_rank(name, t, 4, "(batch, heads, n, head_dim)")
        check_floating(name, t)
    d = q.shape[-1]
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != d:
        raise ShapeError(f"k: expected (batch, heads, n_k, head_dim) = {(*q.shape[:2], 'n_k', d)}, got {tuple(k.shape)}")
    check_tensor("components", components)
    if components.shape != (q.shape[1], d, d):
        raise ShapeError(f"components: expected shape {(q.shape[1], d, d)} (heads, d, d), got {tuple(components.shape)}")
    check_int("rank", rank, 1, d, meaning="(dimensions of the approximate scores)")
    check_int("top_k", top_k, 1, meaning="(keys kept per query)")


def visible_keys(n_q: int, n_k: int, *, causal: bool, keep: Tensor | None, device: torch.device) -> Tensor:
    """Which keys each query may see: (batch or 1, 1, n_q, n_k) bool; causal queries are bottom-right aligned
    (query i sits at position n_k − n_q + i), `keep` (batch, n_k) drops padded keys."""
    visible = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(n_k - n_q, n_k, device=device)[:, None]
        visible = visible & (torch.arange(n_k, device=device)[None] <= i)
    if keep is not None:
        visible = visible & keep.to(device=device, dtype=torch.bool)[:, None, None, :]
    return visible


def loki_select(
    q: Tensor, k: Tensor, components: Tensor, rank: int, top_k: int, *,
    causal: bool = False, keep: Tensor | None = None, bias: Tensor | None = None, scale: float | None = None,
    keys_rotated: bool = False,
) -> tuple[Tensor, Tensor]:
    """The keys Loki attends to: top-k of s̃ = (q P_r)(K P_r)ᵀ·scale + b over the visible keys, with P = components
    (heads, d, d) and scale = 1/√d of the FULL head dim by default. q (batch, heads, n_q, d), k (batch, heads, n_k, d)
    (already K P when `keys_rotated`). Returns (indices, valid), each (batch, heads, n_q, min(top_k, n_k)); valid is
    False where a query sees fewer keys than top_k."""
    _check_selection(q, k, components, rank, top_k)
    d, n_q, n_k = q.shape[-1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    basis = components[:, :, :rank].to(q.dtype)
    q_low = q @ basis
    k_low = k[..., :rank] if keys_rotated else k @ basis
    approx = (q_low @ k_low.transpose(-1, -2)) * scale
    if bias is not None:
        approx = approx + bias
    visible = visible_keys(n_q, n_k, causal=causal, keep=keep, device=q.device)
    approx = approx.masked_fill(~visible, float("-inf"))
    picked, indices = approx.topk(min(top_k, n_k), dim=-1)
    return indices, picked > float("-inf")


def attend_selected(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, valid: Tensor, *,
    bias: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """softmax(q K_Sᵀ·scale + b_S) V_S over the selected keys S = indices (batch, heads, n_q, s), valid ones only;
    a query with no valid key gets zeros."""
    b, h, n_q, s = indices.shape
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    flat = indices.reshape(b, h, n_q * s)
    k_s = gather_rows(k, flat).view(b, h, n_q, s, d)
    v_s = gather_rows(v, flat).view(b, h, n_q, s, v.shape[-1])
    logits = torch.einsum("bhqd,bhqsd->bhqs", q, k_s) * scale
    if bias is not None:
        logits = logits + bias.expand(b, h, n_q, k.shape[2]).gather(-1, indices)
    logits = logits.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no valid key: all -inf -> NaN -> 0
    return torch.einsum("bhqs,bhqsv->bhqv", weights, v_s)


def loki_attention(
    q: Tensor, k: Tensor, v: Tensor, components: Tensor, rank: int, top_k: int, *,
    causal: bool = False, keep: Tensor | None = None, bias: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """Loki's prefill form: every query attends exactly to its top-k keys by the rank-r scores (module doc).
    q (batch, heads, n_q, d), k (batch, heads, n_k, d), v (batch, heads, n_k, d_v) -> (batch, heads, n_q, d_v)."""
    check_tensor("v", v)
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"v: expected (batch, heads, n_k, d_v) with (batch, heads, n_k) = {tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    indices, valid = loki_select(q, k, components, rank, top_k, causal=causal, keep=keep, bias=bias, scale=scale)
    return attend_selected(q, k, v, indices, valid, bias=bias, scale=scale)


def rotate_keys(k: Tensor, components: Tensor) -> Tensor:
    """K P: the keys (batch, heads, n, d) in the PCA basis (heads, d, d)."""
    return k @ components.to(k.dtype)


def split_rotated_keys(k: Tensor, components: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Loki's decode cache of keys: K P split into the ranking columns (K P)_{:, :r} and the rest (K P)_{:, r:}, each
    contiguous (the ranking pass then reads N·r numbers, not N·d with a stride), together the memory of K."""
    rotated = rotate_keys(k, components)
    check_int("rank", rank, 1, rotated.shape[-1], meaning="(dimensions of the approximate scores)")
    return rotated[..., :rank].contiguous(), rotated[..., rank:].contiguous()


def gather_rows(x: Tensor, indices: Tensor) -> Tensor:
    """x (batch, heads, n, c) at `indices` (batch, heads, m): (batch, heads, m, c), one row copy per index."""
    b, h, n, c = x.shape
    offsets = torch.arange(b * h, device=x.device).view(b, h, 1) * n
    return x.reshape(b * h * n, c).index_select(0, (indices + offsets).reshape(-1)).view(b, h, indices.shape[-1], c)


def loki_decode(
    q: Tensor, keys_low: Tensor, keys_rest: Tensor, v: Tensor, components: Tensor, top_k: int, *,
    bias: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """One query q (batch, heads, 1, d) against Loki's cache: keys_low = (K P)_{:, :r}, keys_rest = (K P)_{:, r:}
    (`split_rotated_keys`), V (batch, heads, N, d_v). With q̂ = q P: s̃ = q̂_{:r} keys_lowᵀ·scale + b, S = top-k of s̃,
    exact logits s̃_S + q̂_{r:} keys_rest_Sᵀ·scale (= q K_Sᵀ·scale + b_S since P is orthonormal), softmax, V_S.
    Returns (batch, heads, 1, d_v)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ShapeError(f"q: expected one query (batch, heads, 1, head_dim), got shape {tuple(q.shape)}")
    d, r = q.shape[-1], keys_low.shape[-1]
    check_tensor("keys_rest", keys_rest)
    if keys_rest.shape != (*keys_low.shape[:3], d - r):
        raise ShapeError(f"keys_rest: expected shape {(*keys_low.shape[:3], d - r)} (the columns r.. of K P), "
                         f"got {tuple(keys_rest.shape)}")
    check_tensor("v", v)
    if v.dim() != 4 or v.shape[:3] != keys_low.shape[:3]:
        raise ShapeError(f"v: expected (batch, heads, N, d_v) with (batch, heads, N) = {tuple(keys_low.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    _check_selection(q[..., :r], keys_low, components[:, :r, :r], r, top_k)
    if components.shape != (q.shape[1], d, d):
        raise ShapeError(f"components: expected shape {(q.shape[1], d, d)} (heads, d, d), got {tuple(components.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_rot = q @ components.to(q.dtype)
    approx = (q_rot[..., :r] @ keys_low.transpose(-1, -2)) * scale
    if bias is not None:
        approx = approx + bias
    picked, indices = approx.topk(min(top_k, keys_low.shape[2]), dim=-1, sorted=False)
    b, h = q.shape[:2]
    flat = indices.view(b, h, -1)
    logits = picked + (q_rot[..., r:] @ gather_rows(keys_rest, flat).transpose(-1, -2)) * scale
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # no finite logit (a -inf bias everywhere) -> zeros
    return weights @ gather_rows(v, flat)


class LokiAttention(nn.Module):
    """A softmax-family attnlab module (softmax, alibi, kerple, …) run with Loki: its projections, score terms and
    output projection, attention restricted to each query's top-k keys ranked in the first `rank` PCA dimensions.

        loki = LokiAttention.fit(module, calibration_tokens, rank=16, top_k=64)
        y = loki(x)                      # prefill (causal if the module is)
        y_t, cache = loki.step(x_t, cache)  # decode against the rotated cache
    """

    def __init__(self, module: SoftmaxAttention, basis: KeyBasis, rank: int, top_k: int) -> None:
        super().__init__()
        if not isinstance(module, SoftmaxAttention):
            raise TypeError(f"module: expected a softmax-family attnlab module (SoftmaxAttention), "
                            f"got {type(module).__name__}")
        cls = type(module)
        if cls.attend_fast is not SoftmaxAttention.attend_fast or cls.attend_reference is not SoftmaxAttention.attend_reference:
            raise TypeError(f"module: expected a SoftmaxAttention whose core is plain softmax with score terms, got "
                            f"{cls.__name__}, which transforms q/k inside its core (rotary: use loki_attention on the "
                            "rotated q, k)")
        if basis.components.shape != (module.heads, module.head_dim, module.head_dim):
            raise ShapeError(f"basis: expected components of shape {(module.heads, module.head_dim, module.head_dim)}, "
                             f"got {tuple(basis.components.shape)}")
        self.module = module
        self.rank = check_int("rank", rank, 1, module.head_dim, meaning="(dimensions of the approximate scores)")
        self.top_k = check_int("top_k", top_k, 1, meaning="(keys kept per query)")
        self.register_buffer("components", basis.components.detach().clone())

    @classmethod
    def fit(cls, module: SoftmaxAttention, tokens: Tensor, rank: int, top_k: int,
            attention_mask: Tensor | None = None) -> LokiAttention:
        """Fit the per-head key basis on the module's keys of `tokens` (batch, n, dim), then wrap the module."""
        with torch.no_grad():
            _, k, _ = module.project(tokens)
        return cls(module, fit_key_basis(k, attention_mask), rank, top_k)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """x (batch, n, dim) -> (batch, n, dim); `attention_mask` (batch, n) bool, True = a real token."""
        m = self.module
        q, k, v = m.project(x)
        bias = m.score_bias(q, k)
        out = loki_attention(q, k, v, self.components, self.rank, self.top_k, causal=m.causal, keep=attention_mask,
                             bias=bias, scale=m.scale)
        return m.out_proj(m.merge_heads(out))

    def step(self, x_t: Tensor, cache: tuple[Tensor, Tensor, Tensor] | None = None
             ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Decode one token x_t (batch, 1, dim); `cache` = ((K P)_{:, :r}, (K P)_{:, r:}, V) so far (None at the start)."""
        m = self.module
        if x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ShapeError(f"x_t: expected one token (batch, 1, dim), got shape {tuple(x_t.shape)}")
        q, k, v = m.project(x_t)
        k_low, k_rest = split_rotated_keys(k, self.components, self.rank)
        if cache is not None:
            k_low, k_rest, v = (torch.cat([old, new], dim=2) for old, new in zip(cache, (k_low, k_rest, v), strict=True))
        bias = m.score_bias(q, k_low)
        out = loki_decode(q, k_low, k_rest, v, self.components, self.top_k, bias=bias, scale=m.scale)
        return m.out_proj(m.merge_heads(out)), (k_low, k_rest, v)


add(Spec(
    name="loki", kind="inference", paper=LOKI, factory=LokiAttention, family="F",
    summary="top-k sparse attention ranked by keys in the first r PCA dimensions; exact softmax on the selected keys",
    cost="O(N r + k d) per query",
))
