"""FaceFormer's position scheme (Fan et al., "FaceFormer: Speech-Driven 3D Facial Animation with Transformers", 2022):
the periodic positional encoding (PPE), the periodic temporal bias of the causal self-attention, and the
alignment bias of the audio-motion cross-attention.

Periodic positional encoding, for a token at time t and d channels (frequency index i = c // 2 of channel c):

    PPE(t, 2i)     = sin((t mod p) / 10000^{2i/d})
    PPE(t, 2i + 1) = cos((t mod p) / 10000^{2i/d})

the sinusoidal encoding of t mod p: it repeats every p frames, so no frame index is ever beyond the positions seen
in training. It is added to the motion tokens x before the projections.

Biased causal self-attention, per head h with slope m_h (queries bottom-right aligned, as for ALiBi):

    A = softmax(q_i·k_j/√d + B_h(i, j)),   B_h(i, j) = −m_h·⌊(i − j)/p⌋ for j ≤ i, −∞ for j > i

a stepwise linear penalty: keys within the same p frames as the query are not penalised, the next p frames by m_h,
and so on. The slopes are ALiBi's (the official `init_biased_mask` uses ALiBi's `get_slopes`: 2^(−8h/n) for n heads a
power of two, else that recipe's interleaving; `alibi_slopes`).

Alignment-biased cross-attention: motion frame i attends only to its aligned audio frames,

    A = softmax(q_i·k_j/√d + M(i, j)),   M(i, j) = 0 if r·i ≤ j < r·(i + 1), −∞ otherwise

with r = `frames_per_query` audio frames per motion frame: r = 1 is the official VOCASET mask (frame i sees audio
frame i), r = 2 the BIWI mask (frames 2i and 2i + 1). A motion frame with no aligned audio frame (r·i ≥ n_audio)
sees no key and gets zeros.

The module. `faceformer(x)` is the self-attention (PPE on x when `ppe`, the temporal bias, causal when built
`causal=True`); `faceformer(x, context=audio)` is the cross-attention (PPE on x when `ppe`, none on the audio,
the alignment mask, no temporal bias and no causal mask: the alignment already decides which audio frames a motion
frame sees, as in the official decoder, whose memory mask is the alignment mask alone). Masks (padding, attn_mask)
combine with both. `attend(q, k, v)` is the self-attention core; `cross_attend(q, k, v)` the cross one.

Defaults and deviations.
* `period` = 25, the default of the official `PeriodicPositionalEncoding` (its training script passes 30).
* Not causal (`causal=False`), the temporal bias is the symmetric −m_h·⌊|i − j|/p⌋ (our extension for an
  encoder; the paper defines the causal decoder only). With causal=True it is the paper's bias exactly (the two
  agree wherever the causal mask lets a key through).
* `ppe=True` adds the PPE inside the module, to the input of the projections (not to the residual stream, which
  is the block's). In FaceFormer the PPE is added once to the decoder input; in a stack, set `ppe=False` on the
  layers after the first. Decoding (`step`) adds PPE(t) at the absolute position t of the token.
* The official code builds one (heads, 600, 600) mask up front and slices it; here the bias is built for the
  lengths of the call (any length). Its PPE code needs an even d; here an odd d is allowed (channel c uses
  frequency c // 2, sin for even c, cos for odd c).
* The official cross-attention mask is fixed to the dataset ("vocaset" or "BIWI"); here `frames_per_query` (r).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...core.errors import ShapeError
from ...core.masks import combine_masks
from ...core.module import Attention, Impl, KVCache
from ...core.reference import masked_softmax
from ...core.reference import softmax_attention_reference as _softmax_reference
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_int, check_qkv, check_tensor
from ...kernels.sdpa import sdpa
from ..dense.alibi import alibi_slopes
from ..dense.softmax import dense_flops

FACEFORMER = Paper("P222", "FaceFormer: Speech-Driven 3D Facial Animation with Transformers", 2022, "2112.05329")
BASE = 10000.0  # the sinusoid's base, as in the Transformer's encoding


def periodic_positional_encoding(
    n: int, dim: int, period: int, *, start: int = 0, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """PPE of the positions start .. start + n − 1: (n, dim), PPE(t, 2i) = sin((t mod p)/10000^{2i/d}),
    PPE(t, 2i + 1) = cos((t mod p)/10000^{2i/d})."""
    check_int("n", n, 0)
    check_int("dim", dim, 1)
    check_int("period", period, 1)
    check_int("start", start, 0)
    t = (torch.arange(start, start + n, device=device) % period).to(torch.float64)
    c = torch.arange(dim, device=device)
    angle = t[:, None] / BASE ** ((2 * (c // 2)).to(torch.float64) / dim)[None, :]
    return torch.where(c % 2 == 0, angle.sin(), angle.cos()).to(dtype)


def periodic_bias(slopes: Tensor, n_q: int, n_k: int, period: int) -> Tensor:
    """−m_h·⌊|i − j|/p⌋, (heads, n_q, n_k), queries bottom-right aligned (i = query + n_k − n_q); for j ≤ i this is
    the paper's −m_h·⌊(i − j)/p⌋ (a causal mask removes j > i)."""
    check_tensor("slopes", slopes)
    check_int("n_q", n_q, 1)
    check_int("n_k", n_k, 1)
    check_int("period", period, 1)
    i = torch.arange(n_k - n_q, n_k, device=slopes.device)[:, None]
    j = torch.arange(n_k, device=slopes.device)[None, :]
    steps = torch.div((i - j).abs(), period, rounding_mode="floor")
    return -slopes.reshape(-1, 1, 1) * steps.to(slopes.dtype)


def alignment_mask(n_q: int, n_k: int, frames_per_query: int = 1, *, device: torch.device | None = None) -> Tensor:
    """bool (n_q, n_k), True where audio frame j is aligned with motion frame i: r·i ≤ j < r·(i + 1)."""
    check_int("n_q", n_q, 1)
    check_int("n_k", n_k, 1)
    check_int("frames_per_query", frames_per_query, 1)
    i = torch.arange(n_q, device=device)[:, None] * frames_per_query
    j = torch.arange(n_k, device=device)[None, :]
    return (j >= i) & (j < i + frames_per_query)


def _mask(q: Tensor, k: Tensor, causal: bool, attention_mask: Tensor | None, attn_mask: Tensor | None,
          dtype: torch.dtype) -> Tensor | None:
    return combine_masks(batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=dtype, device=q.device)


def faceformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    period: int = 25,
    causal: bool = True,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """FaceFormer's biased self-attention over (batch, heads, n, head_dim): softmax(q kᵀ·scale − m_h⌊(i − j)/p⌋ + mask) v,
    causal by default (the paper's decoder); not causal, the bias is −m_h⌊|i − j|/p⌋. SDPA fast path."""
    check_qkv(q, k, v)
    bias = periodic_bias(alibi_slopes(q.shape[1], device=q.device, dtype=q.dtype), q.shape[2], k.shape[2], period)
    return sdpa(q, k, v, _mask(q, k, False, attention_mask, attn_mask, q.dtype), bias, scale, causal=causal)


def faceformer_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    period: int = 25,
    causal: bool = True,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `faceformer_attention` in float64, the bias written out entry by entry."""
    check_qkv(q, k, v)
    check_int("period", period, 1)
    heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    slopes = alibi_slopes(heads, dtype=torch.float64).tolist()
    bias = torch.zeros(heads, n_q, n_k, dtype=torch.float64, device=q.device)
    for h in range(heads):
        for row in range(n_q):
            i = row + n_k - n_q
            for j in range(n_k):
                bias[h, row, j] = -slopes[h] * math.floor(abs(i - j) / period)
    mask = _mask(q, k, causal, attention_mask, attn_mask, torch.float64)
    return _softmax_reference(q, k, v, mask=mask, bias=bias, scale=scale)


def aligned_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    frames_per_query: int = 1,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """FaceFormer's alignment-biased cross-attention: query i (a motion frame) attends only to the keys r·i ≤ j <
    r·(i + 1) (its audio frames); (batch, heads, n_q, head_dim); a query with no aligned key gives zeros."""
    check_qkv(q, k, v)
    aligned = alignment_mask(q.shape[2], k.shape[2], frames_per_query, device=q.device)
    mask = _mask(q, k, False, attention_mask, attn_mask, q.dtype)
    return sdpa(q, k, v, aligned if mask is None else _restrict(mask, aligned), None, scale)


def _restrict(mask: Tensor, aligned: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask & aligned
    return mask.masked_fill(~aligned, -math.inf)


def aligned_cross_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    frames_per_query: int = 1,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `aligned_cross_attention` in float64: the logits of every key outside the query's aligned
    frames set to −∞ one by one, then the masked softmax."""
    check_qkv(q, k, v)
    check_int("frames_per_query", frames_per_query, 1)
    n_q, n_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    for i in range(n_q):
        for j in range(n_k):
            if not frames_per_query * i <= j < frames_per_query * (i + 1):
                scores[:, :, i, j] = -math.inf
    mask = _mask(q, k, False, attention_mask, attn_mask, torch.float64)
    weights = masked_softmax(scores, mask)
    return torch.einsum("bhij,bhjd->bhid", weights, v.double()).to(q.dtype), weights.to(q.dtype)


@register(
    name="faceformer",
    paper=FACEFORMER,
    family="C",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(causal=True, key_padding=True, attn_mask=True, cross=True, decode=True),
    params=(
        Param("period", int, 25, "p: the period of the PPE and the step of the temporal bias, in frames", low=1),
        Param("ppe", bool, True, "add the periodic positional encoding to x before the projections"),
        Param("frames_per_query", int, 1, "r: audio (context) frames aligned with each motion frame in "
              "cross-attention (1: VOCASET, 2: BIWI)", low=1),
    ),
    summary="FaceFormer: periodic positional encoding, causal self-attention with the periodic ALiBi-like bias "
            "−m_h⌊(i−j)/p⌋, and alignment-masked audio cross-attention.",
    test_params={"period": 4},
    flops=dense_flops,
)
class FaceFormerAttention(Attention):
    """Self-attention with FaceFormer's PPE and periodic temporal bias; with `context`, the alignment-masked
    cross-attention (module docstring)."""

    causal_in_kernel = True  # attend_fast hands causality to SDPA
    slopes: Tensor

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        period: int = 25,
        ppe: bool = True,
        frames_per_query: int = 1,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.period = check_int("period", period, 1)
        if not isinstance(ppe, bool):
            raise TypeError(f"ppe: expected a bool, got {type(ppe).__name__} {ppe!r}")
        self.ppe = ppe
        self.frames_per_query = check_int("frames_per_query", frames_per_query, 1)
        self.register_buffer("slopes", alibi_slopes(heads, dtype=torch.float64), persistent=False)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def encode_positions(self, x: Tensor, start: int = 0) -> Tensor:
        """x (batch, n, dim) plus the PPE of positions start .. start + n − 1 (x itself when `ppe` is off)."""
        if not self.ppe:
            return x
        return x + periodic_positional_encoding(x.shape[1], self.dim, self.period, start=start, device=x.device,
                                                dtype=x.dtype)

    def project(self, x: Tensor, context: Tensor | None = None, *, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q from x + PPE (positions from `start`), k and v from the context as it comes, or from x + PPE."""
        x = self.encode_positions(x, start)
        return super().project(x, context)

    def temporal_bias(self, n_q: int, n_k: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The periodic bias −m_h·⌊|i − j|/p⌋, (heads, n_q, n_k)."""
        return periodic_bias(self.slopes.to(device=device, dtype=dtype), n_q, n_k, self.period)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        bias = self.temporal_bias(q.shape[2], k.shape[2], device=q.device, dtype=q.dtype)
        return sdpa(q, k, v, mask, bias, self.scale, causal=self.causal)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        n_q, n_k = q.shape[2], k.shape[2]
        i = torch.arange(n_k - n_q, n_k, device=q.device, dtype=torch.float64)[:, None]
        j = torch.arange(n_k, device=q.device, dtype=torch.float64)[None, :]
        bias = -self.slopes.to(q.device)[:, None, None] * torch.floor((i - j).abs() / self.period)
        return _softmax_reference(q, k, v, mask=mask, bias=bias, scale=self.scale)

    # -- cross-attention: the alignment mask ------------------------------------------------
    def cross_attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attention_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """The cross-attention core on projected heads (batch, heads, n, head_dim): query i sees the keys r·i ≤ j <
        r·(i + 1) (and those the masks keep); no temporal bias, no causal mask."""
        return self._cross(q, k, v, attention_mask, attn_mask, impl)[0]

    def _cross(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, attn_mask: Tensor | None,
               impl: str) -> tuple[Tensor, Tensor | None]:
        check_qkv(q, k, v)
        if q.shape[1] != self.heads:
            raise ShapeError(f"q: expected {self.heads} heads at dim 1, got {q.shape[1]} in shape {tuple(q.shape)}")
        kw = {"frames_per_query": self.frames_per_query, "attention_mask": attention_mask, "attn_mask": attn_mask,
              "scale": self.scale}
        if impl == "fast":
            return aligned_cross_attention(q, k, v, **kw), None
        if impl == "reference":
            self.check_dense_memory("impl='reference'", q, k)
            return aligned_cross_attention_reference(q, k, v, **kw)
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")

    def _cross_call(self, x: Tensor, context: Tensor, attention_mask: Tensor | None,
                    key_padding_mask: Tensor | None, attn_mask: Tensor | None, impl: str) -> tuple[Tensor, Tensor | None]:
        x, ctx = self.batch_major(x, context)
        assert ctx is not None
        self._check_inputs(x, ctx)
        keep = self.keep_mask(x, ctx, attention_mask, key_padding_mask)
        q, k, v = self.project(x, ctx)
        out, weights = self._cross(q, k, v, keep, attn_mask, impl)
        out = self.out_proj(self.merge_heads(out))
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """Self-attention of x (batch, n, dim); with context (batch, m, dim), the alignment-masked cross-attention."""
        if context is None:
            return super().forward(x, attention_mask=attention_mask, key_padding_mask=key_padding_mask,
                                   attn_mask=attn_mask, impl=impl)
        return self._cross_call(x, context, attention_mask, key_padding_mask, attn_mask, impl)[0]

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """(batch, heads, n_q, n_k): the biased self-attention matrix, or with context the aligned cross-attention's."""
        if context is None:
            return super().materialize(x, attention_mask=attention_mask, key_padding_mask=key_padding_mask,
                                       attn_mask=attn_mask)
        weights = self._cross_call(x, context, attention_mask, key_padding_mask, attn_mask, "reference")[1]
        assert weights is not None
        return weights

    def decode(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        """One causal step: x_t + PPE(t) at its absolute position t (the cache length), the biased core over the cache."""
        if state is not None and not isinstance(state, KVCache):
            raise TypeError(f"state: expected a KVCache from this module's step, got {type(state).__name__}")
        start = 0 if state is None else state.length
        q, k, v = self.project(x_t, start=start)
        if state is not None:
            if state.k.shape[0] != x_t.shape[0]:
                raise ShapeError(f"state: expected a cache of batch {x_t.shape[0]} (as x_t), got {state.k.shape[0]}")
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        return self.out_proj(self.merge_heads(self.attend(q, k, v))), KVCache(k, v)

    def extra_repr(self) -> str:
        return f"period={self.period}, ppe={self.ppe}, frames_per_query={self.frames_per_query}"

