"""A memory limit checked before the large dense allocations (materialize, the float64 references).

The limit is `set_memory_limit(nbytes)`, else the environment variable ATTNLAB_MEMORY_LIMIT (bytes), else half
the machine's physical memory. A computation whose estimate is above it is refused with the estimate
(`MemoryLimitError`) instead of being killed by the system mid-way.
"""
from __future__ import annotations

import math
import os

from .errors import MemoryLimitError, ParameterError

ENV = "ATTNLAB_MEMORY_LIMIT"
_FALLBACK = 16 << 30  # where the physical memory cannot be read
_limit: int | None = None


def _physical_half() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return _FALLBACK


def set_memory_limit(nbytes: int | None) -> None:
    """Largest estimated allocation accepted, in bytes; None returns to the default (ATTNLAB_MEMORY_LIMIT or half
    the physical memory)."""
    global _limit
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1):
        raise ParameterError(f"nbytes: expected an int >= 1 or None, got {nbytes!r}")
    _limit = nbytes


def memory_limit() -> int:
    """The limit in force, in bytes."""
    if _limit is not None:
        return _limit
    env = os.environ.get(ENV)
    if env is None:
        return _physical_half()
    try:
        value = int(env)
    except ValueError:
        raise ParameterError(f"{ENV}: expected an int of bytes, got {env!r}") from None
    if value < 1:
        raise ParameterError(f"{ENV}: expected an int of bytes >= 1, got {env!r}")
    return value


def check_memory(what: str, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse a tensor of `shape` and `itemsize` bytes per element above the limit, naming the estimate."""
    nbytes = math.prod(shape) * itemsize
    limit = memory_limit()
    if nbytes > limit:
        raise MemoryLimitError(
            f"{what}: expected at most {limit / 2**30:.3g} GiB (attnlab.set_memory_limit or {ENV} raises it), "
            f"got an estimate of {nbytes / 2**30:.3g} GiB for a {shape} tensor of {itemsize}-byte elements"
        )
