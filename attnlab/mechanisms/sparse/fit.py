"""FIT (Chen & Li, "FIT: Far-reaching Interleaved Transformers", 2023): local attention in groups
interleaved with global attention over per-group latent tokens, as one attention layer.

L tokens are split into G = L/n contiguous groups of n tokens; each group has m latent tokens,
started from m learned latents (shared by the groups: the module's `latents` (m, dim), projected
by q_proj into the latent queries u). With q, k, v the module's projected heads and all
softmaxes scaled by 1/√d, one FIT block is

    A_loc  = softmax(q kᵀ) within each group                           local layer       (L × L)
    R      = softmax(u k_gᵀ) over the group's tokens                   read: latents ← tokens   (G·m × L)
    z_q, z_k, z_v = R q, R k, R A_loc v                                the read latents' heads
    A_glob = softmax(z_q z_kᵀ) over all G·m latents                    global layer      (G·m × G·m)
    W      = softmax(q (A_glob z_k)_gᵀ) over the group's m latents     write: tokens ← latents  (L × G·m)

    out = ½ (A_loc v + W A_glob z_v) = ½ (A_loc + W A_glob R A_loc) v

so the output is an exact weighted sum of the values and `materialize` returns the composed
(L, L) matrix M = ½ (A_loc + W A_glob R A_loc) (rows sum to 1 wherever a key is visible). The
paper's order holds for the values: local layer, read from its output, global layer, write
back with a residual (the ½ averages the residual and the write; out_proj absorbs it).

Choices, stated: (1) the paper's layers each have their own projections; inside one layer the
latents' queries and keys after the read are the read weights applied to the tokens' q and k
(R q, R k), and the attended latents' keys A_glob R k — linear maps of the tokens, so the
scores never depend on v and out = M v holds. (2) Latents read from their group's tokens only
(the paper also lets them attend to themselves while reading; that would add a term not
linear in v). (3) n must divide L (no padding). With a key padding mask, padded tokens are
hidden as keys everywhere and a group without real tokens has no valid latents.

Cost O(L·n·d + L·m·d + (L·m/n)²·d): with a fixed group size the global layer is quadratic in
L (exponent 2); the paper grows n ≈ L^{1/3} m^{2/3} for O(L^{4/3}). No L × L tensor is built by
the fast path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.masks import padding_to_mask
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_floating, check_int, check_qkv, check_tensor
from .proxy import attend_many, grouped_sdpa

FIT = Paper("P164", "FIT: Far-reaching Interleaved Transformers", 2023, "2305.12689")


def fit_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the score and value products at the defaults (n = 64, m = 8): local L·n,
    read and write L·m each (values 3·d wide in the read), global (L·m/n)² (values 2·d wide)."""
    group, m = 64, 8
    lat = n * m / group
    return heads * head_dim * (4.0 * n * group + 8.0 * n * m + 6.0 * lat * lat)


def _check(
    q: Tensor, k: Tensor, v: Tensor, latents: Tensor, group_size: int, attention_mask: Tensor | None
) -> None:
    check_qkv(q, k, v, same_length=True)
    check_int("group_size", group_size)
    n = q.shape[2]
    if group_size > n:
        raise ShapeError(f"group_size: {group_size} is larger than the sequence (n={n})")
    if n % group_size:
        raise ShapeError(
            f"group_size: {group_size} does not divide the sequence length n={n} ({n} % {group_size} = "
            f"{n % group_size}); expected n a multiple of group_size (pad the input)"
        )
    check_tensor("latents", latents)
    check_floating("latents", latents)
    heads, d = q.shape[1], q.shape[-1]
    if latents.dim() not in (3, 4) or latents.shape[-3] != heads or latents.shape[-1] != d or (
        latents.dim() == 4 and latents.shape[0] not in (1, q.shape[0])
    ):
        raise ShapeError(
            f"latents: expected the latent queries (heads, m, head_dim) = ({heads}, m, {d}) or (batch, heads, m, "
            f"head_dim), got shape {tuple(latents.shape)}"
        )
    if latents.shape[-2] < 1:
        raise ShapeError(f"latents: expected at least one latent per group, got shape {tuple(latents.shape)}")
    if latents.dtype != q.dtype or latents.device != q.device:
        raise ShapeError(f"latents: expected dtype {q.dtype} on {q.device} (as q), got {latents.dtype} on {latents.device}")
    check_attention_mask(attention_mask, q.shape[0], n)


def fit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    latents: Tensor,
    *,
    group_size: int,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """One FIT block on (batch, heads, L, head_dim) inputs: out = ½ (A_loc + W A_glob R A_loc) v.

    `latents`: the latent queries u, (heads, m, head_dim) or (batch, heads, m, head_dim), shared
    by the groups; group_size n divides L. attention_mask bool (batch, L), True = real token.
    A query that sees no real key gives 0.
    """
    _check(q, k, v, latents, group_size, attention_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, h, length, d = q.shape
    g, m, n = length // group_size, latents.shape[-2], group_size
    qg, kg, vg = (t.reshape(b, h, g, n, t.shape[-1]) for t in (q, k, v))
    real = None if attention_mask is None else attention_mask.reshape(b, g, n)
    token_mask = None if real is None else real[:, None, :, None, :]  # (b, 1, G, 1, n)
    local = grouped_sdpa(qg, kg, vg, token_mask, scale)
    u = (latents if latents.dim() == 4 else latents[None])[:, :, None].expand(b, h, g, m, d)
    read = attend_many(u, kg, (kg, qg, local), token_mask, scale)  # R k, R q, R A_loc v per group
    z_k, z_q, z_v = (t.reshape(b, h, g * m, t.shape[-1]) for t in read)
    valid = None if real is None else real.any(-1).repeat_interleave(m, dim=1)  # (b, G·m): latents of non-empty groups
    k_att, v_att = attend_many(z_q, z_k, (z_k, z_v), None if valid is None else valid[:, None, None, :], scale)
    latent_mask = None if valid is None else valid.reshape(b, 1, g, 1, m)
    write = grouped_sdpa(qg, k_att.view(b, h, g, m, d), v_att.view(b, h, g, m, -1), latent_mask, scale)
    return (0.5 * (local + write)).reshape(b, h, length, v.shape[-1])


def fit_matrices(
    q: Tensor,
    k: Tensor,
    latents: Tensor,
    *,
    group_size: int,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> dict[str, Tensor]:
    """The stages of a FIT block as dense float64 matrices: "local" A_loc (batch, heads, L, L), "read"
    R (batch, heads, G·m, L), "global" A_glob (batch, heads, G·m, G·m), "write" W (batch, heads, L,
    G·m) and "composed" ½ (A_loc + W A_glob R A_loc)."""
    _check(q, k, q, latents, group_size, attention_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, h, length, _ = q.shape
    g, m = length // group_size, latents.shape[-2]
    q64, k64 = q.double(), k.double()
    u = latents.double() if latents.dim() == 4 else latents.double()[None]
    u = u.repeat(1, 1, g, 1)  # (·, heads, G·m, d): latent j of group j // m
    token_group = torch.arange(length, device=q.device) // group_size
    latent_group = torch.arange(g * m, device=q.device) // m
    real = torch.ones(1, length, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask
    valid = (latent_group[None, :, None] == token_group[None, None, :]) & real[:, None, :]  # (b|1, G·m, L)
    valid = valid.any(-1)  # latents of groups with a real token
    pad = padding_to_mask(real)
    local = masked_softmax(q64 @ k64.transpose(-1, -2) * scale, (token_group[:, None] == token_group[None, :]) & pad)
    read = masked_softmax(u @ k64.transpose(-1, -2) * scale, (latent_group[:, None] == token_group[None, :]) & pad)
    z_q, z_k = read @ q64, read @ k64
    glob = masked_softmax(z_q @ z_k.transpose(-1, -2) * scale, padding_to_mask(valid))
    write = masked_softmax(
        q64 @ (glob @ z_k).transpose(-1, -2) * scale,
        (token_group[:, None] == latent_group[None, :]) & padding_to_mask(valid),
    )
    composed = 0.5 * (local + write @ glob @ read @ local)
    return {"local": local, "read": read, "global": glob, "write": write, "composed": composed}


def fit_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    latents: Tensor,
    *,
    group_size: int,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `fit_attention` in float64: weights the composed (batch, heads, L, L) matrix
    ½ (A_loc + W A_glob R A_loc), out = weights v."""
    _check(q, k, v, latents, group_size, attention_mask)
    weights = fit_matrices(q, k, latents, group_size=group_size, attention_mask=attention_mask, scale=scale)["composed"]
    return (weights @ v.double()).to(q.dtype), weights.to(q.dtype)


# -- the module --------------------------------------------------------------------------------
@register(
    name="fit",
    paper=FIT,
    family="A",
    cost="O(L·n·d + (L·m/n)²·d)",
    exponent=2.0,
    supports=Supports(key_padding=True, materialize=True),
    params=(
        Param("group_size", int, 64, "tokens per group n (divides the sequence length)", low=1),
        Param("latents", int, 8, "latent tokens per group m (learned, shared by the groups)", low=1),
    ),
    summary="FIT: attention in groups of n tokens, m latents per group read their group, attend globally and "
            "write back; composed matrix ½(A_loc + W A_glob R A_loc).",
    test_params={"group_size": 3, "latents": 2},
    flops=fit_flops,
)
class FITAttention(Attention):
    """Multi-head FIT block as one attention layer, on sequences (batch, L, dim).

    The m initial latents are a learned (m, dim) parameter projected by q_proj into the latent
    queries; `materialize` returns the composed (batch, heads, L, L) matrix ½ (A_loc + W A_glob R A_loc).
    """

    mask_form = "padding"  # the key padding keep-mask (batch, n_k): no N × N mask is built

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        group_size: int = 64,
        latents: int = 8,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        check_int("group_size", group_size)
        check_int("latents", latents)
        self.group_size, self.n_latents = group_size, latents
        self.latents = nn.Parameter(torch.empty(latents, dim))
        nn.init.trunc_normal_(self.latents, std=0.02)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def latent_queries(self, like: Tensor) -> Tensor:
        """The latent queries u (heads, m, head_dim): q_proj of the learned latents, in the dtype of `like`."""
        return self.q_proj(self.latents).view(self.n_latents, self.heads, self.head_dim).transpose(0, 1).to(like.dtype)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return fit_attention(
            q, k, v, self.latent_queries(q), group_size=self.group_size, attention_mask=mask,
            scale=self.scale,
        )

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return fit_attention_reference(
            q, k, v, self.latent_queries(q), group_size=self.group_size, attention_mask=mask,
            scale=self.scale,
        )

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, latents={self.n_latents}"
