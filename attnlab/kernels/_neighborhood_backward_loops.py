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
   loaded once into four vector accumulators (the weights 0 where a key is not in a query's window);
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

from ._neighborhood_loops import FAST, ONE, SCALE, ZERO, _dots, _exp, _pad, vfma, vload, vstore, vzero
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
            for t0 in range(k0):
                p0 = pos0[x, t0]
                if p0 < 0:
                    continue
                for t1 in range(k1):
                    p1 = pos1[y, t1]
                    if p1 < 0:
                        continue
                    a0, a1, a2, a3 = _block_sum(wd, kr, sr, first, live, (p0 * l1 + p1) * l2, (t0 * k1 + t1) * k2,
                                                bcount[blk], bmember[blk], bwhich[blk], c, a0, a1, a2, a3)
            _store(wd, dqr, first, live, c[SCALE], a0, a1, a2, a3, stream)
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
             dq: np.ndarray, dk: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Write dq, dk (BH, N, d), dv (BH, N, e) (any contents before) of q, k, v, out, grad (BH, N, ·) and the
    forward's lse (BH, N); keep (B, N) uint8 (N = 0: no mask); rpb (H, R) (R = 0: no bias); c: the
    constants (_neighborhood_loops.constants). Returns drpb (units, R), the partial sums of the bias
    gradient by unit, rows of one batch·head row consecutive (the caller sums them by head, in a fixed order)."""
    from ._neighborhood_loops import Width

    rows, n, d = q.shape
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
    _by_query(heads, q, k, v, out, grad, lse, *pos, *rel, *ahead, keep, rpb, c, dq, probs, dscores, drpb, wd, stream)
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
