"""Mixture routing: responsibilities and log-likelihood, forward and backward.

Dimension legend: H heads, N tokens, K components, d feature size; "..." any
leading batch axes (flattened to P inside).

Each head h owns a diagonal Gaussian mixture (definition, section 1):

    l_k(x) = log pi_k - 1/2 sum_j [ (x_j - mu_kj)^2 exp(-log_var_kj) + log_var_kj + log 2pi ]
    r_k(x) = softmax_k( l_k(x) / tau )               responsibilities
    log p(x) = logsumexp_k l_k(x)                    log-likelihood (no tau)

Backward (docs/derivations.md, sections 1 to 3). With a = l / tau and r = softmax(a):

    da = r * (dr - sum_k r dr)                       softmax Jacobian, row by row
    dl = da / tau
    dtau = -sum da * a / tau = -sum dl (l - c) / tau (sum_k da = 0, so any shift c of l
                                                      per row is free; c = max_k l)
    dlogits = dlog_pi - pi * sum_k dlog_pi,   dlog_pi = sum_n dl
and dl flows into x, means and log_var through the quadratic term.

Fast path (docs/numerics.md, section 2). The quadratic term is computed by GEMMs on
points centred at the mean c of their head's means, x' = x - c, mu' = mu - c
(the term is unchanged by the shift, and the shift is what keeps the expansion
from cancelling for data far from the origin):

    sum_j (x'_j - mu'_kj)^2 inv_var_kj = x'^2 @ inv_var^T - 2 x' @ (mu' inv_var)^T + m2

in float64 whatever the dtype of x, as ONE GEMM [x', x'^2] @ [-2 (mu' inv_var)^T ;
inv_var^T]; a fused Numba pass adds the terms and recomputes directly the
entries where the expansion could lose more than 1 bit against the direct form
(gma_np._numerics.EXPANSION_CANCELLATION_BOUND), marks the tokens whose gradient
would (GRADIENT_CANCELLATION_BOUND, or GRADIENT_CANCELLATION_BOUND_FLOAT32 when every
gradient is returned in float32: gradient_bound), and a second pass takes the row softmax with
the algorithm of scipy.special.softmax (softmax_rows_forward). The backward is
two GEMMs per block, dl @ [mu' inv_var | inv_var] and dl^T @ [x', x'^2], for the
unmarked tokens, the direct form for the marked ones, and the temperature's sum
token by token. No (N, K, d) array is ever formed, and a stream of blocks reuses
its scratch arrays from block to block. The direct-form kernels
(log_density_direct, log_density_backward_direct, route_forward_direct,
route_backward_direct) are kept as the naive path the fast one is checked
against (tests/test_fastpaths.py, and against 60 digits in tests/test_regimes.py).

Every log-sum-exp (log pi, the log-likelihood) is scipy.special.logsumexp; the
responsibilities are a softmax, which takes no log (docs/numerics.md).
Log-densities, responsibilities inside the cache and every gradient sum are
float64 whatever the input dtype
(gma_np._numerics.ACCUM_DTYPE); r and dx come back in the dtype of x.
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from gma_np import _validation as check
from gma_np._numerics import (
    ACCUM_DTYPE,
    BLOCK_STREAMS,
    EXPANSION_CANCELLATION_BOUND,
    GRADIENT_CANCELLATION_BOUND,
    GRADIENT_CANCELLATION_BOUND_FLOAT32,
    LOG_2PI,
    ROUTING_BLOCK,
    ROUTING_ROWS,
    ROUTING_SMALL_GEMM,
)
from gma_np._threads import blas_single_thread, run_streams, sum_in_order, threads_for
from gma_np._workspace import pooled
from gma_np.mixers.gma.kernels import (
    _dx_and_sums_from_gemm,
    _log_density_backward,
    _log_density_backward_rows,
    _features,
    _log_density_expanded,
    _log_density_forward,
    _softmax_rows_backward,
    _softmax_rows_backward_block,
    _softmax_rows_normalise,
    _softmax_rows_shift,
)


@dataclass
class Mixture:
    """Mixture parameters of H heads prepared for the kernels (all float64)."""
    means: np.ndarray      # (H, K, d)
    log_var: np.ndarray    # (H, K, d) diag or (H, K) spherical, as given
    inv_var: np.ndarray    # (H, K, d)  exp(-log_var), broadcast over d for spherical
    log_pi: np.ndarray     # (H, K)     log softmax(logits)
    const: np.ndarray      # (H, K)     log pi_k - 1/2 (sum_j log_var_kj + d log 2pi)
    covariance: str        # "diag" or "spherical"
    dtypes: tuple          # dtypes of (means, log_var, logits) as passed, for the gradients
    # for the GEMM form (module docstring, "Fast path"): centre c = mean_k mu_k per head
    center: np.ndarray     # (H, d)      c
    means_c: np.ndarray    # (H, K, d)   mu' = mu - c
    w_forward: np.ndarray  # (H, 2d, K)  [-2 (mu' inv_var)^T ; inv_var^T]: [x', x'^2] @ it = quad - m2
    w_backward: np.ndarray # (H, K, 2d)  [mu' inv_var | inv_var]: dl @ it gives the two parts of dx
    m2: np.ndarray         # (H, K)      sum_j mu'^2 inv_var
    inv_var_max: np.ndarray  # (H, K)    max_j inv_var, for the cancellation bound


# The last prepared mixture, reused when the same parameter values come again: a
# decoding loop (gma_step) passes the same mixture for every token, and preparing
# it (a dozen small NumPy calls) would otherwise cost more than the step itself.
# One slot holding one tuple, read and replaced whole (one atomic operation each
# under the GIL), so that threads never pair one mixture's key with another's value.
_LAST_MIXTURE = [None]              # [((means, log_var, logits) copies, Mixture)]


def prepare_mixture(means, log_var, logits):
    """Validate (means, log_var, logits) and precompute what the kernels need."""
    means, log_var, logits, covariance = check.mixture(means, log_var, logits)
    entry = _LAST_MIXTURE[0]
    if entry is not None:
        key, cached = entry
        if all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
               for a, b in zip(key, (means, log_var, logits))):
            return cached
    mix = _build_mixture(means, log_var, logits, covariance)
    _LAST_MIXTURE[0] = ((means.copy(), log_var.copy(), logits.copy()), mix)
    return mix


def _build_mixture(means, log_var, logits, covariance):
    dtypes = (means.dtype, log_var.dtype, logits.dtype)
    mu = means.astype(ACCUM_DTYPE)
    lv = log_var.astype(ACCUM_DTYPE)
    H, K, d = mu.shape
    lv_full = lv if covariance == "diag" else np.broadcast_to(lv[:, :, None], (H, K, d))
    # overflow here is not an answer: _check_mixture turns it into an error naming its cause
    with np.errstate(over="ignore", invalid="ignore"):
        log_pi = logits - logsumexp(logits.astype(ACCUM_DTYPE), axis=-1, keepdims=True)   # (H, K)
        const = log_pi - 0.5 * (lv_full.sum(-1) + d * LOG_2PI)                            # (H, K)
        inv_var = np.ascontiguousarray(np.exp(-lv_full))                                  # (H, K, d)
        center = mu.mean(axis=1)                                                          # (H, d)
        means_c = mu - center[:, None, :]                                                 # (H, K, d)
        scaled = means_c * inv_var                                                        # (H, K, d)
        m2 = (means_c * scaled).sum(-1)                                                   # (H, K)
    _check_mixture(lv_full, log_pi, const, inv_var, means_c, m2, covariance)
    w_backward = np.concatenate([scaled, inv_var], axis=2)                            # (H, K, 2d)
    w_forward = np.concatenate([-2.0 * scaled, inv_var], axis=2).transpose(0, 2, 1)  # (H, 2d, K)
    return Mixture(means=mu, log_var=lv, inv_var=inv_var, log_pi=log_pi, const=const,
                   covariance=covariance, dtypes=dtypes, center=center, means_c=means_c,
                   w_forward=np.ascontiguousarray(w_forward), w_backward=w_backward,
                   m2=m2, inv_var_max=inv_var.max(axis=2))


def _check_mixture(lv_full, log_pi, const, inv_var, means_c, m2, covariance):
    """FloatingPointError naming the parameter whose float64 intermediate overflowed."""
    bad = check.first_nonfinite(log_pi)
    if bad is not None:
        raise FloatingPointError(
            f"logits: log pi = logits - logsumexp(logits) overflows float64 for head {bad[0]} "
            f"(its logits span more than the float64 range); expected logits that differ "
            f"by less than {np.finfo(np.float64).max:.3g}")
    bad = check.first_nonfinite(inv_var)
    if bad is not None:
        where = bad if covariance == "diag" else bad[:2]
        raise FloatingPointError(
            f"log_var: the inverse variance exp(-log_var) overflows float64 at index {where} "
            f"(log_var = {float(lv_full[bad])!r}); expected log_var > -{np.log(np.finfo(np.float64).max):.2f}")
    bad = check.first_nonfinite(const)
    if bad is not None:
        raise FloatingPointError(
            f"log_var: the log-density constant -1/2 sum_j log_var overflows float64 for "
            f"(head, component) {bad} (|log_var| up to {np.abs(lv_full[bad]).max():.3g})")
    bad = check.first_nonfinite(m2)
    if bad is not None:
        raise FloatingPointError(
            f"means: (mu - c)^2 / sigma^2 overflows float64 for (head, component) {bad}, c the "
            f"mean of the head's means (|mu - c| up to {np.abs(means_c[bad]).max():.3g}, "
            f"1 / sigma^2 up to {inv_var[bad].max():.3g}): rescale the means or widen the variances")


def _parts(x_parts):
    """One array or a tuple of arrays stacked along P -> a tuple."""
    return (x_parts,) if isinstance(x_parts, np.ndarray) else tuple(x_parts)


def _blocks(P, H, N, d, K):
    """Blocks (p0, p1, n0, n1) of the stacked sequences p0 .. p1 - 1 and tokens n0 .. n1 - 1,
    in the order the streams deal them: every routing temporary is per block, and the
    blocks (so every sum's order) depend on the sizes only.

    Tokens: at most ROUTING_BLOCK a block, and at most as many as keep each of a block's
    GEMMs (per sequence and head: tokens x 2d x K) within ROUTING_SMALL_GEMM multiply-adds,
    the size that OpenBLAS's small-matrix path takes; the N tokens are then split into
    blocks of equal size (the last one shorter by less than one block). Sequences: as many
    as keep a block's rows, p_count H tokens, within ROUTING_ROWS (at least one), so that
    its features, GEMM results and dl stay in L2 whatever P H is. Where that makes a
    number of blocks that the BLOCK_STREAMS streams cannot share evenly, a token block
    more (up to BLOCK_STREAMS - 1 more) evens it out when it can: a stream with one
    block more than the other is the op's wait."""
    if P == 0 or H == 0 or N == 0:                                 # nothing to route
        return
    cap = max(1, min(ROUTING_BLOCK, ROUTING_SMALL_GEMM // (2 * d * K)))
    n_blocks = -(-N // cap)                                        # token blocks
    for _ in range(BLOCK_STREAMS):
        size = -(-N // n_blocks)                                   # ceil(N / n_blocks)
        p_count = max(1, min(P, ROUTING_ROWS // (H * size)))
        # one more token block while that evens out the blocks among the streams
        if (-(-P // p_count) * n_blocks) % BLOCK_STREAMS == 0 or n_blocks >= N:
            break
        n_blocks += 1
    for p0 in range(0, P, p_count):
        for n0 in range(0, N, size):
            yield p0, min(P, p0 + p_count), n0, min(N, n0 + size)


def _block_parts(xa, xb, two, p0, p1):
    """The points of the stacked sequences p0 .. p1 - 1 as (xa', xb') views, the kernels'
    (xa, xb) for one block: feats[p] of the block comes from xa'[p] for p < len(xa'), from
    xb'[p - len(xa')] after. two: x_parts is (xa, xb) (e.g. (q, k)), else xa is xb."""
    if not two:
        part = xa[p0:p1]
        return part, part
    Pa = xa.shape[0]
    return xa[min(p0, Pa):min(p1, Pa)], xb[max(p0 - Pa, 0):max(p1 - Pa, 0)]


def softmax_rows_forward(l, inv_tau, n0, r, shift):
    """Row softmax of a = l / tau for one block of tokens, the algorithm of
    scipy.special.softmax (shift by the row maximum, exponentiate, divide by the sum),
    the sum in float64:

        r[p,h,n0+n,:] = exp(a - m) / sum_k exp(a - m),   m = max_k a

    in three passes over the block, each in cache: a kernel shifts and scales the rows
    (_softmax_rows_shift), NumPy's exp runs in place on the whole block, and a kernel
    sums and divides (_softmax_rows_normalise). No log is taken: a softmax is not a
    log-sum-exp, and the package's rule (scipy.special.logsumexp for every
    log-sum-exp) applies where one is (log pi, the log-likelihood, the naive
    reference). tests/test_fastpaths.py checks it against scipy.special.softmax.

    l        (P, H, nb, K)  float64 log-densities of the block, overwritten by exp(a - m)
    inv_tau  (H,)           float64 1 / tau
    n0       int            first token of the block
    r        (P, H, N, K)   float32 or float64, rows n0 .. n0 + nb - 1 written
    shift    (P, H, N)      float64, rows n0 .. written: m tau = max_k l, the common part
                            of the row that the temperature gradient takes out
                            (_dx_and_sums_from_gemm); NaN for a row whose r is not finite (every
                            l_k = -inf, or a NaN l_k), which the wrappers report
    """
    _softmax_rows_shift(l, inv_tau, n0, shift)
    with np.errstate(invalid="ignore"):                # -inf - -inf: the row is reported
        np.exp(l, out=l)
    _softmax_rows_normalise(l, n0, r, shift)


def features(x_parts, mix, n0, n1, out=None):
    """F = [x', x'^2] (P, H, n1 - n0, 2d) float64 of tokens n0 .. n1 - 1, x' = x - c: the
    points seen from the centre c of their head's means, and their squares, the left
    operand of every routing GEMM.

    x_parts: one array (P, H, N, d) or a tuple of them (e.g. (q, k)), stacked
    along the first axis. out: a flat float64 scratch buffer of at least
    P H (n1 - n0) 2d entries (_block_buffers) to write into, or None for a new array.
    """
    x_parts = _parts(x_parts)
    P = sum(a.shape[0] for a in x_parts)
    _, H, N, d = x_parts[0].shape
    out = _block_view(out, (P, H, n1 - n0, 2 * d))
    start = 0
    for a in x_parts:
        if a.shape[0]:
            _features(a, mix.center, n0, out[start:start + a.shape[0]])
        start += a.shape[0]
    return out


def _block_buffers(blocks, H, widths):
    """One flat float64 scratch array per width, for the largest of the blocks: what a
    stream of routing blocks reuses from block to block instead of allocating per block."""
    rows = max(((p1 - p0) * (n1 - n0) for p0, p1, n0, n1 in blocks), default=0) * H
    return tuple(np.empty(rows * w, dtype=ACCUM_DTYPE) for w in widths)


def _block_view(buf, shape):
    """The C-contiguous array `shape` at the start of the flat buffer buf (None: a new one),
    so that the kernels and GEMMs of a short block see one layout, not a strided slice."""
    if buf is None:
        return np.empty(shape, dtype=ACCUM_DTYPE)
    return buf[:math.prod(shape)].reshape(shape)


def log_density_direct(x4, mix):
    """l (P, H, N, K) float64 of x4 (P, H, N, d) by the direct form, one (x - mu) at a time.

    The plain loop of gma_np.mixers.gma.kernels._log_density_forward: the naive
    kernel the fast path (log_density) is checked against in tests/test_fastpaths.py.
    """
    P, H, N, _ = x4.shape
    out = np.empty((P, H, N, mix.means.shape[1]), dtype=ACCUM_DTYPE)
    _log_density_forward(x4, mix.means, mix.inv_var, mix.const, out)
    return out


def gradient_bound(dtypes):
    """The bound of the tokens whose gradients take the direct form (_log_density_expanded):
    GRADIENT_CANCELLATION_BOUND, or GRADIENT_CANCELLATION_BOUND_FLOAT32 when every
    gradient comes back in float32 (dtypes: those of the points, the mixture parameters
    and the temperature, as passed)."""
    if all(np.dtype(t) == np.float32 for t in dtypes):
        return GRADIENT_CANCELLATION_BOUND_FLOAT32
    return GRADIENT_CANCELLATION_BOUND


def _route_blocks(x_parts, mix, inv_tau, r, direct_rows, shift=None, grad_bound=None):
    """The GEMM routing, block by block: with inv_tau None, r (P, H, N, K) float64 receives
    the log-densities l; else r (float32 or float64) receives softmax_k(l / tau) and
    shift (P, H, N) float64 the row maxima of l. direct_rows (P, H, N) uint8 receives
    the marks of the tokens whose gradient the backward takes in the direct form
    (_log_density_expanded, with grad_bound; None: GRADIENT_CANCELLATION_BOUND)."""
    if grad_bound is None:
        grad_bound = GRADIENT_CANCELLATION_BOUND
    two = len(x_parts) == 2
    xa, xb = x_parts if two else (x_parts[0], x_parts[0])
    P, H, N, K = r.shape
    d = xa.shape[3]
    blocks = list(_blocks(P, H, N, d, K))

    def stream(s):                                                 # blocks s, s + S, s + 2S, ...
        mine = blocks[s::BLOCK_STREAMS]
        feats_buf, g_buf = _block_buffers(mine, H, (2 * d, K))
        # overflowing features give inf and NaN in the GEMM: _log_density_expanded takes
        # those entries in the direct form, and the wrappers report what still overflows
        with np.errstate(over="ignore", invalid="ignore"):
            for p0, p1, n0, n1 in mine:
                pa, pb = _block_parts(xa, xb, two, p0, p1)         # sequences p0 .. p1 - 1
                feats = features((pa, pb) if two else (pa,), mix, n0, n1, feats_buf)  # (Pb, H, nb, 2d)
                g = np.matmul(feats, mix.w_forward,                # (Pb, H, nb, K)
                              out=_block_view(g_buf, feats.shape[:3] + (K,)))
                # g += m2, -1/2, + const, and the direct form where the expansion cancels: g = l
                _log_density_expanded(g, feats, pa, pb, n0, mix.means, mix.inv_var_max, mix.m2,
                                      mix.const, mix.inv_var, EXPANSION_CANCELLATION_BOUND,
                                      grad_bound, g, direct_rows[p0:p1])
                if inv_tau is None:
                    r[p0:p1, :, n0:n1] = g
                else:                                              # r = softmax_k(l / tau)
                    softmax_rows_forward(g, inv_tau, n0, r[p0:p1], shift[p0:p1])

    with blas_single_thread():                                     # small GEMMs: see _threads
        run_streams(stream, BLOCK_STREAMS)
    return r


def log_density(x_parts, mix, direct_rows=None):
    """l (P, H, N, K) float64 of the points x_parts (one array, or a tuple stacked along P),
    by one GEMM per block (_blocks: sequences x tokens).

    Fast path of the module docstring: [x', x'^2] @ [-2 (mu' inv_var)^T ; inv_var^T]
    gives quad - m2, and one fused pass adds m2 and the constants and recomputes
    directly (from x_parts) the rare entries where the expansion would cancel.
    direct_rows: a (P, H, N) uint8 array to receive the tokens that
    log_density_backward must take in the direct form, or None.
    """
    x_parts = _parts(x_parts)
    P = sum(a.shape[0] for a in x_parts)
    _, H, N, _ = x_parts[0].shape
    l = np.empty((P, H, N, mix.means.shape[1]), dtype=ACCUM_DTYPE)
    if direct_rows is None:
        direct_rows = np.empty((P, H, N), dtype=np.uint8)
    return _route_blocks(x_parts, mix, None, l, direct_rows,
                         grad_bound=gradient_bound(tuple(a.dtype for a in x_parts) + mix.dtypes))


def log_density_backward_direct(dl, x4, mix):
    """Gradients of sum(l * dl) by the direct-form kernel; see log_density_backward."""
    P, H, N, d = x4.shape
    K = mix.means.shape[1]
    dl = np.ascontiguousarray(dl, dtype=ACCUM_DTYPE)
    dx = np.empty_like(x4)
    dmeans_part = np.empty((P, H, K, d), dtype=ACCUM_DTYPE)
    dquad_part = np.empty((P, H, K, d), dtype=ACCUM_DTYPE)
    _log_density_backward(dl, x4, mix.means, mix.inv_var, dx, dmeans_part, dquad_part)
    dl_sum = dl.sum(axis=(0, 2), dtype=ACCUM_DTYPE)                # (H, K) = sum over p, n
    return dx, _mixture_grads(dl_sum, dmeans_part.sum(axis=0), dquad_part.sum(axis=0), mix)


def _mixture_grads(dl_sum, dmeans, dquad, mix):
    """The parameter gradients from dl_sum = sum_{p,n} dl (H, K), dmeans (H, K, d) and
    dquad = 1/2 sum_n dl (x - mu)^2 inv_var (H, K, d), in the dtypes that were passed."""
    # in the forward pass this was: l = ... - 1/2 sum_j (quad_kj + log_var_kj)
    dlog_var = dquad - 0.5 * dl_sum[:, :, None]                    # (H, K, d)
    if mix.covariance == "spherical":
        dlog_var = dlog_var.sum(axis=-1)                           # (H, K)
    # in the forward pass this was: log_pi = logits - logsumexp(logits)
    pi = np.exp(mix.log_pi)
    dlogits = dl_sum - pi * dl_sum.sum(axis=-1, keepdims=True)     # (H, K)
    return {name: g.astype(dt, copy=False) for name, g, dt in
            zip(("means", "log_var", "logits"), (dmeans, dlog_var, dlogits), mix.dtypes)}


def log_density_backward(dl, x_parts, mix, dx_dtype, direct_rows=None, shift=None, softmax=None,
                         row_scale=None, dx_check=None):
    """Gradients of sum(l * dl) for l = log_density(x_parts, mix), by two GEMMs per block.

    dl (P, H, N, K), float32 or float64. Returns (dx (P, H, N, d) in dx_dtype, a
    dict with "means", "log_var", "logits" in the shapes and dtypes that were
    passed, and, given the row maxima shift (P, H, N) of l, the sum
    sum_{n,k} dl (l - shift) per head (H,) that the temperature gradient needs,
    else None). In the forward pass this was
        l = const - 1/2 (x'^2 @ inv_var^T - 2 x' @ (mu' inv_var)^T + m2)
    so, with the sums over n taken as GEMMs dl^T @ [x', x'^2] (block by block,
    the blocks summed in float64):
        dx     = dl @ (mu' inv_var) - x' * (dl @ inv_var)       (one GEMM dl @ [mu' inv_var | inv_var])
        dmeans = inv_var * (dl^T x' - mu' sum_n dl)
        dquad  = 1/2 inv_var * (dl^T x'^2 - 2 mu' dl^T x' + mu'^2 sum_n dl)
               = 1/2 sum_n dl (x' - mu')^2 inv_var
    (d/dx = d/dx', and the centre is a constant of the parameters' own chain:
    the quadratic term does not depend on it, so no gradient flows through it).

    softmax: None, or (r, inv_tau) of r = softmax_k(l / tau) (P, H, N, K), (H,): then dl
    holds dr, the cotangent of r, and each block's dl = r (dr - sum_k r dr) / tau is
    taken in float64 by the stream that takes the block (_softmax_rows_backward_block),
    never as a whole (P, H, N, K) array.

    row_scale: None, or a (P, H, N) float64 factor per token: then dl holds the
    (P, H, N, K) float64 rows that it scales, and each block's dl = row_scale * dl
    is formed in the block (the log-likelihood's dll * posterior), never as a whole.

    These expansions cancel like the forward's where a token sits close to a mean
    far from the centre: the tokens the forward marked in direct_rows (P, H, N)
    uint8 (or None: no token) are left out of the GEMMs and take the direct form
    instead (_log_density_backward_rows), and their sums are added to the GEMMs'.

    dx_check: None, or a (1,) float64 array to receive the sum of o - o over the entries o
    of dx as stored, 0 exactly when all are finite: the kernels that write dx check it.

    The sum for the temperature is taken token by token from the GEMM of dx
    (_dx_and_sums_from_gemm): the same sum from the sums over the tokens,
    sum_k const_k sum_n dl - sum dquad, would cancel the common part of l across
    tokens, which is large far from the mixture, and lose the digits that the direct
    form keeps.
    """
    x_parts = _parts(x_parts)
    xa, xb = x_parts if len(x_parts) == 2 else (x_parts[0], x_parts[0])
    P, H, N, K = dl.shape
    d = mix.means.shape[2]
    dx = pooled((P, H, N, d), dx_dtype)                            # (its pages: gma_np._workspace)
    two = len(x_parts) == 2
    blocks = list(_blocks(P, H, N, d, K))
    any_direct = direct_rows is not None and direct_rows.any()
    if not any_direct:
        direct_rows = np.zeros((P, H, N), dtype=np.uint8)
    row_max = np.zeros((P, H, N)) if shift is None else shift      # (P, H, N)

    def stream(s):                                                 # blocks s, s + S, s + 2S, ...
        dl_f = np.zeros((H, K, 2 * d), dtype=ACCUM_DTYPE)          # dl^T @ [x', x'^2], summed
        dl_sum = np.zeros((H, K), dtype=ACCUM_DTYPE)               # sum_{p,n} dl, GEMM tokens
        # dmeans, dquad (H, K, d) and sum_{p,n} dl (H, K) of the direct tokens, summed
        direct = (np.zeros((H, K, d)), np.zeros((H, K, d)), np.zeros((H, K)))
        dl_dot = np.zeros(H)                                       # sum dl (l - shift), summed
        dx_sum = np.zeros(1)                                       # sum of o - o over dx
        mine = blocks[s::BLOCK_STREAMS]
        feats_buf, g_buf, dl_buf = _block_buffers(mine, H, (2 * d, 2 * d, K))
        # an overflow gives inf or NaN gradients, which the public backward functions report
        with np.errstate(over="ignore", invalid="ignore"):
            for p0, p1, n0, n1 in mine:
                pa, pb = _block_parts(xa, xb, two, p0, p1)         # sequences p0 .. p1 - 1
                feats = features((pa, pb) if two else (pa,), mix, n0, n1, feats_buf)  # (Pb, H, nb, 2d)
                Pb, _, nb, _ = feats.shape
                dl_b = _block_view(dl_buf, (Pb, H, nb, K))         # float64
                if softmax is not None:                            # dl = r (dr - r . dr) / tau
                    _softmax_rows_backward_block(dl[p0:p1], softmax[0][p0:p1], softmax[1], n0, dl_b)
                elif row_scale is not None:                        # dl = row_scale * rows
                    np.multiply(row_scale[p0:p1, :, n0:n1, None], dl[p0:p1, :, n0:n1], out=dl_b)
                else:
                    dl_b[...] = dl[p0:p1, :, n0:n1]
                if any_direct:                                     # direct tokens; dl_b rows -> 0
                    _log_density_backward_rows(dl_b, pa, pb, n0, mix.means, mix.inv_var,
                                               mix.const, row_max[p0:p1], direct_rows[p0:p1],
                                               dx[p0:p1], *direct, dl_dot, dx_sum)
                g = np.matmul(dl_b, mix.w_backward,                # 'phnk,hkf->phnf'
                              out=_block_view(g_buf, (Pb, H, nb, 2 * d)))
                # dx = g[:d] - x' * g[d:], sum dl (l - shift) and sum dl, by token
                _dx_and_sums_from_gemm(dl_b, g, feats, mix.const, mix.m2, row_max[p0:p1], n0,
                                       direct_rows[p0:p1], shift is not None, dx[p0:p1],
                                       dl_sum, dl_dot, dx_sum)
                for p in range(Pb):                                # 'phnk,phnf->hkf', one p at a
                    dl_f += np.matmul(dl_b[p].transpose(0, 2, 1), feats[p])  # time: no (P,H,K,2d)
        return dl_f, dl_sum, direct, dl_dot, dx_sum

    with blas_single_thread():                                     # small GEMMs: see _threads
        partial = run_streams(stream, BLOCK_STREAMS)
    if dx_check is not None:
        dx_check[0] = sum(float(t[4][0]) for t in partial)         # NaN if any is
    mu, inv_var = mix.means_c, mix.inv_var
    with np.errstate(over="ignore", invalid="ignore"):             # reported by the callers
        dl_f = sum_in_order([t[0] for t in partial])               # (H, K, 2d)
        dl_sum = sum_in_order([t[1] for t in partial])             # (H, K)
        dmeans_d, dquad_d, dl_sum_d = (sum_in_order([t[2][i] for t in partial]) for i in range(3))
        dl_x, dl_x2 = dl_f[..., :d], dl_f[..., d:]
        dmeans = inv_var * (dl_x - mu * dl_sum[:, :, None]) + dmeans_d
        dquad = 0.5 * inv_var * (dl_x2 - 2.0 * mu * dl_x + mu * mu * dl_sum[:, :, None]) + dquad_d
        dl_sum = dl_sum + dl_sum_d                                 # all tokens
        dl_dot = sum_in_order([t[3] for t in partial]) if shift is not None else None   # (H,)
        return dx, _mixture_grads(dl_sum, dmeans, dquad, mix), dl_dot


@dataclass
class RoutingCache:
    """What responsibilities_backward needs. Stored: the points as passed (no copy) and r.
    Recomputed in the backward, block by block: the features [x', x'^2] of the
    points (a subtraction and a product), cheaper than keeping a (P, H, N, 2d)
    float64 array."""
    x_parts: tuple          # the routed points as passed, each (P_i, H, N, d); stacked P = sum P_i
    x_dtype: np.dtype       # dtype of the points as passed, for dx
    lead_shape: tuple       # the leading axes "..." of x
    mix: Mixture
    tau: np.ndarray         # (H,) float64
    tau_per_head: bool      # the caller passed an (H,) temperature
    tau_dtype: np.dtype     # dtype of an array temperature, for its gradient
    r: np.ndarray           # (P, H, N, K) responsibilities, in the dtype of the points
    shift: np.ndarray       # (P, H, N) float64 row maxima of l, for the temperature gradient
    direct_rows: object     # (P, H, N) uint8: tokens whose gradient is taken in the direct form


def _work(x_parts, mix):
    """Multiply-adds of one routing GEMM over the points: P H N K 2d."""
    return sum(a.size for a in x_parts) * mix.means.shape[1] * 2


def check_gradients_finite(grads, cotangent_name, cotangent, finite=()):
    """FloatingPointError if a gradient holds NaN or inf. The forward was finite, so either
    the cotangent holds a NaN or inf (ValueError naming it: gma_backward leaves that check
    to this one, as a non-finite cotangent makes a gradient non-finite; mixing, "Finiteness")
    or an intermediate of the backward overflowed; every gradient is linear in the cotangent.
    finite: the names of gradients known finite (their kernels checked what they wrote)."""
    for name, g in grads.items():
        if name in finite:
            continue
        bad = check.first_nonfinite(g)
        if bad is not None:
            check.check_finite(cotangent_name, cotangent)
            raise FloatingPointError(
                f"{cotangent_name}: the gradient of {name} overflows float64 at index {bad} "
                f"(the backward is linear in {cotangent_name}, |{cotangent_name}| up to "
                f"{float(np.abs(cotangent).max()):.3g}): rescale {cotangent_name}")


def check_log_densities_finite(row_max, x_parts, names, mix):
    """FloatingPointError if a point's log-densities are -inf (or NaN) for every component.

    row_max (P, H, N): max_k l of the points x_parts (stacked along P, named names), NaN
    where the kernels found no finite log-density (softmax_rows_forward). Either the
    point holds a NaN or inf (ValueError naming the array and its first such entry:
    gma_forward leaves that check to this one, mixing, "Finiteness"), or the sum
    sum_j (x_j - mu_kj)^2 / sigma2_kj overflowed float64 for every k: nothing is left
    to route the point by."""
    bad = check.first_nonfinite(row_max)
    if bad is None:
        return
    for name, a in zip(names, x_parts):                            # in order: q before k
        check.check_finite(name, a)
    p, h, n = bad
    for name, a in zip(names, x_parts):
        if p < a.shape[0]:
            break
        p -= a.shape[0]
    x = a[p, h, n].astype(ACCUM_DTYPE)                             # (d,)
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.abs(x - mix.means[h])                            # (K, d)
    at = "(b, h, n)" if name in ("q", "k", "q_t", "k_t") else "(p, h, n) (p: the leading axes flattened)"
    raise FloatingPointError(
        f"{name}: the log-density of the point at {at} = {(p, h, n)} overflows float64 for "
        f"every component: sum_j (x_j - mu_kj)^2 / sigma2_kj > {np.finfo(np.float64).max:.3g} "
        f"(|x - mu| at least {np.nanmin(diff.max(axis=1)):.3g}, 1 / sigma2 up to "
        f"{mix.inv_var[h].max():.3g}): rescale {name} or the means, or widen the variances")


def route_forward(x_parts, mix, tau, tau_per_head=False, tau_dtype=np.dtype(np.float64),
                  names=("x",)):
    """Responsibilities of validated points, one array (P, H, N, d) or a tuple stacked
    along P (e.g. (q, k)): (r (P, H, N, K) in their dtype, cache). names: the names of
    the arrays, for the error of a point whose log-densities overflow.

    r is computed in float64 and rounded once to the dtype of the points: for
    float32 that halves the largest arrays of the cache (r, and dr in the
    backward) at a cost of 6e-8 relative per entry, which does not grow with N
    (docs/performance.md, "Memory")."""
    if isinstance(x_parts, np.ndarray):
        x_parts = (x_parts,)
    P = sum(a.shape[0] for a in x_parts)
    _, H, N, _ = x_parts[0].shape
    # r in the dtype of the points (computed in float64, rounded once when stored)
    r = pooled((P, H, N, mix.means.shape[1]), x_parts[0].dtype)   # (its pages: gma_np._workspace)
    shift = pooled((P, H, N), ACCUM_DTYPE)
    direct_rows = np.empty((P, H, N), dtype=np.uint8)
    with threads_for(_work(x_parts, mix)):
        _route_blocks(x_parts, mix, 1.0 / tau, r, direct_rows, shift,
                      gradient_bound(tuple(a.dtype for a in x_parts) + mix.dtypes + (tau_dtype,)))
    check_log_densities_finite(shift, x_parts, names, mix)
    cache = RoutingCache(x_parts=x_parts, x_dtype=x_parts[0].dtype, lead_shape=(P,),
                         mix=mix, tau=tau, tau_per_head=tau_per_head, tau_dtype=tau_dtype, r=r,
                         shift=shift, direct_rows=direct_rows)
    return r, cache


def route_backward(dr, cache, dx_check=None):
    """Gradients of sum(r * dr) for (r, cache) = route_forward(...). dr (P, H, N, K), dtype of r.
    dx_check: None, or a (1,) float64 array, 0 after the call exactly when every entry of
    the gradient of x is finite (log_density_backward)."""
    with threads_for(_work(cache.x_parts, cache.mix)):
        # in the forward pass this was: r = softmax_k(a), a = l / tau (block by block there)
        dx, grads, dl_dot = log_density_backward(dr, cache.x_parts, cache.mix, cache.x_dtype,
                                                 cache.direct_rows, cache.shift,
                                                 softmax=(cache.r, 1.0 / cache.tau),
                                                 dx_check=dx_check)
    # dtau = -sum da * a / tau = -sum dl (l - c) / tau   (da = tau dl, a = l / tau; any
    # per-row c, here the row maximum of l, since sum_k dl = 0)
    dtau = -dl_dot / cache.tau                                     # (H,)
    grads["temperature"] = (dtau.astype(cache.tau_dtype) if cache.tau_per_head
                            else float(dtau.sum()))
    grads["x"] = dx
    return grads


def route_forward_direct(x_parts, mix, tau, tau_per_head=False, tau_dtype=np.dtype(np.float64),
                         names=("x",)):
    """route_forward by the direct-form kernel (log_density_direct), no GEMM, all N at once.

    The naive twin of the fast path, with the same contract: tests/test_regimes.py
    measures both against a 60-digit oracle and holds the fast path to this one."""
    x_parts = _parts(x_parts)
    x4 = x_parts[0] if len(x_parts) == 1 else np.concatenate(x_parts)   # (P, H, N, d)
    l = log_density_direct(x4, mix)                                # (P, H, N, K) float64
    r = np.empty(l.shape, dtype=x4.dtype)
    shift = np.empty(l.shape[:3], dtype=ACCUM_DTYPE)
    softmax_rows_forward(l, 1.0 / tau, 0, r, shift)
    check_log_densities_finite(shift, x_parts, names, mix)
    cache = RoutingCache(x_parts=(x4,), x_dtype=x4.dtype, lead_shape=(x4.shape[0],), mix=mix,
                         tau=tau, tau_per_head=tau_per_head, tau_dtype=tau_dtype, r=r, shift=shift,
                         direct_rows=None)
    return r, cache


def route_backward_direct(dr, cache, dx_check=None):
    """route_backward by the direct-form kernels, for (r, cache) = route_forward_direct(...):
    the softmax backward, log_density_backward_direct, and dtau = -sum dl (l - c) / tau
    summed entry by entry from l recomputed directly (c = max_k l, as in route_backward);
    dx_check as there, from a pass over dx."""
    x4 = cache.x_parts[0]
    dl = np.empty(dr.shape, dtype=ACCUM_DTYPE)                     # (P, H, N, K)
    _softmax_rows_backward(dr, cache.r, 1.0 / cache.tau, dl)
    dx, grads = log_density_backward_direct(dl, x4, cache.mix)
    l = log_density_direct(x4, cache.mix)
    dtau = -(dl * (l - cache.shift[..., None])).sum(axis=(0, 2, 3)) / cache.tau   # (H,)
    grads["temperature"] = (dtau.astype(cache.tau_dtype) if cache.tau_per_head
                            else float(dtau.sum()))
    grads["x"] = dx
    if dx_check is not None:
        dx_check[0] = 0.0 if check.all_finite(dx) else np.nan
    return grads


def _points(x, mix):
    """Validate x (..., H, N, d) against the mixture; return (x4 (P, H, N, d), lead shape)."""
    x = check.float_array("x", x, min_ndim=3)
    check.mixture_matches("x", x.shape[-3], x.shape[-1], mix.means)
    lead = x.shape[:-3]
    # math.prod, not -1: a -1 cannot be solved for when another axis is 0 (N = 0)
    return x.reshape((math.prod(lead),) + x.shape[-3:]), lead


def responsibilities_forward(x, means, log_var, logits, temperature=1.0):
    """Responsibilities r = softmax_k(l_k(x) / tau) and the cache for the backward.

    Parameters
    ----------
    x : array of shape (..., H, N, d), float32 or float64
    means : array of shape (H, K, d)
    log_var : array of shape (H, K, d) ("diag") or (H, K) ("spherical")
    logits : array of shape (H, K), mixture weights pi = softmax(logits)
    temperature : float > 0, or array of shape (H,)

    Returns
    -------
    r : array of shape (..., H, N, K), dtype of x; rows sum to 1
    cache : RoutingCache
    """
    mix = prepare_mixture(means, log_var, logits)
    x4, lead = _points(x, mix)
    tau, per_head = check.temperature(temperature, mix.means.shape[0])
    tau_dtype = temperature.dtype if isinstance(temperature, np.ndarray) else np.dtype(np.float64)
    r, cache = route_forward(x4, mix, tau, per_head, tau_dtype)
    cache.lead_shape = lead
    return r.astype(x4.dtype).reshape(lead + r.shape[1:]), cache


def responsibilities_backward(dr, cache):
    """Gradients of sum(r * dr) with respect to x, means, log_var, logits and temperature.

    dr has the shape of r (..., H, N, K). Returns a dict keyed "x", "means",
    "log_var", "logits", "temperature", each in the shape (and dtype) passed to
    the forward; "temperature" is a float or an (H,) array as passed.
    """
    check.cache("cache", cache, RoutingCache, "responsibilities_forward")
    expected = cache.lead_shape + cache.r.shape[1:]
    dr = check.float_array("dr", dr)
    check.check_shape("dr", dr, expected, "the shape of r")
    grads = route_backward(dr.reshape(cache.r.shape).astype(cache.r.dtype, copy=False), cache)
    grads["x"] = grads["x"].reshape(cache.lead_shape + grads["x"].shape[1:])
    check_gradients_finite(grads, "dr", dr)
    return grads


def responsibilities(x, means, log_var, logits, temperature=1.0):
    """r = softmax_k(l_k(x) / tau): x (..., H, N, d) -> r (..., H, N, K). See responsibilities_forward."""
    return responsibilities_forward(x, means, log_var, logits, temperature)[0]


@dataclass
class LogLikelihoodCache:
    x4: np.ndarray          # (P, H, N, d) the points as passed
    x_dtype: np.dtype
    lead_shape: tuple
    mix: Mixture
    posterior: np.ndarray   # (P, H, N, K) float64, softmax_k(l): d logsumexp(l) / dl
    direct_rows: np.ndarray # (P, H, N) uint8: tokens whose gradient is taken in the direct form


def log_likelihood_forward(x, means, log_var, logits):
    """Mixture log-likelihood log p(x) = logsumexp_k l_k(x), and the cache.

    x (..., H, N, d) -> (..., H, N) in the dtype of x. No temperature: this is
    the density of the mixture itself.
    """
    mix = prepare_mixture(means, log_var, logits)
    x4, lead = _points(x, mix)
    direct_rows = np.empty(x4.shape[:3], dtype=np.uint8)          # (P, H, N)
    with threads_for(_work((x4,), mix)):
        l = log_density(x4, mix, direct_rows)                      # (P, H, N, K)
    check_log_densities_finite(l.max(axis=-1), (x4,), ("x",), mix)
    ll = logsumexp(l, axis=-1)                                     # (P, H, N)
    posterior = np.exp(l - ll[..., None])
    cache = LogLikelihoodCache(x4=x4, x_dtype=x4.dtype, lead_shape=lead, mix=mix,
                               posterior=posterior, direct_rows=direct_rows)
    return ll.astype(x4.dtype).reshape(lead + ll.shape[1:]), cache


def log_likelihood_backward(dll, cache):
    """Gradients of sum(log p(x) * dll): dict "x", "means", "log_var", "logits".

    In the forward pass this was ll = logsumexp_k l_k, so dl = dll * softmax_k(l).
    """
    check.cache("cache", cache, LogLikelihoodCache, "log_likelihood_forward")
    expected = cache.lead_shape + cache.posterior.shape[1:3]
    dll = check.float_array("dll", dll)
    check.check_shape("dll", dll, expected, "the shape of the log-likelihood")
    dll = dll.reshape(cache.posterior.shape[:3]).astype(ACCUM_DTYPE)
    with threads_for(_work((cache.x4,), cache.mix)):
        dx4, grads, _ = log_density_backward(cache.posterior, cache.x4, cache.mix, cache.x_dtype,
                                             cache.direct_rows, row_scale=dll)
    grads["x"] = dx4.reshape(cache.lead_shape + dx4.shape[1:])
    check_gradients_finite(grads, "dll", dll)
    return grads


def log_likelihood(x, means, log_var, logits):
    """log p(x) = logsumexp_k l_k(x): x (..., H, N, d) -> (..., H, N). See log_likelihood_forward."""
    return log_likelihood_forward(x, means, log_var, logits)[0]
