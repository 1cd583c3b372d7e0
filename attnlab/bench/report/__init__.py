"""`attnlab report`: the results store rendered as a self-contained HTML page, a Markdown summary and JSON.

    attnlab report [--db PATH] [--out DIR] [--json PATH|-] [--markdown] [--quiet]

The page (`report.html` in DIR, default attnlab-results/report) needs no network: CSS is
inline and every figure is a base64 PNG drawn by matplotlib's Agg canvas. It opens with
a headline: which mechanisms are faster than SDPA from which N and by how much (causal
runs against causal SDPA), the fitted cost exponent of every mechanism beside its
declared one, the MQAR recall leaderboard at an equal stated training budget (runs that
stopped before converging marked), and attnlab's standing against peer libraries. Then,
per family and mechanism group, small multiples of time and peak memory (MiB) against
N, SDPA drawn as the reference line on every panel, spreads as error bars; values
flagged implausible (a 0 B peak, ...) are listed, not plotted; results reused from an
earlier run and the load average at measurement are shown. The tables of every
measurement, ratio and recall run, the registered mechanisms and the environments fold
below. When the store holds them, the Claims of `attnlab repro` (claim | paper | measured | verdict |
figure, every registered claim once any has run), and three inference sections: sharded decoding (suite
"decode", `benchmarks/distributed_decode.py`: tree vs ring, measured rounds, bytes, time
and memory per rank beside the cost model, a difference over 20% flagged, and its
extrapolation to p = 64 … 1024), KV-cache compression (suite "kv-compression",
`benchmarks/matryoshka_kv.py`, P004) and key selection (suite "kv-selection",
`benchmarks/loki.py`, P027), each with its tables and a figure. `results.json` (every
result, plus the headline facts) and `summary.md` are written beside it. All text from
the store is escaped.

Modules: `model` (series, points, panels, ratios, recall cells), `headline` (the
headline facts), `inference` (the inference suites' settings and tables) and
`inference_figures`, `html` and `markdown` (the two renderings), `fmt` (number formats).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ... import __version__
from ..progress import progress, say
from ..store import DEFAULT_DB, ResultStore, StoreError, canonical
from . import headline, markdown
from .fmt import fmt_accuracy, fmt_mib, fmt_time
from .inference import COST_MODEL_TOLERANCE
from .model import Report

DEFAULT_OUT = DEFAULT_DB.parent / "report"
MATPLOTLIB_HINT = "pip install 'attnlab[report]'"

__all__ = ["DEFAULT_OUT", "Report", "add_report_arguments", "fmt_accuracy", "fmt_mib", "fmt_time", "page",
           "run_report_command", "summary", "to_json", "write", "write_report"]


def to_json(report: Report) -> dict[str, Any]:
    """Every result, the environments, the headline facts, exponents, ratios and recall cells."""
    recall = []
    for (d_model, seq_len, budget), rows in report.recall_cells().items():
        for (mechanism, params), cells in rows.items():
            for kv, cell in cells.items():
                recall.append({"d_model": d_model, "seq_len": seq_len, "budget": budget, "mechanism": mechanism,
                               "params": json.loads(params), "num_kv_pairs": kv, **cell})
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.generated)),
        "attnlab": __version__,
        "database": report.database,
        "skipped_rows": report.skipped,
        "memory_unit": "bytes (peak_mem_bytes); MiB on the page",
        "headline": headline.to_json(report),
        "mechanisms": report.coverage(),
        "environments": report.environments,
        "results": [
            {"suite": r.suite, "config": r.config, "status": r.status, "metrics": r.metrics,
             "environment": report.env_of[canonical(r.env)], "created": r.created, "config_hash": r.config_hash}
            for r in report.results
        ],
        "exponents": report.exponents(),
        "ratios": report.ratio_rows(),
        "not_plotted": [{**s.fields(), "n": p.n, "flags": list(p.flags)} for s, p in report.flagged()],
        "recall": recall,
        "decode": [{"shape": s.shape, "unsharded": s.unsharded, "timed_rounds": s.timed_rounds,
                    "rows": [{**asdict(x), "off_model": x.off_model} for x in s.rows],
                    "extrapolations": [asdict(e) for e in s.extrapolations]} for s in report.decode_settings],
        "cost_model_tolerance": COST_MODEL_TOLERANCE,
        "claims": [{"claim": c.claim, "paper": c.paper, "measured": c.measured, "verdict": c.verdict,
                    "figure": str(c.figure) if c.figure else None, "line": c.line} for c in report.claims],
    }


def summary(report: Report) -> str:
    """The Markdown summary."""
    return markdown.render(report)


def page(report: Report, *, quiet: bool = True) -> str:
    """The HTML page (needs matplotlib: a ModuleNotFoundError naming it, with the install hint, otherwise)."""
    try:
        from . import html
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("matplotlib"):
            raise
        raise ModuleNotFoundError(f"the report draws its figures with matplotlib: {MATPLOTLIB_HINT}",
                                  name="matplotlib") from err
    count = (sum(len({p.group for p in panels}) for _, panels in report.families()) + len(report.recall_cells())
             + len(report.decode_settings) + len(report.compression_settings) + len(report.selection_settings))
    figures = iter(progress(range(count), total=count, desc="report figures", quiet=quiet))
    return html.render(report, figures=figures)


def write(report: Report, out_dir: str | Path, *, quiet: bool = True) -> Path:
    """report.html (returned), results.json and summary.md in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_json(report), indent=1, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8")
    (out / "summary.md").write_text(summary(report), encoding="utf-8")
    target = out / "report.html"
    target.write_text(page(report, quiet=quiet), encoding="utf-8")
    return target


def write_report(store: ResultStore, out_dir: str | Path = DEFAULT_OUT, *, quiet: bool = True) -> Path:
    """Render `store` into out_dir: report.html (returned), results.json and summary.md."""
    return write(Report.from_store(store), out_dir, quiet=quiet)


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
    try:
        report = Report.from_store(ResultStore(args.db, readonly=True))  # read-only: the report never writes
    except StoreError as err:  # missing, not a results database, unreadable: one line naming the file
        print(f"attnlab report: error: {err}", file=sys.stderr)
        return 2
    say(f"report: {len(report.results)} results from {args.db}", quiet=args.quiet)
    try:
        target = write(report, args.out, quiet=args.quiet)
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print(f"attnlab report: error: {err}", file=sys.stderr)
        return 2
    if args.markdown:
        print(summary(report))
    if args.json:
        text = json.dumps(to_json(report), indent=1, ensure_ascii=False, default=str)
        if args.json == "-":
            print(text)
            say(str(target), quiet=args.quiet)
            return 0
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(target)
    return 0
