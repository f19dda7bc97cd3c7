"""Causal GMA mixing in chunked form: BLAS matrix products over chunks of C tokens.

Dimension legend: P = batch x heads (flattened), N tokens, K components, e value size,
C tokens per chunk, G chunks per group, T = G*C tokens per group, e' = e + 1 (row) or e (slot).

This is the second causal form beside the Numba token scan (gma_np.memory.scan,
wrapped there by _causal_forward / _causal_backward), with the same contract, so that
causal_form (gma_np.memory.ops) can pick either:

    causal_chunked_forward(rq, rk, v, slot, eps, chunk) -> out
    causal_chunked_backward(rq, rk, v, do, slot, eps, chunk, drq, drk) -> dv

It computes the same numbers (to rounding) in a different order: the scan does
O(K e) work per token in a sequential loop; the chunked form does O(C (K + e) + K e)
per token, all of it in matrix products of a few dozen rows that NumPy hands to BLAS.
gma_np.memory.reference holds the N x N definition both are tested against.

The linear core
---------------
Both read-outs are one computation, "causal linear attention" of a read matrix Qr
over keys rk and values Vr, with Qr, Vr chosen per norm:

    row:  Qr = rq,                 Vr = [v | 1]   (e' = e + 1: the normaliser is a value column)
    slot: Qr = U = rq / (Z + eps), Vr = v         (Z_i = sum_{j <= i} rk_j, inclusive prefix)

    F_i = Qr_i S_i,    S_i = sum_{j <= i} outer(rk_j, Vr_j)        (F (N, e'), S_i (K, e'))

    row:  o_i = F_i[:e] / (F_i[e] + eps)     (F_i[e] = rq_i . z_i, the row denominator minus eps)
    slot: o_i = F_i

Per chunk c (tokens of the chunk as rows: Qc, Kc (C, K), Vc (C, e')), with the state
S_{c-1} (K, e') summed over all previous chunks and L (C, C) lower-triangular with
its diagonal:

    1. write   W_c = Kc^T Vc (K, e'),   S_c = S_{c-1} + W_c   (exclusive prefix: a cumsum over chunks)
    2. intra   A_c = (Qc Kc^T) o L (C, C)
    3. read    F_c = Qc S_{c-1} + A_c Vc (C, e')

The masked entries of A_c are exact zeros (0 times a finite number), so row i of F_c
sums exactly the terms of tokens j <= i, bit for bit whatever tokens after i hold.

Backward of the core
--------------------
From dF (C, e') per chunk (the read-outs below say what dF is):

    3. F_c = Qc S_{c-1} + A_c Vc gives
         dQc   += dF_c S_{c-1}^T                       (C, K)
         dA_c   = (dF_c Vc^T) o L                      (C, C)
         dVc   += A_c^T dF_c                           (C, e')
         dS_{c-1} += Qc^T dF_c =: Y_c                  (K, e')
    2. A_c = (Qc Kc^T) o L gives
         dQc   += dA_c Kc,    dKc += dA_c^T Qc
    1. S_c = S_{c-1} + Kc^T Vc: the write of chunk c is read by every later chunk, so
       it receives the suffix sum of their state gradients,
         Gx_c = sum_{c' > c} Y_{c'}                    (K, e')   (exclusive suffix over chunks)
         dKc  += Vc Gx_c^T,   dVc += Kc Gx_c

Read-outs
---------
row (o_i = num_i / den_i, num_i = F_i[:e], den_i = F_i[e] + eps):

    dnum_i = do_i / den_i,   dden_i = -(do_i . o_i) / den_i,   dF_i = [dnum_i | dden_i]
    drq = dQr;   drk = dK;   dv = dVr[:, :e]   (the gradient of the ones column is dropped)

  Written out per chunk, with z_{c-1} = S_{c-1}[:, e] the normaliser before the chunk:

    dA_c  = (dnum_c Vc^T + dden_c 1^T) o L
    drq_c = dnum_c S_{c-1}[:, :e]^T + dden_c z_{c-1}^T + dA_c Kc
    G_c   = sum_{c' > c} rq_c'^T dnum_c'  (the G of the scan),   g_c = sum_{c' > c} rq_c'^T dden_c'
    dv_c  = A_c^T dnum_c + Kc G_c,   drk_c = dA_c^T rq_c + Vc G_c^T + 1 g_c^T

  (Vr Gx^T with Vr = [V | 1] is V G^T + 1 g^T: the ones column carries g.) The backward
  needs do_i . o_i but not o_i itself: with M_c = do_c Vc^T (C, C) and s_c = do_c
  S_{c-1}[:, :e]^T (C, K), both needed for dA_c and drq_c anyway,

    do_i . num_i = rq_i . s_i + sum_j A_ij M_ij,    den_i = rq_i . z_{c-1} + sum_j A_ij + eps

  so the read F_c is not formed again (that would cost C K e + C^2 e more per chunk), and
  dA_c = (M_c / den + dden 1^T) o L, drq_c = s_c / den + dden z_{c-1}^T + dA_c Kc.

slot (o_i = F_i, Qr_i = U_i = rq_i / D_i, D_i = Z_i + eps):

    dF = do;   dU = dQr
    U_i = rq_i / D_i:      drq_i = dU_i / D_i,   dD_i = -dU_i o U_i / D_i    (= dZ_i)
    Z_i = sum_{j <= i} rk_j:   drk_j += sum_{i >= j} dZ_i     (a reverse cumulative sum over tokens)
    drk += dK;   dv = dVr

  Z of a chunk is z_prev + L Kc (the sum within the chunk as a C x C by C x K product,
  masked entries exact zeros), and its reverse sum is L^T dZ_c plus the sum of dZ
  over all later chunks.

Algorithm
---------
Chunks are taken in groups of G = max(1, CHUNK_GROUP_TOKENS // C) (T = G*C tokens); every
product above is one batched np.matmul over (P, G) per group, and the prefix (suffix)
of states over the chunks of a group is a loop of G vector additions started from the
carry of the previous (next) group. Each group's rq, rk, v (and do) are cast to
float64 into padded buffers (the last chunk may be shorter than C: its padding rows
are zeros, their denominators set to 1, and their outputs dropped). All arithmetic is
float64; the carried S, z are float64; outputs and gradients are rounded once to the
input dtype when they are written. The sequences are independent: the public functions
cut P into as many streams as Numba has threads and run them on Python threads with
BLAS on one thread (see the comment above them).

Backward: pass 1, forward over groups, rebuilds the states S_{c-1}, writes drq, and
stores in float64 what pass 2 needs; pass 2, backward over groups, forms Y_c = Qc^T dF_c,
their suffix sums Gx_c (carried from the next group), adds the state terms and writes
dv and drk. As in the scan, pass 1 recomputes the states rather than storing them.

Memory
------
Never N x N, never N x K x e. Per call, beyond the outputs:

- per group (reused from group to group, sized by CHUNK_GROUP_TOKENS, not by N): the float64
  inputs and products O(P T (K + e)), the affinities A (and dA) O(P G C^2) = O(P T C),
  the chunk states (or their suffix sums) O(P G K e) = O(P T K e / C);
- backward only, O(N) arrays in float64, stored by pass 1 for pass 2: dF (P, N, e+1)
  (row) or U and dZ (P, N, K) each (slot), and the within-chunk parts of dv (P, N, e) and
  drk (P, N, K). About 3 (P, N, K or e) float64 arrays: linear in N, of the order of the
  inputs (in float64); the scan's backward stores less, (P, N, 1) (row) or (P, N, K)
  (slot) twice.

The forward's temporaries are therefore constant in N and the backward's linear in N,
with the per-group part a few MiB (P = 4, T = 256, K = e = 64: ~4 MiB forward).
Measured (tracemalloc, P = 4, K = e = 64, C = 64, float32, row, one thread): forward
peak = the output + 4.4 MiB at N = 4096, 8192 and 16384; backward peak 35, 63, 119 MiB,
~1.9 KiB per token and sequence (dF, the float64 dv and drk parts, and dv itself).
"""

import functools

import numba
import numpy as np

from gma_np._numerics import ACCUM_DTYPE, CHUNK_GROUP_TOKENS
from gma_np._threads import blas_single_thread, run_streams, threads_for
from gma_np._workspace import pooled

def _groups(N, chunk):
    """(start, tokens, chunks) of each group of whole chunks; the last may be shorter."""
    G = max(1, CHUNK_GROUP_TOKENS // chunk)
    T = G * chunk
    for s in range(0, N, T):
        n = min(T, N - s)
        yield s, n, -(-n // chunk)


def _load(buf, src, s, n, t, read_only=False):
    """buf[:, :t] = float64(src[:, s:s+n]) padded with zero rows; returns the view buf[:, :t].

    read_only: the caller will not write to the result, so a whole group of a float64
    src is returned as the view src[:, s:s+t] without a copy."""
    if read_only and n == t and src.dtype == ACCUM_DTYPE:
        return src[:, s:s + t]
    b = buf[:, :t]
    b[:, :n] = src[:, s:s + n]
    b[:, n:] = 0.0
    return b


@functools.lru_cache(maxsize=16)
def _tril(chunk):
    """L (C, C): ones on and below the diagonal, float64 (read-only, made once per C)."""
    L = np.tril(np.ones((chunk, chunk), dtype=ACCUM_DTYPE))
    L.flags.writeable = False
    return L


class _Buffers:
    """The float64 buffers of one group, allocated once per call at the largest group."""

    def __init__(self, P, N, K, e, ev, chunk, backward):
        G = max(1, CHUNK_GROUP_TOKENS // chunk)
        T = min(G * chunk, -(-N // chunk) * chunk)
        G = T // chunk
        f = ACCUM_DTYPE
        self.q = np.empty((P, T, K), f)             # (P, T, K)  Qr: rq (row) or U (slot)
        self.k = np.empty((P, T, K), f)             # (P, T, K)  rk
        self.v = np.empty((P, T, ev), f)            # (P, T, e') Vr: [v | 1] (row) or v
        self.F = np.empty((P, T, ev), f)            # (P, T, e') read-out / dF
        self.F2 = np.empty((P, T, ev), f)           # (P, T, e') second product
        self.A = np.empty((P, G, chunk, chunk), f)  # (P, G, C, C) intra-chunk affinity
        self.S = np.empty((P, G + 1, K, ev), f)     # (P, G+1, K, e') chunk states (prefix / suffix)
        if backward:
            self.dA = np.empty((P, G, chunk, chunk), f)   # (P, G, C, C)
            self.dq = np.empty((P, T, K), f)              # (P, T, K)
            self.dk = np.empty((P, T, K), f)              # (P, T, K)
            self.D = np.empty((P, T, K), f)               # (P, T, K) slot: Z + eps
            self.dO = np.empty((P, T, e), f)              # (P, T, e) do
        if ev > e:
            self.v[:, :, e] = 1.0                   # the normaliser column of row


def _chunk_states(b, k4, v4, g, carry):
    """Step 1 of the core for g chunks: S (P, g, K, e') in b.S, S[:, c] = S_{c-1} of chunk c.

    k4 (P, g, C, K), v4 (P, g, C, e'); carry (P, K, e') is S before the group and is
    replaced by S after it.
    """
    S = b.S[:, :g + 1]                                              # (P, g+1, K, e')
    # W_c = Kc^T Vc into S[:, 1:], the carry into S[:, 0], then the prefix sum over
    # chunks (a loop of g vector adds: np.cumsum along a middle axis is 5-10x slower)
    S[:, 0] = carry
    np.matmul(k4.transpose(0, 1, 3, 2), v4, out=S[:, 1:])          # 'pgck,pgce->pgke'
    for c in range(1, g + 1):
        S[:, c] += S[:, c - 1]                                      # S[:, c] = S_{c-1} of chunk c
    carry[...] = S[:, g]
    return S[:, :g]


def _affinity(b, q4, k4, g):
    """Step 2: A_c = (Qc Kc^T) o L (P, g, C, C) in b.A; masked entries exact zeros."""
    A = b.A[:, :g]                                                  # (P, g, C, C)
    np.matmul(q4, k4.transpose(0, 1, 3, 2), out=A)                  # 'pgik,pgjk->pgij'
    A *= _tril(q4.shape[2])
    return A


def _read_chunks(b, q4, k4, v4, g, carry):
    """Steps 1-3 of the core for g chunks: F (P, g*C, e') in b.F (and S in b.S, A in b.A).

    q4, k4 (P, g, C, K), v4 (P, g, C, e'); carry as for _chunk_states.
    """
    P, _, C, K = q4.shape
    ev = v4.shape[3]
    S = _chunk_states(b, k4, v4, g, carry)                          # (P, g, K, e') S_{c-1}
    A = _affinity(b, q4, k4, g)                                     # (P, g, C, C)
    # 3. read F_c = Qc S_{c-1} + A_c Vc
    F = b.F[:, :g * C].reshape(P, g, C, ev)                         # (P, g, C, e')
    F2 = b.F2[:, :g * C].reshape(P, g, C, ev)                       # (P, g, C, e')
    np.matmul(q4, S, out=F)                                         # 'pgck,pgke->pgce'
    np.matmul(A, v4, out=F2)                                        # 'pgij,pgje->pgie'
    F += F2
    return F.reshape(P, g * C, ev)


def _slot_query(b, rq, k4, s, n, t, zcarry, eps):
    """U = rq / D with D = Z + eps, Z_i = z_prev + sum_{j <= i in the chunk} rk_j (inclusive),
    from the float64 keys k4 (P, g, C, K) and zcarry (P, K), z before the group, which is
    advanced; returns (U (P, t, K) in b.q, D (P, t, K) in b.D). Padding rows: U = 0, D = 1.

    The sum within the chunk is the product L Kc (C x C by C x K, the masked entries exact
    zeros); then each chunk adds the total of the chunks before it (a loop of g adds:
    np.cumsum along the token axis is slower than the product)."""
    P, g, C, K = k4.shape
    Z = b.D[:, :t].reshape(P, g, C, K)                              # (P, g, C, K)
    np.matmul(_tril(C), k4, out=Z)                                  # 'ij,pgjk->pgik'
    for c in range(g):
        Z[:, c] += zcarry[:, None, :]
        zcarry[...] = Z[:, c, C - 1]                                # z after chunk c
    D = Z.reshape(P, t, K)
    D += eps
    D[:, n:] = 1.0
    U = _load(b.q, rq, s, n, t)
    U /= D
    return U, D


def _forward(rq, rk, v, slot, eps, chunk, out):
    """causal_chunked_forward on the sequences given (a slice of P), writing out."""
    P, N, K = rq.shape
    e = v.shape[2]
    ev = e if slot else e + 1
    b = _Buffers(P, N, K, e, ev, chunk, backward=False)
    if slot:
        b.D = np.empty_like(b.q)
    carry = np.zeros((P, K, ev), ACCUM_DTYPE)                       # (P, K, e') S before the group
    zcarry = np.zeros((P, K), ACCUM_DTYPE)                          # (P, K) slot: z before the group
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for s, n, g in _groups(N, chunk):
            t = g * chunk
            k = _load(b.k, rk, s, n, t, True)                             # (P, t, K)
            if slot:
                q, _ = _slot_query(b, rq, k.reshape(P, g, chunk, K), s, n, t, zcarry, eps)  # U
            else:
                q = _load(b.q, rq, s, n, t, True)                         # (P, t, K)
            vr = b.v[:, :t]                                           # (P, t, e')
            vr[:, :n, :e] = v[:, s:s + n]
            vr[:, n:, :e] = 0.0
            F = _read_chunks(b, q.reshape(P, g, chunk, K), k.reshape(P, g, chunk, K),
                                vr.reshape(P, g, chunk, ev), g, carry)
            if slot:
                out[:, s:s + n] = F[:, :n]
            else:
                # o_i = num_i / den_i,  den_i = rq_i . z_i + eps
                den = F[:, :n, e:] + eps                              # (P, n, 1)
                out[:, s:s + n] = F[:, :n, :e] / den


def _backward(rq, rk, v, do, slot, eps, chunk, drq, drk, dv):
    """causal_chunked_backward on the sequences given (a slice of P), writing drq, drk, dv."""
    P, N, K = rq.shape
    e = v.shape[2]
    ev = e if slot else e + 1
    f = ACCUM_DTYPE
    b = _Buffers(P, N, K, e, ev, chunk, backward=True)
    L = _tril(chunk)                                                # (C, C)
    # stored by pass 1 for pass 2 (float64):
    dv64 = np.empty((P, N, e), f)          # (P, N, e)  dv: within-chunk part, then all of it
    drk64 = np.empty((P, N, K), f)         # (P, N, K)  drk: likewise
    if slot:
        U_all = np.empty((P, N, K), f)     # (P, N, K)  Qr = U of every token
        dZ_all = np.empty((P, N, K), f)    # (P, N, K)  dZ_i = -dU_i o U_i / D_i
    else:
        dF_all = np.empty((P, N, ev), f)   # (P, N, e+1)  dF_i = [dnum_i | dden_i]
    carry = np.zeros((P, K, ev), f)        # (P, K, e') S before the group (pass 1), Gx after it (pass 2)
    zcarry = np.zeros((P, K), f)           # (P, K)     slot: z before the group / sum of dZ after it

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # ---- pass 1: forward over groups ---------------------------------------------
        for s, n, g in _groups(N, chunk):
            t = g * chunk
            C = chunk
            k = _load(b.k, rk, s, n, t, True)                             # (P, t, K)
            if slot:
                q, D = _slot_query(b, rq, k.reshape(P, g, C, K), s, n, t, zcarry, eps)  # U, D
            else:
                q = _load(b.q, rq, s, n, t, True)                         # (P, t, K)
            vr = b.v[:, :t]                                           # (P, t, e')
            vr[:, :n, :e] = v[:, s:s + n]
            vr[:, n:, :e] = 0.0
            q4, k4 = q.reshape(P, g, C, K), k.reshape(P, g, C, K)     # (P, g, C, K)
            v4 = vr.reshape(P, g, C, ev)                              # (P, g, C, e')
            S = _chunk_states(b, k4, v4, g, carry)                    # (P, g, K, e') S_{c-1}
            A = _affinity(b, q4, k4, g)                               # (P, g, C, C)
            dO = _load(b.dO, do, s, n, t, True)                           # (P, t, e)
            dO4 = dO.reshape(P, g, C, e)                              # (P, g, C, e)
            dA = b.dA[:, :g]                                          # (P, g, C, C)
            dq = b.dq[:, :t].reshape(P, g, C, K)                      # (P, g, C, K)
            dk = b.dk[:, :t].reshape(P, g, C, K)                      # (P, g, C, K)
            if slot:
                # in the forward pass this was: o_i = F_i, so dF = do
                dF4 = dO4
                # 3. F_c = Qc S_{c-1} + A_c Vc:  dA_c = (dF_c Vc^T) o L,  dQc = dF_c S_{c-1}^T + ...
                np.matmul(dF4, v4.transpose(0, 1, 3, 2), out=dA)      # 'pgie,pgje->pgij'
                dA *= L
                np.matmul(dF4, S.transpose(0, 1, 3, 2), out=dq)       # 'pgie,pgke->pgik'
            else:
                # in the forward pass this was: o_i = num_i / den_i, with (F = [num | den - eps])
                #    num_i = rq_i S_{c-1} + sum_j A_ij v_j,  den_i = rq_i . z_{c-1} + sum_j A_ij + eps.
                # The backward needs do_i . o_i, not o_i: with M_ij = do_i . v_j and
                # s_i = S_{c-1} do_i (both needed below anyway), do_i . num_i = rq_i . s_i + sum_j A_ij M_ij,
                # so the read F is not formed again (it would cost C K e + C^2 e per chunk).
                np.matmul(dO4, v4[..., :e].transpose(0, 1, 3, 2), out=dA)   # M (P, g, C, C)
                np.matmul(dO4, S[..., :e].transpose(0, 1, 3, 2), out=dq)    # s (P, g, C, K)
                z = S[..., e]                                         # (P, g, K) z_{c-1}
                den = np.einsum("pgck,pgk->pgc", q4, z)               # (P, g, C)
                den += A.sum(axis=3)
                den += eps
                den.reshape(P, t)[:, n:] = 1.0                        # padding rows
                don = np.einsum("pgck,pgck->pgc", q4, dq)             # (P, g, C) do_i . num_i
                don += np.einsum("pgij,pgij->pgi", A, dA)
                inv = 1.0 / den                                       # (P, g, C)
                # dden_i = -(do_i . o_i) / den_i = -(do_i . num_i) / den_i^2;  dnum_i = do_i / den_i
                dden = don                                            # (P, g, C)
                dden *= inv
                dden *= inv
                np.negative(dden, out=dden)
                dF4 = b.F[:, :t].reshape(P, g, C, ev)                 # (P, g, C, e+1) [dnum | dden]
                np.multiply(dO4, inv[..., None], out=dF4[..., :e])
                dF4[..., e] = dden
                dF_all[:, s:s + n] = dF4.reshape(P, t, ev)[:, :n]
                # 3. dA_c = (dnum_c Vc^T + dden_c 1^T) o L = (M / den + dden) o L
                dA *= inv[..., None]
                dA += dden[..., None]
                dA *= L
                #    dQc = dnum_c S_{c-1}^T + dden_c z_{c-1}^T + ... = s / den + dden z^T + ...
                dq *= inv[..., None]
                np.multiply(dden[..., None], z[:, :, None, :], out=dk)
                dq += dk
            #    dVc = A_c^T dnum_c  (row: the e columns of dF; slot: dF)
            dvl = b.F2[:, :t].reshape(P, g, C, ev)                    # (P, g, C, e')
            np.matmul(A.transpose(0, 1, 3, 2), dF4[..., :e], out=dvl[..., :e])  # 'pgij,pgie->pgje'
            dv64[:, s:s + n] = dvl.reshape(P, t, ev)[:, :n, :e]
            # 2. A_c = (Qc Kc^T) o L:  dQc += dA_c Kc
            np.matmul(dA, k4, out=dk)                                 # 'pgij,pgjk->pgik'
            dq += dk
            #    dKc = dA_c^T Qc
            np.matmul(dA.transpose(0, 1, 3, 2), q4, out=dk)           # 'pgij,pgik->pgjk'
            drk64[:, s:s + n] = dk.reshape(P, t, K)[:, :n]
            dq = dq.reshape(P, t, K)
            if slot:
                # in the forward pass this was: U_i = rq_i / D_i
                U_all[:, s:s + n] = q[:, :n]
                dq /= D                                               # drq_i = dU_i / D_i
                drq[:, s:s + n] = dq[:, :n]
                dq *= q                                               # dZ_i = -dU_i o U_i / D_i
                np.negative(dq, out=dq)
                dZ_all[:, s:s + n] = dq[:, :n]
            else:
                drq[:, s:s + n] = dq[:, :n]

        # ---- pass 2: backward over groups --------------------------------------------
        carry[...] = 0.0                                              # Gx after the group
        zcarry[...] = 0.0                                             # sum of dZ after the group
        for s, n, g in reversed(list(_groups(N, chunk))):
            t = g * chunk
            C = chunk
            q = _load(b.q, U_all if slot else rq, s, n, t, True)          # (P, t, K) Qr
            k = _load(b.k, rk, s, n, t, True)                             # (P, t, K)
            dF = _load(b.F, do if slot else dF_all, s, n, t, True)        # (P, t, e')
            q4, k4 = q.reshape(P, g, C, K), k.reshape(P, g, C, K)     # (P, g, C, K)
            dF4 = dF.reshape(P, g, C, ev)                             # (P, g, C, e')
            # 1. Y_c = Qc^T dF_c into Gx[:, :g], the carry into Gx[:, g], then the suffix sum
            Gx = b.S[:, :g + 1]                                       # (P, g+1, K, e')
            Gx[:, g] = carry
            np.matmul(q4.transpose(0, 1, 3, 2), dF4, out=Gx[:, :g])   # 'pgck,pgce->pgke'
            for c in range(g - 1, -1, -1):
                Gx[:, c] += Gx[:, c + 1]                              # Gx[:, c] = sum_{c' >= c} Y_c'
            carry[...] = Gx[:, 0]
            Gn = Gx[:, 1:]                                            # (P, g, K, e') Gx_c: chunks > c
            # in the forward pass this was: S_c = S_{c-1} + Kc^T Vc
            #    dVc += Kc Gx_c,   dKc += Vc Gx_c^T
            vr = b.v[:, :t]                                           # (P, t, e')
            vr[:, :n, :e] = v[:, s:s + n]
            vr[:, n:, :e] = 0.0
            v4 = vr.reshape(P, g, C, ev)                              # (P, g, C, e')
            dvs = b.F2[:, :t].reshape(P, g, C, ev)                    # (P, g, C, e')
            np.matmul(k4, Gn, out=dvs)                                # 'pgck,pgke->pgce'
            dks = b.dk[:, :t].reshape(P, g, C, K)                     # (P, g, C, K)
            np.matmul(v4, Gn.transpose(0, 1, 3, 2), out=dks)          # 'pgce,pgke->pgck'
            dks = dks.reshape(P, t, K)
            if slot:
                # in the forward pass this was: Z_i = z_prev + sum_{j <= i} rk_j:
                #    drk_j += sum_{i >= j} dZ_i, the suffix sum carried from the next group
                dZ = _load(b.D, dZ_all, s, n, t, True).reshape(P, g, C, K)  # (P, g, C, K)
                sZ = b.dq[:, :t].reshape(P, g, C, K)                  # (P, g, C, K)
                np.matmul(_tril(C).T, dZ, out=sZ)                     # 'ji,pgjk->pgik' within the chunk
                for c in range(g - 1, -1, -1):
                    sZ[:, c] += zcarry[:, None, :]
                    zcarry[...] = sZ[:, c, 0]                         # sum of dZ from chunk c on
                dZ = sZ.reshape(P, t, K)
                dks += dZ
            dv[:, s:s + n] = dv64[:, s:s + n] + dvs.reshape(P, t, ev)[:, :n, :e]
            drk[:, s:s + n] = drk64[:, s:s + n] + dks[:, :n]


# ---------------------------------------------------------------------------------------
# Public wrappers: the sequences are independent, so P is cut into streams that run
# concurrently on Python threads (NumPy's matmul releases the GIL) with BLAS on one
# thread each: the products are small (C x K by K x e), where a multi-threaded BLAS
# wakes its pool for every one of thousands of calls (gma_np._threads). Every
# sequence is computed by the same calls whatever the streams, so the results are bit
# for bit the same for any thread count.
# ---------------------------------------------------------------------------------------

def _streams(P, work):
    """The (start, stop) slices of P, one per stream: as many as Numba's threads for large work."""
    with threads_for(work):
        n = max(1, min(P, numba.get_num_threads()))
    bounds = [P * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def causal_chunked_forward(rq, rk, v, slot, eps, chunk):
    """Causal read-out of the K-slot memory, chunk by chunk (module docstring).

    Parameters
    ----------
    rq, rk : arrays of shape (P, N, K), routed queries and (already masked) keys
    v : array of shape (P, N, e), one dtype with rq, rk (float32 or float64)
    slot : bool, False for norm "row", True for norm "slot"
    eps : float >= 0
    chunk : int >= 1, tokens per chunk C (N need not be a multiple)

    Returns
    -------
    out : array of shape (P, N, e), dtype of v
    """
    P, N, K = rq.shape
    e = v.shape[2]
    out = pooled(v.shape, v.dtype)                                  # (P, N, e)
    if N == 0 or P == 0:
        return out
    parts = _streams(P, P * N * (chunk + K) * (K + e))
    with blas_single_thread():
        run_streams(lambda i: _forward(rq[slice(*parts[i])], rk[slice(*parts[i])], v[slice(*parts[i])],
                                       slot, eps, chunk, out[slice(*parts[i])]), len(parts))
    return out


def causal_chunked_backward(rq, rk, v, do, slot, eps, chunk, drq, drk):
    """Gradient of sum(out * do) for out = causal_chunked_forward(rq, rk, v, slot, eps, chunk).

    Parameters
    ----------
    rq, rk, v, slot, eps, chunk : as for causal_chunked_forward
    do : array of shape (P, N, e), the cotangent of out
    drq, drk : arrays of shape (P, N, K) in the dtype of rq, written (may be views)

    Returns
    -------
    dv : array of shape (P, N, e), dtype of v
    """
    P, N, K = rq.shape
    e = v.shape[2]
    dv = pooled(v.shape, v.dtype)                                   # (P, N, e)
    if N == 0 or P == 0:
        return dv
    parts = _streams(P, 4 * P * N * (chunk + K) * (K + e))
    with blas_single_thread():
        run_streams(lambda i: _backward(*(a[slice(*parts[i])] for a in (rq, rk, v, do)), slot, eps, chunk,
                                        *(a[slice(*parts[i])] for a in (drq, drk, dv))), len(parts))
    return dv
