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

Masks: none. Both branches pool over all positions of the image (softmax, global average); an
image grid has no padded positions, so attention_mask, key_padding_mask and attn_mask are refused.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice
from ._image_mixer import ImageMixer, mix_channels

PSA = Paper("P067", "Polarized Self-Attention: Towards High-quality Pixel-wise Regression", 2021, "2107.00782")
Variant = Literal["paper", "code"]
EPS = 1e-5  # LayerNorm


def psa_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per image, C = heads·head_dim (paper, parallel): the projections W_q (C→1), W_v, W_q', W_v'
    (C→C/2 each), 2NC; pooling and dots ~3NC/2 more; the two gatings 2NC."""
    c = heads * head_dim
    return 2.0 * n * c * (1 + 1.5 * c) + 5.5 * n * c


def _kaiming(rows: int, cols: int) -> nn.Parameter:
    w = torch.empty(rows, cols)
    nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")
    return nn.Parameter(w)


def _layer_norm64(u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm over the last axis in float64, written out: (u − mean) / √(var + ε) · γ + β."""
    mean = u.mean(-1, keepdim=True)
    var = ((u - mean) ** 2).mean(-1, keepdim=True)
    return (u - mean) / torch.sqrt(var + EPS) * weight.double() + bias.double()


def _softmax64(logits: Tensor, dim: int) -> Tensor:
    scores = torch.exp(logits - logits.amax(dim, keepdim=True))
    return scores / scores.sum(dim, keepdim=True)


class ChannelOnlyBranch(nn.Module):
    """Z^ch = A^ch ⊙_ch X with A^ch = σ(LN(W_z[(W_v X) · softmax_HW(W_q X)])) (paper), on x (batch, H, W, C)."""

    def __init__(self, dim: int, variant: Variant, sequential: bool) -> None:
        super().__init__()
        inner = dim // 2
        self.query = _kaiming(1, dim)  # W_q: C → 1
        self.value = _kaiming(inner, dim)  # W_v: C → C/2
        self.bottleneck = variant == "code" and sequential
        if self.bottleneck:  # the official PSA_s: C/2 → C/8 → LN → ReLU → C, with biases
            self.down: nn.Linear | None = nn.Linear(inner, inner // 4)
            self.up = nn.Linear(inner // 4, dim)
            self.norm: nn.LayerNorm | None = nn.LayerNorm(inner // 4, eps=EPS)
        else:
            self.down = None
            self.up = nn.Linear(inner, dim, bias=False)  # W_z: C/2 → C
            self.norm = nn.LayerNorm(dim, eps=EPS) if variant == "paper" else None

    def pooling(self, x: Tensor) -> Tensor:
        """softmax_HW(W_q X): the attention pooling weights over the positions, (batch, H, W)."""
        logits = (x @ self.query.T)[..., 0]
        return torch.softmax(logits.flatten(1), -1).reshape(logits.shape)

    def weights(self, x: Tensor) -> Tensor:
        """A^ch (batch, C)."""
        pooled = torch.einsum("bhw,bhwc->bc", self.pooling(x), x) @ self.value.T  # Σ_n p_n W_v x_n
        if self.down is not None and self.norm is not None:
            return torch.sigmoid(self.up(F.relu(self.norm(self.down(pooled)))))
        lifted = self.up(pooled)
        return torch.sigmoid(lifted if self.norm is None else self.norm(lifted))

    def forward(self, x: Tensor) -> Tensor:
        """Z^ch = A^ch ⊙_ch x, x (batch, H, W, C)."""
        return x * self.weights(x)[:, None, None, :]

    def weights_reference(self, x: Tensor) -> Tensor:
        """A^ch (batch, C) in float64 from the equations, position by position."""
        b, h, w, c = x.shape
        tokens = x.double().reshape(b, h * w, c)
        p = _softmax64(torch.einsum("bnc,c->bn", tokens, self.query[0].double()), 1)
        values = torch.einsum("dc,bnc->bnd", self.value.double(), tokens)
        pooled = torch.einsum("bn,bnd->bd", p, values)
        if self.down is not None and self.norm is not None:
            hidden = pooled @ self.down.weight.double().T + self.down.bias.double()
            hidden = torch.clamp_min(_layer_norm64(hidden, self.norm.weight, self.norm.bias), 0.0)
            lifted = hidden @ self.up.weight.double().T + self.up.bias.double()
        else:
            lifted = pooled @ self.up.weight.double().T
            if self.norm is not None:
                lifted = _layer_norm64(lifted, self.norm.weight, self.norm.bias)
        return 1.0 / (1.0 + torch.exp(-lifted))


class SpatialOnlyBranch(nn.Module):
    """Z^sp = A^sp ⊙_sp X with A^sp = σ(softmax_{C/2}(GAP(W_q' X)) · (W_v' X)) (paper), on x (batch, H, W, C)."""

    def __init__(self, dim: int, variant: Variant, sequential: bool) -> None:
        super().__init__()
        self.query = _kaiming(dim // 2, dim)  # W_q': C → C/2
        self.value = _kaiming(dim // 2, dim)  # W_v': C → C/2
        # where the softmax runs: over the query's channels (paper), over the positions after the product
        # (official PSA_p), over the positions of each value channel (official PSA_s)
        self.softmax: str = "channels" if variant == "paper" else "positions" if sequential else "product"

    def weights(self, x: Tensor) -> Tensor:
        """A^sp (batch, H, W)."""
        query = (x @ self.query.T).mean((1, 2))  # GAP(W_q' X), (batch, C/2)
        values = x @ self.value.T  # (batch, H, W, C/2)
        if self.softmax == "channels":
            return torch.sigmoid(torch.einsum("bd,bhwd->bhw", torch.softmax(query, -1), values))
        if self.softmax == "positions":
            values = torch.softmax(values.flatten(1, 2), 1).reshape(values.shape)
            return torch.sigmoid(torch.einsum("bd,bhwd->bhw", query, values))
        logits = torch.einsum("bd,bhwd->bhw", query, values)
        return torch.sigmoid(torch.softmax(logits.flatten(1), -1).reshape(logits.shape))

    def forward(self, x: Tensor) -> Tensor:
        """Z^sp = A^sp ⊙_sp x, x (batch, H, W, C)."""
        return x * self.weights(x)[..., None]

    def weights_reference(self, x: Tensor) -> Tensor:
        """A^sp (batch, H, W) in float64 from the equations, position by position."""
        b, h, w, c = x.shape
        tokens = x.double().reshape(b, h * w, c)
        query = torch.einsum("dc,bnc->bd", self.query.double(), tokens) / (h * w)
        values = torch.einsum("dc,bnc->bnd", self.value.double(), tokens)
        if self.softmax == "channels":
            logits = torch.einsum("bd,bnd->bn", _softmax64(query, 1), values)
        elif self.softmax == "positions":
            logits = torch.einsum("bd,bnd->bn", query, _softmax64(values, 1))
        else:
            logits = _softmax64(torch.einsum("bd,bnd->bn", query, values), 1)
        return (1.0 / (1.0 + torch.exp(-logits))).reshape(b, h, w)


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
    functional=(),
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

    def mix_fast(self, x: Tensor) -> Tensor:
        if self.arrangement == "sequential":
            return self.spatial(self.channel(x))
        return self.channel(x) + self.spatial(x)

    def gains(self, x: Tensor) -> Tensor:
        """d (batch, H, W, C) in float64: out = d ⊙ x."""
        channel = self.channel.weights_reference(x)[:, None, None, :]
        if self.arrangement == "sequential":
            return channel * self.spatial.weights_reference(x.double() * channel)[..., None]
        return channel + self.spatial.weights_reference(x)[..., None]

    def mix_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        d = self.gains(x)
        b, h, w, c = x.shape
        weights = torch.diag_embed(d.reshape(b, h * w, c).transpose(1, 2))
        return (d * x.double()).to(x.dtype), weights.to(x.dtype)

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

