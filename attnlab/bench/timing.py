"""Wall time and peak memory of a callable.

`measure` times repeated calls after a warm-up with `time.perf_counter`, repeating
until a time budget is spent (at least three timed calls when three fit in a limit),
and can take the peak memory of the first timed call.

`peak_memory` is the high-water resident set size (RSS) of the process during one
call, above the RSS before it. Linux resets the high-water mark when "5" is written to
/proc/self/clear_refs; VmHWM and VmRSS are then read from /proc/self/status.

This is reliable only when memory freed by the call goes back to the operating
system, so that the RSS before the next call is the true baseline and the call's own
allocations raise the mark. glibc keeps small and mid-size freed blocks in its heap,
so the speed worker runs with the environment variable MALLOC_MMAP_THRESHOLD_=65536:
glibc then serves every allocation of 64 KiB or more by mmap and unmaps it on free; and
`peak_memory` hands the heap's free pages back (`malloc_trim`) before each probe.
(glibc mmaps allocations of 32 MiB or more anyway, so the setting changes how
mid-size tensors are allocated, for every mechanism alike.) The measure includes
everything the call touches: temporaries, the autograd graph, outputs, and any code
pages it loads for the first time (which is why `measure` probes a call after the
warm-up). The kernel keeps its RSS counters per CPU and folds them in batches, so
the resolution is a few hundred KiB: a call that allocates less may read 0. Where
/proc/self/clear_refs cannot be written, the peak is None, never an estimate.
"""
from __future__ import annotations

import ctypes
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MIN_REPEATS = 3


@dataclass(frozen=True)
class Timing:
    """Seconds per call over `repeats` timed calls (each in `times`); the first one's peak memory when asked for."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    peak_mem_bytes: int | None = None
    times: tuple[float, ...] = ()


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 20,
    budget_s: float = 1.0,
    limit_s: float | None = None,
    memory: bool = False,
) -> Timing:
    """Time `fn()` after `warmup` untimed calls.

    Timed calls go on until `repeats` of them are done, or `budget_s` is spent (warm-up
    included) with at least three made, or the next one (estimated by the median so
    far) would take the total past `limit_s` (default `budget_s`). There is always one
    timed call, and three whenever three fit in the limit.

    With `memory`, the first timed call also measures its peak memory as
    `peak_memory` does (the probe is read outside the timed interval).
    """
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    if budget_s <= 0:
        raise ValueError(f"budget_s: expected > 0, got {budget_s}")
    limit = budget_s if limit_s is None else limit_s
    if limit < budget_s:
        raise ValueError(f"limit_s: expected >= budget_s ({budget_s}), got {limit}")
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    peak: int | None = None
    times: list[float] = []
    while len(times) < repeats:
        before = _reset_peak() if memory and not times else None
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if before is not None:
            peak = _read_peak(before)
        times.append(t1 - t0)
        spent = t1 - start
        if len(times) >= MIN_REPEATS and spent >= budget_s:
            break
        if spent + statistics.median(times) > limit:
            break
    return Timing(statistics.median(times), min(times), max(times), len(times), peak, tuple(times))


def _status_bytes(*keys: str) -> dict[str, int]:
    text = STATUS.read_text()
    out = {}
    for key in keys:
        found = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if found is None:
            raise OSError(f"{STATUS}: no {key} line")
        out[key] = int(found.group(1)) * 1024
    return out


def can_measure_memory() -> bool:
    """Whether this process can reset its RSS high-water mark (Linux /proc/self/clear_refs)."""
    return _reset_peak() is not None


def _reset_peak() -> int | None:
    """Reset the high-water mark; the RSS now (None where the mark cannot be reset)."""
    try:
        with CLEAR_REFS.open("w") as f:
            f.write("5")
        return _status_bytes("VmRSS")["VmRSS"]
    except OSError:
        return None


def _read_peak(before: int) -> int:
    return max(0, _status_bytes("VmHWM")["VmHWM"] - before)


def release_free_heap() -> None:
    """Give glibc's free heap pages back to the kernel (`malloc_trim(0)`); nothing where libc is not glibc.

    Blocks under the mmap threshold stay in the heap when freed: after a call that makes many
    small tensors (a token-by-token scan) the heap keeps tens of MiB resident, the next calls
    reuse them, and their peak would read 0 B.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any]) -> int | None:
    """Bytes by which the process's resident set rose at its highest during `fn()`.

    None where the high-water mark cannot be reset. See the module docstring for what
    the number includes and the allocator setting it needs.
    """
    release_free_heap()
    before = _reset_peak()
    fn()
    return None if before is None else _read_peak(before)
