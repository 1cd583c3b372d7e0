"""The report's inference sections, read from the store: sharded decoding (P128), KV-cache compression (P004),
KV-cache key selection (P027).

Each suite's rows (written by `bench.decode.record` and `bench.kv_cache`) are grouped by setting — the shape
of the cache or the model and its training, everything in a row's configuration but the keys that vary within
one run — and the settings are listed newest first. For decoding, each (schedule, p) row sets the bytes each
rank sent against the cost model's prediction: `bytes_diff` is the largest relative difference over the ranks,
(predicted − measured) / measured, and a difference beyond COST_MODEL_TOLERANCE is flagged.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..decode import SCHEDULES, SHAPE_KEYS
from ..decode import SUITE as DECODE_SUITE
from ..kv_cache import COMPRESSION_SUITE, SELECTION_SUITE
from ..store import Result, canonical
from .fmt import fmt_mib, fmt_ratio, fmt_time

COST_MODEL_TOLERANCE = 0.20  # the bar: the model within 20% of the measured bytes at the measured p

__all__ = ["COMPRESSION_SUITE", "COST_MODEL_TOLERANCE", "CompressionSetting", "DECODE_SUITE", "DecodeRow",
           "DecodeSetting", "SELECTION_SUITE", "SelectionSetting", "bytes_difference", "compression_settings",
           "decode_settings", "selection_settings"]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _numbers(values: Any) -> list[float | None]:
    return [_number(v) for v in values] if isinstance(values, list) else []


def _largest(values: Sequence[float | None]) -> float | None:
    """The largest value, None when any is missing (a per-rank maximum needs every rank)."""
    return None if not values or any(v is None for v in values) else max(v for v in values if v is not None)


def bytes_difference(predicted: Sequence[float | None], measured: Sequence[float | None]) -> float | None:
    """The relative difference (predicted − measured) / measured of largest magnitude over the ranks; 0 where
    both are 0, inf where only the measured bytes are 0; None without a pair to compare."""
    worst: float | None = None
    for p, m in zip(predicted, measured):
        if p is None or m is None:
            return None
        diff = (0.0 if p == 0 else math.inf) if m == 0 else (p - m) / m
        if worst is None or abs(diff) > abs(worst):
            worst = diff
    return worst


def _groups(results: Sequence[Result], varying: tuple[str, ...]) -> list[tuple[dict[str, Any], list[Result]]]:
    """(setting, its newest result per configuration) per setting, the newest setting first."""
    groups: dict[str, dict[str, Result]] = defaultdict(dict)
    settings: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: r.created):
        if r.status != "ok":
            continue
        setting = {k: v for k, v in r.config.items() if k not in varying}
        key = canonical(setting)
        settings[key] = setting
        groups[key][r.config_hash] = r
    order = sorted(groups, key=lambda k: max(r.created for r in groups[k].values()), reverse=True)
    return [(settings[k], list(groups[k].values())) for k in order]


# -- decoding (P128) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeRow:
    """One schedule at one p: the largest over ranks of what was measured, and the cost model's prediction."""

    schedule: str
    world: int
    rounds: float | None
    predicted_rounds: float | None
    messages: float | None
    bytes_sent: float | None  # per rank, the largest
    predicted_bytes: float | None
    bytes_diff: float | None  # (predicted − measured) / measured, the largest in magnitude over the ranks
    modelled: bool  # the "measured" counts are the textbook ones (gloo's own all-reduce), not observed
    median_s: float | None  # per decoded token, the slowest rank's
    peak_bytes: float | None  # resident-set rise during one call, the largest over ranks
    buffer_bytes: float | None  # what the model says one call allocates
    cache_bytes: float | None  # the largest shard of the cache

    @property
    def held_bytes(self) -> float | None:
        return None if self.peak_bytes is None or self.cache_bytes is None else self.cache_bytes + self.peak_bytes

    @property
    def off_model(self) -> bool:
        """The cost model misses the measured bytes by more than COST_MODEL_TOLERANCE (or cannot be compared)."""
        return self.bytes_diff is None or not abs(self.bytes_diff) <= COST_MODEL_TOLERANCE


@dataclass(frozen=True)
class Extrapolation:
    """The cost model at p beyond this machine: per p, per schedule, rounds, bytes per rank and α-β time."""

    tokens: int
    alpha_s: float
    beta_bytes_per_s: float
    rows: list[dict[str, Any]]  # {"world": p, schedule: {"rounds", "bytes_sent", "time_s"}, ...}


@dataclass
class DecodeSetting:
    shape: dict[str, Any]  # SHAPE_KEYS
    unsharded: dict[str, Any] | None
    rows: list[DecodeRow]
    extrapolations: list[Extrapolation] = field(default_factory=list)
    timed_rounds: int | None = None

    @property
    def off_model(self) -> list[DecodeRow]:
        return [r for r in self.rows if r.off_model]

    def worlds(self) -> list[int]:
        return sorted({r.world for r in self.rows})


def _decode_row(r: Result) -> DecodeRow:
    m = r.metrics
    measured, predicted = _numbers(m.get("bytes_sent")), _numbers(m.get("predicted_bytes"))
    return DecodeRow(
        schedule=str(r.config.get("schedule")), world=int(r.config.get("world", 0)),
        rounds=_largest(_numbers(m.get("rounds"))), predicted_rounds=_largest(_numbers(m.get("predicted_rounds"))),
        messages=_largest(_numbers(m.get("messages"))), bytes_sent=_largest(measured),
        predicted_bytes=_largest(predicted), bytes_diff=bytes_difference(predicted, measured),
        modelled=bool(m.get("modelled")), median_s=_number(m.get("median_s")),
        peak_bytes=_largest(_numbers(m.get("peak_bytes"))), buffer_bytes=_largest(_numbers(m.get("buffer_bytes"))),
        cache_bytes=_largest(_numbers(m.get("cache_bytes"))))


def decode_settings(results: Sequence[Result]) -> list[DecodeSetting]:
    """The "decode" suite's rows, one `DecodeSetting` per cache shape, the newest first."""
    shaped = [r for r in results if r.suite == DECODE_SUITE]
    by_shape: dict[str, list[Result]] = defaultdict(list)
    shapes: dict[str, dict[str, Any]] = {}
    for r in shaped:
        shape = {k: r.config.get(k) for k in SHAPE_KEYS}
        shapes[canonical(shape)] = shape
        by_shape[canonical(shape)].append(r)
    out = []
    for key, members in sorted(by_shape.items(), key=lambda kv: -max(r.created for r in kv[1])):
        newest: dict[str, Result] = {}
        for r in sorted(members, key=lambda r: r.created):
            if r.status == "ok":
                newest[r.config_hash] = r
        rows = [_decode_row(r) for r in newest.values() if r.config.get("kind") == "sharded"]
        order = {name: i for i, name in enumerate(SCHEDULES)}
        rows.sort(key=lambda x: (x.world, order.get(x.schedule, len(order)), x.schedule))
        unsharded = [r for r in newest.values() if r.config.get("kind") == "unsharded"]
        un = None
        if unsharded:
            m = max(unsharded, key=lambda r: r.created).metrics
            un = {k: _number(m.get(k)) for k in ("median_s", "peak_bytes", "cache_bytes", "buffer_bytes")}
        extra: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        for r in newest.values():
            if r.config.get("kind") == "extrapolated":
                c = r.config
                extra[(c.get("extrapolate_tokens"), c.get("alpha_s"), c.get("beta_bytes_per_s"))].append(
                    {"world": c.get("world"), **r.metrics})
        extrapolations = [Extrapolation(int(t), float(a), float(b), sorted(rs, key=lambda x: x["world"]))
                          for (t, a, b), rs in sorted(extra.items(), key=lambda kv: tuple(map(str, kv[0])))]
        timed = {r.metrics.get("timed_rounds") for r in newest.values() if r.config.get("kind") == "sharded"}
        out.append(DecodeSetting(shapes[key], un, rows, extrapolations,
                                 timed.pop() if len(timed) == 1 else None))
    return out


# -- KV-cache compression (P004) ----------------------------------------------------------------------
@dataclass
class CompressionSetting:
    setting: dict[str, Any]
    ratios: list[float]  # r/d, largest first
    methods: list[str]
    cells: dict[tuple[str, float], dict[str, Any]]  # (method, r/d) -> metrics
    greedy: dict[str, dict[str, Any]]  # method -> metrics
    uncompressed_lm_loss: float | None

    def value(self, method: str, ratio: float, metric: str) -> float | None:
        return _number((self.cells.get((method, ratio)) or {}).get(metric))


def compression_settings(results: Sequence[Result]) -> list[CompressionSetting]:
    """The "kv-compression" suite's rows, one `CompressionSetting` per model and training, the newest first."""
    out = []
    for setting, members in _groups([r for r in results if r.suite == COMPRESSION_SUITE],
                                    ("kind", "method", "r_over_d")):
        cells = {(str(r.config["method"]), float(r.config["r_over_d"])): r.metrics for r in members
                 if r.config.get("kind") == "ratio"}
        greedy = {str(r.config["method"]): r.metrics for r in members if r.config.get("kind") == "greedy"}
        losses = [_number(r.metrics.get("uncompressed_lm_loss")) for r in members]
        methods = sorted({m for m, _ in cells}, key=lambda m: (m != "pca", m))
        out.append(CompressionSetting(setting, sorted({x for _, x in cells}, reverse=True), methods, cells, greedy,
                                      next((x for x in losses if x is not None), None)))
    return out


# -- KV-cache key selection (P027) ---------------------------------------------------------------------
@dataclass
class SelectionSetting:
    setting: dict[str, Any]
    rank90: dict[str, dict[str, Any]]  # model -> {"head_dim", "rank90": [[per head] per layer], "tokens"}
    quality: dict[str, dict[tuple[int, str, int | None], dict[str, Any]]]  # model -> (k, method, r) -> metrics
    decode: dict[tuple[int, int, int], list[tuple[str, int | None, int | None, float | None]]]
    # (N, heads, head_dim) -> [(method, r, k, median seconds)]

    def ranks(self, model: str) -> list[int]:
        return sorted({r for (_, method, r) in self.quality[model] if method == "loki" and r is not None})

    def ks(self, model: str) -> list[int]:
        return sorted({k for (k, _, _) in self.quality[model]})

    def baselines(self, model: str) -> list[str]:
        return sorted({method for (_, method, _) in self.quality[model] if method != "loki"})

    def metric(self, model: str, k: int, method: str, r: int | None, name: str) -> float | None:
        return _number((self.quality[model].get((k, method, r)) or {}).get(name))


def selection_settings(results: Sequence[Result]) -> list[SelectionSetting]:
    """The "kv-selection" suite's rows, one `SelectionSetting` per LM training and seed, the newest first."""
    out = []
    varying = ("kind", "model", "k", "method", "r", "n", "heads", "head_dim")
    for setting, members in _groups([r for r in results if r.suite == SELECTION_SUITE], varying):
        rank90 = {str(r.config["model"]): r.metrics for r in members if r.config.get("kind") == "rank90"}
        quality: dict[str, dict[tuple[int, str, int | None], dict[str, Any]]] = defaultdict(dict)
        decode: dict[tuple[int, int, int], list[tuple[str, int | None, int | None, float | None]]] = defaultdict(list)
        for r in members:
            c = r.config
            if c.get("kind") == "quality":
                quality[str(c["model"])][(int(c["k"]), str(c["method"]), c.get("r"))] = r.metrics
            elif c.get("kind") == "decode":
                decode[(int(c["n"]), int(c["heads"]), int(c["head_dim"]))].append(
                    (str(c["method"]), c.get("r"), c.get("k"), _number(r.metrics.get("median_s"))))
        for rows in decode.values():
            rows.sort(key=lambda x: (x[0] != "dense matmul", x[0] != "dense sdpa", x[0], x[1] or 0, x[2] or 0))
        order = {"MiniLM": 1, "char LM": 0}
        models = sorted(set(rank90) | set(quality), key=lambda m: (order.get(m, 2), m))
        out.append(SelectionSetting(setting, {m: rank90[m] for m in models if m in rank90},
                                    {m: quality[m] for m in models if m in quality}, dict(decode)))
    return out


# -- tables (plain text cells: the page escapes them, the summary Markdown-escapes them) ---------------------
Table = tuple[list[str], list[list[str]]]


def fmt_bytes(count: float | None) -> str:
    """A byte count in full, with thousands separators (communication volume: exact counts)."""
    return "-" if count is None else f"{count:,.0f} B"


def fmt_difference(diff: float | None) -> str:
    if diff is None:
        return "-"
    if math.isinf(diff):
        return "measured 0"
    return f"{diff * 100:+.1f}%" + (f" (over {COST_MODEL_TOLERANCE:.0%})" if abs(diff) > COST_MODEL_TOLERANCE else "")


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def schedule_label(row: DecodeRow) -> str:
    names = {"tree": "tree (butterfly, P128)", "ring": "ring (K/V blocks)",
             "allreduce": "tree by gloo all-reduce"}
    return names.get(row.schedule, row.schedule) + (" (counts modelled)" if row.modelled else "")


def decode_setting_text(s: DecodeSetting) -> str:
    sh = s.shape
    rounds = f", median of {s.timed_rounds} interleaved rounds" if s.timed_rounds else ""
    return (f"N = {sh['tokens']:,} cached positions split evenly over p processes, batch {sh['batch']}, "
            f"{sh['heads']} heads, head dim {sh['head_dim']}, {sh['dtype']}{rounds}")


def unsharded_text(s: DecodeSetting) -> str:
    un = s.unsharded
    if un is None:
        return "unsharded run: not measured"
    held = None if un["peak_bytes"] is None or un["cache_bytes"] is None else un["cache_bytes"] + un["peak_bytes"]
    return (f"unsharded (one process, SDPA): {fmt_time(un['median_s'])} per token, cache {fmt_mib(un['cache_bytes'])}, "
            f"peak rise {fmt_mib(un['peak_bytes'])} (model {fmt_mib(un['buffer_bytes'])}), held {fmt_mib(held)}")


def decode_table(s: DecodeSetting) -> Table:
    """Per (p, schedule): rounds, messages, bytes per rank measured vs the cost model with the difference, time
    per token, peak memory per rank (rise, model, held = cache + rise) and held against the unsharded run's."""
    un = s.unsharded
    un_held = None if un is None or un["peak_bytes"] is None or un["cache_bytes"] is None \
        else un["cache_bytes"] + un["peak_bytes"]
    header = ["p", "schedule", "rounds (model)", "messages", "bytes sent per rank", "cost model", "model − measured",
              "time per token", "peak rise per rank", "model buffers", "held per rank", "held / unsharded"]
    rows = []
    for r in s.rows:
        held = r.held_bytes
        rows.append([str(r.world), schedule_label(r), f"{_count(r.rounds)} ({_count(r.predicted_rounds)})",
                     _count(r.messages), fmt_bytes(r.bytes_sent), fmt_bytes(r.predicted_bytes),
                     fmt_difference(r.bytes_diff), fmt_time(r.median_s), fmt_mib(r.peak_bytes),
                     fmt_mib(r.buffer_bytes), fmt_mib(held),
                     fmt_ratio(held / un_held) if held is not None and un_held else "-"])
    return header, rows


def network_text(e: Extrapolation) -> str:
    return (f"cost model at N = {e.tokens:,} split evenly: α = {e.alpha_s * 1e6:g} µs per communication step, "
            f"β = {e.beta_bytes_per_s / 1e9:g} GB/s per link; links full duplex, no contention between pairs, a step "
            "costs its largest message; time = the slowest rank's rounds·α + bytes/β, computation left out")


def extrapolation_table(e: Extrapolation) -> Table:
    present = [name for name in SCHEDULES if any(name in row for row in e.rows)]
    header = ["p"] + [f"{name} {what}" for name in present for what in ("rounds", "bytes per rank", "α-β time")]
    rows = []
    for row in e.rows:
        cells = [str(row["world"])]
        for name in present:
            x = row.get(name) or {}
            cells += [_count(_number(x.get("rounds"))), fmt_bytes(_number(x.get("bytes_sent"))),
                      fmt_time(_number(x.get("time_s")))]
        rows.append(cells)
    return header, rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compression_setting_text(c: CompressionSetting) -> str:
    s = c.setting
    return (f"{s.get('model')} (d_model {s.get('dim')}, {s.get('layers')} layers, {s.get('heads')} heads of "
            f"d = {s.get('head_dim')}, context {s.get('context')}), trained {s.get('steps')} steps, projections "
            f"distilled {s.get('distill_steps')} steps; held-out loss uncompressed {_fmt(c.uncompressed_lm_loss, 4)} "
            "nats/char")


def compression_table(c: CompressionSetting) -> Table:
    """Per r/d: the attention output's relative error and the LM loss, per method (PCA, trained)."""
    header = ["r/d", "rank r"] + [f"{m} rel. error" for m in c.methods] + [f"{m} LM loss" for m in c.methods]
    rows = []
    for ratio in c.ratios:
        rank = next((c.cells[(m, ratio)].get("rank") for m in c.methods if (m, ratio) in c.cells), None)
        rows.append([f"{ratio:g}", str(rank) if rank is not None else "-",
                     *(_fmt(c.value(m, ratio, "rel_error")) for m in c.methods),
                     *(_fmt(c.value(m, ratio, "lm_loss"), 4) for m in c.methods)])
    return header, rows


def greedy_lines(c: CompressionSetting) -> list[str]:
    out = []
    for method, g in c.greedy.items():
        uniform = c.value(method, 0.5, "lm_loss")
        out.append(f"{method}: greedy per-head ranks at an average r/d = 0.5 {g.get('ranks')}, LM loss "
                   f"{_fmt(_number(g.get('lm_loss')), 4)} (uniform r/d = 0.5: {_fmt(uniform, 4)})")
    return out


def selection_setting_text(s: SelectionSetting) -> str:
    st = s.setting
    return (f"char LM trained {st.get('lm_steps')} steps (N = {st.get('lm_n')}), seed {st.get('seed')}; "
            "MiniLM (all-MiniLM-L6-v2) bidirectional")


def rank90_table(s: SelectionSetting) -> Table:
    """Per model: the rank for 90% key variance per layer (mean over heads, min–max), against the head dim."""
    layers = max((len(m.get("rank90") or []) for m in s.rank90.values()), default=0)
    header = ["model", "head dim d", *(f"layer {i}" for i in range(layers)), "mean", "mean / d"]
    rows = []
    for model, m in s.rank90.items():
        per = [list(map(float, layer)) for layer in m.get("rank90") or []]
        cells = [f"{sum(x) / len(x):.1f} ({min(x):.0f}–{max(x):.0f})" if x else "-" for x in per]
        flat = [v for x in per for v in x]
        mean = sum(flat) / len(flat) if flat else None
        d = _number(m.get("head_dim"))
        rows.append([model, _count(d), *cells, *[""] * (layers - len(per)), _fmt(mean, 1),
                     _fmt(mean / d if mean is not None and d else None, 2)])
    return header, rows


def quality_table(s: SelectionSetting, model: str, metric: str) -> Table:
    """Per k: `metric` ("recall", "output_error", "mass") of Loki at each rank r, and of the baselines."""
    ranks, baselines = s.ranks(model), s.baselines(model)
    header = ["k", *(f"Loki r={r}" for r in ranks), *baselines]
    rows = []
    for k in s.ks(model):
        rows.append([str(k), *(_fmt(s.metric(model, k, "loki", r, metric)) for r in ranks),
                     *(_fmt(s.metric(model, k, b, None, metric)) for b in baselines)])
    return header, rows


def has_metric(s: SelectionSetting, model: str, metric: str) -> bool:
    return any(metric in m for m in s.quality[model].values())


def decode_time_table(rows: Sequence[tuple[str, int | None, int | None, float | None]]) -> Table:
    """Per method: the median decode time and its ratio to dense SDPA."""
    dense = next((t for method, _, _, t in rows if method == "dense sdpa"), None)
    out = []
    for method, r, k, t in rows:
        name = method if method != "loki" else f"Loki r={r} k={k}"
        out.append([name, fmt_time(t), fmt_ratio(t / dense) if t is not None and dense else "-"])
    return ["method", "median time", "/ dense SDPA"], out
