"""iLLaMA (P214): causal self-attention for image tokens with a post-sequence class token and a soft mask.

Post-sequence class token: the learned token is appended AFTER the N patch tokens, x = [p_1, …, p_N, cls],
so under the causal mask its row (the last) sees every patch; the classifier reads x[:, -1].

Soft mask: during the first T steps the attention moves from bidirectional to causal,

    M_t = C + (1 − C)·α_t            C_ij = [j ≤ i] (the causal mask), α_t the rate

    linear schedule (official `mask_scheduler`, np.linspace(α_0, 0, T)):  α_t = α_0·(1 − t/(T − 1)) for t < T
    constant schedule (the official training scripts, T = 50 epochs):    α_t = α_0 for t < T
    both:                                                                 α_t = 0 for t ≥ T

Two ways to apply M_t (`form`):

* "official" (the released code): A = softmax(S) ⊙ M_t, S = q kᵀ/√d, with no renormalisation: a row sums
  to less than 1 while α_t < 1, and future keys stay in the denominator even at α_t = 0, so the rows of
  the "causal" model still depend on later patches through the normalisation (not on their values);
* "renormalised": A = softmax(S + log M_t) (log 0 = −inf): at α_t = 0 exactly causal attention, later
  patches do not reach earlier rows at all; at α_t = 1 both forms are bidirectional softmax.

`SoftCausalAttention` wraps an attnlab softmax attention module (`SoftmaxAttention` and its positional
subclasses; score terms included) built non-causal (the soft mask replaces its causality); padding and
attn_mask act before M_t, and a fully masked row gives zeros. `soft_causal(model)` wraps every such
layer of a model; set `.rate` on the wrappers (`set_soft_mask_rate`) as training goes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.masks import to_additive
from ..core.reference import masked_softmax
from ..core.registry import Paper, Param, Spec, add
from ..core.validate import check_finite, check_tensor, check_tokens
from ..mechanisms.dense.softmax import SoftmaxAttention
from .projections import attention_layers

ILLAMA = Paper("P214", "Adapting LLaMA Decoder to Vision Transformer", 2024, "2404.06773")

SoftForm = Literal["official", "renormalised"]
Schedule = Literal["linear", "constant"]


def _check_rate(rate: object, name: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1], got {rate!r}")
    return float(rate)


def soft_mask_rate(step: int, cutoff: int, *, schedule: Schedule = "linear", start: float = 1.0) -> float:
    """α_t of the soft mask at step t (module docstring): from `start` (bidirectional) to 0 (causal) over the
    first `cutoff` steps, linearly (α_0·(1 − t/(T − 1))) or held constant, then 0."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 0:
        raise ValueError(f"cutoff: expected an int >= 0 (steps of the soft phase), got {cutoff!r}")
    if schedule not in ("linear", "constant"):
        raise ValueError(f"schedule: expected 'linear' or 'constant', got {schedule!r}")
    start = _check_rate(start, "start")
    if step >= cutoff:
        return 0.0
    if schedule == "constant" or cutoff == 1:
        return start
    return start * (1.0 - step / (cutoff - 1))


def soft_causal_mask(
    n: int, rate: float, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """M = C + (1 − C)·rate (n, n), C the lower-triangular causal mask (1 on and below the diagonal)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    causal = torch.ones(n, n, device=device, dtype=dtype).tril()
    return causal + (1.0 - causal) * _check_rate(rate)


class PostSequenceClassToken(nn.Module):
    """The learned class token appended after the patch tokens: (batch, n, dim) -> (batch, n + 1, dim);
    `read` takes it back (the last position). Initialised N(0, 0.02²) as the official code (trunc_normal)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        self.token = nn.Parameter(torch.empty(dim))
        nn.init.trunc_normal_(self.token, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[-1] != self.token.shape[0]:
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected (batch, n, {self.token.shape[0]}), got {got}")
        cls = self.token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        return torch.cat([tokens, cls], dim=1)

    @staticmethod
    def read(x: Tensor) -> Tensor:
        """The class token's features, x[:, -1] (batch, dim)."""
        return x[:, -1]


class SoftCausalAttention(nn.Module):
    """A non-causal softmax attention module under the soft causal mask M_rate (module docstring)."""

    def __init__(self, attention: SoftmaxAttention, rate: float = 1.0, *, form: SoftForm = "official") -> None:
        super().__init__()
        if not isinstance(attention, SoftmaxAttention):
            raise TypeError(f"attention: expected an attnlab SoftmaxAttention module, got {type(attention).__name__}")
        if attention.causal:
            raise ValueError("attention: expected a non-causal module (the soft mask sets the causality), got causal=True")
        if not attention.batch_first:
            raise ValueError("attention: expected a batch_first module, got batch_first=False")
        if form not in ("official", "renormalised"):
            raise ValueError(f"form: expected 'official' or 'renormalised', got {form!r}")
        self.attention, self.form = attention, form
        self.rate = _check_rate(rate)

    def weights(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(A (batch, heads, n, n), v (batch, heads, n, head_dim)) for tokens x (batch, n, dim)."""
        att = self.attention
        check_tokens("x", check_tensor("x", x), att.dim)
        check_finite("x", x)
        keep = att.keep_mask(x, None, attention_mask, key_padding_mask)
        q, k, v = att.project(x)
        dense = att.masks(q, k, keep, attn_mask).dense
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * att.scale
        bias = att.score_bias(q, k)
        if bias is not None:
            scores = scores + bias
        soft = soft_causal_mask(x.shape[1], self.rate, device=x.device, dtype=scores.dtype)
        if self.form == "official":
            return masked_softmax(scores, dense) * soft, v
        log_soft = soft.log()  # log 0 = -inf: the causal part of the mask
        return masked_softmax(scores, log_soft if dense is None else log_soft + to_additive(dense, scores.dtype)), v

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: str = "fast",
    ) -> Tensor:
        """Tokens (batch, n, dim) -> (batch, n, dim). `impl` is taken for the block interface: both paths
        compute the materialised weights of `weights` in the dtype of x."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        a, v = self.weights(x, attention_mask=attention_mask, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return self.attention.out_proj(self.attention.merge_heads(a @ v))


def soft_causal(model: nn.Module, rate: float = 1.0, *, form: SoftForm = "official") -> list[SoftCausalAttention]:
    """Wrap every attnlab softmax attention layer of `model` in `SoftCausalAttention` (in place), in
    `attention_layers` order; any other attention layer raises TypeError (the soft mask needs the weights)."""
    wrapped = []
    for layer in attention_layers(model):
        if not isinstance(layer.module, SoftmaxAttention):
            raise TypeError(
                f"model: expected attnlab SoftmaxAttention layers, got {type(layer.module).__name__} at {layer.name!r}"
            )
        parent_name, _, child = layer.name.rpartition(".")
        if not child:
            raise ValueError("model: expected attention layers inside the model, got a model that is one")
        module = SoftCausalAttention(layer.module, rate, form=form)
        setattr(model.get_submodule(parent_name), child, module)
        wrapped.append(module)
    return wrapped


def set_soft_mask_rate(wrappers: Sequence[SoftCausalAttention], rate: float) -> None:
    """Set α_t on every wrapper (call each step with `soft_mask_rate(step, cutoff)`)."""
    rate = _check_rate(rate)
    for w in wrappers:
        if not isinstance(w, SoftCausalAttention):
            raise TypeError(f"wrappers: expected SoftCausalAttention modules, got {type(w).__name__}")
        w.rate = rate


add(
    Spec(
        name="illama-soft-causal",
        kind="recipe",
        paper=ILLAMA,
        factory=soft_causal,
        family="D",
        summary="iLLaMA: soft causal mask C + (1 − C)·α_t (α_t from 1 to 0 over the first steps, soft_mask_rate) on "
        "every softmax layer, with the post-sequence class token (PostSequenceClassToken)",
        params=(
            Param("rate", float, 1.0, "α: the weight of the future keys (1 bidirectional, 0 causal)", low=0.0, high=1.0),
            Param("form", str, "official", "'official' (probabilities × mask) or 'renormalised' (softmax(S + log M))",
                  choices=("official", "renormalised")),
        ),
    )
)
