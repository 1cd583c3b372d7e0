"""Lambda layers (Bello, LambdaNetworks, 2021): content and position lambdas, multi-query heads.

The context is summarised into linear functions (lambdas) that are applied to each
query. With queries q_n^h ∈ R^k for h = 1..H heads, one shared set of keys and values
K = X W_K ∈ R^{N×k}, V = X W_V ∈ R^{N×v} (v = head_dim, the paper's d/h):

    K̄ = softmax of K over the context positions m (per key channel)
    λᶜ = K̄ᵀ V ∈ R^{k×v}                               (content lambda, shared by all positions)
    λᵖ_n = E_nᵀ V ∈ R^{k×v},  E_{nm} = R[n − m]        (position lambdas, relative embeddings R)
    y_n^h = (λᶜ + λᵖ_n)ᵀ q_n^h,   out = W_o [y^1 … y^H]

R has a local scope of r positions per axis: R[δ] is learned for |δ| ≤ r // 2 on every
axis and E_{nm} = 0 beyond, on a 1-D sequence (R ∈ R^{r×k}) or a 2-D grid (R ∈ R^{r×r×k}).
The fast path is the paper's lambda convolution: all λᵖ_n at once as a convolution of
each value channel with the k relative embeddings (zero padding at the borders),
O(N r^g k v); the reference materialises E (N×N×k) and each λᵖ_n = E_nᵀ V.

The implicit attention matrix exists: y_n^h = Σ_m q_n^h·(K̄_m + E_{nm}) v_m, so
`materialize` returns A^h_nm = q_n^h·(K̄_m + E_{nm}) (batch, heads, N, N) and
y^h = A^h V with V shared by the heads. Its rows do not sum to 1.

Choices, against the paper: the paper applies batch normalisation to the queries and
values; at inference it is a per-channel affine map that the bias-carrying projections
here absorb, and in training it mixes the examples of a batch (and would let padded
tokens into its statistics), so it is left out — put a normalisation around the layer
if training needs it. The paper's layer has no output projection (in a LambdaResNet a
1×1 convolution follows it); W_o here maps heads·v back to dim, as in every attnlab
module. Embeddings are initialised N(0, 1/k).

Key padding: padded context positions are left out of the softmax of K and their values
are zero, so they enter neither lambda; padded positions still get outputs (as padded
queries in attention). Inputs are (batch, n, dim) for `grid=1` and (batch, H, W, dim)
for `grid=2`; masks name positions in row-major order, (batch, H·W) or (batch, H, W).
Not causal, no cross-attention (position lambdas need the query's own grid).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import DTypeError, ParameterError, ShapeError
from ...core.masks import module_keep_mask
from ...core.memory import check_memory
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_attention_mask,
    check_finite,
    check_floating,
    check_module_dtype,
    check_odd,
    check_rank,
    check_tensor,
    check_tokens,
)

LAMBDA = Paper("P015", "LambdaNetworks: Modeling Long-Range Interactions Without Attention", 2021, "2102.08602")
KEY_DIM, SCOPE = 16, 23  # the paper's key depth |k| and local scope r


def lambda_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the whole module (the benchmark times module(x)) at dim = heads·head_dim, the default
    key depth 16 and scope 23 on a 1-D sequence: projections, λᶜ, the lambda convolution and y = λᵀq."""
    dim, k, v, r = heads * head_dim, KEY_DIM, head_dim, SCOPE
    projections = 2.0 * n * dim * (heads * k + k + v) + 2.0 * n * heads * v * dim
    return projections + 3.0 * n * k + 2.0 * n * k * v + 2.0 * n * r * k * v + 4.0 * n * heads * k * v


def _check_scope(scope: object) -> int:
    return check_odd("scope", scope, meaning="(r positions per axis, centred)")


def _check(q: Tensor, k: Tensor, v: Tensor, embeddings: Tensor, attention_mask: Tensor | None) -> tuple[int, ...]:
    """Validate the inputs; return the positions (n,) or (H, W)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("embeddings", embeddings)):
        check_tensor(name, t)
        check_floating(name, t)
    check_rank("q", q, (4, 5), "(batch, heads, *positions, key_dim) with 1 or 2 position axes")
    positions = tuple(q.shape[2:-1])
    layout = "(batch, 1, " + ", ".join(f"n{i}" for i in range(len(positions))) + ", depth)"
    check_rank("k", k, q.dim(), layout)
    check_rank("v", v, q.dim(), layout)
    if not (q.dtype == k.dtype == v.dtype == embeddings.dtype):
        raise DTypeError(
            f"q, k, v, embeddings: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}, "
            f"embeddings {embeddings.dtype}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != q.shape[0] or t.shape[1] != 1 or tuple(t.shape[2:-1]) != positions:
            raise ShapeError(
                f"{name}: expected shape (batch, 1, *positions, depth) with batch {q.shape[0]} and positions "
                f"{positions} (as q; the heads share one key and value), got {tuple(t.shape)}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"k: expected key_dim {q.shape[-1]} (as q), got {k.shape[-1]} in shape {tuple(k.shape)}")
    r = embeddings.shape[0] if embeddings.dim() else 0
    want = (r,) * len(positions) + (q.shape[-1],)
    if tuple(embeddings.shape) != want or r % 2 == 0:
        raise ShapeError(
            f"embeddings: expected shape (r,)*{len(positions)} + (key_dim,) with r odd, e.g. {want}, "
            f"got {tuple(embeddings.shape)}"
        )
    check_attention_mask(attention_mask, q.shape[0], math.prod(positions))
    return positions


def position_lambdas(v: Tensor, embeddings: Tensor) -> Tensor:
    """The lambda convolution: λᵖ (batch, *positions, k, v) from values v (batch, *positions, v).

    λᵖ_n = Σ_δ R[δ] ⊗ v_{n−δ} over |δ| ≤ r // 2 per axis (zero outside the grid): each
    value channel convolved with the k embedding channels, O(N r^g k v).
    """
    rank = v.dim() - 2
    b, positions, depth = v.shape[0], tuple(v.shape[1:-1]), v.shape[-1]
    r = embeddings.shape[0]
    signal = v.movedim(-1, 1).reshape(b * depth, 1, *positions)
    # conv is a cross-correlation: flip R so that output n reads v_{n−δ} with weight R[δ]
    kernel = embeddings.flip(tuple(range(rank))).movedim(-1, 0).unsqueeze(1)
    conv = F.conv1d if rank == 1 else F.conv2d
    lam = conv(signal, kernel, padding=r // 2).reshape(b, depth, -1, *positions)
    return lam.permute(0, *range(3, 3 + rank), 2, 1).contiguous()


def relative_embeddings(embeddings: Tensor, positions: tuple[int, ...]) -> Tensor:
    """E (N, N, k): E_{nm} = R[pos_n − pos_m] inside the scope, else 0; positions in row-major order."""
    r = embeddings.shape[0]
    c = r // 2
    axes = torch.meshgrid(*(torch.arange(p, device=embeddings.device) for p in positions), indexing="ij")
    coords = torch.stack([a.reshape(-1) for a in axes], dim=-1)
    rel = coords[:, None, :] - coords[None, :, :]
    inside = (rel.abs() <= c).all(-1)
    index = (rel.clamp(-c, c) + c).unbind(-1)
    return embeddings[index] * inside[..., None].to(embeddings.dtype)


def _normalised_keys(k: Tensor, attention_mask: Tensor | None) -> Tensor:
    """K̄ (batch, k, N): softmax of the keys over the context positions, padded positions 0."""
    keys = k.reshape(k.shape[0], -1, k.shape[-1]).transpose(1, 2)
    return masked_softmax(keys, None if attention_mask is None else attention_mask[:, None, :])


def _values(v: Tensor, attention_mask: Tensor | None) -> Tensor:
    """V (batch, N, v), zero at padded positions."""
    flat = v.reshape(v.shape[0], -1, v.shape[-1])
    return flat if attention_mask is None else flat * attention_mask[..., None].to(flat.dtype)


def lambda_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    embeddings: Tensor,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Multi-query lambda layer: y_n^h = (K̄ᵀV + λᵖ_n)ᵀ q_n^h, position lambdas by the lambda convolution.

    q (batch, heads, *positions, k); k (batch, 1, *positions, k) and v (batch, 1,
    *positions, v), shared by the heads; embeddings R (r,)*g + (k,) for g = 1 or 2 position
    axes; `attention_mask` (batch, N), True = real, N = prod(positions). Returns
    (batch, heads, *positions, v).
    """
    positions = _check(q, k, v, embeddings, attention_mask)
    b, h, kd = q.shape[0], q.shape[1], q.shape[-1]
    values = _values(v, attention_mask)
    content = _normalised_keys(k, attention_mask) @ values
    lam = position_lambdas(values.reshape(b, *positions, -1), embeddings).reshape(b, -1, kd, values.shape[-1])
    queries = q.reshape(b, h, -1, kd)
    by_position = (queries.transpose(1, 2).contiguous() @ lam).transpose(1, 2)  # a (h×k)(k×v) product per n
    out = queries @ content[:, None] + by_position
    return out.reshape(b, h, *positions, -1)


def lambda_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    embeddings: Tensor,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, A) of `lambda_attention` in float64, with E (N, N, k) materialised and every λᵖ_n = E_nᵀ V formed,
    and A (batch, heads, N, N), A_nm = q_n·(K̄_m + E_nm), zero at padded m."""
    positions = _check(q, k, v, embeddings, attention_mask)
    b, h, kd = q.shape[0], q.shape[1], q.shape[-1]
    queries = q.double().reshape(b, h, -1, kd)
    values = _values(v.double(), attention_mask)
    keys = _normalised_keys(k.double(), attention_mask)
    e = relative_embeddings(embeddings.double(), positions)
    content = torch.einsum("bkm,bmv->bkv", keys, values)
    lam = torch.einsum("nmk,bmv->bnkv", e, values)
    out = torch.einsum("bhnk,bkv->bhnv", queries, content) + torch.einsum("bhnk,bnkv->bhnv", queries, lam)
    position_weights = torch.einsum("bhnk,nmk->bhnm", queries, e)
    if attention_mask is not None:
        position_weights = position_weights * attention_mask[:, None, None, :].to(position_weights.dtype)
    weights = torch.einsum("bhnk,bkm->bhnm", queries, keys) + position_weights
    return out.reshape(b, h, *positions, -1).to(q.dtype), weights.to(q.dtype)


@register(
    name="lambda",
    paper=LAMBDA,
    family="B",
    cost="O(N (r^g + h) k v)",
    exponent=1.0,
    supports=Supports(key_padding=True, grids=(1, 2)),
    params=(
        Param("key_dim", int, KEY_DIM, "query/key depth k (the paper uses 16)", low=1),
        Param("scope", int, SCOPE, "local scope r of the relative position embeddings per axis, odd", low=1),
        Param("grid", int, 1, "rank of the position grid: 1 (batch, n, dim) or 2 (batch, H, W, dim)", choices=(1, 2)),
    ),
    summary="Lambda layer: content lambda K̄ᵀV plus local position lambdas (lambda convolution), multi-query heads.",
    normalized=False,
    test_params={"key_dim": 4, "scope": 5},
    flops=lambda_flops,
)
class LambdaLayer(nn.Module):
    """Multi-query lambda layer over a 1-D sequence or a 2-D grid, with local relative position lambdas.

    `materialize(x)` returns the implicit (batch, heads, N, N) matrix A with y^h = A^h V.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        key_dim: int = KEY_DIM,
        scope: int = SCOPE,
        grid: int = 1,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
            head_dim = dim // heads
        if grid not in (1, 2):
            raise ParameterError(f"grid: expected 1 (sequence) or 2 (H×W grid), got {grid!r}")
        self.dim, self.heads, self.head_dim, self.key_dim = dim, heads, head_dim, key_dim
        self.scope, self.grid = _check_scope(scope), grid
        self.q_proj = nn.Linear(dim, heads * key_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, key_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, head_dim, bias=qkv_bias)
        self.embeddings = nn.Parameter(torch.randn((scope,) * grid + (key_dim,)) / math.sqrt(key_dim))
        self.out_proj = nn.Linear(heads * head_dim, dim)

    def _project(
        self, x: Tensor, context: Tensor | None, attn_mask: Tensor | None, attention_mask: Tensor | None,
        key_padding_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v and the keep-mask (batch, N) of a call; a padding mask may also come on the grid (batch, H, W)."""
        check_tokens("x", x, self.dim, grid_rank=self.grid)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            raise ValueError("context: lambda does not support cross-attention (position lambdas need the query's grid)")
        if attn_mask is not None:
            raise ValueError("attn_mask: lambda does not support an attention mask (only attention_mask)")
        grid = tuple(x.shape[1:-1])
        keep = module_keep_mask(attention_mask, key_padding_mask, x.shape[0], math.prod(grid), grid)
        q = self.q_proj(x).unflatten(-1, (self.heads, self.key_dim)).movedim(-2, 1)
        return q, self.k_proj(x).unsqueeze(1), self.v_proj(x).unsqueeze(1), keep

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Literal["fast", "reference"] = "fast",
    ) -> Tensor:
        """x (batch, n, dim) or (batch, H, W, dim) -> the same shape."""
        q, k, v, kpm = self._project(x, context, attn_mask, attention_mask, key_padding_mask)
        if impl == "fast":
            y = lambda_attention(q, k, v, embeddings=self.embeddings, attention_mask=kpm)
        elif impl == "reference":
            check_memory("impl='reference'", (x.shape[0], self.heads, math.prod(x.shape[1:-1]), math.prod(x.shape[1:-1])), 8)
            y = lambda_attention_reference(q, k, v, embeddings=self.embeddings, attention_mask=kpm)[0]
        else:
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        return self.out_proj(y.movedim(1, -2).flatten(-2))

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """A (batch, heads, N, N), A_nm = q_n·(K̄_m + E_nm), positions flattened row-major: y^h = A^h V."""
        q, k, v, kpm = self._project(x, context, attn_mask, attention_mask, key_padding_mask)
        check_memory("materialize", (x.shape[0], self.heads, math.prod(x.shape[1:-1]), math.prod(x.shape[1:-1])), 8)
        return lambda_attention_reference(q, k, v, embeddings=self.embeddings, attention_mask=kpm)[1]
