"""GMA through the explicit N x N affinity: the definition as matrices, forward and backward.

Dimension legend: B batch, H heads, N tokens, K components, e value size.
FOR TEACHING AND CHECKING ONLY: it builds N x N matrices, which no fast path does.

Per sequence the naive routing gives R_Q = r(q) and R~_K = m * r(k) (N, K), the dense
memory mix of gma_np.memory.reference (A = (R_Q R~_K^T) o L and its backward) does
the rest, and the routing backward takes the gradients on to q, k and the mixture.
"""

import numpy as np

from gma_np._numerics import DEFAULT_EPS
from gma_np.memory.reference import dense_mix_backward, dense_mix_forward
from gma_np.mixers.gma.reference.routing import (
    responsibilities_backward_naive,
    routed_keys_and_queries_naive,
)


def gma_dense(q, k, v, means, log_var, logits, *, causal=False, norm="row",
              temperature=1.0, eps=DEFAULT_EPS, key_mask=None):
    """o (B, H, N, e) in float64, through the N x N affinity of every sequence."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H = q.shape[:2]
    rq, rk = routed_keys_and_queries_naive(q, k, means, log_var, logits, temperature, key_mask)
    o = np.empty(v.shape)
    for b in range(B):
        for h in range(H):
            o[b, h] = dense_mix_forward(rq[b, h], rk[b, h], v[b, h], causal, norm == "slot", eps)
    return o


def gma_dense_backward(do, q, k, v, means, log_var, logits, *, causal=False, norm="row",
                       temperature=1.0, eps=DEFAULT_EPS, key_mask=None):
    """The gradients of sum(o * do), as gma_np.gma_backward returns them, by the dense form.

    "temperature" is a float for a scalar temperature and (H,) for a per-head one.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H = q.shape[:2]
    rq, rk = routed_keys_and_queries_naive(q, k, means, log_var, logits, temperature, key_mask)
    drq, drk, dv = np.empty(rq.shape), np.empty(rk.shape), np.empty(v.shape)
    for b in range(B):
        for h in range(H):
            drq[b, h], drk[b, h], dv[b, h] = dense_mix_backward(
                do[b, h], rq[b, h], rk[b, h], v[b, h], causal, norm == "slot", eps)
    if key_mask is not None:
        drk *= np.asarray(key_mask, dtype=np.float64)[:, None, :, None]
    gq = responsibilities_backward_naive(drq, q, means, log_var, logits, temperature)
    gk = responsibilities_backward_naive(drk, k, means, log_var, logits, temperature)
    dtau = gq["temperature"] + gk["temperature"]
    return {"q": gq["x"], "k": gk["x"], "v": dv,
            "means": gq["means"] + gk["means"], "log_var": gq["log_var"] + gk["log_var"],
            "logits": gq["logits"] + gk["logits"],
            "temperature": dtau if np.ndim(temperature) == 1 else float(dtau.sum())}
