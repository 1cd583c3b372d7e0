"""attnlab — the attention laboratory for PyTorch."""
from .core import (
    DTypeError,
    MaskError,
    ParameterError,
    ShapeError,
    UnknownNameError,
    build,
    entries,
    get,
    list_mechanisms,
    papers,
    register,
)

__version__ = "0.1.0"

__all__ = [
    "DTypeError", "MaskError", "ParameterError", "ShapeError", "UnknownNameError",
    "build", "entries", "get", "list_mechanisms", "papers", "register", "__version__",
]
