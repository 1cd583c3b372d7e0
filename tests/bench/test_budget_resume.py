"""Resuming `bench speed` under another budget: a result stored under a smaller budget (over_time there) is no
result for the larger one. Measured with a stand-in worker (no process, no timing): the decision is the store's
and the scheduler's, never the machine's speed."""
from __future__ import annotations

from typing import Any

import pytest

from attnlab.bench import speed
from attnlab.bench.speed import SpeedOptions, empty_metrics, make_configs, run_speed
from attnlab.bench.store import ResultStore, config_hash
from attnlab.core.registry import get

LENGTHS = (64, 128)


class FakeWorker:
    """Answers every request 'ok' in 1 ms and counts the requests (class-wide)."""

    requests: list[dict[str, Any]] = []

    def __init__(self, threads: int, memory_limit: int | None, run_id: str | None = None) -> None:
        self.env = speed.run_environment(run_id or "fake", matmul=False)

    def request(self, config: dict[str, Any], **_: Any) -> dict[str, Any]:
        FakeWorker.requests.append(config)
        return {"status": "ok", "metrics": empty_metrics(median_s=1e-3, min_s=1e-3, max_s=1e-3, repeats=3)}

    def close(self) -> None:
        pass

    def kill(self) -> None:
        pass


@pytest.fixture
def fake_worker(monkeypatch: pytest.MonkeyPatch) -> type[FakeWorker]:
    FakeWorker.requests = []
    monkeypatch.setattr(speed, "Worker", FakeWorker)
    return FakeWorker


def options(budget_s: float) -> SpeedOptions:
    return SpeedOptions(lengths=LENGTHS, modes=("fwd",), budget_s=budget_s, repeats=3, threads=1,
                        memory_budget_bytes=1 << 30, quiet=True)


def store_over_time(store: ResultStore, budget_s: float) -> None:
    """softmax at every N, recorded over_time under `budget_s` (as a run stopped by that budget leaves it)."""
    env = speed.run_environment("earlier", matmul=False)
    for config in make_configs([get("softmax")], options(budget_s)):
        store.record(speed.SUITE, config, "over_time", empty_metrics("over the small budget", budget_s=budget_s), env)


def test_a_configuration_names_its_budgets() -> None:
    small, large = make_configs([get("softmax")], options(0.5)), make_configs([get("softmax")], options(5.0))
    assert [c["budget"]["time_s"] for c in small] == [0.5, 0.5] and [c["budget"]["time_s"] for c in large] == [5.0, 5.0]
    assert {config_hash(c) for c in small}.isdisjoint(config_hash(c) for c in large)
    assert [config_hash(c) for c in small] == [config_hash(c) for c in make_configs([get("softmax")], options(0.5))]


def test_over_time_under_a_smaller_budget_is_measured_again_under_a_larger_one(tmp_path, fake_worker) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    store_over_time(store, budget_s=0.5)
    results = run_speed(store, ["softmax"], options(5.0))
    assert [(r.config["n"], r.status, r.config["budget"]["time_s"]) for r in results] == [(64, "ok", 5.0), (128, "ok", 5.0)]
    assert [c["n"] for c in fake_worker.requests] == [64, 128]  # both measured, none taken from the store
    assert store.count(speed.SUITE) == 4  # the small budget's results stay, beside the new ones


def test_the_same_budget_resumes_from_the_store(tmp_path, fake_worker) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    store_over_time(store, budget_s=0.5)
    results = run_speed(store, ["softmax"], options(0.5))
    assert [(r.config["n"], r.status) for r in results] == [(64, "over_time"), (128, "over_time")]
    assert fake_worker.requests == []


def test_a_smaller_budgets_over_time_does_not_block_larger_n(tmp_path, fake_worker) -> None:
    """Over the budget at N=64 blocks N=128 in the same run; a stored over_time at N=64 under a smaller budget
    must neither be reused nor block N=128 under the larger one."""
    store = ResultStore(tmp_path / "r.sqlite")
    env = speed.run_environment("earlier", matmul=False)
    first = make_configs([get("softmax")], options(0.5))[0]
    assert first["n"] == 64
    store.record(speed.SUITE, first, "over_time", empty_metrics("over", budget_s=0.5), env)
    results = run_speed(store, ["softmax"], options(5.0))
    assert [r.status for r in results] == ["ok", "ok"], [r.metrics.get("note") for r in results]
