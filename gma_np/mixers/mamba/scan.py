"""The selective scan: validating public wrappers over the Numba kernels (kernels.py).

Dimension legend: B batch, N tokens (n for a decoding chunk), M channels, S state size
per channel. As arrays, B and C are the scan's write and read vectors (B, N, S); as a
dimension, B is the batch.

    y = selective_scan(x, delta, A, B, C, D, h0=None)                   # (B, N, M)
    y, cache = selective_scan_forward(x, delta, A, B, C, D, h0=None, store_states=False)
    grads = selective_scan_backward(dy, cache)     # dict x, delta, A, B, C, D (and h0 if given)
    y, state = selective_scan_recurrent(x, delta, A, B, C, D, state=None)   # decoding

Per batch b and channel m, from h_{-1} = h0 (zeros unless given):

    h_t = exp(delta_t A) * h_{t-1} + delta_t x_t B_t,    y_t = C_t . h_t + D x_t

x, delta (B, N, M), B, C (B, N, S) share one dtype, float32 or float64, which y and
their gradients have; A (M, S), D (M,) and h0 (B, M, S) may be either, and their
gradients come back in the dtype they came in. The state is float64 throughout.

What the forward keeps for the backward (the cache): the inputs, and the state before
every SCAN_CHUNK-th token (B, M, ceil(N / SCAN_CHUNK), S) float64; the backward re-runs
each chunk's recurrence from its checkpoint (kernels.py, docs/mixers/mamba.md section 4
for the cost). store_states=True keeps all B N M S states instead, and the backward
reads them: the same gradients, bit for bit, for SCAN_CHUNK times the memory.
"""

import numbers
from dataclasses import dataclass

import numpy as np

from gma_np import _validation as check
from gma_np._threads import threads_for
from gma_np.mixers.mamba.kernels import _selective_scan_backward, _selective_scan_forward

# Tokens per checkpoint chunk. The checkpoints cost M S / SCAN_CHUNK float64 per token
# and batch row (128 bytes at M = 256, S = 16: an eighth of float32 x), the backward's
# buffers 2 SCAN_CHUNK S float64 per task (64 KiB at S = 16, inside L2). The re-run
# costs the same whatever the chunk, so the chunk is as long as the buffers stay in L2;
# fwd+bwd times at B=1, N=4096, M=256, S=16 were within noise of each other from 64 to
# 512 tokens (docs/mixers/mamba.md, section 4).
SCAN_CHUNK = 256

# Channel groups of the backward: its tasks are B x SCAN_CHANNEL_GROUPS, each a fixed
# group of channels with its own partial sums of dB and dC (2 x B x G x N x S float64,
# 1 KiB per token and batch row at S = 16, as much as float32 x at M = 256). Fixed,
# not the thread count, so that the sums are the same bit for bit at any thread
# count; 4 keeps up to 4 cores busy at B = 1.
SCAN_CHANNEL_GROUPS = 4

# Channels per task of the forward (which has no sums over channels, so its split is
# free): 16 float32 channels are one 64-byte cache line of x, delta and y per token, and
# B x ceil(M / 16) tasks keep many cores busy.
SCAN_CHANNEL_BLOCK = 16

_EMPTY = np.empty((0, 0, 0, 0))


@dataclass
class SelectiveScanCache:
    """What selective_scan_forward keeps for selective_scan_backward."""
    x: np.ndarray             # (B, N, M)  the inputs, as validated
    delta: np.ndarray         # (B, N, M)
    A: np.ndarray             # (M, S) float64
    B: np.ndarray             # (B, N, S)
    C: np.ndarray             # (B, N, S)
    D: np.ndarray             # (M,) float64
    h0: np.ndarray            # (B, M, S) float64 (zeros when none was given)
    h_last: np.ndarray        # (B, M, S) float64, the state after the last token
    chunk: int                # tokens per checkpoint
    checkpoints: np.ndarray   # (B, M, ceil(N/chunk), S) float64, or empty when states are kept
    states: np.ndarray        # (B, N, M, S) float64 when store_states, else empty
    dtypes: tuple             # dtypes of A, D and h0 as given (h0: None if not given)


def _check_inputs(x, delta, A, B, C, D, h0, h0_name="h0"):
    """Validate the scan's inputs (module docstring); the kernels' float64 A, D, h0."""
    x = check.float_array("x", x, ndim=3)
    Bz, N, M = x.shape
    if Bz < 1 or N < 1 or M < 1:
        raise ValueError(f"x: expected shape (B, N, M) with B, N, M >= 1, got {x.shape}")
    delta = check.float_array("delta", delta, ndim=3)
    check.check_shape("delta", delta, x.shape, "(B, N, M), the shape of x")
    A = check.float_array("A", A, ndim=2)
    if A.shape[0] != M or A.shape[1] < 1:
        raise ValueError(f"A: expected shape (M, S) with M = {M} channels of x and S >= 1, "
                         f"got {A.shape}")
    S = A.shape[1]
    B = check.float_array("B", B, ndim=3)
    check.check_shape("B", B, (Bz, N, S), "(B, N, S) from x and A")
    C = check.float_array("C", C, ndim=3)
    check.check_shape("C", C, (Bz, N, S), "(B, N, S) from x and A")
    D = check.float_array("D", D, ndim=1)
    check.check_shape("D", D, (M,), "(M,) from x")
    for name, a in (("delta", delta), ("B", B), ("C", C)):
        if a.dtype != x.dtype:
            raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {a.dtype}")
    if h0 is None:
        dtypes = (A.dtype, D.dtype, None)
        h0 = np.zeros((Bz, M, S))
    else:
        h0 = check.float_array(h0_name, h0, ndim=3)
        check.check_shape(h0_name, h0, (Bz, M, S), "(B, M, S) from x and A")
        dtypes = (A.dtype, D.dtype, h0.dtype)
    as64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)
    return x, delta, as64(A), B, C, as64(D), as64(h0), dtypes


def _check_chunk(chunk):
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    return int(chunk)


def selective_scan_forward(x, delta, A, B, C, D, h0=None, *, store_states=False,
                           chunk=SCAN_CHUNK):
    """The selective scan (module docstring): y (B, N, M) in the dtype of x, and the cache.

    x, delta  (B, N, M)   delta_t: the step size (softplus output in the block, >= 0)
    A         (M, S)      the diagonal of the state matrix (negative in the block)
    B, C      (B, N, S)   the input-dependent write and read vectors
    D         (M,)        the skip connection
    h0        (B, M, S)   the state before token 0, or None for zeros
    store_states: keep every state for the backward instead of checkpoints
    chunk     tokens per checkpoint (the backward re-runs one chunk at a time)
    """
    x, delta, A, B, C, D, h0, dtypes = _check_inputs(x, delta, A, B, C, D, h0)
    chunk = _check_chunk(chunk)
    Bz, N, M = x.shape
    S = A.shape[1]
    y = np.empty(x.shape, dtype=x.dtype)                                       # (B, N, M)
    h_last = np.empty((Bz, M, S))
    checkpoints = _EMPTY if store_states else np.empty((Bz, M, -(-N // chunk), S))
    states = np.empty((Bz, N, M, S)) if store_states else _EMPTY
    with threads_for(Bz * N * M * S):
        _selective_scan_forward(x, delta, A, B, C, D, h0, chunk, SCAN_CHANNEL_BLOCK, y, h_last,
                                checkpoints, states)
    return y, SelectiveScanCache(x=x, delta=delta, A=A, B=B, C=C, D=D, h0=h0, h_last=h_last,
                                 chunk=chunk, checkpoints=checkpoints, states=states,
                                 dtypes=dtypes)


def selective_scan_backward(dy, cache):
    """Gradients of sum(y * dy) for every input of selective_scan_forward.

    dy (B, N, M). Returns a dict x, delta, B, C (dtype of x), A, D (their own dtypes)
    and h0 when one was given. The derivation: docs/mixers/mamba.md, section 3.
    """
    c = cache
    dy = check.float_array("dy", dy, ndim=3)
    check.check_shape("dy", dy, c.x.shape, "(B, N, M), the shape of y")
    dy = dy.astype(c.x.dtype, copy=False)
    Bz, N, M = c.x.shape
    S = c.A.shape[1]
    G = SCAN_CHANNEL_GROUPS
    dx = np.empty(c.x.shape, dtype=c.x.dtype)
    ddelta = np.empty(c.x.shape, dtype=c.x.dtype)
    dA_part = np.empty((Bz, M, S))
    dB_part = np.zeros((Bz, G, N, S))
    dC_part = np.zeros((Bz, G, N, S))
    dD_part = np.empty((Bz, M))
    dh0 = np.empty((Bz, M, S))
    with threads_for(Bz * N * M * S):
        _selective_scan_backward(dy, c.x, c.delta, c.A, c.B, c.C, c.D, c.h0, c.chunk,
                                 c.checkpoints, c.states, dx, ddelta, dA_part, dB_part,
                                 dC_part, dD_part, dh0)
    A_dtype, D_dtype, h0_dtype = c.dtypes
    grads = {"x": dx, "delta": ddelta,
             "A": dA_part.sum(axis=0).astype(A_dtype),
             "B": dB_part.sum(axis=1).astype(c.x.dtype),
             "C": dC_part.sum(axis=1).astype(c.x.dtype),
             "D": dD_part.sum(axis=0).astype(D_dtype)}
    if h0_dtype is not None:
        grads["h0"] = dh0.astype(h0_dtype)
    return grads


def selective_scan(x, delta, A, B, C, D, h0=None):
    """y (B, N, M) of the selective scan (selective_scan_forward without the cache)."""
    x, delta, A, B, C, D, h0, _ = _check_inputs(x, delta, A, B, C, D, h0)
    return _run_forward(x, delta, A, B, C, D, h0)[0]


def selective_scan_recurrent(x, delta, A, B, C, D, state=None):
    """Decoding: y (B, n, M) of n >= 1 tokens after the prefix whose last state is `state`
    (B, M, S) float64 (None: the empty prefix), and the state after them.

    Any split of a sequence into chunks gives the outputs of selective_scan on the whole."""
    x, delta, A, B, C, D, h0, _ = _check_inputs(x, delta, A, B, C, D, state, "state")
    return _run_forward(x, delta, A, B, C, D, h0)


def _run_forward(x, delta, A, B, C, D, h0):
    """(y, last state) of validated inputs, keeping nothing for a backward."""
    Bz, N, M = x.shape
    y = np.empty(x.shape, dtype=x.dtype)
    h_last = np.empty((Bz, M, A.shape[1]))
    with threads_for(Bz * N * M * A.shape[1]):
        _selective_scan_forward(x, delta, A, B, C, D, h0, SCAN_CHUNK, SCAN_CHANNEL_BLOCK, y,
                                h_last, _EMPTY, _EMPTY)
    return y, h_last
