"""Context broadcasting, CB: uniform attention added back by hand (Hyeon-Woo et al., 2023).

The paper observes that trained ViTs spend capacity on dense (near-uniform) attention maps,
which softmax learns with difficulty (steep gradients near uniformity), and adds that
uniform attention explicitly, at no parameter cost, after the MLP of each block:

    CB:      y_i = x_i + (1/N) Σ_j x_j                   (0 parameters)
    CB_dim:  y_i = x_i + λ ⊙ (1/N) Σ_j x_j                (λ ∈ R^dim, one learned scale per channel)

i.e. the residual plus an attention whose map is uniform, A_ij = 1/N, and whose values are
the tokens themselves (no projections). `learned_scale=True` gives the per-channel variant,
λ initialised to 1 so that it starts as CB (the paper does not fix the initial value).

The module. CB has no queries, keys or projections, so it is a token mixer (an `nn.Module`
with the module contract of `attnlab.testing`), not an `Attention` with q, k, v cores: its
output at a token does not depend on that token's query, which the attention cores' harness
assumes. The functional op keeps the attention form, uniform attention over (q, k, v) whose
q only gives the number of queries; the module runs it on the tokens themselves (v = x) and
returns y = x + λ ⊙ A x. `materialize` gives A, 1/n_real at every real key and 0 at padding,
in each of `heads` identical heads (the analysis tools read one map per head);
`attention_path` is λ ⊙ A x. The common parameters head_dim and qkv_bias have no effect: CB
has no projections to size or bias.

Padding: the mean runs over the real tokens only (a padded token changes nothing); a padded
position still gets x_i + the mean of the real tokens, and a sequence with no real token gets
x_i. Not causal (the paper's CB is for ViT encoders; it has no causal form) and no
cross-attention. Folder: a parameter-free token mixer, like the other mixers here that mix
tokens without a query-key attention.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.module import Impl
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import (
    check_attention_mask,
    check_qkv,
)
from ._sequence_mixer import SequenceMixer

CB = Paper("P024", "Scratching Visual Transformer's Back with Uniform Attention", 2023, "2210.08457")


def cb_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs per sequence: the sum over tokens and the broadcast add, about 2·N·dim."""
    return 2.0 * n * heads * head_dim


def context_broadcasting_attention(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """Uniform attention over (batch, heads, n, d): every query gets the mean of v over the real keys.

    attention_mask (batch, n_k), True = real key; q only gives the number of queries. A row with
    no real key gives zeros.
    """
    check_qkv(q, k, v)
    check_attention_mask(attention_mask, k.shape[0], k.shape[2])
    if attention_mask is None:
        mean = v.mean(2, keepdim=True)
    else:
        real = attention_mask[:, None, :, None].to(v.dtype)
        mean = (v * real).sum(2, keepdim=True) / real.sum(2, keepdim=True).clamp_min(1)
    return mean.expand(*v.shape[:2], q.shape[2], v.shape[-1])


def context_broadcasting_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(out, A) of `context_broadcasting_attention` in float64, A_ij = 1/n_real at the real keys (batch, heads, n_q, n_k)."""
    check_qkv(q, k, v)
    check_attention_mask(attention_mask, k.shape[0], k.shape[2])
    b, h, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    a = torch.zeros(b, h, n_q, n_k, dtype=torch.float64, device=q.device)
    for z in range(b):
        real = list(range(n_k)) if attention_mask is None else attention_mask[z].nonzero().flatten().tolist()
        if real:
            a[z, :, :, real] = 1.0 / len(real)
    out = torch.einsum("bhij,bhjd->bhid", a, v.double())
    return out.to(q.dtype), a.to(q.dtype)


@register(
    name="context-broadcasting",
    paper=CB,
    family="C",
    cost="O(Nd)",
    exponent=1.0,
    supports=Supports(key_padding=True),
    params=(Param("learned_scale", bool, False, "CB_dim: a learned scale per channel on the broadcast mean (init 1)"),),
    summary="Context broadcasting: y = x + mean of the real tokens (uniform attention, identity values, 0 "
            "parameters); CB_dim scales the mean per channel.",
    test_params={"learned_scale": True},
    flops=cb_flops,
)
class ContextBroadcasting(SequenceMixer):
    """CB: y_i = x_i + λ ⊙ (1/N) Σ_j x_j over the real tokens (λ = 1, or learned per channel with learned_scale);
    materialize is the uniform map 1/N in every head."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        learned_scale: bool = False,
    ) -> None:
        super().__init__(dim, heads, batch_first=batch_first)
        if not isinstance(learned_scale, bool):
            raise ParameterError(f"learned_scale: expected a bool, got {learned_scale!r}")
        self.scale = nn.Parameter(torch.ones(dim)) if learned_scale else None

    def broadcast(self, mixed: Tensor) -> Tensor:
        """λ ⊙ the mixed tokens (batch, n, dim) (λ = 1 without learned_scale)."""
        return mixed if self.scale is None else mixed * self.scale.to(mixed.dtype)

    def mix(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        """x + λ ⊙ mean of the real tokens; the reference through every head's (n, n) map, as materialize."""
        tokens = x[:, None]  # one head: every head of CB is the same uniform map on the same tokens
        if impl == "fast":
            mixed = context_broadcasting_attention(tokens, tokens, tokens, attention_mask=keep)
        else:
            tokens = tokens.expand(x.shape[0], self.heads, x.shape[1], self.dim)
            mixed = context_broadcasting_attention_reference(tokens, tokens, tokens, attention_mask=keep)[0]
        return x + self.broadcast(mixed[:, 0])

    def mixing(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """The uniform map A (batch, heads, n, n): 1/n_real at the real keys, the same in every head."""
        tokens = x[:, None].expand(x.shape[0], self.heads, x.shape[1], self.dim)
        return context_broadcasting_attention_reference(tokens, tokens, tokens, attention_mask=keep)[1]

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """The output's part linear in the map, λ ⊙ (mean over heads of weights) · x (for `capture(grads=True)`)."""
        xb = (x if self.batch_first else x.transpose(0, 1)).detach()
        out = self.broadcast(weights.mean(1) @ xb.to(weights.dtype))
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, learned_scale={self.scale is not None}"
