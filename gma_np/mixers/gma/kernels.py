"""Private Numba kernels of the mixture routing: Gaussian log-densities and their gradient.

Dimension legend (used in every shape comment of gma_np):
    P  leading batch (everything before the head axis, flattened)
    H  heads          N  tokens          K  mixture components
    d  query/key size e  value size

The kernels are plain Python loops: with NUMBA_DISABLE_JIT=1 they run (slowly)
as ordinary Python, so a student can step through them in a debugger. They do
no validation and allocate nothing of size N: the public wrappers in
gma_np.mixers.gma.routing check the arguments and allocate the outputs.

Form of the quadratic term. sum_j (x_j - mu_kj)^2 / sigma2_kj has two forms here.
The *direct* form (_log_density_forward, _log_density_backward) takes one (x - mu)
difference at a time, accumulated in float64: it is exact to a few ulps of its terms
whatever the offset, and it is the naive path the fast one is checked against.
_gma_step_fused takes the same direct form for the one token of a decoding step, fused
with the softmax and the memory's write and read (serial loops: at one token a thread
pool costs more than the work). The fast path
(the second half of this file, driven by gma_np.mixers.gma.routing) uses the matmul
expansion on points centred at the mean of their head's means, x'^2 @ (1/sigma2) - 2
x' @ (mu'/sigma2) + mu'^2/sigma2, as float64 GEMMs. The expansion subtracts terms of
size |x'|^2/sigma2 to get a result of size |x - mu|^2/sigma2, so where a point sits
close to a mean far from the centre (or variances are tiny) it cancels; the fast
kernels bound that loss entry by entry and take the direct form wherever it would
exceed one bit, for the log-densities and for the gradients alike (docs/numerics.md,
section 2).
"""

import numpy as np
from numba import njit, prange

from gma_np.memory.step import _write_read_head

# For the per-token sums of the block kernels (_dx_and_sums_from_gemm, |x'|^2 and the
# direct form in _log_density_expanded, the softmax's sum in _softmax_rows_normalise):
# reassociation lets LLVM keep a sum over K or d in vector lanes instead of one chain of
# dependent adds (the latency of an add per term: 1.23 ms a block of 12288 tokens,
# K = 32, d = 32, against 0.24; per block of the op's shape, 1024 rows, d = K = 64:
# _log_density_expanded 87 -> 53 us, _softmax_rows_normalise 45 -> 24), and contract
# fuses multiply-adds. It changes the rounding of a sum, never which terms enter it (no
# nnan/ninf: the NaN and inf tests stand), and the same code gives the same bits on
# every thread count. Not on _softmax_rows_shift (slower), nor on
# _softmax_rows_backward_block: its sum_k r dr must round as the direct form's
# (_softmax_rows_backward) does, where r dr - r sum_k r dr cancels for a nearly one-hot
# r; summed in another order, the gradient of x came out up to 16 times the direct
# form's error in tests/test_regimes.py (60-digit oracle).
_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, parallel=True, nogil=True)
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


@njit(cache=True, parallel=True, nogil=True)
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


# ---------------------------------------------------------------------------------------
# The decoding step: one token, every kernel of GMA in one call.
#
# A generated token costs O(H K (d + e)) multiply-adds per layer, a few microseconds;
# one kernel call per layer and token keeps Python's share of it to one dispatch.
# Serial loops (a thread pool costs more than the work), the log-densities in the direct
# form (the step has no block of tokens to share a GEMM over), float64 accumulation, each
# sum over j in order: the same log-densities, bit for bit, as _log_density_forward.
# ---------------------------------------------------------------------------------------

# What _gma_step_fused returns.
STEP_DONE = 0       # o, S_out, z_out written, all finite
STEP_STALE = 1      # means, log_var or logits differ from the values the prepared arrays
                    # were made from: nothing written; the wrapper prepares them again
STEP_CHECK = 2      # a temperature, log-density, output or normaliser is not finite (or
                    # q_t, k_t, v_t or the state is): the wrapper runs
                    # the checked path, which names the cause or computes the rare case


@njit(cache=True)
def _softmax_row(l, inv_tau, r):
    """r = softmax_k(l / tau), as routing.softmax_rows_forward does one row: shift by max_k l,
    exponentiate (l_k - m) / tau, multiply by 1 / sum. l (K,) finite; r (K,) written."""
    K = l.shape[0]
    m = l[0]
    for k in range(1, K):
        m = max(m, l[k])
    total = 0.0
    for k in range(K):
        u = np.exp((l[k] - m) * inv_tau)
        r[k] = u
        total += u
    inv_total = 1.0 / total
    for k in range(K):
        r[k] = r[k] * inv_total


@njit(cache=True, inline="always")
def _route_token_pair(xq, xk, means_t, inv_var_t, const, tau, lq, lk, rq, rk):
    """The responsibilities rq, rk = softmax_k(l_k(x) / tau) of one head's q_t and k_t, by
    the direct form: l_k(x) = const_k - 1/2 sum_j (x_j - mu_kj)^2 iv_kj, each sum in the
    order j = 0 .. d-1. False (nothing else done) when a log-density is not finite.
    Shared by the one-token steps (_gma_step_fused here, recurrent._gma_token_step).

    xq, xk              (d,)    float32 or float64
    means_t, inv_var_t  (d, K)  float64, j-major (the K sums of a point run side by side)
    const               (K,)    float64;  tau  float64 > 0
    lq, lk, rq, rk      (K,)    float64 scratch; rq, rk written
    """
    d, K = means_t.shape
    for kk in range(K):
        lq[kk] = 0.0
        lk[kk] = 0.0
    for j in range(d):
        x_q = xq[j]
        x_k = xk[j]
        for kk in range(K):
            dq = x_q - means_t[j, kk]
            dk = x_k - means_t[j, kk]
            lq[kk] += dq * dq * inv_var_t[j, kk]
            lk[kk] += dk * dk * inv_var_t[j, kk]
    finite = True
    for kk in range(K):
        lq[kk] = const[kk] - 0.5 * lq[kk]
        lk[kk] = const[kk] - 0.5 * lk[kk]
        finite &= np.isfinite(lq[kk]) and np.isfinite(lk[kk])
    if not finite:
        return False
    inv_tau = 1.0 / tau
    _softmax_row(lq, inv_tau, rq)
    _softmax_row(lk, inv_tau, rk)
    return True


@njit(cache=True)
def _same_values(a, b):
    """True when a and b (n,) hold the same values (NaN equals nothing). No early exit:
    the loop without a branch is the fast one, and a mismatch is the rare case."""
    same = True
    for i in range(a.shape[0]):
        same &= a[i] == b[i]
    return same


@njit(cache=True, error_model="numpy")  # x / 0 gives inf or nan, reported as STEP_CHECK
def _gma_step_fused(q, k, v, mask, parameters, prepared, means_t, inv_var_t, const, tau,
                    slot, eps, S_in, z_in, S_out, z_out, o):
    """One token of causal GMA for every (b, h): route q_t and k_t, write, read.

    r(x)_k = softmax_k(l_k(x) / tau_h), l_k(x) = const_hk - 1/2 sum_j (x_j - mu_hkj)^2 iv_hkj,
    then gma_np.memory.step._write_read_head. Returns STEP_DONE, STEP_STALE or STEP_CHECK.

    q, k            (B, H, d)  float32 or float64;  v (B, H, e) the same dtype
    mask            (B,)       float64 0/1
    parameters      (means, log_var, logits) as passed, C-contiguous
    prepared        copies of their values when means_t, inv_var_t and const were made
    means_t         (H, d, K)  float64 means, j-major: the loop over k is innermost, so that
                               the K sums of a point run side by side (each still adds its
                               d terms in order j = 0 .. d-1, the direct form's order)
    inv_var_t       (H, d, K)  float64 exp(-log_var), j-major
    const           (H, K)     float64 log pi - 1/2 sum_j log_var - d/2 log 2 pi
                               (gma_np.mixers.gma.routing.Mixture)
    tau             (H,)       float32 or float64 temperature, taken in float64
    slot, eps                  the read-out's norm ("slot" if True) and eps
    S_in, z_in      (B, H, K, e), (B, H, K)  float64 state, read
    S_out, z_out    the same shapes, written (the state after the token)
    o               (B, H, e)  written
    """
    # 0. the prepared arrays are of these parameter values, or nothing is computed
    for_means = _same_values(parameters[0].reshape(parameters[0].size),
                             prepared[0].reshape(prepared[0].size))
    for_log_var = _same_values(parameters[1].reshape(parameters[1].size),
                               prepared[1].reshape(prepared[1].size))
    for_logits = _same_values(parameters[2].reshape(parameters[2].size),
                              prepared[2].reshape(prepared[2].size))
    if not (for_means and for_log_var and for_logits):
        return STEP_STALE
    for h in range(tau.shape[0]):
        t = float(tau[h])
        if not (t > 0.0 and np.isfinite(t) and np.isfinite(1.0 / t)):
            return STEP_CHECK
    B, H, d = q.shape
    K = means_t.shape[2]
    lq = np.empty(K)                     # log-densities, then responsibilities, of q_t
    lk = np.empty(K)                     # and of k_t
    rq = np.empty(K)
    rk = np.empty(K)
    num = np.empty(v.shape[2])
    for b in range(B):
        for h in range(H):
            # 1, 2. log-densities of q_t and k_t (every one finite), responsibilities
            if not _route_token_pair(q[b, h], k[b, h], means_t[h], inv_var_t[h], const[h],
                                     float(tau[h]), lq, lk, rq, rk):
                return STEP_CHECK
            # 3. write (r(k_t), v_t) into the memory, read it with r(q_t)
            if not _write_read_head(rq, rk, v[b, h], mask[b], slot, eps, S_in[b, h], z_in[b, h],
                                    S_out[b, h], z_out[b, h], o[b, h], num):
                return STEP_CHECK
    return STEP_DONE


# ---------------------------------------------------------------------------------------
# The fast path: quadratic term by a GEMM on centred points, finished by fused row loops.
#
# gma_np.mixers.gma.routing computes, per head h, with the centre c_h = mean_k mu_hk,
# x' = x - c_h and mu' = mu - c_h (the quadratic term is unchanged by the shift),
# the features F = [x', x'^2] (N, 2d) and one GEMM
#     g = F @ [-2 (mu' inv_var)^T ; inv_var^T]   = x2 - 2 cross          (N, K)
# with x2 = x'^2 @ inv_var^T, cross = x' @ (mu' inv_var)^T, and then
#     quad = g + m2,  m2[k] = sum_j mu'_kj^2 inv_var_kj                  (the matmul expansion)
# The kernels below finish the job row by row, in one pass over memory. Those that
# run once per block of the routing (sequences x tokens, up to ROUTING_ROWS rows:
# _features, _log_density_expanded, _softmax_rows_shift, _softmax_rows_normalise,
# _softmax_rows_backward_block, _log_density_backward_rows, _dx_and_sums_from_gemm)
# see the block's sequences only: P in their shapes is the block's, the (P, H, N, ...)
# arrays are the whole arrays' rows p0 .. p1 - 1 (C-contiguous views), and xa, xb the
# block's share of each stacked part (routing._block_parts). They are serial: a block
# is small, and waking Numba's thread pool once per block
# (hundreds of times per call) costs more than it gains (on a loaded 2-core machine,
# causal fwd+bwd at N=8192: 11 s with 2 threads against 0.5 s with 1;
# docs/performance.md). Their `prange` is then a plain range.
# They release the GIL (nogil): gma_np.mixers.gma.routing runs two streams of blocks on two
# Python threads when Numba is given more than one thread.
# ---------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _features(x, center, n0, out):
    """out[p,h,n] = [x', x'^2] with x' = x[p,h,n0+n] - center[h]: the left operand of the GEMMs,
    for the block of tokens n0 .. n0 + nb - 1.

    x       (P, H, N, d)    float32 or float64
    center  (H, d)          float64
    out     (P, H, nb, 2d)  float64, written
    """
    P, H, nb, d2 = out.shape
    d = d2 // 2
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        for n in range(nb):
            for j in range(d):
                xc = x[p, h, n0 + n, j] - center[h, j]
                out[p, h, n, j] = xc
                out[p, h, n, d + j] = xc * xc


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _log_density_expanded(g, feats, xa, xb, n0, means, inv_var_max, m2, const, inv_var, bound,
                          grad_bound, out, direct_rows):
    """l[p,h,n,k] = const[h,k] - 1/2 quad, quad = g + m2 or, where that cancels, directly,
    for the block of tokens n0 .. n0 + nb - 1 (out holds the block: row n is token n0 + n).

    The expansion subtracts terms of size x2 + m2 to get quad, so its rounding
    error in l = const - quad / 2 is about eps_64 (x2 + m2) / 2. The direct
    form's is about eps_64 (|const| + quad / 2): the rounding of its sum and
    of l itself, which no float64 method avoids. With the bound
    x2 <= |x'|^2 max_j inv_var_kj, an entry where
        |x'|^2 max_j inv_var_kj + m2 > bound * max(quad + 2 |const|, 1)
    (the expansion could lose more than log2(bound) bits against the direct
    form) is recomputed directly as sum_j (x_j - mu_kj)^2 inv_var_kj, from the
    points and means as passed (not the centred ones, whose own rounding,
    eps * |x - c|, would show when x sits close to a mean far from the
    centre). After centring this is rare for data near its mixture
    (docs/numerics.md, section 2).

    The backward's GEMMs expand the same way (dx = dl @ (mu' inv_var) - x' (dl @ inv_var),
    dquad from dl^T x'^2 - 2 mu' dl^T x' + mu'^2 sum dl), with an error of about
    eps_64 size |dl| against the direct form's eps_64 quad |dl|; no const hides it
    there. A token with an entry where
        size > grad_bound * quad
    is marked in direct_rows, and _log_density_backward_rows takes its gradient in
    the direct form.

    g            (P, H, nb, K)   float64 GEMM result x2 - 2 cross of the block
    feats        (P, H, nb, 2d)  float64 [x', x'^2] of the block
    xa, xb       (Pa, H, N, d), (P - Pa, H, N, d)  the points as passed: feats[p]
                 comes from xa[p] for p < Pa, from xb[p - Pa] after (xb may be xa
                 when Pa = P)
    n0           int            first token of the block
    means        (H, K, d)      float64 mu
    inv_var_max  (H, K)         float64 max_j inv_var
    m2, const    (H, K)         float64
    inv_var      (H, K, d)      float64
    bound        float          gma_np._numerics.EXPANSION_CANCELLATION_BOUND
    grad_bound   float          gma_np.mixers.gma.routing.gradient_bound: GRADIENT_CANCELLATION_BOUND,
                                its float32 value when every gradient is float32
    out          (P, H, nb, K)   float64, written (may be `g` itself)
    direct_rows  (P, H, N)       uint8, rows n0 .. n0 + nb - 1 written: 1 for a token whose
                                gradient the backward takes in the direct form, else 0
    """
    P, H, nb, K = g.shape
    d = means.shape[2]
    Pa = xa.shape[0]
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        for n in range(nb):
            sq = 0.0                                   # |x'|^2
            for j in range(d):
                sq += feats[p, h, n, d + j]
            # pass 1, branch-free (it vectorises): how many entries of the row fall back,
            # how many mark it. NaN or inf (overflowing features) fail `size <= ...`.
            fallbacks = 0
            marks = 0
            for k in range(K):
                quad = g[p, h, n, k] + m2[h, k]
                size = sq * inv_var_max[h, k] + m2[h, k]
                fallbacks += not (size <= bound * max(quad + 2.0 * abs(const[h, k]), 1.0))
                marks += size > grad_bound * quad
            if fallbacks == 0:                         # the common case: l from the GEMM
                for k in range(K):
                    out[p, h, n, k] = const[h, k] - 0.5 * (g[p, h, n, k] + m2[h, k])
            else:                                      # pass 2: the direct form where needed
                marks = 0
                for k in range(K):
                    quad = g[p, h, n, k] + m2[h, k]
                    size = sq * inv_var_max[h, k] + m2[h, k]
                    if not (size <= bound * max(quad + 2.0 * abs(const[h, k]), 1.0)):
                        quad = 0.0                     # +inf where the term itself overflows
                        for j in range(d):
                            xj = xa[p, h, n0 + n, j] if p < Pa else xb[p - Pa, h, n0 + n, j]
                            diff = xj - means[h, k, j]
                            quad += diff * diff * inv_var[h, k, j]
                    marks += size > grad_bound * quad
                    out[p, h, n, k] = const[h, k] - 0.5 * quad
            direct_rows[p, h, n0 + n] = marks > 0


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _dx_and_sums_from_gemm(dl, g, feats, const, m2, shift, n0, direct_rows, with_dot, dx,
                           dl_sum, dl_dot, dx_check):
    """What the backward takes from the GEMM g = dl @ [mu' inv_var | inv_var] of one block of
    tokens, in one pass over the block's dl, g and feats, row by row while a row is in L1:

        dx[p,h,n0+n,j] = g[j] - x'_j g[d+j]
        dl_sum[h,k]   += dl[p,h,n,k]
        dl_dot[h]     += sum_k dl_k (l_k - shift[p,h,n0+n])          (if with_dot)
        dx_check[0]   += sum_j (o - o), o = dx[p,h,n0+n,j] as stored  (0 iff finite)

    dx: g[j] - x'_j g[d+j] = sum_k dl_k (mu'_kj - x'_j) inv_var_kj, the gradient of
    l = const - 1/2 sum_j (x'_j - mu'_kj)^2 inv_var_kj (routing.log_density_backward).

    dl_dot, the sum behind the temperature gradient -sum dl (l - c) / tau
    (route_backward), from the same GEMM: with l = const - quad / 2,
        sum_k dl_k quad_k = sum_j (x'_j^2 g[d + j] - 2 x'_j g[j]) + sum_k dl_k m2_k
    per token, so that
        sum_k dl_k (l_k - c) = sum_k dl_k (const_k - c - m2_k / 2) - 1/2 sum_j (...),
    c = shift = max_k l_k. Summed token by token, not from the sums over the tokens
    (sum_k const_k sum_n dl - sum dquad): those would cancel the common part of l
    across tokens, which is large far from the mixture (hundreds and more), where each
    token's own sum loses no more than its rounding of l.

    The rows marked in direct_rows are left alone: _log_density_backward_rows wrote
    their dx, took their sums and zeroed their dl. Every sum runs over h, then p, then
    n, in order: the same bits at every thread count.

    dl           (P, H, nb, K)   float64 block of dl
    g            (P, H, nb, 2d)  float64 dl @ [mu' inv_var | inv_var]
    feats        (P, H, nb, 2d)  float64 [x', x'^2] of the block
    const, m2    (H, K)          float64
    shift        (P, H, N)       float64 max_k l, from routing.softmax_rows_forward (read
                                 only if with_dot)
    n0           int             first token of the block
    direct_rows  (P, H, N)       uint8
    with_dot     bool            take dl_dot
    dx           (P, H, N, d)    float32 or float64, the unmarked rows n0 .. n0 + nb - 1 written
    dl_sum       (H, K)          float64, accumulated
    dl_dot       (H,)            float64, accumulated if with_dot
    dx_check     (1,)            float64, accumulated: the sum of o - o over the dx written,
                                 the finiteness check of dx while its rows are in L1 (0 for
                                 finite entries, NaN for a NaN or an inf; "reassoc" alone
                                 does not fold o - o: gma_np._validation._finite_flat)
    """
    P, H, nb, K = dl.shape
    d = feats.shape[3] // 2
    finite_sum = 0.0
    for h in range(H):
        acc = 0.0
        for p in range(P):
            for n in range(nb):
                if direct_rows[p, h, n0 + n]:
                    continue
                for j in range(d):
                    dx[p, h, n0 + n, j] = g[p, h, n, j] - feats[p, h, n, j] * g[p, h, n, d + j]
                for j in range(d):
                    o = dx[p, h, n0 + n, j]
                    finite_sum += o - o
                for k in range(K):
                    dl_sum[h, k] += dl[p, h, n, k]
                if with_dot:
                    c = shift[p, h, n0 + n]
                    lin = 0.0                          # sum_k dl_k (const_k - c - m2_k / 2)
                    for k in range(K):
                        lin += dl[p, h, n, k] * (const[h, k] - c - 0.5 * m2[h, k])
                    sq = 0.0                           # sum_j x'_j^2 g[d + j] - 2 x'_j g[j]
                    for j in range(d):
                        sq += (feats[p, h, n, d + j] * g[p, h, n, d + j]
                               - 2.0 * feats[p, h, n, j] * g[p, h, n, j])
                    acc += lin - 0.5 * sq
        dl_dot[h] += acc
    dx_check[0] += finite_sum


@njit(cache=True, nogil=True)
def _log_density_backward_rows(dl, xa, xb, n0, means, inv_var, const, shift, direct_rows, dx,
                               dmeans, dquad, dl_sum, dl_dot, dx_check):
    """The direct-form backward (_log_density_backward) of the marked tokens of one block,
    and their rows of dl set to 0, so that the GEMMs that follow leave them out.

    For a marked token n (direct_rows[p, h, n0 + n] = 1), with w = (x - mu) inv_var
    from the points and means as passed:
        dx[n, j]      = - sum_k dl[n, k] w[k, j]                   (written)
        dmeans[k, j] += sum over the marked n of dl[n, k] w[k, j]
        dquad[k, j]  += 1/2 sum over the marked n of dl[n, k] (x[n, j] - mu[k, j]) w[k, j]
        dl_sum[k]    += sum over the marked n of dl[n, k]
        dl_dot       += sum over the marked n of sum_k dl[n, k] (l[n, k] - shift[n])
                        (l = const - quad / 2 in the direct form; see _dx_and_sums_from_gemm)

    dl           (P, H, nb, K)  float64 block of dl; marked rows zeroed
    xa, xb       the points as passed, as in _log_density_expanded
    n0           int            first token of the block
    means        (H, K, d)      float64
    inv_var      (H, K, d)      float64
    const        (H, K)         float64
    shift        (P, H, N)      float64 max_k l, from routing.softmax_rows_forward
    direct_rows  (P, H, N)      uint8
    dx           (P, H, N, d)   float32 or float64, the marked rows written
    dmeans, dquad (H, K, d)     float64, accumulated
    dl_sum       (H, K)         float64, accumulated
    dl_dot       (H,)           float64, accumulated
    dx_check     (1,)           float64, accumulated: the sum of o - o over the dx written
                                (as in _dx_and_sums_from_gemm)
    """
    P, H, nb, K = dl.shape
    d = means.shape[2]
    Pa = xa.shape[0]
    quad = np.empty(K)
    finite_sum = 0.0
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        for n in range(nb):
            if not direct_rows[p, h, n0 + n]:
                continue
            quad[:] = 0.0
            for j in range(d):
                xj = xa[p, h, n0 + n, j] if p < Pa else xb[p - Pa, h, n0 + n, j]
                acc = 0.0
                for k in range(K):
                    c = dl[p, h, n, k]
                    diff = xj - means[h, k, j]
                    w = diff * inv_var[h, k, j]
                    acc -= c * w
                    dmeans[h, k, j] += c * w
                    dquad[h, k, j] += 0.5 * c * diff * w
                    quad[k] += diff * w
                dx[p, h, n0 + n, j] = acc
                o = dx[p, h, n0 + n, j]
                finite_sum += o - o
            dot = 0.0
            for k in range(K):
                dot += dl[p, h, n, k] * (const[h, k] - 0.5 * quad[k] - shift[p, h, n0 + n])
                dl_sum[h, k] += dl[p, h, n, k]
                dl[p, h, n, k] = 0.0
            dl_dot[h] += dot
    dx_check[0] += finite_sum


@njit(cache=True, nogil=True)
def _softmax_rows_shift(l, inv_tau, n0, shift):
    """The first pass of routing.softmax_rows_forward: l[p,h,n,:] = (l - m) / tau in place and
    shift[p,h,n0+n] = m = max_k l, for one block of tokens. The exponential is NumPy's,
    on the whole block after this pass (a scalar exp in a Numba loop costs about 9 ns an
    element here, NumPy's SIMD loop about 1: docs/performance.md, section 6).

    l        (P, H, nb, K)  float64 log-densities of the block, overwritten
    inv_tau  (H,)           float64 1 / tau
    n0       int            first token of the block
    shift    (P, H, N)      float64, rows n0 .. n0 + nb - 1 written
    """
    P, H, nb, K = l.shape
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        s = inv_tau[h]
        for n in range(nb):
            m = l[p, h, n, 0]
            for k in range(1, K):
                m = max(m, l[p, h, n, k])
            for k in range(K):
                l[p, h, n, k] = (l[p, h, n, k] - m) * s
            shift[p, h, n0 + n] = m


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _softmax_rows_normalise(u, n0, r, shift):
    """The last pass of routing.softmax_rows_forward: r[p,h,n0+n,:] = u / sum_k u, the sum in
    float64, for one block of tokens u = exp((l - m) / tau); shift[p,h,n0+n] set to NaN
    where the row is not finite (every l_k = -inf, or a NaN l_k), which the wrappers report.

    u      (P, H, nb, K)  float64
    n0     int            first token of the block
    r      (P, H, N, K)   float32 or float64, rows n0 .. n0 + nb - 1 written
    shift  (P, H, N)      float64, from _softmax_rows_shift
    """
    P, H, nb, K = u.shape
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        for n in range(nb):
            total = 0.0
            for k in range(K):
                total += u[p, h, n, k]
            inv_total = 1.0 / total
            for k in range(K):
                r[p, h, n0 + n, k] = u[p, h, n, k] * inv_total
            m = shift[p, h, n0 + n]
            if not (m > -np.inf and total < np.inf):
                shift[p, h, n0 + n] = np.nan


@njit(cache=True, parallel=True, nogil=True)
def _softmax_rows_backward(dr, r, inv_tau, dl):
    """Backward of routing.softmax_rows_forward: dl = d/dl of sum(r * dr).

    In the forward pass this was r = softmax_k(a), a = l / tau, so
        da = r * (dr - sum_k r dr)                       (softmax Jacobian)
        dl = da / tau
    The temperature gradient, -sum da * a / tau = -sum dl (l - c) / tau for any
    per-row c, is summed entry by entry with l recomputed block by block in the
    log-density backward (_dx_and_sums_from_gemm).

    dr, r     (P, H, N, K)  float32 or float64 (one dtype), read in float64
    inv_tau   (H,)          float64
    dl        (P, H, N, K)  dtype of dr, written (may be `dr` itself)
    """
    P, H, N, K = dr.shape
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        s = inv_tau[h]
        for n in range(N):
            dot = 0.0
            for k in range(K):
                dot += np.float64(r[p, h, n, k]) * np.float64(dr[p, h, n, k])
            for k in range(K):
                dl[p, h, n, k] = np.float64(r[p, h, n, k]) * (np.float64(dr[p, h, n, k]) - dot) * s


@njit(cache=True, nogil=True)
def _softmax_rows_backward_block(dr, r, inv_tau, n0, dl):
    """_softmax_rows_backward for one block of tokens, into the float64 block of dl that
    the routing backward's GEMMs read (routing.log_density_backward), in the stream
    that takes the block:

        dl[p,h,n,:] = r (dr - sum_k r dr) / tau      of token n0 + n

    dr, r     (P, H, N, K)   float32 or float64 (one dtype), read in float64
    inv_tau   (H,)           float64
    n0        int            first token of the block
    dl        (P, H, nb, K)  float64, written
    """
    P, H, nb, K = dl.shape
    for ph in prange(P * H):
        p = ph // H
        h = ph % H
        s = inv_tau[h]
        for n in range(nb):
            t = n0 + n
            dot = 0.0
            for k in range(K):
                dot += np.float64(r[p, h, t, k]) * np.float64(dr[p, h, t, k])
            for k in range(K):
                dl[p, h, n, k] = np.float64(r[p, h, t, k]) * (np.float64(dr[p, h, t, k]) - dot) * s

