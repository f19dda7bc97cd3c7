"""Random-feature attention: Performer FAVOR+ with positive features (Choromanski et al. 2021).

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size,
m random features per head.

    W = draw_projections(H, m, d, rng)                                   # (H, m, d) buffer
    o = performer_attention(q, k, v, W, causal=False, key_mask=None, eps=1e-6)   # (B, H, N, e)
    o, cache = performer_attention_forward(q, k, v, W, ...)
    grads = performer_attention_backward(do, cache)                      # dict q, k, v
    o, state = performer_attention_recurrent(q, k, v, W, state=None)     # decoding

    naive.py     the definition: the dense N x N form and the loop over t, unstabilised
    features.py  the orthogonal random projections and the stabilised positive features
    ops.py       the fast path: the features over gma_np.memory, the memory GMA reads
    core.py      the adapter of the shared multi-head shell, with the projections as a buffer

docs/mixers/performer.md: the definition, the stabiliser and eps, the derivation of the
backward, the numerics.
"""

from gma_np.mixers.performer.features import draw_projections
from gma_np.mixers.performer.ops import (
    PerformerCache,
    PerformerState,
    init_performer_state,
    performer_attention,
    performer_attention_backward,
    performer_attention_forward,
    performer_attention_recurrent,
)

__all__ = [
    "performer_attention", "performer_attention_forward", "performer_attention_backward",
    "performer_attention_recurrent", "init_performer_state", "draw_projections",
    "PerformerState", "PerformerCache",
]
