"""The speed harness measures the other benched kinds too (core.registry.BENCHED: pooling, set, graph, table): `attnlab bench speed
--mechanisms all` includes them, the call of a configuration reaches the module once with the configuration's batch
and tokens, and the backward gives the tokens a finite, nonzero gradient."""
import functools
from typing import Any

import pytest
import torch

from attnlab.bench import speed, speed_worker
from attnlab.bench.cli import _mechanism_names
from attnlab.core.registry import BENCHED, benched_entries, entries

OTHER = [s.name for s in benched_entries() if s.kind != "mechanism"]


def test_all_means_every_benched_entry() -> None:
    names = _mechanism_names(["all"])
    assert set(names) == {s.name for kind in BENCHED for s in entries(kind)}
    assert set(OTHER) <= set(names) and "pre-norm-block" not in names


@pytest.mark.parametrize("name", OTHER)
def test_harness_runs_every_other_benched_entry(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = speed.module_entry(name)
    seen: dict[str, Any] = {}
    build = speed_worker.build_module

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        module = build(*args, **kwargs)
        forward = module.forward

        @functools.wraps(forward)
        def record(*a: Any, **kw: Any) -> Any:
            seen["x"], seen["out"], seen["calls"] = a[0], forward(*a, **kw), seen.get("calls", 0) + 1
            return seen["out"]

        module.forward = record
        return module

    monkeypatch.setattr(speed_worker, "build_module", recording_build)
    config = {"mechanism": name, "impl": "attnlab", "params": speed.bench_params(spec), "n": 64, "grid": None,
              "mode": "fwd+bwd", "causal": False, "dtype": "float32", "batch": 2, "heads": 4, "head_dim": 16, "threads": 1}
    speed.prepare_call(spec, config)()
    assert seen.get("calls") == 1
    x, out = seen["x"], seen["out"]
    if spec.kind == "graph":  # a batch is the disjoint union of its graphs: (batch · n nodes, dim)
        assert x.shape == (128, 64) and out.shape == (128, 64)
    else:  # (batch, n, dim); a table (batch, n rows, attributes, dim); a pooling (batch, m, dim) out
        assert x.shape[:2] == (2, 64) and x.shape[-1] == 64 and out.shape[0] == 2 and out.shape[-1] == 64
    assert torch.isfinite(out).all()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
