"""Softmax attention (Vaswani et al. 2017): multi-head scaled dot-product attention.

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size.

    o = softmax_attention(q, k, v, causal=False, key_mask=None, scale=None)   # (B, H, N, e)
    o, cache = softmax_attention_forward(q, k, v, ...)
    grads = softmax_attention_backward(do, cache)                             # dict q, k, v
    o, state = softmax_attention_recurrent(q, k, v, state=None, key_mask=None)  # KV-cache decoding

    naive.py      the definition: dense (B, H, N, N) scores, forward and backward
    blocked.py    the fast path: one block of queries at a time, backward recomputing P
    recurrent.py  decoding with a key/value cache (SoftmaxAttentionState)
    core.py       the adapter of the shared multi-head shell (gma_np.mixers.attention)

docs/mixers/softmax.md: the definition, the derivation of the backward, the numerics.
"""

from gma_np.mixers.softmax.blocked import (
    SOFTMAX_BLOCK,
    SoftmaxAttentionCache,
    softmax_attention,
    softmax_attention_backward,
    softmax_attention_forward,
)
from gma_np.mixers.softmax.recurrent import SoftmaxAttentionState, softmax_attention_recurrent

__all__ = [
    "softmax_attention", "softmax_attention_forward", "softmax_attention_backward",
    "softmax_attention_recurrent", "SoftmaxAttentionState", "SoftmaxAttentionCache",
    "SOFTMAX_BLOCK",
]
