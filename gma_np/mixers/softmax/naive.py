"""Softmax attention, the definition in plain NumPy: the dense N x N form, forward and backward.

This is the ground truth the blocked fast path (blocked.py) and the key/value-cache
decoding (recurrent.py) are tested against. It is written to be read: every array of
the definition exists in full, (B, H, N, N) scores included, and everything is
computed in float64 whatever dtype comes in (the outputs are float64 too).

Dimension legend: B batch, H heads, N tokens (queries i, keys j), d query/key head
size, e value head size.

Forward (Vaswani et al. 2017), per batch b and head h:

    1. S = scale Q K^T                       (N, N)  scores, scale = 1/sqrt(d) by default
    2. S[i, j] = -inf where key j is not admissible for query i:
       key_mask[b, j] is False (padding), or j > i when causal
    3. L_i = logsumexp_j S[i, j]             (N,)    by scipy.special.logsumexp
       P[i, j] = exp(S[i, j] - L_i)          (N, N)  the row softmax
    4. O = P V                               (N, e)

A query with no admissible key (every key padding, or a causal query whose own and
earlier keys are all padding) has L_i = -inf; its row of P is defined as 0, so its
output is 0 and no gradient flows through it.

Backward of a loss with dO = dLoss/dO (docs/mixers/softmax.md derives each line):

    4. dV = P^T dO,  dP = dO V^T
    3. dS = P * (dP - D),  D_i = sum_e dO[i, e] O[i, e] = sum_j P[i, j] dP[i, j]
    2. (masked entries have P = 0, so dS = 0 there: nothing to do)
    1. dQ = scale dS K,  dK = scale dS^T Q
"""

import numpy as np
from scipy.special import logsumexp


def admissible_keys(B, N, causal, key_mask):
    """(B, 1, N, N) bool: A[b, 0, i, j] says whether query i may attend to key j."""
    keys = np.ones((B, N), dtype=bool) if key_mask is None else np.asarray(key_mask, dtype=bool)
    allowed = np.broadcast_to(keys[:, None, None, :], (B, 1, N, N))      # (B, 1, N, N)
    if causal:
        allowed = allowed & np.tri(N, dtype=bool)                       # j <= i
    return allowed


def softmax_attention_naive_forward(q, k, v, *, causal=False, key_mask=None, scale=None):
    """Dense softmax attention: o (B, H, N, e) float64 and the cache of the backward.

    q, k (B, H, N, d); v (B, H, N, e); key_mask (B, N) bool or None (False = padding);
    scale: the factor of the scores, 1/sqrt(d) if None. The cache is a dict holding
    the float64 inputs, P (B, H, N, N) and o.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H, N, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    # 1. scores
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)                       # (B, H, N, N)
    # 2. inadmissible keys get -inf (exp(-inf) = 0: they get exactly zero weight)
    allowed = admissible_keys(B, N, causal, key_mask)                    # (B, 1, N, N)
    s = np.where(allowed, s, -np.inf)
    # 3. row softmax through the row log-sum-exp; an empty row (L = -inf) is all zeros
    with np.errstate(divide="ignore"):                                   # log(0) of an empty row
        L = logsumexp(s, axis=-1)                                        # (B, H, N)
    empty = ~np.isfinite(L)
    p = np.exp(s - np.where(empty, 0.0, L)[..., None])                   # (B, H, N, N)
    # 4. values
    o = np.einsum("bhij,bhje->bhie", p, v)                               # (B, H, N, e)
    return o, {"q": q, "k": k, "v": v, "p": p, "o": o, "L": L, "scale": scale}


def softmax_attention_naive_backward(do, cache):
    """Gradients {"q", "k", "v"} (float64) of sum(o * do), from the dense P of the cache."""
    q, k, v, p, o, scale = (cache[n] for n in ("q", "k", "v", "p", "o", "scale"))
    do = np.asarray(do, dtype=np.float64)                                # (B, H, N, e)
    # 4. in the forward pass this was: o = p v
    dv = np.einsum("bhij,bhie->bhje", p, do)                             # (B, H, N, e)
    dp = np.einsum("bhie,bhje->bhij", do, v)                             # (B, H, N, N)
    # 3. in the forward pass this was: p = softmax_j(s), whose Jacobian-vector product is
    #    p * (dp - sum_j p dp); sum_j p[i, j] dp[i, j] = sum_e do[i, e] o[i, e]
    D = np.einsum("bhie,bhie->bhi", do, o)                               # (B, H, N)
    ds = p * (dp - D[..., None])                                         # (B, H, N, N)
    # 2. masked entries: p = 0 there, so ds = 0 already
    # 1. in the forward pass this was: s = scale q k^T
    dq = scale * np.einsum("bhij,bhjd->bhid", ds, k)                     # (B, H, N, d)
    dk = scale * np.einsum("bhij,bhid->bhjd", ds, q)                     # (B, H, N, d)
    return {"q": dq, "k": dk, "v": dv}
