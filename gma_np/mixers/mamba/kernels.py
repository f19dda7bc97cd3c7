"""Private Numba kernels of the selective scan: the forward scan and the reverse-scan backward.

Dimension legend: B batch, N tokens, M channels, S state size per channel, T tokens per
checkpoint chunk, G channel groups of the backward. As arrays, B and C are the scan's
write and read vectors (B, N, S); as a dimension, B is the batch.

Per (batch b, channel m) the scan is an independent recurrence over S numbers
(naive.py has the definition):

    a_t = exp(delta_t A[m]);   h_t = a_t * h_{t-1} + delta_t x_t B_t;   y_t = C_t . h_t + D[m] x_t

Forward: parallel over tasks of a block of channels (prange over B x ceil(M / block));
within a channel the loop over t is sequential, so y_t depends on tokens 0..t only, bit
for bit. A task walks the tokens in tiles of T, and each tile channel by channel, so
that the tile's B_t and C_t, which every channel reads, are loaded from memory once
per task and tile, not once per channel. At each tile's start it writes the state
before that token (the checkpoints, (B, M, ceil(N/T), S)), or, when asked, every state.

Backward: the reverse scan needs h_{t-1} at every t, walking t downwards. It is not
recovered from h_t by h_{t-1} = (h_t - delta_t x_t B_t) / a_t: a_t underflows to 0 for
delta_t A < -745 in float64, and well before that the division multiplies the rounding
error of h_t by 1/a_t at every step (docs/mixers/mamba.md, section 4). Instead each chunk
of T tokens, last chunk first, is re-run forward from its checkpoint into a (T + 1, S)
buffer of states and a (T, S) buffer of the a_t, then walked in reverse. That is one
more forward recurrence (the exp and one multiply-add per (t, m, s), no read-out) and
2 T S float64 per task, in place of B N M S float64 of stored states.

The backward is parallel over B x G tasks, each a fixed group of channels, walking the
chunks from the last and, in each chunk, its channels in order. dB and dC are sums over
channels, so every task writes its own partial sums (B, G, N, S), which the wrapper
adds in a fixed order: the result is the same bit for bit at any thread count. dA and
dD are per channel, summed over the batch by the wrapper.

Cost: the exp dominates (no vectorised exp without SVML: about 5 ns each on one core
of the machine measured), one per (t, m, s) in the forward and one in the backward's
re-run; the reverse reads a_t from its buffer.

Precision: states, checkpoints, accumulators and every read are float64 whatever the
dtype of the inputs, so the float32 error of y does not grow with N.

Kernels are plain loops that also run with NUMBA_DISABLE_JIT=1.
"""

import math

import numpy as np
from numba import njit, prange

# reassociation (vectorised sums over the state axis) and FMA contraction; no
# assumptions on inf/NaN
_FASTMATH = {"reassoc", "contract"}


# nogil: the trainer runs two shards of its batch on two Python threads
# (gma_np.train.loop, BATCH_SHARDS); a kernel holding the GIL would stall the other.
@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _selective_scan_forward(x, delta, A, B, C, D, h0, chunk, block, y, h_last, checkpoints,
                            states):
    """The selective scan from h0, writing y, the last state and the backward's states.

    x, delta     (B, N, M)   dtype of the inputs (read in float64)
    A            (M, S)      float64
    B, C         (B, N, S)   dtype of the inputs
    D            (M,)        float64
    h0           (B, M, S)   float64 state before token 0
    chunk        T: tokens per tile and per checkpoint
    block        channels per task
    y            (B, N, M)   out, dtype of the inputs
    h_last       (B, M, S)   out, float64 state after token N-1
    checkpoints  (B, M, ceil(N/T), S) out, float64: [.., c, :] = state before token c*T;
                 shape (0, 0, 0, 0) to skip
    states       (B, N, M, S) out, float64: every h_t; shape (0, 0, 0, 0) to skip

    A task walks its channels one at a time over a tile of T tokens, then the next tile:
    the tile's B_t, C_t (shared by every channel) stay in cache across its channels.
    """
    Bz, N, M = x.shape
    S = A.shape[1]
    keep_checkpoints = checkpoints.shape[0] > 0
    keep_states = states.shape[0] > 0
    n_blocks = (M + block - 1) // block
    n_chunks = (N + chunk - 1) // chunk
    for task in prange(Bz * n_blocks):
        b = task // n_blocks
        m0 = (task - b * n_blocks) * block
        m1 = min(M, m0 + block)
        h = np.empty((m1 - m0, S))                  # the state of every channel of the task
        for m in range(m0, m1):
            for s in range(S):
                h[m - m0, s] = h0[b, m, s]
        for c in range(n_chunks):
            t0 = c * chunk
            t1 = min(N, t0 + chunk)
            for m in range(m0, m1):
                hm = h[m - m0]
                if keep_checkpoints:
                    for s in range(S):
                        checkpoints[b, m, c, s] = hm[s]
                for t in range(t0, t1):
                    dt = np.float64(delta[b, t, m])
                    xt = np.float64(x[b, t, m])
                    dtx = dt * xt
                    acc = 0.0
                    for s in range(S):
                        hs = math.exp(dt * A[m, s]) * hm[s] + dtx * np.float64(B[b, t, s])
                        hm[s] = hs
                        acc += np.float64(C[b, t, s]) * hs
                    y[b, t, m] = acc + D[m] * xt
                    if keep_states:
                        for s in range(S):
                            states[b, t, m, s] = hm[s]
        for m in range(m0, m1):
            for s in range(S):
                h_last[b, m, s] = h[m - m0, s]


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _selective_scan_backward(dy, x, delta, A, B, C, D, h0, chunk, checkpoints, states,
                             dx, ddelta, dA_part, dB_part, dC_part, dD_part, dh0):
    """Reverse scan: every gradient of sum(y * dy) (naive.selective_scan_backward_naive).

    dy, x, delta  (B, N, M)   dtype of the inputs (read in float64)
    A             (M, S)      float64;  D (M,) float64;  h0 (B, M, S) float64
    B, C          (B, N, S)   dtype of the inputs
    chunk         T, as in the forward
    checkpoints   (B, M, ceil(N/T), S) float64 from the forward, or (0, 0, 0, 0) when
    states        (B, N, M, S) float64 holds every state instead
    dx, ddelta    (B, N, M)   out, dtype of the inputs
    dA_part       (B, M, S)   out, float64: this batch row's share of dA
    dB_part, dC_part (B, G, N, S) out, float64 zeros on entry: channel group g's share
    dD_part       (B, M)      out, float64: this batch row's share of dD
    dh0           (B, M, S)   out, float64

    A task walks the chunks from the last, and in each chunk its channels one at a time
    (re-run, then reverse), so the chunk's B_t, C_t and partial sums stay in cache.
    """
    Bz, N, M = x.shape
    S = A.shape[1]
    G = dB_part.shape[1]
    keep_states = states.shape[0] > 0
    n_chunks = (N + chunk - 1) // chunk
    for task in prange(Bz * G):
        b = task // G
        g = task - b * G
        m0 = g * M // G
        m1 = (g + 1) * M // G
        hbuf = np.empty((chunk + 1, S))   # h_{t0-1}, ..., h_{t1-1} of the chunk [t0, t1)
        abuf = np.empty((chunk, S))       # a_t of the chunk's tokens
        # per channel of the task: a_{t+1} * g_{t+1} (dL/dh_t from the tokens after t), and
        # the sums over t of dA and dD
        carry = np.zeros((m1 - m0, S))
        dA_acc = np.zeros((m1 - m0, S))
        dD_acc = np.zeros(m1 - m0)
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(N, t0 + chunk)
            for m in range(m0, m1):
                j = m - m0
                # 1. the chunk's states: re-run from its checkpoint (or read back when stored)
                for s in range(S):
                    if not keep_states:
                        hbuf[0, s] = checkpoints[b, m, c, s]
                    elif t0 == 0:
                        hbuf[0, s] = h0[b, m, s]
                    else:
                        hbuf[0, s] = states[b, t0 - 1, m, s]
                for t in range(t0, t1):
                    i = t - t0
                    dt = np.float64(delta[b, t, m])
                    dtx = dt * np.float64(x[b, t, m])
                    for s in range(S):
                        a = math.exp(dt * A[m, s])
                        abuf[i, s] = a
                        if keep_states:
                            hbuf[i + 1, s] = states[b, t, m, s]
                        else:
                            # in the forward pass this was: h_t = a_t * h_{t-1} + delta_t x_t B_t
                            hbuf[i + 1, s] = a * hbuf[i, s] + dtx * np.float64(B[b, t, s])
                # 2. the reverse scan over the chunk
                for t in range(t1 - 1, t0 - 1, -1):
                    i = t - t0
                    dyt = np.float64(dy[b, t, m])
                    dt = np.float64(delta[b, t, m])
                    xt = np.float64(x[b, t, m])
                    dtx = dt * xt
                    gB = 0.0
                    g_aA = 0.0
                    for s in range(S):
                        Bs = np.float64(B[b, t, s])
                        # in the forward pass this was: y_t = C_t . h_t + D x_t
                        gs = carry[j, s] + dyt * np.float64(C[b, t, s])     # g_t = dL/dh_t
                        dC_part[b, g, t, s] += dyt * hbuf[i + 1, s]
                        # h_t = a_t * h_{t-1} + delta_t x_t B_t, a_t = exp(delta_t A)
                        dB_part[b, g, t, s] += gs * dtx
                        gB += gs * Bs
                        ga = gs * abuf[i, s] * hbuf[i, s]                    # g_t a_t h_{t-1}
                        g_aA += ga * A[m, s]
                        dA_acc[j, s] += ga * dt
                        carry[j, s] = abuf[i, s] * gs
                    dx[b, t, m] = dyt * D[m] + dt * gB
                    ddelta[b, t, m] = xt * gB + g_aA
                    dD_acc[j] += dyt * xt
        for m in range(m0, m1):
            j = m - m0
            for s in range(S):
                dA_part[b, m, s] = dA_acc[j, s]
                dh0[b, m, s] = carry[j, s]
            dD_part[b, m] = dD_acc[j]
