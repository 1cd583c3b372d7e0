"""Test-wide settings: one torch thread per pytest worker (`make test` runs two workers on two cores;
tiny tensors are many times slower when the workers' threads fight over the cores); and a stand-in for
torchvision when it cannot be imported (its wheel does not import with the CPU torch here), enough for
`import timm` and the timm layers the peer tests compare with (GPSA, SHSA, ParallelScalingBlock)."""
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """A test that changes torch's thread count must restore it: the next test on this worker (and the
    configurations the bench derives from the count) would see it. Restored here, and the test errors."""
    yield
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
        pytest.fail(f"torch.get_num_threads() is {threads} after this test: expected it restored to 1", pytrace=False)


class _StubClass(type):
    """A class standing in for a torchvision one; its attributes are names (e.g. InterpolationMode.BICUBIC)."""

    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StubModule(types.ModuleType):
    """A torchvision module whose every public name is a stub class."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _StubClass(name, (), {"__init__": lambda self, *args, **kwargs: None})
        setattr(self, name, value)
        return value


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds torchvision and every submodule as a `_StubModule`."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        if spec.name == "torchvision":
            module.__version__ = "0.0+stub"  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


try:
    import torchvision  # noqa: F401
except Exception:  # noqa: BLE001 — absent, or a wheel built for another torch: stand in for it
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _TorchvisionStub())
