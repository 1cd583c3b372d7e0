"""The environment a measurement was taken in, recorded beside every result.

`environment()` is what identifies the machine and software (its `compare.fingerprint`
decides which results may be compared); `run_environment()` adds what describes one run:
its id, start time, load average at the start, and the matmul rate measured in it (the
ceiling a plausible FLOP rate stays under).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import attnlab


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    wanted = ("avx", "avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "fma", "f16c", "sse4_2", "neon", "asimd")
    return model, [f for f in flags if f in wanted]


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the attnlab checkout, or None outside a git checkout."""
    root = Path(attnlab.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """torch and attnlab versions, git commit, threads, CPU model and vector flags, Python, OS."""
    model, flags = _cpu()
    return {
        "attnlab": attnlab.__version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def new_run_id() -> str:
    """A new run id: the start time (UTC, to the second) and 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS does not tell)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


MATMUL_N = 1024  # large enough to run at the machine's GEMM rate (a 512³ product runs below SDPA's)
MATMUL_REPEATS = 5


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = MATMUL_N, repeats: int = MATMUL_REPEATS) -> float:
    """The best GFLOP/s of an n×n by n×n matmul in this process (current threads), over `repeats` calls.

    No attention call can do its products faster than this; a rate above it means a
    wrong time or a wrong FLOP count.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return round(2 * n**3 / min(times) / 1e9, 2)


def run_environment(run_id: str | None = None, *, matmul: bool = True) -> dict[str, Any]:
    """`environment()` plus this run's id, start time, load average and (with `matmul`) matmul GFLOP/s."""
    env = environment()
    env.update(run_id=run_id or new_run_id(), time=round(time.time(), 3), load_1m=load_average())
    if matmul:
        env["matmul_gflops"] = matmul_gflops()
    return env
