"""`attnlab report`: the results store rendered as a self-contained HTML page, a Markdown summary and JSON.

    attnlab report [--db PATH] [--out DIR] [--json PATH|-] [--markdown] [--quiet]

The page (`report.html` in DIR, default attnlab-results/report) needs no network: CSS is
inline and every figure is a base64 PNG drawn by matplotlib's Agg canvas. It holds, per
family and mode, time and peak memory against N on log-log axes (a line per mechanism,
peers dashed) with the table of every measurement (statuses over_time, over_memory,
error shown as such); measured against declared cost exponents; ratios to dense SDPA
and to peer libraries (a peer whose output disagreed shows "disagree", never a time);
MQAR accuracy heat maps (mechanism × kv pairs, one per (d_model, seq_len)); every
registered mechanism, "not measured" when the store has nothing on it; and the
environments the results were measured in. `results.json` (every result) and
`summary.md` are written beside it. All text from the store is escaped.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.registry import FAMILIES, Spec, list_mechanisms
from .peers import peer_ratios
from .progress import progress, say
from .speed import fit_exponents, loglog_slope, sdpa_ratios
from .store import DEFAULT_DB, Result, ResultStore, canonical

DEFAULT_OUT = DEFAULT_DB.parent / "report"
PEER_BASE = "attnlab"  # impl of attnlab's own measurements; any other impl is a peer library
SDPA_MECHANISM = "softmax"  # dense softmax attention, whose fast path is torch's SDPA
SHAPE_KEYS = ("dtype", "batch", "heads", "head_dim", "threads")
STATUS_TEXT = {
    "ok": "ok",
    "over_time": "over time",
    "over_memory": "over memory",
    "error": "error",
    "disagree": "disagree",
    "unsupported": "unsupported",
}
NOT_MEASURED = "not measured"
MATPLOTLIB_HINT = "pip install 'attnlab[report]'"
PEER_ENV_KEYS = ("peer", "peer_package", "peer_version")  # what peers add to the environment they record


# -- formatting -------------------------------------------------------------------------
def fmt_time(seconds: float | None) -> str:
    """Seconds with three significant digits in a readable unit: 812 µs, 1.23 ms, 4.56 s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(count: float | None) -> str:
    """Bytes in binary units, three significant digits: 512 B, 1.5 KiB, 32 MiB."""
    if count is None or not math.isfinite(count):
        return "-"
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}×"


def fmt_accuracy(accuracy: float | None) -> str:
    """Accuracy rounded down to two decimals, so that 0.99 on the page means at least 0.99."""
    return "-" if accuracy is None else f"{math.floor(accuracy * 100 + 1e-9) / 100:.2f}"


def fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) if params else ""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _md(value: Any) -> str:
    """Text for a Markdown table cell: characters Markdown would read as markup are backslash-escaped."""
    text = str(value).replace("\n", " ")
    for char in "\\|<>`*[]":
        text = text.replace(char, "\\" + char)
    return text


# -- the data ---------------------------------------------------------------------------
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


def _ok_time(result: Result | None) -> float | None:
    if result is None or result.status != "ok":
        return None
    value = result.metrics.get("median_s")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


@dataclass
class Report:
    """Everything the page, the summary and the export show, computed once from the store."""

    results: list[Result]
    specs: dict[str, Spec]
    database: str = ""
    generated: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.speed = [r for r in self.results if r.suite == "speed"]
        self.recall = [r for r in self.results if r.suite == "recall"]
        series: dict[SpeedSeries, dict[int, Result]] = defaultdict(dict)
        for r in self.speed:
            series[speed_series(r)][int(r.config.get("n", 0))] = r
        # a series with nothing but "unsupported" (a peer not installed, a mode a mechanism lacks) is listed
        # once with its reason instead of filling tables with that word
        idle = {s for s, points in series.items() if all(r.status == "unsupported" for r in points.values())}
        self.series = {s: points for s, points in series.items() if s not in idle}
        self.not_run = {s: sorted({str(r.metrics.get("note") or "unsupported") for r in series[s].values()})
                        for s in sorted(idle, key=self.series_order)}
        # per result (by config hash): its time over SDPA's, and for a peer attnlab's time over the peer's
        self._sdpa = {r.config_hash: row["ratio"] for r, row in zip(self.speed, sdpa_ratios(self.speed))}
        peer_results = [r for r in self.speed if r.config.get("impl", PEER_BASE) != PEER_BASE]
        self._peer = {r.config_hash: row["ratio"] for r, row in zip(peer_results, peer_ratios(self.speed))}
        self.environments: list[dict[str, Any]] = []
        self.env_counts: Counter[int] = Counter()
        self.env_of: dict[str, int] = {}
        for r in self.results:
            key = canonical(r.env)
            if key not in self.env_of:
                self.env_of[key] = len(self.environments)
                self.environments.append(r.env)
            self.env_counts[self.env_of[key]] += 1

    @classmethod
    def from_store(cls, store: ResultStore) -> Report:
        return cls(store.results(), {s.name: s for s in list_mechanisms()}, database=str(store.path))

    # -- speed --------------------------------------------------------------------------
    def family(self, mechanism: str) -> str:
        spec = self.specs.get(mechanism)
        return spec.family if spec is not None and spec.family else "?"

    def varying_shape_keys(self) -> list[int]:
        """Indices of SHAPE_KEYS whose value differs between speed results (they go into labels)."""
        return [i for i in range(len(SHAPE_KEYS)) if len({s.shape[i] for s in self.series}) > 1]

    def common_shape(self) -> str:
        shared = [i for i in range(len(SHAPE_KEYS)) if i not in self.varying_shape_keys()]
        if not self.series:
            return ""
        shape = next(iter(self.series)).shape
        return ", ".join(f"{SHAPE_KEYS[i]} {shape[i]}" for i in shared)

    def label(self, s: SpeedSeries, *, with_params: bool | None = True) -> str:
        """A run's name: mechanism, params (None: only when the mechanism ran with several), peer, causal, grid, shape."""
        if with_params is None:
            with_params = len({x.params for x in self.series if x.mechanism == s.mechanism}) > 1
        parts = [s.mechanism]
        if with_params and s.params_dict:
            parts.append(f"({fmt_params(s.params_dict)})")
        if s.peer:
            parts.append(f"[{s.impl}]")
        if s.causal:
            parts.append("causal")
        if s.rank > 1:
            parts.append(f"{s.rank}-D")
        parts += [f"{SHAPE_KEYS[i]}={s.shape[i]}" for i in self.varying_shape_keys()]
        return " ".join(parts)

    def panels(self) -> list[tuple[str, str, list[SpeedSeries]]]:
        """(family, mode, series) for every family and mode with speed results, families in A-G order."""
        groups: dict[tuple[str, str], list[SpeedSeries]] = defaultdict(list)
        for s in self.series:
            groups[(self.family(s.mechanism), s.mode)].append(s)
        order = {f: i for i, f in enumerate(sorted(FAMILIES))}
        modes = {"fwd": 0, "fwd+bwd": 1}
        keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), modes.get(k[1], 2), k[1]))
        return [(f, m, sorted(groups[(f, m)], key=self.series_order)) for f, m in keys]

    @staticmethod
    def series_order(s: SpeedSeries) -> tuple[Any, ...]:
        return (s.mechanism, s.params, s.causal, s.rank, s.peer, s.impl, tuple(map(str, s.shape)))

    def exponents(self) -> list[dict[str, Any]]:
        """Per series, the measured exponent of `speed.fit_exponents` (time), the declared one, and the
        log-log slope of peak memory against N (same fit, over the ok points that measured memory)."""
        fits = {_series_key(row): row for row in fit_exponents(self.speed)}
        rows = []
        for s in sorted(self.series, key=lambda s: (s.mode,) + self.series_order(s)):
            fit = fits.get(_series_key(s.fields()), {})
            memory = [(float(n), float(r.metrics["peak_mem_bytes"])) for n, r in self.series[s].items()
                      if r.status == "ok" and isinstance(r.metrics.get("peak_mem_bytes"), (int, float))
                      and r.metrics["peak_mem_bytes"] > 0]
            spec = self.specs.get(s.mechanism)
            rows.append({
                **s.fields(),
                "declared": spec.exponent if spec is not None else fit.get("declared"),
                "measured": fit.get("measured"), "measured_memory": loglog_slope(memory),
                "points": fit.get("points", 0), "n_min": fit.get("n_min"), "n_max": fit.get("n_max"),
            })
        return rows

    def sdpa_ratio(self, s: SpeedSeries, n: int) -> tuple[float | None, str]:
        """(time / SDPA time from `speed.sdpa_ratios`, text for the cell): a status when there is no ratio."""
        mine = self.series[s].get(n)
        if mine is None:
            return None, ""
        if mine.status != "ok":
            return None, STATUS_TEXT.get(mine.status, mine.status)
        ratio = self._sdpa.get(mine.config_hash)
        return (ratio, fmt_ratio(ratio)) if ratio is not None else (None, "no SDPA")

    def peer_ratio(self, peer: SpeedSeries, n: int) -> tuple[float | None, str]:
        """(attnlab time / peer time, text): "disagree" when the peer's output did not match attnlab's."""
        theirs = self.series[peer].get(n)
        if theirs is None:
            return None, ""
        if theirs.status != "ok":
            return None, STATUS_TEXT.get(theirs.status, theirs.status)
        ours = self.series.get(peer.with_impl(PEER_BASE), {}).get(n)
        if ours is None:
            return None, "attnlab " + NOT_MEASURED
        if ours.status != "ok":
            return None, "attnlab " + STATUS_TEXT.get(ours.status, ours.status)
        ratio = self._peer.get(theirs.config_hash)
        return (ratio, fmt_ratio(ratio)) if ratio is not None else (None, "no time")

    def ratio_rows(self) -> list[dict[str, Any]]:
        """Every (series, N) with its ratio to SDPA, and for peers attnlab/peer (machine-readable)."""
        rows = []
        for s in sorted(self.series, key=self.series_order):
            for n, r in sorted(self.series[s].items()):
                row = {**s.fields(), "n": n, "grid": r.config.get("grid"), "status": r.status}
                if s.peer:
                    row["attnlab_over_peer"] = self.peer_ratio(s, n)[0]
                    row["max_abs_diff"] = r.metrics.get("max_abs_diff")
                else:
                    row["over_sdpa"] = self.sdpa_ratio(s, n)[0]
                rows.append(row)
        return rows

    # -- recall -------------------------------------------------------------------------
    def recall_cells(self) -> dict[tuple[Any, Any], dict[tuple[str, str], dict[Any, dict[str, Any]]]]:
        """(d_model, seq_len) -> (mechanism, params) -> kv pairs -> cell.

        A cell's accuracy is the mean over seeds of each setting (learning rate, epochs, ...),
        then the best setting, as Zoology reports a learning-rate sweep; without an ok run,
        the cell shows the status of its runs.
        """
        groups: dict[tuple[Any, ...], list[Result]] = defaultdict(list)
        for r in self.recall:
            groups[(r.config.get("d_model"), r.config.get("seq_len"), r.config.get("mechanism"),
                    canonical(r.config.get("params") or {}), r.config.get("num_kv_pairs"))].append(r)
        out: dict[tuple[Any, Any], dict[tuple[str, str], dict[Any, dict[str, Any]]]] = {}
        for (d_model, seq_len, mechanism, params, kv), runs in groups.items():
            settings: dict[str, list[float]] = defaultdict(list)
            for r in runs:
                if r.status == "ok" and isinstance(r.metrics.get("accuracy"), (int, float)):
                    rest = {k: v for k, v in r.config.items() if k != "seed"}
                    settings[canonical(rest)].append(float(r.metrics["accuracy"]))
            means = [sum(v) / len(v) for v in settings.values()]
            statuses = Counter(r.status for r in runs if r.status != "ok")
            cell = {
                "accuracy": max(means) if means else None,
                "runs": len(runs),
                "status": "ok" if means else statuses.most_common(1)[0][0],
            }
            out.setdefault((d_model, seq_len), {}).setdefault((str(mechanism), params), {})[kv] = cell
        return dict(sorted(out.items(), key=lambda kv: tuple(_num_key(x) for x in kv[0])))

    def recall_row_label(self, mechanism: str, params: str) -> str:
        several = len({canonical(r.config.get("params") or {}) for r in self.recall
                       if r.config.get("mechanism") == mechanism}) > 1
        p = json.loads(params)
        return f"{mechanism} ({fmt_params(p)})" if several and p else mechanism

    # -- coverage -----------------------------------------------------------------------
    def coverage(self) -> list[dict[str, Any]]:
        """Every registered mechanism (and every other one attnlab measured), with its results by suite and status."""
        counts: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: {"speed": Counter(), "recall": Counter()})
        for r in self.results:  # attnlab's own measurements: a peer's say nothing of attnlab's mechanism
            if r.suite in ("speed", "recall") and r.config.get("impl", PEER_BASE) == PEER_BASE:
                counts[str(r.config.get("mechanism"))][r.suite][r.status] += 1
        names = sorted(set(self.specs) | set(counts))
        rows = []
        for name in names:
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

    # -- exports ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        recall = []
        for (d_model, seq_len), rows in self.recall_cells().items():
            for (mechanism, params), cells in rows.items():
                for kv, cell in cells.items():
                    recall.append({"d_model": d_model, "seq_len": seq_len, "mechanism": mechanism,
                                   "params": json.loads(params), "num_kv_pairs": kv, **cell})
        return {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.generated)),
            "attnlab": __version__,
            "database": self.database,
            "mechanisms": self.coverage(),
            "environments": self.environments,
            "results": [
                {"suite": r.suite, "config": r.config, "status": r.status, "metrics": r.metrics,
                 "environment": self.env_of[canonical(r.env)], "created": r.created, "config_hash": r.config_hash}
                for r in self.results
            ],
            "exponents": self.exponents(),
            "ratios": self.ratio_rows(),
            "recall": recall,
        }

    def markdown(self) -> str:
        out = ["# attnlab results", ""]
        out.append(f"{len(self.speed)} speed and {len(self.recall)} recall results from {_md(self.database)}, "
                   f"{len(self.environments)} environment{'s' * (len(self.environments) != 1)}; "
                   f"report generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.generated))}.")
        for i, env in enumerate(self.environments):
            out.append(f"- environment {i + 1}: {_md(_env_line(env))}")
        ns = sorted({n for points in self.series.values() for n in points})
        if self.series:
            out += ["", "## Speed: median time by N", ""]
            if self.common_shape():
                out += [_md(self.common_shape()), ""]
            header = ["run", "mode", *map(str, ns)]
            rows = []
            for s in sorted(self.series, key=lambda s: (s.mode,) + self.series_order(s)):
                cells = [_md(self.label(s)), _md(s.mode)]
                for n in ns:
                    r = self.series[s].get(n)
                    cells.append("" if r is None else fmt_time(_ok_time(r)) if r.status == "ok"
                                 else STATUS_TEXT.get(r.status, _md(r.status)))
                rows.append(cells)
            out += _md_table(header, rows)
            out += ["", "## Cost exponents (log-log slope of time against N)", ""]
            rows = [[_md(self.label_row(x)), _md(x["mode"]), _num(x["declared"]), _num(x["measured"]),
                     _num(x["measured_memory"]), str(x["points"])] for x in self.exponents()]
            out += _md_table(["run", "mode", "declared", "measured (time)", "measured (memory)", "points"], rows)
            attn = [s for s in self.series if not s.peer]
            out += ["", "## Time relative to dense SDPA", ""]
            rows = [[_md(self.label(s)), _md(s.mode), *(self.sdpa_ratio(s, n)[1] for n in ns)]
                    for s in sorted(attn, key=lambda s: (s.mode,) + self.series_order(s))]
            out += _md_table(["run", "mode", *map(str, ns)], rows)
            peers = [s for s in self.series if s.peer]
            if peers:
                out += ["", "## attnlab time / peer time", ""]
                rows = [[_md(self.label(s)), _md(s.mode), *(_md(self.peer_ratio(s, n)[1]) for n in ns)]
                        for s in sorted(peers, key=lambda s: (s.mode,) + self.series_order(s))]
                out += _md_table(["peer run", "mode", *map(str, ns)], rows)
        for (d_model, seq_len), rows_ in self.recall_cells().items():
            kvs = sorted({kv for cells in rows_.values() for kv in cells}, key=_num_key)
            out += ["", f"## MQAR accuracy, d_model={_md(d_model)}, seq_len={_md(seq_len)}", ""]
            rows = []
            for (mechanism, params), cells in sorted(rows_.items()):
                row = [_md(self.recall_row_label(mechanism, params))]
                for kv in kvs:
                    cell = cells.get(kv)
                    row.append("" if cell is None else fmt_accuracy(cell["accuracy"]) if cell["status"] == "ok"
                               else STATUS_TEXT.get(cell["status"], _md(cell["status"])))
                rows.append(row)
            out += _md_table(["mechanism", *(f"kv={_md(kv)}" for kv in kvs)], rows)
        if self.not_run:
            out += ["", "## Not run", ""]
            out += [f"- {_md(self.label(s))}, {_md(s.mode)}: {_md('; '.join(why))}" for s, why in self.not_run.items()]
        missing = [c for c in self.coverage() if c["registered"] and not c["measured"]]
        if missing:
            out += ["", "## Not measured", ""]
            out += [f"- {_md(c['name'])} (family {_md(c['family'])})" for c in missing]
        return "\n".join(out) + "\n"

    def label_row(self, row: dict[str, Any]) -> str:
        s = SpeedSeries(row["mechanism"], row["impl"], canonical(row["params"]), row["mode"], row["causal"],
                        row["grid_rank"], tuple(row[k] for k in SHAPE_KEYS))
        return self.label(s)

    # -- the page -----------------------------------------------------------------------
    def html(self, *, quiet: bool = True) -> str:
        try:
            from . import plots
        except ModuleNotFoundError as err:
            if err.name is None or not err.name.startswith("matplotlib"):
                raise
            raise ModuleNotFoundError(f"the report draws its figures with matplotlib: {MATPLOTLIB_HINT}",
                                      name="matplotlib") from err

        gen = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.generated))
        body = [f"<h1>attnlab results</h1><p class='meta'>{len(self.speed)} speed and {len(self.recall)} recall "
                f"results from <code>{_e(self.database)}</code> · generated {_e(gen)} · attnlab {_e(__version__)}</p>"]
        body.append("<nav><a href='#coverage'>mechanisms</a> · <a href='#speed'>speed and memory</a> · "
                    "<a href='#exponents'>exponents</a> · <a href='#sdpa'>ratios to SDPA</a> · "
                    "<a href='#peers'>peers</a> · <a href='#recall'>recall</a> · "
                    "<a href='#environment'>environment</a></nav>")
        body.append(self._coverage_html())
        panels = self.panels()
        recall = self.recall_cells()
        figures = iter(progress(range(len(panels) + len(recall)), total=len(panels) + len(recall),
                                desc="report figures", quiet=quiet))
        body.append("<section id='speed'><h2>Speed and peak memory against N</h2>")
        if not panels and not self.not_run:
            body.append("<p class='empty'>No speed results yet (run <code>attnlab bench speed</code>).</p>")
        elif self.common_shape():
            body.append(f"<p>All runs: {_e(self.common_shape())}. Peers are dashed.</p>")
        for family, mode, series in panels:
            next(figures, None)
            title = f"Family {family} ({FAMILIES.get(family, 'unregistered')}), {mode}"
            lines_time, lines_mem = [], []
            for s in series:
                ok = {n: r for n, r in self.series[s].items() if r.status == "ok"}
                ns = sorted(ok)
                label = self.label(s, with_params=None)
                lines_time.append(plots.Line(label, ns, [_ok_time(ok[n]) for n in ns], s.peer, s.mechanism))
                mem = [ok[n].metrics.get("peak_mem_bytes") for n in ns]
                lines_mem.append(plots.Line(label, ns, [m if isinstance(m, (int, float)) else None for m in mem],
                                            s.peer, s.mechanism))
            body.append(f"<h3>{_e(title)}</h3>")
            if any(line.y for line in lines_time):
                png = plots.scaling_figure(title, [("median time (s)", lines_time), ("peak memory (bytes)", lines_mem)])
                body.append(_img(png, f"time and peak memory against N, {title}"))
            else:
                body.append("<p class='empty'>No successful measurement to plot.</p>")
            body.append(self._speed_table(series))
        if self.not_run:
            body.append("<h3>Not run</h3><ul>" + "".join(
                f"<li>{_e(self.label(s))}, {_e(s.mode)}: {_e('; '.join(why))}</li>" for s, why in self.not_run.items()
            ) + "</ul>")
        body.append("</section>")
        body.append(self._exponents_html())
        body.append(self._sdpa_html())
        body.append(self._peers_html())
        body.append("<section id='recall'><h2>Multi-query associative recall (MQAR)</h2>")
        if not recall:
            body.append("<p class='empty'>No recall results yet (run <code>attnlab bench recall</code>).</p>")
        else:
            body.append("<p>Accuracy on queried positions at the end of training: the mean over seeds, best "
                        "setting when several learning rates were tried; rounded down to two decimals. "
                        "Grey: not run.</p>")
        for (d_model, seq_len), rows in recall.items():
            next(figures, None)
            kvs = sorted({kv for cells in rows.values() for kv in cells}, key=_num_key)
            keys = sorted(rows)
            values = [[(rows[k].get(kv) or {}).get("accuracy") for kv in kvs] for k in keys]
            notes = [[_cell_note(rows[k].get(kv)) for kv in kvs] for k in keys]
            labels = [self.recall_row_label(*k) for k in keys]
            title = f"MQAR accuracy, d_model={d_model}, seq_len={seq_len}"
            png = plots.heatmap(title, labels, [str(kv) for kv in kvs], values, notes, xlabel="key-value pairs",
                                colorbar_label="accuracy")
            body.append(f"<h3>{_e(title)}</h3>")
            body.append(_img(png, title))
            body.append(_table(["mechanism", *(f"kv={kv}" for kv in kvs)],
                               [[_e(lab), *(_status_cell(n, rows[k].get(kv)) for n, kv in zip(nts, kvs))]
                                for lab, k, nts in zip(labels, keys, notes)]))
        if self.recall:
            body.append(self._recall_details())
        body.append("</section>")
        body.append(self._environment_html())
        return PAGE.format(title="attnlab results", css=CSS, body="\n".join(body))

    def _coverage_html(self) -> str:
        rows = []
        for c in self.coverage():
            family = c["family"] or "-"
            rows.append([
                f"<code>{_e(c['name'])}</code>" + ("" if c["registered"] else " <span class='status'>not registered</span>"),
                _e(f"{family} ({FAMILIES[family]})" if family in FAMILIES else family),
                _e(c["cost"] or "-"),
                _e(_num(c["declared_exponent"])),
                _counts_html(c["speed"]),
                _counts_html(c["recall"]),
            ])
        measured = sum(c["measured"] for c in self.coverage() if c["registered"])
        return (f"<section id='coverage'><h2>Mechanisms</h2><p>{len(self.specs)} registered, {measured} with "
                f"results.</p>" + _table(["mechanism", "family", "cost", "declared exponent", "speed", "recall"], rows)
                + "</section>")

    def _speed_table(self, series: Sequence[SpeedSeries]) -> str:
        ns = sorted({n for s in series for n in self.series[s]})
        rows = []
        for s in series:
            rows.append([_e(self.label(s)), *(_speed_cell(self.series[s].get(n)) for n in ns)])
        return _table(["run", *(f"N={n}" for n in ns)], rows)

    def _exponents_html(self) -> str:
        rows = []
        for x in self.exponents():
            delta = (x["measured"] - x["declared"]) if x["measured"] is not None and x["declared"] is not None else None
            span = f"{x['n_min']}–{x['n_max']}" if x["points"] else "-"
            rows.append([_e(self.label_row(x)), _e(x["mode"]), _e(_num(x["declared"])), _e(_num(x["measured"])),
                         _e(_num(delta, signed=True)), _e(_num(x["measured_memory"])), _e(f"{x['points']} ({span})")])
        text = ("<p>The measured exponent is the least-squares slope of log time (and log peak memory) against "
                "log N over the successful points; constant overheads flatten it at small N.</p>")
        table = _table(["run", "mode", "declared", "measured (time)", "measured − declared", "measured (memory)",
                        "points (N)"], rows) if rows else "<p class='empty'>No speed results yet.</p>"
        return f"<section id='exponents'><h2>Cost exponents: measured against declared</h2>{text}{table}</section>"

    def _sdpa_html(self) -> str:
        series = sorted((s for s in self.series if not s.peer), key=lambda s: (s.mode,) + self.series_order(s))
        ns = sorted({n for s in series for n in self.series[s]})
        rows = [[_e(self.label(s)), _e(s.mode), *(_ratio_cell(*self.sdpa_ratio(s, n)) for n in ns)] for s in series]
        text = (f"<p>Median time over the median time of dense softmax attention (<code>{SDPA_MECHANISM}</code>, "
                "torch's SDPA) at the same N, mode, causality and shape, measured in the same store.</p>")
        table = _table(["run", "mode", *(f"N={n}" for n in ns)], rows) if rows else "<p class='empty'>No speed results yet.</p>"
        return f"<section id='sdpa'><h2>Time relative to dense SDPA</h2>{text}{table}</section>"

    def _peers_html(self) -> str:
        series = sorted((s for s in self.series if s.peer), key=lambda s: (s.mode,) + self.series_order(s))
        ns = sorted({n for s in series for n in self.series[s]})
        rows = []
        for s in series:
            cells = []
            for n in ns:
                ratio, text = self.peer_ratio(s, n)
                r = self.series[s].get(n)
                diff = r.metrics.get("max_abs_diff") if r is not None else None
                title = f"max |attnlab − peer| = {diff:.3g}" if isinstance(diff, (int, float)) else ""
                cells.append(_ratio_cell(ratio, text, title))
            rows.append([_e(self.label(s)), _e(s.mode), *cells])
        text = ("<p>attnlab's median time over the peer library's on the same configuration (below 1: attnlab is "
                "faster). Outputs are compared before timing; a peer whose output disagrees shows "
                "<span class='status'>disagree</span>, never a time.</p>")
        table = (_table(["peer run", "mode", *(f"N={n}" for n in ns)], rows) if rows
                 else "<p class='empty'>No peer library measured (<code>attnlab bench speed --peers ...</code>).</p>")
        return f"<section id='peers'><h2>Peers</h2>{text}{table}</section>"

    def _recall_details(self) -> str:
        rows = []
        for r in sorted(self.recall, key=lambda r: tuple(str(r.config.get(k)) for k in
                                                         ("d_model", "seq_len", "mechanism", "num_kv_pairs", "seed"))):
            c, m = r.config, r.metrics
            rows.append([_e(c.get("mechanism")), _e(fmt_params(c.get("params") or {})), _e(c.get("d_model")),
                         _e(c.get("seq_len")), _e(c.get("num_kv_pairs")), _e(c.get("seed")), _e(c.get("lr")),
                         _status_html(r.status, m.get("note")) if r.status != "ok" else _e(_num(m.get("accuracy"), 3)),
                         _e(_num(m.get("best_accuracy"), 3)), _e(m.get("epochs", "-")),
                         _e("yes" if m.get("converged") else "no"), _e(fmt_time(m.get("train_seconds")))])
        return ("<details><summary>Every recall run</summary>"
                + _table(["mechanism", "params", "d_model", "seq_len", "kv", "seed", "lr", "accuracy", "best",
                          "epochs", "converged", "training"], rows) + "</details>")

    def _environment_html(self) -> str:
        parts = ["<section id='environment'><h2>Environment</h2>"]
        if not self.environments:
            parts.append("<p class='empty'>No results yet.</p>")
        elif len(self.environments) > 1:
            differ = sorted({k for env in self.environments for k in env
                             if len({canonical(e.get(k)) for e in self.environments}) > 1})
            machine = [k for k in differ if k not in PEER_ENV_KEYS + ("threads", "interop_threads")]
            parts.append(f"<p class='{'warn' if machine else 'meta'}'>{len(self.environments)} environments, "
                         f"differing in {_e(', '.join(differ))}"
                         + ("; compare times only within one.</p>" if machine else ".</p>"))
        for i, env in enumerate(self.environments):
            rows = [[_e(k), _e(", ".join(map(str, v)) if isinstance(v, list) else v)] for k, v in env.items()]
            parts.append(f"<h3>Environment {i + 1} ({self.env_counts[i]} results)</h3>" + _table(["", "value"], rows))
        parts.append("</section>")
        return "".join(parts)

    # -- files --------------------------------------------------------------------------
    def write(self, out_dir: str | Path, *, quiet: bool = True) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False, default=str) + "\n",
                                          encoding="utf-8")
        (out / "summary.md").write_text(self.markdown(), encoding="utf-8")
        page = out / "report.html"
        page.write_text(self.html(quiet=quiet), encoding="utf-8")
        return page


def _series_key(fields: dict[str, Any]) -> str:
    return canonical([fields.get(k) for k in ("mechanism", "impl", "params", "mode", "causal", *SHAPE_KEYS)])


# -- HTML pieces ------------------------------------------------------------------------
def _num(value: Any, digits: int = 2, *, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _num_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _env_line(env: dict[str, Any]) -> str:
    keys = ("cpu", "threads", "torch", "attnlab", "git_commit", "python", "peer", "peer_version")
    return ", ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; header text is escaped here, cells are HTML already escaped by the caller."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='plot' alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _status_html(status: str, note: Any = None) -> str:
    title = f" title='{_e(note)}'" if note else ""
    return f"<span class='status s-{_e(status)}'{title}>{_e(STATUS_TEXT.get(status, status))}</span>"


def _speed_cell(r: Result | None) -> str:
    if r is None:
        return ""
    m = r.metrics
    if r.status != "ok":
        return _status_html(r.status, m.get("note"))
    tip = [f"min {fmt_time(m.get('min_s'))}, max {fmt_time(m.get('max_s'))}, {m.get('repeats', '?')} repeats"]
    if r.config.get("grid"):
        tip.append("grid " + "×".join(map(str, r.config["grid"])))
    if m.get("note"):
        tip.append(str(m["note"]))
    lines = [f"<b>{_e(fmt_time(m.get('median_s')))}</b>"]
    if isinstance(m.get("peak_mem_bytes"), (int, float)):
        lines.append(f"<small>{_e(fmt_bytes(m['peak_mem_bytes']))}</small>")
    if isinstance(m.get("flops_per_s"), (int, float)):
        lines.append(f"<small>{m['flops_per_s'] / 1e9:.3g} GFLOP/s</small>")
    return f"<span title='{_e('; '.join(tip))}'>{'<br>'.join(lines)}</span>"


def _ratio_cell(ratio: float | None, text: str, title: str = "") -> str:
    """A ratio, or the reason there is none (a status such as "disagree") styled as a status."""
    tip = f" title='{_e(title)}'" if title else ""
    if ratio is not None:
        return f"<span{tip}>{_e(text)}</span>"
    if not text:
        return ""
    status = next((k for k, shown in STATUS_TEXT.items() if shown == text), "none")
    return f"<span class='status s-{status}'{tip}>{_e(text)}</span>"


def _cell_note(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    if cell["status"] != "ok":
        return STATUS_TEXT.get(cell["status"], cell["status"])
    return fmt_accuracy(cell["accuracy"])


def _status_cell(note: str, cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    return _e(note) if cell["status"] == "ok" else _status_html(cell["status"])


def _counts_html(counts: dict[str, int]) -> str:
    if not counts:
        return f"<span class='status s-none'>{NOT_MEASURED}</span>"
    order = list(STATUS_TEXT)
    items = sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    return ", ".join(f"{n} {_e(STATUS_TEXT.get(s, s))}" for s, n in items)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { margin-top: 1.5em; }
.meta, nav { color: #555; } code { font-size: 95%; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } tbody tr:nth-child(even) { background: #fafafa; }
.scroll { overflow-x: auto; } img.plot { max-width: 100%; display: block; margin: .5em 0; }
.status { padding: 0 .3em; border-radius: 3px; background: #eee; white-space: nowrap; }
.s-over_time, .s-over_memory { background: #fff1c2; } .s-error, .s-disagree { background: #ffd6d6; }
.s-none { color: #777; } .empty { color: #777; font-style: italic; } .warn { color: #a15c00; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
{body}
</body></html>
"""


def write_report(store: ResultStore, out_dir: str | Path = DEFAULT_OUT, *, quiet: bool = True) -> Path:
    """Render `store` into out_dir: report.html (returned), results.json and summary.md."""
    return Report.from_store(store).write(out_dir, quiet=quiet)


# -- command line -----------------------------------------------------------------------
def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `attnlab report` (all of them, --db and --quiet included)."""
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, metavar="PATH",
                        help=f"the results database (default {DEFAULT_DB})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"where report.html, results.json and summary.md go (default {DEFAULT_OUT})")
    parser.add_argument("--json", metavar="PATH|-", help="also write the JSON export to PATH, or print it with -")
    parser.add_argument("--markdown", action="store_true", help="print the Markdown summary")
    parser.add_argument("--quiet", action="store_true", help="no progress or status messages")


def run_report_command(args: argparse.Namespace) -> int:
    """Write the report; print the Markdown/JSON when asked, and the page's path last (stderr with --json -)."""
    if not Path(args.db).exists():
        print(f"attnlab report: error: no results database at {args.db} (run `attnlab bench` first, "
              "or choose one with --db)", file=sys.stderr)
        return 2
    report = Report.from_store(ResultStore(args.db))
    say(f"report: {len(report.results)} results from {args.db}", quiet=args.quiet)
    try:
        page = report.write(args.out, quiet=args.quiet)
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print(f"attnlab report: error: {err}", file=sys.stderr)
        return 2
    if args.markdown:
        print(report.markdown())
    if args.json:
        text = json.dumps(report.to_json(), indent=1, ensure_ascii=False, default=str)
        if args.json == "-":
            print(text)
            say(str(page), quiet=args.quiet)
            return 0
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(page)
    return 0
