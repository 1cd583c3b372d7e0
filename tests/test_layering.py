"""The import layers of attnlab, read from the source (ast), every import including those inside functions:

    core  <-  kernels  <-  mechanisms  <-  functional  <-  {tasks, analysis, inference, distributed, testing}
          <-  {catalogue, attnlab (the package's __init__)}  <-  {bench, catalogue_table}  <-  cli

A module may import its own layer and those to its left, never one to its right; the command lines
(attnlab/cli.py, __main__, bench/cli.py, analysis/cli.py) are the top layer. No module imports another
folder's private module (`_name.py`) or a private name (`_name`) from a module of another folder.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "attnlab"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("attnlab.core",),
    ("attnlab.kernels",),
    ("attnlab.mechanisms",),
    ("attnlab.functional",),
    ("attnlab.tasks", "attnlab.analysis", "attnlab.recipes", "attnlab.inference", "attnlab.distributed", "attnlab.testing",
     "attnlab.repro"),
    ("attnlab.catalogue", "attnlab"),
    ("attnlab.bench", "attnlab.catalogue_table", "attnlab.repro.runner", "attnlab.repro.section"),
    ("attnlab.cli", "attnlab.__main__", "attnlab.bench.cli", "attnlab.analysis.cli", "attnlab.repro.cli"),
)

# Known edges that break the rules today, each with its reason; any other violation fails. Empty: none.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").is_file()


def is_module(name: str) -> bool:
    return is_package(name) or (ROOT.parent / Path(*name.split("."))).with_suffix(".py").is_file()


def layer(name: str) -> int:
    """The layer of a module: the longest prefix listed in LAYERS decides."""
    best, found = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found >= 0, f"{name}: in no layer of LAYERS"
    return found


def imports(path: Path, source: str | None = None) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import of attnlab modules in `path` (or in `source` as if at `path`)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "attnlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "attnlab":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out += [(sub, None)] if is_module(sub) else [(target, a.name)]
    return out


def folder(name: str) -> str:
    return name if is_package(name) else name.rpartition(".")[0]


def violations(planted: dict[Path, str] | None = None) -> list[str]:
    """Every bad import of attnlab's modules, or only of the `planted` ones ({path: source})."""
    found: list[str] = []
    sources: dict[Path, str | None] = dict(planted) if planted else dict.fromkeys(sorted(ROOT.rglob("*.py")))
    for path, source in sources.items():
        me = module_name(path)
        for target, attr in imports(path, source):
            if (me, target) in ALLOWED:
                continue
            if layer(target) > layer(me):
                found.append(f"{me} imports {target} (layer {layer(target)} above its own {layer(me)})")
            last = target.rpartition(".")[2]
            private_module = last.startswith("_") and not last.startswith("__")
            if private_module and folder(target) != folder(me):
                found.append(f"{me} imports the private module {target} of another folder")
            if attr and attr.startswith("_") and not attr.startswith("__") and folder(target) != folder(me):
                found.append(f"{me} imports the private name {attr} from {target} of another folder")
    return sorted(set(found))


def test_every_module_sits_in_a_layer() -> None:
    names = [module_name(p) for p in ROOT.rglob("*.py")]
    assert len(names) > 50
    for name in names:
        layer(name)


def test_no_upward_or_private_import() -> None:
    assert violations() == []


def test_the_allowances_are_still_needed() -> None:
    """An allowance nobody needs any more is removed, so that the edge cannot come back unnoticed."""
    edges = {(module_name(p), t) for p in ROOT.rglob("*.py") for t, _ in imports(p)}
    assert sorted(ALLOWED - edges) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..mechanisms.dense.softmax import SoftmaxAttention\n", "imports attnlab.mechanisms.dense.softmax (layer"),
        ("def f():\n    from ..cli import main\n", "imports attnlab.cli (layer"),
        ("import attnlab.analysis\n", "imports attnlab.analysis (layer"),
        ("from ..mechanisms.mixers import _channel\n", "private module attnlab.mechanisms.mixers._channel"),
        ("from ..mechanisms.mixers._channel import key_padding\n", "private module attnlab.mechanisms.mixers._channel"),
        ("from ..core.validate import _private\n", "private name _private from attnlab.core.validate"),
    ],
)
def test_a_planted_import_is_found(source: str, expected: str) -> None:
    """The checker itself: a module planted in kernels/ with a bad import is reported, a good one is not."""
    planted = ROOT / "kernels" / "planted.py"
    found = violations({planted: source})
    assert any(expected in v for v in found), found
    assert violations({planted: "from ..core.validate import check_int\nfrom . import planted\n"}) == []
