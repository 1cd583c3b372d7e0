"""The README's torchrun example runs as written (2 gloo processes on CPU) and its check passes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from attnlab.testing_distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchrun_sharded_attention.py"


def test_torchrun_example_matches_the_unsharded_cache():
    # `torchrun --nproc_per_node 2 examples/torchrun_sharded_attention.py`, on a free port (tests run side by side)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(EXAMPLE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sharded prefill and decode matches the unsharded module" in done.stdout, done.stdout
    for rank in (0, 1):  # both ranks took part: the 37-token prompt split 19 + 18, the 5 new tokens on rank 1
        assert f"rank {rank}/2: {(19, 23)[rank]} cached positions" in done.stdout, done.stdout
