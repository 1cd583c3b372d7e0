"""The `attnlab repro` command (added to `attnlab` by attnlab/cli.py).

    attnlab repro list [--json]                     every claim: id, paper, claim, expected direction, budget
    attnlab repro P019 | P019-linear-time           the claims of a paper, or one claim (3 seeds each)
    attnlab repro --all [--budget-minutes M]        every claim that fits M minutes; a rerun resumes
    ... --smoke                                     tiny sizes, seed 0: checks that the claims run
    ... --rerun                                     run again claims the store has

Each run prints its verdict line and writes a figure, a table and the verdict under
<results folder>/repro/ (the folder of --db, default attnlab-results/).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bench.store import DEFAULT_DB, ResultStore
from ..core.errors import UsageError
from ..core.registry import entries
from .claim import Claim, all_claims, select
from .runner import run_claims

WIDTH = 100


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {text!r}")
    return value


def listing(claims: list[Claim]) -> str:
    """The text of `attnlab repro list`: one block per claim, lines of at most WIDTH columns."""
    import textwrap

    lines = [f"{len(claims)} claims (each: ≥ 3 seeds, a rule stated before the run)", ""]
    for c in claims:
        lines.append(f"{c.id}  [{c.paper.id}, {c.method}, ≤ {c.budget_s:g} s]")
        for label, text in (("claim", c.statement), ("expect", c.direction), ("rule", c.rule.text())):
            lines += textwrap.wrap(f"{label}: {text}", WIDTH, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def cmd_repro(args: argparse.Namespace) -> int:
    claims = all_claims()
    if args.target == "list":
        if args.json:
            print(json.dumps([{"id": c.id, "paper": c.paper.id, "claim": c.statement, "statistic": c.statistic,
                               "direction": c.direction, "rule": c.rule.text(), "method": c.method,
                               "budget_s": c.budget_s, "seeds": c.seeds, "note": c.note} for c in claims],
                             indent=2, ensure_ascii=False))
        else:
            print(listing(claims))
        return 0
    if args.all == (args.target is not None):
        raise UsageError("expected a paper id, a claim id, `list`, or --all (one of them)")
    if args.budget_minutes is not None and not args.all:
        raise UsageError("--budget-minutes: goes with --all")
    if args.all:
        chosen = claims
    else:
        try:
            chosen = select(args.target, claims)
        except ValueError as err:
            raise UsageError(str(err)) from None
    store = ResultStore(args.db)
    size = "smoke" if args.smoke else "full"
    budget = None if args.budget_minutes is None else args.budget_minutes * 60
    outcomes, left, failed = run_claims(chosen, store, size=size, budget_s=budget, rerun=args.rerun,
                                        quiet=args.quiet)
    for o in outcomes:
        print(o.line + ("" if o.ran else " (stored)"))
        print(f"  figure: {o.figure}  table: {o.table}  time: {o.seconds:.1f} s")
    if left:
        print(f"left for a next run (over the budget): {', '.join(left)}")
    for f in failed:
        print(f"failed: {f}")
    return 1 if failed else 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add `repro` to the `attnlab` command."""
    ids = [s.name for s in entries("repro")]
    p = subparsers.add_parser(
        "repro", help="reproduce the papers' claims at laptop scale (figure, table, verdict by a pre-stated rule)",
        description=f"Reproduce the claims of the papers ({len(ids)} registered; `attnlab repro list`). Each runs over "
        "3 seeds; its statistic's 95% t-interval is judged by the claim's rule: reproduced / not reproduced / "
        "inconclusive. Outcomes go to the results store (suite 'repro'): a claim done is not run again.",
    )
    p.add_argument("target", nargs="?", metavar="list|PAPER|CLAIM",
                   help="`list`, a paper id (runs its claims) or a claim id")
    p.add_argument("--all", action="store_true", help="every claim (those in the store skipped)")
    p.add_argument("--budget-minutes", type=_minutes, default=None, metavar="M",
                   help="with --all: start a claim only while its budget fits in M minutes; the next run resumes")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one seed: checks that the claims run")
    p.add_argument("--rerun", action="store_true", help="run again claims the store has")
    p.add_argument("--json", action="store_true", help="with list: JSON")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, metavar="PATH",
                   help=f"the results database (default {DEFAULT_DB}); files go to its folder's repro/")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_repro)
