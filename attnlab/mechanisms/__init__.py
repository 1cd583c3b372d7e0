"""Attention mechanisms, one file each, grouped by family. Importing registers them."""
from . import dense  # noqa: F401
