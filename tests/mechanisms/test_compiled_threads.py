"""numba's loops leave torch's thread count as they found it: numba's OpenMP layer shares the runtime with torch,
so starting it or setting its count sets torch's too (a fresh process: the layer starts on the first call)."""
import subprocess
import sys

import pytest

pytest.importorskip("numba")

SCRIPT = """
import torch
torch.set_num_threads(1)
import attnlab
from attnlab.kernels import compiled
attnlab.build("neighborhood", dim=64, heads=4, kernel_size=7)(torch.randn(1, 256, 64))  # served by the numba loops
print(torch.get_num_threads(), compiled.numba_module().get_num_threads())
"""


def test_numba_path_restores_torch_threads():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    torch_threads, numba_threads = map(int, done.stdout.split())
    assert torch_threads == 1
    assert numba_threads >= 1
