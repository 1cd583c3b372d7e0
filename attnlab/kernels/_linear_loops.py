"""Causal linear attention (no decay, no delta rule) as chunked loops, compiled with numba (imported only when
numba is).

Why loops: the PyTorch chunked form runs C × C products as batched matmuls over every chunk at
once, so each intermediate (scores, chunk states, their prefix sums) is a full tensor written to
and read from memory, and torch's batched matmul on 64 × 64 blocks out of cache reaches about a
third of a large matmul's rate. Here one (batch·head) row is one unit: its state S (d_k × e) stays
in cache while the chunks stream past, nothing of size N × d² is ever built, the causal triangle is
skipped (a C × C block costs half a product), and the rows run in parallel (each kernel call is one row, or
in the backward one of its two passes; the caller's worker threads take them from a shared counter, see
`linear_scan._over_rows`).

Per chunk (queries Q, keys K, values V of its L <= C tokens; e = d_v + 1 when normalising, the extra
value column being 1 so that the same products give the denominator):

    forward:   P = tril(Q Kᵀ),  O = Q S + P V,  out = O[:, :d_v] / max(O[:, d_v], floor),  S += Kᵀ V
    backward:  dO = [g / D, −(g·out) / D] (D = max(den, floor); the last column 0 where den < floor)
               query pass, chunks in order:    dP = tril(dO Vᵀ),  dQ = dO Sᵀ + dP K,  S += Kᵀ V
               key pass, chunks reversed:      dK = V Gᵀ + dPᵀ Q,  dV = K G + Pᵀ dO,  G += Qᵀ dO

(G = Σ over later chunks of Qᵀ dO.) Every product is one helper, `_gemm_nt` (C = A Bᵀ over rows
that are contiguous), in 4 × 4 register tiles whose sums vectorise along the reduction; its
accumulators are typed as the output (`dtype.type(0)`), so float32 stays float32 (a literal 0.0
would make them float64 and halve the rate). Measured here, one thread: a 64³ tile product at run-time
sizes ~30–40 GFLOP/s against ~95 for a 2048³ matmul (the lane sums closing each tile cost about as much
as the products); the whole forward ~0.45 of the matmul rate by `linear_flops` (the skipped triangle
makes up part of the gap), the backward ~3.6× the forward. Tried and dropped: concatenating operands
into one longer reduction per product (e.g. [Q | P][S | V]ᵀ) was no faster forward and slower backward.
Also dropped: the broadcast-FMA form C[i, j:j+16] += A[i, p] Bᵀ[p, j:j+16] (no lane sums). Measured on a
hot 64³ product, one thread: this reduction form 64 GFLOP/s; broadcast with the 4 × 16 accumulators as
scalars 6 GFLOP/s (numba's LLVM packs them only partly: 64 scalar FMAs beside 64 zmm ones, ~100 spills);
broadcast accumulating into the output rows (one zmm FMA per 16 columns, C reloaded and stored every p)
40–44 GFLOP/s. numba has no vector types to hold a register tile, so the lane sums stay.

Feature map: with fmap = ELU1 the loops take the raw projections and apply φ(x) = elu(x) + 1 to each
q and k chunk as they load it (`_map_chunk`, with its own vectorised e^x, since numba has no vector
math library here and libm's exp one element at a time cost ~5 ns per element, more than the map
saved); the backward reloads φ and multiplies dq, dk by φ'(x) = min(φ(x), 1) (1 for x > 0, e^x
otherwise). A padded key's φ(k) is set to 0 from the keep mask (its raw k, zeroed by the caller,
would map to 1). This saves the two N × d tensors φ(q), φ(k): at N = 16k, 8 heads, one thread, ~30 ms
each (elu ~11 ms, the rest the first touch of each fresh 32 MiB), against ~9 ms for both maps here.

Compilation: ~13 s for float32 on first use (fwd + bwd, with numba's import; one-row kernels, no parfors),
~10 s more for float64; `cache=True` keeps the result on disk, so later processes load it in under a second.
"""
from __future__ import annotations

import numpy as np
from numba import njit

NONE, LOWER, UPPER = 0, 1, 2  # a triangle: j <= i (LOWER) or j >= i (UPPER) of a C × C block
IDENTITY, ELU1 = 0, 1  # the feature map the loops apply to q and k chunks: none, or elu(x) + 1
EXP_TERMS = 13  # Taylor terms of e^r on |r| <= ln2 / 2: truncation (ln2/2)^13 / 13! ~ 3e-16
# fastmath without reassociation for the map: reassociating would fold the two-part ln 2 of the reduction
# x − n ln2_hi − n ln2_lo into one rounded ln 2 (an error of n ulp, ~100 ulp near the float64 underflow)
NO_REASSOCIATION = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
POW2_STEPS = 10  # 2^−m for 0 <= m < 1024 as a product of 2^−512, 2^−256, …, 2^−1


def exp_constants(dtype: np.dtype) -> np.ndarray:
    """The constants of `_map_chunk`'s e^x (x <= 0) in `dtype`: log2 e, ln2 split in a high part (exact times
    any exponent below 2^11) and the rest, the lowest x kept (below it e^x is taken as 0: the smallest normal
    number's log), the Taylor coefficients 1/i!, then the powers 2^−512 … 2^−1."""
    info = np.finfo(dtype)
    lowest = np.log(info.tiny)
    coef = [1.0]
    for i in range(1, EXP_TERMS):
        coef.append(coef[-1] / i)
    steps = [2.0 ** -(1 << e) for e in range(POW2_STEPS - 1, -1, -1)]
    ln2_hi, ln2_lo = 0.693145751953125, 1.4286068203094172321e-06  # ln 2 = 0.69314718055994530941723…
    return np.array([1.0 / np.log(2.0), ln2_hi, ln2_lo, lowest, *coef, *steps], dtype=dtype)


@njit(fastmath=NO_REASSOCIATION, nogil=True, cache=True)
def _map_chunk(src, t0, size, d, fmap, keep, cst, dst):  # type: ignore[no-untyped-def]
    """dst[s] = φ(src[t0 + s]) for s < size (φ = identity or elu + 1), 0 where keep (a row of 0/1 per key,
    or empty: keep all) says padding.

    elu(x) + 1 is x + 1 for x > 0 and e^x otherwise. e^x is computed here rather than by libm's exp,
    which numba calls one element at a time (no vector math library): x = n ln2 + r with n = round(x log2 e),
    e^r by Taylor terms (|r| <= ln2 / 2), times 2^n built from powers 2^−512 … 2^−1 by selects. Every
    step is elementwise with no branch, so the loop over a row vectorises; the error is a few ulp."""
    zero, one, half = dst.dtype.type(0), dst.dtype.type(1), dst.dtype.type(0.5)
    log2e, ln2_hi, ln2_lo, lowest = cst[0], cst[1], cst[2], cst[3]
    # constants in locals (loads from `cst` under a select would keep the loop from vectorising)
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12 = (
        cst[4], cst[5], cst[6], cst[7], cst[8], cst[9], cst[10], cst[11], cst[12], cst[13], cst[14], cst[15], cst[16])
    s9, s8, s7, s6, s5, s4, s3, s2, s1, s0 = (
        cst[17], cst[18], cst[19], cst[20], cst[21], cst[22], cst[23], cst[24], cst[25], cst[26])
    b9, b8, b7, b6, b5 = (dst.dtype.type(512), dst.dtype.type(256), dst.dtype.type(128), dst.dtype.type(64),
                          dst.dtype.type(32))
    b4, b3, b2, b1 = dst.dtype.type(16), dst.dtype.type(8), dst.dtype.type(4), dst.dtype.type(2)
    masked = keep.shape[0] > 0
    for s in range(size):
        if masked and keep[t0 + s] == 0:
            for j in range(d):
                dst[s, j] = zero
            continue
        if fmap == IDENTITY:
            for j in range(d):
                dst[s, j] = src[t0 + s, j]
            continue
        for j in range(d):
            x = src[t0 + s, j]
            y = min(max(x, lowest), zero)
            n = np.floor(y * log2e + half)
            r = (y - n * ln2_hi) - n * ln2_lo
            p = ((((((c12 * r + c11) * r + c10) * r + c9) * r + c8) * r + c7) * r + c6) * r + c5
            p = ((((p * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
            m = -n  # 0 <= m < 1024: p · 2^−m, one power of two per bit of m
            for step, power in ((b9, s9), (b8, s8), (b7, s7), (b6, s6), (b5, s5), (b4, s4), (b3, s3), (b2, s2),
                                (b1, s1), (one, s0)):
                take = m >= step
                p *= power if take else one
                m -= step if take else zero
            e = p if x >= lowest else zero
            dst[s, j] = x + one if x > zero else e


@njit(fastmath=True, nogil=True, cache=True)
def _times_map_slope(acc, fx, size, d, fmap, dst, t0):  # type: ignore[no-untyped-def]
    """dst[t0 + s] = acc[s] φ'(x) for s < size, from fx = φ(x): φ' = 1 (identity), or min(φ(x), 1) for elu + 1
    (1 where x > 0, e^x = φ(x) otherwise); a padded key (φ = 0) gets 0 either way under elu + 1."""
    one = dst.dtype.type(1)
    for s in range(size):
        if fmap == IDENTITY:
            for j in range(d):
                dst[t0 + s, j] = acc[s, j]
        else:
            for j in range(d):
                dst[t0 + s, j] = acc[s, j] * min(fx[s, j], one)


@njit(fastmath=True, nogil=True, cache=True)
def _gemm_nt(a, b, out, m, n, kl, out_tri, a_tri, accumulate):  # type: ignore[no-untyped-def]
    """out[i, j] (+)= Σ_l a[i, l] b[j, l] for i < m, j < n, l < kl.

    out_tri LOWER / UPPER: only j <= i / j >= i is computed, the rest of the row set to 0 (not with
    accumulate). a_tri LOWER / UPPER: a[i, l] is 0 for l > i / l < i, so those terms are skipped.
    """
    zero = out.dtype.type(0)
    for i0 in range(0, m, 4):
        j_lo, j_hi = 0, n
        if out_tri == LOWER:
            j_hi = min(n, i0 + 4)
        elif out_tri == UPPER:
            j_lo = i0
        l_lo, l_hi = 0, kl
        if a_tri == LOWER:
            l_hi = min(kl, i0 + 4)
        elif a_tri == UPPER:
            l_lo = i0
        for j0 in range(j_lo, j_hi, 4):
            if i0 + 4 <= m and j0 + 4 <= n:
                a0, a1, a2, a3 = a[i0], a[i0 + 1], a[i0 + 2], a[i0 + 3]
                b0, b1, b2, b3 = b[j0], b[j0 + 1], b[j0 + 2], b[j0 + 3]
                c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = zero
                c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = zero
                for p in range(l_lo, l_hi):
                    x0, x1, x2, x3 = a0[p], a1[p], a2[p], a3[p]
                    y0, y1, y2, y3 = b0[p], b1[p], b2[p], b3[p]
                    c00 += x0 * y0
                    c01 += x0 * y1
                    c02 += x0 * y2
                    c03 += x0 * y3
                    c10 += x1 * y0
                    c11 += x1 * y1
                    c12 += x1 * y2
                    c13 += x1 * y3
                    c20 += x2 * y0
                    c21 += x2 * y1
                    c22 += x2 * y2
                    c23 += x2 * y3
                    c30 += x3 * y0
                    c31 += x3 * y1
                    c32 += x3 * y2
                    c33 += x3 * y3
                if accumulate:
                    c00 += out[i0, j0]
                    c01 += out[i0, j0 + 1]
                    c02 += out[i0, j0 + 2]
                    c03 += out[i0, j0 + 3]
                    c10 += out[i0 + 1, j0]
                    c11 += out[i0 + 1, j0 + 1]
                    c12 += out[i0 + 1, j0 + 2]
                    c13 += out[i0 + 1, j0 + 3]
                    c20 += out[i0 + 2, j0]
                    c21 += out[i0 + 2, j0 + 1]
                    c22 += out[i0 + 2, j0 + 2]
                    c23 += out[i0 + 2, j0 + 3]
                    c30 += out[i0 + 3, j0]
                    c31 += out[i0 + 3, j0 + 1]
                    c32 += out[i0 + 3, j0 + 2]
                    c33 += out[i0 + 3, j0 + 3]
                out[i0, j0], out[i0, j0 + 1], out[i0, j0 + 2], out[i0, j0 + 3] = c00, c01, c02, c03
                out[i0 + 1, j0], out[i0 + 1, j0 + 1], out[i0 + 1, j0 + 2], out[i0 + 1, j0 + 3] = c10, c11, c12, c13
                out[i0 + 2, j0], out[i0 + 2, j0 + 1], out[i0 + 2, j0 + 2], out[i0 + 2, j0 + 3] = c20, c21, c22, c23
                out[i0 + 3, j0], out[i0 + 3, j0 + 1], out[i0 + 3, j0 + 2], out[i0 + 3, j0 + 3] = c30, c31, c32, c33
            else:
                for i in range(i0, min(i0 + 4, m)):
                    for j in range(j0, min(j0 + 4, n)):
                        acc = zero
                        for p in range(l_lo, l_hi):
                            acc += a[i, p] * b[j, p]
                        out[i, j] = out[i, j] + acc if accumulate else acc
        if out_tri == LOWER:
            for i in range(i0, min(i0 + 4, m)):
                for j in range(i + 1, n):
                    out[i, j] = zero
        elif out_tri == UPPER:
            for i in range(i0, min(i0 + 4, m)):
                for j in range(0, i):
                    out[i, j] = zero


@njit(fastmath=True, nogil=True, cache=True)
def _transpose(src, dst, rows, cols):  # type: ignore[no-untyped-def]
    """dst[j, i] = src[i, j] for i < rows, j < cols."""
    for i in range(rows):
        for j in range(cols):
            dst[j, i] = src[i, j]


@njit(fastmath=True, nogil=True, cache=True)
def _values_ext(v, t0, rows, dv, ext, dst):  # type: ignore[no-untyped-def]
    """dst[:rows] = [v[t0 : t0 + rows], 1] (the ones column only when ext > dv)."""
    one = dst.dtype.type(1)
    for s in range(rows):
        for j in range(dv):
            dst[s, j] = v[t0 + s, j]
        if ext > dv:
            dst[s, dv] = one


@njit(fastmath=True, nogil=True, cache=True)
def _grad_ext(g, out, den, t0, rows, dv, ext, floor, dst):  # type: ignore[no-untyped-def]
    """dst[:rows] = the gradient of the unnormalised [numerator, denominator] rows (see the module docstring)."""
    zero = dst.dtype.type(0)
    for t in range(rows):
        if ext == dv:
            for j in range(dv):
                dst[t, j] = g[t0 + t, j]
            continue
        dn = den[t0 + t]
        inv = dst.dtype.type(1) / max(dn, floor)
        dot = zero
        for j in range(dv):
            dst[t, j] = g[t0 + t, j] * inv
            dot += g[t0 + t, j] * out[t0 + t, j]
        dst[t, dv] = -dot * inv if dn >= floor else zero


@njit(fastmath=True, nogil=True, cache=True)
def causal_forward(r, q, k, v, out, den, chunk, normalize, floor, fmap, keep, heads, cst):  # type: ignore[no-untyped-def]
    """Row r of q, k (R, n, d_k), v (R, n, d_v) -> out[r] (n, d_v) and den[r] (n) (the raw denominators), in place.

    fmap: the feature map applied to q and k chunk by chunk (IDENTITY or ELU1, constants `cst` of
    `exp_constants`); keep (batch, n) 0/1, row r's keys in keep[r // heads] (shape (1, 0): no padding),
    a padded key's φ(k) is 0. All arrays C-contiguous of one dtype (keep uint8); `floor` (the smallest
    denominator) of that dtype too."""
    n, d = q.shape[1], q.shape[2]
    dv = v.shape[2]
    ext = dv + 1 if normalize else dv
    keep_row = keep[(r // heads) % keep.shape[0]]
    state_t = np.zeros((ext, d), q.dtype)  # Sᵀ: state_t[j, c] = Σ_s v_ext[s, j] k[s, c]
    qc = np.empty((chunk, d), q.dtype)
    kc = np.empty((chunk, d), q.dtype)
    k_t = np.empty((d, chunk), q.dtype)
    ve = np.empty((chunk, ext), q.dtype)
    ve_t = np.empty((ext, chunk), q.dtype)
    scores = np.empty((chunk, chunk), q.dtype)
    acc = np.empty((chunk, ext), q.dtype)
    for t0 in range(0, n, chunk):
        size = min(chunk, n - t0)
        _map_chunk(q[r], t0, size, d, fmap, keep_row[:0], cst, qc)
        _map_chunk(k[r], t0, size, d, fmap, keep_row, cst, kc)
        _transpose(kc, k_t, size, d)
        _values_ext(v[r], t0, size, dv, ext, ve)
        _transpose(ve, ve_t, size, ext)
        _gemm_nt(qc, kc, scores, size, size, d, LOWER, NONE, False)  # P = tril(Q Kᵀ)
        _gemm_nt(qc, state_t, acc, size, ext, d, NONE, NONE, False)  # Q S
        _gemm_nt(scores, ve_t, acc, size, ext, size, NONE, LOWER, True)  # + P V
        for t in range(size):
            if normalize:
                dn = acc[t, dv]
                den[r, t0 + t] = dn
                inv = q.dtype.type(1) / max(dn, floor)
                for j in range(dv):
                    out[r, t0 + t, j] = acc[t, j] * inv
            else:
                for j in range(dv):
                    out[r, t0 + t, j] = acc[t, j]
        _gemm_nt(ve_t, k_t, state_t, ext, d, size, NONE, NONE, True)  # S += Kᵀ V


@njit(fastmath=True, nogil=True, cache=True)
def causal_backward_queries(r, q, k, v, out, den, g, dq, dk, dv_out, chunk, normalize, floor, fmap, keep, heads, cst):  # type: ignore[no-untyped-def]
    """Row r's dq of `causal_forward` for the output gradient g (R, n, d_v), in place (with respect to the input
    of the feature map: dq = φ'(q) ⊙ dφ(q)): the first pass of the backward, chunks in order. Independent of
    `causal_backward_keys` (dk, dv_out untouched), so the two run as separate units of work."""
    n, d = q.shape[1], q.shape[2]
    dv = v.shape[2]
    ext = dv + 1 if normalize else dv
    keep_row = keep[(r // heads) % keep.shape[0]]
    state = np.zeros((d, ext), q.dtype)  # S[c, j]
    qc = np.empty((chunk, d), q.dtype)
    kc = np.empty((chunk, d), q.dtype)
    k_t = np.empty((d, chunk), q.dtype)
    ve = np.empty((chunk, ext), q.dtype)
    ve_t = np.empty((ext, chunk), q.dtype)
    go = np.empty((chunk, ext), q.dtype)
    block = np.empty((chunk, chunk), q.dtype)
    acc = np.empty((chunk, d), q.dtype)
    for t0 in range(0, n, chunk):
        size = min(chunk, n - t0)
        _map_chunk(k[r], t0, size, d, fmap, keep_row, cst, kc)
        _transpose(kc, k_t, size, d)
        _values_ext(v[r], t0, size, dv, ext, ve)
        _transpose(ve, ve_t, size, ext)
        _grad_ext(g[r], out[r], den[r], t0, size, dv, ext, floor, go)
        _gemm_nt(go, ve, block, size, size, ext, LOWER, NONE, False)  # dP = tril(dO Vᵀ)
        _gemm_nt(go, state, acc, size, d, ext, NONE, NONE, False)  # dO Sᵀ
        _gemm_nt(block, k_t, acc, size, d, size, NONE, LOWER, True)  # + dP K
        if fmap != IDENTITY:
            _map_chunk(q[r], t0, size, d, fmap, keep_row[:0], cst, qc)
        _times_map_slope(acc, qc, size, d, fmap, dq[r], t0)
        _gemm_nt(k_t, ve_t, state, d, ext, size, NONE, NONE, True)  # S += Kᵀ V


@njit(fastmath=True, nogil=True, cache=True)
def causal_backward_keys(r, q, k, v, out, den, g, dq, dk, dv_out, chunk, normalize, floor, fmap, keep, heads, cst):  # type: ignore[no-untyped-def]
    """Row r's dk, dv_out of `causal_forward` for the output gradient g, in place (dk with respect to the input of
    the feature map): the second pass of the backward, chunks reversed; dq untouched."""
    n, d = q.shape[1], q.shape[2]
    dv = v.shape[2]
    ext = dv + 1 if normalize else dv
    last = ((n - 1) // chunk) * chunk
    keep_row = keep[(r // heads) % keep.shape[0]]
    carry = np.zeros((d, ext), q.dtype)  # G[c, j] = Σ_(later chunks) q[t, c] dO[t, j]
    carry_t = np.empty((ext, d), q.dtype)
    qc = np.empty((chunk, d), q.dtype)
    kc = np.empty((chunk, d), q.dtype)
    q_t = np.empty((d, chunk), q.dtype)
    ve = np.empty((chunk, ext), q.dtype)
    go = np.empty((chunk, ext), q.dtype)
    go_t = np.empty((ext, chunk), q.dtype)
    block = np.empty((chunk, chunk), q.dtype)
    block2 = np.empty((chunk, chunk), q.dtype)
    acc = np.empty((chunk, d), q.dtype)
    acc_v = np.empty((chunk, dv), q.dtype)
    for t0 in range(last, -1, -chunk):
        size = min(chunk, n - t0)
        _map_chunk(q[r], t0, size, d, fmap, keep_row[:0], cst, qc)
        _map_chunk(k[r], t0, size, d, fmap, keep_row, cst, kc)
        _transpose(qc, q_t, size, d)
        _values_ext(v[r], t0, size, dv, ext, ve)
        _grad_ext(g[r], out[r], den[r], t0, size, dv, ext, floor, go)
        _transpose(go, go_t, size, ext)
        _transpose(carry, carry_t, d, ext)
        _gemm_nt(kc, qc, block, size, size, d, UPPER, NONE, False)  # Pᵀ = triu(K Qᵀ)
        _gemm_nt(ve, go, block2, size, size, ext, UPPER, NONE, False)  # dPᵀ = triu(V dOᵀ)
        _gemm_nt(ve, carry, acc, size, d, ext, NONE, NONE, False)  # V Gᵀ
        _gemm_nt(block2, q_t, acc, size, d, size, NONE, UPPER, True)  # + dPᵀ Q
        _times_map_slope(acc, kc, size, d, fmap, dk[r], t0)
        _gemm_nt(kc, carry_t, acc_v, size, dv, d, NONE, NONE, False)  # K G (value columns only)
        _gemm_nt(block, go_t, acc_v, size, dv, size, NONE, UPPER, True)  # + Pᵀ dO
        dv_out[r, t0 : t0 + size] = acc_v[:size]
        _gemm_nt(q_t, go_t, carry, d, ext, size, NONE, NONE, True)  # G += Qᵀ dO
