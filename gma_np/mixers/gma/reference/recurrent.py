"""Causal GMA as a loop over t with an explicit state: the recurrence of section 3, plainly.

Dimension legend: B batch, H heads, N tokens, K components, e value size.

    S = 0 (K, e); z = 0 (K,)
    for t in 0..N-1:
        S += outer(R~_K[t], V[t]);  z += R~_K[t]                       (write)
        row:  O[t] = (R_Q[t] @ S) / (R_Q[t] . z + eps)                 (read)
        slot: O[t] = R_Q[t] @ (S / (z + eps)[:, None])

This is what the Numba scan of gma_np.memory.scan computes, in NumPy, one
(batch, head) at a time, with no attempt at speed.
"""

import numpy as np

from gma_np._numerics import DEFAULT_EPS
from gma_np.memory.reference import causal_mix_loop
from gma_np.mixers.gma.reference.routing import routed_keys_and_queries_naive


def gma_loop(q, k, v, means, log_var, logits, *, norm="row", temperature=1.0,
             eps=DEFAULT_EPS, key_mask=None):
    """Causal o (B, H, N, e) in float64, by the loop over t."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H = q.shape[:2]
    rq, rk = routed_keys_and_queries_naive(q, k, means, log_var, logits, temperature, key_mask)
    o = np.empty(v.shape)
    for b in range(B):
        for h in range(H):
            o[b, h] = causal_mix_loop(rq[b, h], rk[b, h], v[b, h], norm == "slot", eps)[0]
    return o
