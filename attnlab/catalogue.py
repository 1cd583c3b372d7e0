"""The catalogue's contents: the built-in entries, installed plugins, and a user's own modules.

Importing a module that calls `attnlab.register` adds its entries. Three sources:

* the built-ins (attnlab's own mechanisms, analysis methods and tasks);
* installed packages that declare an entry point in the group `attnlab.mechanisms`
  (`[project.entry-points."attnlab.mechanisms"] mine = "my_package.attention"`): each is
  imported the first time the catalogue is read;
* modules a user names on the command line (`--import MODULE`, repeatable): a dotted
  module name on `sys.path` (the current folder included) or the path of a `.py` file.

A plugin or module that fails to import is an error naming it, never skipped. The core's
registry imports nothing above it: this module (imported by the `attnlab` package) hands it
`load` with `core.registry.add_loader`, run before every read of the catalogue.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from .core.errors import ParameterError
from .core.registry import add_loader

ENTRY_POINT_GROUP = "attnlab.mechanisms"

_loaded = False
_modules: dict[str, ModuleType] = {}  # dotted name or absolute .py path -> module, in import order


class PluginError(ImportError):
    """An entry point of the group `attnlab.mechanisms` or an `--import` module failed to import."""


def load_builtins() -> None:
    """Import attnlab's own entries (mechanisms, analysis methods, tasks, initialisations and recipes, inference
    methods, distributed decoding, reproductions)."""
    from . import analysis, mechanisms, recipes, tasks  # noqa: F401  (importing registers the built-in entries)
    from .distributed import decode  # noqa: F401  (P128 tree decoding)
    from .inference import dyvte, loki, matryoshka_kv  # noqa: F401
    from .repro import claims  # noqa: F401  (the claims of `attnlab repro`, kind "repro")


def load() -> None:
    """The built-ins, then the installed plugins: run by the core before every read of the catalogue."""
    load_builtins()
    load_plugins()


def load_plugins() -> None:
    """Import every installed entry point of the group `attnlab.mechanisms` (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:
            raise PluginError(
                f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP}): import failed: "
                f"{type(err).__name__}: {err}"
            ) from err


def import_module(name: str) -> ModuleType:
    """Import a user's module by dotted name or `.py` path, registering its entries; the module.

    A name imported before in this process is not run again (its entries are registered already).
    """
    if not isinstance(name, str) or not name.strip():
        raise ParameterError(f"--import: expected a module name or a .py file, got {name!r}")
    path = Path(name)
    key = str(path.resolve()) if name.endswith(".py") else name  # a file is one module whatever the path's spelling
    if key in _modules:
        return _modules[key]
    try:
        if name.endswith(".py"):
            if not path.is_file():
                raise ParameterError(f"--import: expected an existing .py file, got {name!r} (no such file)")
            mod_name = f"attnlab_user_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # like `python -m`, the current folder is searched first
            module = importlib.import_module(name)
    except ParameterError:
        raise
    except Exception as err:
        raise ParameterError(f"--import: could not import {name!r}: {type(err).__name__}: {err}") from err
    _modules[key] = module
    return module


def import_modules(names: Iterable[str] | None) -> None:
    """`import_module` for each name, in order."""
    for name in names or ():
        import_module(name)


def imported_modules() -> list[str]:
    """The user modules imported in this process, in order (`.py` files as absolute paths), for worker processes."""
    return list(_modules)


def add_import_argument(parser: argparse.ArgumentParser) -> None:
    """The `--import MODULE` option (repeatable) of every command that takes mechanism names."""
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import a module (dotted name or .py file) that registers mechanisms; repeatable",
    )


add_loader(load)
