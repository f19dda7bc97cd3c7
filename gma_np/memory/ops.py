"""The feature memory: normalised linear attention through an (F, e) memory.

Dimension legend: P independent sequences (batch x heads, flattened), N tokens,
F features per token, e value size.

This is the one op that GMA, linear attention and the Performer share. They differ
only in the feature map phi that turns queries and keys into non-negative features
(GMA: the K responsibilities of a Gaussian mixture; linear attention: elu(x) + 1,
F = d, Katharopoulos et al. 2020; the Performer: m positive random features,
Choromanski et al. 2021). Given, per sequence,

    rq = phi(Q)         (N, F)   query features
    rk = m * phi(K)     (N, F)   key features, already multiplied by the key mask m (N,)
    v                   (N, e)   values

the memory is written and read as

    write   S_i = sum_{j in R(i)} outer(rk_j, v_j)  (F, e),   z_i = sum_{j in R(i)} rk_j  (F,)
            R(i) = every j (bidirectional), j <= i (causal)
    read    row:  o_i = (rq_i S_i) / (rq_i . z_i + eps)
            slot: o_i = sum_f rq_i[f] S_i[f] / (z_i[f] + eps)          (GMA's "slot" norm)

or, as N x N matrices (never formed here; tests/test_memory.py uses it as ground
truth): A = (rq rk^T) o L with L lower-triangular (causal) or all ones, and for row
O = (A V) / (A 1 + eps).

    memory_forward(rq, rk, v, *, causal, slot, eps)            -> o
    memory_backward(rq, rk, v, do, *, causal, slot, eps)       -> (drq, drk, dv)
    memory_recurrent(rq, rk, v, S, z, *, slot, eps)            -> (o, S, z)    causal, from a state
    memory_step(rq_t, rk_t, v_t, S, z, *, slot, eps)           -> (o_t, S, z)  one token

The forms are the ones gma_forward runs, not copies of them: bidirectional by float64
GEMMs through the memory, block by block of tokens (gma_np.memory.bidirectional);
causal by the Numba prefix scan (gma_np.memory.scan) or, where F e is large enough for
BLAS to win, by the chunked form (gma_np.memory.chunked), picked by causal_form
(below), as gma_forward picks it; decoding by the same scan started from a state, and
one token by the fused step kernel (gma_np.memory.step). Their derivations are
docs/derivations.md, sections 4 to 8 (with K read as F); the backward returns the
gradients with respect to the features, and each mixer chains them through its own
feature map.

Numerics: rq, rk, v (and do) share one dtype, float32 or float64, and the outputs
come in it; S, z and every sum over tokens are float64 whatever that dtype. A caller
that wants float64 features for float32 inputs (the Performer, whose features span
many orders of magnitude) passes everything in float64 and rounds the result once.
The op does not check for NaN: with eps = 0 a query that reads an empty memory
gives 0 / 0, which `check_output_finite` turns into a clear error.
"""

from dataclasses import dataclass

import numpy as np

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE, CAUSAL_CHUNK, CHUNKED_MIN_KE, SUPPORTED_DTYPES
from gma_np._threads import threads_for
from gma_np.memory.bidirectional import _bidirectional_backward, _bidirectional_forward
from gma_np.memory.chunked import causal_chunked_backward, causal_chunked_forward
from gma_np.memory.scan import (
    _causal_backward,
    _causal_forward,
    _forward_blocked_kernel,
    _no_checkpoints,
)
from gma_np.memory.step import _step_write_read

FORMS = ("scan", "chunked")


def causal_form(K, e):
    """Which causal form gma_forward / gma_backward use for K components and value size e:
    "chunked" (gma_np.memory.chunked) where it measured faster than the token scan,
    K e >= CHUNKED_MIN_KE, else "scan" (gma_np.memory.scan). Both compute the same
    numbers to rounding and are tested against the dense reference (docs/performance.md)."""
    return "chunked" if K * e >= CHUNKED_MIN_KE else "scan"


def _check_arrays(names, arrays, ndims):
    """One float dtype for every array and the given numbers of dimensions (internal
    callers pass arrays they built; this catches a wiring error with a clear message)."""
    dtype = arrays[0].dtype
    for name, a, nd in zip(names, arrays, ndims):
        if not isinstance(a, np.ndarray) or a.ndim != nd:
            got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name}: expected an array with {nd} dimensions, got {got}")
        if a.dtype not in SUPPORTED_DTYPES or a.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (float32 or float64, one for "
                            f"{', '.join(names)}), got {a.dtype}")


def _check_memory_inputs(rq, rk, v, do=None):
    names, arrays = ["rq", "rk", "v"], [rq, rk, v]
    if do is not None:
        names.append("do")
        arrays.append(do)
    _check_arrays(names, arrays, [3] * len(arrays))
    P, N, F = rq.shape
    if rk.shape != rq.shape:
        raise ValueError(f"rk: expected the shape of rq (P, N, F) = {rq.shape}, got {rk.shape}")
    if v.shape[:2] != (P, N):
        raise ValueError(f"v: expected shape (P, N, e) with (P, N) = {(P, N)} from rq, got {v.shape}")
    if do is not None and do.shape != v.shape:
        raise ValueError(f"do: expected the shape of v (P, N, e) = {v.shape}, got {do.shape}")
    return [np.ascontiguousarray(a) for a in arrays]


def _form(causal, F, e, form):
    """"bidirectional", or the causal form: `form` if given, else causal_form(F, e)."""
    if not causal:
        return "bidirectional"
    if form is None:
        return causal_form(F, e)
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS} or None, got {form!r}")
    return form


def memory_forward(rq, rk, v, *, causal, slot=False, eps, form=None):
    """o (P, N, e) of the feature memory (module docstring), in the dtype of the inputs.

    Parameters
    ----------
    rq, rk : arrays of shape (P, N, F), query features and masked key features (>= 0)
    v : array of shape (P, N, e), one dtype with rq, rk (float32 or float64)
    causal : bool, query i reads keys j <= i only
    slot : bool, GMA's slot read-out instead of the row normalisation
    eps : float >= 0, added to the read-out denominators
    form : None (automatic, as gma_forward: causal_form(F, e)), "scan" or "chunked";
        only the causal case has forms. Every form gives the same numbers to rounding.
    """
    rq, rk, v = _check_memory_inputs(rq, rk, v)
    F, e = rq.shape[2], v.shape[2]
    kind = _form(causal, F, e, form)
    if kind == "bidirectional":
        return _bidirectional_forward(rq, rk, v, slot, eps)
    if kind == "chunked":
        return causal_chunked_forward(rq, rk, v, slot, eps, CAUSAL_CHUNK)
    return _causal_forward(rq, rk, v, slot, eps)


def memory_backward(rq, rk, v, do, *, causal, slot=False, eps, form=None):
    """Gradients (drq, drk, dv) of sum(o * do) for o = memory_forward(rq, rk, v, ...).

    drq, drk (P, N, F) and dv (P, N, e), in the dtype of the inputs. drk is the gradient
    with respect to the masked key features as passed in; a caller that masked them
    multiplies by the mask again (o does not depend on a padding key's features).
    The memory is recomputed, not cached: a write pass (bidirectional) or the forward
    scan again (causal), O(F e) memory instead of O(N F e).
    """
    rq, rk, v, do = _check_memory_inputs(rq, rk, v, do)
    P, N, F = rq.shape
    e = v.shape[2]
    kind = _form(causal, F, e, form)
    drq = np.empty((P, N, F), dtype=rq.dtype)
    drk = np.empty((P, N, F), dtype=rq.dtype)
    if kind == "bidirectional":
        dv = _bidirectional_backward(rq, rk, v, do, slot, eps, drq, drk)
    elif kind == "chunked":
        dv = causal_chunked_backward(rq, rk, v, do, slot, eps, CAUSAL_CHUNK, drq, drk)
    else:
        dv = _causal_backward(rq, rk, v, do, slot, eps, drq, drk)
    return drq, drk, dv


def _check_state_arrays(S, z, P, F, e):
    for name, a, shape in (("S", S, (P, F, e)), ("z", z, (P, F))):
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != ACCUM_DTYPE:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name}: expected a float64 array of shape {shape}, got {got}")


def memory_recurrent(rq, rk, v, S, z, *, slot=False, eps):
    """The causal memory over a chunk of N >= 1 tokens, continuing from the state S, z.

    Parameters
    ----------
    rq, rk, v : as for memory_forward (P, N, F), (P, N, F), (P, N, e)
    S, z : float64 arrays (P, F, e) and (P, F), the memory after the prefix (zeros for
        an empty one); not modified

    Returns
    -------
    o : array of shape (P, N, e), dtype of v
    S, z : the state after the chunk (new float64 arrays)

    Any chunking of a sequence gives the causal memory_forward of the whole sequence to
    rounding. One token goes through the serial fused step kernel: at one token the
    cost is latency (a thread pool, temporaries), not multiply-adds.
    """
    rq, rk, v = _check_memory_inputs(rq, rk, v)
    P, N, F = rq.shape
    e = v.shape[2]
    _check_state_arrays(S, z, P, F, e)
    S = S.copy()
    z = z.copy()
    o = np.empty_like(v)
    if N == 1:
        # (1, P, .) views: the step kernel's (B, H, .) layout with B = 1, all C-contiguous
        out = o.reshape(1, P, e)
        _step_write_read(rq.astype(ACCUM_DTYPE).reshape(1, P, F), rk.astype(ACCUM_DTYPE).reshape(1, P, F),
                         v.reshape(1, P, e), np.ones(1), slot, eps, S.reshape(1, P, F, e),
                         z.reshape(1, P, F), out)
        return o, S, z
    with threads_for(P * N * F * e):
        _forward_blocked_kernel(F)(rq, rk, v, slot, eps, S, z, o, np.empty(P),
                                   *_no_checkpoints(P, F, e))
    return o, S, z


def memory_step(rq_t, rk_t, v_t, S, z, *, slot=False, eps):
    """One token: rq_t, rk_t (P, F), v_t (P, e) and the state S (P, F, e), z (P, F) ->
    (o_t (P, e), S, z), the state after the token (new arrays; the inputs are kept)."""
    _check_arrays(["rq_t", "rk_t", "v_t"], [rq_t, rk_t, v_t], [2, 2, 2])
    o, S, z = memory_recurrent(rq_t[:, None], rk_t[:, None], v_t[:, None], S, z, slot=slot, eps=eps)
    return o[:, 0], S, z


def check_output_finite(name, o, eps):
    """Raise FloatingPointError if o holds NaN or inf, naming the mixer `name`.

    Finite features and eps > 0 give a finite output; eps = 0 does not when a query
    reads a memory nothing was written to (all keys so far are padding).
    """
    if not check.all_finite(o):
        raise FloatingPointError(
            f"{name}: the output is not finite; with eps = {eps} a query that reads an empty "
            f"memory (all keys so far are padding) divides 0 by 0: pass eps > 0")


@dataclass
class MemoryState:
    """The feature memory of causal decoding after a prefix of a sequence."""
    S: np.ndarray   # (B, H, F, e) float64, sum over the prefix of outer(rk_j, v_j)
    z: np.ndarray   # (B, H, F)    float64, sum over the prefix of rk_j

    def copy(self):
        return type(self)(self.S.copy(), self.z.copy())


def empty_state(cls, B, H, F, e):
    """The empty memory of a state class (a MemoryState subclass): S = 0, z = 0."""
    return cls(np.zeros((B, H, F, e), dtype=ACCUM_DTYPE), np.zeros((B, H, F), dtype=ACCUM_DTYPE))


def check_state(state, cls, B, H, F, e, what):
    """Raise unless `state` is a `cls` with S (B, H, F, e) and z (B, H, F), float64, finite.

    `what` names where F comes from, for the message ("d from q", "m from projections")."""
    if not isinstance(state, cls):
        raise TypeError(f"state: expected a {cls.__name__} (the state a previous call returned) "
                        f"or None, got {type(state).__name__}")
    for name, a, shape, axes in (("state.S", state.S, (B, H, F, e), "(B, H, F, e)"),
                                 ("state.z", state.z, (B, H, F), "(B, H, F)")):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a float64 array, got {type(a).__name__}")
        if a.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} = {axes} ({what}), got {a.shape}")
        if a.dtype != ACCUM_DTYPE:
            raise TypeError(f"{name}: expected dtype float64 (the state is an accumulator), got {a.dtype}")
        if not check.all_finite(a):
            raise ValueError(f"{name}: expected finite values")
