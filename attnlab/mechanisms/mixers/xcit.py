"""Cross-covariance attention, XCA (El-Nouby et al., XCiT, 2021).

Attention over channels instead of tokens. Per head, with Q, K, V ∈ R^{N×d_h}:

    Q̂, K̂ = Q, K with every channel (column) L2-normalised over the N tokens
    A_ij = softmax_j(τ_h · q̂_iᵀ k̂_j)        i, j = 1..d_h   (A ∈ R^{d_h×d_h}, rows sum to 1)
    out_n = A v_n                              (out = V Aᵀ; the paper writes V·softmax(K̂ᵀQ̂/τ))

The paper's A_XC(K, Q) = softmax(K̂ᵀQ̂/τ) is our Aᵀ: the softmax runs over the key
channel j for each query channel i, as in the official code, and τ_h is a learnable
per-head scale that multiplies the logits (initialised at 1, as in that code). Cost
O(N d_h²) per head: linear in the number of tokens.

Key padding: padded tokens are removed — q, k and v are set to zero there before the
normalisation, so they enter neither the channel norms nor the covariance K̂ᵀQ̂, and
their outputs are zero. An element with no real token has A = 0 and output 0.

XCA is not causal as published (every output channel map A pools over all tokens), so
there is no causal mode, and no cross-attention (q and k need the same tokens).

There is no N×N token matrix: token n's output is A v_n, a mix of token n's own value
channels, with A depending on all tokens. `materialize` therefore raises; read the
(batch, heads, d_h, d_h) matrix with `channel_attention(x)`. Analysis tools that follow
information between token positions (rollout, flow, lookback) should treat an XCA
layer as the identity on tokens — as a token operator it is block diagonal, token n to
token n, with the data-dependent channel map A — and report `channel_attention` for
what the layer does. XCiT's local patch interaction (depthwise convolutions) and class
attention are block-level parts, not this operator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Supports, register
from ._channel import ChannelAttention, any_real, check_channel_qkv, drop_padding

XCIT = Paper("P196", "XCiT: Cross-Covariance Image Transformers", 2021, "2106.09681")
EPS = 1e-12  # floor of a channel's norm over tokens (an all-zero channel stays zero)


def xca_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of K̂ᵀQ̂ and V Aᵀ (2·N·d_h² each) and the two normalisations, per sequence."""
    return heads * (4.0 * n * head_dim * head_dim + 6.0 * n * head_dim)


def _check(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor | float, attention_mask: Tensor | None) -> Tensor:
    """Validate the inputs; the temperature as a (1, heads, 1, 1) tensor."""
    check_channel_qkv(q, k, v, attention_mask, f"head_dim {k.shape[-1]}")
    heads = q.shape[1]
    if isinstance(temperature, Tensor):
        if temperature.numel() not in (1, heads):
            raise ParameterError(
                f"temperature: expected a float or a tensor of {heads} values (one per head), "
                f"got shape {tuple(temperature.shape)}"
            )
        return temperature.to(q.dtype).reshape(1, -1, 1, 1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ParameterError(f"temperature: expected a float or a tensor of per-head values, got {temperature!r}")
    return torch.full((1, 1, 1, 1), float(temperature), dtype=q.dtype, device=q.device)


def xca_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    temperature: Tensor | float = 1.0,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Cross-covariance attention over (batch, heads, n, head_dim): out = V Aᵀ, A = softmax(τ Q̂ᵀK̂).

    `temperature` τ is a float or one value per head; `attention_mask` (batch, n), True
    = real token. O(N d_h²) per head, no N×N tensor.
    """
    tau = _check(q, k, v, temperature, attention_mask)
    q, k, v = (drop_padding(t, attention_mask) for t in (q, k, v))
    q_hat = F.normalize(q, dim=2, eps=EPS)
    k_hat = F.normalize(k, dim=2, eps=EPS)
    a = torch.softmax((q_hat.transpose(-2, -1) @ k_hat) * tau, dim=-1)
    return v @ any_real(a, attention_mask).transpose(-2, -1)


def xca_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    temperature: Tensor | float = 1.0,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, A) of `xca_attention` in float64, token by token: A (batch, heads, d_h, d_h), out_n = A v_n."""
    tau = _check(q, k, v, temperature, attention_mask).double()
    q64, k64, v64 = (drop_padding(t.double(), attention_mask) for t in (q, k, v))
    q_hat = q64 / torch.linalg.vector_norm(q64, dim=2, keepdim=True).clamp_min(EPS)
    k_hat = k64 / torch.linalg.vector_norm(k64, dim=2, keepdim=True).clamp_min(EPS)
    logits = torch.einsum("bhni,bhnj->bhij", q_hat, k_hat) * tau
    a = any_real(masked_softmax(logits), attention_mask)
    out = torch.einsum("bhij,bhnj->bhni", a, v64)
    return out.to(q.dtype), a.to(q.dtype)


@register(
    functional=("xca_attention", "xca_attention_reference"),
    name="xcit",
    paper=XCIT,
    family="A",
    cost="O(N d²/h)",
    exponent=1.0,
    supports=Supports(key_padding=True, materialize=False),
    summary="Cross-covariance attention: softmax over the d_h×d_h channel matrix, linear in tokens.",
    normalized=False,
    flops=xca_flops,
)
class CrossCovarianceAttention(ChannelAttention):
    """XCA: per head, a softmax-normalised d_h×d_h cross-covariance of L2-normalised q and k mixes the channels of v.

    `materialize` raises (there is no token×token matrix); `channel_attention(x)` gives
    the (batch, heads, d_h, d_h) matrices, rows summing to 1.
    """

    channel_axes = "d_h, d_h"

    def __init__(self, dim: int, heads: int = 8, *, head_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias)
        self.temperature = nn.Parameter(torch.ones(heads))

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return xca_attention(q, k, v, temperature=self.temperature, attention_mask=mask)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return xca_attention_reference(q, k, v, temperature=self.temperature, attention_mask=mask)
