"""Multi-scale multi-head self-attention (Guo et al., AAAI 2020).

Each head h sees only the keys within its scale ω_h of the query:

    head_h = softmax(Q_h K_hᵀ / √d + M_{ω_h} + M) V_h,   M_{ω}(i, j) = 0 if |i − j| ≤ ω else −∞

and the heads, of different scales, are concatenated as usual. A global head has
ω = N; here it is written −1 (or None). Queries are bottom-right aligned to keys, so
cross-attention and KV-cache decoding measure |i − j| on one position axis.

The per-head scale is named `radii` (the radius of head h's band, as `radius` in sliding-window;
the old name `windows` is refused naming it). Default scales (`radii=None`): the paper's scales
run from 1 and 3 (word and phrase
level) up to N (global), and it allocates them per layer (more small-scale heads in
lower layers, more large-scale heads in upper ones). For one layer attnlab uses a
ladder ω_h = 3^h for heads h = 0..H−2 (1, 3, 9, 27, …) and a global last head; pass
`radii` to reproduce a configuration of the paper, layer by layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...core.errors import ParameterError
from ...core.masks import band_mask, combine_masks, to_additive
from ...core.reference import softmax_attention_reference as _reference
from ...core.registry import Paper, Param, renamed_keywords
from ...core.validate import check_qkv, is_int
from ...kernels.sdpa import sdpa
from .softmax import SoftmaxAttention, dense_flops, register_dense

MULTISCALE = Paper("P199", "Multi-Scale Self-Attention for Text Classification", 2020, "1912.00544")
GLOBAL = -1  # the scale of a head that sees every key
RENAMED = {"windows": "radii (head h sees keys with |i − j| ≤ radii[h])"}


def default_radii(heads: int) -> tuple[int, ...]:
    """1, 3, 9, … (3^h) for the first heads − 1 heads, then a global head (−1)."""
    return tuple(3**h for h in range(heads - 1)) + (GLOBAL,)


def check_radii(radii: Sequence[int | None], heads: int) -> tuple[int, ...]:
    """Validate per-head scales; returns them with None written as −1 (global)."""
    if isinstance(radii, (str, bytes)) or not isinstance(radii, Sequence):
        raise ParameterError(f"radii: expected a tuple of ints (one per head, −1 or None = global), got {radii!r}")
    if len(radii) != heads:
        raise ParameterError(
            f"radii: expected one scale per head, heads={heads}, got {len(radii)} scales {tuple(radii)!r}"
        )
    out = []
    for w in radii:
        if w is None:
            w = GLOBAL
        if not is_int(w) or w < GLOBAL:
            raise ParameterError(
                f"radii: expected ints >= 0 (or −1 / None for a global head), got {w!r} in {tuple(radii)!r}"
            )
        out.append(w)
    return tuple(out)


def multiscale_mask(radii: Sequence[int], n_q: int, n_k: int, device: torch.device | None = None) -> Tensor:
    """bool (heads, n_q, n_k): True where |i − j| ≤ ω_h (everywhere for a global head)."""
    full = max(n_q, n_k)
    return torch.stack([band_mask(n_q, n_k, full if w == GLOBAL else w, device) for w in radii])


def with_scales(mask: Tensor | None, bands: Tensor) -> Tensor:
    """Combine a mask (None, bool or additive) with per-head bands (heads, n_q, n_k)."""
    bands = bands[None]
    if mask is None:
        return bands
    if mask.dtype == torch.bool:
        return mask & bands
    return mask + to_additive(bands, mask.dtype)


def _combined(
    q: Tensor, k: Tensor, radii: Sequence[int | None], causal: bool, attention_mask: Tensor | None,
    attn_mask: Tensor | None,
) -> Tensor:
    scales = check_radii(radii, q.shape[1])
    mask = combine_masks(
        batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
        attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device,
    )
    return with_scales(mask, multiscale_mask(scales, q.shape[2], k.shape[2], q.device))


@renamed_keywords("multiscale_attention", RENAMED)
def multiscale_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    radii: Sequence[int | None],
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention where head h sees keys with |i − j| ≤ radii[h] (−1/None = all); SDPA fast path."""
    check_qkv(q, k, v)
    return sdpa(q, k, v, _combined(q, k, radii, causal, attention_mask, attn_mask), scale=scale)


@renamed_keywords("multiscale_attention_reference", RENAMED)
def multiscale_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    radii: Sequence[int | None],
    causal: bool = False,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `multiscale_attention`, float64 with the weights materialised."""
    check_qkv(q, k, v)
    return _reference(q, k, v, mask=_combined(q, k, radii, causal, attention_mask, attn_mask), scale=scale)


@register_dense(
    name="multiscale",
    sharding=("ring", "tree"),
    paper=MULTISCALE,
    family="A",
    params=(
        Param(
            "radii", tuple, None,
            "scale ω_h of each head, |i − j| ≤ ω_h (−1 or None = global); default 1, 3, 9, …, global",
            low=GLOBAL, optional=True,
        ),
    ),
    summary="Multi-scale heads: head h attends within |i − j| ≤ ω_h (band masks of different widths).",
    test_params={"radii": (1, None)},
    flops=dense_flops,
    renamed=RENAMED,
)
class MultiScaleAttention(SoftmaxAttention):
    """Multi-head softmax attention whose heads see bands of different radii (Multi-Scale Transformer).

    The fast path is SDPA over the dense logits with a per-head band mask, so its cost
    stays O(N²d) whatever the scales.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        radii: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.radii = default_radii(heads) if radii is None else check_radii(radii, heads)

    def _with_scales(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        return with_scales(mask, multiscale_mask(self.radii, q.shape[2], k.shape[2], q.device))

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return sdpa(q, k, v, self._with_scales(q, k, mask), scale=self.scale, causal=self.causal)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return _reference(q, k, v, mask=self._with_scales(q, k, mask), scale=self.scale)
