"""The `attnlab bench` and `attnlab report` commands (added to `attnlab` by attnlab/cli.py).

    attnlab bench                  the default quick suite: speed, recall, report; prints the report's path
    attnlab bench speed [...]      time and peak memory against N (see `attnlab bench speed --help`)
    attnlab bench recall [...]     MQAR recall (attnlab/bench/recall.py)
    attnlab report [...]           the HTML report (attnlab/bench/report.py)

Results go to a SQLite database (--db, default attnlab-results/results.sqlite); an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..catalogue import add_import_argument
from ..core.errors import ParameterError
from ..core.registry import benched_entries, module_entry
from . import limits, peers, recall, report
from .compare import ABOVE_MATMUL, ZERO_PEAK, fit_exponents, sdpa_ratios
from .env import environment, new_run_id
from .progress import say
from .speed import (
    BASELINE,
    DEFAULT_LENGTHS,
    DTYPES,
    MODES,
    SUITE,
    SpeedOptions,
    WorkerDied,
    grid_rank,
    import_user_modules,
    machine_memory_bytes,
    parse_params,
    run_speed,
)
from .store import DEFAULT_DB, Result, ResultStore

# The default suite (`attnlab bench`, `make bench`): sized for <= 10 minutes on a loaded 2-core machine, venv
# install included (docs/bench.md). Lengths go smallest first, every mechanism at each before the next, so that a
# run has at least the first three (an exponent) and the next run resumes and extends to the larger ones.
QUICK_SPEED_SECONDS = 180.0
QUICK_RECALL_SECONDS = recall.PANEL_SECONDS
QUICK_LENGTHS = DEFAULT_LENGTHS  # 256 … 8192
QUICK_MODES = ("fwd+bwd", "fwd")
QUICK_BUDGET_S = 5.0  # seconds per configuration at most
# a mechanism on 2-D/3-D grids: sides 16, 32, 64, 128 (multiples of the windows, blocks and cluster sizes
# that grids like 23 × 23 or 45 × 45 would not tile); one whose calls take seconds at N = 256: smaller N too
QUICK_GRID_LENGTHS = (256, 1024, 4096, 16384)
QUICK_LENGTHS_FOR: dict[str, tuple[int, ...]] = {"local-linear": (64, 128, 256, 512, 1024)}
QUICK_REPEATS = 5
QUICK_THREADS = 1  # one thread: the least hurt by other work on the machine (and what the peers' ratios use)
# parameters that keep each mechanism's character at the suite's lengths (a 256-wide window is full attention
# at N = 256; DHSA's 4 kept chunks of 64 are every chunk there): windows and kept chunks well below N = 256
QUICK_PARAMS: dict[str, dict[str, Any]] = {"sliding-window": {"radius": 32}, "dhsa": {"chunk_size": 32, "top_chunks": 2}}
# one peer per family that has one (docs/bench.md): peer -> (the mechanism it runs beside, at these N); flex
# compiles once per N (tens of seconds), so at one N
QUICK_PEERS: dict[str, tuple[str, tuple[int, ...]]] = {
    "linear-attention-transformer": ("efficient", (256, 512, 1024)),
    "flex": ("alibi", (1024,)),
}


# -- argument types -----------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _modes(text: str) -> tuple[str, ...]:
    values = _names(text)
    bad = [m for m in values if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"expected modes among {', '.join(MODES)}, got {', '.join(bad)}")
    return tuple(dict.fromkeys(values))


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_store_options(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    # A subcommand's defaults would overwrite what `attnlab bench --db X speed` set, so
    # the leaf's options default to "not given" and the bench parser's carry the defaults.
    default_db: Any = argparse.SUPPRESS if leaf else DEFAULT_DB
    default_quiet: Any = argparse.SUPPRESS if leaf else False
    parser.add_argument("--db", type=Path, default=default_db, metavar="PATH",
                        help=f"the results database (default {DEFAULT_DB})")
    parser.add_argument("--quiet", action="store_true", default=default_quiet,
                        help="no progress bars or status lines (stderr)")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `attnlab bench speed`."""
    mem_gb = machine_memory_bytes() / 2 / 1e9
    parser.add_argument("--mechanisms", type=_names, default=("all",), metavar="A,B|all",
                        help="mechanisms to measure (default all); softmax (dense SDPA) is always measured too")
    parser.add_argument("--lengths", type=_int_list, default=DEFAULT_LENGTHS, metavar="N,N,...",
                        help=f"sequence lengths in tokens (default {','.join(map(str, DEFAULT_LENGTHS))}); "
                        "2-D/3-D mechanisms get the square/cube grid nearest to each")
    parser.add_argument("--modes", type=_modes, default=MODES, metavar="fwd,fwd+bwd",
                        help="forward only (no autograd) and/or forward + backward (default both)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="default float32")
    parser.add_argument("--causal", action="store_true", help="causal attention (mechanisms without it: unsupported)")
    parser.add_argument("--batch", type=_positive(int), default=1, help="default 1")
    parser.add_argument("--heads", type=_positive(int), default=8, help="default 8")
    parser.add_argument("--head-dim", type=_positive(int), default=64, help="default 64")
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch threads in the measuring process (default torch's default); recorded")
    parser.add_argument("--budget-seconds", type=_positive(float), default=10.0, metavar="S",
                        help="the most a configuration may take (default 10): a warm-up, then timed calls until "
                        "1 s is spent with 3 made (or --repeats, or S); an N predicted to exceed S is skipped as "
                        "over_time, and one running past 2·S + 10 s is killed")
    parser.add_argument("--memory-budget", type=_positive(float), default=None, metavar="GB",
                        help=f"peak memory per configuration (default half the machine's: {mem_gb:.1f} GB)")
    parser.add_argument("--repeats", type=_positive(int), default=20, help="at most this many timed calls (default 20)")
    parser.add_argument("--total-seconds", type=_positive(float), default=None, metavar="S",
                        help="start no configuration after S seconds; the next run measures the rest (default: no limit)")
    parser.add_argument("--rerun", action="store_true", help="measure again configurations the database has")
    parser.add_argument("--json", metavar="PATH|-", help="write the results as JSON to PATH, or to stdout with - "
                        "(then nothing else goes to stdout)")
    parser.add_argument("--peers", type=_names, default=None, metavar="P,Q",
                        help="also run the same shapes through other libraries (natten, flex, local-attention, "
                        "linear-attention-transformer) and compare")
    parser.add_argument("--param", dest="params", action="append", default=[], metavar="MECH.NAME=VALUE",
                        help="a mechanism's parameter, e.g. sliding-window.radius=64 (VALUE read as JSON, else a "
                        "string); repeatable; part of the configuration")
    _add_store_options(parser, leaf=True)
    _add_imports(parser, leaf=True)


def _add_imports(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    """--import MODULE (repeatable); on a leaf, added to what `attnlab bench --import X` gave."""
    add_import_argument(parser)
    if leaf:  # (not set_defaults: the parser's own defaults are applied even when SUPPRESS)
        next(a for a in parser._actions if a.dest == "imports").default = argparse.SUPPRESS


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` (with `speed` and `recall`) and `report` to the `attnlab` command."""
    bench = subparsers.add_parser(
        "bench", help="measure speed, memory, scaling and recall",
        description="Without a subcommand: the default quick suite (speed of every registered mechanism at "
        "N = 256…8192, forward and forward+backward; the default recall panel; the report), ending with the "
        "report's path. An interrupted run resumes where it stopped.",
    )
    _add_store_options(bench, leaf=False)
    _add_imports(bench, leaf=False)
    bench.add_argument("--speed-seconds", type=_positive(float), default=QUICK_SPEED_SECONDS, metavar="S",
                       help=f"the speed part starts no configuration after S seconds (default {QUICK_SPEED_SECONDS:g}); "
                       "the next run measures the rest")
    bench.add_argument("--recall-seconds", type=_positive(float), default=QUICK_RECALL_SECONDS, metavar="S",
                       help=f"the recall part starts no training after S seconds (default {QUICK_RECALL_SECONDS:g}); "
                       "the next run trains the rest")
    bench.set_defaults(func=cmd_default_suite)
    suites = bench.add_subparsers(dest="suite", metavar="SUITE")

    speed = suites.add_parser(
        "speed", help="time and peak memory against sequence length",
        description="Time and peak memory of mechanisms against N, beside dense SDPA (softmax, measured in the "
        "same run); the measured cost exponents; with --peers, other libraries on the same shapes.",
        epilog="What is timed, the budgets, the worker process and the comparison rules: docs/bench.md. "
        "Example: attnlab bench speed --mechanisms sliding-window,linear --lengths 512,1024,2048 "
        "--param sliding-window.radius=64 --causal")
    add_speed_arguments(speed)
    speed.set_defaults(func=cmd_speed)

    p = suites.add_parser("recall", help="multi-query associative recall (MQAR, Zoology)",
                          description=recall.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recall.add_recall_arguments(p)
    _add_imports(p, leaf=True)
    p.set_defaults(func=recall.run_recall_command)

    p = suites.add_parser("limits", help="attnlab beside peers and the machine's matmul and memory limits",
                          description=limits.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    limits.add_arguments(p)
    _add_store_options(p, leaf=True)
    p.set_defaults(func=cmd_limits)

    p = subparsers.add_parser("report", help="render the results as a self-contained HTML page",
                              description=report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_report_arguments(p)
    _add_imports(p, leaf=False)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """`attnlab report`, after importing the user's modules (their mechanisms are listed by name)."""
    import_user_modules(getattr(args, "imports", []))
    return report.run_report_command(args)


# -- output ---------------------------------------------------------------------------------
def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


STORED_MARK = "*"
LEGEND = (f"{STORED_MARK} reused from the store: measured in an earlier run, not this one (--rerun measures "
          "again); IQR: the middle half of the timed calls, as % of the median; load: 1-min load average "
          "at the measurement; !: implausible value, not data (0B: zero peak memory, >mm: above the matmul rate)")
LEGEND_WRAPPED = textwrap.fill(LEGEND, width=100)
_FLAG_TEXT = {ZERO_PEAK: "0B", ABOVE_MATMUL: ">mm"}


def series_name(config: Mapping[str, Any]) -> str:
    """mechanism, with " causal" for a causal configuration and [peer] for a peer's."""
    name = config["mechanism"] + (" causal" if config.get("causal") else "")
    return name if config.get("impl", "attnlab") == "attnlab" else f"{name} [{config['impl']}]"


def _iqr_percent(m: Mapping[str, Any]) -> str:
    if m.get("q1_s") is None or m.get("q3_s") is None or not m.get("median_s"):
        return "-"
    return f"{100 * (m['q3_s'] - m['q1_s']) / m['median_s']:.0f}%"


def speed_table(results: Sequence[Result], run_id: str | None = None) -> str:
    """One line per result: mechanism (marked when reused from the store), N, mode, status, median ms,
    IQR, load, peak MiB, GFLOP/s, ×SDPA (against the comparable baseline of the same causality; marked
    when either side was reused), flags; then the measured and declared exponents; then the legend."""
    ratios = sdpa_ratios(results, run_id)
    rows = []
    for r, ratio in zip(results, ratios):
        c, m = r.config, r.metrics
        stored = STORED_MARK if ratio["reused"] else ""
        mixed = STORED_MARK if ratio["ratio"] is not None and (ratio["reused"] or ratio["sdpa_reused"]) else ""
        peak = m.get("peak_mem_bytes")
        rows.append((
            series_name(c) + stored,
            "x".join(map(str, c["grid"])) if c.get("grid") else str(c["n"]),
            c["mode"], r.status,
            _num(m.get("median_s") and m["median_s"] * 1e3, ".3g"),
            _iqr_percent(m),
            _num(m.get("load_1m"), ".1f"),
            _num(None if peak is None else peak / 2**20, ".4g"),
            _num(m.get("flops_per_s") and m["flops_per_s"] / 1e9, ".3g"),
            "n/c" if ratio["incomparable"] else _num(ratio["ratio"], ".2f") + mixed,
            " ".join("!" + _FLAG_TEXT.get(f, f) for f in m.get("flags") or []),
        ))
    out = _table(rows, ("mechanism", "N", "mode", "status", "ms", "IQR", "load", "MiB", "GFLOP/s", "xSDPA", ""))
    return out + "\n\n" + exponent_table(results, run_id) + "\n\n" + LEGEND_WRAPPED


def exponent_table(results: Sequence[Result], run_id: str | None = None) -> str:
    """One line per series: the measured cost exponent (from comparable points), the declared one, the points."""
    rows = [(series_name(f) + (STORED_MARK if f["reused"] else ""), f["mode"], _num(f["measured"], ".2f"),
             _num(f["declared"], "g"), str(f["points"]), f"{f['n_min']}-{f['n_max']}" if f["points"] else "-")
            for f in fit_exponents(results, run_id)]
    return _table(rows, ("mechanism", "mode", "exponent", "declared", "points", "N range"))


def speed_json(results: Sequence[Result], run_id: str | None = None) -> dict[str, Any]:
    """The machine-readable results: one object per configuration (with its env and whether it was reused
    from the store), the exponents, the ratios to SDPA (with --peers, "peers": attnlab time / peer time)."""
    return {
        "suite": SUITE,
        "run_id": run_id,
        "env": environment(),
        "results": [
            {"config": r.config, "status": r.status, "metrics": r.metrics, "env": r.env, "created": r.created,
             "config_hash": r.config_hash, "reused": r.env.get("run_id") != run_id}
            for r in results
        ],
        "exponents": fit_exponents(results, run_id),
        "ratios": sdpa_ratios(results, run_id),
    }


# -- commands -------------------------------------------------------------------------------
def speed_options(args: argparse.Namespace, mechanisms: Sequence[str] = ()) -> SpeedOptions:
    return SpeedOptions(
        lengths=args.lengths, modes=args.modes, dtype=args.dtype, causal=args.causal, batch=args.batch,
        heads=args.heads, head_dim=args.head_dim, threads=args.threads, budget_s=args.budget_seconds,
        memory_budget_bytes=machine_memory_bytes() // 2 if args.memory_budget is None else int(args.memory_budget * 1e9),
        repeats=args.repeats, total_s=args.total_seconds,
        rerun=args.rerun, quiet=args.quiet, params=parse_params(args.params, [BASELINE, *mechanisms]),
    )


def _mechanism_names(requested: Sequence[str]) -> list[str]:
    if "all" in requested:
        return [s.name for s in benched_entries()]
    return list(requested)


def cmd_limits(args: argparse.Namespace) -> int:
    """`attnlab bench limits`: the table of issue 14, measured in one run, stored and printed."""
    store = ResultStore(getattr(args, "db", DEFAULT_DB))  # checked writable before anything runs
    return limits.run_command(args, store)


def cmd_speed(args: argparse.Namespace) -> int:
    db, quiet = getattr(args, "db", DEFAULT_DB), getattr(args, "quiet", False)
    args.db, args.quiet = db, quiet
    import_user_modules(getattr(args, "imports", []))
    if args.peers:
        peers.select_peers(args.peers)  # an unknown peer is a usage error before anything runs
    names = _mechanism_names(args.mechanisms)
    for name in names:
        module_entry(name)  # an unknown name is a usage error (with the close matches) before anything runs
    try:
        options = replace(speed_options(args, names), run_id=new_run_id())
    except ValueError as err:
        raise ParameterError(str(err)) from None
    store = ResultStore(db)  # checked writable before anything runs
    say(f"speed: results in {db}", quiet=quiet)
    try:
        results = run_speed(store, names, options)
    except WorkerDied as err:
        print(f"attnlab bench speed: error: {err}", file=sys.stderr)
        return 1
    tables = [speed_table(results, options.run_id)]
    if args.peers:
        peer_results = peers.run_peers(store, [r.config for r in results], args.peers, options)
        have = {r.config_hash for r in results}
        results = results + [r for r in peer_results if r.config_hash not in have]
        tables.append(peers.peer_table(peer_results, options.run_id))
    text = "\n\n".join(tables)
    if args.json:
        data = speed_json(results, options.run_id)
        if args.peers:
            data["peers"] = peers.peer_ratios(results, options.run_id)
        dump = json.dumps(data, indent=1, default=str)
        if args.json == "-":
            print(dump)
            say(text, quiet=quiet)
            return 0
        Path(args.json).write_text(dump + "\n", encoding="utf-8")
    print(text)
    return 0


def cmd_default_suite(args: argparse.Namespace) -> int:
    """`attnlab bench`: the default suite (see QUICK_* and docs/bench.md), then the report's path."""
    import_user_modules(args.imports)
    store = ResultStore(args.db)  # checked writable before anything runs
    names = [s.name for s in benched_entries()]
    run_id = new_run_id()
    options = SpeedOptions(lengths=QUICK_LENGTHS, modes=QUICK_MODES, budget_s=QUICK_BUDGET_S,
                           repeats=QUICK_REPEATS, threads=QUICK_THREADS, total_s=args.speed_seconds,
                           quiet=args.quiet, run_id=run_id, params=QUICK_PARAMS, min_rounds=3, lengths_for={
                               **{s.name: QUICK_GRID_LENGTHS for s in benched_entries() if grid_rank(s) > 1},
                               **QUICK_LENGTHS_FOR})
    say(f"bench: speed of {len(names)} entries (mechanisms, pooling layers, sets, graphs, tables) at N = {', '.join(map(str, QUICK_LENGTHS))} (2-D grids: "
        f"{', '.join(map(str, QUICK_GRID_LENGTHS))}), {' and '.join(QUICK_MODES)}, one thread, in rounds (each at its "
        f"k-th N before any at its next), starting nothing after {args.speed_seconds:g} s once each has 3 lengths; "
        f"results in {args.db}",
        quiet=args.quiet)
    try:
        results = run_speed(store, names, options)
    except WorkerDied as err:
        print(f"attnlab bench: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(exponent_table(results, run_id) + "\n")
    peer_results = []
    for peer, (mechanism, lengths) in QUICK_PEERS.items():
        say(f"bench: peer {peer} beside {mechanism} at N = {', '.join(map(str, lengths))}", quiet=args.quiet)
        configs = [r.config for r in results if r.config["mechanism"] == mechanism and r.config["n"] in lengths]
        peer_results += peers.run_peers(store, configs, [peer], options)  # (with attnlab's side: the ratios)
    if not args.quiet:
        print(peers.peer_table(peer_results, run_id) + "\n")
    rows = recall.run_default_panel(store, args.quiet, total_seconds=args.recall_seconds)
    if not args.quiet:
        print(recall.results_table(rows) + "\n")
    print(report.write_report(store, Path(args.db).parent / "report", quiet=args.quiet))
    return 0
