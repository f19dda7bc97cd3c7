"""Private Numba loops of the generic layers at one token: the pieces of the fused decode.

Dimension legend: D model width, F MLP hidden width, w convolution taps, Din, Dout the
sides of a matrix product.

gma_np.nn.decode runs a whole token through the model in one Numba call; these are
the layers it is made of, each over one token's vector (the layers of
gma_np.nn.layers over an (M, D) array are their references). The mixers' one-token
steps (gma_np/mixers/*) use _matvec and the activations too.

Numerics: every input is widened to float64 and every result is float64; the weights
stay in the model's dtype (float32 weights are half the bytes to read per token, and
reading them is most of a token's time). Each sum runs in a fixed order, so a token's
result does not depend on the thread count or on how many tokens come with it.
Plain loops: they run with NUMBA_DISABLE_JIT=1.
"""

import math

import numpy as np
from numba import njit


@njit(cache=True)
def _matvec(x, W, out):
    """out = x W: x (Din,) float64, W (Din, Dout) any float dtype, out (Dout,) float64.

    Every out[j] adds x[i] W[i, j] for i = 0, 1, ..., Din - 1 in that order (the naive
    loop's order); four rows of W per pass over out, so that out is loaded and stored
    once per four rows, and the loop over j (contiguous in W) is vectorised."""
    Din, Dout = W.shape
    for j in range(Dout):
        out[j] = 0.0
    i = 0
    while i + 4 <= Din:
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for j in range(Dout):
            out[j] = (((out[j] + x0 * np.float64(W[i, j])) + x1 * np.float64(W[i + 1, j]))
                      + x2 * np.float64(W[i + 2, j])) + x3 * np.float64(W[i + 3, j])
        i += 4
    while i < Din:
        xi = x[i]
        for j in range(Dout):
            out[j] += xi * np.float64(W[i, j])
        i += 1


@njit(cache=True)
def _add_bias(out, b):
    """out += b (the product first, then the bias: linear_forward's order)."""
    for j in range(out.shape[0]):
        out[j] += np.float64(b[j])


@njit(cache=True)
def _layernorm(x, g, b, eps, out):
    """out = g (x - mean) / sqrt(var + eps) + b of one row x (D,): mean and biased
    variance in two float64 passes, as gma_np.nn.layers.layernorm_forward."""
    D = x.shape[0]
    mean = 0.0
    for j in range(D):
        mean += x[j]
    mean /= D
    var = 0.0
    for j in range(D):
        c = x[j] - mean
        var += c * c
    r = 1.0 / math.sqrt(var / D + eps)
    for j in range(D):
        out[j] = (x[j] - mean) * r * np.float64(g[j]) + np.float64(b[j])


@njit(cache=True)
def _conv_step(h, c, history):
    """One token of the depthwise causal convolution, in place: h (D,) becomes
    sum_s c[s] x_{t-s} with x_t = h and x_{t-s} = history[w-1-s] (the last w-1 inputs,
    oldest first); then history drops its oldest row and takes x_t. Taps in order
    s = 0..w-1, as gma_np.nn.layers.causal_conv_forward. c (w, D), history (w-1, D)."""
    w = c.shape[0]
    for j in range(h.shape[0]):
        x = h[j]
        acc = np.float64(c[0, j]) * x
        for s in range(1, w):
            acc += np.float64(c[s, j]) * history[w - 1 - s, j]
        for s in range(w - 2):
            history[s, j] = history[s + 1, j]
        if w > 1:
            history[w - 2, j] = x
        h[j] = acc


@njit(cache=True)
def _gelu(x, c, a):
    """x = 1/2 x (1 + tanh(c (x + a x^3))) in place (the tanh form of GELU)."""
    for i in range(x.shape[0]):
        v = x[i]
        x[i] = 0.5 * v * (1.0 + math.tanh(c * (v + a * v * v * v)))


@njit(cache=True)
def _sigmoid(v):
    """1 / (1 + exp(-v)) without overflow for either sign (mamba's _sigmoid)."""
    e = math.exp(-abs(v))
    return 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)


@njit(cache=True)
def _softplus(v):
    """log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|))."""
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))
