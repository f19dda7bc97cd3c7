"""One token of causal linear attention inside the model's fused decode (gma_np.nn.decode).

Dimension legend: H heads, d query/key head size (the memory's F), e value head size.

The operations of linear_attention_recurrent at one token (ops.py), in the same order:
features phi(x) = elu(x) + 1 in float64, then the feature memory's one-token write and
read (gma_np.memory.step._write_read_head, which memory_recurrent calls for a one-token
chunk). Plain loops: runs with NUMBA_DISABLE_JIT=1.
"""

import math

from numba import njit

from gma_np.memory.step import _write_read_head


@njit(cache=True)
def _elu_features(x, out):
    """out = phi(x) = x + 1 (x > 0), exp(x) (x <= 0): x, out (d,) float64."""
    for j in range(x.shape[0]):
        out[j] = x[j] + 1.0 if x[j] > 0 else math.exp(min(x[j], 0.0))


@njit(cache=True, error_model="numpy")  # x / 0 gives inf or nan, reported by the return value
def _linear_token_step(q, k, v, eps, S, z, o, work):
    """Every head of one sequence at one token, the state S (H, d, e), z (H, d) float64
    updated in place. q, k (H*d,), v, o (H*e,) float64 (o written); work (2 d + e,)
    float64 scratch. False when the output or the normaliser is not finite."""
    H, d, e = S.shape
    rq = work[:d]
    rk = work[d:2 * d]
    num = work[2 * d:2 * d + e]
    for h in range(H):
        _elu_features(q[h * d:(h + 1) * d], rq)
        _elu_features(k[h * d:(h + 1) * d], rk)
        if not _write_read_head(rq, rk, v[h * e:(h + 1) * e], 1.0, False, eps, S[h], z[h], S[h],
                                z[h], o[h * e:(h + 1) * e], num):
            return False
    return True
