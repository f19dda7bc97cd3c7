"""Private Numba loops behind the layers of gma_np.nn.layers and the optimiser of gma_np.optim.

Dimension legend: M rows (every leading axis flattened), D row width (d_model), V
classes of a softmax (the vocabulary), S elements of a flat array, w convolution
taps, T tokens of one sequence.

Each loop does in one pass what the plain NumPy form (kept beside its wrapper, as
the naive reference, and tested against it in tests/test_layers_fast.py) does in
several, each pass reading and writing a whole (M, D) or (M, V) temporary. What is
left to NumPy is the transcendental functions: tanh and exp are NumPy's vectorised
(SIMD) loops, called by the wrappers on a buffer between two kernels, because a
scalar math.exp or math.tanh inside a Numba loop is not vectorised (no vector math
library) and costs 9 (exp) to 40 (tanh) times NumPy's ufunc per element (docs/performance.md, "The
training step").

Contracts (the wrappers check them, the kernels do not):
- arrays are C-contiguous; the flat ones are 1-D views of the caller's arrays;
- scalar constants come in the arrays' dtype (c, a, half, one ... of the GELU), so a
  float32 kernel rounds every operation to float32 in the order NumPy does: the
  elementwise kernels give NumPy's bits exactly in both dtypes;
- every element a reduction reads is widened to float64 first (np.float64(...)), so
  that the interpreted loops (NUMBA_DISABLE_JIT=1) accumulate in float64 too;
- the reductions (layer norm's row statistics and its dg, db; the softmax sums;
  the convolution's dc; sums of squares) accumulate in float64, so they are as accurate
  as a float64 NumPy sum or more, in an order fixed by the code (the row sums of the
  layer norm and the softmax reassociated into vector lanes: _ROW_SUM_FASTMATH), so the
  same whatever the thread count. They are serial loops, and waking Numba's thread pool for one would
  cost more than it gains on a loaded machine; every kernel releases the GIL (nogil)
  instead, so that the wrappers can hand a large array to the streams in pieces fixed
  by its size (gma_np.nn.layers._in_pieces: GELU, layer norm, the softmax of the
  cross-entropy), their partial sums added in a fixed order, and so that the
  trainer's shards (gma_np.train.loop, BATCH_SHARDS) never wait for each other's.
Every body is plain Python over NumPy arrays and runs with NUMBA_DISABLE_JIT=1.
"""

import math

import numpy as np
from numba import njit


# ---------------------------------------------------------------- GELU, tanh form

@njit(cache=True, nogil=True)
def _gelu_inner(x, u, c, a):
    """u = c (x + a x^3), as NumPy evaluates c * (x + a * x * x * x): flat (S,)."""
    for i in range(x.size):
        xi = x[i]
        u[i] = c * (xi + a * xi * xi * xi)


@njit(cache=True, nogil=True)
def _gelu_outer(x, t, y, half, one):
    """y = 1/2 x (1 + t), t = tanh(u) already in place: flat (S,)."""
    for i in range(x.size):
        y[i] = half * x[i] * (one + t[i])


@njit(cache=True, nogil=True)
def _gelu_backward(dy, x, t, dx, half, one, c, a3):
    """dx = dy (1/2 (1 + t) + 1/2 x (1 - t^2) c (1 + 3 a x^2)): flat (S,), NumPy's order."""
    for i in range(x.size):
        xi = x[i]
        ti = t[i]
        dt = half * xi * (one - ti * ti) * c * (one + a3 * xi * xi)
        dx[i] = dy[i] * (half * (one + ti) + dt)


# ---------------------------------------------------------------- layer norm

# The row sums of the layer norm and of the softmax are reassociated into vector lanes
# ("reassoc": LLVM may add a row's terms in any grouping; "contract" fuses multiply-adds);
# no assumption on NaN or inf. Each row's result still depends on that row alone, so it
# is the same whatever the thread count or the rows' split into pieces. Written as four
# fixed running sums instead (each a chain of dependent adds), the layer norm at
# (2048, 128) float32 on one thread took 0.345 ms forward and 0.380 backward, against
# 0.175 and 0.229 (medians of 51; D = 192: 0.538 / 0.578 against 0.233 / 0.318).
_ROW_SUM_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_ROW_SUM_FASTMATH)
def _layernorm_forward(x, g, b, eps, y, xhat, rstd):
    """Per row of x (M, D): mean, biased variance (two passes, float64), rstd = (var + eps)^-1/2,
    xhat = (x - mean) rstd, y = xhat g + b. Writes y, xhat (M, D) and rstd (M,)."""
    M, D = x.shape
    for m in range(M):
        s = 0.0
        for j in range(D):
            s += np.float64(x[m, j])
        mean = s / D
        q = 0.0
        for j in range(D):
            c = np.float64(x[m, j]) - mean
            q += c * c
        r = 1.0 / math.sqrt(q / D + eps)
        rstd[m] = r
        for j in range(D):
            xh = (np.float64(x[m, j]) - mean) * r
            xhat[m, j] = xh
            y[m, j] = xh * g[j] + b[j]


@njit(cache=True, nogil=True, fastmath=_ROW_SUM_FASTMATH)
def _layernorm_backward(dy, xhat, rstd, g, dx, dg, db):
    """dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy g, per row;
    dg = sum_m dy xhat, db = sum_m dy (float64 accumulators dg, db (D,), rows in order)."""
    M, D = dy.shape
    for m in range(M):
        a = 0.0                                        # sum_j dxhat
        c = 0.0                                        # sum_j dxhat xhat
        for j in range(D):
            d = np.float64(dy[m, j]) * g[j]
            a += d
            c += d * xhat[m, j]
        m1 = a / D
        m2 = c / D
        r = rstd[m]
        for j in range(D):
            dx[m, j] = r * (np.float64(dy[m, j]) * g[j] - m1 - np.float64(xhat[m, j]) * m2)
            dg[j] += np.float64(dy[m, j]) * xhat[m, j]
            db[j] += np.float64(dy[m, j])


# ---------------------------------------------------------------- softmax cross-entropy

@njit(cache=True, nogil=True)
def _softmax_shift(logits, row_max, shifted, n_max):
    """Per row of logits (R, V), given its maximum row_max (R,) (np.max's: NaN if any entry
    is NaN), how many entries equal it, and shifted = logits - max in float64 (exact for
    float32 logits) (R, V). Branch-free loops, which LLVM vectorises (the maximum itself
    is NumPy's SIMD reduction, taken by the wrapper: a maximum with NaN propagating is a
    loop with a branch here, which it does not)."""
    R, V = logits.shape
    for m in range(R):
        a_max = row_max[m]
        count = 0
        for j in range(V):
            count += logits[m, j] == a_max
        n_max[m] = count
        for j in range(V):
            shifted[m, j] = np.float64(logits[m, j]) - a_max


# the sum over the row in vector lanes, not one chain of dependent adds (128 rows of
# V = 256: 10-12 us a block against 36); see _ROW_SUM_FASTMATH
@njit(cache=True, nogil=True, fastmath=_ROW_SUM_FASTMATH)
def _softmax_finish(logits, e, row_max, n_max, probs, lse):
    """From e = exp(logits - max) (R, V) (float64): each row's log-sum-exp by SciPy's
    algorithm (Blanchard, Higham and Higham 2021): the c entries equal to the maximum
    are kept out of the sum, s = sum of the others' e, lse = max + log1p(s / c) + log(c).
    Where that is not finite (an infinite or NaN maximum) the direct log(sum exp(logits))
    is what SciPy returns: +inf, -inf (every entry -inf) or NaN, the maximum itself, and
    the row's probabilities are NaN (scipy.special.softmax's). Else probs = e / (s + c)
    (the maximal entries' e are 1 exactly), in the output dtype.
    Writes probs (R, V) and lse (R,) (float64)."""
    R, V = e.shape
    for m in range(R):
        a_max = row_max[m]
        c = n_max[m]
        s = 0.0
        for j in range(V):
            if logits[m, j] != a_max:
                s += e[m, j]
        if c > 0 and math.isfinite(a_max):
            lse[m] = a_max + math.log1p(s / c) + math.log(c)
            inv = 1.0 / (s + c)
        else:
            lse[m] = a_max
            inv = np.nan                                # every probability NaN, as SciPy's softmax
        for j in range(V):
            probs[m, j] = e[m, j] * inv


@njit(cache=True, nogil=True)
def _cross_entropy_backward(probs, targets, scale, dlogits, one):
    """dlogits[m] = (probs[m] - onehot(targets[m])) scale[m]: (M, V), in the dtype of probs
    (one = 1 in it), NumPy's order: the target's entry less one, then the product."""
    M, V = probs.shape
    for m in range(M):
        s = scale[m]
        for j in range(V):
            dlogits[m, j] = probs[m, j] * s
        k = targets[m]
        dlogits[m, k] = (probs[m, k] - one) * s


# ---------------------------------------------------------------- embeddings, convolution

@njit(cache=True, nogil=True)
def _embedding_backward(idx, dout, dW):
    """dW[idx[i]] += dout[i] for i in order (np.add.at's order): idx (M,), dout (M, D)."""
    M, D = dout.shape
    for i in range(M):
        r = idx[i]
        for j in range(D):
            dW[r, j] += dout[i, j]


@njit(cache=True, nogil=True)
def _causal_conv_forward(xp, c, out):
    """out[b, t] = sum_s c[s] xp[b, t + w - 1 - s], taps added in order s = 0..w-1 from
    zero (NumPy's order): xp (B, w-1+T, D), c (w, D), out (B, T, D)."""
    B, T, D = out.shape
    w = c.shape[0]
    for bb in range(B):
        for t in range(T):
            for j in range(D):                         # 0 + the first tap, exactly
                out[bb, t, j] = c[0, j] * xp[bb, t + w - 1, j]
            for s in range(1, w):
                for j in range(D):
                    out[bb, t, j] += c[s, j] * xp[bb, t + w - 1 - s, j]


@njit(cache=True, nogil=True)
def _causal_conv_backward(xp, c, dout, dx, dc):
    """dx[b, t] = sum_s c[s] dout[b, t + s] (t + s < T, taps in order), dc[s] = sum_{b,t}
    dout[b, t] xp[b, t + w - 1 - s] (float64 accumulator dc (w, D), tokens in order)."""
    B, T, D = dout.shape
    w = c.shape[0]
    for bb in range(B):
        for t in range(T):
            for j in range(D):
                dx[bb, t, j] = c[0, j] * dout[bb, t, j]
            for s in range(1, min(w, T - t)):
                for j in range(D):
                    dx[bb, t, j] += c[s, j] * dout[bb, t + s, j]
            for s in range(w):
                for j in range(D):
                    dc[s, j] += np.float64(dout[bb, t, j]) * xp[bb, t + w - 1 - s, j]


# ---------------------------------------------------------------- the optimiser

# reassociated as the row sums (_ROW_SUM_FASTMATH): the clipping norm runs on the step's
# serial path after the shards, and the tiny preset's 455,304 float32 gradients take
# 0.033 ms so against 0.372 in one chain of dependent adds
@njit(cache=True, nogil=True, fastmath=_ROW_SUM_FASTMATH)
def _sum_squares(g):
    """sum of g^2 over a flat array (S,), accumulated in float64 in vector lanes."""
    s = 0.0
    for i in range(g.size):
        gi = np.float64(g[i])
        s += gi * gi
    return s


@njit(cache=True, nogil=True)
def _adamw_update(p, g, m, v, keep, beta1, one_minus_beta1, beta2, one_minus_beta2,
                  bc2, eps, step):
    """One AdamW update of a flat parameter (S,) in place, in its dtype and NumPy's order:
        p <- p keep                      keep = 1 - lr lambda (1 when not decayed)
        m <- m beta1 + (1 - beta1) g
        v <- v beta2 + (1 - beta2) g g
        p <- p - step m / (sqrt(v / bc2) + eps)     step = lr / bc1"""
    for i in range(p.size):
        gi = g[i]
        mi = m[i] * beta1 + one_minus_beta1 * gi
        vi = v[i] * beta2 + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * keep - step * mi / (math.sqrt(vi / bc2) + eps)
