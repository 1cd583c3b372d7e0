"""The environment a measurement was taken in, recorded beside every result."""
from __future__ import annotations

import os
import platform
import subprocess
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
