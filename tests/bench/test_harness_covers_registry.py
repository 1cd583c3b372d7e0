"""Every registered mechanism runs in the speed harness's call (fwd+bwd), with the inputs it builds."""
import math

import pytest

import attnlab
from attnlab.bench import speed


@pytest.mark.parametrize("name", [s.name for s in attnlab.list_mechanisms()])
def test_harness_builds_and_runs_every_mechanism(name: str) -> None:
    spec = attnlab.get(name)
    rank = speed.grid_rank(spec)
    grid = speed.grid_for(256, rank) if rank > 1 else None
    config = {
        "mechanism": name, "impl": "attnlab", "params": speed.bench_params(spec),
        "n": math.prod(grid) if grid else 256, "grid": grid, "mode": "fwd+bwd",
        "causal": spec.supports.causal_only, "dtype": "float32", "batch": 1, "heads": 2, "head_dim": 8, "threads": 1,
    }
    speed.prepare_call(spec, config)()  # raises where the harness and the mechanism disagree on shapes
