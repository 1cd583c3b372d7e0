"""The README's table of mechanisms, generated from the registry.

    python -m attnlab.catalogue_table                    # print the table
    python -m attnlab.catalogue_table --write README.md  # rewrite it between the markers
    python -m attnlab.catalogue_table --check README.md  # exit 1 when README.md is out of date
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.registry import FAMILIES, Spec, entries, list_mechanisms

START = "<!-- mechanisms:start -->"
END = "<!-- mechanisms:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _paper(spec: Spec) -> str:
    p = spec.paper
    title = f"[{p.title}](https://arxiv.org/abs/{p.arxiv})" if p.arxiv else p.title
    return f"{p.id + ' ' if p.id else ''}{title} ({p.year})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def mechanism_table() -> str:
    """The markdown between the markers: the mechanisms, then any other catalogue entries."""
    specs = list_mechanisms()
    used = sorted({s.family for s in specs if s.family})
    lines = [
        f"{len(specs)} mechanisms. Families: " + "; ".join(f"{f} {FAMILIES[f]}" for f in used) + ".",
        "",
        _row(["name", "family", "paper", "cost", "supports"]),
        "|---|---|---|---|---|",
    ]
    for s in specs:
        supports = ", ".join(s.supports.flags()) if s.supports else ""
        lines.append(_row([f"`{s.name}`", s.family or "", _paper(s), s.cost or "", supports]))
    others = [s for s in entries() if s.kind != "mechanism"]
    if others:
        lines += ["", "Also in the catalogue:", "", _row(["kind", "name", "paper", "summary"]), "|---|---|---|---|"]
        lines += [_row([s.kind, f"`{s.name}`", _paper(s), s.summary]) for s in others]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """`text` with the part between START and END replaced by `table`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README: expected one {START!r} followed by one {END!r}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def readme_table(text: str) -> str:
    """The table currently between the markers of `text`."""
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnlab.catalogue_table", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="README", type=Path, help="rewrite the table in this file")
    group.add_argument("--check", metavar="README", type=Path, help="exit 1 when the table in this file is stale")
    args = parser.parse_args(argv)
    table = mechanism_table()
    if args.write:
        text = args.write.read_text(encoding="utf-8")
        new = replace_table(text, table)
        if new != text:
            args.write.write_text(new, encoding="utf-8")
        print(f"{args.write}: {'updated' if new != text else 'up to date'}")
    elif args.check:
        text = args.check.read_text(encoding="utf-8")
        if replace_table(text, table) != text:
            print(f"{args.check}: the mechanism table is stale; run python -m attnlab.catalogue_table --write {args.check}")
            return 1
        print(f"{args.check}: up to date")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
