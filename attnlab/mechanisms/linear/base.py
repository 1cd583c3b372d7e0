"""The module base of the linear family: `LinearAttention` runs the engine of `attnlab.kernels.linear_scan`
(attention through a d_k × d_v state) on the terms a mechanism supplies."""
from __future__ import annotations

from abc import abstractmethod

from torch import Tensor

from ...core.errors import ShapeError
from ...core.masks import padding_to_mask
from ...core.module import Attention
from ...core.validate import check_attention_mask, check_finite, check_tokens
from ...kernels.linear_scan import (
    LinearState,
    LinearTerms,
    check_chunk_size,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
    padding_of,
)


class LinearAttention(Attention):
    """Base module of the linear family: subclasses implement `terms`, the rest is shared.

    `normalize`: divide each output by φ(q)ᵀz (rows of the implicit matrix sum to 1);
    `chunk_size`: the chunk of the causal fast path. The mask given to `attend_*` carries key
    padding only — causality is `self.causal`, since a causal mask would be an N × N tensor.
    Arbitrary attention masks are not supported: they need the N × N matrix.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        normalize: bool = True,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias, causal=causal)
        check_chunk_size(chunk_size)
        self.normalize, self.chunk_size = normalize, chunk_size

    @abstractmethod
    def terms(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> LinearTerms:
        """Feature maps and gates on projected heads (batch, heads, n, head_dim)."""

    def combined_mask(
        self, q: Tensor, k: Tensor, attention_mask: Tensor | None, attn_mask: Tensor | None
    ) -> Tensor | None:
        supports = self.spec.supports
        assert supports is not None
        if attention_mask is not None and not supports.key_padding:
            raise ValueError(f"attention_mask: {self.spec.name} does not support a padding mask (attention_mask or key_padding_mask)")
        if attn_mask is not None:
            raise ValueError(
                f"attn_mask: {self.spec.name} does not support an arbitrary attention mask "
                "(it would need the N × N matrix the linear family avoids)"
            )
        check_attention_mask(attention_mask, q.shape[0], k.shape[2])
        return None if attention_mask is None else padding_to_mask(attention_mask)

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        keep = padding_of(mask)
        t = self.terms(q, k, v, keep)
        return linear_attention(
            t.q, t.k, t.v, causal=self.causal, attention_mask=keep, log_decay=t.log_decay, beta=t.beta,
            normalize=self.normalize, chunk_size=self.chunk_size,
        )

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        keep = padding_of(mask)
        t = self.terms(q, k, v, keep)
        return linear_attention_reference(
            t.q, t.k, t.v, causal=self.causal, attention_mask=keep, log_decay=t.log_decay, beta=t.beta,
            normalize=self.normalize,
        )

    def check_step(self, x_t: Tensor) -> None:
        """The checks every `step` makes: decoding supported, causal module, x_t (batch, 1, dim)."""
        if not self.spec.supports or not self.spec.supports.decode:
            raise ValueError(f"step: {self.spec.name} does not support incremental decoding")
        if not self.causal:
            raise ValueError("step: decoding needs a causal module (build it with causal=True)")
        check_tokens("x_t", x_t, self.dim)
        check_finite("x_t", x_t)
        if x_t.shape[1] != 1:
            raise ShapeError(f"x_t: expected one position (batch, 1, dim), got shape {tuple(x_t.shape)}")

    def step(self, x_t: Tensor, state: LinearState | None = None) -> tuple[Tensor, LinearState]:  # type: ignore[override]
        """Decode one token with a constant-size state: (y_t (batch, 1, dim), state), equal to the causal forward."""
        self.check_step(x_t)
        q, k, v = self.project(x_t)
        t = self.terms(q, k, v, None)
        out, state = linear_attention_step(
            t.q, t.k, t.v, state, log_decay=t.log_decay, beta=t.beta, normalize=self.normalize
        )
        return self.out_proj(self.merge_heads(out)), state
