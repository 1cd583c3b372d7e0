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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..catalogue import add_import_argument
from ..core.errors import ParameterError
from ..core.registry import get, list_mechanisms
from . import peers, recall, report
from . import speed as speed_module
from .env import environment
from .progress import say
from .speed import (
    BASELINE,
    DEFAULT_LENGTHS,
    DTYPES,
    MODES,
    SUITE,
    SpeedOptions,
    WorkerDied,
    fit_exponents,
    import_user_modules,
    machine_memory_bytes,
    parse_params,
    quick_budget_s,
    run_speed,
    sdpa_ratios,
)
from .store import DEFAULT_DB, Result, ResultStore

QUICK_SPEED_SECONDS = 240.0  # the default suite's speed part, on the 2-core reference machine
QUICK_LENGTHS = DEFAULT_LENGTHS  # 256 … 8192


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
    parser.add_argument("--memory-budget", type=_positive(float), default=mem_gb, metavar="GB",
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
                        help="a mechanism's parameter, e.g. sliding-window.window=64 (VALUE read as JSON, else a "
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
    bench.set_defaults(func=cmd_default_suite)
    suites = bench.add_subparsers(dest="suite", metavar="SUITE")

    speed = suites.add_parser("speed", help="time and peak memory against sequence length",
                              description=speed_module.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(speed)
    speed.set_defaults(func=cmd_speed)

    p = suites.add_parser("recall", help="multi-query associative recall (MQAR, Zoology)",
                          description=recall.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recall.add_recall_arguments(p)
    _add_imports(p, leaf=True)
    p.set_defaults(func=recall.run_recall_command)

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


def speed_table(results: Sequence[Result]) -> str:
    """mechanism, N, mode, status, median ms, peak MB, GFLOP/s, ×SDPA; then measured vs declared exponents."""
    ratios = sdpa_ratios(results)
    rows = []
    for r, ratio in zip(results, ratios):
        c, m = r.config, r.metrics
        name = c["mechanism"] if c["impl"] == "attnlab" else f"{c['mechanism']} [{c['impl']}]"
        n = "x".join(map(str, c["grid"])) if c["grid"] else str(c["n"])
        rows.append((
            name, n, c["mode"], r.status,
            _num(m.get("median_s") and m["median_s"] * 1e3, ".3g"),
            _num(m.get("peak_mem_bytes") and m["peak_mem_bytes"] / 1e6, ".4g"),
            _num(m.get("flops_per_s") and m["flops_per_s"] / 1e9, ".3g"),
            _num(ratio["ratio"], ".2f"),
        ))
    out = _table(rows, ("mechanism", "N", "mode", "status", "median ms", "peak MB", "GFLOP/s", "xSDPA"))
    fits = fit_exponents(results)
    rows = [(f["mechanism"] if f["impl"] == "attnlab" else f"{f['mechanism']} [{f['impl']}]", f["mode"],
             _num(f["measured"], ".2f"), _num(f["declared"], "g"), str(f["points"])) for f in fits]
    return out + "\n\n" + _table(rows, ("mechanism", "mode", "exponent", "declared", "points"))


def speed_json(results: Sequence[Result]) -> dict[str, Any]:
    """The machine-readable results: one object per configuration, the exponents, the ratios to SDPA
    (and with --peers, "peers": the ratios attnlab time / peer time)."""
    return {
        "suite": SUITE,
        "env": environment(),
        "results": [
            {"config": r.config, "status": r.status, "metrics": r.metrics, "created": r.created, "config_hash": r.config_hash}
            for r in results
        ],
        "exponents": fit_exponents(results),
        "ratios": sdpa_ratios(results),
    }


# -- commands -------------------------------------------------------------------------------
def speed_options(args: argparse.Namespace, mechanisms: Sequence[str] = ()) -> SpeedOptions:
    return SpeedOptions(
        lengths=args.lengths, modes=args.modes, dtype=args.dtype, causal=args.causal, batch=args.batch,
        heads=args.heads, head_dim=args.head_dim, threads=args.threads, budget_s=args.budget_seconds,
        memory_budget_bytes=int(args.memory_budget * 1e9), repeats=args.repeats, total_s=args.total_seconds,
        rerun=args.rerun, quiet=args.quiet, params=parse_params(args.params, [BASELINE, *mechanisms]),
    )


def _mechanism_names(requested: Sequence[str]) -> list[str]:
    if "all" in requested:
        return [s.name for s in list_mechanisms()]
    return list(requested)


def cmd_speed(args: argparse.Namespace) -> int:
    db, quiet = getattr(args, "db", DEFAULT_DB), getattr(args, "quiet", False)
    args.db, args.quiet = db, quiet
    import_user_modules(getattr(args, "imports", []))
    if args.peers:
        peers.select_peers(args.peers)  # an unknown peer is a usage error before anything runs
    names = _mechanism_names(args.mechanisms)
    for name in names:
        get(name)  # an unknown name is a usage error (with the close matches) before anything runs
    try:
        options = speed_options(args, names)
    except ValueError as err:
        raise ParameterError(str(err)) from None
    store = ResultStore(db)
    say(f"speed: results in {db}", quiet=quiet)
    try:
        results = run_speed(store, names, options)
    except WorkerDied as err:
        print(f"attnlab bench speed: error: {err}", file=sys.stderr)
        return 1
    tables = [speed_table(results)]
    if args.peers:
        peer_results = peers.run_peers(store, [r.config for r in results], args.peers, options)
        have = {r.config_hash for r in results}
        results = results + [r for r in peer_results if r.config_hash not in have]
        tables.append(peers.peer_table(peer_results))
    text = "\n\n".join(tables)
    if args.json:
        data = speed_json(results)
        if args.peers:
            data["peers"] = peers.peer_ratios(results)
        dump = json.dumps(data, indent=1, default=str)
        if args.json == "-":
            print(dump)
            say(text, quiet=quiet)
            return 0
        Path(args.json).write_text(dump + "\n", encoding="utf-8")
    print(text)
    return 0


def cmd_default_suite(args: argparse.Namespace) -> int:
    import_user_modules(args.imports)
    store = ResultStore(args.db)
    names = [s.name for s in list_mechanisms()]
    options = SpeedOptions(lengths=QUICK_LENGTHS, budget_s=quick_budget_s(len(names), args.speed_seconds),
                           total_s=args.speed_seconds, quiet=args.quiet)
    say(f"bench: speed of {len(names)} mechanisms for about {args.speed_seconds:g} s, "
        f"{options.budget_s:.2g} s per configuration at most; results in {args.db}", quiet=args.quiet)
    try:
        results = run_speed(store, names, options)
    except WorkerDied as err:
        print(f"attnlab bench: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(speed_table(results))
    recall.run_default_panel(store, args.quiet)
    print(report.write_report(store, Path(args.db).parent / "report", quiet=args.quiet))
    return 0
