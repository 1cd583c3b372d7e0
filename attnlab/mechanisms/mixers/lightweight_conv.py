"""Lightweight and dynamic convolutions, LightConv and DynamicConv (Wu et al., "Pay Less Attention", 2019).

Both are depthwise convolutions over the sequence whose kernels are softmax-normalised over
the kernel width k and shared by the d/H channels of each of H heads (channel groups; channel
c belongs to head h(c) = ⌊c / (d/H)⌋, contiguous groups as in fairseq):

    LightConv(X, W, i, c)  = Σ_{j=1..k} softmax(W_{h(c), :})_j · X_{i + j − ⌈(k+1)/2⌉, c}       W ∈ R^{H×k}
    DynamicConv(X, i, c)   = LightConv(X, f(X_i)_{h(c), :}, i, c),   f(X_i) = W^Q X_i,  W^Q: d → H·k

so DynamicConv predicts a kernel for every position i from that position's input alone (a
linear map, then the same softmax over the width). Positions outside the sequence read 0
(the softmax still runs over all k taps). The layer around the convolution (the paper's
Figure 2): X = GLU(W^I x) with W^I: dim → 2·inner (inner = heads·head_dim, default dim;
`glu=False`: X = W^I x with W^I: dim → inner), then the convolution, then W^O: inner → dim.

Windows. Non-causal: tap j reads offset j − ⌈(k+1)/2⌉ (j = 1..k), i.e. the window
[i − ⌊k/2⌋, i + k − 1 − ⌊k/2⌋]: centred for odd k; for even k one more tap on the past, as
the paper's formula says (fairseq's encoder pads ⌊(k−1)/2⌋ on the left, one more tap on the
future: the difference exists only for even k). Causal (`causal=True`, the decoder form,
fairseq's padding_l = k − 1): the window is [i − k + 1, i], the past k tokens and the token
itself, so nothing leaks from the future.

Cost O(N·k·d): the fast paths are a grouped `conv1d` (LightConv) and an unfold over the k
taps (DynamicConv), no N×N tensor; the float64 references build the banded mixing matrix
with loops over positions and taps.

`materialize` returns that banded matrix A (batch, heads, N, N): A[b, h, i, m] is the softmax
weight of tap j = m − i + ⌈(k+1)/2⌉ (causal: m − i + k) of head h at position i, 0 outside the
band and at padded m. It explains the output exactly: with X = `values(x)` (batch, heads, N,
head_dim), the GLU output per head, out = W^O merge_heads(A X). For LightConv A is the same
for every input; its rows sum to 1 except near the ends of the sequence, where taps fall off it.

Padding: padded tokens are zeroed after the input layer (as fairseq's layers do), so they are
read as zeros, like positions outside the sequence; a real token's output is the same as with
the padding removed when the padding sits before or after the real tokens. A padded
position still gets an output (its window's real neighbours), and an element with no real
token gets W^O's bias. Left aside from the paper: weight dropout (DropConnect on the
normalised kernel, a training regulariser) and the per-layer kernel sizes (3, 7, 15, 31, …:
build each layer with its own kernel_size). DynamicConv's kernel map W^Q has a bias.

Decoding (causal): `step(x_t, state)` keeps the last k − 1 values per head, O(k·d) a token.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.module import Impl
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_attention_mask,
    check_finite,
    check_int,
    check_module_dtype,
    check_tensor,
    check_tokens,
)
from ._sequence_mixer import SequenceMixer, drop_padding

PAY_LESS = Paper("P105", "Pay Less Attention with Lightweight and Dynamic Convolutions", 2019, "1901.10430")
KERNEL_SIZE = 31  # the paper's width in the upper layers (3, 7, 15, then 31)


def left_taps(kernel_size: int, causal: bool) -> int:
    """How many taps of the window lie before position i: k − 1 causal, else ⌈(k+1)/2⌉ − 1 = ⌊k/2⌋ (the paper)."""
    return kernel_size - 1 if causal else kernel_size // 2


def lightconv_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per sequence at k = 31: the convolution 2·N·k·d, the GLU input layer 2·N·d·2d and W^O 2·N·d²."""
    d = heads * head_dim
    return 2.0 * n * KERNEL_SIZE * d + 6.0 * n * d * d


def dynamicconv_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """`lightconv_flops` plus the kernel map W^Q, 2·N·d·H·k."""
    return lightconv_flops(n, heads, head_dim, causal) + 2.0 * n * heads * head_dim * heads * KERNEL_SIZE


def _check(v: Tensor, weight: Tensor, attention_mask: Tensor | None, dynamic: bool) -> int:
    """Validate v (batch, heads, n, d) and the kernel logits; the kernel size."""
    check_tensor("v", v)
    check_tensor("weight", weight)
    if v.dim() != 4:
        raise ShapeError(f"v: expected (batch, heads, n, head_dim), got shape {tuple(v.shape)}")
    batch, heads, n = v.shape[:3]
    want = (batch, heads, n) if dynamic else (heads,)
    form = "(batch, heads, n, kernel_size)" if dynamic else "(heads, kernel_size)"
    if weight.dim() != len(want) + 1 or tuple(weight.shape[:-1]) != want:
        raise ShapeError(f"weight: expected {form} = {(*want, 'k')}, got shape {tuple(weight.shape)}")
    if weight.dtype != v.dtype:
        raise TypeError(f"weight: expected dtype {v.dtype} (as v), got {weight.dtype}")
    check_attention_mask(attention_mask, batch, n)
    return check_int("kernel_size", weight.shape[-1])


def lightconv_attention(v: Tensor, weight: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None) -> Tensor:
    """LightConv over v (batch, heads, n, head_dim) with kernel logits `weight` (heads, k), softmax over k:
    out_i = Σ_j softmax(W_h)_j v_{i + j − ⌈(k+1)/2⌉} (causal: v_{i + j − k}); padded tokens (attention_mask
    False) read as 0. A grouped conv1d, O(N·k·d)."""
    k = _check(v, weight, attention_mask, dynamic=False)
    b, h, n, d = v.shape
    left = left_taps(k, causal)
    w = torch.softmax(weight, dim=-1).repeat_interleave(d, dim=0)[:, None, :]  # (h·d, 1, k): head h's kernel d times
    x = drop_padding(v, attention_mask).permute(0, 1, 3, 2).reshape(b, h * d, n)
    out = F.conv1d(F.pad(x, (left, k - 1 - left)), w, groups=h * d)
    return out.reshape(b, h, d, n).permute(0, 1, 3, 2)


def dynamicconv_attention(v: Tensor, weight: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None) -> Tensor:
    """DynamicConv over v (batch, heads, n, head_dim) with per-position kernel logits `weight` (batch, heads, n, k),
    softmax over k: out_i = Σ_j softmax(W_{h,i})_j v_{i + j − ⌈(k+1)/2⌉} (causal: v_{i + j − k}); padded tokens
    read as 0. An unfold over the k taps, O(N·k·d)."""
    k = _check(v, weight, attention_mask, dynamic=True)
    left = left_taps(k, causal)
    x = F.pad(drop_padding(v, attention_mask), (0, 0, left, k - 1 - left))  # pad the token axis
    windows = x.unfold(2, k, 1)  # (b, h, n, d, k): token i's window, tap j = position i + j − left
    return torch.einsum("bhndk,bhnk->bhnd", windows, torch.softmax(weight, dim=-1))


def _banded_reference(v: Tensor, weight: Tensor, causal: bool, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out, A) in float64 from the paper's sum, position by position and tap by tap: weight (batch, heads, n, k)."""
    b, h, n, _ = v.shape
    k = weight.shape[-1]
    w = weight.double()
    w = (w - w.amax(-1, keepdim=True)).exp()
    w = w / w.sum(-1, keepdim=True)
    a = torch.zeros(b, h, n, n, dtype=torch.float64, device=v.device)
    first = 1 - k if causal else -(k // 2)  # offset of tap j = 0: the paper's j − ⌈(k+1)/2⌉ at j = 1, causal j − k
    for i in range(n):
        for j in range(k):
            m = i + first + j
            if 0 <= m < n:
                a[:, :, i, m] = w[:, :, i, j]
    if attention_mask is not None:
        a = a * attention_mask[:, None, None, :].double()
    return (a @ v.double()).to(v.dtype), a.to(v.dtype)


def lightconv_attention_reference(
    v: Tensor, weight: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, A) of `lightconv_attention` in float64: A (batch, heads, n, n) the banded matrix of the kernel."""
    _check(v, weight, attention_mask, dynamic=False)
    per_position = weight[None, :, None, :].expand(v.shape[0], -1, v.shape[2], -1)
    return _banded_reference(v, per_position, causal, attention_mask)


def dynamicconv_attention_reference(
    v: Tensor, weight: Tensor, *, causal: bool = False, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, A) of `dynamicconv_attention` in float64: A (batch, heads, n, n) the banded matrix, row i holding
    position i's kernel."""
    _check(v, weight, attention_mask, dynamic=True)
    return _banded_reference(v, weight, causal, attention_mask)


def _kernel_size(kernel_size: object) -> int:
    return check_int("kernel_size", kernel_size, meaning="the convolution's width in tokens")


COMMON = (
    Param("kernel_size", int, KERNEL_SIZE, "kernel width k in tokens (the paper: 3, 7, 15, 31 by layer)", low=1),
    Param("glu", bool, True, "GLU input layer (dim → 2·inner, then a ⊙ σ(b)); False: a linear layer dim → inner"),
)


class _LightweightLayer(SequenceMixer):
    """W^O · conv(GLU(W^I x)) with a softmax-normalised depthwise kernel per head; subclasses supply the kernel."""

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
        glu: bool = True,
    ) -> None:
        super().__init__(dim, heads, causal=causal, batch_first=batch_first)
        if not isinstance(glu, bool):
            raise ParameterError(f"glu: expected a bool, got {glu!r}")
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
            head_dim = dim // heads
        self.head_dim = check_int("head_dim", head_dim)
        self.kernel_size = _kernel_size(kernel_size)
        self.glu = glu
        inner = heads * self.head_dim
        self.in_proj = nn.Linear(dim, 2 * inner if glu else inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, dim)

    def values(self, x: Tensor) -> Tensor:
        """The convolution's input X = GLU(W^I x) per head, (batch, heads, n, head_dim), from batch-major x."""
        h = self.in_proj(x)
        if self.glu:
            h = F.glu(h, dim=-1)  # first half ⊙ σ(second half)
        return h.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    @abstractmethod
    def kernel_logits(self, values: Tensor) -> Tensor:
        """The kernel logits before the softmax from the values (batch, heads, n, head_dim): (heads, k) or
        (batch, heads, n, k)."""

    @abstractmethod
    def convolve(self, v: Tensor, logits: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        """The convolution of the values v (batch, heads, n, head_dim) by the path `impl`."""

    def mix(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        v = self.values(x)
        out = self.convolve(v, self.kernel_logits(v), keep, impl)
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def step(self, x_t: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decode one position of the causal layer: x_t (batch, 1, dim) ((1, batch, dim) with batch_first=False) and
        the state (the last k − 1 values per head, (batch, heads, k − 1, head_dim); None at the start: zeros, the
        positions before the sequence) -> (y_t, new state), equal to the causal forward at that position."""
        if not self.causal:
            raise ValueError("step: decoding needs a causal module (build it with causal=True)")
        check_tensor("x_t", x_t)
        check_tokens("x_t", x_t, self.dim)
        x = self.batch_major(x_t)
        check_finite("x_t", x)
        check_module_dtype("x_t", x, self)
        if x.shape[1] != 1:
            layout = "(batch, 1, dim)" if self.batch_first else "(1, batch, dim) (batch_first=False)"
            raise ShapeError(f"x_t: expected one position {layout}, got shape {tuple(x_t.shape)}")
        v = self.values(x)  # (batch, heads, 1, head_dim)
        past = (self.kernel_size - 1, self.head_dim)
        if state is None:
            state = v.new_zeros(x.shape[0], self.heads, *past)
        elif not isinstance(state, Tensor) or tuple(state.shape) != (x.shape[0], self.heads, *past):
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ShapeError(f"state: expected the last k − 1 values {(x.shape[0], self.heads, *past)} from this "
                             f"module's step, got {got}")
        window = torch.cat([state, v], dim=2)  # tap j reads position t − (k − 1) + j
        logits = self.kernel_logits(v)
        kernel = torch.softmax(logits if logits.dim() == 4 else logits[None, :, None, :], dim=-1)  # (b or 1, h, 1, k)
        out = (kernel[:, :, 0, :, None] * window).sum(2)  # (batch, heads, head_dim)
        y = self.out_proj(out.reshape(x.shape[0], 1, -1))
        return (y if self.batch_first else y.transpose(0, 1)), window[:, :, 1:]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}, causal={self.causal}, glu={self.glu}"


@register(
    functional=("lightconv_attention", "lightconv_attention_reference"),
    name="lightconv",
    paper=PAY_LESS,
    family="B",
    cost="O(N k d)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, decode=True),
    params=COMMON,
    summary="LightConv: depthwise convolution with softmax-normalised kernels shared by the channels of each head, "
            "GLU input layer; causal form over the past k tokens.",
    normalized=False,
    test_params={"kernel_size": 5},
    flops=lightconv_flops,
)
class LightConv(_LightweightLayer):
    """W^O · LightConv(GLU(W^I x)): one learned kernel W_h ∈ R^k per head, softmax over the width.

    materialize: the banded matrix of softmax(W_h) (the same for every input), 0 at padded keys."""

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
        glu: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first,
                         kernel_size=kernel_size, glu=glu)
        self.weight = nn.Parameter(torch.empty(heads, self.kernel_size))
        nn.init.xavier_uniform_(self.weight)

    def kernel_logits(self, values: Tensor) -> Tensor:
        return self.weight.to(values.dtype)

    def convolve(self, v: Tensor, logits: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        if impl == "fast":
            return lightconv_attention(v, logits, causal=self.causal, attention_mask=keep)
        return lightconv_attention_reference(v, logits, causal=self.causal, attention_mask=keep)[0]

    def mixing(self, x: Tensor, keep: Tensor | None) -> Tensor:
        v = self.values(x)
        return lightconv_attention_reference(v, self.kernel_logits(v), causal=self.causal, attention_mask=keep)[1]


@register(
    functional=("dynamicconv_attention", "dynamicconv_attention_reference"),
    name="dynamicconv",
    paper=PAY_LESS,
    family="B",
    cost="O(N k d)",
    exponent=1.0,
    supports=Supports(causal=True, key_padding=True, decode=True),
    params=COMMON,
    summary="DynamicConv: LightConv with a kernel predicted at every position from that token (linear map, softmax "
            "over the width), GLU input layer; causal form over the past k tokens.",
    normalized=False,
    test_params={"kernel_size": 5},
    flops=dynamicconv_flops,
)
class DynamicConv(_LightweightLayer):
    """W^O · DynamicConv(GLU(W^I x)): position i's kernel per head is softmax(W^Q X_i) over the width.

    materialize: the banded matrix whose row i holds position i's kernel, 0 at padded keys."""

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
        glu: bool = True,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal, batch_first=batch_first,
                         kernel_size=kernel_size, glu=glu)
        self.kernel_proj = nn.Linear(heads * self.head_dim, heads * self.kernel_size)  # W^Q: X_i -> H·k logits

    def kernel_logits(self, values: Tensor) -> Tensor:
        b, h, n, d = values.shape
        flat = values.transpose(1, 2).reshape(b, n, h * d)
        return self.kernel_proj(flat).view(b, n, h, self.kernel_size).transpose(1, 2)

    def convolve(self, v: Tensor, logits: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        if impl == "fast":
            return dynamicconv_attention(v, logits, causal=self.causal, attention_mask=keep)
        return dynamicconv_attention_reference(v, logits, causal=self.causal, attention_mask=keep)[0]

    def mixing(self, x: Tensor, keep: Tensor | None) -> Tensor:
        v = self.values(x)
        return dynamicconv_attention_reference(v, self.kernel_logits(v), causal=self.causal, attention_mask=keep)[1]
