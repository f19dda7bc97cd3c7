"""The selective state-space block (Mamba-style S6), the definition in plain NumPy.

This is the ground truth the Numba scan (kernels.py, scan.py) and the block's fast
path (block.py) are tested against. It is written to be read: a loop over tokens with
an explicit state, every hidden state of the backward kept in full, and everything in
float64 whatever dtype comes in (the outputs are float64 too).

Dimension legend: B batch, N tokens, D model width, M = E*D inner channels, S state
size per channel, R = ceil(D / 16) rank of the step-size projection, W width of the
block's causal convolution. As arrays, B and C are the input-dependent write and read
vectors of the scan (B, N, S); as a dimension, B is the batch.

The selective scan, per batch b and channel m, from h_{-1} = h0 (0 unless given):

    a_t = exp(delta_t A)                           (S,)  A = A[m] (S,), delta_t = delta[b, t, m]
    h_t = a_t * h_{t-1} + delta_t x_t B_t          (S,)  B_t = B[b, t] (S,), x_t = x[b, t, m]
    y_t = C_t . h_t + D x_t                              C_t = C[b, t] (S,), D = D[m]

(the zero-order hold of A and the Euler step of B, as in Mamba). The block around it
(docs/mixers/mamba.md) is mamba_block_naive below.
"""

import numpy as np


def silu_naive(v):
    """v sigmoid(v)."""
    return v / (1.0 + np.exp(-v))


def softplus_naive(v):
    """log(1 + exp(v)), without overflow."""
    return np.logaddexp(0.0, v)


def _float64(*arrays):
    return tuple(None if a is None else np.asarray(a, dtype=np.float64) for a in arrays)


def selective_scan_naive(x, delta, A, B, C, D, h0=None):
    """The selective scan as a loop over t: y (B, N, M) and the last state (B, M, S), float64.

    x, delta (B, N, M); A (M, S); B, C (B, N, S); D (M,); h0 (B, M, S) or None (zeros).
    """
    x, delta, A, B, C, D, h0 = _float64(x, delta, A, B, C, D, h0)
    Bz, N, M = x.shape
    S = A.shape[1]
    h = np.zeros((Bz, M, S)) if h0 is None else h0.copy()                   # (B, M, S)
    y = np.empty((Bz, N, M))
    for t in range(N):
        a = np.exp(delta[:, t, :, None] * A)                                 # (B, M, S)
        h = a * h + (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]   # (B, M, S)
        y[:, t] = np.einsum("bms,bs->bm", h, C[:, t]) + D * x[:, t]          # (B, M)
    return y, h


def selective_scan_backward_naive(dy, x, delta, A, B, C, D, h0=None):
    """Every gradient of sum(y * dy) for y = selective_scan_naive(...): a dict x, delta, A,
    B, C, D, h0 (float64). Keeps all N hidden states (the fast path recomputes them).

    Reverse scan (docs/mixers/mamba.md, section 3), with g_t = dL/dh_t and g_N = 0:
        g_t      = dy_t C_t + a_{t+1} * g_{t+1}
        dC_t     = sum_m dy_t h_t            dD   = sum_{b,t} dy_t x_t
        dx_t     = dy_t D + delta_t (g_t . B_t)
        ddelta_t = g_t . (x_t B_t + A * a_t * h_{t-1})
        dB_t     = sum_m g_t delta_t x_t     dA   = sum_{b,t} g_t * delta_t a_t h_{t-1}
        dh0      = a_0 * g_0
    """
    dy, x, delta, A, B, C, D, h0 = _float64(dy, x, delta, A, B, C, D, h0)
    Bz, N, M = x.shape
    S = A.shape[1]
    # forward, keeping h_{t-1} for every t: hs[t] = h_{t-1}, hs[N] = the last state
    hs = np.empty((N + 1, Bz, M, S))
    hs[0] = 0.0 if h0 is None else h0
    a = np.exp(delta[:, :, :, None] * A)                                     # (B, N, M, S)
    for t in range(N):
        hs[t + 1] = a[:, t] * hs[t] + (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
    g = {"x": np.empty((Bz, N, M)), "delta": np.empty((Bz, N, M)), "A": np.zeros((M, S)),
         "B": np.empty((Bz, N, S)), "C": np.empty((Bz, N, S)), "D": np.zeros(M)}
    carry = np.zeros((Bz, M, S))                      # a_{t+1} * g_{t+1}: what h_t gets from t+1 on
    for t in reversed(range(N)):
        # y_t = C_t . h_t + D x_t
        g_t = carry + dy[:, t, :, None] * C[:, t, None, :]                  # (B, M, S) dL/dh_t
        g["C"][:, t] = np.einsum("bm,bms->bs", dy[:, t], hs[t + 1])
        g["D"] += (dy[:, t] * x[:, t]).sum(axis=0)
        # h_t = a_t * h_{t-1} + delta_t x_t B_t
        gB = np.einsum("bms,bs->bm", g_t, B[:, t])                           # (B, M) g_t . B_t
        g["x"][:, t] = dy[:, t] * D + delta[:, t] * gB
        g["B"][:, t] = np.einsum("bms,bm->bs", g_t, delta[:, t] * x[:, t])
        # a_t = exp(delta_t A): d a_t / d delta_t = A a_t, d a_t / d A = delta_t a_t
        g_a = g_t * a[:, t] * hs[t]                                          # (B, M, S) dL/da_t * a_t
        g["delta"][:, t] = x[:, t] * gB + (g_a * A).sum(axis=2)
        g["A"] += (g_a * delta[:, t, :, None]).sum(axis=0)
        carry = a[:, t] * g_t
    g["h0"] = carry
    return g


def causal_conv_naive(u, w, b):
    """Depthwise causal convolution with bias: out[:, t] = b + sum_s w[s] * u[:, t - s], tokens
    before the sequence are zeros. u (B, N, M), w (W, M), b (M,)."""
    N = u.shape[1]
    out = np.broadcast_to(b, u.shape).copy()
    for t in range(N):
        for s in range(min(w.shape[0], t + 1)):
            out[:, t] += w[s] * u[:, t - s]
    return out


def mamba_block_naive(x, p, key_mask=None):
    """The Mamba block, float64: x (B, N, D) -> (B, N, D). p holds the parameters of
    gma_np.mixers.mamba.core by local name; key_mask (B, N) bool or None (False = padding).

        1. [x_in, z] = x W_in                          (B, N, M) each
        2. u = m * x_in                                padding writes nothing to the convolution
        3. x_c = silu(conv(u) + conv_b)                (B, N, M)
        4. delta = m * softplus(x_c W_dt_down W_dt_up + b_dt)
                                                       (B, N, M) padding: delta = 0, h unchanged
        5. B_t = x_c W_B,  C_t = x_c W_C              (B, N, S)
        6. y = selective_scan(x_c, delta, -exp(A_log), B, C, D_skip)
        7. out = (y * silu(z)) W_out                   (B, N, D)
    """
    x = np.asarray(x, dtype=np.float64)
    p = {name: np.asarray(v, dtype=np.float64) for name, v in p.items()}
    Bz, N, _ = x.shape
    M = p["D_skip"].shape[0]
    m = np.ones((Bz, N)) if key_mask is None else np.asarray(key_mask, dtype=np.float64)
    xz = x @ p["W_in"]
    x_in, z = xz[..., :M], xz[..., M:]
    u = m[:, :, None] * x_in
    x_c = silu_naive(causal_conv_naive(u, p["conv_w"], p["conv_b"]))
    delta = m[:, :, None] * softplus_naive(x_c @ p["W_dt_down"] @ p["W_dt_up"] + p["b_dt"])
    y, _ = selective_scan_naive(x_c, delta, -np.exp(p["A_log"]), x_c @ p["W_B"], x_c @ p["W_C"],
                                p["D_skip"])
    return (y * silu_naive(z)) @ p["W_out"]
