"""The N x N affinity of one window, through the dense reference: sign, rank, spectrum.

Dimension legend: N tokens of the window (N <= MAX_WINDOW), K components, d head size.

GMA never forms its affinity; this module does, for one head and one window, through
gma_np.memory.reference.dense_affinity (docs/definition.md, section 2):

    bidirectional   A = R_Q R_K^T                       rank <= K, entries >= 0
    causal          A = (R_Q R_K^T) o L                 L lower-triangular ones
    slot norm       A = ((R_Q o W) R_K^T) o L,  W = 1 / (L R_K + eps)

and the mixing matrix the values are averaged with, M = diag(A 1 + eps)^-1 A for
norm="row" (rows sum to 1 - eps / (A 1 + eps)), M = A for norm="slot".

The causal mask breaks the global rank bound (K = 1 gives A = L, full rank), but not
the structure: every block below the diagonal, A[t:, :t] = R_Q[t:] R_K[:t]^T, still has
rank <= K (A is K-semiseparable), which `lower_block_ranks` measures.

Effective rank (Roy and Vetterli 2007), from the singular values s_1 >= ... >= 0:

    p_i = s_i / sum_j s_j,   erank = exp( -sum_i p_i log p_i )      in [1, rank]

The singular values are normalised by their sum, NOT passed through a softmax:
softmax(s) depends on the scale of A (multiply A by 10 and it changes), is never 0
for a zero singular value (so the null space counts), and gives exp(H) near N for any
matrix with small singular values; erank is scale-invariant and at most the rank.

The softmax-attention map of a compared run, P = softmax(q k^T / sqrt(d) + causal
mask) row by row, is computed here from its q and k (`softmax_attention_map`).
"""

import numpy as np

from gma_np.memory.reference import dense_affinity

# Largest window whose N x N affinity is formed: 512^2 float64 is 2 MiB per matrix,
# and its SVD takes well under a second.
MAX_WINDOW = 512


def _matrix(a, name):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a matrix, got shape {a.shape}")
    return a


def affinity(rq, rk, *, causal=True, norm="row", eps=1e-6):
    """(A, M) of one head and window: rq, rk (N, K) -> the affinity A (N, N) and the
    mixing matrix M (N, N) (module docstring)."""
    rq, rk = _matrix(rq, "rq"), _matrix(rk, "rk")
    if rq.shape != rk.shape:
        raise ValueError(f"rk: expected the shape of rq {rq.shape}, got {rk.shape}")
    if rq.shape[0] > MAX_WINDOW:
        raise ValueError(f"rq: expected a window of at most {MAX_WINDOW} tokens, got {rq.shape[0]}")
    if norm not in ("row", "slot"):
        raise ValueError(f"norm: expected 'row' or 'slot', got {norm!r}")
    A, _, _ = dense_affinity(rq, rk, causal, norm == "slot", eps)
    M = A if norm == "slot" else A / (A.sum(axis=1, keepdims=True) + eps)
    return A, M


def singular_values(a):
    """s (min(N, N'),) of a matrix, descending."""
    return np.linalg.svd(_matrix(a, "a"), compute_uv=False)


def numerical_rank(s, shape, tol=None):
    """#{s_i > tol}, tol = max(s) * max(shape) * eps_64 by default (numpy.linalg.matrix_rank's)."""
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0:
        return 0
    if tol is None:
        tol = s.max() * max(shape) * np.finfo(np.float64).eps
    return int((s > tol).sum())


def effective_rank(s):
    """exp of the entropy of s / sum(s) (Roy and Vetterli 2007; module docstring)."""
    s = np.asarray(s, dtype=np.float64)
    if (s < 0).any():
        raise ValueError("s: expected non-negative singular values")
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def lower_block_ranks(a, splits):
    """Numerical ranks of the blocks a[t:, :t] below the diagonal, for each t in splits."""
    a = _matrix(a, "a")
    out = []
    for t in splits:
        block = a[t:, :t]
        out.append(numerical_rank(singular_values(block), block.shape) if block.size else 0)
    return out


def affinity_stats(a, K=None):
    """Sign, spectrum and row sums of a matrix a (N, N), as a dict:

        min, negative_fraction, singular_values (descending), rank (numerical),
        effective_rank, row_sum_min, row_sum_max, and with K: rank_le_K,
        lower_block_rank_max (the largest rank of a[t:, :t] over 8 splits t)
    """
    a = _matrix(a, "a")
    s = singular_values(a)
    rows = a.sum(axis=1)
    out = {"min": float(a.min()), "negative_fraction": float((a < 0).mean()),
           "singular_values": s, "rank": numerical_rank(s, a.shape),
           "effective_rank": effective_rank(s),
           "row_sum_min": float(rows.min()), "row_sum_max": float(rows.max())}
    if K is not None:
        N = a.shape[0]
        splits = sorted({int(t) for t in np.linspace(1, N - 1, 8)}) if N > 1 else []
        out["rank_le_K"] = out["rank"] <= K
        out["lower_block_rank_max"] = max(lower_block_ranks(a, splits), default=0)
    return out


def softmax_attention_map(q, k, causal=True):
    """P (N, N) = softmax_j(q_i . k_j / sqrt(d)) over j <= i (causal) or all j: the
    attention weights of scaled dot-product attention. q, k (N, d)."""
    q, k = _matrix(q, "q"), _matrix(k, "k")
    if q.shape != k.shape:
        raise ValueError(f"k: expected the shape of q {q.shape}, got {k.shape}")
    scores = q @ k.T / np.sqrt(q.shape[1])                         # (N, N)
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape, dtype=bool)), scores, -np.inf)
    scores -= scores.max(axis=1, keepdims=True)                   # for exp's range only
    p = np.exp(scores)
    return p / p.sum(axis=1, keepdims=True)
