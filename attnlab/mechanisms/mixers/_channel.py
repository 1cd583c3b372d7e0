"""The module side shared by attention over channels instead of tokens (XCiT's cross-covariance
attention, DaViT's channel group attention): per head a (d, d) channel matrix A pooled over all
tokens, out_n = A v_n. The only mask is a key padding mask; padded tokens are set to zero, and
an element with no real token has A = 0. There is no token×token matrix: `materialize` raises,
`channel_attention(x)` gives A.
"""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ...core.errors import ShapeError
from ...core.module import Attention
from ...core.validate import check_attention_mask, check_qkv


def check_channel_qkv(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, channels: str) -> None:
    """q, k, v (batch, heads, n, d) on the same tokens, v with as many channels as k (`channels` names
    that count in the message, e.g. "head_dim 8" or "C_g = 8 channels"), and the key padding mask."""
    check_qkv(q, k, v, same_length=True)
    if v.shape[-1] != k.shape[-1]:
        raise ShapeError(
            f"v: expected {channels} (as k: A mixes the value channels), got {v.shape[-1]} in shape {tuple(v.shape)}"
        )
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])


def drop_padding(t: Tensor, attention_mask: Tensor | None) -> Tensor:
    """t (batch, heads, n, d) with the padded tokens set to zero."""
    return t if attention_mask is None else t * attention_mask[:, None, :, None].to(t.dtype)


def any_real(a: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The channel matrices a (batch, heads, d, d), zero for elements without a real token."""
    return a if attention_mask is None else a * attention_mask.any(-1)[:, None, None, None].to(a.dtype)


class ChannelAttention(Attention):
    """Base of the channel-attention modules: `channel_attention(x)` is A (batch, heads, d, d) from
    `attend_reference`, `materialize` raises ValueError; `channel_axes` names A's axes in its message."""

    channel_axes: ClassVar[str]
    mask_form = "padding"  # the key padding keep-mask (batch, n): each token mixes only its own value channels

    def channel_attention(self, x: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """A (batch, heads, d, d) for x (batch, n, dim): row i weighs the value channels mixed into output channel i."""
        self._check_inputs(x, None)
        q, k, v = self.project(x)
        check_qkv(q, k, v)
        return self.attend_reference(q, k, v, self.combined_mask(q, k, attention_mask, None))[1]

    def materialize(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """No (n_q, n_k) token matrix: raises ValueError; see `channel_attention`."""
        raise ValueError(
            f"materialize: {self.spec.name} has no token×token attention matrix (each token mixes only its own "
            f"value channels); use channel_attention(x) for the (batch, heads, {self.channel_axes}) channel attention"
        )
