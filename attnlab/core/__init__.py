"""Core of attnlab: errors, validation, masks, the reference attention, the registry, the base module."""
from .errors import DTypeError, MaskError, ParameterError, ShapeError, UnknownNameError
from .registry import Paper, Param, Spec, Supports, build, entries, get, list_mechanisms, papers, register

__all__ = [
    "DTypeError", "MaskError", "ParameterError", "ShapeError", "UnknownNameError",
    "Paper", "Param", "Spec", "Supports", "build", "entries", "get", "list_mechanisms", "papers", "register",
]
