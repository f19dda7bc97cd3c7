"""Random-feature attention, Performer FAVOR+ (Choromanski et al. 2021): the fast path.

Dimension legend: B batch, H heads, N tokens (of this call, in decoding), d query/key
head size, e value head size, m random features per head; P = B*H sequences.

Definition, per head, with the key mask mask_j (1 a real key, 0 padding), the positive
features phi of features.py (phi(q) . phi(k) estimates exp(q . k / sqrt(d))) and
R(i) = every j (bidirectional) or j <= i (causal):

    kappa_ij = phi(q_i) . phi(k_j)
    o_i = sum_{j in R(i)} mask_j kappa_ij v_j / (sum_{j in R(i)} mask_j kappa_ij + eps)

eps is added to the denominator of this, unstabilised, definition, exactly as in linear
attention: it keeps o finite when nothing was written, and it does not depend on how
the code stabilises.

Computation: with the stabilised features phi^ = exp(-c / 2) phi (features.py,
c = max_{h, r} |w_hr|^2, a constant of the projections) and

    rq = phi^(q),   rk = mask * phi^(k)        (N, m)
    eps^ = eps * exp(-c)

the feature memory of gma_np.memory computes (rq_i S_i) / (rq_i . z_i + eps^), and
since rq_i . rk_j = exp(-c) kappa_ij, numerator and denominator are the definition's
times exp(-c): the stabiliser cancels exactly, eps included. (A per-query stabiliser
would cancel too, but would need a per-query eps^; one per buffer keeps eps^ a scalar.)
Bidirectional through the (m, e) memory by products, causal through GMA's prefix scan
(or its chunked form), decoding from the state (S, z) of the prefix, in stabilised units.

Backward (docs/mixers/performer.md): memory_backward gives drq, drk, dv (with eps^);
then the feature map's backward for q with drq and for k with drk (rk is masked, so a
padding key's du = drk * rk is exactly 0). The projections are buffers: no gradient.

Range: float64 features reach exp(-745). Two checks turn the cases where that is not
enough into a FloatingPointError instead of a silent 0: every real key keeps a feature
>= DENOMINATOR_FLOOR, and every query that has read a real key has a stabilised
denominator rq_i . z_i >= DENOMINATOR_FLOOR (docs/mixers/performer.md, "Range").

Numerics: features, memory and read-out in float64 whatever the input dtype; outputs
and gradients rounded once to it.
"""

from dataclasses import dataclass

import numpy as np

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE, DEFAULT_EPS
from gma_np.memory.ops import (
    MemoryState,
    check_output_finite,
    check_state,
    empty_state,
    memory_backward,
    memory_forward,
    memory_recurrent,
)
from gma_np.mixers.performer.features import (
    check_projections,
    feature_shift,
    positive_features,
    positive_features_backward,
)

NAME = "performer"

# Smallest stabilised feature of a real key, and smallest stabilised denominator
# rq_i . z_i of a query that has read a real key: the smallest normal float64 divided by
# the float64 epsilon (~1e-292). Above it, the products rq_if z_if and rq_if S_fc that
# fall into the subnormal range (absolute error <= 2^-1075 each) add at most
# m N 2^-1075 / DENOMINATOR_FLOOR ~ m N 1e-32 relative error to the read-out.
DENOMINATOR_FLOOR = np.finfo(np.float64).tiny / np.finfo(np.float64).eps


@dataclass
class PerformerCache:
    """What performer_attention_backward needs, all float64. The memory is recomputed by
    memory_backward, not stored; q, k are kept for the feature map's backward."""
    shape: tuple            # (B, H, N, d, e, m)
    dtype: np.dtype         # dtype of q, k, v and of the output
    causal: bool
    eps_hat: float          # eps * exp(-c), the eps of the stabilised read-out
    q: np.ndarray           # (B, H, N, d)
    k: np.ndarray           # (B, H, N, d)
    W: np.ndarray           # (H, m, d) the projections
    rq: np.ndarray          # (P, N, m) phi^(q)
    rk: np.ndarray          # (P, N, m) mask * phi^(k)
    v: np.ndarray           # (P, N, e)


class PerformerState(MemoryState):
    """The (m, e) memory of causal FAVOR+ after a prefix, in stabilised units:
    S (B, H, m, e) = sum_j outer(rk_j, v_j), z (B, H, m) = sum_j rk_j. It belongs to the
    projections it was built with (c and the features change when they are redrawn)."""


def _validate(q, k, v, projections, causal, eps, key_mask):
    q, k, v = check.qkv(q, k, v)
    B, H, N, d = q.shape
    W = check_projections(projections, H, d)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    eps = check.eps_value(eps)
    mask = check.key_mask(key_mask, B, N)                          # (B, N) float64 0/1
    c = feature_shift(W)
    eps_hat = eps * np.exp(-c)
    if eps > 0 and eps_hat < np.finfo(np.float64).tiny:
        raise ValueError(f"projections: max |w|^2 = {c:.1f} is too large: eps * exp(-max |w|^2) "
                         f"= {eps_hat:.3g} is below the smallest normal float64, so eps = {eps} "
                         f"would be lost (expected max |w|^2 <= {np.log(eps / np.finfo(np.float64).tiny):.0f})")
    return q, k, v, W, c, bool(causal), eps, eps_hat, mask


def _features(q, k, W, c, mask):
    """rq = phi^(q), rk = mask * phi^(k), as (P, N, m) float64."""
    B, H, N, d = q.shape
    m = W.shape[1]
    rq = positive_features(q, W, 0.5 * c).reshape(B * H, N, m)
    rk = positive_features(k, W, 0.5 * c)
    rk *= mask[:, None, :, None]
    return rq, rk.reshape(B * H, N, m)


def _where(p, n, H):
    return f"(b, h, n) = ({p // H}, {p % H}, {n})"


def _check_range(rq, rk, mask, H, causal, z0=None):
    """FloatingPointError where the float64 features lost a real key or a query's
    denominator (module docstring, "Range"). z0 (P, m): the state's z before the chunk."""
    P, N, m = rq.shape
    real = np.broadcast_to(mask[:, None, :], (P // H, H, N)).reshape(P, N) > 0
    lost = real & (rk.max(axis=2) < DENOMINATOR_FLOOR)
    if lost.any():
        p, n = np.argwhere(lost)[0]
        raise FloatingPointError(
            f"{NAME}: every random feature of the key at {_where(p, n, H)} is below "
            f"{DENOMINATOR_FLOOR:.1e}: |k| / d^(1/4) is too large for the positive features "
            f"exp(w . x' - |x'|^2 / 2 - c / 2) in float64 (docs/mixers/performer.md, 'Range')")
    if causal:
        Z = np.cumsum(rk, axis=1)                                  # (P, N, m) z_i
        if z0 is not None:
            Z += z0[:, None, :]
        den = np.einsum("pnf,pnf->pn", rq, Z)                      # (P, N) rq_i . z_i
        read = (Z > 0).any(axis=2)                                 # (P, N) a real key was read
    else:
        z = rk.sum(axis=1)                                         # (P, m)
        den = np.einsum("pnf,pf->pn", rq, z)
        read = np.broadcast_to((z > 0).any(axis=1)[:, None], (P, N))
    small = read & (den < DENOMINATOR_FLOOR)
    if small.any():
        p, n = np.argwhere(small)[0]
        raise FloatingPointError(
            f"{NAME}: the stabilised denominator phi^(q) . z of the query at {_where(p, n, H)} is "
            f"{den[p, n]:.3g}, below {DENOMINATOR_FLOOR:.1e}: q and k are too large for the positive "
            f"random features in float64 (docs/mixers/performer.md, 'Range')")


def performer_attention_forward(q, k, v, projections, *, causal=False, key_mask=None, eps=DEFAULT_EPS):
    """FAVOR+ random-feature attention, returning the output and the cache.

    Parameters
    ----------
    q, k : arrays of shape (B, H, N, d), float32 or float64 (one dtype for q, k, v)
    v : array of shape (B, H, N, e)
    projections : array of shape (H, m, d), the random projections (draw_projections)
    causal : bool, query i reads keys j <= i only
    key_mask : bool array of shape (B, N), or None; False keys write nothing
    eps : float >= 0, added to the denominator of the (unstabilised) definition

    Returns
    -------
    o : array of shape (B, H, N, e), dtype of q
    cache : PerformerCache
    """
    q, k, v, W, c, causal, eps, eps_hat, mask = _validate(q, k, v, projections, causal, eps, key_mask)
    B, H, N, d = q.shape
    e = v.shape[3]
    m = W.shape[1]
    # 1. stabilised features: rq = phi^(q), rk = mask * phi^(k)
    rq, rk = _features(q, k, W, c, mask)                           # (P, N, m) float64
    _check_range(rq, rk, mask, H, causal)
    v3 = v.reshape(B * H, N, e).astype(ACCUM_DTYPE)                # (P, N, e)
    # 2. write the (m, e) memory and read it out, with eps^ = eps exp(-c)
    o = memory_forward(rq, rk, v3, causal=causal, eps=eps_hat)     # (P, N, e) float64
    check_output_finite(NAME, o, eps)
    cache = PerformerCache(shape=(B, H, N, d, e, m), dtype=q.dtype, causal=causal, eps_hat=eps_hat,
                           q=q, k=k, W=W, rq=rq, rk=rk, v=v3)
    return o.astype(q.dtype).reshape(B, H, N, e), cache


def performer_attention_backward(do, cache):
    """Gradients of sum(o * do): dict "q", "k", "v", in the shapes and dtype of the inputs
    (the projections are buffers and get none).

    Parameters
    ----------
    do : array of shape (B, H, N, e), the cotangent of o
    cache : PerformerCache from performer_attention_forward
    """
    if not isinstance(cache, PerformerCache):
        raise TypeError(f"cache: expected the PerformerCache that performer_attention_forward "
                        f"returned, got {type(cache).__name__}")
    B, H, N, d, e, m = cache.shape
    do = check.float_array("do", do, ndim=4)
    check.check_shape("do", do, (B, H, N, e), "the shape of o, (B, H, N, e)")
    do3 = do.reshape(B * H, N, e).astype(ACCUM_DTYPE)
    # 2. in the forward pass this was: o = memory(rq, rk, v) with eps^
    drq, drk, dv = memory_backward(cache.rq, cache.rk, cache.v, do3, causal=cache.causal,
                                   eps=cache.eps_hat)
    # 1. in the forward pass this was: rq = phi^(q), rk = mask * phi^(k)
    #    (du = drk * rk: 0 at padding keys, where rk = 0)
    shape = (B, H, N, m)
    dq = positive_features_backward(drq.reshape(shape), cache.rq.reshape(shape), cache.q, cache.W)
    dk = positive_features_backward(drk.reshape(shape), cache.rk.reshape(shape), cache.k, cache.W)
    return {"q": dq.astype(cache.dtype), "k": dk.astype(cache.dtype),
            "v": dv.astype(cache.dtype).reshape(B, H, N, e)}


def performer_attention(q, k, v, projections, *, causal=False, key_mask=None, eps=DEFAULT_EPS):
    """FAVOR+ random-feature attention: o (B, H, N, e). See performer_attention_forward."""
    return performer_attention_forward(q, k, v, projections, causal=causal, key_mask=key_mask,
                                       eps=eps)[0]


def init_performer_state(B, H, m, e):
    """The empty memory: S = 0 (B, H, m, e), z = 0 (B, H, m)."""
    return empty_state(PerformerState, B, H, m, e)


def performer_attention_recurrent(q, k, v, projections, state=None, *, key_mask=None, eps=DEFAULT_EPS):
    """Causal FAVOR+ over a chunk of N >= 1 tokens, continuing from `state`.

    Parameters
    ----------
    q, k : arrays of shape (B, H, N, d);  v : array of shape (B, H, N, e)
    projections : array of shape (H, m, d), the ones the state was built with
    state : PerformerState with S (B, H, m, e), z (B, H, m), or None for the empty
        memory; not modified
    key_mask, eps : as in performer_attention

    Returns
    -------
    o : array of shape (B, H, N, e), dtype of q
    state : PerformerState after the chunk

    Any chunking of a sequence, token by token included, gives the causal
    performer_attention of the whole sequence (to rounding).
    """
    q, k, v, W, c, _, eps, eps_hat, mask = _validate(q, k, v, projections, True, eps, key_mask)
    B, H, N, d = q.shape
    e = v.shape[3]
    m = W.shape[1]
    if state is None:
        state = init_performer_state(B, H, m, e)
    check_state(state, PerformerState, B, H, m, e, "m from projections, e from v")
    rq, rk = _features(q, k, W, c, mask)                           # (P, N, m) float64
    z0 = state.z.reshape(B * H, m)
    _check_range(rq, rk, mask, H, True, z0)
    o, S, z = memory_recurrent(rq, rk, v.reshape(B * H, N, e).astype(ACCUM_DTYPE),
                               state.S.reshape(B * H, m, e), z0, eps=eps_hat)
    check_output_finite(NAME, o, eps)
    return (o.astype(q.dtype).reshape(B, H, N, e),
            PerformerState(S.reshape(B, H, m, e), z.reshape(B, H, m)))
