"""The conformance suite of the `graph` kind: checks every registered graph module must pass.

A graph module (`attnlab.mechanisms.graphs.base.GraphAttention`) maps node features x (nodes, dim) and edges
edge_index (2, edges) — row 0 the sources j, row 1 the targets i of the edges j → i — to (nodes, dim);
`materialize(x, edge_index)` gives the dense weights (heads, nodes, nodes). Self-loop policy: a module with
`add_self_loops` True lets node i hear itself (edge_index's own loops replaced by one per node); with it False
only the edges given carry messages. Node i's own features may always shape its output where it receives a message
(they form the query of its attention); a node that receives none (no in-edge, no self-loop) depends on nothing. Each `check_*` takes the entry and raises AssertionError on a failure;
tests/conformance/test_graphs.py runs them over every graph entry (`run_all(attnlab.get("mine", "graph"))`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .core.registry import Spec
from .testing import _close, _raises

DIM, NODES = 16, 10
SETTINGS_DIM = 12  # divisible by 3 and 6 heads
HEADS_SETTINGS = (3, 6)
# a directed graph on 10 nodes: a node with several in-edges (2), a self-loop (3 → 3), a node with only
# out-edges (8), an isolated node (9), and pairs with an edge in one direction only (0 → 1, not 1 → 0)
EDGES = torch.tensor([
    [0, 1, 4, 5, 8, 3, 2, 6, 7, 5, 8, 1, 0, 4],
    [1, 2, 2, 2, 2, 3, 3, 4, 5, 6, 6, 7, 7, 0],
])


def build(spec: Spec, *, seed: int = 0, dtype: torch.dtype = torch.float64, **over: Any) -> Any:
    """The entry at the suite's small size (dim 16 and its test parameters), in `dtype`, eval mode."""
    torch.manual_seed(seed)
    return spec.build(**{"dim": DIM, **spec.test_params, **over}).to(dtype).eval()


def nodes(*, n: int = NODES, dim: int = DIM, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def self_loop_settings(spec: Spec) -> list[dict[str, Any]]:
    """Both self-loop policies where the entry has an `add_self_loops` parameter, else its own."""
    return [{"add_self_loops": v} for v in (True, False)] if any(p.name == "add_self_loops" for p in spec.params) else [{}]


def allowed(module: Any, edges: Tensor, n: int) -> Tensor:
    """bool (n, n): [i, j] True where j's features may reach i's output: an edge j → i, or j = i — under self-loops
    always; without them only when i receives some message (its features then form the query of its attention);
    a node with no incoming edge and no self-loop depends on no node at all."""
    ok = torch.zeros(n, n, dtype=torch.bool)
    ok[edges[1], edges[0]] = True
    receiving = ok.any(1) | torch.tensor(module.add_self_loops)
    return ok | torch.diag(receiving)


def check_shapes(spec: Spec) -> None:
    """Output (nodes, dim) in the input's dtype; materialize (heads, nodes, nodes), rows of the nodes that receive
    a message summing to 1 where the entry normalises."""
    assert spec.supports is not None
    for over in self_loop_settings(spec):
        m = build(spec, **over)
        x = nodes()
        y = m(x, EDGES)
        assert y.shape == (NODES, DIM), f"forward: expected {(NODES, DIM)}, got {tuple(y.shape)}"
        assert y.dtype == x.dtype, f"forward: expected dtype {x.dtype}, got {y.dtype}"
        if not spec.supports.materialize:
            continue
        a = m.materialize(x, EDGES)
        assert a.shape == (m.heads, NODES, NODES), f"materialize: expected {(m.heads, NODES, NODES)}, got {tuple(a.shape)}"
        assert torch.isfinite(a).all(), f"{spec.name}: materialize has NaN/Inf"
        if spec.normalized:
            receiving = allowed(m, EDGES, NODES).any(1)
            rows = a.sum(-1)[:, receiving]
            _close(rows, torch.ones_like(rows), f"{spec.name} ({over}): materialize rows do not sum to 1")


def check_no_message_across_a_non_edge(spec: Spec) -> None:
    """The gradient of node i's output with respect to node j's features is zero unless j → i is an edge or j = i
    (see `allowed`), both paths and both self-loop policies; materialize is zero off the edges (and off the
    self-loops when there are none); an isolated node's output is finite (no NaN) and, without self-loops,
    depends on no node's features, its own included (a zero message)."""
    assert spec.supports is not None
    for over in self_loop_settings(spec):
        m = build(spec, **over)
        x = nodes()
        ok = allowed(m, EDGES, NODES)
        for impl in ("fast", "reference"):
            xg = x.clone().requires_grad_(True)
            y = m(xg, EDGES, impl=impl)
            assert torch.isfinite(y).all(), f"{spec.name} ({impl}, {over}): NaN/Inf output (an isolated node?)"
            for i in range(NODES):
                (g,) = torch.autograd.grad(y[i].sum() + (y[i] ** 2).sum(), xg, retain_graph=True)
                assert torch.isfinite(g).all(), f"{spec.name} ({impl}, {over}): NaN/Inf gradient at node {i}"
                leak = g.abs().sum(-1)[~ok[i]]
                assert leak.max().item() == 0.0, (
                    f"{spec.name} ({impl}, {over}): a message crosses a non-edge: node {i}'s output depends on nodes "
                    f"{(~ok[i]).nonzero().squeeze(1)[leak > 0].tolist()} with no edge to it")
        if spec.supports.materialize:
            edges_only = torch.eye(NODES, dtype=torch.bool) & m.add_self_loops
            edges_only[EDGES[1], EDGES[0]] = True
            a = m.materialize(x, EDGES)
            assert a[:, ~edges_only].abs().max().item() == 0.0, f"{spec.name} ({over}): materialize puts weight off the edges"


def check_relabelling(spec: Spec) -> None:
    """Relabelling the nodes (features and edge indices alike) relabels the output and the weights; the order of
    the edges in edge_index does not matter."""
    assert spec.supports is not None
    m = build(spec)
    x = nodes()
    perm = torch.randperm(NODES, generator=torch.Generator().manual_seed(4))  # new node a is old node perm[a]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(NODES)
    relabelled = inverse[EDGES]
    shuffled = EDGES[:, torch.randperm(EDGES.shape[1], generator=torch.Generator().manual_seed(5))]
    for impl in ("fast", "reference"):
        y = m(x, EDGES, impl=impl)
        _close(m(x[perm], relabelled, impl=impl), y[perm], f"{spec.name} ({impl}): relabelling the nodes does not relabel the output")
        _close(m(x, shuffled, impl=impl), y, f"{spec.name} ({impl}): the order of the edges changes the result")
    if spec.supports.materialize:
        _close(m.materialize(x[perm], relabelled), m.materialize(x, EDGES)[:, perm][:, :, perm],
               f"{spec.name}: materialize does not follow a relabelling of the nodes")


def check_disjoint_union(spec: Spec) -> None:
    """A batch of two graphs as their disjoint union gives each graph's own result (both paths)."""
    m = build(spec)
    x_a, x_b = nodes(), nodes(n=6, seed=2)
    edges_b = torch.tensor([[0, 1, 2, 3, 4, 5, 0], [1, 2, 0, 4, 5, 3, 3]])
    union = torch.cat([EDGES, edges_b + NODES], 1)
    for impl in ("fast", "reference"):
        y = m(torch.cat([x_a, x_b]), union, impl=impl)
        _close(y[:NODES], m(x_a, EDGES, impl=impl), f"{spec.name} ({impl}): graph A of a disjoint union differs from A alone")
        _close(y[NODES:], m(x_b, edges_b, impl=impl), f"{spec.name} ({impl}): graph B of a disjoint union differs from B alone")


def check_fast_matches_reference(spec: Spec) -> None:
    """Fast path == reference in float64, forward and backward (features and parameters), both self-loop policies;
    also at 3 and 6 heads when the entry has a `heads` parameter."""
    cases: list[tuple[str, dict[str, Any], int]] = [(str(over), over, DIM) for over in self_loop_settings(spec)]
    if any(p.name == "heads" for p in spec.params):
        cases += [(f"heads={h}", {"heads": h, "dim": SETTINGS_DIM}, SETTINGS_DIM) for h in HEADS_SETTINGS]
    for label, over, dim in cases:
        m = build(spec, **over)
        x = nodes(dim=dim).requires_grad_(True)
        fast, ref = m(x, EDGES), m(x, EDGES, impl="reference")
        _close(fast, ref, f"{spec.name} ({label}) forward")
        w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3), dtype=fast.dtype)
        inputs = [x] + [p for p in m.parameters() if p.requires_grad]
        gf = torch.autograd.grad((fast * w).sum(), inputs, allow_unused=True)
        gr = torch.autograd.grad((ref * w).sum(), inputs, allow_unused=True)
        for i, (a, b, t) in enumerate(zip(gf, gr, inputs)):
            _close(torch.zeros_like(t) if a is None else a, torch.zeros_like(t) if b is None else b,
                   f"{spec.name} ({label}) backward, input {i}")


def check_bad_inputs(spec: Spec) -> None:
    """Bad inputs raise ValueError/TypeError naming the argument."""
    m = build(spec)
    x = nodes()
    _raises(lambda: m(x[None], EDGES), (ValueError,), "batched (3-D) features", "x: expected a 2-D")
    _raises(lambda: m(nodes(dim=DIM + 1), EDGES), (ValueError,), "wrong model width", "x: expected last dimension dim=")
    _raises(lambda: m(x.to(torch.int64), EDGES), (TypeError,), "integer features", "x: expected a floating-point")
    nan = x.clone()
    nan[2, 3] = float("nan")
    _raises(lambda: m(nan, EDGES), (ValueError,), "NaN features", "x: expected finite")
    _raises(lambda: m(x.float(), EDGES), (TypeError,), "dtype other than the module's", "x: ")
    _raises(lambda: m(x, EDGES.tolist()), (TypeError,), "edges as a list", "edge_index: expected a torch.Tensor")
    _raises(lambda: m(x, EDGES.double()), (TypeError,), "float edge indices", "edge_index: expected dtype torch.int64")
    _raises(lambda: m(x, EDGES.int()), (TypeError,), "int32 edge indices", "edge_index: expected dtype torch.int64")
    _raises(lambda: m(x, EDGES.T), (ValueError,), "edges as (edges, 2)", "edge_index: expected shape (2, edges)")
    _raises(lambda: m(x, EDGES[0]), (ValueError,), "a 1-D edge_index", "edge_index: expected shape (2, edges)")
    too_big = EDGES.clone()
    too_big[0, 0] = NODES
    _raises(lambda: m(x, too_big), (ValueError,), "an index past the last node", "edge_index: expected node indices in [0, 10)")
    _raises(lambda: m(x, -EDGES - 1), (ValueError,), "negative indices", "edge_index: expected node indices in [0, 10)")
    _raises(lambda: m(x, torch.cat([EDGES, EDGES[:, :2]], 1)), (ValueError,), "a repeated edge", "edge_index: expected each edge once")
    _raises(lambda: m(x, EDGES, impl="slow"), (ValueError,), "unknown impl", "impl: expected")


def check_state_dict(spec: Spec) -> None:
    """A state_dict loaded into a fresh module reproduces the result exactly."""
    a, b = build(spec, seed=0), build(spec, seed=1)
    b.load_state_dict(a.state_dict())
    x = nodes()
    _close(a(x, EDGES), b(x, EDGES), f"{spec.name}: state_dict round trip changes the result", atol=0.0, rtol=0.0)


def check_float32(spec: Spec) -> None:
    """A float32 module (fast, reference and materialize) is within 1e-4 of float64."""
    assert spec.supports is not None
    m64, m32 = build(spec), build(spec, dtype=torch.float32)
    x = nodes()
    for impl in ("fast", "reference"):
        _close(m32(x.float(), EDGES, impl=impl).double(), m64(x, EDGES, impl=impl), f"{spec.name}: float32 {impl}",
               atol=1e-4, rtol=1e-3)
    if spec.supports.materialize:
        _close(m32.materialize(x.float(), EDGES).double(), m64.materialize(x, EDGES), f"{spec.name}: float32 materialize",
               atol=1e-4, rtol=1e-3)


def check_bench_inputs(spec: Spec) -> None:
    """`bench_inputs(batch, n, ...)`: batch graphs of n nodes as one disjoint union (no edge between two of them),
    no self-loop or repeated edge, mean in-degree in [7, 8]; the module runs on them."""
    m = build(spec)
    tensors, keywords = m.bench_inputs(3, 64, torch.float64, torch.Generator().manual_seed(0))
    x, edges = tensors
    assert x.shape == (3 * 64, DIM), f"{spec.name}: bench_inputs x: expected {(3 * 64, DIM)}, got {tuple(x.shape)}"
    assert bool((edges[0] // 64 == edges[1] // 64).all()), f"{spec.name}: bench_inputs has an edge between two graphs"
    assert bool((edges[0] != edges[1]).all()), f"{spec.name}: bench_inputs has a self-loop"
    assert 7 <= edges.shape[1] / (3 * 64) <= 8, f"{spec.name}: bench_inputs mean in-degree {edges.shape[1] / 192:.2f}"
    assert m(*tensors, **keywords).shape == x.shape


CHECKS: dict[str, Callable[[Spec], None]] = {
    "shapes": check_shapes,
    "no_message_across_a_non_edge": check_no_message_across_a_non_edge,
    "relabelling": check_relabelling,
    "disjoint_union": check_disjoint_union,
    "fast_matches_reference": check_fast_matches_reference,
    "bad_inputs": check_bad_inputs,
    "state_dict": check_state_dict,
    "float32": check_float32,
    "bench_inputs": check_bench_inputs,
}


def run_all(spec: Spec) -> None:
    """Run every graph check on one entry; the first failure raises AssertionError."""
    for check in CHECKS.values():
        check(spec)
