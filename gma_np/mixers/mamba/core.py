"""The Mamba block (a selective state-space model, S6) as a gma_np.mixers.contract.Mixer.

Dimension legend: B batch, N tokens, D model width, M = E*D inner channels, S state
size per channel, R = ceil(D / 16) rank of the step-size projection, W width of the
block's causal convolution.

Config fields read: d_model (D), ssm_expand (E), ssm_state (S), ssm_conv (W), n_layers.

Parameters (local names; the model stores "h{l}.mamba.<name>"), in this order:

    W_in (D, 2M)          in-projection to [x_in, z]
    conv_w (W, M), conv_b (M,)      depthwise causal convolution of x_in (tap s reads t - s)
    W_dt_down (M, R), W_dt_up (R, M), b_dt (M,)    delta = softplus(x_c W_dt_down W_dt_up + b_dt)
    W_B (M, S), W_C (M, S)          B_t = x_c W_B, C_t = x_c W_C
    A_log (M, S)          A = -exp(A_log), the diagonal state matrix of every channel
    D_skip (M,)           the skip connection y_t += D_skip x_t
    W_out (M, D)          out-projection

The block is block.py (forward, backward, decoding), the scan scan.py over kernels.py,
the reference naive.py. Mamba is causal only (the scan runs forward in time); decoding
carries the scan's state (B, M, S) and the convolution's last W - 1 inputs.

Initialisation (docs/mixers/mamba.md, section 5 says why each):
    W_in, W_dt_down, W_B, W_C   normal(0, INIT_STD), the scale of every mixer's projections
    W_out                       normal(0, INIT_STD / sqrt(2 L)), residual-branch scaling
    conv_w, conv_b              uniform(-1/sqrt(W), 1/sqrt(W)), fan-in W of a depthwise filter
    W_dt_up                     uniform(-1/sqrt(R), 1/sqrt(R))
    b_dt                        softplus^-1(dt), dt log-uniform in [DT_MIN, DT_MAX] per channel
    A_log                       log(1, 2, ..., S) in every channel
    D_skip                      1
"""

import math

import numpy as np

from gma_np import _validation as check
from gma_np.mixers.attention import check_input
from gma_np.mixers.contract import Mixer
from gma_np.mixers.mamba.block import mamba_backward, mamba_decode_init, mamba_forward
from gma_np.mixers.mamba.naive import mamba_block_naive
from gma_np.nn.layers import INIT_STD

# The rank of the step-size projection is ceil(D / DT_RANK_DIVISOR): Mamba's "auto"
# rank, a low-rank bottleneck that costs 2 M D / 16 parameters instead of M^2.
DT_RANK_DIVISOR = 16

# Range of the initial step sizes, drawn log-uniformly per channel (Mamba's defaults):
# a channel with step dt forgets at rate exp(dt A), so its memory starts between about
# 1/(dt |A|) = 10 and 1000 tokens for |A| = 1, spread over time scales on a log scale.
DT_MIN = 1e-3
DT_MAX = 0.1

# Parameters that are not weight-decayed although A_log has ndim 2: A_log sets the decay
# rates, whose prior is log(1..S) (decay would pull every A to -1, one time scale for
# all), and D_skip is a gain that starts at 1 (ndim 1, so the rule leaves it alone
# anyway; named for the reader).
NO_DECAY = ("A_log", "D_skip")


def dims(cfg):
    """(D, M, S, R, W) of a config."""
    D = cfg.d_model
    return D, cfg.ssm_expand * D, cfg.ssm_state, math.ceil(D / DT_RANK_DIVISOR), cfg.ssm_conv


def parameter_shapes(cfg):
    D, M, S, R, W = dims(cfg)
    return {"W_in": (D, 2 * M), "conv_w": (W, M), "conv_b": (M,),
            "W_dt_down": (M, R), "W_dt_up": (R, M), "b_dt": (M,),
            "W_B": (M, S), "W_C": (M, S), "A_log": (M, S), "D_skip": (M,),
            "W_out": (M, D)}


def inverse_softplus(v):
    """softplus^-1(v) = log(exp(v) - 1) = v + log(1 - exp(-v)), accurate for small v > 0."""
    return v + np.log(-np.expm1(-v))


def init_parameters(cfg, rng):
    """Initial values (module docstring), float64."""
    D, M, S, R, W = dims(cfg)
    conv_bound = 1.0 / math.sqrt(W)
    dt = np.exp(rng.uniform(math.log(DT_MIN), math.log(DT_MAX), M))          # (M,)
    return {"W_in": rng.normal(0.0, INIT_STD, (D, 2 * M)),
            "conv_w": rng.uniform(-conv_bound, conv_bound, (W, M)),
            "conv_b": rng.uniform(-conv_bound, conv_bound, M),
            "W_dt_down": rng.normal(0.0, INIT_STD, (M, R)),
            "W_dt_up": rng.uniform(-1.0 / math.sqrt(R), 1.0 / math.sqrt(R), (R, M)),
            "b_dt": inverse_softplus(dt),
            "W_B": rng.normal(0.0, INIT_STD, (M, S)),
            "W_C": rng.normal(0.0, INIT_STD, (M, S)),
            "A_log": np.tile(np.log(np.arange(1.0, S + 1.0)), (M, 1)),
            "D_skip": np.ones(M),
            "W_out": rng.normal(0.0, INIT_STD / math.sqrt(2 * cfg.n_layers), (M, D))}


def _causal_only(causal):
    if causal is not True:
        raise ValueError(f"causal: the mamba mixer is causal only (its scan runs forward in "
                         f"time), got causal={causal!r}")


def forward(x, p, cfg, *, causal, key_mask=None):
    _causal_only(causal)
    return mamba_forward(x, p, cfg, key_mask=key_mask)


def backward(dy, cache):
    return mamba_backward(dy, cache)


def decode_init(batch_size, p, cfg):
    return mamba_decode_init(batch_size, p)


def decode(x, p, cfg, state):
    return mamba_forward(x, p, cfg, state=state)


def reference(x, p, cfg, *, causal, key_mask=None):
    """The block in plain NumPy with the loop-over-t scan (naive.py), float64."""
    _causal_only(causal)
    x = check_input(x, cfg)
    if key_mask is not None:
        check.key_mask(key_mask, x.shape[0], x.shape[1])
    return mamba_block_naive(x, p, key_mask)


MIXER = Mixer(name="mamba", parameter_shapes=parameter_shapes, init_parameters=init_parameters,
              forward=forward, backward=backward, decode_init=decode_init, decode=decode,
              reference=reference, no_decay=frozenset(NO_DECAY), causal_only=True)
