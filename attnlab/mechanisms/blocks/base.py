"""The block base: a residual block around a registered mechanism, the token mixer.

    block = attnlab.build("pre-norm-block", dim=64, heads=4, mixer="neighborhood", mixer_params={"kernel_size": 7})

A subclass supplies `block(x, keep, impl)` -> (batch, n, dim), composing `self.mix(h, keep, impl)`
(the mixer on tokens h, with the call's keep-mask and path) with its own per-token layers. The
base builds the mixer from the catalogue (`mixer`: a mechanism name, `mixer_params`: its further
parameters; dim, heads and causal are the block's), checks the inputs and turns the padding
arguments into one keep-mask (`attention_mask` True/1 = attend, or PyTorch's `key_padding_mask`
True = padding). `impl="reference"` runs the mixer's float64-checkable reference path; the
block's own layers are the same on both paths.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor, nn

from ...core.errors import ParameterError, UnknownNameError
from ...core.masks import module_keep_mask
from ...core.registry import get
from ...core.validate import check_finite, check_module_dtype, check_tensor, check_tokens

if TYPE_CHECKING:
    from ...core.registry import Spec

Impl = Literal["fast", "reference"]


def build_mixer(mixer: str, dim: int, heads: int, causal: bool, mixer_params: dict[str, Any] | None) -> nn.Module:
    """The mechanism `mixer` with the block's dim, heads and causality and `mixer_params`."""
    if not isinstance(mixer, str):
        raise ParameterError(f"mixer: expected a mechanism name (str), got {type(mixer).__name__} {mixer!r}")
    params = dict(mixer_params or {})
    taken = sorted({"dim", "heads", "causal"} & set(params))
    if taken:
        raise ParameterError(f"mixer_params: expected the mixer's own parameters, got {taken} (the block sets them)")
    try:
        spec = get(mixer)
    except UnknownNameError as err:
        raise ParameterError(f"mixer: {err.args[0]}") from None
    supports = spec.supports
    assert supports is not None
    if causal and not supports.causal:
        raise ParameterError(f"causal: the mixer {mixer!r} has no causal mode (expected a mixer with causal support)")
    if causal and not supports.causal_only:
        params["causal"] = True
    if supports.grids == (2,) or 1 not in supports.grids:
        raise ParameterError(f"mixer: expected a mechanism over sequences, got {mixer!r} (grids {supports.grids})")
    return spec.build(dim=dim, heads=heads, **params)


class Block(nn.Module, ABC):
    """A residual block over tokens (batch, n, dim) around a registered mechanism."""

    spec: ClassVar[Spec]

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        mixer: str = "softmax",
        mixer_params: dict[str, Any] | None = None,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.dim, self.heads, self.causal = dim, heads, causal
        self.mixer = build_mixer(mixer, dim, heads, causal, mixer_params)

    def mix(self, h: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        """The mixer on tokens h (batch, n, dim) with the call's keep-mask and path."""
        return self.mixer(h, attention_mask=keep, impl=impl)

    @abstractmethod
    def block(self, x: Tensor, keep: Tensor | None, impl: Impl) -> Tensor:
        """x (batch, n, dim), keep (batch, n) or None -> (batch, n, dim)."""

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        impl: Impl = "fast",
    ) -> Tensor:
        """Tokens (batch, n, dim) -> (batch, n, dim); padding as in `Attention.forward`."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        x = check_tensor("x", x)
        check_tokens("x", x, self.dim)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        keep = module_keep_mask(attention_mask, key_padding_mask, x.shape[0], x.shape[1])
        return self.block(x, keep, impl)
