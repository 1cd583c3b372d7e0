"""Neighborhood attention: windows written out by hand (NATTEN's clamping, dilation, causal), a loop
implementation written here, k = N is dense attention, the relative position bias table, the four
implementations (the fast path's two engines, numba loops and PyTorch tiles, forced with `backend=`;
the reference; unfold) forward and backward, threads, decoding, errors, the conformance suite on
2-D and 3-D grids, and NATTEN itself where it is installed."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import pytest
import torch

import attnlab
from attnlab import testing
from attnlab.core.errors import ParameterError, ShapeError
from attnlab.kernels import neighborhood as tiles
from attnlab.mechanisms.local.neighborhood import (
    NeighborhoodAttention,
    neighborhood_attention,
    neighborhood_attention_reference,
    neighborhood_attention_unfold,
)

FAST = {backend: functools.partial(neighborhood_attention, backend=backend) for backend in ("numba", "torch")}
IMPLS = {
    **FAST,
    "reference": lambda *a, **kw: neighborhood_attention_reference(*a, **kw)[0],
    "unfold": neighborhood_attention_unfold,
}


def hand_axis(length: int, k: int, d: int, causal: bool, i: int) -> list[int]:
    """Keys of position i on one axis: its dilation group; causal, the k last up to i; else, of all
    runs of k consecutive group members, the one whose middle member is nearest to i."""
    group = list(range(i % d, length, d))
    c = group.index(i)
    if causal:
        return group[max(0, c - k + 1) : c + 1]
    s = min(range(len(group) - k + 1), key=lambda s: abs(group[s + k // 2] - i))
    return group[s : s + k]


def loops(q, k, v, kernel, dil, causal, rpb=None, kpm=None):
    """Query by query over the grid, in float64."""
    b, h, grid = q.shape[0], q.shape[1], tuple(q.shape[2:-1])
    cells = list(itertools.product(*(range(n) for n in grid)))
    where = {cell: i for i, cell in enumerate(cells)}
    qf, kf, vf = (t.reshape(b, h, len(cells), t.shape[-1]) for t in (q, k, v))
    rows = []
    for i, cell in enumerate(cells):
        axes = [hand_axis(grid[a], kernel[a], dil[a], causal[a], cell[a]) for a in range(len(grid))]
        keys = list(itertools.product(*axes))
        idx = [where[key] for key in keys]
        s = torch.einsum("bhd,bhjd->bhj", qf[:, :, i], kf[:, :, idx]) / math.sqrt(q.shape[-1])
        if rpb is not None:
            s = s + torch.stack(
                [rpb[(slice(None), *(key[a] // dil[a] - cell[a] // dil[a] + kernel[a] - 1 for a in range(len(grid))))]
                 for key in keys], dim=-1)
        if kpm is not None:
            real = kpm[:, idx][:, None, :]
            any_real = real.any(-1, keepdim=True)
            s = torch.where(any_real, s.masked_fill(~real, float("-inf")), torch.zeros_like(s))
            w = torch.softmax(s, dim=-1) * any_real
        else:
            w = torch.softmax(s, dim=-1)
        rows.append(torch.einsum("bhj,bhjd->bhd", w, vf[:, :, idx]))
    return torch.stack(rows, dim=2).reshape(b, h, *grid, v.shape[-1])


def qkv(grid, b=2, h=3, d=4, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, *grid, d), (b, h, *grid, d), (b, h, *grid, dv or d))
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(True) for s in shapes]


def weights_of(impl, grid, **kw):
    """The (N, N) weights an implementation applies, read off by attending to one-hot values (v = I)."""
    n = math.prod(grid)
    q, k, _ = qkv(grid, b=1, h=1)
    eye = torch.eye(n, dtype=torch.float64).reshape(1, 1, *grid, n)
    return IMPLS[impl](q, k, eye, **kw).reshape(n, n).detach()


# -- windows -----------------------------------------------------------------------------------
WINDOWS_1D = [
    # (length, kernel, dilation, causal, keys of every position, written out)
    (7, 3, 1, False, [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5, 6}, {4, 5, 6}]),
    (9, 3, 2, False, [{0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6}, {3, 5, 7}, {4, 6, 8}, {3, 5, 7}, {4, 6, 8}]),
    (6, 3, 1, True, [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}]),
    (8, 3, 2, True, [{0}, {1}, {0, 2}, {1, 3}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6}, {3, 5, 7}]),
]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("length,kernel,dil,causal,expected", WINDOWS_1D)
def test_windows_1d_written_out(impl, length, kernel, dil, causal, expected):
    assert [set(hand_axis(length, kernel, dil, causal, i)) for i in range(length)] == expected
    w = weights_of(impl, (length,), kernel_size=kernel, dilation=dil, causal=causal)
    assert [set(torch.nonzero(row).flatten().tolist()) for row in w] == expected
    torch.testing.assert_close(w.sum(-1), torch.ones(length, dtype=torch.float64))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_windows_2d_written_out(impl):
    rows = [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {1, 2, 3}]  # an axis of 4, kernel 3
    cols = [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {2, 3, 4}]  # an axis of 5, kernel 3
    w = weights_of(impl, (4, 5), kernel_size=3)
    for r, c in itertools.product(range(4), range(5)):
        keys = {5 * rr + cc for rr in rows[r] for cc in cols[c]}
        assert set(torch.nonzero(w[5 * r + c]).flatten().tolist()) == keys, (r, c)


@pytest.mark.parametrize("impl", ["numba", "torch", "unfold"])
@pytest.mark.parametrize("grid,kernel,dil", [((11,), 5, 2), ((6, 7), (3, 5), (2, 1)), ((4, 6, 5), 3, (1, 2, 1))])
def test_every_query_sees_k_to_the_r_keys(impl, grid, kernel, dil):
    w = weights_of(impl, grid, kernel_size=kernel, dilation=dil)
    ks = (kernel,) * len(grid) if isinstance(kernel, int) else kernel
    assert ((w != 0).sum(-1) == math.prod(ks)).all()


# -- values ------------------------------------------------------------------------------------
CONFIGS = [
    # grid, kernel, dilation, causal, rpb, key padding
    ((11,), 3, 1, False, False, False),
    ((37,), 5, 3, False, True, True),  # partial tiles in every group
    ((13,), 4, 2, True, False, True),
    ((5, 6), (3, 5), (1, 1), False, True, False),
    ((7, 9), 3, (2, 1), False, False, True),
    ((6, 7), (3, 2), (1, 2), True, False, False),
    ((3, 4, 5), 3, 1, False, True, True),
    ((4, 3, 6), (3, 3, 2), (1, 1, 3), True, False, False),
]


def _case(grid, kernel, dil, causal, rpb, kpm, seed=0):
    rank = len(grid)
    ks = (kernel,) * rank if isinstance(kernel, int) else kernel
    ds = (dil,) * rank if isinstance(dil, int) else dil
    q, k, v = qkv(grid, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(3, *(2 * x - 1 for x in ks), generator=g, dtype=torch.float64).requires_grad_(True) if rpb else None
    mask = None
    if kpm:
        mask = torch.rand(2, math.prod(grid), generator=g) > 0.3
        mask[1] = False  # every key of element 1 is padding
    kw = dict(kernel_size=kernel, dilation=dil, causal=causal, rpb=table, attention_mask=mask)
    oracle = dict(kernel=ks, dil=ds, causal=(causal,) * rank, rpb=table, kpm=mask)
    return (q, k, v), table, kw, oracle


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-k{c[1]}-d{c[2]}-c{int(c[3])}-rpb{int(c[4])}-kpm{int(c[5])}")
def test_matches_loops_forward_and_backward(config):
    (q, k, v), table, kw, oracle = _case(*config)
    inputs = [q, k, v] + ([table] if table is not None else [])
    want = loops(q, k, v, **oracle)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want_grads = torch.autograd.grad((want * g).sum(), inputs)
    for name, impl in IMPLS.items():
        out = impl(q, k, v, **kw)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8, msg=f"{name} forward")
        for i, (a, b) in enumerate(zip(torch.autograd.grad((out * g).sum(), inputs), want_grads)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=f"{name} backward, input {i}")
    if kw["attention_mask"] is not None:
        for fast in FAST.values():
            assert fast(q, k, v, **kw)[1].abs().max() == 0  # no real key: zeros


@pytest.mark.parametrize("grid", [(9,), (5, 7), (3, 5, 3)])
def test_window_of_the_whole_grid_is_dense_attention(grid):
    q, k, v = qkv(grid, seed=3)
    b, h, n = q.shape[0], q.shape[1], math.prod(grid)
    flat = [t.reshape(b, h, n, -1) for t in (q, k, v)]
    dense = (torch.softmax(flat[0] @ flat[1].transpose(-1, -2) / 2.0, dim=-1) @ flat[2]).reshape(v.shape)
    g = torch.randn(dense.shape, dtype=torch.float64)
    want = torch.autograd.grad((dense * g).sum(), (q, k, v))
    for name, impl in IMPLS.items():
        out = impl(q, k, v, kernel_size=grid)
        torch.testing.assert_close(out, dense, atol=1e-12, rtol=1e-10, msg=name)
        for a, b_ in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), want):
            torch.testing.assert_close(a, b_, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bias_table_indices_as_natten(impl):
    """With q = k = 0 the weights are softmax of the bias: rpb[h, key − query + k − 1] in group
    coordinates, which is NATTEN's get_pb_start + offset (e.g. 2 at the start, 0 at the end of an axis)."""
    table = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    for length, dil, indices in (
        (5, 1, [[2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2]]),
        (7, 2, [[2, 3, 4], [2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2], [0, 1, 2]]),
    ):
        zero = torch.zeros(1, 1, length, 2, dtype=torch.float64)
        eye = torch.eye(length, dtype=torch.float64)[None, None]
        w = IMPLS[impl](zero, zero, eye, kernel_size=3, dilation=dil, rpb=table)[0, 0]
        for i, idx in enumerate(indices):
            keys = hand_axis(length, 3, dil, False, i)
            want = torch.softmax(table[0, idx], dim=0)
            torch.testing.assert_close(w[i, keys], want)


@pytest.mark.parametrize("backend", sorted(FAST))
def test_fast_path_threads_and_chunks(monkeypatch, backend):
    """Two threads give bit-for-bit the one-thread result, equal to the reference. Tiles: many small
    chunks (whole rows per worker with 6 batch·heads, runs of one row's tiles with 1); loops: one
    stripe a row here (test_neighborhood_backends has several)."""
    monkeypatch.setattr(tiles, "CHUNK_BYTES", 4096)
    before = torch.get_num_threads()
    for b, h, rpb in ((2, 3, True), (1, 1, False)):
        q, k, v = qkv((9, 10), b=b, h=h, seed=5)
        table = torch.randn(h, 5, 5, dtype=torch.float64, requires_grad=True) if rpb else None
        inputs = [q, k, v] + ([table] if rpb else [])
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                out = FAST[backend](q, k, v, kernel_size=3, dilation=(2, 1), rpb=table)
                results.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
            finally:
                torch.set_num_threads(before)
        for a, b_ in zip(*results):
            assert torch.equal(a, b_)
        ref = neighborhood_attention_reference(q, k, v, kernel_size=3, dilation=(2, 1), rpb=table)[0]
        torch.testing.assert_close(results[0][0], ref)


@pytest.mark.parametrize("backend", sorted(FAST))
def test_float32_close_to_float64(backend):
    q, k, v = qkv((12, 13), seed=2)
    want = neighborhood_attention_reference(q, k, v, kernel_size=5)[0]
    g = torch.randn(want.shape, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * g).sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    got = FAST[backend](q32, k32, v32, kernel_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for a, b in zip(torch.autograd.grad((got * g.float()).sum(), (q32, k32, v32)), want_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


# -- the module ----------------------------------------------------------------------------------
def test_module_grids_flat_attend_and_bias_gradient():
    m = attnlab.build("neighborhood", dim=12, heads=2, grid_rank=2, kernel_size=(3, 5), rel_pos_bias=True).double()
    x = torch.randn(2, 5, 6, 12, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, m(x, impl="reference"))
    assert m.materialize(x).shape == (2, 2, 30, 30)
    q, k, v = m._heads(x)
    on_grid = m.attend(q, k, v)
    flat = m.attend(*(t.flatten(2, 3) for t in (q, k, v)), grid=(5, 6))
    torch.testing.assert_close(flat, on_grid.flatten(2, 3))
    m(x).sum().backward()
    assert m.rpb is not None and m.rpb.grad is not None and m.rpb.grad.abs().sum() > 0


def test_grid_rank_from_the_input_or_the_kernel():
    m = attnlab.build("neighborhood", dim=8, heads=2, kernel_size=3).double()
    for shape in ((2, 7, 8), (2, 4, 5, 8), (2, 3, 4, 5, 8)):
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(m(x), m(x, impl="reference"))
    m = attnlab.build("neighborhood", dim=8, heads=2, kernel_size=[7, 7])  # as `attnlab bench` builds it
    assert m.grid_rank == 2
    q = torch.randn(1, 2, 100, 4)
    assert m.attend(q, q, q, grid=(10, 10)).shape == (1, 2, 100, 4)
    with pytest.raises(ShapeError, match="q: expected"):
        m.attend(q, q, q)


@pytest.mark.parametrize("kernel,dil", [(3, 2), (4, 1)])
def test_step_matches_causal_forward(kernel, dil):
    m = attnlab.build("neighborhood", dim=8, heads=2, kernel_size=kernel, dilation=dil, causal=True).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    state, outs = None, []
    for t in range(11):
        y, state = m.step(x[:, t : t + 1], state)
        outs.append(y)
        assert state.length <= (kernel - 1) * dil + 1
    torch.testing.assert_close(torch.cat(outs, dim=1), m(x))


# -- errors ------------------------------------------------------------------------------------
def test_errors_name_the_values():
    q, k, v = qkv((5,))
    with pytest.raises(ShapeError, match=r"kernel_size=7 × dilation=1 = 7 exceeds the length 5"):
        neighborhood_attention(q, k, v, kernel_size=7)
    q, k, v = qkv((9,))
    with pytest.raises(ShapeError, match=r"kernel_size=5 × dilation=2 = 10 exceeds the length 9"):
        neighborhood_attention(q, k, v, kernel_size=5, dilation=2)
    with pytest.raises(ParameterError, match=r"kernel_size: expected an odd size .* got 4"):
        neighborhood_attention(q, k, v, kernel_size=4)
    with pytest.raises(ParameterError, match=r"kernel_size: expected an int or 1 of them .* got \(3, 3\)"):
        neighborhood_attention(q, k, v, kernel_size=(3, 3))
    with pytest.raises(ParameterError, match="rpb"):
        neighborhood_attention(q, k, v, kernel_size=3, causal=True, rpb=torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"rpb: expected shape .* \(3, 5\), got \(3, 7\)"):
        neighborhood_attention(q, k, v, kernel_size=3, rpb=torch.zeros(3, 7, dtype=torch.float64))
    with pytest.raises(ParameterError, match=r"expected one grid rank, got kernel_size=\(3, 3, 3\), dilation=1, grid_rank=2"):
        attnlab.build("neighborhood", dim=8, heads=2, grid_rank=2, kernel_size=(3, 3, 3))
    with pytest.raises(ParameterError, match="rel_pos_bias: the bias table needs the grid rank"):
        attnlab.build("neighborhood", dim=8, heads=2, kernel_size=3, rel_pos_bias=True)
    with pytest.raises(ShapeError, match=r"x: expected a 4-D tensor"):  # a kernel per axis of a 2-D grid
        attnlab.build("neighborhood", dim=8, heads=2, kernel_size=(3, 3))(torch.randn(1, 9, 8))
    with pytest.raises(ParameterError, match="rel_pos_bias"):
        attnlab.build("neighborhood", dim=8, heads=2, causal=True, rel_pos_bias=True)
    m = attnlab.build("neighborhood", dim=8, heads=2, grid_rank=2, kernel_size=3)
    flat = torch.randn(1, 2, 20, 4)
    with pytest.raises(ShapeError, match=r"grid: \(4, 4\) holds 16 positions, but q, k, v have 20"):
        m.attend(flat, flat, flat, grid=(4, 4))
    with pytest.raises(ShapeError, match="q: expected"):
        m.attend(flat, flat, flat)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 20, 8))  # a 2-D module given a sequence
    with pytest.raises(ShapeError, match=r"kernel_size=3 × dilation=1 = 3 exceeds the length 2 of axis 0"):
        m(torch.randn(1, 2, 9, 8))


# -- the conformance suite on 2-D and 3-D grids ----------------------------------------------------
class _FlatTokens(NeighborhoodAttention):
    """The suite calls `attend` on flat (batch, heads, N, head_dim) tokens: give it the suite's grid."""

    positions: tuple[int, ...] = ()

    def attend(self, q, k, v, **kw):  # type: ignore[override]
        if q.dim() == 4 and "grid" not in kw:
            kw["grid"] = self.positions
        return super().attend(q, k, v, **kw)


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
@pytest.mark.parametrize("positions,params", [((4, 5), {"kernel_size": (3, 3)}),
                                              ((3, 3, 6), {"kernel_size": 3, "dilation": (1, 1, 2)})])
def test_conformance_on_grids(check, positions, params):
    spec = attnlab.get("neighborhood")

    def factory(**kw):
        m = _FlatTokens(**kw)
        m.positions = positions
        return m

    grid_spec = dataclasses.replace(
        spec,
        factory=factory,
        test_params={**params, "grid_rank": len(positions)},
        test_positions=positions,
        supports=dataclasses.replace(spec.supports, decode=False),  # step decodes 1-D sequences only
    )
    testing.CHECKS[check](grid_spec)


@pytest.mark.parametrize("backend", sorted(FAST))
def test_inference_mode_on_worker_threads(monkeypatch, backend):
    monkeypatch.setattr(tiles, "CHUNK_BYTES", 4096)  # several chunks, so that the workers run them
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = (t.detach() for t in qkv((8, 9), seed=4))
        with torch.inference_mode():
            out = FAST[backend](q, k, v, kernel_size=3)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, neighborhood_attention_reference(q, k, v, kernel_size=3)[0])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("grid,kernel,dil,causal", [
    ((23,), 5, 3, False), ((17,), 4, 2, True), ((11, 13), (5, 3), (2, 3), False), ((9, 10), (4, 3), (2, 1), True),
    ((5, 6, 7), (3, 3, 5), (1, 2, 1), False),
])
def test_matches_natten(grid, kernel, dil, causal):
    """NATTEN itself (its FlexAttention backend, forward only on the CPU), where it is installed."""
    natten = pytest.importorskip("natten")
    rank = len(grid)
    ks = (kernel,) * rank if isinstance(kernel, int) else kernel
    ds = (dil,) * rank if isinstance(dil, int) else dil
    q, k, v = (t.detach().float() for t in qkv(grid, b=2, h=2, d=8, seed=6))
    op = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]
    theirs = op(*(t.movedim(1, -2).contiguous() for t in (q, k, v)), kernel_size=ks, dilation=ds,
                is_causal=(causal,) * rank, backend="flex-fna").movedim(-2, 1)
    for fast in FAST.values():
        ours = fast(q, k, v, kernel_size=ks, dilation=ds, causal=causal)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
