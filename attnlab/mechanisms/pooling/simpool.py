"""SimPool (Psomas et al., "Keep It SimPool: Who Said Supervised Transformers Suffer from Attention
Deficit?", ICCV 2023): attention pooling whose query is the global average of the tokens.

With the tokens X = (x_1..x_N) of one sample (a transformer's patch tokens, the [CLS] token
discarded, or a CNN's feature map flattened), per head h (d_h = d / heads):

    u = GAP(X) = (1/N) Σ_j x_j                          the query comes from the raw tokens
    q = W_q u,   k_j = W_k LN(x_j),   v_j = LN(x_j)      no value projection: the values are LN(X)
    a = softmax_j(q k_jᵀ / √d_h)                         the attention map, one query (m = 1)
    z = (Σ_j a_j (v_j − s + ε)^γ)^{1/γ} + s − ε + β      generalised (power) mean, per channel

γ > 0 sets the pooling (γ = 1 the weighted mean Σ_j a_j v_j, larger γ leans to the maximum), β is a
learnable scalar (initialised at 0, `use_beta`), ε = 1e-6. The power mean needs non-negative
inputs and the values LN(x) are not, so they are shifted by s, the smallest value of the sample
(over its real tokens and all channels), to be ≥ ε.

Differences from the official code (billpsomas/simpool `sp.py`, also in billpsomas/efficient-probing):

* The shift s. The code subtracts `vv.min()`, the minimum over the whole BATCH (all samples, heads,
  tokens and channels): a sample's pooled vector then depends on the other samples of its batch,
  and changes with the batch size and with padding. Here s is the minimum of that sample alone
  (over its real tokens), so a sample pools alike in any batch; the conformance suite checks it.
* Undoing the shift. The code does not add the minimum back after the root, so its output is the
  power mean of the shifted values: with γ = 1 it is Σ a v − min + ε, not the weighted mean the
  paper's framework gives at γ = 1. Here the shift is undone (+ s − ε, `restore_shift=True`), so
  z is the power mean on the values' own scale and γ = 1 is exactly the weighted mean Σ_j a_j v_j
  (+ β). `restore_shift=False` keeps the code's form (with the per-sample s):
  z = (Σ_j a_j (v_j − s + ε)^γ)^{1/γ} + β.
* The code's `gamma=None` (its choice for transformers) is the plain weighted mean without a
  shift; here that is γ = 1 (equal up to rounding). The default γ = 2 is the paper's choice for
  convolutional networks (PAPERS.md: "gamma e.g. 2").

Defaults as the code: one head, no bias in W_q, W_k, one LayerNorm (eps 1e-6) shared by keys and
values. Padding: the GAP, the shift and the softmax run over the real tokens only, so padding equals
removal; a sample with no real token has zero weights and pools to β.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.errors import ParameterError
from ...core.reference import masked_softmax
from ...core.registry import Paper, Param, Supports, register
from .base import AttentionPooling
from .common import check_pooling_qkv, layer_norm64, linear64, merge_heads, padded_logits, softmax64, split_heads

SIMPOOL = Paper("P142", "Keep It SimPool: Who Said Supervised Transformers Suffer from Attention Deficit?", 2023, "2309.06891")
EPS = 1e-6  # the code's ε of the shift
LN_EPS = 1e-6


def _check_gamma(gamma: object) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
        raise ParameterError(f"gamma: expected a finite float > 0, got {gamma!r}")
    return float(gamma)


def sample_minimum(v: Tensor, attention_mask: Tensor | None) -> Tensor:
    """s (batch, 1, 1, 1): the smallest value of each sample's real tokens over all heads and channels; 0 with none."""
    if attention_mask is not None:
        v = v.masked_fill(~attention_mask[:, None, :, None], float("inf"))
    s = v.flatten(1).amin(1)
    return torch.where(torch.isfinite(s), s, torch.zeros_like(s)).reshape(-1, 1, 1, 1)


def simpool_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gamma: float = 2.0,
    restore_shift: bool = True,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """SimPool's power mean z = (Σ_j a_j (v_j − s + ε)^γ)^{1/γ} [+ s − ε], a = softmax(q kᵀ/√d_h) over the real
    tokens, s the per-sample minimum of v. q (batch, heads, m, d), k (batch, heads, n, d), v (batch, heads, n, d_v);
    `attention_mask` (batch, n) bool, True = real token; a query with no real token gives 0 (no β here)."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    gamma = _check_gamma(gamma)
    a = masked_softmax(padded_logits(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), attention_mask))
    s = sample_minimum(v, attention_mask)
    shifted = v - s + EPS
    if attention_mask is not None:  # padded values may lie below s: keep the power defined (their weight is 0)
        shifted = shifted.masked_fill(~attention_mask[:, None, :, None], EPS)
    power = a @ shifted.pow(gamma)  # (batch, heads, m, d_v)
    real = a.sum(-1, keepdim=True) > 0
    z = torch.where(real, power, torch.ones_like(power)).pow(1.0 / gamma)
    if restore_shift:
        z = z + s - EPS
    return torch.where(real, z, torch.zeros_like(z))


def simpool_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gamma: float = 2.0,
    restore_shift: bool = True,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(z, a (batch, heads, m, n)) of `simpool_attention` in float64, sample by sample over the real tokens."""
    q, k, v = check_pooling_qkv(q, k, v, attention_mask)
    gamma = _check_gamma(gamma)
    b, h, m, d = q.shape
    n = k.shape[2]
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = torch.zeros(b, h, m, v.shape[-1], dtype=torch.float64, device=q.device)
    weights = torch.zeros(b, h, m, n, dtype=torch.float64, device=q.device)
    for bi in range(b):
        real = [j for j in range(n) if attention_mask is None or bool(attention_mask[bi, j])]
        if not real:
            continue
        s = torch.stack([v64[bi, :, j].min() for j in real]).min()
        for hi in range(h):
            for i in range(m):
                a = softmax64([(q64[bi, hi, i] * k64[bi, hi, j]).sum() / math.sqrt(d) for j in real])
                total = sum(w * (v64[bi, hi, j] - s + EPS) ** gamma for j, w in zip(real, a))
                z = total ** (1.0 / gamma)
                out[bi, hi, i] = z + (s - EPS if restore_shift else 0.0)
                for j, w in zip(real, a):
                    weights[bi, hi, i, j] = w
    return out.to(q.dtype), weights.to(q.dtype)


def simpool_flops(n: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs, batch 1: W_k over the n tokens (2·n·d²), W_q on the GAP (2·d²), LN and GAP (~9·n·d),
    logits (2·n·d), the power mean (~4·n·d)."""
    d = heads * head_dim
    return 2.0 * n * d * d + 2.0 * d * d + 15.0 * n * d


@register(
    name="simpool",
    kind="pooling",
    paper=SIMPOOL,
    family="C",
    cost="O(N d²)",
    exponent=1.0,
    supports=Supports(key_padding=True, order_invariant=True),
    params=(
        Param("heads", int, 1, "number of heads (the paper uses 1)", low=1),
        Param("qkv_bias", bool, False, "bias in W_q, W_k (the code: False)"),
        Param("gamma", float, 2.0, "exponent γ of the power mean: 1 = weighted mean (the code's transformer choice)", low=1e-3, high=1e3),
        Param("use_beta", bool, True, "add a learnable scalar β (initialised at 0) to the pooled vector"),
        Param("restore_shift", bool, True, "add the per-sample shift back after the root (False: the code's form)"),
    ),
    summary="SimPool: GAP query, LN keys and values, attention-weighted power mean with exponent γ (per-sample shift)",
    test_params={"gamma": 2.0},
    flops=simpool_flops,
    functional=("simpool_attention", "simpool_attention_reference"),
)
class SimPool(AttentionPooling):
    """z = power-mean_γ over the tokens of LN(X), weighted by softmax(W_q GAP(X) · W_k LN(X) / √d_h), + β; m = 1."""

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        *,
        qkv_bias: bool = False,
        gamma: float = 2.0,
        use_beta: bool = True,
        restore_shift: bool = True,
    ) -> None:
        super().__init__(dim, heads)
        self.gamma = _check_gamma(gamma)
        self.restore_shift = restore_shift
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.beta = nn.Parameter(torch.zeros(1)) if use_beta else None

    @property
    def queries(self) -> int:
        return 1

    def _gap(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """(batch, 1, dim): the mean of the real tokens (0 for a sample with none)."""
        if keep is None:
            return x.mean(1, keepdim=True)
        w = keep.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)

    def pool_fast(self, x: Tensor, keep: Tensor | None) -> Tensor:
        normed = self.norm(x)
        q = split_heads(self.wq(self._gap(x, keep)), self.heads)
        k, v = split_heads(self.wk(normed), self.heads), split_heads(normed, self.heads)
        z = merge_heads(simpool_attention(q, k, v, gamma=self.gamma, restore_shift=self.restore_shift, attention_mask=keep))
        return z if self.beta is None else z + self.beta

    def pool_reference(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        b, n, d = x.shape
        h, dh = self.heads, self.head_dim
        x64 = x.double()
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if keep is None else keep
        gap = torch.stack([x64[i, real[i]].sum(0) / max(int(real[i].sum()), 1) for i in range(b)]).unsqueeze(1)
        normed = layer_norm64(x64, self.norm)
        q = linear64(gap, self.wq).reshape(b, 1, h, dh).permute(0, 2, 1, 3)
        k = linear64(normed, self.wk).reshape(b, n, h, dh).permute(0, 2, 1, 3)
        v = normed.reshape(b, n, h, dh).permute(0, 2, 1, 3)
        z, weights = simpool_attention_reference(
            q, k, v, gamma=self.gamma, restore_shift=self.restore_shift, attention_mask=keep
        )
        z = z.permute(0, 2, 1, 3).reshape(b, 1, d)
        if self.beta is not None:
            z = z + self.beta.double()
        return z.to(x.dtype), weights.to(x.dtype)
