"""GEM, the Grounding Everything Module: self-self attention (Bousselham, Petersen, Ferrari & Kuehne, 2024).

A training-free path run beside the layers of a pretrained vision-language ViT: each
token attends to the tokens its own projection resembles — q to q, k to k, v to v —
instead of queries to keys. Per head, for a projection p ∈ {q, k, v} (rows p_n):

    p̂ = p / ‖p‖                                      (L2 normalisation of every token)
    repeat `iterations` times (clustering):
        A = softmax(τ · p̂ p̂ᵀ)                        (over the real tokens)
        p̂ ← normalise(A p̂)
    A_p = softmax(τ · p̂ p̂ᵀ)                           (the final assignment)
    out_p = A_p v

and the path's output is the ensemble of the three branches, their plain mean:

    out = (out_q + out_k + out_v) / 3 = W v,     W = (A_q + A_k + A_v) / 3

which is what `materialize` returns (rows sum to 1). `branches` keeps a subset of the
three ("v" alone is CLIP Surgery's value-value attention, the paper's starting point;
the mean is always over the branches kept).

Temperature. τ multiplies the cosine similarities. The paper's adaptive temperature
(the default, `inverse_temperature=None`) is the mean norm of the layer's input tokens
over the standard 1/√d scale:

    τ = (1/N) Σ_n ‖x_n‖ / √d_h

per sequence, N its real tokens (padding excluded), d_h the head width — as in the
official code (WalBouss/GEM, `SelfSelfAttention`: inverse temperature = mean token norm
· head_dim^-½). A float `inverse_temperature` fixes τ instead (the code's `ss_attn_temp`).
Since p̂ is normalised, the weights do not depend on the scale of the projections: scaling
W_q or W_k (with their biases) by c > 0 leaves the output unchanged, and scaling W_v scales
it by c through v alone — the paper's reason for the normalisation (projections of
different layers and heads have very different norms).

Defaults: `iterations=1` (the official code's default); `branches="qkv"` (the paper's
qkv-ensemble).

The module. The attention core takes q, k, v (batch, heads, n, head_dim); with the adaptive
temperature it needs ‖x_n‖ too: the core's side input (`side_input(x)` -> (batch, n, 1), handed to
the cores by `Attention.attend(..., side=)`), so a functional caller of `attend(q, k, v, side=...)`
passes the norms explicitly. With a fixed temperature there is no side input.
The output is out_proj(merge_heads(W v)); GEM's own residual pathway around the last
layers of a ViT (GEMResidualBlock in the official code, without the MLP) is a block-level
choice left to the caller.

Deviations: none in the maths. Padding is excluded from every softmax and from the mean
norm, so a padded sequence gives its real tokens the output of the unpadded one. Not
causal (self-self attention over image tokens; the paper has no causal form) and no
cross-attention (q-q attention needs the keys to be the queries' own tokens).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ParameterError, ShapeError
from ...core.module import Attention
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_attention_mask, check_choice, check_int, check_qkv

GEM = Paper("P062", "Grounding Everything: Emerging Localization Properties in Vision-Language Transformers", 2024,
            "2312.00878")
BRANCHES: tuple[str, ...] = ("qkv", "qk", "qv", "kv", "q", "k", "v")
NORM_EPS = 1e-12  # floor of a token's norm in the L2 normalisation (a zero vector stays zero)


def gem_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs with the defaults (3 branches, 1 iteration): per branch two p̂p̂ᵀ, one A p̂, one A v."""
    return 3.0 * heads * 4 * 2.0 * n * n * head_dim


def _check(
    q: Tensor, k: Tensor, v: Tensor, inverse_temperature: Tensor | float, iterations: int, branches: str,
    attention_mask: Tensor | None,
) -> Tensor:
    """Validate the inputs; τ as a (batch, 1, 1, 1) tensor of q's dtype."""
    check_qkv(q, k, v, same_length=True)
    check_int("iterations", iterations, low=0)
    check_choice("branches", branches, BRANCHES)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    if isinstance(inverse_temperature, Tensor):
        if inverse_temperature.numel() not in (1, q.shape[0]):
            raise ShapeError(
                f"inverse_temperature: expected a float or a tensor of {q.shape[0]} values (one per batch element), "
                f"got shape {tuple(inverse_temperature.shape)}"
            )
        return inverse_temperature.to(q.dtype).reshape(-1, 1, 1, 1)
    if isinstance(inverse_temperature, bool) or not isinstance(inverse_temperature, (int, float)):
        raise ParameterError(f"inverse_temperature: expected a float or a tensor, got {inverse_temperature!r}")
    if not math.isfinite(inverse_temperature) or inverse_temperature <= 0:
        raise ParameterError(f"inverse_temperature: expected a finite float > 0, got {inverse_temperature!r}")
    return torch.full((1, 1, 1, 1), float(inverse_temperature), dtype=q.dtype, device=q.device)


def _assignment(p_hat: Tensor, tau: Tensor, blocked: Tensor | None) -> Tensor:
    """softmax_j(τ p̂_i·p̂_j) over the real keys; rows with no real key are 0."""
    scores = (p_hat @ p_hat.transpose(-2, -1)) * tau
    if blocked is None:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores.masked_fill(blocked, -math.inf), dim=-1).masked_fill(blocked, 0.0)


def _branch_weights(p: Tensor, tau: Tensor, iterations: int, blocked: Tensor | None) -> Tensor:
    """The final assignment A_p of one branch after `iterations` clustering steps."""
    p_hat = F.normalize(p, dim=-1, eps=NORM_EPS)
    for _ in range(iterations):
        p_hat = F.normalize(_assignment(p_hat, tau, blocked) @ p_hat, dim=-1, eps=NORM_EPS)
    return _assignment(p_hat, tau, blocked)


def gem_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    inverse_temperature: Tensor | float,
    iterations: int = 1,
    branches: str = "qkv",
    attention_mask: Tensor | None = None,
) -> Tensor:
    """GEM self-self attention over (batch, heads, n, head_dim): the mean over p ∈ `branches` of A_p v,
    A_p = softmax(τ p̂ p̂ᵀ) after `iterations` steps p̂ ← normalise(A p̂).

    inverse_temperature τ: a float or one value per batch element; attention_mask (batch, n), True = real token.
    """
    tau = _check(q, k, v, inverse_temperature, iterations, branches, attention_mask)
    blocked = None if attention_mask is None else ~attention_mask[:, None, None, :]
    source = {"q": q, "k": k, "v": v}
    weights = _branch_weights(source[branches[0]], tau, iterations, blocked)
    for p in branches[1:]:
        weights = weights + _branch_weights(source[p], tau, iterations, blocked)
    return (weights / len(branches)) @ v


def gem_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    inverse_temperature: Tensor | float,
    iterations: int = 1,
    branches: str = "qkv",
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, W) of `gem_attention` in float64, W = the mean of the branches' final assignments (batch, heads, n, n)."""
    tau = _check(q, k, v, inverse_temperature, iterations, branches, attention_mask).double()
    keep = None if attention_mask is None else attention_mask[:, None, None, :]
    v64 = v.double()
    total = torch.zeros(*q.shape[:3], k.shape[2], dtype=torch.float64, device=q.device)
    for p in branches:
        x = {"q": q, "k": k, "v": v}[p].double()
        for _ in range(iterations + 1):
            unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)
            a = masked_softmax(torch.einsum("bhid,bhjd->bhij", unit, unit) * tau, keep)
            x = torch.einsum("bhij,bhjd->bhid", a, unit)
        total = total + a
    weights = total / len(branches)
    out = torch.einsum("bhij,bhjd->bhid", weights, v64)
    return out.to(q.dtype), weights.to(q.dtype)


def adaptive_inverse_temperature(norms: Tensor, head_dim: int, attention_mask: Tensor | None = None) -> Tensor:
    """The paper's τ = mean over the real tokens of ‖x_n‖, over √head_dim: norms ‖x_n‖ (batch, n) -> (batch,)."""
    if attention_mask is not None:
        norms = norms * attention_mask.to(norms.dtype)
        count = attention_mask.sum(-1).clamp_min(1).to(norms.dtype)
    else:
        count = torch.full(norms.shape[:1], float(norms.shape[1]), dtype=norms.dtype, device=norms.device)
    return norms.sum(-1) / count / math.sqrt(head_dim)


@register(
    name="gem",
    paper=GEM,
    family="A",
    cost="O(N²d)",
    exponent=2.0,
    supports=Supports(key_padding=True),
    params=(
        Param("iterations", int, 1, "clustering steps p̂ ← normalise(softmax(τ p̂p̂ᵀ) p̂) before the final assignment",
              low=0),
        Param("inverse_temperature", float, None,
              "τ multiplying the cosine similarities; None: the paper's adaptive τ = mean ‖x_n‖ / √head_dim",
              low=0.0, optional=True),
        Param("branches", str, "qkv", "the self-self branches averaged: 'qkv' (the paper's ensemble), 'v' (CLIP "
              "Surgery's v-v), or another subset", choices=BRANCHES),
    ),
    summary="GEM self-self attention: the mean of q-q, k-k and v-v attention on L2-normalised, iteratively "
            "clustered tokens, adaptive temperature.",
    test_params={"iterations": 2},
    flops=gem_flops,
)
class GEMAttention(Attention):
    """GEM self-self attention: out = out_proj((A_q + A_k + A_v)/3 · v), A_p = softmax(τ p̂p̂ᵀ) after `iterations`
    clustering steps on the L2-normalised tokens of p; τ adaptive (mean input norm / √head_dim) or fixed."""

    mask_form = "padding"
    same_length = True
    takes_side_input = True  # the adaptive temperature reads the token norms ‖x_n‖ (side_input)

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        iterations: int = 1,
        inverse_temperature: float | None = None,
        branches: str = "qkv",
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        self.iterations = check_int("iterations", iterations, low=0)
        self.branches = check_choice("branches", branches, BRANCHES)
        if inverse_temperature is not None:
            _check_fixed(inverse_temperature)
        self.inverse_temperature = inverse_temperature

    @property
    def adaptive(self) -> bool:
        """τ from the input tokens (the paper's default) rather than fixed."""
        return self.inverse_temperature is None

    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor | None:
        """The token norms ‖x_n‖ (batch, n, 1) the adaptive temperature reads; None with a fixed temperature."""
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True) if self.adaptive else None

    def _temperature(self, side: Tensor | None, mask: Tensor | None) -> Tensor | float:
        """τ: fixed, or per batch element from the norms of the real tokens (the side input)."""
        if not self.adaptive:
            if side is not None:
                raise ValueError("side: gem with a fixed inverse_temperature takes no side input (the norms set the "
                                 f"adaptive one), got shape {tuple(side.shape)}")
            assert self.inverse_temperature is not None
            return self.inverse_temperature
        if side is None:
            raise ValueError("side: gem's adaptive temperature reads the token norms: expected "
                             "side=module.side_input(x) (batch, n, 1), got None")
        norms = side[..., 0] if side.dim() == 3 else side[:, 0, :, 0]
        return adaptive_inverse_temperature(norms, self.head_dim, mask)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None) -> Tensor:
        return gem_attention(q, k, v, inverse_temperature=self._temperature(side, mask), iterations=self.iterations,
                             branches=self.branches, attention_mask=mask)

    def attend_reference(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, side: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return gem_attention_reference(q, k, v, inverse_temperature=self._temperature(side, mask),
                                       iterations=self.iterations, branches=self.branches, attention_mask=mask)

    def extra_repr(self) -> str:
        tau = "adaptive" if self.adaptive else f"{self.inverse_temperature:g}"
        return f"heads={self.heads}, iterations={self.iterations}, inverse_temperature={tau}, branches={self.branches!r}"


def _check_fixed(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ParameterError(f"inverse_temperature: expected None (adaptive) or a finite float > 0, got {value!r}")
