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
independent; the backward is attnlab.kernels._neighborhood_backward_loops (two race-free passes).

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
transposition and the output stores ~30 ms (one thread, measured by removing each phase). Lines of at least a
register's lanes now take the lanes form (below); this one serves shorter lines with kernels of 9 or more.

Lanes forward (forward_lanes, where a window's keys on the last axis are a contiguous run moving by at most one
key from a position to the next, on lines of at least a register's lanes): a block is one register's lanes (16
float32, 8 float64) of consecutive queries z0 + l of a line, whose windows on the last axis together are one
union of at most lanes + k − 1 keys. With q transposed per unit (d × queries, a small buffer), one vector holds
the scores of the block's queries against one key j, Σ_f k[j, f] · qᵀ[f, z0 : z0 + lanes], each k[j, f]
broadcast into the FMA (vfmadd231ps with a {1to16} operand; k read as it is, never transposed), eight keys at a
time (`_keys8`: one load of q and eight FMAs an f, at the FMA rate), which also masks the lanes outside each
query's window (vwithin) and keeps the running max lane by lane, so that the scores are written once. Eight keys
that only one half of the lanes has in its windows (the union's first and last eight keys: windows start and end
in order along the lanes) take half-width vectors (`_keys8_half`, ymm: the same FMA rate per lane on Zen 4, half
the FMAs). The softmax then runs down the keys in vectors (vexp and the sum; the logsumexp by vlse, its log a
series on vectors), and the outputs take four lanes at a time over the union of their keys (`_weighted4`: each v
row loaded once for four FMAs), written by non-temporal stores when the output is larger than the caches
(neighborhood.STREAM_BYTES: no read of each line before it is written). At each block, the new rows of k and v
AHEAD blocks on are asked for (every line into L2, their first line and the first q row AHEAD blocks on into L1
too: a block's rows are about one 4 KiB page a stream, where the hardware's prefetch stops), and so is a block's
share of the NEXT unit's q rows (into L2): the unit's transposition of q reads its CHUNK rows at once, and waited
on memory for them (~11% of the samples of a profile, below).

1-D k = 65, N = 65,536 × 8 heads, float32, one thread, session 8 (CPU ms, this 2-core AMD EPYC shared with other
jobs, load 1.4–2): in one process, forward_lanes called as `_lanes` calls it, against the form before these
changes (the previous commit's module imported side by side), one output buffer for both (two buffers alone
differed by 3–6 ms: where the pages fall), outputs equal bit for bit, medians of 9 interleaved rounds, both
orders: 153–154 → 144–149 (k = 7: 83 → 75–77; 2-D 64 × 64 13 × 13: 27.6–27.9 → 26.7–27.1, 7 × 7 13.9 → 13.4). Each
change alone (earlier runs with a buffer each, ±3–6 ms): the non-temporal stores −3 to −12 (more under load), the
half-width keys and the fused mask and max −3 to −8, the prefetch −3 to −6. Did not help: prefetching every line of
the rows AHEAD 2–24 blocks on (into L1 or L2; then, not since: session 9 below), transposing q per block instead of
per unit, q's transposed rows padded off the 4 KiB stride (within the buffers' placement noise), 8 float32 lanes
(ymm) for the whole form (+22).
Where the time goes (N = 1,024 × 1 row called 512 times, whose q, k, v stay in L2, against N = 65,536 × 8 rows, by
removing phases): the outputs ~37 ms (68 keys a query, 143 M zmm FMAs: ~3.8 G a second, this core's FMA rate), the
scores with the rest of each block (mask, sums, q's transposition, output stores) ~70 (72 keys a query in full
vectors, 151 M FMAs, ~40 ms of them), vexp ~7, and reading q, k, v from memory ~28 (119 ms in L2 against 148;
inputs in transparent huge pages do not shorten it; the same at N = 16,384 × 1 row, 12 MiB of inputs, against 124
ms at 8,192). A sampling profile (perf, cpu-clock, on the compiled code's addresses; session 9, before the
prefetches below) split the 1-D k = 65 forward as: the scores' full-width loop ~30%, its half-width keys ~5%, vexp
~8%, the outputs ~34% (51 ms against 37 at the FMA rate), q's transposition ~11% (nearly all of it on the loads of
q's rows: a 64 KiB burst from memory at each unit), the rest ~12%.

Session 9 (same harness, one buffer, medians of 9 interleaved rounds in alternating orders, outputs equal bit for
bit, load 0.4–1.0, CPU ms): the next unit's q prefetched into L2 a block's share at a time, every line of k's and
v's new rows AHEAD blocks on into L2, AHEAD 3 → 2: 1-D k = 65 141–143 → 128, k = 7 74–75 → 53–55, 2-D 7 × 7
13.2–13.4 → 12.5–12.8, 13 × 13 27.0–27.7 → 26.5–26.8 (inputs from numpy, advised into transparent huge pages;
without the advice k = 65 151 → 140); inputs from torch.randn (4 KiB pages, as `attnlab bench limits`): k = 65
143–146 → 129–143, k = 7 75 → 62, the spread from one process to the next (where the pages fall; AHEAD 2 to 6 within
it). `attnlab bench limits` (load 0.7–1.1, six runs): k = 65 129–144 ms, median 137.5 (before: 140–146), k = 7 54–65
(74–77), two threads 1.8–2.0× (one run 1.3–1.5× on the k = 7 and 2-D rows, its two-thread stream 36 GB/s against 51:
the other core busy). Steps (huge pages): q's next unit alone −9 (k = 7 −9; it needs the first-line L1 prefetch of q
kept: without it k = 7 was +5), k's and v's every line then −5 (k = 7 −13; session 8 found no gain from it before
q's burst was prefetched). Two threads (in-process): k = 65 71 → 69, k = 7 36 → 30, 2-D 7 × 7 6.7 → 6.7. The forms
against each other: `taskset -c 1 .venv/bin/python benchmarks/neighborhood_forms.py --rows 1d-65`.

It replaced a diagonal form (queries in lanes against each key offset, q and k both transposed: a vector of kᵀ at
every offset is an unaligned load, mostly split over two cache lines, one a cycle) and, on long lines, the
register-blocked form: benchmarks/neighborhood_forms.py.

Why numba: the loops fuse scores, softmax and the weighted sum over each query's own keys (no halo, no
gathered copies) with no build step. The per-query loops (`forward`, and the backward) vectorise over
the head dim, so each key's dot product ends in a horizontal sum.
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
def _line_rows(x, y, pos0, pos1, rel0, rel1, l2, r1, r2, bases, rels, slots):  # type: ignore[no-untyped-def]
    """The real rows (outer axes) of the windows of line (x, y), the same for every query of the line: each row's
    first raster index into bases, its bias index (times r2) into rels and its window row t_0 k_1 + t_1 into slots;
    return how many."""
    l1 = pos1.shape[0]
    g = 0
    for t0 in range(pos0.shape[1]):
        a0 = pos0[x, t0]
        for t1 in range(pos1.shape[1]):
            a1 = pos1[y, t1]
            if a0 >= 0 and a1 >= 0:
                bases[g] = (a0 * l1 + a1) * l2
                rels[g] = (rel0[x, t0] * r1 + rel1[y, t1]) * r2
                slots[g] = t0 * pos1.shape[1] + t1
                g += 1
    return g


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
def vstream(typingctx, ary, i, j, vec):  # type: ignore[no-untyped-def]
    """ary[i, j : j + vec.width] = vec by a non-temporal store (written to memory without reading the line
    first, and not kept in cache): the caller has checked that the address is a multiple of 64 bytes and
    ends the stores with `fence`."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1], args[2], signature.args[3])
        store = builder.store(args[3], ptr, align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.none(ary, i, j, vec), codegen


@intrinsic
def fence(typingctx):  # type: ignore[no-untyped-def]
    """A sequentially consistent fence (mfence on x86): orders the non-temporal stores before it before
    anything after it."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


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
# Blocks ahead of the lanes forward's current one whose new rows of k and v (and first row of q) it asks for (prefetch).
AHEAD = 2


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


# -- vector operations of the softmax (both vector forms), then the register-blocked forward --------
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
        g = _line_rows(x, y, pos0, pos1, rel0, rel1, l2, r1, r2, bases, rels, np.empty(k0 * k1, np.int64))
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


# -- the lanes forward ---------------------------------------------------------------------------
@intrinsic
def vwithin(typingctx, x, j, lo, hi, fill):  # type: ignore[no-untyped-def]
    """x where lo <= j <= hi, lane by lane (j a scalar, lo and hi vectors of x's type), else fill."""
    if not isinstance(x, Vector):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        lt = context.get_value_type(x)
        mask = ir.Constant(ir.VectorType(ir.IntType(32), x.width), None)

        def splat(value):  # type: ignore[no-untyped-def]
            one = builder.insert_element(ir.Constant(lt, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(lt, ir.Undefined), mask)

        at = splat(args[1])
        inside = builder.and_(builder.fcmp_ordered(">=", at, args[2]), builder.fcmp_ordered("<=", at, args[3]))
        return builder.select(inside, args[0], splat(args[4]))

    return x(x, x.dtype, x, x, x.dtype), codegen


# Terms of log's series in vlse: log m = 2 Σ_n r^(2n+1)/(2n+1), r = (m − 1)/(m + 1), |r| <= (√2 − 1)/(√2 + 1)
# for m in [√½, √2): through r^9 in float32 (the next term <= 7e-10), r^19 in float64 (<= 4e-16).
VLOG_TERMS = {32: 5, 64: 10}


@intrinsic
def vlse(typingctx, m, total):  # type: ignore[no-untyped-def]
    """m + log(total) lane by lane, −inf where m is −inf (a query without a real key; total > 0 elsewhere):
    total = 2^e · f with f in [√½, √2) from its bits, log total = e ln 2 + log f by the series of VLOG_TERMS."""
    if not isinstance(m, Vector):
        return None
    bits = m.dtype.bitwidth
    int_type = ir.IntType(bits)
    bias, shift = (127, 23) if bits == 32 else (1023, 52)
    ln2_hi, ln2_lo = 0.693145751953125, 1.4286068203094172321e-6
    terms = [2.0 / (2 * n + 1) for n in range(VLOG_TERMS[bits])]

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        vt = context.get_value_type(m)
        it = ir.VectorType(int_type, m.width)

        def splat(value):  # type: ignore[no-untyped-def]
            return ir.Constant(vt, [ir.Constant(vt.element, float(value))] * m.width)

        def isplat(value):  # type: ignore[no-untyped-def]
            return ir.Constant(it, [ir.Constant(int_type, value)] * m.width)

        word = builder.bitcast(args[1], it)
        exponent = builder.sub(builder.lshr(word, isplat(shift)), isplat(bias))
        f = builder.bitcast(builder.or_(builder.and_(word, isplat((1 << shift) - 1)), isplat(bias << shift)), vt)
        big = builder.fcmp_ordered(">", f, splat(np.sqrt(2.0)))  # f in [1, 2) → [√½, √2)
        f = builder.select(big, builder.fmul(f, splat(0.5)), f)
        e = builder.sitofp(builder.add(exponent, builder.zext(big, it)), vt)
        r = builder.fdiv(builder.fsub(f, splat(1.0)), builder.fadd(f, splat(1.0)))
        r2 = builder.fmul(r, r)
        p = splat(terms[-1])
        for coef in terms[-2::-1]:
            p = builder.fadd(builder.fmul(p, r2), splat(coef))
        log = builder.fadd(builder.fmul(e, splat(ln2_hi)), builder.fadd(builder.fmul(e, splat(ln2_lo)), builder.fmul(p, r)))
        real = builder.fcmp_ordered(">", args[0], splat(-np.inf))
        return builder.select(real, builder.fadd(args[0], log), splat(-np.inf))

    return m(m, total), codegen


@intrinsic
def vinv(typingctx, x):  # type: ignore[no-untyped-def]
    """1 / x lane by lane where x > 0, else 0."""
    if not isinstance(x, Vector):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        vt = context.get_value_type(x)
        one = ir.Constant(vt, [ir.Constant(vt.element, 1.0)] * x.width)
        positive = builder.fcmp_ordered(">", args[0], ir.Constant(vt, None))
        return builder.select(positive, builder.fdiv(one, args[0]), ir.Constant(vt, None))

    return x(x), codegen


def _prefetcher(name: str, level: int, doc: str):  # type: ignore[no-untyped-def]
    """An intrinsic (ary, i, j) asking for the cache line of ary[i, j] (2-D, C order) ahead of its use, into the caches
    down from `level` (llvm.prefetch's locality: 3 every level, 2 the second and below): a hint (no effect on any
    value, no fault at any address)."""
    def typer(typingctx, ary, i, j):  # type: ignore[no-untyped-def]
        if not isinstance(ary, types.Array):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            array = context.make_array(signature.args[0])(context, builder, args[0])
            item = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1], args[2]],
                                            wraparound=False)
            byte, int32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(ir.VoidType(), [byte, int32, int32, int32]),
                                                f"llvm.prefetch.{byte.intrinsic_name}")  # p0, or p0i8 (typed pointers)
            read, locality, data = ir.Constant(int32, 0), ir.Constant(int32, level), ir.Constant(int32, 1)
            builder.call(fn, [builder.bitcast(item, byte), read, locality, data])
            return context.get_dummy_value()

        return types.none(ary, i, j), codegen

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


prefetch = _prefetcher("prefetch", 3, "Ask for the cache line of ary[i, j] into every level (a hint).")
prefetch_l2 = _prefetcher("prefetch_l2", 2, "Ask for the cache line of ary[i, j] into L2 and below, not L1 (a hint).")


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _keys8(wl, qt, qc, kr, key, limit, scale, s, row, sc, at, lo, hi, fill, mv):  # type: ignore[no-untyped-def]
    """s[row + i, sc + l] = scale · Σ_f k[min(key + i, limit), f] · qt[f, qc + l] for i < 8 and the lanes l: a block of
    queries (one per lane) against eight keys, each k value broadcast into an FMA (k as it is, rows of d); lanes
    where the key's place in the union (at + i) is outside [lo, hi] get `fill` (−inf). Returns mv, lane by lane
    the max of mv and the scores written."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero(wl, scale)
    k0, k1, k2, k3 = kr[min(key, limit)], kr[min(key + 1, limit)], kr[min(key + 2, limit)], kr[min(key + 3, limit)]
    k4, k5, k6, k7 = kr[min(key + 4, limit)], kr[min(key + 5, limit)], kr[min(key + 6, limit)], kr[min(key + 7, limit)]
    for f in range(qt.shape[0]):
        x = vload(wl, qt, f, qc)
        a0 = vfma(a0, k0[f], x)
        a1 = vfma(a1, k1[f], x)
        a2 = vfma(a2, k2[f], x)
        a3 = vfma(a3, k3[f], x)
        a4 = vfma(a4, k4[f], x)
        a5 = vfma(a5, k5[f], x)
        a6 = vfma(a6, k6[f], x)
        a7 = vfma(a7, k7[f], x)
    zero = vzero(wl, scale)
    one = scale / scale
    t0 = vwithin(vfma(zero, scale, a0), at, lo, hi, fill)
    t1 = vwithin(vfma(zero, scale, a1), at + one, lo, hi, fill)
    t2 = vwithin(vfma(zero, scale, a2), at + 2 * one, lo, hi, fill)
    t3 = vwithin(vfma(zero, scale, a3), at + 3 * one, lo, hi, fill)
    t4 = vwithin(vfma(zero, scale, a4), at + 4 * one, lo, hi, fill)
    t5 = vwithin(vfma(zero, scale, a5), at + 5 * one, lo, hi, fill)
    t6 = vwithin(vfma(zero, scale, a6), at + 6 * one, lo, hi, fill)
    t7 = vwithin(vfma(zero, scale, a7), at + 7 * one, lo, hi, fill)
    vstore(s, row, sc, t0)
    vstore(s, row + 1, sc, t1)
    vstore(s, row + 2, sc, t2)
    vstore(s, row + 3, sc, t3)
    vstore(s, row + 4, sc, t4)
    vstore(s, row + 5, sc, t5)
    vstore(s, row + 6, sc, t6)
    vstore(s, row + 7, sc, t7)
    return vmax(vmax(vmax(mv, t0), vmax(t1, t2)), vmax(vmax(t3, t4), vmax(vmax(t5, t6), t7)))


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _keys8_half(wl, wh, qt, qc, col, kr, key, limit, scale, s, row, at, window, fill, mv):  # type: ignore[no-untyped-def]
    """_keys8 for the half of the lanes from col (0 or half the lanes; wh: their Width) where the other half's windows
    miss the eight keys (half the FMAs), the other half `fill`; returns mv's max with the eight rows."""
    lo, hi = vload(wh, window, 0, col), vload(wh, window, 1, col)
    _keys8(wh, qt, qc + col, kr, key, limit, scale, s, row, col, at, lo, hi, fill, vsplat(wh, fill))
    other = width_of(wh) - col
    for i in range(8):
        vstore(s, row + i, other, vsplat(wh, fill))
        mv = vmax(mv, vload(wl, s, row + i, 0))
    return mv


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _weighted4(we, rows, key, s, row, lane, first, last, o0, o1, o2, o3):  # type: ignore[no-untyped-def]
    """o_r += Σ_{first <= j <= last} s[row + j, lane + r] · rows[key + j] for r < 4: four lanes' sums over the union of
    their keys, each row loaded once for four FMAs."""
    for j in range(first, last + 1):
        x = vload(we, rows, key + j, 0)
        w = s[row + j]
        o0 = vfma(o0, w[lane], x)
        o1 = vfma(o1, w[lane + 1], x)
        o2 = vfma(o2, w[lane + 2], x)
        o3 = vfma(o3, w[lane + 3], x)
    return o0, o1, o2, o3


@njit(cache=True, fastmath=FAST, nogil=True, inline="always")
def _prefetch_rows(ary, first, last):  # type: ignore[no-untyped-def]
    """Ask for every cache line of the rows first … last − 1 of ary (2-D, C order)."""
    step = 64 // ary.itemsize
    for i in range(first, last):
        for f in range(0, ary.shape[1], step):
            prefetch_l2(ary, i, f)


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
def forward_lanes(q, k, v, pos0, pos1, rel0, rel1, runs, k2, union, keep, heads, rpb, c, out, lse, wl, wh, we, stream):  # type: ignore[no-untyped-def]
    """forward's out and lse for windows whose keys on the last axis are a contiguous run (runs (L_2, 3): each
    last-axis position's first key, last key and the bias index of the first), L_2 >= the lanes of a register
    (wl: Width). A block is `lanes` consecutive queries of a line, one per lane, against the union of their
    keys on the last axis (at most lanes + k2 − 1: `union`, rounded up to 8, is the scores' rows per window
    row): one vector of scores per key, Σ_f k[j, f] · qᵀ[f, :] (q transposed per unit, k as it is; keys only half
    the lanes need in half-width vectors, wh: half the lanes); lanes outside a query's own window are masked (−inf,
    weight 0), the softmax runs down the keys in vectors, and the outputs take four lanes at a time over the union
    of their keys. we: the value width (Width); stream: write out by non-temporal stores (the caller has checked
    that out's rows start at multiples of 64 bytes)."""
    rows, d = q.shape[0], q.shape[2]
    l0, l1, l2 = pos0.shape[0], pos1.shape[0], runs.shape[0]
    k0, k1 = pos0.shape[1], pos1.shape[1]
    r1 = 2 * k1 - 1
    lanes = width_of(wl)
    half = width_of(wh)
    e = (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15],
         c[16], c[17], c[18], c[19], c[20], c[21], c[22])
    r2 = 2 * k2 - 1
    lines = l0 * l1
    chunks = (l2 + CHUNK - 1) // CHUNK
    use_keep, use_rpb = keep.shape[1] > 0, rpb.shape[1] > 0
    units = rows * lines * chunks
    for unit in prange(units):
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
        g = _line_rows(x, y, pos0, pos1, rel0, rel1, l2, r1, r2, bases, rels, np.empty(k0 * k1, np.int64))
        # the chunk's queries zq … stop − 1 (the last block moved back to end at the line's end), transposed
        line_start = line * l2
        zq = max(0, min(start, l2 - lanes))
        qt = np.empty((d, stop - zq), q.dtype)
        _transpose_rows(qr, line_start + zq, stop - zq, qt, 0)
        s = np.empty((max(g, 1) * union, lanes), q.dtype)  # the scores, then weights, by window row and key
        # the next unit's row of q and its first and last queries + 1 (as zq and stop are this unit's)
        nrow, nline = (unit + 1) // (lines * chunks), ((unit + 1) // chunks) % lines
        nstart = (unit + 1) % chunks * CHUNK
        nfirst, nlast = nline * l2 + max(0, min(nstart, l2 - lanes)), nline * l2 + min(nstart + CHUNK, l2)
        window = np.empty((2, lanes), q.dtype)  # each lane's first and last key in the union
        stats = np.empty((2, lanes), q.dtype)  # each query's 1 / sum of weights, then its logsumexp
        for z_next in range(start, stop, lanes):
            z0 = min(z_next, l2 - lanes)
            first, last = runs[z0, 0], runs[z0, 1]  # the block's union of keys on the last axis
            for lane in range(lanes):
                first, last = min(first, runs[z0 + lane, 0]), max(last, runs[z0 + lane, 1])
            width = last - first + 1
            for lane in range(lanes):
                window[0, lane], window[1, lane] = runs[z0 + lane, 0] - first, runs[z0 + lane, 1] - first
            # the first new row of q, k, v AHEAD blocks on (a block's rows are about a 4 KiB page, where the hardware's
            # prefetch stops): asked for now, so that its page is found and its stream started before it is needed
            ahead = min(bases[g - 1] + last + 1 + (AHEAD - 1) * lanes, bases[g - 1] + l2 - 1)
            prefetch(kr, ahead, 0)
            prefetch(vr, ahead, 0)
            _prefetch_rows(kr, ahead, min(ahead + lanes, bases[g - 1] + l2))
            _prefetch_rows(vr, ahead, min(ahead + lanes, bases[g - 1] + l2))
            prefetch(qr, min(line_start + z0 + AHEAD * lanes, qr.shape[0] - 1), 0)
            # the next unit's q, a block's share of its rows at each block: its transposition reads them all at once
            if unit + 1 < units:
                _prefetch_rows(q[nrow], nfirst + z_next - start, min(nfirst + z_next - start + lanes, nlast))
            # the scores, −inf outside each lane's window, and their max lane by lane
            lo, hi = vload(wl, window, 0, 0), vload(wl, window, 1, 0)
            mv = vsplat(wl, e[NEG_INF])
            for u in range(g):
                at = e[ZERO]  # j, in the scores' type
                for j in range(0, width, 8):  # keys past the union (up to 7) take the line's last key: masked
                    key, limit = bases[u] + first + j, bases[u] + l2 - 1
                    if window[0, half] > j + 7:  # only the first half of the lanes has any of the eight keys
                        mv = _keys8_half(wl, wh, qt, z0 - zq, 0, kr, key, limit, e[SCALE], s, u * union + j, at, window,
                                         e[NEG_INF], mv)
                    elif window[1, half - 1] < j:  # only the second half
                        mv = _keys8_half(wl, wh, qt, z0 - zq, half, kr, key, limit, e[SCALE], s, u * union + j, at,
                                         window, e[NEG_INF], mv)
                    else:
                        mv = _keys8(wl, qt, z0 - zq, kr, key, limit, e[SCALE], s, u * union + j, 0, at, lo, hi,
                                    e[NEG_INF], mv)
                    at += 8 * e[ONE]
            if use_rpb or use_keep:  # the bias on each lane's window; a masked key's row −inf; the max again
                for u in range(g):
                    for lane in range(lanes):
                        rb = rels[u] + runs[z0 + lane, 2] - (runs[z0 + lane, 0] - first)
                        for j in range(runs[z0 + lane, 0] - first, runs[z0 + lane, 1] - first + 1):
                            if use_rpb:
                                s[u * union + j, lane] += rpb[h, rb + j]
                    if use_keep:
                        for j in range(width):
                            if not keep_row[bases[u] + first + j]:
                                s[u * union + j, :] = e[NEG_INF]
                mv = vsplat(wl, e[NEG_INF])
                for u in range(g):
                    for j in range(width):
                        mv = vmax(mv, vload(wl, s, u * union + j, 0))
            # the softmax of each lane over its own window: the weights (vexp: 0 for −inf) and their sum, in
            # vectors down the keys
            tv = vzero(wl, c[ZERO])
            for u in range(g):
                for j in range(width):
                    p = vexp(vload(wl, s, u * union + j, 0), mv)
                    vstore(s, u * union + j, 0, p)
                    tv = vadd(tv, p)
            qb = line_start + z0
            vstore(lse, row, qb, vlse(mv, tv))
            vstore(stats, 0, 0, vinv(tv))
            # outputs: four lanes at a time over the union of their windows
            zero = vzero(we, c[ZERO])
            for lane in range(0, lanes, QUERIES):
                j0 = int(min(min(window[0, lane], window[0, lane + 1]), min(window[0, lane + 2], window[0, lane + 3])))
                j1 = int(max(max(window[1, lane], window[1, lane + 1]), max(window[1, lane + 2], window[1, lane + 3])))
                o0 = o1 = o2 = o3 = vzero(we, c[ZERO])
                for u in range(g):
                    o0, o1, o2, o3 = _weighted4(we, vr, bases[u] + first, s, u * union, lane, j0, j1, o0, o1, o2, o3)
                if stream:
                    vstream(orow, qb + lane, 0, vfma(zero, stats[0, lane], o0))
                    vstream(orow, qb + lane + 1, 0, vfma(zero, stats[0, lane + 1], o1))
                    vstream(orow, qb + lane + 2, 0, vfma(zero, stats[0, lane + 2], o2))
                    vstream(orow, qb + lane + 3, 0, vfma(zero, stats[0, lane + 3], o3))
                else:
                    vstore(orow, qb + lane, 0, vfma(zero, stats[0, lane], o0))
                    vstore(orow, qb + lane + 1, 0, vfma(zero, stats[0, lane + 1], o1))
                    vstore(orow, qb + lane + 2, 0, vfma(zero, stats[0, lane + 2], o2))
                    vstore(orow, qb + lane + 3, 0, vfma(zero, stats[0, lane + 3], o3))
        if stream:
            fence()
