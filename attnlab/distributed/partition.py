"""How a sequence is split over the ranks of a process group: contiguous slices, sizes per rank (uneven allowed)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.errors import ParameterError


@dataclass(frozen=True)
class Partition:
    """Rank r holds the tokens [offsets[r], offsets[r] + sizes[r]) of a sequence of `total` tokens."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 0 for s in self.sizes):
            raise ParameterError(f"sizes: expected one non-negative int per rank, got {self.sizes!r}")

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, at = [], 0
        for s in self.sizes:
            out.append(at)
            at += s
        return tuple(out)

    def bounds(self, rank: int) -> tuple[int, int]:
        """(start, stop) of rank `rank`'s tokens."""
        start = self.offsets[rank]
        return start, start + self.sizes[rank]

    def local(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank `rank`'s slice of the full sequence `x` along `dim` (used by tests and examples)."""
        if x.shape[dim] != self.total:
            raise ParameterError(f"x: expected {self.total} tokens along dim {dim}, got {x.shape[dim]}")
        start, stop = self.bounds(rank)
        return x.narrow(dim, start, stop - start)

    @classmethod
    def even(cls, total: int, world: int) -> Partition:
        """`total` tokens over `world` ranks, the first total % world ranks one token more."""
        if world < 1:
            raise ParameterError(f"world: expected >= 1, got {world}")
        base, extra = divmod(total, world)
        return cls(tuple(base + (r < extra) for r in range(world)))

    @classmethod
    def gather(cls, local_size: int, group: dist.ProcessGroup | None = None) -> Partition:
        """The partition whose sizes are every rank's `local_size` (one all_gather of an int)."""
        world = dist.get_world_size(group)
        mine = torch.tensor([local_size], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, mine, group=group)
        return cls(tuple(int(s) for s in sizes))


def check_sizes(name: str, sizes: Sequence[int], world: int) -> Partition:
    """A Partition from user sizes, checked against the group's world size."""
    if len(sizes) != world:
        raise ParameterError(f"{name}: expected {world} sizes (one per rank), got {len(sizes)}")
    return Partition(tuple(int(s) for s in sizes))
