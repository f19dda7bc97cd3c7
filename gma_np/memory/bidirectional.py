"""The bidirectional feature memory by float64 GEMMs, one block of tokens at a time.

Dimension legend: P independent sequences (batch x heads), N tokens, K features per
token (GMA's components; F in gma_np.memory.ops), e value size.

Write all, then read: S = rk^T v (P, K, e) and z = rk^T 1 from every key, then every
query reads them, block by block of tokens (docs/derivations.md, section 4). Never an
N x N array nor a float64 copy of an (N, K) array: each block is widened to float64
on its own, and the blocks' partial sums are added in block order, so results do not
depend on the thread count. No validation: gma_np.memory.ops and GMA's mixing check
the arguments.
"""

import numpy as np

from gma_np._numerics import ACCUM_DTYPE, BLOCK_STREAMS, MIXING_BLOCK, ROUTING_BLOCK
from gma_np._threads import blas_single_thread, run_streams, sum_in_order, threads_for
from gma_np._workspace import pooled


def _token_blocks(N):
    """Token ranges [n0, n1) of the bidirectional GEMMs: MIXING_BLOCK tokens, or fewer so
    that every stream gets four blocks (never below ROUTING_BLOCK / 2): at small N the
    float64 block temporaries would otherwise be a large share of the memory."""
    size = min(MIXING_BLOCK, max(ROUTING_BLOCK // 2, -(-N // (4 * BLOCK_STREAMS))))
    return [(n0, min(N, n0 + size)) for n0 in range(0, N, size)]


def _over_blocks(N, work, body):
    """[body(n0, n1) for each token block], in block order. The blocks are dealt to
    BLOCK_STREAMS streams (Python threads, BLAS on one thread each: gma_np._threads);
    the caller sums what they return in block order, so results do not depend on the
    thread count. work: multiply-adds of the whole loop, for threads_for (small work
    runs the streams one after the other)."""
    blocks = _token_blocks(N)

    def stream(s):
        # NaN and inf (eps = 0 on an empty memory, an overflowing v or do) are not answers:
        # check_output_finite and check_gradients_finite report them, naming the cause
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return [body(n0, n1) for n0, n1 in blocks[s::BLOCK_STREAMS]]

    with threads_for(work), blas_single_thread():
        parts = run_streams(stream, BLOCK_STREAMS)
    return [parts[i % BLOCK_STREAMS][i // BLOCK_STREAMS] for i in range(len(blocks))]


def _f64(a):
    """a widened to float64 (no copy if it already is)."""
    return a.astype(ACCUM_DTYPE, copy=False)


def _bidirectional_write(rk, v):
    """S = rk^T v (P, K, e) and z = rk^T 1 (P, K, 1), float64, by GEMMs block by block."""
    def write(n0, n1):
        rk_b = _f64(rk[:, n0:n1])                                  # (P, nb, K)
        return (np.matmul(rk_b.transpose(0, 2, 1), _f64(v[:, n0:n1])),   # 'pnk,pne->pke'
                rk_b.sum(axis=1)[:, :, None])
    parts = _over_blocks(rk.shape[1], rk.size * v.shape[2], write)
    return sum_in_order([S for S, _ in parts]), sum_in_order([z for _, z in parts])


def _bidirectional_forward(rq, rk, v, slot, eps):
    """O (P, N, e) in v's dtype from routed rq, rk (P, N, K) and v (P, N, e), by GEMMs
    (docs/derivations.md, section 4): write S = rk^T v, z = rk^T 1 (float64), then read
    block by block of queries. Never an N x N array."""
    S, z = _bidirectional_write(rk, v)                             # (P, K, e), (P, K, 1)
    with np.errstate(divide="ignore", invalid="ignore"):           # eps = 0: check_output_finite
        M = S / (z + eps) if slot else S                           # (P, K, e) read matrix
    out = pooled(v.shape, v.dtype)              # (its pages: gma_np._workspace)

    def read(n0, n1):
        rq_b = _f64(rq[:, n0:n1])                                  # (P, nb, K)
        num = np.matmul(rq_b, M)                                   # (P, nb, e)
        if not slot:
            num /= np.matmul(rq_b, z) + eps                        # den (P, nb, 1)
        out[:, n0:n1] = num

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):   # check_output_finite
        _over_blocks(rq.shape[1], rq.size * v.shape[2], read)
    return out


def _bidirectional_backward(rq, rk, v, do, slot, eps, drq, drk):
    """dv, and drq, drk written into the given (P, N, K) buffers, for
    O = _bidirectional_forward(...) (docs/derivations.md, section 4):

        row:  dnum = dO / den, dden = -(dO . num) / den^2
              dR_Q = dnum S^T + dden z^T,   G = R_Q^T dnum,   g = R_Q^T dden
        slot: M = S / (z + eps),   dR_Q = dO M^T,   dM = R_Q^T dO,
              G = dM / (z + eps),   g = -(dM . S) / (z + eps)^2   (row by row of K)
        both: dV = R~_K G,   dR~_K = V G^T + 1 g^T
    """
    S, z = _bidirectional_write(rk, v)                             # (P, K, e), (P, K, 1)
    u = 1.0 / (z + eps)                                            # (P, K, 1), slot only
    M = S * u if slot else S                                       # (P, K, e)

    def read_backward(n0, n1):                                     # dR_Q, and G, g of the block
        rq_b = _f64(rq[:, n0:n1])                                  # (P, nb, K)
        do_b = _f64(do[:, n0:n1])                                  # (P, nb, e)
        if slot:
            drq[:, n0:n1] = np.matmul(do_b, M.transpose(0, 2, 1))
            return np.matmul(rq_b.transpose(0, 2, 1), do_b), None  # dM of the block
        den = np.matmul(rq_b, z) + eps                             # (P, nb, 1)
        # (P, nb, e); in place when do_b is a float64 copy, not a view of the caller's do
        dnum = do_b / den if do.dtype == ACCUM_DTYPE else np.divide(do_b, den, out=do_b)
        dnum_S = np.matmul(dnum, S.transpose(0, 2, 1))             # (P, nb, K)
        # dnum . num = sum_k rq_k (S dnum)_k: num = rq S itself is never formed
        dden = -np.einsum("pnk,pnk->pn", rq_b, dnum_S)[:, :, None] / den   # (P, nb, 1)
        dnum_S += dden * z.transpose(0, 2, 1)
        drq[:, n0:n1] = dnum_S
        return (np.matmul(rq_b.transpose(0, 2, 1), dnum),         # 'pnk,pne->pke'
                np.matmul(rq_b.transpose(0, 2, 1), dden))          # 'pnk,pn->pk'

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):   # check_gradients_finite
        parts = _over_blocks(rq.shape[1], 2 * rq.size * v.shape[2], read_backward)
        G = sum_in_order([a for a, _ in parts])                   # (P, K, e)
        if slot:
            g = -(G * S).sum(axis=2, keepdims=True) * u * u        # (P, K, 1)
            G = G * u
        else:
            g = sum_in_order([b for _, b in parts])               # (P, K, 1)
    dv = pooled(v.shape, v.dtype)

    def write_backward(n0, n1):                                    # dV, dR~_K of the block
        dv[:, n0:n1] = np.matmul(_f64(rk[:, n0:n1]), G)            # (P, nb, e)
        drk[:, n0:n1] = np.matmul(_f64(v[:, n0:n1]), G.transpose(0, 2, 1)) + g.transpose(0, 2, 1)

    _over_blocks(rq.shape[1], 2 * rq.size * v.shape[2], write_backward)
    return dv
