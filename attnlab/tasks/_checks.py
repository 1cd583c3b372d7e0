"""Argument checks shared by the task generators and models."""
from __future__ import annotations

import numpy as np


def check_count(name: str, value: object, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high] (a Python or NumPy integer, not a bool); ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        want = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return int(value)
