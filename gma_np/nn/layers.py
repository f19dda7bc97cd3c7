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

Fast paths and their references: the layers that NumPy would run in several
passes over an (M, D) or (M, V) array (GELU, layer norm, softmax cross-entropy, the
embedding scatter, the convolution) run private Numba loops (gma_np.nn._kernels);
the plain NumPy form of each stays here as `<layer>_forward_naive` /
`<layer>_backward_naive`, the reference tests/test_layers_fast.py holds the fast
path to (the same bits for GELU, the embedding and the convolution's forward;
within a few float32 roundings, or 1e-12 in float64, for the others, which
accumulate in float64). Large matrix products are cut in pieces that the
BLOCK_STREAMS streams take as they are free (`_matmuls`), the same pieces
whatever the thread count.
"""

import math
import threading

import numpy as np
from scipy.special import logsumexp

from gma_np._numerics import BLOCK_STREAMS
from gma_np._threads import run_streams, sum_in_order
from gma_np.nn import _kernels as K

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

# Matrix products of at least this many multiply-adds are cut in MATMUL_PIECES pieces
# that BLOCK_STREAMS Python threads take in turn (gma_np._threads.run_streams), each
# with BLAS on one thread; smaller ones run whole. Handing work to the streams costs
# 50-75 us (run_streams of nothing, loaded 2-core machine), what a float32 product of
# 2^22 multiply-adds takes on one core (2^21: 24 us): from 2^24 (~0.2 ms) the second
# core pays for it. Four pieces for two streams: a stream held up by another process
# leaves its next piece to the other (docs/performance.md, "The training step").
MATMUL_SPLIT_MIN_WORK = 2 ** 24
MATMUL_PIECES = 4
# Rows or columns of a result per piece at least: thinner pieces leave BLAS's
# register blocks (16 to 32 wide for float32 on AVX-512) mostly empty.
MATMUL_PIECE_MIN = 64
# The names of run_streams' worker threads start so (gma_np._threads): a product
# computed inside a stream runs its pieces there, one after the other.
STREAM_THREAD_PREFIX = "gma_np"

# Elements per pass of the GELU and rows per pass of the softmax cross-entropy: the
# wrappers run kernel, NumPy's tanh or exp, kernel on one block at a time, so the
# three passes read a block that is still in L2 (64 Ki float32 elements: 256 KiB;
# 128 rows of V = 256 float64: 256 KiB), not the whole (M, F) or (M, V) array
# from memory three times.
GELU_BLOCK = 2 ** 16
SOFTMAX_BLOCK_ROWS = 128
# The GELU, the layer norm and the cross-entropy's softmax run as BLOCK_STREAMS pieces
# on the streams (their kernels release the GIL) from this many elements on: a
# float32 GELU forward of 2^18 elements takes ~0.3 ms on one core, four to six times
# what handing work to the streams costs (50-75 us, see MATMUL_SPLIT_MIN_WORK).
STREAM_MIN_ELEMENTS = 2 ** 18


def _in_pieces(n, size, fn):
    """[fn(piece) for each piece]: BLOCK_STREAMS consecutive pieces of range(n) (slices),
    taken by the streams at once, when the array holds at least STREAM_MIN_ELEMENTS
    (size) elements; else one piece, the whole range. The pieces depend on the sizes
    only (inside a stream they run one after the other), so a partial sum per piece,
    added in order, is the same bits whatever the thread count."""
    if size < STREAM_MIN_ELEMENTS or n < BLOCK_STREAMS:
        return [fn(slice(0, n))]
    pieces = _pieces(n, BLOCK_STREAMS)
    if threading.current_thread().name.startswith(STREAM_THREAD_PREFIX):
        return [fn(piece) for piece in pieces]
    return run_streams(lambda s: fn(pieces[s]), BLOCK_STREAMS)


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
    """dW (V, D): every row of dout is added to the row of the token that read it,
    tokens in order (np.add.at's order, so the same bits as embedding_backward_naive)."""
    idx, shape, dtype = cache
    # in the forward pass this was: out[b, n] = W[idx[b, n]]
    dW = np.zeros(shape, dtype=dtype)
    K._embedding_backward(np.ascontiguousarray(idx.ravel()),
                          np.ascontiguousarray(dout, dtype=dtype).reshape(-1, shape[1]), dW)
    return dW


def embedding_backward_naive(dout, cache):
    """The reference of embedding_backward: np.add.at."""
    idx, shape, dtype = cache
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

def _pieces(n, parts):
    """`parts` slices that cut range(n) into nearly equal consecutive pieces."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


class _Product:
    """One matrix product a @ b (+ bias) of _matmuls, and its pieces (see there)."""

    def __init__(self, a, b, bias=None, column_sums=None):
        self.a, self.b, self.bias, self.column_sums = a, b, bias, column_sums
        M, Kc, Nc = a.shape[0], a.shape[1], b.shape[1]
        self.out = np.empty((M, Nc), dtype=np.result_type(a, b))
        # a weight gradient x^T dy (column_sums: its bias gradient) is cut along its long
        # contraction, each piece a whole (M, Nc) partial product; any other product along
        # the longer side of its result
        self.split = "inner" if column_sums is not None else ("rows" if M >= Nc else "cols")
        length = {"rows": M, "cols": Nc, "inner": Kc}[self.split]      # of the cut axis
        n = min(MATMUL_PIECES, length // MATMUL_PIECE_MIN)
        self.pieces = (_pieces(length, n) if M * Kc * Nc >= MATMUL_SPLIT_MIN_WORK and n > 1
                       else [slice(None)])
        self.partials = [None] * len(self.pieces)

    def piece(self, i):
        a, b, out, bias, s = self.a, self.b, self.out, self.bias, self.pieces[i]
        if self.split == "inner" and len(self.pieces) > 1:       # partial sums, finish() adds
            self.partials[i] = (np.matmul(a[:, s], b[s]),
                                None if self.column_sums is None else b[s].sum(axis=0))
        elif self.split == "inner":                             # one piece: the whole product
            np.matmul(a, b, out=out)
            if self.column_sums is not None:
                np.sum(b, axis=0, out=self.column_sums)
        elif self.split == "rows":
            np.matmul(a[s], b, out=out[s])
            if bias is not None:
                out[s] += bias
        else:
            np.matmul(a, b[:, s], out=out[:, s])
            if bias is not None:
                out[:, s] += bias[s]

    def finish(self):
        """The output of a product cut along its contraction: its partial products (and
        column sums) added in piece order, whatever stream computed them."""
        if self.split == "inner" and len(self.pieces) > 1:
            self.out[...] = sum_in_order([t[0] for t in self.partials])
            if self.column_sums is not None:
                self.column_sums[...] = sum_in_order([t[1] for t in self.partials])
            self.partials = [None] * len(self.pieces)
        return self.out


def _matmuls(*products):
    """Compute every _Product, its pieces on BLOCK_STREAMS streams; returns their outputs.

    A product a (M, Kc) @ b (Kc, Nc) (+ bias) of at least MATMUL_SPLIT_MIN_WORK
    multiply-adds is cut in up to MATMUL_PIECES pieces of at least MATMUL_PIECE_MIN
    rows or columns of the result, along its longer side, or, when column_sums (Nc,) is
    given (a linear layer's weight gradient x^T dy beside its bias gradient, which
    column_sums receives: the column sums of b), along its contraction Kc: each piece
    then a whole partial product over a range of the M rows of x and dy, the partials
    (and partial column sums) added in piece order (a slice of the rows keeps BLAS
    faster than a thin slice of the columns of dy: docs/performance.md, section 6).
    Each free stream takes the next piece of any product (run_streams: at once when
    Numba has more than one thread, one after the other otherwise), so the stream that
    has a core on a loaded machine does more of them. The pieces are fixed by the sizes,
    not by the threads, and so is the order of every sum: the bits are the same
    whatever the thread count."""
    work = [(p, i) for p in products for i in range(len(p.pieces))]
    if len(work) == 1 or threading.current_thread().name.startswith(STREAM_THREAD_PREFIX):
        for p, i in work:                           # one piece, or already inside a stream
            p.piece(i)
    else:
        todo = iter(work)
        lock = threading.Lock()

        def stream(_):
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                item[0].piece(item[1])
        run_streams(stream, BLOCK_STREAMS)
    return [p.finish() for p in products]


def linear_forward(x, W, b):
    """out = x W + b: x (M..., Din), W (Din, Dout), b (Dout,) or None -> (M..., Dout). Cache: x, W.

    The leading axes are flattened first: one (M, Din) x (Din, Dout) product, not one
    per leading index (NumPy's matmul of a 3-D x loops over B products of N rows)."""
    _expect("W", W.ndim == 2 and W.shape[0] == x.shape[-1], f"shape ({x.shape[-1]}, Dout) for x "
            f"of shape {x.shape}", f"shape {W.shape}")
    _expect("b", b is None or b.shape == (W.shape[1],), f"shape ({W.shape[1]},) or None",
            None if b is None else f"shape {b.shape}")
    x2 = x.reshape(-1, x.shape[-1])                                 # (M, Din)
    (out,) = _matmuls(_Product(x2, W, b))                           # (M, Dout)
    out = out.reshape(x.shape[:-1] + (W.shape[1],))                 # (M..., Dout)
    return out, (x, W, b is not None)


def linear_backward(dout, cache):
    """(dx, dW, db) of out = x W + b; db is None when there was no bias."""
    x, W, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])                                 # (M, Din)
    d2 = dout.reshape(-1, dout.shape[-1])                           # (M, Dout)
    # in the forward pass this was: out = x @ W + b
    db = np.empty(d2.shape[1], dtype=d2.dtype) if has_bias else None   # (Dout,)
    dx, dW = _matmuls(_Product(d2, W.T),                            # (M, Din)
                      _Product(x2.T, d2, column_sums=db))           # (Din, Dout)
    return dx.reshape(x.shape[:-1] + (W.shape[0],)), dW, db


def linear_forward_naive(x, W, b):
    """The reference of linear_forward: x @ W + b in one NumPy expression."""
    out = x @ W
    if b is not None:
        out = out + b
    return out, (x, W, b is not None)


def linear_backward_naive(dout, cache):
    """The reference of linear_backward."""
    x, W, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])
    d2 = dout.reshape(-1, dout.shape[-1])
    return dout @ W.T, x2.T @ d2, (d2.sum(axis=0) if has_bias else None)


# ---------------------------------------------------------------- layer norm

def _rows(a):
    """a as a C-contiguous (M, D) array (a view when it is contiguous already)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


def layernorm_forward(x, g, b):
    """y = g * (x - mean) / sqrt(var + eps) + b over the last axis: x (M..., D), g, b (D,).

    Cache: xhat (the normalised x), rstd = 1/sqrt(var + eps) (M..., 1) and g.
    One pass per row (gma_np.nn._kernels._layernorm_forward); the row statistics are
    accumulated in float64 (layernorm_forward_naive: NumPy's, in x's dtype)."""
    D = x.shape[-1]
    _expect("g, b", g.shape == (D,) and b.shape == (D,), f"shapes ({D},) like x's last axis",
            f"{g.shape} and {b.shape}")
    x2 = _rows(x)                                                   # (M, D)
    y = np.empty(x.shape, dtype=np.result_type(x, g, b))
    xhat = np.empty(x.shape, dtype=x.dtype)
    rstd = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)             # (M..., 1)
    y2, xhat2, rstd1 = y.reshape(-1, D), xhat.reshape(-1, D), rstd.reshape(-1)
    _in_pieces(x2.shape[0], x2.size, lambda rows: K._layernorm_forward(
        x2[rows], g, b, LAYERNORM_EPS, y2[rows], xhat2[rows], rstd1[rows]))
    return y, (xhat, rstd, g)


def layernorm_backward(dy, cache):
    """(dx, dg, db) of layernorm_forward.

    With xhat = (x - mean) rstd and dxhat = dy g, the Jacobian of the
    normalisation gives (docs/tutorial.md, step 3)
        dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
    One pass per row; the row means and dg, db are accumulated in float64."""
    xhat, rstd, g = cache
    D = xhat.shape[-1]
    dx = np.empty(xhat.shape, dtype=np.result_type(dy, g, xhat))
    dy2, xhat2, rstd1, dx2 = _rows(dy), _rows(xhat), rstd.reshape(-1), dx.reshape(-1, D)

    def piece(rows):                                                # float64 accumulators
        dg, db = np.zeros(D), np.zeros(D)
        # in the forward pass this was: y = xhat * g + b, xhat = (x - mean(x)) * rstd
        K._layernorm_backward(dy2[rows], xhat2[rows], rstd1[rows], g, dx2[rows], dg, db)
        return dg, db
    partial = _in_pieces(dy2.shape[0], dy2.size, piece)
    dg = sum_in_order([t[0] for t in partial])                      # (D,)
    db = sum_in_order([t[1] for t in partial])                      # (D,)
    dtype = np.result_type(dy, xhat)
    return dx, dg.astype(dtype), db.astype(dy.dtype)


def layernorm_forward_naive(x, g, b):
    """The reference of layernorm_forward, in NumPy passes."""
    mean = x.mean(axis=-1, keepdims=True)                           # (M..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)                    # (M..., 1) biased, as in the definition of LayerNorm
    rstd = 1.0 / np.sqrt(var + LAYERNORM_EPS)
    xhat = xc * rstd                                                # (M..., D)
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward_naive(dy, cache):
    """The reference of layernorm_backward, in NumPy passes."""
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
    """y = 1/2 x (1 + tanh(c (x + a x^3))), the tanh form of GELU. Cache: x and the tanh.

    Per block of GELU_BLOCK elements: a kernel writes u = c (x + a x^3) into the
    cache's t, NumPy's vectorised tanh takes it in place, a kernel writes y. Every
    operation is gelu_forward_naive's, in its order and dtype: the same bits."""
    x = np.ascontiguousarray(x)
    _expect("x", x.dtype in (np.float32, np.float64), "a float32 or float64 array",
            f"dtype {x.dtype}")
    one = x.dtype.type
    t = np.empty_like(x)
    y = np.empty_like(x)
    xf, tf, yf = x.reshape(-1), t.reshape(-1), y.reshape(-1)

    def piece(elements):
        for s in range(elements.start, elements.stop, GELU_BLOCK):
            blk = slice(s, min(s + GELU_BLOCK, elements.stop))
            K._gelu_inner(xf[blk], tf[blk], one(GELU_C), one(GELU_A))
            np.tanh(tf[blk], out=tf[blk])
            K._gelu_outer(xf[blk], tf[blk], yf[blk], one(0.5), one(1.0))
    _in_pieces(xf.size, xf.size, piece)
    return y, (x, t)


def gelu_backward(dy, cache):
    """dx = dy [1/2 (1 + t) + 1/2 x (1 - t^2) c (1 + 3 a x^2)], one pass (the same bits as
    gelu_backward_naive)."""
    x, t = cache
    one = x.dtype.type
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    dx = np.empty_like(x)
    dyf, xf, tf, dxf = dy.reshape(-1), x.reshape(-1), t.reshape(-1), dx.reshape(-1)
    # in the forward pass this was: y = 0.5 x (1 + t), t = tanh(c (x + a x^3))
    _in_pieces(xf.size, xf.size, lambda s: K._gelu_backward(
        dyf[s], xf[s], tf[s], dxf[s], one(0.5), one(1.0), one(GELU_C), one(3.0 * GELU_A)))
    return dx


def gelu_forward_naive(x):
    """The reference of gelu_forward, in NumPy passes."""
    t = np.tanh(GELU_C * (x + GELU_A * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward_naive(dy, cache):
    """The reference of gelu_backward."""
    x, t = cache
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
    out = np.empty(x.shape, dtype=np.result_type(x, c))
    # tap s reads token t - s, which sits at t + (w - 1 - s) in the padded input;
    # one pass, the taps added in order (the same bits as causal_conv_forward_naive)
    K._causal_conv_forward(xp, np.ascontiguousarray(c), out)
    return out, (xp, c)


def causal_conv_backward(dout, cache):
    """(dx, dc) of causal_conv_forward (the gradient of the history is not needed).
    One pass; dc accumulated in float64."""
    xp, c = cache
    dx = np.empty(dout.shape, dtype=np.result_type(dout, c))
    dc = np.zeros(c.shape)                                          # float64 accumulator
    # in the forward pass this was: out[b, t] = sum_s c[s] xp[b, t + w - 1 - s]
    K._causal_conv_backward(xp, np.ascontiguousarray(c), np.ascontiguousarray(dout), dx, dc)
    return dx, dc.astype(c.dtype)


def causal_conv_forward_naive(x, c, history=None):
    """The reference of causal_conv_forward: one NumPy pass per tap."""
    B, N, D = x.shape
    w = c.shape[0]
    pad = np.zeros((B, w - 1, D), dtype=x.dtype) if history is None else history
    xp = np.concatenate([pad, x], axis=1)                           # (B, w-1+N, D)
    out = np.zeros_like(x)
    for s in range(w):
        out += c[s] * xp[:, w - 1 - s:w - 1 - s + N]
    return out, (xp, c)


def causal_conv_backward_naive(dout, cache):
    """The reference of causal_conv_backward."""
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

def _cross_entropy_check(logits, targets, mask):
    """(flat logits (M, V), targets (M,), mask weights w (M,) in the logits' dtype, count)."""
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
    return flat, t, w, count


def log_softmax_rows(flat):
    """(lse (M,) float64, probs (M, V) in the dtype of flat) of the rows of flat (M, V):
    lse = logsumexp(flat, axis=-1) by SciPy's algorithm, probs = softmax(flat, axis=-1).

    Per block of SOFTMAX_BLOCK_ROWS rows: NumPy's max reduction finds each row's maximum,
    a kernel writes flat - max in float64, NumPy's vectorised exp takes it in place, a kernel sums it
    (gma_np.nn._kernels._softmax_finish) and writes the probabilities. Everything is
    accumulated in float64; tests/test_layers_fast.py holds it to
    scipy.special.logsumexp and scipy.special.softmax, infinite and NaN rows included."""
    flat = np.ascontiguousarray(flat)
    M, V = flat.shape
    probs = np.empty((M, V), dtype=flat.dtype)
    lse = np.empty(M)

    def piece(part):                                                # rows part.start .. stop - 1
        rows = min(part.stop - part.start, SOFTMAX_BLOCK_ROWS)
        row_max = np.empty(rows)
        n_max = np.empty(rows, dtype=np.int64)
        scratch = np.empty((rows, V))                               # float64, one block
        # inf - inf of an infinite row is NaN, as in SciPy; interpreted (NUMBA_DISABLE_JIT=1)
        # the loops would warn about it
        with np.errstate(invalid="ignore"):
            for s in range(part.start, part.stop, SOFTMAX_BLOCK_ROWS):
                blk = slice(s, min(part.stop, s + SOFTMAX_BLOCK_ROWS))
                r = blk.stop - s
                row_max[:r] = flat[blk].max(axis=1)               # NaN where a row holds one
                K._softmax_shift(flat[blk], row_max[:r], scratch[:r], n_max[:r])
                np.exp(scratch[:r], out=scratch[:r])
                K._softmax_finish(flat[blk], scratch[:r], row_max[:r], n_max[:r], probs[blk],
                                  lse[blk])
    _in_pieces(M, flat.size, piece)
    return lse, probs


def cross_entropy_forward(logits, targets, mask=None):
    """Mean negative log-likelihood of the targets, in nats.

    logits (M..., V) float, targets (M...) int in [0, V), mask (M...) bool or
    None (False positions do not count). loss = -sum_m mask_m log softmax(logits_m)[t_m] / sum_m mask_m.

    Cache: the softmax probabilities (M, V), the targets and the mask weights.
    The log-sum-exp and the softmax are log_softmax_rows' (fused, float64 sums); the
    loss is summed in float64 (cross_entropy_forward_naive: scipy's logsumexp in the
    logits' dtype, then NumPy passes).
    """
    flat, t, w, count = _cross_entropy_check(logits, targets, mask)
    lse, probs = log_softmax_rows(flat)                             # (M,) float64, (M, V)
    logp_t = flat[np.arange(t.size), t] - lse                       # (M,) float64
    loss = -float((w.astype(np.float64) * logp_t).sum() / float(count))
    return loss, (probs, t, w / count, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * w_m (softmax_m - onehot(t_m)), w_m = mask_m / sum(mask). One pass."""
    probs, t, w, shape = cache
    # in the forward pass this was: loss = -sum_m w_m (logits[m, t_m] - logsumexp(logits[m]))
    scale = np.ascontiguousarray(dloss * w, dtype=probs.dtype)      # (M,)
    dlogits = np.empty_like(probs)
    K._cross_entropy_backward(probs, np.ascontiguousarray(t, dtype=np.int64), scale, dlogits,
                              probs.dtype.type(1.0))
    return dlogits.reshape(shape)


def cross_entropy_forward_naive(logits, targets, mask=None):
    """The reference of cross_entropy_forward: scipy's logsumexp, then NumPy passes."""
    flat, t, w, count = _cross_entropy_check(logits, targets, mask)
    lse = logsumexp(flat, axis=-1)                                  # (M,)
    logp_t = flat[np.arange(t.size), t] - lse                       # (M,) log-probability of the target
    loss = -float((w * logp_t).sum() / count)
    probs = np.exp(flat - lse[:, None])                             # (M, V)
    return loss, (probs, t, w / count, logits.shape)


def cross_entropy_backward_naive(dloss, cache):
    """The reference of cross_entropy_backward."""
    probs, t, w, shape = cache
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
