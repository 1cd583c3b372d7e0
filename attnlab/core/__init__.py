"""Core of attnlab: errors, validation, masks, the reference attention, the registry, the base module."""
from .errors import DTypeError, MaskError, MemoryLimitError, ParameterError, ShapeError, UnknownNameError
from .memory import memory_limit, set_memory_limit
from .registry import Paper, Param, Spec, Supports, build, entries, get, list_mechanisms, papers, register

__all__ = [
    "DTypeError", "MaskError", "MemoryLimitError", "ParameterError", "ShapeError", "UnknownNameError",
    "memory_limit", "set_memory_limit",
    "Paper", "Param", "Spec", "Supports", "build", "entries", "get", "list_mechanisms", "papers", "register",
]
