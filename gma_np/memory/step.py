"""Private Numba kernel of one decoding step of causal GMA: route, write and read one token.

Dimension legend: B batch, H heads, d query/key size, e value size, K components.

gma_np.mixers.gma.recurrent.gma_step calls this for every generated token, so it is
written for latency, not throughput: serial loops (no prange: waking a
thread pool costs more than the O(K (d + e)) work of a token), the direct
form of the log-density (K*d terms, exact whatever the offset, no GEMM to
amortise), and the write and read fused. Between the two kernels the wrapper
takes the softmax with the routing's fused kernel
(gma_np.mixers.gma.kernels._softmax_rows_forward). Per head it does exactly
what the long-sequence path does for token t: the same definition, checked
against it in tests/test_recurrent.py and tests/test_fastpaths.py.

Plain loops: runs with NUMBA_DISABLE_JIT=1.
"""

import numpy as np
from numba import njit


@njit(cache=True)
def _step_log_densities(x, means, inv_var, const, l):
    """l[p,b,h,k] = l_k(x[p,b,h]) for the query (p = 0) and key (p = 1) of one token.

    Direct form, float64 accumulation; the softmax over k (with the temperature)
    is taken by the wrapper.

    x        (2, B, H, d)  float32 or float64: q_t and k_t stacked
    means, inv_var (H, K, d), const (H, K)   float64
    l        (2, B, H, K)  float64, written
    """
    _, B, H, d = x.shape
    K = means.shape[1]
    for p in range(2):
        for b in range(B):
            for h in range(H):
                for k in range(K):
                    acc = 0.0
                    for j in range(d):
                        diff = x[p, b, h, j] - means[h, k, j]
                        acc += diff * diff * inv_var[h, k, j]
                    l[p, b, h, k] = const[h, k] - 0.5 * acc


@njit(cache=True, error_model="numpy")  # x / 0 gives inf or nan, checked by the wrapper
def _step_write_read(rq, rk, v, mask, slot, eps, S, z, out):
    """One token for every (b, h): write (r(k_t), v_t), then read with r(q_t).

    rq, rk   (B, H, K)  float64 responsibilities of q_t and k_t
    v        (B, H, e)  float32 or float64
    mask     (B,)       float64 0/1: a 0 token writes nothing
    slot     bool       norm "slot" (else "row")
    S, z     (B, H, K, e), (B, H, K)  float64 state, updated in place
    out      (B, H, e)  written
    """
    B, H, K = rq.shape
    e = v.shape[2]
    num = np.empty(e)
    for b in range(B):
        for h in range(H):
            for c in range(e):
                num[c] = 0.0
            den = eps
            for kk in range(K):
                w = rk[b, h, kk] * mask[b]
                zk = z[b, h, kk] + w
                z[b, h, kk] = zk
                a = rq[b, h, kk] / (zk + eps) if slot else rq[b, h, kk]
                den += rq[b, h, kk] * zk
                for c in range(e):
                    s = S[b, h, kk, c] + w * v[b, h, c]
                    S[b, h, kk, c] = s
                    num[c] += a * s
            for c in range(e):
                out[b, h, c] = num[c] if slot else num[c] / den
