"""attnlab — the attention laboratory for PyTorch."""
from . import catalogue  # noqa: F401  (hands the core the loader of the built-in entries and plugins)
from .core import (
    DTypeError,
    MaskError,
    MemoryLimitError,
    ParameterError,
    ShapeError,
    UnknownNameError,
    build,
    entries,
    get,
    list_mechanisms,
    memory_limit,
    papers,
    register,
    set_memory_limit,
)

__version__ = "0.1.0"

__all__ = [
    "DTypeError", "MaskError", "MemoryLimitError", "ParameterError", "ShapeError", "UnknownNameError",
    "build", "entries", "get", "list_mechanisms", "papers", "register", "memory_limit", "set_memory_limit", "__version__",
]
