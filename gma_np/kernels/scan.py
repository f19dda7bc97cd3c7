"""Private Numba kernels of causal GMA: the prefix-scan forward and the reverse-scan backward.

Dimension legend: P = batch x heads (flattened), N tokens, K components, e value size.

Every (p) sequence is an independent recurrence over a state of K*(e+1)
numbers, run in parallel over p with prange. Within one sequence the loop is
sequential, so output t depends on tokens 0..t only, bit for bit.

Precision: the state S (K, e) and z (K,) are float64 accumulators whatever
the dtype of the inputs, so the float32 error of causal GMA does not grow with
N (docs/numerics.md). Nothing of size N x K x e is ever allocated; the only
N-sized buffers (the per-token write coefficients of the backward) are
allocated by the wrapper, so that Python's tracemalloc sees them.

Kernels are plain loops that also run with NUMBA_DISABLE_JIT=1.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _causal_scan_forward(rq, rk, v, slot, eps, S, z, out):
    """Causal read-out of a K-slot memory written token by token.

    For each p and t = 0..N-1:
        S += outer(rk[t], v[t]);  z += rk[t]                    (write)
        row:  out[t] = (rq[t] @ S) / (rq[t] . z + eps)          (read)
        slot: out[t] = sum_k rq[t,k] * S[k] / (z[k] + eps)

    rq, rk  (P, N, K)  routed queries and (already masked) keys
    v       (P, N, e)
    slot    bool       False for norm "row", True for norm "slot"
    S       (P, K, e)  float64, read as the initial state and left as the final one
    z       (P, K)     float64, likewise
    out     (P, N, e)  written, in the dtype of v
    """
    P, N, K = rq.shape
    e = v.shape[2]
    for p in prange(P):
        num = np.zeros(e)  # float64 read-out accumulator (O(e), not O(N))
        for t in range(N):
            # 1. write token t into the memory
            for k in range(K):
                w = rk[p, t, k]
                if w != 0.0:
                    z[p, k] += w
                    for c in range(e):
                        S[p, k, c] += w * v[p, t, c]
            # 2. read it out with query t
            num[:] = 0.0
            if slot:
                for k in range(K):
                    a = rq[p, t, k] / (z[p, k] + eps)
                    for c in range(e):
                        num[c] += a * S[p, k, c]
                for c in range(e):
                    out[p, t, c] = num[c]
            else:
                den = eps
                for k in range(K):
                    a = rq[p, t, k]
                    den += a * z[p, k]
                    for c in range(e):
                        num[c] += a * S[p, k, c]
                for c in range(e):
                    out[p, t, c] = num[c] / den


@njit(cache=True, parallel=True)
def _causal_scan_backward(rq, rk, v, do, slot, eps, S, z, coef, dzt, drq, drk, dv):
    """Gradient of sum(out * do) for _causal_scan_forward started from a zero state.

    Pass 1 runs the forward scan again (S_t, z_t are not stored: O(K e) memory)
    and, for each t, computes the gradient of the query routing and the two
    pieces of the gradient of the state at t:
        dS_t = outer(coef[t], do[t])          dz_t = dzt[t]
    In the forward pass the read was
        row:  o_t = num_t / den_t, num_t = rq[t] @ S_t, den_t = rq[t] . z_t + eps
              drq[t,k] = S_t[k] . do_t / den_t - z_t[k] (do_t . o_t) / den_t
              coef[t,k] = rq[t,k] / den_t;   dzt[t,k] = -rq[t,k] (do_t . o_t) / den_t
        slot: o_t = sum_k rq[t,k] S_t[k] / (z_t[k] + eps)
              drq[t,k] = S_t[k] . do_t / (z_t[k] + eps)
              coef[t,k] = rq[t,k] / (z_t[k] + eps)
              dzt[t,k] = -rq[t,k] (S_t[k] . do_t) / (z_t[k] + eps)^2
    Pass 2 runs backwards: the state at t collects every token j <= t, so the
    gradient reaching token j's write is the suffix sum over t >= j:
        G = sum_{t>=j} dS_t (K, e);  g = sum_{t>=j} dz_t (K,)
    In the forward pass the write was S += outer(rk[j], v[j]); z += rk[j], so
        dv[j] = rk[j] @ G;   drk[j,k] = G[k] . v[j] + g[k]

    rq, rk, v, do  (P, N, K), (P, N, K), (P, N, e), (P, N, e)
    S, z           (P, K, e), (P, K)  float64 scratch for the state
    coef, dzt      (P, N, K)          float64 scratch
    drq, drk, dv   written, in the dtype of the inputs
    """
    P, N, K = rq.shape
    e = v.shape[2]
    for p in prange(P):
        S[p, :, :] = 0.0
        z[p, :] = 0.0
        num = np.zeros(e)
        # pass 1: forward in t
        for t in range(N):
            for k in range(K):
                w = rk[p, t, k]
                if w != 0.0:
                    z[p, k] += w
                    for c in range(e):
                        S[p, k, c] += w * v[p, t, c]
            if slot:
                for k in range(K):
                    inv = 1.0 / (z[p, k] + eps)
                    s_dot = 0.0
                    for c in range(e):
                        s_dot += S[p, k, c] * do[p, t, c]
                    drq[p, t, k] = s_dot * inv
                    coef[p, t, k] = rq[p, t, k] * inv
                    dzt[p, t, k] = -rq[p, t, k] * s_dot * inv * inv
            else:
                den = eps
                num[:] = 0.0
                for k in range(K):
                    a = rq[p, t, k]
                    den += a * z[p, k]
                    for c in range(e):
                        num[c] += a * S[p, k, c]
                inv = 1.0 / den
                # dden_t = -(do_t . num_t) / den_t^2 = -(do_t . o_t) / den_t
                do_dot_num = 0.0
                for c in range(e):
                    do_dot_num += do[p, t, c] * num[c]
                dden = -do_dot_num * inv * inv
                for k in range(K):
                    s_dot = 0.0
                    for c in range(e):
                        s_dot += S[p, k, c] * do[p, t, c]
                    drq[p, t, k] = s_dot * inv + z[p, k] * dden
                    coef[p, t, k] = rq[p, t, k] * inv
                    dzt[p, t, k] = rq[p, t, k] * dden
        # pass 2: backward in t, S and z now hold the suffix sums G and g
        S[p, :, :] = 0.0
        z[p, :] = 0.0
        for t in range(N - 1, -1, -1):
            for k in range(K):
                a = coef[p, t, k]
                z[p, k] += dzt[p, t, k]
                for c in range(e):
                    S[p, k, c] += a * do[p, t, c]
            for c in range(e):
                num[c] = 0.0
            for k in range(K):
                w = rk[p, t, k]
                g_dot_v = 0.0
                for c in range(e):
                    num[c] += w * S[p, k, c]
                    g_dot_v += S[p, k, c] * v[p, t, c]
                drk[p, t, k] = g_dot_v + z[p, k]
            for c in range(e):
                dv[p, t, c] = num[c]
