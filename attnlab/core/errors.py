"""Errors of attnlab. Each derives from a built-in so callers may catch either."""
from __future__ import annotations


class ShapeError(ValueError):
    """A tensor has the wrong rank or size."""


class MaskError(ValueError):
    """A mask has the wrong shape or content."""


class DTypeError(TypeError):
    """A tensor has the wrong dtype."""


class ParameterError(ValueError):
    """A mechanism parameter is out of range or of the wrong type."""


class UnknownNameError(KeyError):
    """A name is not in the catalogue; the message lists the close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class UsageError(Exception):
    """A user error a command line reports in one line on stderr, exit status 2."""


class MemoryLimitError(ValueError):
    """A computation's estimated memory is above the limit (`attnlab.set_memory_limit`, ATTNLAB_MEMORY_LIMIT)."""
