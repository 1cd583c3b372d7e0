"""Sizes of the kernels' work units, capped by the input so that cost follows the input, not the knob."""
from __future__ import annotations


def fit_block(size: int, n: int) -> int:
    """The block (or chunk) a kernel uses for `size` on n tokens: `size`, at most n rounded up to a power of two.

    A block at least n long already holds the whole sequence, so capping it there changes no result,
    only the padding (at 16 tokens a chunk of 4096 would build 4096 × 4096 blocks)."""
    return min(size, 1 << max(n - 1, 0).bit_length())
