"""Compiled CPU loops (numba): what the fused kernels need, and whether this installation has it.

Some kernels (neighborhood attention's direct loops, the linear family's chunk scan) are memory
bound in plain PyTorch: every step reads and writes a full tensor. A fused loop reads each input
once. numba compiles such loops on first use (cached on disk, `cache=True`, so a second process and
CI do not recompile) and runs them on its own threads (`prange`). numba is optional (the `cpu`
extra, also in `analysis`); a kernel that has a compiled path says which path serves in its
registry entry's `backend` (shown by `attnlab info`), never silently.

Compiled loops serve only CPU tensors of float32 or float64 that do not require a device; a
tensor elsewhere (CUDA, half precision) takes the kernel's PyTorch path, which the entry names.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

INSTALL = "pip install 'attnlab[cpu]'"
DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=1)
def numba_module() -> ModuleType | None:
    """numba, or None when it is not installed (or does not import)."""
    try:
        import numba
    except Exception:  # noqa: BLE001 - any import failure means "not available", reported by numba_status
        return None
    return numba


def numba_status() -> str:
    """One line for `attnlab info`: the numba version in use, or why there is none and how to get it."""
    numba = numba_module()
    if numba is None:
        return f"numba is not installed ({INSTALL})"
    return f"numba {numba.__version__}"


def serves(*tensors: Tensor) -> bool:
    """Whether the compiled loops serve these tensors: numba present, all on the CPU, float32/float64, one dtype."""
    if numba_module() is None:
        return False
    dtype = tensors[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dtype for t in tensors) and dtype in DTYPES


@contextlib.contextmanager
def numba_threads(workers: int) -> Iterator[None]:
    """numba's thread count set to `workers` (capped by its pool) for the duration, restored after; torch's count is
    restored too, since numba's OpenMP layer shares the OpenMP runtime with torch and setting one sets the other."""
    numba = numba_module()
    assert numba is not None
    torch_before = torch.get_num_threads()  # first: numba's first call may start its OpenMP layer, which sets torch's
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(workers, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)
        torch.set_num_threads(torch_before)
