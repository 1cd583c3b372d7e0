"""Large CPU buffers of the compiled loops: advised into transparent huge pages, and recycled between calls.

Writing memory the process has not touched yet costs a page fault per 4 KiB page, each zeroing its page: on
this 2-core VM `attnlab bench limits` measures that first touch at 2–3 GB/s ("fresh"), 8–9 GB/s in
transparent huge pages ("fresh_huge"), against ~25 GB/s for a streaming write. A 1-D neighborhood forward
at N = 65,536 (8 heads of 64) returns 128 MiB: ~55 ms of first touch in small pages, more than the whole
computation at kernel 7. glibc hands buffers above its mmap threshold (at most 32 MiB) back to the kernel
on free, so every call pays it again.

`fresh` advises a new tensor's whole huge pages with madvise(MADV_HUGEPAGE) (a hint on that mapping only:
no allocator or process setting; where the kernel does not take it the tensor stays in small pages).

`recycled` is a small caching allocator, as PyTorch's is on CUDA: a CPU buffer of at least
RECYCLE_MIN_BYTES is allocated once (by `fresh`) and kept; the tensor handed out is
`torch.from_numpy` of a numpy view of it, and a weak reference to that view says when the tensor, every
view of it and every array of its memory are gone (the view lives as long as the storage that holds it);
the buffer then serves the next request of the same byte size. What the recycler holds, in use and idle,
stays within POOL_BYTES; past it a request gets a `fresh` tensor that is not kept. `release()` frees the
idle buffers; `held_bytes()` says what is held. The contents of a recycled buffer are whatever its last
user left: the loops write every element of what they take.
"""
from __future__ import annotations

import ctypes
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
# Buffers below two huge pages are left to the allocator (glibc reuses them from its heap).
RECYCLE_MIN_BYTES = 2 * HUGE_PAGE
# All buffers the recycler holds, in use or idle (a 1-D fwd+bwd at N = 65,536 with 8 heads of 64 takes ~560 MiB).
POOL_BYTES = 1 << 30


@lru_cache(maxsize=1)
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn  # type: ignore[no-any-return]


def fresh(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised tensor of like's dtype and device; on the CPU, if it spans at least two huge pages,
    its whole huge pages advised into transparent huge pages (before anything touches them)."""
    out = like.new_empty(shape)
    madvise = _madvise()
    size = out.numel() * out.element_size()
    if madvise is not None and out.device.type == "cpu" and size >= 2 * HUGE_PAGE:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        stop = (out.data_ptr() + size) // HUGE_PAGE * HUGE_PAGE
        if stop > start:
            madvise(start, stop - start, MADV_HUGEPAGE)  # a hint: failure leaves small pages
    return out


@dataclass
class _Buffer:
    """One kept allocation: its bytes (a uint8 array over a `fresh` tensor's memory) and a weak reference to
    the view its current user's tensor holds (None: never handed out)."""

    memory: np.ndarray
    user: weakref.ref[np.ndarray] | None = None

    def idle(self) -> bool:
        return self.user is None or self.user() is None


_BUFFERS: list[_Buffer] = []
_LOCK = threading.Lock()


def recycled(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised contiguous tensor of like's dtype and device of `shape`: on the CPU, from at least
    RECYCLE_MIN_BYTES, an idle kept buffer of its byte size if there is one, else a new one (kept while the
    recycler holds at most POOL_BYTES); elsewhere, or smaller, `fresh`."""
    size = like.element_size()
    for extent in shape:
        size *= extent
    if like.device.type != "cpu" or size < RECYCLE_MIN_BYTES:
        return fresh(like, *shape)
    with _LOCK:
        buffer = next((b for b in _BUFFERS if b.memory.nbytes == size and b.idle()), None)
        if buffer is None and sum(b.memory.nbytes for b in _BUFFERS) + size <= POOL_BYTES:
            buffer = _Buffer(fresh(torch.empty(0, dtype=torch.uint8), size).numpy())
            _BUFFERS.append(buffer)
        if buffer is None:
            return fresh(like, *shape)
        view = buffer.memory[:]
        buffer.user = weakref.ref(view)
    return torch.from_numpy(view).view(like.dtype).view(shape)


def recycled_array(dtype: np.dtype, *shape: int) -> np.ndarray:
    """`recycled` as an uninitialised numpy array of dtype (for the loops' own scratch)."""
    return recycled(torch.from_numpy(np.empty(0, dtype)), *shape).numpy()


def held_bytes() -> tuple[int, int]:
    """(bytes the recycler holds, of them idle)."""
    with _LOCK:
        return sum(b.memory.nbytes for b in _BUFFERS), sum(b.memory.nbytes for b in _BUFFERS if b.idle())


def release() -> int:
    """Free the recycler's idle buffers; the bytes freed."""
    with _LOCK:
        idle = [b.idle() for b in _BUFFERS]
        freed = sum(b.memory.nbytes for b, free in zip(_BUFFERS, idle) if free)
        _BUFFERS[:] = [b for b, free in zip(_BUFFERS, idle) if not free]
    return freed


def recycling_line() -> str:
    """What the recycler does, for the `attnlab info` lines of the engines that use it."""
    return (f"their CPU outputs and gradients from {RECYCLE_MIN_BYTES >> 20} MiB are recycled between calls "
            f"(attnlab.kernels.buffers: at most {POOL_BYTES >> 20} MiB held; buffers.release() frees the idle ones)")
