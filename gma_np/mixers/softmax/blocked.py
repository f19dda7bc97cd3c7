"""Softmax attention, the fast path: one block of queries at a time against its admissible keys.

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head
size; nb queries of a block, nt keys of a tile, nk keys a block attends to.

The math is that of naive.py (the dense reference): s = scale q k^T with -inf where
a key is padding or (causal) in the future, L = row log-sum-exp of s, P = exp(s - L),
o = P v. This module computes it without the (N, N) matrices, in the manner of
FlashAttention (Dao et al. 2022; Dao 2023) but with the softmax of a whole block row
at once rather than an online one:

    forward, per block of nb queries [i0, i1):
        1. s = (scale q_b) k^T                 (B, H, nb, nk)  tile by tile of keys
           (+ -inf for padding keys and, causal, for keys after the query)
        2. p = softmax of each row, L_b = its log-sum-exp    (row_softmax)
        3. o_b = p v                           (B, H, nb, e)   tile by tile
    The cache of the backward is q, k, v (as passed), o and L (B, H, N) float64.

    backward, per block: recompute s (1.) and p = exp(s - L_b), then per tile of keys
        dv_t += p_t^T do_b,  ds_t = p_t * (do_b v_t^T - D_b),  D_b = rowsum(do_b * o_b)
        dq_b += ds_t k_t,    dk_t += ds_t^T (scale q_b)
    and dq_b *= scale (docs/mixers/softmax.md derives each line).

Causal blocks stop at the key of their last query (nk = i1: the blocks above the
diagonal are never computed), and only tiles that reach past the block's first query
get the triangle of -inf. At most one block of scores, (B, H, nb, nk), exists at a
time, plus one tile (B, H, nb, nt) of ds in the backward; the backward's other
memory is its float64 accumulators dk, dv (B, H, N, d + e) and dq of one block.

Every product is a float64 GEMM (np.matmul) on operands widened block by block
(a tile of keys, a block of queries): float32 inputs get float64-grade results and
no float64 copy of a whole (N, d) input is ever made (float64 inputs are used as
they are, through views).
"""

from dataclasses import dataclass

import numpy as np

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE
from gma_np._threads import blas_single_thread

# --- constants ---------------------------------------------------------------------------

# Queries per block and keys per tile (one number, so that the tiles of a causal block
# line up with its diagonal). A block's scores are B H SOFTMAX_BLOCK nk float64 numbers.
# Forward + backward, float32, B = 2, H = 4, N = 1024, d = e = 32, medians of 7 with the
# sizes interleaved, on a shared 2-core machine: bidirectional 150 / 135 / 195 ms and
# causal 91 / 78 / 104 ms with blocks of 64 / 128 / 256 (float64 alike), peak memory
# 11 / 17 / 32 MiB (docs/mixers/softmax.md, "Block size"). 128 was the fastest in every run.
SOFTMAX_BLOCK = 128


# --- the block loops -----------------------------------------------------------------

def _f64(a):
    """a widened to float64 (a view, no copy, if it is float64 already)."""
    return a.astype(ACCUM_DTYPE, copy=False)


def _tiles(n_keys, block):
    """Key ranges [j0, j1) of the tiles covering keys 0 .. n_keys - 1."""
    return [(j0, min(n_keys, j0 + block)) for j0 in range(0, n_keys, block)]


def row_softmax(s):
    """In place: each row of s (..., nk) float64 becomes its softmax; returns L (...,) float64,
    the row log-sum-exp.

    The algorithm of scipy.special.logsumexp and scipy.special.softmax: shift by the row
    maximum m, exponentiate, sum (the sum is >= 1, the maximum giving exp(0) = 1, so the
    log cannot overflow or meet 0), L = m + log(sum), p = exp(s - m) / sum. Inadmissible
    entries are -inf and get exactly 0. A row with no admissible entry (m = -inf) gets
    p = 0 and L = -inf. Vectorised NumPy over the whole block rather than a call to
    scipy.special.logsumexp: that took 20 times as long as the exp of the block
    (docs/mixers/softmax.md, "Numerics"); tests/mixers/test_softmax.py checks L against
    scipy.special.logsumexp and p against scipy.special.softmax.
    """
    m = s.max(axis=-1, keepdims=True)                              # (..., 1)
    empty = np.isneginf(m)
    has_empty = bool(empty.any())
    if has_empty:
        m = np.where(empty, 0.0, m)                                # -inf - 0 = -inf -> exp 0
    s -= m
    np.exp(s, out=s)
    total = s.sum(axis=-1, keepdims=True)                          # (..., 1), >= 1 unless empty
    if has_empty:
        total = np.where(empty, 1.0, total)
    s /= total
    L = (m + np.log(total))[..., 0]
    if has_empty:
        L[empty[..., 0]] = -np.inf
    return L


def _scores(qs_b, k, key_bias, q_pos0, n_keys, causal, block):
    """s (B, H, nb, n_keys) float64 = qs_b k^T for keys 0 .. n_keys - 1, -inf where inadmissible.

    qs_b      (B, H, nb, d)  float64, the block's queries times scale, at positions q_pos0 ..
    k         (B, H, Nk, d)  keys, any float dtype (widened tile by tile)
    key_bias  (B, 1, 1, Nk)  float64 0 / -inf (padding), or None
    """
    B, H, nb, _ = qs_b.shape
    s = np.empty((B, H, nb, n_keys), dtype=ACCUM_DTYPE)
    for j0, j1 in _tiles(n_keys, block):
        s_t = s[..., j0:j1]                                        # (B, H, nb, nt) view
        np.matmul(qs_b, _f64(k[:, :, j0:j1]).swapaxes(-1, -2), out=s_t)   # 'bhid,bhjd->bhij'
        if key_bias is not None:
            s_t += key_bias[..., j0:j1]
        if causal and j1 - 1 > q_pos0:                             # a key after the first query
            q_pos = np.arange(q_pos0, q_pos0 + nb)[:, None]
            future = np.arange(j0, j1)[None, :] > q_pos            # (nb, nt)
            s_t[..., future] = -np.inf
    return s


def _block_keys(q_pos0, nb, n_keys, causal):
    """How many keys (from key 0) a block of nb queries at positions q_pos0 .. may attend to."""
    return min(n_keys, q_pos0 + nb) if causal else n_keys


def attend_forward(q, k, v, key_bias, q_offset, causal, scale, block, o=None):
    """o (B, H, n, e) in q's dtype and L (B, H, n) float64 for queries at positions
    q_offset .. q_offset + n - 1 against keys 0 .. Nk - 1.

    q (B, H, n, d); k (B, H, Nk, d); v (B, H, Nk, e); key_bias (B, 1, 1, Nk) float64
    0 / -inf or None. Causal needs Nk >= q_offset + n. The forward of a sequence is
    q_offset = 0, k and v of the same sequence; decoding a chunk is q_offset = the
    cached tokens, k and v the cache with the chunk appended.
    """
    B, H, n, d = q.shape
    n_all, e = k.shape[2], v.shape[3]
    if o is None:
        o = np.empty((B, H, n, e), dtype=q.dtype)
    L = np.empty((B, H, n), dtype=ACCUM_DTYPE)
    with blas_single_thread():
        for i0 in range(0, n, block):
            i1 = min(n, i0 + block)
            nk = _block_keys(q_offset + i0, i1 - i0, n_all, causal)
            qs_b = _f64(q[:, :, i0:i1]) * scale                    # (B, H, nb, d)
            # 1. scores, 2. row softmax (s becomes p)
            p = _scores(qs_b, k, key_bias, q_offset + i0, nk, causal, block)
            L[:, :, i0:i1] = row_softmax(p)
            # 3. o_b = p v, tile by tile
            o_b = np.zeros((B, H, i1 - i0, e), dtype=ACCUM_DTYPE)
            for j0, j1 in _tiles(nk, block):
                o_b += np.matmul(p[..., j0:j1], _f64(v[:, :, j0:j1]))   # 'bhij,bhje->bhie'
            o[:, :, i0:i1] = o_b
            del p                     # before the next block's is allocated: one block at a time
    return o, L


def attend_backward(do, q, k, v, o, L, key_bias, causal, scale, block):
    """dq, dk, dv (in q's dtype) of sum(o * do) for the forward attend_forward(q, k, v, ...,
    q_offset=0, ...) that returned o and L. Recomputes p block by block from q, k and L."""
    B, H, N, d = q.shape
    e = v.shape[3]
    dq = np.empty_like(q)
    dk = np.zeros((B, H, N, d), dtype=ACCUM_DTYPE)                 # accumulated over blocks
    dv = np.zeros((B, H, N, e), dtype=ACCUM_DTYPE)
    with blas_single_thread():
        for i0 in range(0, N, block):
            i1 = min(N, i0 + block)
            nk = _block_keys(i0, i1 - i0, N, causal)
            qs_b = _f64(q[:, :, i0:i1]) * scale                    # (B, H, nb, d)
            do_b = _f64(do[:, :, i0:i1])                           # (B, H, nb, e)
            # in the forward pass this was: p = exp(s - L), s = scale q k^T (masked)
            p = _scores(qs_b, k, key_bias, i0, nk, causal, block)   # (B, H, nb, nk)
            L_b = L[:, :, i0:i1, None]
            p -= np.where(np.isneginf(L_b), 0.0, L_b)              # an empty row stays -inf
            np.exp(p, out=p)
            # D_i = sum_j p_ij dp_ij = do_i . o_i
            D = np.einsum("bhie,bhie->bhi", do_b, _f64(o[:, :, i0:i1]))[..., None]   # (B, H, nb, 1)
            dq_b = np.zeros((B, H, i1 - i0, d), dtype=ACCUM_DTYPE)
            for j0, j1 in _tiles(nk, block):
                p_t = p[..., j0:j1]                                # (B, H, nb, nt)
                v_t = _f64(v[:, :, j0:j1])                         # (B, H, nt, e)
                # in the forward pass this was: o = p v
                dv[:, :, j0:j1] += np.matmul(p_t.swapaxes(-1, -2), do_b)   # 'bhij,bhie->bhje'
                ds_t = np.matmul(do_b, v_t.swapaxes(-1, -2))       # dp_t 'bhie,bhje->bhij'
                # in the forward pass this was: p = softmax_j(s)
                ds_t -= D
                ds_t *= p_t                                        # (B, H, nb, nt)
                # in the forward pass this was: s = (scale q) k^T
                dq_b += np.matmul(ds_t, _f64(k[:, :, j0:j1]))      # 'bhij,bhjd->bhid'
                dk[:, :, j0:j1] += np.matmul(ds_t.swapaxes(-1, -2), qs_b)  # 'bhij,bhid->bhjd'
            dq_b *= scale
            dq[:, :, i0:i1] = dq_b
            del p, p_t, ds_t          # (p_t is a view of p) before the next block's are allocated
    return dq, dk.astype(q.dtype, copy=False), dv.astype(q.dtype, copy=False)


# --- the public forward/backward pair ------------------------------------------------

@dataclass
class SoftmaxAttentionCache:
    """Everything softmax_attention_backward needs. Stored: q, k, v as passed (references, not
    copies), o and the row log-sum-exp L. Recomputed in the backward: the scores and P, one
    block of queries at a time, from q, k and L; so no (N, N) array is kept."""
    q: np.ndarray               # (B, H, N, d)
    k: np.ndarray               # (B, H, N, d)
    v: np.ndarray               # (B, H, N, e)
    o: np.ndarray               # (B, H, N, e) the output, in the dtype of q
    L: np.ndarray               # (B, H, N) float64, row log-sum-exp of the scores (-inf: no key)
    key_bias: object            # (B, 1, 1, N) float64 0 / -inf for padding keys, or None
    causal: bool
    scale: float
    block: int                  # queries per block (and keys per tile)


def validate_scale(scale, d):
    """The score scale: 1/sqrt(d) for None, else a finite float > 0."""
    if scale is None:
        return 1.0 / float(np.sqrt(d))
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale: expected a float > 0 or None (1/sqrt(d)), got "
                        f"{type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a finite float > 0, got {scale!r}")
    return scale


def validate_causal(causal):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    return bool(causal)


def key_bias_of(key_mask, B, N):
    """(B, 1, 1, N) float64, 0 for a key and -inf for padding, from a validated key_mask; or
    None when there is no mask (nothing to add)."""
    if key_mask is None:
        return None
    mask = check.key_mask(key_mask, B, N) > 0.5                    # (B, N) bool
    return np.where(mask, 0.0, -np.inf)[:, None, None, :]


def _validate_block(block):
    if isinstance(block, (bool, np.bool_)) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block: expected an integer >= 1, got {block!r}")
    return int(block)


def softmax_attention_forward(q, k, v, *, causal=False, key_mask=None, scale=None,
                              block=SOFTMAX_BLOCK):
    """Multi-head scaled dot-product attention, returning o and the cache of the backward.

    Parameters
    ----------
    q, k : arrays of shape (B, H, N, d), float32 or float64 (one dtype for q, k, v)
    v : array of shape (B, H, N, e)
    causal : bool, query i attends to keys j <= i only
    key_mask : bool array of shape (B, N) or None; False marks a padding key, which gets
        zero weight. A query with no admissible key outputs 0 (and passes no gradient).
    scale : factor of the scores q . k; None for 1/sqrt(d)
    block : queries per block (and keys per tile); the default is SOFTMAX_BLOCK

    Returns
    -------
    o : array of shape (B, H, N, e), dtype of q
    cache : SoftmaxAttentionCache
    """
    q, k, v = check.qkv(q, k, v)
    B, H, N, d = q.shape
    causal = validate_causal(causal)
    scale = validate_scale(scale, d)
    block = _validate_block(block)
    key_bias = key_bias_of(key_mask, B, N)
    o, L = attend_forward(q, k, v, key_bias, 0, causal, scale, block)
    return o, SoftmaxAttentionCache(q=q, k=k, v=v, o=o, L=L, key_bias=key_bias, causal=causal,
                                    scale=scale, block=block)


def softmax_attention(q, k, v, *, causal=False, key_mask=None, scale=None):
    """Multi-head scaled dot-product attention o (B, H, N, e): softmax_attention_forward's o."""
    return softmax_attention_forward(q, k, v, causal=causal, key_mask=key_mask, scale=scale)[0]


def softmax_attention_backward(do, cache):
    """Gradients of sum(o * do) with respect to q, k and v.

    Parameters
    ----------
    do : array of shape (B, H, N, e), the cotangent of o
    cache : SoftmaxAttentionCache from softmax_attention_forward

    Returns
    -------
    dict with keys "q", "k", "v", in the shapes and dtype of q, k, v.
    """
    if not isinstance(cache, SoftmaxAttentionCache):
        raise TypeError(f"cache: expected a SoftmaxAttentionCache (from softmax_attention_forward), "
                        f"got {type(cache).__name__}")
    do = check.float_array("do", do, ndim=4)
    check.check_shape("do", do, cache.o.shape, "the shape of o, (B, H, N, e)")
    dq, dk, dv = attend_backward(do, cache.q, cache.k, cache.v, cache.o, cache.L, cache.key_bias,
                                 cache.causal, cache.scale, cache.block)
    return {"q": dq, "k": dk, "v": dv}
