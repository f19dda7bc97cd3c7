"""Private Numba kernels of the mixture routing: Gaussian log-densities and their gradient.

Dimension legend (used in every shape comment of gma_np):
    P  leading batch (everything before the head axis, flattened)
    H  heads          N  tokens          K  mixture components
    d  query/key size e  value size

The kernels are plain Python loops: with NUMBA_DISABLE_JIT=1 they run (slowly)
as ordinary Python, so a student can step through them in a debugger. They do
no validation and allocate nothing of size N: the public wrappers in
gma_np.ops.routing check the arguments and allocate the outputs.

Form of the quadratic term. We compute sum_j (x_j - mu_kj)^2 / sigma2_kj in the
*direct* form, one (x - mu) difference at a time, accumulated in float64, and
not with the matmul expansion x^2 @ (1/sigma2) - 2 x @ (mu/sigma2) + mu^2/sigma2.
The expansion subtracts terms of size |x|^2/sigma2 to get a result of size
|x - mu|^2/sigma2: when points sit near their components but far from the
origin (or variances are tiny) it cancels catastrophically, and in float32 the
responsibilities can be wrong in the first digit. The direct form is exact to
a few ulps of the result whatever the offset (docs/numerics.md).
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _log_density_forward(x, means, inv_var, const, out):
    """l[p,h,n,k] = const[h,k] - 1/2 sum_j (x[p,h,n,j] - means[h,k,j])^2 * inv_var[h,k,j].

    x        (P, H, N, d)  float32 or float64
    means    (H, K, d)     float64
    inv_var  (H, K, d)     float64   exp(-log_var), broadcast to d for spherical
    const    (H, K)        float64   log pi_k - 1/2 (sum_j log_var_kj + d log 2pi)
    out      (P, H, N, K)  float64   written
    """
    P, H, N, d = x.shape
    K = means.shape[1]
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        for n in range(N):
            for k in range(K):
                acc = 0.0  # float64 accumulator over d, whatever the dtype of x
                for j in range(d):
                    diff = x[p, h, n, j] - means[h, k, j]
                    acc += diff * diff * inv_var[h, k, j]
                out[p, h, n, k] = const[h, k] - 0.5 * acc


@njit(cache=True, parallel=True)
def _log_density_backward(dl, x, means, inv_var, dx, dmeans_part, dquad_part):
    """Gradient of the quadratic term of the log-density, given dl = dL/dl.

    In the forward pass this was:
        l[n,k] = const[k] - 1/2 sum_j (x[n,j] - mu[k,j])^2 * inv_var[k,j]
    so, with w = (x[n,j] - mu[k,j]) * inv_var[k,j]:
        dx[n,j]       = - sum_k dl[n,k] * w
        dmeans[k,j]   = + sum_n dl[n,k] * w
        dquad[k,j]    = 1/2 sum_n dl[n,k] * (x[n,j] - mu[k,j]) * w
    where dquad is the gradient through inv_var = exp(-log_var), already times
    d inv_var / d log_var = -inv_var and the -1/2; the wrapper adds the
    -1/2 sum_n dl[n,k] that comes from the +log_var term.

    dl           (P, H, N, K)  float64
    x            (P, H, N, d)  float32 or float64
    means        (H, K, d)     float64
    inv_var      (H, K, d)     float64
    dx           (P, H, N, d)  dtype of x, written
    dmeans_part  (P, H, K, d)  float64, written: one partial sum per (p, h), summed by the wrapper
    dquad_part   (P, H, K, d)  float64, written likewise
    """
    P, H, N, d = x.shape
    K = means.shape[1]
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        dmeans_part[p, h, :, :] = 0.0
        dquad_part[p, h, :, :] = 0.0
        for n in range(N):
            for j in range(d):
                acc = 0.0
                for k in range(K):
                    c = dl[p, h, n, k]
                    diff = x[p, h, n, j] - means[h, k, j]
                    w = diff * inv_var[h, k, j]
                    acc -= c * w
                    dmeans_part[p, h, k, j] += c * w
                    dquad_part[p, h, k, j] += 0.5 * c * diff * w
                dx[p, h, n, j] = acc
