"""The causal feature memory by a Numba prefix scan: the forward, the reverse-scan backward
and their wrappers (_causal_forward, _causal_backward: allocate, then run a kernel).

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
N-sized buffers (the per-token read coefficients of the backward) are
allocated by the wrappers, so that Python's tracemalloc sees them.

Kernels are plain loops that also run with NUMBA_DISABLE_JIT=1.
"""

import numpy as np
from numba import njit, prange

from gma_np._numerics import ACCUM_DTYPE
from gma_np._threads import threads_for

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


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
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


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
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


def _causal_forward(rq, rk, v, slot, eps):
    """O (P, N, e) in v's dtype, by the Numba prefix scan from a zero state."""
    P, N, K = rq.shape
    S = np.zeros((P, K, v.shape[2]), dtype=ACCUM_DTYPE)
    z = np.zeros((P, K), dtype=ACCUM_DTYPE)
    out = np.empty_like(v)
    with threads_for(P * N * K * v.shape[2]):
        _causal_scan_forward(rq, rk, v, slot, eps, S, z, out)
    return out


def _causal_backward(rq, rk, v, do, slot, eps, drq, drk):
    """dv, and drq, drk written into the given (P, N, K) float64 buffers, by the causal
    scan: pass 1 forward again, pass 2 in reverse."""
    P, N, K = rq.shape
    e = v.shape[2]
    S = np.empty((P, K, e), dtype=ACCUM_DTYPE)
    z = np.empty((P, K), dtype=ACCUM_DTYPE)
    # per-token read coefficients: (P, N, 1) for row (1/den_t, dden_t), (P, N, K) for slot
    width = K if slot else 1
    coef = np.empty((P, N, width), dtype=ACCUM_DTYPE)
    dzt = np.empty((P, N, width), dtype=ACCUM_DTYPE)
    dv = np.empty_like(v)
    with threads_for(P * N * K * e):
        _causal_scan_backward(rq, rk, v, do, slot, eps, S, z, coef, dzt, drq, drk, dv)
    return dv
