"""README.md: the first commands, the usage example runs, the mechanism table is current."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.catalogue_table import END, START, main, mechanism_table, readme_table, replace_table
from attnlab.core import registry

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str | None = None) -> list[str]:
    return [body for tag, body in FENCE.findall(README) if lang is None or tag == lang]


def test_first_commands_are_make_bench_and_make_test():
    commands = [line.split("#")[0].strip() for line in blocks()[0].splitlines()]
    assert commands == ["make bench", "make test"]
    assert README.index("```") > README.index("attnlab is")  # after the one paragraph saying what attnlab is
    assert README.split("```")[0].count("\n\n") == 2  # title, that paragraph, then the commands
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert {"bench", "test"} <= set(targets)


def test_usage_example_runs():
    code = blocks("python")
    assert code, "README.md has no ```python block"
    for body in code:
        exec(compile(body, "README.md", "exec"), {"__name__": "readme"})


def test_usage_example_covers_the_promised_steps():
    body = blocks("python")[0]
    for needle in ("attnlab.build(", "attention_mask=", "key_padding_mask=~", ".materialize(", 'impl="reference"'):
        assert needle in body


def test_conventions_are_stated():
    for needle in ("(batch, heads, n, head_dim)", "(batch, n, dim)", "True = attend", "True = real", "True = padding",
                   "batch_first", "bottom-right"):
        assert needle in README


def test_cli_section_shows_the_commands():
    cli = README.split("## CLI", 1)[1].split("\n## ", 1)[0]
    for command in ("attnlab list", "attnlab info", "attnlab papers"):
        assert command in cli


def test_mechanism_table_is_current():
    """Checked in a fresh interpreter: other test modules plant mechanisms in this process's registry."""
    assert README.count(START) == 1 and README.count(END) == 1
    fresh = subprocess.run(
        [sys.executable, "-c", "from attnlab.catalogue_table import mechanism_table; print(mechanism_table(), end='')"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert readme_table(README) == fresh, (
        "the mechanism table in README.md is stale: run python -m attnlab.catalogue_table --write README.md"
    )


def test_mechanism_table_lists_the_registry():
    rows = [line for line in mechanism_table().splitlines() if line.startswith("| `")]
    mechanisms = [s for s in registry.entries() if s.kind == "mechanism"]
    assert [row.split("`")[1] for row in rows] == sorted(s.name for s in mechanisms)
    for row, spec in zip(rows, sorted(mechanisms, key=lambda s: s.name), strict=True):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[1] == spec.family and cells[3].replace("\\|", "|") == spec.cost  # a | in a cell is escaped
        assert spec.paper.title in cells[2] and str(spec.paper.year) in cells[2]
        assert cells[2].startswith(spec.paper.id or "[")
        assert ("causal" in cells[4]) == spec.supports.causal and ("decode" in cells[4]) == spec.supports.decode


def test_table_shows_other_kinds_and_escapes_pipes():
    spec = registry.Spec("test-readme-entry", "analysis", registry.Paper("P996", "A | B", 2003), factory=dict, summary="s")
    registry.add(spec)
    try:
        table = mechanism_table()
    finally:
        registry.remove("test-readme-entry", "analysis")
    assert "| analysis | `test-readme-entry` | P996 A \\| B (2003) | s |" in table.splitlines()
    assert "test-readme-entry" not in mechanism_table()


def test_replace_table_keeps_the_rest():
    text = f"intro\n{START}\nold\n{END}\noutro\n"
    assert replace_table(text, "new") == f"intro\n{START}\nnew\n{END}\noutro\n"
    assert readme_table(replace_table(text, "a\nb")) == "a\nb"
    for broken in ("no markers", f"{END}\n{START}", f"{START}{START}{END}"):
        with pytest.raises(ValueError, match="mechanisms:start"):
            replace_table(broken, "new")


def test_write_and_check(tmp_path, capsys):
    path = tmp_path / "README.md"
    path.write_text(f"# x\n{START}\nstale\n{END}\ntail\n", encoding="utf-8")
    assert main(["--check", str(path)]) == 1
    assert main(["--write", str(path)]) == 0
    assert main(["--check", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# x\n{START}\n") and text.endswith(f"{END}\ntail\n") and "stale" not in text
    assert readme_table(text) == mechanism_table()
    capsys.readouterr()
