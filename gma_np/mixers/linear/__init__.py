"""Linear attention with elu + 1 features (Katharopoulos et al. 2020).

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size.

    o = linear_attention(q, k, v, causal=False, key_mask=None, eps=1e-6)   # (B, H, N, e)
    o, cache = linear_attention_forward(q, k, v, ...)
    grads = linear_attention_backward(do, cache)                          # dict q, k, v
    o, state = linear_attention_recurrent(q, k, v, state=None, key_mask=None)  # decoding

    naive.py   the definition: the dense N x N form and the loop over t with its state
    ops.py     the fast path: the feature map over gma_np.memory, the memory GMA reads
    core.py    the adapter of the shared multi-head shell (gma_np.mixers.attention)

docs/mixers/linear.md: the definition, the derivation of the backward, the numerics.
"""

from gma_np.mixers.linear.ops import (
    LinearAttentionCache,
    LinearAttentionState,
    init_linear_attention_state,
    linear_attention,
    linear_attention_backward,
    linear_attention_forward,
    linear_attention_recurrent,
)

__all__ = [
    "linear_attention", "linear_attention_forward", "linear_attention_backward",
    "linear_attention_recurrent", "init_linear_attention_state",
    "LinearAttentionState", "LinearAttentionCache",
]
