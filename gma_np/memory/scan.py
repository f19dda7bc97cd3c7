"""The causal feature memory by a Numba prefix scan: the forward, the reverse-scan backward
and their wrappers (_causal_forward, _causal_backward: allocate, then run a kernel).

Two versions of each kernel: token by token (_causal_scan_forward, _causal_scan_backward,
the plainer loops, described first below) and time-blocked (_causal_scan_forward_blocked,
_causal_scan_backward_blocked: four tokens per pass over the state, eight in the
backward's forward pass, the section further down), which the wrappers run;
tests/test_scan_blocked.py holds one to the other and both to the dense reference. The
blocked forward has two loop orders, over the columns of S^T (_causal_scan_forward_blocked)
and over the rows of S (_causal_scan_forward_blocked_rows, for K <= SCAN_ROWS_MAX_K), and
the blocked backward's second pass one or two state rows per pass (two hand-unrolled
bodies of the same update: one row keeps eight dot products in flight, two rows sixteen,
and which is faster depends on K, docs/performance.md section 2).

Dimension legend: P = batch x heads (flattened), N tokens, K components, e value size.

Every (p) sequence is an independent recurrence over a state of K*(e+1)
numbers, run in parallel over p with prange (numba.set_num_threads, or the
NUMBA_NUM_THREADS environment variable, sets how many threads). Within one
sequence the loop is sequential, so output t depends on tokens 0..t only, bit
for bit.

The loops are fused so that each entry of the memory is read and written once
per token. Forward: the write S += outer(rk[t], v[t]) and the read
num = rq[t] @ S happen in one pass, on a transposed copy of the state, S^T
(e, K), with the contiguous component axis k innermost: each entry is loaded,
updated and stored once, and the read is a dot product over k held in a
register (with S (K, e) and the value axis c innermost, the read's accumulator
num[c] would be a second store per entry; docs/performance.md has the
timings). Backward: the write and the dot
product S[k] . do[t] (pass 1), and the suffix sums (pass 2), over the
contiguous value axis c. LLVM vectorises the innermost loops; fastmath is
limited to "reassoc" and "contract" (reassociate the dot products into vector
lanes, fuse multiply-adds), which changes the rounding of a sum over K or e
terms, never which terms enter it.

Precision: the state S (K, e) and z (K,) are float64 accumulators whatever
the dtype of the inputs, so the float32 error of causal GMA does not grow with
N (docs/numerics.md). Nothing of size N x K x e is ever allocated; the only
N-sized buffers (the per-token read coefficients of the backward, and the states the
forward keeps every SCAN_CHECKPOINT_TOKENS tokens for the backward's chunks,
scan_checkpoints) are allocated by the wrappers or their caller, so that Python's
tracemalloc sees them.

The blocked kernels check what they store: per sequence, the sum of o - o over its
outputs (forward) or dv (backward) in their dtype, 0 exactly when every one is finite
(_store_rows), which the wrappers hand back through their `check` argument, so that
gma_np.mixers.gma.mixing need not read those arrays again to check them.

Kernels are plain loops that also run with NUMBA_DISABLE_JIT=1. They release the GIL
(nogil): the trainer runs two shards of its batch on two Python threads, each calling
these kernels on one Numba thread (gma_np.train.loop, BATCH_SHARDS), and a kernel that
held the GIL would stop the other shard's Python between its own calls.
"""

import numpy as np
from numba import njit, prange

from gma_np._numerics import ACCUM_DTYPE
from gma_np._threads import threads_for
from gma_np._workspace import pooled

# reassociation (vectorised dot products) and FMA contraction; no assumptions on inf/NaN
_FASTMATH = {"reassoc", "contract"}


# The two row operations of the backward scan, over the contiguous value axis c, written
# once as small functions that Numba inlines into the kernel (inline="always"): as
# ordinary calls (Numba's default, inline="never") each would cost a view and its
# reference counting per (token, component), in the innermost loop over tokens.

@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _write_dot_row(S_k, v_t, w, do_t):
    """S_k += w v_t, then return S_k . do_t."""
    acc = 0.0
    for c in range(S_k.shape[0]):
        s = S_k[c] + w * v_t[c]
        S_k[c] = s
        acc += s * do_t[c]
    return acc


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _suffix_row(G_k, do_t, a, w, v_t, dv_acc):
    """G_k += a do_t, then dv_acc += w G_k, and return G_k . v_t."""
    acc = 0.0
    for c in range(G_k.shape[0]):
        g = G_k[c] + a * do_t[c]
        G_k[c] = g
        dv_acc[c] += w * g
        acc += g * v_t[c]
    return acc


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _causal_scan_forward(rq, rk, v, slot, eps, S, z, out):
    """Causal read-out of a K-slot memory written token by token.

    For each p and t = 0..N-1:
        S += outer(rk[t], v[t]);  z += rk[t]                    (write)
        row:  out[t] = (rq[t] @ S) / (rq[t] . z + eps)          (read)
        slot: out[t] = sum_k rq[t,k] * S[k] / (z[k] + eps)

    rq, rk  (P, N, K)  routed queries and (already masked) keys, dtype of v (read in float64)
    v       (P, N, e)
    slot    bool       False for norm "row", True for norm "slot"
    S       (P, K, e)  float64, read as the initial state and left as the final one
    z       (P, K)     float64, likewise
    out     (P, N, e)  written, in the dtype of v
    """
    P, N, K = rq.shape
    e = v.shape[2]
    for p in prange(P):
        ST = np.ascontiguousarray(S[p].T)   # (e, K) this sequence's memory, transposed
        zp = z[p]                           # (K,)
        w = np.empty(K)                     # rk[t] in float64
        a = np.empty(K)                     # read weights of token t
        for t in range(N):
            # 1. write token t into the normaliser; the read weights a_k and den
            den = eps
            for k in range(K):
                wk = np.float64(rk[p, t, k])
                zk = zp[k] + wk
                zp[k] = zk
                qk = np.float64(rq[p, t, k])
                den += qk * zk
                w[k] = wk
                a[k] = qk / (zk + eps) if slot else qk
            inv = 1.0 if slot else 1.0 / den
            # 2. write token t into the memory and read it out, one value column c at a time
            for c in range(e):
                vc = np.float64(v[p, t, c])
                num = 0.0
                for k in range(K):
                    s = ST[c, k] + w[k] * vc
                    ST[c, k] = s
                    num += a[k] * s
                out[p, t, c] = num * inv
        S[p] = ST.T


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _causal_scan_backward(rq, rk, v, do, slot, eps, S, z, coef, dzt, drq, drk, dv):
    """Gradient of sum(out * do) for _causal_scan_forward started from a zero state.

    Pass 1 runs the forward write again (S_t, z_t are not stored: O(K e)
    memory) and, for each t, computes the gradient of the query routing and
    what pass 2 needs of the gradient of the state at t, dS_t = outer(c_t, do_t)
    and dz_t. With s_k = S_t[k] . do_t, in the forward pass the read was
        row:  o_t = num_t / den_t, num_t = rq[t] @ S_t, den_t = rq[t] . z_t + eps
              do_t . num_t = sum_k rq[t,k] s_k          (num_t itself is never formed)
              dden_t = -(do_t . num_t) / den_t^2
              drq[t,k] = s_k / den_t + z_t[k] dden_t
              c_t = rq[t] / den_t;  dz_t = rq[t] dden_t
              stored per token only: coef[t,0] = 1/den_t, dzt[t,0] = dden_t
        slot: o_t = sum_k rq[t,k] S_t[k] / (z_t[k] + eps)
              drq[t,k] = s_k / (z_t[k] + eps)
              coef[t,k] = c_t[k] = rq[t,k] / (z_t[k] + eps)
              dzt[t,k] = -rq[t,k] s_k / (z_t[k] + eps)^2
    Pass 2 runs backwards: the state at t collects every token j <= t, so the
    gradient reaching token j's write is the suffix sum over t >= j:
        G = sum_{t>=j} dS_t (K, e);  g = sum_{t>=j} dz_t (K,)
    In the forward pass the write was S += outer(rk[j], v[j]); z += rk[j], so
        dv[j] = rk[j] @ G;   drk[j,k] = G[k] . v[j] + g[k]

    rq, rk, v, do  (P, N, K), (P, N, K), (P, N, e), (P, N, e)
    S, z           (P, K, e), (P, K)  float64 scratch for the state
    coef, dzt      (P, N, 1) for row, (P, N, K) for slot: float64 scratch
    drq, drk       (P, N, K) written, in the dtype of rq
    dv             (P, N, e) written, in the dtype of v
    """
    P, N, K = rq.shape
    e = v.shape[2]
    for p in prange(P):
        Sp = S[p]
        zp = z[p]
        Sp[:, :] = 0.0
        zp[:] = 0.0
        s_dot = np.empty(K)
        acc = np.empty(e)
        # pass 1: forward in t
        for t in range(N):
            vt = v[p, t]
            dot = do[p, t]
            den = eps
            for k in range(K):
                zk = zp[k] + np.float64(rk[p, t, k])
                zp[k] = zk
                den += np.float64(rq[p, t, k]) * zk
            for k in range(K):
                s_dot[k] = _write_dot_row(Sp[k], vt, np.float64(rk[p, t, k]), dot)
            if slot:
                for k in range(K):
                    inv = 1.0 / (zp[k] + eps)
                    drq[p, t, k] = s_dot[k] * inv
                    coef[p, t, k] = rq[p, t, k] * inv
                    dzt[p, t, k] = -rq[p, t, k] * s_dot[k] * inv * inv
            else:
                inv = 1.0 / den
                do_dot_num = 0.0
                for k in range(K):
                    do_dot_num += rq[p, t, k] * s_dot[k]
                dden = -do_dot_num * inv * inv
                for k in range(K):
                    drq[p, t, k] = s_dot[k] * inv + zp[k] * dden
                coef[p, t, 0] = inv
                dzt[p, t, 0] = dden
        # pass 2: backward in t, Sp and zp now hold the suffix sums G and g
        Sp[:, :] = 0.0
        zp[:] = 0.0
        for t in range(N - 1, -1, -1):
            vt = v[p, t]
            dot = do[p, t]
            for c in range(e):
                acc[c] = 0.0
            for k in range(K):
                if slot:
                    a = coef[p, t, k]
                    zp[k] += dzt[p, t, k]
                else:
                    a = np.float64(rq[p, t, k]) * coef[p, t, 0]
                    zp[k] += np.float64(rq[p, t, k]) * dzt[p, t, 0]
                drk[p, t, k] = _suffix_row(Sp[k], dot, a, np.float64(rk[p, t, k]), vt, acc) + zp[k]
            for c in range(e):
                dv[p, t, c] = acc[c]


# ---------------------------------------------------------------------------------------
# The time-blocked scan: the same recurrence, SCAN_TOKENS tokens per pass over the state.
#
# The token kernels above load and store every state entry once per token (three times
# per token in the backward), and a (K, e) float64 state of 64 x 64 fills a 32 KiB L1
# cache by itself, so each pass streams it through L2. Here each pass over the state
# applies SCAN_TOKENS = 4 consecutive tokens to an entry held in a register, stores it
# once, and, in the backward, also serves two rows of the state (or, in the forward, two
# value columns) from each load of a token's row. The per-token sums keep the order of
# the recurrence: the state after token t is S_{t-1} + outer(w_t, v_t) for each entry,
# as in the token kernels; only the reductions over k or c are rounded differently
# (reassociated into vector lanes, as there).
#
# Ragged edges are padded with zeros instead of handled by separate loops: the last
# block of N % SCAN_TOKENS tokens carries zero weights and zero rows for the missing
# tokens (which write nothing and whose outputs are not stored), an odd K (backward)
# or e (forward) gets a zero row or column in the kernel's copy of the state.
# ---------------------------------------------------------------------------------------

SCAN_TOKENS = 4     # tokens per pass over the state; the loop bodies below are written for 4


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _forward_block_weights(rq, rk, v, p, t0, n, slot, eps, zp, W, A, X, inv):
    """Tokens t0 .. t0 + n - 1 of sequence p written into the normaliser zp, and the
    block's scratch: W[u] = rk[t0 + u], A[u] the read weights (row: rq; slot:
    rq / (z + eps)), inv[u] the row scale 1 / den (slot: 1), X[u] = v[t0 + u] in float64.
    Rows u >= n (past the end of the sequence) are zero."""
    K = W.shape[1]
    e = v.shape[2]
    for u in range(SCAN_TOKENS):
        if u >= n:
            W[u, :] = 0.0
            A[u, :] = 0.0
            X[u, :] = 0.0
            inv[u] = 0.0
            continue
        t = t0 + u
        den = eps
        for k in range(K):
            wk = np.float64(rk[p, t, k])
            zk = zp[k] + wk
            zp[k] = zk
            qk = np.float64(rq[p, t, k])
            den += qk * zk
            W[u, k] = wk
            A[u, k] = qk / (zk + eps) if slot else qk
        inv[u] = 1.0 if slot else 1.0 / den
        for c in range(e):
            X[u, c] = v[p, t, c]


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _write_checkpoint(Sk, zk, t0, chunk, ckS, ckz, p):
    """At t0 = j chunk (j = 1 .. M, M = ckS.shape[1]), before token t0 is written: the state
    of the first t0 tokens, Sk (K, e) (a view, transposed in the column kernel) and zk (K,),
    copied into checkpoint j - 1 of sequence p (_causal_scan_backward_blocked's chunks)."""
    if ckS.shape[1] == 0 or t0 == 0 or t0 % chunk != 0 or t0 // chunk > ckS.shape[1]:
        return
    j = t0 // chunk
    K, e = ckS.shape[2], ckS.shape[3]
    for k in range(K):
        for c in range(e):
            ckS[p, j - 1, k, c] = Sk[k, c]
        ckz[p, j - 1, k] = zk[k]


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _store_rows(R, scale, out, p, t0, n, acc):
    """out[p, t0 + u, c] = R[u, c] * scale[u] for the block's n tokens (scale ones: R[u, c]
    exactly), in out's dtype; returns acc plus the sum of o - o over the stored values o,
    which is 0 for finite ones and NaN for a NaN or an inf (inf - inf): the finiteness
    check of what the kernel writes, while it is in L1. "reassoc" alone does not let LLVM
    fold o - o to 0 (that would need "nnan" and "ninf"; gma_np._validation._finite_flat
    takes the same sum)."""
    for u in range(n):
        for c in range(out.shape[2]):
            out[p, t0 + u, c] = R[u, c] * scale[u]
        for c in range(out.shape[2]):
            o = out[p, t0 + u, c]
            acc += o - o
    return acc


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _causal_scan_forward_blocked(rq, rk, v, slot, eps, S, z, out, check, chunk, ckS, ckz):
    """_causal_scan_forward, SCAN_TOKENS tokens per pass over the state (same arguments,
    same results to rounding), and check (P,) float64 written: the sum of o - o over the
    outputs o of sequence p as stored (0 exactly when all are finite, NaN else), the
    finiteness check of the output fused into the pass that writes it; ckS (P, M, K, e),
    ckz (P, M, K) float64 written: the state after chunk, 2 chunk, ... M chunk tokens
    (_write_checkpoint; M = 0: none).

    Per block of tokens t0 .. t0 + 3 and per pair of value columns (c, c + 1) of the
    transposed state S^T (e, K), the loop over the components k holds S^T[c, k] and
    S^T[c + 1, k] in registers while the four tokens are written into them in order,
        s_u = s_{u-1} + w_u[k] v_u[c],   num_u[c] += a_u[k] s_u,
    and stores each once: 16 multiply-adds per two loads and two stores of the state
    (the token kernel: 2 per load and store).
    """
    P, N, K = rq.shape
    e = v.shape[2]
    ep = e + e % 2                              # even: the columns go in pairs
    for p in prange(P):
        ST = np.zeros((ep, K))                  # (e', K) S^T, a zero column if e is odd
        ST[:e] = S[p].T
        zp = z[p]                               # (K,)
        W = np.empty((SCAN_TOKENS, K))          # rk of the block's tokens, float64
        A = np.empty((SCAN_TOKENS, K))          # their read weights
        X = np.zeros((SCAN_TOKENS, ep))         # v of the block's tokens, float64
        R = np.empty((SCAN_TOKENS, ep))         # their outputs
        inv = np.empty(SCAN_TOKENS)
        acc = 0.0                               # sum of o - o over the stored outputs
        for t0 in range(0, N, SCAN_TOKENS):
            n = min(SCAN_TOKENS, N - t0)
            _write_checkpoint(ST.T, zp, t0, chunk, ckS, ckz, p)
            _forward_block_weights(rq, rk, v, p, t0, n, slot, eps, zp, W, A, X, inv)
            w0, w1, w2, w3 = W[0], W[1], W[2], W[3]
            a0, a1, a2, a3 = A[0], A[1], A[2], A[3]
            for c in range(0, ep, 2):
                x0, x1, x2, x3 = X[0, c], X[1, c], X[2, c], X[3, c]
                y0, y1, y2, y3 = X[0, c + 1], X[1, c + 1], X[2, c + 1], X[3, c + 1]
                Sc = ST[c]
                Sd = ST[c + 1]
                n0 = n1 = n2 = n3 = 0.0         # num_u[c]
                m0 = m1 = m2 = m3 = 0.0         # num_u[c + 1]
                for k in range(K):
                    s = Sc[k] + w0[k] * x0
                    r = Sd[k] + w0[k] * y0
                    n0 += a0[k] * s
                    m0 += a0[k] * r
                    s += w1[k] * x1
                    r += w1[k] * y1
                    n1 += a1[k] * s
                    m1 += a1[k] * r
                    s += w2[k] * x2
                    r += w2[k] * y2
                    n2 += a2[k] * s
                    m2 += a2[k] * r
                    s += w3[k] * x3
                    r += w3[k] * y3
                    n3 += a3[k] * s
                    m3 += a3[k] * r
                    Sc[k] = s
                    Sd[k] = r
                R[0, c], R[1, c], R[2, c], R[3, c] = n0, n1, n2, n3
                R[0, c + 1], R[1, c + 1], R[2, c + 1], R[3, c + 1] = m0, m1, m2, m3
            acc = _store_rows(R, inv, out, p, t0, n, acc)
        S[p] = ST[:e].T
        check[p] = acc


# Up to SCAN_ROWS_MAX_K components the forward runs over the rows of S (K, e) instead, the
# value axis c innermost: the reads num_u[c] += a_u[k] s are then vector accumulators in
# memory across the rows k, with no sum over a vector's lanes. The column kernel above ends
# each pass over k with eight such horizontal sums, whose cost does not shrink with K: at
# K = 16 it is about as large as the multiply-adds. Measured on one thread, float32, row,
# process CPU time, medians of 5 x 7 interleaved, two runs (docs/performance.md): rows /
# columns at (P, N, K, e) = (128, 128, 16, 32) 0.59-0.66, (192, 256, 32, 32) 0.81-0.86,
# (48, 256, 16, 64) 0.55-0.60, (48, 256, 32, 64) 0.82-0.95; (48, 256, 64, 32) 1.27-1.37,
# (16, 256, 64, 64) 1.09-1.13. The backward likewise takes one state row per pass up to
# SCAN_ROWS_MAX_K (its `pairs` argument): eight dot products in flight instead of sixteen,
# one row / two rows 0.89, 0.80, 0.96, 1.00 and 1.09 at those shapes but (48, 256, 64, 32).
SCAN_ROWS_MAX_K = 32


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _causal_scan_forward_blocked_rows(rq, rk, v, slot, eps, S, z, out, check, chunk, ckS, ckz):
    """_causal_scan_forward, SCAN_TOKENS tokens per pass over the state rows (same arguments,
    same results to rounding, and check and the checkpoints as in
    _causal_scan_forward_blocked); the kernel for K <= SCAN_ROWS_MAX_K (see above).

    Per block of tokens t0 .. t0 + 3 and per row k of S (K, e), the loop over the value
    axis c holds S[k, c] in a register while the four tokens are written into it in order,
        s_u = s_{u-1} + w_u[k] v_u[c],   num_u[c] += a_u[k] s_u,
    and stores it once; num_u (four rows of e) collect the rows k in order.
    """
    P, N, K = rq.shape
    e = v.shape[2]
    for p in prange(P):
        Sp = S[p]                               # (K, e) this sequence's memory
        zp = z[p]                               # (K,)
        W = np.empty((SCAN_TOKENS, K))          # rk of the block's tokens, float64
        A = np.empty((SCAN_TOKENS, K))          # their read weights
        X = np.empty((SCAN_TOKENS, e))          # v of the block's tokens, float64
        R = np.empty((SCAN_TOKENS, e))          # their outputs, num_u
        inv = np.empty(SCAN_TOKENS)
        x0, x1, x2, x3 = X[0], X[1], X[2], X[3]
        r0, r1, r2, r3 = R[0], R[1], R[2], R[3]
        acc = 0.0                               # sum of o - o over the stored outputs
        for t0 in range(0, N, SCAN_TOKENS):
            n = min(SCAN_TOKENS, N - t0)
            _write_checkpoint(Sp, zp, t0, chunk, ckS, ckz, p)
            _forward_block_weights(rq, rk, v, p, t0, n, slot, eps, zp, W, A, X, inv)
            R[:, :] = 0.0
            for k in range(K):
                w0, w1, w2, w3 = W[0, k], W[1, k], W[2, k], W[3, k]
                a0, a1, a2, a3 = A[0, k], A[1, k], A[2, k], A[3, k]
                Sk = Sp[k]
                for c in range(e):
                    s = Sk[c] + w0 * x0[c]
                    r0[c] += a0 * s
                    s += w1 * x1[c]
                    r1[c] += a1 * s
                    s += w2 * x2[c]
                    r2[c] += a2 * s
                    s += w3 * x3[c]
                    r3[c] += a3 * s
                    Sk[c] = s
            acc = _store_rows(R, inv, out, p, t0, n, acc)
        check[p] = acc


def _forward_blocked_kernel(K):
    """The blocked forward kernel for K components: over the rows of S up to
    SCAN_ROWS_MAX_K, over the columns of S^T above (the comment before the rows kernel)."""
    return _causal_scan_forward_blocked_rows if K <= SCAN_ROWS_MAX_K else _causal_scan_forward_blocked


# Pass 2 of the blocked backward runs backwards in t, and at the op's sizes (P = 4,
# N = 8192, K = e = 64: the rows of rq, rk, v, do are 32 MB) its rows come from memory:
# the CPU's prefetchers follow that descending walk over rows read in ascending order
# poorly. So before each block, pass 2 reads one element per 64 bytes of the rows of the
# block SCAN_PREFETCH_BLOCKS blocks ahead (further down in t; the block's rows of an array
# are contiguous, so that misses at most its last line): those loads miss while the
# state loops of the blocks in between run, and that block finds its rows in cache. Only
# where a sequence's rows (rq, rk, v, do, coef, dzt) exceed SCAN_PREFETCH_MIN_BYTES, twice
# the 1 MiB L2 of a core here: below that pass 2 finds pass 1's rows still in L2, and the
# reads cost time. With the forward's checkpoints the backward runs by chunks of
# SCAN_CHECKPOINT_TOKENS tokens, whose rows stay in L2 (below), and the reads are off.
# Measured, row norm, the backward wrapper against the same kernel
# without the reads, process CPU time, medians of 15-21 paired rounds: 0.96-0.97 (float32)
# and 0.93-0.96 (float64) at (P, N, K, e) = (4, 8192, 64, 64), one and two threads; with
# the reads at every size, 1.00 at (4, 1024, 64, 64) and 1.03-1.12 at the trainer's
# (128, 128, 16, 32) and (192, 256, 32, 32), hence the threshold (docs/performance.md
# section 2). Results are the same bit for bit (the reads only feed a scratch sum). The
# same reads in pass 1 and in the forward (both ascending in t) did not pay.
SCAN_PREFETCH_BLOCKS = 4
SCAN_PREFETCH_MIN_BYTES = 2 << 20   # bytes of one chunk's rows: twice the L2 of a core here
_CACHE_LINE = 64            # bytes


# Pass 1 of the blocked backward (the forward write again, and the dot products
# S_t[k] . do_t) takes eight tokens per pass over each state row, one row at a time: eight
# dot products in flight, one load and store of S[k, c] per eight tokens. Measured,
# float32, row norm, one thread, medians of 21 interleaved rounds of the paired ratio, the
# backward kernel against the same kernel with pass 1 in blocks of four (one row up to
# SCAN_ROWS_MAX_K, two above): 0.91 at (P, N, K, e) = (4, 1024, 64, 64), 1.00 at
# (128, 128, 16, 32), 1.02 at (192, 256, 32, 32). The loop alone on a 64 x 64 state in
# cache: 130 ps per entry and token, against 152 (one row, four tokens) and 171 (two rows,
# four tokens). Pass 2 keeps SCAN_TOKENS: with eight tokens its loop carries three rows of
# eight (v, do and dv's accumulator) besides the state, and the same loop test ran 5.4x
# slower (1152 ps per entry and token against 214 with four). docs/performance.md has the
# wrappers' figures.
SCAN_RECOMPUTE_TOKENS = 8   # the loop body below is written for 8


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _causal_scan_backward_blocked(rq, rk, v, do, slot, eps, pairs, ahead, chunk, ckS, ckz,
                                  S, z, coef, dzt, drq, drk, dv, check):
    """_causal_scan_backward, blocks of tokens per pass over the state (same arguments
    and results to rounding), by chunks of tokens from the forward's checkpoints.

    Pass 1 (forward in t) and pass 2 (backward in t) are those of the token kernel. Pass 1
    takes SCAN_RECOMPUTE_TOKENS = 8 tokens per block: per state row k, the loop over the
    value axis c holds S[k, c] in a register while the eight tokens go through it in order,
    and stores it once:
        pass 1:  s = S[k, c] + w_u[k] v_u[c] (u = 0..7);  sdot_u[k] += s do_u[c]
    Pass 2 takes SCAN_TOKENS = 4 tokens per block and, with `pairs`, two state rows
    (k, k + 1) per pass over c, the suffix sums G[k, c], G[k + 1, c] in registers:
        pass 2:  g = G[k, c] + a_u[k] do_u[c] (u = 3..0); dv_u[c] += w_u[k] g;  drk_u[k] += g v_u[c]
    so that a load of v_u, do_u (and of dv_u's accumulator) serves two rows. The block's
    rows of v and do are copied to float64 once per block.

    pairs  bool  pass 2 only. True: two state rows per pass over c, as above; False: one,
                 the same sums entry by entry with half the dot products in flight (what
                 the wrapper runs up to SCAN_ROWS_MAX_K components: see there)
    ahead  int   pass 2 only: read the rows of the block this many blocks further down in
                 t into cache before each block (SCAN_PREFETCH_BLOCKS); 0: no such reads.
                 The results do not depend on it.
    chunk  int   tokens per chunk (a multiple of SCAN_RECOMPUTE_TOKENS) when there are
                 checkpoints
    ckS, ckz     (P, M, K, e), (P, M, K) float64: the states after chunk, 2 chunk, ...
                 M chunk tokens (the forward kernel's checkpoints, M = ceil(N / chunk) - 1),
                 or M = 0: one chunk of N tokens. Chunk by chunk from the last, pass 1
                 runs from the chunk's checkpoint and pass 2 goes on with the suffix sums
                 of the chunks after it, while the chunk's rows are still in L2
                 (SCAN_CHECKPOINT_TOKENS). The checkpoints are the states pass 1 itself
                 computes there (the same sums, entry by entry), so the results are the
                 same bits with and without them.
    check  (P,) float64 written: the sum of o - o over the stored dv of sequence p, 0
                 exactly when all are finite (_store_rows)
    """
    P, N, K = rq.shape
    e = v.shape[2]
    Kp = K + K % 2                                # pass 2's state rows: a zero row if K is odd
    T = SCAN_TOKENS
    nchunks = ckS.shape[1] + 1
    C = chunk if nchunks > 1 else N               # tokens per chunk
    for p in prange(P):
        Sp = S[p]                                 # (K, e) pass 1: the state
        zp = z[p]                                 # (K,)
        G = np.zeros((Kp, e))                     # pass 2: the suffix sums G, from chunk to chunk
        gz = np.zeros(K)                          # pass 2: the suffix sums g of the normaliser
        W = np.zeros((T, Kp))                     # rk of the block's tokens, float64
        Z = np.empty((T, K))                      # pass 2: g after each token
        D = np.zeros((T, Kp))                     # pass 2: a_u[k]
        X = np.empty((T, e))                      # pass 2: v of the block's tokens, float64
        Y = np.empty((T, e))                      # pass 2: do of the block's tokens, float64
        DV = np.empty((T, e))                     # pass 2: dv of the block's tokens
        RK = np.empty((T, Kp))                    # pass 2: G_t[k] . v_t of the block's tokens
        # pass 1: forward in t, SCAN_RECOMPUTE_TOKENS = 8 tokens per pass over each state row
        # (the comment before the kernel); U, Z1, D1, X1, Y1 hold the block's tokens
        U = SCAN_RECOMPUTE_TOKENS
        W1 = np.zeros((U, K))                     # rk of the block's tokens, float64
        Z1 = np.empty((U, K))                     # z after each token
        D1 = np.empty((U, K))                     # S_t[k] . do_t
        X1 = np.zeros((U, e))                     # v of the block's tokens, float64
        Y1 = np.zeros((U, e))                     # do of the block's tokens, float64
        den = np.empty(U)
        D[:, :] = 0.0
        touched = np.zeros(1)                     # the prefetch reads' sum: stored, so kept
        acc = 0.0                                 # sum of o - o over the stored dv
        ones = np.ones(T)                         # dv is DV as it is
        step_k = max(1, _CACHE_LINE // rq.itemsize)   # elements per cache line
        step_e = max(1, _CACHE_LINE // v.itemsize)
        step_w = max(1, _CACHE_LINE // coef.itemsize)
        for ch in range(nchunks - 1, -1, -1):
            c0 = ch * C
            c1 = min(N, c0 + C)
            if ch == 0:
                Sp[:, :] = 0.0
                zp[:] = 0.0
            else:
                Sp[:, :] = ckS[p, ch - 1]
                zp[:] = ckz[p, ch - 1]
            for b in range((c1 - c0 + U - 1) // U):
                t0 = c0 + b * U
                n = min(U, c1 - t0)
                for u in range(U):
                    if u >= n:
                        W1[u, :] = 0.0
                        X1[u, :] = 0.0
                        Y1[u, :] = 0.0
                        continue
                    t = t0 + u
                    # one loop per array written, as in pass 2 (measured no slower than one
                    # fused loop, and at some shapes faster: docs/performance.md)
                    for k in range(K):
                        W1[u, k] = rk[p, t, k]
                    for k in range(K):
                        zk = zp[k] + W1[u, k]
                        zp[k] = zk
                        Z1[u, k] = zk
                    dd = eps
                    for k in range(K):
                        dd += np.float64(rq[p, t, k]) * Z1[u, k]
                    den[u] = dd
                    for c in range(e):
                        X1[u, c] = v[p, t, c]
                    for c in range(e):
                        Y1[u, c] = do[p, t, c]
                x0, x1, x2, x3 = X1[0], X1[1], X1[2], X1[3]
                x4, x5, x6, x7 = X1[4], X1[5], X1[6], X1[7]
                y0, y1, y2, y3 = Y1[0], Y1[1], Y1[2], Y1[3]
                y4, y5, y6, y7 = Y1[4], Y1[5], Y1[6], Y1[7]
                for k in range(K):
                    w0, w1, w2, w3 = W1[0, k], W1[1, k], W1[2, k], W1[3, k]
                    w4, w5, w6, w7 = W1[4, k], W1[5, k], W1[6, k], W1[7, k]
                    Sk = Sp[k]
                    d0 = d1 = d2 = d3 = d4 = d5 = d6 = d7 = 0.0           # S_t[k] . do_t
                    for c in range(e):
                        s = Sk[c] + w0 * x0[c]
                        d0 += s * y0[c]
                        s += w1 * x1[c]
                        d1 += s * y1[c]
                        s += w2 * x2[c]
                        d2 += s * y2[c]
                        s += w3 * x3[c]
                        d3 += s * y3[c]
                        s += w4 * x4[c]
                        d4 += s * y4[c]
                        s += w5 * x5[c]
                        d5 += s * y5[c]
                        s += w6 * x6[c]
                        d6 += s * y6[c]
                        s += w7 * x7[c]
                        d7 += s * y7[c]
                        Sk[c] = s
                    D1[0, k], D1[1, k], D1[2, k], D1[3, k] = d0, d1, d2, d3
                    D1[4, k], D1[5, k], D1[6, k], D1[7, k] = d4, d5, d6, d7
                # the read's gradients, token by token (D1[u] holds s_k of the token kernel)
                for u in range(n):
                    t = t0 + u
                    if slot:
                        for k in range(K):
                            inv = 1.0 / (Z1[u, k] + eps)
                            drq[p, t, k] = D1[u, k] * inv
                            coef[p, t, k] = rq[p, t, k] * inv
                            dzt[p, t, k] = -rq[p, t, k] * D1[u, k] * inv * inv
                    else:
                        inv = 1.0 / den[u]
                        do_dot_num = 0.0
                        for k in range(K):
                            do_dot_num += rq[p, t, k] * D1[u, k]
                        dden = -do_dot_num * inv * inv
                        for k in range(K):
                            drq[p, t, k] = D1[u, k] * inv + Z1[u, k] * dden
                        coef[p, t, 0] = inv
                        dzt[p, t, 0] = dden
            # pass 2 over the chunk, backward in t: G and gz hold the suffix sums
            for b in range((c1 - c0 + T - 1) // T - 1, -1, -1):
                t0 = c0 + b * T
                n = min(T, c1 - t0)
                # the rows of the block `ahead` blocks down into cache (the comment before
                # the kernel)
                if ahead > 0 and t0 >= ahead * T:
                    sum_read = 0.0
                    for t in range(t0 - ahead * T, t0 - ahead * T + T):
                        for k in range(0, K, step_k):
                            sum_read += rq[p, t, k] + rk[p, t, k]
                        for c in range(0, e, step_e):
                            sum_read += v[p, t, c] + do[p, t, c]
                        for j in range(0, coef.shape[2], step_w):
                            sum_read += coef[p, t, j] + dzt[p, t, j]
                    touched[0] += sum_read
                for u in range(T - 1, -1, -1):
                    if u >= n:
                        W[u, :] = 0.0
                        D[u, :] = 0.0
                        X[u, :] = 0.0
                        Y[u, :] = 0.0
                        continue
                    t = t0 + u
                    # the norm's branch outside the loops over k, so that they vectorise
                    if slot:
                        for k in range(K):
                            D[u, k] = coef[p, t, k]
                            zk = gz[k] + dzt[p, t, k]
                            gz[k] = zk
                            Z[u, k] = zk              # g after token t's write (t and later)
                            W[u, k] = rk[p, t, k]
                    else:
                        ct = coef[p, t, 0]
                        dt = dzt[p, t, 0]
                        for k in range(K):
                            D[u, k] = np.float64(rq[p, t, k]) * ct
                        for k in range(K):
                            zk = gz[k] + np.float64(rq[p, t, k]) * dt
                            gz[k] = zk
                            Z[u, k] = zk
                        for k in range(K):
                            W[u, k] = rk[p, t, k]
                    for c in range(e):
                        X[u, c] = v[p, t, c]
                    for c in range(e):
                        Y[u, c] = do[p, t, c]
                DV[:, :] = 0.0
                x0, x1, x2, x3 = X[0], X[1], X[2], X[3]
                y0, y1, y2, y3 = Y[0], Y[1], Y[2], Y[3]
                v0, v1, v2, v3 = DV[0], DV[1], DV[2], DV[3]
                if not pairs:
                    for k in range(K):
                        w0, w1, w2, w3 = W[0, k], W[1, k], W[2, k], W[3, k]
                        a0, a1, a2, a3 = D[0, k], D[1, k], D[2, k], D[3, k]
                        Gk = G[k]
                        r0 = r1 = r2 = r3 = 0.0       # G_t[k] . v_t
                        for c in range(e):
                            g = Gk[c] + a3 * y3[c]
                            v3[c] += w3 * g
                            r3 += g * x3[c]
                            g += a2 * y2[c]
                            v2[c] += w2 * g
                            r2 += g * x2[c]
                            g += a1 * y1[c]
                            v1[c] += w1 * g
                            r1 += g * x1[c]
                            g += a0 * y0[c]
                            v0[c] += w0 * g
                            r0 += g * x0[c]
                            Gk[c] = g
                        RK[0, k], RK[1, k], RK[2, k], RK[3, k] = r0, r1, r2, r3
                else:
                    for k in range(0, Kp, 2):
                        w0, w1, w2, w3 = W[0, k], W[1, k], W[2, k], W[3, k]
                        q0, q1, q2, q3 = W[0, k + 1], W[1, k + 1], W[2, k + 1], W[3, k + 1]
                        a0, a1, a2, a3 = D[0, k], D[1, k], D[2, k], D[3, k]
                        b0, b1, b2, b3 = D[0, k + 1], D[1, k + 1], D[2, k + 1], D[3, k + 1]
                        Gk = G[k]
                        Gj = G[k + 1]
                        r0 = r1 = r2 = r3 = 0.0           # G_t[k] . v_t
                        h0 = h1 = h2 = h3 = 0.0           # G_t[k + 1] . v_t
                        for c in range(e):
                            g = Gk[c] + a3 * y3[c]
                            f = Gj[c] + b3 * y3[c]
                            v3[c] += w3 * g + q3 * f
                            r3 += g * x3[c]
                            h3 += f * x3[c]
                            g += a2 * y2[c]
                            f += b2 * y2[c]
                            v2[c] += w2 * g + q2 * f
                            r2 += g * x2[c]
                            h2 += f * x2[c]
                            g += a1 * y1[c]
                            f += b1 * y1[c]
                            v1[c] += w1 * g + q1 * f
                            r1 += g * x1[c]
                            h1 += f * x1[c]
                            g += a0 * y0[c]
                            f += b0 * y0[c]
                            v0[c] += w0 * g + q0 * f
                            r0 += g * x0[c]
                            h0 += f * x0[c]
                            Gk[c] = g
                            Gj[c] = f
                        RK[0, k], RK[1, k], RK[2, k], RK[3, k] = r0, r1, r2, r3
                        RK[0, k + 1], RK[1, k + 1], RK[2, k + 1], RK[3, k + 1] = h0, h1, h2, h3
                # drk of the block's tokens, a contiguous row each (not two scalars per row pair)
                for u in range(n):
                    for k in range(K):
                        drk[p, t0 + u, k] = RK[u, k] + Z[u, k]
                acc = _store_rows(DV, ones, dv, p, t0, n, acc)
        check[p] = acc


# The backward by chunks (the ckS, ckz arguments of the kernels). At the op's sizes (P = 4,
# N = 8192, K = e = 64) a sequence's rows (rq, rk, v, do, coef, dzt, drq, drk, dv: ~3.6 KB
# a token in float64) are 30 MB, and pass 2, which walks back over them after pass 1 has
# walked forward over all of them, finds them in memory, not in the caches. So the forward
# keeps the state every SCAN_CHECKPOINT_TOKENS tokens, and the backward runs pass 1 and pass
# 2 chunk by chunk from the last: a chunk's rows, 256 x 3.6 KB, stay in the 1 MiB L2 of a
# core between the two passes. The cost: K e float64 per chunk and sequence, 128 bytes a
# token at K = e = 64 (4 MiB at P = 4, N = 8192), written by the forward in a copy of the
# state every 256 tokens. Measured, the wrappers with and without the checkpoints, paired,
# medians of 9-15 rounds, one and two threads: the backward 0.86-0.90 at (P, N, K, e) =
# (4, 8192, 64, 64) float64, 0.93-0.94 float32, 0.94-1.00 at (4, 1024, 64, 64); the
# forward 1.00-1.08 (docs/performance.md section 2). Results are the same bits either
# way: pass 1's own state at a chunk's start is the checkpoint's, entry by entry
# (tests/test_scan_blocked.py).
SCAN_CHECKPOINT_TOKENS = 256    # a multiple of SCAN_RECOMPUTE_TOKENS and of SCAN_TOKENS


def scan_checkpoints(P, N, K, e, chunk=SCAN_CHECKPOINT_TOKENS):
    """(chunk, ckS (P, M, K, e), ckz (P, M, K)): empty float64 buffers for the states after
    chunk, 2 chunk, ... tokens of N, M = ceil(N / chunk) - 1 (0 for N <= chunk), which
    _causal_forward fills and _causal_backward reads."""
    M = max(0, (N - 1) // chunk)
    # ckS from the pool (gma_np._workspace): it outlives the forward, in the caller's cache
    return chunk, pooled((P, M, K, e), ACCUM_DTYPE), np.empty((P, M, K), dtype=ACCUM_DTYPE)


def _no_checkpoints(P, K, e):
    return scan_checkpoints(P, 1, K, e)


def _checked_checkpoints(checkpoints, P, N, K, e):
    """checkpoints as scan_checkpoints(P, N, K, e, chunk) makes them, or a ValueError (the
    kernels index them unchecked); None: none (one chunk)."""
    if checkpoints is None:
        return _no_checkpoints(P, K, e)
    chunk, ckS, ckz = checkpoints
    M = max(0, (N - 1) // chunk) if chunk > 0 else -1
    if (chunk <= 0 or chunk % SCAN_RECOMPUTE_TOKENS or ckS.shape != (P, M, K, e)
            or ckz.shape != (P, M, K) or ckS.dtype != ACCUM_DTYPE or ckz.dtype != ACCUM_DTYPE):
        raise ValueError(
            f"checkpoints: expected scan_checkpoints({P}, {N}, {K}, {e}, chunk) with chunk a "
            f"positive multiple of {SCAN_RECOMPUTE_TOKENS}, got chunk {chunk}, states "
            f"{ckS.dtype} {ckS.shape} and {ckz.dtype} {ckz.shape}")
    return checkpoints


def _causal_forward(rq, rk, v, slot, eps, check=None, checkpoints=None):
    """O (P, N, e) in v's dtype, by the Numba prefix scan from a zero state. check: None,
    or a (P,) float64 array to receive per sequence the sum of o - o over its outputs (0
    exactly when all are finite: the kernel checks what it writes). checkpoints: None, or
    scan_checkpoints(P, N, K, e), filled with the states for _causal_backward."""
    P, N, K = rq.shape
    e = v.shape[2]
    S = np.zeros((P, K, e), dtype=ACCUM_DTYPE)
    z = np.zeros((P, K), dtype=ACCUM_DTYPE)
    out = pooled(v.shape, v.dtype)              # (its pages: gma_np._workspace)
    if check is None:
        check = np.empty(P, dtype=ACCUM_DTYPE)
    chunk, ckS, ckz = _checked_checkpoints(checkpoints, P, N, K, e)
    with threads_for(P * N * K * e):
        _forward_blocked_kernel(K)(rq, rk, v, slot, eps, S, z, out, check, chunk, ckS, ckz)
    return out


def _causal_backward(rq, rk, v, do, slot, eps, drq, drk, check=None, checkpoints=None):
    """dv, and drq, drk written into the given (P, N, K) float64 buffers, by the causal
    scan: pass 1 forward again, pass 2 in reverse, chunk by chunk from the forward's
    checkpoints if given (the same bits: see SCAN_CHECKPOINT_TOKENS). check: None, or a
    (P,) float64 array to receive the sums of o - o over each sequence's dv (as in
    _causal_forward)."""
    P, N, K = rq.shape
    e = v.shape[2]
    S = np.empty((P, K, e), dtype=ACCUM_DTYPE)
    z = np.empty((P, K), dtype=ACCUM_DTYPE)
    # per-token read coefficients: (P, N, 1) for row (1/den_t, dden_t), (P, N, K) for slot
    width = K if slot else 1
    coef = np.empty((P, N, width), dtype=ACCUM_DTYPE)
    dzt = np.empty((P, N, width), dtype=ACCUM_DTYPE)
    dv = pooled(v.shape, v.dtype)
    chunk, ckS, ckz = _checked_checkpoints(checkpoints, P, N, K, e)
    tokens = chunk if ckS.shape[1] > 0 else N   # of a chunk
    # bytes of one chunk's rows that pass 2 reads again
    row_bytes = tokens * ((2 * K * rq.itemsize) + (2 * e * v.itemsize) + 2 * width * coef.itemsize)
    ahead = SCAN_PREFETCH_BLOCKS if row_bytes > SCAN_PREFETCH_MIN_BYTES else 0
    if check is None:
        check = np.empty(P, dtype=ACCUM_DTYPE)
    with threads_for(P * N * K * e):
        _causal_scan_backward_blocked(rq, rk, v, do, slot, eps, K > SCAN_ROWS_MAX_K, ahead,
                                      chunk, ckS, ckz, S, z, coef, dzt, drq, drk, dv, check)
    return dv
