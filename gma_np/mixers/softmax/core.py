"""Softmax attention as an attention core of the shared multi-head shell (gma_np.mixers.attention).

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size.

The core has no parameters and no buffers of its own: everything it learns is in the
shell's projections. The scale of the scores is 1/sqrt(d) (cfg.head_dim). Config fields
read: n_heads, head_dim, value_dim.

forward / backward are softmax_attention_forward / _backward (blocked.py), decoding is
softmax_attention_recurrent (recurrent.py), whose state is the key/value cache.
"""

import sys

from gma_np.mixers.attention import attention_mixer
from gma_np.mixers.softmax.blocked import softmax_attention_backward, softmax_attention_forward
from gma_np.mixers.softmax.naive import softmax_attention_naive_forward
from gma_np.mixers.softmax.recurrent import SoftmaxAttentionState, softmax_attention_recurrent

# Softmax attention has a bidirectional form.
CAUSAL_ONLY = False


def forward(q, k, v, p, cfg, *, causal, key_mask=None):
    return softmax_attention_forward(q, k, v, causal=causal, key_mask=key_mask)


def backward(do, cache):
    g = softmax_attention_backward(do, cache)
    return g["q"], g["k"], g["v"], {}


def reference(q, k, v, p, cfg, *, causal, key_mask=None):
    """The dense N x N form of the definition (naive.py), float64."""
    return softmax_attention_naive_forward(q, k, v, causal=causal, key_mask=key_mask)[0]


def decode_init(B, p, cfg):
    """The empty key/value cache."""
    return SoftmaxAttentionState(B, cfg.n_heads, cfg.head_dim, cfg.value_dim)


def decode(q, k, v, p, cfg, state):
    return softmax_attention_recurrent(q, k, v, state)


MIXER = attention_mixer("softmax", sys.modules[__name__])
