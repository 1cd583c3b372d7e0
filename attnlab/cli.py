"""The `attnlab` command: browse the catalogue, and (when installed) benchmark and explain.

    attnlab list [--family A] [--wide] [--json]   the mechanisms (--wide: every column, past 100 columns)
    attnlab info NAME                             one mechanism: paper, cost, supports, parameters, source file
    attnlab papers [--json]                       every paper id and what implements it
    attnlab --version

`--import MODULE` (repeatable; before the command or after it) imports a module — a dotted name
or a `.py` file — that registers mechanisms, so that every command sees them; installed packages
register theirs through the entry-point group `attnlab.mechanisms` (attnlab/catalogue.py). Text
output fits 100 columns, except `list --wide` and, in `info`, the source path and the example call
(never cut).

Other parts of attnlab add subcommands: a module listed in `PLUGINS` defines
`add_subcommands(subparsers)`, which adds parsers whose `func` default (set with
`parser.set_defaults(func=...)`) takes the parsed arguments and returns the exit code.
A user error (unknown name, bad parameter) exits with 2 and a message on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from . import __version__, catalogue
from .core.errors import (  # UsageError: re-exported as attnlab.cli.UsageError
    ParameterError,
    UnknownNameError,
    UsageError,
)
from .core.registry import BUILDABLE, FAMILIES, KINDS, Spec, entries, get, list_mechanisms, papers

PLUGINS: tuple[str, ...] = ("attnlab.bench.cli", "attnlab.analysis.cli", "attnlab.repro.cli")
EXAMPLE_SIZES: tuple[tuple[int, int], ...] = ((64, 4), (16, 2))  # (dim, heads) tried for `info`'s example
WIDTH = 100  # columns of the text output (`list` without --wide, `papers`, `info`)


# -- formatting -------------------------------------------------------------------------
def clip(text: str, width: int) -> str:
    """`text` cut to `width` characters, the cut marked with "…"."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def table(rows: Sequence[Sequence[str]], header: Sequence[str], width: int | None = None, *,
          wrap_cells: bool = False) -> str:
    """A plain left-aligned text table. With `width`, columns narrow until lines fit: the last one
    first (down to 24 characters), then the widest; their cells are cut (…), or with `wrap_cells`
    wrapped onto continuation lines (nothing lost)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    if width is not None:
        over = sum(widths) + 2 * (len(widths) - 1) - width
        widths[-1] -= max(min(over, widths[-1] - 24), 0)
        floor = [len(h) for h in header]
        while sum(widths) + 2 * (len(widths) - 1) > width:
            i = max(range(len(widths)), key=lambda j: widths[j] - floor[j])
            if widths[i] <= floor[i]:
                break  # every column is down to its header: nothing left to narrow
            widths[i] -= 1
    lines = []
    for r in [header, *rows]:
        if wrap_cells:
            cells = [textwrap.wrap(str(c), w, break_on_hyphens=False) or [""] for c, w in zip(r, widths, strict=True)]
        else:
            cells = [[clip(str(c), w)] for c, w in zip(r, widths, strict=True)]
        for k in range(max(map(len, cells))):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)]
            lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def wrap(text: str, indent: int = 0) -> list[str]:
    """`text` in lines of at most WIDTH columns; continuation lines indented by `indent`."""
    return textwrap.wrap(text, WIDTH, subsequent_indent=" " * indent, break_on_hyphens=False) or [""]


def supports_text(spec: Spec) -> str:
    return ", ".join(spec.supports.flags()) if spec.supports else ""


def paper_text(spec: Spec) -> str:
    return f"{spec.paper.id or '-'} {spec.paper.title} ({spec.paper.year})"


def source_text(spec: Spec) -> str:
    """`path:line` of the class or function that implements `spec`, or "-" when Python cannot tell."""
    try:
        path = inspect.getsourcefile(spec.factory)
        line = inspect.getsourcelines(spec.factory)[1]
    except (TypeError, OSError):
        return "-"
    return f"{path}:{line}" if path else "-"


def family_text(family: str | None) -> str:
    return f"{family} ({FAMILIES[family]})" if family in FAMILIES else "-"


def _py(value: Any) -> str:
    """Python source for a value, strings in double quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=repr)


def _range_text(p: dict[str, Any]) -> str:
    if p["choices"]:
        return "one of " + ", ".join(map(str, p["choices"]))
    low, high = p["low"], p["high"]
    if low is not None and high is not None:
        return f"[{low:g}, {high:g}]"
    if low is not None:
        return f">= {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""


def example(spec: Spec) -> str:
    """A call of `attnlab.build` that works: the required parameters come from the spec's test config."""
    required = {p.name: spec.test_params[p.name] for p in spec.params if p.required and p.name in spec.test_params}
    missing = [p.name for p in spec.params if p.required and p.name not in ("dim", *required)]
    has_heads = any(p.name == "heads" for p in spec.params)
    attempts = [{"dim": dim, **({"heads": heads} if has_heads else {}), **required} for dim, heads in EXAMPLE_SIZES]
    chosen = attempts[0]
    if not missing:
        for kwargs in attempts:
            try:
                spec.build(**kwargs)
            except (ValueError, TypeError):
                continue
            chosen = kwargs
            break
    args = [_py(spec.name), *(f"{k}={_py(v)}" for k, v in chosen.items()), *(f"{m}=..." for m in missing)]
    return f"attnlab.build({', '.join(args)})"


# -- subcommands ------------------------------------------------------------------------
def _mechanisms(family: str | None) -> list[Spec]:
    if family is None:
        return list_mechanisms()
    if family.upper() not in FAMILIES:
        known = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
        raise UsageError(f"unknown family {family!r}; families: {known}")
    return list_mechanisms(family.upper())


def cmd_list(args: argparse.Namespace) -> int:
    specs = _mechanisms(args.family)
    if args.json:
        print(_dumps([s.as_dict() for s in specs]))
        return 0
    if not specs:
        print(f"no mechanism of family {family_text(args.family.upper())} yet" if args.family else "no mechanisms")
        return 0
    if args.wide:
        rows = [(s.name, s.family or "-", s.cost or "-", supports_text(s), paper_text(s)) for s in specs]
        print(table(rows, ("name", "family", "cost", "supports", "paper")))
    else:
        rows = [(s.name, s.family or "-", s.cost or "-", paper_text(s)) for s in specs]
        print(table(rows, ("name", "family", "cost", "paper"), WIDTH))
    more = "`attnlab info NAME` tells more" + ("" if args.wide else ", `attnlab list --wide` shows what each supports")
    print(f"\n{len(specs)} mechanism{'s' * (len(specs) != 1)}; {more}")
    kinds = ("pooling", "block", "set", "graph", "table")
    modules = [s for kind in kinds for s in entries(kind) if not args.family or s.family == args.family.upper()]
    if modules:
        rows = [(s.name, s.kind, s.family or "-", s.cost or "-", paper_text(s)) for s in modules]
        print("\npooling layers (tokens -> m vectors), blocks (around a mechanism, `mixer=`), sets, graphs, tables:\n")
        print(table(rows, ("name", "kind", "family", "cost", "paper"), WIDTH))
    return 0


def lookup(name: str) -> Spec:
    """The mechanism `name`, else the entry of another kind with that name."""
    others = [s for s in entries() if s.name == name and s.kind != "mechanism"]
    return others[0] if others and name not in {s.name for s in list_mechanisms()} else get(name)


def cmd_info(args: argparse.Namespace) -> int:
    spec = lookup(args.name)
    d = spec.as_dict()
    title = f"{spec.name} ({spec.kind})" if spec.kind != "mechanism" else spec.name
    out = [*wrap(f"{title}: {spec.summary}" if spec.summary else title, 2), ""]
    out += wrap(f"  paper      {spec.paper.cite()}", 13)
    out.append(f"  family     {family_text(spec.family)}")
    if spec.cost or spec.exponent is not None:
        exponent = f", exponent {spec.exponent:g} in N" if spec.exponent is not None else ""
        out += wrap(f"  cost       {spec.cost or '-'}{exponent}", 13)
    if spec.supports is not None:
        out += wrap(f"  supports   {supports_text(spec)}", 13)
        out.append(f"  dtypes     {', '.join(spec.supports.dtypes)}")
    out.append(f"  normalized {'yes: rows of materialize sum to 1' if spec.normalized else 'no'}")
    out.append(f"  source     {source_text(spec)}")  # a path is never cut
    if d["backend"]:
        out += wrap(f"  fast path  {d['backend']}", 13)
    if spec.functional:
        out += wrap(f"  functional {', '.join(f'attnlab.functional.{f}' for f in spec.functional)}", 13)
    rows = [
        (p.name, p.type_name(), "required" if p.required else repr(p.default), _range_text(p.as_dict()), p.doc)
        for p in spec.params  # the default as the user writes it (a tuple stays a tuple)
    ]
    out += ["", "parameters:", table(rows, ("name", "type", "default", "range", "doc"), WIDTH, wrap_cells=True)]
    if d["knobs"]:
        out += wrap(f"speed knobs: {', '.join(d['knobs'])} (they change the cost, not the result)", 2)
    if spec.kind in BUILDABLE:
        out += ["", "example:", f"  {example(spec)}"]
    print("\n".join(out))
    return 0


def paper_table() -> dict[str, dict[str, Any]]:
    """Paper id -> title, year, arXiv id and the artifacts implementing it, grouped by kind."""
    out: dict[str, dict[str, Any]] = {}
    for pid, specs in papers().items():
        paper = max(specs, key=lambda s: s.paper.arxiv is not None).paper  # the most complete citation
        by_kind = {kind: [s.name for s in specs if s.kind == kind] for kind in KINDS}
        out[pid] = {
            "title": paper.title,
            "year": paper.year,
            "arxiv": paper.arxiv,
            "artifacts": {kind: names for kind, names in by_kind.items() if names},
        }
    return out


def cmd_papers(args: argparse.Namespace) -> int:
    table_ = paper_table()
    if args.json:
        print(_dumps(table_))
        return 0
    lines = []
    for pid, row in table_.items():
        lines += wrap(f"{pid}  {row['title']} ({row['year']})", 6)
        for kind, names in row["artifacts"].items():
            lines += wrap(f"      {kind:<10} {', '.join(names)}", 17)
    outside = [s for s in entries() if not s.paper.id]
    n_artifacts = sum(len(names) for row in table_.values() for names in row["artifacts"].values())
    lines += ["", f"{len(table_)} papers, {n_artifacts} artifacts"]
    if outside:
        lines.append("outside the seed papers:")
        for s in outside:
            lines += wrap(f"  {s.name} ({s.paper.title}, {s.paper.year})", 4)
    print("\n".join(lines))
    return 0


# -- parser -----------------------------------------------------------------------------
def add_plugin(subparsers: argparse._SubParsersAction, module_name: str) -> bool:
    """Let `module_name` add its subcommands; False when that module is not there."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name in (module_name, module_name.rpartition(".")[0]):  # the plugin (or its package) is absent
            return False
        raise  # the plugin is there but something it imports is not: a real error
    module.add_subcommands(subparsers)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnlab", description="attnlab: the attention laboratory for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    parser.add_argument(
        "--import", dest="global_imports", action="append", default=[], metavar="MODULE",
        help="import a module (dotted name or .py file) that registers mechanisms, for any command; repeatable",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list the mechanisms", description="List the registered mechanisms.")
    p.add_argument("--family", metavar="F", help="only family F: " + ", ".join(f"{k} {v}" for k, v in FAMILIES.items()))
    p.add_argument("--wide", action="store_true", help="every column (supports, full titles), past 100 columns")
    p.add_argument("--json", action="store_true", help="a JSON array with every field of each mechanism")
    catalogue.add_import_argument(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="everything about one mechanism", description="Describe one mechanism.")
    p.add_argument("name", help="a mechanism name (see `attnlab list`)")
    catalogue.add_import_argument(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("papers", help="paper ids and what implements them",
                       description="Every paper id attnlab implements, with the artifacts implementing it.")
    p.add_argument("--json", action="store_true", help="a JSON object: paper id -> paper and artifacts by kind")
    catalogue.add_import_argument(p)
    p.set_defaults(func=cmd_papers)

    for module_name in PLUGINS:
        add_plugin(sub, module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `attnlab` with `argv` (default sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    try:
        catalogue.import_modules([*args.global_imports, *getattr(args, "imports", [])])
        return int(args.func(args) or 0)
    except (UsageError, UnknownNameError, ParameterError, catalogue.PluginError) as err:
        print(f"attnlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `attnlab list | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
