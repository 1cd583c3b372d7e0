"""SHSA: single-head attention on a slice of the channels (Yun & Ro, "SHViT: Single-Head Vision Transformer with
Memory Efficient Macro Design", 2024).

The channels of X ∈ R^{N×C} are split into the first C_p (attended) and the other C − C_p (passed through):

    [X_p, X_r] = X                         X_p ∈ R^{N×C_p}, X_r ∈ R^{N×(C−C_p)}
    Ỹ          = softmax(Q Kᵀ/√d_qk) V      Q = X_p W^Q, K = X_p W^K ∈ R^{N×d_qk}, V = X_p W^V ∈ R^{N×C_p}
    SHSA(X)    = Concat(Ỹ, X_r) W^O         W^O ∈ R^{C×C}

one head, d_qk = 16 (the paper's), C_p = C/4.67 (the paper's ratio; the released models set C_p per stage). The
redundancy the paper removes is that of multiple heads: one head over a quarter of the channels costs a fraction of
multi-head attention over all of them; X_r reaches W^O untouched (bit for bit: `pre_projection(x)` is Concat(Ỹ, X_r)).

Choices and the official code (timm's `SHSA`, from ysj9909/SHViT).
* `heads` (default 1, SHSA): heads > 1 splits the C_p attended channels into heads of C_p/heads value channels, each
  with its own d_qk-wide queries and keys (multi-head attention on the same slice, the paper's comparison); the
  conformance suite runs 2, 3 and 6 heads this way. `head_dim` is d_qk, the width of the queries and keys (default
  16, the paper's, not dim // heads).
* `partial_dim` C_p: default round(C/4.67) (one head; with more, the nearest multiple of `heads`); a multiple of
  `heads`.
* `pre_norm`: the equation above (the paper's SHSA) has no normalisation; the official code normalises X_p first
  with GroupNorm of one group (`"group"`: per sample, mean and variance over all its tokens and the C_p channels,
  eps 1e-5, a per-channel affine). Here that statistic is taken over the real tokens only (padding excluded), so
  padding does not change the result; it mixes the tokens of a sample, hence no causal mode. Default `"none"`.
* `activation`: the official projection is ReLU then a 1×1 convolution with batch norm; `"relu"` applies the ReLU to
  Concat(Ỹ, X_r) before W^O, `"none"` (default, the paper) does not. The convolutions' batch norms (eval mode) fold
  into the linear maps: W = diag(γ/√(σ²+ε)) W_conv, b = β − γμ/√(σ²+ε) (the peer test does exactly that).
* Tokens come as (batch, N, C): the official (B, C, H, W) map is its raster-order transpose (no position enters
  SHSA). Masks: key padding and attn_mask on the attention; no cross-attention (X_p and X_r are one token's).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ParameterError, ShapeError
from ...core.masks import combine_masks
from ...core.module import Attention, Impl
from ...core.reference import masked_softmax
from ...core.reference import softmax_attention_reference as softmax_reference
from ...core.registry import Paper, Param, Supports, register
from ...core.validate import check_choice, check_int, check_qkv, check_tensor
from ...kernels.sdpa import sdpa

SHVIT = Paper("P189", "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design", 2024, "2401.16456")
PARTIAL_RATIO = 4.67  # C / C_p, the paper's
QK_DIM = 16  # d_qk, the paper's
NORMS: tuple[str, ...] = ("none", "group")
ACTIVATIONS: tuple[str, ...] = ("none", "relu")
GROUP_NORM_EPS = 1e-5  # torch's GroupNorm default, as in the official layer


def default_partial_dim(dim: int, heads: int = 1) -> int:
    """C_p = round(C/4.67) for one head; with more heads the nearest multiple of heads, at least heads."""
    return heads * max(1, round(check_int("dim", dim, 1) / (PARTIAL_RATIO * check_int("heads", heads, 1))))


def shvit_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of the attention on the slice at dim = heads·head_dim (d_qk = head_dim, C_p the default):
    q kᵀ (2·N²·h·d_qk) and A V (2·N²·C_p); the pass-through is free."""
    return 2.0 * n * n * (heads * head_dim + default_partial_dim(heads * head_dim, heads))


def _check(q: Tensor, k: Tensor, v: Tensor, rest: Tensor) -> None:
    check_qkv(q, k, v)
    check_tensor("rest", rest)
    if rest.dim() != 3 or rest.shape[:2] != (q.shape[0], q.shape[2]):
        raise ShapeError(f"rest: expected the passed-through channels (batch, n, C − C_p) with batch {q.shape[0]} and "
                         f"n {q.shape[2]} (as q), got shape {tuple(rest.shape)}")
    if rest.dtype != q.dtype:
        raise TypeError(f"rest: expected dtype {q.dtype} (as q), got {rest.dtype}")


def shvit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rest: Tensor,
    *,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Concat(softmax(Q Kᵀ·scale) V, X_r), the input of W^O: q, k (batch, heads, n, d_qk) and v (batch, heads, n,
    C_p/heads) from X_p, rest = X_r (batch, n, C − C_p) -> (batch, n, C). SDPA for the attention."""
    _check(q, k, v, rest)
    mask = combine_masks(batch=q.shape[0], heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2],
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device)
    out = sdpa(q, k, v, mask, None, scale)
    return torch.cat([out.transpose(1, 2).flatten(2), rest], dim=-1)


def shvit_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rest: Tensor,
    *,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(Concat(Ỹ, X_r), weights (batch, heads, n, n)) of `shvit_attention`, the attention in float64 head by head."""
    _check(q, k, v, rest)
    heads = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = combine_masks(batch=q.shape[0], heads=heads, n_q=q.shape[2], n_k=k.shape[2],
                         attention_mask=attention_mask, attn_mask=attn_mask, dtype=torch.float64, device=q.device)
    outs, weights = [], []
    for h in range(heads):
        scores = torch.einsum("bid,bjd->bij", q[:, h].double(), k[:, h].double()) * scale
        a = masked_softmax(scores, None if mask is None else mask[:, min(h, mask.shape[1] - 1)])
        outs.append(torch.einsum("bij,bjd->bid", a, v[:, h].double()))
        weights.append(a)
    attended = torch.cat(outs, dim=-1).to(q.dtype)
    return torch.cat([attended, rest], dim=-1), torch.stack(weights, 1).to(q.dtype)


def masked_group_norm(x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor, eps: float = GROUP_NORM_EPS) -> Tensor:
    """GroupNorm with one group over tokens (batch, n, c): per sample, the mean and (biased) variance of all its kept
    tokens' channels, then the per-channel affine; keep (batch, n) bool or None (every token)."""
    w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if keep is None else keep.to(x.dtype)
    count = (w.sum(1) * x.shape[-1]).clamp_min(1.0)[:, None, None]
    mean = (x * w[..., None]).sum((1, 2), keepdim=True) / count
    var = (((x - mean) ** 2) * w[..., None]).sum((1, 2), keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


@register(
    name="shvit",
    paper=SHVIT,
    family="C",
    cost="O(N²C_p)",
    exponent=2.0,
    supports=Supports(key_padding=True, attn_mask=True),
    params=(
        Param("partial_dim", int, None, "C_p: the first C_p channels are attended, the rest pass through (default "
              "round(dim/4.67), a multiple of heads)", low=1, optional=True),
        Param("pre_norm", str, "none", "normalisation of X_p: 'none' (the paper) or 'group' (the official "
              "GroupNorm of one group over the sample's real tokens)", choices=NORMS),
        Param("activation", str, "none", "before W^O: 'none' (the paper) or 'relu' (the official code)",
              choices=ACTIVATIONS),
    ),
    summary="SHViT's single-head attention on the first C_p channels (d_qk = 16), the other channels passed "
            "through untouched to the output projection.",
    test_params={"partial_dim": 6},
    flops=shvit_flops,
)
class SingleHeadPartialAttention(Attention):
    """SHSA: one head attends over the first C_p channels, the rest pass through, W^O mixes them all."""

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        batch_first: bool = True,
        partial_dim: int | None = None,
        pre_norm: str = "none",
        activation: str = "none",
    ) -> None:
        qk_dim = QK_DIM if head_dim is None else check_int("head_dim", head_dim, 1)
        super().__init__(dim, heads, head_dim=qk_dim, qkv_bias=qkv_bias, batch_first=batch_first)
        c_p = default_partial_dim(dim, heads) if partial_dim is None else check_int("partial_dim", partial_dim, 1, dim)
        if c_p % heads:
            raise ParameterError(f"partial_dim: expected a multiple of heads={heads}, got {c_p}")
        self.partial_dim = c_p
        self.pre_norm = check_choice("pre_norm", pre_norm, NORMS)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.q_proj = nn.Linear(c_p, heads * qk_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(c_p, heads * qk_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c_p, c_p, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)  # W^O over Concat(Ỹ, X_r)
        self.norm_weight = nn.Parameter(torch.ones(c_p)) if pre_norm == "group" else None
        self.norm_bias = nn.Parameter(torch.zeros(c_p)) if pre_norm == "group" else None

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def attended(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """X_p (batch, n, C_p), normalised by the pre-norm over the kept tokens (keep (batch, n)) when it has one."""
        x_p = x[..., : self.partial_dim]
        if self.norm_weight is None or self.norm_bias is None:
            return x_p
        return masked_group_norm(x_p, keep, self.norm_weight, self.norm_bias)

    def project(
        self, x: Tensor, context: Tensor | None = None, *, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (batch, heads, n, d_qk) and v (batch, heads, n, C_p/heads) of X_p (after the pre-norm, its statistics
        over the tokens `keep` marks); no context (self-attention only)."""
        if context is not None:
            raise ValueError(f"context: {self.spec.name} does not support cross-attention")
        x_p = self.attended(x, keep)
        return self.split_heads(self.q_proj(x_p)), self.split_heads(self.k_proj(x_p)), self.split_heads(self.v_proj(x_p))

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return sdpa(q, k, v, mask, None, self.scale)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return softmax_reference(q, k, v, mask=mask, scale=self.scale)

    def pre_projection(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """Concat(Ỹ, X_r) (batch, n, C), the input of the activation and W^O: X_r is x's last C − C_p channels as given."""
        x, _ = self.batch_major(x)
        self._check_inputs(x, None)
        keep = self.keep_mask(x, None, attention_mask, key_padding_mask)
        q, k, v = self.project(x, keep=keep)
        out = self.attend(q, k, v, attention_mask=keep, attn_mask=attn_mask, impl=impl)
        return torch.cat([self.merge_heads(out), x[..., self.partial_dim :]], dim=-1)

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
        """SHSA(x) = W^O(act(Concat(Ỹ, X_r))), x (batch, n, dim) ((n, batch, dim) with batch_first=False)."""
        if context is not None:
            raise ValueError(f"context: {self.spec.name} does not support cross-attention")
        mixed = self.pre_projection(x, attention_mask=attention_mask, key_padding_mask=key_padding_mask,
                                    attn_mask=attn_mask, impl=impl)
        out = self.out_proj(F.relu(mixed) if self.activation == "relu" else mixed)
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
        """The single head's (or each head's) attention matrix over X_p, (batch, heads, n, n)."""
        if context is not None:
            raise ValueError(f"context: {self.spec.name} does not support cross-attention")
        x, _ = self.batch_major(x)
        self._check_inputs(x, None)
        keep = self.keep_mask(x, None, attention_mask, key_padding_mask)
        q, k, v = self.project(x, keep=keep)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, self.combined_mask(q, k, keep, attn_mask))[1]

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """W^O's first C_p columns applied to merge_heads(weights · V), without bias: (batch, n, dim), the part of the
        output linear in the attention matrix (with activation='relu' the ReLU's mask is left out)."""
        x, _ = self.batch_major(x)
        with torch.no_grad():
            v = self.project(x, keep=attention_mask)[2]
        w_o = self.out_proj.weight[:, : self.partial_dim].to(weights.dtype)
        out = F.linear(self.merge_heads(weights @ v.to(weights.dtype)), w_o)
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"partial_dim={self.partial_dim}, pre_norm={self.pre_norm!r}, activation={self.activation!r}"
