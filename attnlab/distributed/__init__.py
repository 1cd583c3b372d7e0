"""Sequence-parallel attention over torch.distributed: the sequence split over the ranks of a process group.

    sharded = attnlab.distributed.shard(attnlab.build("softmax", dim=256, heads=8, causal=True))
    y_local = sharded(x_local)            # x_local: this rank's tokens (batch, n_local, dim)

Every rank holds a contiguous slice of the tokens (`Partition`; uneven sizes allowed, gathered from the
ranks when not given). The output is this rank's slice of what the unsharded module gives on the whole
sequence, exactly (float rounding aside), forward and backward. How depends on the mechanism, declared
in its registry entry (`Supports.sharding`, shown by `attnlab info`):

* "ring" / "tree" — softmax family: K/V blocks passed around the ring with an online-softmax merge, or
  each rank's (max, sum-exp, numerator) combined by all-reduce (Tree Attention, P128);
* "state"         — linear family: each rank's state summed over the ranks before it (a prefix scan),
  then a local correction; bidirectional forms by an all-reduce of the global sums;
* "halo"          — local windows: the boundary keys and values exchanged with the neighbouring ranks.

Decoding one token against a KV cache sharded over the ranks: `attnlab.distributed.decode` (`tree_decode`,
P128's tree reduction in log2 p steps; `ring_decode`, the ring baseline; `decode_step` on a module), with
`attnlab.distributed.cost_model` predicting each rank's steps and bytes (checked equal to the counted ones).

The group is any torch.distributed process group (gloo on CPU, NCCL on GPUs: the code is the same).
A mechanism whose entry declares no strategy is refused by `shard`, naming what can be sharded.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ..core.errors import ParameterError
from ..core.registry import Spec, entries
from .partition import Partition, check_sizes

STRATEGY_MODULES = ("ring", "tree", "state_passing", "halo")
Strategy = Callable[..., Tensor]  # (module, x_local, partition, group, **kwargs) -> this rank's output
STRATEGIES: dict[str, Strategy] = {}

__all__ = ["Partition", "STRATEGIES", "Sharded", "register_strategy", "shard", "shardable"]


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Decorator: `fn(module, x_local, partition, group, **kwargs)` serves the entries declaring `name`."""

    def wrap(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return wrap


def shardable() -> dict[str, tuple[str, ...]]:
    """Entry name -> its strategies, for every entry that declares one."""
    return {s.name: s.supports.sharding for s in entries() if s.supports is not None and s.supports.sharding}


def _spec(module: nn.Module) -> Spec:
    spec = getattr(module, "spec", None)
    if not isinstance(spec, Spec):
        raise ParameterError(f"module: expected a module built from the attnlab catalogue, got {type(module).__name__}")
    return spec


class Sharded(nn.Module):
    """`module` run sequence-parallel over `group` by `strategy` (its parameters are the module's own)."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None, strategy: str | None = None) -> None:
        super().__init__()
        spec = _spec(module)
        declared = spec.supports.sharding if spec.supports is not None else ()
        if not declared:
            names = ", ".join(sorted(shardable())) or "none yet"
            raise ParameterError(f"{spec.name}: cannot be sharded exactly (its entry declares no strategy); "
                                 f"shardable: {names}")
        if strategy is None:
            strategy = declared[0]
        if strategy not in declared:
            raise ParameterError(f"strategy: {spec.name} is sharded by {', '.join(declared)}, got {strategy!r}")
        self._load_strategies()
        if strategy not in STRATEGIES:
            raise ParameterError(f"strategy: {strategy!r} is declared by {spec.name} but not implemented here")
        self.module, self.group, self.strategy = module, group, strategy

    @staticmethod
    def _load_strategies() -> None:
        for name in STRATEGY_MODULES:  # importing registers them
            importlib.import_module(f"{__name__}.{name}")

    def forward(self, x_local: Tensor, *, sizes: tuple[int, ...] | None = None, **kwargs: Any) -> Tensor:
        """This rank's output slice; `sizes`: tokens per rank (default: gathered from the ranks)."""
        world = dist.get_world_size(self.group)
        partition = (check_sizes("sizes", sizes, world) if sizes is not None
                     else Partition.gather(x_local.shape[1], self.group))
        return STRATEGIES[self.strategy](self.module, x_local, partition, self.group, **kwargs)


def shard(module: nn.Module, group: dist.ProcessGroup | None = None, *, strategy: str | None = None) -> Sharded:
    """`module` (an attnlab mechanism) sequence-parallel over `group` (default: the world)."""
    return Sharded(module, group, strategy)
