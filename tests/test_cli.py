"""The `attnlab` command: list, info, papers, --version, errors, and the subcommand hook."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import attnlab
from attnlab.cli import WIDTH, add_plugin, main, table
from attnlab.core import registry
from attnlab.core.registry import Paper, Spec, Supports
from attnlab.mechanisms.dense.softmax import SoftmaxAttention

SCRIPT = Path(sys.executable).parent / "attnlab"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def mechanisms() -> list[Spec]:
    return [s for s in registry.entries() if s.kind == "mechanism"]


@pytest.fixture
def planted():
    """Two entries of one seed paper (a mechanism and an analysis) and one of another paper."""

    @registry.register(
        name="test-planted-mech",
        paper=Paper("P998", "A Planted Paper", 2001, "0101.00001"),
        family="B",
        cost="O(Nd)",
        exponent=1.0,
        supports=Supports(),
        params=(registry.Param("width", int, doc="a required width", low=2, high=9),),
        summary="A mechanism planted by the CLI tests.",
        test_params={"width": 3},
        backend=lambda: "planted loops (here); the PyTorch path elsewhere",
    )
    class Planted(SoftmaxAttention):
        def __init__(self, dim: int, heads: int = 8, *, head_dim=None, qkv_bias=True, width: int) -> None:
            super().__init__(dim, heads, head_dim=head_dim, qkv_bias=qkv_bias)
            self.width = width

    registry.add(Spec("test-planted-analysis", "analysis", Paper("P998", "A Planted Paper", 2001), factory=dict))
    registry.add(Spec("test-planted-task", "task", Paper("P997", "Another Planted Paper", 2002), factory=dict))
    yield Planted
    registry.remove("test-planted-mech")
    registry.remove("test-planted-analysis", "analysis")
    registry.remove("test-planted-task", "task")


def test_list_names_every_mechanism_with_its_paper_and_cost(capsys):
    code, out, err = run(capsys, "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    for spec in mechanisms():
        row = next(line for line in lines if line.split()[:1] == [spec.name])
        assert spec.cost in row and f"  {spec.paper.id or '-'} {spec.paper.title[:10]}" in row
        assert row.split()[1] == spec.family


def test_list_wide_has_supports_and_whole_titles(capsys):
    code, out, err = run(capsys, "list", "--wide")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["name", "family", "cost", "supports", "paper"]
    for spec in mechanisms():
        row = next(line for line in lines if line.split()[:1] == [spec.name])
        assert row.endswith(f"{spec.paper.id or '-'} {spec.paper.title} ({spec.paper.year})")
        assert spec.cost in row and ", ".join(spec.supports.flags()) in row
    assert max(map(len, lines)) > WIDTH  # the wide form is the one that does not fit


def test_table_cuts_the_last_column_first_then_the_widest():
    rows = [("a" * 30, "b" * 50, "c" * 60)]
    lines = table(rows, ("x", "y", "z"), width=100).splitlines()
    # 30 + 50 + 60 + 4 = 144: z is cut to 24 (108), then y, the widest, by 8
    assert lines[1] == "-" * 30 + "  " + "-" * 42 + "  " + "-" * 24
    assert lines[2] == "a" * 30 + "  " + "b" * 41 + "…" + "  " + "c" * 23 + "…"
    assert table(rows, ("x", "y", "z")).splitlines()[2] == "  ".join(rows[0])  # no width: nothing cut
    wrapped = table([("a" * 30, "b " * 25, "c " * 30)], ("x", "y", "z"), width=100, wrap_cells=True).splitlines()
    # the same widths (30, 42, 24), cells wrapped: z's 60 characters on three lines, y's 50 on two
    assert max(map(len, wrapped)) <= 100 and len(wrapped) == 2 + 3
    assert wrapped[2].startswith("a" * 30 + "  b b") and wrapped[3].startswith(" " * 32 + "b ")
    assert " ".join(" ".join(line[76:] for line in wrapped[2:]).split()) == " ".join(["c"] * 30)  # z whole
    assert " ".join(" ".join(line[32:76] for line in wrapped[2:]).split()) == " ".join(["b"] * 25)  # y whole


@pytest.mark.parametrize("columns", [None, "100"])
@pytest.mark.parametrize("argv", [["list"], ["papers"]])
def test_text_output_fits_100_columns(argv, columns):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    done = subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) > 5
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert too_wide == []


def test_papers_wraps_long_lines_without_losing_words(capsys):
    out = run(capsys, "papers")[1]
    lines = out.splitlines()
    assert max(map(len, lines)) <= WIDTH
    words = " ".join(lines).split()
    for spec in registry.entries():
        assert spec.name.rstrip(",") in " ".join(words).replace(",", " ").split()
        assert " ".join(spec.paper.title.split()) in " ".join(words)  # each title whole, line breaks aside


def test_list_family_filters(capsys, planted):
    code, out, _ = run(capsys, "list", "--family", "b")  # case-insensitive
    assert code == 0
    rows = out.split("\n\n")[0].splitlines()[2:]  # below the header and its rule, above the count
    names = {row.split()[0] for row in rows}
    assert names == {s.name for s in mechanisms() if s.family == "B"}
    assert "test-planted-mech" in names and "softmax" not in names


def test_list_json_has_every_mechanism_and_field(capsys, planted):
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    rows = json.loads(out)
    expected = {s.name: s for s in mechanisms()}
    assert [r["name"] for r in rows] == sorted(expected)
    for row in rows:
        spec = expected[row["name"]]
        assert row["paper"]["id"] == spec.paper.id and row["paper"]["title"] == spec.paper.title
        assert row["family"] == spec.family and row["cost"] == spec.cost and row["exponent"] == spec.exponent
        assert [p["name"] for p in row["params"]] == [p.name for p in spec.params]
        assert set(row["supports"]) >= {"causal", "key_padding", "cross", "grids", "decode", "materialize"}
    planted_row = next(r for r in rows if r["name"] == "test-planted-mech")
    assert planted_row["paper"] == {"id": "P998", "title": "A Planted Paper", "year": 2001, "arxiv": "0101.00001"}
    assert planted_row["params"][-1] == {
        "name": "width", "type": "int", "default": None, "required": True, "doc": "a required width",
        "low": 2, "high": 9, "choices": None,
    }


def test_list_json_family_filter(capsys, planted):
    rows = json.loads(run(capsys, "list", "--family", "B", "--json")[1])
    assert [r["name"] for r in rows] == sorted(s.name for s in mechanisms() if s.family == "B")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["info", "sofmax"], "did you mean 'softmax'"),
        (["info", "softmx"], "did you mean 'softmax'"),
        (["list", "--family", "Z"], "unknown family 'Z'"),
    ],
)
def test_unknown_names_exit_2_with_a_hint(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_family_lists_the_families(capsys):
    err = run(capsys, "list", "--family", "Z")[2]
    for letter, meaning in registry.FAMILIES.items():
        assert f"{letter} ({meaning})" in err


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    assert "invalid choice" in run(capsys, "frobnicate")[2]


def test_info_prints_every_parameter_and_the_paper(capsys):
    for spec in mechanisms():
        code, out, err = run(capsys, "info", spec.name)
        assert code == 0 and err == ""
        flat = " ".join(out.split())  # long lines are wrapped
        assert spec.paper.title in flat and str(spec.paper.year) in out and spec.cost in flat
        params = out.split("parameters:")[1].split("example:")[0].splitlines()
        rule = next(line for line in params if line.startswith("--"))
        doc_column = rule.rindex(" ") + 1  # the doc column starts after the rule's last gap
        for p in spec.params:
            i = next(i for i, line in enumerate(params) if line.split()[:1] == [p.name] and not line.startswith(" "))
            row = params[i]
            assert row.split()[1] == p.type_name().split()[0]
            assert ("required" if p.required else repr(p.default)) in row
            doc = [row[doc_column:]]
            for line in params[i + 1:]:  # its continuation lines: blank in the name column
                if not line.strip() or not line.startswith(" "):
                    break
                doc.append(line[doc_column:])
            assert " ".join(p.doc.split()) == " ".join(" ".join(doc).split())
        wide = [line for line in out.splitlines() if len(line) > WIDTH]
        assert all(line.startswith("  source ") or line.startswith("  attnlab.build(") for line in wide), wide


def test_info_example_builds_the_mechanism(capsys):
    for spec in mechanisms():
        out = run(capsys, "info", spec.name)[1]
        line = out.split("example:")[1].strip()
        assert line.startswith(f'attnlab.build("{spec.name}", dim=')
        module = eval(line, {"attnlab": attnlab})
        assert isinstance(module, spec.factory)


def test_info_of_a_planted_mechanism(capsys, planted):
    out = run(capsys, "info", "test-planted-mech")[1]
    assert "P998 A Planted Paper (2001, arXiv:0101.00001)" in out
    assert "B (token mixer)" in out and "O(Nd), exponent 1 in N" in out
    assert "fast path  planted loops (here); the PyTorch path elsewhere" in out  # Spec.backend, asked at `info` time
    assert "  fast path  " not in run(capsys, "info", "softmax")[1]  # entries without a compiled path say nothing
    width = next(line for line in out.splitlines() if line.startswith("width"))
    assert width.split()[:3] == ["width", "int", "required"] and "[2, 9]" in width
    example = out.split("example:")[1].strip()
    assert example == 'attnlab.build("test-planted-mech", dim=64, heads=4, width=3)'
    assert eval(example, {"attnlab": attnlab}).width == 3


def test_papers_json_maps_each_paper_to_its_artifacts(capsys, planted):
    code, out, _ = run(capsys, "papers", "--json")
    assert code == 0
    got = json.loads(out)
    expected: dict[str, dict[str, list[str]]] = {}
    for spec in registry.entries():
        if spec.paper.id is not None:
            expected.setdefault(spec.paper.id, {}).setdefault(spec.kind, []).append(spec.name)
    assert {pid: row["artifacts"] for pid, row in got.items()} == {
        pid: {k: sorted(v) for k, v in kinds.items()} for pid, kinds in expected.items()
    }
    assert got["P998"] == {
        "title": "A Planted Paper", "year": 2001, "arxiv": "0101.00001",
        "artifacts": {"mechanism": ["test-planted-mech"], "analysis": ["test-planted-analysis"]},
    }
    assert got["P997"]["artifacts"] == {"task": ["test-planted-task"]}
    assert list(got) == sorted(got)


def test_papers_text_groups_by_kind(capsys, planted):
    code, out, _ = run(capsys, "papers")
    assert code == 0
    lines = out.splitlines()
    i = lines.index("P998  A Planted Paper (2001)")
    assert lines[i + 1].split() == ["mechanism", "test-planted-mech"]
    assert lines[i + 2].split() == ["analysis", "test-planted-analysis"]
    assert "softmax (Attention Is All You Need, 2017)" in out  # no seed id: listed apart


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"attnlab {importlib.metadata.version('attnlab')}"


def test_installed_script_runs_in_a_subprocess():
    assert SCRIPT.exists(), f"{SCRIPT} is not installed; pip install -e ."
    done = subprocess.run([str(SCRIPT), "list", "--json"], capture_output=True, text=True, timeout=120, check=True)
    rows = json.loads(done.stdout)
    built_in = {s.name: s.paper.id for s in mechanisms() if s.factory.__module__.startswith("attnlab.")}
    assert {r["name"]: r["paper"]["id"] for r in rows} == built_in  # tests may plant others in this process
    assert "Traceback" not in done.stderr


def test_python_dash_m_attnlab(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["attnlab", "info", "sofmax"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("attnlab", run_name="__main__")
    assert exit_.value.code == 2 and "did you mean 'softmax'" in capsys.readouterr().err


# -- the hook through which bench/ and analysis/ add subcommands --------------------------
def _subparsers() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser()
    return parser, parser.add_subparsers(dest="command")


def test_plugin_adds_its_subcommands(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg_ok"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text(
        "def add_subcommands(sub):\n"
        "    p = sub.add_parser('hello')\n"
        "    p.set_defaults(func=lambda args: 7)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    parser, sub = _subparsers()
    assert add_plugin(sub, "plugpkg_ok.cli") is True
    args = parser.parse_args(["hello"])
    assert args.func(args) == 7


def test_plugin_absent_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "plugpkg_empty").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    _, sub = _subparsers()
    assert add_plugin(sub, "plugpkg_empty.cli") is False
    assert add_plugin(sub, "plugpkg_nowhere.cli") is False
    assert sub.choices == {}


def test_plugin_with_a_broken_import_raises(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg_broken"
    pkg.mkdir()
    (pkg / "cli.py").write_text("import no_such_module_for_attnlab_tests\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, sub = _subparsers()
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_attnlab_tests"):
        add_plugin(sub, "plugpkg_broken.cli")


USER_MODULE = """
from attnlab import register
from attnlab.core.registry import Paper
from attnlab.mechanisms.dense.softmax import SoftmaxAttention
RUNS = globals().get("RUNS", 0) + 1
@register(name="test-imported-mech", paper=Paper(None, "Imported", 2026), family="A", cost="O(N²d)",
          exponent=2.0, supports=SoftmaxAttention.spec.supports)
class Imported(SoftmaxAttention):
    "A mechanism from a user's module."
"""


def test_import_makes_a_module_s_mechanism_visible(capsys, tmp_path, monkeypatch):
    """--import before or after the command, by .py path (absolute or relative); a file runs once."""
    path = tmp_path / "cli_import_mod.py"
    path.write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "info", "test-imported-mech")[0] == 2  # not imported: unknown
    try:
        code, out, err = run(capsys, "--import", str(path), "info", "test-imported-mech")
        assert code == 0 and err == "" and f"source     {path}:6" in out  # the decorator's line
        code, out, _ = run(capsys, "list", "--import", "cli_import_mod.py", "--family", "A")
        assert code == 0 and any(line.split()[:1] == ["test-imported-mech"] for line in out.splitlines())
        assert run(capsys, "papers", "--import", str(path))[1].count("test-imported-mech (Imported, 2026)") == 1
        assert sys.modules["attnlab_user_cli_import_mod"].RUNS == 1  # the same file, two spellings: run once
    finally:
        registry.remove("test-imported-mech")


@pytest.mark.parametrize("argv, needle", [
    (["--import", "broken_mod.py", "list"], "broken on purpose"),
    (["list", "--import", "no_such_module_here"], "no_such_module_here"),
    (["papers", "--import", "missing.py"], "no such file"),
    (["info", "softmax", "--import", " "], "expected a module name"),
])
def test_import_errors_exit_2_in_one_line(capsys, tmp_path, monkeypatch, argv, needle):
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and needle in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("attnlab ")


def test_list_shows_the_other_module_kinds_after_the_mechanisms(capsys):
    out = run(capsys, "list")[1]
    tail = out.split("pooling layers")[1]
    for spec in [s for kind in ("pooling", "block", "set", "graph", "table") for s in attnlab.core.registry.entries(kind)]:
        assert f"\n{spec.name} " in tail and spec.kind in tail
    assert "pre-norm-block" not in out.split("pooling layers")[0]
    info = run(capsys, "info", "pre-norm-block")[1]
    assert 'attnlab.build("pre-norm-block", dim=' in info and "mixer" in info
