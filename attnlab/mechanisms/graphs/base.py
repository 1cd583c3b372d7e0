"""The graph base: attention over the neighbours of each node, messages only along edges.

A graph module maps node features x (nodes, dim) and edges edge_index (2, edges) to (nodes, dim). As in
PyTorch Geometric, edge_index[0] holds the source j and edge_index[1] the target i of each edge j → i: node i
aggregates the messages of the j with an edge j → i. A batch of graphs is their disjoint union (stack the node
features, offset the edge indices), so a module call takes one graph and nothing crosses between graphs.

Self-loop policy: a module built with `add_self_loops=True` (the default of the graph modules, as in GAT and
PyG) removes the self-loops of edge_index and adds one i → i per node, so every node attends to itself once;
with `add_self_loops=False` edge_index is taken as given (its self-loops, if any, are edges like the others).
A node with no incoming edge (an isolated node without self-loops) receives no message: its aggregate is zero
(never NaN) and its output is whatever the module adds to a zero aggregate (a bias).

A subclass supplies

* `graph_fast(x, edges)`       -> out (nodes, dim)                                    (the fast path)
* `graph_reference(x, edges)`  -> (out, A (heads, nodes, nodes))                      (the plain path)

where `edges` is the checked edge_index after the self-loop policy. The base checks the inputs (x floating,
finite, in the module's dtype; edge_index int64 (2, edges), indices in [0, nodes), each edge once) and offers
`forward(x, edge_index, impl=)`, `materialize(x, edge_index)` -> A with A[h, i, j] the weight of j's message in
i's output (zero off the edges; a dense matrix, for small graphs) and `bench_inputs` for the speed harness.
The contract every graph module keeps is checked by `attnlab.testing_graphs`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from ...core.errors import DTypeError, ParameterError, ShapeError
from ...core.memory import check_memory
from ...core.validate import check_finite, check_floating, check_module_dtype, check_rank, check_tensor

if TYPE_CHECKING:
    from ...core.registry import Spec

Impl = Literal["fast", "reference"]


def check_nodes(x: object, dim: int) -> Tensor:
    """x (nodes, dim), at least one node, floating and finite."""
    x = check_tensor("x", x)
    check_rank("x", x, 2, "(nodes, dim) (a batch of graphs is their disjoint union)")
    check_floating("x", x)
    if x.shape[1] != dim:
        raise ShapeError(f"x: expected last dimension dim={dim}, got {x.shape[1]} in shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ShapeError(f"x: expected at least one node, got shape {tuple(x.shape)}")
    check_finite("x", x)
    return x


def check_edge_index(edge_index: object, nodes: int, device: torch.device, name: str = "edge_index") -> Tensor:
    """edge_index (2, edges) int64 on `device`, sources in row 0 and targets in row 1, in [0, nodes), no edge twice."""
    edge_index = check_tensor(name, edge_index)
    if edge_index.dtype != torch.int64:
        raise DTypeError(f"{name}: expected dtype torch.int64 (node indices, as in PyG), got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ShapeError(f"{name}: expected shape (2, edges) (sources, targets), got {tuple(edge_index.shape)}")
    if edge_index.device != device:
        raise ValueError(f"{name}: expected device {device} (as x), got {edge_index.device}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= nodes):
        raise ValueError(
            f"{name}: expected node indices in [0, {nodes}) (x has {nodes} nodes), "
            f"got values in [{int(edge_index.min())}, {int(edge_index.max())}]"
        )
    keys = edge_index[0] * nodes + edge_index[1]
    if keys.unique().numel() != keys.numel():
        raise ValueError(f"{name}: expected each edge once, got {keys.numel() - keys.unique().numel()} repeated edges")
    return edge_index


def with_self_loops(edge_index: Tensor, nodes: int) -> Tensor:
    """edge_index without its self-loops, then one loop i → i per node appended."""
    kept = edge_index[:, edge_index[0] != edge_index[1]]
    loops = torch.arange(nodes, device=edge_index.device).expand(2, nodes)
    return torch.cat([kept, loops], 1)


class GraphAttention(nn.Module, ABC):
    """Node features (nodes, dim) and edges (2, edges) -> (nodes, dim); weights (heads, nodes, nodes)."""

    spec: ClassVar[Spec]

    def __init__(self, dim: int, heads: int = 1, *, add_self_loops: bool = True) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ParameterError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.add_self_loops = add_self_loops

    @abstractmethod
    def graph_fast(self, x: Tensor, edges: Tensor) -> Tensor:
        """x (nodes, dim), edges (2, edges) after the self-loop policy -> (nodes, dim)."""

    @abstractmethod
    def graph_reference(self, x: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
        """x, edges -> (out (nodes, dim), A (heads, nodes, nodes), A[h, i, j] the weight of edge j → i)."""

    def prepare(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """The checked node features and the edges after the self-loop policy."""
        x = check_nodes(x, self.dim)
        check_module_dtype("x", x, self)
        edges = check_edge_index(edge_index, x.shape[0], x.device)
        return x, with_self_loops(edges, x.shape[0]) if self.add_self_loops else edges

    def forward(self, x: Tensor, edge_index: Tensor, *, impl: Impl = "fast") -> Tensor:
        """Node features (nodes, dim), edges (2, edges) -> (nodes, dim)."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
        x, edges = self.prepare(x, edge_index)
        if impl == "fast":
            return self.graph_fast(x, edges)
        check_memory("impl='reference'", (self.heads, x.shape[0], x.shape[0]), 8)
        return self.graph_reference(x, edges)[0]

    def materialize(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """The dense weights (heads, nodes, nodes): A[h, i, j] = weight of j's message in i's output, 0 off edges."""
        x, edges = self.prepare(x, edge_index)
        check_memory("materialize", (self.heads, x.shape[0], x.shape[0]), 8)
        return self.graph_reference(x, edges)[1]

    def bench_inputs(
        self, batch: int, n: int, dtype: torch.dtype, generator: torch.Generator
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Inputs of a timed call: `batch` graphs of n nodes as one disjoint union, x normal, each node the target of
        8 edges from random nodes of its graph (self-loops and repeats dropped: average in-degree just under 8)."""
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        x = torch.randn(batch * n, self.dim, generator=generator, dtype=torch.float32).to(device, dtype)
        targets = torch.arange(batch * n).repeat_interleave(8)
        sources = (targets // n) * n + torch.randint(0, n, targets.shape, generator=generator)
        keys = (sources * batch * n + targets).unique()
        keys = keys[keys // (batch * n) != keys % (batch * n)]
        return [x, torch.stack([keys // (batch * n), keys % (batch * n)]).to(device)], {}
