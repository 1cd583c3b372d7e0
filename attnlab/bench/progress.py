"""Progress on long runs: a tqdm bar on stderr, silent with quiet=True or without tqdm."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", quiet: bool = False) -> Iterator[T]:
    """Iterate over items, showing a progress bar unless quiet (or tqdm is not installed)."""
    if quiet:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        yield from items
        return
    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def say(message: str, *, quiet: bool = False) -> None:
    """A status line on stderr (results go to stdout)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)
