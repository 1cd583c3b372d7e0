"""The backward of neighborhood attention as direct loops, compiled with numba (imported only when numba is).

The grids, windows and constants are those of attnlab.kernels._neighborhood_loops (every grid 3-D; per
axis the (L_a, k_a) tables `pos`, −1 where a slot holds no real key, and `rel`, the bias index). With
p_ij = exp(s_ij − lse_i) recomputed from the forward's logsumexp and D_i = dO_i·out_i:

    dS_ij = p_ij (dO_i·v_j − D_i),   dq_i = scale Σ_j dS_ij k_j,   drpb[h, rel_ij] += dS_ij,
    dv_j = Σ_i p_ij dO_i,   dk_j = scale Σ_i dS_ij q_i,

the last two over the queries i whose window holds key j. Two passes, each a parallel loop over units
(one batch·head row, one line of the grid — the positions that differ only on the last axis — and CHUNK
positions of it) with no shared writes:

1. by query: s and dO·v against the query's own keys (`_dots`, four keys per pass over the query), p and
   dS, stored by window slot in (BH, N, k_0·k_1·k_2) buffers (0 on slots without a kept key), dS summed
   into the unit's own row of bias-gradient partials; then dq for BLOCK consecutive queries of the line at
   once: per window row, the union of their keys on the last axis (`blocks` of the windows), each key row
   loaded once into four vector accumulators (the weights 0 where a key is not in a query's window).
   Where the forward took its lanes form (`runs` given), this pass takes it too (`_by_query_lanes`): a
   register's lanes of queries against each key of their union, one vector of s and one of dO·v per key (q
   and dO transposed per unit, k and v rows broadcast into the FMAs: no horizontal sum per key, which
   bounded the per-query form), exp in vectors, and D_i = Σ_j p_ij dO_i·v_j / Σ_j p_ij (equal to dO_i·out_i:
   out is not read); dq four lanes at a time as the forward's outputs;
2. by key: the queries of key j are the product over the axes of its *mirror* (the (query, slot) pairs of
   the axis whose window holds j's coordinate, `mirror`); dv and dk of BLOCK consecutive keys of a line
   at once, as dq, over the union of their mirrors on the last axis, with the stored p and dS as weights.

So no key row is written by two threads (the loops of _neighborhood_loops scatter into dk, dv from each
query, in stripes run in two phases), each sum is taken in one fixed order whatever the thread count, and
the dot products are computed once. Measured by `attnlab bench limits --rows
neighborhood-1d-7-bwd,neighborhood-2d-7-bwd` (fwd+bwd / fwd − 1, one thread pinned, 8 heads of 64,
float32, medians of 5 interleaved rounds, load 1.5): 2-D 64×64 7×7 2.39, N = 65,536 k = 7 2.06, with
dq, dk, dv and the p, dS buffers recycled between calls (attnlab.kernels.buffers); in freshly allocated
memory, even in transparent huge pages, their page faults made the 1-D figure 5.4 in the same hour.
The lanes query pass (session 9; `benchmarks/neighborhood_forms.py --backward`, one thread, load 0.7): N =
65,536 k = 7 122 → 103 ms, k = 65 522 → 252, 2-D 13 × 13 69 → 50, 7 × 7 22.1 → 22.6 (its blocks' unions
of 22 keys against 7 a query cost what the horizontal sums saved); the same rows by `attnlab bench limits`
(load 1.0): bwd/fwd 1-D 2.16 (2.57 with the per-query pass, after af9cb40 made the forward faster), 2-D 2.22.
Its steps (in-process, 1-D k = 7): the forward's prefetches (k's and v's rows AHEAD blocks on, the next
unit's q and dO) 173 → 103 ms, D from p and dO·v instead of dO·out 103 → 93. Tried and dropped: the key
pass's q, dO, p, dS rows prefetched 16–128 rows ahead (42 → 44–53 ms).

Two threads (1-D N = 65,536, k = 7, 8 heads of 64, float32; per-thread on-CPU times from /proc schedstat and
in-process A/B runs, interleaved, on a shared machine): two threads take ~12% more CPU time than one for the same
work (156 → 175 ms over both passes; the key pass +14%): memory, not computation. The key pass moves q, grad, p,
dS in and dk, dv out (~570 MB here) at 20–27 GB/s on two threads, against ~29 GB/s streaming, so the backward's
two-thread speed-up is 1.65–1.8 by wall and by busiest-thread CPU time where the forward's is ~1.9. Rows of dq,
dk, dv that start on 64 bytes (`streamable`: the recycled buffers, d · itemsize a multiple of 64) are written by
non-temporal stores, which skip reading each line before overwriting it: ~7% less CPU time for the two passes on
one thread (load ~4.7), 2-D 64 × 64 7 × 7 24.7 → 23.7 ms (query pass) and 9.3 → 8.6 ms (key pass). Tried and
dropped: units taken from a shared counter (an atomic add, 8 at a time) instead of prange's even split — with
one core half taken by a pinned spinner two threads went 155 → 138 ms, but on free cores it cost 1–8% (2-D one
thread 31.7 → 34.0 ms, two 16.7 → 18.1). What would cut the bytes, on 1-D grids: the key pass fused into the
query pass unit by unit (a unit's keys need the p, dS of its own queries and of k − 1 neighbours, recomputed), so
q and grad are read once and p, dS never leave the cache.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._neighborhood_loops import (
    AHEAD,
    FAST,
    NEG_INF,
    ONE,
    SCALE,
    ZERO,
    _dots,
    _exp,
    _keys8,
    _keys8_half,
    _line_rows,
    _pad,
    _prefetch_rows,
    _transpose_rows,
    _weighted4,
    vadd,
    vexp,
    vfma,
    vinv,
    vload,
    vmuladd,
    vsplat,
    vstore,
    vzero,
    width_of,
)
from .buffers import recycled_array

# Queries (pass 1) or keys (pass 2) per unit of work; a constant, so that the bias gradient's partial
# sums, and so the result, do not depend on the thread count.
CHUNK = 256
# Consecutive positions of the last axis whose gradient rows are summed together (four vector accumulators).
BLOCK = 4


@njit(cache=True, nogil=True)
def mirror(pos):  # type: ignore[no-untyped-def]
    """The windows of one axis seen from the keys: pos (L, k) (−1: no real key) → count (L,), query (L, M),
    slot (L, M): key position a is slot slot[a, u] of the window of query position query[a, u], u < count[a],
    queries in increasing order (query −1 for u >= count[a])."""
    length, kernel = pos.shape
    count = np.zeros(length, np.int64)
    for c in range(length):
        for t in range(kernel):
            if pos[c, t] >= 0:
                count[pos[c, t]] += 1
    most = max(1, count.max()) if length > 0 else 1
    query = np.full((length, most), -1, np.int64)
    slot = np.zeros((length, most), np.int64)
    count[:] = 0
    for c in range(length):
        for t in range(kernel):
            a = pos[c, t]
            if a >= 0:
                query[a, count[a]] = c
                slot[a, count[a]] = t
                count[a] += 1
    return count, query, slot


@njit(cache=True, nogil=True)
def blocks(pos, slot):  # type: ignore[no-untyped-def]
    """Blocks of BLOCK consecutive positions of the last axis (the last block may be short) through the table
    pos (L, M) (−1: no entry) with slots slot (L, M): count (blocks,), member (blocks, BLOCK·M), the union of
    the block's entries in increasing order, and which (blocks, BLOCK·M, BLOCK): the slot through which
    position r of the block has member u, −1 where it has not."""
    length, width = pos.shape
    nb = (length + BLOCK - 1) // BLOCK
    count = np.zeros(nb, np.int64)
    member = np.zeros((nb, BLOCK * width), np.int64)
    which = np.full((nb, BLOCK * width, BLOCK), -1, np.int64)
    for b in range(nb):
        union = member[b]  # the entries in increasing order, each once (insertion)
        m = 0
        for z in range(b * BLOCK, min(b * BLOCK + BLOCK, length)):
            for t in range(width):
                a = pos[z, t]
                if a < 0:
                    continue
                u = m
                while u > 0 and union[u - 1] > a:
                    u -= 1
                if u > 0 and union[u - 1] == a:
                    continue
                for w in range(m, u, -1):
                    union[w] = union[w - 1]
                union[u] = a
                m += 1
        count[b] = m
        for z in range(b * BLOCK, min(b * BLOCK + BLOCK, length)):
            for t in range(width):
                a = pos[z, t]
                if a >= 0:
                    u = 0
                    while union[u] != a:
                        u += 1
                    which[b, u, z - b * BLOCK] = slot[z, t]
    return count, member, which


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _window_slots(i, pos0, pos1, pos2, rel0, rel1, rel2, keep_row, use_keep, keys, rel, slots):  # type: ignore[no-untyped-def]
    """_neighborhood_loops._window (query i's real keys and bias indices; their count) that also writes each
    key's window slot (t_0 k_1 + t_1) k_2 + t_2."""
    l1, l2 = pos1.shape[0], pos2.shape[0]
    k0, k1, k2 = pos0.shape[1], pos1.shape[1], pos2.shape[1]
    r1, r2 = 2 * k1 - 1, 2 * k2 - 1
    x, y, z = i // (l1 * l2), (i // l2) % l1, i % l2
    count = 0
    for t0 in range(k0):
        a0 = pos0[x, t0]
        if a0 < 0:
            continue
        for t1 in range(k1):
            a1 = pos1[y, t1]
            if a1 < 0:
                continue
            base = (a0 * l1 + a1) * l2
            for t2 in range(k2):
                a2 = pos2[z, t2]
                if a2 < 0:
                    continue
                j = base + a2
                if use_keep and not keep_row[j]:
                    continue
                keys[count] = j
                rel[count] = (rel0[x, t0] * r1 + rel1[y, t1]) * r2 + rel2[z, t2]
                slots[count] = (t0 * k1 + t1) * k2 + t2
                count += 1
    return count


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _weight(row, tb, slot, c):  # type: ignore[no-untyped-def]
    """row[tb + slot], 0 where slot < 0."""
    return row[tb + max(slot, 0)] if slot >= 0 else c[ZERO]


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _block_sum(wv, rows, weights, first, live, base, tb, count, member, which, c, acc0, acc1, acc2, acc3):  # type: ignore[no-untyped-def]
    """acc_r += Σ_u weights[first + r, tb + which[u, r]] · rows[base + member[u]] for u < count, r < BLOCK (r <
    live: the block's real positions), four vector accumulators (each row loaded once for the block)."""
    w0, w1, w2, w3 = weights[first], weights[first + min(1, live - 1)], weights[first + min(2, live - 1)], \
        weights[first + min(3, live - 1)]
    for u in range(count):
        x = vload(wv, rows, base + member[u], 0)
        acc0 = vfma(acc0, _weight(w0, tb, which[u, 0], c), x)
        acc1 = vfma(acc1, _weight(w1, tb, which[u, 1], c), x)
        acc2 = vfma(acc2, _weight(w2, tb, which[u, 2], c), x)
        acc3 = vfma(acc3, _weight(w3, tb, which[u, 3], c), x)
    return acc0, acc1, acc2, acc3


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _key_sum(wv, rows, weights, base, tb, count, member, which, c, acc0, acc1, acc2, acc3):  # type: ignore[no-untyped-def]
    """acc_r += Σ_u weights[i_u, tb + which[u, r]] · rows[i_u] for u < count, i_u = base + member[u], r < BLOCK:
    the block of keys' sums over the queries of one line (each row loaded once for the block)."""
    for u in range(count):
        i = base + member[u]
        wi = weights[i]
        x = vload(wv, rows, i, 0)
        acc0 = vfma(acc0, _weight(wi, tb, which[u, 0], c), x)
        acc1 = vfma(acc1, _weight(wi, tb, which[u, 1], c), x)
        acc2 = vfma(acc2, _weight(wi, tb, which[u, 2], c), x)
        acc3 = vfma(acc3, _weight(wi, tb, which[u, 3], c), x)
    return acc0, acc1, acc2, acc3


@intrinsic
def _stream_row(typingctx, ary, i, vec):  # type: ignore[no-untyped-def]
    """ary[i, : vec's width] = vec by non-temporal stores (the line written without being read first, and not kept
    in cache); the caller has checked that the row starts on 64 bytes (`streamable`) and ends with `_fence`."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        array = context.make_array(aryty)(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        item = cgutils.get_item_pointer(context, builder, aryty, array, [index, context.get_constant(types.intp, 0)],
                                        wraparound=False)
        ptr = builder.bitcast(item, context.get_value_type(signature.args[2]).as_pointer())
        store = builder.store(args[2], ptr, align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.none(ary, i, vec), codegen


@intrinsic
def _fence(typingctx):  # type: ignore[no-untyped-def]
    """A sequentially consistent fence (mfence on x86): the non-temporal stores before it are done before
    anything after it (a unit's last act, so the other threads and the caller see its rows)."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


def streamable(*arrays: np.ndarray) -> bool:
    """Whether every row (last axis) of the C-contiguous arrays starts on 64 bytes, so that `_stream_row` may
    write them."""
    return all(a.ctypes.data % 64 == 0 and a.strides[-2] % 64 == 0 for a in arrays)


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _put(dst, i, vec, stream):  # type: ignore[no-untyped-def]
    if stream:
        _stream_row(dst, i, vec)
    else:
        vstore(dst, i, 0, vec)


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _store(wv, dst, first, live, scale, acc0, acc1, acc2, acc3, stream):  # type: ignore[no-untyped-def]
    """dst[first + r] = scale · acc_r for r < live (by non-temporal stores if `stream`)."""
    zero = vzero(wv, scale)
    _put(dst, first, vfma(zero, scale, acc0), stream)
    if live > 1:
        _put(dst, first + 1, vfma(zero, scale, acc1), stream)
    if live > 2:
        _put(dst, first + 2, vfma(zero, scale, acc2), stream)
    if live > 3:
        _put(dst, first + 3, vfma(zero, scale, acc3), stream)


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def _by_query(heads, q, k, v, out, grad, lse, pos0, pos1, pos2, rel0, rel1, rel2, bcount, bmember, bwhich, keep,  # type: ignore[no-untyped-def]
              rpb, c, dq, probs, dscores, drpb, wd, stream):
    """Pass 1: p, dS by window slot into probs, dscores (BH, N, W) (0 on the other slots), dq (BLOCK queries of
    a line at a time, the union of their keys on the last axis from bcount, bmember, bwhich: blocks of pos2);
    drpb (units, R): each unit's sum of dS by bias index. Units: (row, line, CHUNK positions of the line).
    `stream`: dq's rows written by `_stream_row`."""
    rows = q.shape[0]
    e = v.shape[2]
    l0, l1, l2 = pos0.shape[0], pos1.shape[0], pos2.shape[0]
    k0, k1, k2 = pos0.shape[1], pos1.shape[1], pos2.shape[1]
    window = k0 * k1 * k2
    lines = l0 * l1
    chunks = (l2 + CHUNK - 1) // CHUNK
    use_keep, use_rpb = keep.shape[1] > 0, rpb.shape[1] > 0
    for unit in prange(rows * lines * chunks):
        row = unit // (lines * chunks)
        line = (unit // chunks) % lines
        x, y = line // l1, line % l1
        b, h = row // heads, row % heads
        keep_row = keep[b if use_keep else 0]
        qr, kr, vr, orow, gr, dqr = q[row], k[row], v[row], out[row], grad[row], dq[row]
        pr, sr, dr = probs[row], dscores[row], drpb[unit]
        keys = np.empty(window + 3, np.int64)
        rel = np.empty(window + 3, np.int64)
        slots = np.empty(window + 3, np.int64)
        s = np.empty(window + 3, q.dtype)
        # the line's window rows (outer axes): first raster index and window row, for dq's sums
        bases = np.empty(k0 * k1, np.int64)
        rows_of = np.empty(k0 * k1, np.int64)
        g = _line_rows(x, y, pos0, pos1, rel0, rel1, l2, 2 * k1 - 1, 2 * k2 - 1, bases, np.empty(k0 * k1, np.int64),
                       rows_of)
        dp = np.empty(window + 3, q.dtype)
        start = (unit % chunks) * CHUNK
        for blk in range(start // BLOCK, (min(start + CHUNK, l2) + BLOCK - 1) // BLOCK):
            first = line * l2 + blk * BLOCK
            live = min(BLOCK, l2 - blk * BLOCK)
            for i in range(first, first + live):
                pi, si = pr[i], sr[i]
                m = lse[row, i]
                if m == -np.inf:  # no real key: out_i = 0, and no gradient
                    pi[:] = 0.0
                    si[:] = 0.0
                    continue
                qi, gi = qr[i], gr[i]
                count = _window_slots(i, pos0, pos1, pos2, rel0, rel1, rel2, keep_row, use_keep, keys, rel, slots)
                if count < window:  # the slots without a (kept) key read as 0
                    pi[:] = 0.0
                    si[:] = 0.0
                delta = c[ZERO]
                for f in range(e):
                    delta += gi[f] * orow[i, f]
                padded = _pad(keys, count)
                _dots(qi, kr, keys, padded, c, s)
                _dots(gi, vr, keys, padded, c, dp)
                for u in range(count):
                    sc = s[u] * c[SCALE] - m
                    if use_rpb:
                        sc += rpb[h, rel[u]]
                    s[u] = sc
                for u in range(count):
                    p = _exp(s[u], c)
                    s[u] = p
                    dp[u] = p * (dp[u] - delta)
                for u in range(count):
                    pi[slots[u]] = s[u]
                    si[slots[u]] = dp[u]
                if use_rpb:
                    for u in range(count):
                        dr[rel[u]] += dp[u]
            a0 = a1 = a2 = a3 = vzero(wd, c[ZERO])
            for u in range(g):
                a0, a1, a2, a3 = _block_sum(wd, kr, sr, first, live, bases[u], rows_of[u] * k2, bcount[blk], bmember[blk],
                                            bwhich[blk], c, a0, a1, a2, a3)
            _store(wd, dqr, first, live, c[SCALE], a0, a1, a2, a3, stream)
        if stream:
            _fence()


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def _by_query_lanes(heads, q, k, v, grad, lse, pos0, pos1, rel0, rel1, runs, k2, union, keep, rpb, c, dq, probs,  # type: ignore[no-untyped-def]
                    dscores, drpb, wl, wh, wd, stream):
    """Pass 1 as _by_query, in the lanes forward's form (_neighborhood_loops.forward_lanes: runs (L_2, 3), each last-axis
    position's first key, last key and the bias index of the first; L_2 >= the lanes of wl; `union` the scores' rows per
    window row): a block is a register's lanes of consecutive queries of a line, against the union of their keys on the
    last axis, one vector per key of s = scale q·k (+ bias; −inf outside each lane's window or on a masked key) and of
    dO·v (`_keys8`, q and dO transposed per unit, k and v rows broadcast: no horizontal sum per key); then, down the keys
    in vectors, p = exp(s − lse) (vexp) and dS = p (dO·v − D); p and dS copied by window slot into probs, dscores, dS
    summed by bias index into the unit's drpb row, and dq four lanes at a time over the union of their keys
    (_weighted4 with k's rows). The last block of a line is moved back to end at the line's end, as the forward's; its
    lanes before the block's own first query (`skip`: queries of the block before) write nothing, so that each query's
    p, dS, dq and bias terms come from one unit."""
    rows, d, ev = q.shape[0], q.shape[2], grad.shape[2]
    l0, l1, l2 = pos0.shape[0], pos1.shape[0], runs.shape[0]
    k0, k1 = pos0.shape[1], pos1.shape[1]
    r1, r2 = 2 * k1 - 1, 2 * k2 - 1
    window_size = k0 * k1 * k2
    lanes, half = width_of(wl), width_of(wh)
    lines = l0 * l1
    chunks = (l2 + CHUNK - 1) // CHUNK
    use_keep, use_rpb = keep.shape[1] > 0, rpb.shape[1] > 0
    for unit in prange(rows * lines * chunks):
        row = unit // (lines * chunks)
        line = (unit // chunks) % lines
        x, y = line // l1, line % l1
        b, h = row // heads, row % heads
        keep_row = keep[b if use_keep else 0]
        qr, kr, vr, gr, dqr = q[row], k[row], v[row], grad[row], dq[row]
        pr, sr, dr = probs[row], dscores[row], drpb[unit]
        start = (unit % chunks) * CHUNK
        stop = min(start + CHUNK, l2)
        bases = np.empty(k0 * k1, np.int64)
        rels = np.empty(k0 * k1, np.int64)
        slots = np.empty(k0 * k1, np.int64)
        g = _line_rows(x, y, pos0, pos1, rel0, rel1, l2, r1, r2, bases, rels, slots)
        line_start = line * l2
        zq = max(0, min(start, l2 - lanes))
        qt = np.empty((d, stop - zq), q.dtype)
        gt = np.empty((ev, stop - zq), q.dtype)
        _transpose_rows(qr, line_start + zq, stop - zq, qt, 0)
        _transpose_rows(gr, line_start + zq, stop - zq, gt, 0)
        s = np.empty((max(g, 1) * union, lanes), q.dtype)  # the scores, then p, by window row and key
        t = np.empty((max(g, 1) * union, lanes), q.dtype)  # dO·v, then dS
        window = np.empty((2, lanes), q.dtype)  # each lane's first and last key in the union
        # the next unit's row of q and grad, its first and last queries + 1 (as zq and stop are this unit's)
        nrow, nline = (unit + 1) // (lines * chunks), ((unit + 1) // chunks) % lines
        nstart = (unit + 1) % chunks * CHUNK
        nfirst, nlast = nline * l2 + max(0, min(nstart, l2 - lanes)), nline * l2 + min(nstart + CHUNK, l2)
        for z_next in range(start, stop, lanes):
            z0 = min(z_next, l2 - lanes)
            skip = z_next - z0
            qb = line_start + z0
            first, last = runs[z0, 0], runs[z0, 1]
            for lane in range(lanes):
                first, last = min(first, runs[z0 + lane, 0]), max(last, runs[z0 + lane, 1])
            width = last - first + 1
            # as the forward: the new rows of k and v AHEAD blocks on; a block's share of the
            # next unit's q and grad rows (read at once by its transpositions)
            if g > 0:
                ahead = min(bases[g - 1] + last + 1 + (AHEAD - 1) * lanes, bases[g - 1] + l2 - 1)
                _prefetch_rows(kr, ahead, min(ahead + lanes, bases[g - 1] + l2))
                _prefetch_rows(vr, ahead, min(ahead + lanes, bases[g - 1] + l2))
            if unit + 1 < rows * lines * chunks:
                _prefetch_rows(q[nrow], nfirst + z_next - start, min(nfirst + z_next - start + lanes, nlast))
                _prefetch_rows(grad[nrow], nfirst + z_next - start, min(nfirst + z_next - start + lanes, nlast))
            for lane in range(lanes):
                window[0, lane], window[1, lane] = runs[z0 + lane, 0] - first, runs[z0 + lane, 1] - first
            lo, hi = vload(wl, window, 0, 0), vload(wl, window, 1, 0)
            for u in range(g):
                at = c[ZERO]
                for j in range(0, width, 8):  # keys past the union (up to 7) take the line's last key: masked
                    key, limit, at_row = bases[u] + first + j, bases[u] + l2 - 1, u * union + j
                    if window[0, half] > j + 7:  # only the first half of the lanes has any of the eight keys
                        _keys8_half(wl, wh, qt, z0 - zq, 0, kr, key, limit, c[SCALE], s, at_row, at, window, c[NEG_INF], lo)
                        _keys8_half(wl, wh, gt, z0 - zq, 0, vr, key, limit, c[ONE], t, at_row, at, window, c[ZERO], lo)
                    elif window[1, half - 1] < j:  # only the second half
                        _keys8_half(wl, wh, qt, z0 - zq, half, kr, key, limit, c[SCALE], s, at_row, at, window, c[NEG_INF],
                                    lo)
                        _keys8_half(wl, wh, gt, z0 - zq, half, vr, key, limit, c[ONE], t, at_row, at, window, c[ZERO], lo)
                    else:
                        _keys8(wl, qt, z0 - zq, kr, key, limit, c[SCALE], s, at_row, 0, at, lo, hi, c[NEG_INF], lo)
                        _keys8(wl, gt, z0 - zq, vr, key, limit, c[ONE], t, at_row, 0, at, lo, hi, c[ZERO], lo)
                    at += 8 * c[ONE]
            if use_rpb or use_keep:  # the bias on each lane's window; a masked key's row −inf
                for u in range(g):
                    if use_rpb:
                        for lane in range(lanes):
                            rb = rels[u] + runs[z0 + lane, 2] - (runs[z0 + lane, 0] - first)
                            for j in range(runs[z0 + lane, 0] - first, runs[z0 + lane, 1] - first + 1):
                                s[u * union + j, lane] += rpb[h, rb + j]
                    if use_keep:
                        for j in range(width):
                            if not keep_row[bases[u] + first + j]:
                                s[u * union + j, :] = c[NEG_INF]
            # p = exp(s − lse) (0 where s is −inf) and D = Σ_j p_ij dO_i·v_j / Σ_j p_ij (= dO_i·out_i, without reading
            # out; divided by Σ_j p_ij, 1 but for the rounding of s and lse, whose error would otherwise reach dS as
            # that of D, not of dO·v − D, which is small where one key takes nearly all the weight), then
            # dS = p (dO·v − D), in vectors down the keys
            m = vload(wl, lse, row, qb)
            zero = vzero(wl, c[ZERO])
            delta = total = zero
            for u in range(g):
                for j in range(width):
                    p = vexp(vload(wl, s, u * union + j, 0), m)
                    vstore(s, u * union + j, 0, p)
                    delta = vmuladd(delta, p, vload(wl, t, u * union + j, 0))
                    total = vadd(total, p)
            md = vmuladd(zero, vmuladd(zero, delta, vinv(total)), vsplat(wl, -c[ONE]))  # −D (0 without a real key)
            for u in range(g):
                for j in range(width):
                    at_row = u * union + j
                    vstore(t, at_row, 0, vmuladd(zero, vload(wl, s, at_row, 0), vadd(vload(wl, t, at_row, 0), md)))
            # p and dS by window slot (0 on slots without a real key), dS by bias index
            for lane in range(skip, lanes):
                i, lo_j, hi_j = qb + lane, runs[z0 + lane, 0] - first, runs[z0 + lane, 1] - first
                offset = k2 - (hi_j - lo_j + 1) - lo_j  # slot of union key j: the real slots come last
                if g * (hi_j - lo_j + 1) < window_size:
                    pr[i, :] = 0.0
                    sr[i, :] = 0.0
                for u in range(g):
                    tb = slots[u] * k2 + offset
                    for j in range(lo_j, hi_j + 1):
                        pr[i, tb + j] = s[u * union + j, lane]
                        sr[i, tb + j] = t[u * union + j, lane]
                if use_rpb:
                    for u in range(g):
                        rb = rels[u] + runs[z0 + lane, 2] - lo_j
                        for j in range(lo_j, hi_j + 1):
                            dr[rb + j] += t[u * union + j, lane]
            # dq = scale Σ_j dS_ij k_j, four lanes at a time over the union of their windows
            zd = vzero(wd, c[ZERO])
            for lane in range(0, lanes, 4):
                if lane + 4 <= skip:
                    continue
                j0 = int(min(min(window[0, lane], window[0, lane + 1]), min(window[0, lane + 2], window[0, lane + 3])))
                j1 = int(max(max(window[1, lane], window[1, lane + 1]), max(window[1, lane + 2], window[1, lane + 3])))
                a0 = a1 = a2 = a3 = zd
                for u in range(g):
                    a0, a1, a2, a3 = _weighted4(wd, kr, bases[u] + first, t, u * union, lane, j0, j1, a0, a1, a2, a3)
                if lane >= skip:
                    _put(dqr, qb + lane, vfma(zd, c[SCALE], a0), stream)
                if lane + 1 >= skip:
                    _put(dqr, qb + lane + 1, vfma(zd, c[SCALE], a1), stream)
                if lane + 2 >= skip:
                    _put(dqr, qb + lane + 2, vfma(zd, c[SCALE], a2), stream)
                _put(dqr, qb + lane + 3, vfma(zd, c[SCALE], a3), stream)
        if stream:
            _fence()


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def _by_key(q, grad, count0, query0, slot0, count1, query1, slot1, bcount, bmember, bwhich, kernel1, kernel2, c,  # type: ignore[no-untyped-def]
            probs, dscores, dk, dv, wd, we, stream):
    """Pass 2: dk, dv, BLOCK keys of a line at a time, from the stored p, dS of their queries: the product of
    the mirrors of the outer axes (count, query, slot) and of the union of the block's mirrors on the last
    axis (bcount, bmember, bwhich). `stream`: dk's and dv's rows written by `_stream_row`."""
    rows = q.shape[0]
    l0, l1, l2 = count0.shape[0], count1.shape[0], q.shape[1] // (count0.shape[0] * count1.shape[0])
    lines = l0 * l1
    chunks = (l2 + CHUNK - 1) // CHUNK
    for unit in prange(rows * lines * chunks):
        row = unit // (lines * chunks)
        line = (unit // chunks) % lines
        x, y = line // l1, line % l1
        qr, gr, dkr, dvr, pr, sr = q[row], grad[row], dk[row], dv[row], probs[row], dscores[row]
        start = (unit % chunks) * CHUNK
        for blk in range(start // BLOCK, (min(start + CHUNK, l2) + BLOCK - 1) // BLOCK):
            first = line * l2 + blk * BLOCK
            live = min(BLOCK, l2 - blk * BLOCK)
            # dv then dk: the accumulators of both (32 registers of float32 with d = e = 64) spill
            v0 = v1 = v2 = v3 = vzero(we, c[ZERO])
            for u0 in range(count0[x]):
                c0, t0 = query0[x, u0], slot0[x, u0]
                for u1 in range(count1[y]):
                    base, tb = (c0 * l1 + query1[y, u1]) * l2, (t0 * kernel1 + slot1[y, u1]) * kernel2
                    v0, v1, v2, v3 = _key_sum(we, gr, pr, base, tb, bcount[blk], bmember[blk], bwhich[blk], c,
                                              v0, v1, v2, v3)
            _store(we, dvr, first, live, c[ONE], v0, v1, v2, v3, stream)
            k0 = k1 = k2 = k3 = vzero(wd, c[ZERO])
            for u0 in range(count0[x]):
                c0, t0 = query0[x, u0], slot0[x, u0]
                for u1 in range(count1[y]):
                    base, tb = (c0 * l1 + query1[y, u1]) * l2, (t0 * kernel1 + slot1[y, u1]) * kernel2
                    k0, k1, k2, k3 = _key_sum(wd, qr, sr, base, tb, bcount[blk], bmember[blk], bwhich[blk], c,
                                              k0, k1, k2, k3)
            _store(wd, dkr, first, live, c[SCALE], k0, k1, k2, k3, stream)
        if stream:
            _fence()


def backward(heads: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, grad: np.ndarray,
             lse: np.ndarray, pos: tuple[np.ndarray, np.ndarray, np.ndarray],
             rel: tuple[np.ndarray, np.ndarray, np.ndarray], keep: np.ndarray, rpb: np.ndarray, c: np.ndarray,
             dq: np.ndarray, dk: np.ndarray, dv: np.ndarray, runs: np.ndarray | None = None) -> np.ndarray:
    """Write dq, dk (BH, N, d), dv (BH, N, e) (any contents before) of q, k, v, out, grad (BH, N, ·) and the
    forward's lse (BH, N); keep (B, N) uint8 (N = 0: no mask); rpb (H, R) (R = 0: no bias); c: the
    constants (_neighborhood_loops.constants); runs: Windows.runs of windows the lanes forward serves (the query pass
    then takes its form, `_by_query_lanes`), or None (the per-query form, `_by_query`). Returns drpb (units, R), the partial sums of the bias
    gradient by unit, rows of one batch·head row consecutive (the caller sums them by head, in a fixed order)."""
    from ._neighborhood_loops import Width

    rows, n, d = q.shape
    lanes = 64 // q.itemsize  # a 512-bit register's
    if runs is not None and runs.shape[0] < lanes:
        raise ValueError(f"runs: expected a last axis of at least {lanes} positions (a register's lanes), got {runs.shape[0]}")
    window = pos[0].shape[1] * pos[1].shape[1] * pos[2].shape[1]
    l2 = pos[2].shape[0]
    units = rows * (n // l2) * ((l2 + CHUNK - 1) // CHUNK)
    # p and dS (2·BH·N·W values, 12.8 MB for 8 heads on a 64 × 64 grid with 7 × 7 windows), recycled between calls:
    # fresh ones cost their page faults, measured 15–25 ms a call for 2 × 6.4 MB (one thread, this 2-core AMD EPYC
    # VM), a third of the backward
    probs, dscores = recycled_array(q.dtype, 2, rows, n, window)
    drpb = np.zeros((units, rpb.shape[1]), rpb.dtype)
    wd, we = Width(d), Width(v.shape[2])
    ahead, m0, m1, behind = tables(pos)
    stream = streamable(dq, dk, dv)
    if runs is None:
        _by_query(heads, q, k, v, out, grad, lse, *pos, *rel, *ahead, keep, rpb, c, dq, probs, dscores, drpb, wd, stream)
    else:  # the scores' rows per window row: the block's union of keys on the last axis, rounded up to 8 (as `_lanes`)
        kernel = pos[2].shape[1]
        union = -(-(lanes + kernel - 1) // 8) * 8
        _by_query_lanes(heads, q, k, v, grad, lse, pos[0], pos[1], rel[0], rel[1], runs, kernel, union, keep, rpb, c,
                        dq, probs, dscores, drpb, Width(lanes), Width(lanes // 2), wd, stream)
    _by_key(q, grad, *m0, *m1, *behind, pos[1].shape[1], pos[2].shape[1], c, probs, dscores, dk, dv, wd, we, stream)
    return drpb



Tables = tuple[tuple[np.ndarray, ...], ...]
_TABLES: dict[int, tuple[tuple[np.ndarray, np.ndarray, np.ndarray], Tables]] = {}


def tables(pos: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Tables:
    """The passes' tables of the windows pos: the blocks of the last axis's windows, the mirrors of the outer
    axes, the blocks of the last axis's mirror. Kept for the last few windows (they are the same arrays
    call after call: attnlab.mechanisms.local.neighborhood.loop_windows caches them; a table of a 1-D
    grid of 65,536 positions takes milliseconds)."""
    key = id(pos[2])
    held = _TABLES.get(key)
    if held is not None and all(a is b for a, b in zip(held[0], pos)):
        return held[1]
    ahead = blocks(pos[2], np.ascontiguousarray(np.broadcast_to(np.arange(pos[2].shape[1]), pos[2].shape)))
    m0, m1, (_, query2, slot2) = (mirror(p) for p in pos)
    made = (ahead, m0, m1, blocks(query2, slot2))
    if len(_TABLES) >= 8:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (pos, made)
    return made
