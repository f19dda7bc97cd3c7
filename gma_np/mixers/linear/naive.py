"""Linear attention with elu + 1 features, written to be read: the ground truth of ops.py.

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head size.
FOR TEACHING AND CHECKING ONLY: the dense form builds the N x N affinity of every head.

Per head (Katharopoulos et al. 2020, with the key mask m and eps of docs/mixers/linear.md):

    phi(x) = elu(x) + 1                                  (N, d), elementwise
    A = (phi(Q) phi(K)^T) o (1 m^T) o L                  (N, N), L lower-triangular if causal
    O = (A V) / (A 1 + eps)                              (N, e), row by row

and the same as a loop over t with the (d, e) memory as its state (causal):

    S += m_t outer(phi(k_t), v_t);  z += m_t phi(k_t);  o_t = (phi(q_t) S) / (phi(q_t) . z + eps)

Everything in float64.
"""

import numpy as np

from gma_np._numerics import DEFAULT_EPS


def elu_plus_one(x):
    """phi(x) = x + 1 for x > 0, exp(x) for x <= 0 (elu(x) = exp(x) - 1 there)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _mask(key_mask, B, N):
    return np.ones((B, N)) if key_mask is None else np.asarray(key_mask, dtype=np.float64)


def linear_attention_dense(q, k, v, *, causal=False, key_mask=None, eps=DEFAULT_EPS):
    """o (B, H, N, e) in float64, through the N x N affinity of every head."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H, N, _ = q.shape
    m = _mask(key_mask, B, N)
    L = np.tril(np.ones((N, N))) if causal else np.ones((N, N))
    o = np.empty(v.shape)
    for b in range(B):
        for h in range(H):
            A = (elu_plus_one(q[b, h]) @ elu_plus_one(k[b, h]).T) * m[b][None, :] * L
            o[b, h] = (A @ v[b, h]) / (A.sum(axis=1, keepdims=True) + eps)
    return o


def linear_attention_loop(q, k, v, *, key_mask=None, eps=DEFAULT_EPS, state=None):
    """Causal linear attention token by token: (o (B, H, N, e), (S (B, H, d, e), z (B, H, d))).

    `state` is an (S, z) pair to continue from (None: the empty memory)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H, N, d = q.shape
    e = v.shape[3]
    m = _mask(key_mask, B, N)
    S, z = (np.zeros((B, H, d, e)), np.zeros((B, H, d))) if state is None else (a.copy() for a in state)
    o = np.empty(v.shape)
    for t in range(N):
        fk = elu_plus_one(k[:, :, t]) * m[:, t, None, None]       # (B, H, d)
        S += fk[..., :, None] * v[:, :, t, None, :]                # (B, H, d, e)
        z += fk
        fq = elu_plus_one(q[:, :, t])                              # (B, H, d)
        num = np.einsum("bhd,bhde->bhe", fq, S)
        o[:, :, t] = num / (np.einsum("bhd,bhd->bh", fq, z)[..., None] + eps)
    return o, (S, z)
