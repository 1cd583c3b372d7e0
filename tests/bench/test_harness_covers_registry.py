"""Every registered mechanism runs in the speed harness's call (fwd+bwd), with the inputs it builds: the call
reaches the mechanism once with the configuration's batch, heads and tokens, its output is finite, and the
backward pass gives every input a finite gradient, the queries a nonzero one (a call that skipped the mechanism or
its backward fails)."""
import functools
import math
from typing import Any

import pytest
import torch

import attnlab
from attnlab.bench import speed, speed_worker
from attnlab.core.module import Attention

HEADS, HEAD_DIM, N = 2, 8, 256


@pytest.mark.parametrize("name", [s.name for s in attnlab.list_mechanisms()])
def test_harness_builds_and_runs_every_mechanism(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = attnlab.get(name)
    seen: dict[str, Any] = {}
    build = speed.build_module

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        module = build(*args, **kwargs)
        method = module.attend if isinstance(module, Attention) else module.forward

        @functools.wraps(method)
        def record(*a: Any, **kw: Any) -> Any:
            out = method(*a, **kw)
            seen["inputs"], seen["out"], seen["calls"] = [t for t in a if isinstance(t, torch.Tensor)], out, seen.get("calls", 0) + 1
            return out

        if isinstance(module, Attention):
            module.attend = record
        else:
            module.forward = record
        seen["attention"] = isinstance(module, Attention)
        return module

    monkeypatch.setattr(speed_worker, "build_module", recording_build)  # where prepare_call finds it
    rank = speed.grid_rank(spec)
    grid = speed.grid_for(N, rank) if rank > 1 else None
    n = math.prod(grid) if grid else N
    config = {
        "mechanism": name, "impl": "attnlab", "params": speed.bench_params(spec),
        "n": n, "grid": grid, "mode": "fwd+bwd",
        "causal": spec.supports.causal_only, "dtype": "float32", "batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "threads": 1,
    }
    speed.prepare_call(spec, config)()  # raises where the harness and the mechanism disagree on shapes
    assert seen.get("calls") == 1, "the harness's call did not run the mechanism once"
    out = seen["out"]
    assert torch.isfinite(out).all()
    if seen["attention"]:  # (batch, heads, *positions, head_dim or more)
        assert out.shape[:2] == (1, HEADS) and math.prod(out.shape[2:-1]) == n, tuple(out.shape)
    else:  # (batch, *positions, heads · head_dim)
        assert out.shape[0] == 1 and math.prod(out.shape[1:-1]) == n and out.shape[-1] == HEADS * HEAD_DIM, tuple(out.shape)
    for i, t in enumerate(seen["inputs"]):
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"input {i}: no finite gradient from the backward"
    # the queries (x for a module) always reach the output; a value may not (a saturated Huber memory: miras-huber)
    assert seen["inputs"][0].grad.abs().max() > 0, "the backward gave the queries a zero gradient"
