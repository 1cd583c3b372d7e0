"""Neighborhood attention as direct loops, compiled with numba (imported only when numba is).

Every grid is 3-D here (a lower rank gets leading axes of length 1 and kernel 1). Each axis comes as
two (L_a, k_a) tables written by the caller from the windows' definition: `pos`, the key's
position on the axis for each query position and window slot (−1 where the slot holds no real
key: a causal window at the start of its axis), and `rel`, its relative position index c' − c + k − 1
into the bias table. A query's keys are the product of its three rows; the key padding mask
`keep` (batch, N) drops some of them.

Forward, per query i (its real keys j, scores s_ij = scale·q_i·k_j + rpb[h, rel]):

    m_i = max_j s_ij,   l_i = Σ_j exp(s_ij − m_i),   out_i = Σ_j exp(s_ij − m_i) v_j / l_i,
    lse_i = m_i + log l_i   (saved for the backward; −inf, and out_i = 0, when i has no real key).

Backward (recomputing p_ij = exp(s_ij − lse_i)):  D_i = dO_i·out_i,  dS_ij = p_ij (dO_i·v_j − D_i),

    dq_i = scale Σ_j dS_ij k_j,   dk_j += scale dS_ij q_i,   dv_j += p_ij dO_i,   drpb[h, rel] += dS_ij.

Work is split into units of one (batch·head) row and a run of queries. The forward's units are
independent. In the backward, dk and dv are scattered: a query's keys lie within R raster positions
of it (R = Σ_a (k_a − 1)·δ_a·stride_a), so runs ("stripes") of at least 2R queries only touch the
keys of their neighbours; the even stripes run in parallel, then the odd ones, and no two threads
ever write the same row. Each key's sum is so taken in one fixed order whatever the thread count.

Inner loops run over the head dim (contiguous rows, vectorised by LLVM with fastmath), four keys at a
time: a window is padded to a multiple of four slots by repeating its last key with weight 0. exp is
written out (range reduction by 2^n, n an integer, and a polynomial of degree 13 on |r| <= ln2/2:
within 3e-7 (float32) and 3e-15 (float64) relative of exp), so that the loops over a query's keys
vectorise: numba's math.exp is a scalar call without Intel's SVML.

Why numba: the loops fuse scores, softmax and the weighted sum over each query's own keys (no halo, no
gathered copies) with no build step; its limit is that it cannot hold a block of queries' accumulators
in registers as a GEMM micro-kernel does, so on long 1-D windows the tiles' matrix products win (the
rule in attnlab.mechanisms.local.neighborhood sends them there).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Queries per unit of the forward: enough to amortise a unit's scratch arrays.
CHUNK = 256
# Queries whose weights are all taken (reading k rows) before their outputs (reading v rows).
BLOCK = 16
# 1/j! for j = 0..13: the Taylor polynomial of exp on |r| <= ln 2 / 2.
_TAYLOR = [1.0 / float(np.prod(np.arange(1, j + 1, dtype=np.float64))) for j in range(14)]


# fastmath without "no infinities / NaNs": −inf marks masked scores and empty windows.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Slots of the constants array (typed as the inputs, so that float32 loops stay in float32).
LOW, LOG2E, LN2_HI, LN2_LO, ZERO, ONE, HALF, NEG_INF, SCALE, POLY = range(10)


def constants(dtype: np.dtype, scale: float) -> np.ndarray:
    """The loops' constants in `dtype`: exp's lowest argument (below it exp is clamped, so that 2^n
    stays normal), log2 e, ln 2 in two parts, 0, 1, 1/2, −inf, the score scale, then 1/13!, …, 1/0!."""
    low = -87.0 if dtype == np.float32 else -708.0
    ln2_hi = 0.693145751953125  # few mantissa bits: n · ln2_hi is exact
    ln2_lo = 1.4286068203094172321e-6
    head = [low, 1.4426950408889634, ln2_hi, ln2_lo, 0.0, 1.0, 0.5, -np.inf, scale]
    return np.array(head + _TAYLOR[::-1], dtype=dtype)


@intrinsic
def _pow2(typingctx, n):  # type: ignore[no-untyped-def]
    """2^n for an integral float n in the normal range, by writing the exponent bits (as exp2 without
    a library call, so that it vectorises)."""
    if not isinstance(n, types.Float):
        return None
    wide = n.bitwidth == 64
    int_type, float_type = ir.IntType(64 if wide else 32), (ir.DoubleType() if wide else ir.FloatType())
    bias, shift = (1023, 52) if wide else (127, 23)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        bits = builder.add(builder.fptosi(args[0], int_type), ir.Constant(int_type, bias))
        return builder.bitcast(builder.shl(bits, ir.Constant(int_type, shift)), float_type)

    return n(n), codegen


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _exp(x, c):  # type: ignore[no-untyped-def]
    """exp(x) for x <= 0 with the constants c."""
    x = max(x, c[LOW])
    n = np.floor(x * c[LOG2E] + c[HALF])
    r = (x - n * c[LN2_HI]) - n * c[LN2_LO]
    p = c[POLY]
    for j in range(POLY + 1, POLY + 14):
        p = p * r + c[j]
    return p * _pow2(n)


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _window(i, pos0, pos1, pos2, rel0, rel1, rel2, keep_row, use_keep, keys, rel):  # type: ignore[no-untyped-def]
    """Write query i's real keys (raster index) and bias indices into keys, rel; return how many."""
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
                count += 1
    return count


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _dots(x, rows, keys, count, c, out):  # type: ignore[no-untyped-def]
    """out[u] = x · rows[keys[u]] for u < count, four rows at a time (one load of x[f] for four
    products, four independent sums)."""
    d = x.shape[0]
    u = 0
    while u + 4 <= count:
        r0, r1, r2, r3 = rows[keys[u]], rows[keys[u + 1]], rows[keys[u + 2]], rows[keys[u + 3]]
        a0 = a1 = a2 = a3 = c[ZERO]
        for f in range(d):
            xf = x[f]
            a0 += xf * r0[f]
            a1 += xf * r1[f]
            a2 += xf * r2[f]
            a3 += xf * r3[f]
        out[u], out[u + 1], out[u + 2], out[u + 3] = a0, a1, a2, a3
        u += 4
    while u < count:
        r0 = rows[keys[u]]
        a0 = c[ZERO]
        for f in range(d):
            a0 += x[f] * r0[f]
        out[u] = a0
        u += 1


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _combine(rows, keys, weights, count, c, acc):  # type: ignore[no-untyped-def]
    """acc = Σ_{u < count} weights[u] · rows[keys[u]], four rows per pass over acc (a quarter of the
    loads and stores of acc, whose updates form the loop's dependency chain)."""
    e = acc.shape[0]
    u = 0
    if count >= 4:
        r0, r1, r2, r3 = rows[keys[0]], rows[keys[1]], rows[keys[2]], rows[keys[3]]
        w0, w1, w2, w3 = weights[0], weights[1], weights[2], weights[3]
        for f in range(e):
            acc[f] = (w0 * r0[f] + w1 * r1[f]) + (w2 * r2[f] + w3 * r3[f])
        u = 4
    else:
        for f in range(e):
            acc[f] = c[ZERO]
    while u + 4 <= count:
        r0, r1, r2, r3 = rows[keys[u]], rows[keys[u + 1]], rows[keys[u + 2]], rows[keys[u + 3]]
        w0, w1, w2, w3 = weights[u], weights[u + 1], weights[u + 2], weights[u + 3]
        for f in range(e):
            acc[f] += (w0 * r0[f] + w1 * r1[f]) + (w2 * r2[f] + w3 * r3[f])
        u += 4
    while u < count:
        r0, w0 = rows[keys[u]], weights[u]
        for f in range(e):
            acc[f] += w0 * r0[f]
        u += 1


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _pad(keys, count):  # type: ignore[no-untyped-def]
    """Repeat the last key up to a multiple of four slots (their weights are set to 0), so that _dots and
    _combine take every key in blocks of four; the padded count."""
    padded = (count + 3) // 4 * 4
    for u in range(count, padded):
        keys[u] = keys[count - 1]
    return padded


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def forward(q, k, v, pos0, pos1, pos2, rel0, rel1, rel2, keep, heads, rpb, c, out, lse):  # type: ignore[no-untyped-def]
    """out (BH, N, e) and lse (BH, N) of q, k (BH, N, d), v (BH, N, e); keep (B, N) uint8 (N = 0: no
    mask); rpb (H, R) (R = 0: no bias); c: the constants."""
    rows, n = q.shape[0], q.shape[1]
    window = pos0.shape[1] * pos1.shape[1] * pos2.shape[1]
    chunks = (n + CHUNK - 1) // CHUNK
    use_keep, use_rpb = keep.shape[1] > 0, rpb.shape[1] > 0
    for unit in prange(rows * chunks):
        row = unit // chunks
        b, h = row // heads, row % heads
        keep_row = keep[b if use_keep else 0]
        qr, kr, vr, orow = q[row], k[row], v[row], out[row]
        keys = np.empty((BLOCK, window + 3), np.int64)
        rel = np.empty((BLOCK, window + 3), np.int64)
        s = np.empty((BLOCK, window + 3), q.dtype)
        counts = np.empty(BLOCK, np.int64)
        start = (unit % chunks) * CHUNK
        stop = min(start + CHUNK, n)
        for first in range(start, stop, BLOCK):
            last = min(first + BLOCK, stop)
            for i in range(first, last):  # the block's scores and weights: reads k rows only
                t = i - first
                count = _window(i, pos0, pos1, pos2, rel0, rel1, rel2, keep_row, use_keep, keys[t], rel[t])
                counts[t] = count
                if count == 0:
                    lse[row, i] = -np.inf
                    continue
                st = s[t]
                padded = _pad(keys[t], count)
                _dots(qr[i], kr, keys[t], padded, c, st)
                m = c[NEG_INF]
                for u in range(count):
                    sc = st[u] * c[SCALE]
                    if use_rpb:
                        sc += rpb[h, rel[t, u]]
                    st[u] = sc
                    m = max(m, sc)
                total = c[ZERO]
                for u in range(count):
                    p = _exp(st[u] - m, c)
                    st[u] = p
                    total += p
                inv = c[ONE] / total
                for u in range(count):
                    st[u] *= inv
                for u in range(count, padded):
                    st[u] = c[ZERO]
                counts[t] = padded
                lse[row, i] = m + np.log(total)
            for i in range(first, last):  # the block's outputs: reads v rows only
                t = i - first
                if counts[t] == 0:
                    orow[i, :] = 0.0
                else:
                    _combine(vr, keys[t], s[t], counts[t], c, orow[i])


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _backward_run(row, start, stop, heads, q, k, v, out, grad, lse, pos0, pos1, pos2, rel0, rel1, rel2, keep, rpb,  # type: ignore[no-untyped-def]
                  c, dq, dk, dv, drpb_row, keys, rel, s, dp):
    """The backward of queries start … stop − 1 of one (batch·head) row."""
    d, e = q.shape[2], v.shape[2]
    b, h = row // heads, row % heads
    use_keep, use_rpb = keep.shape[1] > 0, rpb.shape[1] > 0
    keep_row = keep[b if use_keep else 0]
    qr, kr, vr, orow, gr = q[row], k[row], v[row], out[row], grad[row]
    dqr, dkr, dvr = dq[row], dk[row], dv[row]
    for i in range(start, stop):
        qi, gi, dqi = qr[i], gr[i], dqr[i]
        if lse[row, i] == -np.inf:
            dqi[:] = 0.0
            continue
        count = _window(i, pos0, pos1, pos2, rel0, rel1, rel2, keep_row, use_keep, keys, rel)
        delta = c[ZERO]
        for f in range(e):
            delta += gi[f] * orow[i, f]
        padded = _pad(keys, count)
        _dots(qi, kr, keys, padded, c, s)
        _dots(gi, vr, keys, padded, c, dp)
        for u in range(count):
            sc = s[u] * c[SCALE] - lse[row, i]
            if use_rpb:
                sc += rpb[h, rel[u]]
            s[u] = sc
        for u in range(count):
            p = _exp(s[u], c)
            s[u] = p
            dp[u] = p * (dp[u] - delta)
        for u in range(count, padded):
            dp[u] = c[ZERO]
        _combine(kr, keys, dp, padded, c, dqi)
        for f in range(d):
            dqi[f] *= c[SCALE]
        for u in range(count):
            j = keys[u]
            p, sds = s[u], dp[u] * c[SCALE]
            dkj, dvj = dkr[j], dvr[j]
            for f in range(d):
                dkj[f] += sds * qi[f]
            for f in range(e):
                dvj[f] += p * gi[f]
            if use_rpb:
                drpb_row[rel[u]] += dp[u]
@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def _backward_phase(phase, stripes, heads, q, k, v, out, grad, lse, pos0, pos1, pos2, rel0, rel1, rel2, keep, rpb,  # type: ignore[no-untyped-def]
                    c, dq, dk, dv, drpb):
    """Stripes phase, phase + 2, … of every row, in parallel (they write disjoint rows of dk, dv)."""
    rows, n = q.shape[0], q.shape[1]
    window = pos0.shape[1] * pos1.shape[1] * pos2.shape[1]
    length = n // stripes
    per_row = (stripes - phase + 1) // 2
    for unit in prange(rows * per_row):
        row = unit // per_row
        stripe = phase + 2 * (unit % per_row)
        start = stripe * length
        stop = n if stripe == stripes - 1 else start + length
        keys = np.empty(window + 3, np.int64)
        rel = np.empty(window + 3, np.int64)
        s = np.empty(window + 3, q.dtype)
        dp = np.empty(window + 3, q.dtype)
        _backward_run(row, start, stop, heads, q, k, v, out, grad, lse, pos0, pos1, pos2, rel0, rel1, rel2, keep, rpb,
                      c, dq, dk, dv, drpb[row * stripes + stripe], keys, rel, s, dp)


def backward(stripes, heads, q, k, v, out, grad, lse, pos0, pos1, pos2, rel0, rel1, rel2, keep, rpb,  # type: ignore[no-untyped-def]
             c, dq, dk, dv, drpb):
    """dq, dk, dv (zeroed by the caller: dk, dv) and drpb (BH·stripes, R) partials, stripes of each
    row in two phases (even, then odd)."""
    for phase in (0, 1):
        if phase < stripes:
            _backward_phase(phase, stripes, heads, q, k, v, out, grad, lse, pos0, pos1, pos2, rel0, rel1, rel2, keep,
                            rpb, c, dq, dk, dv, drpb)
