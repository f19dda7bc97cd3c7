"""GMA through the explicit N x N affinity: the definition as matrices, forward and backward.

Dimension legend: B batch, H heads, N tokens, K components, e value size.
FOR TEACHING AND CHECKING ONLY: it builds N x N matrices, which no fast path does.

Per sequence, with R_Q = r(q), R~_K = m * r(k) (N, K), the lower-triangular
mask L (N, N) (all ones when bidirectional) and W (N, K):

    row:   A = (R_Q R~_K^T) o L                  O = diag(A 1 + eps)^-1 A V
    slot:  W = 1 / (L R~_K + eps)   (z_i of query i, per component)
           A = ((R_Q o W) R~_K^T) o L            O = A V

Backward, from dO (N, e):
    row:   den = A 1 + eps,  dA = (dO V^T / den - (dO . O) / den 1^T) o L,  dV = A^T (dO / den)
    slot:  dA = (dO V^T) o L,  dV = A^T dO,  dU = dA R~_K with U = R_Q o W:
           dR_Q = dU o W,  dW = dU o R_Q,  and W = 1/(Z + eps), Z = L R~_K gives
           dR~_K += L^T (-dW o W^2)
    both:  dR_Q += dA R~_K (row) ,  dR~_K += dA^T R_Q (row) or dA^T U (slot)
"""

import numpy as np

from gma_np._numerics import DEFAULT_EPS
from gma_np.mixers.gma.reference.routing import (
    responsibilities_backward_naive,
    routed_keys_and_queries_naive,
)


def dense_affinity(rq, rk, causal, slot, eps):
    """A (N, N) and, for slot, W (N, K), of one sequence: rq, rk (N, K)."""
    N = rq.shape[0]
    L = np.tril(np.ones((N, N))) if causal else np.ones((N, N))
    if slot:
        W = 1.0 / (L @ rk + eps)                                   # (N, K)
        return ((rq * W) @ rk.T) * L, W, L
    return (rq @ rk.T) * L, None, L


def dense_mix_forward(rq, rk, v, causal, slot, eps):
    """O (N, e) of one sequence from rq, rk (N, K) (rk already masked) and v (N, e)."""
    A, _, _ = dense_affinity(rq, rk, causal, slot, eps)
    if slot:
        return A @ v
    return (A @ v) / (A.sum(1, keepdims=True) + eps)


def dense_mix_backward(do, rq, rk, v, causal, slot, eps):
    """(drq, drk, dv) of sum(O * do) for O = dense_mix_forward(...)."""
    A, W, L = dense_affinity(rq, rk, causal, slot, eps)
    if slot:
        dA = (do @ v.T) * L                                        # (N, N)
        dv = A.T @ do
        U = rq * W
        dU = dA @ rk                                               # (N, K)
        drq = dU * W
        drk = dA.T @ U + L.T @ (-(dU * rq) * W * W)
        return drq, drk, dv
    den = A.sum(1, keepdims=True) + eps                            # (N, 1)
    O = (A @ v) / den
    dA = (do @ v.T / den - (do * O).sum(1, keepdims=True) / den) * L
    dv = A.T @ (do / den)
    return dA @ rk, dA.T @ rq, dv


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
