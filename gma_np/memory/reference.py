"""The feature memory as plain NumPy: the dense N x N form and the loop over t.

Dimension legend: N tokens, K features per token (GMA's components), e value size.
FOR TEACHING AND CHECKING ONLY: the dense form builds N x N matrices, which no fast
path does. One sequence at a time; GMA's reference (gma_np.mixers.gma.reference)
routes q and k into these features, and the tests hold every fast form of the
memory to these functions.

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

causal_mix_loop is the causal memory as the recurrence itself, one token at a time
from a state (S, z): what the scans of gma_np.memory compute.
"""

import numpy as np


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


def causal_mix_loop(rq, rk, v, slot, eps, S=None, z=None):
    """O (N, e) of one sequence and the final (S, z), from an optional initial state."""
    N, K = rq.shape
    e = v.shape[1]
    S = np.zeros((K, e)) if S is None else S.copy()
    z = np.zeros(K) if z is None else z.copy()
    o = np.empty((N, e))
    for t in range(N):
        S += np.outer(rk[t], v[t])                                 # (K, e)
        z += rk[t]                                                 # (K,)
        if slot:
            o[t] = rq[t] @ (S / (z + eps)[:, None])
        else:
            o[t] = (rq[t] @ S) / (rq[t] @ z + eps)
    return o, S, z
