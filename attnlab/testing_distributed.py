"""Running a function on several real torch.distributed processes (gloo, 127.0.0.1), for tests and examples.

    results = run_ranks(check, world=4, args=(7,), timeout=120)   # check(rank, world, 7) on 4 processes

Each rank is a fresh process started with the "spawn" method, joined to a gloo process group on a free
local port, and runs `fn(rank, world, *args)`; what it returns (picklable) comes back in rank order. An
exception in a rank is raised here with that rank's traceback; a rank still running after `timeout`
seconds is killed and TimeoutError is raised. `fn` must be importable by name (a module-level function).
"""
from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: Sequence[Any], out: Any,
               threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            out.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which raises it
        out.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, args: Sequence[Any] = (), *, timeout: float = DEFAULT_TIMEOUT_S,
              threads: int = 1) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo processes; their results in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, tuple(args), out, threads), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            try:
                rank, status, value = out.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"run_ranks: {world - len(results) - len(errors)} rank(s) of {world} gave no "
                                   f"result within {timeout:g} s") from None
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others may wait forever on the failed rank
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("run_ranks: a rank failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
