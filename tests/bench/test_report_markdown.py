"""summary.md: text from the store (parameters, peer names, notes) cannot break a table: `|` and the other
characters Markdown reads as markup are escaped in every cell."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnlab.bench.report import Report, markdown
from attnlab.bench.report.fmt import md
from attnlab.bench.store import ResultStore

SHAPE = {"dtype": "float32", "batch": 1, "heads": 2, "head_dim": 8, "threads": 1}
ENV = {"cpu": "hand", "run_id": "20261207T060000Z-00000002", "time": 3000.0}
PIPED = "a|b"  # a parameter value holding a table separator
PEER = "peer|lib"


def test_md_escapes_each_markup_character() -> None:
    assert md("a|b") == "a\\|b"
    assert md("x | y | z") == "x \\| y \\| z"
    assert md("<s>`c`*e*[l]\\") == "\\<s\\>\\`c\\`\\*e\\*\\[l\\]\\\\"
    assert md("two\nlines") == "two lines"
    assert md(3) == "3"


def _speed(n: int, median: float, *, impl: str = "attnlab", params: dict | None = None) -> tuple:
    config = {"mechanism": "softmax", "impl": impl, "params": params or {}, "n": n, "mode": "fwd", "causal": False,
              **SHAPE}
    metrics = {"median_s": median, "min_s": median, "max_s": median, "repeats": 5, "peak_mem_bytes": n * 4096,
               "load_1m": 0.5}
    return "speed", config, "ok", metrics, ENV


def _cells(line: str) -> list[str]:
    """A table line's cells: split at the `|` that are not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


@pytest.fixture
def summary(tmp_path: Path) -> str:
    store = ResultStore(tmp_path / "r.sqlite")
    for n, t in ((256, 1e-3), (512, 4e-3)):
        assert store.record(*_speed(n, t))
        assert store.record(*_speed(n, 2 * t, params={"pattern": PIPED}))
        assert store.record(*_speed(n, 3 * t, impl=PEER))
    return markdown.render(Report.from_store(store))


def test_every_table_row_has_its_header_columns(summary: str) -> None:
    lines = summary.splitlines()
    tables = 0
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):  # a header
            tables += 1
            width = len(_cells(line))
            end = next((j for j, x in enumerate(lines[i + 2 :]) if not x.startswith("|")), len(lines) - i - 2)
            for row in lines[i + 2 : i + 2 + end]:
                assert len(_cells(row)) == width, f"{row!r} has {len(_cells(row))} cells, the header {width}"
    assert tables >= 3


def test_a_piped_parameter_is_one_escaped_cell(summary: str) -> None:
    rows = [_cells(line) for line in summary.splitlines() if line.startswith("|") and "pattern" in line]
    assert rows, summary
    for row in rows:
        assert row[0].startswith("softmax (pattern=a\\|b)"), row
    peer_rows = [_cells(line) for line in summary.splitlines() if line.startswith("|") and "peer" in line and "lib" in line]
    assert peer_rows and all("peer\\|lib" in " ".join(row) for row in peer_rows), peer_rows
