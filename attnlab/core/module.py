"""The common attention module: projections, heads, masks and the two paths.

A mechanism subclasses `Attention` (or a family base) and supplies

* `attend_fast(q, k, v, mask)`          -> out            (the fast path)
* `attend_reference(q, k, v, mask)`     -> (out, weights) (the plain reference)

where q, k, v are (batch, heads, *positions, head_dim). The mask contract: the core checks the
masks of a call once and builds a `Mask` (key padding keep-mask, dense mask, causal flag, grid);
each base declares in `mask_form` which part its cores take, and the core refuses every mask that
form cannot carry, in one message naming the argument:

* "dense"   (default): `mask` is the combined mask of `core.masks.combine_masks` (None, bool with
  True = attend, or additive float), broadcastable to (batch, heads, n_q, n_k), causality
  included — except on the fast path of a mechanism whose kernel applies causality itself
  (`causal_in_kernel = True`, e.g. SDPA's `is_causal`), which reads `self.causal` instead;
* "padding": `mask` is the key padding keep-mask (batch, n_k), True = real key, or None; causality
  is `self.causal`; an arbitrary attn_mask is refused (it would need the N × N matrix);
* "grid":    as "padding" with q, k, v on the grid (batch, heads, *grid, head_dim) and the keep-mask
  (batch, N) in raster order (given as (batch, N) or (batch, *grid));
* "none":    `mask` is None; every mask is refused (`mask_note` says why).

The side-input hook: a mechanism whose cores read more of the tokens than q, k, v (e.g. gates computed
from x, as GLA and DeltaNet do) declares `takes_side_input = True` and computes that input in
`side_input(x, context)`, token-aligned with the keys: (batch, n_k, s) or per head (batch, heads, n_k, s).
`forward`, `materialize` and the default `decode` compute it and `attend(q, k, v, side=...)` checks it
and hands it to the cores as the keyword `side` (only when one is given); a functional caller of `attend`
passes it explicitly, and `attend` refuses it, by name, on a mechanism that takes none.

Everything else — projections, validation, cross-attention, `materialize`, decoding (`step`:
the checks here, a mechanism's recurrence in `decode`, Attention generic in its state type) —
lives here.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import torch
from torch import Tensor, nn

from .errors import DTypeError, ParameterError, ShapeError
from .masks import combine_masks, module_keep_mask
from .memory import check_memory
from .validate import (
    SEQUENCE_FIRST,
    check_attention_mask,
    check_finite,
    check_module_dtype,
    check_qkv,
    check_tensor,
    check_tokens,
)

if TYPE_CHECKING:
    from .registry import Spec

Impl = Literal["fast", "reference"]
MaskForm = Literal["dense", "padding", "grid", "none"]
State = TypeVar("State")


@dataclass(frozen=True)
class Mask:
    """The masks of one call, checked by the core (`Attention.masks`), in every form a core may take.

    keep:   key padding keep-mask (batch, n_k), True = real key, or None;
    dense:  the combined mask broadcastable to (batch, heads, n_q, n_k) (bool True = attend, or additive),
            of padding, attn_mask and causality unless `causal`; None for forms other than "dense";
    causal: causality is left to the kernel (not in `dense`);
    grid:   the position grid of q and k, or None for a sequence.
    """

    keep: Tensor | None
    dense: Tensor | None
    causal: bool
    grid: tuple[int, ...] | None = None

    def for_core(self, form: MaskForm) -> Tensor | None:
        """The part of the mask a core of `form` takes."""
        if form == "dense":
            return self.dense
        if form in ("padding", "grid"):
            return self.keep
        return None


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, (batch, heads, n, head_dim)."""

    k: Tensor
    v: Tensor
    side: Tensor | None = None  # the side inputs of those positions (`Attention.side_input`), positions at dim -2

    @property
    def length(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module, ABC, Generic[State]):
    """Multi-head attention over tokens (batch, n, dim) with a pluggable core.

    Padding is given as `attention_mask` (batch, n_k), True/1 = attend (transformers' convention), or
    as `key_padding_mask` (batch, n_k), True = padding (PyTorch's); `batch_first=False` takes and
    returns (n, batch, dim) as nn.MultiheadAttention does.
    """

    spec: ClassVar[Spec]
    causal_in_kernel: ClassVar[bool] = False  # True: attend_fast applies self.causal itself, mask holds the rest
    mask_form: ClassVar[MaskForm] = "dense"  # the part of `Mask` the cores take (module docstring)
    mask_note: ClassVar[str] = ""  # why the form refuses what it refuses, added to the refusal
    same_length: ClassVar[bool] = False  # the cores attend within one sequence: as many keys as queries
    takes_side_input: ClassVar[bool] = False  # the cores take the keyword `side` (`side_input`, module docstring)

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(batch_first, bool):
            raise ParameterError(f"batch_first: expected a bool, got {batch_first!r}")
        if head_dim is None:
            if dim % heads:
                raise ParameterError(f"heads: dim={dim} is not divisible by heads={heads}; set head_dim explicitly")
            head_dim = dim // heads
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        self.batch_first = batch_first  # False: x, context and the output are (n, batch, dim), as in nn.MultiheadAttention
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, dim)

    # -- the two paths a mechanism supplies -------------------------------------------
    @abstractmethod
    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The fast path: (batch, heads, n_q, head_dim)."""

    @abstractmethod
    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The plain path: (out, weights (batch, heads, n_q, n_k))."""

    # -- shared machinery ---------------------------------------------------------------
    def split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q from x, k and v from context (or x): each (batch, heads, n, head_dim)."""
        src = x if context is None else context
        return self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(src)), self.split_heads(self.v_proj(src))

    def side_input(self, x: Tensor, context: Tensor | None = None) -> Tensor | None:
        """The side input of the cores computed from the tokens x (batch, n, dim) [and context (batch, m, dim)],
        aligned with the keys: (batch, n_k, s) or (batch, heads, n_k, s); None (here) for cores that read q, k, v only."""
        return None

    def check_side(self, side: Tensor | None, q: Tensor, k: Tensor) -> dict[str, Tensor]:
        """The keywords handing `side` to the cores ({} when None): refused on a mechanism that takes none, else checked
        against the core's q, k (batch, heads, *positions, head_dim): keys' positions at dim -2, q's dtype and device."""
        if side is None:
            return {}
        if not self.takes_side_input:
            got = f"shape {tuple(side.shape)}" if isinstance(side, Tensor) else type(side).__name__
            raise ValueError(f"side: {self.spec.name} takes no side input (its cores read q, k, v only), got {got}")
        check_tensor("side", side)
        batch, n_k = q.shape[0], math.prod(k.shape[2:-1])
        if side.dim() not in (3, 4) or side.shape[0] != batch or side.shape[-2] != n_k or (
            side.dim() == 4 and side.shape[1] != self.heads
        ):
            raise ShapeError(
                f"side: expected (batch, n_k, s) = ({batch}, {n_k}, s) or (batch, heads, n_k, s) = "
                f"({batch}, {self.heads}, {n_k}, s), got shape {tuple(side.shape)}"
            )
        if side.dtype != q.dtype:
            raise DTypeError(f"side: expected dtype {q.dtype} (as q), got {side.dtype}")
        if side.device != q.device:
            raise ValueError(f"side: expected device {q.device} (as q), got {side.device}")
        return {"side": side}

    def masks(
        self,
        q: Tensor,
        k: Tensor,
        attention_mask: Tensor | None,
        attn_mask: Tensor | None,
        *,
        kernel_causal: bool = False,
        grid: Sequence[int] | None = None,
    ) -> Mask:
        """The one place a call's masks are checked: refused when the entry or the form cannot take them,
        shaped for the form. `kernel_causal`: the fast kernel applies causality (not put in the dense mask)."""
        supports = self.spec.supports
        assert supports is not None
        note = f" ({self.mask_note})" if self.mask_note else ""
        if attention_mask is not None and (not supports.key_padding or self.mask_form == "none"):
            raise ValueError(
                f"attention_mask: {self.spec.name} does not support a padding mask (attention_mask or key_padding_mask){note}"
            )
        if attn_mask is not None and (not supports.attn_mask or self.mask_form != "dense"):
            raise ValueError(f"attn_mask: {self.spec.name} does not support an arbitrary attention mask{note}")
        batch, n_k = q.shape[0], math.prod(k.shape[2:-1])
        if attention_mask is not None and grid is not None and tuple(attention_mask.shape) == (batch, *grid):
            attention_mask = attention_mask.reshape(batch, n_k)
        grid = None if grid is None else tuple(grid)
        if self.mask_form != "dense":
            check_attention_mask(attention_mask, batch, n_k)
            return Mask(keep=attention_mask, dense=None, causal=self.causal, grid=grid)
        causal = kernel_causal and self.causal
        dense = combine_masks(
            batch=batch, heads=q.shape[1], n_q=q.shape[2], n_k=k.shape[2], causal=self.causal and not causal,
            attention_mask=attention_mask, attn_mask=attn_mask, dtype=q.dtype, device=q.device,
        )
        return Mask(keep=attention_mask, dense=dense, causal=causal, grid=grid)

    def combined_mask(
        self, q: Tensor, k: Tensor, attention_mask: Tensor | None, attn_mask: Tensor | None
    ) -> Tensor | None:
        """The mask the reference path of this module takes (its `mask_form`'s part of `masks`)."""
        return self.masks(q, k, attention_mask, attn_mask).for_core(self.mask_form)

    def core_view(self, q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int] | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v checked and in the layout the cores take; here (batch, heads, n, head_dim), `grid` refused."""
        if grid is not None:
            raise ValueError(f"grid: {self.spec.name} attends over a sequence, it takes no grid (got {grid!r})")
        check_qkv(q, k, v, same_length=self.same_length)
        if q.shape[1] != self.heads:
            raise ShapeError(f"q: expected {self.heads} heads at dim 1, got {q.shape[1]} in shape {tuple(q.shape)}")
        return q, k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attention_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        impl: Impl = "fast",
        grid: Sequence[int] | None = None,
        side: Tensor | None = None,
    ) -> Tensor:
        """The attention core on projected heads (batch, heads, *positions, head_dim) -> (batch, heads, *q positions,
        head_dim); a grid module also takes flat (batch, heads, N, head_dim) with `grid`. `side`: the cores' side
        input, (batch, n_k, s) or (batch, heads, n_k, s), as `side_input(x, context)` computes it."""
        qc, kc, vc = self.core_view(q, k, v, grid)
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        extra = self.check_side(side, qc, kc)
        fast = impl == "fast"
        mask = self.masks(qc, kc, attention_mask, attn_mask, kernel_causal=fast and self.causal_in_kernel,
                          grid=qc.shape[2:-1] if self.mask_form == "grid" else None)
        core = mask.for_core(self.mask_form)
        if not fast:
            self.check_dense_memory("impl='reference'", qc, kc)
        out = self.attend_fast(qc, kc, vc, core, **extra) if fast else self.attend_reference(qc, kc, vc, core, **extra)[0]
        return out.reshape(*q.shape[:-1], out.shape[-1])

    def check_dense_memory(self, what: str, q: Tensor, k: Tensor) -> None:
        """Refuse, with the estimate, a dense float64 (batch, heads, n_q, n_k) matrix above `attnlab.set_memory_limit`
        (q, k: (batch, heads, *positions, head_dim)); the reference holds a few such, so this is a lower bound."""
        n_q, n_k = math.prod(q.shape[2:-1]), math.prod(k.shape[2:-1])
        check_memory(what, (q.shape[0], q.shape[1], n_q, n_k), 8)

    def _check_inputs(self, x: Tensor, context: Tensor | None) -> None:
        check_tokens("x", x, self.dim)
        check_finite("x", x)
        check_module_dtype("x", x, self)
        if context is not None:
            if not self.spec.supports or not self.spec.supports.cross:
                raise ValueError(f"context: {self.spec.name} does not support cross-attention")
            check_tokens("context", context, self.dim)
            check_finite("context", context)
            if context.shape[0] != x.shape[0]:
                seq_first = self.batch_first and context.shape[1] == x.shape[1]
                hint = SEQUENCE_FIRST if seq_first else ""
                raise ShapeError(f"context: expected batch {x.shape[0]} (as x), got {context.shape[0]}{hint}")
            if context.dtype != x.dtype:
                raise TypeError(f"context: expected dtype {x.dtype} (as x), got {context.dtype}")

    def batch_major(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x and context as (batch, n, dim): transposed from (n, batch, dim) when batch_first is False."""
        if self.batch_first:
            return x, context
        check_tokens("x", x, self.dim)
        if context is not None:
            check_tokens("context", context, self.dim)
        return x.transpose(0, 1), None if context is None else context.transpose(0, 1)

    def keep_mask(
        self, x: Tensor, context: Tensor | None, attention_mask: Tensor | None, key_padding_mask: Tensor | None
    ) -> Tensor | None:
        """The keep-mask (batch, n_k), True = attend, of a call's padding arguments (`core.masks.module_keep_mask`):
        n_k tokens of context (or x), batch-major; on a grid the masks may also be (batch, *grid)."""
        src = x if context is None else context
        grid = tuple(src.shape[1:-1])
        return module_keep_mask(attention_mask, key_padding_mask, x.shape[0], math.prod(grid), grid)

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
        """x (batch, n, dim) [attending to context (batch, m, dim)] -> (batch, n, dim); (n, batch, dim) with batch_first=False.

        Padding: attention_mask (batch, m), True/1 = attend, or key_padding_mask (batch, m), True = padding.
        """
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(x, context)
        side = self.side_input(x, context)
        out = self.out_proj(self.merge_heads(self.attend(q, k, v, attention_mask=keep, attn_mask=attn_mask, impl=impl, side=side)))
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
        """The attention matrix (batch, heads, n_q, n_k) this module applies to x (arguments as `forward`)."""
        x, context = self.batch_major(x, context)
        self._check_inputs(x, context)
        keep = self.keep_mask(x, context, attention_mask, key_padding_mask)
        q, k, v = self.project(x, context)
        check_qkv(q, k, v)
        extra = self.check_side(self.side_input(x, context), q, k)
        self.check_dense_memory("materialize", q, k)
        return self.attend_reference(q, k, v, self.combined_mask(q, k, keep, attn_mask), **extra)[1]

    def attention_path(
        self, x: Tensor, weights: Tensor, *, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """out_proj's matrix applied to merge_heads(weights · v), without bias: (batch, n_q, dim), in the layout of forward.

        The part of the output that is linear in the attention matrix, as if out = A v; analysis
        (`capture(model, grads=True)`) adds path(A) − path(stop_grad(A)), which is zero, to route
        d loss / dA to a recorded A. `attention_mask` is the keep-mask of the call (unused here).
        """
        x, context = self.batch_major(x, context)
        with torch.no_grad():
            v = self.project(x.reshape(x.shape[0], -1, x.shape[-1]), context)[2]
        out = nn.functional.linear(self.merge_heads(weights @ v.to(weights.dtype)), self.out_proj.weight.to(weights.dtype))
        return out if self.batch_first else out.transpose(0, 1)

    def check_step(self, x_t: Tensor) -> Tensor:
        """The checks of every `step`: decoding supported, a causal module, one finite position; x_t batch-major."""
        if not self.spec.supports or not self.spec.supports.decode:
            raise ValueError(f"step: {self.spec.name} does not support incremental decoding")
        if not self.causal:
            raise ValueError("step: decoding needs a causal module (build it with causal=True)")
        check_tensor("x_t", x_t)
        x_b = self.batch_major(x_t)[0]
        check_tokens("x_t", x_b, self.dim)
        check_finite("x_t", x_b)
        check_module_dtype("x_t", x_b, self)
        if x_b.shape[1] != 1:
            layout = "(batch, 1, dim)" if self.batch_first else "(1, batch, dim) (batch_first=False)"
            raise ShapeError(f"x_t: expected one position {layout}, got shape {tuple(x_t.shape)}")
        return x_b

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Decode one position: x_t (batch, 1, dim) ((1, batch, dim) with batch_first=False) -> (y_t, state),
        equal to the causal forward. The checks are here; the mechanism's recurrence is `decode`."""
        y_t, state = self.decode(self.check_step(x_t), state)
        return (y_t if self.batch_first else y_t.transpose(0, 1)), state

    def decode(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One checked position x_t (batch, 1, dim) and the state so far (None at the start) -> (y_t (batch, 1, dim),
        the new state). The default keeps a KV cache (with the side inputs) and runs the core over it."""
        q, k, v = self.cached_qkv(x_t, state)
        side = self.side_input(x_t)
        if side is not None and state is not None and state.side is not None:
            side = torch.cat([state.side, side], dim=-2)
        return self.out_proj(self.merge_heads(self.attend(q, k, v, side=side))), KVCache(k, v, side)

    def cached_qkv(self, x_t: Tensor, state: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
        """q of x_t (batch, heads, 1, head_dim) and the keys and values so far, x_t's included, checked against the cache."""
        q, k, v = self.project(x_t)
        if state is not None:
            if not isinstance(state, KVCache):
                raise TypeError(f"state: expected a KVCache from this module's step, got {type(state).__name__}")
            if state.k.shape[0] != x_t.shape[0]:
                raise ShapeError(f"state: expected a cache of batch {x_t.shape[0]} (as x_t), got {state.k.shape[0]}")
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        return q, k, v
