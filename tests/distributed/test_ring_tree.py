"""Ring and tree attention (softmax family) on real gloo processes against the single-process module.

Each case: a module (its state_dict sent to every rank), a random input and output cotangent; every rank runs
the strategy on its slice, backpropagates its slice of the cotangent, sums the parameter gradients over the
ranks (`sum_parameter_grads`) and returns its output, input gradient and parameter gradients. The parent
checks: outputs and input gradients concatenated in rank order, and every rank's parameter gradients, equal
the unsharded module's forward and backward (float64: 1e-10, float32: 1e-5). Several cases share one spawn
(processes cost seconds to start on this machine).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.distributed import Partition
from attnlab.distributed.ring import RingLayout, _span_pairs, balanced_causal_sizes
from attnlab.distributed.softmax_blocks import SoftmaxForm
from attnlab.testing_distributed import run_ranks

DIM, HEADS, BATCH = 16, 4, 2
PARAMS: dict[str, dict[str, Any]] = {
    "softmax": {}, "alibi": {}, "kerple": {"variant": "power"}, "rope": {}, "coca": {},
    "multiscale": {"radii": (1, 3, 0, None)},
}
Case = tuple[str, str, bool, tuple[int, ...], str, dict[str, Any], bool]  # strategy, name, causal, sizes, dtype,
#   over (build arguments), planted (the last rank drops a K/V block)


def _module(name: str, causal: bool, dtype: torch.dtype, over: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnlab.build(name, dim=DIM, heads=HEADS, causal=causal, **{**PARAMS[name], **over}).to(dtype)


def _data(sizes: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = sum(sizes)
    return (torch.randn(BATCH, n, DIM, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(BATCH, n, DIM, generator=gen, dtype=torch.float64).to(dtype))


def _planted_drop(strategy: str, rank: int, world: int) -> None:
    """Planted bug: the last rank drops its last K/V block (ring: rank 0's block, met last; tree: its own)."""
    from attnlab.distributed import ring, tree

    target = ring if strategy == "ring" else tree
    honest = target.block_partials

    def dropping(q, k, v, pos_q, pos_k, form, table, stabilizer=None):  # noqa: ANN001, ANN202
        m, sumexp, num = honest(q, k, v, pos_q, pos_k, form, table, stabilizer)
        if rank == world - 1 and (strategy == "tree" or int(pos_k[0]) == 0):
            return torch.full_like(m, -float("inf")), sumexp * 0, num * 0
        return m, sumexp, num

    target.block_partials = dropping


def _run_cases(rank: int, world: int, cases: list[Case],
               states: list[dict[str, torch.Tensor]]) -> list[tuple[Any, Any, dict[str, Any]]]:
    from attnlab.distributed import STRATEGIES, ring, tree  # importing registers the strategies
    from attnlab.distributed.softmax_blocks import sum_parameter_grads

    honest = ring.block_partials, tree.block_partials
    results = []
    for (strategy, name, causal, sizes, dtype_name, over, planted), state in zip(cases, states):
        dtype = getattr(torch, dtype_name)
        module = _module(name, causal, dtype, over)
        module.load_state_dict(state)
        x, g = _data(sizes, dtype)
        part = Partition(sizes)
        x_local = part.local(x, rank).clone().requires_grad_()
        if planted:
            _planted_drop(strategy, rank, world)
        try:
            name_, _, layout = strategy.partition(":")  # "ring:zigzag": the ring's zig-zag layout
            y = STRATEGIES[name_](module, x_local, part, None, **({"layout": layout} if layout else {}))
            (y * part.local(g, rank)).sum().backward()
        finally:
            ring.block_partials, tree.block_partials = honest
        sum_parameter_grads(module)  # every rank then holds the unsharded module's parameter gradients
        grads = {k: p.grad.numpy() for k, p in module.named_parameters() if p.grad is not None}
        results.append((y.detach().numpy(), x_local.grad.numpy(), grads))  # numpy: tensors would travel by fd
    return results


def _states(cases: list[Case]) -> list[dict[str, torch.Tensor]]:
    return [_module(name, causal, getattr(torch, dt), over).state_dict() for _, name, causal, _, dt, over, _ in cases]


def _errors(world: int, cases: list[Case], per_rank: list[Any] | None = None) -> list[tuple[str, float, float]]:
    """(case, largest error, tolerance) per case; the reference is the unsharded module in this process.
    `per_rank`: the ranks' results of `_run_cases` (default: run them here)."""
    if per_rank is None:
        per_rank = run_ranks(_run_cases, world, (cases, _states(cases)), timeout=600)
    out = []
    for i, (strategy, name, causal, sizes, dtype_name, over, planted) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        module = _module(name, causal, dtype, over)
        x, g = _data(sizes, dtype)
        x = x.clone().requires_grad_()
        y = module(x)
        (y * g).sum().backward()
        y_sharded = torch.cat([torch.from_numpy(r[i][0]) for r in per_rank], dim=1)
        dx_sharded = torch.cat([torch.from_numpy(r[i][1]) for r in per_rank], dim=1)
        err = max(float((y_sharded - y.detach()).abs().max()), float((dx_sharded - x.grad).abs().max()))
        for pname, p in module.named_parameters():
            if p.grad is None:
                continue
            for r in per_rank:
                err = max(err, float((torch.from_numpy(r[i][2][pname]) - p.grad).abs().max()))
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        out.append((f"{strategy}/{name}/causal={causal}/{sizes}/{dtype_name}" + "/planted" * planted, err, tol))
    return out


def _assert_exact(errors: list[tuple[str, float, float]]) -> None:
    bad = [(c, e) for c, e, tol in errors if not e <= tol]
    assert not bad, bad


UNEVEN4 = (5, 3, 7, 1)
CASES4: list[Case] = [
    ("ring", "softmax", True, UNEVEN4, "float64", {}, False),
    ("ring", "alibi", False, UNEVEN4, "float64", {}, False),
    ("ring", "kerple", True, UNEVEN4, "float64", {}, False),
    ("ring", "rope", True, UNEVEN4, "float64", {}, False),
    ("ring", "coca", False, UNEVEN4, "float64", {}, False),
    ("ring", "multiscale", True, UNEVEN4, "float64", {}, False),
    ("tree", "softmax", False, UNEVEN4, "float64", {}, False),
    ("tree", "alibi", True, UNEVEN4, "float64", {}, False),
    ("tree", "kerple", False, UNEVEN4, "float64", {"variant": "log"}, False),
    ("tree", "rope", False, UNEVEN4, "float64", {}, False),
    ("tree", "coca", True, UNEVEN4, "float64", {}, False),
    ("tree", "multiscale", False, UNEVEN4, "float64", {}, False),
    ("ring", "rope", True, (4, 0, 3, 2), "float64", {}, False),  # a rank without tokens
    ("ring:zigzag", "softmax", True, UNEVEN4, "float64", {}, False),
    ("ring:zigzag", "kerple", True, (4, 0, 3, 2), "float64", {}, False),
    ("ring:zigzag", "multiscale", False, (2, 9, 1, 6), "float64", {}, False),
    ("tree", "alibi", False, (4, 0, 3, 2), "float64", {}, False),
]
CASES2: list[Case] = [
    ("ring", "softmax", False, (6, 2), "float64", {}, False),
    ("ring", "kerple", False, (2, 7), "float64", {"variant": "log"}, False),
    ("ring", "coca", True, (6, 2), "float64", {}, False),
    ("ring", "multiscale", False, (3, 4), "float64", {}, False),
    ("tree", "rope", True, (6, 2), "float64", {}, False),
    ("tree", "kerple", True, (2, 7), "float64", {}, False),
    ("ring", "alibi", True, (6, 3), "float32", {}, False),
    ("tree", "rope", True, (6, 3), "float32", {}, False),
    ("ring:zigzag", "alibi", True, (6, 3), "float32", {}, False),
    ("ring:zigzag", "coca", True, (2, 7), "float64", {}, False),
    ("ring", "softmax", True, (4, 3), "float64", {}, True),
    ("tree", "alibi", False, (4, 3), "float64", {}, True),
]


def test_four_ranks_uneven_every_mechanism_ring_and_tree_forward_and_gradients():
    errors = _errors(4, CASES4)
    _assert_exact(errors)
    assert {c.split("/")[1] for c, _, _ in errors} == set(PARAMS)


def test_balanced_causal_sizes_equalise_the_causal_work():
    sizes = balanced_causal_sizes(100, 4)
    assert sizes == (50, 21, 16, 13)
    offsets = Partition(sizes).offsets
    work = [n * (o + n / 2) for n, o in zip(sizes, offsets)]  # keys before and within each rank's queries
    assert max(work) / min(work) < 1.05
    even = Partition.even(100, 4)
    even_work = [n * (o + n / 2) for n, o in zip(even.sizes, even.offsets)]
    assert max(even_work) / min(even_work) > 6
    with pytest.raises(ParameterError, match="world: expected >= 1, got 0"):
        balanced_causal_sizes(10, 0)


PEER_SHAPE = (1, 8, 2, 4)  # (batch, n, heads, head_dim), ring_attention_pytorch's layout, 4 tokens per rank


def _peer_qkv() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(*PEER_SHAPE, generator=gen) for _ in range(3))


def _peer_outputs(rank: int, world: int) -> dict[bool, tuple[Any, Any]]:
    """causal -> (ours, ring_attention_pytorch's) ring attention core on this rank's quarter of q, k, v (float32)."""
    from ring_attention_pytorch.ring_flash_attention import ring_flash_attn

    from attnlab.distributed.ring import RingAttention
    from attnlab.distributed.softmax_blocks import SoftmaxForm

    part = Partition.even(PEER_SHAPE[1], world)
    q, k, v = (part.local(t, rank) for t in _peer_qkv())
    out = {}
    for causal in (False, True):
        form = SoftmaxForm.of(attnlab.build("softmax", dim=8, heads=2, causal=causal), "ring")
        ours = RingAttention.apply(*(t.transpose(1, 2) for t in (q, k, v)), None, form, RingLayout.contiguous(part),
                                   rank, None)
        theirs = ring_flash_attn(q, k, v, causal=causal, bucket_size=2, ring_reduce_col=True)
        out[causal] = (ours.transpose(1, 2).numpy(), theirs.numpy())
    return out


def _two_rank_main(rank: int, world: int, cases: list[Case], states: list[dict[str, torch.Tensor]]) -> Any:
    return _run_cases(rank, world, cases, states), _peer_outputs(rank, world)


def test_zigzag_layout_gives_every_rank_the_same_causal_work():
    layout = RingLayout.zigzag(16, 4)
    assert layout.spans == (((0, 2), (14, 16)), ((2, 4), (12, 14)), ((4, 6), (10, 12)), ((6, 8), (8, 10)))
    assert layout.positions(1, torch.device("cpu")).tolist() == [2, 3, 12, 13]
    form = SoftmaxForm.of(attnlab.build("softmax", dim=DIM, heads=HEADS, causal=True), "ring")
    pairs = [sum(len(_span_pairs(form, layout, r, j)) for j in range(4)) for r in range(4)]
    assert pairs == [9, 9, 9, 9]  # chunk pairs (query chunk, key chunk not after it): 36 of 64 over 4 ranks
    contiguous = RingLayout.contiguous(Partition.even(16, 4))
    assert [sum(len(_span_pairs(form, contiguous, r, j)) for j in range(4)) for r in range(4)] == [1, 2, 3, 4]
    assert RingLayout.zigzag(3, 2).spans == (((0, 1),), ((1, 2), (2, 3)))  # empty chunks dropped


@pytest.fixture(scope="module")
def two_ranks() -> tuple[list[tuple[str, float, float]], list[Any]]:
    """One spawn for the honest cases, the planted ones and the peer: (errors per case, peer outputs per rank)."""
    per_rank = run_ranks(_two_rank_main, 2, (CASES2, _states(CASES2)), timeout=600)
    return _errors(2, CASES2, [r[0] for r in per_rank]), [r[1] for r in per_rank]


def test_two_ranks_causal_and_not_float32(two_ranks):
    _assert_exact([e for e in two_ranks[0] if not e[0].endswith("planted")])


def test_planted_dropped_block_is_caught(two_ranks):
    planted = [e for e in two_ranks[0] if e[0].endswith("planted")]
    assert len(planted) == 2
    for case, err, tol in planted:
        assert err > 1e3 * tol, (case, err)


def test_ring_core_matches_ring_attention_pytorch_forward(two_ranks):
    """Peer: ring-attention-pytorch 0.5.20's ring_flash_attn (ring passes on, float32) on the same shards; both
    equal dense softmax attention."""
    q, k, v = (t.transpose(1, 2) for t in _peer_qkv())
    for causal in (False, True):
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
        ours = torch.cat([torch.from_numpy(r[causal][0]) for r in two_ranks[1]], dim=1)
        theirs = torch.cat([torch.from_numpy(r[causal][1]) for r in two_ranks[1]], dim=1)
        assert (ours - theirs).abs().max() < 1e-5 and (ours - dense).abs().max() < 1e-5, causal


def test_refuses_masks_and_modules_it_cannot_shard():
    from attnlab.distributed.softmax_blocks import SoftmaxForm, sharded_forward

    with pytest.raises(ParameterError, match="the ring strategy shards SoftmaxAttention"):
        SoftmaxForm.of(attnlab.build("xcit", dim=DIM, heads=HEADS), "ring")
    with pytest.raises(ParameterError, match="tree: masks, context and other call arguments are not supported"):
        sharded_forward("tree", _module("softmax", False, torch.float64, {}), torch.zeros(1, 2, DIM),
                        Partition((2,)), None, lambda *a: a[0], attention_mask=torch.ones(1, 2))
