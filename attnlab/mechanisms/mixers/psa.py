"""Polarized self-attention, PSA (Liu et al., 2021), parallel and sequential.

Two branches on an image X ∈ R^{H×W×C}, each keeping a full resolution along one axis (C/2 channels
inside, "polarized") and producing a sigmoid gate along the other:

    channel-only:  A^ch = σ(LN(W_z[(W_v X) · softmax_{HW}(W_q X)]))  ∈ R^C     W_q: C→1, W_v: C→C/2, W_z: C/2→C
                   Z^ch = A^ch ⊙_ch X
    spatial-only:  A^sp = σ(softmax_{C/2}(GAP(W_q' X)) · (W_v' X))  ∈ R^{H×W}  W_q', W_v': C→C/2
                   Z^sp = A^sp ⊙_sp X

i.e. the channel branch pools the C/2 values over the positions with one softmax query (an
attention pooling over the H·W tokens), lifts the result to C channels, layer-normalises it over the
C channels and gates each channel; the spatial branch turns the global average of its query into a
softmax over its C/2 channels, dots it with the values at every position and gates each position.

    parallel:    PSA_p(X) = Z^ch + Z^sp
    sequential:  PSA_s(X) = Z^sp(Z^ch(X)) = A^sp(Z^ch) ⊙_sp Z^ch

All 1×1 convolutions are bias-free linear maps of the channels (as the official code's), W_q, W_v,
W_q', W_v' initialised by Kaiming-normal (fan-in), as that code; LN has a learned scale and shift
over the C channels (ε = 1e-5); C/2 is ⌊C/2⌋.

variant="code": the official code (DeLightCMU/PSA, network/PSA.py), which differs from the
paper's equations, and differently for each arrangement:
  - parallel (`PSA_p`): no LayerNorm in the channel branch (A^ch = σ(W_z z)); in the spatial branch
    the softmax runs over the H·W positions after the product and the query gets none:
    A^sp = σ(softmax_{HW}(GAP(W_q' X) · (W_v' X)));
  - sequential (`PSA_s`): W_z is a bottleneck with biases, C/2 → C/8 → LN → ReLU → C
    (LN over the C/8 channels); in the spatial branch each value channel gets a softmax over the
    H·W positions and the query none: A^sp = σ(GAP(W_q' X) · softmax_{HW}(W_v' X)).
(The code's method names are swapped: its `spatial_pool` is the channel-only branch.) The default
"paper" implements the equations above.

materialize. Each token keeps its own features: out[n, c] = d[n, c]·x[n, c] with
d = A^ch_c + A^sp_n (parallel) or A^ch_c·A^sp_n (sequential, A^sp of Z^ch). `materialize` returns
diag(d[:, c]) for every channel c: (batch, dim, N, N), one head per channel (the gates differ
per channel), out = A x channel by channel (= `attention_path(x, A)`). The weights that mix
tokens are inside the branches: `branch_weights(x)` gives the channel branch's softmax over
positions, A^ch and A^sp. The common parameters heads, head_dim and qkv_bias have no effect (the
module's `heads` is dim).

Functional ops: `psa_attention` (fast) and `psa_attention_reference` (float64, with A) over the weight
tensors and the channel branch's lift (W_z and LN as a callable), `psa_channel_gate` and
`psa_spatial_gate` for one branch's gate.

Masks: none. Both branches pool over all positions of the image (softmax, global average); an
image grid has no padded positions, so attention_mask, key_padding_mask and attn_mask are refused.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice, check_tensor
from ._image_mixer import ImageMixer, mix_channels

PSA = Paper("P067", "Polarized Self-Attention: Towards High-quality Pixel-wise Regression", 2021, "2107.00782")
Variant = Literal["paper", "code"]
SpatialSoftmax = Literal["channels", "product", "positions"]
Lift = Callable[[Tensor], Tensor]  # the channel branch's W_z (and LN): (batch, C/2) -> (batch, C) pre-sigmoid logits
SOFTMAXES = ("channels", "product", "positions")
EPS = 1e-5  # LayerNorm


def psa_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per image, C = heads·head_dim (paper, parallel): the projections W_q (C→1), W_v, W_q', W_v'
    (C→C/2 each), 2NC; pooling and dots ~3NC/2 more; the two gatings 2NC."""
    c = heads * head_dim
    return 2.0 * n * c * (1 + 1.5 * c) + 5.5 * n * c


def _check(x: Tensor, channel_query: Tensor, channel_value: Tensor, spatial_query: Tensor, spatial_value: Tensor,
           spatial_softmax: str) -> None:
    """x (batch, H, W, C); channel_query (C,); channel_value, spatial_query, spatial_value (C/2, C) for any C/2 >= 1."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ShapeError(f"x: expected (batch, H, W, C), got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if tuple(check_tensor("channel_query", channel_query).shape) != (c,):
        raise ShapeError(f"channel_query: expected shape ({c},) (W_q: C → 1), got {tuple(channel_query.shape)}")
    for name, t in (("channel_value", channel_value), ("spatial_query", spatial_query), ("spatial_value", spatial_value)):
        if check_tensor(name, t).dim() != 2 or t.shape[1] != c:
            raise ShapeError(f"{name}: expected shape (inner, {c}) (a 1×1 convolution from C = {c}), got {tuple(t.shape)}")
    check_choice("spatial_softmax", spatial_softmax, SOFTMAXES)


def psa_channel_gate(x: Tensor, query: Tensor, value: Tensor, lift: Lift) -> Tensor:
    """A^ch (batch, C) of x (batch, H, W, C): σ(lift(Σ_n softmax_n(x_n·query) W_v x_n)), lift = LN ∘ W_z (paper)."""
    p = torch.softmax((x @ query).flatten(1), -1)  # (batch, N)
    pooled = torch.einsum("bn,bnc->bc", p, x.flatten(1, 2)) @ value.T
    return torch.sigmoid(lift(pooled))


def psa_spatial_gate(x: Tensor, query: Tensor, value: Tensor, *, spatial_softmax: SpatialSoftmax = "channels") -> Tensor:
    """A^sp (batch, H, W) of x (batch, H, W, C), q = GAP(W_q' x), v = W_v' x: σ(softmax_C/2(q)·v_n) with the softmax
    over the query's channels (paper), σ(softmax_n(q·v_n)) ("product", official PSA_p), σ(q·softmax_n(v)_n)
    ("positions", official PSA_s)."""
    q = (x @ query.T).mean((1, 2))  # (batch, C/2)
    v = x @ value.T  # (batch, H, W, C/2)
    if spatial_softmax == "channels":
        return torch.sigmoid(torch.einsum("bd,bhwd->bhw", torch.softmax(q, -1), v))
    if spatial_softmax == "positions":
        v = torch.softmax(v.flatten(1, 2), 1).reshape(v.shape)
        return torch.sigmoid(torch.einsum("bd,bhwd->bhw", q, v))
    logits = torch.einsum("bd,bhwd->bhw", q, v)
    return torch.sigmoid(torch.softmax(logits.flatten(1), -1).reshape(logits.shape))


def psa_attention(
    x: Tensor,
    channel_query: Tensor,
    channel_value: Tensor,
    channel_lift: Lift,
    spatial_query: Tensor,
    spatial_value: Tensor,
    *,
    sequential: bool = False,
    spatial_softmax: SpatialSoftmax = "channels",
) -> Tensor:
    """PSA on x (batch, H, W, C): Z^ch + Z^sp (parallel) or Z^sp(Z^ch) (sequential), Z^ch = A^ch ⊙_ch x,
    Z^sp = A^sp ⊙_sp of its input (`psa_channel_gate`, `psa_spatial_gate`)."""
    _check(x, channel_query, channel_value, spatial_query, spatial_value, spatial_softmax)
    z_ch = x * psa_channel_gate(x, channel_query, channel_value, channel_lift)[:, None, None, :]
    inner = z_ch if sequential else x
    z_sp = inner * psa_spatial_gate(inner, spatial_query, spatial_value, spatial_softmax=spatial_softmax)[..., None]
    return z_sp if sequential else z_ch + z_sp


def _softmax64(logits: Tensor, dim: int) -> Tensor:
    scores = torch.exp(logits - logits.amax(dim, keepdim=True))
    return scores / scores.sum(dim, keepdim=True)


def _sigmoid64(t: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-t))


def _channel_gate64(tokens: Tensor, query: Tensor, value: Tensor, lift: Lift) -> Tensor:
    """A^ch (batch, C) of float64 tokens (batch, N, C), from the equation."""
    p = _softmax64(torch.einsum("bnc,c->bn", tokens, query.double()), 1)
    pooled = torch.einsum("bn,bnd->bd", p, torch.einsum("dc,bnc->bnd", value.double(), tokens))
    return _sigmoid64(lift(pooled))


def _spatial_gate64(tokens: Tensor, query: Tensor, value: Tensor, spatial_softmax: str) -> Tensor:
    """A^sp (batch, N) of float64 tokens (batch, N, C), from the equation of `spatial_softmax`."""
    q = torch.einsum("dc,bnc->bd", query.double(), tokens) / tokens.shape[1]
    v = torch.einsum("dc,bnc->bnd", value.double(), tokens)
    if spatial_softmax == "channels":
        return _sigmoid64(torch.einsum("bd,bnd->bn", _softmax64(q, 1), v))
    if spatial_softmax == "positions":
        return _sigmoid64(torch.einsum("bd,bnd->bn", q, _softmax64(v, 1)))
    return _sigmoid64(_softmax64(torch.einsum("bd,bnd->bn", q, v), 1))


def psa_attention_reference(
    x: Tensor,
    channel_query: Tensor,
    channel_value: Tensor,
    channel_lift: Lift,
    spatial_query: Tensor,
    spatial_value: Tensor,
    *,
    sequential: bool = False,
    spatial_softmax: SpatialSoftmax = "channels",
) -> tuple[Tensor, Tensor]:
    """(out, A) of `psa_attention` in float64 (channel_lift gets float64), cast back to x's dtype: per channel c,
    A[:, c] = diag(d[:, c]) (batch, C, N, N) with d = A^ch_c + A^sp_n (parallel) or A^ch_c · A^sp_n (sequential,
    A^sp of Z^ch), out = A x channel by channel."""
    _check(x, channel_query, channel_value, spatial_query, spatial_value, spatial_softmax)
    b, h, w, c = x.shape
    tokens = x.double().reshape(b, h * w, c)
    a_ch = _channel_gate64(tokens, channel_query, channel_value, channel_lift)[:, None, :]  # (batch, 1, C)
    if sequential:
        gains = a_ch * _spatial_gate64(tokens * a_ch, spatial_query, spatial_value, spatial_softmax)[..., None]
    else:
        gains = a_ch + _spatial_gate64(tokens, spatial_query, spatial_value, spatial_softmax)[..., None]
    out = (gains * tokens).reshape(x.shape)
    return out.to(x.dtype), torch.diag_embed(gains.transpose(1, 2)).to(x.dtype)


def _kaiming(rows: int, cols: int) -> nn.Parameter:
    w = torch.empty(rows, cols)
    nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")
    return nn.Parameter(w)


def _layer_norm64(u: Tensor, norm: nn.LayerNorm) -> Tensor:
    """LayerNorm over the last axis in float64, written out: (u − mean) / √(var + ε) · γ + β."""
    mean = u.mean(-1, keepdim=True)
    var = ((u - mean) ** 2).mean(-1, keepdim=True)
    return (u - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


class ChannelOnlyBranch(nn.Module):
    """Z^ch = A^ch ⊙_ch X with A^ch = σ(LN(W_z[(W_v X) · softmax_HW(W_q X)])) (paper), on x (batch, H, W, C)."""

    def __init__(self, dim: int, variant: Variant, sequential: bool) -> None:
        super().__init__()
        inner = dim // 2
        self.query = _kaiming(1, dim)  # W_q: C → 1
        self.value = _kaiming(inner, dim)  # W_v: C → C/2
        if variant == "code" and sequential:  # the official PSA_s: C/2 → C/8 → LN → ReLU → C, with biases
            self.down: nn.Linear | None = nn.Linear(inner, inner // 4)
            self.up = nn.Linear(inner // 4, dim)
            self.norm: nn.LayerNorm | None = nn.LayerNorm(inner // 4, eps=EPS)
        else:
            self.down = None
            self.up = nn.Linear(inner, dim, bias=False)  # W_z: C/2 → C
            self.norm = nn.LayerNorm(dim, eps=EPS) if variant == "paper" else None

    def lift(self, pooled: Tensor) -> Tensor:
        """(batch, C/2) -> the pre-sigmoid (batch, C): LN(W_z z) (paper), W_z z (PSA_p), the bottleneck (PSA_s)."""
        if self.down is not None and self.norm is not None:
            return self.up(F.relu(self.norm(self.down(pooled))))
        lifted = self.up(pooled)
        return lifted if self.norm is None else self.norm(lifted)

    def lift64(self, pooled: Tensor) -> Tensor:
        """`lift` in float64, written out."""
        if self.down is not None and self.norm is not None:
            hidden = pooled @ self.down.weight.double().T + self.down.bias.double()
            hidden = torch.clamp_min(_layer_norm64(hidden, self.norm), 0.0)
            return hidden @ self.up.weight.double().T + self.up.bias.double()
        lifted = pooled @ self.up.weight.double().T
        return lifted if self.norm is None else _layer_norm64(lifted, self.norm)

    def pooling(self, x: Tensor) -> Tensor:
        """softmax_HW(W_q X): the attention pooling weights over the positions, (batch, H, W)."""
        logits = x @ self.query[0]
        return torch.softmax(logits.flatten(1), -1).reshape(logits.shape)

    def weights(self, x: Tensor) -> Tensor:
        """A^ch (batch, C)."""
        return psa_channel_gate(x, self.query[0], self.value, self.lift)

    def weights_reference(self, x: Tensor) -> Tensor:
        """A^ch (batch, C) in float64."""
        return _channel_gate64(x.double().flatten(1, 2), self.query[0], self.value, self.lift64)

    def forward(self, x: Tensor) -> Tensor:
        """Z^ch = A^ch ⊙_ch x, x (batch, H, W, C)."""
        return x * self.weights(x)[:, None, None, :]


class SpatialOnlyBranch(nn.Module):
    """Z^sp = A^sp ⊙_sp X with A^sp = σ(softmax_{C/2}(GAP(W_q' X)) · (W_v' X)) (paper), on x (batch, H, W, C)."""

    def __init__(self, dim: int, variant: Variant, sequential: bool) -> None:
        super().__init__()
        self.query = _kaiming(dim // 2, dim)  # W_q': C → C/2
        self.value = _kaiming(dim // 2, dim)  # W_v': C → C/2
        # where the softmax runs: over the query's channels (paper), over the positions after the product
        # (official PSA_p), over the positions of each value channel (official PSA_s)
        self.softmax: SpatialSoftmax = "channels" if variant == "paper" else "positions" if sequential else "product"

    def weights(self, x: Tensor) -> Tensor:
        """A^sp (batch, H, W)."""
        return psa_spatial_gate(x, self.query, self.value, spatial_softmax=self.softmax)

    def weights_reference(self, x: Tensor) -> Tensor:
        """A^sp (batch, H, W) in float64."""
        return _spatial_gate64(x.double().flatten(1, 2), self.query, self.value, self.softmax).reshape(x.shape[:3])

    def forward(self, x: Tensor) -> Tensor:
        """Z^sp = A^sp ⊙_sp x, x (batch, H, W, C)."""
        return x * self.weights(x)[..., None]


@register(
    name="psa",
    paper=PSA,
    family="B",
    cost="O(N·C²)",
    exponent=1.0,
    supports=Supports(grids=(2,)),
    params=(
        Param("arrangement", str, "parallel", "parallel: Z^ch + Z^sp; sequential: Z^sp(Z^ch(X))",
              choices=("parallel", "sequential")),
        Param("variant", str, "paper", "paper: the equations; code: the official PSA_p / PSA_s (module docstring)",
              choices=("paper", "code")),
    ),
    summary="Polarized self-attention on an image: a channel-only gate (softmax-pooled values, LN, σ) and a "
            "spatial-only gate (softmax over channels of the pooled query, σ), in parallel or in sequence.",
    normalized=False,
    test_params={"arrangement": "sequential"},
    flops=psa_flops,
)
class PolarizedSelfAttention(ImageMixer):
    """PSA on x (batch, H, W, dim): parallel Z^ch + Z^sp or sequential Z^sp(Z^ch); `channel` and `spatial` are the
    branch modules; materialize (batch, dim, N, N) = diag of each channel's gate."""

    mask_note = "both branches pool over every position of the image: no position can be removed"

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        arrangement: str = "parallel",
        variant: str = "paper",
    ) -> None:
        super().__init__(dim)
        self.arrangement = check_choice("arrangement", arrangement, ("parallel", "sequential"))
        self.variant: Variant = check_choice("variant", variant, ("paper", "code"))
        sequential = arrangement == "sequential"
        floor = 8 if variant == "code" and sequential else 2
        if dim < floor:
            raise ParameterError(
                f"dim: expected >= {floor} (C/2 inner channels{', C/8 in the official bottleneck' if floor == 8 else ''}), "
                f"got {dim}"
            )
        self.heads = dim  # materialize: one diagonal map per channel
        self.channel = ChannelOnlyBranch(dim, self.variant, sequential)
        self.spatial = SpatialOnlyBranch(dim, self.variant, sequential)

    def _operands(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.channel.query[0], self.channel.value, self.spatial.query, self.spatial.value

    def mix_fast(self, x: Tensor) -> Tensor:
        cq, cv, sq, sv = self._operands()
        return psa_attention(x, cq, cv, self.channel.lift, sq, sv, sequential=self.arrangement == "sequential",
                             spatial_softmax=self.spatial.softmax)

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cq, cv, sq, sv = self._operands()
        return psa_attention_reference(x, cq, cv, self.channel.lift64, sq, sv,
                                       sequential=self.arrangement == "sequential", spatial_softmax=self.spatial.softmax)

    def path(self, x: Tensor, weights: Tensor) -> Tensor:
        """A x channel by channel: the whole output."""
        return mix_channels(weights, x, torch.arange(self.dim, device=x.device))

    def branch_weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(p, A^ch, A^sp): the channel branch's softmax over positions (batch, H, W), A^ch (batch, C) and A^sp
        (batch, H, W) — of Z^ch in the sequential arrangement, of x in the parallel one."""
        x = self.checked(x, None, None, None, None)
        a_ch = self.channel.weights(x)
        inner = x * a_ch[:, None, None, :] if self.arrangement == "sequential" else x
        return self.channel.pooling(x), a_ch, self.spatial.weights(inner)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, arrangement={self.arrangement!r}, variant={self.variant!r}"

