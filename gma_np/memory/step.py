"""Private Numba kernel of one decoding token of the feature memory: write, then read.

Dimension legend: B batch, H heads, K features per token (GMA's components), e value size.

gma_np.mixers.gma.recurrent.gma_step calls this for every generated token (and
gma_np.memory.ops.memory_recurrent for a one-token chunk), so it is written for
latency, not throughput: serial loops (no prange: waking a thread pool costs more
than the O(K e) work of a token), and the write and read fused. Before it, gma_step
takes the token's log-densities in the direct form
(gma_np.mixers.gma.kernels._step_log_densities) and their softmax with the routing's
fused kernel (gma_np.mixers.gma.kernels._softmax_rows_forward). Per head it does
exactly what the long-sequence path does for token t: the same definition, checked
against it in tests/test_recurrent.py and tests/test_fastpaths.py.

Plain loops: runs with NUMBA_DISABLE_JIT=1.
"""

import numpy as np
from numba import njit


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
