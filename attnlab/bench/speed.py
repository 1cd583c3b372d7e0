"""`attnlab bench speed`: time and peak memory of every mechanism against N.

Configurations are mechanisms × lengths × modes ("fwd", "fwd+bwd") at one dtype and
causal flag; each is measured in a worker process (`python -m attnlab.bench.speed
--worker`) under a time and a memory budget, which are part of the configuration. What
is timed, the budget rules, the worker and the peak-memory probe are described in
docs/bench.md ("Speed: what is measured, and how"); the comparison rules (which results
may be compared, ratios, exponents, flags) are `attnlab.bench.compare`.

This module is the run (`run_speed`: the schedule in rounds, resuming, the budgets'
verdicts); the options and configurations are `attnlab.bench.speed_configs`, the worker
process and the parent's handle on it `attnlab.bench.speed_worker`. Their public names are
importable from here too.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..core.registry import module_entry
from .compare import BASELINE, fit_exponents, flags, loglog_slope, sdpa_ratios
from .env import new_run_id, run_environment
from .progress import progress, say
from .speed_configs import (
    DEFAULT_LENGTHS,
    DTYPES,
    MODES,
    SUITE,
    SpeedOptions,
    bench_params,
    build_module,
    causal_only,
    empty_metrics,
    grid_for,
    grid_rank,
    import_user_modules,
    key_count,
    machine_memory_bytes,
    make_configs,
    parse_params,
    predict_over_budget,
    summary_keys,
    unsupported,
)
from .speed_worker import (
    BACKWARD_FLOPS_FACTOR,
    MEMORY_SLACK_BYTES,
    STARTUP_TIMEOUT_S,
    TARGET_S,
    Worker,
    WorkerDied,
    flops_of,
    measure_config,
    prepare_call,
    worker_main,
)
from .store import Result, ResultStore, config_hash

__all__ = [
    "BACKWARD_FLOPS_FACTOR", "BASELINE", "DEFAULT_LENGTHS", "DTYPES", "KILL_SLACK_S", "MEMORY_SLACK_BYTES", "MODES",
    "STARTUP_TIMEOUT_S", "SUITE", "TARGET_S", "Series", "SpeedOptions", "Worker", "WorkerDied", "bench_params",
    "build_module", "causal_only", "empty_metrics", "fit_exponents", "flops_of", "grid_for", "grid_rank",
    "import_user_modules", "key_count", "loglog_slope", "machine_memory_bytes", "make_configs", "measure_config",
    "parse_params", "predict_over_budget", "prepare_call", "run_environment", "run_speed", "sdpa_ratios",
    "summary_keys", "unsupported", "worker_main",
]

KILL_SLACK_S = 10.0  # beyond twice the budget before a configuration is killed
Series = tuple[str, str, bool]  # (mechanism, mode, causal)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rounds(
    configs: Sequence[dict[str, Any]], modes: Sequence[str], names: Sequence[str]
) -> list[tuple[int, dict[str, Any]]]:
    """`configs` in rounds: the k-th N of every series (mechanism, mode, causal) in round k, the baseline's N in
    the first round another series needs it or a larger N (so each series still goes up in N); within a round
    by N, mode and mechanism. (round, config) pairs."""
    index: dict[int, int] = {}  # id(config) -> its round
    series: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for c in configs:
        series.setdefault((c["mechanism"], c["mode"], c["causal"]), []).append(c)
    first_round: dict[tuple[int, str], int] = {}  # (N, mode) -> the first round a non-baseline series has it
    for (name, _, _), members in series.items():
        for k, c in enumerate(sorted(members, key=lambda c: c["n"])):
            index[id(c)] = k
            if name != BASELINE:
                key = (c["n"], c["mode"])
                first_round[key] = min(first_round.get(key, k), k)
    for (name, _, _), members in series.items():
        if name != BASELINE:
            continue
        soonest = math.inf  # a smaller N of the baseline is never scheduled after a larger one
        for c in sorted(members, key=lambda c: c["n"], reverse=True):
            soonest = min(soonest, index[id(c)], first_round.get((c["n"], c["mode"]), math.inf))
            index[id(c)] = int(soonest)
    ordered = sorted(configs, key=lambda c: (index[id(c)], c["n"], modes.index(c["mode"]), names.index(c["mechanism"])))
    return [(index[id(c)], c) for c in ordered]


def run_speed(store: ResultStore, mechanisms: Sequence[str], options: SpeedOptions) -> list[Result]:
    """Measure `mechanisms` (and "softmax", the baseline) under `options`; the results, series by series.

    Configurations stored already are taken from the store (the budgets are part of a
    configuration), except with `options.rerun`: then a stored result is replaced once its
    new measurement is recorded, in the same transaction (a rerun stopped midway leaves
    it). The run goes round by round: every series (mechanism, mode, causal) at its
    smallest N, then every series at its second N, and so on (the baseline at an N in the
    first round any series needs it), in one worker process restarted only when killed or
    dead, so that a run stopped by `options.total_s` has every mechanism at its first k
    lengths; the configurations it did not reach are not recorded, and the next run
    measures them.
    """
    names = [BASELINE, *(m for m in dict.fromkeys(mechanisms) if m != BASELINE)]
    specs = [module_entry(name) for name in names]
    needed = {math.prod(grid_for(n, grid_rank(s))) for s in specs
              for n in (options.lengths_for.get(s.name) or options.lengths)}
    baseline_lengths = sorted(set(options.lengths) | needed)
    configs = make_configs(specs[:1], options, lengths={BASELINE: baseline_lengths})
    if not options.causal and any(causal_only(s) for s in specs):  # the baseline of causal-only mechanisms
        configs += make_configs(specs[:1], replace(options, causal=True), lengths={BASELINE: baseline_lengths})
    configs += make_configs(specs[1:], options)
    schedule = _rounds(configs, options.modes, names)
    by_name = {s.name: s for s in specs}
    stored = {r.config_hash: r for r in store.results(SUITE)}
    run_id = options.run_id or new_run_id()
    with _threads(options.resolved_threads()):
        parent_env = run_environment(run_id)  # (the env of results decided here, without a measurement)
    run_env: dict[str, Any] | None = None  # the worker's: the same run, start time and load

    _warn_if_loaded(options)
    history: dict[Series, list[tuple[int, Mapping[str, Any]]]] = {}  # series -> its ok (N, metrics)
    blocked: dict[Series, tuple[str, str]] = {}  # series -> (status, note) for larger N
    worker: Worker | None = None
    timeout = 2 * options.budget_s + KILL_SLACK_S
    deadline = None if options.total_s is None else time.monotonic() + options.total_s
    not_reached = 0
    try:
        for k, config in progress(schedule, total=len(schedule), desc="speed", quiet=options.quiet):
            spec, key = by_name[config["mechanism"]], (config["mechanism"], config["mode"], config["causal"])
            h = config_hash(config)
            existing = stored.get(h)
            replace_old = options.rerun  # replaced when the new result is recorded, not before
            if replace_old:
                existing = None
            elif existing is None and store.done(SUITE, config):  # a concurrent run measured it meanwhile
                existing = next(r for r in store.results(SUITE) if r.config_hash == h)
            if existing is not None:
                _follow(key, config, existing.status, existing.metrics, history, blocked)
                continue
            if deadline is not None and time.monotonic() > deadline and k >= options.min_rounds:
                not_reached += 1
                continue
            env = parent_env
            why = unsupported(spec, config)
            skip = ("unsupported", why) if why else blocked.get(key) or predict_over_budget(
                config, history.get(key, []), spec.exponent, options.budget_s, options.memory_budget_bytes
            )
            if skip:
                status, metrics = skip[0], empty_metrics(skip[1])
            else:
                if worker is None:
                    worker = Worker(config["threads"], options.memory_budget_bytes, run_id)
                    run_env = run_env or {**worker.env, **{k: parent_env[k] for k in ("time", "load_1m")}}
                env = run_env
                try:
                    answer = worker.request(
                        config, budget_s=options.budget_s, repeats=options.repeats,
                        module=spec.factory.__module__, timeout=timeout,
                        memory_budget_bytes=options.memory_budget_bytes,
                    )
                except WorkerDied as died:
                    worker.kill()
                    worker = None
                    answer = {"status": "error", "metrics": empty_metrics(str(died))}
                if answer is None:
                    worker.kill()
                    worker = None
                    answer = {"status": "over_time", "metrics": empty_metrics(f"killed after {timeout:g} s")}
                status, metrics = answer["status"], answer["metrics"]
            metrics.setdefault("budget_s", options.budget_s)
            metrics["memory_budget_bytes"] = options.memory_budget_bytes
            if status == "ok" and metrics["peak_mem_bytes"] is not None and metrics["peak_mem_bytes"] > options.memory_budget_bytes:
                status = "over_memory"
                metrics["note"] = f"peak {metrics['peak_mem_bytes'] / 2**20:.0f} MiB exceeds the memory budget"
            if status == "ok":
                metrics["flags"] = flags(metrics, env)
            store.record(SUITE, config, status, metrics, env, replace=replace_old)
            _follow(key, config, status, metrics, history, blocked)
    finally:
        if worker is not None:
            worker.close()
    if not_reached:
        say(f"speed: {not_reached} configurations not reached within {options.total_s:g} s; "
            "run again to measure them", quiet=options.quiet)
    order = {config_hash(c): i for i, c in enumerate(configs)}
    return sorted((r for r in store.results(SUITE) if r.config_hash in order), key=lambda r: order[r.config_hash])


def _warn_if_loaded(options: SpeedOptions) -> None:
    """Say so when other work occupies the machine: timings then are slow and noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        say(f"speed: the load average is {load:.1f} on {cores} cores; timings will be slow and noisy "
            f"(with {options.resolved_threads()} threads every parallel region waits for descheduled threads; "
            "--threads 1 suffers less)", quiet=options.quiet)


def _follow(
    key: Series,
    config: Mapping[str, Any],
    status: str,
    metrics: Mapping[str, Any],
    history: dict[Series, list[tuple[int, Mapping[str, Any]]]],
    blocked: dict[Series, tuple[str, str]],
) -> None:
    """Update a series' state after a result: the last ok N, or what blocks the larger ones."""
    if status == "ok":
        history.setdefault(key, []).append((config["n"], metrics))
    elif status in ("over_time", "over_memory") and key not in blocked:
        what = "time" if status == "over_time" else "memory"
        blocked[key] = (status, f"N={config['n']} was over the {what} budget")


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
