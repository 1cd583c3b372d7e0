"""Prototypical memory attention, PMA (Barraco, Sarto, Cornia, Baraldi & Cucchiara, PMA-Net, ICCV 2023).

Softmax attention whose keys and values are extended by prototypes of the keys and values the layer
produced on past inputs (other training samples). Per head, with the current Q, K, V:

    out = softmax(Q [K; K_m + s]ᵀ / √d + M) [V; V_m]

where M is the usual mask on the current keys (padding, attn_mask, causality) and the m memory
columns are never masked (the memory comes from other sequences, so it is no one's future).

The memory. A bank B_K, B_V of past keys and values (per head, `bank_size` pairs, a ring: the
newest replace the oldest — the paper's bank over a window of past training iterations) is
compressed into `prototypes` prototype keys and values:

    K_m = the centroids of k-means on B_K (k-means++ start seeded by `kmeans_seed`, Lloyd steps until
          the assignment is stable or `kmeans_iterations`): each prototype is the mean of the keys
          nearest to it, and each key is nearest to its own prototype (a fixed point);
    V_m[p] = mean of the values of the `value_neighbors` keys of B_K nearest to K_m[p] (k-NN).

s is a learnt segment embedding (heads, head_dim), zero at start, telling memory keys from the
current ones. The paper learns one embedding for each kind; a vector s_in added to every current key
shifts every logit of a row by q·s_in, which softmax ignores, so the pair acts as s = s_m − s_in on
the memory keys alone — the one kept here.

The memory is module state, outside autograd: buffers (in the state_dict, fixed shapes whatever the
fill) written only by explicit methods under torch.no_grad — `remember(x)` (project the tokens and
push their keys and values, padding dropped, into the bank), `store(k, v)` (push given ones),
`compress()` (k-means and k-NN into the prototypes), `update_memory(x)` (both), `clear_memory()`. A
forward never changes it; `forward` reads it. The memory is one per module, shared by every element
of a batch (the paper's memory of the whole training set), so batch independence holds given the
memory. The empty memory (the start, or after `clear_memory`) attends like softmax attention; the
generic conformance suite runs there. When is the bank refreshed (the paper: every few iterations,
a strided window) is the caller's choice.

`materialize` gives (batch, heads, n_q, n_k + m): the columns of the current keys, then those of the
m prototypes (m = 0 when the memory is empty). Defaults (bank 4096, 256 prototypes, 8 neighbours)
are ours: the paper tunes the bank window and the prototype count per dataset.

Sources and choices. No code was released (shared/PAPER_NOTES.md); the attention over [K; K_m] with
[V; V_m], the k-means prototype keys, the k-NN prototype values and the segment embeddings follow the
paper's description. Its choices left open here: the k-NN mean is unweighted and its k is
`value_neighbors`; k-means restarts from k-means++ at each `compress` (seeded, so a compress is
reproducible), and an empty cluster keeps its previous centroid (sklearn relocates it instead).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.masks import combine_masks, to_additive
from ...core.module import Attention
from ...core.registry import Paper, Param
from ...core.validate import check_int, check_qkv, check_scale, check_tensor
from ...kernels.sdpa import sdpa
from .softmax import dense_flops, register_dense

PMA = Paper("P191", "With a Little Help from your own Past: Prototypical Memory Networks for Image Captioning", 2023,
            "2308.12383")


# -- the memory: k-means and k-NN values -------------------------------------------------------------
def kmeans_plus_plus(points: Tensor, count: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ start: (..., N, d) points -> (..., count, d) centres, each drawn with probability ∝ D², the
    squared distance to the nearest centre drawn so far (the first uniformly). `generator`: a CPU generator."""
    check_tensor("points", points)
    n, d = points.shape[-2:]
    check_int("count", count, low=1, high=n, meaning=f"centres among {n} points")
    flat = points.reshape(-1, n, d)
    rows = torch.arange(flat.shape[0], device=points.device)
    first = torch.randint(n, (flat.shape[0],), generator=generator).to(points.device)
    centres = [flat[rows, first]]
    nearest = (flat - centres[0][:, None]).pow(2).sum(-1)
    for _ in range(1, count):
        weight = nearest.detach().double().cpu()
        total = weight.sum(-1, keepdim=True)
        weight = torch.where(total > 0, weight, torch.ones_like(weight))  # all points on the centres: uniform
        pick = torch.multinomial(weight, 1, generator=generator)[:, 0].to(points.device)
        centres.append(flat[rows, pick])
        nearest = torch.minimum(nearest, (flat - centres[-1][:, None]).pow(2).sum(-1))
    return torch.stack(centres, 1).reshape(*points.shape[:-2], count, d)


def _nearest(points: Tensor, centres: Tensor) -> Tensor:
    """Index of the nearest centre (squared Euclidean) of every point: (..., N)."""
    sq = points.pow(2).sum(-1)[..., :, None] - 2 * points @ centres.transpose(-2, -1) + centres.pow(2).sum(-1)[..., None, :]
    return sq.argmin(-1)


def kmeans(points: Tensor, init: Tensor, *, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from `init`: points (..., N, d), init (..., P, d) -> (centroids (..., P, d), assignment (..., N)).

    Steps assign every point to its nearest centroid, then move each centroid to the mean of its points (an empty
    cluster keeps its centroid), until the assignment no longer changes (a fixed point: each centroid is the mean of
    its points, each point nearest to its centroid) or `iterations` steps.
    """
    check_tensor("points", points)
    check_tensor("init", init)
    if init.shape[:-2] != points.shape[:-2] or init.shape[-1] != points.shape[-1]:
        raise ShapeError(f"init: expected (..., P, d) with leading dims and d as points {tuple(points.shape)}, "
                         f"got {tuple(init.shape)}")
    check_int("iterations", iterations, low=1)
    centroids = init
    assignment = _nearest(points, centroids)
    for _ in range(iterations):
        members = nn.functional.one_hot(assignment, centroids.shape[-2]).to(points.dtype)  # (..., N, P)
        count = members.sum(-2)[..., None]
        mean = members.transpose(-2, -1) @ points / count.clamp_min(1)
        centroids = torch.where(count > 0, mean, centroids)
        moved = _nearest(points, centroids)
        if torch.equal(moved, assignment):
            break
        assignment = moved
    return centroids, assignment


def knn_values(keys: Tensor, values: Tensor, queries: Tensor, neighbors: int) -> Tensor:
    """The mean of the values of the `neighbors` keys nearest to each query: keys (..., N, d), values (..., N, d_v),
    queries (..., P, d) -> (..., P, d_v)."""
    check_int("neighbors", neighbors, low=1, high=keys.shape[-2], meaning=f"among {keys.shape[-2]} keys")
    sq = (queries.pow(2).sum(-1)[..., :, None] - 2 * queries @ keys.transpose(-2, -1)
          + keys.pow(2).sum(-1)[..., None, :])
    idx = sq.topk(neighbors, dim=-1, largest=False).indices  # (..., P, neighbors)
    picked = torch.gather(values[..., None, :, :].expand(*idx.shape[:-1], *values.shape[-2:]), -2,
                          idx[..., None].expand(*idx.shape, values.shape[-1]))
    return picked.mean(-2)


# -- the attention -----------------------------------------------------------------------------------
def _check_memory(q: Tensor, v: Tensor, memory_keys: Tensor | None, memory_values: Tensor | None) -> int:
    """The number m of memory slots, after checking keys (heads, m, head_dim) and values (heads, m, d_v)."""
    if (memory_keys is None) != (memory_values is None):
        raise ValueError("memory_keys, memory_values: expected both or neither, got "
                         f"{'keys' if memory_values is None else 'values'} only")
    if memory_keys is None or memory_values is None:
        return 0
    heads, d, d_v = q.shape[1], q.shape[-1], v.shape[-1]
    for name, t, width in (("memory_keys", memory_keys, d), ("memory_values", memory_values, d_v)):
        check_tensor(name, t)
        if t.dim() != 3 or t.shape[0] != heads or t.shape[-1] != width:
            raise ShapeError(f"{name}: expected (heads, m, {width}) with heads={heads}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (as q), got {t.dtype}")
    if memory_keys.shape[1] != memory_values.shape[1]:
        raise ShapeError(f"memory_values: expected {memory_keys.shape[1]} slots (as memory_keys), "
                         f"got {memory_values.shape[1]}")
    return memory_keys.shape[1]


def _with_memory(mask: Tensor | None, n_k: int, m: int) -> Tensor | None:
    """The mask of the current keys extended by m memory columns that every query sees."""
    if mask is None or m == 0:
        return mask
    mask = mask.expand(*mask.shape[:-1], n_k)
    extra = mask.new_ones(*mask.shape[:-1], m) if mask.dtype == torch.bool else mask.new_zeros(*mask.shape[:-1], m)
    return torch.cat([mask, extra], dim=-1)


def _fast(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, memory_keys: Tensor | None,
          memory_values: Tensor | None, scale: float) -> Tensor:
    """SDPA over [K; K_m] and [V; V_m], the memory columns unmasked."""
    if memory_keys is None or memory_values is None or memory_keys.shape[1] == 0:
        return sdpa(q, k, v, mask, None, scale)
    batch = q.shape[0]
    keys = torch.cat([k, memory_keys[None].expand(batch, -1, -1, -1)], dim=2)
    values = torch.cat([v, memory_values[None].expand(batch, -1, -1, -1)], dim=2)
    return sdpa(q, keys, values, _with_memory(mask, k.shape[2], memory_keys.shape[1]), None, scale)


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, memory_keys: Tensor | None,
               memory_values: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """float64 logits against the current keys and against the memory, one softmax over both by exp and sum."""
    q64 = q.double()
    logits = torch.einsum("bhid,bhjd->bhij", q64, k.double()) * scale
    if mask is not None:
        logits = logits + to_additive(mask, torch.float64)
    values = v.double()
    if memory_keys is not None and memory_values is not None and memory_keys.shape[1] > 0:
        memory_logits = torch.einsum("bhid,hmd->bhim", q64, memory_keys.double()) * scale
        logits = torch.cat([logits, memory_logits], dim=-1)
        values = torch.cat([values, memory_values.double()[None].expand(q.shape[0], -1, -1, -1)], dim=2)
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = (logits - top).exp()
    total = e.sum(-1, keepdim=True)
    weights = e / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.einsum("bhij,bhjd->bhid", weights, values)
    return out.to(q.dtype), weights.to(q.dtype)


def _combined(q: Tensor, k: Tensor, causal: bool, attention_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    return combine_masks(batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device)


def prototype_memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    memory_keys: Tensor | None = None,
    memory_values: Tensor | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q [k; K_m]ᵀ·scale + mask) [v; V_m] over (batch, heads, n, head_dim), the memory (heads, m, ·) shared by
    the batch and unmasked (causality, padding and attn_mask restrict the current keys only); no memory: softmax."""
    check_qkv(q, k, v)
    _check_memory(q, v, memory_keys, memory_values)
    mask = _combined(q, k, causal, attention_mask, attn_mask)
    return _fast(q, k, v, mask, memory_keys, memory_values, check_scale(scale, q.shape[-1]))


def prototype_memory_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    memory_keys: Tensor | None = None,
    memory_values: Tensor | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights (batch, heads, n_q, n_k + m)) of `prototype_memory_attention` in float64."""
    check_qkv(q, k, v)
    _check_memory(q, v, memory_keys, memory_values)
    mask = _combined(q, k, causal, attention_mask, attn_mask)
    return _reference(q, k, v, mask, memory_keys, memory_values, check_scale(scale, q.shape[-1]))


@register_dense(
    name="prototype-memory",
    paper=PMA,
    family="A",
    params=(
        Param("bank_size", int, 4096, "past (key, value) pairs per head the memory bank keeps (newest replace oldest)",
              low=1),
        Param("prototypes", int, 256, "prototype keys/values per head: the k-means clusters of the bank", low=1),
        Param("value_neighbors", int, 8, "bank keys nearest to a prototype key whose values it averages (k-NN)", low=1),
        Param("kmeans_iterations", int, 100, "most Lloyd steps of a compress (it stops at a fixed point)", low=1),
        Param("kmeans_seed", int, 0, "seed of the k-means++ start of every compress", low=0),
    ),
    summary="Softmax attention over the current keys and k-means prototypes of past keys/values (PMA-Net's memory).",
    test_params={"bank_size": 24, "prototypes": 4, "value_neighbors": 2},
    flops=dense_flops,
)
class PrototypeMemoryAttention(Attention):
    """Softmax attention over [K; K_m + s] with values [V; V_m]: K_m, V_m prototypes (k-means, k-NN) of a bank of past
    keys and values held in buffers and changed only by `remember`/`store`, `compress`, `update_memory`, `clear_memory`."""

    bank_keys: Tensor  # (heads, bank_size, head_dim) past keys, the first bank_count slots filled
    bank_values: Tensor  # (heads, bank_size, head_dim) their values
    bank_count: Tensor  # () long: filled slots of the bank
    bank_cursor: Tensor  # () long: the slot written next
    prototype_keys: Tensor  # (heads, prototypes, head_dim) K_m, the k-means centroids
    prototype_values: Tensor  # (heads, prototypes, head_dim) V_m, the k-NN value means
    prototype_count: Tensor  # () long: 0 (empty memory) or prototypes

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        bank_size: int = 4096,
        prototypes: int = 256,
        value_neighbors: int = 8,
        kmeans_iterations: int = 100,
        kmeans_seed: int = 0,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.bank_size = check_int("bank_size", bank_size, low=1)
        self.prototypes = check_int("prototypes", prototypes, low=1, high=bank_size, meaning="at most bank_size")
        self.value_neighbors = check_int("value_neighbors", value_neighbors, low=1, high=bank_size,
                                         meaning="at most bank_size")
        self.kmeans_iterations = check_int("kmeans_iterations", kmeans_iterations, low=1)
        self.kmeans_seed = check_int("kmeans_seed", kmeans_seed, low=0)
        d = self.head_dim
        self.register_buffer("bank_keys", torch.zeros(heads, bank_size, d))
        self.register_buffer("bank_values", torch.zeros(heads, bank_size, d))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_cursor", torch.zeros((), dtype=torch.long))
        self.register_buffer("prototype_keys", torch.zeros(heads, prototypes, d))
        self.register_buffer("prototype_values", torch.zeros(heads, prototypes, d))
        self.register_buffer("prototype_count", torch.zeros((), dtype=torch.long))
        self.memory_segment = nn.Parameter(torch.zeros(heads, d))  # s: added to the prototype keys

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    # -- the memory (outside autograd) ------------------------------------------------------------------
    def memory(self) -> tuple[Tensor, Tensor] | None:
        """The memory the attention reads, (K_m + s, V_m) of (heads, m, head_dim), or None when empty."""
        m = int(self.prototype_count)
        if m == 0:
            return None
        return self.prototype_keys[:, :m] + self.memory_segment[:, None, :], self.prototype_values[:, :m]

    @torch.no_grad()
    def store(self, k: Tensor, v: Tensor) -> None:
        """Push keys and values (heads, N, head_dim) into the bank, the newest over the oldest (detached)."""
        shape = (self.heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t)
            if t.dim() != 3 or (t.shape[0], t.shape[2]) != shape:
                raise ShapeError(f"{name}: expected (heads, N, head_dim) = ({shape[0]}, N, {shape[1]}), got {tuple(t.shape)}")
        if k.shape[1] != v.shape[1]:
            raise ShapeError(f"v: expected {k.shape[1]} pairs (as k), got {v.shape[1]}")
        k, v = k[:, -self.bank_size :], v[:, -self.bank_size :]
        n = k.shape[1]
        slots = (int(self.bank_cursor) + torch.arange(n, device=self.bank_keys.device)) % self.bank_size
        self.bank_keys[:, slots] = k.detach().to(self.bank_keys)
        self.bank_values[:, slots] = v.detach().to(self.bank_values)
        self.bank_count.fill_(min(int(self.bank_count) + n, self.bank_size))
        self.bank_cursor.fill_((int(self.bank_cursor) + n) % self.bank_size)

    @torch.no_grad()
    def remember(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> None:
        """Push the keys and values of the tokens (of context if given; padding dropped) into the bank."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        src = x if context is None else context
        k, v = self.split_heads(self.k_proj(src)), self.split_heads(self.v_proj(src))  # (batch, heads, n, d)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (heads, batch, n, d)
        if keep is None:
            self.store(k.flatten(1, 2), v.flatten(1, 2))
        else:
            self.store(k[:, keep], v[:, keep])

    @torch.no_grad()
    def compress(self) -> None:
        """Prototypes from the bank: K_m = k-means centroids of the bank's keys (k-means++ seeded by kmeans_seed),
        V_m = the mean value of the value_neighbors bank keys nearest to each centroid."""
        count = int(self.bank_count)
        if count < max(self.prototypes, self.value_neighbors):
            raise ValueError(f"compress: expected a bank of at least prototypes={self.prototypes} and "
                             f"value_neighbors={self.value_neighbors} pairs, got {count} (call remember first)")
        keys, values = self.bank_keys[:, :count], self.bank_values[:, :count]
        generator = torch.Generator().manual_seed(self.kmeans_seed)
        init = kmeans_plus_plus(keys, self.prototypes, generator=generator)
        centroids, _ = kmeans(keys, init, iterations=self.kmeans_iterations)
        self.prototype_keys.copy_(centroids)
        self.prototype_values.copy_(knn_values(keys, values, centroids, self.value_neighbors))
        self.prototype_count.fill_(self.prototypes)

    @torch.no_grad()
    def update_memory(
        self, x: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> None:
        """`remember(x)` then `compress()`."""
        self.remember(x, context=context, attention_mask=attention_mask, key_padding_mask=key_padding_mask)
        self.compress()

    @torch.no_grad()
    def clear_memory(self) -> None:
        """Empty the bank and the prototypes: the module attends like softmax attention again."""
        for buffer in (self.bank_keys, self.bank_values, self.bank_count, self.bank_cursor, self.prototype_keys,
                       self.prototype_values, self.prototype_count):
            buffer.zero_()

    # -- the two paths -----------------------------------------------------------------------------------
    def _memory_as(self, q: Tensor) -> tuple[Tensor | None, Tensor | None]:
        memory = self.memory()
        if memory is None:
            return None, None
        return memory[0].to(q), memory[1].to(q)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return _fast(q, k, v, mask, *self._memory_as(q), self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return _reference(q, k, v, mask, *self._memory_as(q), self.scale)

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """As `Attention.attention_path`, the values extended by the memory's V_m when `weights` has its columns."""
        x, context = self.batch_major(x, context)
        with torch.no_grad():
            v = self.project(x.reshape(x.shape[0], -1, x.shape[-1]), context)[2]
            memory_values = self._memory_as(v)[1]
            if memory_values is not None and weights.shape[-1] == v.shape[2] + memory_values.shape[1]:
                v = torch.cat([v, memory_values[None].expand(v.shape[0], -1, -1, -1)], dim=2)
        out = nn.functional.linear(self.merge_heads(weights @ v.to(weights.dtype)), self.out_proj.weight.to(weights.dtype))
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, bank_size={self.bank_size} (filled {int(self.bank_count)}), "
                f"prototypes={self.prototypes} (in use {int(self.prototype_count)}), value_neighbors={self.value_neighbors}")

