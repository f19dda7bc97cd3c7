"""The small layers of a GMA language model, each a forward/backward pair over plain arrays.

Dimension legend (the model's; the mixers use B, H, N, d, e, K the same way):
    B batch        N tokens       D model width (d_model)     V vocabulary (256 bytes)
    F MLP hidden   C classes      M any number of leading axes, flattened

Every layer follows one pattern (llm.c's Python tutorial, docs/tutorial.md):

    out, cache = <layer>_forward(x, params...)
    dx, dparams... = <layer>_backward(dout, cache)

The cache is an explicit tuple of what the forward stored; the docstring says
what is recomputed. Gradients are named d<name> and have the shape and dtype of
what they differentiate. Nothing here holds state: gma_np.nn.model is the shell
that owns the parameters. Each pair is checked against central finite
differences in float64 by tests/test_nn.py (gma_np.gradcheck).
"""

import math

import numpy as np
from scipy.special import logsumexp

# Standard deviation of the initial weight matrices and embeddings (GPT-2's 0.02).
INIT_STD = 0.02

# LayerNorm's eps, added to the variance before the square root. 1e-5 is the
# value of PyTorch's nn.LayerNorm and of GPT-2, so ported weights behave alike;
# it only matters for rows whose variance is below it (never in practice).
LAYERNORM_EPS = 1e-5

# sqrt(2 / pi) and the cubic coefficient of the tanh approximation of GELU
# (Hendrycks and Gimpel 2016), the form GPT-2 uses.
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def _expect(name, ok, expected, got):
    """Raise ValueError naming the argument, what was expected and what came."""
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got}")


# ---------------------------------------------------------------- embedding

def embedding_forward(idx, W):
    """out[b, n] = W[idx[b, n]]: idx (B, N) int, W (V, D) -> out (B, N, D).

    Cache: idx and the table's shape (the backward scatters into zeros)."""
    idx = np.asarray(idx)
    _expect("idx", idx.dtype.kind in "iu", "integer token ids", f"dtype {idx.dtype}")
    _expect("idx", idx.size == 0 or (idx.min() >= 0 and idx.max() < W.shape[0]),
            f"ids in [0, {W.shape[0]})", f"range [{idx.min()}, {idx.max()}]")
    return W[idx], (idx, W.shape, W.dtype)


def embedding_backward(dout, cache):
    """dW (V, D): every row of dout is added to the row of the token that read it."""
    idx, shape, dtype = cache
    # in the forward pass this was: out[b, n] = W[idx[b, n]]
    dW = np.zeros(shape, dtype=dtype)
    np.add.at(dW, idx.ravel(), dout.reshape(-1, shape[1]))
    return dW


def position_forward(n_tokens, W, offset=0):
    """Learned positional embedding: out[n] = W[offset + n], out (N, D), broadcast over B.

    Cache: (offset, N, shape of W). Positions past the table are an error here;
    the decode path (gma_np.nn.model) clamps them, see docs/training.md."""
    if offset + n_tokens > W.shape[0]:
        raise ValueError(f"n_tokens: the positional table has {W.shape[0]} rows, "
                         f"got positions {offset}..{offset + n_tokens - 1}")
    return W[offset:offset + n_tokens], (offset, n_tokens, W.shape, W.dtype)


def position_backward(dout, cache):
    """dW (max_len, D) from dout (B, N, D) or (N, D): summed over the batch."""
    offset, n, shape, dtype = cache
    dW = np.zeros(shape, dtype=dtype)
    # in the forward pass this was: out[n] = W[offset + n], broadcast over B
    dW[offset:offset + n] = dout.reshape(-1, n, shape[1]).sum(axis=0)
    return dW


# ---------------------------------------------------------------- linear

def linear_forward(x, W, b):
    """out = x W + b: x (M..., Din), W (Din, Dout), b (Dout,) or None -> (M..., Dout). Cache: x, W."""
    _expect("W", W.ndim == 2 and W.shape[0] == x.shape[-1], f"shape ({x.shape[-1]}, Dout) for x "
            f"of shape {x.shape}", f"shape {W.shape}")
    _expect("b", b is None or b.shape == (W.shape[1],), f"shape ({W.shape[1]},) or None",
            None if b is None else f"shape {b.shape}")
    out = x @ W
    if b is not None:
        out += b
    return out, (x, W, b is not None)


def linear_backward(dout, cache):
    """(dx, dW, db) of out = x W + b; db is None when there was no bias."""
    x, W, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])                                 # (M, Din)
    d2 = dout.reshape(-1, dout.shape[-1])                           # (M, Dout)
    # in the forward pass this was: out = x @ W + b
    dx = dout @ W.T                                                 # (M..., Din)
    dW = x2.T @ d2                                                  # (Din, Dout)
    db = d2.sum(axis=0) if has_bias else None                       # (Dout,)
    return dx, dW, db


# ---------------------------------------------------------------- layer norm

def layernorm_forward(x, g, b):
    """y = g * (x - mean) / sqrt(var + eps) + b over the last axis: x (M..., D), g, b (D,).

    Cache: xhat (the normalised x), rstd = 1/sqrt(var + eps) (M..., 1) and g."""
    D = x.shape[-1]
    _expect("g, b", g.shape == (D,) and b.shape == (D,), f"shapes ({D},) like x's last axis",
            f"{g.shape} and {b.shape}")
    mean = x.mean(axis=-1, keepdims=True)                           # (M..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)                    # (M..., 1) biased, as in the definition of LayerNorm
    rstd = 1.0 / np.sqrt(var + LAYERNORM_EPS)
    xhat = xc * rstd                                                # (M..., D)
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dy, cache):
    """(dx, dg, db) of layernorm_forward.

    With xhat = (x - mean) rstd and dxhat = dy g, the Jacobian of the
    normalisation gives (docs/tutorial.md, step 3)
        dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))."""
    xhat, rstd, g = cache
    D = xhat.shape[-1]
    # in the forward pass this was: y = xhat * g + b
    dg = (dy * xhat).reshape(-1, D).sum(axis=0)
    db = dy.reshape(-1, D).sum(axis=0)
    dxhat = dy * g
    # in the forward pass this was: xhat = (x - mean(x)) * rstd, rstd = (var(x) + eps)^-1/2
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg, db


# ---------------------------------------------------------------- GELU and the MLP

def gelu_forward(x):
    """y = 1/2 x (1 + tanh(c (x + a x^3))), the tanh form of GELU. Cache: x and the tanh."""
    t = np.tanh(GELU_C * (x + GELU_A * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """dx = dy [1/2 (1 + t) + 1/2 x (1 - t^2) c (1 + 3 a x^2)]."""
    x, t = cache
    # in the forward pass this was: y = 0.5 x (1 + t), t = tanh(c (x + a x^3))
    dt = 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
    return dy * (0.5 * (1.0 + t) + dt)


def mlp_forward(x, W1, b1, W2, b2):
    """out = gelu(x W1 + b1) W2 + b2: x (M..., D), W1 (D, F), W2 (F, D). Cache: the three sub-caches."""
    h, c1 = linear_forward(x, W1, b1)                               # (M..., F)
    a, c2 = gelu_forward(h)                                         # (M..., F)
    out, c3 = linear_forward(a, W2, b2)                             # (M..., D)
    return out, (c1, c2, c3)


def mlp_backward(dout, cache):
    """(dx, dW1, db1, dW2, db2) of mlp_forward, the three stages in reverse."""
    c1, c2, c3 = cache
    # 3. out = a W2 + b2
    da, dW2, db2 = linear_backward(dout, c3)
    # 2. a = gelu(h)
    dh = gelu_backward(da, c2)
    # 1. h = x W1 + b1
    dx, dW1, db1 = linear_backward(dh, c1)
    return dx, dW1, db1, dW2, db2


# ---------------------------------------------------------------- short causal convolution

def causal_conv_forward(x, c, history=None):
    """Depthwise causal convolution over tokens: out[b, t] = sum_s c[s] * x[b, t - s], s = 0..w-1.

    x (B, N, D), c (w, D) one filter of width w per channel. Tokens before the
    sequence are zeros, or `history` (B, w-1, D): the last w-1 inputs of the
    previous chunk (the decode path). Cache: the zero/history-padded input.
    """
    B, N, D = x.shape
    _expect("c", c.ndim == 2 and c.shape[1] == D and c.shape[0] >= 1, f"shape (w, {D}), w >= 1",
            f"shape {c.shape}")
    w = c.shape[0]
    _expect("history", history is None or history.shape == (B, w - 1, D),
            f"shape {(B, w - 1, D)} or None", None if history is None else f"shape {history.shape}")
    pad = np.zeros((B, w - 1, D), dtype=x.dtype) if history is None else history
    xp = np.concatenate([pad, x], axis=1)                           # (B, w-1+N, D)
    out = np.zeros_like(x)
    for s in range(w):
        # tap s reads token t - s, which sits at t + (w - 1 - s) in the padded input
        out += c[s] * xp[:, w - 1 - s:w - 1 - s + N]
    return out, (xp, c)


def causal_conv_backward(dout, cache):
    """(dx, dc) of causal_conv_forward (the gradient of the history is not needed)."""
    xp, c = cache
    w = c.shape[0]
    N = dout.shape[1]
    dxp = np.zeros_like(xp)
    dc = np.zeros_like(c)
    for s in range(w):
        # in the forward pass this was: out += c[s] * xp[:, w-1-s : w-1-s+N]
        window = xp[:, w - 1 - s:w - 1 - s + N]
        dc[s] = (dout * window).reshape(-1, c.shape[1]).sum(axis=0)
        dxp[:, w - 1 - s:w - 1 - s + N] += c[s] * dout
    return dxp[:, w - 1:], dc


# ---------------------------------------------------------------- losses and heads

def cross_entropy_forward(logits, targets, mask=None):
    """Mean negative log-likelihood of the targets, in nats.

    logits (M..., V) float, targets (M...) int in [0, V), mask (M...) bool or
    None (False positions do not count). loss = -sum_m mask_m log softmax(logits_m)[t_m] / sum_m mask_m.

    Cache: the softmax probabilities (M, V), the targets and the mask weights.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)                                    # (M, V)
    _expect("targets", np.shape(targets) == logits.shape[:-1], f"shape {logits.shape[:-1]}",
            f"shape {np.shape(targets)}")
    t = targets.reshape(-1)                                         # (M,)
    if t.size and (t.min() < 0 or t.max() >= V):
        raise ValueError(f"targets: expected integers in [0, {V}), got range "
                         f"[{t.min()}, {t.max()}]")
    w = (np.ones(t.shape, dtype=flat.dtype) if mask is None
         else mask.reshape(-1).astype(flat.dtype))                  # (M,)
    count = w.sum()
    if count == 0:
        raise ValueError("mask: every position is masked out, the mean loss is undefined")
    lse = logsumexp(flat, axis=-1)                                  # (M,)
    logp_t = flat[np.arange(t.size), t] - lse                       # (M,) log-probability of the target
    loss = -float((w * logp_t).sum() / count)
    probs = np.exp(flat - lse[:, None])                             # (M, V)
    return loss, (probs, t, w / count, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * w_m (softmax_m - onehot(t_m)), w_m = mask_m / sum(mask)."""
    probs, t, w, shape = cache
    # in the forward pass this was: loss = -sum_m w_m (logits[m, t_m] - logsumexp(logits[m]))
    dlogits = probs.copy()
    dlogits[np.arange(t.size), t] -= 1.0
    dlogits *= (dloss * w)[:, None]
    return dlogits.reshape(shape)


def masked_mean_pool_forward(x, mask=None):
    """pooled[b] = sum_n mask[b, n] x[b, n] / sum_n mask[b, n]: x (B, N, D) -> (B, D).

    Padding positions (mask False) are ignored; a row with no real token is an
    error (its mean is undefined). Cache: the weights w = mask / count (B, N)."""
    B, N, _ = x.shape
    _expect("mask", mask is None or np.shape(mask) == (B, N), f"shape {(B, N)} or None",
            None if mask is None else f"shape {np.shape(mask)}")
    m = np.ones((B, N), dtype=x.dtype) if mask is None else mask.astype(x.dtype)
    count = m.sum(axis=1, keepdims=True)                            # (B, 1)
    if (count == 0).any():
        raise ValueError(f"mask: rows {np.flatnonzero(count[:, 0] == 0).tolist()} have no real token")
    w = m / count                                                   # (B, N)
    return np.einsum("bn,bnd->bd", w, x), (w,)


def masked_mean_pool_backward(dpooled, cache):
    """dx[b, n] = w[b, n] dpooled[b]."""
    (w,) = cache
    # in the forward pass this was: pooled[b] = sum_n w[b, n] x[b, n]
    return w[:, :, None] * dpooled[:, None, :]


def classifier_forward(x, W, b, mask=None):
    """Classification head: logits = masked_mean_pool(x, mask) W + b, x (B, N, D) -> (B, C)."""
    pooled, c1 = masked_mean_pool_forward(x, mask)                  # (B, D)
    logits, c2 = linear_forward(pooled, W, b)                       # (B, C)
    return logits, (c1, c2)


def classifier_backward(dlogits, cache):
    """(dx, dW, db) of classifier_forward."""
    c1, c2 = cache
    dpooled, dW, db = linear_backward(dlogits, c2)
    return masked_mean_pool_backward(dpooled, c1), dW, db
