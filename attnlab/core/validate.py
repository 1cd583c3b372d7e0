"""Input checks in one place. Every message names the argument, what came and what was expected."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar, cast

import torch
from torch import Tensor

from .errors import DTypeError, MaskError, ParameterError, ShapeError

T = TypeVar("T")
SEQUENCE_FIRST = " (sequence-first input? build the module with batch_first=False where it has that parameter)"


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_rank(name: str, t: Tensor, ranks: int | Sequence[int], meaning: str) -> None:
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.dim() not in allowed:
        want = " or ".join(str(r) for r in allowed)
        raise ShapeError(f"{name}: expected a {want}-D tensor {meaning}, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_floating(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise DTypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_finite(name: str, t: Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf entries in a tensor of shape {tuple(t.shape)}")


def check_module_dtype(name: str, x: Tensor, module: torch.nn.Module) -> None:
    """x in the dtype of the module's floating parameters (under autocast, which casts, anything goes)."""
    if torch.is_autocast_enabled(x.device.type):
        return
    want = next((p.dtype for p in module.parameters() if p.is_floating_point()), x.dtype)
    if x.dtype != want:
        raise DTypeError(f"{name}: expected dtype {want} (the module's; convert x or the module with .to()), got {x.dtype}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, positions: int = 1, same_length: bool = False) -> None:
    """Check q, k, v of shape (batch, heads, *positions, head_dim), `positions` axes of positions.

    q and k share head_dim; k and v share their positions; batch and heads agree;
    the three share one floating dtype and device.
    """
    rank = positions + 3
    layout = "(batch, heads, " + ", ".join(f"n{i}" for i in range(positions)) + ", head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_rank(name, t, rank, layout)
        check_floating(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise DTypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got q {q.device}, k {k.device}, v {v.device}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ShapeError(f"q, k, v: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ShapeError(
            f"q, k, v: head counts differ: q has {q.shape[1]} heads, k {k.shape[1]}, v {v.shape[1]} "
            "(expected the same number of heads at dim 1)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"k: expected head_dim {q.shape[-1]} (as q), got {k.shape[-1]} in shape {tuple(k.shape)}")
    if k.shape[2:-1] != v.shape[2:-1]:
        raise ShapeError(f"v: expected positions {tuple(k.shape[2:-1])} (as k), got {tuple(v.shape[2:-1])}")
    if same_length and q.shape[2:-1] != k.shape[2:-1]:
        raise ShapeError(
            f"k: this mechanism needs as many keys as queries, got q positions {tuple(q.shape[2:-1])} "
            f"and k positions {tuple(k.shape[2:-1])}"
        )


def check_attention_mask(mask: Tensor | None, batch: int, n_k: int) -> None:
    """attention_mask: bool (batch, n_k), True where the key is a real token (transformers' convention)."""
    if mask is None:
        return
    check_tensor("attention_mask", mask)
    if mask.dtype != torch.bool:
        raise DTypeError(f"attention_mask: expected dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, n_k):
        hint = SEQUENCE_FIRST if tuple(mask.shape) == (n_k, batch) else ""
        raise MaskError(f"attention_mask: expected shape (batch, n_k) = {(batch, n_k)}, got {tuple(mask.shape)}{hint}")


def check_key_padding_mask(mask: Tensor, batch: int, n_k: int) -> None:
    """key_padding_mask in PyTorch's sense (nn.MultiheadAttention): bool (batch, n_k), True where the key is padding."""
    check_tensor("key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise DTypeError(
            "key_padding_mask: expected dtype torch.bool with True = padding (PyTorch's convention; a keep-mask with "
            f"True/1 = attend goes in attention_mask), got {mask.dtype}"
        )
    if tuple(mask.shape) != (batch, n_k):
        hint = SEQUENCE_FIRST if tuple(mask.shape) == (n_k, batch) else ""
        raise MaskError(f"key_padding_mask: expected shape (batch, n_k) = {(batch, n_k)}, got {tuple(mask.shape)}{hint}")


def check_attn_mask(mask: Tensor | None, batch: int, heads: int, n_q: int, n_k: int) -> None:
    """attn_mask: bool (True = attend) or additive float, shape (n_q, n_k) or broadcastable (batch, heads, n_q, n_k)."""
    if mask is None:
        return
    check_tensor("attn_mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise DTypeError(f"attn_mask: expected torch.bool (True = attend) or a float additive mask, got {mask.dtype}")
    full = (batch, heads, n_q, n_k)
    ok = mask.dim() == 2 and tuple(mask.shape) == (n_q, n_k)
    if mask.dim() == 4:
        ok = all(s in (1, f) for s, f in zip(mask.shape, full)) and tuple(mask.shape[-2:]) == (n_q, n_k)
    if not ok:
        raise MaskError(
            f"attn_mask: expected shape (n_q, n_k) = {(n_q, n_k)} or one broadcastable to "
            f"(batch, heads, n_q, n_k) = {full}, got {tuple(mask.shape)}"
        )
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):
        raise MaskError("attn_mask: expected no NaN in an additive mask (use -inf to block), got NaN")
    if mask.is_floating_point() and bool(torch.isposinf(mask).any()):
        raise MaskError("attn_mask: expected an additive mask below +inf (use -inf to block, a bool mask to keep), got +inf")


def check_tokens(name: str, x: Tensor, dim: int, *, grid_rank: int = 1) -> None:
    """x: (batch, *grid, dim) with `grid_rank` position axes."""
    check_tensor(name, x)
    axes = ", ".join(f"n{i}" for i in range(grid_rank)) if grid_rank > 1 else "n"
    check_rank(name, x, grid_rank + 2, f"(batch, {axes}, dim)")
    check_floating(name, x)
    if x.shape[-1] != dim:
        raise ShapeError(f"{name}: expected last dimension dim={dim}, got {x.shape[-1]} in shape {tuple(x.shape)}")
    if 0 in x.shape[:-1]:
        raise ShapeError(f"{name}: expected at least one batch element and one position on every axis, got shape {tuple(x.shape)}")


def is_int(value: object) -> bool:
    """Whether `value` is an int (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int = 1, high: int | None = None, *, meaning: str = "") -> int:
    """`value`, an int in [low, high] (a bool is not one); ParameterError naming `name` otherwise.
    `meaning`, e.g. "(query blocks per step)", follows the expectation in the message."""
    if not is_int(value) or value < low or (high is not None and value > high):  # type: ignore[operator]
        want = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ParameterError(f"{name}: expected {want}{' ' + meaning if meaning else ''}, got {value!r}")
    return value  # type: ignore[return-value]


def check_optional_int(name: str, value: object, low: int = 1, *, meaning: str = "") -> int | None:
    """None, or an int >= `low`; ParameterError naming `name` otherwise."""
    if value is not None and (not is_int(value) or value < low):  # type: ignore[operator]
        raise ParameterError(f"{name}: expected an int >= {low}{' ' + meaning if meaning else ''} or None, got {value!r}")
    return value  # type: ignore[return-value]


def check_ints(name: str, value: object, rank: int, low: int = 1) -> tuple[int, ...]:
    """One int >= `low` per grid axis: `value` an int (for every axis) or `rank` of them; ParameterError otherwise."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(values) != rank or not all(is_int(x) for x in values):
        raise ParameterError(f"{name}: expected an int or {rank} of them (one per grid axis), got {value!r}")
    ints = cast("tuple[int, ...]", values)  # each checked to be an int above
    if any(x < low for x in ints):
        raise ParameterError(f"{name}: expected ints >= {low} (one per grid axis), got {value!r}")
    return ints


def check_bools(name: str, value: object, rank: int) -> tuple[bool, ...]:
    """One bool per grid axis: `value` a bool (for every axis) or `rank` of them; ParameterError otherwise."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(values) != rank or not all(isinstance(x, bool) for x in values):
        raise ParameterError(f"{name}: expected a bool or {rank} of them (one per grid axis), got {value!r}")
    return values  # type: ignore[return-value]


def check_pair(name: str, value: object) -> tuple[int, int]:
    """(rows, columns) from an int (both) or a pair of positive ints; ParameterError otherwise."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or any(not is_int(x) or x < 1 for x in values):
        raise ParameterError(f"{name}: expected a positive int or two of them (rows, columns), got {value!r}")
    return values  # type: ignore[return-value]


def check_odd(name: str, value: object, low: int = 1, *, meaning: str = "") -> int:
    """`value`, an odd int >= `low`; ParameterError otherwise (`meaning` as in check_int)."""
    if not is_int(value) or value < low or value % 2 == 0:  # type: ignore[operator]
        raise ParameterError(f"{name}: expected an odd int >= {low}{' ' + meaning if meaning else ''}, got {value!r}")
    return value  # type: ignore[return-value]


def check_choice(name: str, value: object, choices: Sequence[T]) -> T:
    """`value` if it is one of `choices`; ParameterError listing them otherwise."""
    if value not in choices:
        raise ParameterError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_grid_shape(
    name: str, value: object, ranks: Sequence[int], error: type[ValueError] = ParameterError
) -> tuple[int, ...]:
    """A grid shape: len in `ranks`, positive ints; `error` (a parameter's by default) otherwise."""
    values = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) not in ranks or any(not is_int(g) or g < 1 for g in values):
        raise error(f"{name}: expected {either(ranks)} positive ints (one per grid axis), got {value!r}")
    return values


def check_scale(scale: object, head_dim: int) -> float:
    """The logit scale in use: 1/√head_dim for None, else `scale` as a finite float; ParameterError otherwise."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ParameterError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def either(ranks: Sequence[int]) -> str:
    """Ranks in words: (2,) -> 2, (2, 3) -> 2 or 3, (1, 2, 3) -> 1, 2 or 3."""
    words = [str(r) for r in ranks]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"

