"""One token of causal FAVOR+ inside the model's fused decode (gma_np.nn.decode).

Dimension legend: H heads, d query/key head size, e value head size, m random features.

The operations of performer_attention_recurrent at one token (ops.py), in the same
order: the stabilised positive features of q_t and k_t (features._features_forward's
loop), the range checks of ops._check_range (a real key keeps a feature >=
DENOMINATOR_FLOOR; a query that has read a real key keeps phi^(q) . z >= it), and the
feature memory's one-token write and read with eps^ = eps exp(-c). A failed check is
reported, not raised: the caller then runs the checked path, which names it.
Plain loops: runs with NUMBA_DISABLE_JIT=1.
"""

import math

import numpy as np
from numba import njit

from gma_np.memory.step import _write_read_head
from gma_np.mixers.performer.features import check_projections, feature_shift
from gma_np.mixers.performer.ops import DENOMINATOR_FLOOR


def token_step_arrays(projections, eps):
    """(W (H, m, d) float64, [scale, shift, 1/sqrt(m), eps^] float64) of one layer's
    projections, as performer_attention_recurrent derives them; ValueError where it would
    raise one (eps^ below the smallest normal float64)."""
    W = np.ascontiguousarray(check_projections(projections, projections.shape[0],
                                               projections.shape[2]))
    H, m, d = W.shape
    c = feature_shift(W)
    eps_hat = eps * np.exp(-c)
    if eps > 0 and eps_hat < np.finfo(np.float64).tiny:
        raise ValueError(f"projections: max |w|^2 = {c:.1f} is too large for eps = {eps}")
    return W, np.array([d ** -0.25, 0.5 * c, 1.0 / np.sqrt(m), eps_hat])


@njit(cache=True)
def _positive_features(x, W, scale, shift, inv_sqrt_m, xs, out):
    """out[r] = exp(W[r] . x' - |x'|^2 / 2 - shift) / sqrt(m), x' = scale x: x (d,), W (m, d)."""
    m, d = W.shape
    sq = 0.0
    for i in range(d):
        xi = scale * x[i]
        xs[i] = xi
        sq += xi * xi
    for r in range(m):
        dot = 0.0
        for i in range(d):
            dot += W[r, i] * xs[i]
        out[r] = math.exp(dot - 0.5 * sq - shift) * inv_sqrt_m


@njit(cache=True, error_model="numpy")  # x / 0 gives inf or nan, reported by the return value
def _performer_token_step(q, k, v, W, consts, S, z, o, work):
    """Every head of one sequence at one token, the state S (H, m, e), z (H, m) float64 (in
    stabilised units) updated in place. q, k (H*d,), v, o (H*e,) float64 (o written);
    W, consts: token_step_arrays'; work (2 m + d + e,) float64 scratch. False when a range
    check fails or the output or the normaliser is not finite."""
    H, m, d = W.shape
    e = S.shape[2]
    scale, shift, inv_sqrt_m, eps_hat = consts[0], consts[1], consts[2], consts[3]
    rq = work[:m]
    rk = work[m:2 * m]
    xs = work[2 * m:2 * m + d]
    num = work[2 * m + d:2 * m + d + e]
    for h in range(H):
        _positive_features(q[h * d:(h + 1) * d], W[h], scale, shift, inv_sqrt_m, xs, rq)
        _positive_features(k[h * d:(h + 1) * d], W[h], scale, shift, inv_sqrt_m, xs, rk)
        top = 0.0
        for r in range(m):
            top = max(top, rk[r])
        if top < DENOMINATOR_FLOOR:
            return False
        if not _write_read_head(rq, rk, v[h * e:(h + 1) * e], 1.0, False, eps_hat, S[h], z[h],
                                S[h], z[h], o[h * e:(h + 1) * e], num):
            return False
        den = 0.0
        for r in range(m):
            den += rq[r] * z[h, r]
        if den < DENOMINATOR_FLOOR:                 # z > 0 here: this token's key is real
            return False
    return True
