"""Private Numba kernels of one decoding token of the feature memory: write, then read.

Dimension legend: B batch, H heads, K features per token (GMA's components), e value size.

A decoding step runs once per generated token and layer, so these are written for
latency, not throughput: serial loops (no prange: waking a thread pool costs more
than the O(K e) work of a token), the write and the read fused in one pass over S.

_write_read_head is one (b, h): the memory's own step (_step_write_read, called by
gma_np.memory.ops.memory_recurrent for a one-token chunk) loops it over (b, h), and
GMA's fused step (gma_np.mixers.gma.kernels._gma_step_fused) calls it after routing
the token's query and key. Per head it does exactly what the long-sequence scan does
for token t (gma_np.memory.scan), checked against it in tests/test_recurrent.py and
tests/test_fastpaths.py.

Plain loops: runs with NUMBA_DISABLE_JIT=1.
"""

import numpy as np
from numba import njit


@njit(cache=True, error_model="numpy")  # x / 0 gives inf or nan, reported by the return value
def _write_read_head(rq, rk, v, w, slot, eps, S_in, z_in, S_out, z_out, out, num):
    """One token of one head: S = S_in + outer(w r(k_t), v_t), z = z_in + w r(k_t), then
    out = read(r(q_t), S, z). Returns True when out and z_out are finite.

    rq, rk        (K,)    float64 responsibilities of q_t and k_t
    v             (e,)    float32 or float64
    w             float   the key's mask, 0 or 1: a 0 token writes nothing
    slot          bool    norm "slot": out = sum_k r_k S_k / (z_k + eps); else "row":
                          out = sum_k r_k S_k / (sum_k r_k z_k + eps)
    S_in, z_in    (K, e), (K,)  float64 state before the token (S_out may be S_in: in place)
    S_out, z_out  (K, e), (K,)  float64 state after the token, written
    out           (e,)    written
    num           (e,)    float64 scratch

    A non-finite S entry makes its column of out non-finite (a finite a times inf or NaN
    is not finite, and neither is a sum holding one), so checking out and z finds every
    overflow of the state without a pass over S.
    """
    K = rq.shape[0]
    e = v.shape[0]
    for c in range(e):
        num[c] = 0.0
    den = eps
    z_finite = True
    for kk in range(K):
        wk = rk[kk] * w
        zk = z_in[kk] + wk
        z_out[kk] = zk
        z_finite &= np.isfinite(zk)
        a = rq[kk] / (zk + eps) if slot else rq[kk]
        den += rq[kk] * zk
        for c in range(e):
            s = S_in[kk, c] + wk * v[c]
            S_out[kk, c] = s
            num[c] += a * s
    finite = z_finite
    for c in range(e):
        o = num[c] if slot else num[c] / den
        out[c] = o
        finite &= np.isfinite(o)
    return finite


@njit(cache=True, error_model="numpy")  # x / 0 gives inf or nan, checked by the wrapper
def _step_write_read(rq, rk, v, mask, slot, eps, S, z, out):
    """One token for every (b, h): write (r(k_t), v_t), then read with r(q_t), in place.

    rq, rk   (B, H, K)  float64 responsibilities of q_t and k_t
    v        (B, H, e)  float32 or float64
    mask     (B,)       float64 0/1: a 0 token writes nothing
    slot     bool       norm "slot" (else "row")
    S, z     (B, H, K, e), (B, H, K)  float64 state, updated in place
    out      (B, H, e)  written
    """
    B, H, K = rq.shape
    num = np.empty(v.shape[2])
    for b in range(B):
        for h in range(H):
            _write_read_head(rq[b, h], rk[b, h], v[b, h], mask[b], slot, eps,
                             S[b, h], z[b, h], S[b, h], z[b, h], out[b, h], num)
