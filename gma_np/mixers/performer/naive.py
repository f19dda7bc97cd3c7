"""FAVOR+ random-feature attention, written to be read: the ground truth of ops.py.

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size,
m random features per head.
FOR TEACHING AND CHECKING ONLY: the dense form builds the N x N affinity of every head,
and both forms use the paper's features as they are, without a stabiliser, so they
overflow or underflow where the fast path does not (fine at the sizes of the tests).

Per head, with the projections W (m, d) (rows w_r) and the key mask (Choromanski et al.
2021, with eps as in docs/mixers/performer.md):

    x' = x / d^(1/4)
    phi(x)_r = exp(w_r . x' - |x'|^2 / 2) / sqrt(m)      (N, m): phi(q) . phi(k) ~ exp(q . k / sqrt(d))
    A = (phi(Q) phi(K)^T) o (1 mask^T) o L                (N, N), L lower-triangular if causal
    O = (A V) / (A 1 + eps)                               (N, e), row by row

and the same as a loop over t with the (m, e) memory as its state (causal):

    S += mask_t outer(phi(k_t), v_t);  z += mask_t phi(k_t);  o_t = (phi(q_t) S) / (phi(q_t) . z + eps)

Everything in float64.
"""

import numpy as np

from gma_np._numerics import DEFAULT_EPS


def positive_random_features(x, W):
    """phi(x) (..., m) of x (..., d) for one head's projections W (m, d), unstabilised."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    xs = x / d ** 0.25                                             # x'
    u = xs @ W.T - 0.5 * (xs * xs).sum(axis=-1, keepdims=True)     # w_r . x' - |x'|^2 / 2
    return np.exp(u) / np.sqrt(W.shape[0])


def _mask(key_mask, B, N):
    return np.ones((B, N)) if key_mask is None else np.asarray(key_mask, dtype=np.float64)


def performer_attention_dense(q, k, v, projections, *, causal=False, key_mask=None, eps=DEFAULT_EPS):
    """o (B, H, N, e) in float64, through the N x N affinity of every head."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    W = np.asarray(projections, dtype=np.float64)                  # (H, m, d)
    B, H, N, _ = q.shape
    m = _mask(key_mask, B, N)
    L = np.tril(np.ones((N, N))) if causal else np.ones((N, N))
    o = np.empty(v.shape)
    for b in range(B):
        for h in range(H):
            A = positive_random_features(q[b, h], W[h]) @ positive_random_features(k[b, h], W[h]).T
            A = A * m[b][None, :] * L
            o[b, h] = (A @ v[b, h]) / (A.sum(axis=1, keepdims=True) + eps)
    return o


def performer_attention_loop(q, k, v, projections, *, key_mask=None, eps=DEFAULT_EPS):
    """Causal FAVOR+ token by token, with the unstabilised (m, e) memory: o (B, H, N, e)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    W = np.asarray(projections, dtype=np.float64)
    B, H, N, _ = q.shape
    e = v.shape[3]
    mask = _mask(key_mask, B, N)
    S = np.zeros((B, H, W.shape[1], e))
    z = np.zeros((B, H, W.shape[1]))
    o = np.empty(v.shape)
    for t in range(N):
        for h in range(H):
            fk = positive_random_features(k[:, h, t], W[h]) * mask[:, t, None]   # (B, m)
            S[:, h] += fk[:, :, None] * v[:, h, t, None, :]
            z[:, h] += fk
            fq = positive_random_features(q[:, h, t], W[h])                     # (B, m)
            num = np.einsum("bm,bme->be", fq, S[:, h])
            o[:, h, t] = num / ((fq * z[:, h]).sum(axis=1)[:, None] + eps)
    return o
