"""The CPU worker threads of the chunked kernels (block-sparse, neighborhood tiles).

Every torch kernel called from one thread opens an OpenMP parallel region and waits at its end
for all intra-op threads. On a loaded machine a waiting thread may not run for a whole time
slice: with 2 threads and 6 busy processes on 2 cores one small kernel took 16 ms instead of
45 µs. A chunked computation calls hundreds of kernels, so its chunks run on worker threads
instead, each running torch single-threaded (a slow worker holds up nothing but its own
chunks); the caller waits once. Pools are made once per size and kept; a forked child has
none of its parent's threads and makes its own.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_WORKER = threading.local()
os.register_at_fork(after_in_child=_POOLS.clear)


def cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_worker() -> bool:
    """Whether the calling thread is one of the workers (whose own work then runs in place)."""
    return bool(getattr(_WORKER, "active", False))


def _one_thread(ready: threading.Barrier) -> None:
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo the next line later
    torch.set_num_threads(1)  # this thread's OpenMP and MKL thread counts
    _WORKER.active = True
    ready.wait()


def pool(workers: int) -> ThreadPoolExecutor:
    """The pool of `workers` threads, each running torch on one intra-op thread (made on first use)."""
    with _LOCK:
        if workers not in _POOLS:
            threads = torch.get_num_threads()
            executor = ThreadPoolExecutor(workers, thread_name_prefix="attnlab-worker")
            ready = threading.Barrier(workers + 1)
            for _ in range(workers):  # each blocks at the barrier, so the pool starts all its threads
                executor.submit(_one_thread, ready)
            ready.wait()
            torch.set_num_threads(threads)  # the workers' set_num_threads also set the default of new threads
            _POOLS[workers] = executor
        return _POOLS[workers]


def run_parallel(tasks: Sequence[Callable[[], None]]) -> None:
    """Run every task, each on its own worker thread, and wait for all (errors re-raised); in
    place, one after another, when there is one task or the caller is a worker itself."""
    if len(tasks) <= 1 or in_worker():
        for task in tasks:
            task()
        return
    executor = pool(len(tasks))
    for future in [executor.submit(task) for task in tasks]:
        future.result()
