"""Partition arithmetic, `shard` refusing what cannot be sharded, and the multi-process runner itself."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.distributed import Partition, shard
from attnlab.testing_distributed import run_ranks


def test_even_split_puts_the_remainder_first():
    p = Partition.even(10, 4)
    assert p.sizes == (3, 3, 2, 2) and p.offsets == (0, 3, 6, 8) and p.total == 10 and p.world == 4
    assert p.bounds(2) == (6, 8)
    x = torch.arange(10)[None]
    assert torch.cat([p.local(x, r) for r in range(4)], dim=1).equal(x)
    assert Partition.even(2, 4).sizes == (1, 1, 0, 0)


def test_bad_partitions_are_refused():
    with pytest.raises(ParameterError, match="sizes: expected one non-negative int per rank"):
        Partition((3, -1))
    with pytest.raises(ParameterError, match="x: expected 5 tokens along dim 1, got 4"):
        Partition((2, 3)).local(torch.zeros(1, 4), 0)


def test_shard_refuses_a_module_outside_the_catalogue_and_one_without_a_strategy():
    with pytest.raises(ParameterError, match="module: expected a module built from the attnlab catalogue"):
        shard(torch.nn.Linear(2, 2))
    with pytest.raises(ParameterError, match="xcit: cannot be sharded exactly"):
        shard(attnlab.build("xcit", dim=16, heads=2))


def _gathered_sizes(rank: int, world: int) -> tuple[int, ...]:
    return Partition.gather(rank + 1).sizes


def _fails_on_rank_one(rank: int, world: int) -> int:
    t = torch.ones(1)
    dist.all_reduce(t)
    if rank == 1:
        raise ValueError("planted failure")
    return int(t)


def test_runner_gathers_sizes_and_reports_a_failing_rank():
    assert run_ranks(_gathered_sizes, 3, timeout=600) == [(1, 2, 3)] * 3
    with pytest.raises(RuntimeError, match="(?s)rank 1:.*planted failure"):
        run_ranks(_fails_on_rank_one, 2, timeout=600)
