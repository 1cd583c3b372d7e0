"""What may be compared with what: the rules every ratio, exponent and table of the bench follows.

A result carries the environment it was measured in (`env.run_environment`: commit,
torch, threads, CPU, ..., plus the run's id, start time, load average and matmul rate).
Two results are *comparable* when they come from the same run (same "run_id") or from
the same environment fingerprint (same machine, software and threads: `fingerprint`);
a ratio or a fitted exponent is computed only between comparable results, and each row
says whether its numbers were reused from the store rather than measured in the current
run (`run_id` argument: the current run's id; rows then carry "reused").

Implausible values are flagged in a result's metrics ("flags", see `flags`), not
treated as data: a peak memory of 0 B, a FLOP rate above the matmul rate measured in
the same run.

Results are store `Result`s or their JSON objects ({"config", "status", "metrics",
"env"?}); a result without an env is comparable only with others without one.
"""
from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..core.errors import UnknownNameError
from ..core.registry import module_entry
from .store import Result, canonical, config_hash

BASELINE = "softmax"  # dense SDPA (its fastest form: is_causal for causal rows), the reference of every ratio
BASE_IMPL = "attnlab"
FINGERPRINT_KEYS = ("attnlab", "git_commit", "torch", "python", "platform", "cpu", "cpu_flags", "cpu_count",
                    "threads", "interop_threads", "mkldnn")
ZERO_PEAK = "zero_peak_memory"
ABOVE_MATMUL = "rate_above_matmul"
# The matmul rate is one best-of-5 measurement at the run's start; on a loaded machine it can read low
# while a later call runs unhindered. A FLOP-count or timing bug is off by far more than this margin.
MATMUL_MARGIN = 1.25
_SHAPE_KEYS = ("n", "mode", "causal", "dtype", "batch", "heads", "head_dim", "threads")
_SERIES_KEYS = ("mechanism", "impl", "params", "mode", "causal", "dtype", "batch", "heads", "head_dim", "threads")

Row = tuple[dict[str, Any], str, dict[str, Any], dict[str, Any] | None]  # config, status, metrics, env


# -- environments ---------------------------------------------------------------------------
def fingerprint(env: Mapping[str, Any] | None) -> str | None:
    """A short hash of what makes timings comparable: versions, commit, CPU, threads (FINGERPRINT_KEYS);
    not the run id, time, load or a peer's package. None for a missing or empty env."""
    if not env:
        return None
    return hashlib.sha256(canonical({k: env.get(k) for k in FINGERPRINT_KEYS}).encode()).hexdigest()[:12]


def _env(result: Result | Mapping[str, Any]) -> dict[str, Any] | None:
    return result.env if isinstance(result, Result) else result.get("env")


def comparable(a: Result | Mapping[str, Any], b: Result | Mapping[str, Any]) -> bool:
    """Whether two results may be compared: the same run id, or the same environment fingerprint."""
    ea, eb = _env(a), _env(b)
    if ea is not None and eb is not None and ea.get("run_id") is not None and ea.get("run_id") == eb.get("run_id"):
        return True
    return fingerprint(ea) == fingerprint(eb)


def _rows(results: Iterable[Result | Mapping[str, Any]]) -> list[Row]:
    out = []
    for r in results:
        if isinstance(r, Result):
            out.append((r.config, r.status, r.metrics, r.env))
        else:
            out.append((r["config"], r["status"], r["metrics"], r.get("env")))
    return out


def _comparable_envs(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    return comparable({"env": a}, {"env": b})


def _reused(env: Mapping[str, Any] | None, run_id: str | None) -> bool | None:
    """Whether a result was reused from the store (not measured in run `run_id`); None without a run id."""
    if run_id is None:
        return None
    return (env or {}).get("run_id") != run_id


# -- plausibility and spread ------------------------------------------------------------------
def flags(metrics: Mapping[str, Any], env: Mapping[str, Any] | None) -> list[str]:
    """The implausible values of one speed result: ZERO_PEAK ("zero_peak_memory": a peak of 0 B, below the
    probe's resolution or not measured right) and ABOVE_MATMUL ("rate_above_matmul": FLOP/s above the matmul
    GFLOP/s measured in the same run, env["matmul_gflops"], by more than MATMUL_MARGIN: a wrong time or FLOP count)."""
    out = []
    if metrics.get("peak_mem_bytes") == 0:
        out.append(ZERO_PEAK)
    limit = (env or {}).get("matmul_gflops")
    rate = metrics.get("flops_per_s")
    if limit and rate and rate > limit * 1e9 * MATMUL_MARGIN:
        out.append(ABOVE_MATMUL)
    return out


def spread(times: Sequence[float]) -> dict[str, float | None]:
    """min, max, first and third quartile (inclusive method; None with fewer than 2 times) of per-call seconds:
    {"min_s", "max_s", "q1_s", "q3_s"}."""
    if not times:
        return {"min_s": None, "max_s": None, "q1_s": None, "q3_s": None}
    q1 = q3 = None
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"min_s": min(times), "max_s": max(times), "q1_s": q1, "q3_s": q3}


# -- exponents ----------------------------------------------------------------------------------
def loglog_slope(points: Sequence[tuple[float, float]], *, min_points: int = 3) -> float | None:
    """Least-squares slope of log y against log x; None with fewer than `min_points` distinct x."""
    if len({x for x, _ in points}) < max(2, min_points):
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _declared_exponent(name: str) -> float | None:
    try:
        return module_entry(name).exponent
    except UnknownNameError:
        return None


def fit_exponents(results: Iterable[Result | Mapping[str, Any]], run_id: str | None = None) -> list[dict[str, Any]]:
    """Per series (the config's mechanism, impl, params, mode, causal, dtype, batch, heads, head_dim, threads):
    the measured cost exponent, from comparable points only.

    The series' ok points are grouped by environment fingerprint; the fit uses the group of
    the current run (`run_id`) when it has points, else the largest. Row keys: the series
    keys, "points" (used), "n_min", "n_max", "measured" (log-log least-squares slope of the
    median time against N, None with fewer than 3 points), "declared" (the registry's),
    "fingerprint" (of the points used), "left_out" (ok points of other environments, not
    used), "reused" (any point used reused from the store; None without `run_id`).
    """
    series: dict[str, tuple[dict[str, Any], list[tuple[float, float, dict[str, Any] | None]]]] = {}
    for config, status, metrics, env in _rows(results):
        head = {k: config.get(k) for k in _SERIES_KEYS}
        entry = series.setdefault(canonical(head), (head, []))
        if status == "ok" and metrics.get("median_s"):
            entry[1].append((float(config["n"]), float(metrics["median_s"]), env))
    out = []
    for head, points in series.values():
        groups: dict[str | None, list[tuple[float, float, dict[str, Any] | None]]] = {}
        for point in points:
            groups.setdefault(fingerprint(point[2]), []).append(point)
        current = [fp for fp, pts in groups.items() if run_id is not None and any(
            (e or {}).get("run_id") == run_id for _, _, e in pts)]
        chosen = groups[current[0]] if current else max(groups.values(), key=len, default=[])
        ns = [n for n, _, _ in chosen]
        out.append({
            **head,
            "points": len(chosen),
            "n_min": int(min(ns)) if ns else None,
            "n_max": int(max(ns)) if ns else None,
            "measured": loglog_slope([(n, t) for n, t, _ in chosen]),
            "declared": _declared_exponent(head["mechanism"]),
            "fingerprint": fingerprint(chosen[0][2]) if chosen else None,
            "left_out": len(points) - len(chosen),
            "reused": None if run_id is None else any(_reused(e, run_id) for _, _, e in chosen),
        })
    return out


# -- ratios ---------------------------------------------------------------------------------------
def sdpa_ratios(results: Iterable[Result | Mapping[str, Any]], run_id: str | None = None) -> list[dict[str, Any]]:
    """Per result, in order: its median time over that of dense SDPA ("softmax", attnlab) at the same shape
    (N, mode, causal: causal rows against the causal baseline, dtype, batch, heads, head_dim, threads),
    measured comparably.

    The baseline is one of the same run when there is one, else the latest comparable one.
    Row keys: mechanism, impl, params, grid, the shape keys, "median_s", "sdpa_median_s",
    "ratio" (None unless both are ok and comparable), "reused" and "sdpa_reused" (taken
    from the store rather than run `run_id`; None without it), "incomparable" (True when
    a baseline exists at the shape but none is comparable), "flags" (the result's).
    """
    rows = _rows(results)
    baselines: dict[str, list[tuple[float, dict[str, Any] | None, float]]] = {}
    for config, status, metrics, env in rows:
        if config["mechanism"] == BASELINE and config.get("impl", BASE_IMPL) == BASE_IMPL and status == "ok":
            key = canonical([config.get(k) for k in _SHAPE_KEYS])
            baselines.setdefault(key, []).append((metrics["median_s"], env, (env or {}).get("time") or 0.0))
    out = []
    for config, status, metrics, env in rows:
        candidates = baselines.get(canonical([config.get(k) for k in _SHAPE_KEYS]), [])
        same_run = [c for c in candidates if env is not None and c[1] is not None
                    and env.get("run_id") is not None and c[1].get("run_id") == env.get("run_id")]
        usable = same_run or sorted((c for c in candidates if _comparable_envs(env, c[1])), key=lambda c: c[2])[-1:]
        ref, ref_env = (usable[0][0], usable[0][1]) if usable else (None, None)
        mine = metrics.get("median_s") if status == "ok" else None
        out.append({
            **{k: config.get(k) for k in ("mechanism", "impl", "params", "grid", *_SHAPE_KEYS)},
            "median_s": mine,
            "sdpa_median_s": ref,
            "ratio": mine / ref if mine and ref else None,
            "reused": _reused(env, run_id),
            "sdpa_reused": None if ref is None else _reused(ref_env, run_id),
            "incomparable": bool(candidates) and not usable,
            "flags": list(metrics.get("flags") or []),
        })
    return out


def twin(config: Mapping[str, Any]) -> dict[str, Any]:
    """attnlab's configuration of the same work as a peer configuration."""
    return {**config, "impl": BASE_IMPL}


def peer_ratios(results: Iterable[Result | Mapping[str, Any]], run_id: str | None = None) -> list[dict[str, Any]]:
    """Per peer result (impl not "attnlab"), in order: attnlab's median time over the peer's at the same
    configuration, when both are ok and comparable (>1: the peer is faster).

    Row keys: mechanism, impl, params, n, grid, mode, causal, "status" (the peer's),
    "peer_median_s", "attnlab_median_s", "ratio", "max_abs_diff", "note", "reused" and
    "attnlab_reused" (None without `run_id`), "incomparable" (both timed, environments differ).
    """
    rows = _rows(results)
    ours = {config_hash(c): (c, st, m, e) for c, st, m, e in rows if c.get("impl", BASE_IMPL) == BASE_IMPL}
    out = []
    for config, status, metrics, env in rows:
        if config.get("impl", BASE_IMPL) == BASE_IMPL:
            continue
        base = ours.get(config_hash(twin(config)))
        mine = metrics.get("median_s") if status == "ok" else None
        theirs = base[2].get("median_s") if base is not None and base[1] == "ok" else None
        ok = base is not None and _comparable_envs(env, base[3])
        out.append({
            **{key: config.get(key) for key in ("mechanism", "impl", "params", "n", "grid", "mode", "causal")},
            "status": status,
            "peer_median_s": mine,
            "attnlab_median_s": theirs,
            "ratio": theirs / mine if mine and theirs and ok else None,
            "max_abs_diff": metrics.get("max_abs_diff"),
            "note": metrics.get("note"),
            "reused": _reused(env, run_id),
            "attnlab_reused": None if base is None else _reused(base[3], run_id),
            "incomparable": bool(mine and theirs) and not ok,
        })
    return out
