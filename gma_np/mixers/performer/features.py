"""FAVOR+ positive random features (Choromanski et al. 2021): the projections and the feature map.

Dimension legend: B batch, H heads, N tokens, d query/key head size, m random features
per head; P = B*H sequences.

Projections. Per head, m rows w_r in R^d: blocks of d rows that are orthogonal to each
other (the Q of the QR decomposition of a d x d standard Gaussian matrix, its columns'
signs fixed by diag(R) so that the block is uniformly (Haar) distributed), the last block
cut to m mod d rows, every row then rescaled to a norm drawn from the chi distribution
with d degrees of freedom: each row has the distribution of a standard Gaussian vector,
as the estimator needs, and rows within a block are exactly orthogonal, which lowers its
variance (the paper's ORF). They are drawn from a numpy Generator and are a buffer of
the model (H, m, d): saved in the checkpoint, redrawn only when asked.

Feature map. With x' = x / d^(1/4) (so that phi(q) . phi(k) estimates exp(q . k / sqrt(d)),
the softmax kernel), the paper's positive features are

    phi_r(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(m)                     r = 1..m

and they are computed stabilised by one data-independent constant,

    phi^_r(x) = exp(w_r . x' - |x'|^2 / 2 - c / 2) / sqrt(m),   c = max_{h, r} |w_hr|^2

(one number per projections buffer: the maximum over every head and row). Because
w . x' - |x'|^2 / 2 = |w|^2 / 2 - |x' - w|^2 / 2 <= |w|^2 / 2 <= c / 2, every stabilised
feature is <= 1 / sqrt(m) for every input, so nothing overflows, and the stabiliser never
looks at the data, so it cannot look at future tokens: causal outputs are exactly causal
(docs/mixers/performer.md, "Stabiliser"; the alternative, a maximum over the keys of the
sequence, makes the outputs of a prefix depend on the tokens after it).

Backward, from dphi^ (the gradient of the stabilised features):

    du_r = dphi^_r phi^_r                       (u_r = w_r . x' - |x'|^2 / 2 - c / 2)
    dx'  = sum_r du_r w_r - (sum_r du_r) x'
    dx   = dx' / d^(1/4)

c is a constant of the buffer (no gradient: the projections are not trained).

Both directions are Numba loops over tokens, in float64: each token's features are a
fixed sequence of operations whatever N, so a token's features are bit for bit the same
however many tokens come with it (a GEMM over all tokens may block its sums differently
for different N). Plain loops: they run with NUMBA_DISABLE_JIT=1.
"""

import numbers

import numpy as np
from numba import njit, prange

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE
from gma_np._threads import threads_for


def draw_projections(H, m, d, rng):
    """The random projections (H, m, d), float64, from `rng` (module docstring).

    Parameters
    ----------
    H, m, d : ints >= 1, heads, features per head, head size
    rng : numpy.random.Generator, or an int seed

    Rows r = b d .. b d + d - 1 of a head (block b) are orthogonal; every row's norm is
    chi(d) distributed; heads and blocks are independent.
    """
    for name, value in (("H", H), ("m", m), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        rng = np.random.default_rng(int(rng))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator or an int seed, got {type(rng).__name__}")
    blocks = -(-m // d)
    W = np.empty((H, m, d), dtype=ACCUM_DTYPE)
    for h in range(H):
        rows = []
        for _ in range(blocks):
            Qm, R = np.linalg.qr(rng.standard_normal((d, d)))
            # sign fix: Q diag(sign(diag R)) is Haar distributed, Q alone is not
            rows.append((Qm * np.sign(np.diag(R))).T)              # (d, d) orthonormal rows
        norms = np.sqrt(rng.chisquare(d, size=m))                  # (m,) chi(d)
        W[h] = np.concatenate(rows)[:m] * norms[:, None]
    return W


def check_projections(projections, H, d):
    """The projections as a float64 (H, m, d) array, or a clear error."""
    W = check.float_array("projections", projections, ndim=3)
    if W.shape[0] != H or W.shape[2] != d or W.shape[1] < 1:
        raise ValueError(f"projections: expected shape (H, m, d) with H = {H}, d = {d} from q "
                         f"and m >= 1, got {W.shape}")
    return W.astype(ACCUM_DTYPE, copy=False)


def feature_shift(W):
    """c = max over heads and rows of |w_hr|^2: the stabilised features are exp(... - c / 2)."""
    return float(np.max(np.einsum("hmd,hmd->hm", W, W)))


# nogil: the trainer runs two shards of its batch on two Python threads
# (gma_np.train.loop, BATCH_SHARDS); a kernel holding the GIL would stall the other.
@njit(cache=True, parallel=True, nogil=True)
def _features_forward(x, W, scale, shift, inv_sqrt_m, out):
    """out[p, n, r] = exp(W[h, r] . x' - |x'|^2 / 2 - shift) * inv_sqrt_m,  x' = scale x[p, n].

    x    (P, N, d) float64, P = B*H with h = p % H
    W    (H, m, d) float64
    out  (P, N, m) float64, written
    """
    P, N, d = x.shape
    H, m, _ = W.shape
    for p in prange(P):
        h = p % H
        xs = np.empty(d)                    # x' of token n
        for n in range(N):
            sq = 0.0
            for i in range(d):
                xi = scale * x[p, n, i]
                xs[i] = xi
                sq += xi * xi
            for r in range(m):
                dot = 0.0
                for i in range(d):
                    dot += W[h, r, i] * xs[i]
                out[p, n, r] = np.exp(dot - 0.5 * sq - shift) * inv_sqrt_m


@njit(cache=True, parallel=True, nogil=True)
def _features_backward(x, W, scale, phi, dphi, dx):
    """dx of sum(phi * dphi) for phi = _features_forward(x, W, scale, ...):

        du_r = dphi_r phi_r,  dx' = sum_r du_r W[h, r] - (sum_r du_r) x',  dx = scale dx'

    x, dx (P, N, d) float64; W (H, m, d); phi, dphi (P, N, m) float64.
    """
    P, N, d = x.shape
    H, m, _ = W.shape
    for p in prange(P):
        h = p % H
        acc = np.empty(d)                   # sum_r du_r W[h, r]
        for n in range(N):
            for i in range(d):
                acc[i] = 0.0
            total = 0.0                     # sum_r du_r
            for r in range(m):
                du = dphi[p, n, r] * phi[p, n, r]
                total += du
                for i in range(d):
                    acc[i] += du * W[h, r, i]
            for i in range(d):
                dx[p, n, i] = scale * (acc[i] - total * scale * x[p, n, i])


def positive_features(x, W, shift):
    """phi^(x) (B, H, N, m) float64 for x (B, H, N, d), projections W (H, m, d) and the
    stabiliser `shift` = c / 2 (feature_shift(W) / 2): module docstring."""
    B, H, N, d = x.shape
    m = W.shape[1]
    x3 = np.ascontiguousarray(x.reshape(B * H, N, d), dtype=ACCUM_DTYPE)
    out = np.empty((B * H, N, m), dtype=ACCUM_DTYPE)
    with threads_for(B * H * N * m * d):
        _features_forward(x3, W, d ** -0.25, shift, 1.0 / np.sqrt(m), out)
    return out.reshape(B, H, N, m)


def positive_features_backward(dphi, phi, x, W):
    """dx (B, H, N, d) float64 of sum(phi * dphi) for phi = positive_features(x, W, shift):
    dphi, phi (B, H, N, m) float64, x (B, H, N, d), W (H, m, d)."""
    B, H, N, d = x.shape
    m = W.shape[1]
    x3 = np.ascontiguousarray(x.reshape(B * H, N, d), dtype=ACCUM_DTYPE)
    dx = np.empty((B * H, N, d), dtype=ACCUM_DTYPE)
    with threads_for(2 * B * H * N * m * d):
        _features_backward(x3, W, d ** -0.25, np.ascontiguousarray(phi.reshape(B * H, N, m)),
                           np.ascontiguousarray(dphi.reshape(B * H, N, m)), dx)
    return dx.reshape(B, H, N, d)
