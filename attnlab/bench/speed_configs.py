"""What `attnlab bench speed` measures: its options and budgets, the configurations, the budget rules.

A configuration is one mechanism at one N, mode, causal flag and dtype, with its benchmark
parameters (`bench_params`, a user's `--param`) and the budgets that can change its result;
`make_configs` lists a run's, series by series. `predict_over_budget` skips a configuration
its series' smaller N's predict to exceed a budget. The worker that measures one is
`attnlab.bench.speed_worker`, the run `attnlab.bench.speed`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..catalogue import import_modules, imported_modules
from ..core.errors import ParameterError
from ..core.registry import BATCH_FIRST_PARAM, CAUSAL_PARAM, COMMON_PARAMS, Spec, get
from .compare import loglog_slope
from .store import canonical

SUITE = "speed"
MODES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
_COMMON_NAMES = {p.name for p in COMMON_PARAMS} | {CAUSAL_PARAM.name, BATCH_FIRST_PARAM.name}  # set by the harness


def machine_memory_bytes() -> int:
    """Physical memory of the machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class SpeedOptions:
    """What a speed run measures and its budgets (time per configuration, peak memory)."""

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    modes: tuple[str, ...] = MODES
    dtype: str = "float32"
    causal: bool = False
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    threads: int | None = None  # None: torch's default
    budget_s: float = 10.0
    memory_budget_bytes: int = field(default_factory=lambda: machine_memory_bytes() // 2)
    repeats: int = 20  # at most this many timed calls
    total_s: float | None = None  # start no configuration after this many seconds (the rest: next run)
    rerun: bool = False
    quiet: bool = False
    run_id: str | None = None  # the run's id (default: a new one per run_speed call)
    lengths_for: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # mechanism -> its own lengths
    min_rounds: int = 0  # total_s does not stop the first rounds (each series' first N): 3 fit an exponent
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # mechanism -> its --param values

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths: expected positive integers, got {list(self.lengths)}")
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"modes: expected some of {list(MODES)}, got {list(self.modes)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        for name in ("batch", "heads", "head_dim", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected >= 1, got {self.threads}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s: expected > 0 seconds, got {self.budget_s}")
        if self.total_s is not None and self.total_s <= 0:
            raise ValueError(f"total_s: expected > 0 seconds or None, got {self.total_s}")
        if self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes: expected > 0, got {self.memory_budget_bytes}")

    def budget(self) -> dict[str, Any]:
        """The caps that can change a result, part of every configuration: seconds per configuration,
        timed calls at most, peak memory."""
        return {"time_s": self.budget_s, "repeats": self.repeats, "memory_bytes": self.memory_budget_bytes}

    def resolved_threads(self) -> int:
        return self.threads if self.threads is not None else torch.get_num_threads()


# -- configurations -------------------------------------------------------------------
def grid_for(n: int, rank: int) -> list[int]:
    """The rank-D cube grid whose token count is nearest to n: grid_for(8192, 2) == [91, 91]."""
    low = max(1, math.floor(n ** (1.0 / rank)))
    while (low + 1) ** rank <= n:  # guard against float rounding of the root
        low += 1
    side = min((low, low + 1), key=lambda s: (abs(s**rank - n), s))
    return [side] * rank


def grid_rank(spec: Spec) -> int:
    """1 for a mechanism of token sequences, else the smallest grid rank it supports."""
    grids = spec.supports.grids if spec.supports is not None else (1,)
    return 1 if 1 in grids else min(grids)


def bench_params(spec: Spec, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The mechanism's own parameters for the benchmark: defaults, the test value of required ones,
    then `overrides` (a user's `--param`, checked by `parse_params`).

    A required parameter without a value in the registry's `test_params` is left out
    (building the module then fails and the configuration is recorded as an error).
    """
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.name in _COMMON_NAMES:
            continue
        if not p.required:
            out[p.name] = p.default
        elif p.name in spec.test_params:
            out[p.name] = spec.test_params[p.name]
    out.update(overrides or {})
    return json.loads(canonical(out))  # tuples -> lists, as stored


def import_user_modules(names: Sequence[str] | None) -> None:
    """Import a user's `--import` modules not imported yet in this process (a .py file runs once)."""
    import_modules([name for name in names or () if name not in imported_modules()])


def parse_params(items: Sequence[str], mechanisms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--param MECHANISM.NAME=VALUE` items -> {mechanism: {name: value}}, each checked by its registry Param.

    VALUE is read as JSON (`64`, `0.5`, `true`, `[2, 4]`, `null`), else taken as a string. The
    mechanism must be among `mechanisms` (those the run measures); the width, heads and causal
    flag are the benchmark's own options, not parameters. Errors are ParameterError naming the item.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, text = item.partition("=")
        mechanism, dot, name = head.strip().rpartition(".")
        if not eq or not dot or not mechanism or not name:
            raise ParameterError(f"--param: expected MECHANISM.NAME=VALUE (e.g. sliding-window.radius=64), got {item!r}")
        if mechanism not in mechanisms:
            raise ParameterError(
                f"--param: expected one of the measured mechanisms ({', '.join(mechanisms)}), got {mechanism!r} in {item!r}"
            )
        spec = get(mechanism)
        if name in _COMMON_NAMES:
            raise ParameterError(f"--param: {name!r} is set by the benchmark's own options, not per mechanism ({item!r})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        checked = spec.param(name).validate(spec.name, value)  # ParameterError: unknown name, type, range
        out.setdefault(mechanism, {})[name] = json.loads(canonical(checked))
    return out


def make_configs(specs: Sequence[Spec], options: SpeedOptions, *, lengths: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """The configurations of a run, series by series (mechanism, mode), lengths increasing.

    `lengths` (then `options.lengths_for`) overrides `options.lengths` for some mechanisms. A mechanism that runs only
    causally is measured causally whatever `options.causal` says (its config says so).
    A mechanism whose keys are summaries gets "n_keys", the keys its core attends to (None
    where it refuses the grid, or cannot be built).
    """
    threads = options.resolved_threads()
    out = []
    for spec in specs:
        causal = options.causal or causal_only(spec)
        rank = grid_rank(spec)
        params = bench_params(spec, options.params.get(spec.name))
        ns = (lengths or {}).get(spec.name) or options.lengths_for.get(spec.name) or options.lengths
        module = None
        if summary_keys(spec):
            try:
                module = build_module(spec, params, options.heads, options.head_dim, causal)
            except ParameterError:
                pass  # the worker says why ("unsupported")
        for mode in options.modes:
            seen = set()
            for n in sorted(ns):
                grid = grid_for(n, rank) if rank > 1 else None
                tokens = math.prod(grid) if grid else n
                if tokens in seen:
                    continue
                seen.add(tokens)
                config = {
                    "mechanism": spec.name, "impl": "attnlab", "params": params, "n": tokens, "grid": grid,
                    "mode": mode, "causal": causal, "dtype": options.dtype, "batch": options.batch,
                    "heads": options.heads, "head_dim": options.head_dim, "threads": threads,
                    "budget": options.budget(),
                }
                if summary_keys(spec):
                    config["n_keys"] = None
                    if module is not None:
                        with contextlib.suppress(ParameterError):
                            config["n_keys"] = key_count(spec, module, grid or [tokens])
                out.append(config)
    return out


def summary_keys(spec: Spec) -> bool:
    """Whether the mechanism's keys are summaries of the tokens, `key_count(grid)` of them (registry)."""
    return spec.supports is not None and spec.supports.summary_keys


def build_module(spec: Spec, params: Mapping[str, Any], heads: int, head_dim: int, causal: bool) -> Any:
    """The mechanism at the benchmark's width (heads · head_dim), with its benchmark parameters."""
    names = {p.name for p in spec.params}
    width = {"heads": heads, "head_dim": head_dim}  # an entry without them (a pooling, say) is built at dim alone
    kwargs = {"dim": heads * head_dim, **{k: v for k, v in width.items() if k in names}, **params}
    if spec.supports is not None and spec.supports.causal:
        kwargs["causal"] = causal
    return spec.build(**kwargs)


def key_count(spec: Spec, module: Any, positions: Sequence[int]) -> int:
    """The number of keys the core of a summary-key mechanism attends to on `positions` (its grid, or
    (n,)); ParameterError (the configuration is "unsupported") when the mechanism refuses the grid."""
    try:
        return int(module.key_count(tuple(positions)))
    except ValueError as err:
        raise ParameterError(str(err)) from err


def causal_only(spec: Spec) -> bool:
    """Whether the mechanism runs only causally (a scan, say), as its registry entry declares."""
    return spec.supports is not None and spec.supports.causal_only


def unsupported(spec: Spec, config: Mapping[str, Any]) -> str | None:
    """Why `spec` cannot run `config`, or None."""
    supports = spec.supports
    if supports is None:
        return None
    if config["causal"] and not supports.causal:
        return f"{spec.name} has no causal mode"
    if config["dtype"] not in supports.dtypes:
        return f"{spec.name} supports dtypes {', '.join(supports.dtypes)}, not {config['dtype']}"
    return None


def empty_metrics(note: str | None = None, **extra: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "median_s": None, "min_s": None, "max_s": None, "q1_s": None, "q3_s": None, "repeats": 0, "peak_mem_bytes": None,
        "flops": None, "flops_per_s": None, "max_abs_diff": None,
    }
    if note:
        metrics["note"] = note
    metrics.update(extra)
    return metrics


def predict_over_budget(
    config: Mapping[str, Any],
    history: Sequence[tuple[int, Mapping[str, Any]]],
    exponent: float | None,
    budget_s: float,
    memory_budget_bytes: int,
) -> tuple[str, str] | None:
    """(status, note) when `config` would exceed a budget, predicted from the ok N's before it in its series.

    Fixed costs dominate small N, so scaling the last time by (N / N_prev)^declared
    exponent overestimates (it predicted 2.9 s for dense SDPA forward+backward at
    N=1024 from N=256; it took 0.5 s). The prediction therefore scales by the slope
    between the last two ok points, clipped to [1, declared exponent] (1 after a single
    point): a skipped configuration is one that would exceed its budget even so. A
    configuration needs a warm-up and a timed call, so it is over time when twice the
    predicted call exceeds the budget. Peak memory scales linearly from the last point.
    An underestimate costs at most the kill time limit (time) or a failed allocation
    (memory, the worker's address space being limited).
    """
    if not history:
        return None
    prev_n, prev = history[-1]
    high = exponent if exponent is not None else 2.0
    slope = 1.0
    if len(history) >= 2 and history[-2][0] != prev_n:
        slope = loglog_slope([(float(n), m["median_s"]) for n, m in history[-2:]], min_points=2) or 1.0
    slope = min(high, max(1.0, slope))
    ratio = config["n"] / prev_n
    seconds = prev["median_s"] * ratio**slope
    if 2 * seconds > budget_s:
        return "over_time", (
            f"predicted from N={prev_n}: {seconds:.3g} s per call (N^{slope:.2f}); "
            f"warm-up and one call exceed the budget of {budget_s:g} s"
        )
    if prev.get("peak_mem_bytes") is not None and prev["peak_mem_bytes"] * ratio > memory_budget_bytes:
        return "over_memory", (
            f"predicted from N={prev_n}: peak {prev['peak_mem_bytes'] * ratio / 2**20:.0f} MiB or more "
            f"exceeds the budget of {memory_budget_bytes / 2**20:.0f} MiB"
        )
    return None
