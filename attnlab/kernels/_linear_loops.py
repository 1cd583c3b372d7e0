"""Causal linear attention (no decay, no delta rule) as chunked loops, compiled with numba (imported only when
numba is).

Why loops: the PyTorch chunked form runs C × C products as batched matmuls over every chunk at
once, so each intermediate (scores, chunk states, their prefix sums) is a full tensor written to
and read from memory, and torch's batched matmul on 64 × 64 blocks out of cache reaches about a
third of a large matmul's rate. Here one (batch·head) row is one unit: its state S (d_k × e) stays
in cache while the chunks stream past, nothing of size N × d² is ever built, the causal triangle is
skipped (a C × C block costs half a product), and the rows run in parallel (`prange`).

Per chunk (queries Q, keys K, values V of its L <= C tokens; e = d_v + 1 when normalising, the extra
value column being 1 so that the same products give the denominator):

    forward:   P = tril(Q Kᵀ),  O = Q S + P V,  out = O[:, :d_v] / max(O[:, d_v], floor),  S += Kᵀ V
    backward:  dO = [g / D, −(g·out) / D] (D = max(den, floor); the last column 0 where den < floor)
               first pass, chunks in order:    dP = tril(dO Vᵀ),  dQ = dO Sᵀ + dP K,  S += Kᵀ V
               second pass, chunks reversed:   dK = V Gᵀ + dPᵀ Q,  dV = K G + Pᵀ dO,  G += Qᵀ dO

(G = Σ over later chunks of Qᵀ dO.) Every product is one helper, `_gemm_nt` (C = A Bᵀ over rows
that are contiguous), in 4 × 4 register tiles whose sums vectorise along the reduction; its
accumulators are typed as the output (`dtype.type(0)`), so float32 stays float32 (a literal 0.0
would make them float64 and halve the rate). Measured here, one thread: a 64³ tile product at run-time
sizes ~30–40 GFLOP/s against ~95 for a 2048³ matmul (the lane sums closing each tile cost about as much
as the products); the whole forward ~0.45 of the matmul rate by `linear_flops` (the skipped triangle
makes up part of the gap), the backward ~3.6× the forward. Tried and dropped: concatenating operands
into one longer reduction per product (e.g. [Q | P][S | V]ᵀ) was no faster forward and slower backward.

Compilation: ~40 s for float32 on first use (with numba's import), ~20 s more for float64; `cache=True`
keeps the result on disk, so later processes load it in under a second.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

NONE, LOWER, UPPER = 0, 1, 2  # a triangle: j <= i (LOWER) or j >= i (UPPER) of a C × C block


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


@njit(fastmath=True, nogil=True, parallel=True, cache=True)
def causal_forward(q, k, v, out, den, chunk, normalize, floor):  # type: ignore[no-untyped-def]
    """q, k (R, n, d_k), v (R, n, d_v) -> out (R, n, d_v) and den (R, n) (the raw denominators), in place.

    All arrays C-contiguous of one dtype; `floor` (the smallest denominator) of that dtype too."""
    rows, n, d = q.shape
    dv = v.shape[2]
    ext = dv + 1 if normalize else dv
    for r in prange(rows):
        state_t = np.zeros((ext, d), q.dtype)  # Sᵀ: state_t[j, c] = Σ_s v_ext[s, j] k[s, c]
        k_t = np.empty((d, chunk), q.dtype)
        ve = np.empty((chunk, ext), q.dtype)
        ve_t = np.empty((ext, chunk), q.dtype)
        scores = np.empty((chunk, chunk), q.dtype)
        acc = np.empty((chunk, ext), q.dtype)
        for t0 in range(0, n, chunk):
            size = min(chunk, n - t0)
            qc, kc = q[r, t0 : t0 + size], k[r, t0 : t0 + size]
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


@njit(fastmath=True, nogil=True, parallel=True, cache=True)
def causal_backward(q, k, v, out, den, g, dq, dk, dv_out, chunk, normalize, floor):  # type: ignore[no-untyped-def]
    """The gradients of `causal_forward` for the output gradient g (R, n, d_v): dq, dk, dv_out in place."""
    rows, n, d = q.shape
    dv = v.shape[2]
    ext = dv + 1 if normalize else dv
    last = ((n - 1) // chunk) * chunk
    for r in prange(rows):
        state = np.zeros((d, ext), q.dtype)  # S[c, j]
        carry = np.zeros((d, ext), q.dtype)  # G[c, j] = Σ_(later chunks) q[t, c] dO[t, j]
        carry_t = np.empty((ext, d), q.dtype)
        k_t = np.empty((d, chunk), q.dtype)
        q_t = np.empty((d, chunk), q.dtype)
        ve = np.empty((chunk, ext), q.dtype)
        ve_t = np.empty((ext, chunk), q.dtype)
        go = np.empty((chunk, ext), q.dtype)
        go_t = np.empty((ext, chunk), q.dtype)
        block = np.empty((chunk, chunk), q.dtype)
        block2 = np.empty((chunk, chunk), q.dtype)
        acc = np.empty((chunk, d), q.dtype)
        acc_v = np.empty((chunk, dv), q.dtype)
        for t0 in range(0, n, chunk):  # dQ, chunks in order
            size = min(chunk, n - t0)
            kc = k[r, t0 : t0 + size]
            _transpose(kc, k_t, size, d)
            _values_ext(v[r], t0, size, dv, ext, ve)
            _transpose(ve, ve_t, size, ext)
            _grad_ext(g[r], out[r], den[r], t0, size, dv, ext, floor, go)
            _gemm_nt(go, ve, block, size, size, ext, LOWER, NONE, False)  # dP = tril(dO Vᵀ)
            _gemm_nt(go, state, acc, size, d, ext, NONE, NONE, False)  # dO Sᵀ
            _gemm_nt(block, k_t, acc, size, d, size, NONE, LOWER, True)  # + dP K
            dq[r, t0 : t0 + size] = acc[:size]
            _gemm_nt(k_t, ve_t, state, d, ext, size, NONE, NONE, True)  # S += Kᵀ V
        for t0 in range(last, -1, -chunk):  # dK, dV, chunks reversed
            size = min(chunk, n - t0)
            qc, kc = q[r, t0 : t0 + size], k[r, t0 : t0 + size]
            _transpose(qc, q_t, size, d)
            _values_ext(v[r], t0, size, dv, ext, ve)
            _grad_ext(g[r], out[r], den[r], t0, size, dv, ext, floor, go)
            _transpose(go, go_t, size, ext)
            _transpose(carry, carry_t, d, ext)
            _gemm_nt(kc, qc, block, size, size, d, UPPER, NONE, False)  # Pᵀ = triu(K Qᵀ)
            _gemm_nt(ve, go, block2, size, size, ext, UPPER, NONE, False)  # dPᵀ = triu(V dOᵀ)
            _gemm_nt(ve, carry, acc, size, d, ext, NONE, NONE, False)  # V Gᵀ
            _gemm_nt(block2, q_t, acc, size, d, size, NONE, UPPER, True)  # + dPᵀ Q
            dk[r, t0 : t0 + size] = acc[:size]
            _gemm_nt(kc, carry_t, acc_v, size, dv, d, NONE, NONE, False)  # K G (value columns only)
            _gemm_nt(block, go_t, acc_v, size, dv, size, NONE, UPPER, True)  # + Pᵀ dO
            dv_out[r, t0 : t0 + size] = acc_v[:size]
            _gemm_nt(q_t, go_t, carry, d, ext, size, NONE, NONE, True)  # G += Qᵀ dO
