"""Proxy-token attention (Qihoo-T2X / PT-DiT, Wang et al., 2024) on 1-D and 2-D grids of tokens.

The grid is cut into non-overlapping windows of w tokens (w = w_h·w_w in 2-D); each window
gives one proxy token. With q, k, v the module's projected heads, S (N/w × N) the proxy
selection (row p: the weights of window p's tokens — one-hot for `proxy="first"` / `"random"`,
uniform for `"mean"`), the paper's two global stages and its window attention are

    A_proxy = softmax(S q · (S k)ᵀ · scale)                  proxies attend to each other (P' = SelfAttn(P))
    K'      = A_proxy S k,   V' = A_proxy S v                 keys and values of the attended proxies P'
    A_cross = softmax(q · K'ᵀ · scale)                        every token reads P' (CrossAttn(X, P'))
    A_win   = softmax(q kᵀ · scale) within each window        window attention (detail)

    out = ½ (A_cross A_proxy S + A_win) v

so the output is an exact weighted sum of the values, and `materialize` returns the composed
(N, N) matrix M = ½ (A_cross A_proxy S + A_win) (rows sum to 1 wherever a key is visible).

Choices, stated: (1) the paper's GIIM projects P' again for the cross-attention (K = P' W_k,
V = P' W_v); P' is a linear map of the proxies, so in one layer's head space this is the proxy
attention applied to the proxies' keys and values, K' = A_proxy S k and V' = A_proxy S v — the
cross-attention keys stay independent of v and out = M v holds. (2) The paper adds the global
branch and the window branch as two residual sublayers one after the other; here they are
two parallel branches of one layer, averaged (the factor ½ keeps M row-stochastic; out_proj
absorbs it). (3) The paper samples a random token per window while training; `proxy` makes
the choice explicit: "random" draws from `seed` (a fixed generator: the same choice on every
call, as in evaluation) or, with seed None, from torch's global generator (a new choice per
call, as in training — the module does this in train mode unless resample=False); "first" takes the window's first
token; "mean" averages the window. With a key padding mask a proxy is drawn from (or
averages) the window's real tokens only, and a window without real tokens has no proxy.
`shift=True` runs the window branch on the partition shifted by ⌊w/2⌋ per axis (Swin's shifted
windows: partial windows at the borders instead of a cyclic roll; the paper alternates plain
and shifted window attention between blocks). w must divide each axis (no padding).

The window is `tile_size` w (was `window`): one int for every axis or one per axis. The paper's
"window" is a cell of a fixed partition of the grid, as Swin's and Twins' "window size"; attnlab
names such a cell a tile (twins-lsa, bilateral) and keeps "window" words for bands that move with
the query (sliding-window's `radius`, based's `window_size`, Longformer's and Mistral's count of
keys a query sees). Passing `window=` raises an error naming `tile_size`.

Padding is not removal, true to the paper: P200 splits "the token grid into spatial(-temporal)
windows of size w" and samples "1 random token per window as proxy" (shared/PAPERS.md), so the
windows, and the random proxy drawn in each, are fixed by grid position, and tokens padded before
the real ones move both (attnlab.testing.PADDING_MOVES lists it).

Cost O(N·(N/w)·d + N·w·d): the cross-attention is N × N/w, the proxy attention (N/w)², the
window attention N·w; no N × N tensor is built by the fast path.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ParameterError, ShapeError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register, renamed_keywords
from ...core.validate import check_choice, check_int, check_ints
from ...kernels.grid import check_grid_qkv, grid_padding
from ..local.base import GridAttention

PTDIT = Paper("P200", "Qihoo-T2X: An Efficient Proxy-Tokenized Diffusion Transformer", 2024, "2409.04005")
ProxyChoice = Literal["random", "first", "mean"]
PROXY_CHOICES = ("random", "first", "mean")
TileArg = int | Sequence[int]
RENAMED = {"window": "tile_size (w: the side of the tiles the grid is cut into, one int or one per axis)"}


def proxy_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the score and value products at the default window 4 (1-D): cross N·N/w
    (keys and values), proxy (N/w)² (values 2·d wide), window N·w."""
    w = 4
    p = n / w
    return heads * head_dim * (4.0 * n * p + 6.0 * p * p + 4.0 * n * w)


def tile_shape(tile_size: TileArg, rank: int) -> tuple[int, ...]:
    """The tile per axis of a grid of `rank` axes: one int for every axis, or one per axis, each >= 1."""
    return check_ints("tile_size", tile_size, rank)


def _check(
    q: Tensor, k: Tensor, v: Tensor, tile_size: TileArg, proxy: str, attention_mask: Tensor | None
) -> tuple[tuple[int, ...], tuple[int, ...], Tensor | None]:
    """(grid, window per axis, attention_mask (batch, N) or None) after checking everything."""
    grid = check_grid_qkv(q, k, v, (1, 2))
    win = tile_shape(tile_size, len(grid))
    for axis, (length, w) in enumerate(zip(grid, win)):
        if w > length:
            raise ShapeError(f"tile_size: {win} is larger than the grid {grid} on axis {axis} ({w} > {length})")
        if length % w:
            raise ShapeError(
                f"tile_size: {win} does not divide the grid {grid} on axis {axis} ({length} % {w} = {length % w}); "
                "expected every axis a multiple of its tile (pad the input)"
            )
    check_choice("proxy", proxy, PROXY_CHOICES)
    return grid, win, grid_padding(attention_mask, q.shape[0], grid)


def proxy_weights(
    real: Tensor | None, windows: int, size: int, proxy: ProxyChoice, seed: int | None, device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(batch or 1, windows, size): the weight of each token of each window in its proxy (a row of S).

    `real` (batch, windows, size) bool marks real tokens (None: all real). "first": the first
    real token; "random": a uniformly drawn real token (from a generator seeded with `seed`,
    or torch's global generator when seed is None; one draw shared by the batch); "mean": the
    mean of the real tokens. A window without a real token gets a zero row (no proxy).
    """
    if real is None:
        real = torch.ones(1, windows, size, dtype=torch.bool, device=device)
    if proxy == "mean":
        count = real.sum(-1, keepdim=True).clamp(min=1)
        return real.to(dtype) / count.to(dtype)
    if proxy == "first":
        score = torch.arange(size, 0, -1, device=device, dtype=torch.float64).expand(real.shape)
    else:
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        score = torch.rand(windows, size, generator=gen, dtype=torch.float64).to(device) + 1
    pick = score.masked_fill(~real, 0).argmax(-1)
    return F.one_hot(pick, size).to(dtype) * real.any(-1, keepdim=True).to(dtype)


def _to_windows(x: Tensor, win: tuple[int, ...]) -> Tensor:
    """(batch, heads, *grid, c) -> (batch, heads, windows, w, c), windows in raster order of the window grid."""
    b, h, c = x.shape[0], x.shape[1], x.shape[-1]
    if len(win) == 1:
        return x.reshape(b, h, -1, win[0], c)
    (hh, ww), (wh, wv) = x.shape[2:4], win
    x = x.reshape(b, h, hh // wh, wh, ww // wv, wv, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, h, (hh // wh) * (ww // wv), wh * wv, c)


def _from_windows(x: Tensor, grid: tuple[int, ...], win: tuple[int, ...]) -> Tensor:
    """Inverse of `_to_windows`: (batch, heads, windows, w, c) -> (batch, heads, *grid, c)."""
    b, h, c = x.shape[0], x.shape[1], x.shape[-1]
    if len(win) == 1:
        return x.reshape(b, h, grid[0], c)
    (hh, ww), (wh, wv) = grid, win
    x = x.reshape(b, h, hh // wh, ww // wv, wh, wv, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, h, hh, ww, c)


def grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA over (batch, heads, groups, n, ·) inputs with the head and group axes merged into one (torch
    runs 5-D inputs on its slow math path); `mask` bool broadcastable to (batch, heads, groups, n_q, n_k)."""
    b, h, g = q.shape[:3]
    if mask is not None:
        mask = mask.expand(b, h, g, mask.shape[-2], k.shape[-2]).reshape(b, h * g, mask.shape[-2], k.shape[-2])
    out = F.scaled_dot_product_attention(*(t.reshape(b, h * g, *t.shape[3:]) for t in (q, k, v)), attn_mask=mask, scale=scale)
    return out.view(b, h, g, *out.shape[2:])


def attend_many(q: Tensor, k: Tensor, values: Sequence[Tensor], mask: Tensor | None, scale: float) -> list[Tensor]:
    """softmax(q kᵀ·scale) applied to each of `values`, one score matrix for all (torch's SDPA takes
    values only as wide as q on its fast kernels); `mask` bool broadcastable to the scores, True =
    attend; a row that sees no key gives 0 (and zero gradients)."""
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p * mask.any(-1, keepdim=True)
    return [p @ v for v in values]


def _shifted_window_attention(
    q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, ...], win: tuple[int, ...], kpm: Tensor | None, scale: float
) -> Tensor:
    """Window attention on windows shifted by ⌊w/2⌋ per axis, (batch, heads, windows, w, dv) in the layout of
    `_to_windows` of the unshifted grid: the grid is padded by s = ⌊w/2⌋ before and (w − s) mod w after
    each axis, attended in windows with the padding masked, cropped and cut into the unshifted windows."""
    b = q.shape[0]
    pads: list[int] = []
    for w in reversed(win):
        pads += [w // 2, (w - w // 2) % w]
    real = torch.ones(1, 1, *grid, 1, dtype=torch.bool, device=q.device)
    if kpm is not None:
        real = kpm.reshape(b, 1, *grid, 1)
    real = F.pad(real, [0, 0, *pads], value=False)
    qs, ks, vs = (F.pad(t, [0, 0, *pads]) for t in (q, k, v))
    keep = _to_windows(real, win)[:, 0, :, :, 0][:, None, :, None, :]
    out = grouped_sdpa(*(_to_windows(t, win) for t in (qs, ks, vs)), keep, scale)
    out = _from_windows(out, tuple(real.shape[2:-1]), win)
    crop = tuple(slice(w // 2, w // 2 + length) for w, length in zip(win, grid))
    return _to_windows(out[(slice(None), slice(None), *crop)], win)


@renamed_keywords("proxy_token_attention", RENAMED)
def proxy_token_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_size: TileArg,
    proxy: ProxyChoice = "first",
    seed: int | None = 0,
    shift: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Proxy-token attention of q, k, v (batch, heads, *grid, head_dim), a grid of 1 or 2 axes.

    out = ½ (A_cross A_proxy S + A_win) v (see the module docstring); `tile_size` one int or one
    per axis, dividing each axis; `shift`: the window branch uses windows shifted by ⌊w/2⌋ per
    axis (partial windows at the borders), the proxies keep the unshifted ones; attention_mask bool (batch, N) in raster order or
    (batch, *grid), True = real token. Returns (batch, heads, *grid, head_dim of v); a query
    that sees no real key gives 0.
    """
    grid, win, kpm = _check(q, k, v, tile_size, proxy, attention_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, d = q.shape[0], q.shape[-1]
    qw, kw, vw = (_to_windows(t, win) for t in (q, k, v))  # (b, h, windows, w, ·)
    nw, w = qw.shape[2], qw.shape[3]
    real = None if kpm is None else _to_windows(kpm.reshape(b, 1, *grid, 1), win)[:, 0, :, :, 0]  # (b, windows, w)
    if shift:
        local = _shifted_window_attention(q, k, v, grid, win, kpm, scale)
    else:
        local = grouped_sdpa(qw, kw, vw, None if real is None else real[:, None, :, None, :], scale)
    sel = proxy_weights(real, nw, w, proxy, seed, q.device, q.dtype)[:, None, :, None, :]  # (b|1, 1, windows, 1, w)
    qp, kp, vp = ((sel @ t).squeeze(-2) for t in (qw, kw, vw))  # the proxies' heads, (b, h, windows, ·)
    has = None if real is None else real.any(-1)[:, None, None, :]  # (b, 1, 1, windows): windows with a proxy
    k_att, v_att = attend_many(qp, kp, (kp, vp), has, scale)  # K' = A_proxy S k, V' = A_proxy S v
    cross = F.scaled_dot_product_attention(qw.reshape(*qw.shape[:2], nw * w, d), k_att, v_att, attn_mask=has, scale=scale)
    out = 0.5 * (local + cross.reshape(local.shape))
    return _from_windows(out, grid, win)


@renamed_keywords("proxy_token_matrices", RENAMED)
def proxy_token_matrices(
    q: Tensor,
    k: Tensor,
    *,
    tile_size: TileArg,
    proxy: ProxyChoice = "first",
    seed: int | None = 0,
    shift: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> dict[str, Tensor]:
    """The stages of proxy-token attention as dense float64 matrices, positions in raster order:
    "select" S (batch|1, 1, N/w, N), "proxy" A_proxy (batch, heads, N/w, N/w), "cross" A_cross
    (batch, heads, N, N/w), "window" A_win (batch, heads, N, N; with `shift` on the windows offset by
    ⌊w/2⌋ per axis) and "composed" ½ (A_cross A_proxy S + A_win)."""
    grid, win, kpm = _check(q, k, q, tile_size, proxy, attention_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, h, n = q.shape[0], q.shape[1], math.prod(grid)
    q64, k64 = (t.double().reshape(b, h, n, t.shape[-1]) for t in (q, k))
    idx = torch.arange(n, device=q.device)
    coords = torch.unravel_index(idx, grid)
    wid, pos, shifted = torch.zeros_like(idx), torch.zeros_like(idx), torch.zeros_like(idx)
    for axis, (c, w) in enumerate(zip(coords, win)):
        wid = wid * (grid[axis] // w) + c // w
        pos = pos * w + c % w
        shifted = shifted * (grid[axis] // w + 1) + (c + w // 2) // w  # window of the partition offset by ⌊w/2⌋
    nw, size = n // math.prod(win), math.prod(win)
    real = torch.ones(1, n, dtype=torch.bool, device=q.device) if kpm is None else kpm
    in_window = torch.zeros(real.shape[0], nw, size, dtype=torch.bool, device=q.device)
    in_window[:, wid, pos] = real
    sw = proxy_weights(None if kpm is None else in_window, nw, size, proxy, seed, q.device, torch.float64)
    member = wid[None, :] == torch.arange(nw, device=q.device)[:, None]  # (windows, N)
    select = (sw[:, :, pos] * member)[:, None]  # (b|1, 1, windows, N)
    has = in_window.any(-1)[:, None, None, :]  # (b|1, 1, 1, windows)
    part = shifted if shift else wid
    window_keep = (part[:, None] == part[None, :])[None, None] & real[:, None, None, :]
    a_win = masked_softmax(q64 @ k64.transpose(-1, -2) * scale, window_keep)
    qp, kp = select @ q64, select @ k64
    a_proxy = masked_softmax(qp @ kp.transpose(-1, -2) * scale, has)
    a_cross = masked_softmax(q64 @ (a_proxy @ kp).transpose(-1, -2) * scale, has)
    composed = 0.5 * (a_cross @ a_proxy @ select + a_win)
    return {"select": select, "proxy": a_proxy, "cross": a_cross, "window": a_win, "composed": composed}


@renamed_keywords("proxy_token_attention_reference", RENAMED)
def proxy_token_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tile_size: TileArg,
    proxy: ProxyChoice = "first",
    seed: int | None = 0,
    shift: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `proxy_token_attention` in float64: weights the composed (batch, heads, N, N)
    matrix ½ (A_cross A_proxy S + A_win) in raster order, out = weights v."""
    grid, _, _ = _check(q, k, v, tile_size, proxy, attention_mask)
    weights = proxy_token_matrices(
        q, k, tile_size=tile_size, proxy=proxy, seed=seed, shift=shift, attention_mask=attention_mask, scale=scale
    )["composed"]
    b, h, n = q.shape[0], q.shape[1], math.prod(grid)
    out = (weights @ v.double().reshape(b, h, n, v.shape[-1])).reshape(b, h, *grid, v.shape[-1])
    return out.to(q.dtype), weights.to(q.dtype)


# -- the module --------------------------------------------------------------------------------
@register(
    name="proxy-token",
    paper=PTDIT,
    family="A",
    cost="O(N²/w·d + N·w·d)",
    exponent=2.0,
    supports=Supports(key_padding=True, grids=(1, 2), materialize=True),
    params=(
        Param("tile_size", (int, tuple), 4, "window (tile) w: one int (every axis) or one per axis; divides each axis",
              low=1),
        Param("proxy", str, "random", "proxy of a window: 'random' token (the paper), 'first' token or 'mean'",
              choices=PROXY_CHOICES),
        Param("seed", int, 0, "seed of the 'random' choice (eval mode, or train mode without resample)", low=0),
        Param("shift", bool, False, "window branch on windows shifted by ⌊w/2⌋ per axis (the paper's shifted "
              "window attention, used in alternate blocks); the proxies keep the unshifted windows"),
        Param("resample", bool, True, "proxy='random' in train mode: a new draw per call from torch's global "
              "generator (False: always the draw of `seed`)"),
    ),
    summary="Proxy-token attention (PT-DiT): one proxy per window, proxy self-attention, every token reads the "
            "proxies, plus window attention; composed matrix ½(A_cross A_proxy S + A_win).",
    test_params={"tile_size": 3, "resample": False},
    flops=proxy_flops,
    renamed=RENAMED,
)
class ProxyTokenAttention(GridAttention):
    """Multi-head proxy-token attention on a 1-D or 2-D grid of tokens.

    Inputs are (batch, n, dim) or (batch, H, W, dim); attention_mask is bool (batch, N) in raster
    order or (batch, *grid). `attend(q, k, v)` takes (batch, heads, *grid, head_dim), or flat
    (batch, heads, N, head_dim) with `grid=(H, W)`. `materialize` is the composed (batch, heads, N,
    N) matrix ½ (A_cross A_proxy S + A_win) in raster order. With proxy="random" the choice comes
    from `seed` in eval mode and, with resample=True, from torch's global generator in train mode
    (a new token per window on every call, as the paper trains; fast and reference then draw
    separately: seed torch before each to compare them).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        tile_size: TileArg = 4,
        proxy: ProxyChoice = "random",
        seed: int = 0,
        shift: bool = False,
        resample: bool = True,
    ) -> None:
        rank = len(tile_size) if isinstance(tile_size, (tuple, list)) else 1
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, grid_ranks=(2,) if rank == 2 else (1, 2))
        if rank not in (1, 2):
            raise ParameterError(f"tile_size: expected an int or 2 ints (one per grid axis), got {tile_size!r}")
        tile_shape(tile_size, rank)
        check_choice("proxy", proxy, PROXY_CHOICES)
        check_int("seed", seed, low=0)
        self.tile_size: TileArg = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else tile_size
        self.proxy, self.seed, self.shift, self.resample = proxy, seed, bool(shift), bool(resample)
        self.grid_rank = 2 if rank == 2 else None

    def _options(self) -> dict[str, object]:
        seed = None if self.training and self.resample and self.proxy == "random" else self.seed
        return {"tile_size": self.tile_size, "proxy": self.proxy, "seed": seed, "shift": self.shift, "scale": self.scale}

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Fast path on (batch, heads, *grid, head_dim); `mask` is the key padding mask (batch, N) or None."""
        return proxy_token_attention(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, composed weights (batch, heads, N, N)); `mask` as in attend_fast."""
        return proxy_token_attention_reference(q, k, v, attention_mask=mask, **self._options())  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}, proxy={self.proxy!r}, seed={self.seed}, shift={self.shift}, resample={self.resample}"
