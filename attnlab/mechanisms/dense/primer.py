"""Primer's multi-dconv-head attention, MDHA, and its squared-ReLU feed-forward (So et al., 2021).

After the Q, K, V projections, each channel c of each head h is convolved along the sequence
by a causal depthwise kernel of width w (w = 3 in the paper), one kernel per head and channel:

    q̃_i[h, c] = Σ_{t=0}^{w−1} W^Q[h, c, t] · q_{i−(w−1)+t}[h, c]  (+ b^Q[h, c])      (k̃, ṽ alike)

positions before the first token are zeros, W[·, ·, w−1] weighs the token itself. Then standard
softmax attention runs on the convolved heads:

    out = softmax(Q̃ K̃ᵀ / √d_h + M) Ṽ

and Primer's feed-forward replaces ReLU by its square, FFN(x) = W₂ relu(W₁x + b₁)² + b₂
(`squared_relu`, `SquaredReLUFeedForward`; a block kind registers the full Primer layer).

Choices and deviations:

* Kernels: one (d_h, w) kernel per head by default (the paper: "separate per head");
  `shared_kernel=True` shares one (d_h, w) kernel across the heads, as labml-nn's `primer_ez`
  does (a kernel per channel of a head, the same for every head) — the peer tests map that
  configuration. A bias per channel (`conv_bias`, on by default as in nn.Conv1d and labml).
  Initial values as nn.Conv1d's: U(−1/√w, 1/√w) for weights and biases.
* The convolution is causal in both modes: it only reads the token and the w − 1 before it (the
  paper's MDHA sits in a decoder-only LM). `causal=False` lifts the causal mask of the attention
  only; the convolution still never reads later tokens (there is no centred variant).
* Padding is removal: the window of a real token reads the other tokens' projections as zero
  where they are padding (keys and values by the key padding, queries by the same mask in
  self-attention), so a padded sequence gives its real tokens the outputs of the unpadded one. A
  padded position keeps the plain convolution of its window (its key gets weight 0 and its output
  row is never read), so `attend` on `project(x)` and `materialize` with the mask agree.
* Cross-attention: queries are convolved along x, keys and values along the context.
* Fast path: the convolutions as one grouped `conv1d` over (batch, heads·d_h, n) in `project`,
  then SDPA (`kernels.sdpa`: the logits are plain q̃·k̃, so SDPA's causal form applies). The conv
  lives in `project`, not in the core: `attend(q, k, v)` takes convolved heads and is exactly
  softmax attention (what the speed harness times); the reference path (`impl="reference"`,
  `materialize`) convolves by explicit shifts in float64.
* Decoding keeps the convolved keys/values and the last w − 1 raw projections (`PrimerState`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ShapeError
from ...core.masks import combine_masks
from ...core.module import Impl, KVCache
from ...core.reference import softmax_attention_reference as _softmax_reference
from ...core.registry import Paper, Param
from ...core.validate import check_attention_mask, check_int, check_qkv, check_tensor
from ...kernels.sdpa import sdpa
from .softmax import SoftmaxAttention, dense_flops, register_dense

PRIMER = Paper("P005", "Primer: Searching for Efficient Transformers for Language Modeling", 2021, "2109.08668")
KERNEL_SIZE = 3  # the paper's width
QKV = ("q", "k", "v")


def squared_relu(x: Tensor) -> Tensor:
    """Primer's activation: relu(x)²."""
    return F.relu(x).square()


class SquaredReLUFeedForward(nn.Module):
    """Primer's feed-forward: W₂ relu(W₁x + b₁)² + b₂, hidden width `hidden` (4·dim by default)."""

    def __init__(self, dim: int, hidden: int | None = None, *, bias: bool = True) -> None:
        super().__init__()
        check_int("dim", dim)
        width = 4 * dim if hidden is None else check_int("hidden", hidden)
        self.up = nn.Linear(dim, width, bias=bias)
        self.down = nn.Linear(width, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(squared_relu(self.up(x)))


def _check_kernel(name: str, kernel: Tensor, bias: Tensor | None, x: Tensor) -> None:
    """kernel (heads or 1, head_dim, w), bias (heads or 1, head_dim) or None, for x (batch, heads, n, head_dim)."""
    check_tensor(f"kernels ({name})", kernel)
    heads, head_dim = x.shape[1], x.shape[-1]
    if kernel.dim() != 3 or kernel.shape[0] not in (1, heads) or kernel.shape[1] != head_dim or kernel.shape[2] < 1:
        raise ShapeError(
            f"kernels ({name}): expected (heads={heads} or 1, head_dim={head_dim}, width >= 1), got shape {tuple(kernel.shape)}"
        )
    if bias is not None and (check_tensor(f"biases ({name})", bias).dim() != 2 or tuple(bias.shape) != tuple(kernel.shape[:2])):
        raise ShapeError(f"biases ({name}): expected shape {tuple(kernel.shape[:2])} (as its kernel), got {tuple(bias.shape)}")


def causal_depthwise_conv(x: Tensor, kernel: Tensor, bias: Tensor | None = None, *, keep: Tensor | None = None) -> Tensor:
    """x̃_i[h, c] = Σ_t kernel[h, c, t] · x_{i−(w−1)+t}[h, c] + bias[h, c] over x (batch, heads, n, head_dim), zeros
    before the first position; kernel (heads or 1, head_dim, w), bias (heads or 1, head_dim) or None.

    `keep` (batch, n), True = real token: a real position's window reads padded positions as zeros; a padded
    position keeps the plain convolution (module docstring).
    """
    b, h, n, d = x.shape
    width = kernel.shape[-1]
    weight = kernel.to(x.dtype).expand(h, d, width).reshape(h * d, 1, width)
    conv_bias = None if bias is None else bias.to(x.dtype).expand(h, d).reshape(h * d)

    def conv(t: Tensor) -> Tensor:
        channels = t.permute(0, 1, 3, 2).reshape(b, h * d, n)
        y = F.conv1d(F.pad(channels, (width - 1, 0)), weight, conv_bias, groups=h * d)
        return y.reshape(b, h, d, n).permute(0, 1, 3, 2)

    if keep is None or bool(keep.all()):
        return conv(x)
    real = keep[:, None, :, None]
    return torch.where(real, conv(x * real), conv(x))


def _conv_reference(x: Tensor, kernel: Tensor, bias: Tensor | None, keep: Tensor | None) -> Tensor:
    """`causal_depthwise_conv` in float64 by explicit shifts: out_i = Σ_s kernel[..., w−1−s] · x_{i−s} (+ bias), x_{i−s}
    read as zero before the first position and, for a real position i, where i − s is padding."""
    x64 = x.double()
    b, h, n, d = x64.shape
    width = kernel.shape[-1]
    w64 = kernel.double().expand(h, d, width)
    real = torch.ones(b, n, dtype=torch.bool, device=x.device) if keep is None else keep
    out = torch.zeros_like(x64)
    if bias is not None:
        out = out + bias.double().expand(h, d)[None, :, None, :]
    for s in range(min(width, n)):
        shifted = torch.zeros_like(x64)
        shifted[:, :, s:] = x64[:, :, : n - s]
        src_real = torch.zeros_like(real)
        src_real[:, s:] = real[:, : n - s]
        read = src_real | ~real if s > 0 else torch.ones_like(real)
        out = out + w64[None, :, None, :, width - 1 - s] * shifted * read[:, None, :, None]
    return out


def _check_primer(
    q: Tensor, k: Tensor, v: Tensor, kernels: Sequence[Tensor], biases: Sequence[Tensor | None] | None,
    attention_mask: Tensor | None, query_mask: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """Check the inputs; the three biases (None each when `biases` is None)."""
    check_qkv(q, k, v)
    if len(kernels) != 3:
        raise ShapeError(f"kernels: expected three (q, k, v) kernels, got {len(kernels)}")
    if biases is not None and len(biases) != 3:
        raise ShapeError(f"biases: expected three (q, k, v) biases or None, got {len(biases)}")
    bias3 = (None, None, None) if biases is None else tuple(biases)
    for name, x, kernel, bias in zip(QKV, (q, k, v), kernels, bias3):
        _check_kernel(name, kernel, bias, x)
    check_attention_mask(attention_mask, k.shape[0], k.shape[2])
    if query_mask is not None and (query_mask.dtype != torch.bool or tuple(query_mask.shape) != (q.shape[0], q.shape[2])):
        raise ShapeError(
            f"query_mask: expected a bool (batch, n_q) = {(q.shape[0], q.shape[2])} mask, got {query_mask.dtype} "
            f"of shape {tuple(query_mask.shape)}"
        )
    return bias3


def primer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernels: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """MDHA on projected heads (batch, heads, n, head_dim): softmax(Q̃ K̃ᵀ·scale + mask) Ṽ with Q̃, K̃, Ṽ the causal
    depthwise convolutions of q, k, v by `kernels` (three of (heads or 1, head_dim, w)) and `biases`.

    `attention_mask` (batch, n_k) pads keys (and their conv windows), `query_mask` (batch, n_q) the queries'
    conv windows (pass the same mask in self-attention); on SDPA.
    """
    bq, bk, bv = _check_primer(q, k, v, kernels, biases, attention_mask, query_mask)
    qc = causal_depthwise_conv(q, kernels[0], bq, keep=query_mask)
    kc = causal_depthwise_conv(k, kernels[1], bk, keep=attention_mask)
    vc = causal_depthwise_conv(v, kernels[2], bv, keep=attention_mask)
    mask = combine_masks(batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], attention_mask=attention_mask,
                         attn_mask=attn_mask, dtype=q.dtype, device=q.device)
    return sdpa(qc, kc, vc, mask, None, scale, causal=causal)


def primer_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernels: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, weights) of `primer_attention` in float64: the convolutions by explicit shifts, the weights materialised."""
    bq, bk, bv = _check_primer(q, k, v, kernels, biases, attention_mask, query_mask)
    qc = _conv_reference(q, kernels[0], bq, query_mask)
    kc = _conv_reference(k, kernels[1], bk, attention_mask)
    vc = _conv_reference(v, kernels[2], bv, attention_mask)
    mask = combine_masks(batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=causal,
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=torch.float64, device=q.device)
    out, weights = _softmax_reference(qc, kc, vc, mask=mask, scale=scale)
    return out.to(q.dtype), weights.to(q.dtype)


@dataclass
class PrimerState:
    """Decoding state: the convolved keys and values so far, and the raw q, k, v projections of the last
    w − 1 positions (batch, heads, w − 1, head_dim), zeros before the first token."""

    cache: KVCache
    recent: tuple[Tensor, ...]


def primer_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Softmax attention's 4·h·n²·d (half when causal) plus the three convolutions, 2·w·h·n·d each (w = 3)."""
    return dense_flops(n, heads, head_dim, causal) + 3 * 2.0 * KERNEL_SIZE * heads * n * head_dim


@register_dense(
    name="primer",
    paper=PRIMER,
    family="A",
    params=(
        Param("kernel_size", int, KERNEL_SIZE, "width w of the causal depthwise convolution after Q, K, V", low=1),
        Param("shared_kernel", bool, False, "one (head_dim, w) kernel shared by all heads (labml-nn's primer_ez); "
              "False: a kernel per head, as the paper"),
        Param("conv_bias", bool, True, "a bias per channel in the convolutions"),
    ),
    summary="Multi-dconv-head attention: causal depthwise conv (width 3, per head and channel) on Q, K, V, then softmax.",
    flops=primer_flops,
)
class PrimerAttention(SoftmaxAttention):
    """Primer's MDHA: causal depthwise convolutions of width `kernel_size` on the projected Q, K, V heads, then softmax
    attention (SDPA). `project(x, context, keep=..., impl=...)` returns the convolved heads."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        kernel_size: int = KERNEL_SIZE,
        shared_kernel: bool = False,
        conv_bias: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.shared_kernel = shared_kernel
        groups = 1 if shared_kernel else heads
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default: fan_in = kernel_size for a depthwise conv
        for name in QKV:
            self.register_parameter(f"{name}_kernel", nn.Parameter(torch.empty(groups, self.head_dim, kernel_size).uniform_(-bound, bound)))
            bias = nn.Parameter(torch.empty(groups, self.head_dim).uniform_(-bound, bound)) if conv_bias else None
            self.register_parameter(f"{name}_conv_bias", bias)

    @property
    def kernels(self) -> tuple[Tensor, ...]:
        """The (heads or 1, head_dim, w) kernels of q, k, v."""
        return tuple(getattr(self, f"{name}_kernel") for name in QKV)

    @property
    def conv_biases(self) -> tuple[Tensor | None, ...]:
        """The (heads or 1, head_dim) biases of the q, k, v convolutions, or None each."""
        return tuple(getattr(self, f"{name}_conv_bias") for name in QKV)

    def raw_project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The linear projections before the convolutions, (batch, heads, n, head_dim) each."""
        return super().project(x, context)

    def project(
        self, x: Tensor, context: Tensor | None = None, *, keep: Tensor | None = None, impl: Impl = "fast"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Convolved q (along x), k and v (along context or x); `keep` (batch, n_k) the key padding, which also pads
        the queries' windows in self-attention; `impl="reference"` convolves in float64 by explicit shifts."""
        raw = self.raw_project(x, context)
        masks = (keep if context is None else None, keep, keep)
        convolved = []
        for t, kernel, bias, mask in zip(raw, self.kernels, self.conv_biases, masks):
            if impl == "fast":
                convolved.append(causal_depthwise_conv(t, kernel, bias, keep=mask))
            else:
                convolved.append(_conv_reference(t, kernel, bias, mask).to(t.dtype))
        return convolved[0], convolved[1], convolved[2]

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
        """x (batch, n, dim) [attending to context (batch, m, dim)] -> (batch, n, dim), as `Attention.forward`."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        q, k, v = self.project(x, context, keep=keep, impl=impl)
        out = self.out_proj(self.merge_heads(self.attend(q, k, v, attention_mask=keep, attn_mask=attn_mask, impl=impl)))
        return out if self.batch_first else out.transpose(0, 1)

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention matrix (batch, heads, n_q, n_k) over the convolved q and k (float64 convolutions)."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(x, context, keep=keep, impl="reference")
        check_qkv(q, k, v)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, self.combined_mask(q, k, keep, attn_mask))[1]

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """out_proj's matrix applied to merge_heads(weights · ṽ), ṽ the convolved values (`Attention.attention_path`)."""
        x, context = self.batch_major(x, context)
        with torch.no_grad():
            v = self.project(x.reshape(x.shape[0], -1, x.shape[-1]), context, keep=attention_mask)[2]
        out = F.linear(self.merge_heads(weights @ v.to(weights.dtype)), self.out_proj.weight.to(weights.dtype))
        return out if self.batch_first else out.transpose(0, 1)

    def decode(self, x_t: Tensor, state: PrimerState | None) -> tuple[Tensor, PrimerState]:
        """One token: its raw q, k, v joined to the last w − 1 raw projections give the convolved q̃_t, k̃_t, ṽ_t."""
        if state is not None and not isinstance(state, PrimerState):
            raise TypeError(f"state: expected a PrimerState from this module's step, got {type(state).__name__}")
        if state is not None and state.cache.k.shape[0] != x_t.shape[0]:
            raise ShapeError(f"state: expected a state of batch {x_t.shape[0]} (as x_t), got {state.cache.k.shape[0]}")
        raw = self.raw_project(x_t)
        if state is None:
            recent: tuple[Tensor, ...] = tuple(t.new_zeros(*t.shape[:2], self.kernel_size - 1, t.shape[-1]) for t in raw)
        else:
            recent = state.recent
        windows = [torch.cat([r, t], dim=2) for r, t in zip(recent, raw)]
        q, k, v = (causal_depthwise_conv(w, kern, b)[:, :, -1:] for w, kern, b in zip(windows, self.kernels, self.conv_biases))
        if state is not None:
            k, v = torch.cat([state.cache.k, k], dim=2), torch.cat([state.cache.v, v], dim=2)
        out = self.out_proj(self.merge_heads(self.attend(q, k, v)))
        tail = tuple(w[:, :, 1:] for w in windows)  # the last w − 1 raw projections
        return out, PrimerState(KVCache(k, v), tail)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, shared_kernel={self.shared_kernel}, causal={self.causal}"
