"""Attention mechanisms, one file each, grouped by family. Importing registers every one."""
import importlib
import pkgutil


def _import_all(package_name: str, path: list[str]) -> None:
    for info in pkgutil.walk_packages(path, prefix=package_name + "."):
        importlib.import_module(info.name)


_import_all(__name__, __path__)
