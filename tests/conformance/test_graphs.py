"""The conformance suite of the graph kind over every registered graph entry, and planted faults it catches."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import attnlab
from attnlab import testing_graphs
from attnlab.core.registry import Paper, Param, Supports, entries, register, remove
from attnlab.mechanisms.graphs.base import GraphAttention

GRAPHS = [s.name for s in entries("graph")]


@pytest.mark.parametrize(("name", "check"), [(n, c) for n in GRAPHS for c in sorted(testing_graphs.CHECKS)])
def test_graph_conformance(name: str, check: str) -> None:
    testing_graphs.CHECKS[check](attnlab.get(name, "graph"))


class _DotGraph(GraphAttention):
    """A correct graph module for the planted faults: one head, softmax over each node's in-edges of q_iᵀk_j/√d,
    written densely (the adjacency as a mask), values v_j."""

    def __init__(self, dim: int, heads: int = 1, *, add_self_loops: bool = True) -> None:
        super().__init__(dim, 1, add_self_loops=add_self_loops)
        self.qkv = nn.Linear(dim, 3 * dim)

    def weights(self, x: Tensor, edges: Tensor) -> Tensor:
        q, k, _ = self.qkv(x).chunk(3, -1)
        adjacency = torch.zeros(x.shape[0], x.shape[0], dtype=torch.bool)
        adjacency[edges[1], edges[0]] = True
        logits = (q @ k.T / self.dim**0.5).masked_fill(~adjacency, float("-inf"))
        return torch.softmax(logits, -1).nan_to_num(0.0)

    def graph_fast(self, x: Tensor, edges: Tensor) -> Tensor:
        return self.graph_reference(x, edges)[0]

    def graph_reference(self, x: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weights(x, edges)
        return w @ self.qkv(x).chunk(3, -1)[2], w[None]


class _RingLeak(_DotGraph):
    """Planted fault: every node also hears node i − 1 (a ring, as a sequence model would), edge or not."""

    def graph_reference(self, x: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
        out, w = super().graph_reference(x, edges)
        return out + 0.1 * x.roll(1, 0), w


class _DenseSoftmaxLeak(_DotGraph):
    """Planted fault: the softmax normaliser runs over every node (the mask applied after it), so a node's weights
    depend on nodes it has no edge from; materialize is still zero off the edges."""

    def weights(self, x: Tensor, edges: Tensor) -> Tensor:
        q, k, _ = self.qkv(x).chunk(3, -1)
        adjacency = torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype)
        adjacency[edges[1], edges[0]] = 1.0
        return torch.softmax(q @ k.T / self.dim**0.5, -1) * adjacency


def _planted(cls: type, name: str, normalized: bool = True) -> attnlab.Spec:
    register(name=name, kind="graph", paper=Paper(None, "planted fault", 2026), family="A", cost="O(N² d)",
             exponent=2.0, supports=Supports(), normalized=normalized,
             params=(Param("add_self_loops", bool, True, "one loop per node"),))(cls)
    return attnlab.get(name, "graph")


def test_graph_suite_passes_a_correct_graph_module() -> None:
    try:
        testing_graphs.run_all(_planted(_DotGraph, "planted-dot-graph"))
    finally:
        remove("planted-dot-graph", "graph")


def test_graph_suite_catches_a_message_along_a_non_edge() -> None:
    spec = _planted(_RingLeak, "planted-ring-leak")
    try:
        testing_graphs.check_fast_matches_reference(spec)  # consistent on both paths ...
        with pytest.raises(AssertionError, match="a message crosses a non-edge"):
            testing_graphs.check_no_message_across_a_non_edge(spec)  # ... caught here
    finally:
        remove("planted-ring-leak", "graph")
    assert "planted-ring-leak" not in [s.name for s in entries("graph")]


def test_graph_suite_catches_a_softmax_normalised_over_non_neighbours() -> None:
    spec = _planted(_DenseSoftmaxLeak, "planted-dense-softmax", normalized=False)
    try:
        with pytest.raises(AssertionError, match="a message crosses a non-edge"):
            testing_graphs.check_no_message_across_a_non_edge(spec)
    finally:
        remove("planted-dense-softmax", "graph")
