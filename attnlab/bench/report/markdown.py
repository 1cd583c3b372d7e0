"""The report as a Markdown summary (summary.md): the headline first, then the tables of the page."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from ..limits import BAR_TEXT, limit_value_text
from . import headline, inference
from .fmt import (
    MEMORY_UNIT,
    NOT_MEASURED,
    fmt_accuracy,
    fmt_num,
    fmt_ratio,
    fmt_speedup,
    fmt_time,
    md,
    mib,
    status_text,
)
from .model import PEER_BASE, Point, Report, SpeedSeries


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _env_line(env: dict) -> str:
    keys = ("cpu", "threads", "torch", "attnlab", "git_commit", "python")
    return ", ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None)


def _time_cell(point: Point | None) -> str:
    if point is None:
        return ""
    if point.result.status != "ok":
        return status_text(point.result.status)
    text = fmt_time(point.result.metrics.get("median_s"))
    if point.reused:
        text += " (reused)"
    return text + (" (flagged)" if point.time_flagged else "")


def _memory_cell(point: Point | None) -> str:
    if point is None or point.result.status != "ok":
        return ""
    return "flagged" if point.memory is None and point.flags else fmt_num(mib(point.memory), 3)


def _peer_cell(report: Report, s: SpeedSeries, n: int) -> str:
    point = report.series[s].get(n)
    if point is None:
        return ""
    if point.result.status != "ok":
        return status_text(point.result.status)
    ours = report.twin(s, n)
    if ours is None:
        return f"{PEER_BASE} {NOT_MEASURED}"
    if ours.result.status != "ok":
        return f"{PEER_BASE} {status_text(ours.result.status)}"
    ratio = report.peer_ratio(s, n)
    if ratio is not None:
        return fmt_ratio(ratio)
    if point.time_flagged or ours.time_flagged:
        return "flagged" if point.time_flagged else f"{PEER_BASE} flagged"
    return "not comparable" if report.incomparable(s, n) else "no time"


def render(report: Report) -> str:
    """The Markdown summary of `report`."""
    r = report
    out = ["# attnlab results", ""]
    more = "".join(f", {n} {suite}" for suite, n in r.inference_counts().items() if n)
    out.append(f"{len(r.speed)} speed and {len(r.recall)} recall results{more} from {md(r.database)}, "
               f"{len(r.machines)} environment{'s' * (len(r.machines) != 1)} (ratios only within one run or one); "
               f"report generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(r.generated))}.")
    for i, (fp, results) in enumerate(r.machines.items(), 1):
        runs = len({str(x.env.get("run_id")) for x in results})
        out.append(f"- environment {i} (fingerprint {md(fp or '-')}, {len(results)} results in {runs} "
                   f"run{'s' * (runs != 1)}): {md(_env_line(results[0].env))}")
    loads = r.loads()
    out.append(f"- load average at measurement: {loads[0]:.2f}–{loads[-1]:.2f}" if loads
               else "- load average at measurement: not recorded")
    out += _headline(r)
    ns = sorted({n for points in r.series.values() for n in points})
    ordered = sorted(r.series, key=lambda s: (s.mode,) + r.series_order(s))
    if r.series:
        out += ["", "## Speed: median time by N", ""]
        if r.common_shape():
            out += [md(r.common_shape()), ""]
        rows = [[md(r.label(s)), md(s.mode), *(_time_cell(r.series[s].get(n)) for n in ns)] for s in ordered]
        out += _table(["run", "mode", *map(str, ns)], rows)
        out += ["", f"## Peak memory ({MEMORY_UNIT}) by N", ""]
        rows = [[md(r.label(s)), md(s.mode), *(_memory_cell(r.series[s].get(n)) for n in ns)] for s in ordered]
        out += _table(["run", "mode", *map(str, ns)], rows)
        flagged = r.flagged()
        if flagged:
            out += ["", "## Not plotted (implausible values)", ""]
            out += [f"- {md(r.label(s))}, {md(s.mode)}, N={p.n}: {md('; '.join(p.flags))}" for s, p in flagged]
        out += ["", "## Cost exponents (log-log slope of time against N)", ""]
        rows = [[md(r.label_row(x)), md(x["mode"]), fmt_num(x["declared"]), fmt_num(x["measured"]),
                 fmt_num(x["measured_memory"]), str(x["points"])] for x in r.exponents()]
        out += _table(["run", "mode", "declared", "measured (time)", "measured (memory)", "points"], rows)
        out += ["", "## Time relative to SDPA (causal SDPA for causal runs)", ""]
        rows = []
        for s in (s for s in ordered if not s.peer):
            cells = []
            for n in ns:
                point = r.series[s].get(n)
                ratio = r.sdpa_ratio(s, n)
                cells.append("" if point is None else status_text(point.result.status) if point.result.status != "ok"
                             else fmt_ratio(ratio) if ratio is not None else "flagged" if point.time is None
                             else "SDPA flagged" if r.baseline_flagged(s, n)
                             else "not comparable" if r.incomparable(s, n) else "no SDPA")
            rows.append([md(r.label(s)), md(s.mode), *cells])
        out += _table(["run", "mode", *map(str, ns)], rows)
        peers = [s for s in ordered if s.peer]
        if peers:
            out += ["", "## attnlab time / peer time", ""]
            rows = [[md(r.label(s)), md(s.mode), *(md(_peer_cell(r, s, n)) for n in ns)] for s in peers]
            out += _table(["peer run", "mode", *map(str, ns)], rows)
    limit_rows = r.limit_rows()
    if limit_rows:
        env = limit_rows[-1]["env"]
        out += ["", "## Limits (`attnlab bench limits`)", "",
                f"Matmul {fmt_num(env.get('matmul_1_gflops'), 0)} GFLOP/s and streaming {fmt_num(env.get('stream_1_gbs'), 1)} "
                f"GB/s on one thread in that run; medians of {env.get('rounds')} interleaved rounds, load {env.get('load_1m')}.",
                ""]
        met = {None: "-", True: "yes", False: "no"}
        rows = [[md(row.get("work", "")), fmt_num(row.get("ms"), 1), fmt_num(row.get("other_ms"), 1),
                 md(limit_value_text(row)), md(BAR_TEXT[row["bar_kind"]].format(row["bar"])), met[row.get("passed")],
                 fmt_num(row["of_limit"] * 100, 0) + "%" if row.get("of_limit") is not None else "-",
                 fmt_num(row.get("speedup"), 2), met[row.get("two_threads_passed")]] for row in limit_rows]
        out += _table(["work", "attnlab ms", "other ms", "value", "bar", "met", "of limit", "2 threads ×",
                       "≥ 1.7×"], rows)
    cells = r.recall_cells()
    several = len({budget for _, _, budget in cells}) > 1
    for (d_model, seq_len, budget), rows_ in cells.items():
        kvs = sorted({kv for c in rows_.values() for kv in c}, key=lambda kv: (str(type(kv)), kv))
        title = f"## MQAR accuracy, d_model={md(d_model)}, seq_len={md(seq_len)}" + (f", {md(budget)}" if several else "")
        out += ["", title, ""]
        rows = []
        for (mechanism, params), by_kv in sorted(rows_.items()):
            row = [md(r.recall_row_label(mechanism, params))]
            for kv in kvs:
                cell = by_kv.get(kv)
                row.append("" if cell is None else fmt_accuracy(cell["accuracy"]) if cell["status"] == "ok"
                           else status_text(cell["status"]))
            rows.append(row)
        out += _table(["mechanism", *(f"kv={md(kv)}" for kv in kvs)], rows)
    out += _claims(r)
    out += _inference(r)
    if r.not_run:
        out += ["", "## Not run", ""]
        out += [f"- {md(r.label(s))}, {md(s.mode)}: {md('; '.join(why))}" for s, why in r.not_run.items()]
    missing = [c for c in r.coverage() if c["registered"] and not c["measured"]]
    if missing:
        out += ["", "## Not measured", ""]
        out += [f"- {md(c['name'])} (family {md(c['family'])})" for c in missing]
    return "\n".join(out) + "\n"


def _headline(r: Report) -> list[str]:
    out = ["", "## Headline", ""]
    beats = headline.beats_sdpa(r)
    if beats:
        out += ["### Against SDPA (causal runs against causal SDPA)", ""]
        rows = [[md(b.label), md(b.series.mode), b.reference, f"N ≥ {b.from_n}" if b.from_n is not None else "not faster",
                 f"{fmt_speedup(b.at_max)} at N={b.n_max}",
                 ", ".join(f"{fmt_ratio(x)} @{n}" for n, x in sorted(b.ratios.items()))] for b in beats]
        out += _table(["run", "mode", "against", "faster from", "at the largest N", "time / reference"], rows)
    missing = headline.uncompared(r)
    if missing:
        out += ["", "Not compared with SDPA: " + "; ".join(f"{md(r.label(s, with_params=None))} ({md(s.mode)}): {md(why)}"
                                                        for s, why in missing) + "."]
    exps = headline.exponent_rows(r)
    if exps:
        out += ["", "### Cost exponents, lowest first", ""]
        out += _table(["run", "mode", "measured", "declared"],
                      [[md(r.label_row(x)), md(x["mode"]), fmt_num(x["measured"]), fmt_num(x["declared"])] for x in exps])
    for board in headline.leaderboards(r):
        out += ["", f"### MQAR recall, d_model {md(board.d_model)}, L {md(board.seq_len)}, equal budget: "
                    f"{md(board.budget)}", ""]
        rows = []
        for row in board.rows:
            cells = []
            for kv in board.kvs:
                cell = row["cells"].get(kv)
                cells.append("" if cell is None else status_text(cell["status"]) if cell["status"] != "ok"
                             else fmt_accuracy(cell["accuracy"]) + (" (stopped before converging)" if cell["stopped"] else ""))
            rows.append([str(row["rank"]) if row["rank"] is not None else "-", md(row["label"]), fmt_accuracy(row["mean"]),
                         *cells])
        out += _table(["#", "mechanism", "mean", *(f"kv={md(kv)}" for kv in board.kvs)], rows)
    standing = headline.peer_standing(r)
    if standing:
        out += ["", "### Peers (attnlab time / peer time)", ""]
        rows = [[md(p.series.impl), md(p.series.mechanism), md(p.series.mode),
                 ", ".join(f"{fmt_ratio(x)} @{n}" for n, x in sorted(p.ratios.items())) or "-",
                 f"{p.agreed} agreed, {p.disagreed} disagreed"] for p in standing]
        out += _table(["peer", "mechanism", "mode", "attnlab / peer", "outputs"], rows)
    return out


def _claims(r: Report) -> list[str]:
    """The claims of `attnlab repro`, each with its verdict (figures: the path beside the database)."""
    if not r.claims:
        return []
    counts = Counter(c.verdict for c in r.claims)
    out = ["", "## Claims (`attnlab repro`)", "",
           ", ".join(f"{n} {verdict}" for verdict, n in counts.most_common()) + f" of {len(r.claims)} claims.", ""]
    rows = [[md(c.claim), md(c.paper), md(c.measured), f"**{md(c.verdict)}**", md(str(c.figure)) if c.figure else "-"]
            for c in r.claims]
    return out + _table(["claim", "paper", "measured", "verdict", "figure"], rows)


def _md_table(table: inference.Table) -> list[str]:
    header, rows = table
    return _table([md(h) for h in header], [[md(c) for c in row] for row in rows])


def _inference(r: Report) -> list[str]:
    """The sections of the inference suites present in the store: decode (P128), kv-compression (P004),
    kv-selection (P027)."""
    out: list[str] = []
    tolerance = f"{inference.COST_MODEL_TOLERANCE:.0%}"
    for s in r.decode_settings:
        out += ["", f"## Sharded decoding (P128): {md(inference.decode_setting_text(s))}", "",
                md(inference.unsharded_text(s)) + ".", ""]
        off = s.off_model
        out += [f"**The cost model misses the measured bytes by more than {tolerance} at: "
                + md(", ".join(f"{x.schedule} p={x.world}" for x in off)) + ".**" if off
                else f"The cost model is within {tolerance} of the measured bytes at every measured p.", ""]
        out += _md_table(inference.decode_table(s))
        for e in s.extrapolations:
            out += ["", md(inference.network_text(e)) + ".", ""]
            out += _md_table(inference.extrapolation_table(e))
    for c in r.compression_settings:
        out += ["", f"## KV-cache compression (P004 MatryoshkaKV): {md(inference.compression_setting_text(c))}", ""]
        out += _md_table(inference.compression_table(c))
        lines = inference.greedy_lines(c)
        if lines:
            out += [""] + [f"- {md(x)}" for x in lines]
    for sel in r.selection_settings:
        out += ["", f"## KV-cache key selection (P027 Loki): {md(inference.selection_setting_text(sel))}", "",
                "Rank for 90% of the key variance, per layer: mean over heads (min–max).", ""]
        out += _md_table(inference.rank90_table(sel))
        for model in sel.quality:
            for metric, what in (("recall", "top-k recall"), ("output_error", "relative output error")):
                if inference.has_metric(sel, model, metric):
                    out += ["", f"{md(model)}: {what} by k (rows) and Loki's rank r, beside the baselines.", ""]
                    out += _md_table(inference.quality_table(sel, model, metric))
        for (n, heads, d), rows in sel.decode.items():
            out += ["", f"Decode time, one query, N = {n:,}, {heads} heads, d = {d}.", ""]
            out += _md_table(inference.decode_time_table(rows))
    return out
