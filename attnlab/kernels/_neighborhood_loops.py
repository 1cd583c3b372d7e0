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

Register-blocked forward (forward_blocked, where a window's keys on the last axis are consecutive): a
block of QUERIES = 4 consecutive queries of a line needs, per window row, one run of QUERIES + k − 1 keys.
With k transposed (d × keys, keys contiguous), scores[r, run] += q[r, f] · kT[f, run] for f < d are
broadcast FMAs into 4 × (run / 16) float32 vector accumulators held in registers (GEMM's micro-kernel;
the vectors are LLVM vector types, `Vector`, built with llvmlite intrinsics: numba's auto-vectoriser
keeps them in memory). Keys outside each query's own window get weight 0 after the softmax; the outputs
are out[r] += p[r, j] v_j, vectorised over the value width with 4 × (e / 16) accumulators. Checked
with inspect_asm (float32, AVX-512): the score loop is vbroadcastss + vmovups + vfmadd231ps zmm with no
stack access (5 loads, 20 FMAs an f for k = 65); the output loop 4 loads, 16 FMAs a key, no spills;
LLVM vectors wider than four registers or not a power of two in registers spill (80 floats: 1,800
stack accesses), so a run longer than 64 keys is 64 + whole registers. The scores cost is then at the
FMA rate (Zen 4: one zmm FMA a cycle): 1-D k = 65 computes 80 keys a query (the union rounded up to
registers), 59 ms of FMAs for N = 65,536 × 8 heads; the softmax ~45 ms, the outputs ~42 ms, k's
transposition and the output stores ~30 ms (one thread, measured by removing each phase).

Diagonal forward (forward_diagonal, for shorter kernels on the last axis): a block is one register's lanes
(16 float32) of consecutive queries z0 + l of a line, and the key at offset δ of query z is z + δ. So for a
window row and an offset, one vector holds the scores of the block's 16 queries, Σ_f qᵀ[f, :] · kᵀ[f, z0 + δ
: z0 + δ + 16]: q and k transposed (per block, per unit into small buffers: no full-size temporary), 8
vector accumulators over 8 offsets. A query computes only its own offsets (the blocked form computes 16
keys a query for k = 7), the softmax runs down the offsets in vectors (vmax, vexp: exp as above on LLVM
vectors, degree 7 in float32), and each query's output is the sum of its own v rows, vectorised over the
value width. Blocks at a line's ends (windows clamped) span more offsets, masked per lane.

Why numba: the loops fuse scores, softmax and the weighted sum over each query's own keys (no halo, no
gathered copies) with no build step. The per-query loops (`forward`, and the backward) vectorise over
the head dim, so each key's dot product ends in a horizontal sum; on long 1-D windows the tiles' matrix
products beat them (the rule in attnlab.mechanisms.local.neighborhood sends those to the tiles).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox

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
P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, P12, P13 = range(POLY + 1, POLY + 14)


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
    """exp(x) for x <= 0 with the constants c (an array, or a tuple: then every index must be a constant,
    hence Horner's scheme written out)."""
    x = max(x, c[LOW])
    n = np.floor(x * c[LOG2E] + c[HALF])
    r = (x - n * c[LN2_HI]) - n * c[LN2_LO]
    p = c[POLY] * r + c[P1]
    p = p * r + c[P2]
    p = p * r + c[P3]
    p = p * r + c[P4]
    p = p * r + c[P5]
    p = p * r + c[P6]
    p = p * r + c[P7]
    p = p * r + c[P8]
    p = p * r + c[P9]
    p = p * r + c[P10]
    p = p * r + c[P11]
    p = p * r + c[P12]
    p = p * r + c[P13]
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


# -- the register-blocked forward ----------------------------------------------------------------
class Width:
    """A vector width, passed to the loops as a type (WidthType(count)), so that vectors of it are LLVM
    vector types of a size known when compiling."""

    def __init__(self, count: int) -> None:
        self.count = count


class WidthType(types.Type):
    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(name=f"Width({count})")


@typeof_impl.register(Width)
def _typeof_width(value, context):  # type: ignore[no-untyped-def]
    return WidthType(value.count)


register_model(WidthType)(models.OpaqueModel)


@unbox(WidthType)
def _unbox_width(typ, obj, c):  # type: ignore[no-untyped-def]
    return NativeValue(c.context.get_dummy_value())


@intrinsic
def width_of(typingctx, width):  # type: ignore[no-untyped-def]
    """The count of a Width, a constant."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return ir.Constant(ir.IntType(64), width.count)

    return types.int64(width), codegen


class Vector(types.Type):
    """An LLVM vector <width × dtype>: a value kept in registers (one zmm holds 16 float32)."""

    def __init__(self, dtype: types.Float, width: int) -> None:
        self.dtype, self.width = dtype, width
        super().__init__(name=f"Vector({dtype}, {width})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # type: ignore[no-untyped-def]
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.width))


def _pointer(context, builder, aryty, ary, i, j, vty):  # type: ignore[no-untyped-def]
    """The address of ary[i, j] (2-D, C order, no bounds check) as a pointer to a vector."""
    array = context.make_array(aryty)(context, builder, ary)
    item = cgutils.get_item_pointer(context, builder, aryty, array, [i, j], wraparound=False)
    return builder.bitcast(item, context.get_value_type(vty).as_pointer())


@intrinsic
def vload(typingctx, width, ary, i, j):  # type: ignore[no-untyped-def]
    """ary[i, j : j + width] as a vector (width: a Width)."""
    vty = Vector(ary.dtype, width.count)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _pointer(context, builder, signature.args[1], args[1], args[2], args[3], vty)
        return builder.load(ptr, align=ary.dtype.bitwidth // 8)

    return vty(width, ary, i, j), codegen


@intrinsic
def vstore(typingctx, ary, i, j, vec):  # type: ignore[no-untyped-def]
    """ary[i, j : j + vec.width] = vec."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1], args[2], signature.args[3])
        builder.store(args[3], ptr, align=ary.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(ary, i, j, vec), codegen


@intrinsic
def vzero(typingctx, width, like):  # type: ignore[no-untyped-def]
    """A vector of `width` zeros of like's type."""
    vty = Vector(like, width.count)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return ir.Constant(context.get_value_type(vty), None)

    return vty(width, like), codegen


@intrinsic
def vfma(typingctx, acc, x, vec):  # type: ignore[no-untyped-def]
    """acc + x · vec (x a scalar, broadcast), one fused multiply-add per register."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        lt = context.get_value_type(acc)
        one = builder.insert_element(ir.Constant(lt, ir.Undefined), args[1], ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(one, ir.Constant(lt, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), acc.width), None))
        return builder.fadd(builder.fmul(splat, args[2], flags=("contract",)), args[0], flags=("contract",))

    return acc(acc, x, vec), codegen


@intrinsic
def transpose_block(typingctx, src, i, j, dst, a, b):  # type: ignore[no-untyped-def]
    """dst[a + t, b + u] = src[i + u, j + t] for t, u < L, the lanes of a 512-bit register (16 float32,
    8 float64): L rows loaded, transposed in registers by log2 L rounds of interleaving row r with row
    r + L/2 (each round's lo and hi halves become rows 2r, 2r + 1), L rows stored."""
    lanes = 512 // src.dtype.bitwidth
    vty = Vector(src.dtype, lanes)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        s_ty, _, _, d_ty, _, _ = signature.args
        index = ir.IntType(32)
        low = ir.Constant(ir.VectorType(index, lanes), [x for t in range(lanes // 2) for x in (t, lanes + t)])
        high = ir.Constant(ir.VectorType(index, lanes),
                           [x for t in range(lanes // 2, lanes) for x in (t, lanes + t)])
        align = src.dtype.bitwidth // 8
        rows = []
        for u in range(lanes):
            at = builder.add(args[1], ir.Constant(args[1].type, u))
            rows.append(builder.load(_pointer(context, builder, s_ty, args[0], at, args[2], vty), align=align))
        for _ in range(lanes.bit_length() - 1):
            half = lanes // 2
            rows = [shuffled for r in range(half)
                    for shuffled in (builder.shuffle_vector(rows[r], rows[r + half], low),
                                     builder.shuffle_vector(rows[r], rows[r + half], high))]
        for t in range(lanes):
            at = builder.add(args[4], ir.Constant(args[4].type, t))
            builder.store(rows[t], _pointer(context, builder, d_ty, args[3], at, args[5], vty), align=align)
        return context.get_dummy_value()

    return types.none(src, i, j, dst, a, b), codegen


# Queries per block of the register-blocked forward (consecutive on the last axis).
QUERIES = 4


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _tile1(wa, qr, i, kt, ja, c, s, sa, ca):  # type: ignore[no-untyped-def]
    """s[sa + r, ca : ca + wa] = scale · Σ_f q[i + r, f] · kt[f, ja : ja + wa], r < 4: four vector
    accumulators."""
    a0 = a1 = a2 = a3 = vzero(wa, c[ZERO])
    q0, q1, q2, q3 = qr[i], qr[i + 1], qr[i + 2], qr[i + 3]
    for f in range(qr.shape[1]):
        ka = vload(wa, kt, f, ja)
        a0 = vfma(a0, q0[f], ka)
        a1 = vfma(a1, q1[f], ka)
        a2 = vfma(a2, q2[f], ka)
        a3 = vfma(a3, q3[f], ka)
    zero = vzero(wa, c[ZERO])
    vstore(s, sa, ca, vfma(zero, c[SCALE], a0))
    vstore(s, sa + 1, ca, vfma(zero, c[SCALE], a1))
    vstore(s, sa + 2, ca, vfma(zero, c[SCALE], a2))
    vstore(s, sa + 3, ca, vfma(zero, c[SCALE], a3))


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _tile2(wa, wb, qr, i, kt, ja, jb, c, s, sa, sb, cb):  # type: ignore[no-untyped-def]
    """_tile1 on two runs of keys at once (eight accumulators: enough independent FMAs to fill both
    ports): s[sa + r, :wa] from kt[:, ja…], s[sb + r, cb : cb + wb] from kt[:, jb…]."""
    a0 = a1 = a2 = a3 = vzero(wa, c[ZERO])
    b0 = b1 = b2 = b3 = vzero(wb, c[ZERO])
    q0, q1, q2, q3 = qr[i], qr[i + 1], qr[i + 2], qr[i + 3]
    for f in range(qr.shape[1]):
        ka = vload(wa, kt, f, ja)
        kb = vload(wb, kt, f, jb)
        x0, x1, x2, x3 = q0[f], q1[f], q2[f], q3[f]
        a0 = vfma(a0, x0, ka)
        a1 = vfma(a1, x1, ka)
        a2 = vfma(a2, x2, ka)
        a3 = vfma(a3, x3, ka)
        b0 = vfma(b0, x0, kb)
        b1 = vfma(b1, x1, kb)
        b2 = vfma(b2, x2, kb)
        b3 = vfma(b3, x3, kb)
    za, zb = vzero(wa, c[ZERO]), vzero(wb, c[ZERO])
    vstore(s, sa, 0, vfma(za, c[SCALE], a0))
    vstore(s, sa + 1, 0, vfma(za, c[SCALE], a1))
    vstore(s, sa + 2, 0, vfma(za, c[SCALE], a2))
    vstore(s, sa + 3, 0, vfma(za, c[SCALE], a3))
    vstore(s, sb, cb, vfma(zb, c[SCALE], b0))
    vstore(s, sb + 1, cb, vfma(zb, c[SCALE], b1))
    vstore(s, sb + 2, cb, vfma(zb, c[SCALE], b2))
    vstore(s, sb + 3, cb, vfma(zb, c[SCALE], b3))


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _max(x, c):  # type: ignore[no-untyped-def]
    """max(x) (−inf if x is empty) in four chains: one chain waits 4 cycles per element for the previous
    comparison (LLVM does not vectorise a max without "no NaNs")."""
    m0 = m1 = m2 = m3 = c[NEG_INF]
    n4 = x.shape[0] // 4 * 4
    for j in range(0, n4, 4):
        m0, m1, m2, m3 = max(m0, x[j]), max(m1, x[j + 1]), max(m2, x[j + 2]), max(m3, x[j + 3])
    for j in range(x.shape[0] - n4):
        m0 = max(m0, x[n4 + j])
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _transpose_into(kr, first, buf):  # type: ignore[no-untyped-def]
    """buf[f, j] = kr[first + j, f] for j < buf.shape[1] (zeros past kr's end), in blocks of 16 keys so that
    the rows read stay in L1."""
    d, count = buf.shape
    lanes = 64 // kr.itemsize
    real = max(0, min(count, kr.shape[0] - first))
    blocks = real // lanes if d % lanes == 0 else 0
    for jb in range(blocks):
        for fb in range(d // lanes):
            transpose_block(kr, first + jb * lanes, fb * lanes, buf, fb * lanes, jb * lanes)
    for f in range(d):
        for j in range(real - blocks * lanes):
            buf[f, blocks * lanes + j] = kr[first + blocks * lanes + j, f]
        buf[f, real:] = 0.0


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def transpose(k, pad, kt):  # type: ignore[no-untyped-def]
    """kt[row, f, j] = k[row, j, f] (keys contiguous), then `pad` zero columns per f; in blocks of 16 keys
    (one register's width of float32), so that the 16 rows read stay in cache."""
    rows, n, d = k.shape
    blocks = n // 16
    for row in prange(rows):
        kr, ktr = k[row], kt[row]
        for jb in range(blocks):
            src = kr[jb * 16 : jb * 16 + 16]
            for f in range(d):
                dst = ktr[f, jb * 16 : jb * 16 + 16]
                for j in range(16):
                    dst[j] = src[j, f]
        for f in range(d):
            for j in range(n - blocks * 16):
                ktr[f, blocks * 16 + j] = kr[blocks * 16 + j, f]
            ktr[f, n : n + pad] = 0.0


# -- vector operations of the softmax (both forms), then the register-blocked forward ---------------
@intrinsic
def vmuladd(typingctx, acc, x, y):  # type: ignore[no-untyped-def]
    """acc + x · y, lane by lane (vectors of one type)."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fadd(builder.fmul(args[1], args[2], flags=("contract",)), args[0], flags=("contract",))

    return acc(acc, x, y), codegen


@intrinsic
def vsplat(typingctx, width, x):  # type: ignore[no-untyped-def]
    """A vector of `width` copies of the scalar x."""
    vty = Vector(x, width.count)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        lt = context.get_value_type(vty)
        one = builder.insert_element(ir.Constant(lt, ir.Undefined), args[1], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(lt, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), width.count), None))

    return vty(width, x), codegen


@intrinsic
def vmax(typingctx, a, b):  # type: ignore[no-untyped-def]
    """max(a, b) lane by lane (a where a > b, else b)."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vadd(typingctx, a, b):  # type: ignore[no-untyped-def]
    """a + b lane by lane."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


# Terms of exp's Taylor polynomial in vexp: degree 7 in float32 (remainder r^8/8! <= 5e-9 of exp on
# |r| <= ln 2 / 2, below float32's 6e-8), 13 in float64 (as _exp).
VEXP_DEGREE = {32: 7, 64: 13}


@intrinsic
def vexp(typingctx, x, m):  # type: ignore[no-untyped-def]
    """exp(x − m) lane by lane where x > −inf, else 0 (masked scores): _exp's range reduction and
    polynomial on vectors (x − m <= 0; clamped below at exp's lowest argument)."""
    if not isinstance(x, Vector):
        return None
    bits = x.dtype.bitwidth
    degree = VEXP_DEGREE[bits]
    c = constants(np.dtype(np.float32 if bits == 32 else np.float64), 1.0)
    poly = list(c[POLY + 13 - degree :])  # 1/degree!, …, 1/0!
    int_type = ir.IntType(bits)
    bias, shift = (127, 23) if bits == 32 else (1023, 52)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        vt = context.get_value_type(x)
        it = ir.VectorType(int_type, x.width)

        def splat(value):  # type: ignore[no-untyped-def]
            return ir.Constant(vt, [ir.Constant(vt.element, float(value))] * x.width)

        fast = ("nsz", "arcp", "contract", "afn", "reassoc")
        y = builder.fsub(args[0], args[1], flags=fast)
        y = builder.select(builder.fcmp_ordered("<", y, splat(c[LOW])), splat(c[LOW]), y)
        name = f"llvm.floor.v{x.width}f{bits}"
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]), name)
        n = builder.call(floor, [builder.fadd(builder.fmul(y, splat(c[LOG2E]), flags=fast), splat(c[HALF]), flags=fast)])
        r = builder.fsub(builder.fsub(y, builder.fmul(n, splat(c[LN2_HI]), flags=fast), flags=fast),
                         builder.fmul(n, splat(c[LN2_LO]), flags=fast), flags=fast)
        p = splat(poly[0])
        for coef in poly[1:]:
            p = builder.fadd(builder.fmul(p, r, flags=("contract",)), splat(coef), flags=("contract",))
        exponent = builder.add(builder.fptosi(n, it), ir.Constant(it, [ir.Constant(int_type, bias)] * x.width))
        scale = builder.bitcast(builder.shl(exponent, ir.Constant(it, [ir.Constant(int_type, shift)] * x.width)), vt)
        value = builder.fmul(p, scale, flags=fast)
        real = builder.fcmp_ordered(">", args[0], splat(-np.inf))
        return builder.select(real, value, ir.Constant(vt, None))

    return x(x, m), codegen


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def forward_blocked(q, k, kt, v, pos0, pos1, rel0, rel1, runs, k2, keep, heads, rpb, c, out, lse,  # type: ignore[no-untyped-def]
                    wa, wl, we):
    """forward's out and lse for windows whose keys on the last axis are a contiguous run (no dilation
    there), QUERIES consecutive queries of a line at a time. runs (L_2, 3): each last-axis position's
    first key, last key and the bias index of the first; k2: the last axis's kernel. kt (BH, d, N + pad):
    k transposed (transpose), or (BH, d, 0): each unit transposes the keys of its chunk itself (a grid
    of one line). wa, wl, we: Widths: the main run of keys (a power of two times the lanes), the lanes
    of a register, and the value width."""
    rows = q.shape[0]
    l0, l1, l2 = pos0.shape[0], pos1.shape[0], runs.shape[0]
    k0, k1 = pos0.shape[1], pos1.shape[1]
    r1, r2 = 2 * k1 - 1, 2 * k2 - 1
    na, nl = width_of(wa), width_of(wl)
    e = (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15],
         c[16], c[17], c[18], c[19], c[20], c[21], c[22])
    need = QUERIES + k2 - 1  # keys of a block's union on the last axis
    tails = 0 if need <= na else (need - na + nl - 1) // nl
    span = na + tails * nl
    lines = l0 * l1
    chunks = (l2 + CHUNK - 1) // CHUNK
    use_keep, use_rpb = keep.shape[1] > 0, rpb.shape[1] > 0
    for unit in prange(rows * lines * chunks):
        row = unit // (lines * chunks)
        line = (unit // chunks) % lines
        x, y = line // l1, line % l1
        b, h = row // heads, row % heads
        keep_row = keep[b if use_keep else 0]
        qr, vr, orow = q[row], v[row], out[row]
        start = (unit % chunks) * CHUNK
        if kt.shape[2] == 0:  # one line: its chunk's keys, transposed here (in cache when read)
            koff = runs[max(0, min(start, l2 - QUERIES)), 0]
            ktr = np.empty((q.shape[2], runs[min(start + CHUNK, l2) - 1, 1] + 1 - koff + span), q.dtype)
            _transpose_into(k[row], koff, ktr)
        else:
            koff, ktr = 0, kt[row]
        bases = np.empty(k0 * k1, np.int64)
        rels = np.empty(k0 * k1, np.int64)
        g = 0  # the window's real rows (outer axes), the same for every query of the line
        for t0 in range(k0):
            a0 = pos0[x, t0]
            for t1 in range(k1):
                a1 = pos1[y, t1]
                if a0 >= 0 and a1 >= 0:
                    bases[g] = (a0 * l1 + a1) * l2
                    rels[g] = (rel0[x, t0] * r1 + rel1[y, t1]) * r2
                    g += 1
        s = np.empty((QUERIES * max(g, 1), span), q.dtype)
        lo = np.empty(QUERIES, np.int64)
        hi = np.empty(QUERIES, np.int64)
        rel_lo = np.empty(QUERIES, np.int64)
        inv = np.empty(QUERIES, q.dtype)
        stats = np.empty((2, nl), q.dtype)  # a query's max score and sum of weights, lane by lane
        line_start = line * l2
        for z0 in range(start, min(start + CHUNK, l2), QUERIES):
            # the block: queries z0 … z0 + 3, moved back to end at the line's end (l2 >= QUERIES; the
            # queries it takes again get the same values: weights 0 add exact zeros)
            zb = min(z0, l2 - QUERIES)
            for r in range(QUERIES):
                lo[r], hi[r], rel_lo[r] = runs[zb + r, 0], runs[zb + r, 1], runs[zb + r, 2]
            u0 = lo[0]
            for r in range(QUERIES):
                u0 = min(u0, lo[r])
            width = 0
            for r in range(QUERIES):
                width = max(width, hi[r] - u0 + 1)
            # scores: q of the block against the run u0 … u0 + span − 1 of every window row
            qb = line_start + zb
            if tails == 0 and na <= 2 * nl:  # two rows at once: 8 or 16 accumulators
                u = 0
                while u + 2 <= g:
                    _tile2(wa, wa, qr, qb, ktr, bases[u] + u0 - koff, bases[u + 1] + u0 - koff, c, s, u * QUERIES,
                           (u + 1) * QUERIES, 0)
                    u += 2
                if u < g:
                    _tile1(wa, qr, qb, ktr, bases[u] + u0 - koff, c, s, u * QUERIES, 0)
            elif tails == 0:  # 16 accumulators a row
                for u in range(g):
                    _tile1(wa, qr, qb, ktr, bases[u] + u0 - koff, c, s, u * QUERIES, 0)
            else:
                for u in range(g):
                    _tile2(wa, wl, qr, qb, ktr, bases[u] + u0 - koff, bases[u] + u0 - koff + na, c, s, u * QUERIES,
                           u * QUERIES, na)
                    for tail in range(1, tails):
                        _tile1(wl, qr, qb, ktr, bases[u] + u0 - koff + na + tail * nl, c, s, u * QUERIES,
                               na + tail * nl)
            # softmax of each query over its own keys: the bias and the padding mask on the window's slice,
            # −inf written outside it in the run, then the max, the weights (vexp: 0 for −inf) and their sum
            # over whole registers of the run (a scalar max does not vectorise without "no NaNs")
            for r in range(QUERIES):
                a, z_hi = lo[r] - u0, hi[r] - u0 + 1
                mv = vsplat(wl, e[NEG_INF])
                for u in range(g):
                    sr = s[u * QUERIES + r]
                    seg = sr[a:z_hi]
                    if use_rpb:
                        bias = rpb[h, rels[u] + rel_lo[r] : rels[u] + rel_lo[r] + seg.shape[0]]
                        for j in range(seg.shape[0]):
                            seg[j] += bias[j]
                    if use_keep:
                        kept = keep_row[bases[u] + lo[r] : bases[u] + lo[r] + seg.shape[0]]
                        for j in range(seg.shape[0]):
                            seg[j] = seg[j] if kept[j] else e[NEG_INF]
                    sr[:a] = e[NEG_INF]
                    sr[z_hi:] = e[NEG_INF]
                    for j in range(0, span, nl):
                        mv = vmax(mv, vload(wl, s, u * QUERIES + r, j))
                vstore(stats, 0, 0, mv)
                m = _max(stats[0], e)
                i = qb + r
                if m == c[NEG_INF]:
                    for u in range(g):
                        s[u * QUERIES + r] = 0.0
                    inv[r] = c[ZERO]
                    lse[row, i] = c[NEG_INF]
                    continue
                ms = vsplat(wl, m)
                tv = vzero(wl, c[ZERO])
                for u in range(g):
                    for j in range(0, span, nl):
                        p = vexp(vload(wl, s, u * QUERIES + r, j), ms)
                        vstore(s, u * QUERIES + r, j, p)
                        tv = vadd(tv, p)
                vstore(stats, 1, 0, tv)
                total = c[ZERO]
                for j in range(nl):
                    total += stats[1, j]
                inv[r] = c[ONE] / total
                lse[row, i] = m + np.log(total)
            # outputs: the weighted sums of v rows, four queries at a time
            o0 = o1 = o2 = o3 = vzero(we, c[ZERO])
            for u in range(g):
                s0, s1, s2, s3 = s[u * QUERIES], s[u * QUERIES + 1], s[u * QUERIES + 2], s[u * QUERIES + 3]
                key = bases[u] + u0
                for j in range(width):
                    vj = vload(we, vr, key + j, 0)
                    o0 = vfma(o0, s0[j], vj)
                    o1 = vfma(o1, s1[j], vj)
                    o2 = vfma(o2, s2[j], vj)
                    o3 = vfma(o3, s3[j], vj)
            zero = vzero(we, c[ZERO])
            vstore(orow, qb, 0, vfma(zero, inv[0], o0))
            vstore(orow, qb + 1, 0, vfma(zero, inv[1], o1))
            vstore(orow, qb + 2, 0, vfma(zero, inv[2], o2))
            vstore(orow, qb + 3, 0, vfma(zero, inv[3], o3))


# -- the diagonal forward ------------------------------------------------------------------------
@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _diag8(wl, qt, kb, col, c, s, row):  # type: ignore[no-untyped-def]
    """s[row + t, l] = scale · Σ_f qt[f, l] · kb[f, col + t + l] for t < 8 and the lanes l of a register:
    query l (of a block of consecutive queries) against the key t places after its diagonal, eight
    vector accumulators, one load of q and eight of k per f."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero(wl, c[ZERO])
    for f in range(qt.shape[0]):
        x = vload(wl, qt, f, 0)
        a0 = vmuladd(a0, x, vload(wl, kb, f, col))
        a1 = vmuladd(a1, x, vload(wl, kb, f, col + 1))
        a2 = vmuladd(a2, x, vload(wl, kb, f, col + 2))
        a3 = vmuladd(a3, x, vload(wl, kb, f, col + 3))
        a4 = vmuladd(a4, x, vload(wl, kb, f, col + 4))
        a5 = vmuladd(a5, x, vload(wl, kb, f, col + 5))
        a6 = vmuladd(a6, x, vload(wl, kb, f, col + 6))
        a7 = vmuladd(a7, x, vload(wl, kb, f, col + 7))
    zero = vzero(wl, c[ZERO])
    vstore(s, row, 0, vfma(zero, c[SCALE], a0))
    vstore(s, row + 1, 0, vfma(zero, c[SCALE], a1))
    vstore(s, row + 2, 0, vfma(zero, c[SCALE], a2))
    vstore(s, row + 3, 0, vfma(zero, c[SCALE], a3))
    vstore(s, row + 4, 0, vfma(zero, c[SCALE], a4))
    vstore(s, row + 5, 0, vfma(zero, c[SCALE], a5))
    vstore(s, row + 6, 0, vfma(zero, c[SCALE], a6))
    vstore(s, row + 7, 0, vfma(zero, c[SCALE], a7))


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _diag4(wl, qt, kb, col, c, s, row):  # type: ignore[no-untyped-def]
    """_diag8 for t < 4."""
    a0 = a1 = a2 = a3 = vzero(wl, c[ZERO])
    for f in range(qt.shape[0]):
        x = vload(wl, qt, f, 0)
        a0 = vmuladd(a0, x, vload(wl, kb, f, col))
        a1 = vmuladd(a1, x, vload(wl, kb, f, col + 1))
        a2 = vmuladd(a2, x, vload(wl, kb, f, col + 2))
        a3 = vmuladd(a3, x, vload(wl, kb, f, col + 3))
    zero = vzero(wl, c[ZERO])
    vstore(s, row, 0, vfma(zero, c[SCALE], a0))
    vstore(s, row + 1, 0, vfma(zero, c[SCALE], a1))
    vstore(s, row + 2, 0, vfma(zero, c[SCALE], a2))
    vstore(s, row + 3, 0, vfma(zero, c[SCALE], a3))


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _transpose_rows(src, first, count, dst, col):  # type: ignore[no-untyped-def]
    """dst[f, col + j] = src[first + j, f] for j < count (16 × 16 blocks in registers where d allows)."""
    d = dst.shape[0]
    lanes = 64 // src.itemsize
    blocks = count // lanes if d % lanes == 0 else 0
    for jb in range(blocks):
        for fb in range(d // lanes):
            transpose_block(src, first + jb * lanes, fb * lanes, dst, fb * lanes, col + jb * lanes)
    for j in range(blocks * lanes, count):
        row = src[first + j]
        for f in range(d):
            dst[f, col + j] = row[f]


@njit(cache=True, fastmath=FAST, nogil=True, parallel=True)
def forward_diagonal(q, k, v, pos0, pos1, rel0, rel1, runs, k2, offsets, keep, heads, rpb, c, out, lse, wl, we):  # type: ignore[no-untyped-def]
    """forward's out and lse for windows whose keys on the last axis are a contiguous run (runs (L_2, 3):
    each last-axis position's first key, last key and the bias index of the first), L_2 >= the lanes of
    a register (wl: Width). A block is `lanes` consecutive queries of a line, one per lane; the key at
    offset δ from query z is z + δ, so for every window row and every δ of the block's range, one
    vector of scores (one per query) is Σ_f qᵀ[f, :] · kᵀ[f, z0 + δ : z0 + δ + lanes] with k transposed
    (per unit, the keys of its chunk, into a small buffer); lanes outside a query's own window are
    masked. k2: the last axis's kernel; offsets: at least the largest offset range of a block (max_z
    (last key − z) − min_z (first key − z) + 1) + 3; we: the value width (Width)."""
    rows, d = q.shape[0], q.shape[2]
    l0, l1, l2 = pos0.shape[0], pos1.shape[0], runs.shape[0]
    k0, k1 = pos0.shape[1], pos1.shape[1]
    r1 = 2 * k1 - 1
    lanes = width_of(wl)
    e = (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15],
         c[16], c[17], c[18], c[19], c[20], c[21], c[22])
    r2 = 2 * k2 - 1
    lines = l0 * l1
    chunks = (l2 + CHUNK - 1) // CHUNK
    use_keep, use_rpb = keep.shape[1] > 0, rpb.shape[1] > 0
    for unit in prange(rows * lines * chunks):
        row = unit // (lines * chunks)
        line = (unit // chunks) % lines
        x, y = line // l1, line % l1
        b, h = row // heads, row % heads
        keep_row = keep[b if use_keep else 0]
        qr, kr, vr, orow = q[row], k[row], v[row], out[row]
        start = (unit % chunks) * CHUNK
        stop = min(start + CHUNK, l2)
        bases = np.empty(k0 * k1, np.int64)
        rels = np.empty(k0 * k1, np.int64)
        g = 0  # the window's real rows (outer axes), the same for every query of the line
        for t0 in range(k0):
            a0 = pos0[x, t0]
            for t1 in range(k1):
                a1 = pos1[y, t1]
                if a0 >= 0 and a1 >= 0:
                    bases[g] = (a0 * l1 + a1) * l2
                    rels[g] = (rel0[x, t0] * r1 + rel1[y, t1]) * r2
                    g += 1
        # the chunk's keys on the last axis, first … last, transposed with `lanes` zero columns either side
        first, last = runs[max(0, min(start, l2 - lanes)), 0], runs[stop - 1, 1]
        for z in range(max(0, min(start, l2 - lanes)), stop):
            first, last = min(first, runs[z, 0]), max(last, runs[z, 1])
        width = last - first + 1 + 2 * lanes
        kb = np.empty((max(g, 1), d, width), q.dtype)
        for u in range(g):
            kb[u, :, :lanes] = 0.0
            kb[u, :, width - lanes :] = 0.0
            _transpose_rows(kr, bases[u] + first, last - first + 1, kb[u], lanes)
        qt = np.empty((d, lanes), q.dtype)
        s = np.empty((max(g, 1) * offsets, lanes), q.dtype)
        lo = np.empty(lanes, np.int64)
        hi = np.empty(lanes, np.int64)
        rb = np.empty(lanes, np.int64)
        stats = np.empty((2, lanes), q.dtype)  # each query's max score and sum of weights
        line_start = line * l2
        for z_next in range(start, stop, lanes):
            z0 = min(z_next, l2 - lanes)  # the last block moved back to end at the line's end
            low, high = runs[z0, 0] - z0, runs[z0, 1] - z0
            for lane in range(lanes):
                z = z0 + lane
                low, high = min(low, runs[z, 0] - z), max(high, runs[z, 1] - z)
            span = high - low + 1
            regular = True  # every query's window is the block's whole offset range
            for lane in range(lanes):  # each query's window as offsets t: key z + low + t
                z = z0 + lane
                lo[lane], hi[lane] = runs[z, 0] - z - low, runs[z, 1] - z - low
                rb[lane] = runs[z, 2] - runs[z, 0] + z + low
                regular = regular and lo[lane] == 0 and hi[lane] == span - 1
            col = z0 + low - first + lanes  # kb's column of the block's first lane at offset 0
            qb = line_start + z0
            for lane in range(lanes):  # q of the block transposed (a plain loop: LLVM's shuffles beat transpose_block's here)
                qrow = qr[qb + lane]
                for f in range(d):
                    qt[f, lane] = qrow[f]
            for u in range(g):
                t = 0
                while t + 8 <= span:
                    _diag8(wl, qt, kb[u], col + t, c, s, u * offsets + t)
                    t += 8
                while t < span:
                    _diag4(wl, qt, kb[u], col + t, c, s, u * offsets + t)
                    t += 4
            # the softmax of each lane over its own offsets: scores outside a query's window (a block at a
            # line's ends), of masked keys, and the bias, written in scalar loops where there are any; then
            # the max, the weights (vexp: 0 for −inf) and their sum in vectors
            if use_rpb or use_keep or not regular:
                for u in range(g):
                    for t in range(span):
                        sr = s[u * offsets + t]
                        key = bases[u] + z0 + low + t
                        for lane in range(lanes):
                            inside = t >= lo[lane] and t <= hi[lane]
                            if use_rpb and inside:
                                sr[lane] += rpb[h, rels[u] + rb[lane] + t]
                            if use_keep and inside:
                                inside = keep_row[key + lane] != 0
                            if not inside:
                                sr[lane] = e[NEG_INF]
            mv = vsplat(wl, e[NEG_INF])
            for u in range(g):
                for t in range(span):
                    mv = vmax(mv, vload(wl, s, u * offsets + t, 0))
            tv = vzero(wl, c[ZERO])
            for u in range(g):
                for t in range(span):
                    p = vexp(vload(wl, s, u * offsets + t, 0), mv)
                    vstore(s, u * offsets + t, 0, p)
                    tv = vadd(tv, p)
            vstore(stats, 0, 0, mv)
            vstore(stats, 1, 0, tv)
            # outputs: each query's weighted sum of its own keys' v rows
            for lane in range(lanes):
                i = qb + lane
                if stats[0, lane] == e[NEG_INF]:
                    lse[row, i] = e[NEG_INF]
                    orow[i, :] = 0.0
                    continue
                lse[row, i] = stats[0, lane] + np.log(stats[1, lane])
                oa = ob = vzero(we, c[ZERO])
                for u in range(g):
                    key = bases[u] + z0 + lane + low
                    t = lo[lane]
                    while t + 2 <= hi[lane] + 1:
                        oa = vfma(oa, s[u * offsets + t, lane], vload(we, vr, key + t, 0))
                        ob = vfma(ob, s[u * offsets + t + 1, lane], vload(we, vr, key + t + 1, 0))
                        t += 2
                    if t <= hi[lane]:
                        oa = vfma(oa, s[u * offsets + t, lane], vload(we, vr, key + t, 0))
                inv = c[ONE] / stats[1, lane]
                vstore(orow, i, 0, vfma(vfma(vzero(we, c[ZERO]), inv, oa), inv, ob))
