"""The module base of the linear family: `LinearAttention` runs the engine of `attnlab.kernels.linear_scan`
(attention through a d_k × d_v state) on the terms a mechanism supplies."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

from torch import Tensor

from ...core.module import Attention, State
from ...kernels.linear_scan import (
    LinearTerms,
    check_chunk_size,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)


class LinearAttention(Attention[State]):
    """Base module of the linear family: subclasses implement `terms`, the rest is shared.

    `normalize`: divide each output by φ(q)ᵀz (rows of the implicit matrix sum to 1);
    `chunk_size`: the chunk of the causal fast path. The cores take the key padding keep-mask
    (batch, n_k) (`mask_form = "padding"`) — causality is `self.causal`, since a causal mask would
    be an N × N tensor. Arbitrary attention masks are refused: they need the N × N matrix.
    A subclass whose terms read a side input (`takes_side_input`) overrides the cores and `decode`
    and runs `scan`, `scan_reference` and `step_terms` on its terms.
    """

    mask_form = "padding"
    mask_note = "it would need the N × N matrix the linear family avoids"

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

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return self.scan(self.terms(q, k, v, mask), mask)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.scan_reference(self.terms(q, k, v, mask), mask)

    def scan(self, t: LinearTerms, mask: Tensor | None) -> Tensor:
        """The engine's fast path on a call's terms (chunk-parallel causal, or bidirectional)."""
        return linear_attention(
            t.q, t.k, t.v, causal=self.causal, attention_mask=mask, log_decay=t.log_decay, beta=t.beta,
            normalize=self.normalize, chunk_size=self.chunk_size,
        )

    def scan_reference(self, t: LinearTerms, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The engine's float64 reference on a call's terms: (out, the implicit matrix)."""
        return linear_attention_reference(
            t.q, t.k, t.v, causal=self.causal, attention_mask=mask, log_decay=t.log_decay, beta=t.beta,
            normalize=self.normalize,
        )

    def decode(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One token with a constant-size state (a `LinearState` here; a subclass may keep more):
        (y_t (batch, 1, dim), state), equal to the causal forward."""
        q, k, v = self.project(x_t)
        return self.step_terms(self.terms(q, k, v, None), state)

    def step_terms(self, t: LinearTerms, state: Any) -> tuple[Tensor, Any]:
        """One token's terms through the recurrence: (y_t (batch, 1, dim), the new `LinearState`)."""
        out, state = linear_attention_step(
            t.q, t.k, t.v, state, log_decay=t.log_decay, beta=t.beta, normalize=self.normalize
        )
        return self.out_proj(self.merge_heads(out)), state
