"""The Mamba block over plain arrays: the forward/backward pair and its decoding form.

Dimension legend: B batch, N tokens (n for a decoding chunk), D model width, M = E*D
inner channels, S state size per channel, R = ceil(D / 16) rank of the step-size
projection, W width of the block's causal convolution. B_t, C_t (B, N, S) are the
scan's write and read vectors.

Forward, with m (B, N) the key mask (1 real token, 0 padding; all ones without one):

    1. [x_in, z] = x W_in                              (B, N, M) each, W_in (D, 2M)
    2. u = m * x_in                                    (B, N, M)
    3. x_c = silu(conv(u) + conv_b)                    (B, N, M), conv_w (W, M)
    4. delta = m * softplus(x_c W_dt_down W_dt_up + b_dt)     (B, N, M), rank R
    5. B_t = x_c W_B,   C_t = x_c W_C                 (B, N, S)
    6. y = selective_scan(x_c, delta, A, B_t, C_t, D_skip),  A = -exp(A_log)   (B, N, M)
    7. out = (y * silu(z)) W_out                       (B, N, D)

A padding token writes nothing into either state: its u is 0, so the convolution's
window of later tokens sees a zero there (as before the sequence), and its delta is
0, so a_t = exp(0 A) = 1 and delta_t x_t B_t = 0: h passes through unchanged. It still
reads, like every token: its output is C_t . h_t + D x_c, gated by its own z. So the
outputs of the real tokens do not depend on the padding tokens at all, and padding
in front of a sequence gives its unpadded outputs (tests/mixers/test_mamba.py).

The backward walks the stages in reverse (docs/mixers/mamba.md, section 2). The cache
keeps the activations of every stage (B, N, M) and the scan's checkpoints; the scan's
(B, N, M, S) states are recomputed (scan.py).

Decoding keeps the scan's state h (B, M, S) float64 and the convolution's last W - 1
inputs u (B, W - 1, M): MambaState.
"""

from dataclasses import dataclass

import numpy as np

from gma_np import _validation as check
from gma_np.mixers.attention import check_input
from gma_np.mixers.mamba.scan import (
    selective_scan_backward,
    selective_scan_forward,
    selective_scan_recurrent,
)
from gma_np.nn.layers import causal_conv_backward, causal_conv_forward, linear_backward, \
    linear_forward


@dataclass
class MambaState:
    """The recurrent state of a Mamba block after a prefix."""
    h: np.ndarray       # (B, M, S) float64: the scan's state
    conv: np.ndarray    # (B, W - 1, M): the convolution's last inputs u (zeros before the sequence)


def _sigmoid(v):
    """1 / (1 + exp(-v)), without overflow for either sign."""
    e = np.exp(-np.abs(v))
    return np.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(v.dtype, copy=False)


def silu_forward(v):
    """silu(v) = v sigmoid(v). Cache: v and sigmoid(v)."""
    sig = _sigmoid(v)
    return v * sig, (v, sig)


def silu_backward(dout, cache):
    """d silu / dv = sigmoid(v) (1 + v (1 - sigmoid(v)))."""
    v, sig = cache
    return dout * sig * (1.0 + v * (1.0 - sig))


def softplus_forward(v):
    """softplus(v) = log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)). Cache: v."""
    return np.maximum(v, 0.0) + np.log1p(np.exp(-np.abs(v))), (v,)


def softplus_backward(dout, cache):
    """d softplus / dv = sigmoid(v)."""
    (v,) = cache
    return dout * _sigmoid(v)


def _cast(p, dtype):
    return {name: np.asarray(v).astype(dtype, copy=False) for name, v in p.items()}


def mamba_forward(x, p, cfg, *, key_mask=None, state=None):
    """The Mamba block (module docstring). x (B, N, D) float32/float64, p by local name.

    Training: state None -> (out (B, N, D), cache for mamba_backward).
    Decoding: state a MambaState (the prefix's) -> (out, the MambaState after x); no mask.
    """
    x = check_input(x, cfg)
    Bz, N, _ = x.shape
    p = _cast(p, x.dtype)
    M = p["D_skip"].shape[0]
    W = p["conv_w"].shape[0]
    decoding = state is not None
    mask = check.key_mask(key_mask, Bz, N).astype(x.dtype)[:, :, None]       # (B, N, 1)
    # 1. [x_in, z] = x W_in
    xz, c_in = linear_forward(x, p["W_in"], None)                            # (B, N, 2M)
    x_in, z = xz[..., :M], xz[..., M:]
    # 2. u = m * x_in
    u = mask * x_in                                                          # (B, N, M)
    # 3. x_c = silu(conv(u) + conv_b)
    history = state.conv.astype(x.dtype, copy=False) if decoding else None    # (B, W-1, M)
    conv, c_conv = causal_conv_forward(u, p["conv_w"], history)
    x_c, c_silu = silu_forward(conv + p["conv_b"])                          # (B, N, M)
    # 4. delta = m * softplus(x_c W_dt_down W_dt_up + b_dt)
    dt_low, c_down = linear_forward(x_c, p["W_dt_down"], None)               # (B, N, R)
    dt_pre, c_up = linear_forward(dt_low, p["W_dt_up"], p["b_dt"])           # (B, N, M)
    sp, c_sp = softplus_forward(dt_pre)
    delta = mask * sp                                                        # (B, N, M)
    # 5. B_t = x_c W_B, C_t = x_c W_C
    Bt, c_B = linear_forward(x_c, p["W_B"], None)                            # (B, N, S)
    Ct, c_C = linear_forward(x_c, p["W_C"], None)                            # (B, N, S)
    # 6. y = selective_scan(x_c, delta, -exp(A_log), B_t, C_t, D_skip)
    A = -np.exp(p["A_log"].astype(np.float64))                               # (M, S)
    if decoding:
        y, h = selective_scan_recurrent(x_c, delta, A, Bt, Ct, p["D_skip"], state.h)
    else:
        y, c_scan = selective_scan_forward(x_c, delta, A, Bt, Ct, p["D_skip"])
    # 7. out = (y * silu(z)) W_out
    gate, c_gate = silu_forward(z)
    out, c_out = linear_forward(y * gate, p["W_out"], None)                  # (B, N, D)
    if decoding:
        xp = c_conv[0]                                                       # (B, W-1+n, M)
        return out, MambaState(h=h, conv=xp[:, xp.shape[1] - (W - 1):].copy())
    return out, (c_in, mask, c_conv, c_silu, c_down, c_up, c_sp, c_B, c_C, A, c_scan,
                 y, gate, c_gate, c_out)


def mamba_backward(dout, cache):
    """(dx (B, N, D), {local name: gradient}) of mamba_forward, the stages in reverse."""
    (c_in, mask, c_conv, c_silu, c_down, c_up, c_sp, c_B, c_C, A, c_scan,
     y, gate, c_gate, c_out) = cache
    g = {}
    # 7. in the forward pass this was: out = (y * silu(z)) W_out
    dyg, g["W_out"], _ = linear_backward(dout, c_out)                        # (B, N, M)
    dy = dyg * gate
    dz = silu_backward(dyg * y, c_gate)
    # 6. y = selective_scan(x_c, delta, A, B_t, C_t, D_skip), A = -exp(A_log)
    gs = selective_scan_backward(dy, c_scan)
    g["D_skip"] = gs["D"].astype(dy.dtype)
    g["A_log"] = (gs["A"] * A).astype(dy.dtype)                              # dA/dA_log = -exp(A_log) = A
    dx_c = gs["x"]
    # 5. B_t = x_c W_B, C_t = x_c W_C
    d, g["W_B"], _ = linear_backward(gs["B"], c_B)
    dx_c = dx_c + d
    d, g["W_C"], _ = linear_backward(gs["C"], c_C)
    dx_c += d
    # 4. delta = m * softplus(dt_low W_dt_up + b_dt), dt_low = x_c W_dt_down
    ddt_pre = softplus_backward(mask * gs["delta"], c_sp)
    ddt_low, g["W_dt_up"], g["b_dt"] = linear_backward(ddt_pre, c_up)
    d, g["W_dt_down"], _ = linear_backward(ddt_low, c_down)
    dx_c += d
    # 3. x_c = silu(conv(u) + conv_b)
    dconv = silu_backward(dx_c, c_silu)
    g["conv_b"] = dconv.reshape(-1, dconv.shape[-1]).sum(axis=0)
    du, g["conv_w"] = causal_conv_backward(dconv, c_conv)
    # 2. u = m * x_in
    dx_in = mask * du
    # 1. [x_in, z] = x W_in
    dx, g["W_in"], _ = linear_backward(np.concatenate([dx_in, dz], axis=-1), c_in)
    return dx, g


def mamba_decode_init(batch_size, p):
    """The state of the empty prefix: h = 0, and zeros as the convolution's history."""
    M, S = p["A_log"].shape
    W = p["conv_w"].shape[0]
    return MambaState(h=np.zeros((batch_size, M, S)),
                      conv=np.zeros((batch_size, W - 1, M), dtype=p["conv_w"].dtype))
