"""One token of the Mamba block inside the model's fused decode (gma_np.nn.decode).

Dimension legend: D model width, M = E*D inner channels, S state size per channel,
R rank of the step-size projection, W width of the block's causal convolution.

The stages of block.mamba_forward at one token without a mask, in float64 (the
weights read in their dtype), with the scan's recurrence of kernels._selective_scan_forward:

    [x_in, z] = x W_in;  x_c = silu(conv(x_in) + conv_b)
    delta = softplus(x_c W_dt_down W_dt_up + b_dt);  B_t = x_c W_B;  C_t = x_c W_C
    h = exp(delta A) h + delta x_c B_t;  y = C_t . h + D_skip x_c;  out = (y silu(z)) W_out

Plain loops: runs with NUMBA_DISABLE_JIT=1.
"""

import math

import numpy as np
from numba import njit

from gma_np.nn._step_kernels import _add_bias, _conv_step, _matvec, _sigmoid, _softplus

# The order of token_step_arrays' tuple, which _mamba_token_step unpacks.
STEP_PARAMETERS = ("W_in", "conv_w", "conv_b", "W_dt_down", "W_dt_up", "b_dt", "W_B", "W_C",
                   "A", "D_skip", "W_out")


def token_step_arrays(p):
    """One layer's parameters as _mamba_token_step reads them: the weights as they are
    (C order), A = -exp(A_log) and D_skip in float64, as mamba_forward computes them."""
    dtype = p["W_in"].dtype
    arrays = {name: np.ascontiguousarray(p[name]) for name in STEP_PARAMETERS if name != "A"}
    arrays["A"] = -np.exp(p["A_log"].astype(dtype).astype(np.float64))
    arrays["D_skip"] = p["D_skip"].astype(dtype).astype(np.float64)
    return tuple(arrays[name] for name in STEP_PARAMETERS)


@njit(cache=True)
def _mamba_token_step(x, p, h, history, out, work):
    """x (D,) float64 -> out (D,) float64 written; h (M, S) float64 the scan's state and
    history (W - 1, M) float64 the convolution's last inputs, both updated in place;
    p token_step_arrays'; work (5 M + R + 2 S,) float64 scratch."""
    W_in, conv_w, conv_b, W_dt_down, W_dt_up, b_dt, W_B, W_C, A, D_skip, W_out = p
    M, S = A.shape
    R = W_dt_down.shape[1]
    xz = work[:2 * M]
    x_c = work[2 * M:3 * M]
    delta = work[3 * M:4 * M]
    y = work[4 * M:5 * M]
    dt_low = work[5 * M:5 * M + R]
    Bt = work[5 * M + R:5 * M + R + S]
    Ct = work[5 * M + R + S:5 * M + R + 2 * S]
    # 1. [x_in, z] = x W_in
    _matvec(x, W_in, xz)
    # 3. x_c = silu(conv(x_in) + conv_b), taps in order s = 0..W-1 (the model's own
    # convolution step, which also moves the history on)
    x_c[:] = xz[:M]
    _conv_step(x_c, conv_w, history)
    for m in range(M):
        v = x_c[m] + np.float64(conv_b[m])
        x_c[m] = v * _sigmoid(v)
    # 4. delta = softplus(x_c W_dt_down W_dt_up + b_dt)
    _matvec(x_c, W_dt_down, dt_low)
    _matvec(dt_low, W_dt_up, delta)
    _add_bias(delta, b_dt)
    for m in range(M):
        delta[m] = _softplus(delta[m])
    # 5. B_t = x_c W_B, C_t = x_c W_C
    _matvec(x_c, W_B, Bt)
    _matvec(x_c, W_C, Ct)
    # 6. the scan's step, 7. gated by silu(z)
    for m in range(M):
        dt = delta[m]
        xt = x_c[m]
        dtx = dt * xt
        acc = 0.0
        for s in range(S):
            hs = math.exp(dt * A[m, s]) * h[m, s] + dtx * Bt[s]
            h[m, s] = hs
            acc += Ct[s] * hs
        zm = xz[M + m]
        y[m] = (acc + D_skip[m] * xt) * (zm * _sigmoid(zm))
    # 7. out = (y silu(z)) W_out
    _matvec(y, W_out, out)
