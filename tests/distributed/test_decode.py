"""Decoding over a sharded KV cache (P128) on real gloo processes: tree and ring equal dense attention on the
whole cache (float64 1e-10, float32 1e-5), uneven shards with an empty one, the counters equal the cost model,
the module form equals `module.step`, and a rank that drops its last cached positions is caught."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import attnlab
from attnlab.core.errors import ParameterError
from attnlab.core.module import KVCache
from attnlab.core.registry import get
from attnlab.distributed import Partition
from attnlab.distributed.cost_model import RankCost, buffer_bytes, ring_decode_cost, tree_decode_cost
from attnlab.distributed.decode import (
    CommCounter,
    decode_partials,
    decode_step,
    merge_partials,
    ring_decode,
    tree_decode,
)
from attnlab.testing_distributed import run_ranks

BATCH, HEADS, HEAD_DIM = 2, 3, 5


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v in float64, written from the formula (no shared helper)."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v.double())


def _cache(total: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    q = torch.randn(BATCH, HEADS, 1, HEAD_DIM, generator=g, dtype=torch.float64) * 2
    k = torch.randn(BATCH, HEADS, total, HEAD_DIM, generator=g, dtype=torch.float64) * 2
    v = torch.randn(BATCH, HEADS, total, HEAD_DIM, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _counted(fn, *args, **kwargs) -> tuple[torch.Tensor, CommCounter]:
    counter = CommCounter()
    return fn(*args, counter=counter, **kwargs), counter


def _decode_checks(rank: int, world: int, sizes: tuple[int, ...], drop_on: int | None) -> dict:
    """On each rank: errors of tree (both reductions) and ring against dense attention, and the counters.
    `drop_on`: that rank drops its last two cached positions (the planted bug)."""
    partition = Partition(sizes)
    result: dict = {}
    for dtype in (torch.float64, torch.float32):
        q, k, v = _cache(partition.total, dtype)
        want = _dense(q, k, v)
        k_r, v_r = partition.local(k, rank, dim=2), partition.local(v, rank, dim=2)
        if rank == drop_on:
            k_r, v_r = k_r[:, :, :-2], v_r[:, :, :-2]
            sizes_given = tuple(s - 2 * (r == drop_on) for r, s in enumerate(sizes))
        else:
            sizes_given = sizes
        tree, tree_count = _counted(tree_decode, q, k_r, v_r)
        backend, backend_count = _counted(tree_decode, q, k_r, v_r, reduce="allreduce")
        ring, ring_count = _counted(ring_decode, q, k_r, v_r, sizes=sizes_given)
        gathered, gather_count = _counted(ring_decode, q, k_r, v_r)
        name = str(dtype).removeprefix("torch.")
        for label, out in (("tree", tree), ("allreduce", backend), ("ring", ring), ("ring_gathered", gathered)):
            assert out.dtype == dtype and out.shape == (BATCH, HEADS, 1, HEAD_DIM)
            result[f"{label}_{name}"] = float((out.double() - want).abs().max())
        if dtype == torch.float64:
            result["counters"] = {"tree": tree_count, "allreduce": backend_count, "ring": ring_count,
                                  "ring_gathered": gather_count}
            # every rank ends with the same bits on the butterfly; the dense output on the empty cache is zeros
            mine = tree.clone()
            dist.broadcast(tree, src=0)
            result["tree_same_bits"] = bool(mine.equal(tree))
            empty = tree_decode(q, k_r[:, :, :0], v_r[:, :, :0])
            result["empty_is_zero"] = bool(empty.eq(0).all())
    return result


def _step_checks(rank: int, world: int, sizes: tuple[int, ...]) -> dict:
    """decode_step over a sharded cache against the module's own step over the whole cache (float64)."""
    torch.manual_seed(3)
    module = attnlab.build("softmax", dim=12, heads=3, causal=True).double()
    partition = Partition(sizes)
    x = torch.randn(BATCH, partition.total, 12, dtype=torch.float64)
    x_t = torch.randn(BATCH, 1, 12, dtype=torch.float64)
    _, k, v = module.project(x)
    want, full = module.step(x_t, KVCache(k, v))
    local = KVCache(partition.local(k, rank, dim=2), partition.local(v, rank, dim=2))
    out = {}
    for strategy in ("tree", "ring"):
        y_t, cache = decode_step(module, x_t, local, strategy=strategy, owner=0)
        out[strategy] = float((y_t - want).abs().max())
        grown = Partition(tuple(s + (r == 0) for r, s in enumerate(sizes)))
        out[f"{strategy}_cache"] = bool(cache.k.equal(grown.local(full.k, rank, dim=2)))
    return out


def _assert_exact(results: list[dict]) -> None:
    for rank, r in enumerate(results):
        for label in ("tree", "allreduce", "ring", "ring_gathered"):
            assert r[f"{label}_float64"] < 1e-10, (rank, label, r)
            assert r[f"{label}_float32"] < 1e-5, (rank, label, r)
        assert r["tree_same_bits"] and r["empty_is_zero"]


def _assert_counters_match_the_model(results: list[dict], sizes: tuple[int, ...]) -> None:
    world = len(sizes)
    tree_model = tree_decode_cost(world, BATCH, HEADS, HEAD_DIM, torch.float64)
    ring_model = ring_decode_cost(sizes, BATCH, HEADS, HEAD_DIM, torch.float64)
    for rank, r in enumerate(results):
        c = r["counters"]
        for label, model in (("tree", tree_model[rank]), ("ring", ring_model[rank]),
                             ("ring_gathered", ring_model[rank])):
            assert RankCost(c[label].rounds, c[label].messages, c[label].bytes_sent) == model, (rank, label)
            assert not c[label].modelled
        assert (c["ring"].setup_rounds, c["ring_gathered"].setup_rounds) == (0, 1)
        assert c["allreduce"].modelled and c["allreduce"].rounds == 2 * 2 * (world - 1)


TWO_RANK_SIZES = (9, 0)


def _peer_checks(rank: int, world: int, sizes: tuple[int, ...]) -> dict | None:
    """ring-attention-pytorch's tree_attn_decode (the peer) on the same shards, beside ours (float64)."""
    try:
        from ring_attention_pytorch import tree_attn_decode
    except ImportError:
        return None
    partition = Partition(sizes)
    q, k, v = _cache(partition.total, torch.float64)
    k_r, v_r = partition.local(k, rank, dim=2), partition.local(v, rank, dim=2)
    peer = tree_attn_decode(q, k_r, v_r, shard_kv_seq=False)
    return {label: float((ours - peer).abs().max())
            for label, ours in (("tree", tree_decode(q, k_r, v_r)), ("ring", ring_decode(q, k_r, v_r, sizes=sizes)))}


def _two_rank_checks(rank: int, world: int) -> dict:
    """Every two-rank check in one spawn (processes are slow to start): exactness and counters on (9, 0),
    the planted bug (rank 1 drops its last two positions of (6, 5)), the module form on (5, 0), the peer."""
    return {"exact": _decode_checks(rank, world, TWO_RANK_SIZES, None),
            "planted": _decode_checks(rank, world, (6, 5), 1),
            "step": _step_checks(rank, world, (5, 0)),
            "peer": _peer_checks(rank, world, (6, 5))}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_two_rank_checks, 2, timeout=600)


def test_two_ranks_one_empty_exact_and_counted(two_ranks):
    results = [r["exact"] for r in two_ranks]
    _assert_exact(results)
    _assert_counters_match_the_model(results, TWO_RANK_SIZES)
    # p = 2: one butterfly step of b·h·(d+2) float64; the ring moves rank 0's 9 positions once (rank 1 sends none)
    assert tree_decode_cost(2, BATCH, HEADS, HEAD_DIM, torch.float64)[0] == RankCost(1, 1, BATCH * HEADS * 7 * 8)
    assert [c.bytes_sent for c in ring_decode_cost(TWO_RANK_SIZES, BATCH, HEADS, HEAD_DIM, torch.float64)] == [
        2 * BATCH * HEADS * 9 * HEAD_DIM * 8, 0]


def test_a_rank_dropping_its_last_positions_fails_the_comparison(two_ranks):
    for r in two_ranks:
        for label in ("tree", "allreduce", "ring", "ring_gathered"):
            assert r["planted"][f"{label}_float64"] > 1e-3, (label, r["planted"])


def test_module_step_over_a_sharded_cache_equals_the_whole_cache(two_ranks):
    for r in two_ranks:
        assert r["step"]["tree"] < 1e-10 and r["step"]["ring"] < 1e-10, r["step"]
        assert r["step"]["tree_cache"] and r["step"]["ring_cache"], r["step"]


def test_tree_and_ring_equal_the_peer_tree_decode(two_ranks):
    pytest.importorskip("ring_attention_pytorch")
    for r in two_ranks:
        assert r["peer"]["tree"] < 1e-12 and r["peer"]["ring"] < 1e-12, r["peer"]


def test_four_ranks_uneven_exact_and_counted():
    sizes = (3, 0, 7, 1)
    results = run_ranks(_decode_checks, 4, args=(sizes, None), timeout=600)
    _assert_exact(results)
    _assert_counters_match_the_model(results, sizes)
    for r in results:  # log2 4 = 2 steps against p − 1 = 3
        assert (r["counters"]["tree"].rounds, r["counters"]["ring"].rounds) == (2, 3)


@pytest.mark.slow
def test_three_ranks_fold_into_the_butterfly():
    sizes = (4, 2, 5)
    results = run_ranks(_decode_checks, 3, args=(sizes, None), timeout=600)
    _assert_exact(results)
    _assert_counters_match_the_model(results, sizes)
    assert [r["counters"]["tree"].rounds for r in results] == [3, 1, 2]


def test_merge_is_associative_and_the_empty_state_is_its_identity():
    q, k, v = _cache(12, torch.float64)
    a, b, c = (decode_partials(q, k[:, :, s], v[:, :, s]) for s in (slice(0, 3), slice(3, 4), slice(4, 12)))
    empty = decode_partials(q, k[:, :, :0], v[:, :, :0])
    left, right = merge_partials(merge_partials(a, b), c), merge_partials(a, merge_partials(b, c))
    assert torch.allclose(left, right, rtol=1e-13, atol=0)
    assert merge_partials(a, empty).equal(a) and merge_partials(empty, a).equal(a)
    whole = left[..., 2:] / left[..., 1:2]
    assert (whole.unsqueeze(2) - _dense(q, k, v)).abs().max() < 1e-12


def test_cost_model_shapes_of_growth_and_refusals():
    # tree bytes do not depend on N, ring bytes grow with it; rounds log2 p vs p − 1 for powers of two
    for world in (2, 8, 64, 1024):
        tree = tree_decode_cost(world, 1, 8, 64, torch.float16)
        ring = ring_decode_cost(Partition.even(world * 16, world).sizes, 1, 8, 64, torch.float16)
        assert {c.rounds for c in tree} == {int(math.log2(world))} and {c.rounds for c in ring} == {world - 1}
        assert {c.bytes_sent for c in tree} == {int(math.log2(world)) * 8 * 66 * 2}
        assert {c.bytes_sent for c in ring} == {(world - 1) * 2 * 8 * 16 * 64 * 2}
    assert buffer_bytes("dense", (4, 4), 1, 1, 2, torch.float32) == (2 * 8 * 4,)
    with pytest.raises(ParameterError, match="strategy: expected 'tree', 'ring' or 'dense'"):
        buffer_bytes("star", (4,), 1, 1, 2, torch.float32)
    with pytest.raises(ParameterError, match="world: expected a positive int, got 0"):
        tree_decode_cost(0, 1, 1, 1, torch.float32)
    with pytest.raises(ParameterError, match="sizes: expected one non-negative int per rank"):
        ring_decode_cost((3, -1), 1, 1, 1, torch.float32)


def test_decode_step_refuses_modules_with_score_terms():
    with pytest.raises(ParameterError, match="module: expected a batch-first 'softmax' module without score terms"):
        decode_step(attnlab.build("alibi", dim=8, heads=2, causal=True), torch.zeros(1, 1, 8), None)


def test_registered_as_an_inference_entry_of_p128():
    spec = get("tree-decode", kind="inference")
    assert spec.paper.id == "P128" and spec.family == "F" and spec.factory is tree_decode
