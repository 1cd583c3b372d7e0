"""The report's data, computed once from the store: speed series and their points, panels, ratios, recall cells.

A speed result becomes a `Point` of its `SpeedSeries`: the median time with its spread
(IQR when stored, else min–max), the peak memory, the load average at measurement,
whether it was reused from an earlier run than the newest in the store, and the values
withheld from the plots because they are implausible (`compare.flags`, stored with the
result or computed for an older one). Ratios to SDPA and to peers, and the fitted
exponents, come from `compare` (only between comparable results: same run or same
environment fingerprint), so the page shows what the CLI computes; the headline facts
built from all of this are in `headline.py`.
"""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.registry import FAMILIES, Spec, list_mechanisms
from ...repro.section import ClaimRow, rows_of_results
from ..compare import (
    ABOVE_MATMUL,
    BASELINE,
    ZERO_PEAK,
    fingerprint,
    fit_exponents,
    flags,
    loglog_slope,
    peer_ratios,
    sdpa_ratios,
)
from ..recall import budget_text
from ..speed import bench_params
from ..store import Result, ResultStore, canonical
from .fmt import fmt_params
from .inference import (
    COMPRESSION_SUITE,
    DECODE_SUITE,
    SELECTION_SUITE,
    compression_settings,
    decode_settings,
    selection_settings,
)

PEER_BASE = "attnlab"  # impl of attnlab's own measurements; any other impl is a peer library
SHAPE_KEYS = ("dtype", "batch", "heads", "head_dim", "threads")
PANEL_SIZE = 6  # at most this many mechanisms (each with its peers) in one plot; a larger group is split
FLAG_TEXT = {  # compare's flag codes, as the page says them, and which value each withholds
    ZERO_PEAK: ("memory", "peak memory of 0 (below the probe's resolution, or not measured)"),
    ABOVE_MATMUL: ("time", "FLOP rate above the matmul rate measured in the same run (a wrong time)"),
}


@dataclass(frozen=True)
class SpeedSeries:
    """One speed curve: a mechanism (with its params), one impl, mode, causality, grid rank and shape."""

    mechanism: str
    impl: str
    params: str  # canonical JSON of the mechanism's params
    mode: str
    causal: bool
    rank: int  # 1 for sequences, 2/3 for grids
    shape: tuple[Any, ...]  # values of SHAPE_KEYS

    @property
    def peer(self) -> bool:
        return self.impl != PEER_BASE

    @property
    def params_dict(self) -> dict[str, Any]:
        return json.loads(self.params)

    def fields(self) -> dict[str, Any]:
        """The series as the stored configuration keys it shares (params as a dict), with its grid rank."""
        return {"mechanism": self.mechanism, "impl": self.impl, "params": self.params_dict, "mode": self.mode,
                "causal": self.causal, "grid_rank": self.rank, **dict(zip(SHAPE_KEYS, self.shape))}

    def with_impl(self, impl: str) -> SpeedSeries:
        return SpeedSeries(self.mechanism, impl, self.params, self.mode, self.causal, self.rank, self.shape)


def speed_series(result: Result) -> SpeedSeries:
    c = result.config
    grid = c.get("grid")
    return SpeedSeries(
        mechanism=str(c.get("mechanism")),
        impl=str(c.get("impl", PEER_BASE)),
        params=canonical(c.get("params") or {}),
        mode=str(c.get("mode", "fwd")),
        causal=bool(c.get("causal", False)),
        rank=len(grid) if grid else 1,
        shape=tuple(c.get(k) for k in SHAPE_KEYS),
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def load_of(result: Result) -> float | None:
    """The 1-minute load average when the result was measured (its metrics), else at the start of its run."""
    for source in (result.metrics, result.env):
        value = _number(source.get("load_1m"))
        if value is not None:
            return value
    return None


def run_of(result: Result) -> str | None:
    """The id of the run a result was measured in (None for results stored before runs had ids)."""
    value = result.env.get("run_id")
    return None if value is None else str(value)


def value_flags(result: Result) -> tuple[list[str], list[str]]:
    """(why the time is implausible, why the peak memory is): `compare.flags`, stored or computed now."""
    codes = list(dict.fromkeys([*(result.metrics.get("flags") or []), *flags(result.metrics, result.env)]))
    if result.status != "ok":
        return [], []
    out: dict[str, list[str]] = {"time": [], "memory": []}
    for code in codes:
        value, text = FLAG_TEXT.get(code, ("time", str(code)))
        out[value].append(text)
    return out["time"], out["memory"]


@dataclass(frozen=True)
class Point:
    """One speed result as plotted and tabled: values withheld from plots when flagged."""

    n: int
    result: Result
    time: float | None  # median seconds (ok, not flagged)
    low: float | None  # spread of the time: IQR when stored, else min–max
    high: float | None
    spread: str  # "IQR" or "min–max" or ""
    memory: float | None  # peak bytes (ok, measured, not flagged)
    flags: tuple[str, ...]  # why a value is withheld (time's reasons, then memory's)
    time_flagged: bool  # the time is withheld (the memory may be too: see `memory`)
    load: float | None
    reused: bool  # measured in an earlier run than the newest in the store

    @property
    def ok(self) -> bool:
        return self.result.status == "ok"


def make_point(result: Result, *, reused: bool) -> Point:
    m = result.metrics
    time_flags, memory_flags = value_flags(result)
    ok = result.status == "ok"
    median = _number(m.get("median_s")) if ok and not time_flags else None
    low, high, spread = _number(m.get("q1_s")), _number(m.get("q3_s")), "IQR"
    if low is None or high is None:
        low, high, spread = _number(m.get("min_s")), _number(m.get("max_s")), "min–max"
    if median is None or low is None or high is None:
        low = high = None
        spread = ""
    peak = _number(m.get("peak_mem_bytes")) if ok and not memory_flags else None
    return Point(n=int(result.config.get("n", 0)), result=result, time=median if median and median > 0 else None,
                 low=low, high=high, spread=spread, memory=peak, flags=tuple(time_flags + memory_flags),
                 time_flagged=bool(time_flags),
                 load=load_of(result), reused=reused)


@dataclass(frozen=True)
class Panel:
    """One plot: the series of a group of mechanisms at one mode, causality and shape, and its SDPA reference."""

    family: str
    group: str  # the mechanisms' folder (linear, local, ...), with "1/2" when the group is split
    mode: str
    causal: bool
    shape: tuple[Any, ...]
    series: tuple[SpeedSeries, ...]
    reference: SpeedSeries | None  # softmax (attnlab, default params) at the same mode, causality and shape


@dataclass
class Report:
    """Everything the page, the summary and the export show, computed once from the store."""

    results: list[Result]
    specs: dict[str, Spec]
    database: str = ""
    generated: float = field(default_factory=time.time)
    skipped: int = 0  # rows of the store that could not be read

    def __post_init__(self) -> None:
        self.speed = [r for r in self.results if r.suite == "speed"]
        self.recall = [r for r in self.results if r.suite == "recall"]
        self.limits = [r for r in self.results if r.suite == "limits"]  # `attnlab bench limits`, one per row
        self.decode_settings = decode_settings(self.results)  # benchmarks/distributed_decode.py
        self.compression_settings = compression_settings(self.results)  # benchmarks/matryoshka_kv.py
        self.selection_settings = selection_settings(self.results)  # benchmarks/loki.py
        # `attnlab repro`: every registered claim, once any has an outcome in the store (figures beside the database)
        ran = any(r.suite == "repro" for r in self.results)
        self.claims: list[ClaimRow] = rows_of_results(self.results, Path(self.database).parent) if ran else []
        newest = max(self.speed, key=lambda r: r.created, default=None)
        self.latest_run = run_of(newest) if newest is not None else None  # rows of other runs are "reused"
        starts: dict[str | None, float] = {}  # run id -> its start (the env's time, else its first result's)
        for r in self.results:
            start = _number(r.env.get("time")) or r.created
            starts[run_of(r)] = min(starts.get(run_of(r), start), start)
        self.runs = {run: i for i, run in enumerate(sorted(starts, key=lambda k: starts[k]), 1)}  # 1 = oldest
        by_series: dict[SpeedSeries, dict[int, Result]] = defaultdict(dict)
        for r in self.speed:
            by_series[speed_series(r)][int(r.config.get("n", 0))] = r
        # a series with nothing but "unsupported" (a peer not installed, a mode a mechanism lacks) is listed
        # once with its reason instead of filling tables with that word
        idle = {s for s, points in by_series.items() if all(r.status == "unsupported" for r in points.values())}
        self.series: dict[SpeedSeries, dict[int, Point]] = {
            s: {n: make_point(r, reused=self.is_reused(r)) for n, r in sorted(points.items())}
            for s, points in by_series.items() if s not in idle
        }
        self.not_run = {s: sorted({str(r.metrics.get("note") or "unsupported") for r in by_series[s].values()})
                        for s in sorted(idle, key=self.series_order)}
        # per result (by config hash): its time over SDPA's, and for a peer attnlab's time over the peer's
        self._sdpa = {r.config_hash: row for r, row in zip(self.speed, sdpa_ratios(self.speed, self.latest_run))}
        peer_results = [r for r in self.speed if r.config.get("impl", PEER_BASE) != PEER_BASE]
        self._peer = {r.config_hash: row for r, row in zip(peer_results, peer_ratios(self.speed, self.latest_run))}
        self.environments: list[dict[str, Any]] = []  # every distinct env as stored (one per run and peer)
        self.env_counts: Counter[int] = Counter()
        self.env_of: dict[str, int] = {}
        self.machines: dict[str | None, list[Result]] = defaultdict(list)  # fingerprint -> its results
        for r in self.results:
            key = canonical(r.env)
            if key not in self.env_of:
                self.env_of[key] = len(self.environments)
                self.environments.append(r.env)
            self.env_counts[self.env_of[key]] += 1
            self.machines[fingerprint(r.env)].append(r)

    def inference_counts(self) -> dict[str, int]:
        """Results per inference suite (decode, kv-compression, kv-selection)."""
        return {suite: sum(r.suite == suite for r in self.results)
                for suite in (DECODE_SUITE, COMPRESSION_SUITE, SELECTION_SUITE)}

    @classmethod
    def from_store(cls, store: ResultStore) -> Report:
        results = store.results()
        return cls(results, {s.name: s for s in list_mechanisms()}, database=str(store.path),
                   skipped=store.skipped_rows)

    def is_reused(self, result: Result) -> bool:
        """Whether `result` comes from an earlier run than the newest one in the store (needs run ids)."""
        return self.latest_run is not None and run_of(result) != self.latest_run

    # -- names and groups ----------------------------------------------------------------
    def family(self, mechanism: str) -> str:
        spec = self.specs.get(mechanism)
        return spec.family if spec is not None and spec.family else "?"

    def group(self, mechanism: str) -> str:
        """The mechanism's folder under attnlab/mechanisms (dense, linear, local, ...), "other" outside it."""
        spec = self.specs.get(mechanism)
        module = getattr(spec.factory, "__module__", "") if spec is not None else ""
        parts = module.split(".")
        return parts[2] if len(parts) > 3 and parts[:2] == ["attnlab", "mechanisms"] else "other"

    def varying_shape_keys(self) -> list[int]:
        """Indices of SHAPE_KEYS whose value differs between speed results (they go into labels)."""
        return [i for i in range(len(SHAPE_KEYS)) if len({s.shape[i] for s in self.series}) > 1]

    def common_shape(self) -> str:
        shared = [i for i in range(len(SHAPE_KEYS)) if i not in self.varying_shape_keys()]
        if not self.series:
            return ""
        shape = next(iter(self.series)).shape
        return ", ".join(f"{SHAPE_KEYS[i]} {shape[i]}" for i in shared)

    def label(self, s: SpeedSeries, *, with_params: bool | None = True, context: bool = True) -> str:
        """A run's name: mechanism, params (None: only when the mechanism ran with several), peer, and with
        `context` its causality, grid rank and the shape keys that vary in the store."""
        if with_params is None:
            with_params = len({x.params for x in self.series if x.mechanism == s.mechanism}) > 1
        parts = [s.mechanism]
        shown = self.own_params(s)
        if with_params and shown:
            parts.append(f"({fmt_params(shown)})")
        if s.peer:
            parts.append(f"[{s.impl}]")
        if context:
            if s.causal:
                parts.append("causal")
            if s.rank > 1:
                parts.append(f"{s.rank}-D")
            parts += [f"{SHAPE_KEYS[i]}={s.shape[i]}" for i in self.varying_shape_keys()]
        return " ".join(parts)

    @staticmethod
    def series_of(row: dict[str, Any]) -> SpeedSeries:
        """The series of an exported row (`SpeedSeries.fields` keys)."""
        return SpeedSeries(row["mechanism"], row["impl"], canonical(row["params"]), row["mode"], row["causal"],
                           row["grid_rank"], tuple(row[k] for k in SHAPE_KEYS))

    def label_row(self, row: dict[str, Any], *, with_params: bool | None = True) -> str:
        """The label of the series of an exported row (`SpeedSeries.fields` keys)."""
        return self.label(self.series_of(row), with_params=with_params)

    def defaults(self, mechanism: str) -> dict[str, Any]:
        """The parameters the bench gives `mechanism` unless told otherwise ({} when it is not registered)."""
        spec = self.specs.get(mechanism)
        return bench_params(spec) if spec is not None else {}

    def own_params(self, s: SpeedSeries) -> dict[str, Any]:
        """The series' parameters that differ from the bench's defaults for its mechanism."""
        defaults = self.defaults(s.mechanism)
        return {k: v for k, v in s.params_dict.items() if k not in defaults or defaults[k] != v}

    @staticmethod
    def series_order(s: SpeedSeries) -> tuple[Any, ...]:
        return (s.mechanism, s.params, s.causal, s.rank, s.peer, s.impl, tuple(map(str, s.shape)))

    def is_reference(self, s: SpeedSeries) -> bool:
        """Whether `s` is the SDPA baseline itself (softmax, attnlab, default params), drawn as the reference."""
        return s.mechanism == BASELINE and not s.peer and not self.own_params(s)

    def reference_of(self, mode: str, causal: bool, shape: tuple[Any, ...]) -> SpeedSeries | None:
        ref = SpeedSeries(BASELINE, PEER_BASE, canonical(self.defaults(BASELINE)), mode, causal, 1, shape)
        return ref if ref in self.series else None

    # -- panels --------------------------------------------------------------------------
    def families(self) -> list[tuple[str, list[Panel]]]:
        """Per family with speed results (A-G order), its panels: one per mechanism group (folder, split into
        PANEL_SIZE mechanisms), mode, causality and shape; the SDPA baseline is each panel's reference."""
        groups: dict[tuple[str, str], dict[tuple[str, str, int], list[SpeedSeries]]] = defaultdict(dict)
        for s in self.series:
            if self.is_reference(s):
                continue
            key = (self.family(s.mechanism), self.group(s.mechanism))
            groups[key].setdefault((s.mechanism, s.params, s.rank), []).append(s)
        family_order = {f: i for i, f in enumerate(sorted(FAMILIES))}
        modes = {"fwd": 0, "fwd+bwd": 1}
        out: dict[str, list[Panel]] = defaultdict(list)
        for family, group in sorted(groups, key=lambda k: (family_order.get(k[0], len(family_order)), k[1])):
            members = sorted(groups[(family, group)])
            chunks = [members[i:i + PANEL_SIZE] for i in range(0, len(members), PANEL_SIZE)]
            for index, chunk in enumerate(chunks):
                name = group if len(chunks) == 1 else f"{group} {index + 1}/{len(chunks)}"
                series = [s for key in chunk for s in groups[(family, group)][key]]
                layers: dict[tuple[str, bool, tuple[Any, ...]], list[SpeedSeries]] = defaultdict(list)
                for s in series:
                    layers[(s.mode, s.causal, s.shape)].append(s)
                for mode, causal, shape in sorted(layers, key=lambda k: (modes.get(k[0], 2), k[0], k[1], str(k[2]))):
                    members_here = tuple(sorted(layers[(mode, causal, shape)], key=self.series_order))
                    out[family].append(Panel(family, name, mode, causal, shape, members_here,
                                             self.reference_of(mode, causal, shape)))
        return list(out.items())

    # -- ratios --------------------------------------------------------------------------
    def sdpa_ratio(self, s: SpeedSeries, n: int) -> float | None:
        """Time / SDPA time at the same N, mode, causality and shape (`compare.sdpa_ratios`: comparable results
        only); None without one, or when this time is flagged implausible."""
        point = self.series[s].get(n)
        if point is None or point.time is None or self.baseline_flagged(s, n):
            return None
        row = self._sdpa.get(point.result.config_hash) or {}
        return _number(row.get("ratio"))

    def baseline_flagged(self, s: SpeedSeries, n: int) -> bool:
        """Whether the SDPA time `s` is compared with at N is flagged implausible (then there is no ratio)."""
        ref = self.reference_of(s.mode, s.causal, s.shape)
        point = self.series[ref].get(n) if ref is not None else None
        return point is not None and point.time_flagged

    def incomparable(self, s: SpeedSeries, n: int) -> bool:
        """Whether `s` at N has a baseline (SDPA, or attnlab's twin for a peer) but none measured comparably."""
        point = self.series[s].get(n)
        if point is None:
            return False
        rows = self._peer if s.peer else self._sdpa
        return bool((rows.get(point.result.config_hash) or {}).get("incomparable"))

    def matmul_shares(self) -> list[tuple[SpeedSeries, dict[int, float]]]:
        """Per series of a mechanism that declares a FLOP count: at each N, its FLOP rate over the matmul rate
        measured in the same run (env["matmul_gflops"]): the fraction of the machine's compute limit reached."""
        out = []
        for s in sorted(self.series, key=lambda s: (s.mode,) + self.series_order(s)):
            cells = {}
            for n, point in self.series[s].items():
                rate, matmul = point.result.metrics.get("flops_per_s"), _number(point.result.env.get("matmul_gflops"))
                if point.time is not None and isinstance(rate, (int, float)) and matmul:
                    cells[n] = rate / (matmul * 1e9)
            if cells:
                out.append((s, cells))
        return out

    def limit_rows(self) -> list[dict[str, Any]]:
        """The newest `attnlab bench limits` result of each row, in the order they were stored."""
        newest: dict[str, Result] = {}
        for r in sorted(self.limits, key=lambda r: r.created):
            newest[str(r.config.get("row"))] = r
        return [{**r.metrics, "status": r.status, "env": r.env} for r in newest.values()]

    def peer_ratio(self, peer: SpeedSeries, n: int) -> float | None:
        """attnlab time / peer time at N (`compare.peer_ratios`: comparable results only); None unless both
        were timed."""
        point = self.series[peer].get(n)
        ours = self.twin(peer, n)
        if point is None or point.time is None or (ours is not None and ours.time_flagged):
            return None
        return _number((self._peer.get(point.result.config_hash) or {}).get("ratio"))

    def twin(self, peer: SpeedSeries, n: int) -> Point | None:
        """attnlab's own measurement of the configuration a peer ran."""
        return self.series.get(peer.with_impl(PEER_BASE), {}).get(n)

    def ratio_rows(self) -> list[dict[str, Any]]:
        """Every (series, N) with its ratio to SDPA, and for peers attnlab/peer (machine-readable)."""
        rows = []
        for s in sorted(self.series, key=self.series_order):
            for n, p in self.series[s].items():
                row = {**s.fields(), "n": n, "grid": p.result.config.get("grid"), "status": p.result.status,
                       "reused": p.reused, "flags": list(p.flags)}
                if s.peer:
                    row["attnlab_over_peer"] = self.peer_ratio(s, n)
                    row["max_abs_diff"] = p.result.metrics.get("max_abs_diff")
                else:
                    row["over_sdpa"] = self.sdpa_ratio(s, n)
                rows.append(row)
        return rows

    def exponents(self) -> list[dict[str, Any]]:
        """Per series, the measured exponent of `compare.fit_exponents` (time, comparable points), the declared
        one, and the log-log slope of peak memory against N (over the ok points with a plausible peak)."""
        fits = {series_key(row): row for row in fit_exponents(self.speed, self.latest_run)}
        rows = []
        for s in sorted(self.series, key=lambda s: (s.mode,) + self.series_order(s)):
            fit = fits.get(series_key(s.fields()), {})
            memory = [(float(n), p.memory) for n, p in self.series[s].items() if p.memory]
            spec = self.specs.get(s.mechanism)
            rows.append({
                **s.fields(),
                "declared": spec.exponent if spec is not None else fit.get("declared"),
                "measured": fit.get("measured"), "measured_memory": loglog_slope(memory),
                "points": fit.get("points", 0), "n_min": fit.get("n_min"), "n_max": fit.get("n_max"),
                "left_out": fit.get("left_out", 0),
            })
        return rows

    def flagged(self) -> list[tuple[SpeedSeries, Point]]:
        """Every point with a value withheld from the plots, in series order."""
        return [(s, p) for s in sorted(self.series, key=self.series_order) for p in self.series[s].values() if p.flags]

    def loads(self) -> list[float]:
        return sorted(p.load for points in self.series.values() for p in points.values() if p.load is not None)

    # -- recall --------------------------------------------------------------------------
    def recall_cells(self) -> dict[tuple[Any, ...], dict[tuple[str, str], dict[Any, dict[str, Any]]]]:
        """(d_model, seq_len, budget) -> (mechanism, params) -> kv pairs -> cell.

        A cell's accuracy is the mean over seeds of each setting (learning rate, ...), then the
        best setting, as Zoology reports a learning-rate sweep; "converged" holds when every seed
        of that setting reached the target, "stopped" says why one did not. Without an ok run the
        cell shows the status of its runs. `budget` is the stated training budget (`budget_of`).
        """
        groups: dict[tuple[Any, ...], list[Result]] = defaultdict(list)
        for r in self.recall:
            c = r.config
            groups[(c.get("d_model"), c.get("seq_len"), budget_of(r), c.get("mechanism"),
                    canonical(c.get("params") or {}), c.get("num_kv_pairs"))].append(r)
        out: dict[tuple[Any, ...], dict[tuple[str, str], dict[Any, dict[str, Any]]]] = {}
        for (d_model, seq_len, budget, mechanism, params, kv), runs in groups.items():
            settings: dict[str, list[Result]] = defaultdict(list)
            for r in runs:
                if r.status == "ok" and _number(r.metrics.get("accuracy")) is not None:
                    rest = {k: v for k, v in r.config.items() if k != "seed"}
                    settings[canonical(rest)].append(r)
            statuses = Counter(r.status for r in runs if r.status != "ok")
            cell: dict[str, Any] = {"accuracy": None, "runs": len(runs), "converged": False, "stopped": None,
                                    "epochs": None, "train_seconds": None,
                                    "status": statuses.most_common(1)[0][0] if statuses else "ok"}
            if settings:
                best = max(settings.values(), key=lambda rs: sum(float(r.metrics["accuracy"]) for r in rs) / len(rs))
                cell.update(
                    accuracy=sum(float(r.metrics["accuracy"]) for r in best) / len(best),
                    status="ok",
                    converged=all(bool(r.metrics.get("converged")) for r in best),
                    epochs=max(int(r.metrics.get("epochs") or 0) for r in best),
                    train_seconds=max(float(r.metrics.get("train_seconds") or 0.0) for r in best),
                )
                if not cell["converged"]:
                    cell["stopped"] = stop_reason(next(r for r in best if not r.metrics.get("converged")))
            out.setdefault((d_model, seq_len, budget), {}).setdefault((str(mechanism), params), {})[kv] = cell
        return dict(sorted(out.items(), key=lambda kv: tuple(sort_key(x) for x in kv[0])))

    def recall_row_label(self, mechanism: str, params: str) -> str:
        several = len({canonical(r.config.get("params") or {}) for r in self.recall
                       if r.config.get("mechanism") == mechanism}) > 1
        defaults = self.defaults(mechanism)
        p = {k: v for k, v in json.loads(params).items() if k not in defaults or defaults[k] != v}
        return f"{mechanism} ({fmt_params(p)})" if several and p else mechanism

    # -- coverage ------------------------------------------------------------------------
    def coverage(self) -> list[dict[str, Any]]:
        """Every registered mechanism (and every other one attnlab measured), with its results by suite and status."""
        counts: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: {"speed": Counter(), "recall": Counter()})
        for r in self.results:  # attnlab's own measurements: a peer's say nothing of attnlab's mechanism
            if r.suite in ("speed", "recall") and r.config.get("impl", PEER_BASE) == PEER_BASE:
                counts[str(r.config.get("mechanism"))][r.suite][r.status] += 1
        rows = []
        for name in sorted(set(self.specs) | set(counts)):
            spec = self.specs.get(name)
            c = counts.get(name, {"speed": Counter(), "recall": Counter()})
            rows.append({
                "name": name,
                "registered": spec is not None,
                "family": spec.family if spec is not None else None,
                "cost": spec.cost if spec is not None else None,
                "declared_exponent": spec.exponent if spec is not None else None,
                "speed": dict(c["speed"]),
                "recall": dict(c["recall"]),
                "measured": bool(c["speed"] or c["recall"]),
            })
        return rows


def budget_of(result: Result) -> str:
    """The stated training budget of a recall result (`recall.budget_text`: steps, epochs of examples, time cap)."""
    return budget_text(result.config)


def stop_reason(result: Result) -> str:
    """Why a recall run ended below the target accuracy: the step budget spent, the time cap, a diverging loss
    (with the steps taken), else (results stored before "stopped" was) its note or its epochs."""
    m = result.metrics
    steps = f"{m.get('steps')} of {m.get('step_budget')} steps" if m.get("step_budget") else None
    if m.get("stopped") == "time cap":
        cap = _number(result.config.get("cell_seconds"))
        return f"stopped at the time cap ({cap:g} s) after {steps or '?'}" if cap is not None else \
            f"stopped at the time cap after {steps or '?'}"
    if m.get("stopped") == "step budget":
        return f"step budget spent ({steps or '?'}) below the target"
    if m.get("stopped") == "diverged":
        return f"diverged after {steps or '?'}" + (f": {m['note']}" if m.get("note") else "")
    if m.get("note"):
        return str(m["note"])
    return f"stopped after {m.get('epochs')} of {result.config.get('max_epochs')} epochs"


def series_key(fields: dict[str, Any]) -> str:
    return canonical([fields.get(k) for k in ("mechanism", "impl", "params", "mode", "causal", *SHAPE_KEYS)])


def sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))

