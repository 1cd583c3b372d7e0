"""The report page: a self-contained HTML document (inline CSS, base64 PNG figures, no script).

Order: the headline (against SDPA, cost exponents, MQAR leaderboards, peers, and what
the numbers rest on), then the speed plots as small multiples per family and group,
then the reference tables, then the inference suites present in the store (sharded decoding,
KV-cache compression, KV-cache key selection: `inference`); every section after the headline
folds (<details>). All
text from the store is escaped.
"""
from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from ... import __version__
from ...core.registry import FAMILIES
from .. import plots
from ..compare import comparable
from ..limits import BAR_TEXT, TWO_THREADS, limit_value_text
from ..store import canonical
from . import headline, inference
from .fmt import (
    MEMORY_UNIT,
    NOT_MEASURED,
    STATUS_TEXT,
    esc,
    fmt_accuracy,
    fmt_mib,
    fmt_num,
    fmt_params,
    fmt_ratio,
    fmt_speedup,
    fmt_time,
    mib,
    status_text,
)
from .inference_figures import compression_figure, decode_figure, selection_figure
from .model import PEER_BASE, SHAPE_KEYS, Panel, Point, Report, SpeedSeries

REFERENCE_LABEL = "SDPA (causal SDPA on causal rows)"
REUSED_MARK = "↺"
RUN_KEYS = ("run_id", "time", "load_1m", "matmul_gflops", "peer", "peer_package", "peer_version")  # per run, not machine
FLAG_MARK = "⚠"


# -- figures ------------------------------------------------------------------------------
def panel_lines(report: Report, panel: Panel) -> plots.SpeedPanel:
    """The panel's lines: each series' time (with its spread) and memory in MiB, flagged values left out, and
    the SDPA reference over the same N."""
    time_lines, memory_lines = [], []
    for s in panel.series:
        points = list(report.series[s].values())
        label = report.label(s, with_params=None, context=False) + (f" ({s.rank}-D)" if s.rank > 1 else "")
        key = canonical([s.mechanism, s.params])
        ns = [p.n for p in points]
        time_lines.append(plots.Line(label, ns, [p.time for p in points], [p.low for p in points],
                                     [p.high for p in points], s.peer, key))
        memory_lines.append(plots.Line(label, ns, [mib(p.memory) for p in points], peer=s.peer, key=key))
    ref_time = ref_memory = None
    note = "no SDPA measured here"
    if panel.reference is not None:
        points, note = reference_points(report, panel)
        ns = [p.n for p in points]
        ref_time = plots.Line(REFERENCE_LABEL, ns, [p.time for p in points], [p.low for p in points],
                              [p.high for p in points])
        ref_memory = plots.Line(REFERENCE_LABEL, ns, [mib(p.memory) for p in points])
    return plots.SpeedPanel(panel_title(report, panel), ref_time, ref_memory, time_lines, memory_lines, note)


def reference_points(report: Report, panel: Panel) -> tuple[list[Point], str]:
    """The SDPA points a panel draws: at the N its series were timed, measured comparably with one of them
    (same run or environment); and the note shown where none is left (why)."""
    assert panel.reference is not None
    timed = {n: [p for s in panel.series if (p := report.series[s].get(n)) is not None and p.time is not None]
             for n in report.series[panel.reference]}
    points = [p for n, p in report.series[panel.reference].items()
              if any(comparable(p.result, q.result) for q in timed.get(n, []))]
    if any(p.time is not None for p in points):
        return points, ""
    if points:
        return points, "SDPA not plotted: flagged implausible"
    return points, "SDPA not plotted: measured only in another environment"


def panel_title(report: Report, panel: Panel) -> str:
    parts = [panel.mode, "causal" if panel.causal else "non-causal"]
    varying = report.varying_shape_keys()
    if varying:
        parts += [f"{SHAPE_KEYS[i]}={panel.shape[i]}" for i in varying]
    return ", ".join(parts)


def group_figures(report: Report, panels: Sequence[Panel]) -> list[tuple[str, list[Panel], Figure]]:
    """(title, panels, figure) per mechanism group of one family: one figure holds a group's panels."""
    groups: dict[str, list[Panel]] = {}
    for p in panels:
        groups.setdefault(p.group, []).append(p)
    out = []
    for group, members in groups.items():
        family = members[0].family
        title = f"Family {family} ({FAMILIES.get(family, 'unregistered')}) · {group}"
        out.append((title, members, plots.speed_figure(title, [panel_lines(report, p) for p in members])))
    return out


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='plot' alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


# -- small pieces -------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; header text is escaped here, cells are HTML already escaped by the caller."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    klass = f" class='{cls}'" if cls else ""
    return f"<div class='scroll'><table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _status_html(status: str, note: Any = None) -> str:
    title = f" title='{esc(note)}'" if note else ""
    return f"<span class='status s-{esc(status)}'{title}>{esc(status_text(status))}</span>"


def _reused_html(r: Report, point: Point) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(point.result.created))
    number = r.runs.get(point.result.env.get("run_id"), 0)
    return (f" <span class='reused' title='reused from the store: measured in run {number} ({esc(when)} UTC), "
            f"not the newest'>{REUSED_MARK}{number}</span>")


def _speed_cell(r: Report, point: Point | None) -> str:
    if point is None:
        return ""
    res, m = point.result, point.result.metrics
    mark = _reused_html(r, point) if point.reused else ""
    if res.status != "ok":
        return _status_html(res.status, m.get("note")) + mark
    tip = [f"{m.get('repeats', '?')} repeats"]
    if res.config.get("grid"):
        tip.append("grid " + "×".join(map(str, res.config["grid"])))
    if m.get("note"):
        tip.append(str(m["note"]))
    lines = [f"<b>{esc(fmt_time(m.get('median_s')))}</b>{mark}"]
    if point.low is not None and point.high is not None:
        lines.append(f"<small class='spread'>{esc(point.spread)} {esc(fmt_time(point.low))}–{esc(fmt_time(point.high))}</small>")
    if point.flags:
        lines.append(f"<small class='flag' title='{esc('; '.join(point.flags))}'>{FLAG_MARK} not plotted</small>")
    peak = m.get("peak_mem_bytes")
    if isinstance(peak, (int, float)):
        lines.append(f"<small>{esc(fmt_mib(peak))}</small>")
    if point.load is not None:
        lines.append(f"<small class='load'>load {point.load:.2f}</small>")
    return f"<span title='{esc('; '.join(tip))}'>{'<br>'.join(lines)}</span>"


def _ratio_cell(ratio: float | None, text: str, title: str = "") -> str:
    """A ratio, or the reason there is none (a status such as "disagree") styled as a status."""
    tip = f" title='{esc(title)}'" if title else ""
    if ratio is not None:
        klass = " class='faster'" if ratio < 1 else ""
        return f"<span{tip}{klass}>{esc(text)}</span>"
    if not text:
        return ""
    status = next((k for k, shown in STATUS_TEXT.items() if shown == text), "none")
    return f"<span class='status s-{status}'{tip}>{esc(text)}</span>"


def _fold(section: str, title: str, body: str, *, open_: bool = False, summary: str = "") -> str:
    more = f" <span class='gist'>{esc(summary)}</span>" if summary else ""
    return (f"<section id='{section}'><details{' open' if open_ else ''}><summary><h2>{esc(title)}</h2>{more}"
            f"</summary>{body}</details></section>")


# -- the page -------------------------------------------------------------------------------
class Page:
    """Renders one `Report` as the page's sections."""

    def __init__(self, report: Report) -> None:
        self.r = report

    def render(self, *, figures: Any = None) -> str:
        """The whole page; `figures` (an iterator) is advanced once per figure drawn (progress)."""
        r = self.r
        gen = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r.generated))
        more = "".join(f", {n} {suite}" for suite, n in r.inference_counts().items() if n)
        body = [f"<h1>attnlab results</h1><p class='meta'>{len(r.speed)} speed and {len(r.recall)} recall results{more} "
                f"from <code>{esc(r.database)}</code> · generated {esc(gen)} · attnlab {esc(__version__)}</p>",
                "<nav><a href='#headline'>headline</a> · <a href='#speed'>speed and memory by family</a> · "
                "<a href='#exponents'>exponents</a> · <a href='#sdpa'>ratios to SDPA</a> · "
                "<a href='#peers'>peers</a> · <a href='#limits'>limits</a> · <a href='#recall'>recall</a> · "
                + "".join(f"<a href='#{anchor}'>{esc(name)}</a> · " for anchor, name, present in (
                    ("claims", "claims", r.claims), ("decode", "sharded decoding", r.decode_settings), ("kv-compression", "KV compression",
                                                                         r.compression_settings),
                    ("kv-selection", "KV selection", r.selection_settings)) if present)
                + "<a href='#coverage'>mechanisms</a> · <a href='#environment'>environment</a></nav>"]
        body.append(self.headline())
        body.append(self.speed(figures))
        body.append(self.exponents())
        body.append(self.sdpa())
        body.append(self.peers())
        body.append(self.limits())
        body.append(self.recall(figures))
        body.append(self.claims())
        body.append(self.decode(figures))
        body.append(self.kv_compression(figures))
        body.append(self.kv_selection(figures))
        body.append(self.coverage())
        body.append(self.environment())
        return PAGE.format(title="attnlab results", css=CSS, body="\n".join(body))

    # -- headline ---------------------------------------------------------------------------
    def headline(self) -> str:
        r = self.r
        parts = [self._basis()]
        beats = headline.beats_sdpa(r)
        parts.append("<h3>Against SDPA</h3>")
        if beats:
            faster = [b for b in beats if b.from_n is not None]
            text = (f"{len(faster)} of {len(beats)} runs are faster than their SDPA reference at the largest N measured"
                    if faster else "No run is faster than its SDPA reference at the largest N measured")
            parts.append(f"<p>{esc(text)}. Causal runs are compared with causal SDPA "
                         "(<code>softmax</code> with <code>causal=True</code>), the others with plain SDPA; ratios "
                         "only between comparable measurements.</p>")
            parts.append(self._beats_compact(beats))
            rows = []
            for b in beats:
                rows.append([
                    f"<b>{esc(b.label)}</b>", esc(b.series.mode), esc(b.reference),
                    esc(f"N ≥ {b.from_n}") if b.from_n is not None else "<span class='muted'>not faster at the largest N</span>",
                    _ratio_cell(b.at_max, f"{fmt_speedup(b.at_max)} at N={b.n_max}"),
                    " ".join(f"<span class='{'faster' if x < 1 else 'slower'}'>{esc(fmt_ratio(x))}</span> "
                             f"<small>N={n}</small>" for n, x in sorted(b.ratios.items())),
                ])
            parts.append(f"<details><summary>Every run against SDPA ({len(beats)}), with its ratio at each N</summary>"
                         + _table(["run", "mode", "against", "faster from", "at the largest N",
                                   "time / reference time"], rows, "headline") + "</details>")
        else:
            parts.append("<p class='empty'>No ratio to SDPA yet (run <code>attnlab bench speed</code>).</p>")
        missing = headline.uncompared(r)
        if missing:
            parts.append("<p class='flag'>Not compared with SDPA: " + "; ".join(
                f"{esc(r.label(s, with_params=None))} ({esc(s.mode)}): {esc(why)}" for s, why in missing) + ".</p>")
        parts.append(self._headline_exponents())
        parts.append(self._leaderboards())
        parts.append(self._standing())
        return (f"<section id='headline'><h2>Headline</h2>{''.join(parts)}</section>")

    def _beats_compact(self, beats: Sequence[headline.BeatsSdpa]) -> str:
        """Per mode and causality, the runs faster than their SDPA at the largest N (fastest first), then the
        others in one line: what a reader wants from the ratios, in a screen."""
        groups: dict[tuple[str, bool], list[headline.BeatsSdpa]] = {}
        for b in beats:
            groups.setdefault((b.series.mode, b.series.causal), []).append(b)
        blocks = []
        for (mode, causal), members in groups.items():
            faster = [b for b in members if b.from_n is not None]
            rest = [b for b in members if b.from_n is None]
            title = f"{mode}, {'causal' if causal else 'non-causal'}: against {members[0].reference}"
            body = (_table(["faster at the largest N", "from", "by"],
                           [[f"<b>{esc(b.label)}</b>", esc(f"N ≥ {b.from_n}"),
                             _ratio_cell(b.at_max, f"{1 / b.at_max:.3g}× at N={b.n_max}")] for b in faster], "headline")
                    if faster else "<p class='muted'>None faster at the largest N.</p>")
            if rest:
                body += ("<p class='muted small'>Not faster: " + ", ".join(
                    f"{esc(b.series.mechanism)} ({esc(fmt_speedup(b.at_max))})" for b in rest) + ".</p>")
            blocks.append(f"<div><h4>{esc(title)}</h4>{body}</div>")
        return "<div class='columns'>" + "".join(blocks) + "</div>"

    def _basis(self) -> str:
        r = self.r
        loads = r.loads()
        reused = sum(p.reused for points in r.series.values() for p in points.values())
        flagged = r.flagged()
        runs = {str(x.env.get("run_id")) for x in r.results}
        items = [f"{len(r.speed)} speed and {len(r.recall)} recall results from {len(runs)} run{'s' * (len(runs) != 1)} "
                 f"in {len(r.machines)} environment{'s' * (len(r.machines) != 1)} (machine and software); ratios "
                 "only between results of one run or one environment"]
        if r.skipped:
            items.append(f"{r.skipped} unreadable rows of the store skipped")
        if r.common_shape():
            items.append(f"every speed run: {r.common_shape()}")
        cores = max((_int(x.env.get("cpu_count")) for x in r.speed), default=0)
        if loads:
            busy = f" (above the {cores} cores: other work shared the machine, times are inflated)" \
                if cores and loads[-1] > cores else ""
            items.append(f"load average at measurement {loads[0]:.2f}–{loads[-1]:.2f}{busy}")
        else:
            items.append("load average at measurement not recorded")
        if r.latest_run is not None:
            items.append(f"{reused} speed results measured in earlier runs than the newest speed run (run "
                         f"{r.runs.get(r.latest_run)}), "
                         f"reused from the store: marked {REUSED_MARK} with their run's number (see Environment)")
        items.append(f"{len(flagged)} implausible values not plotted (marked {FLAG_MARK}, listed under their family)"
                     if flagged else "no implausible value flagged")
        items.append(f"memory in {MEMORY_UNIT} throughout; spread of the time: IQR when stored, else min–max")
        return "<ul class='basis'>" + "".join(f"<li>{esc(x)}</li>" for x in items) + "</ul>"

    def _headline_exponents(self) -> str:
        rows = headline.exponent_rows(self.r)
        missing = headline.unfitted(self.r)
        out = ["<h3>Cost exponents</h3>"]
        if not rows:
            out.append("<p class='empty'>No exponent fitted yet: it needs ok times at 3 or more lengths.</p>")
        else:
            modes = list(dict.fromkeys(x["mode"] for x in sorted(rows, key=lambda x: x["mode"] != "fwd")))
            by_row: dict[str, dict[str, Any]] = {}
            for x in rows:  # one row per series but the mode; a value per mode
                label = self.r.label(self.r.series_of(x), with_params=None)
                entry = by_row.setdefault(label, {"declared": x["declared"], "measured": {}})
                entry["measured"][x["mode"]] = x["measured"]
            ordered = sorted(by_row.items(), key=lambda kv: min(v for v in kv[1]["measured"].values()))
            fig = plots.exponent_figure("time ∝ N^e: measured (dot) and declared (diamond), lowest first", modes,
                                        [(label, [e["measured"].get(m) for m in modes], e["declared"])
                                         for label, e in ordered])
            out.append(_img(plots.png(fig), "measured and declared cost exponents"))
        if missing:
            out.append("<p class='muted'>Not fitted (fewer than 3 lengths measured ok): "
                       + esc(", ".join(f"{self.r.label_row(x)} ({x['mode']})" for x in missing)) + ".</p>")
        return "".join(out)

    def _leaderboards(self) -> str:
        boards = headline.leaderboards(self.r)
        out = ["<h3>MQAR recall at equal budget</h3>"]
        if not boards:
            return out[0] + "<p class='empty'>No recall results yet (run <code>attnlab bench recall</code>).</p>"
        for board in boards:
            out.append(f"<p>d_model {esc(board.d_model)}, sequence length {esc(board.seq_len)}; every mechanism "
                       f"trained with the same budget: <b>{esc(board.budget)}</b>. Accuracy on the queried positions "
                       f"(mean over seeds), best first; <span class='stopped'>◐</span> stopped before converging "
                       f"(accuracy below 0.99).</p>")
            rows = []
            for row in board.rows:
                cells = []
                for kv in board.kvs:
                    cell = row["cells"].get(kv)
                    if cell is None:
                        cells.append("")
                    elif cell["status"] != "ok":
                        cells.append(_status_html(cell["status"]))
                    else:
                        stop = (f" <span class='stopped'>◐ stopped before converging</span><br><small>"
                                f"{esc(cell['stopped'])}</small>" if cell["stopped"]
                                else " <span class='converged'>converged</span>")
                        epochs = f"{cell['epochs']} epoch{'s' * (cell['epochs'] != 1)}"
                        cells.append(f"{esc(fmt_accuracy(cell['accuracy']))}{stop}<br><small>{esc(epochs)}, "
                                     f"{esc(fmt_time(cell['train_seconds']))} of training</small>")
                rows.append([str(row["rank"]) if row["rank"] is not None else "-", f"<b>{esc(row['label'])}</b>",
                             esc(fmt_accuracy(row["mean"])), *cells])
            out.append(_table(["#", "mechanism", "mean accuracy", *(f"kv={kv}" for kv in board.kvs)], rows, "headline"))
        return "".join(out)

    def _standing(self) -> str:
        standing = headline.peer_standing(self.r)
        out = ["<h3>Peers</h3>"]
        if not standing:
            return out[0] + ("<p class='empty'>No peer library measured "
                             "(<code>attnlab bench speed --peers ...</code>).</p>")
        out.append("<p>attnlab's time over the peer library's on the same configuration, both measured in one run "
                    "or one environment (below 1: attnlab is faster); a peer is timed only after its output agreed "
                    "with attnlab's.</p>")
        rows = []
        for p in standing:
            ratios = " ".join(f"<span class='{'faster' if x < 1 else 'slower'}'>{esc(fmt_ratio(x))}</span> "
                              f"<small>N={n}</small>" for n, x in sorted(p.ratios.items()))
            total = p.agreed + p.disagreed + sum(p.other.values())
            agreed = f"{p.agreed} of {total}" + (f", <span class='status s-disagree'>{p.disagreed} disagree</span>"
                                                  if p.disagreed else "")
            others = ", ".join(f"{n} {status_text(s)}" for s, n in sorted(p.other.items()))
            rows.append([f"<b>{esc(p.series.impl)}</b>", esc(p.series.mechanism), esc(p.series.mode)
                         + (" causal" if p.series.causal else ""), ratios or "-", agreed + (f"; {esc(others)}" if others else "")])
        out.append(_table(["peer", "mechanism", "mode", "attnlab / peer", "outputs agreed"], rows, "headline"))
        return "".join(out)

    # -- speed ------------------------------------------------------------------------------
    def speed(self, figures: Any) -> str:
        r = self.r
        body = ["<p>Small multiples: one figure per family and mechanism group, one row per mode and causality, "
                "median time and peak memory against N on log-log axes. The thick black line is SDPA (dense "
                "<code>softmax</code>; causal SDPA on causal rows) with its spread as a grey band; error bars are each "
                "run's spread; peers are dashed with hollow markers in their mechanism's colour. Values flagged "
                f"implausible are not plotted ({FLAG_MARK}, listed under the figure). Open a family to see "
                "its figures.</p>"]
        families = r.families()
        if not families and not r.not_run:
            body.append("<p class='empty'>No speed results yet (run <code>attnlab bench speed</code>).</p>")
        for family, panels in families:
            blocks = []
            mechanisms = sorted({s.mechanism for p in panels for s in p.series if not s.peer})
            for title, members, fig in group_figures(r, panels):
                if figures is not None:
                    next(figures, None)
                series = [s for p in members for s in p.series]
                block = [f"<h3>{esc(title)}</h3>", _img(plots.png(fig), f"time and peak memory against N, {title}")]
                refs = list(dict.fromkeys(p.reference for p in members if p.reference is not None))
                shown = {(p.reference, q.n) for p in members if p.reference is not None for q in reference_points(r, p)[0]}
                flagged = [(s, p) for s in series for p in r.series[s].values() if p.flags]
                flagged = [(s, p) for s in refs for p in r.series[s].values() if p.flags and (s, p.n) in shown] + flagged
                if flagged:
                    block.append(_flagged_html(r, flagged))
                block.append(f"<details><summary>Table: {esc(title)}</summary>{self._speed_table(refs + series)}</details>")
                blocks.append("".join(block))
            beats = [b for b in headline.beats_sdpa(r) if b.series.mechanism in mechanisms and b.from_n is not None]
            gist = (f"{len(mechanisms)} mechanism{'s' * (len(mechanisms) != 1)}; faster than SDPA at the largest N: "
                    + (", ".join(sorted({b.series.mechanism for b in beats})) or "none"))
            body.append(f"<details class='family'><summary><b>Family {esc(family)} "
                        f"({esc(FAMILIES.get(family, 'unregistered'))})</b> <span class='gist'>{esc(gist)}</span>"
                        f"</summary>{''.join(blocks)}</details>")
        if r.not_run:
            body.append("<h3>Not run</h3><ul>" + "".join(
                f"<li>{esc(r.label(s))}, {esc(s.mode)}: {esc('; '.join(why))}</li>" for s, why in r.not_run.items()
            ) + "</ul>")
        return _fold("speed", "Speed and memory by family", "".join(body), open_=True)

    def _speed_table(self, series: Sequence[SpeedSeries]) -> str:
        r = self.r
        ns = sorted({n for s in series if not r.is_reference(s) for n in r.series[s]})  # SDPA at these N only
        rows = [[esc(r.label(s)), esc(s.mode), *(_speed_cell(r, r.series[s].get(n)) for n in ns)] for s in series]
        return _table(["run", "mode", *(f"N={n}" for n in ns)], rows)

    # -- reference tables ---------------------------------------------------------------------
    def exponents(self) -> str:
        rows = []
        for x in self.r.exponents():
            delta = (x["measured"] - x["declared"]) if x["measured"] is not None and x["declared"] is not None else None
            span = f"{x['n_min']}–{x['n_max']}" if x["points"] else "-"
            rows.append([esc(self.r.label_row(x)), esc(x["mode"]), esc(fmt_num(x["declared"])), esc(fmt_num(x["measured"])),
                         esc(fmt_num(delta, signed=True)), esc(fmt_num(x["measured_memory"])), esc(f"{x['points']} ({span})")])
        text = ("<p>The measured exponent is the least-squares slope of log time (and log peak memory) against "
                "log N over the successful points; constant overheads flatten it at small N.</p>")
        table = _table(["run", "mode", "declared", "measured (time)", "measured − declared", "measured (memory)",
                        "points (N)"], rows) if rows else "<p class='empty'>No speed results yet.</p>"
        return _fold("exponents", "Cost exponents: every series", text + table)

    def sdpa(self) -> str:
        r = self.r
        series = sorted((s for s in r.series if not s.peer), key=lambda s: (s.mode,) + r.series_order(s))
        ns = sorted({n for s in series for n in r.series[s]})
        rows = [[esc(r.label(s)), esc(s.mode), *(self._sdpa_cell(s, n) for n in ns)] for s in series]
        text = ("<p>Median time over the median time of dense softmax attention (<code>softmax</code>, torch's SDPA; "
                "causal SDPA for causal runs) at the same N, mode and shape.</p>")
        table = _table(["run", "mode", *(f"N={n}" for n in ns)], rows) if rows else "<p class='empty'>No speed results yet.</p>"
        return _fold("sdpa", "Time relative to SDPA: every series", text + table)

    def _sdpa_cell(self, s: SpeedSeries, n: int) -> str:
        point = self.r.series[s].get(n)
        if point is None:
            return ""
        if point.result.status != "ok":
            return _ratio_cell(None, status_text(point.result.status))
        ratio = self.r.sdpa_ratio(s, n)
        if ratio is not None:
            return _ratio_cell(ratio, fmt_ratio(ratio))
        if point.time is None:
            return _ratio_cell(None, "flagged", "; ".join(point.flags))
        if self.r.baseline_flagged(s, n):
            return _ratio_cell(None, "SDPA flagged", "the SDPA time at this N is flagged implausible")
        return _ratio_cell(None, "not comparable" if self.r.incomparable(s, n) else "no SDPA",
                           "SDPA measured only in another environment" if self.r.incomparable(s, n) else "")

    def peers(self) -> str:
        r = self.r
        series = sorted((s for s in r.series if s.peer), key=lambda s: (s.mode,) + r.series_order(s))
        ns = sorted({n for s in series for n in r.series[s]})
        rows = []
        for s in series:
            cells = []
            for n in ns:
                point = r.series[s].get(n)
                if point is None:
                    cells.append("")
                    continue
                diff = point.result.metrics.get("max_abs_diff")
                title = f"max |attnlab − peer| = {diff:.3g}" if isinstance(diff, (int, float)) else ""
                cells.append(_ratio_cell(*self._peer_text(s, n), title))
            rows.append([esc(r.label(s)), esc(s.mode), *cells])
        text = ("<p>attnlab's median time over the peer library's on the same configuration (below 1: attnlab is "
                "faster). Outputs are compared before timing; a peer whose output disagrees shows "
                "<span class='status s-disagree'>disagree</span>, never a time.</p>")
        table = (_table(["peer run", "mode", *(f"N={n}" for n in ns)], rows) if rows
                 else "<p class='empty'>No peer library measured (<code>attnlab bench speed --peers ...</code>).</p>")
        return _fold("peers", "Peers: every configuration", text + table)

    def _peer_text(self, peer: SpeedSeries, n: int) -> tuple[float | None, str]:
        theirs = self.r.series[peer][n]
        if theirs.result.status != "ok":
            return None, status_text(theirs.result.status)
        ours = self.r.twin(peer, n)
        if ours is None:
            return None, f"{PEER_BASE} {NOT_MEASURED}"
        if ours.result.status != "ok":
            return None, f"{PEER_BASE} {status_text(ours.result.status)}"
        ratio = self.r.peer_ratio(peer, n)
        if ratio is not None:
            return ratio, fmt_ratio(ratio)
        if theirs.time_flagged or ours.time_flagged:
            return None, "flagged" if theirs.time_flagged else f"{PEER_BASE} flagged"
        return None, "not comparable" if self.r.incomparable(peer, n) else "no time"

    def limits(self) -> str:
        """The `attnlab bench limits` table (newest run per row) and every series' share of the matmul rate."""
        r = self.r
        parts = []
        rows = r.limit_rows()
        if rows:
            env = rows[-1]["env"]
            parts.append(
                f"<p>From <code>attnlab bench limits</code>: one thread pinned to one CPU, medians of "
                f"{esc(str(env.get('rounds')))} interleaved rounds, load {esc(str(env.get('load_1m')))}. The machine in "
                f"that run: matmul {esc(fmt_num(env.get('matmul_1_gflops'), 0))} GFLOP/s on one thread "
                f"({esc(fmt_num(env.get('matmul_2_gflops'), 0))} on two), streaming "
                f"{esc(fmt_num(env.get('stream_1_gbs'), 1))} GB/s ({esc(fmt_num(env.get('stream_2_gbs'), 1))} on two). "
                "<i>Of limit</i> is the time the work needs at those rates (its FLOPs at the matmul rate, or its "
                "tensors streamed, whichever is longer) over the time measured; <i>2 threads</i> is the one-thread "
                f"time over the two-thread time, with the bar ≥ {TWO_THREADS:g}× for the parallel engines.</p>")
            table_rows = []
            for row in rows:
                met = {None: "", True: "<span class='faster'>met</span>", False: "<span class='slower'>not met</span>"}
                table_rows.append([
                    esc(row.get("work", "")), esc(fmt_num(row.get("ms"), 1)), esc(fmt_num(row.get("other_ms"), 1)),
                    esc(limit_value_text(row)), esc(BAR_TEXT[row["bar_kind"]].format(row["bar"])),
                    met[row.get("passed")],
                    esc(fmt_num(row["of_limit"] * 100, 0) + "%" if row.get("of_limit") is not None else "-"),
                    esc(fmt_num(row.get("speedup"), 2) + "×" if row.get("speedup") is not None else "-"),
                    met[row.get("two_threads_passed")],
                ])
            parts.append(_table(["work", "attnlab ms", "peer or second case ms", "value", "bar", "", "of limit",
                                 "2 threads", ""], table_rows))
        else:
            parts.append("<p class='empty'>No limits run yet (<code>attnlab bench limits</code>).</p>")
        shares = r.matmul_shares()
        if shares:
            ns = sorted({n for _, cells in shares for n in cells})
            share_rows = [[esc(r.label(s)), esc(s.mode), *(esc(f"{cells[n]:.0%}") if n in cells else "" for n in ns)]
                          for s, cells in shares]
            parts.append("<h3>Share of the matmul rate, every series that declares a FLOP count</h3><p>Its FLOPs per "
                         "second (the registry's count; fwd+bwd 3× the forward) over the matmul GFLOP/s measured in the "
                         "same run and process.</p>" + _table(["run", "mode", *(f"N={n}" for n in ns)], share_rows))
        return _fold("limits", "Limits: the machine's matmul and memory rates, and two threads", "".join(parts))

    def recall(self, figures: Any) -> str:
        r = self.r
        cells = r.recall_cells()
        several = len({budget for _, _, budget in cells}) > 1
        body = []
        if not cells:
            body.append("<p class='empty'>No recall results yet (run <code>attnlab bench recall</code>).</p>")
        else:
            body.append("<p>Accuracy on queried positions at the end of training: the mean over seeds, best "
                        "setting when several learning rates were tried; rounded down to two decimals; "
                        "◐ stopped before converging (below 0.99). Grey: not run.</p>")
        for (d_model, seq_len, budget), rows in cells.items():
            if figures is not None:
                next(figures, None)
            kvs = sorted({kv for c in rows.values() for kv in c}, key=lambda kv: (str(type(kv)), kv))
            keys = sorted(rows)
            values = [[(rows[k].get(kv) or {}).get("accuracy") for kv in kvs] for k in keys]
            notes = [[_cell_note(rows[k].get(kv)) for kv in kvs] for k in keys]
            labels = [r.recall_row_label(*k) for k in keys]
            title = f"MQAR accuracy, d_model={d_model}, seq_len={seq_len}" + (f", {budget}" if several else "")
            png = plots.heatmap(title, labels, [str(kv) for kv in kvs], values, notes, xlabel="key-value pairs",
                                colorbar_label="accuracy")
            body.append(f"<h3>{esc(title)}</h3>")
            body.append(_img(png, title))
            body.append(_table(["mechanism", *(f"kv={kv}" for kv in kvs)],
                               [[esc(lab), *(_status_cell(n, rows[k].get(kv)) for n, kv in zip(nts, kvs))]
                                for lab, k, nts in zip(labels, keys, notes)]))
        if r.recall:
            body.append(self._recall_runs())
        return _fold("recall", "Multi-query associative recall (MQAR)", "".join(body))

    # -- claims (present once `attnlab repro` has run) ------------------------------------------------
    def claims(self) -> str:
        """Every registered claim: the paper's statement, the measured statistic with its 95% interval, the verdict
        of its pre-stated rule and its figure."""
        rows_ = self.r.claims
        if not rows_:
            return ""
        counts = Counter(c.verdict for c in rows_)
        text = ", ".join(f"{n} {v}" for v, n in counts.most_common()) + f" of {len(rows_)} claims"
        rows = []
        for c in rows_:
            figure = "-"
            if c.figure is not None:
                data = base64.b64encode(c.figure.read_bytes()).decode("ascii")
                figure = (f"<a href='data:image/png;base64,{data}'><img class='claim' alt='{esc(c.claim)}' "
                          f"src='data:image/png;base64,{data}'></a>")
            rows.append([esc(c.claim), esc(c.paper), esc(c.measured) + (f"<br><small>{esc(c.line)}</small>" if c.line else ""),
                         f"<span class='verdict {c.verdict.replace(' ', '-')}'>{esc(c.verdict)}</span>", figure])
        intro = ("<p>Each claim as its paper states it, measured at laptop scale over at least 3 seeds "
                 "(<code>attnlab repro</code>): the statistic's mean and 95% t-interval, and the verdict of the rule "
                 "stated before the run — reproduced if the interval lies inside the rule's band, not reproduced if it "
                 "lies wholly outside, inconclusive if it straddles an end. <code>attnlab repro list</code> gives every "
                 "rule.</p>")
        return _fold("claims", "Claims of the papers, reproduced", intro + _table(
            ["claim", "paper", "measured", "verdict", "figure"], rows, "claims"), open_=True, summary=text)

    # -- inference (present only with results) -----------------------------------------------------------
    def decode(self, figures: Any) -> str:
        """Sharded decoding (P128, `benchmarks/distributed_decode.py`): per setting, the measured table beside the
        cost model (a difference beyond its tolerance flagged), the figure, and the model's extrapolation."""
        settings = self.r.decode_settings
        if not settings:
            return ""
        body = [f"<p>One query token against a KV cache sharded over p gloo processes on this machine: rounds, "
                "messages and bytes each rank sent (the largest over ranks; <i>counts modelled</i>: gloo's own "
                "all-reduce, whose sends attnlab cannot observe, counted as the textbook ring), the cost model's "
                "prediction (<code>attnlab.distributed.cost_model</code>) and its relative difference, flagged "
                f"{FLAG_MARK} beyond {inference.COST_MODEL_TOLERANCE:.0%}; time per token (the slowest rank's; all "
                "processes share this machine's cores and talk over loopback) and peak memory per rank (the "
                "resident set's rise during one call; held = the rank's cache + that rise) against the unsharded "
                "run.</p>"]
        for s in settings:
            if figures is not None:
                next(figures, None)
            title = inference.decode_setting_text(s)
            body.append(f"<h3>{esc(title)}</h3><p>{esc(inference.unsharded_text(s))}</p>")
            off = s.off_model
            body.append(f"<p class='flag'>{FLAG_MARK} The cost model misses the measured bytes by more than "
                        f"{inference.COST_MODEL_TOLERANCE:.0%} at: "
                        + esc(", ".join(f"{r.schedule} p={r.world}" for r in off)) + ".</p>" if off else
                        f"<p>The cost model is within {inference.COST_MODEL_TOLERANCE:.0%} of the measured bytes "
                        "at every measured p.</p>")
            header, rows = inference.decode_table(s)
            cells = [[esc(c) if i != 6 or not r.off_model else f"<span class='flag'>{FLAG_MARK} {esc(c)}</span>"
                      for i, c in enumerate(row)] for row, r in zip(rows, s.rows)]
            body.append(_table(header, cells, "decode"))
            body.append(_img(plots.png(decode_figure(s)), title))
            for e in s.extrapolations:
                header, rows = inference.extrapolation_table(e)
                body.append(f"<p>{esc(inference.network_text(e))}.</p>"
                            + _table(header, [[esc(c) for c in row] for row in rows], "extrapolation"))
        return _fold("decode", "Sharded decoding (P128): tree vs ring", "".join(body), open_=True)

    def kv_compression(self, figures: Any) -> str:
        """MatryoshkaKV (P004, `benchmarks/matryoshka_kv.py`): fidelity and LM loss against r/d, PCA vs trained."""
        settings = self.r.compression_settings
        if not settings:
            return ""
        body = ["<p>Keys and values of every head projected to their first r of d orthogonal directions: from "
                "PCA of the cached K/V (<i>pca</i>) or trained by distillation to the uncompressed model "
                "(<i>trained</i>). Relative error ‖o_r − o‖/‖o‖ of each attention layer's output (mean over "
                "layers) and the held-out LM loss. The paper's direction: the trained projections degrade less "
                "than PCA as r shrinks.</p>"]
        for c in settings:
            if figures is not None:
                next(figures, None)
            title = inference.compression_setting_text(c)
            header, rows = inference.compression_table(c)
            body.append(f"<h3>{esc(title)}</h3>" + _table(header, [[esc(x) for x in row] for row in rows],
                                                          "compression"))
            lines = inference.greedy_lines(c)
            if lines:
                body.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")
            body.append(_img(plots.png(compression_figure(c)), title))
        return _fold("kv-compression", "KV-cache compression (P004 MatryoshkaKV): fidelity vs r/d", "".join(body),
                     open_=True)

    def kv_selection(self, figures: Any) -> str:
        """Loki (P027, `benchmarks/loki.py`): key rank, top-k recall and output error vs r and k, decode time."""
        settings = self.r.selection_settings
        if not settings:
            return ""
        body = ["<p>Keys ranked by their scores in the first r PCA dimensions, exact attention over the top k: "
                "the rank that holds 90% of the key variance against the head dim; the recall of the exact top-k "
                "and the relative output error against k random visible keys and the k most recent ones; the "
                "decode time of one query against dense attention.</p>"]
        for s in settings:
            if figures is not None:
                next(figures, None)
            title = inference.selection_setting_text(s)
            body.append(f"<h3>{esc(title)}</h3>")
            header, rows = inference.rank90_table(s)
            body.append("<h4>Rank for 90% of the key variance, per layer: mean over heads (min–max)</h4>"
                        + _table(header, [[esc(x) for x in row] for row in rows], "rank90"))
            for model in s.quality:
                for metric, what in (("recall", "top-k recall"), ("output_error", "relative output error")):
                    if inference.has_metric(s, model, metric):
                        header, rows = inference.quality_table(s, model, metric)
                        body.append(f"<h4>{esc(model)}: {esc(what)}</h4>"
                                    + _table(header, [[esc(x) for x in row] for row in rows], "quality"))
            for (n, heads, d), rows_ in s.decode.items():
                header, rows = inference.decode_time_table(rows_)
                body.append(f"<h4>Decode time, one query, N = {n:,}, {heads} heads, d = {d}</h4>"
                            + _table(header, [[esc(x) for x in row] for row in rows], "decode-time"))
            body.append(_img(plots.png(selection_figure(s)), title))
        return _fold("kv-selection", "KV-cache key selection (P027 Loki): recall vs rank", "".join(body), open_=True)

    def _recall_runs(self) -> str:
        rows = []
        for res in sorted(self.r.recall, key=lambda x: tuple(str(x.config.get(k)) for k in
                                                             ("d_model", "seq_len", "mechanism", "num_kv_pairs", "seed"))):
            c, m = res.config, res.metrics
            rows.append([esc(c.get("mechanism")), esc(fmt_params(c.get("params") or {})), esc(c.get("d_model")),
                         esc(c.get("seq_len")), esc(c.get("num_kv_pairs")), esc(c.get("seed")), esc(c.get("lr")),
                         _status_html(res.status, m.get("note")) if res.status != "ok" else esc(fmt_num(m.get("accuracy"), 3)),
                         esc(fmt_num(m.get("best_accuracy"), 3)), esc(m.get("epochs", "-")),
                         esc("yes" if m.get("converged") else "no"), esc(fmt_time(m.get("train_seconds"))),
                         esc(m.get("note") or "")])
        return ("<details><summary>Every recall run</summary>"
                + _table(["mechanism", "params", "d_model", "seq_len", "kv", "seed", "lr", "accuracy", "best",
                          "epochs", "converged", "training", "note"], rows) + "</details>")

    def coverage(self) -> str:
        rows = []
        cov = self.r.coverage()
        for c in cov:
            family = c["family"] or "-"
            rows.append([
                f"<code>{esc(c['name'])}</code>" + ("" if c["registered"] else " <span class='status'>not registered</span>"),
                esc(f"{family} ({FAMILIES[family]})" if family in FAMILIES else family),
                esc(c["cost"] or "-"),
                esc(fmt_num(c["declared_exponent"])),
                _counts_html(c["speed"]),
                _counts_html(c["recall"]),
            ])
        measured = sum(c["measured"] for c in cov if c["registered"])
        text = f"<p>{len(self.r.specs)} registered, {measured} with results.</p>"
        return _fold("coverage", "Mechanisms", text + _table(
            ["mechanism", "family", "cost", "declared exponent", "speed", "recall"], rows),
            summary=f"{len(self.r.specs)} registered, {measured} with results")

    def environment(self) -> str:
        r = self.r
        parts = []
        if not r.environments:
            parts.append("<p class='empty'>No results yet.</p>")
        else:
            parts.append("<p>Results are compared (ratios, exponents) only within one run or one environment "
                         "fingerprint: the same attnlab, commit, torch, Python, platform, CPU and threads.</p>")
        for i, (fp, results) in enumerate(r.machines.items(), 1):
            env = results[0].env
            runs: dict[str, list[Any]] = {}
            for res in results:
                runs.setdefault(str(res.env.get("run_id") or "-"), []).append(res)
            rows = [[esc(k), esc(", ".join(map(str, v)) if isinstance(v, list) else v)] for k, v in env.items()
                    if k not in RUN_KEYS]
            run_rows = []
            for run_id, members in runs.items():
                first = members[0].env
                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(first["time"])) if first.get("time") else "-"
                run_rows.append([esc(r.runs.get(members[0].env.get("run_id"), "-")), esc(run_id), esc(when), esc(len(members)), esc(fmt_num(first.get("load_1m"))),
                                 esc(fmt_num(first.get("matmul_gflops"), 1)),
                                 esc(", ".join(sorted({str(m.env.get("peer")) for m in members if m.env.get("peer")})))])
            parts.append(f"<details{' open' if len(r.machines) > 1 else ''}><summary>Environment {i} "
                         f"(fingerprint {esc(fp or '-')}): {len(results)} results in {len(runs)} "
                         f"run{'s' * (len(runs) != 1)}</summary>"
                         + _table(["#", "run", "started", "results", "load at start", "matmul GFLOP/s", "peers"], run_rows)
                         + _table(["", "value"], rows) + "</details>")
        return _fold("environment", "Environment", "".join(parts),
                     summary=f"{len(r.machines)} environment fingerprint{'s' * (len(r.machines) != 1)}")


def _flagged_html(r: Report, flagged: Sequence[tuple[SpeedSeries, Point]]) -> str:
    """The values left out of a figure, one item per series and reason: "softmax, fwd at N=256, 512: why"."""
    grouped: dict[tuple[SpeedSeries, str], list[int]] = {}
    for s, p in flagged:
        grouped.setdefault((s, "; ".join(p.flags)), []).append(p.n)
    items = [f"{esc(r.label(s))}, {esc(s.mode)} at N={esc(', '.join(map(str, ns)))}: {esc(why)}"
             for (s, why), ns in grouped.items()]
    return f"<p class='flag'>{FLAG_MARK} Not plotted (implausible): " + "; ".join(items) + ".</p>"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _cell_note(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    if cell["status"] != "ok":
        return status_text(cell["status"])
    return fmt_accuracy(cell["accuracy"]) + ("" if cell["converged"] else " ◐")


def _status_cell(note: str, cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    if cell["status"] != "ok":
        return _status_html(cell["status"])
    return esc(note)


def _counts_html(counts: dict[str, int]) -> str:
    if not counts:
        return f"<span class='status s-none'>{NOT_MEASURED}</span>"
    order = list(STATUS_TEXT)
    items = sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    return ", ".join(f"{n} {esc(status_text(s))}" for s, n in items)


def render(report: Report, *, figures: Any = None) -> str:
    """The report page of `report`."""
    return Page(report).render(figures=figures)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.4em; border-bottom: 1px solid #ddd; } h3 { margin-top: 1.3em; }
summary h2 { display: inline-block; margin: .8em 0 .3em; border: 0; } summary { cursor: pointer; }
details.family { margin: .8em 0; border-left: 3px solid #ddd; padding-left: .8em; }
.meta, nav { color: #555; } code { font-size: 95%; } .gist, .muted { color: #666; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } tbody tr:nth-child(even) { background: #fafafa; }
table.headline td { padding: .3em .6em; }
.scroll { overflow-x: auto; } img.plot { max-width: 100%; display: block; margin: .5em 0; }
img.claim { width: 260px; } .verdict.reproduced { color: #1a7f37; font-weight: bold; }
.verdict.not-reproduced { color: #b3261e; font-weight: bold; } .verdict.inconclusive { color: #9a6700; }
.status { padding: 0 .3em; border-radius: 3px; background: #eee; white-space: nowrap; }
.s-over_time, .s-over_memory { background: #fff1c2; } .s-error, .s-disagree { background: #ffd6d6; }
.s-none { color: #777; } .empty { color: #777; font-style: italic; } .warn { color: #a15c00; }
.faster { color: #116b2e; font-weight: 600; } .slower { color: #8a1c1c; }
.stopped { color: #a15c00; white-space: nowrap; } .converged { color: #116b2e; font-size: 85%; }
.reused { color: #1a4f9c; font-weight: 700; } .flag { color: #a15c00; } .spread, .load { color: #666; }
ul.basis { color: #444; margin: .3em 0 1em; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 0 2em; }
.columns h4 { margin: .8em 0 .2em; } .small { font-size: 12px; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
{body}
</body></html>
"""
