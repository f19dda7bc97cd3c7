"""Private Numba kernel of one decoding step of causal GMA: route, write and read one token.

Dimension legend: B batch, H heads, d query/key size, e value size, K components.

gma_np.ops.recurrent.gma_step calls this for every generated token, so it is
written for latency, not throughput: one serial loop (no prange: waking a
thread pool costs more than the O(K (d + e)) work of a token), the direct
form of the log-density (K*d terms, exact whatever the offset, no GEMM to
amortise), and the softmax, write and read fused. Per head it does exactly
what the long-sequence path does for token t: the same definition, checked
against it in tests/test_recurrent.py and tests/test_fastpaths.py.

Plain loops: runs with NUMBA_DISABLE_JIT=1.
"""

import numpy as np
from numba import njit


@njit(cache=True)
def _route_row(x, means, inv_var, const, inv_tau, r):
    """r (K,) = softmax_k(l_k(x) / tau) of one point x (d,), direct form, max-shifted."""
    K, d = means.shape
    for k in range(K):
        acc = 0.0
        for j in range(d):
            diff = x[j] - means[k, j]
            acc += diff * diff * inv_var[k, j]
        r[k] = (const[k] - 0.5 * acc) * inv_tau
    m = r[0]
    for k in range(1, K):
        m = max(m, r[k])
    total = 0.0
    for k in range(K):
        r[k] = np.exp(r[k] - m)
        total += r[k]
    for k in range(K):
        r[k] /= total


@njit(cache=True)
def _gma_step(q, k, v, mask, means, inv_var, const, inv_tau, slot, eps, S, z, out):
    """One token for every (b, h): route q_t and k_t, write (k_t, v_t), read with q_t.

    q, k     (B, H, d)  float32 or float64
    v        (B, H, e)
    mask     (B,)       float64 0/1: a 0 token writes nothing
    means    (H, K, d), inv_var (H, K, d), const (H, K), inv_tau (H,)   float64
    slot     bool       norm "slot" (else "row")
    S, z     (B, H, K, e), (B, H, K)  float64 state, updated in place
    out      (B, H, e)  written
    """
    B, H, d = q.shape
    K = means.shape[1]
    e = v.shape[2]
    rq = np.empty(K)
    rk = np.empty(K)
    num = np.empty(e)
    for b in range(B):
        for h in range(H):
            _route_row(q[b, h], means[h], inv_var[h], const[h], inv_tau[h], rq)
            _route_row(k[b, h], means[h], inv_var[h], const[h], inv_tau[h], rk)
            for c in range(e):
                num[c] = 0.0
            den = eps
            for kk in range(K):
                w = rk[kk] * mask[b]
                zk = z[b, h, kk] + w
                z[b, h, kk] = zk
                a = rq[kk] / (zk + eps) if slot else rq[kk]
                den += rq[kk] * zk
                for c in range(e):
                    s = S[b, h, kk, c] + w * v[b, h, c]
                    S[b, h, kk, c] = s
                    num[c] += a * s
            for c in range(e):
                out[b, h, c] = num[c] if slot else num[c] / den
