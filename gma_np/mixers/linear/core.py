"""Linear attention as an attention core of the shared multi-head shell (gma_np.mixers.attention).

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size.

The core has no parameters and no buffers: the elu + 1 feature map is fixed, and
everything linear attention learns is in the shell's projections. Config fields read:
n_heads, head_dim, value_dim.

forward / backward are linear_attention_forward / _backward (ops.py); decoding is
linear_attention_recurrent, whose state is the (d, e) memory and its normaliser,
d (e + 1) numbers per head whatever the position.
"""

import sys

from gma_np.mixers.attention import attention_mixer
from gma_np.mixers.linear.ops import (
    init_linear_attention_state,
    linear_attention_backward,
    linear_attention_forward,
    linear_attention_recurrent,
)
from gma_np.mixers.linear.naive import linear_attention_dense

# Linear attention has a bidirectional form.
CAUSAL_ONLY = False


def forward(q, k, v, p, cfg, *, causal, key_mask=None):
    return linear_attention_forward(q, k, v, causal=causal, key_mask=key_mask)


def backward(do, cache):
    g = linear_attention_backward(do, cache)
    return g["q"], g["k"], g["v"], {}


def reference(q, k, v, p, cfg, *, causal, key_mask=None):
    """The dense N x N form of the definition (naive.py), float64."""
    return linear_attention_dense(q, k, v, causal=causal, key_mask=key_mask)


def decode_init(B, p, cfg):
    """The empty memory: S = 0 (B, H, d, e), z = 0 (B, H, d)."""
    return init_linear_attention_state(B, cfg.n_heads, cfg.head_dim, cfg.value_dim)


def decode(q, k, v, p, cfg, state):
    return linear_attention_recurrent(q, k, v, state)


MIXER = attention_mixer("linear", sys.modules[__name__])
